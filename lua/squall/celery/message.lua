--- Celery's wire format, as pure functions (fuzzed alone by
-- tests/fuzz/celery_fuzz.lua): task message protocol 2 inside kombu's
-- JSON envelope, the Redis result backend's task meta, the pidbox's
-- control messages, and what they are made of (UUIDs, base64, ISO 8601
-- times, Python's repr for argsrepr and exception messages).
--
-- The envelope kombu's Redis transport puts on a list:
--     {"body": base64(serialized [args, kwargs, embed]),
--      "content-encoding": "utf-8", "content-type": "application/json",
--      "headers": {"lang", "task", "id", "eta", "expires", "retries", ...},
--      "properties": {"correlation_id", "reply_to", "delivery_mode",
--        "delivery_info": {"exchange", "routing_key"}, "priority",
--        "body_encoding": "base64", "delivery_tag"}}
-- (Celery's "Message Protocol" version 2; kombu/transport/virtual.)
-- @module squall.celery.message
local bit = require "bit"
local core = require "squall.core"
local ffi = require "ffi"
local json = require "squall.json"
local msgpack = require "squall.msgpack"
local util = require "squall.util"

local M = {}

local type, tostring, tonumber, pairs, ipairs, next = type, tostring, tonumber, pairs, ipairs, next
local getmetatable = getmetatable
local format, byte, find, concat = string.format, string.byte, string.find,
  table.concat
local floor = math.floor

pcall(ffi.cdef, "int RAND_bytes(unsigned char *buf, int num);")
local C = ffi.C

local function bad(why) return nil, core.error("celery", why) end

-- ---- building blocks ------------------------------------------------------

--- Base64 (RFC 4648, padded), and back (nil when it is not base64):
-- squall.util's.
M.base64, M.unbase64 = util.base64, util.unbase64

-- Random bytes come from OpenSSL 16 UUIDs' worth at a time.
local random = ffi.new("unsigned char[256]")
local random_at = 256
local UUID = "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x"

--- A random (version 4) UUID, as Celery's task ids and delivery tags.
function M.uuid()
  if random_at >= 256 then
    if C.RAND_bytes(random, 256) ~= 1 then error("celery: no random bytes from OpenSSL") end
    random_at = 0
  end
  local b = random + random_at
  random_at = random_at + 16
  return format(UUID, b[0], b[1], b[2], b[3], b[4], b[5], bit.bor(bit.band(b[6], 0x0f), 0x40),
    b[7], bit.bor(bit.band(b[8], 0x3f), 0x80), b[9], b[10], b[11], b[12], b[13], b[14], b[15])
end

-- Days from 1970-01-01 to year-month-day (proleptic Gregorian; Howard
-- Hinnant's days_from_civil), so no time zone of the machine enters.
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = floor(y / 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function civil_from_days(z)
  z = z + 719468
  local era = floor(z / 146097)
  local doe = z - era * 146097
  local yoe = floor((doe - floor(doe / 1460) + floor(doe / 36524) - floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + floor(yoe / 4) - floor(yoe / 100))
  local mp = floor((5 * doy + 2) / 153)
  local d = doy - floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  if m <= 2 then y = y + 1 end
  return y, m, d
end

--- A unix time as Python's `datetime.isoformat()` of an aware UTC time
-- ("2026-12-05T10:06:07.965545+00:00"), or naive (Celery's date_done).
function M.isoformat(t, naive)
  local s = floor(t)
  local us = floor((t - s) * 1e6 + 0.5)
  if us >= 1000000 then s, us = s + 1, us - 1000000 end
  local days = floor(s / 86400)
  local secs = s - days * 86400
  local y, m, d = civil_from_days(days)
  local text = format("%04d-%02d-%02dT%02d:%02d:%02d", y, m, d, floor(secs / 3600),
    floor(secs % 3600 / 60), secs % 60)
  if us > 0 then text = text .. format(".%06d", us) end
  return naive and text or text .. "+00:00"
end

--- The unix time of an ISO 8601 date and time (Python's isoformat: a
-- fraction, and "Z" or an offset, are optional; no offset means UTC, as
-- Celery's UTC times), or nil.
function M.parse_time(s)
  if type(s) ~= "string" then return nil end
  local y, mo, d, h, mi, sec, rest = s:match(
    "^(%d%d%d%d)-(%d%d)-(%d%d)[T ](%d%d):(%d%d):(%d%d)(.*)$")
  if not y then return nil end
  local frac, zone = rest:match("^(%.%d+)(.*)$")
  if not frac then frac, zone = "", rest end
  local offset = 0
  if zone ~= "" and zone ~= "Z" then
    local sign, oh, om = zone:match("^([+-])(%d%d):?(%d%d)$")
    if not sign then return nil end
    offset = (tonumber(oh) * 3600 + tonumber(om) * 60) * (sign == "-" and -1 or 1)
  end
  y, mo, d, h, mi, sec = tonumber(y), tonumber(mo), tonumber(d), tonumber(h), tonumber(mi),
    tonumber(sec)
  if mo < 1 or mo > 12 or d < 1 or d > 31 or h > 23 or mi > 59 or sec > 60 then return nil end
  return days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + sec +
    (tonumber(frac ~= "" and frac or "0") or 0) - offset
end

-- Python's repr of a JSON-able value (argsrepr, and how str(exc) shows an
-- exception's arguments).
local function py_string(s)
  local quote = (find(s, "'", 1, true) and not find(s, '"', 1, true)) and '"' or "'"
  local body = s:gsub("[%c\\" .. quote .. "]", function(c)
    if c == "\\" then return "\\\\" end
    if c == quote then return "\\" .. c end
    if c == "\n" then return "\\n" end
    if c == "\r" then return "\\r" end
    if c == "\t" then return "\\t" end
    return format("\\x%02x", byte(c))
  end)
  return quote .. body .. quote
end

local function py_repr(v, depth)
  local t = type(v)
  if t == "string" then return py_string(v) end
  if t == "boolean" then return v and "True" or "False" end
  if v == nil or v == json.null then return "None" end
  if t == "number" then
    if v % 1 == 0 and v > -1e16 and v < 1e16 then return format("%d", v) end
    local s = json.encode(v)
    return s:find("[.e]") and s or s .. ".0"
  end
  if t == "table" and (depth or 0) < 20 then
    local n = #v
    local parts = {}
    if n > 0 or next(v) == nil then
      for i = 1, n do parts[i] = py_repr(v[i], (depth or 0) + 1) end
      return "[" .. concat(parts, ", ") .. "]"
    end
    for k, x in pairs(v) do
      parts[#parts + 1] = py_repr(k, (depth or 0) + 1) .. ": " .. py_repr(x, (depth or 0) + 1)
    end
    return "{" .. concat(parts, ", ") .. "}"
  end
  return "<" .. t .. ">"
end
M.py_repr = py_repr

-- argsrepr as Python writes it: the arguments as a tuple.
local function py_args(args, n)
  local parts = {}
  for i = 1, n do parts[i] = py_repr(args[i]) end
  return "(" .. concat(parts, ", ") .. (n == 1 and ",)" or ")")
end

--- What Python's `str(exc)` shows for an exception with these arguments
-- (Celery stores them as a list in `exc_message`).
function M.exception_text(args)
  if type(args) ~= "table" then return tostring(args) end
  if #args == 0 then return "" end
  if #args == 1 then
    local a = args[1]
    return type(a) == "string" and a or py_repr(a)
  end
  local parts = {}
  for i, a in ipairs(args) do parts[i] = py_repr(a) end
  return "(" .. concat(parts, ", ") .. ")"
end

-- ---- bodies ----------------------------------------------------------------

M.CONTENT_TYPES = { json = "application/json", msgpack = "application/x-msgpack" }

local function serialize(value, serializer)
  if serializer == "msgpack" then return msgpack.encode(value) end
  return json.encode(value)
end

local function deserialize(bytes, content_type)
  if content_type == "application/json" then return json.decode(bytes) end
  if content_type == "application/x-msgpack" or content_type == "application/msgpack" then
    local v, err = msgpack.decode(bytes)
    if v == nil then return nil, err end
    return v
  end
  return bad(format("a body of content type %q (json and msgpack are accepted)",
    tostring(content_type)))
end

-- The kombu envelope around serialized `value`.
local function envelope(value, serializer, headers, properties)
  properties.body_encoding = "base64"
  properties.delivery_tag = properties.delivery_tag or M.uuid()
  properties.priority = properties.priority or 0
  return json.encode({
    body = M.base64(serialize(value, serializer)),
    ["content-encoding"] = serializer == "msgpack" and "binary" or "utf-8",
    ["content-type"] = M.CONTENT_TYPES[serializer],
    headers = headers,
    properties = properties,
  })
end

-- An envelope's body, decoded.
local function open_envelope(env)
  local props = env.properties
  if type(props) ~= "table" then return bad("a message without properties") end
  local raw = env.body
  if type(raw) ~= "string" then return bad("a message whose body is not a string") end
  if props.body_encoding == "base64" then
    raw = M.unbase64(raw)
    if not raw then return bad("a body that is not base64") end
  elseif props.body_encoding ~= nil and props.body_encoding ~= json.null then
    return bad(format("a body encoded as %q", tostring(props.body_encoding)))
  end
  return deserialize(raw, env["content-type"])
end

-- ---- tasks -----------------------------------------------------------------

local EMPTY_KWARGS = msgpack.map({})
local EMBED = { callbacks = json.null, errbacks = json.null, chain = json.null,
  chord = json.null }
local EMBED_JSON = '{"callbacks":null,"errbacks":null,"chain":null,"chord":null}'
local jstring = json.encode -- (on a string: cjson's escaping)

local function jtime(t) return t and jstring(M.isoformat(t)) or "null" end

--- A task message, ready to LPUSH. `t`: `id`, `name`, `args` (an array;
-- `args.n` counts trailing nils), `kwargs`, `eta` and `expires` (unix
-- times or nil), `retries`, `root_id`, `parent_id`, `queue`, `priority`,
-- `origin`, `serializer` ("json" or "msgpack"), `sent` (a unix time).
-- @treturn string the envelope's JSON
-- (Written as text rather than through json.encode of tables: every
-- send_task makes one, and this is about three times faster.)
function M.task(t)
  local mt = getmetatable(t.args)
  local n = t.args.n or (mt and mt.n) or #t.args
  local args = msgpack.array(t.args, n)
  local kwargs = t.kwargs
  if kwargs == nil or next(kwargs) == nil then kwargs = EMPTY_KWARGS else msgpack.map(kwargs) end
  local body
  if t.serializer == "msgpack" then
    body = msgpack.encode({ args, kwargs, EMBED })
  else
    body = "[" .. json.encode(args) .. "," .. json.encode(kwargs) .. "," .. EMBED_JSON .. "]"
  end
  local id = jstring(t.id)
  local headers = '{"lang":"py","task":' .. jstring(t.name) .. ',"id":' .. id ..
    ',"shadow":null,"eta":' .. jtime(t.eta) .. ',"expires":' .. jtime(t.expires) ..
    ',"group":null,"group_index":null,"retries":' .. format("%d", t.retries or 0) ..
    ',"timelimit":[null,null],"root_id":' .. (t.root_id and jstring(t.root_id) or id) ..
    ',"parent_id":' .. (t.parent_id and jstring(t.parent_id) or "null") ..
    ',"argsrepr":' .. jstring(py_args(args, n)) ..
    ',"kwargsrepr":' .. jstring(kwargs == EMPTY_KWARGS and "{}" or py_repr(kwargs)) ..
    ',"origin":' .. jstring(t.origin) .. ',"ignore_result":false' ..
    -- for the queue-wait metric (a worker passes unknown headers through)
    (t.sent and ',"squall_sent":' .. json.encode(t.sent) or "") .. "}"
  local properties = '{"correlation_id":' .. id .. ',"reply_to":"","delivery_mode":2,' ..
    '"delivery_info":{"exchange":"","routing_key":' .. jstring(t.queue) .. '},' ..
    '"priority":' .. format("%d", t.priority or 0) .. ',"body_encoding":"base64",' ..
    '"delivery_tag":"' .. M.uuid() .. '"' ..
    ((t.expires and t.sent) and format(',"expiration":"%d"',
      floor(math.max(0, t.expires - t.sent) * 1000)) or "") .. "}"
  return '{"body":"' .. M.base64(body) .. '","content-encoding":"' ..
    (t.serializer == "msgpack" and "binary" or "utf-8") .. '","content-type":"' ..
    M.CONTENT_TYPES[t.serializer] .. '","headers":' .. headers .. ',"properties":' ..
    properties .. "}"
end

--- Read a task message as a worker meets it: the envelope (for the
-- unacked hash) and the task `{id, name, args, nargs, kwargs, eta,
-- expires, retries, root_id, parent_id, delivery_tag, exchange,
-- routing_key, sent}`; or nil, err (kind `celery`) and, when the message
-- named one, the task id (so a backend can record the FAILURE).
function M.parse_task(raw)
  local env, err = json.decode(raw)
  if env == nil then return nil, core.error("celery", "a message that is not JSON: " ..
    tostring(err)) end
  if type(env) ~= "table" then return bad("a message that is not a JSON object") end
  local h = env.headers
  if type(h) ~= "table" then return bad("a message without headers") end
  local id = type(h.id) == "string" and h.id or nil
  if type(h.task) ~= "string" then
    return nil, core.error("celery", "not a protocol 2 task message (no task header)"), nil, env
  end
  local body
  body, err = open_envelope(env)
  if body == nil then return nil, err, id, env end
  if type(body) ~= "table" or type(body[1]) ~= "table" or type(body[2]) ~= "table" then
    return nil, core.error("celery", "a protocol 2 body is [args, kwargs, embed]"), id, env
  end
  if not id then return nil, core.error("celery", "a task message without an id"), nil, env end
  local props = env.properties
  local info = type(props.delivery_info) == "table" and props.delivery_info or {}
  local eta, expires = h.eta, h.expires
  if eta ~= nil and eta ~= json.null then
    eta = M.parse_time(eta)
    if not eta then return nil, core.error("celery", "an eta that is not a time"), id, env end
  else
    eta = nil
  end
  if expires ~= nil and expires ~= json.null then
    expires = M.parse_time(expires)
    if not expires then
      return nil, core.error("celery", "an expires that is not a time"), id, env
    end
  else
    expires = nil
  end
  -- a list: keys exactly 1..n (a MessagePack map with integer keys is not)
  local args = body[1]
  local nargs, count = 0, 0
  for k in pairs(args) do
    if type(k) ~= "number" or k < 1 or k % 1 ~= 0 then
      return nil, core.error("celery", "task args that are not a list"), id, env
    end
    count = count + 1
    if k > nargs then nargs = k end
  end
  if count ~= nargs then
    return nil, core.error("celery", "task args that are not a list"), id, env
  end
  for k in pairs(body[2]) do
    if type(k) ~= "string" then
      return nil, core.error("celery", "task kwargs that are not a mapping of names"), id, env
    end
  end
  return {
    id = id,
    name = h.task,
    args = args,
    nargs = nargs,
    kwargs = body[2],
    eta = eta,
    expires = expires,
    retries = tonumber(h.retries) or 0,
    root_id = type(h.root_id) == "string" and h.root_id or id,
    parent_id = type(h.parent_id) == "string" and h.parent_id or nil,
    delivery_tag = type(props.delivery_tag) == "string" and props.delivery_tag or M.uuid(),
    exchange = type(info.exchange) == "string" and info.exchange or "",
    routing_key = type(info.routing_key) == "string" and info.routing_key or nil,
    sent = tonumber(h.squall_sent),
    content_type = env["content-type"],
  }, nil, nil, env
end

-- ---- results -----------------------------------------------------------------

M.READY = { SUCCESS = true, FAILURE = true, REVOKED = true }

--- The Redis backend's meta for a task, as JSON: `result` is the value
-- (SUCCESS) or `{exc_type, exc_message, exc_module}` (FAILURE, REVOKED);
-- `date_done` is set for the ready states, as Celery's.
function M.meta(id, status, result, traceback, now, parent_id)
  local ready = M.READY[status]
  local m = {
    status = status,
    result = result == nil and json.null or result,
    traceback = traceback or json.null,
    children = {},
    date_done = ready and M.isoformat(now, true) or json.null,
    task_id = id,
  }
  if parent_id then m.parent_id = parent_id end
  return json.encode(m)
end

--- An exception as Celery stores it.
function M.exception(exc_type, message, module)
  return { exc_type = exc_type, exc_message = { message }, exc_module = module }
end

--- A stored meta: the table (status, result, traceback...), or nil, err.
function M.parse_meta(text)
  local m, err = json.decode(text)
  if m == nil then return nil, err end
  if type(m) ~= "table" or type(m.status) ~= "string" then
    return bad("a result meta without a status")
  end
  return m
end

-- ---- the pidbox (remote control) ----------------------------------------------

--- A broadcast to every worker (`/{db}.celery.pidbox`): method, arguments,
-- and for a call, the ticket and the reply queue's routing key.
function M.control(method, arguments, now, ticket, reply_key)
  local body = { method = method, arguments = msgpack.map(arguments or {}),
    destination = json.null, pattern = json.null, matcher = json.null }
  if ticket then
    body.ticket = ticket
    body.reply_to = { exchange = "reply.celery.pidbox", routing_key = reply_key }
  end
  return envelope(body, "json", { clock = 1, expires = now + 10 },
    { delivery_mode = 2, delivery_info = { exchange = "celery.pidbox", routing_key = "" } })
end

--- A control message's body (method, arguments, destination, reply_to,
-- ticket) and headers, or nil, err.
function M.parse_control(raw)
  local env, err = json.decode(raw)
  if type(env) ~= "table" then return nil, err or core.error("celery", "not an object") end
  local body
  body, err = open_envelope(env)
  if type(body) ~= "table" or type(body.method) ~= "string" then
    return nil, err or core.error("celery", "a control message without a method")
  end
  return body, type(env.headers) == "table" and env.headers or {}
end

--- The reply a worker sends to a control call.
function M.control_reply(reply, ticket, routing_key)
  return envelope(reply, "json", { ticket = ticket, clock = 1 }, { delivery_mode = 1,
    delivery_info = { exchange = "reply.celery.pidbox", routing_key = routing_key } })
end

return M
