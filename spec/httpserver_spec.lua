-- squall.httpserver over real sockets: curl and Python's http.client as
-- clients, and raw sockets for pipelining, every smuggling case and limit.
local gen = require "squall.gen"
local iostream = require "squall.iostream"
local testing = require "squall.testing"
local helpers = require "helpers"

local async = testing.async
local q = helpers.q

local serve = helpers.http_server

-- What the echoing handler answers: method, path, query, args, a header
-- and the body, one per line.
local function echo(req)
  local body = req:body()
  if not body then return end
  local args = {}
  for k, v in pairs(req.args) do
    args[#args + 1] = k .. "=" .. (type(v) == "table" and table.concat(v, ",") or v)
  end
  table.sort(args)
  return 200, { ["Content-Type"] = "text/plain", ["X-Seen"] = req.headers["X-Test"] or "-" },
    table.concat({ req.method, req.path, req.query, table.concat(args, "&"), req.version,
      tostring(req.remote_ip), body }, "\n")
end

-- Send raw bytes and read until the server closes: everything it said.
local function raw(port, bytes)
  local s = assert(iostream.connect("127.0.0.1", port))
  s:set_timeout(10 * helpers.scale)
  s:write(bytes)
  local all, err = s:read_until_close()
  s:close()
  return all or ("<" .. tostring(err) .. ">")
end

-- Read one response from a stream: status, headers (lower-case), body.
local function read_response(s)
  local head = assert(s:read_until("\r\n\r\n"))
  local status = tonumber(head:match("^HTTP/1%.1 (%d+)"))
  local headers = {}
  for k, v in head:gmatch("\r\n([^:\r\n]+): *([^\r\n]*)") do headers[k:lower()] = v end
  local body = ""
  if headers["content-length"] then
    body = assert(s:read_bytes(tonumber(headers["content-length"])))
  elseif headers["transfer-encoding"] == "chunked" then
    local parts = {}
    while true do
      local n = tonumber(assert(s:read_until("\r\n")):match("^%x+"), 16)
      if n == 0 then assert(s:read_until("\r\n")) break end
      parts[#parts + 1] = assert(s:read_bytes(n))
      assert(s:read_bytes(2))
    end
    body = table.concat(parts)
  end
  return status, headers, body
end

local client, python = helpers.run_ok, helpers.run_python

describe("squall.httpserver", function()
  describe("with curl", function()
    it("answers GET, POST, HEAD and a chunked upload", async(function()
      local server, port = serve(echo)
      local base = "http://127.0.0.1:" .. port
      local out = client(("curl -s -H 'X-Test: yes' %s"):format(q(base .. "/a/b?x=1&x=2&y=%20z")))
      assert.equal("GET\n/a/b\nx=1&x=2&y=%20z\nx=1,2&y= z\nHTTP/1.1\n127.0.0.1\n", out)
      out = client(("curl -s -d hello %s"):format(q(base .. "/p")))
      assert.equal("POST\n/p\n\n\nHTTP/1.1\n127.0.0.1\nhello", out)
      out = client(("curl -s -I %s"):format(q(base .. "/h")))
      assert.matches("^HTTP/1.1 200 OK\r\n", out)
      assert.matches("Content%-Length: 29\r\n", out) -- what GET would send
      assert.matches("X%-Seen: %-\r\n", out)
      out = client(("curl -s -H 'Transfer-Encoding: chunked' --data-binary %s %s")
        :format(q(("z"):rep(100000)), q(base .. "/c")))
      assert.equal("POST\n/c\n\n\nHTTP/1.1\n127.0.0.1\n" .. ("z"):rep(100000), out)
      server:stop()
    end, { timeout = 60 }))

    it("keeps the connection alive between requests, and honours Expect: 100-continue",
      async(function()
        local server, port = serve(echo)
        local url = "http://127.0.0.1:" .. port .. "/k"
        local _, err = client(("curl -sv %s %s -o /dev/null -o /dev/null"):format(q(url), q(url)))
        assert.matches("Re%-using existing connection", err)
        local file = os.tmpname()
        helpers.spit(file, ("e"):rep(5000))
        local out
        out, err = client(("curl -sv -H 'Expect: 100-continue' --data-binary @%s %s")
          :format(q(file), q(url)))
        os.remove(file)
        assert.matches("HTTP/1.1 100 Continue", err)
        assert.matches(("e"):rep(5000) .. "$", out)
        server:stop()
      end, { timeout = 60 }))
  end)

  describe("with Python's http.client", function()
    it("reads Content-Length and chunked responses on one kept-alive connection",
      async(function()
        local server, port = serve(function(req)
          if req.path == "/stream" then
            req:start(200, { ["Content-Type"] = "text/plain" })
            for i = 1, 3 do assert(req:write("part " .. i .. "\n")) end
            req:finish()
            return
          end
          return 201, { ["Set-Cookie"] = { "a=1", "b=2" } }, "made"
        end)
        local out = python([[
import http.client, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))
for path in ("/x", "/stream", "/x"):
    c.request("GET", path)
    r = c.getresponse()
    print(r.status, r.getheader("Transfer-Encoding"), r.headers.get_all("Set-Cookie"),
          repr(r.read().decode()))
print("socket reused:", c.sock is not None)
]], port)
        assert.equal("201 None ['a=1', 'b=2'] 'made'\n" ..
          "200 chunked None 'part 1\\npart 2\\npart 3\\n'\n" ..
          "201 None ['a=1', 'b=2'] 'made'\nsocket reused: True\n", out)
        server:stop()
      end, { timeout = 60 }))
  end)

  describe("over raw sockets", function()
    it("answers pipelined requests in order, in one connection", async(function()
      local server, port = serve(echo)
      local all = raw(port, "GET /1 HTTP/1.1\r\nHost: a\r\n\r\n" ..
        "POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc" ..
        "POST /3 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nxy\r\n0\r\n\r\n" ..
        "GET /4 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
      local paths = {}
      for p in all:gmatch("HTTP/1%.1 200 OK.-\r\n\r\n%u+\n(/%d)") do paths[#paths + 1] = p end
      assert.same({ "/1", "/2", "/3", "/4" }, paths)
      assert.matches("\nabc", all)
      assert.matches("\nxy", all)
      assert.matches("Connection: close\r\n", all)
      server:stop()
    end))

    it("HTTP/1.0: closes unless asked to keep alive", async(function()
      local server, port = serve(echo)
      local all = raw(port, "GET /a HTTP/1.0\r\n\r\nGET /b HTTP/1.0\r\n\r\n")
      local _, n = all:gsub("HTTP/1%.1 200", "")
      assert.equal(1, n)
      assert.matches("Connection: close\r\n", all)
      local s = assert(iostream.connect("127.0.0.1", port))
      s:write("GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
      local status, headers = read_response(s)
      assert.equal(200, status)
      assert.equal("keep-alive", headers.connection)
      s:write("GET /b HTTP/1.0\r\n\r\n")
      assert.equal(200, (read_response(s)))
      s:close()
      server:stop()
    end))

    -- RFC 9112 section 6.3 and 5: each of these is refused with 400 and
    -- the connection closes, the handler never running.
    local smuggling = {
      ["Content-Length with Transfer-Encoding"] =
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n" ..
        "0\r\n\r\n",
      ["two different Content-Lengths"] =
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
      ["a Content-Length list"] = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 4\r\n\r\nabcd",
      ["a Transfer-Encoding not ending in chunked"] =
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\nabc",
      ["Transfer-Encoding: gzip alone"] =
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\nabc",
      ["an obs-folded header"] = "GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n 2\r\n\r\n",
      ["a space before the colon"] = "GET / HTTP/1.1\r\nHost: a\r\nX-A : 1\r\n\r\n",
      ["a bare CR in a value"] = "GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r2\r\n\r\n",
      ["a bare CR ending the request line"] = "GET / HTTP/1.1\rHost: a\r\n\r\n",
      ["a bad chunk size"] =
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
      ["a chunk size that overflows"] =
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1ffffffffffffffff\r\n",
      ["a request line that is not HTTP"] = "HELLO\r\n\r\n",
      ["HTTP/1.1 without Host"] = "GET / HTTP/1.1\r\n\r\n",
    }
    for name, bytes in pairs(smuggling) do
      it("refuses " .. name .. " with 400 and closes", async(function()
        local ran = 0
        local server, port = serve(function(req)
          ran = ran + 1
          req:body()
          return 200, nil, "the handler ran"
        end)
        -- a second request behind it must never be served
        local all = raw(port, bytes .. "GET /after HTTP/1.1\r\nHost: a\r\n\r\n")
        assert.matches("^HTTP/1%.1 400 Bad Request\r\n", all)
        assert.matches("Connection: close\r\n", all)
        local _, n = all:gsub("HTTP/1%.1 %d%d%d ", "")
        assert.equal(1, n)
        assert.is_nil(all:find("the handler ran", 1, true))
        assert.equal(0, ran)
        server:stop()
      end))
    end

    it("answers 431 to an oversize head, 413 to an oversize body (Content-Length or chunked)",
      async(function()
        local server, port = serve(echo, { max_header_size = 1024, max_body_size = 100 })
        local all = raw(port, "GET / HTTP/1.1\r\nHost: a\r\nX-Big: " .. ("b"):rep(2000) ..
          "\r\n\r\n")
        assert.matches("^HTTP/1%.1 431 ", all)
        all = raw(port, "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 101\r\n\r\n" ..
          ("x"):rep(101))
        assert.matches("^HTTP/1%.1 413 ", all)
        all = raw(port, "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" ..
          "40\r\n" .. ("x"):rep(64) .. "\r\n40\r\n" .. ("x"):rep(64) .. "\r\n0\r\n\r\n")
        assert.matches("^HTTP/1%.1 413 ", all)
        assert.matches("Connection: close\r\n", all)
        -- within the limits the same server answers
        all = raw(port, "POST / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n" ..
          "Content-Length: 100\r\n\r\n" .. ("x"):rep(100))
        assert.matches("^HTTP/1%.1 200 ", all)
        server:stop()
      end))

    it("gives req:body() nil, err (kind http) when the body breaks a limit", async(function()
      local got = gen.Future()
      local server, port = serve(function(req)
        local body, err = req:body()
        got:set_result({ body, err and err.kind })
      end, { max_body_size = 10 })
      local all = raw(port, "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" ..
        "8\r\n12345678\r\n8\r\n12345678\r\n0\r\n\r\n")
      assert.matches("^HTTP/1%.1 413 ", all)
      assert.same({ nil, "http" }, got:result())
      server:stop()
    end))

    it("answers 408 to a head that does not come in time; closes idle connections",
      async(function()
        local server, port = serve(echo, { header_timeout = 0.3, idle_timeout = 0.3 })
        local s = assert(iostream.connect("127.0.0.1", port))
        s:write("GET / HTTP/1.1\r\nHost: a\r\n")
        local all = assert(s:read_until_close())
        assert.matches("^HTTP/1%.1 408 ", all)
        s:close()
        s = assert(iostream.connect("127.0.0.1", port))
        all = s:read_until_close()
        assert.equal("", all)
        s:close()
        -- kept alive after a request, then idle: closed too
        s = assert(iostream.connect("127.0.0.1", port))
        s:write("GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert.equal(200, (read_response(s)))
        assert.equal("", s:read_until_close())
        s:close()
        server:stop()
      end))

    it("streams a body in pieces with bounded memory", async(function()
      local sizes = gen.Future()
      local server, port = serve(function(req)
        local n, biggest = 0, 0
        for piece in req:body_chunks() do
          n = n + #piece
          if #piece > biggest then biggest = #piece end
        end
        sizes:set_result({ n, biggest, req.body_error })
        return 200, nil, tostring(n)
      end)
      local s = assert(iostream.connect("127.0.0.1", port))
      local total = 4 * 1024 * 1024
      s:write("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: " .. total .. "\r\n\r\n")
      local block = ("y"):rep(65536)
      for _ = 1, total / #block do assert(s:write(block)) end
      local status, _, body = read_response(s)
      assert.equal(200, status)
      assert.equal(tostring(total), body)
      local r = sizes:result()
      assert.equal(total, r[1])
      assert.is_true(r[2] <= 65536)
      assert.is_nil(r[3])
      s:close()
      server:stop()
    end, { timeout = 20 }))

    it("answers 500 when the handler raises, and 200 empty when it returns nothing",
      async(function()
        local server, port = serve(function(req)
          if req.path == "/raise" then error("secret detail") end
          if req.path == "/late" then
            req:start(200, { ["Content-Length"] = "10" })
            req:write("12345")
            error("half way")
          end
        end)
        local all
        helpers.capture_log(function()
          all = raw(port, "GET /raise HTTP/1.1\r\nHost: a\r\n\r\n")
        end)
        assert.matches("^HTTP/1%.1 500 Internal Server Error\r\n", all)
        assert.is_nil(all:find("secret", 1, true))
        helpers.capture_log(function()
          all = raw(port, "GET /late HTTP/1.1\r\nHost: a\r\n\r\n")
        end)
        assert.matches("^HTTP/1%.1 200 OK\r\n.*\r\n\r\n12345$", all)
        local s = assert(iostream.connect("127.0.0.1", port))
        s:write("GET /nothing HTTP/1.1\r\nHost: a\r\n\r\n")
        local status, headers, body = read_response(s)
        assert.equal(200, status)
        assert.equal("0", headers["content-length"])
        assert.equal("", body)
        assert.is_string(headers.date)
        s:close()
        server:stop()
      end))

    it("streams a response with backpressure: a write waits past write_high_water",
      async(function()
        local most = 0
        local server, port = serve(function(req)
          req:start(200, { ["Content-Type"] = "application/octet-stream" })
          local block = ("s"):rep(65536)
          for _ = 1, 256 do -- 16 MiB: more than the kernel's buffers hold
            assert(req:write(block))
            local queued = req.stream:get_write_buffer_size()
            if queued > most then most = queued end
          end
          req:finish()
        end, { write_high_water = 65536 })
        local s = assert(iostream.connect("127.0.0.1", port))
        s:write("GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        local status, _, body = read_response(s)
        assert.equal(200, status)
        assert.equal(16 * 1024 * 1024, #body)
        -- each write returned once what was queued fell under the mark:
        -- at most the mark and the block just written (its chunk framing)
        assert.is_true(most <= 65536 + 65536 + 16, "queued " .. most)
        s:close()
        server:stop()
      end, { timeout = 30 }))

    it("keeps no request's state for the next connection (idle ones hold no parser)",
      async(function()
        local server, port = serve(echo)
        -- a, idle after a request with a header and a body; b, with neither
        local a = assert(iostream.connect("127.0.0.1", port))
        a:write("POST /a?k=1 HTTP/1.1\r\nHost: a\r\nX-Test: from-a\r\nContent-Length: 3\r\n\r\nabc")
        local status, headers, body = read_response(a)
        assert.equal(200, status)
        assert.equal("from-a", headers["x-seen"])
        assert.equal("POST\n/a\nk=1\nk=1\nHTTP/1.1\n127.0.0.1\nabc", body)
        local b = assert(iostream.connect("127.0.0.1", port))
        -- and c, half-way through a head while b is served
        local c = assert(iostream.connect("127.0.0.1", port))
        c:write("GET /c HTTP/1.1\r\nHo")
        b:write("GET /b HTTP/1.0\r\n\r\n")
        status, headers, body = read_response(b)
        assert.equal(200, status)
        assert.equal("-", headers["x-seen"])
        assert.equal("GET\n/b\n\n\nHTTP/1.0\n127.0.0.1\n", body)
        c:write("st: c\r\nX-Test: from-c\r\n\r\n")
        status, headers, body = read_response(c)
        assert.equal(200, status)
        assert.equal("from-c", headers["x-seen"])
        assert.equal("GET\n/c\n\n\nHTTP/1.1\n127.0.0.1\n", body)
        a:write("GET /again HTTP/1.1\r\nHost: a\r\n\r\n")
        status, headers, body = read_response(a)
        assert.equal(200, status)
        assert.equal("-", headers["x-seen"])
        assert.equal("GET\n/again\n\n\nHTTP/1.1\n127.0.0.1\n", body)
        a:close()
        b:close()
        c:close()
        server:stop()
      end))

    it("waits after a whole response past write_high_water before serving the next",
      async(function()
        local most = 0
        local big = ("w"):rep(1024 * 1024)
        local server, port = serve(function(req)
          local queued = req.stream:get_write_buffer_size()
          if queued > most then most = queued end
          return 200, nil, big
        end, { write_high_water = 65536 })
        local s = assert(iostream.connect("127.0.0.1", port))
        s:write(("GET / HTTP/1.1\r\nHost: a\r\n\r\n"):rep(8))
        for _ = 1, 8 do
          local status, _, body = read_response(s)
          assert.equal(200, status)
          assert.equal(#big, #body)
        end
        -- pipelined requests were served one answer at a time: a handler
        -- never found more than the mark still queued
        assert.is_true(most <= 65536, "queued " .. most)
        s:close()
        server:stop()
      end, { timeout = 30 }))

    it("serves HTTPS with ssl_options (curl verifies it) and PROXY protocol clients",
      async(function()
        local C = helpers.certs
        local tls, tport = serve(function(req) return 200, nil, "secure " .. req.remote_ip end,
          { ssl_options = { certfile = C .. "/server.pem", keyfile = C .. "/server.key" } })
        local out = client(("curl -s --cacert %s https://localhost:%d/"):format(
          q(C .. "/ca.pem"), tport))
        assert.equal("secure 127.0.0.1", out)
        tls:stop()
        local proxied, pport = serve(function(req) return 200, nil, req.remote_ip end,
          { proxy_protocol = true })
        local all = raw(pport, "PROXY TCP4 203.0.113.7 10.0.0.1 5555 80\r\n" ..
          "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert.matches("\r\n\r\n203%.0%.113%.7$", all)
        proxied:stop()
      end, { timeout = 30 }))

    it("trusts X-Real-Ip and X-Forwarded-For only with xheaders", async(function()
      local handler = function(req) return 200, nil, req.remote_ip end
      local plain, p1 = serve(handler)
      local trusting, p2 = serve(handler, { xheaders = true })
      local function ask(port, extra)
        local all = raw(port, "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n" ..
          extra .. "\r\n")
        return all:match("\r\n\r\n(.*)$")
      end
      assert.equal("127.0.0.1", ask(p1, "X-Real-Ip: 10.0.0.1\r\n"))
      assert.equal("10.0.0.1", ask(p2, "X-Real-Ip: 10.0.0.1\r\n"))
      assert.equal("10.0.0.3", ask(p2, "X-Forwarded-For: 10.0.0.2, 10.0.0.3\r\n"))
      plain:stop()
      trusting:stop()
    end))

    it("refuses header values that would split the response", async(function()
      local server, port = serve(function() return 200, { ["X-Bad"] = "a\r\nInjected: 1" }, "x" end)
      local all
      helpers.capture_log(function()
        all = raw(port, "GET / HTTP/1.1\r\nHost: a\r\n\r\n")
      end)
      assert.matches("^HTTP/1%.1 500 ", all)
      assert.is_nil(all:find("Injected", 1, true))
      server:stop()
    end))

    it("finishes requests in flight on close_gracefully, closing idle connections",
      async(function()
        local release, entered = gen.Future(), gen.Future()
        local server, port = serve(function(req)
          if req.path == "/slow" then
            entered:set_result(true)
            release:result()
          end
          return 200, nil, req.path
        end)
        local idle = assert(iostream.connect("127.0.0.1", port))
        idle:write("GET /first HTTP/1.1\r\nHost: a\r\n\r\n")
        assert.equal("/first", select(3, read_response(idle)))
        local busy = assert(iostream.connect("127.0.0.1", port))
        busy:write("GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
        entered:result()
        local done = gen.Future()
        gen.spawn(function() done:set_result({ server:close_gracefully(10) }) end)
        -- the idle one is closed at once; the busy one still gets its answer
        assert.equal("", idle:read_until_close())
        release:set_result(true)
        local status, _, body = read_response(busy)
        assert.equal(200, status)
        assert.equal("/slow", body)
        assert.same({ true, 0 }, done:result())
        idle:close()
        busy:close()
      end))
  end)
end)
