--- Graceful shutdown: on SIGTERM (or Ctrl-C) stop accepting, let the
-- requests being served finish, close idle keep-alive connections, and exit
-- 0 once every handler returned (or at the deadline).
--
--     squall examples/graceful.lua [port] [processes]   (default 8080, 1)
--     curl http://127.0.0.1:8080/slow &   kill -TERM <pid>
--     -> the slow request still gets its answer; the process exits 0
--
-- With processes > 1 the parent forwards SIGTERM to every child and exits
-- 0 once they all have.
local ioloop = require "squall.ioloop"
local gen = require "squall.gen"
local log = require "squall.log"
local TCPServer = require "squall.tcpserver"

local port = tonumber(arg and arg[1]) or 8080
local processes = tonumber(arg and arg[2]) or 1
local DEADLINE = 10

local Server = TCPServer:extend()

function Server:handle_stream(stream)
  while not self:draining() do
    -- Between requests: a shutdown may close this connection now.
    stream:set_idle(true)
    local head = stream:read_until("\r\n\r\n", 65536)
    stream:set_idle(false)
    if not head then break end
    local path = head:match("^%u+ (%S+)") or "/"
    if path == "/slow" then gen.sleep(2) end -- a request that takes a while
    local body = ("done %s\n"):format(path)
    stream:write(("HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s"):format(#body,
      self:draining() and "Connection: close\r\n" or "", body))
  end
  stream:close()
end

-- The pid to signal: this process, or with several processes the parent
-- that supervises them (read before forking).
local stat = io.open("/proc/self/stat")
local main_pid = stat:read("*l"):match("^(%d+)")
stat:close()

local server = Server()
server:bind(port, "127.0.0.1")
server:start(processes)

local loop = ioloop.current()
local function shutdown(signame)
  log.info("%s: draining %d connection(s), at most %ds", signame,
    server:active_streams(), DEADLINE)
  gen.spawn(function()
    local clean, closed = server:close_gracefully(DEADLINE)
    if not clean then log.warn("closed %d connection(s) at the deadline", closed) end
    loop:stop()
  end)
end
loop:add_signal_handler("SIGTERM", shutdown)
loop:add_signal_handler("SIGINT", shutdown)
if (require("squall.process").task_id() or 0) == 0 then
  log.info("graceful example on http://127.0.0.1:%d/ (stop it with: kill -TERM %s)", port,
    main_pid)
end
loop:start()
log.info("drained; exiting")
