--- kombu's Redis transport, as Celery's workers use it: the same keys,
-- the same commands, so Python's workers and producers and Squall's share
-- one broker (kombu/transport/redis.py is the reference).
--
-- - A queue is a list; a message is LPUSHed, and taken by BRPOP from the
--   right. Priority n goes to the list `queue\x06\x16n` for n in 3, 6, 9
--   (0 is the plain list, taken first).
-- - A worker that takes a message records it at once in the hash
--   `unacked` (delivery tag -> [message, exchange, routing key]) and the
--   sorted set `unacked_index` (tag -> when); acknowledging removes both.
--   A message left there longer than the visibility timeout (its worker
--   died) is pushed back onto its queue by any worker, under the lock
--   `unacked_mutex`.
-- - Broadcasts (the pidbox: revoke, ping) are PUBLISHed on
--   `/{db}.celery.pidbox`; a reply is LPUSHed onto the queue that the
--   set `_kombu.binding.reply.celery.pidbox` names for its routing key.
-- @module squall.celery.transport
local core = require "squall.core"
local json = require "squall.json"
local msgpack = require "squall.msgpack"
local redis = require "squall.redis"
local util = require "squall.util"

local M = {}

local type, tonumber, format, ipairs, pairs, unpack = type, tonumber, string.format, ipairs,
  pairs, unpack
local now = core.wall_time

M.SEP = "\6\22"
M.PRIORITY_STEPS = { 0, 3, 6, 9 }
local UNACKED, UNACKED_INDEX, UNACKED_MUTEX = "unacked", "unacked_index", "unacked_mutex"
local MUTEX_EXPIRE_MS = 300000

--- Parse a broker or backend URL: `redis://[[user]:password@]host[:port][/db]`,
-- `rediss://...` (TLS) or `redis+socket:///path[?virtual_host=db]`. Returns
-- redis.connect's options, or raises at `level` for a URL it cannot read.
function M.parse_url(url, level, ssl_options)
  if type(url) ~= "string" then
    error("celery: a broker or backend URL must be a string, got " .. util.describe(url),
      level + 1)
  end
  local opts = {}
  local path, db = url:match("^redis%+socket://(/[^?]*)%??(.*)$")
  if path then
    opts.path = path
    opts.db = tonumber(db:match("virtual_host=(%d+)") or db:match("db=(%d+)") or "0")
    return opts
  end
  local scheme, rest = url:match("^(rediss?)://(.*)$")
  if not scheme then
    error(format("celery: %q is not a redis://, rediss:// or redis+socket:// URL", url),
      level + 1)
  end
  local auth, hostpart = rest:match("^(.*)@(.*)$")
  if not auth then hostpart = rest end
  if auth then
    local user, password = auth:match("^([^:]*):(.*)$")
    if user then
      if user ~= "" then opts.username = user end
      opts.password = password
    else
      opts.password = auth
    end
  end
  local host, port, dbtext = hostpart:match("^%[([^%]]*)%]:?(%d*)/?(%d*)$") -- [IPv6]
  if not host then host, port, dbtext = hostpart:match("^([^:/]*):?(%d*)/?(%d*)$") end
  if not host then error(format("celery: cannot read the URL %q", url), level + 1) end
  opts.host = host ~= "" and host or "127.0.0.1"
  opts.port = tonumber(port) or 6379
  opts.db = tonumber(dbtext) or 0
  if scheme == "rediss" then opts.ssl_options = ssl_options or {} end
  return opts
end

--- @type Transport
local Transport = util.class()

