--- The metrics registry, squall.metrics' own (not a public module):
-- counter, gauge and histogram families with labelled children, and the
-- snapshot of them all that rendering and pushing start from.
local util = require "squall.util"

local type, error, ipairs = type, error, ipairs
local format, concat = string.format, table.concat
local setmetatable, huge = setmetatable, math.huge

local R = {}

--- Prometheus clients' default histogram buckets (seconds).
R.DEFAULT_BUCKETS = { 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10 }

local registry, order = {}, {} -- name -> family; names in registration order

-- ---- families ---------------------------------------------------------------

local Family = util.class()

local function check_name(name, what, level)
  if type(name) ~= "string" or not name:find("^[%a_:][%w_:]*$") then
    error(format("%s: the name must match [a-zA-Z_:][a-zA-Z0-9_:]*, got %s", what,
      util.describe(name)), level + 1)
  end
end

local function same_list(a, b)
  if #a ~= #b then return false end
  for i = 1, #a do if a[i] ~= b[i] then return false end end
  return true
end

-- A new family, or the one already registered under that name when it is
-- the same (a handler module that hot reload runs again gets its metric
-- back, with its counts).
local function family(kind, name, help, labels, buckets, level)
  local what = "metrics." .. kind
  check_name(name, what, level + 1)
  if type(help) ~= "string" then
    error(format("%s: help must be a string, got %s", what, util.describe(help)), level + 1)
  end
  labels = labels or {}
  if type(labels) ~= "table" then
    error(format("%s: labels must be a list of names, got %s", what, util.describe(labels)),
      level + 1)
  end
  for _, l in ipairs(labels) do
    if type(l) ~= "string" or not l:find("^[%a_][%w_]*$") or l:find("^__") or
      (kind == "histogram" and l == "le") or l == "worker" then
      error(format("%s: bad label name %s", what, util.describe(l)), level + 1)
    end
  end
  local old = registry[name]
  if old then
    if old.kind ~= kind or not same_list(old.labels, labels) or
      (buckets and not same_list(old.buckets, buckets)) then
      error(format("%s: %s is already registered as a %s with labels {%s}", what, name,
        old.kind, concat(old.labels, ", ")), level + 1)
    end
    return old
  end
  local f = setmetatable({ kind = kind, name = name, help = help, labels = labels,
    buckets = buckets, children = {}, keys = {} }, Family)
  registry[name] = f
  order[#order + 1] = name
  -- a family without labels has its one child (and shows its zero) at once
  if #labels == 0 then f:child(nil, level + 1) end
  return f
end

-- The child for a label table: one per distinct set of values, found by
-- the values joined (or the single value itself).
function Family:child(values, level)
  local labels = self.labels
  local n = #labels
  local key
  if n == 0 then
    key = ""
  else
    if type(values) ~= "table" then
      error(format("%s: pass the label values as a table {%s = ...}", self.name, labels[1]),
        level + 1)
    end
    if n == 1 then
      key = values[labels[1]]
      if key == nil then
        error(format("%s: missing the label %s", self.name, labels[1]), level + 1)
      end
      key = tostring(key)
    else
      local parts = {}
      for i = 1, n do
        local v = values[labels[i]]
        if v == nil then
          error(format("%s: missing the label %s", self.name, labels[i]), level + 1)
        end
        parts[i] = tostring(v)
      end
      key = concat(parts, "\0")
    end
  end
  local c = self.children[key]
  if c then return c end
  local vals = {}
  for i = 1, n do vals[i] = tostring(values[labels[i]]) end
  if self.kind == "histogram" then
    local counts = {}
    for i = 1, #self.buckets do counts[i] = 0 end
    c = { values = vals, counts = counts, sum = 0, count = 0 }
  else
    c = { values = vals, value = 0 }
  end
  self.children[key] = c
  self.keys[#self.keys + 1] = key
  return c
end

--- Counter: `c:inc([by [, labels]])` (by defaults to 1; never negative).
local Counter = Family:extend()

function Counter:inc(by, labels)
  by = by or 1
  if type(by) ~= "number" or by < 0 then
    error(format("%s: a counter only goes up, got %s", self.name, util.describe(by)), 2)
  end
  local c = self:child(labels, 2)
  c.value = c.value + by
end

--- The current value for `labels`.
function Family:get(labels)
  local c = self:child(labels, 2)
  if self.kind == "histogram" then return c.count, c.sum end
  return c.value
end

--- Gauge: `g:set(v [, labels])`, `g:inc([by, labels])`, `g:dec([by, labels])`.
local Gauge = Family:extend()

function Gauge:set(v, labels)
  if type(v) ~= "number" then
    error(format("%s: the value must be a number, got %s", self.name, util.describe(v)), 2)
  end
  self:child(labels, 2).value = v
end

function Gauge:inc(by, labels)
  local c = self:child(labels, 2)
  c.value = c.value + (by or 1)
end

function Gauge:dec(by, labels)
  local c = self:child(labels, 2)
  c.value = c.value - (by or 1)
end

--- Histogram: `h:observe(v [, labels])` (seconds, bytes...).
local Histogram = Family:extend()

-- Count v in a histogram child with upper bounds `buckets`.
local function bump(c, buckets, v)
  local counts = c.counts
  for i = 1, #buckets do
    if v <= buckets[i] then
      counts[i] = counts[i] + 1
      break
    end
  end
  c.sum = c.sum + v
  c.count = c.count + 1
end

function Histogram:observe(v, labels)
  if type(v) ~= "number" then
    error(format("%s: the value must be a number, got %s", self.name, util.describe(v)), 2)
  end
  bump(self:child(labels, 2), self.buckets, v)
end

--- A counter (a name ending in `_total`, by Prometheus' convention).
-- @tparam string name
-- @tparam string help
-- @tparam[opt] table labels label names
function R.counter(name, help, labels)
  return setmetatable(family("counter", name, help, labels, nil, 2), Counter)
end

--- A gauge: a value that goes up and down.
function R.gauge(name, help, labels)
  return setmetatable(family("gauge", name, help, labels, nil, 2), Gauge)
end

--- A histogram with upper bounds `buckets` (sorted; default
-- metrics.DEFAULT_BUCKETS).
function R.histogram(name, help, labels, buckets)
  buckets = buckets or R.DEFAULT_BUCKETS
  if type(buckets) ~= "table" or #buckets == 0 then
    error("metrics.histogram: buckets must be a non-empty list of numbers", 2)
  end
  for i, b in ipairs(buckets) do
    if type(b) ~= "number" or (i > 1 and b <= buckets[i - 1]) then
      error("metrics.histogram: buckets must be increasing numbers", 2)
    end
  end
  return setmetatable(family("histogram", name, help, labels, buckets, 2), Histogram)
end


-- Functions run before each snapshot (the built-in metrics update there).
local before_collect = {}
function R.before_collect(fn) before_collect[#before_collect + 1] = fn end

--- A snapshot of every metric: a list of families {name, help, kind,
-- samples = {{suffix, label names, label values, value}...}}, in
-- registration order (the built-ins first). Plain data: it travels
-- between workers as MessagePack.
function R.collect()
  for i = 1, #before_collect do before_collect[i]() end
  local out = {}
  for _, name in ipairs(order) do
    local f = registry[name]
    local samples = {}
    for _, key in ipairs(f.keys) do
      local c = f.children[key]
      if f.kind == "histogram" then
        local cum = 0
        for i, bound in ipairs(f.buckets) do
          cum = cum + c.counts[i]
          samples[#samples + 1] = { "_bucket", f.labels, c.values, cum, le = bound }
        end
        samples[#samples + 1] = { "_bucket", f.labels, c.values, c.count, le = huge }
        samples[#samples + 1] = { "_sum", f.labels, c.values, c.sum }
        samples[#samples + 1] = { "_count", f.labels, c.values, c.count }
      else
        samples[#samples + 1] = { "", f.labels, c.values, c.value }
      end
    end
    out[#out + 1] = { name = name, help = f.help, kind = f.kind, samples = samples }
  end
  return out
end


R.bump = bump

return R
