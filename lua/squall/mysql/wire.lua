--- MySQL's wire format, squall.mysql's own (not a public module): the
-- protocol's constants, fields read out of and written into a packet,
-- packets read and written on a connection, and the one classification of
-- a packet by its header.
local core = require "squall.core"
local ffi = require "ffi"
local util = require "squall.util"

local tonumber, error, sub, byte, char = tonumber, error, string.sub, string.byte, string.char
local find, format, concat, band = string.find, string.format, table.concat, bit.band
local rshift = bit.rshift

local W = {}

-- ---- protocol constants ----------------------------------------------------

local CLIENT_LONG_PASSWORD = 0x1
local CLIENT_LONG_FLAG = 0x4
local CLIENT_CONNECT_WITH_DB = 0x8
local CLIENT_PROTOCOL_41 = 0x200
local CLIENT_SSL = 0x800
local CLIENT_TRANSACTIONS = 0x2000
local CLIENT_SECURE_CONNECTION = 0x8000
local CLIENT_MULTI_RESULTS = 0x20000
local CLIENT_PS_MULTI_RESULTS = 0x40000
local CLIENT_PLUGIN_AUTH = 0x80000
local CLIENT_PLUGIN_AUTH_LENENC = 0x200000
local CLIENT_DEPRECATE_EOF = 0x1000000

local SERVER_STATUS_IN_TRANS = 0x1
local SERVER_MORE_RESULTS_EXISTS = 0x8

-- Commands: a packet's first byte.
local COM_QUIT, COM_QUERY, COM_PING = "\1", "\3", "\14"
local COM_STMT_PREPARE, COM_STMT_EXECUTE, COM_STMT_CLOSE = "\22", "\23", "\25"
local COM_RESET_CONNECTION = "\31"

local MAX_PAYLOAD = 0xffffff
local MAX_STATEMENTS = 256 -- prepared statements cached per connection

-- Column types (include/mysql_com.h's enum_field_types).
-- DECIMAL (0, 246), strings, blobs, JSON and the rest arrive as strings.
local T_TINY, T_SHORT, T_LONG, T_FLOAT, T_DOUBLE = 1, 2, 3, 4, 5
local T_TIMESTAMP, T_LONGLONG, T_INT24, T_DATE, T_TIME, T_DATETIME, T_YEAR = 7, 8, 9, 10, 11,
  12, 13
local T_NEWDATE, T_TIMESTAMP2, T_DATETIME2, T_TIME2 = 14, 17, 18, 19
local UNSIGNED_FLAG = 0x20

-- Collation ids for the handshake's charset byte (utf8mb4_general_ci and
-- the like: the same ids on MySQL 8 and MariaDB).
local CHARSETS = { utf8mb4 = 45, utf8 = 33, utf8mb3 = 33, latin1 = 8, ascii = 11,
  binary = 63 }

-- ---- errors ----------------------------------------------------------------

local function mysql_error(code, sqlstate, message)
  local err = core.error("mysql", format("%s (%d, SQLSTATE %s)", message, code, sqlstate))
  err.code, err.sqlstate, err.server_message = code, sqlstate, message
  return err
end

local function protocol_error(what)
  return core.error("protocol", "mysql: " .. what)
end

-- ---- reading fields out of a packet ---------------------------------------

local u8p = ffi.typeof("const uint8_t *")
local i16p, u16p = ffi.typeof("const int16_t *"), ffi.typeof("const uint16_t *")
local i32p, u32p = ffi.typeof("const int32_t *"), ffi.typeof("const uint32_t *")
local i64p, u64p = ffi.typeof("const int64_t *"), ffi.typeof("const uint64_t *")
local f32p, f64p = ffi.typeof("const float *"), ffi.typeof("const double *")
local cast = ffi.cast

local TWO53 = 9007199254740992

local function u16(s, i)
  local a, b = byte(s, i, i + 1)
  return a + b * 256
