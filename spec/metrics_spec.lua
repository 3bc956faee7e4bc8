-- squall.metrics: the Prometheus text format checked by Debian's promtool,
-- built-in metrics moved by real traffic, one scrape across workers, and
-- pushes read back from a real InfluxDB (Debian's influxd, started on
-- free ports by scripts/influxdb-scratch).
local core = require "squall.core"
local iostream = require "squall.iostream"
local metrics = require "squall.metrics"
local rpc = require "squall.rpc"
local testing = require "squall.testing"
local TCPServer = require "squall.tcpserver"
local helpers = require "helpers"

local async, eventually, q, raised = testing.async, helpers.eventually, helpers.q, helpers.raised
local http_get = helpers.http_get

-- The value of one sample line (`name{labels} value`) in exposition text.
local function sample(text, line_start)
  for line in text:gmatch("[^\n]+") do
    if line:sub(1, #line_start + 1) == line_start .. " " then
      return tonumber(line:sub(#line_start + 2))
    end
  end
end

local function promtool(text)
  local path = os.tmpname()
  helpers.spit(path, text)
  local status, out, err = helpers.run("promtool check metrics < " .. q(path))
  os.remove(path)
  return status, out .. err
end

describe("squall.metrics", function()
  local server
  before_each(function() server = nil end)
  after_each(function() if server then server.stop() end end)
  -- each spec runs on a loop of its own: serve on it
  local function serve() server = metrics.serve(0, "127.0.0.1") end

  it("exports counters, gauges and histograms with labels in the text format",
    async(function()
    serve()
    local c = metrics.counter("spec_moves_total", "Moves made", { "zone" })
    c:inc(1, { zone = "north" })
    c:inc(2.5, { zone = 'a "quoted"\nzone\\' })
    c:inc(nil, { zone = "north" })
    local g = metrics.gauge("spec_players", "Players online")
    g:set(10); g:dec(3); g:inc()
    local h = metrics.histogram("spec_move_seconds", "Time per move", { "zone" }, { 0.1, 1 })
    h:observe(0.05, { zone = "north" }); h:observe(0.5, { zone = "north" })
    h:observe(7, { zone = "north" })
    local status, text, head = http_get(server.port, "/metrics")
    assert.equal(200, status)
    assert.matches("Content%-Type: text/plain; version=0.0.4", head)
    assert.matches("# HELP spec_moves_total Moves made\n# TYPE spec_moves_total counter\n" ..
      'spec_moves_total{zone="north"} 2\n' ..
      'spec_moves_total{zone="a \\"quoted\\"\\nzone\\\\"} 2.5\n', text, 1, true)
    assert.matches("# TYPE spec_players gauge\nspec_players 8\n", text, 1, true)
    assert.matches('spec_move_seconds_bucket{zone="north",le="0.1"} 1\n' ..
      'spec_move_seconds_bucket{zone="north",le="1"} 2\n' ..
      'spec_move_seconds_bucket{zone="north",le="+Inf"} 3\n' ..
      'spec_move_seconds_sum{zone="north"} 7.55\n' ..
      'spec_move_seconds_count{zone="north"} 3\n', text, 1, true)
    local rc, out = promtool(text)
    assert.equal(0, rc, out)
    -- registering the same metric again (a reloaded module) gives it back
    assert.equal(c, metrics.counter("spec_moves_total", "Moves made", { "zone" }))
    assert.equal(2, c:get({ zone = "north" }))
  end))

  it("answers HEAD with GET's length and no body, and a huge head with 431", async(function()
    serve()
    local _, body = http_get(server.port, "/metrics")
    local s = assert(iostream.connect("127.0.0.1", server.port))
    s:write("HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\nGET /metrics HTTP/1.1\r\n" ..
      "Host: x\r\nConnection: close\r\n\r\n")
    local all = assert(s:read_until_close())
    local head_len = tonumber(all:match("^HTTP/1%.1 200 OK\r\n.-Content%-Length: (%d+)"))
    -- (the text may grow between the scrapes: a counter of bytes read...)
    assert.is_true(head_len > 0 and math.abs(head_len - #body) < 200, all:sub(1, 200))
    local second = all:find("HTTP/1.1 200 OK", 2, true) -- right after the HEAD's head
    assert.equal(all:find("\r\n\r\n", 1, true) + 4, second)
    s = assert(iostream.connect("127.0.0.1", server.port))
    s:write("GET /metrics HTTP/1.1\r\nX-Big: " .. ("x"):rep(20000) .. "\r\n\r\n")
    assert.matches("^HTTP/1%.1 431 ", assert(s:read_until_close()))
  end))

  it("raises at the caller's line for misuse", function()
    assert.matches("the name must match", raised(function() metrics.counter("1bad", "x") end))
    assert.matches("bad label name string \"le\"",
      raised(function() metrics.histogram("spec_h2", "x", { "le" }) end))
    assert.matches("already registered as a counter",
      raised(function() metrics.gauge("spec_moves_total", "x") end))
    local c = metrics.counter("spec_up_total", "x")
    assert.matches("a counter only goes up", raised(function() c:inc(-1) end))
    local l = metrics.counter("spec_labelled_total", "x", { "a" })
    assert.matches("missing the label a", raised(function() l:inc(1, {}) end))
    assert.matches("buckets must be increasing",
      raised(function() metrics.histogram("spec_h3", "x", nil, { 1, 0.5 }) end))
    -- a port already taken (it used to fail inside add_sockets, naming nothing)
    local taken = assert(require("squall.netutil").bind_sockets(0, "127.0.0.1"))
    local port = select(2, taken[1]:getsockname())
    assert.matches("metrics.serve: cannot listen on 127.0.0.1:" .. port .. ": address_in_use",
      raised(function() metrics.serve(port, "127.0.0.1") end))
    taken[1]:close()
  end)

  it("counts connections, bytes, handler errors and RPC calls with no code", async(function()
    serve()
    local scrapes = 0
    local function scrape()
      scrapes = scrapes + 1
      local _, text = http_get(server.port, "/metrics")
      return text
    end
    local before = scrape()
    scrapes = 0
    local echo = TCPServer({ handle_stream = function(stream)
      while true do
        local line = stream:read_until("\n")
        if not line then return end
        if line == "raise\n" then error("asked to") end
        stream:write(line)
      end
    end })
    local sock, port = testing.bind_unused_port()
    echo:add_sockets({ sock })
    local c = assert(iostream.connect("127.0.0.1", port))
    c:write(("x"):rep(999) .. "\n")
    assert.equal(1000, #c:read_until("\n"))
    local bad = assert(iostream.connect("127.0.0.1", port))
    bad:write("raise\n")
    assert.equal("", bad:read_until_close())
    local rs = rpc.Server()
    rs:route("sum", function(_, a, b) return a + b end)
    rs:route("fail", function() return nil, "no" end)
    local rsock, rport = testing.bind_unused_port()
    rs:add_sockets({ rsock })
    local conn = assert(rpc.connect("127.0.0.1", rport))
    for _ = 1, 3 do assert.equal(3, conn:call("sum", 1, 2)) end
    assert.is_nil(conn:call("fail"))
    local after = eventually(function()
      local t = scrape()
      return sample(t, "squall_connections_open") ==
        sample(before, "squall_connections_open") + 2 and t -- c and conn
    end, "the raised handler's connection to close")
    local function delta(name) return sample(after, name) - (sample(before, name) or 0) end
    -- accepted: c and bad by echo, conn by the RPC server (not client
    -- sides), and each scrape since by the metrics HTTPServer
    assert.equal(3 + scrapes, delta("squall_connections_accepted_total"))
    assert.is_true(delta("squall_bytes_read_total") >= 2000) -- the line, both ways
    assert.is_true(delta("squall_bytes_written_total") >= 2000)
    assert.equal(1, delta("squall_handler_errors_total"))
    assert.equal(3, sample(after, 'squall_rpc_calls_total{method="sum",result="ok"}'))
    assert.equal(1, sample(after, 'squall_rpc_calls_total{method="fail",result="error"}'))
    assert.equal(3, sample(after, 'squall_rpc_call_duration_seconds_count{method="sum"}'))
    assert.is_true(sample(after, "process_resident_memory_bytes") > 1e6)
    assert.is_true(sample(after, "process_open_fds") > 3)
    assert.is_true(sample(after, "process_cpu_seconds_total") > 0)
    assert.is_true(math.abs(sample(after, "process_start_time_seconds") - os.time()) < 3600)
    local rc, out = promtool(after)
    assert.equal(0, rc, out)
    c:close(); conn:close(); rs:stop(); echo:stop()
  end))

  it("measures event-loop lag", async(function()
    serve()
    local function count()
      local _, t = http_get(server.port, "/metrics")
      return sample(t, "squall_loop_lag_seconds_count"), t
    end
    local n0 = count()
    -- right after a sample, block the loop for 0.8 s: the next one (due
    -- 0.5 s after) runs at least 0.3 s late
    eventually(function() return count() > n0 end, "a lag sample", 20)
    local t0 = core.time() -- wall time: a busy machine slows CPU time down
    while core.time() - t0 < 0.8 do end
    local n1 = count()
    local _, t = count()
    eventually(function()
      local n
      n, t = count()
      return n > n1
    end, "a lag sample after the block", 20)
    local late = sample(t, 'squall_loop_lag_seconds_bucket{le="+Inf"}') -
      sample(t, 'squall_loop_lag_seconds_bucket{le="0.25"}')
    assert.is_true(late >= 1, t)
  end, { timeout = 30 }))

  it("counts HTTPServer requests by status, with their latency", async(function()
    serve()
    local function scrape() return select(2, http_get(server.port, "/metrics")) end
    local before = scrape()
    local sock, port = testing.bind_unused_port()
    local web = require("squall.httpserver").HTTPServer(function(req)
      if req.path == "/missing" then return 404, nil, "no" end
      return 200, nil, "yes"
    end)
    web:add_sockets({ sock })
    for _ = 1, 3 do assert.equal(200, (http_get(port, "/"))) end
    assert.equal(404, (http_get(port, "/missing")))
    local after = scrape()
    local function delta(name) return (sample(after, name) or 0) - (sample(before, name) or 0) end
    -- the scrapes themselves are HTTPServer requests too: the one after
    -- `before` was answered once its text was made
    assert.equal(4, delta('squall_http_requests_total{status="200"}'))
    assert.equal(1, delta('squall_http_requests_total{status="404"}'))
    assert.equal(5, delta("squall_http_request_duration_seconds_count"))
    web:stop()
  end))

  it("answers 404 elsewhere and serves keep-alive requests", async(function()
    serve()
    assert.equal(404, (http_get(server.port, "/nope")))
    local s = assert(iostream.connect("127.0.0.1", server.port))
    for _ = 1, 2 do
      s:write("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
      local head = assert(s:read_until("\r\n\r\n"))
      assert.matches("^HTTP/1.1 200 OK", head)
      assert(s:read_bytes(tonumber(head:match("Content%-Length: (%d+)"))))
    end
    s:close()
  end))

  it("reports every worker of fork_processes in one scrape", async(function()
    local tmp = helpers.tmpdir()
    local app, mport = helpers.free_port(), helpers.free_port()
    local script = helpers.tmpscript(([[
      local ioloop = require "squall.ioloop"
      local metrics = require "squall.metrics"
      local process = require "squall.process"
      local TCPServer = require "squall.tcpserver"
      local server = TCPServer({ handle_stream = function(s) s:close() end })
      server:bind(%d, "127.0.0.1")
      server:start(2)
      metrics.counter("spec_worker_id_total", "This worker's id"):inc(process.task_id() + 1)
      metrics.serve(%d, "127.0.0.1")
      ioloop.current():start()
    ]]):format(app, mport))
    local wait, signal = helpers.start(("TMPDIR=%s exec %s %s"):format(q(tmp),
      q(helpers.squall_real), q(script)), 60)
    local text = eventually(function()
      local c = iostream.connect("127.0.0.1", mport)
      if not c then return nil end
      c:close()
      local _, t = http_get(mport, "/metrics")
      return t:find('spec_worker_id_total{worker="1"}', 1, true) and
        t:find('spec_worker_id_total{worker="0"}', 1, true) and t
    end, "both workers in one scrape", 20)
    assert.equal(1, sample(text, 'spec_worker_id_total{worker="0"}'))
    assert.equal(2, sample(text, 'spec_worker_id_total{worker="1"}'))
    assert.is_number(sample(text, 'process_resident_memory_bytes{worker="1"}'))
    -- every family once, each worker's samples under it
    local _, n = text:gsub("# TYPE spec_worker_id_total counter", "")
    assert.equal(1, n)
    local rc, out = promtool(text)
    assert.equal(0, rc, out)
    signal("TERM")
    assert.equal(0, (wait()))
    os.execute("rm -rf " .. q(tmp))
    os.remove(script)
  end, { timeout = 40 }))

  describe("push_influx", function()
    local influx
    setup(async(function()
      influx = helpers.start_influxdb()
      eventually(function()
        local ok, status = pcall(http_get, influx.port, "/ping")
        return ok and status == 204
      end, "influxd to answer /ping", 60)
      local status = helpers.run(("curl -s -XPOST http://127.0.0.1:%d/query " ..
        "--data-urlencode 'q=CREATE DATABASE squall'"):format(influx.port))
      assert.equal(0, status)
    end, { timeout = 90 }))
    teardown(async(function() helpers.stop_server(influx) end, { timeout = 60 }))

    local function urlencode(s)
      return (s:gsub("[^%w%-_.~]", function(c) return ("%%%02X"):format(c:byte()) end))
    end

    local function query(db, sql)
      local status, body = http_get(influx.port, ("/query?db=%s&q=%s"):format(db, urlencode(sql)))
      return status == 200 and body
    end

    it("writes line protocol over HTTP that InfluxDB reads back", async(function()
      metrics.counter("spec_influx_total", "For InfluxDB", { "zone" }):inc(42, { zone = "a b" })
      metrics.histogram("spec_influx_seconds", "For InfluxDB", nil, { 1 }):observe(0.5)
      local handle = metrics.push_influx({
        url = ("http://127.0.0.1:%d/write?db=squall"):format(influx.port), interval = 0.1 })
      local body = eventually(function()
        local b = query("squall", 'SELECT "value", "zone" FROM "spec_influx_total"')
        return b and b:find("42", 1, true) and b
      end, "the counter in InfluxDB", 10)
      assert.matches('"a b"', body)
      local hist = eventually(function()
        local b = query("squall", 'SELECT "count", "sum", "le_1", "le_inf" FROM ' ..
          '"spec_influx_seconds"')
        return b and b:find('"values"', 1, true) and b
      end, "the histogram in InfluxDB", 10)
      assert.matches(",1,0.5,1,1%]", hist)
      local built_in = query("squall", 'SELECT last("value") FROM "process_resident_memory_bytes"')
      assert.matches('"values"', built_in)
      handle.stop()
    end, { timeout = 30 }))

    it("writes over UDP", async(function()
      metrics.gauge("spec_udp_gauge", "Over UDP"):set(7.25)
      local handle = metrics.push_influx({
        url = ("udp://127.0.0.1:%d"):format(influx.udp_port), interval = 0.1 })
      local body = eventually(function()
        local b = query("squall_udp", 'SELECT "value" FROM "spec_udp_gauge"')
        return b and b:find("7.25", 1, true) and b
      end, "the gauge in InfluxDB over UDP", 20)
      assert.truthy(body)
      handle.stop()
    end, { timeout = 30 }))

    it("refuses a bad url at the caller's line", function()
      assert.matches("url must be", raised(function()
        metrics.push_influx({ url = "ftp://x:1" })
      end))
    end)
  end)
end)
