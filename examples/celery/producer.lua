--- The Tornado TCP book's Celery chapter, from Squall: send a task to
-- Python's worker, keep its id, wait for the result; delay one with a
-- countdown; revoke another; and call a Lua task on the Squall worker.
--
--     BROKER=redis://127.0.0.1:6379/0 ../../build/squall producer.lua
local celery = require "squall.celery"
local ioloop = require "squall.ioloop"

local broker = os.getenv("BROKER") or "redis://127.0.0.1:6379/0"

ioloop.current():run_sync(function()
  local app = celery.new({ broker = broker, backend = broker })

  local sum = assert(app:send_task("pytasks.add", { 2, 3 }))
  print("pytasks.add sent, id " .. sum.id)
  print("pytasks.add ->", sum:get(10))

  local later = assert(app:send_task("pytasks.slow_square", { 7 }, nil, { countdown = 1 }))
  print("pytasks.slow_square (countdown 1 s) state:", later:state())
  print("pytasks.slow_square ->", later:get(10))

  local doomed = assert(app:send_task("pytasks.add", { 1, 1 }, nil, { countdown = 2 }))
  assert(app:revoke(doomed.id))
  local _, err = doomed:get(10)
  print("revoked task ->", err and err.kind, doomed:state())

  local words = assert(app:send_task("text.words", { "squall runs lua tasks too" }, nil,
    { queue = "lua" }))
  print("text.words (on the Squall worker) ->", words:get(10))
  app:close()
end, 60)
