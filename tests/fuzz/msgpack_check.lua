--- The msgpack fuzz target's check (tests/fuzz/msgpack_fuzz.c runs it on
-- every input): the C codec and the compiled one (squall.msgpack.fast,
-- and the RPC reader squall.rpc.frame over it) must agree exactly. Where
-- the compiled one takes a value it gives what C gives, byte for byte and
-- value for value; where it leaves one to C, the result is C's. Nothing
-- may crash, leak or trip a sanitizer, and a value that decodes must
-- encode again.
local ffi = require "ffi"
local core = require "squall.core"
local mp = require "squall.msgpack"
local fast = require "squall.msgpack.fast"
local frame = require "squall.rpc.frame"

local c_decode, c_encode = mp.c_codec.decode, mp.c_codec.encode
local c_next = core.rpc_frame_reader()
local bytes_t = ffi.typeof("const uint8_t *")

local function pack(...)
  return { n = select("#", ...), ... }
end

-- The same Lua value: NaN is NaN, -0 is not 0, tables by content (table
-- and cdata keys too) and metatable, 64-bit cdata by type and value.
local same
function same(a, b)
  local t = type(a)
  if t ~= type(b) then return false end
  if t == "number" then
    if a ~= a then return b ~= b end
    return a == b and (a ~= 0 or 1 / a == 1 / b)
  elseif t == "cdata" then
    return ffi.typeof(a) == ffi.typeof(b) and a == b
  elseif t ~= "table" then
    return a == b
  end
  if getmetatable(a) ~= getmetatable(b) then return false end
  local na, nb = 0, 0
  for _ in pairs(b) do nb = nb + 1 end
  for k, v in pairs(a) do
    na = na + 1
    local tk = type(k)
    if tk == "table" or tk == "cdata" then -- keys by identity: look for an equal one
      local found = false
      for kb, vb in pairs(b) do
        if type(kb) == tk and same(k, kb) and same(v, vb) then
          found = true
          break
        end
      end
      if not found then return false end
    elseif not same(v, rawget(b, k)) then
      return false
    end
  end
  return na == nb
end

local function same_all(x, y)
  if x.n ~= y.n then return false end
  for i = 1, x.n do
    if not same(x[i], y[i]) then return false end
  end
  return true
end

local function check_decode(data, pos)
  local c = pack(c_decode(data, pos))
  local v, after = fast.value(ffi.cast(bytes_t, data), pos - 1, #data, 1)
  if after then
    assert(c.n == 2 and same(v, c[1]) and c[2] == after + 1,
      "the compiled decoder disagrees with C")
  end
  assert(same_all(pack(mp.decode(data, pos)), c), "msgpack.decode disagrees with C")
  return c
end

local function check_encode(v)
  local c = c_encode(v)
  local f = fast.encode(v)
  assert(f == nil or f == c, "the compiled encoder disagrees with C")
  assert(mp.encode(v) == c, "msgpack.encode disagrees with C")
  local len = fast.encode_array(4, 1, v, nil, v)
  if len then
    assert(ffi.string(fast.buffer(), len) == mp.encode_array(1, v, nil, v),
      "the compiled encode_array disagrees with C")
  end
  local w, p2 = c_decode(c)
  assert(p2 == #c + 1, "our own encoding did not decode")
  assert(c_encode(w) ~= nil)
end

return function(data, a, b)
  local c = check_decode(data, 1)
  if c[2] then check_encode(c[1]) end
  if a >= 1 and a <= #data then check_decode(data, a) end
  local pieces = { data:sub(1, a), data:sub(a + 1, b), data:sub(b + 1) }
  local max_size = a % 2 == 0 and 65536 or b + 1
  -- the RPC readers side by side, over the same pieces
  local u1 = mp.unpacker({ max_size = max_size })
  local u2 = mp.unpacker({ max_size = max_size })
  -- and one unpacker taken from by turns, so each finds the other's state
  local u3 = mp.unpacker({ max_size = max_size })
  local take = { u3.next, c_next, frame.next_message }
  local k = 0
  for _, piece in ipairs(pieces) do
    u1:feed(piece)
    u2:feed(piece)
    u3:feed(piece)
    while true do
      local x, y = pack(frame.next_message(u1)), pack(c_next(u2))
      assert(same_all(x, y), "the compiled RPC reader disagrees with C")
      assert(u1:buffered() == u2:buffered(), "the RPC readers took different bytes")
      if x[1] == nil then break end
    end
    while true do
      k = k % 3 + 1
      if take[k](u3) == nil then break end
    end
  end
end
