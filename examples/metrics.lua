--- An echo server that exports its metrics: the built-in ones (connections,
-- bytes, handler errors, event-loop lag, process CPU, memory and fds) and
-- two of its own, for Prometheus on /metrics and, when INFLUX_URL is set,
-- pushed to InfluxDB every 10 seconds.
--
--     squall examples/metrics.lua [port] [metrics_port] [processes]
--         (defaults 8888, 9100, 1; 0 processes: one per CPU)
--     nc 127.0.0.1 8888                  type lines
--     curl http://127.0.0.1:9100/metrics
--     INFLUX_URL=http://127.0.0.1:8086/write?db=squall squall examples/metrics.lua
--
-- docs/metrics.md shows how to point Prometheus, or InfluxDB and Grafana,
-- at it.
local ioloop = require "squall.ioloop"
local log = require "squall.log"
local metrics = require "squall.metrics"
local process = require "squall.process"
local TCPServer = require "squall.tcpserver"

local port = tonumber(arg and arg[1]) or 8888
local metrics_port = tonumber(arg and arg[2]) or 9100
local processes = tonumber(arg and arg[3]) or 1

local lines = metrics.counter("echo_lines_total", "Lines echoed")
local sizes = metrics.histogram("echo_line_bytes", "Sizes of the lines echoed, in bytes", nil,
  { 16, 64, 256, 1024, 4096, 16384, 65536 })

local server = TCPServer({ handle_stream = function(stream)
  while true do
    local line = stream:read_until("\n", 65536)
    if not line then break end
    lines:inc()
    sizes:observe(#line)
    stream:write(line)
  end
  stream:close()
end })
server:bind(port, "127.0.0.1")
server:start(processes) -- 1: this process; n > 1 forks, and the rest runs in each worker

-- In every worker: they share the metrics port, and one scrape shows all.
metrics.serve(metrics_port, "127.0.0.1")
local influx = os.getenv("INFLUX_URL")
if influx then metrics.push_influx({ url = influx, interval = 10 }) end
log.info("echo on 127.0.0.1:%d, metrics on http://127.0.0.1:%d/metrics%s", port, metrics_port,
  process.task_id() and (" (worker " .. process.task_id() .. ")") or "")

local loop = ioloop.current()
loop:add_signal_handler("TERM", function() loop:stop() end)
loop:add_signal_handler("INT", function() loop:stop() end)
loop:start()
