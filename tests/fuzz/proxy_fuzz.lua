--- Fuzz target for the PROXY protocol parser (squall.proxy.parse), run by
-- make check-fuzz through tests/fuzz/driver.lua. parse must never raise;
-- a header it accepts must parse the same from exactly its own bytes, and
-- no shorter prefix of it may parse as a header.
local proxy = require "squall.proxy"
local driver = dofile((arg[0]:match("^(.*)/") or ".") .. "/driver.lua")

local function same(a, b)
  for k, v in pairs(a) do if b[k] ~= v then return false end end
  for k, v in pairs(b) do if a[k] ~= v then return false end end
  return true
end

driver.run("proxy", function(input)
  local info, used = proxy.parse(input)
  if not info then return false end
  assert(used >= 1 and used <= #input, "consumed out of range")
  local again, used2 = proxy.parse(input:sub(1, used))
  assert(again and used2 == used and same(info, again), "parses differently from its own bytes")
  for cut = 1, used - 1 do
    assert(proxy.parse(input:sub(1, cut)) == nil, "a prefix parsed as a header")
  end
  return true
end)
