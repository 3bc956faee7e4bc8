--- Bulk: read everything with read_bytes (1 MiB at a time) until the
-- peer half-closes, then close. squall bench/servers/sink.lua PORT
local ioloop = require "squall.ioloop"
local TCPServer = require "squall.tcpserver"

TCPServer({ handle_stream = function(stream)
  while stream:read_bytes(1048576, true) do end
  stream:close()
end }):listen(tonumber(arg[1]), "127.0.0.1")
ioloop.current():start()
