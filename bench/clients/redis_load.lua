--- Load for make bench: squall.redis GET/SET against a redis-server, the
-- same work as `redis-benchmark -t set,get -c CONNS -P DEPTH`; or, given
-- a cluster node as HOST:PORT, squall.redis.cluster against a Redis
-- Cluster, as `redis-benchmark --cluster` (each client's keys in one
-- slot, so each pipeline goes to one node, as redis-benchmark's do).
--     squall bench/clients/redis_load.lua PORT|HOST:PORT set|get CONNS DEPTH SECS
-- Prints ops_per_s=N errors=N.
local gen = require "squall.gen"
local ioloop = require "squall.ioloop"
local redis = require "squall.redis"

local target, op = arg[1], arg[2]
local conns, depth, secs = tonumber(arg[3]) or 50, tonumber(arg[4]) or 1, tonumber(arg[5]) or 3
local value = ("x"):rep(3) -- redis-benchmark's default 3-byte value
local cluster_seed = target:find(":", 1, true) and target

ioloop.current():run_sync(function()
  local loop = ioloop.current()
  -- a cluster client has a connection per client on its node, as
  -- redis-benchmark has; one node, a connection per client
  local shared = cluster_seed and
    assert(redis.cluster({ nodes = { cluster_seed }, pool = { size = conns } }))
  local ops, errors, stop = 0, 0, false
  local workers = {}
  for w = 1, conns do
    local r = shared or assert(redis.connect({ port = tonumber(target) }))
    workers[w] = gen.spawn(function()
      local key = shared and "key:{" .. w .. "}" or "key:" .. w
      while not stop do
        if depth == 1 then
          local v
          if op == "set" then v = r:set(key, value) else v = r:get(key) end
          if v == nil then errors = errors + 1 end
          ops = ops + 1
        else
          local replies = r:pipeline(function(p)
            for _ = 1, depth do
              if op == "set" then p:set(key, value) else p:get(key) end
            end
          end)
          if not replies or redis.is_error(replies[1]) then errors = errors + 1 end
          ops = ops + depth
        end
      end
      if not shared then r:close() end
    end)
  end
  -- count only a steady stretch: from 0.5 s in to SECS later
  gen.sleep(0.5)
  local n0, t0 = ops, loop:time()
  gen.sleep(secs)
  local n1, t1 = ops, loop:time()
  stop = true
  for _, w in ipairs(workers) do w:result() end
  if shared then shared:close() end
  print(("ops_per_s=%.0f errors=%d"):format((n1 - n0) / (t1 - t0), errors))
end, 60 + secs)
