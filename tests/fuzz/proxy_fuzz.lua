--- A seeded mutation fuzzer for the PROXY protocol parser (squall.proxy,
-- pure Lua): make check-fuzz runs it for a bounded time.
--     squall tests/fuzz/proxy_fuzz.lua SECONDS CORPUS_DIR [SEED]
-- Each input is a seed from the corpus, mutated (bytes flipped, inserted,
-- deleted, cut, spliced). parse must never raise; a header it accepts must
-- parse the same from exactly its own bytes, and every shorter prefix of it
-- must be incomplete (nil) or refused, never a different header.
local proxy = require "squall.proxy"
local core = require "squall.core"

local secs = tonumber(arg[1]) or 10
local dir = arg[2] or "tests/fuzz/corpus/proxy"
local seed = tonumber(arg[3]) or os.time()
math.randomseed(seed)

local seeds = {}
local p = io.popen("ls " .. dir)
for name in p:lines() do
  local f = assert(io.open(dir .. "/" .. name, "rb"))
  seeds[#seeds + 1] = f:read("*a")
  f:close()
end
p:close()
assert(#seeds > 0, "no seeds in " .. dir)

local random, char = math.random, string.char
local function mutate(s)
  for _ = 1, random(1, 4) do
    local op, i = random(1, 5), random(1, #s + 1)
    if op == 1 and #s > 0 then -- flip a byte
      i = random(1, #s)
      s = s:sub(1, i - 1) .. char(random(0, 255)) .. s:sub(i + 1)
    elseif op == 2 then -- insert bytes
      s = s:sub(1, i - 1) .. char(random(0, 255)):rep(random(1, 3)) .. s:sub(i)
    elseif op == 3 and #s > 0 then -- delete a run
      s = s:sub(1, i - 1) .. s:sub(i + random(1, 4))
    elseif op == 4 then -- cut
      s = s:sub(1, i)
    else -- splice another seed's tail
      local o = seeds[random(1, #seeds)]
      s = s:sub(1, i - 1) .. o:sub(random(1, #o + 1))
    end
  end
  return s
end

local function same(a, b)
  for k, v in pairs(a) do if b[k] ~= v then return false end end
  for k, v in pairs(b) do if a[k] ~= v then return false end end
  return true
end

local n, accepted = 0, 0
local deadline = core.time() + secs
while core.time() < deadline do
  for _ = 1, 200 do
    n = n + 1
    local input = mutate(seeds[random(1, #seeds)])
    local ok, info, used = pcall(proxy.parse, input)
    if not ok then error(("parse raised on %q: %s"):format(input, info)) end
    if info then
      accepted = accepted + 1
      assert(used >= 1 and used <= #input, "consumed out of range")
      local again, used2 = proxy.parse(input:sub(1, used))
      assert(again and used2 == used and same(info, again),
        ("%q parses differently from its own bytes"):format(input))
      for cut = 1, used - 1 do
        local short = proxy.parse(input:sub(1, cut))
        assert(short == nil, ("prefix %q of %q parsed as a header"):format(input:sub(1, cut),
          input))
      end
    end
  end
end
print(("proxy_fuzz: %d inputs, %d accepted, seed %d"):format(n, accepted, seed))
