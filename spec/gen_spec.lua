local ioloop = require "squall.ioloop"
local gen = require "squall.gen"
local testing = require "squall.testing"
local helpers = require "helpers"

describe("squall.gen", function()
  describe("Future", function()
    it("is resolved from a timer and wakes a waiting coroutine", testing.async(function()
      local loop = ioloop.current()
      local f = gen.Future()
      local t0 = loop:time()
      loop:call_later(0.03, function() f:set_result("a", nil, 3) end)
      assert.is_false(f:done())
      local a, b, c = f:result()
      assert.is_true(f:done())
      assert.same({ "a", nil, 3 }, { a, b, c })
      assert.is_true(loop:time() - t0 >= 0.029)
    end))

    it("result() returns nil, err when it resolved with an error", testing.async(function()
      local f = gen.Future()
      ioloop.current():add_callback(function() f:set_error("boom") end)
      local r, err = f:result()
      assert.is_nil(r)
      assert.equal("boom", err)
      assert.equal("boom", f:error())
    end))

    it("calls done callbacks on the loop, with the future, also when already resolved",
      testing.async(function()
        local f = gen.Future()
        local seen = {}
        f:add_done_callback(function(x) seen[#seen + 1] = x end)
        f:set_result(1)
        assert.same({}, seen) -- not synchronously
        f:add_done_callback(function(x) seen[#seen + 1] = x end)
        gen.sleep(0)
        assert.same({ f, f }, seen)
      end))

    it("refuses to resolve twice", function()
      local f = gen.Future()
      f:set_result(1)
      assert.has_error(function() f:set_result(2) end, "the Future is already resolved")
      assert.has_error(function() f:set_error("x") end)
    end)

    it("result() of a pending future outside a coroutine raises", function()
      assert.has_error(function() gen.Future():result() end)
    end)
  end)

  describe("sleep", function()
    it("suspends for at least the given time", testing.async(function()
      local loop = ioloop.current()
      local t0 = loop:time()
      gen.sleep(0.05)
      assert.is_true(loop:time() - t0 >= 0.049)
    end))

    it("lets other coroutines run meanwhile", testing.async(function()
      local order = {}
      gen.spawn(function() gen.sleep(0.02); order[#order + 1] = "late" end)
      gen.spawn(function() gen.sleep(0.01); order[#order + 1] = "early" end)
      gen.sleep(0.05)
      assert.same({ "early", "late" }, order)
    end))

    it("raises on misuse", function()
      assert.has_error(function() gen.sleep("x") end)
      assert.has_error(function() gen.sleep(0.01) end) -- outside a coroutine
    end)
  end)

  describe("spawn", function()
    it("runs the function at once, until it first waits", testing.async(function()
      local steps = {}
      local f = gen.spawn(function(x)
        steps[#steps + 1] = x
        gen.sleep(0.01)
        steps[#steps + 1] = "after"
        return "r1", "r2"
      end, "before")
      assert.same({ "before" }, steps)
      assert.same({ "r1", "r2" }, { f:result() })
      assert.same({ "before", "after" }, steps)
    end))

    it("logs an error the coroutine raises, with its traceback", testing.async(function()
      local f
      local text = helpers.capture_log(function()
        f = gen.spawn(function() gen.sleep(0); error("spawned failure") end)
        f:result()
      end)
      assert.matches("spawned failure", text)
      assert.matches("stack traceback", text)
      local r, err = f:result()
      assert.is_nil(r)
      assert.matches("spawned failure", err)
    end))
  end)

  describe("with_timeout", function()
    it("returns the function's results when it finishes in time", testing.async(function()
      local a, b = gen.with_timeout(1, function(x) gen.sleep(0.01); return x, "y" end, "x")
      assert.same({ "x", "y" }, { a, b })
    end))

    it("returns nil and a timeout error when it does not", testing.async(function()
      local loop = ioloop.current()
      local t0 = loop:time()
      local r, err = gen.with_timeout(0.03, function() gen.sleep(5) end)
      assert.is_nil(r)
      assert.equal("timeout", err.kind)
      assert.matches("timed out", tostring(err))
      assert.is_true(loop:time() - t0 < 1)
    end))

    it("waits on a Future too", testing.async(function()
      local f = gen.Future()
      local r, err = gen.with_timeout(0.02, f)
      assert.is_nil(r)
      assert.equal("timeout", err.kind)
      ioloop.current():call_later(0.01, function() f:set_result(7) end)
      assert.equal(7, gen.with_timeout(1, f))
    end))

    it("raises again an error the function raised", testing.async(function()
      assert.has_error(function()
        gen.with_timeout(1, function() error("inner", 0) end)
      end, "inner")
    end))
  end)

  describe("multi", function()
    it("waits for all and keeps keys and order", testing.async(function()
      local loop = ioloop.current()
      local f = gen.Future()
      loop:call_later(0.02, function() f:set_result("fut") end)
      local t0 = loop:time()
      local r = gen.multi({
        function() gen.sleep(0.03); return "slow" end,
        function() return "fast" end,
        f,
      })
      assert.same({ "slow", "fast", "fut" }, r)
      assert.is_true(loop:time() - t0 >= 0.029)
      local named = gen.multi({ a = function() return 1 end, b = function() return 2 end })
      assert.same({ a = 1, b = 2 }, named)
    end))

    it("returns nil, err when a future resolved with an error", testing.async(function()
      local bad = gen.Future()
      bad:set_error("nope")
      local r, err = gen.multi({ function() return 1 end, bad })
      assert.is_nil(r)
      assert.equal("nope", err)
    end))

    it("of an empty table is an empty table", testing.async(function()
      assert.same({}, gen.multi({}))
    end))
  end)
end)
