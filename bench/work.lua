--- CPU work for the thread benchmark, run inside worker threads:
-- `rounds` passes of FNV-1a over a 64 KiB string (pure Lua, no I/O).
local bit = require "bit"
local bxor, band = bit.bxor, bit.band
local byte = string.byte

local M = {}

local data = ("squall thread bench "):rep(3277):sub(1, 65536)

function M.hash(rounds)
  local h = 2166136261
  for _ = 1, rounds do
    for i = 1, #data do
      -- FNV-1a in 32 bits: the multiply split so a double stays exact
      h = bxor(h, byte(data, i))
      h = band(h * 403 + band(h * 16777216, 0xffffffff), 0xffffffff)
    end
  end
  return h
end

return M