end

local function u24(s, i)
  local a, b, c = byte(s, i, i + 2)
  return a + b * 256 + c * 65536
end

local function u32(s, i)
  local a, b, c, d = byte(s, i, i + 3)
  return a + b * 256 + c * 65536 + d * 16777216
end

-- An 8-byte little-endian integer: a number when exact, else int64 or
-- uint64 cdata.
local function int64_at(s, i, unsigned)
  local p = cast(u8p, s) + (i - 1)
  local v = unsigned and cast(u64p, p)[0] or cast(i64p, p)[0]
  if v < TWO53 and (unsigned or v > -TWO53) then return tonumber(v) end
  return v
end

-- A length-encoded integer at i: value (nil for the NULL marker 0xfb)
-- and the position after it.
local function lenenc(s, i)
  local b = byte(s, i)
  if b == nil then return nil, nil end
  if b < 0xfb then return b, i + 1 end
  if b == 0xfb then return nil, i + 1 end
  if b == 0xfc then return u16(s, i + 1), i + 3 end
  if b == 0xfd then return u24(s, i + 1), i + 4 end
  if i + 8 > #s then error(protocol_error("a length runs past its packet")) end
  return int64_at(s, i + 1, true), i + 9
end

local function lenenc_str(s, i)
  local n, j = lenenc(s, i)
  if n == nil then return nil, j end
  if j + n - 1 > #s then error(protocol_error("a value runs past its packet")) end
  return sub(s, j, j + n - 1), j + n
end

local function nul_str(s, i)
  local e = find(s, "\0", i, true)
  if not e then return sub(s, i), #s + 1 end
  return sub(s, i, e - 1), e + 1
end

local int64_t, uint64_t = ffi.typeof("int64_t"), ffi.typeof("uint64_t")

-- ---- writing fields --------------------------------------------------------

local function le16(n) return char(band(n, 0xff), band(rshift(n, 8), 0xff)) end
local function le24(n)
  return char(band(n, 0xff), band(rshift(n, 8), 0xff), band(rshift(n, 16), 0xff))
end
local function le32(n)
  return char(band(n, 0xff), band(rshift(n, 8), 0xff), band(rshift(n, 16), 0xff),
    band(rshift(n, 24), 0xff))
end

local scratch = ffi.new("union { double d; int64_t i; uint64_t u; uint8_t b[8]; }")
local function le64_int(v) scratch.i = v return ffi.string(scratch.b, 8) end
local function le64_uint(v) scratch.u = v return ffi.string(scratch.b, 8) end
local function le64_double(v) scratch.d = v return ffi.string(scratch.b, 8) end

local function lenenc_int(n)
  if n < 0xfb then return char(n) end
  if n < 0x10000 then return "\252" .. le16(n) end
  if n < 0x1000000 then return "\253" .. le24(n) end
  return "\254" .. le64_uint(n)
end

-- ---- the connection --------------------------------------------------------

local broken = util.broken -- fail for good: every later call says why

-- What building a result costs in memory beyond its bytes on the wire,
-- counted against max_buffer_size with them: a row's table and a slot per
-- value, a result's table. (A server sending endless "more results" of
-- 11-byte OK packets, each a table of its own, reached 253 MB of RSS under
-- a 50 MB limit when only the bytes counted.)
local ROW_COST, VALUE_COST, RESULT_COST = 64, 32, 256

local function charge(self, n)
  local used = self._used + n
  self._used = used
  if used > self._max_buffer then
    return core.error("buffer_full", format(
      "mysql: the result passed max_buffer_size (%d bytes)", self._max_buffer))
  end
end

