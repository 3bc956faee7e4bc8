--- WebSocket (RFC 6455): the server side of an HTTPServer request, and a
-- client.
--
--     local ws = assert(websocket.accept(req))        -- in an HTTPServer handler
--     local ws = assert(websocket.connect("ws://127.0.0.1:8080/chat"))
--     local msg, kind = ws:receive()   -- "text" or "binary"; nil, err at the end
--     ws:send("hi") ; ws:send(bytes, "binary") ; ws:ping() ; ws:close(1000)
--
-- Frames are read and built in C (runtime/ws.c: the header, unmasking,
-- masking with a random key, UTF-8 checks); this module keeps a message's
-- fragments, answers pings, and runs the closing handshake. A peer that
-- breaks the protocol is sent a close frame with the RFC's code (1002,
-- 1007, 1009) and the connection ends; receive() then gives nil, err of
-- kind `protocol`.
-- @module squall.websocket
local core = require "squall.core"
local gen = require "squall.gen"
local httpclient = require "squall.httpclient"
local iostream = require "squall.iostream"
local log = require "squall.log"
local tcpclient = require "squall.tcpclient"
local util = require "squall.util"

local M = {}

local type, tostring, error, ipairs = type, tostring, error, ipairs
local byte, char, sub, lower, format = string.byte, string.char, string.sub, string.lower,
  string.format
local concat = table.concat
local ws_frame, ws_build, utf8_valid, ws_accept = core.ws_frame, core.ws_build,
  core.utf8_valid, core.ws_accept
local m = iostream.methods
local s_read_bytes, s_write, s_close, s_set_timeout = m.read_bytes, m.write, m.close,
  m.set_timeout

local TEXT, BINARY, CLOSE, PING, PONG = 1, 2, 8, 9, 10

-- A close code as its two bytes.
local function two(code)
  return char(math.floor(code / 256), code % 256)
end
--- Seconds close() waits for the peer's close frame.
M.CLOSE_TIMEOUT = 5

local WebSocket = {}
WebSocket.__index = WebSocket
M.WebSocket = WebSocket

local function closed_error(self)
  local code = self.close_code
  return core.error("closed", code and format("the WebSocket closed (%d%s)", code,
    self.close_reason and self.close_reason ~= "" and ": " .. self.close_reason or "") or
    "the WebSocket closed")
end

local function new(stream, rest, client, max)
  return setmetatable({ stream = stream, _data = rest or "", _pos = 1, _client = client,
    _max = max, _state = "open", _frag_op = false, _frag = false, _frag_n = 0, _frag_size = 0,
    close_code = nil, close_reason = nil }, WebSocket)
end

-- End the connection: the TCP close, and whoever waits in close().
local function finish(self)
  self._state = "closed"
  s_close(self.stream)
  local f = self._closed
  if f and not f:done() then f:set_result(true) end
end

-- The peer broke the protocol: tell it why (code) and end.
local function fail(self, code, reason)
  log.debug("websocket: closing with %d: %s", code, reason)
  if self._state == "open" then
    s_write(self.stream, ws_build(CLOSE, two(code) .. reason, self._client))
  end
  self._failed = core.error("protocol", format("%s (closed with %d)", reason, code))
  finish(self)
  return nil, self._failed
end

-- Close codes a peer may send (RFC 6455 section 7.4).
local function valid_code(code)
  return (code >= 1000 and code <= 1003) or (code >= 1007 and code <= 1014) or
    (code >= 3000 and code <= 4999)
end

-- A close frame came: its code and reason; the handshake's reply.
local function on_close_frame(self, payload)
  local code, reason = 1005, ""
  if #payload == 1 then return fail(self, 1002, "a close frame of one byte") end
  if #payload >= 2 then
    local hi, lo = byte(payload, 1, 2)
    code = hi * 256 + lo
    reason = sub(payload, 3)
    if not valid_code(code) then return fail(self, 1002, "a close code no peer may send") end
    if not utf8_valid(reason) then return fail(self, 1007, "a close reason that is not UTF-8") end
  end
  self.close_code, self.close_reason = code, reason
  if self._state == "open" then
    -- echo the code, as the RFC asks, then end
    s_write(self.stream, ws_build(CLOSE, code ~= 1005 and two(code) or "", self._client))
  end
  finish(self)
  return nil, closed_error(self)
end

local NOT_UTF8 = "a text message that is not UTF-8"

