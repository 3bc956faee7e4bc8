-- Shared helpers for the specs (loaded with require "helpers").
local M = {}

--- Run fn while capturing everything squall.log writes; returns the text.
-- fn gets a function that returns the text captured so far, to wait on
-- (eventually) for a line to appear. squall.log writes through io.stderr
-- at each call, so swapping it catches every line (.luacheckrc allows it).
function M.capture_log(fn)
  local chunks = {}
  local real = io.stderr
  io.stderr = { write = function(_, ...)
    for i = 1, select("#", ...) do chunks[#chunks + 1] = tostring((select(i, ...))) end
  end }
  local ok, err = pcall(fn, function() return table.concat(chunks) end)
  io.stderr = real
  if not ok then error(err, 0) end
  return table.concat(chunks)
end

--- The squall binary under test (scripts/run-tests sets SQUALL_BIN).
local function absolute(path)
  if path:sub(1, 1) == "/" then return path end
  return (os.getenv("PWD") or ".") .. "/" .. path
end
M.squall = absolute(os.getenv("SQUALL_BIN") or "build/squall")
M.absolute = absolute

--- The squall binary itself, never wrapped in valgrind (for specs whose
-- subprocesses must not be slowed down or need every fd).
M.squall_real = absolute(os.getenv("SQUALL_REAL_BIN") or os.getenv("SQUALL_BIN") or
  "build/squall")

--- A file's bytes.
local function slurp(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end
M.slurp = slurp

--- Write `s` to the file at `path` (its folder is made first).
function M.spit(path, s)
  local dir = path:match("^(.*)/")
  if dir then os.execute("mkdir -p '" .. dir:gsub("'", "'\\''") .. "'") end
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
end

--- The number a file starts with, or nil while it has none (a pid or a
-- port a process wrote).
function M.number_in(path)
  local f = io.open(path)
  local n = f and f:read("*n")
  if f then f:close() end
  return n
end

--- Inside a coroutine: wait until the file at `path` starts with a number
-- and return it (see eventually).
function M.eventually_number(path, what)
  return M.eventually(function() return M.number_in(path) end, what)
end

--- A new empty folder under /tmp.
function M.tmpdir()
  local d = os.tmpname()
  os.remove(d)
  assert(os.execute("mkdir -p '" .. d .. "'") == 0)
  return d
end

--- A temporary .lua file holding `code`; returns its path.
function M.tmpscript(code)
  local path = os.tmpname() .. ".lua"
  M.spit(path, code)
  return path
end

--- Run a shell command; returns exit status, stdout, stderr.
function M.run(cmd)
  local out, err, rc = os.tmpname(), os.tmpname(), os.tmpname()
  os.execute(string.format("(%s) >%s 2>%s; echo $? >%s", cmd, out, err, rc))
  local status = tonumber(slurp(rc))
  local o, e = slurp(out), slurp(err)
  os.remove(out); os.remove(err); os.remove(rc)
  return status, o, e
end

--- Quote a string for the shell.
function M.q(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

--- Start a shell command in the background (wrap it in `timeout N` so it
-- cannot outlive the spec). Returns wait(), which inside a coroutine waits
-- for it to exit, letting the loop run meanwhile, and returns status,
-- stdout, stderr; and exited(), true once it has ended (without waiting).
function M.spawn(cmd)
  local out, err, rc = os.tmpname(), os.tmpname(), os.tmpname()
  os.remove(rc)
  os.execute(("( (%s) >%s 2>%s </dev/null; echo $? >%s.tmp && mv %s.tmp %s ) &")
    :format(cmd, out, err, rc, rc, rc))
  return function()
    local gen = require "squall.gen"
    while true do
      local f = io.open(rc)
      if f then
        local status = tonumber(f:read("*a"))
        f:close()
        local o, e = slurp(out), slurp(err)
        os.remove(out); os.remove(err); os.remove(rc)
        return status, o, e
      end
      gen.sleep(0.02)
    end
  end, function()
    local f = io.open(rc)
    if f then f:close() end
    return f ~= nil
  end
end

-- How long a spec file's server may live: stop_server ends it, so this only
-- ends one a spec leaked. Generous, as a file runs for minutes on a loaded
-- machine (under 16 busy loops a shared redis-server outlived its 120 s and
-- the specs after it were refused).
local SERVER_LIFETIME = 900

--- Like spawn, for a command that ends by exec-ing a long-running process
-- (a server): it runs under `timeout secs` (default 20) and `signal(name)`
-- sends that process a signal ("TERM", "KILL"...). Returns wait, signal,
-- exited.
function M.start(cmd, secs)
  local pidfile = os.tmpname()
  local wait, exited = M.spawn(("timeout %d sh -c %s"):format(secs or 20,
    M.q(("echo $$ >%s; %s"):format(M.q(pidfile), cmd))))
  local function signal(name)
    local pid = M.number_in(pidfile)
    if not pid then return false end
    return os.execute(("kill -%s %d"):format(name, pid)) == 0
  end
  return function()
    local status, out, err = wait()
    os.remove(pidfile)
    return status, out, err
  end, signal, exited
end

--- How much slower than usual this run may be (make check's valgrind run
-- sets SQUALL_TEST_TIMEOUT_SCALE); multiply every spec's own deadline.
M.scale = tonumber(os.getenv("SQUALL_TEST_TIMEOUT_SCALE")) or 1

--- Inside a coroutine: wait until `cond()` returns a true value, checking
-- every few milliseconds while the loop runs, and return that value.
-- Raises when `timeout` seconds (default 5, scaled) pass first, naming
-- `what`. A spec waits for what must happen on this or on a Future, never
-- on a fixed sleep followed by an assertion. The sleeps left in specs
-- are a handler's pretend work, a yield (sleep(0)), gen.sleep's own
-- specs, and windows in which something must NOT happen (each says so,
-- and is scaled by M.scale when it measures).
-- `cond` may return nil, err as a failed connect does: the timeout's
-- message then ends with the last such err, which says why.
function M.eventually(cond, what, timeout)
  local gen = require "squall.gen"
  local ioloop = require "squall.ioloop"
  local loop = ioloop.current()
  local deadline = loop:time() + (timeout or 5) * M.scale
  local last
  while true do
    local v, err = cond()
    if v then return v end
    if err ~= nil then last = err end
    if loop:time() > deadline then
      error(("eventually: timed out waiting for %s%s"):format(what or "a condition",
        last ~= nil and " (last: " .. tostring(last) .. ")" or ""), 2)
    end
    gen.sleep(0.005)
  end
end

--- Inside a coroutine: eventually(cond, what, timeout) for a server `srv`
-- started by start_redis, start_mariadb and the like, which raises at
-- once, with the server's exit status and output, when the server has
-- ended instead of coming up (a port taken, an option refused).
function M.serving(srv, cond, what, timeout)
  local ok, v = pcall(M.eventually, function()
    if srv.exited() then
      local status, out, err = srv.wait()
      error(("%s ended (exit status %s) instead of serving:\n%s%s"):format(what, status,
        out, err), 0)
    end
    return cond()
  end, what, timeout)
  if not ok then error(v, 2) end
  return v
end

-- Ports handed out by free_port in this process, never handed out twice.
local given = {}

-- Where the kernel's ephemeral ports (its picks for outgoing connections
-- and for port 0) begin: 32768 unless the machine says otherwise.
local function ephemeral_low()
  local f = io.open("/proc/sys/net/ipv4/ip_local_port_range")
  local low = f and tonumber(f:read("*a"):match("^%s*(%d+)"))
  if f then f:close() end
  return low or 32768
end

--- A TCP port on 127.0.0.1 that was free a moment ago, for a server a spec
-- starts. It lies below the kernel's ephemeral range, so no outgoing
-- connection, of this process or any other, can be given it as its local
-- port while the server starts (Redis, say, would then fail to bind), and
-- it is never one this process gave before. The search starts where the
-- kernel's own choice of a free port points, which differs between
-- processes and runs. (Where the ephemeral range starts below 20000, it
-- searches 10000-19999, which the kernel may hand out too.)
function M.free_port()
  local testing = require "squall.testing"
  local netutil = require "squall.netutil"
  local low = 10000
  local span = math.max(ephemeral_low(), 20000) - low
  local sock, seed = testing.bind_unused_port()
  sock:close()
  for i = 0, span - 1 do
    local port = low + (seed + i) % span
    if not given[port] then
      local socks = netutil.bind_sockets(port, "127.0.0.1")
      if socks then
        for _, s in ipairs(socks) do s:close() end
        given[port] = true
        return port
      end
    end
  end
  error("free_port: no free port below the ephemeral range")
end

--- The error `fn` raises, as a string; asserts that it names the calling
-- spec's file (misuse raises at the user's line).
function M.raised(fn)
  local ok, err = pcall(fn)
  assert(not ok, "expected an error")
  local file = debug.getinfo(2, "S").short_src:match("[^/]+$")
  local where = file:gsub("%p", "%%%0") .. ":%d+: "
  assert(tostring(err):find(where), ("%q does not name %s"):format(tostring(err), file))
  return tostring(err)
end

--- A redis-server of our own on a free port in a temporary folder (never
-- the system service, never a fixed port): { port, dir, wait, signal }.
-- `extra`: more command-line options; `dir` and `port` start one again
-- where an earlier one was (it loads what it SAVEd).
function M.start_redis(extra, dir, port)
  dir, port = dir or M.tmpdir(), port or M.free_port()
  local wait, signal, exited = M.start(("cd %s && exec redis-server --port %d --bind 127.0.0.1 " ..
    "--save '' --appendonly no --daemonize no --loglevel warning --enable-debug-command yes %s")
    :format(M.q(dir), port, extra or ""), SERVER_LIFETIME)
  return { port = port, dir = dir, wait = wait, signal = signal, exited = exited }
end

-- A free port whose cluster bus port (the port + 10000) is free too.
local function free_cluster_port()
  local netutil = require "squall.netutil"
  for _ = 1, 100 do
    local p = M.free_port()
    if p + 10000 < 65536 then
      local ok, socks = pcall(netutil.bind_sockets, p + 10000, "127.0.0.1")
      if ok and socks then
        for _, sock in ipairs(socks) do sock:close() end
        return p
      end
    end
  end
  error("no free port pair for a cluster node")
end

--- Inside a coroutine: a Redis Cluster of our own, 3 masters with one
-- replica each: six redis-servers (`--cluster-enabled yes`, a node
-- timeout of 1 s) on free loopback ports in one temporary folder, joined
-- by `redis-cli --cluster create ... --cluster-replicas 1`. Returns once
-- every node says cluster_state:ok and every master has its replica:
-- { nodes = { "127.0.0.1:port", ... }, servers = { srv... }, dir }, where
-- each srv is as start_redis gives (srv.signal("KILL") kills a node).
function M.start_redis_cluster()
  local redis = require "squall.redis"
  local dir = M.tmpdir()
  local c = { nodes = {}, servers = {}, dir = dir }
  for i = 1, 6 do
    local port = free_cluster_port()
    local d = dir .. "/" .. port
    assert(os.execute("mkdir -p " .. M.q(d)) == 0)
    local wait, signal, exited = M.start(("cd %s && exec redis-server --port %d " ..
      "--bind 127.0.0.1 --save '' --appendonly no --daemonize no --loglevel warning " ..
      "--cluster-enabled yes " ..
      "--cluster-config-file nodes.conf --cluster-node-timeout 1000"):format(M.q(d), port),
      SERVER_LIFETIME)
    c.servers[i] = { port = port, dir = d, wait = wait, signal = signal, exited = exited }
    c.nodes[i] = "127.0.0.1:" .. port
  end
  for _, srv in ipairs(c.servers) do
    local r = M.serving(srv, function() return redis.connect({ port = srv.port }) end,
      "cluster node " .. srv.port, 20)
    r:close()
  end
  M.run_ok("redis-cli --cluster create " .. table.concat(c.nodes, " ") ..
    " --cluster-replicas 1 --cluster-yes")
  M.eventually(function()
    for _, srv in ipairs(c.servers) do
      local r = redis.connect({ port = srv.port })
      if not r then return false end
      local info, slots = r:call("CLUSTER", "INFO"), r:call("CLUSTER", "SLOTS")
      r:close()
      if type(info) ~= "string" or not info:find("cluster_state:ok", 1, true) then
        return false
      end
      if type(slots) ~= "table" or #slots ~= 3 then return false end
      for _, range in ipairs(slots) do
        if #range < 4 then return false end -- its replica is not in yet
      end
    end
    return true
  end, "the cluster to be ok, every master with its replica", 30)
  return c
end

-- Kill the servers of a group and remove its folder.
local function stop_group(servers, dir)
  for _, srv in ipairs(servers) do
    srv.signal("KILL")
    srv.wait()
  end
  os.execute("rm -rf " .. M.q(dir))
end

--- Stop a cluster start_redis_cluster started, and remove its folder.
function M.stop_redis_cluster(c)
  stop_group(c.servers, c.dir)
end

--- Inside a coroutine: the address ("127.0.0.1:port") of the master that
-- holds `slot` now, as node `port` sees it.
function M.cluster_master_of(port, slot)
  local redis = require "squall.redis"
  local r = assert(redis.connect({ port = port }))
  local slots = assert(r:call("CLUSTER", "SLOTS"))
  r:close()
  for _, range in ipairs(slots) do
    if slot >= range[1] and slot <= range[2] then
      return range[3][1] .. ":" .. range[3][2]
    end
  end
end

-- A redis-server (or, with `sentinel`, redis-sentinel over a config
-- file it may rewrite) in `d` on `port`, living SERVER_LIFETIME at most.
local function redis_process(d, port, args, sentinel)
  assert(os.execute("mkdir -p " .. M.q(d)) == 0)
  local cmd
  if sentinel then
    M.spit(d .. "/sentinel.conf", sentinel)
    cmd = ("cd %s && exec redis-sentinel sentinel.conf"):format(M.q(d))
  else
    cmd = ("cd %s && exec redis-server --port %d --bind 127.0.0.1 --save '' " ..
      "--appendonly no --daemonize no --loglevel warning %s"):format(M.q(d), port, args or "")
  end
  local wait, signal, exited = M.start(cmd, SERVER_LIFETIME)
  return { port = port, dir = d, wait = wait, signal = signal, exited = exited,
    addr = "127.0.0.1:" .. port }
end

--- Inside a coroutine: a Redis master with one replica, watched by three
-- redis-sentinels as "mymaster" (quorum 2, down after 1 s), all on free
-- loopback ports in one temporary folder. Returns once every sentinel
-- knows the master, its replica and the other two: { master = srv,
-- replica = srv, sentinels = { srv... }, addrs = { "127.0.0.1:port"... }
-- (the sentinels'), name = "mymaster", dir }. `restart(srv)` starts a
-- killed master or replica again on its port.
function M.start_redis_sentinel()
  local redis = require "squall.redis"
  local dir = M.tmpdir()
  local g = { name = "mymaster", dir = dir, sentinels = {}, addrs = {} }
  local mport, rport = M.free_port(), M.free_port()
  g.master = redis_process(dir .. "/master", mport)
  g.replica = redis_process(dir .. "/replica", rport, "--replicaof 127.0.0.1 " .. mport)
  for _, srv in ipairs({ g.master, g.replica }) do
    local r = M.serving(srv, function() return redis.connect({ port = srv.port }) end,
      "redis-server " .. srv.port, 20)
    r:close()
  end
  for i = 1, 3 do
    local port = M.free_port()
    g.sentinels[i] = redis_process(dir .. "/sentinel" .. i, port, nil, table.concat({
      "port " .. port, "bind 127.0.0.1", "daemonize no", "loglevel warning",
      "sentinel monitor mymaster 127.0.0.1 " .. mport .. " 2",
      "sentinel down-after-milliseconds mymaster 1000",
      "sentinel failover-timeout mymaster 3000",
      "sentinel parallel-syncs mymaster 1", "" }, "\n"))
    g.addrs[i] = "127.0.0.1:" .. port
  end
  M.eventually(function()
    for _, srv in ipairs(g.sentinels) do
      local s = redis.connect({ port = srv.port })
      if not s then return false end
      local info = s:call("SENTINEL", "MASTER", "mymaster")
      local reps = s:call("SENTINEL", "REPLICAS", "mymaster")
      s:close()
      if type(info) ~= "table" or type(reps) ~= "table" or #reps ~= 1 then return false end
      local f = {}
      for k = 1, #info - 1, 2 do f[info[k]] = info[k + 1] end
      for k = 1, #reps[1] - 1, 2 do f["replica " .. reps[1][k]] = reps[1][k + 1] end
      if f["num-slaves"] ~= "1" or f["num-other-sentinels"] ~= "2" or
        f["replica master-link-status"] ~= "ok" then
        return false
      end
    end
    return true
  end, "the sentinels to know the master, its replica (in sync) and each other", 30)
  function g.restart(srv, args)
    local again = redis_process(srv.dir, srv.port, args)
    srv.wait, srv.signal, srv.exited = again.wait, again.signal, again.exited
  end
  return g
end

--- Stop what start_redis_sentinel started, and remove its folder.
function M.stop_redis_sentinel(g)
  stop_group({ g.master, g.replica, unpack(g.sentinels) }, g.dir)
end

--- A MariaDB of our own (scripts/mariadb-scratch: user squall, password
-- "secret", database squall_test) on a free port, or `dir` and `port`
-- again to restart one; TLS with the test certificates.
function M.start_mariadb(dir, port)
  dir = dir or M.tmpdir()
  port = port or M.free_port()
  local wait, signal, exited = M.start(("exec scripts/mariadb-scratch %s %d " ..
    "--ssl-cert=%s --ssl-key=%s --max-allowed-packet=64M"):format(M.q(dir), port,
    M.q(absolute(M.certs .. "/server.pem")), M.q(absolute(M.certs .. "/server.key"))),
    SERVER_LIFETIME)
  return { port = port, dir = dir, wait = wait, signal = signal, exited = exited }
end

--- Stop a server start_redis or start_mariadb started (inside a
-- coroutine), and remove its folder unless `keep`.
function M.stop_server(srv, keep)
  srv.signal("TERM")
  srv.wait()
  if not keep then os.execute("rm -rf " .. M.q(srv.dir)) end
end

--- Inside a coroutine: GET `path` from 127.0.0.1:port over HTTP/1.0;
-- returns the status code, the body and the head.
function M.http_get(port, path)
  local iostream = require "squall.iostream"
  local s = assert(iostream.connect("127.0.0.1", port))
  s:write(("GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"):format(path))
  local all = assert(s:read_until_close())
  s:close()
  local head, body = all:match("^(.-\r\n\r\n)(.*)$")
  return tonumber(head:match("^HTTP/1%.%d (%d+)")), body, head
end

--- An InfluxDB 1.x of our own (scripts/influxdb-scratch) on free ports:
-- { port (HTTP), udp_port, dir, wait, signal }.
function M.start_influxdb()
  local dir = M.tmpdir()
  local port, rpc, udp = M.free_port(), M.free_port(), M.free_port()
  local wait, signal, exited = M.start(("exec scripts/influxdb-scratch %s %d %d %d")
    :format(M.q(dir), port, rpc, udp), SERVER_LIFETIME)
  return { port = port, udp_port = udp, dir = dir, wait = wait, signal = signal,
    exited = exited }
end

--- Debian's python3 (another may come first on PATH without its modules).
M.python = "/usr/bin/python3"

--- A Python Celery worker of its own (Debian's python3-celery, with the
-- tasks of spec/fixtures/celery/pytasks.py) on `broker`: `opts.queues`
-- ("celery"), `opts.name` ("py1"), `opts.vt` (the visibility timeout),
-- `opts.acks_late`. Inside a coroutine, returns once the worker is ready:
-- { wait, signal, log = function() the log so far end }.
function M.start_celery(broker, opts)
  opts = opts or {}
  local log = os.tmpname()
  local wait, signal = M.start(("cd spec/fixtures/celery && BROKER=%s VT=%s ACKS_LATE=%s " ..
    "exec %s -m celery -A pytasks worker --pool=solo -l info -n %s@%%h -Q %s " ..
    "--without-gossip --without-mingle --without-heartbeat >%s 2>&1")
    :format(M.q(broker), tostring(opts.vt or 3600), opts.acks_late and "1" or "0", M.python,
      opts.name or "py1", opts.queues or "celery", M.q(log)), SERVER_LIFETIME)
  local function text()
    local f = io.open(log)
    local t = f and f:read("*a") or ""
    if f then f:close() end
    return t
  end
  M.eventually(function() return text():find("ready%.") end, "the Celery worker to be ready", 60)
  return { wait = function()
    local status = wait()
    os.remove(log)
    return status
  end, signal = signal, log = text }
end

--- Inside a coroutine: run spec/fixtures/celery/pyclient.py with `args`
-- (a list, each quoted) against `broker`, letting the loop run; returns
-- what it printed, decoded (raises when it failed).
function M.pycelery(broker, args)
  local json = require "squall.json"
  local quoted = {}
  for i, a in ipairs(args) do quoted[i] = M.q(a) end
  local status, out, err = M.spawn(("cd spec/fixtures/celery && BROKER=%s timeout 60 %s " ..
    "pyclient.py %s"):format(M.q(broker), M.python, table.concat(quoted, " ")))()
  if status ~= 0 then error("pyclient.py failed (" .. tostring(status) .. "): " .. err, 2) end
  return assert(json.decode(out:match("[^\n]*\n?$")))
end

--- The folder scripts/gen-test-certs fills (make test runs it).
M.certs = "build/certs"

--- Inside testing.async: a connected pair of streams over 127.0.0.1.
-- Returns the server side, the client side, and the listening port.
-- `server_opts` and `client_opts` are stream options for each side.
function M.stream_pair(server_opts, client_opts)
  local gen = require "squall.gen"
  local iostream = require "squall.iostream"
  local netutil = require "squall.netutil"
  local testing = require "squall.testing"
  local sock, port = testing.bind_unused_port()
  local accepted = gen.Future()
  local remove = netutil.add_accept_handler(sock, function(stream)
    accepted:set_result(stream)
  end, server_opts)
  local client = assert(iostream.connect("127.0.0.1", port, client_opts))
  local server = accepted:result()
  remove()
  sock:close()
  return server, client, port
end

--- An HTTPServer(handler, opts) on a free port of 127.0.0.1: server, port.
function M.http_server(handler, opts)
  local httpserver = require "squall.httpserver"
  local testing = require "squall.testing"
  local sock, port = testing.bind_unused_port()
  local server = httpserver.HTTPServer(handler, opts)
  server:add_sockets({ sock })
  return server, port
end

--- Inside a coroutine: run a client command (under `timeout 30`) while
-- the loop runs, assert that it exits 0, and return its stdout, stderr.
function M.run_ok(cmd)
  local status, out, err = M.spawn("timeout 30 " .. cmd)()
  assert(status == 0, ("%s exited %s: %s %s"):format(cmd, tostring(status), out, err))
  return out, err
end

--- Inside a coroutine: run Python `code` (Debian's python3) with `...` as
-- its arguments, as run_ok does; its stdout.
function M.run_python(code, ...)
  local path = M.tmpscript(code)
  local args = {}
  for i, a in ipairs({ ... }) do args[i] = M.q(tostring(a)) end
  local out = M.run_ok(("%s %s %s"):format(M.python, M.q(path), table.concat(args, " ")))
  os.remove(path)
  return out
end

--- Inside a coroutine: start a long-running peer server, the command
-- `argv_for(port)` on a free port, and wait until it accepts. Returns the
-- port and stop(), which ends it (TERM) and returns its exit status,
-- stdout and stderr. `opts`: `dir` (run it there), `name` (for messages),
-- `lifetime` (seconds it may live at most, default SERVER_LIFETIME),
-- `within` (seconds to start accepting, default 20, scaled).
function M.peer_server(argv_for, opts)
  local iostream = require "squall.iostream"
  opts = opts or {}
  local port = M.free_port()
  local wait, signal, exited = M.start(("cd %s && exec %s"):format(M.q(opts.dir or "."),
    argv_for(port)), opts.lifetime or SERVER_LIFETIME)
  M.serving({ wait = wait, exited = exited }, function()
    local s, err = iostream.connect("127.0.0.1", port)
    if s then s:close() end
    return s, err
  end, opts.name or "the peer server", opts.within or 20)
  return port, function()
    signal("TERM")
    return wait()
  end
end

return M
