--- Hot reload: a server whose handler lives in a module.
--
--     cd examples/reload && squall --reload server.lua [port]
--     nc 127.0.0.1 8890          (stay connected)
--     edit handler.lua (say, greeting = "howdy"), save
--     nc 127.0.0.1 8890          (a new connection: the new code)
--
-- Or send SIGHUP to reload every module. See docs/guide.md, "Hot reload".
package.path = "./?.lua;" .. package.path
local ioloop = require "squall.ioloop"
local log = require "squall.log"
local TCPServer = require "squall.tcpserver"
local handler = require "handler"

local port = tonumber(arg and arg[1]) or 8890

local Server = TCPServer:extend()
function Server:handle_stream(stream)
  -- Looked up at each connection, so a reloaded handler takes effect for
  -- the next one.
  handler.handle_stream(stream)
  stream:close()
end

Server():listen(port, "127.0.0.1")
log.info("reload example on 127.0.0.1:%d; edit handler.lua while it runs", port)
local loop = ioloop.current()
loop:add_signal_handler("SIGINT", function() loop:stop() end)
loop:add_signal_handler("SIGTERM", function() loop:stop() end)
loop:start()