--- The next message: its data and "text" or "binary"; nil, err (kind
-- `closed` after the closing handshake or when the connection ended,
-- `protocol` when the peer broke the RFC, `timeout`...).
function WebSocket:receive()
  if self._state == "closed" then return nil, self._failed or closed_error(self) end
  local stream = self.stream
  while true do
    local limit = self._max - self._frag_size
    local npos, a, b, c = ws_frame(self._data, self._pos, limit, not self._client)
    if npos == nil then
      -- a bytes more at least: read them in one piece when the frame is big
      local more, err
      if a > 65536 then more, err = s_read_bytes(stream, a) else
        more, err = s_read_bytes(stream, 65536, true)
      end
      if not more then
        if err.kind ~= "timeout" then
          if not self.close_code then self.close_code = 1006 end
          finish(self)
          return nil, closed_error(self)
        end
        return nil, err
      end
      local data, pos = self._data, self._pos
      self._data = pos > #data and more or sub(data, pos) .. more
      self._pos = 1
    elseif npos == false then
      return fail(self, a, b)
    else
      self._pos = npos
      local fin, op, payload = a, b, c
      if op == TEXT or op == BINARY then
        if self._frag_op then return fail(self, 1002, "a new message inside a fragmented one") end
        if fin then
          if op == TEXT then
            if not utf8_valid(payload) then return fail(self, 1007, NOT_UTF8) end
            return payload, "text"
          end
          return payload, "binary"
        end
        self._frag_op, self._frag, self._frag_n, self._frag_size = op, { payload }, 1, #payload
      elseif op == 0 then
        if not self._frag_op then return fail(self, 1002, "a continuation with no message") end
        local n = self._frag_n + 1
        self._frag[n] = payload
        self._frag_n, self._frag_size = n, self._frag_size + #payload
        if fin then
          local msg, kind = concat(self._frag, "", 1, n), self._frag_op
          self._frag_op, self._frag, self._frag_n, self._frag_size = false, false, 0, 0
          if kind == TEXT then
            if not utf8_valid(msg) then return fail(self, 1007, NOT_UTF8) end
            return msg, "text"
          end
          return msg, "binary"
        end
      elseif op == PING then
        if self._state == "open" then s_write(stream, ws_build(PONG, payload, self._client)) end
      elseif op == CLOSE then
        return on_close_frame(self, payload)
      end
      -- a pong: nothing to do
    end
  end
end

--- Send a message: `kind` "text" (the default) or "binary". Waits while
-- the peer is slow to read. Returns true, or nil, err.
function WebSocket:send(data, kind)
  if type(data) ~= "string" then
    error("send: data must be a string, got " .. util.describe(data), 2)
  end
  local op = TEXT
  if kind == "binary" then op = BINARY elseif kind ~= nil and kind ~= "text" then
    error("send: kind must be \"text\" or \"binary\", got " .. util.describe(kind), 2)
  end
  if self._state ~= "open" then return nil, self._failed or closed_error(self) end
  return s_write(self.stream, ws_build(op, data, self._client))
end

--- Send a ping (at most 125 bytes); the peer's pong is read by receive().
function WebSocket:ping(data)
  data = data or ""
  if type(data) ~= "string" or #data > 125 then
    error("ping: data must be a string of at most 125 bytes", 2)
  end
  if self._state ~= "open" then return nil, self._failed or closed_error(self) end
  return s_write(self.stream, ws_build(PING, data, self._client))
end

--- Start the closing handshake (code 1000 by default) and wait, at most
-- CLOSE_TIMEOUT seconds, for the peer's close frame; messages that come
-- meanwhile are dropped unless another coroutine is receiving.
function WebSocket:close(code, reason)
  code = code or 1000
  reason = reason or ""
  if type(code) ~= "number" or not valid_code(code) then
    error("close: code must be 1000-1003, 1007-1014 or 3000-4999, got " .. util.describe(code), 2)
  end
  if type(reason) ~= "string" or #reason > 123 then
    error("close: reason must be a string of at most 123 bytes", 2)
  end
  if self._state ~= "open" then return end
  self._state = "closing"
  s_write(self.stream, ws_build(CLOSE, two(code) .. reason, self._client))
  self._closed = self._closed or gen.Future()
  if self._reading then
    gen.with_timeout(M.CLOSE_TIMEOUT, self._closed)
  else
    s_set_timeout(self.stream, M.CLOSE_TIMEOUT)
    while self._state ~= "closed" do
      local msg, err = self:receive()
      if msg == nil and err.kind == "timeout" then break end
    end
  end
  if self._state ~= "closed" then finish(self) end
end

-- receive() marks itself running so a close() from another coroutine
-- waits for it instead of reading beside it.
local receive = WebSocket.receive
function WebSocket.receive(self)
  self._reading = true
  local msg, kind = receive(self)
  self._reading = false
  return msg, kind
end

-- ---- the server side ------------------------------------------------------------

local function has_token(value, token)
  if not value then return false end
  for t in lower(value):gmatch("[^,%s]+") do
    if t == token then return true end
  end
  return false
end

local function refuse(req, status, why, headers)
  req:respond(status, headers, why .. "\n")
  return nil, core.error("http", why)
end

