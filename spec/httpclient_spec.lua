-- squall.httpclient against squall.httpserver and Python's http.server
-- (a server that is not ours), over real sockets.
local gen = require "squall.gen"
local httpclient = require "squall.httpclient"
local testing = require "squall.testing"
local TCPServer = require "squall.tcpserver"
local helpers = require "helpers"

local async = testing.async
local q = helpers.q
local C = helpers.certs

local serve = helpers.http_server

-- Python's http.server on a free port, answering from a handler class
-- given as code; returns the port and stop().
local function python_server(code)
  local script = helpers.tmpscript([[
import http.server, sys
]] .. code .. [[

http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
]])
  local port, stop = helpers.peer_server(function(p)
    return ("%s %s %d"):format(helpers.python, q(script), p)
  end)
  return port, function()
    stop()
    os.remove(script)
  end
end

describe("squall.httpclient", function()
  it("fetches from HTTPServer, keeping one connection alive", async(function()
    local conns = 0
    local server, port = serve(function(req)
      return 200, { ["X-Method"] = req.method }, req.method .. " " .. req.uri .. " " ..
        (req:body() or "")
    end)
    local orig = server.handle_stream
    server.handle_stream = function(self, ...)
      conns = conns + 1
      return orig(self, ...)
    end
    local base = "http://127.0.0.1:" .. port
    local res = assert(httpclient.fetch(base .. "/a?b=1"))
    assert.equal(200, res.code)
    assert.equal("OK", res.reason)
    assert.equal("GET /a?b=1 ", res.body)
    assert.equal("GET", res.headers["X-Method"])
    res = assert(httpclient.fetch(base .. "/p", { method = "POST", body = "data" }))
    assert.equal("POST /p data", res.body)
    res = assert(httpclient.fetch(base .. "/h", { method = "HEAD" }))
    assert.equal("", res.body)
    assert.equal("8", res.headers["content-length"])
    assert.equal(1, conns)
    server:stop()
    httpclient.close_idle()
  end))

  it("reads chunked and until-close bodies, and status codes as responses", async(function()
    local port, stop = python_server([[
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/chunked":
            self.protocol_version = "HTTP/1.1"
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"one ", b"two ", b"three"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/close":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"until the close")
        else:
            self.send_error(404, "nothing here")
    def log_message(self, *a):
        pass
]])
    local base = "http://127.0.0.1:" .. port
    local res = assert(httpclient.fetch(base .. "/chunked"))
    assert.equal("one two three", res.body)
    res = assert(httpclient.fetch(base .. "/close"))
    assert.equal("until the close", res.body)
    res = assert(httpclient.fetch(base .. "/missing"))
    assert.equal(404, res.code)
    assert.matches("nothing here", res.body)
    stop()
    httpclient.close_idle()
  end, { timeout = 30 }))

  it("follows redirects only when asked", async(function()
    local server, port = serve(function(req)
      if req.path == "/old" then return 301, { Location = "/new?x=1" }, "moved" end
      if req.path == "/post" then return 303, { Location = "/new" }, "" end
      return 200, nil, req.method .. " " .. req.uri
    end)
    local base = "http://127.0.0.1:" .. port
    local res = assert(httpclient.fetch(base .. "/old"))
    assert.equal(301, res.code)
    assert.equal("/new?x=1", res.headers.location)
    res = assert(httpclient.fetch(base .. "/old", { follow_redirects = true }))
    assert.equal(200, res.code)
    assert.equal("GET /new?x=1", res.body)
    assert.equal(base .. "/new?x=1", res.url)
    res = assert(httpclient.fetch(base .. "/post", { method = "POST", body = "b",
      follow_redirects = true }))
    assert.equal("GET /new", res.body)
    server:stop()
    httpclient.close_idle()
  end))

  it("gives nil, err with the core kinds: refused, timeout, tls", async(function()
    local res, err = httpclient.fetch("http://127.0.0.1:" .. helpers.free_port() .. "/")
    assert.is_nil(res)
    assert.equal("refused", err.kind)
    -- a server that accepts and never answers
    local sock, port = testing.bind_unused_port()
    local silent = TCPServer({ handle_stream = function(s) s:read_until_close() end })
    silent:add_sockets({ sock })
    res, err = httpclient.fetch("http://127.0.0.1:" .. port .. "/", { timeout = 0.3 })
    assert.is_nil(res)
    assert.equal("timeout", err.kind)
    silent:stop()
    -- TLS with the test CA: verified; without it: refused as tls
    local tls, tport = serve(function() return 200, nil, "secret" end,
      { ssl_options = { certfile = C .. "/server.pem", keyfile = C .. "/server.key" } })
    res = assert(httpclient.fetch("https://localhost:" .. tport .. "/",
      { ssl_options = { ca_certs = C .. "/ca.pem" } }))
    assert.equal("secret", res.body)
    res, err = httpclient.fetch("https://localhost:" .. tport .. "/")
    assert.is_nil(res)
    assert.equal("tls", err.kind)
    tls:stop()
    httpclient.close_idle()
  end))

  it("sends a request again on a new connection when the kept-alive one was closed",
    async(function()
      local n = 0
      local server, port = serve(function()
        n = n + 1
        return 200, nil, tostring(n)
      end, { idle_timeout = 0.2 })
      local ended = gen.Future()
      local orig = server.handle_stream
      server.handle_stream = function(...)
        orig(...)
        if not ended:done() then ended:set_result(true) end
      end
      local url = "http://127.0.0.1:" .. port .. "/"
      assert.equal("1", assert(httpclient.fetch(url)).body)
      -- the server closes the idle connection; the pool still holds it
      ended:result()
      assert.equal("2", assert(httpclient.fetch(url)).body)
      server:stop()
      httpclient.close_idle()
    end))

  it("raises at the caller's line for misuse", async(function()
    local err = helpers.raised(function() httpclient.fetch("ftp://x/") end)
    assert.matches("not an http", err)
    err = helpers.raised(function() httpclient.fetch("http://x/", { bogus = 1 }) end)
    assert.matches("unknown option", err)
    err = helpers.raised(function() httpclient.fetch("http://x/", { body = 5 }) end)
    assert.matches("body must be a string", err)
  end))
end)
