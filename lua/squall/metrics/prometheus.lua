--- The Prometheus text format (0.0.4), squall.metrics' own (not a public
-- module).

local tonumber, ipairs = tonumber, ipairs
local format, concat, gsub = string.format, table.concat, string.gsub
local huge = math.huge

local P = {}

local function number(v)
  if v ~= v then return "NaN" end
  if v == huge then return "+Inf" end
  if v == -huge then return "-Inf" end
  if v % 1 == 0 and v > -1e15 and v < 1e15 then return format("%d", v) end
  -- the shortest text that reads back as the same double (0.005, not
  -- 0.0050000000000000001)
  for digits = 15, 16 do
    local t = format("%." .. digits .. "g", v)
    if tonumber(t) == v then return t end
  end
  return format("%.17g", v)
end
P.number = number

local function escape_label(v)
  return (gsub(gsub(gsub(v, "\\", "\\\\"), "\n", "\\n"), '"', '\\"'))
end

local function escape_help(v)
  return (gsub(gsub(v, "\\", "\\\\"), "\n", "\\n"))
end

--- The Prometheus text format (0.0.4) of a snapshot from collect (or
-- several workers' merged).
function P.render(families)
  local out = {}
  for _, f in ipairs(families) do
    out[#out + 1] = format("# HELP %s %s\n# TYPE %s %s\n", f.name, escape_help(f.help), f.name,
      f.kind)
    for _, s in ipairs(f.samples) do
      local names, values = s[2], s[3]
      local pairs_ = {}
      if s.worker then pairs_[1] = format('worker="%s"', s.worker) end
      for i = 1, #names do
        pairs_[#pairs_ + 1] = format('%s="%s"', names[i], escape_label(values[i]))
      end
      if s.le then pairs_[#pairs_ + 1] = format('le="%s"', number(s.le)) end
      local lbl = #pairs_ > 0 and "{" .. concat(pairs_, ",") .. "}" or ""
      out[#out + 1] = format("%s%s%s %s\n", f.name, s[1], lbl, number(s[4]))
    end
  end
  return concat(out)
end


return P