--- Accept a WebSocket handshake inside an HTTPServer handler.
-- @tparam table req the request
-- @tparam[opt] table opts `protocols` (the subprotocols this server
--   speaks; the first the client offers is chosen), `max_message_size`
--   (10 MiB)
-- @return a WebSocket, or nil, err (the handshake was refused with 400 or
--   426 and the handler just returns)
function M.accept(req, opts)
  opts = opts or {}
  if type(req) ~= "table" or not req.headers or not req.stream then
    error("websocket.accept: pass the HTTPServer request", 2)
  end
  if type(opts) ~= "table" then error("websocket.accept: opts must be a table", 2) end
  local h = req.headers
  if req.method ~= "GET" then return refuse(req, 400, "a WebSocket handshake must be a GET") end
  if not has_token(h.upgrade, "websocket") or not has_token(h.connection, "upgrade") then
    return refuse(req, 400, "not a WebSocket handshake (Upgrade: websocket, Connection: Upgrade)")
  end
  if h["sec-websocket-version"] ~= "13" then
    return refuse(req, 426, "only WebSocket version 13 is spoken",
      { ["Sec-WebSocket-Version"] = "13" })
  end
  local key = h["sec-websocket-key"]
  if not key or not key:match("^[%w+/]+=*$") or #key ~= 24 then
    return refuse(req, 400, "a bad Sec-WebSocket-Key")
  end
  local chosen
  if opts.protocols and h["sec-websocket-protocol"] then
    local ours = {}
    for _, p in ipairs(opts.protocols) do ours[p] = true end
    for p in h["sec-websocket-protocol"]:gmatch("[^,%s]+") do
      if ours[p] then
        chosen = p
        break
      end
    end
  end
  local stream, rest = req:detach()
  req.status = 101
  s_set_timeout(stream, nil)
  s_write(stream, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n" ..
    "Connection: Upgrade\r\nSec-WebSocket-Accept: " .. ws_accept(key) .. "\r\n" ..
    (chosen and "Sec-WebSocket-Protocol: " .. chosen .. "\r\n" or "") .. "\r\n")
  local ws = new(stream, rest, false, opts.max_message_size or 10485760)
  ws.protocol = chosen
  return ws
end

-- ---- the client --------------------------------------------------------------------

--- Connect to a WebSocket server; waits inside a coroutine.
-- @tparam string url `ws://` or `wss://`
-- @tparam[opt] table opts `protocols` (offered, in order), `headers`,
--   `timeout` (10 s for connect and handshake), `ssl_options`,
--   `max_message_size` (10 MiB)
-- @return a WebSocket (`ws.protocol` the server's choice), or nil, err
function M.connect(url, opts)
  util.need_coroutine("websocket.connect", 2)
  opts = opts or {}
  if type(url) ~= "string" then error("websocket.connect: url must be a string", 2) end
  local scheme, rest = url:match("^(wss?)://(.*)$")
  if not scheme then error("websocket.connect: not a ws:// or wss:// URL: " .. url, 2) end
  local _, host, port, target = httpclient.parse_url((scheme == "wss" and "https" or "http") ..
    "://" .. rest)
  if not host then error("websocket.connect: bad URL: " .. url, 2) end
  local timeout = opts.timeout or 10
  local stream, err = tcpclient.connect(host, port, { timeout = timeout,
    ssl_options = scheme == "wss" and (opts.ssl_options or {}) or nil })
  if not stream then return nil, err end
  local key = util.base64(util.random_bytes(16))
  local lines = { "GET " .. target .. " HTTP/1.1", "Host: " .. host .. ":" .. port,
    "Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Key: " .. key,
    "Sec-WebSocket-Version: 13" }
  if opts.protocols then
    lines[#lines + 1] = "Sec-WebSocket-Protocol: " .. concat(opts.protocols, ", ")
  end
  if opts.headers then
    local text = require("squall.http").header_lines(opts.headers, 2)
    lines[#lines + 1] = text:sub(1, -3)
  end
  s_write(stream, concat(lines, "\r\n") .. "\r\n\r\n")
  s_set_timeout(stream, timeout)
  local parser = core.http_parser("response")
  local data, pos = "", 1
  local code, why, headers
  while true do
    if pos > #data then
      local chunk
      chunk, err = s_read_bytes(stream, 65536, true)
      if not chunk then
        s_close(stream)
        return nil, err
      end
      data, pos = chunk, 1
    end
    local npos, head, _, _, status, reason, c, w, _, _, h = parser:execute(data, pos)
    pos = npos
    if status then
      s_close(stream)
      return nil, core.error("http", "bad handshake response: " .. tostring(reason))
    end
    if head then
      code, why, headers = c, w, h
      break
    end
  end
  local function refused(msg)
    s_close(stream)
    return nil, core.error("http", msg)
  end
  if code ~= 101 then return refused(format("the server answered %d %s", code, why)) end
  if not has_token(headers.upgrade, "websocket") or
      not has_token(headers.connection, "upgrade") then
    return refused("the server's 101 lacks Upgrade: websocket")
  end
  if headers["sec-websocket-accept"] ~= ws_accept(key) then
    return refused("the server's Sec-WebSocket-Accept does not match the key")
  end
  s_set_timeout(stream, nil)
  local ws = new(stream, sub(data, pos), true, opts.max_message_size or 10485760)
  ws.protocol = headers["sec-websocket-protocol"]
  return ws
end

return M
