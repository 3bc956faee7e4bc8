--- WebSocket echo for make bench: every message back as it came.
--     squall bench/servers/ws_echo.lua PORT
local httpserver = require "squall.httpserver"
local ioloop = require "squall.ioloop"
local websocket = require "squall.websocket"

httpserver.HTTPServer(function(req)
  local ws = websocket.accept(req)
  if not ws then return end
  while true do
    local msg, kind = ws:receive()
    if not msg then return end
    ws:send(msg, kind)
  end
end):listen(tonumber(arg[1]), "127.0.0.1")
ioloop.current():start()
