--- The compiled MessagePack codec: the common values, decoded and encoded
-- in Lua over FFI memory, so LuaJIT compiles them into the caller's trace
-- (every call into the C codec ends a trace, and building values through
-- the C API costs more than the decoding). Anything else is left to the
-- C codec (runtime/msgpack*.c), which has the last word: these functions
-- return nothing (decode) or false (encode) for what they do not take,
-- and the caller asks C, which decodes or encodes it or says why not.
-- Where both take a value they agree exactly: the same Lua values from
-- the same bytes, the same bytes from the same values. The fuzz target
-- (tests/fuzz/msgpack_fuzz.c) holds them to it.
--
-- Decoded here: integers exact as Lua numbers (|v| <= 2^53), float 32 and
-- 64, nil (as msgpack.null), booleans, str and bin (as strings), arrays
-- and maps nested at most MAX_DEPTH deep. Left to C: ext, integers past
-- 2^53, deeper nesting, a NaN map key, invalid or truncated bytes.
-- Encoded here: nil, msgpack.null, booleans, numbers, strings, and tables
-- with no metatable or msgpack's array (without n), map and bin marks.
-- Left to C: ext, 64-bit cdata integers, other metatables, deeper nesting
-- (and so cycles), whatever cannot be encoded at all.
--
-- Internal to squall.msgpack and squall.rpc.
-- @module squall.msgpack.fast
local ffi = require "ffi"
local bit = require "bit"
local new_tab = require "table.new"
local marks = require "squall.msgpack.marks"

local M = {}

local band, rshift = bit.band, bit.rshift
local ffi_string, ffi_copy = ffi.string, ffi.copy
local type, next, getmetatable, setmetatable = type, next, getmetatable, setmetatable
local floor = math.floor
local null, array_mt, map_mt, bin_mt = marks.null, marks.array_mt, marks.map_mt, marks.bin_mt

--- Containers nested deeper than this are left to C (which allows 200).
M.MAX_DEPTH = 32
local MAX_DEPTH = M.MAX_DEPTH

local TWO32, TWO21 = 4294967296, 2097152

-- ---- decoding -------------------------------------------------------------
-- Each reader takes the bytes p[i, n) (p a uint8_t pointer, i 0-based) and
-- returns the value and the position after it, or nothing.

-- Floats from their big-endian bytes, and back: in C (runtime/msgpack.c
-- says why), called through the FFI, which the JIT compiles as a call.
pcall(ffi.cdef, [[
double squall_mp_ffi_float64(const unsigned char *p);
double squall_mp_ffi_float32(const unsigned char *p);
void squall_mp_ffi_put_float64(unsigned char *p, double d);
]])
local C = ffi.C
local float64, float32, put_float64 = C.squall_mp_ffi_float64, C.squall_mp_ffi_float32,
  C.squall_mp_ffi_put_float64

local function be16(p, i)
  return p[i] * 256 + p[i + 1]
end

local function be32(p, i)
  return ((p[i] * 256 + p[i + 1]) * 256 + p[i + 2]) * 256 + p[i + 3]
end

-- A 64-bit integer from its halves, when exact as a number: |v| <= 2^53.
local function uint64(p, i)
  local hi, lo = be32(p, i), be32(p, i + 4)
  if hi < TWO21 or (hi == TWO21 and lo == 0) then return hi * TWO32 + lo end
end

local function int64(p, i)
  local hi, lo = be32(p, i), be32(p, i + 4)
  if hi < 2147483648 then
    if hi < TWO21 or (hi == TWO21 and lo == 0) then return hi * TWO32 + lo end
    return
  end
  hi = hi - TWO32 -- negative: exact down to -2^53
  if hi > -TWO21 or (hi == -TWO21 and lo == 0) then return hi * TWO32 + lo end
end

local value

local function array(p, i, n, count, depth)
  -- each item takes a byte at least: a count the input cannot hold is C's
  if depth > MAX_DEPTH or count > n - i then return end
  local t = new_tab(count, 0)
  for k = 1, count do
    local v
    v, i = value(p, i, n, depth + 1)
    if i == nil then return end
    t[k] = v
  end
  return t, i
end

local function map(p, i, n, count, depth)
  if depth > MAX_DEPTH or count > (n - i) / 2 then return end
  local t = new_tab(0, count)
  if count == 0 then return setmetatable(t, map_mt), i end
  for _ = 1, count do
    local k, v
    k, i = value(p, i, n, depth + 1)
    if i == nil or k ~= k then return end -- a NaN key: C says why not
    v, i = value(p, i, n, depth + 1)
    if i == nil then return end
    t[k] = v
  end
  return t, i
end

local function bytes(p, i, n, len)
  if len > n - i then return end
  return ffi_string(p + i, len), i + len
end

