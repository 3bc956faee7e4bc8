local ioloop = require "squall.ioloop"
local iostream = require "squall.iostream"
local netutil = require "squall.netutil"
local gen = require "squall.gen"
local testing = require "squall.testing"
local TCPClient = require "squall.tcpclient"

local async = testing.async

local function accept_one(sock)
  local f = gen.Future()
  local remove
  remove = netutil.add_accept_handler(sock, function(stream, address)
    remove()
    f:set_result(stream, address)
  end)
  return f
end

describe("squall.tcpclient", function()
  it("connects and talks to a server", async(function()
    local sock, port = testing.bind_unused_port()
    local accepted = accept_one(sock)
    local client = assert(TCPClient():connect("127.0.0.1", port))
    local server = accepted:result()
    client:write("hello\n")
    assert.equal("hello\n", server:read_until("\n"))
    server:write("back\n")
    assert.equal("back\n", client:read_until("\n"))
  end))

  it("resolves names without blocking the loop", async(function()
    local sock, port = testing.bind_unused_port()
    local _ = accept_one(sock)
    local ticks = 0
    local loop = ioloop.current()
    local function tick() ticks = ticks + 1; loop:add_callback(tick) end
    tick()
    local client = assert(iostream.connect("localhost", port))
    assert.is_true(ticks >= 1)
    assert.equal(port, select(2, client:getpeername()))
  end))

  it("returns refused when nothing listens", async(function()
    local sock, port = testing.bind_unused_port()
    sock:close()
    local s, err = TCPClient():connect("127.0.0.1", port)
    assert.is_nil(s)
    assert.equal("refused", err.kind)
    assert.matches("refused", tostring(err))
  end))

  it("returns resolve for a name that does not resolve", async(function()
    local s, err = iostream.connect("no-such-host.invalid", 80, { timeout = 5 })
    assert.is_nil(s)
    assert.equal("resolve", err.kind)
    assert.matches("no%-such%-host%.invalid", tostring(err))
  end))

  it("returns timeout when the connection is not established in time", async(function()
    -- A listener whose accept queue is full drops new SYNs, so a connect
    -- to it hangs until its timeout.
    local socks = assert(netutil.bind_sockets(0, "127.0.0.1", { backlog = 1 }))
    local port = select(2, socks[1]:getsockname())
    local held, timed_out = {}, nil
    for _ = 1, 20 do
      local s, err = iostream.connect("127.0.0.1", port, { timeout = 0.2 })
      if not s then timed_out = err; break end
      held[#held + 1] = s
    end
    assert.is_not_nil(timed_out)
    assert.equal("timeout", timed_out.kind)
    assert.is_true(#held >= 1) -- the queue took some before it filled
    socks[1]:close()
  end))

  it("binds source_ip and source_port", async(function()
    local sock, port = testing.bind_unused_port()
    local accepted = accept_one(sock)
    local free, src_port = testing.bind_unused_port()
    free:close()
    local client = assert(iostream.connect("127.0.0.1", port,
      { source_ip = "127.0.0.1", source_port = src_port }))
    local _, address = accepted:result()
    assert.equal(src_port, address.port)
    assert.equal(src_port, select(2, client:getsockname()))
  end))

  it("passes max_buffer_size to the stream", async(function()
    local sock, port = testing.bind_unused_port()
    local accepted = accept_one(sock)
    local client = assert(iostream.connect("127.0.0.1", port, { max_buffer_size = 100 }))
    local server = accepted:result()
    server:write(("z"):rep(500))
    local r, err = client:read_bytes(500)
    assert.is_nil(r)
    assert.equal("buffer_full", err.kind)
  end))

  it("calls back with a function instead of waiting", async(function()
    local sock, port = testing.bind_unused_port()
    local _ = accept_one(sock)
    local f = gen.Future()
    iostream.connect("127.0.0.1", port, function(stream, err) f:set_result(stream, err) end)
    local stream = f:result()
    assert.is_true(iostream.is_stream(stream))
  end))

  it("raises on misuse", function()
    assert.has_error(function() iostream.connect(nil, 80) end)
    assert.has_error(function() iostream.connect("127.0.0.1", 80) end) -- not in a coroutine
  end)
end)
