--- Fuzz target for the RESP parser (squall.redis.parse), run by make
-- check-fuzz through tests/fuzz/driver.lua. parse must never raise; a
-- reply it accepts must parse the same from exactly its own bytes, and
-- every shorter prefix must be incomplete (nil) or refused.
local redis = require "squall.redis"
local driver = dofile((arg[0]:match("^(.*)/") or ".") .. "/driver.lua")

local function same(a, b)
  if type(a) ~= "table" or type(b) ~= "table" then return a == b or tostring(a) == tostring(b) end
  for k, v in pairs(a) do if not same(v, b[k]) then return false end end
  for k in pairs(b) do if a[k] == nil then return false end end
  return true
end

driver.run("resp", function(input)
  local v, pos = redis.parse(input)
  if v == nil then return false end
  assert(pos >= 2 and pos <= #input + 1, "position out of range")
  local again, pos2 = redis.parse(input:sub(1, pos - 1))
  assert(again ~= nil and pos2 == pos and same(v, again), "parses differently from its own bytes")
  for cut = 1, pos - 2 do
    local short = redis.parse(input:sub(1, cut))
    assert(short == nil, "a prefix parsed as a reply")
  end
  return true
end)