-- One packet's payload (a payload of 16 MiB - 1 bytes continues in the
-- next packet). Counts what a result has read against max_buffer_size.
local function read_packet(self)
  local parts
  while true do
    local hdr, err = self._reader:take(4)
    if not hdr then return broken(self, err) end
    local a, b, c, seq = byte(hdr, 1, 4)
    if seq ~= self._seq then
      return broken(self, protocol_error(format("packet %d came where %d was expected",
        seq, self._seq)))
    end
    self._seq = band(seq + 1, 0xff)
    local len = a + b * 256 + c * 65536
    err = charge(self, len + 4)
    if err then return broken(self, err) end
    local body = ""
    if len > 0 then
      body, err = self._reader:take(len)
      if not body then return broken(self, err) end
    end
    if len < MAX_PAYLOAD then
      if parts then
        parts[#parts + 1] = body
        return concat(parts)
      end
      return body
    end
    parts = parts or {}
    parts[#parts + 1] = body
  end
end

-- Queue one packet (split every 16 MiB - 1 bytes); the caller writes.
local function packet(self, out, payload)
  local n, i = #payload, 1
  repeat
    local len = n - i + 1
    if len > MAX_PAYLOAD then len = MAX_PAYLOAD end
    out[#out + 1] = le24(len) .. char(self._seq)
    out[#out + 1] = len == n and payload or sub(payload, i, i + len - 1)
    self._seq = band(self._seq + 1, 0xff)
    i = i + len
    -- a payload of exactly a multiple of the maximum ends with an empty one
  until i > n and len < MAX_PAYLOAD
  return out
end

local function send(self, payload)
  local ok, err = self.stream:write(packet(self, {}, payload))
  if not ok then return broken(self, err) end
  return true
end

-- A new command: sequence ids start again at 0. Bytes the server sent
-- unasked (a second OK...) would be read as this command's answer: the
-- connection is broken instead.
local function command(self, payload)
  if util.failure(self) then return util.closed(self) end
  local n = self._reader:unread()
  if n > 0 then
    return broken(self, protocol_error(format("the server sent %d bytes nobody asked for", n)))
  end
  self._seq, self._used = 0, 0
  return send(self, payload)
end

local function parse_err(p)
  local code = u16(p, 2)
  if sub(p, 4, 4) == "#" then return mysql_error(code, sub(p, 5, 9), sub(p, 10)) end
  return mysql_error(code, "HY000", sub(p, 4))
end

-- An OK packet (header 0x00, or 0xfe ending a result when EOF is
-- deprecated).
local function parse_ok(p)
  local affected, i = lenenc(p, 2)
  local insert_id
  insert_id, i = lenenc(p, i)
  local status, warnings = u16(p, i), u16(p, i + 2)
  local info = #p > i + 3 and sub(p, i + 4) or nil
  return { affected_rows = affected, insert_id = insert_id, warnings = warnings,
    server_status = status, message = info ~= "" and info or nil }
end

-- What a packet is, by its header byte: the one place the protocol's
-- headers are told apart (as lua-resty-mysql's packet types).
--   "ERR"  0xff: an error (parse_err)
--   "OK"   0x00: an OK packet (parse_ok) -- or a binary row, which starts
--               with 0x00 too
--   "EOF"  0xfe in a packet shorter than a full one: an EOF, the OK that
--               ends a result when EOF is deprecated (end_status), or an
--               authentication switch
--   "LOCAL_INFILE" 0xfb where a result starts: LOAD DATA LOCAL
--   "MORE_DATA"    0x01 during authentication
--   "DATA" anything else: a column count, a column, a row, a handshake
-- A row may start with any byte but 0xff and a short packet's 0xfe, so a
-- reader of rows asks only for ERR and EOF and takes the rest as rows.
local function packet_kind(p)
  local b = byte(p, 1)
  if b == 0xff then return "ERR" end
  if b == 0x00 then return "OK" end
  if b == 0xfe and #p < MAX_PAYLOAD then return "EOF" end
  if b == 0xfb then return "LOCAL_INFILE" end
  if b == 0x01 then return "MORE_DATA" end
  return "DATA"
end

local function end_status(self, p)
  if self._deprecate_eof or #p > 5 then
    local ok = parse_ok(p)
    return ok.server_status, ok.warnings
  end
  return u16(p, 4), u16(p, 2)
end


W.protocol_error = protocol_error
W.u16 = u16
W.u32 = u32
W.int64_at = int64_at
W.lenenc = lenenc
W.lenenc_str = lenenc_str
W.nul_str = nul_str
W.le32 = le32
W.le64_int = le64_int
W.le64_uint = le64_uint
W.le64_double = le64_double
W.lenenc_int = lenenc_int
W.charge = charge
W.read_packet = read_packet
W.send = send
W.command = command
W.parse_err = parse_err
W.parse_ok = parse_ok
W.packet_kind = packet_kind
W.end_status = end_status
W.CLIENT_LONG_PASSWORD = CLIENT_LONG_PASSWORD
W.CLIENT_LONG_FLAG = CLIENT_LONG_FLAG
W.CLIENT_CONNECT_WITH_DB = CLIENT_CONNECT_WITH_DB
W.CLIENT_PROTOCOL_41 = CLIENT_PROTOCOL_41
W.CLIENT_SSL = CLIENT_SSL
W.CLIENT_TRANSACTIONS = CLIENT_TRANSACTIONS
W.CLIENT_SECURE_CONNECTION = CLIENT_SECURE_CONNECTION
W.CLIENT_MULTI_RESULTS = CLIENT_MULTI_RESULTS
W.CLIENT_PS_MULTI_RESULTS = CLIENT_PS_MULTI_RESULTS
W.CLIENT_PLUGIN_AUTH = CLIENT_PLUGIN_AUTH
W.CLIENT_PLUGIN_AUTH_LENENC = CLIENT_PLUGIN_AUTH_LENENC
W.CLIENT_DEPRECATE_EOF = CLIENT_DEPRECATE_EOF
W.SERVER_STATUS_IN_TRANS = SERVER_STATUS_IN_TRANS
W.SERVER_MORE_RESULTS_EXISTS = SERVER_MORE_RESULTS_EXISTS
W.COM_QUIT = COM_QUIT
W.COM_QUERY = COM_QUERY
W.COM_PING = COM_PING
W.COM_STMT_PREPARE = COM_STMT_PREPARE
W.COM_STMT_EXECUTE = COM_STMT_EXECUTE
W.COM_STMT_CLOSE = COM_STMT_CLOSE
W.COM_RESET_CONNECTION = COM_RESET_CONNECTION
W.MAX_PAYLOAD = MAX_PAYLOAD
W.MAX_STATEMENTS = MAX_STATEMENTS
W.T_TINY = T_TINY
W.T_SHORT = T_SHORT
W.T_LONG = T_LONG
W.T_FLOAT = T_FLOAT
W.T_DOUBLE = T_DOUBLE
W.T_TIMESTAMP = T_TIMESTAMP
W.T_LONGLONG = T_LONGLONG
W.T_INT24 = T_INT24
W.T_DATE = T_DATE
W.T_TIME = T_TIME
W.T_DATETIME = T_DATETIME
W.T_YEAR = T_YEAR
W.T_NEWDATE = T_NEWDATE
W.T_TIMESTAMP2 = T_TIMESTAMP2
W.T_DATETIME2 = T_DATETIME2
W.T_TIME2 = T_TIME2
W.UNSIGNED_FLAG = UNSIGNED_FLAG
W.CHARSETS = CHARSETS
W.u8p = u8p
W.i16p = i16p
W.u16p = u16p
W.i32p = i32p
W.u32p = u32p
W.f32p = f32p
W.f64p = f64p
W.cast = cast
W.int64_t = int64_t
W.uint64_t = uint64_t
W.broken = broken
W.ROW_COST = ROW_COST
W.VALUE_COST = VALUE_COST
W.RESULT_COST = RESULT_COST

return W
