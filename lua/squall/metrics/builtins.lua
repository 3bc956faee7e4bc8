--- The runtime's built-in metrics, squall.metrics' own (not a public
-- module): connections, bytes, handler errors, RPC calls and HTTP requests
-- (through squall.stats' hooks), the process (process_*) and event-loop
-- lag. They are brought up to date before each snapshot.
local core = require "squall.core"
local ioloop = require "squall.ioloop"
local stats = require "squall.stats"
local R = require "squall.metrics.registry"

local tonumber = tonumber
local bump = R.bump

local B = {}

-- Updated at collection from squall.stats, core.io_bytes and the process.
local b_open = R.gauge("squall_connections_open", "TCPServer connections being served")
local b_accepted = R.counter("squall_connections_accepted_total",
  "TCPServer connections accepted")
local b_read = R.counter("squall_bytes_read_total", "Bytes read from sockets (TLS included)")
local b_written = R.counter("squall_bytes_written_total",
  "Bytes written to sockets (TLS included)")
local b_errors = R.counter("squall_handler_errors_total",
  "Connection and RPC handlers that raised an error")
local b_lag = R.histogram("squall_loop_lag_seconds",
  "How late the event loop ran a timer (sampled every 0.5 s)", nil,
  { 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5 })
local b_rpc = R.counter("squall_rpc_calls_total", "RPC requests and notifications served",
  { "method", "result" })
local b_rpc_time = R.histogram("squall_rpc_call_duration_seconds",
  "Time to serve an RPC request", { "method" },
  { 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1 })
local p_cpu = R.counter("process_cpu_seconds_total",
  "Total user and system CPU time spent in seconds.")
local p_rss = R.gauge("process_resident_memory_bytes", "Resident memory size in bytes.")
local p_vsize = R.gauge("process_virtual_memory_bytes", "Virtual memory size in bytes.")
local p_fds = R.gauge("process_open_fds", "Number of open file descriptors.")
local p_max_fds = R.gauge("process_max_fds", "Maximum number of open file descriptors.")
local p_start = R.gauge("process_start_time_seconds",
  "Start time of the process since unix epoch in seconds.")

-- The process' start: /proc/self/stat's starttime (clock ticks after
-- boot) plus the boot time.
local function start_time()
  local f = io.open("/proc/self/stat")
  local stat = f and f:read("*a")
  if f then f:close() end
  local g = io.open("/proc/stat")
  local all = g and g:read("*a")
  if g then g:close() end
  local ticks = stat and tonumber((stat:match("%) (.*)$") or ""):match(
    "^%S+" .. ("%s+%S+"):rep(18) .. "%s+(%d+)"))
  local btime = all and tonumber(all:match("\nbtime (%d+)"))
  if ticks and btime then return btime + ticks / 100 end -- USER_HZ is 100 on Linux
  return core.wall_time()
end
local started = start_time()

local rpc_children = {} -- method -> {calls ok, calls failed, duration}: no lookup per call
stats.rpc_observe = function(method, seconds, failed)
  local c = rpc_children[method]
  if not c then
    if #b_rpc_time.keys >= 1000 then method = "(other)" end -- bound a scanner's garbage
    c = { b_rpc:child({ method = method, result = "ok" }, 1),
      b_rpc:child({ method = method, result = "error" }, 1),
      b_rpc_time:child({ method = method }, 1) }
    rpc_children[method] = c
  end
  local calls = failed and c[2] or c[1]
  calls.value = calls.value + 1
  bump(c[3], b_rpc_time.buckets, seconds)
end

local b_http = R.counter("squall_http_requests_total", "HTTPServer requests answered",
  { "status" })
local b_http_time = R.histogram("squall_http_request_duration_seconds",
  "Time from a request's head to the end of its handler", nil,
  { 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 2.5 })
local http_children = {} -- status -> its counter child: no lookup per request
local http_time = b_http_time:child(nil, 1)
stats.http_observe = function(status, seconds)
  local c = http_children[status]
  if not c then
    c = b_http:child({ status = status }, 1)
    http_children[status] = c
  end
  c.value = c.value + 1
  bump(http_time, b_http_time.buckets, seconds)
end

local function update_builtins()
  b_open:set(stats.connections_open)
  b_accepted:child(nil, 1).value = stats.connections_accepted
  local r, w = core.io_bytes()
  b_read:child(nil, 1).value = r
  b_written:child(nil, 1).value = w
  b_errors:child(nil, 1).value = stats.handler_errors
  local p = core.process_stats()
  if p.cpu then p_cpu:child(nil, 1).value = p.cpu end
  if p.rss then p_rss:set(p.rss) end
  if p.vsize then p_vsize:set(p.vsize) end
  if p.open_fds then p_fds:set(p.open_fds) end
  if p.max_fds then p_max_fds:set(p.max_fds) end
  p_start:set(started)
end

-- Event-loop lag: a timer every 0.5 s notes how late it ran. Started by
-- serve or push_influx (someone will read it), once per loop: a program has
-- one; specs make one per test.
local lag_loop -- the loop the sampling timer runs on
local LAG_INTERVAL = 0.5
local function start_lag()
  local loop = ioloop.current()
  if lag_loop == loop then return end
  lag_loop = loop
  local function tick(due)
    local late = core.time() - due
    b_lag:observe(late > 0 and late or 0)
    local nxt = core.time() + LAG_INTERVAL
    loop:call_later(LAG_INTERVAL, function() tick(nxt) end)
  end
  local first = core.time() + LAG_INTERVAL
  loop:call_later(LAG_INTERVAL, function() tick(first) end)
end

R.before_collect(update_builtins)
B.start_lag = start_lag

return B
