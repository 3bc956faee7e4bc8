--- Load for make bench: squall.mysql primary-key point selects, the query
-- `sysbench oltp_point_select` runs (a prepared statement), over CONNS
-- connections of a pool, each in a loop.
--     squall bench/clients/mysql_load.lua PORT CONNS SECS TABLE_SIZE
-- Prints queries_per_s=N errors=N.
local gen = require "squall.gen"
local ioloop = require "squall.ioloop"
local mysql = require "squall.mysql"

local port, conns = tonumber(arg[1]), tonumber(arg[2]) or 16
local secs, size = tonumber(arg[3]) or 3, tonumber(arg[4]) or 10000

ioloop.current():run_sync(function()
  local loop = ioloop.current()
  local n, errors, stop = 0, 0, false
  local workers = {}
  for c = 1, conns do
    local db = assert(mysql.connect({ port = port, user = "squall", password = "secret",
      database = "squall_test" }))
    workers[c] = gen.spawn(function()
      local random = math.random
      while not stop do
        local rows = db:query("SELECT c FROM sbtest1 WHERE id=?", random(1, size))
        if not rows or #rows ~= 1 then errors = errors + 1 end
        n = n + 1
      end
      db:close()
    end)
  end
  gen.sleep(0.5)
  local n0, t0 = n, loop:time()
  gen.sleep(secs)
  local n1, t1 = n, loop:time()
  stop = true
  for _, w in ipairs(workers) do w:result() end
  print(("queries_per_s=%.0f errors=%d"):format((n1 - n0) / (t1 - t0), errors))
end, 60 + secs)
