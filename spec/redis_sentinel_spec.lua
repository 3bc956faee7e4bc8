-- squall.redis.sentinel against real ones: a redis-server master with a
-- replica and three redis-sentinels (Debian's redis-sentinel) on free
-- loopback ports; failover by killing the master.
local redis = require "squall.redis"
local testing = require "squall.testing"
local helpers = require "helpers"

local async, eventually = testing.async, helpers.eventually

describe("squall.redis.sentinel", function()
  local g
  setup(async(function() g = helpers.start_redis_sentinel() end, { timeout = 60 }))
  teardown(async(function() if g then helpers.stop_redis_sentinel(g) end end))

  it("refuses bad options at the caller's line", function()
    local err = helpers.raised(function() redis.sentinel({ master = "m" }) end)
    assert.matches("sentinels must be a list", err)
    err = helpers.raised(function()
      redis.sentinel({ sentinels = { "127.0.0.1:1" }, master = "m", bogus = 1 })
    end)
    assert.matches("unknown option bogus", err)
  end)

  it("gives nil, err when no sentinel answers", async(function()
    local p, err = redis.sentinel({ sentinels = { "127.0.0.1:" .. helpers.free_port() },
      master = "mymaster" })
    assert.is_nil(p)
    assert.matches("no sentinel told where mymaster's master is", err.message)
  end))

  it("hands out connections to the master the sentinels name, replicas on request",
    async(function()
      local p = assert(redis.sentinel({ sentinels = g.addrs, master = g.name, size = 4 }))
      assert.equal(g.master.addr, p:address())
      assert.equal("OK", p:call("SET", "s:a", "1"))
      assert.equal("master", p:call("ROLE")[1])
      local rp = assert(redis.sentinel({ sentinels = g.addrs, master = g.name,
        role = "replica" }))
      assert.equal("slave", rp:call("ROLE")[1])
      eventually(function() return rp:call("GET", "s:a") == "1" end, "the replica to have it")
      local v, err = rp:call("SET", "s:b", "1")
      assert.is_nil(v)
      assert.matches("READONLY", err.message)
      rp:close()
      p:close()
    end))

  it("moves to the replica the sentinels promote when the master is killed mid-load",
    async(function()
      local p = assert(redis.sentinel({ sentinels = g.addrs, master = g.name, size = 4 }))
      local ok_n, failed, wrong, lost = 0, 0, 0, 0
      local i, killed, ok_after = 0, false, 0
      local gen = require "squall.gen"
      while ok_after < 100 do
        i = i + 1
        local k = "s:load:" .. i
        local v, err = p:call("SET", k, i)
        if v == "OK" then
          local got = p:call("GET", k)
          if got == tostring(i) then
            ok_n = ok_n + 1
            if killed then ok_after = ok_after + 1 end
          elseif got == redis.null then
            lost = lost + 1
          elseif got ~= nil then
            wrong = wrong + 1
          else
            failed = failed + 1
          end
        else
          assert.is_nil(v) -- every failure is nil, err with a kind
          assert.is_string(err.kind)
          failed = failed + 1
          gen.sleep(0.05)
        end
        if i == 200 then
          g.master.signal("KILL")
          g.master.wait()
          killed = true
        end
        assert.is_true(i < 5000, "the pool did not recover")
      end
      assert.equal(0, wrong)
      assert.equal(g.replica.addr, p:address())
      assert.equal("master", p:call("ROLE")[1])
      print(("\n    sentinel failover: %d commands ok, %d failed (nil, err), %d lost, 0 wrong")
        :format(ok_n, failed, lost))
      p:close()
    end, { timeout = 60 }))

  it("never hands out a connection to the old master once it is back as a replica",
    async(function()
      local p = assert(redis.sentinel({ sentinels = g.addrs, master = g.name, size = 4 }))
      -- the old master comes back; the sentinels make it a replica of the new
      -- one once they have seen it claim to be a master for a while (four
      -- publish periods, then its next INFO refresh: about 10-20 s, more on a
      -- loaded machine)
      g.restart(g.master)
      eventually(function()
        local r = redis.connect({ port = g.master.port })
        if not r then return false end
        local role = r:call("ROLE")
        r:close()
        return type(role) == "table" and role[1] == "slave"
      end, "the old master to be a replica", 50)
      for _ = 1, 40 do
        assert.equal("master", p:call("ROLE")[1])
        assert.equal("OK", p:call("SET", "s:after", "x"))
      end
      assert.equal(g.replica.addr, p:address())
      p:close()
    end, { timeout = 90 }))
end)
