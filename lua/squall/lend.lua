--- Lending the running coroutine to a call that might wait.
--
-- A server that runs each request on a coroutine of its own pays a resume
-- and a yield per request, more than a short request itself costs. It can
-- run the request on the coroutine that read it instead, lent:
--
--     lend.keeper(me, carry_on, arg)     -- once, while `me` reads
--     lend.lend(1); handler(...); lend.lend(0)
--
-- If the handler waits, it keeps `me`; then, once the yield reaches the
-- resume that ran `me`, carry_on(me, arg) is called and returns a
-- coroutine and its arguments, which are resumed at once to carry on
-- `me`'s own work (reading the next requests). runtime/coro.h says how
-- the C side does it. squall.rpc runs its requests so.
-- @module squall.lend
local core = require "squall.core"
local ffi = require "ffi"

local M = {}

pcall(ffi.cdef, "void squall_coro_lend(int on);")

--- lend(1) before the call, lend(0) after it: the running coroutine is
-- lent in between. (A C function through the FFI, so that the JIT keeps
-- it inside the caller's trace.)
M.lend = ffi.C.squall_coro_lend

-- coroutine -> carry_on, and its argument. Kept in core, so that a second
-- load of this module (a spec that reloads modules) shares them with the
-- hook the first load set.
local keepers = core.lend_keepers
local keeper_args = core.lend_keeper_args
if not keepers then
  keepers = setmetatable({}, { __mode = "k" })
  keeper_args = setmetatable({}, { __mode = "k" })
  core.lend_keepers, core.lend_keeper_args = keepers, keeper_args
  core.on_kept(function(co)
    local carry_on, arg = keepers[co], keeper_args[co]
    if carry_on == nil then return end
    keepers[co], keeper_args[co] = nil, nil
    return carry_on(co, arg)
  end)
end

--- While `co` does work it lends out, carry_on(co, arg) says what carries
-- that work on when a lent call keeps `co`; carry_on nil forgets it. A
-- kept coroutine is forgotten: it no longer does that work.
function M.keeper(co, carry_on, arg)
  keepers[co] = carry_on
  keeper_args[co] = carry_on and arg or nil
end

return M
