-- squall.redis against a real redis-server (Debian's), started on a free
-- port in a temporary folder for this file and stopped after it.
local gen = require "squall.gen"
local redis = require "squall.redis"
local testing = require "squall.testing"
local helpers = require "helpers"

local async, eventually, q = testing.async, helpers.eventually, helpers.q
local free_port = helpers.free_port

local start_redis, stop_redis = helpers.start_redis, helpers.stop_server

local function connect(srv, opts)
  opts = opts or {}
  opts.port = srv.port
  return helpers.serving(srv, function() return redis.connect(opts) end, "redis-server")
end

describe("squall.redis", function()
  local srv
  setup(function() srv = start_redis() end)
  teardown(async(function() stop_redis(srv) end))

  it("has a method for each of Redis' commands; any other name raises at the caller's line",
    async(function()
      local r = connect(srv)
      assert.is_table(r:client_list() and r:command_count() and { r:config_get("maxmemory") })
      local ok, err = pcall(function() return r:gett("k") end)
      assert.is_false(ok)
      assert.matches("redis_spec.lua:%d+: redis: no command gett", err)
      -- nothing was sent: the connection answers the next command in step
      assert.equal("PONG", r:ping())
      -- a pipeline's queue refuses the same way
      assert.has_error(function() r:pipeline(function(p) p:sett("a", 1) end) end)
      -- what the list does not know still goes through call
      local reply, rerr = r:call("GETT", "k")
      assert.is_nil(reply)
      assert.matches("unknown command", tostring(rerr))
      r:close()
    end))

  it("runs commands as methods; replies of every type", async(function()
    local r = connect(srv)
    assert.equal("OK", r:set("k", "v"))
    assert.equal("v", r:get("k"))
    assert.equal(redis.null, r:get("missing"))
    assert.equal(3, r:rpush("list", "a", 2, "c"))
    assert.same({ "a", "2", "c" }, r:lrange("list", 0, -1))
    assert.equal(1, r:call("HSET", "h", "f", 1))
    assert.equal("1", r:hget("h", "f"))
    assert.equal("PONG", r:ping())
    -- binary-safe, both ways
    local bin = "\0\r\n\255" .. ("x"):rep(100000) .. "\r\n"
    assert.equal("OK", r:set("bin", bin))
    assert.equal(bin, r:get("bin"))
    -- integers beyond 2^53 stay exact
    local big = r:incrby("big", "1152921504606846976") -- 2^60
    assert.equal("cdata", type(big))
    assert.is_true(big == 1152921504606846976LL)
    -- two-word commands: r:client_setname is CLIENT SETNAME
    assert.equal("OK", r:client_setname("squall-spec"))
    assert.equal("squall-spec", r:client_getname())
    r:close()
  end))

  it("gives an error reply as nil, err of kind redis, and stays usable", async(function()
    local r = connect(srv)
    r:set("s", "x")
    local v, err = r:lpush("s", "y")
    assert.is_nil(v)
    assert.equal("redis", err.kind)
    assert.matches("WRONGTYPE", tostring(err))
    assert.equal("x", r:get("s"))
    v, err = r:call("NOSUCHCOMMAND")
    assert.is_nil(v)
    assert.matches("unknown command", tostring(err))
    assert.equal("PONG", r:ping())
    r:close()
  end))

  it("pipelines in one round trip, errors in place", async(function()
    local r = connect(srv)
    r:del("n")
    local replies = assert(r:pipeline(function(p)
      p:incr("n")
      p:incr("n")
      p:call("GET", "n")
      p:lpush("n", "oops") -- wrong type: an error in its place
      p:get("n")
    end))
    assert.equal(5, #replies)
    assert.equal(1, replies[1]); assert.equal(2, replies[2]); assert.equal("2", replies[3])
    assert.is_true(redis.is_error(replies[4]))
    assert.matches("WRONGTYPE", replies[4].message)
    assert.equal("2", replies[5])
    r:close()
  end))

  it("runs MULTI/EXEC with error items in place", async(function()
    local r = connect(srv)
    r:set("t", "str")
    assert.equal("OK", r:multi())
    assert.equal("QUEUED", r:incr("counter"))
    assert.equal("QUEUED", r:incr("t")) -- fails at EXEC
    local res = assert(r:exec())
    assert.equal("number", type(res[1]))
    assert.is_true(redis.is_error(res[2]))
    -- a WATCHed key changed: EXEC gives redis.null
    local other = connect(srv)
    r:watch("w")
    r:multi()
    r:set("w", 1)
    other:set("w", 2)
    assert.equal(redis.null, r:exec())
    r:close(); other:close()
  end))

  it("delivers published messages; read_message times out and stays subscribed",
    async(function()
      local sub = connect(srv)
      local pub = connect(srv)
      local conf = assert(sub:subscribe("news", "sport"))
      assert.equal(2, #conf)
      assert.same({ "subscribe", "news", 1 }, conf[1])
      local msg, err = sub:read_message(0.1)
      assert.is_nil(msg)
      assert.equal("timeout", err.kind)
      assert.matches("no message came within 0.1 s", tostring(err))
      assert.equal(1, pub:publish("news", "hello"))
      msg = assert(sub:read_message(5))
      assert.same({ kind = "message", channel = "news", data = "hello" }, msg)
      assert(sub:psubscribe("s*"))
      pub:publish("sport", "goal")
      local a = assert(sub:read_message(5))
      local b = assert(sub:read_message(5))
      local kinds = { [a.kind] = a, [b.kind] = b }
      assert.equal("goal", kinds.message.data)
      assert.equal("s*", kinds.pmessage.pattern)
      assert.has_error(function() sub:get("x") end)
      sub:close(); pub:close()
    end))

  it("keeps messages published before a confirmation; unsubscribing all runs commands again",
    async(function()
      local sub = connect(srv)
      local pub = connect(srv)
      assert(sub:subscribe("a", "b"))
      assert(sub:psubscribe("p*"))
      assert.equal(1, pub:publish("a", "first"))
      -- the message waits in the stream before the next confirmation
      eventually(function() return sub.stream:get_read_buffer_size() > 0 end, "the message")
      local conf = assert(sub:subscribe("c"))
      assert.same({ { "subscribe", "c", 4 } }, conf)
      assert.same({ kind = "message", channel = "a", data = "first" }, sub:read_message(5))
      pub:publish("b", "second")
      eventually(function() return sub.stream:get_read_buffer_size() > 0 end, "the message")
      assert.same({ "pong", "" }, sub:call("PING"))
      assert.same({ kind = "message", channel = "b", data = "second" }, sub:read_message(5))
      -- no channel named: every channel the connection holds, in any order
      conf = assert(sub:unsubscribe())
      assert.equal(3, #conf)
      assert.equal(1, conf[3][3]) -- the pattern is left
      assert.has_error(function() sub:get("x") end)
      assert.same({ { "punsubscribe", "p*", 0 } }, sub:punsubscribe())
      assert.equal("OK", sub:set("after", "1"))
      sub:close(); pub:close()
    end))

  it("selects a database", async(function()
    local r0, r3 = connect(srv), connect(srv, { db = 3 })
    r3:set("where", "three")
    assert.equal(redis.null, r0:get("where"))
    assert.equal("three", r3:get("where"))
    r0:close(); r3:close()
  end))

  describe("a pool", function()
    it("queues callers in order while every connection is busy, then times out",
      async(function()
        local pool = redis.pool({ port = srv.port, size = 2, queue_timeout = 0.5 })
        -- open both connections first: which of two new ones is ready
        -- first is the server's business; the queue's order is ours
        gen.multi({ function() return pool:call("PING") end,
          function() return pool:call("PING") end })
        local order = {}
        local fs = {}
        for i = 1, 5 do
          fs[i] = gen.spawn(function()
            return pool:with(function(r)
              order[#order + 1] = i
              r:call("DEBUG", "SLEEP", "0.05")
              return i
            end)
          end)
        end
        for i = 1, 5 do assert.equal(i, fs[i]:result()) end
        assert.same({ 1, 2, 3, 4, 5 }, order)
        -- both held for longer than the queue timeout: the third caller gives up
        local hold = {}
        for i = 1, 2 do
          hold[i] = gen.spawn(function()
            return pool:with(function(r) return r:call("DEBUG", "SLEEP", "1") end)
          end)
        end
        -- both connections taken by the holders
        eventually(function()
          local open, idle = pool:counts()
          return open == 2 and idle == 0
        end, "the holders to take both connections")
        local v, err = pool:call("PING")
        assert.is_nil(v)
        assert.equal("timeout", err.kind)
        hold[1]:result(); hold[2]:result()
        assert.equal("PONG", pool:call("PING"))
        pool:close()
      end, { timeout = 10 }))

    it("closes a connection whose function raised, and never hands out a closed one",
      async(function()
        local pool = redis.pool({ port = srv.port, size = 1 })
        local ok = pcall(pool.with, pool, function(r)
          r:set("p", 1)
          error("application bug")
        end)
        assert.is_false(ok)
        assert.equal("1", pool:call("GET", "p"))
        pool:with(function(r) r.stream:abort() end) -- closed under the pool
        assert.equal("1", pool:call("GET", "p"))
        pool:close()
      end))

    it("refuses a connection given back twice, so no two callers share one", async(function()
      local pool = redis.pool({ port = srv.port, size = 2 })
      local r = assert(pool:acquire())
      pool:release(r)
      assert.matches("given back twice", helpers.raised(function() pool:release(r) end))
      local a, b = assert(pool:acquire()), assert(pool:acquire())
      assert.are_not.equal(a, b)
      assert.matches("not in use from this pool",
        helpers.raised(function() pool:release(connect(srv)) end))
      pool:release(a); pool:release(b)
      pool:close()
    end))

    it("raises at the caller's line for an unknown option", function()
      assert.matches("redis.pool: unknown option sise",
        helpers.raised(function() redis.pool({ sise = 4 }) end))
    end)
  end)

  it("fails a command that outlives the timeout, and a reply past max_buffer_size",
    async(function()
    local r = connect(srv, { timeout = 0.2 })
    local v, err = r:call("DEBUG", "SLEEP", "2")
    assert.is_nil(v); assert.equal("timeout", err.kind)
    assert.is_true(r:closed()) -- the reply would come later, out of turn
    local small = connect(srv, { max_buffer_size = 10000 })
    assert(small:del("many"))
    local items = {}
    for k = 1, 2000 do items[k] = "item" .. k end
    assert.equal(2000, small:rpush("many", unpack(items)))
    v, err = small:lrange("many", 0, -1)
    assert.is_nil(v); assert.equal("buffer_full", err.kind)
    assert.matches("max_buffer_size", tostring(err))
    assert.is_true(small:closed())
    local big = connect(srv, { max_buffer_size = 10000 })
    assert(big:set("big", ("x"):rep(20000)))
    v, err = big:get("big")
    assert.is_nil(v); assert.equal("buffer_full", err.kind)
  end))

  it("refuses a wrong password with kind redis", async(function()
    local locked = start_redis("--requirepass s3cret")
    local got = helpers.serving(locked, function()
      local c, e = redis.connect({ port = locked.port, password = "wrong" })
      if c or (e and e.kind == "redis") then return { c, e } end
      return nil, e
    end, "the locked server")
    local r, err = got[1], got[2]
    assert.is_nil(r)
    assert.equal("redis", err.kind)
    local ok = assert(redis.connect({ port = locked.port, password = "s3cret" }))
    assert.equal("PONG", ok:ping())
    ok:close()
    stop_redis(locked)
  end, { timeout = 20 }))

  it("fails cleanly when the server goes away mid-pipeline, and a pool recovers",
    async(function()
      local own = start_redis()
      local pool = redis.pool({ port = own.port, size = 2 })
      eventually(function() return pool:call("PING") == "PONG" end, "the server")
      local r = connect(own)
      local f = gen.spawn(function()
        return r:pipeline(function(p)
          p:call("DEBUG", "SLEEP", "0.5")
          p:ping()
        end)
      end)
      gen.sleep(0.1)
      own.signal("KILL")
      own.wait()
      local v, err = f:result()
      assert.is_nil(v)
      assert.equal("closed", err.kind)
      assert.is_true(r:closed())
      assert.is_nil((pool:call("PING")))
      -- the server comes back on the same port: the pool recovers by itself
      local back = { port = own.port, dir = helpers.tmpdir() }
      back.wait, back.signal = helpers.start(("cd %s && exec redis-server --port %d " ..
        "--bind 127.0.0.1 --save '' --appendonly no --enable-debug-command yes")
        :format(q(back.dir), own.port), 60)
      eventually(function() return pool:call("PING") == "PONG" end, "the pool to recover", 10)
      pool:close()
      stop_redis(back)
      os.execute("rm -rf " .. q(own.dir))
    end, { timeout = 30 }))

  it("connects over a unix socket (path)", async(function()
    local own = start_redis("--unixsocket redis.sock --unixsocketperm 700")
    local path = own.dir .. "/redis.sock"
    local r = helpers.serving(own, function() return redis.connect({ path = path }) end,
      "redis-server on a unix socket")
    assert.equal("OK", r:set("over", "unix"))
    assert.equal("unix", r:get("over"))
    r:close()
    local none, err = redis.connect({ path = own.dir .. "/nope.sock" })
    assert.is_nil(none)
    assert.is_string(err.kind)
    stop_redis(own)
  end, { timeout = 20 }))

  it("speaks TLS with ssl_options", async(function()
    local C = helpers.certs
    local tls_port = free_port()
    local own = start_redis(("--tls-port %d --tls-cert-file %s --tls-key-file %s " ..
      "--tls-ca-cert-file %s --tls-auth-clients no"):format(tls_port,
      q(helpers.absolute(C .. "/server.pem")), q(helpers.absolute(C .. "/server.key")),
      q(helpers.absolute(C .. "/ca.pem"))))
    local r = helpers.serving(own, function()
      return redis.connect({ port = tls_port, ssl_options = { ca_certs = C .. "/ca.pem" },
        server_hostname = "localhost" })
    end, "redis-server over TLS")
    assert.is_true(r.stream:uses_tls())
    assert.equal("OK", r:set("secure", "yes"))
    assert.equal("yes", r:get("secure"))
    r:close()
    stop_redis(own)
  end, { timeout = 20 }))

  it("parses RESP as a pure function", function()
    assert.equal("OK", redis.parse("+OK\r\n"))
    assert.equal(42, (redis.parse(":42\r\n")))
    assert.equal(redis.null, (redis.parse("$-1\r\n")))
    assert.same({ "a", 1, redis.null }, (redis.parse("*3\r\n$1\r\na\r\n:1\r\n$-1\r\n")))
    assert.is_nil(redis.parse("$5\r\nab"))   -- incomplete
    assert.is_nil(redis.parse("*2\r\n:1\r\n"))
    local v, err = redis.parse("?what\r\n")
    assert.is_nil(v)
    assert.equal("protocol", err.kind)
    assert.is_true(redis.is_error((redis.parse("-ERR no\r\n"))))
  end)
end)
