--- Metrics that Prometheus scrapes and InfluxDB receives: counters,
-- gauges and histograms with labels, the built-in metrics of the runtime
-- (connections, bytes, handler errors, event-loop lag, RPC calls, the
-- process), `metrics.serve(port)` for `GET /metrics` in the Prometheus
-- text format, and `metrics.push_influx{...}` for InfluxDB's line
-- protocol over HTTP or UDP.
--
--     local calls = metrics.counter("game_moves_total", "Moves made", { "zone" })
--     calls:inc(1, { zone = "north" })
--     metrics.serve(9100)
--
-- Under fork_processes (or server:start(n)) call serve in every worker:
-- they share the port (SO_REUSEPORT), and the worker a scrape reaches
-- asks its siblings for theirs, so one scrape reports every worker (label
-- `worker`). See docs/api.md (squall.metrics).
-- @module squall.metrics
--
-- The files: registry.lua (families, the snapshot), builtins.lua (the
-- runtime's own metrics), prometheus.lua (the text format), peers.lua
-- (every worker's metrics in one scrape), influx.lua (line protocol and
-- pushing); this one serves /metrics through squall.httpserver.
-- @module squall.metrics
local core = require "squall.core"
local netutil = require "squall.netutil"
local util = require "squall.util"
local B = require "squall.metrics.builtins"
local I = require "squall.metrics.influx"
local P = require "squall.metrics.prometheus"
local R = require "squall.metrics.registry"
local peers = require "squall.metrics.peers"

local type, tostring, error, select = type, tostring, error, select
local format = string.format

local M = {}

--- Prometheus clients' default histogram buckets (seconds).
M.DEFAULT_BUCKETS = R.DEFAULT_BUCKETS
M.counter, M.gauge, M.histogram = R.counter, R.gauge, R.histogram

--- A snapshot of every metric: a list of families {name, help, kind,
-- samples = {{suffix, label names, label values, value}...}}, in
-- registration order (the built-ins first). Plain data: it travels
-- between workers as MessagePack.
M.collect = R.collect

--- The Prometheus text format (0.0.4) of a snapshot from collect (or
-- several workers' merged).
M.render = P.render
M._number = P.number

--- The exposition text of this process (every worker's under
-- fork_processes once serve runs there: see serve).
function M.text()
  return M.render(M.collect())
end

-- ---- serving /metrics -----------------------------------------------------------

-- /metrics (and /) in the Prometheus text format; HEAD is HTTPServer's
-- (the head GET would get, with its length).
local MAX_HEAD = 16384

local function handle_http(req)
  local path = req.path
  if path ~= "/metrics" and path ~= "/" then
    return 404, { ["Content-Type"] = "text/plain" }, "try /metrics\n"
  end
  if req.method ~= "GET" and req.method ~= "HEAD" then
    return 405, { ["Content-Type"] = "text/plain", Allow = "GET, HEAD" }, "GET only\n"
  end
  return 200, { ["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8" },
    P.render(peers.collect_all())
end

--- Answer `GET /metrics` on `port` (and `address`, default every
-- interface) in the Prometheus text format. Under fork_processes call it
-- in each worker: they share the port, and a scrape shows every worker.
-- @treturn table `port` (the one bound, for port 0) and `stop()`
function M.serve(port, address)
  util.check_port(port, 2)
  if address ~= nil and type(address) ~= "string" then
    error("metrics.serve: address must be a string, got " .. util.describe(address), 2)
  end
  local id = core.task_id()
  if id and not peers.started() then peers.start(id, core.process_stats().ppid) end
  local socks, err = netutil.bind_sockets(port, address, { reuse_port = id ~= nil })
  if not socks then
    -- as TCPServer:listen does: a port taken is the caller's to fix
    error(format("metrics.serve: cannot listen on %s:%d: %s", address or "*", port,
      tostring(err)), 2)
  end
  local server = require("squall.httpserver").HTTPServer(handle_http,
    { max_header_size = MAX_HEAD, idle_timeout = 30 })
  server:add_sockets(socks)
  B.start_lag()
  return { port = select(2, socks[1]:getsockname()), server = server,
    stop = function() server:stop() end }
end


--- InfluxDB line protocol of a snapshot (see influx.lua).
M.line_protocol = I.line_protocol
M.push_influx = I.push_influx

return M
