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
local core = require "squall.core"
local gen = require "squall.gen"
local ioloop = require "squall.ioloop"
local iostream = require "squall.iostream"
local log = require "squall.log"
local msgpack = require "squall.msgpack"
local netutil = require "squall.netutil"
local stats = require "squall.stats"
local util = require "squall.util"

local M = {}

local type, tostring, tonumber, error, pairs, ipairs = type, tostring, tonumber, error, pairs,
  ipairs
local select = select
local format, concat, sort, gsub = string.format, table.concat, table.sort, string.gsub
local setmetatable, huge = setmetatable, math.huge

--- Prometheus clients' default histogram buckets (seconds).
M.DEFAULT_BUCKETS = { 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10 }

local registry, order = {}, {} -- name -> family; names in registration order

-- ---- families ---------------------------------------------------------------

local Family = util.class()

local function check_name(name, what, level)
  if type(name) ~= "string" or not name:find("^[%a_:][%w_:]*$") then
    error(format("%s: the name must match [a-zA-Z_:][a-zA-Z0-9_:]*, got %s", what,
      util.describe(name)), level + 1)
  end
end

local function same_list(a, b)
  if #a ~= #b then return false end
  for i = 1, #a do if a[i] ~= b[i] then return false end end
  return true
end

-- A new family, or the one already registered under that name when it is
-- the same (a handler module that hot reload runs again gets its metric
-- back, with its counts).
local function family(kind, name, help, labels, buckets, level)
  local what = "metrics." .. kind
  check_name(name, what, level + 1)
  if type(help) ~= "string" then
    error(format("%s: help must be a string, got %s", what, util.describe(help)), level + 1)
  end
  labels = labels or {}
  if type(labels) ~= "table" then
    error(format("%s: labels must be a list of names, got %s", what, util.describe(labels)),
      level + 1)
  end
  for _, l in ipairs(labels) do
    if type(l) ~= "string" or not l:find("^[%a_][%w_]*$") or l:find("^__") or
      (kind == "histogram" and l == "le") or l == "worker" then
      error(format("%s: bad label name %s", what, util.describe(l)), level + 1)
    end
  end
  local old = registry[name]
  if old then
    if old.kind ~= kind or not same_list(old.labels, labels) or
      (buckets and not same_list(old.buckets, buckets)) then
      error(format("%s: %s is already registered as a %s with labels {%s}", what, name,
        old.kind, concat(old.labels, ", ")), level + 1)
    end
    return old
  end
  local f = setmetatable({ kind = kind, name = name, help = help, labels = labels,
    buckets = buckets, children = {}, keys = {} }, Family)
  registry[name] = f
  order[#order + 1] = name
  -- a family without labels has its one child (and shows its zero) at once
  if #labels == 0 then f:child(nil, level + 1) end
  return f
end

-- The child for a label table: one per distinct set of values, found by
-- the values joined (or the single value itself).
function Family:child(values, level)
  local labels = self.labels
  local n = #labels
  local key
  if n == 0 then
    key = ""
  else
    if type(values) ~= "table" then
      error(format("%s: pass the label values as a table {%s = ...}", self.name, labels[1]),
        level + 1)
    end
    if n == 1 then
      key = values[labels[1]]
      if key == nil then
        error(format("%s: missing the label %s", self.name, labels[1]), level + 1)
      end
      key = tostring(key)
    else
      local parts = {}
      for i = 1, n do
        local v = values[labels[i]]
        if v == nil then
          error(format("%s: missing the label %s", self.name, labels[i]), level + 1)
        end
        parts[i] = tostring(v)
      end
      key = concat(parts, "\0")
    end
  end
  local c = self.children[key]
  if c then return c end
  local vals = {}
  for i = 1, n do vals[i] = tostring(values[labels[i]]) end
  if self.kind == "histogram" then
    local counts = {}
    for i = 1, #self.buckets do counts[i] = 0 end
    c = { values = vals, counts = counts, sum = 0, count = 0 }
  else
    c = { values = vals, value = 0 }
  end
  self.children[key] = c
  self.keys[#self.keys + 1] = key
  return c
end

--- Counter: `c:inc([by [, labels]])` (by defaults to 1; never negative).
local Counter = Family:extend()

function Counter:inc(by, labels)
  by = by or 1
  if type(by) ~= "number" or by < 0 then
    error(format("%s: a counter only goes up, got %s", self.name, util.describe(by)), 2)
  end
  local c = self:child(labels, 2)
  c.value = c.value + by
end

--- The current value for `labels`.
function Family:get(labels)
  local c = self:child(labels, 2)
  if self.kind == "histogram" then return c.count, c.sum end
  return c.value
end

--- Gauge: `g:set(v [, labels])`, `g:inc([by, labels])`, `g:dec([by, labels])`.
local Gauge = Family:extend()

function Gauge:set(v, labels)
  if type(v) ~= "number" then
    error(format("%s: the value must be a number, got %s", self.name, util.describe(v)), 2)
  end
  self:child(labels, 2).value = v
end

function Gauge:inc(by, labels)
  local c = self:child(labels, 2)
  c.value = c.value + (by or 1)
end

function Gauge:dec(by, labels)
  local c = self:child(labels, 2)
  c.value = c.value - (by or 1)
end

--- Histogram: `h:observe(v [, labels])` (seconds, bytes...).
local Histogram = Family:extend()

-- Count v in a histogram child with upper bounds `buckets`.
local function bump(c, buckets, v)
  local counts = c.counts
  for i = 1, #buckets do
    if v <= buckets[i] then
      counts[i] = counts[i] + 1
      break
    end
  end
  c.sum = c.sum + v
  c.count = c.count + 1
end

function Histogram:observe(v, labels)
  if type(v) ~= "number" then
    error(format("%s: the value must be a number, got %s", self.name, util.describe(v)), 2)
  end
  bump(self:child(labels, 2), self.buckets, v)
end

--- A counter (a name ending in `_total`, by Prometheus' convention).
-- @tparam string name
-- @tparam string help
-- @tparam[opt] table labels label names
function M.counter(name, help, labels)
  return setmetatable(family("counter", name, help, labels, nil, 2), Counter)
end

--- A gauge: a value that goes up and down.
function M.gauge(name, help, labels)
  return setmetatable(family("gauge", name, help, labels, nil, 2), Gauge)
end

--- A histogram with upper bounds `buckets` (sorted; default
-- metrics.DEFAULT_BUCKETS).
function M.histogram(name, help, labels, buckets)
  buckets = buckets or M.DEFAULT_BUCKETS
  if type(buckets) ~= "table" or #buckets == 0 then
    error("metrics.histogram: buckets must be a non-empty list of numbers", 2)
  end
  for i, b in ipairs(buckets) do
    if type(b) ~= "number" or (i > 1 and b <= buckets[i - 1]) then
      error("metrics.histogram: buckets must be increasing numbers", 2)
    end
  end
  return setmetatable(family("histogram", name, help, labels, buckets, 2), Histogram)
end

-- ---- built-in metrics ---------------------------------------------------------

-- Updated at collection from squall.stats, core.io_bytes and the process.
local b_open = M.gauge("squall_connections_open", "TCPServer connections being served")
local b_accepted = M.counter("squall_connections_accepted_total",
  "TCPServer connections accepted")
local b_read = M.counter("squall_bytes_read_total", "Bytes read from sockets (TLS included)")
local b_written = M.counter("squall_bytes_written_total",
  "Bytes written to sockets (TLS included)")
local b_errors = M.counter("squall_handler_errors_total",
  "Connection and RPC handlers that raised an error")
local b_lag = M.histogram("squall_loop_lag_seconds",
  "How late the event loop ran a timer (sampled every 0.5 s)", nil,
  { 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5 })
local b_rpc = M.counter("squall_rpc_calls_total", "RPC requests and notifications served",
  { "method", "result" })
local b_rpc_time = M.histogram("squall_rpc_call_duration_seconds",
  "Time to serve an RPC request", { "method" },
  { 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1 })
local p_cpu = M.counter("process_cpu_seconds_total",
  "Total user and system CPU time spent in seconds.")
local p_rss = M.gauge("process_resident_memory_bytes", "Resident memory size in bytes.")
local p_vsize = M.gauge("process_virtual_memory_bytes", "Virtual memory size in bytes.")
local p_fds = M.gauge("process_open_fds", "Number of open file descriptors.")
local p_max_fds = M.gauge("process_max_fds", "Maximum number of open file descriptors.")
local p_start = M.gauge("process_start_time_seconds",
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

local b_http = M.counter("squall_http_requests_total", "HTTPServer requests answered",
  { "status" })
local b_http_time = M.histogram("squall_http_request_duration_seconds",
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

-- ---- collecting and rendering -------------------------------------------------

--- A snapshot of every metric: a list of families {name, help, kind,
-- samples = {{suffix, label names, label values, value}...}}, in
-- registration order (the built-ins first). Plain data: it travels
-- between workers as MessagePack.
function M.collect()
  update_builtins()
  local out = {}
  for _, name in ipairs(order) do
    local f = registry[name]
    local samples = {}
    for _, key in ipairs(f.keys) do
      local c = f.children[key]
      if f.kind == "histogram" then
        local cum = 0
        for i, bound in ipairs(f.buckets) do
          cum = cum + c.counts[i]
          samples[#samples + 1] = { "_bucket", f.labels, c.values, cum, le = bound }
        end
        samples[#samples + 1] = { "_bucket", f.labels, c.values, c.count, le = huge }
        samples[#samples + 1] = { "_sum", f.labels, c.values, c.sum }
        samples[#samples + 1] = { "_count", f.labels, c.values, c.count }
      else
        samples[#samples + 1] = { "", f.labels, c.values, c.value }
      end
    end
    out[#out + 1] = { name = name, help = f.help, kind = f.kind, samples = samples }
  end
  return out
end

local function number(v)
  if v ~= v then return "NaN" end
  if v == huge then return "+Inf" end
  if v == -huge then return "-Inf" end
  if v % 1 == 0 and v > -1e15 and v < 1e15 then return format("%d", v) end
  -- the shortest text that reads back as the same double (0.005, not
  -- 0.0050000000000000001)
  for digits = 15, 16 do
    local t = format("%." .. digits .. "g", v)
    if tonumber(t) == v then return t end
  end
  return format("%.17g", v)
end
M._number = number

local function escape_label(v)
  return (gsub(gsub(gsub(v, "\\", "\\\\"), "\n", "\\n"), '"', '\\"'))
end

local function escape_help(v)
  return (gsub(gsub(v, "\\", "\\\\"), "\n", "\\n"))
end

--- The Prometheus text format (0.0.4) of a snapshot from collect (or
-- several workers' merged).
function M.render(families)
  local out = {}
  for _, f in ipairs(families) do
    out[#out + 1] = format("# HELP %s %s\n# TYPE %s %s\n", f.name, escape_help(f.help), f.name,
      f.kind)
    for _, s in ipairs(f.samples) do
      local names, values = s[2], s[3]
      local pairs_ = {}
      if s.worker then pairs_[1] = format('worker="%s"', s.worker) end
      for i = 1, #names do
        pairs_[#pairs_ + 1] = format('%s="%s"', names[i], escape_label(values[i]))
      end
      if s.le then pairs_[#pairs_ + 1] = format('le="%s"', number(s.le)) end
      local lbl = #pairs_ > 0 and "{" .. concat(pairs_, ",") .. "}" or ""
      out[#out + 1] = format("%s%s%s %s\n", f.name, s[1], lbl, number(s[4]))
    end
  end
  return concat(out)
end

--- The exposition text of this process (every worker's under
-- fork_processes once serve runs there: see serve).
function M.text()
  return M.render(M.collect())
end

-- ---- several workers ----------------------------------------------------------

-- Workers of one fork_processes find each other through a folder named
-- by their supervisor's pid: each writes there the port of a listener
-- on 127.0.0.1 that answers with its snapshot (MessagePack) and closes.
local peers_dir, my_id

local function worker_dir(ppid)
  return (os.getenv("TMPDIR") or "/tmp") .. "/squall-metrics-" .. ppid
end

local function start_peer_listener(id, ppid)
  local dir = worker_dir(ppid)
  os.execute(format("mkdir -p '%s'", dir)) -- once per worker, at serve
  local socks = assert(netutil.bind_sockets(0, "127.0.0.1"))
  local _, port = socks[1]:getsockname()
  -- (plain accept handlers, not a TCPServer: scrapes are not the
  -- application's connections)
  netutil.add_accept_handler(socks[1], function(stream)
    stream:write(msgpack.encode(M.collect()))
    stream:close()
  end)
  local tmp = format("%s/%d.port.tmp", dir, id)
  local f = assert(io.open(tmp, "w"))
  f:write(port)
  f:close()
  assert(os.rename(tmp, format("%s/%d.port", dir, id)))
  peers_dir, my_id = dir, id
end

-- Every worker's snapshot merged: samples get the label worker.
local function collect_all()
  local mine = M.collect()
  if not peers_dir then return mine end
  local merged, by_name = {}, {}
  local function add(families, worker)
    for _, f in ipairs(families) do
      local m = by_name[f.name]
      if not m then
        m = { name = f.name, help = f.help, kind = f.kind, samples = {} }
        by_name[f.name] = m
        merged[#merged + 1] = m
      end
      for _, s in ipairs(f.samples) do
        s.worker = worker
        m.samples[#m.samples + 1] = s
      end
    end
  end
  local names = core.listdir(peers_dir) or {}
  local ids = {}
  for _, name in ipairs(names) do
    local id = tonumber(name:match("^(%d+)%.port$"))
    if id then ids[#ids + 1] = id end
  end
  sort(ids)
  for _, id in ipairs(ids) do
    if id == my_id then
      add(mine, id)
    else
      local f = io.open(format("%s/%d.port", peers_dir, id))
      local port = f and tonumber(f:read("*a"))
      if f then f:close() end
      local stream = port and iostream.connect("127.0.0.1", port, { timeout = 1 })
      if stream then
        stream:set_timeout(1)
        local data = stream:read_until_close()
        stream:close()
        local ok, families = pcall(msgpack.decode, data or "")
        if ok and type(families) == "table" then add(families, id) end
      end
    end
  end
  return merged
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
    M.render(collect_all())
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
  if id and not peers_dir then start_peer_listener(id, core.process_stats().ppid) end
  local socks, err = netutil.bind_sockets(port, address, { reuse_port = id ~= nil })
  if not socks then
    -- as TCPServer:listen does: a port taken is the caller's to fix
    error(format("metrics.serve: cannot listen on %s:%d: %s", address or "*", port,
      tostring(err)), 2)
  end
  local server = require("squall.httpserver").HTTPServer(handle_http,
    { max_header_size = MAX_HEAD, idle_timeout = 30 })
  server:add_sockets(socks)
  start_lag()
  return { port = select(2, socks[1]:getsockname()), server = server,
    stop = function() server:stop() end }
end

-- ---- InfluxDB -----------------------------------------------------------------

local function escape_key(s) -- measurement names: commas and spaces
  return (gsub(s, "([, ])", "\\%1"))
end

local function escape_tag(s) -- tag keys and values: commas, equals, spaces
  -- InfluxDB 1.x reads a backslash before the separator as an escape and
  -- cannot take a newline at all: those become / and a space.
  return (gsub(gsub(s, "[\\\n]", { ["\\"] = "/", ["\n"] = " " }), "([,= ])", "\\%1"))
end

--- InfluxDB line protocol of a snapshot: one measurement per metric,
-- labels as tags, the value in the field `value` (histograms: `count`,
-- `sum` and one field per bucket, `le_<bound>`). `tags` are added to
-- every point (the worker id); `ts` is the timestamp in nanoseconds.
function M.line_protocol(families, tags, ts)
  local out = {}
  local extra = ""
  for k, v in pairs(tags or {}) do extra = extra .. "," .. escape_tag(k) .. "=" .. escape_tag(v) end
  local stamp = ts and (" " .. format("%.0f", ts)) or ""
  for _, f in ipairs(families) do
    local meas = escape_key(f.name)
    local points, point_order = {}, {}
    for _, s in ipairs(f.samples) do
      local names, values = s[2], s[3]
      local t = {}
      for i = 1, #names do
        if values[i] ~= "" then t[#t + 1] = escape_tag(names[i]) .. "=" .. escape_tag(values[i]) end
      end
      local series = concat(t, ",")
      local p = points[series]
      if not p then
        p = {}
        points[series] = p
        point_order[#point_order + 1] = series
      end
      local field
      if s[1] == "" then field = "value"
      elseif s[1] == "_sum" then field = "sum"
      elseif s[1] == "_count" then field = "count"
      else field = "le_" .. (s.le == huge and "inf" or number(s.le)) end
      local v = s[4]
      if v == v and v ~= huge and v ~= -huge then -- InfluxDB takes finite floats only
        p[#p + 1] = escape_tag(field) .. "=" .. number(v)
      end
    end
    for _, series in ipairs(point_order) do
      local p = points[series]
      if #p > 0 then
        out[#out + 1] = meas .. (series ~= "" and "," .. series or "") .. extra .. " " ..
          concat(p, ",") .. stamp .. "\n"
      end
    end
  end
  return concat(out)
end

local function post(host, port, path, body, timeout)
  local res, err = require("squall.httpclient").fetch(
    format("http://%s:%d%s", host, port, path), { method = "POST", body = body,
      headers = { ["Content-Type"] = "text/plain" }, timeout = timeout })
  if not res then return nil, err end
  if res.code ~= 204 and res.code ~= 200 then
    return nil, core.error("http", ("InfluxDB answered %d %s: %s"):format(
      res.code, res.reason, res.body:sub(1, 300)))
  end
  return true
end

--- Push every metric to InfluxDB every `interval` seconds (default 10),
-- from a coroutine of its own; a push that fails is logged and the next
-- one tries again.
-- @tparam table opts `url`: `http://host:port/write?db=NAME` or
--   `udp://host:port` (an IP address); `interval`; `timeout` (5 s, HTTP)
-- @treturn table a handle: `handle:stop()`, `handle:push()` (now, inside
--   a coroutine: true or nil, err)
function M.push_influx(opts)
  if type(opts) ~= "table" or type(opts.url) ~= "string" then
    error("metrics.push_influx: opts.url must be a string (http://host:port/write?db=NAME " ..
      "or udp://host:port)", 2)
  end
  local interval, timeout = opts.interval or 10, opts.timeout or 5
  if type(interval) ~= "number" or interval <= 0 then
    error("metrics.push_influx: interval must be a positive number, got " ..
      util.describe(interval), 2)
  end
  local scheme, host, port, path = opts.url:match("^(%a+)://([^:/]+):(%d+)(.*)$")
  port = tonumber(port)
  if not scheme or (scheme ~= "http" and scheme ~= "udp") or not port then
    error("metrics.push_influx: url must be http://host:port/write?db=NAME or udp://host:port, " ..
      "got " .. util.describe(opts.url), 2)
  end
  if scheme == "http" and path == "" then path = "/write?db=squall" end
  local id = core.task_id()
  local tags = id and { worker = tostring(id) } or nil
  local handle = { stopped = false }
  function handle.push()
    local body = M.line_protocol(M.collect(), tags, core.wall_time() * 1e9)
    if scheme == "udp" then
      -- whole lines, at most 8 KiB a datagram (InfluxDB's UDP reader)
      local ip = host == "localhost" and "127.0.0.1" or host
      local start = 1
      while start <= #body do
        local stop = start + 8191
        if stop < #body then
          stop = body:sub(1, stop):match(".*()\n") or stop
        else
          stop = #body
        end
        local ok, err = core.udp_send(ip, port, body:sub(start, stop))
        if not ok then return nil, err end
        start = stop + 1
      end
      return true
    end
    return post(host, port, path, body, timeout)
  end
  function handle.stop() handle.stopped = true end
  start_lag()
  gen.spawn(function()
    while not handle.stopped do
      gen.sleep(interval)
      if handle.stopped then break end
      local ok, err = handle.push()
      if not ok then log.warn("metrics: push to %s failed: %s", opts.url, tostring(err)) end
    end
  end)
  return handle
end

return M
