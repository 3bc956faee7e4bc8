--- JSON: decoding by Debian's lua-cjson, encoding here, exactly.
--
--     local s = json.encode({ id = 9007199254740993ULL, ratio = 1 / 3 })
--     local v, err = json.decode(s)
--
-- lua-cjson 2.1.0 (Debian's) decodes fast and correctly, but encodes
-- numbers with at most 14 significant digits: 123456789012345 becomes
-- 1.2345678901234e+14 and 1/3 loses three digits. Peers that read what
-- Squall writes (Celery's Python workers, browsers) get every number
-- exactly from this encoder instead; strings are escaped by cjson.
--
-- Tables: keys exactly 1..n encode as an array, an empty table as `[]`,
-- anything else as an object (number keys as their decimal text, as
-- Python's json does). `msgpack.map(t)` and `msgpack.array(t, n)` mark a
-- table as they do for MessagePack (so `msgpack.map({})` is `{}`).
-- `json.null` (the same value as cjson.null, msgpack.null, redis.null)
-- is null, and decodes from it. int64/uint64 cdata encode exactly.
-- @module squall.json
local cjson = require("cjson").new() -- a private instance: its settings are ours
local ffi = require "ffi"

local M = {}

local type, pairs, tostring, tonumber, error = type, pairs, tostring, tonumber, error
local getmetatable, pcall = getmetatable, pcall
local format, concat, huge = string.format, table.concat, math.huge
local encode_string = cjson.encode
local int64_t, uint64_t = ffi.typeof("int64_t"), ffi.typeof("uint64_t")

--- null: cjson.null, msgpack.null and redis.null are this one value.
M.null = cjson.null

cjson.decode_max_depth(200)

-- The shortest of 15, 16 or 17 significant digits that reads back as the
-- same number (Python's repr gives the same text for most).
local function number(n)
  if n ~= n or n == huge or n == -huge then
    error("json.encode: " .. tostring(n) .. " has no JSON form", 0)
  end
  if n % 1 == 0 and n > -9.2233720368547758e18 and n < 9.2233720368547758e18 then
    return format("%d", n)
  end
  local s = format("%.15g", n)
  if tonumber(s) ~= n then
    s = format("%.16g", n)
    if tonumber(s) ~= n then s = format("%.17g", n) end
  end
  return s
end

local encode_value

-- The length of `t` when its keys are exactly 1..n (0 for an empty
-- table), else nil.
local function array_length(t)
  local n = 0
  for k in pairs(t) do
    if type(k) ~= "number" or k < 1 or k % 1 ~= 0 then return nil end
    if k > n then n = k end
  end
  for i = 1, n do
    if t[i] == nil then return nil end
  end
  return n
end

local function encode_table(t, out, depth)
  if depth > 200 then error("json.encode: tables nested deeper than 200 (or a cycle)", 0) end
  local mt = getmetatable(t)
  local mark = mt and mt.__msgpack
  if mark == "bin" then return encode_value(t[1], out, depth) end
  local n
  if mark == "array" then
    n = mt.n or #t
  elseif mark ~= "map" then
    n = array_length(t)
  end
  if n then
    out[#out + 1] = "["
    for i = 1, n do
      if i > 1 then out[#out + 1] = "," end
      local v = t[i]
      if v == nil then out[#out + 1] = "null" else encode_value(v, out, depth + 1) end
    end
    out[#out + 1] = "]"
    return
  end
  out[#out + 1] = "{"
  local first = true
  for k, v in pairs(t) do
    local tk = type(k)
    local key
    if tk == "string" then
      key = k
    elseif tk == "number" then
      key = number(k)
    else
      error("json.encode: a key of type " .. tk .. " has no JSON form", 0)
    end
    if not first then out[#out + 1] = "," end
    first = false
    out[#out + 1] = encode_string(key)
    out[#out + 1] = ":"
    encode_value(v, out, depth + 1)
  end
  out[#out + 1] = "}"
end

function encode_value(v, out, depth)
  local t = type(v)
  if t == "string" then
    out[#out + 1] = encode_string(v)
  elseif t == "number" then
    out[#out + 1] = number(v)
  elseif t == "boolean" then
    out[#out + 1] = v and "true" or "false"
  elseif t == "table" then
    encode_table(v, out, depth)
  elseif v == nil or v == M.null then
    out[#out + 1] = "null"
  elseif t == "cdata" and (ffi.istype(int64_t, v) or ffi.istype(uint64_t, v)) then
    out[#out + 1] = (tostring(v):gsub("U?LL$", ""))
  else
    error("json.encode: a value of type " .. t .. " has no JSON form", 0)
  end
end

--- Encode a value as JSON text. Raises for what JSON cannot hold: a
-- function, userdata other than null, NaN or infinity, nesting deeper
-- than 200 (or a cycle).
-- @return string
function M.encode(v)
  local out = {}
  local ok, err = pcall(encode_value, v, out, 0)
  if not ok then error(err, 2) end
  return concat(out)
end

--- Decode JSON text: the value (null as `json.null`), or nil, err (kind
-- `json`) for text that is not JSON or nests deeper than 200.
function M.decode(s)
  if type(s) ~= "string" then error("json.decode: expected a string, got " .. type(s), 2) end
  local ok, v = pcall(cjson.decode, s)
  if not ok then
    return nil, require("squall.core").error("json", tostring(v))
  end
  return v
end

return M
