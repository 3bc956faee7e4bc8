--- A Squall player for examples/rpc/server.lua.
--
--     ../../build/squall client.lua [port] [uid]
--
-- It answers the server's "on_whisper" calls (a server-to-client call)
-- and "on_shout" notifications, logs in, moves, whispers to itself and
-- prints what comes back.
local gen = require "squall.gen"
local ioloop = require "squall.ioloop"
local rpc = require "squall.rpc"

local port = tonumber(arg and arg[1]) or 5700
local uid = arg and arg[2] or "lua-player"

ioloop.current():run_sync(function()
  local conn = assert(rpc.connect("127.0.0.1", port, { routes = {
    on_whisper = function(_, from, text) return uid .. " heard " .. from .. ": " .. text end,
    on_shout = function(_, from, text) print(("%s shouts: %s"):format(from, text)) end,
  } }))
  print(assert(conn:call("player.login", uid)))
  local pos = assert(conn:call("player.move", 3, 4))
  print(("at %d,%d"):format(pos[1], pos[2]))
  print(assert(conn:call("chat.whisper", uid, "hello me")))
  print("online: " .. table.concat(assert(conn:call("player.online")), ", "))
  local _, err = conn:call("no.such")
  print(tostring(err))
  gen.sleep(0.1)
  conn:close()
end, 10)