-- The value at p[i] (n > i is the caller's to check for the first byte).
function value(p, i, n, depth)
  if i >= n then return end
  local t = p[i]
  i = i + 1
  if t < 0x80 then return t, i end
  if t >= 0xe0 then return t - 256, i end
  if t >= 0xa0 and t < 0xc0 then return bytes(p, i, n, t - 0xa0) end
  if t < 0x90 then return map(p, i, n, t - 0x80, depth) end
  if t < 0xa0 then return array(p, i, n, t - 0x90, depth) end
  local left = n - i
  if t == 0xc0 then return null, i end
  if t == 0xc2 then return false, i end
  if t == 0xc3 then return true, i end
  if t == 0xcb then
    if left >= 8 then return float64(p + i), i + 8 end
  elseif t == 0xcc then
    if left >= 1 then return p[i], i + 1 end
  elseif t == 0xcd then
    if left >= 2 then return be16(p, i), i + 2 end
  elseif t == 0xce then
    if left >= 4 then return be32(p, i), i + 4 end
  elseif t == 0xcf then
    if left >= 8 then
      local v = uint64(p, i)
      if v then return v, i + 8 end
    end
  elseif t == 0xd0 then
    if left >= 1 then
      local v = p[i]
      return v < 0x80 and v or v - 0x100, i + 1
    end
  elseif t == 0xd1 then
    if left >= 2 then
      local v = be16(p, i)
      return v < 0x8000 and v or v - 0x10000, i + 2
    end
  elseif t == 0xd2 then
    if left >= 4 then
      local v = be32(p, i)
      return v < 0x80000000 and v or v - TWO32, i + 4
    end
  elseif t == 0xd3 then
    if left >= 8 then
      local v = int64(p, i)
      if v then return v, i + 8 end
    end
  elseif t == 0xca then
    if left >= 4 then return float32(p + i), i + 4 end
  elseif t == 0xd9 or t == 0xc4 then
    if left >= 1 then return bytes(p, i + 1, n, p[i]) end
  elseif t == 0xda or t == 0xc5 then
    if left >= 2 then return bytes(p, i + 2, n, be16(p, i)) end
  elseif t == 0xdb or t == 0xc6 then
    if left >= 4 then return bytes(p, i + 4, n, be32(p, i)) end
  elseif t == 0xdc then
    if left >= 2 then return array(p, i + 2, n, be16(p, i), depth) end
  elseif t == 0xdd then
    if left >= 4 then return array(p, i + 4, n, be32(p, i), depth) end
  elseif t == 0xde then
    if left >= 2 then return map(p, i + 2, n, be16(p, i), depth) end
  elseif t == 0xdf then
    if left >= 4 then return map(p, i + 4, n, be32(p, i), depth) end
  end
  -- ext, 0xc1, a 64-bit integer past 2^53, or too few bytes: C's
end

--- The value at p[i] (0-based) of the n bytes at p, as the C decoder
-- gives it: the value and the position after it; nothing to leave it to C.
-- `depth` is the nesting the value is at (1 at the top).
M.value = value

-- ---- encoding ---------------------------------------------------------------
-- Into one buffer, grown as needed and kept: nothing below calls out (no
-- metamethod runs), so one encoding ends before the next begins.

local buf_cap = 4096
local buf = ffi.new("uint8_t[?]", buf_cap)
local at = 0
local KEEP = 65536 -- a buffer grown past this is dropped after its use

local function room(k)
  if at + k <= buf_cap then return end
  local cap = buf_cap
  while at + k > cap do cap = cap * 2 end
  local nbuf = ffi.new("uint8_t[?]", cap)
  ffi_copy(nbuf, buf, at)
  buf, buf_cap = nbuf, cap
end

local function put1(b)
  room(1)
  buf[at] = b
  at = at + 1
end

-- A type byte and the low `k` bytes of v (k <= 4), big-endian.
local function put_be(t, v, k)
  room(5)
  buf[at] = t
  for j = 1, k do buf[at + j] = band(rshift(v, 8 * (k - j)), 0xff) end
  at = at + 1 + k
end

-- A type byte and the 8 bytes of hi * 2^32 + lo.
local function put_be64(t, hi, lo)
  room(9)
  buf[at] = t
  for j = 1, 4 do
    buf[at + j] = band(rshift(hi, 8 * (4 - j)), 0xff)
    buf[at + 4 + j] = band(rshift(lo, 8 * (4 - j)), 0xff)
  end
  at = at + 9
end

local function put_double(d)
  room(9)
  buf[at] = 0xcb
  put_float64(buf + at + 1, d)
  at = at + 9
end

-- As msgpack_encode.c's put_number: an integral number in [-2^63, 2^64)
-- as the shortest integer, any other as float 64.
local function put_number(d)
  if d ~= floor(d) then return put_double(d) end
  if d >= 0 then
    if d < 0x80 then return put1(d) end
    if d <= 0xff then return put_be(0xcc, d, 1) end
    if d <= 0xffff then return put_be(0xcd, d, 2) end
    if d < TWO32 then return put_be(0xce, d, 4) end
    if d < 18446744073709551616 then
      local hi = floor(d / TWO32)
      return put_be64(0xcf, hi, d - hi * TWO32)
    end
    return put_double(d)
  end
  if d >= -32 then return put1(d + 0x100) end
  if d >= -0x80 then return put_be(0xd0, d + 0x100, 1) end
  if d >= -0x8000 then return put_be(0xd1, d + 0x10000, 2) end
  if d >= -0x80000000 then return put_be(0xd2, d + TWO32, 4) end
  if d >= -9223372036854775808 then
    local hi = floor(d / TWO32) -- in [-2^31, 0): its two's complement word
    return put_be64(0xd3, hi + TWO32, d - hi * TWO32)
  end
  return put_double(d)
end

-- A str, bin, array or map header for length len: the fix form below
-- fix_max (fix 0: none), then the 8-bit form (t8 0: none), 16 and 32.
-- false past 2^32-1: C raises for it.
local function put_len(len, fix, fix_max, t8, t16, t32)
  if fix ~= 0 and len <= fix_max then
    put1(fix + len)
  elseif t8 ~= 0 and len <= 0xff then
    put_be(t8, len, 1)
  elseif len <= 0xffff then
    put_be(t16, len, 2)
  elseif len < TWO32 then
    put_be(t32, len, 4)
  else
    return false
  end
  return true
end

local function put_bytes(s, len)
  room(len)
  ffi_copy(buf + at, s, len)
  at = at + len
end

local put_value

local function put_array(t, count, depth)
  if not put_len(count, 0x90, 15, 0, 0xdc, 0xdd) then return false end
  for k = 1, count do
    if not put_value(t[k], depth + 1) then return false end
  end
  return true
end

local function put_map(t, count, depth)
  if not put_len(count, 0x80, 15, 0, 0xde, 0xdf) then return false end
  for k, v in next, t do
    if not put_value(k, depth + 1) or not put_value(v, depth + 1) then return false end
  end
  return true
end

-- As msgpack_encode.c's enc_table: an array when the keys are exactly
-- 1..n (an empty table too), else a map; in both, the keys in next()'s
-- order, which is lua_next's.
local function put_table(t, depth)
  if depth > MAX_DEPTH then return false end
  local mt = getmetatable(t)
  if mt ~= nil then
    if mt == map_mt then
      local count = 0
      for _ in next, t do count = count + 1 end
      return put_map(t, count, depth)
    elseif mt == array_mt then
      return put_array(t, #t, depth)
    elseif mt == bin_mt then
      local s = t[1]
      if type(s) ~= "string" then return false end
      local len = #s
      if not put_len(len, 0, 0, 0xc4, 0xc5, 0xc6) then return false end
      put_bytes(s, len)
      return true
    end
    return false
  end
  local count, max, is_array = 0, 0, true
  for k in next, t do
    count = count + 1
    if is_array then
      if type(k) ~= "number" or k < 1 or k ~= floor(k) then
        is_array = false
      elseif k > max then
        max = k
      end
    end
  end
  if is_array and max == count then return put_array(t, count, depth) end
  return put_map(t, count, depth)
end

function put_value(v, depth)
  local tv = type(v)
  if tv == "number" then
    put_number(v)
  elseif tv == "string" then
    local len = #v
    if not put_len(len, 0xa0, 31, 0xd9, 0xda, 0xdb) then return false end
    put_bytes(v, len)
  elseif tv == "table" then
    return put_table(v, depth)
  elseif tv == "boolean" then
    put1(v and 0xc3 or 0xc2)
  elseif tv == "nil" or (tv == "userdata" and v == null) then
    put1(0xc0)
  else
    return false
  end
  return true
end

local function reset()
  if buf_cap > KEEP then buf, buf_cap = ffi.new("uint8_t[?]", 4096), 4096 end
  at = 0
end

--- The encoding of v as a string, or nil to leave it to C.
function M.encode(v)
  reset()
  if not put_value(v, 1) then return nil end
  return ffi_string(buf, at)
end

--- Encode an array of n (at most 4) values a, b, c, d into the buffer:
-- its length, or nil to leave it to C; `M.buffer()` then has the bytes
-- until the next encoding. (The RPC messages: n is 3 or 4.)
function M.encode_array(n, a, b, c, d)
  reset()
  put1(0x90 + n)
  if n >= 1 and not put_value(a, 2) then return nil end
  if n >= 2 and not put_value(b, 2) then return nil end
  if n >= 3 and not put_value(c, 2) then return nil end
  if n >= 4 and not put_value(d, 2) then return nil end
  return at
end

--- The encoding buffer (a uint8_t pointer).
function M.buffer()
  return buf
end

return M
