--- HTTPServer: HTTP/1.1 on TCPServer, as Tornado's HTTPServer.
--
--     local httpserver = require "squall.httpserver"
--     httpserver.HTTPServer(function(req)
--       return 200, { ["Content-Type"] = "text/plain" }, "hello\n"
--     end):listen(8080)
--
-- Each connection runs in its own coroutine (TCPServer's); requests on it
-- are served one after another, so pipelined requests are answered in
-- order. The request head is parsed once, by llhttp (runtime/http.c),
-- which also frames bodies (Content-Length, chunked) and refuses what
-- RFC 9112 calls smuggling. docs/api.md has the whole contract.
-- @module squall.httpserver
local core = require "squall.core"
local ioloop = require "squall.ioloop"
local iostream = require "squall.iostream"
local log = require "squall.log"
local stats = require "squall.stats"
local TCPServer = require "squall.tcpserver"
local util = require "squall.util"
local http = require "squall.http"

local M = {}

local type, tostring, error, pairs = type, tostring, error, pairs
local format, find, lower, sub = string.format, string.find, string.lower, string.sub
local concat = table.concat
local xpcall, traceback = xpcall, debug.traceback
local new_parser = core.http_parser
local now = core.time
local m = iostream.methods
local s_read_bytes, s_set_timeout, s_set_idle, s_idle_time, s_close, s_closed, s_flush =
  m.read_bytes, m.set_timeout, m.set_idle, m.idle_time, m.close, m.closed, m.flush
-- The C write, not iostream's wrapper: a response is the first write since
-- the last flush, which the wrapper's FFI path hands to the C method, and
-- that call, on a side exit of the wrapper's own trace, sends the JIT back
-- to the interpreter for the rest of the request ("return to lower frame").
local s_write = core.stream_c_methods.write
-- The parser's execute, called as a plain function on the hot path.
local execute = new_parser("request").execute

-- What httpclient and websocket share with this module (squall.http),
-- kept under its old names here too.
local REASONS, HEADERS_MT = http.REASONS, http.HEADERS_MT
M.REASONS, M.HEADERS_MT, M.unescape, M.parse_query, M.header_lines =
  REASONS, HEADERS_MT, http.unescape, http.parse_query, http.header_lines
local build_response, send_response = core.http_response, core.http_send
local STATUS_LINES = {}
for code, reason in pairs(REASONS) do
  STATUS_LINES[code] = "HTTP/1.1 " .. code .. " " .. reason .. "\r\n"
end

local function http_error(msg)
  return core.error("http", msg)
end

-- ---- requests ------------------------------------------------------------------

local Request = {}
-- A request is a table of 8 fields (9 with a query): method, path,
-- version, headers, status, and _conn (the connection), _state (what has
-- been sent: one of the four below), _b (the body's state, false when the
-- request has none). The other documented fields are worked out when read
-- (__index below): a request's garbage is part of what each keep-alive
-- connection costs, and a hash part of 8 is half one of 16.
local SENT_NOTHING, STARTED, FINISHED, DETACHED = 0, 1, 2, 3
local remote_ip
local LAZY = {
  query = function() return "" end, -- a target without "?"
  uri = function(req)
    local q = rawget(req, "query")
    return q and req.path .. "?" .. q or req.path
  end,
  args = function(req)
    local args = http.parse_query(req.query)
    rawset(req, "args", args)
    return args
  end,
  remote_ip = function(req)
    local conn = req._conn
    return conn.server._xheaders and remote_ip(req.headers, conn.remote) or conn.remote
  end,
  stream = function(req) return req._conn.stream end,
}
local REQUEST_MT = { __index = function(req, k)
  local f = Request[k]
  if f ~= nil then return f end
  f = LAZY[k]
  if f ~= nil then return f(req) end
  return nil
end }

-- The connection a request came on: stream, parser, unparsed input
-- (conn.data from conn.pos on is what the parser has not seen), server,
-- the client's address, whether it closes after this request (close) and
-- whether the request allows keeping it (keep).

-- Read more input into conn (after what was parsed), waiting at most
-- `secs`. The timeout is cleared after the read: an idle connection
-- waits on the sweeper, never on a timer of its own. Returns true, or
-- nil, err.
local function fill(conn, secs)
  local stream = conn.stream
  s_set_timeout(stream, secs)
  local chunk, err = s_read_bytes(stream, 65536, true)
  s_set_timeout(stream, nil)
  if not chunk then return nil, err end
  conn.data, conn.pos = chunk, 1
  return true
end

-- The server's own answer when a connection is to end: `status` with a
-- short text body (its length even for HEAD, whose body is left out).
local CLOSING = { ["Content-Type"] = "text/plain", Connection = "close" }
local function answer_and_close(conn, status, body, head_only)
  send_response(conn.stream, status, STATUS_LINES[status], CLOSING, body, nil, head_only,
    false, false)
end

-- Refuse the request's input: answer `status` (unless a response began)
-- and close once it is out.
local function refuse(conn, req, status, why)
  log.debug("http: %s from %s: %s", tostring(status), tostring(conn.remote), why)
  conn.close = "refused"
  if req then
    if req._state ~= SENT_NOTHING then return end
    req._state = FINISHED
  end
  answer_and_close(conn, status, why .. "\n")
end

local TOO_LARGE = "the request body is larger than max_body_size"
local TOO_LARGE_ERR = http_error(TOO_LARGE)
local function too_large(conn, req)
  refuse(conn, req, 413, TOO_LARGE)
  local err = http_error(TOO_LARGE)
  req._b.err = err
  return nil, err
end

-- Whether the client waits for "100 Continue" before sending the body.
local function expects_continue(req)
  local e = rawget(req.headers, "expect")
  return e ~= nil and lower(e) == "100-continue"
end

-- The body's state, req._b: got (bytes so far), parts (pieces the parser
-- met and the handler has not taken, or false), done, continued (100
-- Continue sent or not needed), err (what ended it early, or false), text
-- (body()'s result). This takes the next piece, reading and parsing more
-- input as needed. Returns a string, false at the body's end, or nil, err
-- (after refusing what broke a limit).
local function next_piece(req)
  local b = req._b
  if not b then return false end
  if b.err then return nil, b.err end
  local conn = req._conn
  local parts = b.parts
  if parts then
    b.parts = false
    if b.got > conn.server._max_body then return too_large(conn, req) end
    return parts
  end
  if b.done then return false end
  if not b.continued then
    b.continued = true
    if expects_continue(req) and req._state == SENT_NOTHING then
      s_write(conn.stream, "HTTP/1.1 100 Continue\r\n\r\n")
    end
  end
  while true do
    if conn.pos > #conn.data then
      local ok, err = fill(conn, conn.server._idle_timeout)
      if not ok then
        conn.close = conn.close or true
        b.err = err
        return nil, err
      end
    end
    local pos, _, done, body, status, reason = execute(conn.parser, conn.data, conn.pos)
    conn.pos = pos
    if status then
      refuse(conn, req, status, reason)
      b.err = http_error(reason)
      return nil, b.err
    end
    if done then b.done = true end
    if body then
      local got = b.got + #body
      b.got = got
      if got > conn.server._max_body then return too_large(conn, req) end
      return body
    end
    if done then return false end
  end
end

--- The whole body, or nil, err (kind `http` when it broke a limit or its
-- framing; the server has answered and will close).
function Request:body()
  local b = self._b
  if not b then return "" end
  if b.text then return b.text end
  local pieces, n = {}, 0
  while true do
    local piece, err = next_piece(self)
    if piece == nil then return nil, err end
    if not piece then break end
    n = n + 1
    pieces[n] = piece
  end
  local body = n == 1 and pieces[1] or concat(pieces)
  b.text = body
  return body
end

--- An iterator over the body's pieces as they arrive (bounded memory).
-- It ends at the body's end or at a failure, which `req.body_error` holds.
function Request:body_chunks()
  return function()
    local piece, err = next_piece(self)
    if piece == nil then
      self.body_error = err
      return nil
    end
    return piece or nil
  end
end


-- The status line for `status` (a number 100-999), or nil, why; also
-- checks that `headers` is a table or nil.
local function status_line(status, headers)
  if headers ~= nil and type(headers) ~= "table" then
    return nil, "headers must be a table, got " .. util.describe(headers)
  end
  local line = STATUS_LINES[status]
  if line then return line end
  if type(status) ~= "number" or status < 100 or status > 999 or status % 1 ~= 0 then
    return nil, "status must be an HTTP status code, got " .. util.describe(status)
  end
  return "HTTP/1.1 " .. status .. " " .. (REASONS[status] or "Unknown") .. "\r\n"
end

-- Raises when a response is under way or sent already.
local function check_unsent(req, what, level)
  local state = req._state
  if state ~= SENT_NOTHING then
    error(what .. (state == STARTED and ": the response has already started" or
      ": the response is already finished"), level + 1)
  end
end

-- The head of a streamed response, as core.http_response builds it
-- (runtime/http.c, with the Date it makes): the framing the server adds,
-- and whether the connection closes after. Returns text, chunked, or
-- nil, why when the status or the headers are bad.
local function streamed_head(req, status, headers)
  local line, why = status_line(status, headers)
  if not line then return nil, why end
  local conn = req._conn
  local text, chunked, close = build_response(status, line, headers, nil, nil,
    req.method == "HEAD", req.version == "HTTP/1.0", conn.keep and not conn.close)
  if not text then return nil, chunked end
  if close then conn.close = conn.close or true end
  req.status = status
  return text, chunked
end

-- Send a whole response (the one a handler returns, or respond's),
-- built by core.http_send straight into the stream's write queue.
-- Returns true or nil, err as write() does, or false, why when the
-- handler's values were bad (nothing was sent then).
local function answer(req, status, headers, body)
  if body == nil then
    body = ""
  elseif type(body) ~= "string" then
    return false, "body must be a string, got " .. util.describe(body)
  end
  local line, why = status_line(status, headers)
  if not line then return false, why end
  local conn = req._conn
  local stream = conn.stream
  local ok, close, over = send_response(stream, status, line, headers, body, nil,
    req.method == "HEAD", req.version == "HTTP/1.0", conn.keep and not conn.close)
  if ok == false then return false, close end
  req._state, req.status = FINISHED, status
  if not ok then return nil, close end
  if close then conn.close = conn.close or true end
  -- past write_high_water: wait for the client to read, as write() would
  if over then return s_flush(stream) end
  return true
end

--- Answer in one piece: the head, then `body` (a string, or nil).
function Request:respond(status, headers, body)
  check_unsent(self, "respond", 2)
  local ok, err = answer(self, status, headers, body)
  if ok == false then error(err, 2) end
  return ok, err
end

--- Start a streamed response: write the head (chunked unless `headers`
-- set a Content-Length). Then req:write(chunk)... req:finish().
function Request:start(status, headers)
  check_unsent(self, "start", 2)
  local text, chunked = streamed_head(self, status, headers)
  if not text then error(chunked, 2) end
  local bodiless = self.method == "HEAD" or status < 200 or status == 204 or status == 304
  self._state, self._chunked, self._bodiless = STARTED, chunked, bodiless
  return s_write(self._conn.stream, text)
end

--- Write a piece of a started response; waits while the client is slow
-- to read (the stream's write_high_water). Returns true or nil, err.
function Request:write(data)
  if self._state ~= STARTED then
    error(self._state == SENT_NOTHING and "write: call start(status, headers) first" or
      "write: the response is already finished", 2)
  end
  if type(data) ~= "string" then error("data must be a string, got " .. util.describe(data), 2) end
  if data == "" or self._bodiless then return true end
  if self._chunked then
    return s_write(self._conn.stream, format("%x\r\n", #data) .. data .. "\r\n")
  end
  return s_write(self._conn.stream, data)
end

--- End a started response (a response not started is answered 200 with
-- no body).
function Request:finish()
  if self._state >= FINISHED then error("finish: the response is already finished", 2) end
  if self._state == SENT_NOTHING then return self:respond(200, nil, "") end
  self._state = FINISHED
  if self._chunked then return s_write(self._conn.stream, "0\r\n\r\n") end
  return true
end

--- Take the connection over (WebSocket does): returns the stream and the
-- bytes read past this request's head. The server then leaves the
-- connection to the caller.
function Request:detach()
  local conn = self._conn
  self._state = DETACHED
  local rest = sub(conn.data, conn.pos)
  conn.data, conn.pos = "", 1
  return conn.stream, rest
end

-- ---- the server ----------------------------------------------------------------

local HTTPServer = TCPServer:extend()
M.HTTPServer = HTTPServer

local HTTP_OPTS = { max_header_size = true, max_body_size = true, idle_timeout = true,
  header_timeout = true, xheaders = true }

--- HTTPServer(handler, opts): `handler(req)` runs for each request; see
-- docs/api.md for `opts` (every TCPServer option too).
function HTTPServer.new(cls, handler, opts)
  if type(handler) ~= "function" then
    error("HTTPServer: handler must be a function(req), got " .. util.describe(handler), 2)
  end
  opts = opts or {}
  if type(opts) ~= "table" then error("options must be a table, got " .. util.describe(opts), 2) end
  local tcp = {}
  for k, v in pairs(opts) do
    if not HTTP_OPTS[k] then tcp[k] = v end
  end
  local ok, self = pcall(TCPServer.new, cls, tcp)
  if not ok then error(self, 2) end
  for _, k in ipairs({ "max_header_size", "max_body_size", "idle_timeout", "header_timeout" }) do
    local v = opts[k]
    if v ~= nil and (type(v) ~= "number" or v <= 0) then
      error(k .. " must be a positive number, got " .. util.describe(v), 2)
    end
  end
  self._handler = handler
  self._max_header = opts.max_header_size or 65536
  self._max_body = opts.max_body_size or 104857600
  self._idle_timeout = opts.idle_timeout or 60
  self._header_timeout = opts.header_timeout or 10
  self._xheaders = opts.xheaders and true or false
  self._spare = {}
  return self
end

-- With xheaders, the client's address as the proxy gave it.
remote_ip = function(headers, peer)
  local ip = rawget(headers, "x-real-ip")
  if ip then return ip end
  local fwd = rawget(headers, "x-forwarded-for")
  if fwd then
    local last = fwd:match("([^,%s]+)%s*$")
    if last then return last end
  end
  return peer
end

-- The request whose head the parser has just completed (execute's head
-- values: method, target, major, minor, headers, keep-alive, length).
local function new_request(server, conn, done, body, method, target, minor, headers, keep,
                           length)
  setmetatable(headers, HEADERS_MT)
  conn.keep = keep
  local b = false
  if body or not done then
    b = { got = body and #body or 0, parts = body or false, done = done, continued = false,
      -- a Content-Length over the limit is answered before the handler runs
      err = length ~= nil and length > server._max_body and TOO_LARGE_ERR or false }
  end
  local version = minor == 1 and "HTTP/1.1" or "HTTP/1.0"
  local qi = find(target, "?", 1, true)
  local req
  if qi then
    req = { method = method, path = sub(target, 1, qi - 1), query = sub(target, qi + 1),
      version = version, headers = headers, status = false, _conn = conn,
      _state = SENT_NOTHING, _b = b }
  else
    req = { method = method, path = target, version = version, headers = headers,
      status = false, _conn = conn, _state = SENT_NOTHING, _b = b }
  end
  setmetatable(req, REQUEST_MT)
  if minor == 1 and rawget(headers, "host") == nil then
    refuse(conn, nil, 400, "an HTTP/1.1 request needs a Host header")
    return nil
  end
  return req
end

-- Parse what conn holds, reading more within header_timeout from the
-- first bytes (which came just now), until one request head is whole.
-- Returns the request, or nil when the connection is to end (answered
-- already when it must be).
local function read_head(server, conn)
  local deadline
  while true do
    local data = conn.data
    local pos, _, done, body, status, reason, method, target, _, minor, headers, keep,
      length = execute(conn.parser, data, conn.pos)
    if pos > #data then
      conn.data, conn.pos = "", 1 -- let the read's string go
    else
      conn.pos = pos
    end
    if status then
      refuse(conn, nil, status, reason)
      return nil
    end
    if method then
      return new_request(server, conn, done, body, method, target, minor, headers, keep,
        length)
    end
    -- the head did not come whole in what was read
    deadline = deadline or now() + server._header_timeout
    local secs = deadline - now()
    if secs <= 0 then
      refuse(conn, nil, 408, "the request head did not come in time")
      return nil
    end
    local ok, err = fill(conn, secs)
    if not ok then
      if err.kind == "timeout" then
        refuse(conn, nil, 408, "the request head did not come in time")
      end
      return nil
    end
  end
end

-- After the handler: the rest of an unread body is read and dropped when
-- that keeps the connection usable; otherwise the connection closes.
local function skip_body(conn, req)
  local b = req._b
  if not b or b.done or conn.close then return end
  if b.err or (expects_continue(req) and not b.continued) then
    conn.close = conn.close or true
    return
  end
  b.continued = true
  while true do
    local piece = next_piece(req)
    if not piece then
      if piece == nil then conn.close = conn.close or true end
      return
    end
  end
end

local function handler_failed(conn, req, tb)
  log.error("Error in HTTP handler for %s %s from %s\n%s", req.method, req.uri,
    tostring(req.remote_ip), tb)
  stats.handler_errors = stats.handler_errors + 1
  conn.close = conn.close or true
  if req._state ~= SENT_NOTHING then return end -- it answered in part: just close
  req._state = FINISHED
  req.status = 500
  answer_and_close(conn, 500, "Internal Server Error\n", req.method == "HEAD")
end

-- After refusing a request, read for a moment before closing: closing
-- with the client's unread bytes still arriving makes the kernel send a
-- reset, which can destroy the answer before the client reads it (nginx's
-- lingering close). At most LINGER_TIME seconds and LINGER_BYTES bytes.
local LINGER_WAIT, LINGER_TIME, LINGER_BYTES = 0.25, 2, 1048576
local function linger(conn)
  local stream = conn.stream
  if not s_flush(stream) then return end
  s_set_timeout(stream, LINGER_WAIT)
  local deadline, total = now() + LINGER_TIME, 0
  while total < LINGER_BYTES and now() < deadline do
    local chunk = s_read_bytes(stream, 65536, true)
    if not chunk then return end
    total = total + #chunk
  end
end

-- idle_timeout, for connections waiting for a request: a timer per read
-- costs a libuv timer start and stop per request (about a tenth of a
-- hello-world request's CPU), so one sweeper per server wakes a few times
-- per idle_timeout instead, and closes the connections (TCPServer's) that
-- have been idle (stream:set_idle, between requests) for longer: a
-- connection closes between 1 and 1.25 idle_timeouts.
local TICKS = 4
local function sweep(server)
  server._sweeper = nil
  local limit = server._idle_timeout
  for _, stream in pairs(server._conns) do
    local idle = s_idle_time(stream)
    if idle and idle > limit then s_close(stream) end
  end
  if server._nstreams > 0 then
    server._sweeper = ioloop.current():call_later(limit / TICKS, sweep, server)
  end
end

-- Serve one request whose head is read: run the handler and send what it
-- returned (unless it answered itself), then read past an unread body.
-- Returns true when the connection goes on to the next request.
local function serve(server, conn, req)
  local observe = stats.http_observe
  local t0 = observe and now()
  local b = req._b
  if b and b.err then
    too_large(conn, req)
  else
    local ok, status, headers, body = xpcall(server._handler, traceback, req)
    local state = req._state
    if not ok then
      handler_failed(conn, req, status)
    elseif state == SENT_NOTHING then
      local sent, why = answer(req, status or 200, headers, body)
      if sent == false then handler_failed(conn, req, "what it returned: " .. why) end
    elseif state == STARTED then
      if not s_closed(conn.stream) then Request.finish(req) end
    end
    if req._state == DETACHED then return nil end
  end
  if observe then observe(req.status or 0, now() - t0) end
  -- an Upgrade the handler did not take: the connection ends
  if rawget(req.headers, "upgrade") then conn.close = conn.close or true end
  if b and not b.done then skip_body(conn, req) end
  return not conn.close
end

-- Parsers wait here between requests (a stack, at most SPARE_PARSERS):
-- a connection takes one when a request's bytes come and gives it back
-- when it waits for the next at a message's end, where a parser is as
-- good as new, so an idle keep-alive connection holds none.
local SPARE_PARSERS = 256
local function take_parser(server)
  local spare = server._spare
  local n = #spare
  if n == 0 then return new_parser("request", server._max_header) end
  local parser = spare[n]
  spare[n] = nil
  return parser
end

local function give_parser(server, parser)
  local spare = server._spare
  local n = #spare
  if n < SPARE_PARSERS then spare[n + 1] = parser end
end

-- The connection's coroutine. It waits for each request here, in a small
-- frame, and serves it one call deeper: LuaJIT's collector shrinks the
-- stack of a coroutine parked this shallow (a request grows it to 102
-- slots; parked, it goes back to 59), and memory per idle keep-alive
-- connection is a figure we track.
function HTTPServer:handle_stream(stream, address)
  local conn = { stream = stream, parser = false, data = "", pos = 1, server = self,
    remote = address and address.host, close = false, keep = false }
  -- the address table would otherwise live as long as this frame
  address = nil -- luacheck: ignore 311
  if not self._sweeper then
    self._sweeper = ioloop.current():call_later(self._idle_timeout / TICKS, sweep, self)
  end
  s_set_idle(stream, true)
  while true do
    if conn.pos > #conn.data then
      -- waiting for a request (idle: the sweeper's idle_timeout, not a
      -- timer per read), with no parser
      if conn.parser then
        give_parser(self, conn.parser)
        conn.parser = false
      end
      local chunk = s_read_bytes(stream, 65536, true)
      if not chunk then break end
      conn.data, conn.pos = chunk, 1
    end
    if not conn.parser then conn.parser = take_parser(self) end
    s_set_idle(stream, false)
    local req = read_head(self, conn)
    if not req then break end
    local more = serve(self, conn, req)
    if more == nil then return end -- the handler took the connection over
    if not more then break end
    s_set_idle(stream, true)
  end
  if conn.close == "refused" and not s_closed(stream) then linger(conn) end
  s_close(stream)
end

return M
