--- Load for make bench: squall.redis GET/SET against a redis-server, the
-- same work as `redis-benchmark -t set,get -c CONNS -P DEPTH`.
--     squall bench/clients/redis_load.lua PORT set|get CONNS DEPTH SECS
-- Prints ops_per_s=N errors=N.
local gen = require "squall.gen"
local ioloop = require "squall.ioloop"
local redis = require "squall.redis"

local port, op = tonumber(arg[1]), arg[2]
local conns, depth, secs = tonumber(arg[3]) or 50, tonumber(arg[4]) or 1, tonumber(arg[5]) or 3
local value = ("x"):rep(3) -- redis-benchmark's default 3-byte value

ioloop.current():run_sync(function()
  local loop = ioloop.current()
  local ops, errors, stop = 0, 0, false
  local workers = {}
  for c = 1, conns do
    local r = assert(redis.connect({ port = port }))
    workers[c] = gen.spawn(function()
      local key = "key:" .. c
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
          if not replies then errors = errors + 1 end
          ops = ops + depth
        end
      end
      r:close()
    end)
  end
  -- count only a steady stretch: from 0.5 s in to SECS later
  gen.sleep(0.5)
  local n0, t0 = ops, loop:time()
  gen.sleep(secs)
  local n1, t1 = ops, loop:time()
  stop = true
  for _, w in ipairs(workers) do w:result() end
  print(("ops_per_s=%.0f errors=%d"):format((n1 - n0) / (t1 - t0), errors))
end, 60 + secs)
