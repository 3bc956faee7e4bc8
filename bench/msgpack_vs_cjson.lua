--- squall.msgpack against lua-cjson: encode + decode of a typical RPC
-- payload (a map of ten fields: strings, integers, floats, a nested
-- array), for make bench. Prints one line of key=value pairs.
--     squall bench/msgpack_vs_cjson.lua [iterations]
local msgpack = require "squall.msgpack"
local ok, cjson = pcall(require, "cjson")
local core = require "squall.core"

local N = tonumber(arg and arg[1]) or 200000
local payload = {
  uid = "player-42", name = "Ann Example", level = 17, score = 123456,
  x = 12.5, y = -3.25, alive = true, room = "lobby-7",
  items = { 1, 2, 3, 5, 8, 13, 21 }, ts = 1764547200,
}

local function rate(encode, decode)
  local s = encode(payload)
  for _ = 1, N / 10 do decode(encode(payload)) end -- warm up (and let traces compile)
  local t0 = core.time()
  for _ = 1, N do s = decode(encode(payload)) end
  assert(s.uid == "player-42")
  return N / (core.time() - t0)
end

local mp = rate(msgpack.encode, msgpack.decode)
local cj = ok and rate(cjson.encode, cjson.decode) or 0
print(("msgpack_per_s=%.0f cjson_per_s=%.0f ratio=%.2f"):format(mp, cj, cj > 0 and mp / cj or 0))