--- A transport over the broker at `conn_opts` (redis.connect's options):
-- commands go through a pool; a consumer opens connections of its own.
function M.new(conn_opts, pool_size)
  local p = {}
  for k, v in pairs(conn_opts) do p[k] = v end
  p.size = pool_size or 8
  return setmetatable({ conn_opts = conn_opts, db = conn_opts.db or 0, pool = redis.pool(p),
    bound = {} }, Transport)
end

--- A connection of its own (for BRPOP, or a subscription).
function Transport:connect()
  return redis.connect(self.conn_opts)
end

--- The list a message of `priority` goes to (kombu's _q_for_pri).
function M.queue_key(queue, priority)
  local pri = 0
  for _, step in ipairs(M.PRIORITY_STEPS) do
    if (priority or 0) >= step then pri = step end
  end
  if pri == 0 then return queue end
  return queue .. M.SEP .. pri
end

--- The lists BRPOP watches for `queues`, in kombu's order: every queue's
-- plain list first, then each priority step.
function M.brpop_keys(queues)
  local keys = {}
  for _, pri in ipairs(M.PRIORITY_STEPS) do
    for _, q in ipairs(queues) do keys[#keys + 1] = M.queue_key(q, pri) end
  end
  return keys
end

--- Record `queue` in its binding set, as Celery's producers and workers
-- declare it (once per transport).
function Transport:bind(queue)
  if self.bound[queue] then return true end
  local ok, err = self.pool:call("SADD", "_kombu.binding." .. queue,
    queue .. M.SEP .. M.SEP .. queue)
  if ok then self.bound[queue] = true end
  return ok, err
end

--- LPUSH a message (its JSON) onto `queue` at `priority`.
function Transport:put(queue, priority, raw)
  if not self.bound[queue] then
    local ok, err = self:bind(queue)
    if not ok then return nil, err end
  end
  return self.pool:call("LPUSH", M.queue_key(queue, priority), raw)
end

--- PUBLISH a broadcast on a fanout exchange ("celery.pidbox").
function Transport:publish_fanout(exchange, raw)
  return self.pool:call("PUBLISH", format("/%d.%s", self.db, exchange), raw)
end

--- The channel a pidbox node subscribes to.
function Transport:fanout_channel(exchange)
  return format("/%d.%s", self.db, exchange)
end

--- Record a message taken from a queue as unacknowledged (kombu's
-- QoS.append), on `conn` (a connection from the pool, or the consumer's).
function Transport:deliver(conn, tag, raw, exchange, routing_key)
  local entry = "[" .. raw .. "," .. json.encode(exchange) .. "," ..
    json.encode(routing_key or json.null) .. "]"
  local replies, err = conn:pipeline(function(p)
    p:multi()
    p:zadd(UNACKED_INDEX, format("%.6f", now()), tag)
    p:hset(UNACKED, tag, entry)
    p:exec()
  end)
  if not replies then return nil, err end
  return true
end

-- Take up to n messages at once and record them as unacked, in Redis, in
-- one step: what BRPOP and then QoS.append do for one message, for a
-- batch and with no moment in which a taken message is recorded nowhere.
-- The entries are kombu's: [message, exchange, routing key].
-- KEYS: unacked, unacked_index, the lists in order; ARGV: n, now, and each
-- list's queue (its routing key when the message names none).
local TAKE = [[
local n, now, out = tonumber(ARGV[1]), ARGV[2], {}
for i = 3, #KEYS do
  while #out < 2 * n do
    local m = redis.call('RPOP', KEYS[i])
    if not m then break end
    local ok, env = pcall(cjson.decode, m)
    local props = ok and type(env) == 'table' and env.properties
    local tag = type(props) == 'table' and props.delivery_tag
    if type(tag) == 'string' then
      local info = type(props.delivery_info) == 'table' and props.delivery_info or {}
      local ex = type(info.exchange) == 'string' and info.exchange or ''
      local rk = type(info.routing_key) == 'string' and info.routing_key or ARGV[i]
      redis.call('ZADD', KEYS[2], now, tag)
      redis.call('HSET', KEYS[1], tag, '[' .. m .. ',' .. cjson.encode(ex) .. ',' ..
        cjson.encode(rk) .. ']')
    end
    out[#out + 1] = KEYS[i]
    out[#out + 1] = m
  end
end
return out
]]

--- Take up to `n` waiting messages from the lists `keys` (as brpop_keys
-- gives them, for `queues`) on `conn`, already recorded as unacked:
-- {list, message, list, message...}, empty when none waits; nil, err.
function Transport:take(conn, keys, n)
  local args = { UNACKED, UNACKED_INDEX }
  for i, k in ipairs(keys) do args[2 + i] = k end
  args[#args + 1] = n
  args[#args + 1] = format("%.6f", now())
  for _, k in ipairs(keys) do args[#args + 1] = k:match("^(.*)" .. M.SEP .. "%d$") or k end
  return conn:call("EVAL", TAKE, #keys + 2, unpack(args))
end

--- The commands that acknowledge `tag`, added to pipeline `p`.
function M.ack_commands(p, tag)
  p:zrem(UNACKED_INDEX, tag)
  p:hdel(UNACKED, tag)
end

--- Acknowledge: forget the unacked copy.
function Transport:ack(tag)
  return self.pool:with(function(r)
    return r:pipeline(function(p)
      p:multi(); M.ack_commands(p, tag); p:exec()
    end)
  end)
end

-- The queues a message for (exchange, routing key) goes to: the routing
-- key itself on the default exchange, else the exchange's bindings.
local function lookup(r, exchange, routing_key)
  if exchange == "" or exchange == nil or exchange == json.null then return { routing_key } end
  local members = r:smembers("_kombu.binding." .. exchange)
  local queues = {}
  if type(members) == "table" then
    for _, m in ipairs(members) do
      local rk, _, queue = m:match("^(.-)" .. M.SEP .. "(.-)" .. M.SEP .. "(.*)$")
      if queue and rk == routing_key then queues[#queues + 1] = queue end
    end
  end
  return queues
end

--- Put an unacked message back on its queue and forget it (kombu's
-- restore_by_tag): at the right end, to be taken next, or with
-- `leftmost` at the left, behind the others. Marked redelivered.
function Transport:restore(tag, leftmost)
  return self.pool:with(function(r)
    for _ = 1, 10 do -- WATCH lost a race: look again
      local ok, err = r:call("WATCH", UNACKED)
      if not ok then return nil, err end
      local entry = r:hget(UNACKED, tag)
      local payload, exchange, routing_key
      if type(entry) == "string" then
        local t = json.decode(entry)
        if type(t) == "table" and type(t[1]) == "table" then
          payload, exchange, routing_key = t[1], t[2], t[3]
        end
      end
      local queues = payload and lookup(r, exchange, routing_key) or {}
      local raw
      if payload then
        local h, props = payload.headers, payload.properties
        if type(h) == "table" then h.redelivered = true; msgpack.map(h) end
        if type(props) == "table" then
          msgpack.map(props)
          if type(props.delivery_info) == "table" then
            props.delivery_info.redelivered = true
            msgpack.map(props.delivery_info)
          end
        end
        raw = json.encode(payload)
      end
      local replies
      replies, err = r:pipeline(function(p)
        p:multi()
        p:zrem(UNACKED_INDEX, tag)
        p:hdel(UNACKED, tag)
        for _, q in ipairs(queues) do
          if leftmost then p:lpush(q, raw) else p:rpush(q, raw) end
        end
        p:exec()
      end)
      if not replies then return nil, err end
      if replies[#replies] ~= redis.null then return true end
    end
    return nil, core.error("celery", "could not restore " .. tag ..
      ": the unacked hash kept changing")
  end)
end

-- Release the mutex only if it is still ours (redis-py's Lock.release).
local RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then " ..
  "return redis.call('del', KEYS[1]) else return 0 end"

--- Push back every unacked message older than `visibility_timeout`
-- seconds (kombu's restore_visible), holding `unacked_mutex` so that one
-- worker at a time does it. Returns how many were restored.
function Transport:restore_visible(visibility_timeout, limit)
  local token = require("squall.celery.message").uuid()
  local got, err = self.pool:call("SET", UNACKED_MUTEX, token, "PX", MUTEX_EXPIRE_MS, "NX")
  if got == nil then return nil, err end
  if got == redis.null then return 0 end -- another worker does it now
  local n = 0
  local tags
  tags, err = self.pool:call("ZREVRANGEBYSCORE", UNACKED_INDEX,
    format("%.6f", now() - visibility_timeout), 0, "LIMIT", 0, limit or 1000)
  if type(tags) == "table" then
    for _, tag in ipairs(tags) do
      if self:restore(tag) then n = n + 1 end
    end
  end
  self.pool:call("EVAL", RELEASE, 1, UNACKED_MUTEX, token)
  if not tags then return nil, err end
  return n
end

--- Send a control reply: LPUSH onto the queue bound to `routing_key` on
-- the reply exchange (a caller that already left has no binding: nothing
-- is sent).
function Transport:reply(exchange, routing_key, raw)
  return self.pool:with(function(r)
    for _, q in ipairs(lookup(r, exchange, routing_key)) do r:lpush(q, raw) end
    return true
  end)
end

--- Close the pool's idle connections.
function Transport:close()
  self.pool:close()
end

M.Transport = Transport
return M
