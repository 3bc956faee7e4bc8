--- The Tornado TCP book's RPC game server, on MessagePack-RPC.
--
--     cd examples/rpc && ../../build/squall --reload server.lua [port]
--     ../../build/squall client.lua [port]      (a Squall player)
--     /usr/bin/python3 client.py [port]         (a Python player)
--
-- Methods come from handlers/: handlers/player.lua's login answers
-- "player.login". With --reload, edit a handler and the next call runs
-- the new code; the connections stay. chat.whisper shows a server-to-client
-- call: the server calls the addressed player's own "on_whisper".
local ioloop = require "squall.ioloop"
local log = require "squall.log"
local rpc = require "squall.rpc"

local port = tonumber(arg and arg[1]) or 5700

local server = rpc.Server({ handlers = "handlers", call_timeout = 5 })
server:route("ping", function() return "pong" end)
server.on_connect = function(conn)
  log.info("player connection %d from %s:%d", conn.id, conn.address.host, conn.address.port)
end
server.on_close = function(conn)
  log.info("connection %d closed (uid %s)", conn.id, tostring(conn.data.uid))
end
server:listen(port, "127.0.0.1")
log.info("RPC server on 127.0.0.1:%d; methods: %s", port, table.concat(server:methods(), ", "))

local loop = ioloop.current()
loop:add_signal_handler("TERM", function() loop:stop() end)
loop:add_signal_handler("INT", function() loop:stop() end)
loop:start()
