--- Echo latency at a gentle rate: one line, wait for it, 1 ms pause, over
-- one connection for SECS seconds; prints p50_us and p99_us.
--     squall bench/clients/echo_probe.lua PORT SECS
local gen = require "squall.gen"
local ioloop = require "squall.ioloop"
local iostream = require "squall.iostream"
local core = require "squall.core"

local port, secs = tonumber(arg[1]), tonumber(arg[2]) or 3

ioloop.current():run_sync(function()
  local s
  for _ = 1, 200 do
    s = iostream.connect("127.0.0.1", port)
    if s then break end
    gen.sleep(0.01)
  end
  assert(s, "no echo server on " .. port)
  s:set_nodelay(true)
  local lat = {}
  local deadline = core.time() + secs
  gen.sleep(0.5) -- as the server warms up
  while core.time() < deadline do
    local t0 = core.time()
    s:write("ping\n")
    assert(s:read_until("\n"))
    lat[#lat + 1] = (core.time() - t0) * 1e6
    gen.sleep(0.001)
  end
  table.sort(lat)
  print(("p50_us=%.0f p99_us=%.0f n=%d"):format(lat[math.ceil(#lat * 0.5)],
    lat[math.ceil(#lat * 0.99)], #lat))
end, secs + 30)
