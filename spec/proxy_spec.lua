-- The PROXY protocol: the parser, and TCPServer/rpc.Server with
-- proxy_protocol = true over real sockets. (Behind a real HAProxy:
-- deploy_spec.lua.)
local gen = require "squall.gen"
local iostream = require "squall.iostream"
local proxy = require "squall.proxy"
local rpc = require "squall.rpc"
local TCPServer = require "squall.tcpserver"
local testing = require "squall.testing"
local helpers = require "helpers"

local async = testing.async
local SIG = proxy.V2_SIGNATURE

local function be16(n) return string.char(math.floor(n / 256), n % 256) end
local function v2(cmd, fam, body)
  return SIG .. string.char(0x20 + cmd, fam) .. be16(#body) .. body
end
local function v2_tcp4(src, sport, dst, dport)
  local function ip(a)
    local b = { a:match("(%d+)%.(%d+)%.(%d+)%.(%d+)") }
    return string.char(tonumber(b[1]), tonumber(b[2]), tonumber(b[3]), tonumber(b[4]))
  end
  return v2(1, 0x11, ip(src) .. ip(dst) .. be16(sport) .. be16(dport))
end

-- A server that answers each connection with the address it was given,
-- what getpeername says, and then the first line the client sent.
local function who_server(opts)
  local sock, port = testing.bind_unused_port()
  opts = opts or {}
  opts.proxy_protocol = true
  opts.handle_stream = function(stream, address)
    local host, p = stream:getpeername()
    local line = stream:read_until("\n") or "-\n"
    stream:write(("%s:%d %s:%d %s"):format(address.host, address.port, host, p, line))
    stream:close()
  end
  local server = TCPServer(opts)
  server:add_sockets({ sock })
  return server, port
end

describe("squall.proxy", function()
  describe("parse", function()
    it("reads v1 TCP4, TCP6 and UNKNOWN, and says how long the header was", function()
      local h, n = proxy.parse("PROXY TCP4 192.168.0.1 10.0.0.2 56324 443\r\nGET /")
      assert.same({ version = 1, command = "PROXY", family = "TCP4", src_addr = "192.168.0.1",
        src_port = 56324, dst_addr = "10.0.0.2", dst_port = 443 }, h)
      assert.equal(43, n)
      h = proxy.parse("PROXY TCP6 2001:db8::1 ::1 1234 80\r\n")
      assert.equal("2001:db8::1", h.src_addr); assert.equal(1234, h.src_port)
      h, n = proxy.parse("PROXY UNKNOWN\r\n")
      assert.equal("LOCAL", h.command); assert.equal(15, n)
    end)

    it("reads v2 PROXY over TCP4 and TCP6, and LOCAL", function()
      local h, n = proxy.parse(v2_tcp4("1.2.3.4", 1111, "5.6.7.8", 443) .. "data")
      assert.same({ version = 2, command = "PROXY", family = "TCP4", src_addr = "1.2.3.4",
        src_port = 1111, dst_addr = "5.6.7.8", dst_port = 443 }, h)
      assert.equal(28, n)
      local six = ("\0"):rep(15) .. "\1" -- ::1
      local src = "\32\1\13\184" .. ("\0"):rep(11) .. "\5" -- 2001:db8::5
      h = proxy.parse(v2(1, 0x21, src .. six .. be16(2222) .. be16(80)))
      assert.equal("2001:db8::5", h.src_addr); assert.equal("::1", h.dst_addr)
      assert.equal(2222, h.src_port)
      h, n = proxy.parse(v2(0, 0, ""))
      assert.equal("LOCAL", h.command); assert.equal(16, n)
    end)

    it("says incomplete for a prefix and refuses what is not a header", function()
      local full = "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"
      for i = 1, #full - 1 do assert.is_nil((proxy.parse(full:sub(1, i)))) end
      for _, bad in ipairs({ "GET / HTTP/1.1\r\n", "PROXY TCP4 1.2.3.999 5.6.7.8 1 2\r\n",
        "PROXY TCP4 1.2.3.4 5.6.7.8 1 70000\r\n", "PROXY TCP5 a b 1 2\r\n",
        "PROXY " .. ("x"):rep(120), SIG .. "\49\17\0\0", SIG .. "\33\17\0\4abcd" }) do
        local h, err = proxy.parse(bad)
        assert.is_nil(h)
        assert.is_string(err, bad)
      end
    end)
  end)

  describe("TCPServer with proxy_protocol", function()
    it("gives handle_stream and getpeername the client's address (v1 and v2)", async(function()
      local server, port = who_server()
      local c = assert(iostream.connect("127.0.0.1", port))
      c:write("PROXY TCP4 203.0.113.7 192.0.2.1 51000 443\r\nhello\n")
      assert.equal("203.0.113.7:51000 203.0.113.7:51000 hello\n", c:read_until_close())
      c = assert(iostream.connect("127.0.0.1", port))
      c:write(v2_tcp4("198.51.100.9", 4242, "192.0.2.1", 443) .. "v2 data\n")
      assert.equal("198.51.100.9:4242 198.51.100.9:4242 v2 data\n", c:read_until_close())
      c = assert(iostream.connect("127.0.0.1", port))
      c:write("PROXY TCP6 2001:db8::7 2001:db8::1 6000 443\r\nsix\n")
      assert.equal("2001:db8::7:6000 2001:db8::7:6000 six\n", c:read_until_close())
      server:stop()
    end))

    it("keeps the proxy's address for LOCAL and UNKNOWN (health checks)", async(function()
      local server, port = who_server()
      for _, header in ipairs({ v2(0, 0, ""), "PROXY UNKNOWN\r\n" }) do
        local c = assert(iostream.connect("127.0.0.1", port))
        local _, myport = c:getsockname()
        c:write(header .. "check\n")
        assert.equal(("127.0.0.1:%d 127.0.0.1:%d check\n"):format(myport, myport),
          c:read_until_close())
      end
      server:stop()
    end))

    it("never reads past the header: bytes right behind it reach the handler", async(function()
      local server, port = who_server()
      local c = assert(iostream.connect("127.0.0.1", port))
      -- the header and the line in one write, and the line split oddly
      c:write("PROXY TCP4 10.1.1.1 10.0.0.1 1 2\r\n" .. "PROXY TCP4 not a header\n")
      assert.equal("10.1.1.1:1 10.1.1.1:1 PROXY TCP4 not a header\n", c:read_until_close())
      server:stop()
    end))

    it("closes a connection without a valid header, or a slow one; the server goes on",
      async(function()
        local server, port = who_server({ proxy_timeout = 0.2 })
        local log = helpers.capture_log(function()
          for _, bytes in ipairs({ "GET / HTTP/1.0\r\n\r\n", "PROXY TCP4 1.2.3.4\r\n",
            SIG .. "\33\17\0\4abcd", "PROX" }) do
            local c = assert(iostream.connect("127.0.0.1", port))
            c:write(bytes)
            local rest = c:read_until_close()
            assert.equal("", rest or "")
          end
        end)
        assert.matches("did not start with a PROXY header", log)
        assert.matches("timeout", log) -- "PROX" and then nothing
        local c = assert(iostream.connect("127.0.0.1", port))
        c:write("PROXY TCP4 1.1.1.1 2.2.2.2 3 4\r\nok\n")
        assert.equal("1.1.1.1:3 1.1.1.1:3 ok\n", c:read_until_close())
        server:stop()
      end))

    it("closes at once on short garbage, long before proxy_timeout", async(function()
      -- "hi\n" is 3 bytes: waiting for 8 before looking held it 5 s
      local server, port = who_server({ proxy_timeout = 60 })
      for _, bytes in ipairs({ "hi\n", "\r\nX", "PROXY hi\n", "PROXY \n" }) do
        local c = assert(iostream.connect("127.0.0.1", port))
        c:write(bytes)
        local rest = c:read_until_close()
        assert.equal("", rest or "", bytes)
      end
      server:stop()
    end))

    it("parses the header before TLS", async(function()
      local C = helpers.certs
      local server, port = who_server({ ssl_options = { certfile = C .. "/server.pem",
        keyfile = C .. "/server.key" } })
      local c = assert(iostream.connect("127.0.0.1", port))
      c:write("PROXY TCP4 192.0.2.55 192.0.2.1 7777 443\r\n")
      assert(c:flush())
      assert(c:start_tls(false, { ca_certs = C .. "/ca.pem" }, "localhost"))
      c:write("over tls\n")
      assert.equal("192.0.2.55:7777 192.0.2.55:7777 over tls\n", c:read_until_close())
      server:stop()
    end))

    it("rpc.Server takes it too: conn.address is the client's", async(function()
      local server = rpc.Server({ proxy_protocol = true })
      server:route("whoami", function(conn)
        return conn.address.host .. ":" .. conn.address.port
      end)
      local sock, port = testing.bind_unused_port()
      server:add_sockets({ sock })
      local s = assert(iostream.connect("127.0.0.1", port))
      s:write(v2_tcp4("198.51.100.1", 9999, "192.0.2.1", 5700))
      local msgpack = require "squall.msgpack"
      s:write(msgpack.encode_array(0, 1, "whoami", {}))
      local u = msgpack.unpacker()
      local msg
      while not msg do
        u:feed(assert(s:read_bytes(100, true)))
        msg = u:next()
      end
      assert.equal("198.51.100.1:9999", msg[4])
      s:close()
      gen.sleep(0)
      server:stop()
    end))
  end)
end)
