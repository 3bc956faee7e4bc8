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
local type, error, pairs, tostring = type, error, pairs, tostring

--- A pool of worker threads.
-- @type ThreadPool
local ThreadPool = util.class()

local POOL_KEYS = { size = true }

local function closed_error()
  return core.error("closed", "the thread pool was closed before the call finished")
end

--- Make a pool of `size` workers (default: one per CPU). Calls queue in
-- order while every worker is busy.
-- @tparam[opt] table opts `size`
function M.pool(opts)
  util.check_main_thread("thread.pool", 2)
  opts = opts or {}
  if type(opts) ~= "table" then error("thread.pool: opts must be a table", 2) end
  for k in pairs(opts) do
    if not POOL_KEYS[k] then error("thread.pool: unknown option " .. tostring(k), 2) end
  end
  local size = opts.size or process.cpu_count()
  if type(size) ~= "number" or size < 1 or size > 256 or size % 1 ~= 0 then
    error("thread.pool: size must be an integer from 1 to 256, got " .. util.describe(size), 2)
  end
  local loop = ioloop.current()
  -- Calls waiting for a worker, by id. The runtime calls back with an id
  -- (never holding the pool), so a pool nobody uses is collected.
  local waiting = {}
  local c = core.thread_pool(loop:core_loop(), size, package.path, package.cpath,
    function(id, ran, bytes)
      local f = waiting[id]
      if f then
        waiting[id] = nil
        f:set_result(ran, bytes)
      end
    end)
  return setmetatable({ size = size, _c = c, _waiting = waiting, _next_id = 0 }, ThreadPool)
end

--- Run require(module)[func](...) in a worker and wait for its results
-- (inside a coroutine).
-- @return its results, or nil, err: kind `thread` (with the worker's
--   error message), or `closed` when the pool was closed before the call
--   finished (or before it was made)
function ThreadPool:run(module, func, ...)
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
  util.need_coroutine("thread.run", 2)
  if self._closed then return nil, closed_error() end
  local id = self._next_id + 1
  self._next_id = id
  local done = gen.Future()
  self._waiting[id] = done
  self._c:submit(module, func, args, id)
  local ran, bytes = done:result()
  if ran == nil then return nil, bytes end -- closed
  if not ran then return nil, core.error("thread", bytes) end
  local r = decode(bytes) -- (ok, results...)
  if r[1] ~= true then
    return nil, core.error("thread", tostring(r[2]))
  end
  return msgpack.values(r, 2)
end

--- Close the pool: calls not yet started are dropped, workers end once
-- their current call is done (never waited for), and every call still
-- waiting gets `nil, err` (kind `closed`) now; later calls get it at once.
function ThreadPool:close()
  if self._closed then return end
  self._closed = true
  self._c:close()
  local waiting = self._waiting
  for id, f in pairs(waiting) do
    waiting[id] = nil
    f:set_result(nil, closed_error())
  end
end

-- The default pool, made on first use: one worker per CPU.
local default

--- Run on the default pool (one worker per CPU); see ThreadPool:run.
function M.run(module, func, ...)
  util.check_main_thread("thread.run", 2)
  util.need_coroutine("thread.run", 2)
  if not default or default._loop ~= ioloop.current() then
    default = M.pool()
    default._loop = ioloop.current()
  end
  return default:run(module, func, ...)
end

return M
