--- Worker threads for blocking or CPU-heavy work, so the loop goes on
-- serving while it runs.
--
--     local digest = thread.run("myapp.hashing", "sha_many", data, 200)
--
-- `thread.run(module, func, ...)` calls require(module)[func](...) in a
-- worker thread's own Lua state and waits (inside a coroutine) for its
-- results. Arguments and results are copied between the states: nil,
-- booleans, numbers, strings, and tables of those; a function, userdata or
-- a cycle raises at once. Workers find modules on the paths the program
-- had when the pool was made. An error in the worker comes back as
-- `nil, err` (kind `thread`) and takes nothing down. See docs/api.md
-- (squall.thread).
-- @module squall.thread
local core = require "squall.core"
local gen = require "squall.gen"
local ioloop = require "squall.ioloop"
local msgpack = require "squall.msgpack"
local process = require "squall.process"
local util = require "squall.util"

local M = {}

local encode_array, decode = msgpack.encode_array, msgpack.decode
local type, error = type, error

--- A pool of worker threads.
-- @type Pool
local Pool = util.class()

--- Make a pool of `size` workers (default: one per CPU). Calls queue in
-- order while every worker is busy.
-- @tparam[opt] table opts `size`
function M.pool(opts)
  opts = opts or {}
  if type(opts) ~= "table" then error("thread.pool: opts must be a table", 2) end
  local size = opts.size or process.cpu_count()
  if type(size) ~= "number" or size < 1 or size > 256 or size % 1 ~= 0 then
    error("thread.pool: size must be an integer from 1 to 256, got " .. util.describe(size), 2)
  end
  local loop = ioloop.current()
  return setmetatable({ size = size,
    _c = core.thread_pool(loop:core_loop(), size, package.path, package.cpath) }, Pool)
end

--- Run require(module)[func](...) in a worker and wait for its results
-- (inside a coroutine).
-- @return its results, or nil, err (kind `thread`, with the worker's
--   error message)
function Pool:run(module, func, ...)
  if type(module) ~= "string" then
    error("run: module must be a string, got " .. util.describe(module), 2)
  end
  if type(func) ~= "string" then
    error("run: func must be a string, got " .. util.describe(func), 2)
  end
  -- copied now: what cannot cross to another state raises here
  local ok, args = pcall(encode_array, ...)
  if not ok then
    error("run: the arguments cannot be copied to a worker (nil, booleans, numbers, " ..
      "strings and tables of those only): " .. tostring(args), 2)
  end
  local done = gen.Future()
  self._c:submit(module, func, args, function(ran, bytes)
    done:set_result(ran, bytes)
  end)
  local ran, bytes = done:result()
  if not ran then return nil, core.error("thread", bytes) end
  local r = decode(bytes) -- (ok, results...)
  if r[1] ~= true then
    return nil, core.error("thread", tostring(r[2]))
  end
  return msgpack.values(r, 2)
end

--- Stop the workers once their current calls are done.
function Pool:close()
  self._c:close()
end

-- The default pool, made on first use: one worker per CPU.
local default

--- Run on the default pool (one worker per CPU); see Pool:run.
function M.run(module, func, ...)
  if not default or default._loop ~= ioloop.current() then
    default = M.pool()
    default._loop = ioloop.current()
  end
  return default:run(module, func, ...)
end

return M
