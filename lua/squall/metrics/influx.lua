--- InfluxDB's line protocol and pushing to it (HTTP or UDP),
-- squall.metrics' own (not a public module).
local core = require "squall.core"
local gen = require "squall.gen"
local log = require "squall.log"
local util = require "squall.util"
local B = require "squall.metrics.builtins"
local P = require "squall.metrics.prometheus"
local R = require "squall.metrics.registry"

local type, tostring, tonumber, error, pairs, ipairs = type, tostring, tonumber, error, pairs,
  ipairs
local format, concat, gsub = string.format, table.concat, string.gsub
local huge = math.huge

local number = P.number

local I = {}

local function escape_key(s) -- measurement names: commas and spaces
  return (gsub(s, "([, ])", "\\%1"))
end

local function escape_tag(s) -- tag keys and values: commas, equals, spaces
  -- InfluxDB 1.x reads a backslash before the separator as an escape and
  -- cannot take a newline at all: those become / and a space.
  return (gsub(gsub(s, "[\\\n]", { ["\\"] = "/", ["\n"] = " " }), "([,= ])", "\\%1"))
end

--- InfluxDB line protocol of a snapshot: one measurement per metric,
-- labels as tags, the value in the field `value` (histograms: `count`,
-- `sum` and one field per bucket, `le_<bound>`). `tags` are added to
-- every point (the worker id); `ts` is the timestamp in nanoseconds.
function I.line_protocol(families, tags, ts)
  local out = {}
  local extra = ""
  for k, v in pairs(tags or {}) do extra = extra .. "," .. escape_tag(k) .. "=" .. escape_tag(v) end
  local stamp = ts and (" " .. format("%.0f", ts)) or ""
  for _, f in ipairs(families) do
    local meas = escape_key(f.name)
    local points, point_order = {}, {}
    for _, s in ipairs(f.samples) do
      local names, values = s[2], s[3]
      local t = {}
      for i = 1, #names do
        if values[i] ~= "" then t[#t + 1] = escape_tag(names[i]) .. "=" .. escape_tag(values[i]) end
      end
      local series = concat(t, ",")
      local p = points[series]
      if not p then
        p = {}
        points[series] = p
        point_order[#point_order + 1] = series
      end
      local field
      if s[1] == "" then field = "value"
      elseif s[1] == "_sum" then field = "sum"
      elseif s[1] == "_count" then field = "count"
      else field = "le_" .. (s.le == huge and "inf" or number(s.le)) end
      local v = s[4]
      if v == v and v ~= huge and v ~= -huge then -- InfluxDB takes finite floats only
        p[#p + 1] = escape_tag(field) .. "=" .. number(v)
      end
    end
    for _, series in ipairs(point_order) do
      local p = points[series]
      if #p > 0 then
        out[#out + 1] = meas .. (series ~= "" and "," .. series or "") .. extra .. " " ..
          concat(p, ",") .. stamp .. "\n"
      end
    end
  end
  return concat(out)
end

local function post(host, port, path, body, timeout)
  local res, err = require("squall.httpclient").fetch(
    format("http://%s:%d%s", host, port, path), { method = "POST", body = body,
      headers = { ["Content-Type"] = "text/plain" }, timeout = timeout })
  if not res then return nil, err end
  if res.code ~= 204 and res.code ~= 200 then
    return nil, core.error("http", ("InfluxDB answered %d %s: %s"):format(
      res.code, res.reason, res.body:sub(1, 300)))
  end
  return true
end

--- Push every metric to InfluxDB every `interval` seconds (default 10),
-- from a coroutine of its own; a push that fails is logged and the next
-- one tries again.
-- @tparam table opts `url`: `http://host:port/write?db=NAME` or
--   `udp://host:port` (an IP address); `interval`; `timeout` (5 s, HTTP)
-- @treturn table a handle: `handle:stop()`, `handle:push()` (now, inside
--   a coroutine: true or nil, err)
function I.push_influx(opts)
  if type(opts) ~= "table" or type(opts.url) ~= "string" then
    error("metrics.push_influx: opts.url must be a string (http://host:port/write?db=NAME " ..
      "or udp://host:port)", 2)
  end
  local interval, timeout = opts.interval or 10, opts.timeout or 5
  if type(interval) ~= "number" or interval <= 0 then
    error("metrics.push_influx: interval must be a positive number, got " ..
      util.describe(interval), 2)
  end
  local scheme, host, port, path = opts.url:match("^(%a+)://([^:/]+):(%d+)(.*)$")
  port = tonumber(port)
  if not scheme or (scheme ~= "http" and scheme ~= "udp") or not port then
    error("metrics.push_influx: url must be http://host:port/write?db=NAME or udp://host:port, " ..
      "got " .. util.describe(opts.url), 2)
  end
  if scheme == "http" and path == "" then path = "/write?db=squall" end
  local id = core.task_id()
  local tags = id and { worker = tostring(id) } or nil
  local handle = { stopped = false }
  function handle.push()
    local body = I.line_protocol(R.collect(), tags, core.wall_time() * 1e9)
    if scheme == "udp" then
      -- whole lines, at most 8 KiB a datagram (InfluxDB's UDP reader)
      local ip = host == "localhost" and "127.0.0.1" or host
      local start = 1
      while start <= #body do
        local stop = start + 8191
        if stop < #body then
          stop = body:sub(1, stop):match(".*()\n") or stop
        else
          stop = #body
        end
        local ok, err = core.udp_send(ip, port, body:sub(start, stop))
        if not ok then return nil, err end
        start = stop + 1
      end
      return true
    end
    return post(host, port, path, body, timeout)
  end
  function handle.stop() handle.stopped = true end
  B.start_lag()
  gen.spawn(function()
    while not handle.stopped do
      gen.sleep(interval)
      if handle.stopped then break end
      local ok, err = handle.push()
      if not ok then log.warn("metrics: push to %s failed: %s", opts.url, tostring(err)) end
    end
  end)
  return handle
end

return I
