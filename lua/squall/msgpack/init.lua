--- MessagePack: encode, decode and a streaming unpacker.
--
--     local s = msgpack.encode({ cmd = "move", to = { 3, 4 } })
--     local v, pos = msgpack.decode(s)
--
-- Two codecs share the work. The common values go through fast.lua,
-- compiled Lua over the FFI; everything else, and every error, through
-- the C codec (runtime/msgpack*.c), to which this module supplies what
-- only Lua can: the markers, and LuaJIT's 64-bit integers. See docs/api.md
-- (squall.msgpack) for the type mapping.
-- @module squall.msgpack
local core = require "squall.core"
local ffi = require "ffi"
local fast = require "squall.msgpack.fast"
local marks = require "squall.msgpack.marks"

local M = {}

local setmetatable, getmetatable, type, error, select = setmetatable, getmetatable, type,
  error, select
local floor = math.floor

local int64_t, uint64_t = ffi.typeof("int64_t"), ffi.typeof("uint64_t")
local istype, cast = ffi.istype, ffi.cast
local bytes_t = ffi.typeof("const uint8_t *")

--- Stands for nil inside arrays and maps, and is what nil decodes to
-- everywhere (the same value as cjson.null: a NULL light userdata).
M.null = marks.null

local array_mt, map_mt, bin_mt, ext_mt = marks.array_mt, marks.map_mt, marks.bin_mt, marks.ext_mt

local hooks = {
  ext_mt = ext_mt,
  map_mt = map_mt, -- set on decoded empty maps, which then encode as maps
  -- which 64-bit integer a cdata value is (the C API cannot tell)
  classify = function(v)
    if istype(int64_t, v) then return "i" end
    if istype(uint64_t, v) then return "u" end
  end,
  -- an integer beyond 2^53 from its 32-bit halves
  make_int = function(hi, lo, signed)
    local u = cast(uint64_t, hi) * 4294967296ULL + lo
    if signed then return cast(int64_t, u) end
    return u
  end,
}

local c_encode, c_decode, c_unpacker, c_encode_array, c_write_array =
  core.msgpack_setup(hooks)

local fast_encode, fast_value = fast.encode, fast.value

--- The C codec alone (`encode`, `decode`), which decides everything the
-- compiled one (squall.msgpack.fast) leaves to it: for the specs and the
-- fuzz target that hold the two to the same results.
M.c_codec = { encode = c_encode, decode = c_decode }

--- Encode a value. Raises for a function, userdata, thread, other cdata,
-- a cycle, or tables nested deeper than 200.
-- @return string
function M.encode(...)
  local s = select("#", ...) > 0 and fast_encode((...))
  if s then return s end
  return c_encode(...)
end

--- Encode an array of the arguments, nils included in their places,
-- without building a table: `encode_array(1, msgid, nil, result)`.
-- @return string
M.encode_array = c_encode_array

--- `stream:write(msgpack.encode_array(...))` without the string in
-- between: the bytes go straight into the stream's write queue. Returns
-- what write() returns (and waits as it does).
M.write_array = c_write_array

--- Decode one value starting at byte `pos` (default 1).
-- @treturn any the value (`msgpack.null` for nil)
-- @treturn number the position after it
-- @return nil, err (kind `msgpack`) when the bytes are invalid or truncated
function M.decode(s, pos)
  if type(s) == "string" then
    local n = #s
    if pos == nil then
      pos = 1
    elseif type(pos) ~= "number" or pos < 1 or pos > n or pos ~= floor(pos) then
      return c_decode(s, pos) -- raises or says why
    end
    local v, after = fast_value(cast(bytes_t, s), pos - 1, n, 1)
    if after then return v, after + 1 end
  end
  return c_decode(s, pos)
end

--- The most values a Lua call can take at once: LuaJIT's `unpack`
-- refuses more than its C stack allows (LUAI_MAXCSTACK, 8000 slots, less
-- the few the call itself uses).
M.MAX_VALUES = 7900

--- The items i..j (default 1..#t) of a decoded array as values, with
-- msgpack.null as nil (in place: those items of `t` become nil). Raises
-- when that is more than `msgpack.MAX_VALUES` items, before touching any:
-- `#t` of a table with holes can be any border, 2^29 for keys 1, 2, 4,
-- ... 2^29.
function M.values(t, i, j)
  if type(t) ~= "table" then error("msgpack.values: expected a table, got " .. type(t), 2) end
  i, j = i or 1, j or #t
  if j - i + 1 > M.MAX_VALUES then
    error(("msgpack.values: %d items are more than a call can take (at most %d)")
      :format(j - i + 1, M.MAX_VALUES), 2)
  end
  for k = i, j do
    if t[k] == M.null then t[k] = nil end
  end
  return unpack(t, i, j)
end

--- Mark `t` to encode as an array of `n` items (default #t); holes encode
-- as nil. Returns `t`.
function M.array(t, n)
  if type(t) ~= "table" then error("msgpack.array: expected a table, got " .. type(t), 2) end
  if n == nil then return setmetatable(t, array_mt) end
  if type(n) ~= "number" or n < 0 or n % 1 ~= 0 then
    error("msgpack.array: n must be a non-negative integer", 2)
  end
  return setmetatable(t, { __msgpack = "array", n = n })
end

--- Mark `t` to encode as a map (an empty table is an array otherwise).
function M.map(t)
  if type(t) ~= "table" then error("msgpack.map: expected a table, got " .. type(t), 2) end
  return setmetatable(t, map_mt)
end

--- A string that encodes as bin rather than str.
function M.bin(s)
  if type(s) ~= "string" then error("msgpack.bin: expected a string, got " .. type(s), 2) end
  return setmetatable({ s }, bin_mt)
end

--- An extension value: `.type` (-128..127) and `.data`; decoded ext
-- values are these too, and encode back unchanged.
function M.ext(ext_type, data)
  if type(ext_type) ~= "number" or ext_type % 1 ~= 0 or ext_type < -128 or ext_type > 127 then
    error("msgpack.ext: type must be an integer from -128 to 127", 2)
  end
  if type(data) ~= "string" then error("msgpack.ext: data must be a string", 2) end
  return setmetatable({ type = ext_type, data = data }, ext_mt)
end

--- True when `v` is an ext value.
function M.is_ext(v)
  return getmetatable(v) == ext_mt
end

--- A streaming unpacker: `u:feed(chunk)`, then `u:next()` returns each
-- value as it completes, nil while one is partial, or nil, err (kind
-- `msgpack`) on invalid bytes or a value larger than `max_size` (default
-- 16 MiB); after an error every call returns it. Bytes are scanned once,
-- however the values are split. `u:buffered()` counts bytes held.
-- @tparam[opt] table opts `max_size`
function M.unpacker(opts)
  local max_size = opts and opts.max_size
  if max_size ~= nil and (type(max_size) ~= "number" or max_size < 1) then
    error("msgpack.unpacker: max_size must be a positive number", 2)
  end
  return c_unpacker(max_size)
end

return M
