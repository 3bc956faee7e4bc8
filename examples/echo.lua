--- An echo server: every line a client sends comes back.
--
--     squall examples/echo.lua [port] [address]     (default 8888 127.0.0.1)
--     nc 127.0.0.1 8888
local ioloop = require "squall.ioloop"
local log = require "squall.log"
local TCPServer = require "squall.tcpserver"

local port = tonumber(arg and arg[1]) or 8888
local address = arg and arg[2] or "127.0.0.1"

local Echo = TCPServer:extend()

function Echo:handle_stream(stream, address_)
  log.debug("connection from %s:%d", address_.host, address_.port)
  while true do
    -- One line at a time, at most 64 KiB; a longer line closes the stream.
    local line = stream:read_until("\n", 65536)
    if not line then break end
    stream:write(line)
  end
  stream:close()
end

Echo():listen(port, address)
log.info("echo server listening on %s:%d (Ctrl-C to stop)", address, port)

local loop = ioloop.current()
loop:add_signal_handler("SIGINT", function() loop:stop() end)
loop:add_signal_handler("SIGTERM", function() loop:stop() end)
loop:start()
log.info("echo server stopped")
