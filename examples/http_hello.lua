--- "Hello, world" over HTTP/1.1 with squall.httpserver.
--
--     squall examples/http_hello.lua [port] [address]   (default 8080 127.0.0.1)
--     curl -v http://127.0.0.1:8080/      wrk -c 100 -d 5s http://127.0.0.1:8080/
--
-- HTTPServer parses each request (keep-alive, pipelining, chunked bodies,
-- HEAD, HTTP/1.0) and frames the answer the handler returns: status,
-- headers, body. It adds Date and Content-Length.
local httpserver = require "squall.httpserver"
local ioloop = require "squall.ioloop"
local log = require "squall.log"

local port = tonumber(arg and arg[1]) or 8080
local address = arg and arg[2] or "127.0.0.1"

local BODY = "Hello, world!\n"
local HEADERS = { ["Content-Type"] = "text/plain", Server = "squall" }

httpserver.HTTPServer(function()
  return 200, HEADERS, BODY
end):listen(port, address)
log.info("http_hello listening on http://%s:%d/", address, port)

local loop = ioloop.current()
loop:add_signal_handler("SIGINT", function() loop:stop() end)
loop:add_signal_handler("SIGTERM", function() loop:stop() end)
loop:start()
