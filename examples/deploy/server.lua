--- A server ready for production: behind HAProxy with the PROXY protocol,
-- started by systemd (socket activation, or its own port), reloaded on
-- SIGHUP, drained on SIGTERM. It greets each client with the address it
-- sees, then echoes lines.
--
--     squall --reload examples/deploy/server.lua [port] [name]
--     (under systemd: squall-echo.socket and squall-echo.service here)
--
-- Set SQUALL_PROXY_PROTOCOL=0 to run it without a load balancer in front.
local ioloop = require "squall.ioloop"
local gen = require "squall.gen"
local log = require "squall.log"
local netutil = require "squall.netutil"
local TCPServer = require "squall.tcpserver"

local port = tonumber(arg and arg[1]) or 8000
local name = arg and arg[2] or "squall"
local behind_proxy = os.getenv("SQUALL_PROXY_PROTOCOL") ~= "0"

local server
server = TCPServer({
  proxy_protocol = behind_proxy,
  handle_stream = function(stream, address)
    stream:write(("hello from %s: you are %s:%d\n"):format(name, address.host, address.port))
    while not server:draining() do
      stream:set_idle(true)
      local line = stream:read_until("\n", 65536)
      stream:set_idle(false)
      if not line then break end
      stream:write(line)
    end
    stream:close()
  end,
})

-- systemd's sockets when socket-activated; else bind the port ourselves
local socks = netutil.systemd_sockets()
if #socks == 0 then
  socks = assert(netutil.bind_sockets(port, "127.0.0.1"))
end
server:add_sockets(socks)

local loop = ioloop.current()
loop:add_signal_handler("TERM", function()
  log.info("SIGTERM: draining %d connection(s)", server:active_streams())
  gen.spawn(function()
    server:close_gracefully(10)
    loop:stop()
  end)
end)
log.info("%s listening on %d socket(s)%s", name, #socks,
  behind_proxy and ", expecting the PROXY protocol" or "")
loop:start()
