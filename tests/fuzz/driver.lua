--- The seeded mutation driver behind tests/fuzz/*_fuzz.lua (the Lua
-- parsers' fuzz targets): each input is a corpus seed mutated (bytes
-- flipped, inserted, deleted, cut, spliced with another seed) and handed
-- to `check(input)`, which raises when the parser misbehaves.
--     squall tests/fuzz/NAME_fuzz.lua SECONDS CORPUS_DIR [SEED]
local core = require "squall.core"

local M = {}

function M.run(name, check)
  local secs = tonumber(arg[1]) or 10
  local dir = arg[2] or ("tests/fuzz/corpus/" .. name)
  local seed = tonumber(arg[3]) or os.time()
  math.randomseed(seed)
  local seeds = {}
  local p = io.popen("ls " .. dir)
  for file in p:lines() do
    local f = assert(io.open(dir .. "/" .. file, "rb"))
    seeds[#seeds + 1] = f:read("*a")
    f:close()
  end
  p:close()
  assert(#seeds > 0, "no seeds in " .. dir)

  local random, char = math.random, string.char
  local function mutate(s)
    for _ = 1, random(1, 4) do
      local op, i = random(1, 5), random(1, #s + 1)
      if op == 1 and #s > 0 then
        i = random(1, #s)
        s = s:sub(1, i - 1) .. char(random(0, 255)) .. s:sub(i + 1)
      elseif op == 2 then
        s = s:sub(1, i - 1) .. char(random(0, 255)):rep(random(1, 3)) .. s:sub(i)
      elseif op == 3 and #s > 0 then
        s = s:sub(1, i - 1) .. s:sub(i + random(1, 4))
      elseif op == 4 then
        s = s:sub(1, i)
      else
        local o = seeds[random(1, #seeds)]
        s = s:sub(1, i - 1) .. o:sub(random(1, #o + 1))
      end
    end
    return s
  end

  local n, accepted = 0, 0
  local deadline = core.time() + secs
  while core.time() < deadline do
    for _ = 1, 200 do
      n = n + 1
      local input = mutate(seeds[random(1, #seeds)])
      local ok, res = pcall(check, input)
      if not ok then
        error(("%s_fuzz (seed %d): on %q: %s"):format(name, seed, input, tostring(res)), 0)
      end
      if res then accepted = accepted + 1 end
    end
  end
  print(("%s_fuzz: %d inputs, %d accepted, seed %d"):format(name, n, accepted, seed))
end

return M
