--- A read buffer in Lua over a stream, for the protocol clients
-- (squall.redis, squall.mysql): what the stream has (up to 64 KiB) is
-- taken in one read, and messages are cut out of it here, so a pipeline's
-- replies or a result's packets cost one read, not one or two C calls
-- each. The rest of a large value is read whole, never grown chunk by
-- chunk.
-- @module squall.reader
local core = require "squall.core"

local M = {}

local sub, find, format = string.sub, string.find, string.format
local setmetatable = setmetatable

local CHUNK = 65536

local Reader = require("squall.util").class()

--- A reader over `stream` (anything with read_bytes(n [, partial])).
function M.new(stream)
  return setmetatable({ stream = stream, buf = "", pos = 1 }, Reader)
end

--- How many bytes wait in the buffer, taken from the stream but not yet
-- by the protocol.
function Reader:buffered()
  return #self.buf - self.pos + 1
end

--- How many bytes the peer sent that nobody has read yet: those in this
-- buffer and those the stream holds. A client about to send a command
-- expects none (a reply nobody asked for would be taken as the answer).
function Reader:unread()
  return #self.buf - self.pos + 1 + self.stream:get_read_buffer_size()
end

-- Add what the stream has to the buffer (waits for at least one byte).
local function fill(self)
  local data, err = self.stream:read_bytes(CHUNK, true)
  if not data then return nil, err end
  if self.pos > #self.buf then
    self.buf = data
  else
    self.buf = sub(self.buf, self.pos) .. data
  end
  self.pos = 1
  return true
end

--- The next n bytes, or nil, err (the stream's).
function Reader:take(n)
  local buf, pos = self.buf, self.pos
  local have = #buf - pos + 1
  if have >= n then
    self.pos = pos + n
    return sub(buf, pos, pos + n - 1)
  end
  if n - have > CHUNK then
    -- the rest of a large value: read it whole, then join once
    local rest, err = self.stream:read_bytes(n - have)
    if not rest then return nil, err end
    self.buf, self.pos = "", 1
    if have == 0 then return rest end
    return sub(buf, pos) .. rest
  end
  repeat
    local ok, err = fill(self)
    if not ok then return nil, err end
  until #self.buf >= n
  self.pos = n + 1
  return sub(self.buf, 1, n)
end

--- The next line without its CRLF, or nil, err: the stream's, or kind
-- `protocol` when more than `max` bytes come without a CRLF (`what` names
-- the line in that message).
function Reader:line(max, what)
  while true do
    local buf, pos = self.buf, self.pos
    local e = find(buf, "\r\n", pos, true)
    if e then
      self.pos = e + 2
      return sub(buf, pos, e - 1)
    end
    if #buf - pos + 1 > max then
      return nil, core.error("protocol", format("%s longer than %d bytes", what or "a line", max))
    end
    local ok, err = fill(self)
    if not ok then return nil, err end
  end
end

return M
