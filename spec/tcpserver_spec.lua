local iostream = require "squall.iostream"
local gen = require "squall.gen"
local testing = require "squall.testing"
local TCPServer = require "squall.tcpserver"
local helpers = require "helpers"

local async = testing.async

local Echo = TCPServer:extend()
function Echo:handle_stream(stream)
  while true do
    local line = stream:read_until("\n")
    if not line then return end
    stream:write(line)
  end
end

local function start(server)
  local sock, port = testing.bind_unused_port()
  server:add_sockets({ sock })
  return port
end

describe("squall.tcpserver", function()
  it("runs handle_stream per connection with the peer's address", async(function()
    local seen = gen.Future()
    local server = TCPServer({ handle_stream = function(stream, address)
      seen:set_result(address)
      stream:write("hi " .. address.host .. "\n")
    end })
    local port = start(server)
    local client = assert(iostream.connect("127.0.0.1", port))
    assert.equal("hi 127.0.0.1\n", client:read_until("\n"))
    local address = seen:result()
    assert.equal("127.0.0.1", address.host)
    assert.equal(select(2, client:getsockname()), address.port)
    server:stop()
  end))

  it("serves a subclass's handle_stream", async(function()
    local server = Echo()
    local port = start(server)
    local client = assert(iostream.connect("127.0.0.1", port))
    client:write("ping\n")
    assert.equal("ping\n", client:read_until("\n"))
    server:stop()
  end))

  it("serves a subclass of a subclass: its own new and methods, the rest inherited",
    async(function()
      local Upper = Echo:extend()
      function Upper.new(cls, prefix)
        local self = TCPServer.new(cls)
        self.prefix = prefix
        return self
      end
      function Upper:handle_stream(stream)
        local line = stream:read_until("\n")
        stream:write(self.prefix .. line:upper())
        Echo.handle_stream(self, stream) -- the base's loop for the rest
      end
      local server = Upper("> ")
      assert.equal(Upper, getmetatable(server))
      local port = start(server)
      local client = assert(iostream.connect("127.0.0.1", port))
      client:write("first\nsecond\n")
      assert.equal("> FIRST\n", client:read_until("\n"))
      assert.equal("second\n", client:read_until("\n"))
      server:stop()
    end))

  it("logs an error raised in handle_stream, closes that stream and goes on",
    async(function()
      local Faulty = TCPServer:extend()
      function Faulty:handle_stream(stream)
        local line = stream:read_until("\n")
        if line == "boom\n" then error("handler exploded") end
        stream:write(line)
      end
      local server = Faulty()
      local port = start(server)
      local text = helpers.capture_log(function()
        local bad = assert(iostream.connect("127.0.0.1", port))
        bad:write("boom\n")
        local r, err = bad:read_until("\n")
        assert.is_nil(r)
        assert.equal("closed", err.kind)
      end)
      assert.matches("handler exploded", text)
      assert.matches("stack traceback", text)
      local good = assert(iostream.connect("127.0.0.1", port))
      good:write("fine\n")
      assert.equal("fine\n", good:read_until("\n"))
      server:stop()
    end))

  it("with two servers, each one cleans up after its own raising handlers",
    async(function()
      local function raiser(name)
        return TCPServer({ handle_stream = function(stream)
          stream:read_until("\n")
          error("raised in " .. name)
        end })
      end
      local a, b = raiser("server A"), raiser("server B")
      local port_a, port_b = start(a), start(b)
      local text = helpers.capture_log(function()
        for _, port in ipairs({ port_a, port_b, port_a }) do
          local c = assert(iostream.connect("127.0.0.1", port))
          c:write("go\n")
          local r, err = c:read_until("\n")
          assert.is_nil(r)
          assert.equal("closed", err.kind)
        end
      end)
      local _, in_a = text:gsub("raised in server A", "")
      local _, in_b = text:gsub("raised in server B", "")
      assert.equal(2, in_a)
      assert.equal(1, in_b)
      assert.equal(0, a:active_streams())
      assert.equal(0, b:active_streams())
      a:stop()
      b:stop()
    end))

  it("stop() stops accepting while open connections go on", async(function()
    local server = Echo()
    local port = start(server)
    local client = assert(iostream.connect("127.0.0.1", port))
    client:write("before\n")
    assert.equal("before\n", client:read_until("\n"))
    server:stop()
    local late, err = iostream.connect("127.0.0.1", port)
    assert.is_nil(late)
    assert.equal("refused", err.kind)
    client:write("after\n")
    assert.equal("after\n", client:read_until("\n"))
  end))

  it("listens on several ports", async(function()
    local server = Echo()
    local s1, p1 = testing.bind_unused_port()
    local s2, p2 = testing.bind_unused_port()
    s1:close()
    s2:close()
    server:listen(p1, "127.0.0.1")
    server:listen(p2, "127.0.0.1")
    for _, p in ipairs({ p1, p2 }) do
      local c = assert(iostream.connect("127.0.0.1", p))
      c:write(p .. "\n")
      assert.equal(p .. "\n", c:read_until("\n"))
    end
    server:stop()
  end))

  it("raises at the caller's line when listen or bind cannot bind", async(function()
    local sock, port = testing.bind_unused_port()
    local ok, err = pcall(function() Echo():listen(port, "127.0.0.1") end)
    assert.is_false(ok)
    assert.matches("tcpserver_spec.lua:%d+: cannot listen on 127.0.0.1:" .. port, err)
    ok, err = pcall(function() Echo():bind(port, "127.0.0.1") end)
    assert.is_false(ok)
    assert.matches("tcpserver_spec.lua:%d+: cannot bind 127.0.0.1:" .. port, err)
    sock:close()
  end))

  it("checks stream options when made, as the streams would", function()
    local function made(opts)
      opts.handle_stream = function() end
      return pcall(TCPServer, opts)
    end
    local ok, err = made({ max_buffer_size = -1 })
    assert.is_false(ok)
    assert.matches("max_buffer_size must be a positive integer, got number %-1", err)
    ok, err = made({ read_chunk_size = "big" })
    assert.is_false(ok)
    assert.matches("read_chunk_size must be a positive integer, got string big", err)
    -- 0 means "no limit" to a stream, so a server takes it too
    assert.is_true((made({ write_high_water = 0, max_write_buffer_size = 0 })))
  end)

  it("passes stream options to every stream", async(function()
    local result = gen.Future()
    local server = TCPServer({ max_buffer_size = 1024, handle_stream = function(stream)
      result:set_result(stream:read_until("\n"))
    end })
    local port = start(server)
    local client = assert(iostream.connect("127.0.0.1", port))
    client:write(("x"):rep(5000) .. "\n")
    local r, err = result:result()
    assert.is_nil(r)
    assert.equal("buffer_full", err.kind)
    server:stop()
  end))

  it("checks its options", function()
    assert.has_error(function() TCPServer({ max_buffer_size = -1 }) end)
    assert.has_error(function() TCPServer({ handle_stream = 42 }) end)
  end)

  it("keeps the stream open after handle_stream returns", async(function()
    local handed = gen.Future()
    local server = TCPServer({ handle_stream = function(stream) handed:set_result(stream) end })
    local port = start(server)
    local client = assert(iostream.connect("127.0.0.1", port))
    local stream = handed:result()
    gen.sleep(0.02)
    assert.is_false(stream:closed())
    stream:write("later\n")
    assert.equal("later\n", client:read_until("\n"))
    server:stop()
  end))

  it("serves 1,000 concurrent clients each echoing 100 lines", async(function()
    local server = Echo()
    local port = start(server)
    local clients, failures = {}, {}
    for i = 1, 1000 do
      clients[i] = function()
        local c, err = iostream.connect("127.0.0.1", port)
        if not c then failures[#failures + 1] = tostring(err); return end
        for j = 1, 100 do
          local msg = ("client %d line %d\n"):format(i, j)
          c:write(msg)
          local got = c:read_until("\n")
          if got ~= msg then
            failures[#failures + 1] = ("%d/%d got %s"):format(i, j, tostring(got))
            return
          end
        end
        c:close()
        return true
      end
    end
    local results = gen.multi(clients)
    assert.same({}, failures)
    local n = 0
    for _ in pairs(results) do n = n + 1 end
    assert.equal(1000, n)
    server:stop()
  end, { timeout = 60 }))

  it("accepted streams survive a loop iteration without a reference", async(function()
    local server = Echo()
    local port = start(server)
    local c = assert(iostream.connect("127.0.0.1", port))
    collectgarbage()
    gen.sleep(0.01)
    collectgarbage()
    c:write("alive\n")
    assert.equal("alive\n", c:read_until("\n"))
    server:stop()
  end))
end)
