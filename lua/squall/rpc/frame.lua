--- MessagePack-RPC messages through the compiled codec
-- (squall.msgpack.fast), for squall.rpc.
--
-- `next_message(u)` is runtime/rpc_frame.c's reader, with its results
-- (rpc_frame.h lists them): it takes the common messages straight from
-- the unpacker's bytes, as compiled Lua, and hands everything else to the
-- C reader, which has the last word. Taken here: a request `[0, msgid,
-- method, params]`, a notification `[2, method, params]` and a response
-- `[1, msgid, error, result]` in their short forms (a fixarray, a
-- positive fixint type), with at most MAX_PARAMS params and values the
-- compiled codec decodes. The fuzz target runs both readers over the same
-- bytes and compares what they return.
--
-- `write_message(stream, n, a, b, c, d)` writes the array of the n (3 or
-- 4) values, encoded into the codec's buffer and copied into the stream's
-- write queue, with no string in between.
-- @module squall.rpc.frame
local ffi = require "ffi"
local core = require "squall.core"
local fast = require "squall.msgpack.fast"
local iostream = require "squall.iostream"
local msgpack = require "squall.msgpack"

local M = {}

pcall(ffi.cdef, [[
int squall_mp_ffi_avail(const void *u);
const unsigned char *squall_mp_ffi_head(const void *u);
void squall_mp_ffi_consume(void *u, size_t n);
]])
local C = ffi.C
local getmetatable = getmetatable
local value, encode_array, buffer = fast.value, fast.encode_array, fast.buffer
local write_bytes, write_array = iostream.write_bytes, msgpack.write_array

local c_next_message = core.rpc_frame_reader()
local kinds = core.rpc_frame_constants
local REQUEST, RESPONSE, NOTIFY = kinds.REQUEST, kinds.RESPONSE, kinds.NOTIFY

--- The most params a message may have to be read here (with_params
-- spells them out).
M.MAX_PARAMS = 8
local MAX_PARAMS = M.MAX_PARAMS

-- The FFI is handed only an unpacker: anything else goes to C, which
-- checks its argument.
local unpacker_mt = getmetatable(msgpack.unpacker())

-- A param at p[i]: its value (nil for MessagePack nil, as C's spread
-- gives it) and the position after it, or nothing.
local function param(p, i, n)
  if i < n and p[i] == 0xc0 then return nil, i + 1 end
  return value(p, i, n, 3)
end

-- The params array at p[i] and what precedes it in the message: the
-- message as next_message returns it, taken from u; else C's reading.
local function with_params(u, p, i, n, kind, msgid, method)
  if i >= n then return c_next_message(u) end
  local count = p[i] - 0x90 -- a fixarray: up to 15
  if count < 0 or count > MAX_PARAMS then return c_next_message(u) end
  i = i + 1
  -- each read only while the count reaches it; a param the compiled codec
  -- does not take leaves i nil, and the message goes to C whole
  local a1, a2, a3, a4, a5, a6, a7, a8
  if count >= 1 then a1, i = param(p, i, n) end
  if i and count >= 2 then a2, i = param(p, i, n) end
  if i and count >= 3 then a3, i = param(p, i, n) end
  if i and count >= 4 then a4, i = param(p, i, n) end
  if i and count >= 5 then a5, i = param(p, i, n) end
  if i and count >= 6 then a6, i = param(p, i, n) end
  if i and count >= 7 then a7, i = param(p, i, n) end
  if i and count == 8 then a8, i = param(p, i, n) end
  if not i then return c_next_message(u) end
  C.squall_mp_ffi_consume(u, i)
  if count <= 2 then
    if count == 2 then return kind, msgid, method, 2, a1, a2 end
    if count == 1 then return kind, msgid, method, 1, a1 end
    return kind, msgid, method, 0
  end
  if count <= 5 then
    if count == 3 then return kind, msgid, method, 3, a1, a2, a3 end
    if count == 4 then return kind, msgid, method, 4, a1, a2, a3, a4 end
    return kind, msgid, method, 5, a1, a2, a3, a4, a5
  end
  if count == 6 then return kind, msgid, method, 6, a1, a2, a3, a4, a5, a6 end
  if count == 7 then return kind, msgid, method, 7, a1, a2, a3, a4, a5, a6, a7 end
  return kind, msgid, method, 8, a1, a2, a3, a4, a5, a6, a7, a8
end

--- The next message of unpacker u, as rpc_frame.h says: nil while it is
-- incomplete; nil, err once the input broke; else its kind and parts.
function M.next_message(u)
  if getmetatable(u) ~= unpacker_mt then return c_next_message(u) end
  local n = C.squall_mp_ffi_avail(u)
  if n < 3 then return c_next_message(u) end
  local p = C.squall_mp_ffi_head(u)
  -- the array's header and the message type (0, 1, 2 on the wire)
  local head, kind = p[0], p[1]
  if head == 0x94 and kind == 0 then
    local msgid, i = value(p, 2, n, 2)
    if not i then return c_next_message(u) end
    local method
    method, i = value(p, i, n, 2)
    if not i then return c_next_message(u) end
    return with_params(u, p, i, n, REQUEST, msgid, method)
  elseif head == 0x93 and kind == 2 then
    local method, i = value(p, 2, n, 2)
    if not i then return c_next_message(u) end
    return with_params(u, p, i, n, NOTIFY, nil, method)
  elseif head == 0x94 and kind == 1 then
    local msgid, i = value(p, 2, n, 2)
    if not i then return c_next_message(u) end
    local err, result
    err, i = value(p, i, n, 2)
    if not i then return c_next_message(u) end
    result, i = value(p, i, n, 2)
    if not i then return c_next_message(u) end
    C.squall_mp_ffi_consume(u, i)
    return RESPONSE, msgid, err, result
  end
  return c_next_message(u)
end

--- Write the array [a, b, c] (n 3) or [a, b, c, d] (n 4) to the stream:
-- what msgpack.write_array(stream, a, b, c[, d]) does (and returns), with
-- the common values encoded here.
function M.write_message(stream, n, a, b, c, d)
  local len = encode_array(n, a, b, c, d)
  if len then return write_bytes(stream, buffer(), len) end
  if n == 3 then return write_array(stream, a, b, c) end
  return write_array(stream, a, b, c, d)
end

return M
