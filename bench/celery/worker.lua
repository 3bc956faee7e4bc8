--- make bench's Squall Celery worker: runs bench/celery/tasks on QUEUE
-- until SIGTERM; says "ready" on stdout once it consumes.
--     squall bench/celery/worker.lua BROKER QUEUE [CONCURRENCY]
local celery = require "squall.celery"
local gen = require "squall.gen"
local ioloop = require "squall.ioloop"

local broker, queue = arg[1], arg[2]
local concurrency = tonumber(arg[3]) or 100
local loop = ioloop.current()
gen.spawn(function()
  local app = celery.new({ broker = broker, backend = broker })
  local worker = app:worker({ tasks = "bench/celery/tasks", queues = { queue },
    concurrency = concurrency, name = "bench@squall" })
  worker:start()
  io.stdout:write("ready\n")
  io.stdout:flush()
  loop:add_signal_handler("TERM", function()
    gen.spawn(function() worker:stop(5); loop:stop() end)
  end)
end)
loop:start()
