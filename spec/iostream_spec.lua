local ioloop = require "squall.ioloop"
local iostream = require "squall.iostream"
local gen = require "squall.gen"
local testing = require "squall.testing"
local helpers = require "helpers"

local pair = helpers.stream_pair
local async, eventually = testing.async, helpers.eventually

describe("squall.iostream", function()
  describe("read_until", function()
    it("finds a delimiter split across many chunks", async(function()
      local server, client = pair()
      local got
      gen.spawn(function() got = server:read_until("\r\n\r\n") end)
      local msg = ("header: value\r\n"):rep(200) .. "\r\n"
      for i = 1, #msg, 7 do
        client:write(msg:sub(i, i + 6))
        client:flush()
        if i % 70 == 1 then gen.sleep(0) end
      end
      eventually(function() return got end, "the whole head")
      assert.equal(msg, got)
    end))

    it("returns several messages that arrived in one chunk, one per call", async(function()
      local server, client = pair()
      client:write("one\ntwo\nthree\npartial")
      client:flush()
      assert.equal("one\n", server:read_until("\n"))
      assert.equal("two\n", server:read_until("\n"))
      assert.equal("three\n", server:read_until("\n"))
      client:write(" line\n")
      assert.equal("partial line\n", server:read_until("\n"))
    end))

    it("closes with unsatisfiable when the delimiter lies beyond max_bytes", async(function()
      local server, client = pair()
      client:write(("x"):rep(100) .. "\n")
      local r, err = server:read_until("\n", 50)
      assert.is_nil(r)
      assert.equal("unsatisfiable", err.kind)
      assert.is_true(server:closed())
      assert.equal("unsatisfiable", server.error.kind)
    end))

    it("closes with unsatisfiable when max_bytes pass with no delimiter", async(function()
      local server, client = pair()
      local r, err
      local done = gen.spawn(function() r, err = server:read_until("\n", 1000) end)
      for _ = 1, 20 do client:write(("y"):rep(100)); client:flush(); gen.sleep(0.001) end
      done:result()
      assert.is_nil(r)
      assert.equal("unsatisfiable", err.kind)
      assert.is_true(server:closed())
      -- the client sees the close
      local data, cerr = client:read_until("\n")
      assert.is_nil(data)
      assert.equal("closed", cerr.kind)
    end))

    -- Lines already buffered take the FFI fast path (iostream.lua); these
    -- pin that it answers exactly as the C method does.
    it("answers from the buffer as a waiting read would: limits, EOF, our close", async(function()
      local server, client = pair()
      client:write("one\ntwo\n" .. ("z"):rep(40) .. "\nlast\n")
      client:close()
      eventually(function() return server:closed() end, "the peer's EOF")
      assert.equal("one\n", server:read_until("\n", 4))
      assert.equal("two\n", server:read_until("\n"))
      assert.equal("zz", server:read_bytes(2))
      local r, err = server:read_until("\n", 10)
      assert.is_nil(r)
      assert.equal("unsatisfiable", err.kind)

      local s2, c2 = pair()
      c2:write("a\nb\n")
      assert.equal("a\n", s2:read_until("\n"))
      s2:close()
      r, err = s2:read_until("\n")
      assert.is_nil(r)
      assert.equal("closed", err.kind)
      assert.is_nil(s2:write("x"))
    end))

    it("after the peer closed, returns what is buffered, then closed", async(function()
      local server, client = pair()
      client:write("x\ny\n")
      client:close()
      eventually(function() return server:closed() end, "the peer's EOF")
      assert.equal("x\n", server:read_until("\n"))
      assert.equal("y\n", server:read_until("\n"))
      local r, err = server:read_until("\n")
      assert.is_nil(r)
      assert.equal("closed", err.kind)
    end))

    it("a delimiter exactly at max_bytes is fine", async(function()
      local server, client = pair()
      client:write("abcd\n")
      assert.equal("abcd\n", server:read_until("\n", 5))
    end))
  end)

  it("read_until_pattern reads up to the end of the match", async(function()
    local server, client = pair()
    client:write("GET / HTTP/1.1\r\nHost: x\r\n\r\nBODY")
    assert.equal("GET / HTTP/1.1\r\nHost: x\r\n\r\n", server:read_until_pattern("\r?\n\r?\n"))
    assert.equal("BODY", server:read_bytes(4))
    client:write("12345;")
    assert.equal("12345;", server:read_until_pattern("%d+;"))
    assert.has_error(function() server:read_until_pattern("[") end)
  end))

  it("read_until_pattern fails a read whose search raises, instead of waiting", async(function()
    local server, client = pair()
    -- well-formed, but too complex for 300 bytes that match it
    local reading = gen.spawn(function()
      return server:read_until_pattern(string.rep("a?", 300) .. "b")
    end)
    client:write(string.rep("a", 300))
    local r, err = reading:result()
    assert.is_nil(r)
    assert.equal("unsatisfiable", err.kind)
    assert.matches("pattern search failed: pattern too complex", err.message, 1, true)
    assert.is_true(server:closed())
  end))

  it("read_until_pattern uses string.find as it was at load", async(function()
    local server, client = pair()
    local find = string.find
    string.find = function() error("replaced") end -- luacheck: ignore 122
    local ok, r = pcall(function()
      client:write("x;")
      return server:read_until_pattern("%a;")
    end)
    string.find = find -- luacheck: ignore 122
    assert.is_true(ok)
    assert.equal("x;", r)
  end))

  describe("read_bytes", function()
    it("waits for exactly n bytes", async(function()
      local server, client = pair()
      local got
      local f = gen.spawn(function() got = server:read_bytes(10) end)
      client:write("12345")
      client:flush()
      -- the five bytes are in the server's buffer, and the read still waits
      eventually(function() return server:get_read_buffer_size() == 5 end, "the 5 bytes")
      assert.is_nil(got)
      client:write("67890abc")
      f:result()
      assert.equal("1234567890", got)
      assert.equal("abc", server:read_bytes(3))
    end))

    it("with partial returns what has arrived, at most n", async(function()
      local server, client = pair()
      client:write("hello")
      local got = server:read_bytes(100, true)
      assert.equal("hello", got)
      client:write("0123456789")
      assert.equal("0123", server:read_bytes(4, true))
      assert.equal("456789", server:read_bytes(100, true))
    end))

    it("of zero bytes returns the empty string", async(function()
      local server = pair()
      assert.equal("", server:read_bytes(0))
    end))
  end)

  describe("read_until_close", function()
    it("returns everything once the peer closes", async(function()
      local server, client = pair()
      local data = ("0123456789"):rep(100000)
      client:write(data)
      client:close()
      local got = server:read_until_close()
      assert.equal(#data, #got)
      assert.equal(data, got)
      assert.is_true(server:closed())
    end))

    it("streams chunks to on_chunk and returns the empty string", async(function()
      local server, client = pair()
      local chunks = {}
      local f = gen.spawn(function()
        return server:read_until_close(function(c) chunks[#chunks + 1] = c end)
      end)
      for i = 1, 5 do client:write("part" .. i); client:flush(); gen.sleep(0.01) end
      client:close()
      assert.equal("", f:result())
      assert.equal("part1part2part3part4part5", table.concat(chunks))
      assert.is_true(#chunks >= 2)
    end))
  end)

  describe("closing", function()
    it("a pending read gets nil, closed when the peer closes", async(function()
      local server, client = pair()
      local r, err
      local f = gen.spawn(function() r, err = server:read_until("\n") end)
      client:write("no newline")
      client:close()
      f:result()
      assert.is_nil(r)
      assert.equal("closed", err.kind)
      assert.is_nil(server.error)
    end))

    it("reads buffered data after the peer closed, then reports closed", async(function()
      local server, client = pair()
      client:write("line1\nline2\n")
      client:close()
      eventually(function() return server:closed() end, "the server side to see the close")
      assert.equal("line1\n", server:read_until("\n"))
      assert.equal("line2\n", server:read_until("\n"))
      local r, err = server:read_until("\n")
      assert.is_nil(r)
      assert.equal("closed", err.kind)
    end))

    it("reads and writes after close() return nil, closed", async(function()
      local server, client = pair()
      client:write("data\n")
      gen.sleep(0.02)
      server:close()
      local r, err = server:read_until("\n")
      assert.is_nil(r)
      assert.equal("closed", err.kind)
      r, err = server:write("x")
      assert.is_nil(r)
      assert.equal("closed", err.kind)
      assert.equal("closed", select(2, server:read_bytes(1)).kind)
    end))

    it("runs the close callback exactly once, whoever closed it", async(function()
      local server, client = pair()
      local n_server, n_client = 0, 0
      server:set_close_callback(function() n_server = n_server + 1 end)
      client:set_close_callback(function() n_client = n_client + 1 end)
      client:close()
      client:close()
      eventually(function() return n_client == 1 and server:closed() end, "both to see it")
      server:close()
      eventually(function() return n_server == 1 end, "the server's callback")
      assert.equal(1, n_client)
      assert.equal(1, n_server)
      -- set on a stream closed already: called once, on a later iteration
      local late = 0
      server:set_close_callback(function() late = late + 1 end)
      assert.equal(0, late)
      eventually(function() return late == 1 end, "the late callback")
      gen.sleep(0.01) -- and only once
      assert.equal(1, late)
    end))

    it("write then close delivers every byte", async(function()
      local server, client = pair()
      local data = {}
      for i = 1, 2000 do data[i] = ("%07d|"):format(i) end
      local big = ("z"):rep(3 * 1024 * 1024)
      for i = 1, #data do server:write(data[i]) end
      server:write(big)
      server:close()
      assert.is_true(server:closed())
      local got = client:read_until_close()
      assert.equal(table.concat(data) .. big, got)
    end))

    it("is closed by the collector when nothing references it", async(function()
      -- keep only the client; the server side is dropped and collected
      local client = select(2, pair())
      for _ = 1, 3 do collectgarbage() ; gen.sleep(0.01) end
      local r, err = client:read_until("\n")
      assert.is_nil(r)
      assert.equal("closed", err.kind)
    end))
  end)

  describe("writes", function()
    it("16 MiB written in one call arrives intact", async(function()
      local server, client = pair()
      local parts = {}
      for i = 1, 16 * 1024 do parts[i] = ("."):rep(1023 - #tostring(i)) .. i .. "\n" end
      local data = table.concat(parts)
      assert.equal(16 * 1024 * 1024, #data)
      gen.spawn(function() assert(server:write(data)); server:close() end)
      local got = client:read_until_close()
      assert.equal(#data, #got)
      assert.is_true(got == data)
    end, { timeout = 20 }))

    it("100,000 small writes arrive intact and in order", async(function()
      local server, client = pair()
      gen.spawn(function()
        for i = 1, 100000 do server:write(i .. "\n") end
        server:close()
      end)
      local got = client:read_until_close()
      local i = 0
      for line in got:gmatch("([^\n]*)\n") do
        i = i + 1
        if tonumber(line) ~= i then error("line " .. i .. " is " .. line) end
      end
      assert.equal(100000, i)
    end, { timeout = 20 }))

    it("a writer whose peer vanishes mid-write gets nil, closed", async(function()
      local server, client = pair()
      local r, err
      local f = gen.spawn(function()
        for _ = 1, 64 do
          r, err = server:write(("v"):rep(1024 * 1024))
          if not r then return end
        end
      end)
      assert.equal(1000, #client:read_bytes(1000))
      client:close()
      f:result()
      assert.is_nil(r)
      assert.equal("closed", err.kind)
      assert.is_true(server:closed())
    end, { timeout = 10 }))

    it("accepts an array of strings", async(function()
      local server, client = pair()
      assert.is_true(server:write({ "a", "bc", "", "def\n" }))
      assert.equal("abcdef\n", client:read_until("\n"))
    end))

    it("write waits past write_high_water and flush waits for the kernel", async(function()
      -- The client buffers at most 1 MiB, so the bytes back up into the
      -- kernel and then into the server's queue.
      local server, client = pair({ write_high_water = 1024 }, { max_buffer_size = 1048576 })
      local big = ("w"):rep(32 * 1024 * 1024)
      local wrote = false
      gen.spawn(function() server:write(big); wrote = true end)
      -- the kernel took what it would (the queue shrank), and the peer
      -- reads nothing yet: the writer is still waiting
      eventually(function() return server:get_write_buffer_size() < #big end, "some progress")
      assert.is_false(wrote)
      assert.is_true(server:writing())
      local got = 0
      while got < #big do
        got = got + #assert(client:read_bytes(65536, true))
      end
      assert.equal(#big, got)
      eventually(function() return wrote end, "the writer to be woken")
      assert.is_true(server:flush())
      assert.is_false(server:writing())
    end, { timeout = 10 }))

    it("refuses a write past max_write_buffer_size with buffer_full, staying open",
      async(function()
        local server, client = pair({ max_write_buffer_size = 64 * 1024 * 1024 })
        local r, err = server:write(("q"):rep(65 * 1024 * 1024))
        assert.is_nil(r)
        assert.equal("buffer_full", err.kind)
        assert.is_false(server:closed())
        assert.is_true(server:write("still open\n"))
        assert.equal("still open\n", client:read_until("\n"))
      end))
  end)

  describe("buffers", function()
    it("closes with buffer_full when a read needs more than max_buffer_size",
      async(function()
        local server, client = pair({ max_buffer_size = 4096 })
        client:write(("b"):rep(10000) .. "\n")
        local r, err = server:read_until("\n")
        assert.is_nil(r)
        assert.equal("buffer_full", err.kind)
        assert.is_true(server:closed())
        assert.equal("buffer_full", server.error.kind)
      end))

    it("pauses reading while nobody reads, and loses nothing", async(function()
      local server, client = pair({ max_buffer_size = 8192 })
      local data = {}
      for i = 1, 20000 do data[i] = ("%05d\n"):format(i % 100000) end
      data = table.concat(data)
      gen.spawn(function() client:write(data); client:flush() end)
      -- the buffer filled and reading paused: far more waits in the socket
      eventually(function() return server:get_read_buffer_size() >= 8192 end, "a full buffer")
      assert.is_false(server:closed())
      local got = {}
      while #table.concat(got) < #data do
        got[#got + 1] = assert(server:read_until("\n"))
      end
      assert.equal(data, table.concat(got))
    end))
  end)

  it("refuses a second concurrent read with busy", async(function()
    local server, client = pair()
    local first
    local f = gen.spawn(function() first = server:read_until("\n") end)
    local r, err = server:read_bytes(1)
    assert.is_nil(r)
    assert.equal("busy", err.kind)
    assert.is_true(server:reading())
    assert.is_false(server:closed())
    client:write("ok\n")
    f:result()
    assert.equal("ok\n", first)
    assert.is_false(server:reading())
  end))

  it("times out a read with timeout and leaves the stream open", async(function()
    local server, client = pair()
    server:set_timeout(0.05)
    local loop = ioloop.current()
    local t0 = loop:time()
    local r, err = server:read_until("\n")
    assert.is_nil(r)
    assert.equal("timeout", err.kind)
    assert.is_true(loop:time() - t0 >= 0.045)
    assert.is_false(server:closed())
    client:write("late\n")
    assert.equal("late\n", server:read_until("\n"))
    server:set_timeout(nil)
  end))

  it("calls back with a function as the last argument", async(function()
    local server, client = pair()
    local f = gen.Future()
    server:read_until("\n", function(data, err) f:set_result(data, err) end)
    client:write("cb\n")
    assert.equal("cb\n", f:result())
    local g = gen.Future()
    client:write("buffered\n")
    gen.sleep(0.02)
    local sync = true
    server:read_bytes(3, function(data) g:set_result(data, sync) end)
    sync = false
    local data, was_sync = g:result()
    assert.equal("buf", data)
    assert.is_false(was_sync)
  end))

  it("raises at once when a read must wait outside a coroutine", async(function()
    local server = pair()
    -- A loop callback runs on the loop's own thread, not in a coroutine.
    local f = gen.Future()
    ioloop.current():add_callback(function()
      f:set_result(pcall(server.read_until, server, "\n"))
    end)
    local ok, err = f:result()
    assert.is_false(ok)
    assert.matches("read_until waits, so it must run inside a coroutine", err)
    assert.is_false(server:reading())
  end))

  it("reports addresses, fileno and nodelay", async(function()
    local server, client, port = pair()
    local host, p = client:getpeername()
    assert.equal("127.0.0.1", host)
    assert.equal(port, p)
    local shost, sport = server:getsockname()
    assert.equal("127.0.0.1", shost)
    assert.equal(port, sport)
    local _, cport = client:getsockname()
    assert.equal(cport, select(2, server:getpeername()))
    assert.is_true(server:fileno() > 2)
    assert.is_true(server:set_nodelay(true))
    assert.matches("squall.stream", tostring(server))
    assert.is_true(iostream.is_stream(server))
  end))
end)
