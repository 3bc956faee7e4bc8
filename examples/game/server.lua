--- The book's game server with its databases: MessagePack-RPC in front, a
-- player's live state in Redis, finished rounds and the leaderboard in
-- MariaDB (squall.redis and squall.mysql pools, in store.lua).
--
--     cd examples/game && ./run                  (starts Redis, MariaDB and this)
--     cd examples/game && ../../build/squall client.lua [port]
--
-- Or against servers of your own:
--     REDIS_PORT=6379 MYSQL_PORT=3306 ../../build/squall server.lua [port]
local gen = require "squall.gen"
local ioloop = require "squall.ioloop"
local log = require "squall.log"
local rpc = require "squall.rpc"
local store = require "store"

local port = tonumber(arg and arg[1]) or 5710
local loop = ioloop.current()

gen.spawn(function() -- a coroutine: the database calls wait
  local ok, err = store.setup()
  if not ok then
    log.error("cannot create the scores table: %s", tostring(err))
    loop:stop()
    return
  end
  local server = rpc.Server({ handlers = "handlers", call_timeout = 5 })
  server:listen(port, "127.0.0.1")
  log.info("game server on 127.0.0.1:%d; methods: %s", port,
    table.concat(server:methods(), ", "))
end)
loop:add_signal_handler("TERM", function() loop:stop() end)
loop:add_signal_handler("INT", function() loop:stop() end)
loop:start()
