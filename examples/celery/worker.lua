--- The Squall Celery worker of the example: runs the Lua tasks in tasks/
-- for anyone, Python or Lua, who sends them to the queue "lua"; drains on
-- SIGTERM or Ctrl-C.
--
--     BROKER=redis://127.0.0.1:6379/0 ../../build/squall worker.lua
--     (with --reload, an edited task file answers the next task)
local celery = require "squall.celery"
local gen = require "squall.gen"
local ioloop = require "squall.ioloop"
local log = require "squall.log"

local broker = os.getenv("BROKER") or "redis://127.0.0.1:6379/0"
local loop = ioloop.current()

gen.spawn(function()
  local app = celery.new({ broker = broker, backend = broker })
  local worker = app:worker({ tasks = "tasks", queues = { "lua" }, concurrency = 50 })
  worker:start()
  log.info("worker %s on %s runs: %s", worker.name, broker, table.concat(worker:tasks(), ", "))
  local function stop()
    gen.spawn(function()
      local drained, cut = worker:stop(10)
      log.info("worker stopped%s", drained and "" or (" (" .. cut .. " task(s) cut short)"))
      loop:stop()
    end)
  end
  loop:add_signal_handler("TERM", stop)
  loop:add_signal_handler("INT", stop)
end)
loop:start()
