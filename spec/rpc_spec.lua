-- squall.rpc over real sockets, against itself and Python's msgpack.
local gen = require "squall.gen"
local iostream = require "squall.iostream"
local msgpack = require "squall.msgpack"
local rpc = require "squall.rpc"
local testing = require "squall.testing"
local helpers = require "helpers"
local tmpdir, put = helpers.tmpdir, helpers.spit

local async, eventually, q = testing.async, helpers.eventually, helpers.q
local PY = "/usr/bin/python3"

local function serve(opts, routes)
  local server = rpc.Server(opts)
  for name, fn in pairs(routes or {}) do server:route(name, fn) end
  local sock, port = testing.bind_unused_port()
  server:add_sockets({ sock })
  return server, port
end



describe("squall.rpc", function()
  it("calls, with nil arguments in place and errors as values", async(function()
    local server, port = serve(nil, {
      sum = function(_, a, b) return a + b end,
      args = function(_, ...)
        return msgpack.array({ select("#", ...), ... }, select("#", ...) + 1)
      end,
      nothing = function() end,
      fail = function() return nil, { code = 7, why = "no" } end,
      boom = function() error("kaboom") end,
    })
    local c = assert(rpc.connect("127.0.0.1", port))
    assert.equal(3, c:call("sum", 1, 2))
    local got = c:call("args", 1, nil, "x", nil)
    assert.equal(4, got[1])
    assert.equal(1, got[2]); assert.equal(msgpack.null, got[3]); assert.equal("x", got[4])
    assert.equal(msgpack.null, got[5])
    got = c:call("args", nil, 2)
    assert.equal(2, got[1]); assert.equal(msgpack.null, got[2]); assert.equal(2, got[3])
    local r, err = c:call("nothing")
    assert.is_nil(r); assert.is_nil(err)
    r, err = c:call("fail")
    assert.is_nil(r)
    assert.equal("remote", err.kind)
    assert.same({ code = 7, why = "no" }, err.remote)
    local log = helpers.capture_log(function()
      err = select(2, c:call("boom"))
    end)
    assert.equal("internal error", err.remote)
    assert.matches("boom raised: .*kaboom", log)
    assert.matches("stack traceback", log)
    err = select(2, c:call("nope"))
    assert.equal("no such method: nope", err.remote)
    assert.equal(3, c:call("sum", 1, 2)) -- still usable
    -- many parameters (past what is spread without a table), nils kept
    local many = {}
    for i = 1, 100 do many[i] = i end
    many[50] = nil
    got = c:call("args", unpack(many, 1, 100))
    assert.equal(100, got[1]); assert.equal(49, got[50]); assert.equal(msgpack.null, got[51])
    assert.equal(100, got[101])
    c:close()
    server:stop()
  end))

  it("runs many calls at once on one connection; answers come as they finish",
    async(function()
      -- twenty calls wait together on the server; released last to
      -- first, each answer reaches its caller before the next is released
      local gates, running = {}, 0
      for i = 1, 20 do gates[i] = gen.Future() end
      local server, port = serve(nil, {
        wait = function(_, tag)
          running = running + 1
          return gates[tag]:result()
        end,
      })
      local c = assert(rpc.connect("127.0.0.1", port))
      local answered, calls = {}, {}
      for i = 1, 20 do
        calls[i] = function()
          local got = c:call("wait", i)
          answered[#answered + 1] = got
          return got
        end
      end
      local all = gen.spawn(function() return gen.multi(calls) end)
      eventually(function() return running == 20 end, "twenty calls running at once")
      for i = 20, 1, -1 do
        gates[i]:set_result(i)
        eventually(function() return answered[21 - i] == i end, "the answer to " .. i)
      end
      local results = all:result()
      for i = 1, 20 do assert.equal(i, results[i]) end
      c:close()
      server:stop()
    end))

  it("passes each call exactly its arguments, trailing nils counted", async(function()
    local server, port = serve(nil, { count = function(_, ...)
      return msgpack.array({ select("#", ...), ... }, select("#", ...) + 1)
    end })
    local c = assert(rpc.connect("127.0.0.1", port))
    -- up to 8 arguments decoded by the compiled reader, 9 to 64 by the C
    -- one, spread; past that in one table
    for _, n in ipairs({ 0, 1, 2, 3, 7, 8, 9, 10, 64, 65, 70 }) do
      local args = {}
      for i = 1, n do args[i] = (i % 3 ~= 0) and i or nil end
      local got = assert(c:call("count", unpack(args, 1, n)))
      assert.equal(n, got[1])
      for i = 1, n do
        assert.equal(args[i] == nil and msgpack.null or args[i], got[i + 1])
      end
    end
    c:close()
    server:stop()
  end))

  it("runs requests on the coroutine that read them; one that waits hands the reading on",
    async(function()
      -- 300 requests in one write, each waiting: every one starts before
      -- any answers, the fast ones behind them answer first, and the
      -- connection's own coroutine, kept by the first, ends with it
      local release = gen.Future()
      local started = 0
      local server, port = serve({ max_pending = 1000 }, {
        hold = function(_, i)
          started = started + 1
          release:result()
          if i % 50 == 0 then error("raised after waiting") end
          return i
        end,
        now = function(_, i) return -i end,
      })
      local s = assert(iostream.connect("127.0.0.1", port))
      local out = {}
      for i = 1, 300 do out[#out + 1] = msgpack.encode({ 0, i, "hold", { i } }) end
      for i = 1, 3 do out[#out + 1] = msgpack.encode({ 0, 1000 + i, "now", { i } }) end
      s:write(table.concat(out))
      local u = msgpack.unpacker()
      local answers = {}
      local function read_answers(n)
        while #answers < n do
          local msg = u:next()
          if msg then
            answers[#answers + 1] = msg
          else
            u:feed(assert(s:read_bytes(65536, true)))
          end
        end
      end
      read_answers(3)
      assert.equal(300, started)
      for i = 1, 3 do assert.same({ 1, 1000 + i, msgpack.null, -i }, answers[i]) end
      local log = helpers.capture_log(function()
        release:set_result(true)
        read_answers(303)
      end)
      local by_id = {}
      for i = 4, 303 do by_id[answers[i][2]] = answers[i] end
      for i = 1, 300 do
        if i % 50 == 0 then
          assert.equal("internal error", by_id[i][3])
        else
          assert.equal(i, by_id[i][4])
        end
      end
      assert.matches("raised after waiting", log)
      s:close()
      eventually(function() return server:active_streams() == 0 end, "handle_stream returned")
      server:stop()
    end))

  it("lets the server call the client while serving its request", async(function()
    local server, port = serve(nil, {
      quad = function(conn, x) return 2 * assert(conn:call("twice", x)) end,
    })
    local c = assert(rpc.connect("127.0.0.1", port, {
      routes = { twice = function(_, x) return 2 * x end } }))
    assert.equal(20, c:call("quad", 5))
    local notified = gen.Future()
    server:route("poke", function(conn)
      conn:notify("poked", conn.id)
      return true
    end)
    local c2 = assert(rpc.connect("127.0.0.1", port, {
      routes = { poked = function(_, id) notified:set_result(id) end } }))
    assert.is_true(c2:call("poke"))
    assert.is_number(notified:result())
    c:close(); c2:close()
    server:stop()
  end))

  it("times a call out, drops the late answer and stays usable", async(function()
    local server, port = serve(nil, {
      slow = function() gen.sleep(0.3); return "late" end,
      fast = function() return "fast" end,
    })
    local c = assert(rpc.connect("127.0.0.1", port, { call_timeout = 0.1 }))
    local r, err = c:call("slow")
    assert.is_nil(r)
    assert.equal("timeout", err.kind)
    local log = helpers.capture_log(function() gen.sleep(0.4) end)
    assert.equal("", log) -- the late answer is dropped quietly
    assert.equal("fast", c:call("fast"))
    c:close()
    server:stop()
  end))

  it("collects methods from a handler folder", async(function()
    local dir = tmpdir()
    put(dir .. "/player.lua",
      "return { login = function(conn, uid) conn.data.uid = uid; return 'hi ' .. uid end }")
    put(dir .. "/game/board.lua",
      "return { size = function() return 8 end, note = 'not a function' }")
    put(dir .. "/_private.lua", "return { secret = function() return 1 end }")
    put(dir .. "/_lib/x.lua", "return { y = function() return 1 end }")
    put(dir .. "/broken.lua", "return { f = function() end") -- a syntax error
    local server, port
    local log = helpers.capture_log(function() server, port = serve({ handlers = dir }) end)
    assert.matches("cannot load handler file [^\n]*/broken.lua, so it has no methods yet", log)
    assert.same({ "game.board.size", "player.login" }, server:methods())
    local c = assert(rpc.connect("127.0.0.1", port))
    assert.equal("hi ann", c:call("player.login", "ann"))
    assert.equal(8, c:call("game.board.size"))
    assert.equal("ann", server:find("uid", "ann").data.uid)
    c:close()
    server:stop()
    os.execute("rm -rf " .. q(dir))
    assert.has_error(function() rpc.Server({ handlers = dir .. "/missing" }) end)
  end))

  it("reloads handler files: new code, new files, broken files keep the old, no drop",
    async(function()
      local dir = tmpdir()
      -- slow marks that it started (a file), then waits to be released
      put(dir .. "/handlers/calc.lua", "return { f = function() return 1 end, " ..
        "slow = function() io.open('started', 'w'):close(); " ..
        "while not os.rename('release', 'release') do require('squall.gen').sleep(0.01) end; " ..
        "return 'old' end }")
      put(dir .. "/server.lua", [[
        local rpc = require "squall.rpc"
        local server = rpc.Server({ handlers = "handlers" })
        local sock = require("squall.netutil").bind_sockets(0, "127.0.0.1")
        server:add_sockets(sock)
        local f = io.open("port.tmp", "w"); f:write(select(2, sock[1]:getsockname())); f:close()
        os.rename("port.tmp", "port")
        local loop = require("squall.ioloop").current()
        loop:add_signal_handler("TERM", function() loop:stop() end)
        loop:start()
      ]])
      local wait, signal = helpers.start(("cd %s && exec %s --reload server.lua"):format(q(dir),
        q(helpers.squall_real)), 60)
      local port = helpers.eventually_number(dir .. "/port", "the server's port")
      local c = assert(rpc.connect("127.0.0.1", port))
      assert.equal(1, c:call("calc.f"))
      local inflight = gen.spawn(function() return c:call("calc.slow") end)
      eventually(function() return os.rename(dir .. "/started", dir .. "/started") end,
        "the slow call to start")
      put(dir .. "/handlers/calc.lua", "return { f = function() return 2 end, " ..
        "slow = function() return 'new' end }")
      eventually(function() return c:call("calc.f") == 2 end, "the edited code", 10)
      put(dir .. "/release", "")
      assert.equal("old", inflight:result()) -- finished with the code it started with
      put(dir .. "/handlers/more.lua", "return { g = function() return 'g' end }")
      eventually(function() return c:call("more.g") == "g" end, "the new file", 10)
      put(dir .. "/handlers/calc.lua", "return { f = function() return 3 end\n  oops }")
      -- reloads run in order: once a file written after it is seen, so was it
      put(dir .. "/handlers/probe.lua", "return { p = function() return 'p' end }")
      eventually(function() return c:call("probe.p") == "p" end, "the probe file", 10)
      assert.equal(2, c:call("calc.f")) -- the broken file kept the old methods
      assert.is_false(c:closed())
      c:close()
      signal("TERM")
      local status, _, err = wait()
      os.execute("rm -rf " .. q(dir))
      assert.equal(0, status, err)
      assert.matches("cannot load handler file handlers/calc.lua, keeping its old methods: " ..
        "handlers/calc.lua:2:", err)
    end, { timeout = 60 }))

  describe("bad input", function()
    local function raw(port, bytes)
      local s = assert(iostream.connect("127.0.0.1", port))
      s:write(bytes)
      return s
    end

    it("closes a connection that breaks the format; the server goes on", async(function()
      local server, port = serve({ max_message_size = 1000 },
        { sum = function(_, a, b) return a + b end })
      local cases = {
        "\193",                                        -- not MessagePack
        msgpack.encode({ 9, 1, 2 }),                   -- not an RPC message
        msgpack.encode({ 0, "id", "sum", { 1, 2 } }),   -- a request with a bad msgid
        msgpack.encode("just a string"),
        msgpack.encode({ 0, 1, "sum", { ("x"):rep(2000) } }), -- past max_message_size
      }
      local log = helpers.capture_log(function()
        for _, bytes in ipairs(cases) do
          local s = raw(port, bytes)
          local rest, err = s:read_until_close()
          assert.equal("", rest or "", err and tostring(err))
        end
      end)
      assert.matches("closing connection", log)
      assert.matches("larger than max_size", log)
      local c = assert(rpc.connect("127.0.0.1", port))
      assert.equal(5, c:call("sum", 2, 3))
      c:close()
      server:stop()
    end))

    it("closes a request whose params are a map, at once, and serves everyone else",
      async(function()
      -- keys 1, 2, 4, ... 2^29 once made the server loop to a border near
      -- 2^30: three such 319-byte requests froze every client for 18 s
      local server, port = serve(nil, { sum = function(_, a, b) return a + b end })
      local keys = {}
      for k = 0, 59 do keys[2 ^ (k % 30) + math.floor(k / 30)] = k end
      local bytes = msgpack.encode({ 0, 1, "m", msgpack.map(keys) })
      local other = assert(rpc.connect("127.0.0.1", port))
      local log = helpers.capture_log(function()
        local hostile = {}
        for i = 1, 3 do hostile[i] = raw(port, bytes) end
        for i = 1, 3 do
          local rest = hostile[i]:read_until_close()
          assert.equal("", rest or "") -- nothing answered: closed
        end
        assert.equal(5, other:call("sum", 2, 3))
      end)
      assert.matches("the params of m are not an array", log)
      other:close()
      server:stop()
    end))

    it("answers a request with more parameters than a call takes; the close path runs",
      async(function()
      local closed = gen.Future()
      local server, port = serve(nil, { count = function(_, ...) return select("#", ...) end })
      local c = assert(rpc.connect("127.0.0.1", port))
      local many = {}
      for i = 1, 9000 do many[i] = i end
      local r, err = c:call("count", unpack(many, 1, 7000))
      assert.equal(7000, r, err and tostring(err))
      -- 9000 parameters: an error answer, the connection goes on
      local s = raw(port, msgpack.encode({ 0, 1, "count", many }) ..
        msgpack.encode({ 0, 2, "count", { 1, 2 } }))
      local u = msgpack.unpacker()
      local got = {}
      while #got < 2 do
        u:feed(assert(s:read_bytes(4096, true)))
        local msg = u:next()
        while msg do
          got[#got + 1] = msg
          msg = u:next()
        end
      end
      assert.equal(1, got[1][2])
      assert.matches("too many parameters for count: 9000", got[1][3])
      assert.same({ 1, 2, msgpack.null, 2 }, got[2])
      local conns = {}
      for conn in server:connections() do conns[#conns + 1] = conn end
      assert.equal(2, #conns)
      server.on_close = function(conn)
        if not closed:done() then closed:set_result(conn.id) end
      end
      s:close()
      closed:result()
      c:close()
      eventually(function() return server:connections()() == nil end, "no connection left")
      server:stop()
    end))

    it("logs a response to an unknown msgid and keeps the connection", async(function()
      local server, port = serve(nil, { sum = function(_, a, b) return a + b end })
      local s
      local log = helpers.capture_log(function()
        s = raw(port, msgpack.encode({ 1, 4242, msgpack.null, "?" }) ..
          msgpack.encode({ 0, 1, "sum", { 1, 1 } }))
        local u = msgpack.unpacker()
        while true do
          u:feed(assert(s:read_bytes(100, true)))
          local msg = u:next()
          if msg then
            assert.same({ 1, 1, msgpack.null, 2 }, msg)
            break
          end
        end
      end)
      assert.matches("unknown msgid 4242", log)
      s:close()
      server:stop()
    end))

    it("survives a client that vanishes mid-call", async(function()
      local finished = gen.Future()
      local server, port = serve(nil, {
        slow = function() gen.sleep(0.2); finished:set_result(true); return "done" end,
        ok = function() return "ok" end,
      })
      local s = raw(port, msgpack.encode({ 0, 1, "slow", {} }))
      s:close()
      assert.is_true(finished:result())
      local c = assert(rpc.connect("127.0.0.1", port))
      assert.equal("ok", c:call("ok"))
      c:close()
      server:stop()
    end))

    it("fails pending calls with closed when the server goes away", async(function()
      local server, port = serve(nil, { hang = function() gen.sleep(10) end })
      local c = assert(rpc.connect("127.0.0.1", port))
      local f = gen.spawn(function() return c:call("hang") end)
      eventually(function() return server:active_streams() == 1 end, "the connection")
      for conn in server:connections() do conn.stream:abort() end
      local r, err = f:result()
      assert.is_nil(r)
      assert.equal("closed", err.kind)
      server:stop()
    end))
  end)

  it("stops reading past max_pending requests running (backpressure)", async(function()
    local running, peak = 0, 0
    local server, port = serve({ max_pending = 3 }, {
      work = function()
        running = running + 1
        peak = math.max(peak, running)
        gen.sleep(0.05)
        running = running - 1
        return true
      end,
    })
    local c = assert(rpc.connect("127.0.0.1", port))
    local calls = {}
    for i = 1, 12 do calls[i] = function() return c:call("work") end end
    local results = gen.multi(calls)
    for i = 1, 12 do assert.is_true(results[i]) end
    assert.equal(3, peak)
    c:close()
    server:stop()
  end))

  it("notices a client that goes away while its connection is paused at max_pending",
    async(function()
    local release = gen.Future()
    local closed = gen.Future()
    local started = 0
    local server, port = serve({ max_pending = 2 }, {
      hold = function()
        started = started + 1
        release:result()
        return true
      end,
    })
    server.on_close = function(conn) closed:set_result(conn.id) end
    local s = assert(iostream.connect("127.0.0.1", port))
    for i = 1, 5 do s:write(msgpack.encode({ 0, i, "hold", {} })) end
    eventually(function() return started == 2 end, "two requests running")
    s:close()
    -- the handlers still wait; the server sees the client gone all the same
    assert.is_number(closed:result())
    assert.is_nil(server:connections()())
    assert.equal(2, started)
    release:set_result(true)
    server:stop()
  end))

  it("speaks TLS with ssl_options", async(function()
    local C = helpers.certs
    local server, port = serve({ ssl_options = { certfile = C .. "/server.pem",
      keyfile = C .. "/server.key" } }, { sum = function(_, a, b) return a + b end })
    local c = assert(rpc.connect("127.0.0.1", port, { ssl_options = { ca_certs = C .. "/ca.pem" },
      server_hostname = "localhost" }))
    assert.is_true(c.stream:uses_tls())
    assert.equal(7, c:call("sum", 3, 4))
    c:close()
    server:stop()
  end))

  it("close_gracefully closes idle connections at once and waits for calls in flight",
    async(function()
      local started = gen.Future()
      local server, port = serve(nil, { slow = function()
        started:set_result()
        gen.sleep(0.3)
        return "done"
      end })
      local idle = assert(rpc.connect("127.0.0.1", port))
      local busy = assert(rpc.connect("127.0.0.1", port))
      local f = gen.spawn(function() return busy:call("slow") end)
      eventually(function() return server:active_streams() == 2 end, "both connections")
      started:result()
      local clean, n = server:close_gracefully(5)
      assert.is_true(clean, tostring(n))
      assert.equal("done", f:result())
      assert.is_true(idle:closed() or select(2, idle:call("slow")).kind == "closed")
    end))

  describe("with Neovim", function()
    -- Neovim speaks MessagePack-RPC on any channel: rpcrequest() calls us,
    -- and while it waits it answers our calls to its API (nvim_eval).
    local nvim = io.popen("command -v nvim"):read("*l")

    it("answers Neovim's rpcrequest, calling Neovim back while it waits", async(function()
      assert.is_truthy(nvim, "nvim is not installed (scripts/install-deps installs neovim)")
      local server, port = serve(nil, {
        sum = function(_, a, b) return a + b end,
        ask = function(conn, expr) return assert(conn:call("nvim_eval", expr)) end,
        echo = function(_, ...)
          return msgpack.array({ ... }, select("#", ...))
        end,
      })
      local dir = tmpdir()
      put(dir .. "/script.vim", table.concat({
        ("let ch = sockconnect('tcp', '127.0.0.1:%d', {'rpc': v:true})"):format(port),
        "let r = [rpcrequest(ch, 'sum', 1, 2), rpcrequest(ch, 'ask', '6*7')]",
        "call add(r, rpcrequest(ch, 'echo', 'h\195\169', 2.5, v:null, [1, 2], {'k': v:true}))",
        "try", "  call rpcrequest(ch, 'nope')", "catch", "  call add(r, v:exception)", "endtry",
        "call writefile([json_encode(r)], 'out.json')",
        "qa!",
      }, "\n") .. "\n")
      local wait = helpers.spawn(("cd %s && timeout 20 %s --headless -u NONE -i NONE -n " ..
        "-S script.vim"):format(q(dir), nvim))
      local status, _, err = wait()
      assert.equal(0, status, err)
      local got = require("cjson").decode(helpers.slurp(dir .. "/out.json"))
      assert.equal(3, got[1])
      assert.equal(42, got[2])
      local echoed = got[3]
      assert.equal("h\195\169", echoed[1]); assert.equal(2.5, echoed[2])
      assert.equal(require("cjson").null, echoed[3])
      assert.same({ 1, 2 }, echoed[4]); assert.same({ k = true }, echoed[5])
      assert.matches("no such method: nope", got[4])
      server:stop()
    end, { timeout = 30 }))
  end)

  describe("with Python's msgpack", function()
    it("serves a Python client (examples/rpc/client.py), calling it back by uid",
      async(function()
        local server, port = serve({ handlers = "examples/rpc/handlers" })
        local me = assert(rpc.connect("127.0.0.1", port, { routes = {
          on_whisper = function(_, from, text) return "lua got " .. from .. ": " .. text end,
        } }))
        assert.equal("welcome, lua", me:call("player.login", "lua"))
        local wait = helpers.spawn(("cd examples/rpc && timeout 20 %s client.py %d py lua")
          :format(PY, port))
        local status, out, err = wait()
        assert.equal(0, status, err)
        assert.equal("welcome, py\n[1, 2]\nlua got py: hi from Python\nonline: lua, py\n", out)
        me:close()
        server:stop()
      end, { timeout = 30 }))

    it("calls a Python server, which calls back", async(function()
      local out = os.tmpname()
      local wait = helpers.spawn(("timeout 20 %s spec/fixtures/rpc_peer.py >%s"):format(PY, q(out)))
      local port = helpers.eventually_number(out, "the Python server's port")
      local c = assert(rpc.connect("127.0.0.1", port, {
        routes = { twice = function(_, x) return 2 * x end } }))
      assert.equal(5, c:call("sum", 2, 3))
      assert.equal(21, c:call("ask", 10))
      local r, err = c:call("fail")
      assert.is_nil(r)
      assert.equal("nope", err.remote)
      c:notify("bye")
      assert.equal(0, (wait()))
      os.remove(out)
    end, { timeout = 30 }))
  end)
end)
