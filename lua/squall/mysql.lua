--- A MySQL and MariaDB client on squall.iostream: the client/server
-- protocol (protocol 41), mysql_native_password and caching_sha2_password,
-- TLS, the text protocol, server-side prepared statements with the binary
-- protocol (cached per connection), transactions and a pool that resets
-- a connection before its next user. Every call waits inside a coroutine,
-- as lua-resty-mysql does on OpenResty's cosockets.
--
--     local db = assert(mysql.connect({ host = "127.0.0.1", user = "u",
--       password = "p", database = "game" }))
--     local rows = db:query("SELECT id, name FROM t WHERE id > ?", 10)
--     rows[1].name, rows.columns          --> "x", { "id", "name" }
--
-- With arguments a query is a prepared statement: values are never spliced
-- into SQL text. See docs/api.md (squall.mysql) for the type mapping.
-- @module squall.mysql
local bit = require "bit"
local core = require "squall.core"
local ffi = require "ffi"
local gen = require "squall.gen"
local iostream = require "squall.iostream"
local pool = require "squall.pool"
local reader = require "squall.reader"
local util = require "squall.util"

local M = {}

local type, tostring, tonumber, error, select, pairs = type, tostring, tonumber, error,
  select, pairs
local setmetatable, xpcall, traceback, unpack = setmetatable, xpcall, debug.traceback, unpack
local sub, byte, char, find, format, rep = string.sub, string.byte, string.char, string.find,
  string.format, string.rep
local concat = table.concat
local band, bor, bxor, rshift = bit.band, bit.bor, bit.bxor, bit.rshift
local now = core.time

--- What SQL NULL is: the same NULL light userdata as msgpack.null,
-- redis.null and cjson.null.
M.null = core.msgpack_null
local null = M.null

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

--- A connection (from mysql.connect or a pool).
-- @type Connection
local Connection = util.class()

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
  if self._broken then return util.closed(self) end
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

-- The end of columns or rows: an EOF packet, or with
-- CLIENT_DEPRECATE_EOF an OK packet with the 0xfe header. Returns status.
local function is_end(p)
  return byte(p, 1) == 0xfe and #p < MAX_PAYLOAD
end

local function end_status(self, p)
  if self._deprecate_eof or #p > 5 then
    local ok = parse_ok(p)
    return ok.server_status, ok.warnings
  end
  return u16(p, 4), u16(p, 2)
end

-- ---- columns and values ----------------------------------------------------

local INTEGER = { [T_TINY] = true, [T_SHORT] = true, [T_LONG] = true, [T_INT24] = true,
  [T_LONGLONG] = true, [T_YEAR] = true }

local function parse_column(p)
  local i = 1
  for _ = 1, 4 do -- catalog, schema, table, org_table
    local n
    n, i = lenenc(p, i)
    i = i + (n or 0)
  end
  local name
  name, i = lenenc_str(p, i)
  local n
  n, i = lenenc(p, i) -- org_name
  i = i + (n or 0)
  i = i + 1 -- the length of the fixed fields (0x0c)
  return { name = name, charset = u16(p, i), length = u32(p, i + 2), type = byte(p, i + 6),
    flags = u16(p, i + 7), decimals = byte(p, i + 9), raw = p }
end

-- Text protocol values: every value arrives as its text. A number that
-- does not read as one (or an integer past 64 bits) is the server's
-- fault: a protocol error, never a value silently wrong or missing.
local decimal_integer = util.decimal_integer
local function text_value(col, s)
  local t = col.type
  local v = s
  if INTEGER[t] then
    v = decimal_integer(s, band(col.flags, UNSIGNED_FLAG) ~= 0)
  elseif t == T_FLOAT or t == T_DOUBLE then
    v = tonumber(s)
  end
  if v == nil then
    error(protocol_error(format("column %s (type %d) holds %q, not a number", col.name, t,
      sub(s, 1, 40))))
  end
  return v
end

-- Binary protocol dates and times, as MySQL's text format gives them
-- (fractional digits as the column declares).
local function frac(us, decimals)
  if decimals == 0 or decimals > 6 then
    return us ~= 0 and format(".%06d", us) or ""
  end
  return "." .. sub(format("%06d", us), 1, decimals)
end

