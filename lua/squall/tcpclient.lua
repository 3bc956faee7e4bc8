--- TCPClient: open a stream to a server.
--
--     local stream, err = TCPClient():connect("example.com", 80, {timeout = 5})
--
-- @module squall.tcpclient
local iostream = require "squall.iostream"

local TCPClient = {}
TCPClient.__index = TCPClient

--- Create a client. (Options for every connect may be given here.)
function TCPClient.new(_, defaults)
  return setmetatable({ _defaults = defaults or {} }, TCPClient)
end
setmetatable(TCPClient, { __call = TCPClient.new })

--- Connect to host:port; waits inside a coroutine.
-- @tparam string host
-- @tparam number port
-- @tparam[opt] table opts `timeout`, `source_ip`, `source_port`,
--   `max_buffer_size`, `read_chunk_size`, `write_high_water`,
--   `max_write_buffer_size`, `ssl_options`, `server_hostname`
-- @treturn stream
-- @return nil, err (kinds `resolve`, `refused`, `unreachable`, `timeout`,
--   `tls`, `io`)
function TCPClient:connect(host, port, opts)
  local merged = {}
  for k, v in pairs(self._defaults) do merged[k] = v end
  for k, v in pairs(opts or {}) do merged[k] = v end
  return iostream.connect(host, port, merged)
end

--- Nothing to release; here for Tornado compatibility.
function TCPClient:close() end -- luacheck: ignore 212

return TCPClient
