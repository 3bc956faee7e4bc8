--- The echo server over TLS.
--
--     scripts/gen-test-certs                       (once: build/certs)
--     squall examples/tls_echo.lua [port] [certfile keyfile]
--     openssl s_client -connect 127.0.0.1:8443 -quiet
--
-- Defaults: port 8443 on 127.0.0.1, build/certs/server.pem and server.key.
local ioloop = require "squall.ioloop"
local log = require "squall.log"
local TCPServer = require "squall.tcpserver"

local port = tonumber(arg and arg[1]) or 8443
local certfile = arg and arg[2] or "build/certs/server.pem"
local keyfile = arg and arg[3] or "build/certs/server.key"

local Echo = TCPServer:extend()

function Echo:handle_stream(stream)
  while true do
    local line, err = stream:read_until("\n", 65536)
    if not line then
      if err.kind == "tls" then log.info("TLS failure: %s", tostring(err)) end
      break
    end
    stream:write(line)
  end
  stream:close()
end

Echo({ ssl_options = { certfile = certfile, keyfile = keyfile } }):listen(port, "127.0.0.1")
log.info("TLS echo server on 127.0.0.1:%d", port)

local loop = ioloop.current()
loop:add_signal_handler("SIGINT", function() loop:stop() end)
loop:add_signal_handler("SIGTERM", function() loop:stop() end)
loop:start()
