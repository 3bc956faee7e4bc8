--- The thread benchmark's server: echo on PORT (for latency probes), and
-- CPU work (bench/work.lua, 200 rounds of a hash over 64 KiB) kept
-- queued on a pool of WORKERS threads for SECS seconds; prints
-- jobs_per_s=N and exits. WORKERS 0 runs no work (the echo baseline).
--     squall bench/servers/thread_work.lua PORT WORKERS SECS
local gen = require "squall.gen"
local ioloop = require "squall.ioloop"
local TCPServer = require "squall.tcpserver"
local thread = require "squall.thread"

local port, workers, secs = tonumber(arg[1]), tonumber(arg[2]), tonumber(arg[3])
local loop = ioloop.current()

TCPServer({ handle_stream = function(stream)
  while true do
    local line = stream:read_until("\n", 65536)
    if not line then break end
    stream:write(line)
  end
  stream:close()
end }):listen(port, "127.0.0.1")

gen.spawn(function()
  local done, stop = 0, false
  if workers > 0 then
    local pool = thread.pool({ size = workers })
    for _ = 1, workers * 2 do -- keep every worker busy, one call queued behind each
      gen.spawn(function()
        while not stop do
          assert(pool:run("bench.work", "hash", 200))
          done = done + 1
        end
      end)
    end
  end
  gen.sleep(0.5) -- warm up
  local d0, t0 = done, loop:time()
  gen.sleep(secs)
  local d1, t1 = done, loop:time()
  stop = true
  print(("jobs_per_s=%.2f"):format((d1 - d0) / (t1 - t0)))
  io.stdout:flush()
  loop:stop()
end)
loop:start()
