--- make bench's Squall Celery client.
--     squall bench/celery/load.lua BROKER send QUEUE N      send_task N times in a row:
--                                                         prints sends_per_s
--     squall bench/celery/load.lua BROKER latency QUEUE N   N sends each waiting for
--                                                         its result: p50_us, p99_us
--     squall bench/celery/load.lua BROKER fill QUEUE N      N task messages LPUSHed in
--                                                         pipelines of 500 (a backlog)
local celery = require "squall.celery"
local core = require "squall.core"
local ioloop = require "squall.ioloop"

local broker, mode, queue, n = arg[1], arg[2], arg[3], tonumber(arg[4])
ioloop.current():run_sync(function()
  local app = celery.new({ broker = broker, backend = broker })
  assert(app:send_task("bench.noop", {}, nil, { queue = queue .. ".warm" })) -- connect first
  if mode == "fill" then
    local message = require "squall.celery.message"
    local left = n
    while left > 0 do
      local batch = math.min(500, left)
      assert(app.transport.pool:with(function(r)
        return r:pipeline(function(p)
          for _ = 1, batch do
            p:lpush(queue, message.task({ id = message.uuid(), name = "bench.noop", args = {},
              queue = queue, serializer = "json", origin = app.origin, sent = core.wall_time() }))
          end
        end)
      end))
      left = left - batch
    end
    print("filled=" .. n)
  elseif mode == "send" then
    local t0 = core.time()
    for _ = 1, n do assert(app:send_task("bench.noop", {}, nil, { queue = queue })) end
    print(("sends_per_s=%.0f"):format(n / (core.time() - t0)))
  else
    local times = {}
    for i = 1, n do
      local t0 = core.time()
      local res = assert(app:send_task("bench.noop", {}, nil, { queue = queue }))
      assert(res.id and select(2, res:get(30)) == nil)
      times[i] = core.time() - t0
    end
    table.sort(times)
    print(("p50_us=%.0f p99_us=%.0f"):format(times[math.ceil(n * 0.5)] * 1e6,
      times[math.ceil(n * 0.99)] * 1e6))
  end
  app:close()
end, 600)
