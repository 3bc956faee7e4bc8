-- Deployment past one machine: a real HAProxy (Debian's) on free ports in
-- front of two Squall processes, with send-proxy and send-proxy-v2, and
-- its health checks; systemd socket activation; the Debian package.
local iostream = require "squall.iostream"
local testing = require "squall.testing"
local helpers = require "helpers"

local async, eventually, q, run = testing.async, helpers.eventually, helpers.q, helpers.run

local free_port = helpers.free_port

-- The HAProxy configuration docs/deploy.md shows, on the given ports.
local function haproxy_config(dir, f1, f2, a, b)
  return ([[
global
    stats socket %s/admin.sock mode 600 level admin

defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s

frontend squall_v1
    bind 127.0.0.1:%d
    default_backend squall_v1

frontend squall_v2
    bind 127.0.0.1:%d
    default_backend squall_v2

backend squall_v1
    balance roundrobin
    server a 127.0.0.1:%d send-proxy check inter 200ms check-send-proxy
    server b 127.0.0.1:%d send-proxy check inter 200ms check-send-proxy

backend squall_v2
    balance roundrobin
    server a 127.0.0.1:%d send-proxy-v2 check inter 200ms check-send-proxy
    server b 127.0.0.1:%d send-proxy-v2 check inter 200ms check-send-proxy
]]):format(dir, f1, f2, a, b, a, b)
end

-- "backend/server" -> status, from HAProxy's stats socket.
local function haproxy_status(dir)
  local _, out = run("echo 'show stat' | socat stdio unix-connect:" .. q(dir .. "/admin.sock"))
  local status = {}
  for line in out:gmatch("[^\n]+") do
    local fields = {}
    for f in (line .. ","):gmatch("([^,]*),") do fields[#fields + 1] = f end
    if fields[2] == "a" or fields[2] == "b" then
      status[fields[1] .. "/" .. fields[2]] = fields[18]
    end
  end
  return status
end

describe("deployment", function()
  it("behind HAProxy, both PROXY versions give the client's address; checks pass",
    async(function()
      local dir = helpers.tmpdir()
      local a, b, f1, f2 = free_port(), free_port(), free_port(), free_port()
      local squall = q(helpers.squall_real)
      local wait_a, stop_a = helpers.start(("exec %s examples/deploy/server.lua %d a")
        :format(squall, a), 60)
      local wait_b, stop_b = helpers.start(("exec %s examples/deploy/server.lua %d b")
        :format(squall, b), 60)
      helpers.spit(dir .. "/haproxy.cfg", haproxy_config(dir, f1, f2, a, b))
      local wait_h, stop_h = helpers.start(("exec haproxy -db -f %s")
        :format(q(dir .. "/haproxy.cfg")), 60)
      eventually(function()
        local st = haproxy_status(dir)
        return st["squall_v1/a"] == "UP" and st["squall_v1/b"] == "UP" and
          st["squall_v2/a"] == "UP" and st["squall_v2/b"] == "UP"
      end, "HAProxy's health checks to pass", 15)
      for _, front in ipairs({ f1, f2 }) do
        local seen = {}
        for _ = 1, 4 do
          local c = assert(iostream.connect("127.0.0.1", front))
          local _, myport = c:getsockname()
          local hello = assert(c:read_until("\n"))
          local who, host, p = hello:match("^hello from (%a): you are ([%d.]+):(%d+)\n$")
          assert.is_string(who, hello)
          assert.equal("127.0.0.1", host)
          assert.equal(myport, tonumber(p)) -- the client's own port, not HAProxy's
          seen[who] = true
          c:write("echo through the proxy\n")
          assert.equal("echo through the proxy\n", c:read_until("\n"))
          c:close()
        end
        assert.is_true(seen.a and seen.b, "round robin reached both processes")
      end
      stop_h("TERM"); stop_a("TERM"); stop_b("TERM")
      local _, _, herr = wait_h()
      local sa, _, ea = wait_a()
      local sb, _, eb = wait_b()
      os.execute("rm -rf " .. q(dir))
      assert.equal(0, sa, ea); assert.equal(0, sb, eb)
      -- health checks are not malformed headers
      assert.is_nil(ea:find("PROXY header from"), ea)
      assert.is_nil(eb:find("PROXY header from"), eb)
      assert.is_string(herr)
    end, { timeout = 60 }))

  it("takes the listening socket systemd passes (socket activation)", async(function()
    -- systemd-socket-activate binds, then execs the server with the socket
    -- as fd 3 and LISTEN_PID/LISTEN_FDS set, as systemd does.
    local port = free_port()
    local wait, stop = helpers.start(("exec systemd-socket-activate -E SQUALL_PROXY_PROTOCOL=0 " ..
      "-l 127.0.0.1:%d %s examples/deploy/server.lua 1 activated")
      :format(port, q(helpers.squall_real)), 60)
    local c = eventually(function() return (iostream.connect("127.0.0.1", port)) end,
      "the activated server")
    assert.matches("^hello from activated: you are 127%.0%.0%.1:%d+\n$", c:read_until("\n"))
    c:close()
    stop("TERM")
    local status, _, err = wait()
    assert.equal(0, status, err)
    assert.matches("activated listening on 1 socket", err)
  end, { timeout = 30 }))

  it("takes systemd's socket in the children of fork_processes", async(function()
    -- as docs/deploy.md says: fork first, then systemd_sockets in each child
    -- (LISTEN_PID names the parent then)
    -- each child also appends its line to a file, so the spec stops the
    -- server only once both children have said what they took
    local marks = os.tmpname()
    local script = helpers.tmpscript(([[
local ioloop = require "squall.ioloop"
local netutil = require "squall.netutil"
local process = require "squall.process"
local TCPServer = require "squall.tcpserver"
local id = process.fork_processes(2)
local socks = netutil.systemd_sockets()
local line = ("task %%d: %%d socket(s)\n"):format(id, #socks)
io.stderr:write(line)
local f = assert(io.open(%q, "a")); f:write(line); f:close()
TCPServer({ handle_stream = function(s) s:write("task " .. id .. "\n"); s:close() end })
  :add_sockets(socks)
ioloop.current():start()
]]):format(marks))
    local port = free_port()
    local wait, stop = helpers.start(("exec systemd-socket-activate -l 127.0.0.1:%d %s %s")
      :format(port, q(helpers.squall_real), q(script)), 60)
    local c = eventually(function() return (iostream.connect("127.0.0.1", port)) end,
      "the activated server")
    c:set_timeout(10 * helpers.scale)
    assert.matches("^task [01]\n$", assert(c:read_until("\n")))
    c:close()
    eventually(function()
      local f = io.open(marks)
      local text = f and f:read("*a") or ""
      if f then f:close() end
      return select(2, text:gsub("\n", "")) >= 2
    end, "both children's lines", 20)
    stop("TERM")
    local _, _, err = wait()
    os.remove(script)
    os.remove(marks)
    assert.matches("task 0: 1 socket", err)
    assert.matches("task 1: 1 socket", err)
  end, { timeout = 30 }))

  it("ships systemd units that systemd-analyze accepts", function()
    local _, out, err = run("systemd-analyze verify examples/deploy/squall-echo.socket " ..
      "examples/deploy/squall-echo.service 2>&1")
    -- the only complaint allowed: squall is not installed in /usr/bin here
    local rest = (out .. err):gsub("[^\n]*Command /usr/bin/squall is not executable[^\n]*\n?", "")
    assert.equal("", rest)
  end)

  it("make deb builds a package whose squall runs from where it is installed",
    async(function()
      local status, out, err = run("make deb 2>&1")
      assert.equal(0, status, out .. err)
      local deb = out:match("built (build/squall_[%w.~+-]+_%w+%.deb)")
      assert.is_string(deb, out)
      local _, info = run("dpkg-deb -I " .. q(deb))
      assert.matches("Package: squall", info)
      assert.matches("Depends: .*libuv1", info)
      local root = helpers.tmpdir()
      assert.equal(0, (run(("dpkg-deb -x %s %s"):format(q(deb), q(root)))))
      local bin = root .. "/usr/bin/squall"
      status, out = run(("cd / && %s -e %s"):format(q(bin),
        q("io.write(package.searchpath('squall.rpc', package.path))")))
      assert.equal(0, status)
      assert.equal(root .. "/usr/bin/../share/squall/lua/squall/rpc/init.lua", out)
      -- the unit files docs/deploy.md points at ship with the examples
      for _, unit in ipairs({ "squall-echo.service", "squall-echo.socket" }) do
        assert.is_truthy(io.open(root .. "/usr/share/squall/examples/deploy/" .. unit),
          unit .. " is not in the package")
      end
      -- the installed echo example, with the installed binary, from /
      local port = free_port()
      local wait, stop = helpers.start(("cd / && exec %s %s/usr/share/squall/examples/echo.lua %d")
        :format(q(bin), q(root), port), 30)
      local c = eventually(function() return (iostream.connect("127.0.0.1", port)) end,
        "the installed echo example")
      c:write("installed\n")
      assert.equal("installed\n", c:read_until("\n"))
      c:close()
      stop("TERM")
      assert.equal(0, (wait()))
      os.execute("rm -rf " .. q(root))
    end, { timeout = 60 }))
end)
