--- Growth: read one (huge) line with read_until and answer its length.
-- squall bench/servers/line.lua PORT
local ioloop = require "squall.ioloop"
local TCPServer = require "squall.tcpserver"

TCPServer({ max_buffer_size = 256 * 1048576, handle_stream = function(stream)
  local line = stream:read_until("\n")
  if line then stream:write(#line .. "\n") end
  stream:close()
end }):listen(tonumber(arg[1]), "127.0.0.1")
ioloop.current():start()
