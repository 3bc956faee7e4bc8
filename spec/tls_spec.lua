local iostream = require "squall.iostream"
local gen = require "squall.gen"
local testing = require "squall.testing"
local TCPServer = require "squall.tcpserver"
local TCPClient = require "squall.tcpclient"
local helpers = require "helpers"

local async, q = testing.async, helpers.q
local C = helpers.certs

local SERVER = { certfile = C .. "/server.pem", keyfile = C .. "/server.key" }
local CLIENT = { ca_certs = C .. "/ca.pem" }

local Echo = TCPServer:extend()
function Echo:handle_stream(stream)
  while true do
    local line, err = stream:read_until("\n")
    if not line then
      self.last_error = err
      return
    end
    stream:write(line)
  end
end

-- Start a server on a free port; returns it and the port.
local function serve(server)
  local sock, port = testing.bind_unused_port()
  server:add_sockets({ sock })
  return server, port
end

local function connect(port, ssl_options, opts)
  opts = opts or {}
  opts.ssl_options = ssl_options or CLIENT
  return iostream.connect("127.0.0.1", port, opts)
end

describe("TLS", function()
  setup(function()
    assert(os.execute("scripts/gen-test-certs " .. q(C)) == 0)
  end)

  it("echoes with read_until, read_bytes and read_until_close", async(function()
    local rest = gen.Future()
    local server, port = serve(TCPServer({ ssl_options = SERVER,
      handle_stream = function(stream)
        local line = stream:read_until("\n")
        local bytes = stream:read_bytes(5)
        stream:write(line .. bytes)
        rest:set_result(stream:read_until_close())
      end }))
    local client = assert(connect(port))
    assert.is_true(client:uses_tls())
    client:write("line one\n12345tail that runs to the close")
    assert.equal("line one\n", client:read_until("\n"))
    assert.equal("12345", client:read_bytes(5))
    client:close() -- close_notify ends the server's read_until_close
    assert.equal("tail that runs to the close", rest:result())
    server:stop()
  end))

  it("delivers 16 MiB intact each way", async(function()
    local server, port = serve(TCPServer({ ssl_options = SERVER,
      handle_stream = function(stream)
        local n = tonumber(stream:read_until("\n"))
        local data = stream:read_bytes(n)
        stream:write(data)
        stream:close()
      end }))
    local parts = {}
    for i = 1, 16 * 1024 do parts[i] = ("."):rep(1023 - #tostring(i)) .. i .. "\n" end
    local data = table.concat(parts)
    local client = assert(connect(port))
    client:write(#data .. "\n")
    client:write(data)
    local got = client:read_until_close()
    assert.equal(#data, #got)
    assert.is_true(got == data)
    server:stop()
  end, { timeout = 30 }))

  describe("verification", function()
    it("accepts a certificate from ca_certs for the host name", async(function()
      local server, port = serve(Echo({ ssl_options = SERVER }))
      local client = assert(TCPClient():connect("localhost", port, { ssl_options = CLIENT }))
      client:write("hi\n")
      assert.equal("hi\n", client:read_until("\n"))
      local cert = client:get_peer_certificate()
      assert.matches("CN ?= ?localhost", cert.subject)
      assert.matches("CN ?= ?ca", cert.issuer)
      assert.matches("^%d%d%d%d%-%d%d%-%d%dT", cert.not_after)
      server:stop()
    end))

    local function refused(server_opts, client_opts, host, reason, server_hostname)
      return async(function()
        local server, port = serve(Echo({ ssl_options = server_opts }))
        local s, err = iostream.connect(host or "127.0.0.1", port,
          { ssl_options = client_opts or CLIENT, server_hostname = server_hostname })
        assert.is_nil(s)
        assert.equal("tls", err.kind)
        assert.matches(reason, tostring(err))
        -- the server goes on
        local good = assert(connect(port, { cert_reqs = "none" }))
        good:write("still here\n")
        assert.equal("still here\n", good:read_until("\n"))
        server:stop()
      end)
    end

    it("refuses an unknown CA", refused(
      { certfile = C .. "/other.pem", keyfile = C .. "/other.key" }, nil, nil,
      "certificate verify failed"))

    it("refuses the wrong host name", refused(SERVER, { ca_certs = C .. "/ca.pem" }, nil,
      "certificate verify failed: [Hh]ostname mismatch", "wrong.example"))

    it("refuses an expired certificate", refused(
      { certfile = C .. "/expired.pem", keyfile = C .. "/expired.key" }, nil, nil,
      "certificate has expired"))

    it("verifies against the system store by default", async(function()
      local server, port = serve(Echo({ ssl_options = SERVER }))
      local s, err = iostream.connect("localhost", port, { ssl_options = {} })
      assert.is_nil(s)
      assert.equal("tls", err.kind)
      server:stop()
    end))

    it("skips verification with cert_reqs = none", async(function()
      local server, port = serve(Echo({ ssl_options =
        { certfile = C .. "/other.pem", keyfile = C .. "/other.key" } }))
      local c = assert(connect(port, { cert_reqs = "none" }))
      c:write("ok\n")
      assert.equal("ok\n", c:read_until("\n"))
      server:stop()
    end))
  end)

  describe("client certificates", function()
    local REQUIRED = { certfile = C .. "/server.pem", keyfile = C .. "/server.key",
      ca_certs = C .. "/ca.pem", cert_reqs = "required" }

    it("are checked with cert_reqs = required", async(function()
      local peer = gen.Future()
      local server, port = serve(TCPServer({ ssl_options = REQUIRED,
        handle_stream = function(stream)
          local line = stream:read_until("\n")
          if line then peer:set_result(stream:get_peer_certificate()) end
          stream:write("ok\n")
        end }))
      local c = assert(connect(port, { ca_certs = C .. "/ca.pem",
        certfile = C .. "/client.pem", keyfile = C .. "/client.key" }))
      c:write("hello\n")
      assert.equal("ok\n", c:read_until("\n"))
      assert.matches("CN ?= ?test client", peer:result().subject)
      server:stop()
    end))

    it("a client without one is refused with kind tls and the reason on both sides",
      async(function()
        local server_err = gen.Future()
        local server, port = serve(TCPServer({ ssl_options = REQUIRED,
          handle_stream = function(stream)
            server_err:set_result(select(2, stream:wait_for_handshake()))
          end }))
        -- With TLS 1.3 the client may finish first and learn on its read:
        -- the server's alert tells it why.
        local c, err = connect(port)
        if c then
          c:write("hello\n")
          local r
          r, err = c:read_until("\n")
          assert.is_nil(r)
        end
        assert.equal("tls", err.kind)
        assert.matches("certificate required", tostring(err))
        local serr = server_err:result()
        assert.equal("tls", serr.kind)
        assert.matches("did not return a certificate", tostring(serr))
        server:stop()
      end))
  end)

  it("negotiates ALPN", async(function()
    local chosen = gen.Future()
    local server, port = serve(TCPServer({ ssl_options = { certfile = SERVER.certfile,
      keyfile = SERVER.keyfile, alpn_protocols = { "h2", "http/1.1" } },
      handle_stream = function(stream)
        stream:read_until("\n")
        chosen:set_result(stream:get_alpn_protocol())
      end }))
    local c = assert(connect(port, { ca_certs = C .. "/ca.pem",
      alpn_protocols = { "http/1.1", "spdy/1" } }))
    assert.equal("http/1.1", c:get_alpn_protocol())
    c:write("x\n")
    assert.equal("http/1.1", chosen:result())
    server:stop()
  end))

  it("start_tls upgrades a plain connection without losing buffered bytes",
    async(function()
      local server, port = serve(TCPServer({ handle_stream = function(stream)
        assert.equal("STARTTLS\n", stream:read_until("\n"))
        stream:write("GO\n")
        -- the client's hello may already be buffered behind the line
        assert(stream:start_tls(true, SERVER))
        stream:write("secure " .. stream:read_until("\n"))
      end }))
      local c = assert(iostream.connect("127.0.0.1", port))
      c:write("STARTTLS\n")
      assert.equal("GO\n", c:read_until("\n"))
      assert.equal(c, c:start_tls(false, CLIENT, "localhost"))
      c:write("hello\n")
      assert.equal("secure hello\n", c:read_until("\n"))
      assert.is_true(c:uses_tls())
      server:stop()
    end))

  it("start_tls keeps the hello sent right behind the plaintext line", async(function()
    local server, port = serve(TCPServer({ handle_stream = function(stream)
      assert.equal("STARTTLS\n", stream:read_until("\n"))
      -- the client's hello arrived and is buffered (as plaintext, unread)
      helpers.eventually(function() return stream:get_read_buffer_size() > 0 end, "the hello")
      assert(stream:start_tls(true, SERVER))
      stream:write("secure " .. stream:read_until("\n"))
    end }))
    local c = assert(iostream.connect("127.0.0.1", port))
    c:write("STARTTLS\n")
    assert.equal(c, c:start_tls(false, CLIENT, "localhost"))
    c:write("fast\n")
    assert.equal("secure fast\n", c:read_until("\n"))
    server:stop()
  end))

  describe("robustness", function()
    it("garbage, a truncated hello and a silent client do not stop the server",
      async(function()
        local server, port = serve(Echo({ ssl_options = SERVER }))
        local log = helpers.capture_log(function()
          local g = assert(iostream.connect("127.0.0.1", port))
          g:write("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
          g:read_until_close() -- whatever alert it gets, then the close
          assert.is_true(g:closed())
          -- a hello cut short, then gone
          local t = assert(iostream.connect("127.0.0.1", port))
          t:write("\22\3\1\2\0\1\0\1\252\3\3")
          t:close()
          -- one that connects and says nothing
          local silent = assert(iostream.connect("127.0.0.1", port))
          local good = assert(connect(port))
          good:write("fine\n")
          assert.equal("fine\n", good:read_until("\n"))
          silent:close()
          helpers.eventually(function() return server.last_error end, "the silent client's error")
        end)
        assert.is_nil(log:match("%[E "))
        assert.equal("tls", server.last_error and server.last_error.kind)
        server:stop()
      end))

    it("a handshake that never completes is bounded by the timeout", async(function()
      -- a plain server that never answers the hello
      local server, port = serve(TCPServer({ handle_stream = function(stream)
        stream:read_until("never")
      end }))
      local t0 = require("squall.ioloop").current():time()
      local s, err = connect(port, CLIENT, { timeout = 0.2 })
      assert.is_nil(s)
      assert.equal("timeout", err.kind)
      assert.is_true(require("squall.ioloop").current():time() - t0 < 2)
      server:stop()
    end))

    it("a peer that closes mid-record gets its stream closed with tls", async(function()
      local server, port = serve(Echo({ ssl_options = SERVER }))
      -- Python sends half of a TLS record after the handshake, then closes.
      local wait = helpers.spawn(("timeout 60 /usr/bin/python3 -c %s"):format(q(([[
import socket, ssl
ctx = ssl.create_default_context(cafile="%s")
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", %d)), server_hostname="localhost")
s.sendall(b"whole\n")
print(s.recv(100))
raw = s.unwrap() if False else s
# write half a record straight to the socket under TLS
import os
os.write(s.fileno(), b"\x17\x03\x03\x00\x40" + b"\x00" * 10)
s.close()
]]):format(C .. "/ca.pem", port))))
      local status, out, err = wait()
      assert.equal(0, status, err)
      assert.matches("whole", out)
      helpers.eventually(function() return server.last_error end, "the server's TLS error")
      assert.equal("tls", server.last_error.kind)
      assert.matches("mid%-record", tostring(server.last_error))
      server:stop()
    end, { timeout = 60 }))

    it("close() sends close_notify", async(function()
      local server, port = serve(TCPServer({ ssl_options = SERVER,
        handle_stream = function(stream)
          stream:write("bye\n")
          stream:close()
        end }))
      local wait = helpers.spawn(("timeout 60 /usr/bin/python3 -c %s"):format(q(([[
import socket, ssl
ctx = ssl.create_default_context(cafile="%s")
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", %d)),
                    server_hostname="localhost", suppress_ragged_eofs=False)
data = b""
while True:
    chunk = s.recv(100)  # raises SSLEOFError without close_notify
    if not chunk:
        break
    data += chunk
print(data.decode().strip(), "clean")
]]):format(C .. "/ca.pem", port))))
      local status, out, err = wait()
      assert.equal(0, status, err)
      assert.equal("bye clean\n", out)
      server:stop()
    end, { timeout = 60 }))
  end)

  describe("ssl_options are checked when the server is created", function()
    it("needs certfile", function()
      assert.has_error(function() TCPServer({ ssl_options = {} }) end,
        "ssl_options: a server needs certfile")
    end)
    it("names a file that does not exist", function()
      local ok, err = pcall(TCPServer, { ssl_options = { certfile = "/nonexistent/cert.pem" } })
      assert.is_false(ok)
      assert.matches("/nonexistent/cert.pem", err)
    end)
    it("names a file that does not parse", function()
      local ok, err = pcall(TCPServer, { ssl_options = { certfile = "README.md",
        keyfile = SERVER.keyfile } })
      assert.is_false(ok)
      assert.matches("README.md", err)
    end)
    it("refuses a key that does not match the certificate", function()
      local ok, err = pcall(TCPServer, { ssl_options = { certfile = SERVER.certfile,
        keyfile = C .. "/client.key" } })
      assert.is_false(ok)
      assert.matches("client.key", err)
    end)
    it("takes the key from certfile when keyfile is absent", function()
      assert.is_table(TCPServer({ ssl_options = { certfile = C .. "/server-combined.pem" } }))
    end)
    it("refuses a bad cert_reqs or min_version", function()
      assert.has_error(function()
        TCPServer({ ssl_options = { certfile = SERVER.certfile, cert_reqs = "maybe" } })
      end)
      assert.has_error(function()
        TCPServer({ ssl_options = { certfile = SERVER.certfile, min_version = "SSLv3" } })
      end)
    end)
  end)

  describe("works with real clients and servers", function()
    it("a refused handshake sends openssl s_client the alert", async(function()
      local server, port = serve(Echo({ ssl_options = SERVER }))
      local wait = helpers.spawn(("echo | timeout 10 openssl s_client -connect 127.0.0.1:%d " ..
        "-tls1_1"):format(port))
      local _, out, err = wait()
      assert.matches("alert protocol version", out .. err)
      assert.is_nil((out .. err):find("unexpected eof"))
      server:stop()
    end))

    it("openssl s_client against a squall server", async(function()
      local server, port = serve(Echo({ ssl_options = SERVER }))
      local wait = helpers.spawn(("(printf 'from s_client\\n'; sleep 1) | timeout 10 " ..
        "openssl s_client -connect 127.0.0.1:%d -CAfile %s -verify_return_error -quiet -no_ign_eof")
        :format(port, q(C .. "/ca.pem")))
      local status, out, err = wait()
      assert.equal(0, status, err)
      assert.equal("from s_client\n", out)
      server:stop()
    end))

    it("Python's ssl module against a squall server", async(function()
      local server, port = serve(Echo({ ssl_options = SERVER }))
      local wait = helpers.spawn(("timeout 60 /usr/bin/python3 -c %s"):format(q(([[
import socket, ssl
ctx = ssl.create_default_context(cafile="%s")
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", %d)), server_hostname="localhost")
s.sendall(b"from python\n")
print(s.recv(100).decode(), end="")
]]):format(C .. "/ca.pem", port))))
      local status, out, err = wait()
      assert.equal(0, status, err)
      assert.equal("from python\n", out)
      server:stop()
    end, { timeout = 60 }))

    it("a squall client against openssl s_server", async(function()
      local sock, port = testing.bind_unused_port()
      sock:close()
      local wait = helpers.spawn(("timeout 5 openssl s_server -accept 127.0.0.1:%d " ..
        "-cert %s -key %s -rev -naccept 1 -quiet"):format(port, q(SERVER.certfile),
        q(SERVER.keyfile)))
      local c
      for _ = 1, 100 do
        c = connect(port)
        if c then break end
        gen.sleep(0.05)
      end
      assert(c, "could not connect to s_server")
      c:write("squall\n")
      assert.equal("llauqs\n", c:read_until("\n"))
      c:close()
      wait()
    end))
  end)
end)
