--- Load for make bench: squall.redis.cluster GET/SET against a Redis
-- Cluster, the same work as `redis-benchmark --cluster -t set,get -c
-- CONNS -P DEPTH` (each client's keys in one slot, so each pipeline goes
-- to one node, as redis-benchmark's do).
--     squall bench/clients/redis_cluster_load.lua HOST:PORT set|get CONNS DEPTH SECS
-- Prints ops_per_s=N errors=N.
local gen = require "squall.gen"
local ioloop = require "squall.ioloop"
local redis = require "squall.redis"

local seed, op = arg[1], arg[2]
local conns, depth, secs = tonumber(arg[3]) or 50, tonumber(arg[4]) or 1, tonumber(arg[5]) or 3
local value = ("x"):rep(3) -- redis-benchmark's default 3-byte value

ioloop.current():run_sync(function()
  local loop = ioloop.current()
  -- a connection per client on its node, as redis-benchmark has
  local c = assert(redis.cluster({ nodes = { seed }, pool = { size = conns } }))
  local ops, errors, stop = 0, 0, false
  local workers = {}
  for w = 1, conns do
    workers[w] = gen.spawn(function()
      local key = "key:{" .. w .. "}"
      while not stop do
        if depth == 1 then
          local v
          if op == "set" then v = c:set(key, value) else v = c:get(key) end
          if v == nil then errors = errors + 1 end
          ops = ops + 1
        else
          local replies = c:pipeline(function(p)
            for _ = 1, depth do
              if op == "set" then p:set(key, value) else p:get(key) end
            end
          end)
          if not replies or redis.is_error(replies[1]) then errors = errors + 1 end
          ops = ops + depth
        end
      end
    end)
  end
  -- count only a steady stretch: from 0.5 s in to SECS later
  gen.sleep(0.5)
  local n0, t0 = ops, loop:time()
  gen.sleep(secs)
  local n1, t1 = ops, loop:time()
  stop = true
  for _, w in ipairs(workers) do w:result() end
  c:close()
  print(("ops_per_s=%.0f errors=%d"):format((n1 - n0) / (t1 - t0), errors))
end, 60 + secs)