local function binary_datetime(s, i, t, decimals)
  local len = byte(s, i)
  local y, mo, d, h, mi, sec, us = 0, 0, 0, 0, 0, 0, 0
  if len >= 4 then y, mo, d = u16(s, i + 1), byte(s, i + 3), byte(s, i + 4) end
  if len >= 7 then h, mi, sec = byte(s, i + 5, i + 7) end
  if len >= 11 then us = u32(s, i + 8) end
  local v
  if t == T_DATE or t == T_NEWDATE then
    v = format("%04d-%02d-%02d", y, mo, d)
  else
    v = format("%04d-%02d-%02d %02d:%02d:%02d", y, mo, d, h, mi, sec) .. frac(us, decimals)
  end
  return v, i + 1 + len
end

local function binary_time(s, i, decimals)
  local len = byte(s, i)
  local neg, days, h, mi, sec, us = 0, 0, 0, 0, 0, 0
  if len >= 8 then
    neg, days, h, mi, sec = byte(s, i + 1), u32(s, i + 2), byte(s, i + 6), byte(s, i + 7),
      byte(s, i + 8)
  end
  if len >= 12 then us = u32(s, i + 9) end
  return format("%s%02d:%02d:%02d", neg == 1 and "-" or "", days * 24 + h, mi, sec) ..
    frac(us, decimals), i + 1 + len
end

-- The fixed-width binary types: bytes each (read in place: checked first).
local WIDTH = { [T_TINY] = 1, [T_SHORT] = 2, [T_YEAR] = 2, [T_LONG] = 4, [T_INT24] = 4,
  [T_FLOAT] = 4, [T_LONGLONG] = 8, [T_DOUBLE] = 8 }

-- One binary protocol value at i: the value and the position after it.
local function binary_value(col, s, i)
  local t = col.type
  local unsigned = band(col.flags, UNSIGNED_FLAG) ~= 0
  local width = WIDTH[t]
  if width and i + width - 1 > #s then
    error(protocol_error("a binary row ends inside a value"))
  end
  local p = cast(u8p, s) + (i - 1)
  if t == T_LONG or t == T_INT24 then
    return tonumber(unsigned and cast(u32p, p)[0] or cast(i32p, p)[0]), i + 4
  elseif t == T_LONGLONG then
    return int64_at(s, i, unsigned), i + 8
  elseif t == T_TINY then
    local v = p[0]
    if not unsigned and v > 127 then v = v - 256 end
    return v, i + 1
  elseif t == T_SHORT or t == T_YEAR then
    return tonumber(unsigned and cast(u16p, p)[0] or cast(i16p, p)[0]), i + 2
  elseif t == T_DOUBLE then
    return tonumber(cast(f64p, p)[0]), i + 8
  elseif t == T_FLOAT then
    -- FLOAT's text form has 6 significant digits; so does this number
    return tonumber(format("%.6g", cast(f32p, p)[0])), i + 4
  elseif t == T_DATE or t == T_DATETIME or t == T_TIMESTAMP or t == T_NEWDATE
    or t == T_TIMESTAMP2 or t == T_DATETIME2 then
    return binary_datetime(s, i, t, col.decimals)
  elseif t == T_TIME or t == T_TIME2 then
    return binary_time(s, i, col.decimals)
  end
  local v, j = lenenc_str(s, i)
  if v == nil then
    error(protocol_error("a binary row ends inside a value"))
  end
  return v, j
end

-- ---- results ---------------------------------------------------------------

-- Read a result's column definitions (n of them). `cached`, the columns
-- of the same statement before, are reused when the server sent the same
-- bytes (the usual case), so a point select parses no column twice.
local function read_columns(self, n, cached)
  local cols = {}
  local same = cached and #cached == n
  for k = 1, n do
    local p, err = read_packet(self)
    if not p then return nil, err end
    if same and cached[k].raw == p then
      cols[k] = cached[k]
    else
      same = false
      cols[k] = parse_column(p)
    end
  end
  if same then cols = cached end
  if not self._deprecate_eof then
    local p, err = read_packet(self)
    if not p then return nil, err end
    if not is_end(p) then return broken(self, protocol_error("no EOF after the columns")) end
  end
  return cols
end

