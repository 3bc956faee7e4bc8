--- The hand-written HTTP/1.1 "Hello, world" that examples/http_hello.lua
-- was before squall.httpserver: make bench runs it beside HTTPServer to
-- show what the real parser and the module cost over it.
--     squall bench/servers/http_toy.lua PORT
--
-- It reads each request head with read_until("\r\n\r\n"), skips a body it
-- does not need, and answers. Pipelined requests are answered in order; the
-- answers to requests that arrived together go out in one write.
local ioloop = require "squall.ioloop"
local log = require "squall.log"
local TCPServer = require "squall.tcpserver"

local port = tonumber(arg and arg[1]) or 8080
local address = arg and arg[2] or "127.0.0.1"

local BODY = "Hello, world!\n"
local MAX_HEAD = 64 * 1024

local function response(status, body, keep_alive)
  return ("HTTP/1.1 %s\r\nServer: squall\r\nContent-Type: text/plain\r\n" ..
    "Content-Length: %d\r\nConnection: %s\r\n\r\n%s"):format(
      status, #body, keep_alive and "keep-alive" or "close", body)
end

local OK_KEEP = response("200 OK", BODY, true)
local OK_CLOSE = response("200 OK", BODY, false)

local find, match, lower = string.find, string.match, string.lower

-- The value of header `name` (lower case) in `lhead`, the request head in
-- lower case: plain searches, no pattern tried at every position.
local function header(lhead, name)
  local i = find(lhead, "\r\n" .. name .. ":", 1, true)
  if not i then return nil end
  return match(lhead, "^[ \t]*([^\r]*)", i + #name + 3)
end

-- Whether the client wants the connection kept open after this request.
local function keep_alive(version, lhead)
  local conn = header(lhead, "connection") or ""
  if version == "1.1" then return not find(conn, "close", 1, true) end
  return find(conn, "keep-alive", 1, true) ~= nil
end

local Hello = TCPServer:extend()

function Hello:handle_stream(stream)
  while true do
    local head, err = stream:read_until("\r\n\r\n", MAX_HEAD)
    if not head then
      if err.kind == "unsatisfiable" then
        log.warn("request head over %d bytes; closing", MAX_HEAD)
      end
      break
    end
    local method, version = match(head, "^(%u+) %S+ HTTP/(%d%.%d)\r\n")
    if not method then
      stream:write(response("400 Bad Request", "bad request\n", false))
      break
    end
    local lhead = lower(head)
    local length = tonumber(header(lhead, "content-length") or 0)
    if not length then
      stream:write(response("400 Bad Request", "bad content-length\n", false))
      break
    end
    if length > 0 and not stream:read_bytes(length) then break end
    local keep = keep_alive(version, lhead)
    stream:write(keep and OK_KEEP or OK_CLOSE)
    if not keep then break end
  end
  stream:close()
end

Hello():listen(port, address)
log.info("http_hello listening on http://%s:%d/", address, port)

local loop = ioloop.current()
loop:add_signal_handler("SIGINT", function() loop:stop() end)
loop:add_signal_handler("SIGTERM", function() loop:stop() end)
loop:start()
