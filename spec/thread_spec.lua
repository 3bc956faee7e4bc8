-- squall.thread: work in worker threads, each with its own Lua state,
-- while the loop goes on serving.
local gen = require "squall.gen"
local thread = require "squall.thread"
local testing = require "squall.testing"
local helpers = require "helpers"

local async = testing.async

-- Workers find spec/fixtures/lua/thread_work.lua through the paths the
-- program has when the pool is made.
package.path = "spec/fixtures/lua/?.lua;" .. package.path

describe("squall.thread", function()
  it("runs a function in a worker and returns its results", async(function()
    local pool = thread.pool({ size = 2 })
    local s = ("abc"):rep(1000)
    local want = 0
    for _ = 1, 3 do
      for i = 1, #s do want = (want * 31 + s:byte(i)) % 4294967296 end
    end
    assert.equal(want, pool:run("thread_work", "churn", s, 3))
    local a, b, c, d = pool:run("thread_work", "echo", 1, nil, "x", true)
    assert.equal(1, a); assert.is_nil(b); assert.equal("x", c); assert.is_true(d)
    assert.equal(4, pool:run("thread_work", "count", 1, nil, nil, 4))
    local t = pool:run("thread_work", "table", 5)
    assert.same({ name = "list", items = { 1, 4, 9, 16, 25 } }, t)
    pool:close()
  end))

  it("gives an error in the worker as nil, err of kind thread", async(function()
    local pool = thread.pool({ size = 1 })
    local v, err = pool:run("thread_work", "fail", "worker said no")
    assert.is_nil(v)
    assert.equal("thread", err.kind)
    assert.matches("worker said no", tostring(err))
    v, err = pool:run("no_such_module_here", "f")
    assert.is_nil(v)
    assert.matches("no_such_module_here", tostring(err))
    err = select(2, pool:run("thread_work", "nope"))
    assert.matches("thread_work.nope is not a function", tostring(err))
    err = select(2, pool:run("thread_work", "bad_result"))
    assert.matches("cannot be copied back", tostring(err))
    -- the worker is still there
    assert.equal("ok", pool:run("thread_work", "echo", "ok"))
    pool:close()
  end))

  it("refuses arguments that cannot be copied, at the caller's line", async(function()
    local pool = thread.pool({ size = 1 })
    local cyc = {}
    cyc.self = cyc
    for _, bad in ipairs({ print, cyc, coroutine.create(print) }) do
      local ok, err = pcall(pool.run, pool, "thread_work", "echo", bad)
      assert.is_false(ok)
      assert.matches("cannot be copied to a worker", err)
    end
    assert.has_error(function() thread.pool({ size = 0 }) end)
    pool:close()
  end))

  it("queues calls in order while every worker is busy", async(function()
    local pool = thread.pool({ size = 1 })
    local order = {}
    local fs = {}
    for i = 1, 4 do
      fs[i] = gen.spawn(function()
        local v = pool:run("thread_work", "echo", i)
        order[#order + 1] = v
        return v
      end)
    end
    for i = 1, 4 do assert.equal(i, fs[i]:result()) end
    assert.same({ 1, 2, 3, 4 }, order)
    pool:close()
  end))

  it("keeps the loop serving while workers compute", async(function()
    local pool = thread.pool({ size = 2 })
    local server, client = helpers.stream_pair()
    gen.spawn(function()
      while true do
        local line = server:read_until("\n")
        if not line then return end
        server:write(line)
      end
    end)
    local flag, started = os.tmpname(), os.tmpname()
    os.remove(flag)
    os.remove(started)
    local work = gen.spawn(function()
      return pool:run("thread_work", "spin_until", flag, started)
    end)
    helpers.eventually(function()
      local f = io.open(started)
      if f then f:close() end
      return f
    end, "the worker to start", 20)
    -- while a worker spins, echo round trips go on
    for _ = 1, 20 do
      client:write("ping\n")
      assert.equal("ping\n", client:read_until("\n"))
    end
    assert.is_false(work:done())
    helpers.spit(flag, "")
    assert.is_true(work:result())
    os.remove(flag)
    os.remove(started)
    client:close()
    pool:close()
  end, { timeout = 30 }))

  it("close() fails every running and queued call with closed, without waiting",
    async(function()
    local pool = thread.pool({ size = 1 })
    local flag, started = os.tmpname(), os.tmpname()
    os.remove(flag)
    os.remove(started)
    local calls = {
      gen.spawn(function() return pool:run("thread_work", "spin_until", flag, started) end),
    }
    helpers.eventually(function() return helpers.number_in(started) or io.open(started) end,
      "the worker to start", 20)
    for i = 2, 4 do
      calls[i] = gen.spawn(function() return pool:run("thread_work", "echo", i) end)
    end
    pool:close() -- the worker still spins: close must not wait for it
    for i = 1, 4 do
      local v, err = calls[i]:result()
      assert.is_nil(v)
      assert.equal("closed", err.kind)
      assert.matches("thread pool was closed", tostring(err))
    end
    local v, err = pool:run("thread_work", "echo", 5)
    assert.is_nil(v)
    assert.equal("closed", err.kind)
    pool:close() -- twice is harmless
    helpers.spit(flag, "") -- let the worker end
    os.remove(started)
  end, { timeout = 30 }))

  it("a worker that loads the main script as a module fails that call, saying why",
    async(function()
    -- app.lua calls thread.run on its own module: each worker would run its
    -- top level again, start a pool, and so on (1,059 threads in 3 s)
    local dir = helpers.tmpdir()
    helpers.spit(dir .. "/app.lua", [[
local ioloop = require "squall.ioloop"
local thread = require "squall.thread"
local M = {}
function M.fib(n) if n < 2 then return n end return M.fib(n - 1) + M.fib(n - 2) end
ioloop.current():run_sync(function()
  local v, err = thread.run("app", "fib", 20)
  print(v, err and err.kind, err)
end)
return M
]])
    helpers.spit(dir .. "/serve.lua", [[
local TCPServer = require "squall.tcpserver"
local M = {}
function M.f() return 1 end
TCPServer({ handle_stream = function() end }):listen(0, "127.0.0.1")
return M
]])
    helpers.spit(dir .. "/main.lua", [[
local ioloop = require "squall.ioloop"
local thread = require "squall.thread"
ioloop.current():run_sync(function()
  local v, err = thread.pool({ size = 2 }):run("serve", "f")
  print(v, err and err.kind, err)
end)
]])
    local status, out, err = helpers.spawn(("cd %s && timeout 30 %s app.lua")
      :format(helpers.q(dir), helpers.q(helpers.squall)))()
    assert.equal(0, status, err)
    assert.matches("^nil\tthread\t", out)
    -- (its run_sync is the first thing that cannot run there)
    assert.matches('IOLoop:start: not in a worker thread of squall.thread. It ran while ' ..
      'module "app" loaded for thread.run: is "app" the main script%?', out)
    status, out, err = helpers.spawn(("cd %s && timeout 30 %s main.lua")
      :format(helpers.q(dir), helpers.q(helpers.squall)))()
    assert.equal(0, status, err)
    assert.matches("netutil.bind_sockets: not in a worker thread", out)
    os.execute("rm -rf " .. helpers.q(dir))
  end, { timeout = 60 }))

  it("raises at the caller's line for an unknown option", function()
    assert.matches("thread.pool: unknown option sise",
      helpers.raised(function() thread.pool({ sise = 2 }) end))
  end)

  it("thread.run uses a default pool, one worker per CPU", async(function()
    assert.equal("hi", thread.run("thread_work", "echo", "hi"))
  end))
end)
