-- squall.redis.cluster against a real Redis Cluster: six redis-servers
-- (3 masters, 3 replicas) on free loopback ports, joined by
-- `redis-cli --cluster create`, resharded by `redis-cli --cluster reshard`
-- and failed over by killing a master.
local gen = require "squall.gen"
local redis = require "squall.redis"
local cluster = require "squall.redis.cluster"
local testing = require "squall.testing"
local helpers = require "helpers"

local async, eventually = testing.async, helpers.eventually

-- A direct connection to one node.
local function node(addr)
  local host, port = addr:match("^(.+):(%d+)$")
  return assert(redis.connect({ host = host, port = tonumber(port) }))
end

-- The masters and replicas as node `addr` sees them: { [master] =
-- { first, last, replicas = {...} } }.
local function shards(addr)
  local r = node(addr)
  local slots = assert(r:call("CLUSTER", "SLOTS"))
  r:close()
  local out = {}
  for _, range in ipairs(slots) do
    local m = range[3][1] .. ":" .. range[3][2]
    local s = out[m] or { ranges = {}, replicas = {} }
    out[m] = s
    s.ranges[#s.ranges + 1] = { range[1], range[2] }
    for i = 4, #range do s.replicas[#s.replicas + 1] = range[i][1] .. ":" .. range[i][2] end
  end
  return out
end

-- How many times `addr` ran `cmd` (INFO commandstats).
local function calls(addr, cmd)
  local r = node(addr)
  local info = assert(r:call("INFO", "commandstats"))
  r:close()
  return tonumber(info:match("cmdstat_" .. cmd .. ":calls=(%d+)")) or 0
end

describe("squall.redis.cluster", function()
  local c0
  setup(async(function() c0 = helpers.start_redis_cluster() end, { timeout = 90 }))
  teardown(async(function() if c0 then helpers.stop_redis_cluster(c0) end end))

  it("hashes keys and hash tags to slots as Redis does", async(function()
    local r = node(c0.nodes[1])
    for _, k in ipairs({ "foo", "bar", "user:{42}:name", "{user1000}.following", "a{}b",
      "{}{x}", "", "\0\255", ("x"):rep(300) }) do
      assert.equal(r:call("CLUSTER", "KEYSLOT", k), cluster.slot(k), k)
    end
    r:close()
  end))

  it("sends each command to the master of its key's slot", async(function()
    local c = assert(redis.cluster({ nodes = { c0.nodes[1] } }))
    for i = 1, 200 do assert.equal("OK", c:set("key:" .. i, "v" .. i)) end
    -- each key is on the node the server says holds its slot
    local r1 = node(c0.nodes[1])
    for i = 1, 200, 7 do
      local k = "key:" .. i
      local owner = helpers.cluster_master_of(c0.servers[1].port, cluster.slot(k))
      local direct = node(owner)
      assert.equal("v" .. i, direct:get(k))
      direct:close()
      assert.equal("v" .. i, c:get(k))
    end
    r1:close()
    -- keys in one slot go together; across slots, a clear error
    assert.equal("OK", c:mset("{u7}:a", 1, "{u7}:b", 2))
    assert.same({ "1", "2" }, c:mget("{u7}:a", "{u7}:b"))
    local v, err = c:mset("a", 1, "b", 2)
    assert.is_nil(v)
    assert.equal("redis", err.kind)
    assert.matches("CROSSSLOT", err.message)
    -- keys found where COMMAND says they are: EVAL's after numkeys
    assert.equal("v3", c:eval("return redis.call('GET', KEYS[1])", 1, "key:3"))
    -- commands without keys go to a master
    assert.equal("PONG", c:ping())
    c:close()
  end))

  it("splits a pipeline per node and puts the replies back in order", async(function()
    local c = assert(redis.cluster({ nodes = c0.nodes, pool = { size = 2 } }))
    local replies = c:pipeline(function(p)
      for i = 1, 60 do p:set("p:" .. i, i) end
      for i = 1, 60 do p:get("p:" .. i) end
      p:incr("p:1")
      p:lpush("p:2", "x") -- a string, not a list: an error in its place
      p:mget("a", "b") -- CROSSSLOT, in its place
    end)
    assert.equal(123, #replies)
    for i = 1, 60 do assert.equal("OK", replies[i]) end
    for i = 1, 60 do assert.equal(tostring(i), replies[60 + i]) end
    assert.equal(2, replies[121])
    assert.is_true(redis.is_error(replies[122]))
    assert.matches("WRONGTYPE", replies[122].message)
    assert.is_true(redis.is_error(replies[123]))
    assert.matches("CROSSSLOT", replies[123].message)
    -- and made without a function
    local p = c:pipeline()
    p:set("{q}x", "1")
    p:get("{q}x")
    assert.same({ "OK", "1" }, p:execute())
    c:close()
  end))

  it("runs MULTI/EXEC on the node of its slot", async(function()
    local c = assert(redis.cluster({ nodes = c0.nodes }))
    local res = assert(c:transaction(function(t)
      t:set("{tx}n", 10)
      t:incr("{tx}n")
      t:get("{tx}n")
    end))
    assert.same({ "OK", 11, "11" }, res)
    local v, err = c:transaction(function(t)
      t:incr("{tx}n")
      t:incr("other")
    end)
    assert.is_nil(v)
    assert.matches("CROSSSLOT", err.message)
    assert.equal("11", c:get("{tx}n")) -- nothing of it ran
    c:close()
  end))

  it("reads from replicas when asked, writes to masters", async(function()
    local map = shards(c0.nodes[1])
    local replicas = {}
    for _, s in pairs(map) do
      for _, rep in ipairs(s.replicas) do replicas[#replicas + 1] = rep end
    end
    assert.equal(3, #replicas)
    local before = 0
    for _, rep in ipairs(replicas) do before = before + calls(rep, "get") end
    local c = assert(redis.cluster({ nodes = c0.nodes, read_from_replicas = true }))
    for i = 1, 30 do assert.equal("OK", c:set("rr:" .. i, i)) end
    -- a replica may lag a moment behind its master
    eventually(function()
      for i = 1, 30 do
        if c:get("rr:" .. i) ~= tostring(i) then return false end
      end
      return true
    end, "the replicas to have the writes")
    local after = 0
    for _, rep in ipairs(replicas) do after = after + calls(rep, "get") end
    assert.is_true(after - before >= 30, "replicas served " .. (after - before) .. " GETs")
    c:close()
  end))

  it("delivers SUBSCRIBE, PSUBSCRIBE and SSUBSCRIBE messages through the nodes that hold them",
    async(function()
      local c = assert(redis.cluster({ nodes = c0.nodes }))
      local pub = assert(redis.cluster({ nodes = c0.nodes }))
      -- two shard channels on different masters
      local a, b = "{a}ch", "{b}ch"
      assert.are_not.equal(helpers.cluster_master_of(c0.servers[1].port, cluster.slot(a)),
        helpers.cluster_master_of(c0.servers[1].port, cluster.slot(b)))
      assert.equal(1, #assert(c:subscribe("news")))
      assert.equal(1, #assert(c:psubscribe("ev.*")))
      assert.equal(2, #assert(c:ssubscribe(a, b)))
      -- PUBLISH from another node reaches the subscriber; SPUBLISH goes to
      -- the channel's master, where the subscription is
      assert.is_true(pub:publish("news", "n1") >= 1)
      assert.is_true(pub:publish("ev.x", "e1") >= 1)
      assert.equal(1, pub:spublish(a, "sa"))
      assert.equal(1, pub:spublish(b, "sb"))
      local got = {}
      for _ = 1, 4 do
        local m = assert(c:read_message(5))
        got[#got + 1] = m.kind .. " " .. m.channel .. " " .. m.data
      end
      table.sort(got)
      assert.same({ "message news n1", "pmessage ev.x e1", "smessage " .. a .. " sa",
        "smessage " .. b .. " sb" }, got)
      local v, err = c:read_message(0.2)
      assert.is_nil(v)
      assert.equal("timeout", err.kind)
      -- unsubscribed, nothing more comes
      assert.equal(2, #assert(c:sunsubscribe()))
      assert.equal(1, #assert(c:unsubscribe()))
      assert.equal(1, #assert(c:punsubscribe()))
      assert.equal(0, pub:spublish(a, "late"))
      assert.equal(0, pub:publish("news", "late"))
      c:close()
      pub:close()
    end))

  it("loses no key while `redis-cli --cluster reshard` moves slots under writes",
    async(function()
      local c = assert(redis.cluster({ nodes = c0.nodes }))
      local map = shards(c0.nodes[1])
      local from, to
      for m in pairs(map) do
        if not from then from = m elseif not to then to = m end
      end
      local function id(addr)
        local r = node(addr)
        local v = assert(r:call("CLUSTER", "MYID"))
        r:close()
        return v
      end
      -- keys in the slots that move (the first ones of `from`)
      local done = false
      local wait = helpers.spawn(("redis-cli --cluster reshard %s --cluster-from %s " ..
        "--cluster-to %s --cluster-slots 300 --cluster-yes"):format(from, id(from), id(to)))
      local written, failed = 0, {}
      local writer = gen.spawn(function()
        local i = 0
        while not done or i < 2000 do
          i = i + 1
          local ok, err = c:set("rs:" .. i, i)
          if ok then written = i else failed[#failed + 1] = tostring(err) end
          if i % 50 == 0 then gen.sleep(0) end
        end
        return i
      end)
      local status, out, err = wait()
      assert.equal(0, status, out .. err)
      done = true
      local n = writer:result()
      assert.same({}, failed)
      assert.equal(n, written)
      -- the slots moved: `to` holds 300 more than before
      local function count(s)
        local slots = 0
        for _, r in ipairs(s.ranges) do slots = slots + r[2] - r[1] + 1 end
        return slots
      end
      assert.equal(count(map[to]) + 300, count(shards(c0.nodes[1])[to]))
      local lost = {}
      for i = 1, n do
        if c:get("rs:" .. i) ~= tostring(i) then lost[#lost + 1] = i end
      end
      assert.same({}, lost)
      c:close()
    end, { timeout = 120 }))

  it("recovers by itself when a master is killed mid-load; no wrong answers",
    async(function()
      local c = assert(redis.cluster({ nodes = c0.nodes, max_redirects = 8 }))
      -- the victim: the master of key "fo:{1}"'s slot
      local slot = cluster.slot("fo:{1}")
      local victim = helpers.cluster_master_of(c0.servers[1].port, slot)
      local srv
      for _, s in ipairs(c0.servers) do
        if "127.0.0.1:" .. s.port == victim then srv = s end
      end
      -- a shard channel on the victim: its subscription follows the slot
      local sub = assert(redis.cluster({ nodes = c0.nodes }))
      assert(sub:ssubscribe("fo:{1}"))
      local ok_n, failed, wrong, lost = 0, 0, 0, 0
      local killed_at, ok_after = nil, 0
      local i = 0
      while ok_after < 200 do
        i = i + 1
        local k = "fo:{" .. (i % 10) .. "}:" .. i
        local v, err = c:set(k, i)
        if v == "OK" then
          local got, gerr = c:get(k)
          if got == tostring(i) then
            ok_n = ok_n + 1
            if killed_at then ok_after = ok_after + 1 end
          elseif got == redis.null then
            lost = lost + 1 -- an acknowledged write the replica had not yet
          elseif got == nil then
            assert.is_table(gerr)
            assert.is_string(gerr.kind)
            failed = failed + 1
          else
            wrong = wrong + 1
          end
        else
          -- every failure is nil, err with a kind
          assert.is_nil(v)
          assert.is_string(err.kind)
          failed = failed + 1
        end
        if i == 300 then
          srv.signal("KILL")
          killed_at = i
        end
        assert.is_true(i < 20000, "the client did not recover")
      end
      assert.equal(0, wrong)
      assert.is_true(ok_n >= 500)
      -- the victim's slot has a new master: its replica
      local survivor = c0.servers[1].port == srv.port and c0.servers[2] or c0.servers[1]
      assert.are_not.equal(victim, helpers.cluster_master_of(survivor.port, slot))
      print(("\n    failover: %d commands ok, %d failed (nil, err), %d lost, 0 wrong"):format(
        ok_n, failed, lost))
      -- the subscription moved to the new master by itself
      eventually(function()
        c:spublish("fo:{1}", "after")
        local m = sub:read_message(0.2)
        return m and m.data == "after"
      end, "the shard subscription to follow its slot", 15)
      sub:close()
      c:close()
    end, { timeout = 120 }))
end)
