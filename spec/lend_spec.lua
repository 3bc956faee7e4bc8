-- squall.lend (runtime/coro.c's lending): a call run on a lent coroutine
-- that waits keeps it, and what carries on the coroutine's own work runs
-- at once, before the resume that ran it returns.
local core = require "squall.core"
local gen = require "squall.gen"
local lend = require "squall.lend"
local testing = require "squall.testing"
local helpers = require "helpers"

local async = testing.async
local create = coroutine.create

describe("squall.lend", function()
  it("hands a kept coroutine's work on at once, with the keeper's arguments", async(function()
    local fut = gen.Future()
    local log = {}
    local co
    co = create(function()
      lend.keeper(co, function(kept, arg)
        log[#log + 1] = ("kept %s by %s"):format(arg, kept == co and "co" or "?")
        return create(function(x, y) log[#log + 1] = "carried " .. x .. y end), "o", "n"
      end, "work")
      lend.lend(1)
      local v = fut:result() -- waits: the call keeps co
      lend.lend(0)
      log[#log + 1] = "resumed with " .. v
    end)
    core.resume(co)
    assert.same({ "kept work by co", "carried on" }, log)
    fut:set_result("result")
    helpers.eventually(function() return #log == 3 end, "co resumed")
    assert.equal("resumed with result", log[3])
  end))

  it("carries on a chain of kept calls in a loop, not on the C stack", async(function()
    -- 1000 workers in a row, each kept as soon as it starts: recursion
    -- would pass LuaJIT's limit of nested C calls (200)
    local release = gen.Future()
    local started, finished = 0, 0
    local function worker(n)
      local me = coroutine.running()
      started = started + 1
      if n < 1000 then
        lend.keeper(me, function(_, k) return create(worker), k + 1 end, n)
      end
      lend.lend(1)
      release:result()
      lend.lend(0)
      finished = finished + 1
    end
    core.resume(create(worker), 1)
    assert.equal(1000, started)
    assert.equal(0, finished)
    release:set_result(true)
    helpers.eventually(function() return finished == 1000 end, "every worker finished")
  end))

  it("does nothing for a wait outside the lent call, or inside a coroutine it resumed",
    async(function()
      local kept = 0
      local wait = gen.Future()
      local inner_waits = gen.Future()
      local co
      co = create(function()
        lend.keeper(co, function() kept = kept + 1 end)
        lend.lend(1)
        -- a coroutine resumed from the lent call starts unlent: its wait
        -- keeps nothing of ours
        core.resume(create(function() inner_waits:result() end))
        lend.lend(0)
        wait:result() -- not lent any more
      end)
      core.resume(co)
      assert.equal(0, kept)
      inner_waits:set_result(true)
      wait:set_result(true)
      gen.sleep(0) -- both ran on; still nothing kept
      assert.equal(0, kept)
      lend.keeper(co, nil)
    end))

  it("reports a carry_on that raises, and the kept call still goes on", async(function()
    local fut = gen.Future()
    local done = false
    local co
    co = create(function()
      lend.keeper(co, function() error("no successor") end)
      lend.lend(1)
      fut:result()
      lend.lend(0)
      done = true
    end)
    local log = helpers.capture_log(function() core.resume(co) end)
    assert.matches("on_kept hook", log)
    assert.matches("no successor", log)
    fut:set_result(true)
    helpers.eventually(function() return done end, "the kept call finished")
  end))
end)
