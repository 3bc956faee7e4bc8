local ioloop = require "squall.ioloop"
local iostream = require "squall.iostream"
local gen = require "squall.gen"
local testing = require "squall.testing"
local TCPServer = require "squall.tcpserver"
local helpers = require "helpers"

local async, q = testing.async, helpers.q

local function serve(handler)
  local server = TCPServer({ handle_stream = handler })
  local sock, port = testing.bind_unused_port()
  server:add_sockets({ sock })
  return server, port
end

describe("graceful shutdown", function()
  it("lets an in-flight request finish and refuses new connections", async(function()
    local working = gen.Future()
    local server, port = serve(function(stream)
      local req = stream:read_until("\n")
      working:set_result(true)
      gen.sleep(0.3) -- working on it when the shutdown begins
      stream:write("answer to " .. req)
      stream:close()
    end)
    local c = assert(iostream.connect("127.0.0.1", port))
    c:write("question\n")
    working:result()
    local drained = gen.spawn(function() return server:close_gracefully(5) end)
    assert.is_true(server:draining())
    local late, err = iostream.connect("127.0.0.1", port)
    assert.is_nil(late)
    assert.equal("refused", err.kind)
    assert.equal("answer to question\n", c:read_until("\n"))
    local clean, closed = drained:result()
    assert.is_true(clean)
    assert.equal(0, closed)
    assert.equal(0, server:active_streams())
  end))

  it("closes idle connections at once", async(function()
    local server, port = serve(function(stream)
      while true do
        stream:set_idle(true)
        local line = stream:read_until("\n")
        stream:set_idle(false)
        if not line then return end
        stream:write(line)
      end
    end)
    local c = assert(iostream.connect("127.0.0.1", port))
    c:write("one\n")
    assert.equal("one\n", c:read_until("\n"))
    local loop = ioloop.current()
    local t0 = loop:time()
    assert.is_true((server:close_gracefully(5)))
    assert.is_true(loop:time() - t0 < 1)
    local r, err = c:read_until("\n")
    assert.is_nil(r)
    assert.equal("closed", err.kind)
  end))

  it("closes a busy connection when its handler marks it idle", async(function()
    local working, release = gen.Future(), gen.Future()
    local server, port = serve(function(stream)
      stream:set_idle(true)
      local line = stream:read_until("\n")
      stream:set_idle(false)
      working:set_result(true)
      release:result() -- busy when the shutdown begins
      stream:write("done " .. line)
      stream:set_idle(true) -- close_when_idle closes it here
      assert(stream:closed(), "set_idle(true) did not close a draining stream")
      local again, err = stream:read_until("\n")
      assert(again == nil and err.kind == "closed")
    end)
    local c = assert(iostream.connect("127.0.0.1", port))
    c:write("job\n")
    working:result()
    local drained = gen.spawn(function() return server:close_gracefully(30) end)
    release:set_result(true)
    assert.equal("done job\n", c:read_until("\n"))
    local r, err = c:read_until("\n")
    assert.is_nil(r)
    assert.equal("closed", err.kind)
    local clean, closed = drained:result()
    assert.is_true(clean)
    assert.equal(0, closed)
  end))

  it("drops a closed stream's unread output at the deadline, calling its close callback",
    async(function()
      local cb = gen.Future()
      local big = 64 * 1024 * 1024 -- so write() does not wait
      local server = TCPServer({ write_high_water = big, handle_stream = function(stream)
        stream:set_close_callback(function() cb:set_result(true) end)
        stream:read_until("\n")
        stream:write(string.rep("x", 16 * 1024 * 1024)) -- more than the kernel takes
        stream:close()
      end })
      local sock, port = testing.bind_unused_port()
      server:add_sockets({ sock })
      -- a client whose buffer fills at once: it stops reading
      local c = assert(iostream.connect("127.0.0.1", port, { max_buffer_size = 4096 }))
      c:write("go\n")
      helpers.eventually(function() return server:active_streams() == 0 end)
      local clean, closed = server:close_gracefully(0.3)
      assert.is_false(clean)
      assert.equal(1, closed)
      assert.is_true(gen.with_timeout(5, cb))
      c:close()
    end))

  it("closes stragglers at the deadline", async(function()
    local server, port = serve(function(stream)
      stream:read_until("never comes") -- busy, not idle
    end)
    local c = assert(iostream.connect("127.0.0.1", port))
    c:write("partial request")
    gen.sleep(0.05)
    local loop = ioloop.current()
    local t0 = loop:time()
    local clean, closed = server:close_gracefully(0.2)
    assert.is_false(clean)
    assert.equal(1, closed)
    assert.is_true(loop:time() - t0 >= 0.19)
    local r, err = c:read_until("\n")
    assert.is_nil(r)
    assert.equal("closed", err.kind)
    assert.equal(0, server:active_streams())
  end))

  it("examples/graceful.lua answers the request in flight on SIGTERM and exits 0",
    async(function()
      local sock, port = testing.bind_unused_port()
      sock:close()
      local wait, signal = helpers.start(("exec %s examples/graceful.lua %d")
        :format(q(helpers.squall_real), port))
      local c
      for _ = 1, 100 do
        c = iostream.connect("127.0.0.1", port)
        if c then break end
        gen.sleep(0.05)
      end
      assert(c, "the example did not start")
      c:write("GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
      gen.sleep(0.3)
      assert.is_true(signal("TERM"))
      local head = c:read_until("\r\n\r\n")
      assert.matches("^HTTP/1.1 200 OK", head)
      assert.equal("done /slow\n", c:read_bytes(tonumber(head:match("Content%-Length: (%d+)"))))
      local status, _, err = wait()
      assert.equal(0, status, err)
      assert.matches("draining 1 connection", err)
    end, { timeout = 30 }))
end)
