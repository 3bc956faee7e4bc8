--- Multi-process servers: fork_processes, task_id, cpu_count.
--
--     local socks = netutil.bind_sockets(8888)
--     process.fork_processes(0)          -- one child per core
--     server:add_sockets(socks)          -- every child accepts
--     ioloop.current():start()
--
-- @module squall.process
local core = require "squall.core"
local ioloop = require "squall.ioloop"

local M = {}

--- The number of CPUs online.
function M.cpu_count()
  return core.cpu_count()
end

--- This process's task id (0..n-1) under fork_processes, or nil.
function M.task_id()
  return core.task_id()
end

--- Fork `n` children (0 or nil: one per CPU) and return the task id in
-- each. The parent does not return: it restarts a child that dies by a
-- signal or a non-zero exit (same task id, at most `max_restarts` times in
-- all, default 100, then it raises), forwards SIGTERM, SIGINT and SIGHUP
-- to the children, and exits 0 once they have all exited.
-- Must be called before any IOLoop exists: the children would share its
-- epoll and timers.
-- @tparam[opt] number n
-- @tparam[opt] number max_restarts
-- @treturn number the task id
function M.fork_processes(n, max_restarts)
  if n == nil or n == 0 then n = M.cpu_count() end
  if type(n) ~= "number" or n < 1 or n % 1 ~= 0 then
    error("fork_processes: n must be a positive integer, got " .. tostring(n), 2)
  end
  if ioloop.loops_created() > 0 then
    error("fork_processes must be called before any IOLoop is created " ..
      "(the children would share its event loop)", 2)
  end
  local id = core.fork_processes(n, max_restarts or 100)
  if id == nil then
    io.stdout:flush()
    os.exit(0, true)
  end
  math.randomseed(os.time() + id * 7919)
  return id
end

return M
