--- MySQL results, squall.mysql's own (not a public module): column
-- definitions, text and binary values, rows, and every result of a command.
local bit = require "bit"
local core = require "squall.core"
local util = require "squall.util"

local type, tostring, tonumber, error, pcall = type, tostring, tonumber, error, pcall
local sub, byte, format, band = string.sub, string.byte, string.format, bit.band
local rshift = bit.rshift
local null = core.msgpack_null
local W = require "squall.mysql.wire"
local packet_kind = W.packet_kind
local protocol_error, u16, u32, int64_at = W.protocol_error, W.u16, W.u32, W.int64_at
local lenenc, lenenc_str, charge, read_packet = W.lenenc, W.lenenc_str, W.charge, W.read_packet
local parse_err, parse_ok, end_status = W.parse_err, W.parse_ok, W.end_status
local SERVER_MORE_RESULTS_EXISTS, T_TINY = W.SERVER_MORE_RESULTS_EXISTS, W.T_TINY
local T_SHORT, T_LONG, T_FLOAT, T_DOUBLE = W.T_SHORT, W.T_LONG, W.T_FLOAT, W.T_DOUBLE
local T_TIMESTAMP, T_LONGLONG, T_INT24, T_DATE = W.T_TIMESTAMP, W.T_LONGLONG, W.T_INT24, W.T_DATE
local T_TIME, T_DATETIME, T_YEAR, T_NEWDATE = W.T_TIME, W.T_DATETIME, W.T_YEAR, W.T_NEWDATE
local T_TIMESTAMP2, T_DATETIME2, T_TIME2 = W.T_TIMESTAMP2, W.T_DATETIME2, W.T_TIME2
local UNSIGNED_FLAG, u8p, i16p, u16p, i32p = W.UNSIGNED_FLAG, W.u8p, W.i16p, W.u16p, W.i32p
local u32p, f32p, f64p, cast, broken = W.u32p, W.f32p, W.f64p, W.cast, W.broken
local ROW_COST, VALUE_COST, RESULT_COST = W.ROW_COST, W.VALUE_COST, W.RESULT_COST

local R = {}

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
    if packet_kind(p) ~= "EOF" then
      return broken(self, protocol_error("no EOF after the columns"))
    end
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
    local kind = packet_kind(p)
    if kind == "ERR" then
      return nil, parse_err(p)
    end
    if kind == "EOF" then
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
  local kind = packet_kind(p)
  if kind == "OK" then
    local ok = parse_ok(p)
    return ok, ok.server_status
  elseif kind == "ERR" then
    return nil, parse_err(p)
  elseif kind == "LOCAL_INFILE" then
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

R.read_columns = read_columns
R.guarded = guarded
R.read_results = read_results

return R
