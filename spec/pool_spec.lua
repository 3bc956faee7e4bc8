-- squall.pool on its own, with real connections (streams to a listener of
-- this spec): what redis.pool and mysql.pool are built on.
local gen = require "squall.gen"
local pool = require "squall.pool"
local testing = require "squall.testing"
local helpers = require "helpers"

local async = testing.async

-- A pool whose connections are the client ends of real stream pairs; the
-- server ends are kept in `peers` so a spec can close one from the far side.
local function stream_pool(opts)
  local peers, made = {}, 0
  opts = opts or {}
  opts.connect = function()
    local server, client = helpers.stream_pair()
    made = made + 1
    peers[client] = server
    return client
  end
  return pool.new(opts), peers, function() return made end
end

describe("squall.pool", function()
  it("lends an idle connection again, and opens at most size", async(function()
    local p, _, made = stream_pool({ size = 2 })
    local a = assert(p:acquire())
    p:release(a)
    assert.equal(a, p:acquire()) -- the idle one, not a new one
    local b = assert(p:acquire())
    assert.are_not.equal(a, b)
    assert.equal(2, made())
    assert.same({ 2, 0 }, { p:counts() })
    p:release(a)
    p:release(b)
    assert.same({ 2, 2 }, { p:counts() })
    p:close()
    assert.same({ 0, 0 }, { p:counts() })
    assert.is_true(a:closed() and b:closed())
  end))

  it("queues callers in arrival order once size are lent, then times them out",
    async(function()
      local p = stream_pool({ size = 1, queue_timeout = 5 })
      local held = assert(p:acquire())
      local order = {}
      local first = gen.spawn(function()
        local c = assert(p:acquire()); order[#order + 1] = "first"; p:release(c)
      end)
      local second = gen.spawn(function()
        local c = assert(p:acquire()); order[#order + 1] = "second"; p:release(c)
      end)
      p:release(held)
      first:result()
      second:result()
      assert.same({ "first", "second" }, order)
      -- nobody gives one back: the wait ends with kind timeout
      local short = stream_pool({ size = 1, queue_timeout = 0.05 })
      local only = assert(short:acquire())
      local none, err = short:acquire()
      assert.is_nil(none)
      assert.equal("timeout", err.kind)
      short:release(only)
    end))

  it("never lends a connection its peer closed, and connects anew", async(function()
    local p, peers, made = stream_pool({ size = 1 })
    local a = assert(p:acquire())
    p:release(a)
    peers[a]:close()
    helpers.eventually(function() return a:closed() end, "the peer's close")
    local b = assert(p:acquire())
    assert.are_not.equal(a, b)
    assert.is_false(b:closed())
    assert.equal(2, made())
  end))

  it("resets on release with reset, and drops what reset refuses or discard names",
    async(function()
      local resets = 0
      local p = stream_pool({ size = 2, reset = function()
        resets = resets + 1
        return resets == 1 or nil, "refused" -- the second reset fails
      end })
      local a = assert(p:acquire())
      p:release(a, "reset")
      assert.is_false(a:closed())
      a = assert(p:acquire())
      p:release(a, "reset") -- refused: closed, not kept
      assert.is_true(a:closed())
      assert.same({ 0, 0 }, { p:counts() })
      local b = assert(p:acquire())
      p:release(b, "discard")
      assert.is_true(b:closed())
      assert.equal(2, resets)
    end))

  it("refuses a connection given back twice, and closes one whose user raised",
    async(function()
      local p = stream_pool({ size = 1 })
      local a = assert(p:acquire())
      p:release(a)
      assert.has_error(function() p:release(a) end,
        "release: this connection is not in use from this pool (given back twice?)")
      local used
      local ok, err = pcall(p.with, p, function(c) used = c; error("boom") end)
      assert.is_false(ok)
      assert.matches("boom", tostring(err))
      assert.is_true(used:closed())
      assert.equal("x", p:with(function() return "x" end))
    end))
end)
