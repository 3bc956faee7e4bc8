--- The values that mark MessagePack types in Lua: msgpack.null and the
-- metatables of msgpack.array(), map(), bin() and ext() values. Both
-- codecs know them: the C one through the hooks squall.msgpack gives it,
-- the compiled one (fast.lua) by identity.
-- @module squall.msgpack.marks
local core = require "squall.core"

local M = {}

--- nil inside arrays and maps, and what nil decodes to (cjson.null's
-- value: a NULL light userdata).
M.null = core.msgpack_null

M.array_mt = { __msgpack = "array" }
M.map_mt = { __msgpack = "map" }
M.bin_mt = { __msgpack = "bin" }

local ext_mt = { __msgpack = "ext" }
ext_mt.__index = ext_mt
function ext_mt.__eq(a, b) return a.type == b.type and a.data == b.data end
function ext_mt.__tostring(e) return ("msgpack.ext(%d, %q)"):format(e.type, e.data) end
M.ext_mt = ext_mt

return M