-- The columns' names, and their positions (compact_arrays' keys), made
-- once per set of columns (a cached statement's are reused).
local function names_of(cols)
  local names = cols.names
  if not names then
    names, cols.positions = {}, {}
    for k = 1, #cols do names[k], cols.positions[k] = cols[k].name, k end
    cols.names = names
  end
  return names
end

-- Rows until the end packet, each keyed by column name, or with
-- compact_arrays an array in column order. Returns rows, status; or nil,
-- err. A row with more or fewer values than columns is a protocol error.
local function read_rows(self, cols, binary)
  local rows, nrows = {}, 0
  local ncols = #cols
  local names = names_of(cols)
  local keys = self._compact and cols.positions or names
  local row_cost = ROW_COST + VALUE_COST * ncols
  while true do
    local p, err = read_packet(self)
    if not p then return nil, err end
    local first = byte(p, 1)
    if first == 0xff then
      return nil, parse_err(p)
    end
    if first == 0xfe and is_end(p) then
      local status = end_status(self, p)
      local cnames = {}
      for k = 1, ncols do cnames[k] = names[k] end
      rows.columns = cnames
      return rows, status
    end
    err = charge(self, row_cost)
    if err then return broken(self, err) end
    local row = {}
    local i
    if binary then
      -- 0x00, then a NULL bitmap with a 2-bit offset
      i = 2 + rshift(ncols + 9, 3)
      if i - 1 > #p then return broken(self, protocol_error("a binary row ends in its bitmap")) end
      for k = 1, ncols do
        local pos = k + 1
        if band(byte(p, 2 + rshift(pos, 3)), bit.lshift(1, band(pos, 7))) ~= 0 then
          row[keys[k]] = null
        else
          row[keys[k]], i = binary_value(cols[k], p, i)
        end
      end
    else
      i = 1
      for k = 1, ncols do
        local v
        v, i = lenenc_str(p, i)
        if i == nil then return broken(self, protocol_error("a text row ends inside a value")) end
        if v == nil then row[keys[k]] = null else row[keys[k]] = text_value(cols[k], v) end
      end
    end
    if i ~= #p + 1 then
      return broken(self, protocol_error(format("a row has more values than its %d columns",
        ncols)))
    end
    nrows = nrows + 1
    rows[nrows] = row
  end
end

-- One result: an OK table, or rows. Returns result, status; nil, err.
local function read_result(self, binary, cached)
  local p, err = read_packet(self)
  if not p then return nil, err end
  err = charge(self, RESULT_COST)
  if err then return broken(self, err) end
  local first = byte(p, 1)
  if first == 0x00 then
    local ok = parse_ok(p)
    return ok, ok.server_status
  elseif first == 0xff then
    return nil, parse_err(p)
  elseif first == 0xfb then
    return broken(self, protocol_error("the server asked for a local file (LOAD DATA LOCAL)"))
  end
  local n = lenenc(p, 1)
  local cols
  cols, err = read_columns(self, n, cached)
  if not cols then return nil, err end
  local rows, status = read_rows(self, cols, binary)
  if not rows then return nil, status end
  return rows, status, cols
end

-- What a pcall around a packet parser returned: its results, or, when a
-- malformed packet made it raise, a `protocol` error (the connection is
-- closed: where the next packet starts is no longer known).
local function guarded(self, ok, ...)
  if ok then return ... end
  local e = ...
  if type(e) ~= "table" then
    e = protocol_error("a malformed packet (" .. tostring(e) .. ")")
  end
  return broken(self, e)
end

-- Every result of a command: the first, with the others (a CALL's) in
-- `more`. Returns result, columns; or nil, err. A server error ends the
-- command: the connection stays usable.
local function read_results(self, binary, cached)
  local res, status, cols = guarded(self, pcall(read_result, self, binary, cached))
  if res == nil then return nil, status end
  self._status = status
  while band(status, SERVER_MORE_RESULTS_EXISTS) ~= 0 do
    local r
    r, status = guarded(self, pcall(read_result, self, binary))
    if r == nil then return nil, status end
    self._status = status
    res.more = res.more or {}
    res.more[#res.more + 1] = r
  end
  return res, cols
end

-- ---- authentication --------------------------------------------------------

local function xor_strings(a, b)
  local out = {}
  for k = 1, #a do
    out[k] = char(bxor(byte(a, k), byte(b, (k - 1) % #b + 1)))
  end
  return concat(out)
end

-- mysql_native_password: SHA1(pw) XOR SHA1(scramble .. SHA1(SHA1(pw))).
local function native_scramble(password, scramble)
  if password == "" then return "" end
  local h1 = core.digest("sha1", password)
  return xor_strings(h1, core.digest("sha1", scramble .. core.digest("sha1", h1)))
end

-- caching_sha2_password: SHA256(pw) XOR SHA256(SHA256(SHA256(pw)) .. scramble).
local function sha2_scramble(password, scramble)
  if password == "" then return "" end
  local h1 = core.digest("sha256", password)
  return xor_strings(h1, core.digest("sha256", core.digest("sha256", h1) .. scramble))
end
M._native_scramble, M._sha2_scramble = native_scramble, sha2_scramble

-- The answer to `plugin`'s challenge, or nil, why. The password goes in
-- clear (mysql_clear_password) only over TLS or a unix socket, as
-- libmysqlclient refuses it elsewhere.
local function auth_response(plugin, password, scramble, secure)
  if plugin == "mysql_native_password" then return native_scramble(password, scramble) end
  if plugin == "caching_sha2_password" then return sha2_scramble(password, scramble) end
  if plugin == "mysql_clear_password" then
    if not secure then
      return nil, "the server asked for the password in clear (mysql_clear_password); " ..
        "that needs ssl_options or a unix socket"
    end
    return password .. "\0"
  end
  return nil, format("authentication plugin %q is not supported", plugin)
end

-- Authentication takes at most a switch and caching_sha2_password's
-- exchanges (public key, then the encrypted password): a server asking
-- again and again is refused, not answered for ever.
local MAX_AUTH_ROUNDS = 8

-- After the handshake response: OK, or an auth switch, or
-- caching_sha2_password's more-data exchanges.
local function finish_auth(self, plugin, password, scramble)
  for _ = 1, MAX_AUTH_ROUNDS do
    local p, err = read_packet(self)
    if not p then return nil, err end
    local first = byte(p, 1)
    if first == 0x00 then
      return true
    elseif first == 0xff then
      return nil, parse_err(p)
    elseif first == 0xfe then
      if #p == 1 then
        return nil, core.error("mysql", "the server asked for the old (pre-4.1) password hash, " ..
          "which is not supported")
      end
      local data
      plugin, data = nul_str(p, 2)
      scramble = sub(p, data)
      if byte(scramble, -1) == 0 then scramble = sub(scramble, 1, -2) end
      local resp, why = auth_response(plugin, password, scramble, self._secure)
      if not resp then return nil, core.error("mysql", why) end
      local ok
      ok, err = send(self, resp)
      if not ok then return nil, err end
    elseif first == 0x01 and plugin == "caching_sha2_password" then
      local what = byte(p, 2)
      if what == 0x04 then
        -- full authentication: the password in clear over TLS or a unix
        -- socket, else encrypted with the server's RSA key
        local ok
        if self._secure then
          ok, err = send(self, password .. "\0")
        else
          ok, err = send(self, "\2")
          if not ok then return nil, err end
          local key
          key, err = read_packet(self)
          if not key then return nil, err end
          if byte(key, 1) ~= 0x01 then
            return nil, core.error("mysql", "the server sent no public key")
          end
          local enc, why = core.rsa_encrypt(sub(key, 2), xor_strings(password .. "\0", scramble))
          if not enc then
            return nil, core.error("mysql", "the server's public key is unusable: " .. why)
          end
          ok, err = send(self, enc)
        end
        if not ok then return nil, err end
      elseif what ~= 0x03 then -- 0x03: fast authentication succeeded; OK follows
        return nil, protocol_error("unexpected authentication data")
      end
    else
      return nil, protocol_error("unexpected packet during authentication")
    end
  end
  return nil, protocol_error(format("more than %d authentication round trips", MAX_AUTH_ROUNDS))
end

-- ---- connecting -------------------------------------------------------------

local CONNECT_KEYS = { host = true, port = true, path = true, user = true, password = true,
  database = true, charset = true, timeout = true, ssl_options = true,
  server_hostname = true, max_buffer_size = true, compact_arrays = true }

local function check_opts(opts, who, level)
  if type(opts) ~= "table" then error(who .. ": opts must be a table", level + 1) end
  for k in pairs(opts) do
    if not CONNECT_KEYS[k] then
      error(format("%s: unknown option %s", who, tostring(k)), level + 1)
    end
  end
  for _, k in ipairs({ "host", "path", "user", "password", "database", "charset",
    "server_hostname" }) do
    if opts[k] ~= nil and type(opts[k]) ~= "string" then
      error(format("%s: %s must be a string, got %s", who, k, util.describe(opts[k])),
        level + 1)
    end
  end
  if opts.charset and not CHARSETS[opts.charset] then
    error(format("%s: unknown charset %q (utf8mb4, utf8, latin1, ascii, binary)", who,
      opts.charset), level + 1)
  end
  if opts.port ~= nil then util.check_port(opts.port, level + 1) end
  if opts.compact_arrays ~= nil and type(opts.compact_arrays) ~= "boolean" then
    error(format("%s: compact_arrays must be a boolean, got %s", who,
      util.describe(opts.compact_arrays)), level + 1)
  end
  if opts.timeout ~= nil and (type(opts.timeout) ~= "number" or opts.timeout <= 0) then
    error(format("%s: timeout must be a positive number, got %s", who,
      util.describe(opts.timeout)), level + 1)
  end
end

local function handshake(self, opts)
  local p, err = read_packet(self)
  if not p then return nil, err end
  if byte(p, 1) == 0xff then return nil, parse_err(p) end
  if byte(p, 1) ~= 10 then
    return nil, protocol_error(format("unsupported protocol version %d", byte(p, 1)))
  end
  local version, i = nul_str(p, 2)
  self.server_version = version:gsub("^5%.5%.5%-", "") -- MariaDB's replication prefix
  self.thread_id = u32(p, i)
  local scramble = sub(p, i + 4, i + 11)
  local caps = u16(p, i + 13)
  local auth_len
  if #p > i + 18 then
    caps = caps + u16(p, i + 18) * 65536
    auth_len = byte(p, i + 20)
  end
  local plugin = "mysql_native_password"
  if auth_len then
    local rest_len = math.max(13, auth_len - 8)
    scramble = scramble .. sub(p, i + 31, i + 31 + rest_len - 2) -- without its NUL
    if band(caps, CLIENT_PLUGIN_AUTH) ~= 0 then
      plugin = nul_str(p, i + 31 + rest_len)
    end
  end
  if band(caps, CLIENT_PROTOCOL_41) == 0 then
    return nil, protocol_error("the server does not speak protocol 4.1")
  end

  local want = bor(CLIENT_LONG_PASSWORD, CLIENT_LONG_FLAG, CLIENT_PROTOCOL_41,
    CLIENT_TRANSACTIONS, CLIENT_SECURE_CONNECTION, CLIENT_MULTI_RESULTS,
    CLIENT_PS_MULTI_RESULTS, CLIENT_PLUGIN_AUTH, CLIENT_PLUGIN_AUTH_LENENC, CLIENT_DEPRECATE_EOF)
  if opts.database then want = bor(want, CLIENT_CONNECT_WITH_DB) end
  local client_caps = band(want, caps)
  if band(caps, CLIENT_DEPRECATE_EOF) ~= 0 then self._deprecate_eof = true end
  local charset = CHARSETS[opts.charset or "utf8mb4"]
  self._secure = opts.path ~= nil

  if opts.ssl_options then
    if band(caps, CLIENT_SSL) == 0 then
      return nil, core.error("tls", "the server does not support TLS")
    end
    client_caps = bor(client_caps, CLIENT_SSL)
    local ok
    ok, err = send(self, le32(client_caps) .. le32(MAX_PAYLOAD) .. char(charset) .. rep("\0", 23))
    if not ok then return nil, err end
    ok, err = self.stream:start_tls(false, opts.ssl_options,
      opts.server_hostname or opts.host or "127.0.0.1")
    if not ok then return broken(self, err) end
    self._secure = true
  end

  local password = opts.password or ""
  local resp = auth_response(plugin, password, scramble, self._secure)
  if not resp then -- answer with the native hash; the server switches us
    plugin = "mysql_native_password"
    resp = native_scramble(password, scramble)
  end
  local parts = { le32(client_caps), le32(MAX_PAYLOAD), char(charset), rep("\0", 23),
    (opts.user or "") .. "\0" }
  if band(client_caps, CLIENT_PLUGIN_AUTH_LENENC) ~= 0 then
    parts[#parts + 1] = lenenc_int(#resp) .. resp
  else
    parts[#parts + 1] = char(#resp) .. resp
  end
  if band(client_caps, CLIENT_CONNECT_WITH_DB) ~= 0 then
    parts[#parts + 1] = opts.database .. "\0"
  end
  if band(client_caps, CLIENT_PLUGIN_AUTH) ~= 0 then parts[#parts + 1] = plugin .. "\0" end
  local ok
  ok, err = send(self, concat(parts))
  if not ok then return nil, err end
  return finish_auth(self, plugin, password, scramble)
end

--- Connect (inside a coroutine) and authenticate.
-- @tparam table opts `host` ("127.0.0.1"), `port` (3306) or `path` (a unix
--   socket), `user`, `password`, `database`, `charset` ("utf8mb4"),
--   `timeout` (seconds: for the whole connect, TLS and authentication
--   included, then for each wait after), `ssl_options` (TLS, as
--   iostream's), `server_hostname`, `max_buffer_size` (the largest result,
--   default 100 MiB: its bytes and an estimate of the tables built for
--   it), `compact_arrays` (rows as arrays in column order)
-- @treturn Connection
-- @return nil, err: I/O kinds as iostream.connect, `mysql` (a wrong
--   password: err.code 1045), `tls`, `protocol`, `timeout`
function M.connect(opts)
  opts = opts or {}
  check_opts(opts, "mysql.connect", 2)
  util.need_coroutine("mysql.connect", 2)
  local max_buffer = opts.max_buffer_size or 104857600
  local deadline = opts.timeout and now() + opts.timeout
  local stream, err
  local sopts = { max_buffer_size = max_buffer + 65536, timeout = opts.timeout }
  if opts.path then
    stream, err = iostream.connect_unix(opts.path, sopts)
  else
    stream, err = iostream.connect(opts.host or "127.0.0.1", opts.port or 3306, sopts)
  end
  if not stream then return nil, err end
  stream:set_nodelay(true)
  if opts.timeout then stream:set_timeout(opts.timeout) end
  return M._over_stream(stream, opts, deadline)
end

-- The protocol over a connected stream (or anything with its read_bytes,
-- write, start_tls and close: the fuzz target replays recorded bytes).
-- With a deadline (core.time()), the handshake must be done by then.
function M._over_stream(stream, opts, deadline)
  -- packets are cut out of one buffered read: a point select's four
  -- packets cost one read, not eight
  local self = setmetatable({ stream = stream, _reader = reader.new(stream), _seq = 0, _used = 0,
    _max_buffer = opts.max_buffer_size or 104857600, _stmts = {}, _nstmts = 0, _status = 0,
    _compact = opts.compact_arrays == true }, Connection)
  local finished, ok, err = false, nil, nil
  local function run()
    ok, err = guarded(self, pcall(handshake, self, opts))
    finished = true
  end
  if deadline then
    gen.with_timeout(math.max(0, deadline - now()), run)
  else
    run()
  end
  if not finished then
    err = core.error("timeout", format("mysql: connecting took longer than timeout (%g s)",
      opts.timeout))
  end
  if not ok then
    broken(self, err)
    return nil, err
  end
  return self
end

-- ---- queries ---------------------------------------------------------------

-- Bind one argument: its type (2 bytes) and value; nil for NULL.
local function bind(v, k)
  local t = type(v)
  if t == "string" then
    return "\253\0", lenenc_int(#v) .. v
  elseif t == "number" then
    if v % 1 == 0 and v >= -9223372036854775808 and v < 9223372036854775808 then
      return "\8\0", le64_int(v)
    end
    return "\5\0", le64_double(v)
  elseif t == "boolean" then
    return "\1\0", v and "\1" or "\0"
  elseif t == "cdata" then
    if ffi.istype(uint64_t, v) then return "\8\128", le64_uint(v) end
    if ffi.istype(int64_t, v) then return "\8\0", le64_int(v) end
  elseif v == nil or v == null then
    return "\6\0", nil
  end
  error(format("query: argument %d must be nil, mysql.null, a boolean, a number, " ..
    "an int64/uint64 cdata or a string, got %s", k, util.describe(v)), 4)
end

local function close_statement(self, sql)
  local st = self._stmts[sql]
  if not st then return end
  self._stmts[sql] = nil
  self._nstmts = self._nstmts - 1
  -- COM_STMT_CLOSE has no answer
  self._seq = 0
  send(self, COM_STMT_CLOSE .. le32(st.id))
end

-- COM_STMT_PREPARE's answer: the statement, its parameter and column
-- definitions (with EOFs unless deprecated).
local function read_prepared(self, sql)
  local p, err = read_packet(self)
  if not p then return nil, err end
  if byte(p, 1) == 0xff then return nil, parse_err(p) end
  if byte(p, 1) ~= 0 then return broken(self, protocol_error("a bad COM_STMT_PREPARE answer")) end
  local st = { id = u32(p, 2), ncols = u16(p, 6), nparams = u16(p, 8), sql = sql }
  if st.nparams > 0 then
    local cols
    cols, err = read_columns(self, st.nparams)
    if not cols then return nil, err end
  end
  if st.ncols > 0 then
    local cols
    cols, err = read_columns(self, st.ncols)
    if not cols then return nil, err end
    st.columns = cols
  end
  return st
end

local function prepare(self, sql)
  local st = self._stmts[sql]
  if st then return st end
  local ok, err = command(self, COM_STMT_PREPARE .. sql)
  if not ok then return nil, err end
  st, err = guarded(self, pcall(read_prepared, self, sql))
  if not st then return nil, err end
  if self._nstmts >= MAX_STATEMENTS then
    close_statement(self, (next(self._stmts)))
  end
  self._stmts[sql] = st
  self._nstmts = self._nstmts + 1
  return st
end

local function execute(self, st, n, ...)
  if n ~= st.nparams then
    error(format("query: the statement has %d placeholders, got %d arguments", st.nparams, n), 3)
  end
  local parts = { COM_STMT_EXECUTE, le32(st.id), "\0\1\0\0\0" } -- no cursor, 1 iteration
  if n > 0 then
    local bitmap, types, values = {}, {}, {}
    for k = 1, rshift(n + 7, 3) do bitmap[k] = 0 end
    for k = 1, n do
      local tcode, value = bind(select(k, ...), k)
      types[k] = tcode
      if value == nil then
        local b = rshift(k - 1, 3) + 1
        bitmap[b] = bor(bitmap[b], bit.lshift(1, band(k - 1, 7)))
      else
        values[#values + 1] = value
      end
    end
    for k = 1, #bitmap do bitmap[k] = char(bitmap[k]) end
    parts[4] = concat(bitmap)
    parts[5] = "\1" -- new parameters bound: types follow
    parts[6] = concat(types)
    parts[7] = concat(values)
  end
  local ok, err = command(self, concat(parts))
  if not ok then return nil, err end
  local res, cols = read_results(self, true, st.columns)
  if res and cols then st.columns = cols end
  return res, cols
end

--- Run a statement. Without arguments it goes as text (COM_QUERY); with
-- arguments (any, nil included) as a prepared statement, prepared once
-- per connection and cached.
-- @treturn table rows (`rows[i].name`, `rows.columns` the names in order)
--   for a result set; for others `affected_rows`, `insert_id`,
--   `warnings`. Results after the first (a CALL's) are in `.more`.
-- @return nil, err: kind `mysql` (`err.code`, `err.sqlstate`; the
--   connection stays usable), or I/O kinds (`closed`, `timeout`,
--   `buffer_full`, `protocol`: the connection is closed then)
function Connection:query(sql, ...)
  if type(sql) ~= "string" then
    error("query: sql must be a string, got " .. util.describe(sql), 2)
  end
  local n = select("#", ...)
  if n == 0 then
    local ok, err = command(self, COM_QUERY .. sql)
    if not ok then return nil, err end
    local res
    res, err = read_results(self, false)
    if res == nil then return nil, err end
    return res
  end
  local st, err = prepare(self, sql)
  if not st then return nil, err end
  local res
  res, err = execute(self, st, n, ...)
  if res == nil then return nil, err end
  return res
end

--- Run fn(db) inside START TRANSACTION: COMMIT when it returns a true
-- value (its results are returned), ROLLBACK when it returns nil/false
-- (its `nil, err` is returned) or raises (then `nil, err` of kind
-- `transaction` with the error and its traceback).
function Connection:transaction(fn)
  util.check_callable(fn, 2)
  local ok, err = self:query("START TRANSACTION")
  if not ok then return nil, err end
  local raised
  local res = util.pack(xpcall(fn, function(e)
    raised = e
    local described, text = pcall(tostring, e) -- (a table's __tostring may raise)
    return traceback(described and text or type(e), 2)
  end, self))
  if res[1] and res[2] then
    ok, err = self:query("COMMIT")
    if not ok then return nil, err end
    return unpack(res, 2, res.n)
  end
  if not self._broken then self:query("ROLLBACK") end
  if not res[1] then
    local e = core.error("transaction", "the transaction's function raised: " .. tostring(res[2]))
    e.cause, e.traceback = raised, res[2]
    return nil, e
  end
  return res[2], res[3]
end

--- True while a transaction is open (the server's last status said so).
function Connection:in_transaction()
  return band(self._status, SERVER_STATUS_IN_TRANS) ~= 0
end

-- A command answered by OK: true, or nil, err.
local function simple(self, com)
  local ok, err = command(self, com)
  if not ok then return nil, err end
  local res
  res, err = read_results(self, false)
  if not res then return nil, err end
  return true
end

--- COM_PING: true, or nil, err.
function Connection:ping()
  return simple(self, COM_PING)
end

--- Reset the session (COM_RESET_CONNECTION): roll back, drop temporary
-- tables, user variables and prepared statements, restore the session
-- variables; the connection keeps its user, database and charset.
function Connection:reset()
  self._stmts, self._nstmts = {}, 0 -- the server drops every prepared statement
  return simple(self, COM_RESET_CONNECTION)
end

--- Close the connection (COM_QUIT, then the socket).
function Connection:close()
  if not self._broken then
    self._seq = 0
    send(self, COM_QUIT)
    util.close_connection(self)
  end
end

--- True once closed (by either side, or a failure).
function Connection:closed()
  return self._broken ~= nil or self.stream:closed()
end

-- ---- the pool -------------------------------------------------------------

--- A pool of at most `size` connections (default 16; `queue_timeout`
-- default 10 s; the other options are mysql.connect's). A connection is
-- reset (COM_RESET_CONNECTION) before its next user after `with` and
-- `transaction`, and after a `query` that left a transaction open or was
-- not a plain SELECT, INSERT, UPDATE, DELETE or REPLACE.
-- @type Pool
local Pool = pool.Pool:extend()

local function reset(db) return db:reset() end

function M.pool(opts)
  local size, qt, conn_opts = pool.options(opts, "mysql.pool", 2)
  check_opts(conn_opts, "mysql.pool", 2)
  local p = pool.new({ size = size, queue_timeout = qt, reset = reset,
    connect = function() return M.connect(conn_opts) end })
  return setmetatable(p, Pool)
end

local PLAIN = { select = true, insert = true, update = true, delete = true, replace = true }

--- Run one statement on a pooled connection (as Connection:query).
function Pool:query(sql, ...)
  if type(sql) ~= "string" then
    error("query: sql must be a string, got " .. util.describe(sql), 2)
  end
  util.need_coroutine("pool:query", 2)
  local db, err = self:acquire()
  if not db then return nil, err end
  local res = util.pack(pcall(db.query, db, sql, ...))
  local how
  if not res[1] then
    how = "discard"
  elseif db:in_transaction() then
    how = "reset"
  else
    local word = sql:match("^%s*(%a+)")
    if not word or not PLAIN[word:lower()] then how = "reset" end
  end
  self:release(db, how)
  if not res[1] then error(res[2], 0) end
  return res[2], res[3]
end

--- Run fn(db) with a connection, then reset it and give it back.
function Pool:with(fn)
  util.check_callable(fn, 2)
  util.need_coroutine("pool:with", 2)
  return pool.Pool.with(self, fn, "reset")
end

--- db:transaction(fn) on a pooled connection.
function Pool:transaction(fn)
  util.check_callable(fn, 2)
  util.need_coroutine("pool:transaction", 2)
  return pool.Pool.with(self, function(db) return db:transaction(fn) end, "reset")
end

M.Connection = Connection
return M
