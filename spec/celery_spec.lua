-- squall.celery against a real redis-server and a real Celery worker
-- (Debian's python3-celery, spec/fixtures/celery/pytasks.py), both
-- started here on free ports, in both directions: Squall sends what
-- Python runs, Python sends what Squall runs, and results, failures,
-- retries and revokes cross both ways.
local celery = require "squall.celery"
local core = require "squall.core"
local json = require "squall.json"
local msgpack = require "squall.msgpack"
local redis = require "squall.redis"
local testing = require "squall.testing"
local helpers = require "helpers"

local async, eventually, q = testing.async, helpers.eventually, helpers.q
local TASKS = "spec/fixtures/celery/luatasks"
local VT = 4 -- the visibility timeout everywhere here, in seconds

describe("squall.celery", function()
  local srv, broker, py

  local function app(extra)
    local o = { broker = broker, backend = broker, visibility_timeout = VT }
    for k, v in pairs(extra or {}) do o[k] = v end
    return celery.new(o)
  end

  local function redis_conn()
    return assert(redis.connect({ port = srv.port }))
  end

  setup(async(function()
    srv = helpers.start_redis()
    broker = "redis://127.0.0.1:" .. srv.port .. "/0"
    eventually(function() return (redis.connect({ port = srv.port })) end, "redis-server", 30)
    py = helpers.start_celery(broker, { queues = "celery,py,shared", name = "py1", vt = VT })
  end, { timeout = 90 }))

  teardown(async(function()
    if py then
      py.signal("TERM")
      py.wait()
    end
    helpers.stop_server(srv)
  end, { timeout = 60 }))

  describe("a Squall producer and Python's worker", function()
    it("gets results with args and kwargs, in JSON and MessagePack", async(function()
      for _, serializer in ipairs({ "json", "msgpack" }) do
        local a = app({ serializer = serializer })
        local r = assert(a:send_task("py.add", { 2, 3 }, { z = 10 }))
        assert.matches("^%x+%-%x+%-4%x+%-[89ab]%x+%-%x+$", r.id)
        assert.equal(15, r:get(10))
        assert.equal("SUCCESS", r:state())
        local e = assert(a:send_task("py.echo", msgpack.array({ "é", nil, 2.5 }, 3),
          { big = 9007199254740993ULL, list = { 1, 2 } }))
        local v = assert(e:get(10))
        assert.same({ "é", json.null, 2.5 }, v.args)
        assert.same({ 1, 2 }, v.kwargs.list)
        a:close()
      end
    end, { timeout = 30 }))

    it("gets a Python failure as kind task: its type, message and traceback", async(function()
      local a = app()
      local r = assert(a:send_task("py.boom", { "lua asked" }))
      local v, err = r:get(10)
      assert.is_nil(v)
      assert.equal("task", err.kind)
      assert.equal("ValueError", err.remote.type)
      assert.equal("('lua asked', 42)", err.remote.message)
      assert.matches("Traceback", err.remote.traceback)
      assert.equal("FAILURE", r:state())
      a:close()
    end, { timeout = 30 }))

    it("holds a countdown task until due, and an expired one is REVOKED", async(function()
      local a = app()
      local t0 = core.wall_time()
      local r = assert(a:send_task("py.add", { 1, 1 }, nil, { countdown = 1 }))
      assert.equal("PENDING", r:state())
      assert.equal(2, r:get(10))
      assert.is_true(core.wall_time() - t0 >= 1)
      local x = assert(a:send_task("py.add", { 1, 1 }, nil, { expires = 0.2, countdown = 0.5 }))
      local v, err = x:get(10)
      assert.is_nil(v)
      assert.equal("revoked", err.kind)
      assert.equal("expired", err.remote.message)
      a:close()
    end, { timeout = 30 }))

    it("revokes: Python's worker skips the task", async(function()
      local a = app()
      local r = assert(a:send_task("py.add", { 1, 1 }, nil, { countdown = 1.5 }))
      assert.is_true(a:revoke(r.id))
      local v, err = r:get(10)
      assert.is_nil(v)
      assert.equal("revoked", err.kind)
      assert.equal("REVOKED", r:state())
      a:close()
    end, { timeout = 30 }))

    it("follows a Python task through its retries", async(function()
      local a = app()
      local r = assert(a:send_task("py.flaky", { 2 }))
      assert.equal(2, r:get(15))
      a:close()
    end, { timeout = 30 }))
  end)

  describe("Python's producer and a Squall worker", function()
    local a, worker
    -- the worker runs on the spec's own loop (each spec has a fresh one)
    local function with_worker(fn, opts)
      return async(function()
        a = app()
        worker = a:worker({ tasks = TASKS, queues = { "lua" }, name = "sq1@spec" })
        worker:start()
        fn()
        assert.is_true(worker:stop(5))
        a:close()
      end, opts)
    end

    local function call(name, args, kwargs, opts)
      return helpers.pycelery(broker, { "call", name, json.encode(args or {}),
        json.encode(msgpack.map(kwargs or {})), json.encode(msgpack.map(opts or
        { queue = "lua" })) })
    end

    it("runs Lua tasks for Python: args, kwargs and results, in JSON and MessagePack",
      with_worker(function()
      local out = call("lua.hello", { "py" }, { punct = "!" })
      assert.equal("hello py!", out.ok)
      assert.equal("SUCCESS", out.state)
      out = call("lua.add", { 2, 40 }, nil, { queue = "lua", serializer = "msgpack" })
      assert.equal(42, out.ok)
      out = call("lua.echo", { 1, json.null, "x" })
      assert.same({ 1, json.null, "x" }, out.ok)
      out = call("lua.current", { 7 })
      assert.equal("lua.current", out.ok.name)
      assert.equal(out.id, out.ok.id)
      assert.equal(0, out.ok.retries)
    end, { timeout = 60 }))

    it("gives Python a Lua failure, raised or returned, as an exception", with_worker(function()
      local out = call("lua.fail", { "kaput" })
      assert.equal("LuaError", out.error)
      assert.equal("kaput", out.message)
      assert.equal("FAILURE", out.state)
      out = call("lua.soft", { "soft no" })
      assert.equal("LuaError", out.error)
      assert.equal("soft no", out.message)
    end, { timeout = 60 }))

    it("holds countdown tasks, skips expired ones and obeys Python's revoke", with_worker(function()
      local out = call("lua.add", { 1, 2 }, nil, { queue = "lua", countdown = 1 })
      assert.equal(3, out.ok)
      out = call("lua.add", { 1, 2 }, nil, { queue = "lua", countdown = 0.5, expires = 0.2 })
      assert.equal("TaskRevokedError", out.error)
      assert.equal("expired", out.message)
      -- the countdown leaves the revoke time to arrive before the task is due,
      -- however loaded the machine (1 s ran out under 16 busy loops)
      out = helpers.pycelery(broker, { "revoke_then_get", "lua.add", "[1, 2]",
        '{"queue": "lua", "countdown": 4}' })
      assert.equal("TaskRevokedError", out.error)
      assert.equal("revoked", out.message)
      assert.equal("REVOKED", out.state)
      -- a revoke from Squall reaches its own worker as well
      local r = assert(a:send_task("lua.add", { 1, 2 }, nil, { queue = "lua", countdown = 4 }))
      assert(a:revoke(r.id))
      local v, err = r:get(30)
      assert.is_nil(v)
      assert.equal("revoked", err.kind)
    end, { timeout = 60 }))

    it("retries with celery.retry, and fails past max_retries", with_worker(function()
      local out = call("lua.flaky", { 2 })
      assert.equal(2, out.ok)
      out = call("lua.flaky", { 5 })
      assert.equal("MaxRetriesExceededError", out.error)
    end, { timeout = 60 }))

    it("counts tasks by name and state, their run time and queue wait, in squall.metrics",
      with_worker(function()
      local metrics = require "squall.metrics"
      local r = assert(a:send_task("lua.add", { 1, 2 }, nil, { queue = "lua" }))
      assert.equal(3, r:get(10))
      local f = assert(a:send_task("lua.fail", { "x" }, nil, { queue = "lua" }))
      assert.equal("task", select(2, f:get(10)).kind)
      local text = eventually(function()
        local t = metrics.text()
        return t:find('squall_celery_tasks_total{name="lua.fail",state="FAILURE"}', 1, true)
          and t
      end, "the failure counted")
      assert.matches('squall_celery_tasks_total{name="lua.add",state="SUCCESS"} %d', text)
      assert.matches('squall_celery_task_run_seconds_count{name="lua.add"} %d', text)
      assert.matches('squall_celery_task_queue_wait_seconds_count{name="lua.add"} %d', text)
    end, { timeout = 30 }))

    it("answers celery inspect ping, beside Python's worker", with_worker(function()
      local out = helpers.pycelery(broker, { "ping" })
      assert.same({ ok = "pong" }, out["sq1@spec"])
      local names = {}
      for name, reply in pairs(out) do
        names[#names + 1] = name
        assert.same({ ok = "pong" }, reply)
      end
      table.sort(names)
      assert.equal(2, #names, json.encode(out))
      assert.matches("^py1@", names[1])
    end, { timeout = 30 }))

    it("rejects a malformed message and an unregistered task, and goes on", with_worker(function()
      local r = redis_conn()
      local log = helpers.capture_log(function(so_far)
        -- in one write: the first comes by BRPOP, the others in a batch the
        -- take script records as unacked by their delivery tag
        assert(r:pipeline(function(p)
          p:lpush("lua", "this is not JSON")
          p:lpush("lua", json.encode({ headers = { id = "no-task-header" },
            properties = {}, body = "" }))
          p:lpush("lua", json.encode({ headers = { id = "bad-body", task = "lua.add" },
            properties = { body_encoding = "base64", delivery_tag = "bad-body-tag" },
            body = "@@@@", ["content-type"] = "application/json" }))
        end))
        eventually(function() return so_far():find("a body that is not base64") end,
          "the third message's rejection")
      end)
      assert.matches("rejecting a message from lua: celery: a message that is not JSON", log)
      assert.matches("not a protocol 2 task message", log)
      -- the id it named is a FAILURE in the backend
      local m = json.decode(eventually(function()
        local text = r:get("celery-task-meta-bad-body")
        return text ~= redis.null and text
      end, "the FAILURE stored"))
      assert.equal("FAILURE", m.status)
      assert.equal("InvalidTaskError", m.result.exc_type)
      -- and nothing rejected stays unacknowledged (it would come back)
      -- (within less than the visibility timeout: the restorer would hide it)
      eventually(function() return r:hlen("unacked") == 0 end, "no unacked message", VT / 2)
      r:close()
      local out = call("lua.nope", {})
      assert.equal("NotRegistered", out.error)
      out = call("lua.add", { 1, 1 })
      assert.equal(2, out.ok)
    end, { timeout = 60 }))
  end)

  describe("delivery", function()
    -- A Squall worker in a process of its own, for SIGKILL.
    local function squall_worker(queue, opts)
      local script = helpers.tmpscript(([[
        local celery = require "squall.celery"
        local gen = require "squall.gen"
        local ioloop = require "squall.ioloop"
        gen.spawn(function()
          local app = celery.new({ broker = %q, backend = %q, visibility_timeout = %d })
          app:worker({ tasks = %q, queues = { %q }, acks_late = %s, name = "killme@spec" })
            :start()
          io.stdout:write("started\n")
          io.stdout:flush()
        end)
        ioloop.current():start()
      ]]):format(broker, broker, VT, helpers.absolute(TASKS), queue,
        tostring(opts.acks_late)))
      local wait, signal = helpers.start("exec " .. q(helpers.squall_real) .. " " .. q(script),
        120)
      return wait, signal, script
    end

    local function unacked(r)
      return r:hlen("unacked")
    end

    it("a task held by a SIGKILLed Squall worker runs on Python's after the timeout",
      async(function()
      local r = redis_conn()
      local wait, signal, script = squall_worker("shared3", { acks_late = true })
      local a = app()
      local res = assert(a:send_task("shared.slow", { 1, "first" }, nil, { queue = "shared3" }))
      eventually(function() return unacked(r) > 0 end, "the Squall worker to take it", 20)
      signal("KILL")
      wait()
      os.remove(script)
      -- a worker killed while it restored holds kombu's restore mutex until
      -- it expires (300 s, as kombu's): not what this spec waits for
      r:del("unacked_mutex")
      -- once the unacked entry is older than the visibility timeout, a
      -- Python worker gives it back to the queue (kombu does it as it
      -- starts, then every 100 s: the one this file started may have done
      -- it already) and runs it
      eventually(function()
        local old = r:zrangebyscore("unacked_index", "-inf", core.wall_time() - VT)
        return #old > 0 or r:llen("shared3") > 0
      end, "the unacked entry to pass the visibility timeout", 20)
      local pyr = helpers.start_celery(broker, { queues = "shared3", name = "pyrestore",
        vt = VT })
      assert.equal("py:first", res:get(60))
      eventually(function() return unacked(r) == 0 end, "Python's worker to acknowledge it")
      pyr.signal("TERM")
      pyr.wait()
      r:close()
      a:close()
    end, { timeout = 120 }))

    it("and one held by a SIGKILLed Python worker runs on a Squall worker", async(function()
      local r = redis_conn()
      local pyk = helpers.start_celery(broker, { queues = "shared2", name = "pykill", vt = VT,
        acks_late = true })
      local a = app()
      local res = assert(a:send_task("shared.slow", { 3, "second" }, nil, { queue = "shared2" }))
      eventually(function() return pyk.log():find("Task shared.slow[" .. res.id ..
        "] received", 1, true) end, "Python's worker to take it", 20)
      pyk.signal("KILL")
      pyk.wait()
      r:del("unacked_mutex") -- as above: a killed restorer's mutex
      local worker = a:worker({ tasks = TASKS, queues = { "shared2" }, name = "sq2@spec" })
      worker:start()
      assert.equal("lua:second", res:get(60))
      assert.is_true(worker:stop(5))
      r:close()
      a:close()
    end, { timeout = 120 }))

    it("a worker waits out a Redis that went away, and loses no message", async(function()
      local own = helpers.start_redis()
      local url = "redis://127.0.0.1:" .. own.port .. "/0"
      eventually(function() return (redis.connect({ port = own.port })) end, "redis", 30)
      local a = celery.new({ broker = url, backend = url })
      local worker = a:worker({ tasks = TASKS, queues = { "lua" }, name = "sq3@spec" })
      local log = helpers.capture_log(function(current)
        worker:start()
        assert.equal(2, assert(a:send_task("lua.add", { 1, 1 }, nil, { queue = "lua" })):get(10))
        -- away, and back on the same port with its data
        local r = assert(redis.connect({ port = own.port }))
        r:call("SAVE")
        r:close()
        own.signal("KILL")
        own.wait()
        -- back only once the worker found it gone (under valgrind a slowed
        -- worker could otherwise find it back before it tried)
        eventually(function() return current():find("cannot reach the broker", 1, true) end,
          "the worker's warning", 30)
        local back = helpers.start_redis(nil, own.dir, own.port)
        eventually(function() return (redis.connect({ port = own.port })) end, "redis again", 30)
        local res = assert(a:send_task("lua.add", { 2, 2 }, nil, { queue = "lua" }))
        assert.equal(4, res:get(20))
        own.signal, own.wait = back.signal, back.wait
      end)
      assert.matches("cannot reach the broker", log)
      assert.matches("reached the broker again", log)
      assert.is_true(worker:stop(5))
      a:close()
      helpers.stop_server(own)
    end, { timeout = 90 }))

    it("get never takes another task's result from a connection used before",
      async(function()
      local a = app()
      local backend = require "squall.celery.backend"
      local pub = redis_conn()
      -- a subscriber connection that unsubscribed from task A's channel after
      -- a meta was published on it: the message waits in the connection
      a.backend.subscribers:with(function(r)
        assert(r:subscribe(backend.key("task-a")))
        pub:publish(backend.key("task-a"), '{"status": "SUCCESS", "result": "A"}')
        eventually(function() return r.stream:get_read_buffer_size() > 0 end, "the message")
        assert(r:unsubscribe(backend.key("task-a")))
      end)
      local v, err = a:result("task-b"):get(0.3)
      assert.is_nil(v)
      assert.equal("timeout", err.kind)
      pub:close()
      a:close()
    end))

    it("stop() gives held ETA tasks back to the queue", async(function()
      local a = app()
      local worker = a:worker({ tasks = TASKS, queues = { "later" }, name = "sq4@spec" })
      worker:start()
      local res = assert(a:send_task("lua.add", { 5, 5 }, nil, { queue = "later",
        countdown = 2 }))
      eventually(function() return select(2, worker:counts()) == 1 end, "the ETA task held")
      assert.is_true(worker:stop(5))
      local r = redis_conn()
      assert.equal(1, r:llen("later"))
      assert.equal(0, r:hlen("unacked"))
      -- a new worker runs it when due
      local again = a:worker({ tasks = TASKS, queues = { "later" }, name = "sq5@spec" })
      again:start()
      assert.equal(10, res:get(10))
      assert.is_true(again:stop(5))
      r:close()
      a:close()
    end, { timeout = 30 }))
  end)

  describe("the wire format, alone", function()
    local message = require "squall.celery.message"

    it("reads a message Python's Celery wrote, and writes one it reads", function()
      local raw = helpers.slurp("tests/fuzz/corpus/celery/python-countdown")
      local t = assert(message.parse_task(raw))
      assert.equal("py.add", t.name)
      assert.same({ 1, 2 }, t.args)
      assert.same({ z = 3 }, t.kwargs)
      assert.is_number(t.eta)
      assert.is_true(t.expires > t.eta)
      assert.equal("celery", t.routing_key)
      local m = assert(message.parse_task(helpers.slurp(
        "tests/fuzz/corpus/celery/python-msgpack")))
      assert.same({ "é", json.null, 2.5, { 1, { a = json.null } } }, m.args)
      -- Squall's, read by Python's own message code
      local ours = message.task({ id = "abc", name = "py.add", args = { 1, 2 },
        kwargs = { z = 3 }, eta = 1796466400.25, queue = "celery", serializer = "json",
        origin = "spec", sent = 1796466400 })
      local path = os.tmpname()
      helpers.spit(path, ours)
      local status, out, err = helpers.run(helpers.python .. " -c " .. q([[
import base64, json, sys
from datetime import datetime
m = json.load(open(sys.argv[1]))
args, kwargs, embed = json.loads(base64.b64decode(m['properties'] and m['body']))
print(m['headers']['task'], args, kwargs, sorted(embed), m['headers']['argsrepr'],
      datetime.fromisoformat(m['headers']['eta']).timestamp())
]]) .. " " .. path)
      os.remove(path)
      assert.equal(0, status, err)
      assert.equal("py.add [1, 2] {'z': 3} ['callbacks', 'chain', 'chord', 'errbacks'] " ..
        "(1, 2) 1796466400.25\n", out)
    end)

    it("refuses args that are not a list and kwargs that are not names", function()
      local function with_body(body, ctype)
        return json.encode({ body = message.base64(body), ["content-type"] = ctype,
          headers = { id = "x", task = "t" },
          properties = { body_encoding = "base64", delivery_tag = "d" } })
      end
      -- (the fuzzer found the first: a MessagePack map with an integer key)
      local t, err, id = message.parse_task(with_body(msgpack.encode({ msgpack.map({
        [122] = 3 }), msgpack.map({}), msgpack.map({}) }), "application/x-msgpack"))
      assert.is_nil(t)
      assert.matches("args that are not a list", tostring(err))
      assert.equal("x", id)
      t, err = message.parse_task(with_body('[[1], [1, 2], {}]', "application/json"))
      assert.is_nil(t)
      assert.matches("kwargs that are not a mapping", tostring(err))
      assert(message.parse_task(with_body('[[1, null], {"a": 1}, {}]', "application/json")))
    end)

    it("writes and reads times, UUIDs, base64 and Python's repr", function()
      assert.equal("2026-12-05T10:06:07.965545+00:00", message.isoformat(1796465167.965545))
      assert.equal("2000-02-29T00:00:00", message.isoformat(951782400, true))
      assert.equal(951782400.5, message.parse_time("2000-02-29T00:00:00.5"))
      assert.equal(951782400, message.parse_time("2000-02-29T01:00:00+01:00"))
      assert.equal(951782400, message.parse_time("2000-02-29T00:00:00Z"))
      assert.is_nil(message.parse_time("2000-13-01T00:00:00"))
      assert.is_nil(message.parse_time("yesterday"))
      local seen = {}
      for _ = 1, 100 do
        local id = message.uuid()
        assert.matches("^%x%x%x%x%x%x%x%x%-%x%x%x%x%-4%x%x%x%-[89ab]%x%x%x%-%x+$", id)
        assert.is_nil(seen[id])
        seen[id] = true
      end
      for _, s in ipairs({ "", "f", "fo", "foo", "\0\255\1" }) do
        assert.equal(s, message.unbase64(message.base64(s)))
      end
      assert.is_nil(message.unbase64("abc"))
      assert.is_nil(message.unbase64("@@@@"))
      assert.equal("('bad', 42)", message.exception_text({ "bad", 42 }))
      assert.equal("x", message.exception_text({ "x" }))
      assert.equal([=[[1, "it\\'s", "it's", True, None, 2.5]]=],
        message.py_repr({ 1, "it\\'s", "it's", true, json.null, 2.5 }))
    end)
  end)

  it("raises at the caller's line for misuse", function()
    local raised = helpers.raised
    assert.matches("broker .* is required", raised(function() celery.new({}) end))
    assert.matches("unknown option brokr", raised(function()
      celery.new({ broker = "redis://x", brokr = 1 }) end))
    assert.matches("is not a redis://", raised(function() celery.new({ broker = "amqp://x" }) end))
    assert.matches("serializer must be", raised(function()
      celery.new({ broker = "redis://x", serializer = "pickle" }) end))
    local a = celery.new({ broker = "redis://127.0.0.1:1" })
    assert.matches("unknown option countdwn", raised(function()
      a:send_task("t", {}, nil, { countdwn = 1 }) end))
    assert.matches("the app has no backend", raised(function() a:result("x"):get(1) end))
    assert.matches("unknown option concurency", raised(function()
      a:worker({ concurency = 2 }) end))
    assert.matches("not inside a task", raised(function() celery.retry() end))
  end)
end)
