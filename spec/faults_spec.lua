-- Faults a hostile or unlucky production hits (issue 15): each spec
-- reproduces one, over real sockets or a real process. Signal races live in
-- process_spec.lua.
local ioloop = require "squall.ioloop"
local iostream = require "squall.iostream"
local gen = require "squall.gen"
local TCPServer = require "squall.tcpserver"
local testing = require "squall.testing"
local helpers = require "helpers"
local tmpscript = helpers.tmpscript

local async, pair, eventually = testing.async, helpers.stream_pair, helpers.eventually
local q, run = helpers.q, helpers.run
local MiB = 2 ^ 20

local function rss_kb(pid)
  local f = io.open("/proc/" .. pid .. "/status")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return tonumber(s:match("VmRSS:%s*(%d+)"))
end

-- Bytes the kernel holds for the server's sockets on `port` that it has
-- not read yet (the Recv-Q column of ss).
local function unread_by_server(port)
  local p = io.popen("ss -Htn state established '( sport = :" .. port .. " )'")
  local total = 0
  for line in p:lines() do total = total + (tonumber(line:match("^%s*(%d+)")) or 0) end
  p:close()
  return total
end

local free_port = helpers.free_port


describe("faults", function()
  it("a connection holding a few pending bytes costs at most 8 KB", async(function()
    -- 1,000 clients each send one byte of a line, then another: the
    -- server's reader waits for the newline. It used to reserve a whole
    -- read chunk per connection and double it (about 100 KB each).
    local port = free_port()
    local pidfile = os.tmpname()
    local wait, signal = helpers.start(("echo $$ >%s; exec %s examples/echo.lua %d"):format(
      q(pidfile), q(helpers.squall_real), port), 60)
    local pid = helpers.eventually_number(pidfile, "the server's pid")
    local N = 1000
    local clients = {}
    for i = 1, N do
      clients[i] = eventually(function() return (iostream.connect("127.0.0.1", port)) end,
        "a connection")
      if i == 1 then
        clients[1]:write("ping\n")
        assert.equal("ping\n", clients[1]:read_until("\n"))
      end
    end
    local before = rss_kb(pid)
    for _, c in ipairs(clients) do c:write("x") end
    for _, c in ipairs(clients) do assert(c:flush()) end
    eventually(function() return unread_by_server(port) == 0 end, "the server to read it all", 20)
    for _, c in ipairs(clients) do c:write("y") end
    for _, c in ipairs(clients) do assert(c:flush()) end
    eventually(function() return unread_by_server(port) == 0 end, "the server to read it all", 20)
    local per_conn = (rss_kb(pid) - before) / N
    -- still an echo server: the line completes
    clients[N]:write("\n")
    assert.equal("xy\n", clients[N]:read_until("\n"))
    for _, c in ipairs(clients) do c:close() end
    signal("TERM")
    wait()
    os.remove(pidfile)
    assert.is_true(per_conn <= 8, ("%.1f KB per connection"):format(per_conn))
  end, { timeout = 90 }))

  describe("read_until_pattern", function()
    -- Against string.find over the whole data, for chunkings a seeded
    -- generator picks: the search that resumes must find the same end.
    local PATTERNS = { "\r?\n\r?\n", "%d%d;", "^HEAD", "[%a_]+=%d", "x$", "(a)(b)c",
      "%d+;", "a.-z" }
    local function corpus(rng)
      local alphabet = { "a", "b", "c", "x", "z", "1", "2", ";", "\r", "\n", "=", "_", "HEAD" }
      local t = {}
      for i = 1, rng(20, 400) do t[i] = alphabet[rng(1, #alphabet)] end
      return table.concat(t)
    end

    it("finds what string.find finds, however the bytes are split", async(function()
      local seed = tonumber(os.getenv("SQUALL_FUZZ_SEED")) or 1234
      math.randomseed(seed)
      local rng = math.random
      local server, client = pair()
      for trial = 1, 150 do
        local pat = PATTERNS[(trial - 1) % #PATTERNS + 1]
        local data = corpus(rng) .. "\r\n\r\n12;HEAD a=1 xabc"
        local _, want = data:find(pat)
        local got
        local f = gen.spawn(function() got = server:read_until_pattern(pat, 4096) end)
        local i = 1
        while i <= #data and not f:done() do
          local n = rng(1, 9)
          client:write(data:sub(i, i + n - 1))
          client:flush()
          i = i + n
          eventually(function() return f:done() or server:reading() end, "the reader")
          gen.sleep(0) -- one loop iteration: the chunk arrives on its own
        end
        if want then
          f:result()
          assert.equal(data:sub(1, want), got, ("seed %d trial %d pattern %q"):format(seed,
            trial, pat))
          -- drain what the client sent past the match, to start clean
          local rest = #data:sub(want + 1, i - 1)
          if rest > 0 then assert.equal(rest, #server:read_bytes(rest)) end
        else
          -- no match ever: the anchored pattern; drop this stream pair
          server:close(); client:close()
          server, client = pair()
        end
      end
    end, { timeout = 60 }))

    it("reads a 4 MiB head in 1-byte-per-iteration tail chunks in linear time", async(function()
      -- 4 MiB arrive first, then the delimiter trickles in: each chunk
      -- searches only the new bytes (a rescan would take minutes here).
      local server, client = pair()
      local got
      local f = gen.spawn(function() got = server:read_until_pattern("\r\n\r\n") end)
      client:write(("h"):rep(4 * MiB))
      assert(client:flush())
      for _ = 1, 2000 do
        client:write("h")
        client:flush()
        gen.sleep(0)
      end
      client:write("\r\n\r\n")
      f:result()
      assert.equal(4 * MiB + 2000 + 4, #got)
    end, { timeout = 30 }))
  end)

  describe("close()", function()
    -- The handlers queue 32 MiB without waiting (write_high_water), for a
    -- client that reads nothing.
    local function server_with(handler)
      local sock, port = testing.bind_unused_port()
      local srv = TCPServer({ handle_stream = handler, write_high_water = 64 * MiB })
      srv:add_sockets({ sock })
      return srv, port
    end

    it("is bounded by the stream's timeout when the peer never reads", async(function()
      local closed = gen.Future()
      local srv, port = server_with(function(stream)
        stream:set_timeout(0.2)
        stream:set_close_callback(function() closed:set_result(stream.error) end)
        stream:write(("w"):rep(32 * MiB))
        stream:close()
      end)
      local c = assert(iostream.connect("127.0.0.1", port, { max_buffer_size = 65536 }))
      local err = closed:result()
      assert.equal("timeout", err.kind)
      srv:stop()
      c:close()
    end))

    it("a second close() drops what is queued and closes at once", async(function()
      local closed = gen.Future()
      local srv, port = server_with(function(stream)
        stream:set_close_callback(function() closed:set_result(true) end)
        stream:write(("w"):rep(32 * MiB))
        stream:close()
        assert.is_true(stream:writing())
        stream:close()
      end)
      local c = assert(iostream.connect("127.0.0.1", port, { max_buffer_size = 65536 }))
      assert.is_true(closed:result())
      srv:stop()
      c:close()
    end))

    it("close_gracefully's deadline drops a stream still flushing after its handler",
      async(function()
        local closed = gen.Future()
        local returned = gen.Future()
        local srv, port = server_with(function(stream)
          stream:set_close_callback(function() closed:set_result(true) end)
          stream:write(("w"):rep(32 * MiB))
          stream:close()
          returned:set_result()
        end)
        local c = assert(iostream.connect("127.0.0.1", port, { max_buffer_size = 65536 }))
        returned:result()
        local ok, n = srv:close_gracefully(0.2)
        assert.is_false(ok)
        assert.equal(1, n)
        assert.is_true(closed:result())
        c:close()
      end))

    it("bounds a TLS stream closed before the client's hello", async(function()
      local closed = gen.Future()
      local sock, port = testing.bind_unused_port()
      local srv = TCPServer({
        ssl_options = { certfile = helpers.certs .. "/server.pem",
          keyfile = helpers.certs .. "/server.key" },
        handle_stream = function(stream)
          stream:set_timeout(0.2)
          stream:set_close_callback(function() closed:set_result(true) end)
          stream:write("too early\n")
          stream:close()
        end })
      srv:add_sockets({ sock })
      -- a plain TCP client that never says hello
      local c = assert(iostream.connect("127.0.0.1", port))
      assert.is_true(closed:result())
      local rest, err = c:read_until_close()
      assert.equal("", rest or "", err and tostring(err))
      srv:stop()
    end))

    it("wakes a reader parked on the stream with nil, closed", async(function()
      local server = pair()
      local f = gen.spawn(function() return server:read_until("\n") end)
      assert.is_false(f:done())
      server:close()
      local r, err = f:result()
      assert.is_nil(r)
      assert.equal("closed", err.kind)
    end))
  end)

  it("an error value whose __tostring raises is logged, and the server goes on",
    async(function()
      local srv = TCPServer({ handle_stream = function(stream)
        if stream:read_until("\n") == "boom\n" then
          error(setmetatable({}, { __tostring = function(e) return "E" .. e.code end }))
        end
        stream:write("fine\n")
      end })
      local sock, port = testing.bind_unused_port()
      srv:add_sockets({ sock })
      local log = helpers.capture_log(function()
        local c = assert(iostream.connect("127.0.0.1", port))
        c:write("boom\n")
        assert.is_nil(c:read_until("\n"))
      end)
      assert.matches("__tostring failed", log)
      local c = assert(iostream.connect("127.0.0.1", port))
      c:write("ok\n")
      assert.equal("fine\n", c:read_until("\n"))
      srv:stop()
    end))

  it("huge timeouts never fire at once nor spin the loop", async(function()
    local server, client = pair()
    server:set_timeout(math.huge)
    local f = gen.spawn(function() return server:read_until("\n") end)
    server:set_timeout(1e17)
    local g = gen.spawn(function() return client:read_until("\n") end)
    local loop = ioloop.current()
    local t = loop:call_later(math.huge, function() error("fired") end)
    gen.spawn(function() gen.sleep(math.huge) end)
    -- the loop still sleeps in poll: a spinning one burns CPU
    local ffi = require "ffi"
    pcall(ffi.cdef, "struct squall_ts { long sec; long nsec; }; " ..
      "int clock_gettime(int, struct squall_ts *);")
    local ts = ffi.new("struct squall_ts")
    local CLOCK_PROCESS_CPUTIME_ID = 2
    local function cpu()
      ffi.C.clock_gettime(CLOCK_PROCESS_CPUTIME_ID, ts)
      return tonumber(ts.sec) + tonumber(ts.nsec) / 1e9
    end
    local c0, w0 = cpu(), loop:time()
    -- a window in which nothing may happen (scaled: valgrind is slower)
    gen.sleep(0.3 * helpers.scale)
    local used = (cpu() - c0) / (loop:time() - w0)
    assert.is_false(f:done())
    assert.is_false(g:done())
    assert.is_true(used < 0.5, ("the loop used %.0f%% of a CPU"):format(used * 100))
    client:write("done\n")
    assert.equal("done\n", f:result())
    server:write("back\n")
    assert.equal("back\n", g:result())
    loop:remove_timeout(t)
  end))

  it("run_sync says the loop was stopped when someone else stopped it", function()
    local loop = ioloop.new()
    local ok, err = pcall(loop.run_sync, loop, function()
      loop:stop()
      gen.sleep(10)
    end)
    loop:close(true)
    assert.is_false(ok)
    assert.matches("Event loop stopped before Future completed", err)
  end)

  it("a read inside coroutine.wrap raises, naming gen.spawn", async(function()
    local server, client = pair()
    local ok, err = pcall(coroutine.wrap(function() return server:read_until("\n") end))
    assert.is_false(ok)
    assert.matches("coroutine.wrap or coroutine.resume", err)
    assert.matches("gen.spawn", err)
    assert.is_false(server:reading())
    ok, err = pcall(coroutine.wrap(function() return gen.sleep(0.01) end))
    assert.is_false(ok)
    assert.matches("gen.spawn", err)
    -- the stream is unharmed: a proper read gets the data
    client:write("later\n")
    assert.equal("later\n", server:read_until("\n"))
  end))

  it("reload follows the real working directory, not $PWD", async(function()
    local dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir -p " .. q(dir)) == 0)
    local function put(name, text)
      local f = assert(io.open(dir .. "/" .. name, "w"))
      f:write(text)
      f:close()
    end
    put("greet.lua", "return { word = function() return 'one' end }\n")
    put("main.lua", [[
      local ioloop = require "squall.ioloop"
      local greet = require "greet"
      local loop = ioloop.current()
      local function poll()
        local f = io.open("word.out", "w"); f:write(greet.word()); f:close()
        loop:call_later(0.02, poll)
      end
      poll()
      loop:add_signal_handler("TERM", function() loop:stop() end)
      loop:start()
    ]])
    -- PWD names another directory, as a launcher that chdir()s leaves it
    local wait, signal = helpers.start(("cd %s && PWD=/ exec %s --reload main.lua"):format(
      q(dir), q(helpers.squall_real)), 30)
    local function word()
      local f = io.open(dir .. "/word.out")
      local w = f and f:read("*a")
      if f then f:close() end
      return w
    end
    eventually(function() return word() == "one" end, "the first word")
    put("greet.lua", "return { word = function() return 'two' end }\n")
    eventually(function() return word() == "two" end, "the reloaded word", 10)
    signal("TERM")
    local status, _, err = wait()
    os.execute("rm -rf " .. q(dir))
    assert.equal(0, status, err)
  end, { timeout = 30 }))

  it("a script with a syntax error and arguments reports the syntax error", function()
    local path = tmpscript("local x = = 1\n")
    local status, _, err = run(q(helpers.squall) .. " " .. q(path) .. " 8080")
    os.remove(path)
    assert.equal(1, status)
    assert.matches("unexpected symbol", err)
    assert.is_nil(err:find("squall: 8080", 1, true))
  end)
end)
