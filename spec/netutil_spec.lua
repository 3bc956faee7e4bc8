local iostream = require "squall.iostream"
local netutil = require "squall.netutil"
local gen = require "squall.gen"
local testing = require "squall.testing"
local helpers = require "helpers"

local async = testing.async

describe("squall.netutil", function()
  it("bind_sockets with port 0 on IPv4 and IPv6 gives both one port", function()
    local socks = assert(netutil.bind_sockets(0, nil))
    local families, ports = {}, {}
    for _, s in ipairs(socks) do
      families[s:family()] = true
      ports[select(2, s:getsockname())] = true
    end
    local n = 0
    for _ in pairs(ports) do n = n + 1 end
    assert.equal(1, n)
    assert.is_true(families[4])
    if helpers.run("ip -6 addr show lo | grep -q ::1") == 0 then
      assert.is_true(families[6])
      assert.equal(2, #socks)
    end
    for _, s in ipairs(socks) do s:close() end
  end)

  it("binds one family when asked", function()
    local socks = assert(netutil.bind_sockets(0, "localhost", { family = "inet" }))
    for _, s in ipairs(socks) do
      assert.equal(4, s:family())
      s:close()
    end
    -- "unspec" is the default spelled out: every family the name has
    socks = assert(netutil.bind_sockets(0, "127.0.0.1", { family = "unspec" }))
    assert.equal(1, #socks)
    assert.equal(4, socks[1]:family())
    socks[1]:close()
    assert.matches("unknown family inet7", helpers.raised(function()
      netutil.bind_sockets(0, "127.0.0.1", { family = "inet7" })
    end))
  end)

  it("returns address_in_use for a port taken without reuse_port", function()
    local sock, port = testing.bind_unused_port()
    local socks, err = netutil.bind_sockets(port, "127.0.0.1")
    assert.is_nil(socks)
    assert.equal("address_in_use", err.kind)
    sock:close()
  end)

  it("lets two sockets share a port with reuse_port", function()
    local a = assert(netutil.bind_sockets(0, "127.0.0.1", { reuse_port = true }))
    local port = select(2, a[1]:getsockname())
    local b = assert(netutil.bind_sockets(port, "127.0.0.1", { reuse_port = true }))
    assert.equal(port, select(2, b[1]:getsockname()))
    a[1]:close()
    b[1]:close()
  end)

  it("makes sockets close-on-exec and non-blocking", function()
    local sock = testing.bind_unused_port()
    local f = assert(io.open("/proc/self/fdinfo/" .. sock:fileno()))
    local flags = tonumber(f:read("*a"):match("flags:%s*(%d+)"), 8)
    f:close()
    sock:close()
    local bit = require "bit"
    assert.not_equal(0, bit.band(flags, tonumber("2000000", 8))) -- O_CLOEXEC
    assert.not_equal(0, bit.band(flags, tonumber("4000", 8)))    -- O_NONBLOCK
  end)

  it("raises on bad arguments", function()
    assert.has_error(function() netutil.bind_sockets(70000) end)
    assert.has_error(function() netutil.bind_sockets(0, 12) end)
    assert.has_error(function() netutil.bind_sockets(0, nil, { family = "ipx" }) end)
  end)

  it("add_accept_handler hands over each connection and stops when removed",
    async(function()
      local sock, port = testing.bind_unused_port()
      local got = {}
      local remove = netutil.add_accept_handler(sock, function(stream, address)
        got[#got + 1] = address
        stream:write("welcome\n")
      end)
      for _ = 1, 3 do
        local c = assert(iostream.connect("127.0.0.1", port))
        assert.equal("welcome\n", c:read_until("\n"))
      end
      assert.equal(3, #got)
      assert.equal("127.0.0.1", got[1].host)
      remove()
      -- the socket stays open: a connection waits in the backlog, unserved
      local c = assert(iostream.connect("127.0.0.1", port))
      c:set_timeout(0.1)
      local r, err = c:read_until("\n")
      assert.is_nil(r)
      assert.equal("timeout", err.kind)
      sock:close()
    end))

  it("refuses a second accept handler on one socket", async(function()
    local sock = testing.bind_unused_port()
    local remove = netutil.add_accept_handler(sock, function() end)
    assert.has_error(function() netutil.add_accept_handler(sock, function() end) end)
    remove()
    sock:close()
  end))
end)

describe("accepting when the process runs out of file descriptors", function()
  it("says so once, pauses, and serves again once fds are free", async(function()
    local sock, port = testing.bind_unused_port()
    sock:close()
    -- A server limited to 32 fds, in its own process.
    local script = os.tmpname() .. ".lua"
    local f = assert(io.open(script, "w"))
    f:write(([[
      local TCPServer = require "squall.tcpserver"
      TCPServer({ handle_stream = function(s)
        while true do
          local l = s:read_until("\n")
          if not l then return end
          s:write(l)
        end
      end }):listen(%d, "127.0.0.1")
      local loop = require("squall.ioloop").current()
      loop:call_later(8, function() loop:stop() end)
      loop:add_signal_handler("SIGTERM", function() loop:stop() end)
      loop:start()
    ]]):format(port))
    f:close()
    local log_path = os.tmpname()
    local pid_path = os.tmpname()
    os.execute(("(ulimit -n 32; exec %s %s) 2>%s & echo $! >%s"):format(
      helpers.q(helpers.squall_real), helpers.q(script),
      helpers.q(log_path), helpers.q(pid_path)))
    local pf = assert(io.open(pid_path))
    local pid = pf:read("*n")
    pf:close()
    local clients = {}
    local function connect()
      for _ = 1, 100 do
        local c = iostream.connect("127.0.0.1", port)
        if c then return c end
        gen.sleep(0.05)
      end
    end
    -- More connections than the server has fds: the first ones are served.
    for i = 1, 60 do clients[i] = assert(connect()) end
    assert(clients[1]:write("first\n"))
    assert.equal("first\n", clients[1]:read_until("\n"))
    gen.sleep(0.5)
    -- Free the fds: the connection waiting last in the backlog gets served.
    for i = 1, 59 do clients[i]:close() end
    local last = clients[60]
    last:set_timeout(5)
    assert(last:write("last\n"))
    assert.equal("last\n", last:read_until("\n"))
    os.execute("kill " .. pid)
    gen.sleep(0.2)
    local lf = assert(io.open(log_path))
    local text = lf:read("*a")
    lf:close()
    os.remove(script); os.remove(log_path); os.remove(pid_path)
    local _, count = text:gsub("too many open files", "")
    assert.equal(1, count, text)
  end, { timeout = 20 }))
end)
