--- A Redis client on squall.iostream: RESP2, every command as a method,
-- pipelines, MULTI/EXEC, pub/sub and a connection pool, all waiting inside
-- coroutines as lua-resty-redis does on OpenResty's cosockets.
--
--     local r = assert(redis.connect({ host = "127.0.0.1", port = 6379 }))
--     r:set("k", "v")                  --> "OK"
--     r:get("k")                       --> "v" (redis.null when missing)
--
-- Replies: status -> string, integer -> number (int64 cdata beyond 2^53),
-- bulk -> string or redis.null, array -> table. An error reply is
-- `nil, err` (kind `redis`), and inside a pipeline or EXEC it stands in
-- place as an error value (`redis.is_error(v)`). See docs/api.md (squall.redis).
-- @module squall.redis
local core = require "squall.core"
local iostream = require "squall.iostream"
local pool = require "squall.pool"
local reader = require "squall.reader"
local util = require "squall.util"
local KNOWN = require "squall.redis.commands"
local failure = util.failure

local M = {}

local type, tostring, tonumber, error, select = type, tostring, tonumber, error, select
local sub, byte, find, format = string.sub, string.byte, string.find, string.format
local setmetatable, getmetatable = setmetatable, getmetatable

--- What a nil bulk or array reply is: the same NULL light userdata as
-- msgpack.null and cjson.null.
M.null = core.msgpack_null

local MAX_DEPTH = 100 -- arrays nested deeper are refused, as a protocol error

-- ---- replies --------------------------------------------------------------

-- An error reply inside a pipeline or EXEC result.
local error_mt = {}
error_mt.__index = error_mt
error_mt.__tostring = function(e) return "redis: " .. e.message end

local function error_value(message, kind)
  return setmetatable({ kind = kind or "redis", message = message }, error_mt)
end
--- An error value (as a pipeline's replies hold) for `message`, of `kind`
-- ("redis" unless given): the cluster client puts one where a command
-- failed.
M.error_value = error_value

--- True when `v` is an error reply standing in a pipeline's or EXEC's
-- results (`v.message` is the server's text).
function M.is_error(v)
  return getmetatable(v) == error_mt
end

-- An integer reply: exact (int64 cdata beyond 2^53), nil past int64.
local integer = util.decimal_integer

-- A bulk or array length: the count, M.null for -1, or nil, err.
local function length(rest, what)
  local n = tonumber(rest)
  if n == -1 then return M.null end
  if not n or n < 0 or n % 1 ~= 0 or not find(rest, "^%d+$") then
    return nil, core.error("protocol", "bad " .. what .. " length " .. rest)
  end
  return n
end

-- Read one reply with `rd` (rd:line() without its CRLF, rd:bytes(n)),
-- either of which returns nil, err when it cannot go on. Returns the
-- value, or nil, err: err.kind is "protocol" for bytes that break RESP,
-- else whatever the reader said. Error replies come back as error values.
local function read_reply(rd, depth)
  local line, err = rd:line()
  if not line then return nil, err end
  local t, rest = byte(line, 1), sub(line, 2)
  if t == 43 then -- "+"
    return rest
  elseif t == 45 then -- "-"
    return error_value(rest)
  elseif t == 58 then -- ":"
    local n = integer(rest)
    if n == nil then return nil, core.error("protocol", "bad integer reply " .. rest) end
    return n
  elseif t == 36 then -- "$"
    local n
    n, err = length(rest, "bulk")
    if n == nil or n == M.null then return n, err end
    local data
    data, err = rd:bytes(n + 2)
    if not data then return nil, err end
    if sub(data, -2) ~= "\r\n" then
      return nil, core.error("protocol", "a bulk reply does not end in CRLF")
    end
    return sub(data, 1, n)
  elseif t == 42 then -- "*"
    local n
    n, err = length(rest, "array")
    if n == nil or n == M.null then return n, err end
    if depth >= MAX_DEPTH then
      return nil, core.error("protocol", "arrays nested deeper than " .. MAX_DEPTH)
    end
    local arr = {}
    for i = 1, n do
      local v
      v, err = read_reply(rd, depth + 1)
      if v == nil then return nil, err end
      arr[i] = v
    end
    return arr
  end
  return nil, core.error("protocol", format("a reply starts with %q", sub(line, 1, 1)))
end

-- A reader over a string, for parse().
local StringReader = util.class()
local INCOMPLETE = {}

function StringReader:line()
  local e = find(self.s, "\r\n", self.pos, true)
  if not e then return nil, INCOMPLETE end
  local line = sub(self.s, self.pos, e - 1)
  self.pos = e + 2
  return line
end

function StringReader:bytes(n)
  if #self.s - self.pos + 1 < n then return nil, INCOMPLETE end
  local b = sub(self.s, self.pos, self.pos + n - 1)
  self.pos = self.pos + n
  return b
end

--- Parse one RESP2 reply at `pos` (default 1) of `s`: a pure function, so
-- it can be fuzzed alone (tests/fuzz/resp_fuzz.lua).
-- @return the value and the position after it; nil while incomplete;
--   nil, err (kind `protocol`) for bytes that are not RESP
function M.parse(s, pos)
  local rd = setmetatable({ s = s, pos = pos or 1 }, StringReader)
  local v, err = read_reply(rd, 0)
  if v == nil then
    if err == INCOMPLETE then return nil end
    return nil, err
  end
  return v, rd.pos
end

-- A reader over a stream: what read_reply needs, cut out of a squall.reader
-- buffer. `used` counts the bytes of the reply being read, against
-- max_buffer_size: a reply larger than that fails rather than grow without
-- end (an LRANGE of millions of small items as much as one huge value).
local StreamReader = util.class()

local function over(self, n)
  local used = self.used + n
  self.used = used
  if used > self.max then
    return core.error("buffer_full", format("redis: the reply passed max_buffer_size (%d bytes)",
      self.max))
  end
end

function StreamReader:line()
  local line, err = self.r:line(self.max_line, "a reply line")
  if not line then return nil, err end
  err = over(self, #line + 2)
  if err then return nil, err end
  return line
end

function StreamReader:bytes(n)
  local err = over(self, n)
  if err then return nil, err end
  return self.r:take(n)
end

-- Whether any byte of the reply being read has come (a timeout before
-- that leaves the connection usable).
function StreamReader:started()
  return self.used > 0 or self.r:buffered() > 0
end

-- ---- commands -------------------------------------------------------------

local function arg_string(v, i)
  local t = type(v)
  if t == "string" then return v end
  if t == "number" then
    if v % 1 == 0 and v >= -9007199254740992 and v <= 9007199254740992 then
      return format("%d", v)
    end
    return format("%.17g", v)
  end
  if t == "cdata" then return (tostring(v):gsub("U?LL$", "")) end
  if t == "boolean" then return v and "1" or "0" end
  error(format("argument %d must be a string or number, got %s", i, util.describe(v)), 4)
end

-- "*3\r\n$3\r\nSET\r\n" for ("SET", 2 arguments), made once.
local headers = {}
local function header(name, n)
  local by_n = headers[name]
  if not by_n then
    by_n = {}
    headers[name] = by_n
  end
  local h = by_n[n]
  if not h then
    h = format("*%d\r\n$%d\r\n%s\r\n", n + 1, #name, name)
    by_n[n] = h
  end
  return h
end

local SMALL = 512 -- arguments up to this size are copied into one string

-- The RESP request for one command: an array of bulk strings. Short
-- arguments join the header in one string (one piece for the write to
-- gather); a long one goes as its own piece, never copied here.
local function request(parts, name, ...)
  local n = select("#", ...)
  local cur = header(name, n)
  for i = 1, n do
    local a = arg_string((select(i, ...)), i)
    if #a <= SMALL then
      cur = cur .. "$" .. #a .. "\r\n" .. a .. "\r\n"
    else
      parts[#parts + 1] = cur .. "$" .. #a .. "\r\n"
      parts[#parts + 1] = a
      cur = "\r\n"
    end
  end
  parts[#parts + 1] = cur
end

--- A connection: `r:call(name, ...)`, each of Redis' commands as a lower-case
-- method, `r:pipeline(fn)`, `r:subscribe(...)`, `r:read_message()`,
-- `r:close()`.
-- @type Redis
-- A method for a command name: r:hset(...) is r:call("HSET", ...), and
-- r:client_list() is r:call("CLIENT", "LIST").
local function command_method(key)
  local a, b = key:upper():match("^([^_]+)_?(.*)$")
  if b == "" then return function(r, ...) return r:call(a, ...) end end
  return function(r, ...) return r:call(a, b, ...) end
end

-- A method for `key` when it names a command Redis has (squall.redis.
-- commands); nil for a name no method could have; raises, at the line
-- that asked (level), for a name shaped like a command that is none, so
-- r:gett() is a mistake found here, not a round trip the server refuses.
local function command_for(key, level)
  if type(key) ~= "string" or find(key, "^%a[%w_]*$") == nil then return nil end
  if KNOWN[(key:match("^[^_]+")):lower()] then return command_method(key) end
  error(format("redis: no command %s: not one of Redis' commands (send others with " ..
    "r:call(%q, ...))", key, (key:upper():gsub("_", " "))), level + 1)
end

--- Give class `cls` (a util.class whose objects have `call`) a method for
-- every command, made when first asked for (after what every class
-- inherits, such as `extend`). The cluster client's class has them too.
function M.command_methods(cls)
  local mt = getmetatable(cls)
  local inherited = mt.__index
  mt.__index = function(c, key)
    local v = inherited[key]
    if v ~= nil then return v end
    v = command_for(key, 2)
    if v then rawset(c, key, v) end
    return v
  end
end

--- An __index for a pipeline's queue whose own methods are in `methods`
-- (at least `call`): any other command name becomes a method, made once
-- and kept in `methods`. The cluster client's queue uses it too.
function M.queue_index(methods)
  return function(_, key)
    local m = methods[key]
    if m == nil then
      m = command_for(key, 2)
      methods[key] = m
    end
    return m
  end
end

local Redis = util.class()
M.command_methods(Redis)

local broken = util.broken -- fail for good: every later call says why

-- Read one reply. A reader or protocol failure breaks the connection, and
-- so does a timeout once part of a reply was read (the next read would
-- start mid-reply); one before any byte of it (read_message) does not.
local function read_one(self, timeout_ok)
  local rd = self._reader
  rd.used = 0
  local v, err = read_reply(rd, 0)
  if v == nil then
    if err.kind == "timeout" and timeout_ok and not rd:started() then return nil, err end
    return broken(self, err)
  end
  return v
end

-- Send a request. Bytes the server sent unasked (an extra reply, a
-- message on a connection that never subscribed) would be read as this
-- command's answer: the connection is broken instead. A subscribed
-- connection gets messages at any time; those are kept for read_message.
local function send(self, parts)
  if failure(self) then return util.closed(self) end
  if not self._subscribed then
    local n = self._reader.r:unread()
    if n > 0 then
      return broken(self, core.error("protocol", format(
        "redis: the server sent %d bytes nobody asked for", n)))
    end
  end
  local ok, err = self.stream:write(parts)
  if not ok then return broken(self, err) end
  return true
end

local function result(v)
  if M.is_error(v) then return nil, core.error("redis", v.message) end
  return v
end

-- A published message as read_message gives it, or nil for any other reply.
local function message(v)
  if type(v) ~= "table" then return nil end
  if v[1] == "message" or v[1] == "smessage" then
    return { kind = v[1], channel = v[2], data = v[3] }
  elseif v[1] == "pmessage" then
    return { kind = "pmessage", pattern = v[2], channel = v[3], data = v[4] }
  end
end

-- The reply to a command just sent. On a subscribed connection messages
-- may come first: they are kept, in order, for read_message.
local function read_answer(self)
  while true do
    local v, err = read_one(self)
    local msg = v ~= nil and self._subscribed and message(v)
    if not msg then return v, err end
    local q = self._messages or {}
    self._messages = q
    q[#q + 1] = msg
  end
end

local SUBSCRIPTION_SET = { subscribe = "_channels", unsubscribe = "_channels",
  psubscribe = "_patterns", punsubscribe = "_patterns",
  ssubscribe = "_shard_channels", sunsubscribe = "_shard_channels" }
-- call()'s names for them, checked per command without a string made
local SUBSCRIPTION_COMMAND = {}
for k in pairs(SUBSCRIPTION_SET) do
  SUBSCRIPTION_COMMAND[k], SUBSCRIPTION_COMMAND[k:upper()] = true, true
end

-- (P)(UN)SUBSCRIBE: one confirmation per channel named, or, for an
-- unsubscribe naming none, per channel held (at least one). Each says how
-- many subscriptions remain, which says whether the connection is still
-- subscribed. Messages published meanwhile are kept for read_message.
local function confirmations(self, name, ...)
  local n = select("#", ...)
  local set_name = SUBSCRIPTION_SET[name:lower()]
  local set = self[set_name]
  if n == 0 then
    for _ in pairs(set) do n = n + 1 end
    if n == 0 then n = 1 end
  end
  local parts = {}
  request(parts, name, ...)
  local ok, err = send(self, parts)
  if not ok then return nil, err end
  local got = {}
  while #got < n do
    local v
    v, err = read_answer(self)
    if v == nil then return nil, err end
    if M.is_error(v) then return nil, core.error("redis", v.message) end
    if type(v) == "table" and type(v[3]) == "number" then
      got[#got + 1] = v
      local kind = type(v[1]) == "string" and v[1]:lower()
      if SUBSCRIPTION_SET[kind] and type(v[2]) == "string" then
        self[SUBSCRIPTION_SET[kind]][v[2]] = (kind:find("^[ps]?subscribe$") and true) or nil
      end
      -- subscribed while any set holds something (each kind counts its own)
      self._subscribed = v[3] > 0 or next(self._channels) ~= nil or
        next(self._patterns) ~= nil or next(self._shard_channels) ~= nil
    else
      return broken(self, core.error("protocol", "redis: " .. name ..
        " was answered with something other than its confirmation"))
    end
  end
  return got
end

--- Run a command: the reply, or nil, err (kind `redis` for an error reply;
-- the connection stays usable), or nil, err for I/O (`closed`,
-- `timeout`, `protocol`; the connection is closed then, except after a
-- timeout).
function Redis:call(name, ...)
  if type(name) ~= "string" then
    error("call: the command name must be a string, got " .. util.describe(name), 2)
  end
  if SUBSCRIPTION_COMMAND[name] then return confirmations(self, name:upper(), ...) end
  if self._subscribed and name:upper() ~= "PING" then
    error("call: this connection is subscribed; only (P)(UN)SUBSCRIBE and PING may run", 2)
  end
  local parts = {}
  request(parts, name, ...)
  local ok, err = send(self, parts)
  if not ok then return nil, err end
  local v
  v, err = read_answer(self)
  if v == nil then return nil, err end
  return result(v)
end

-- A pipeline's queue: p:call records a command; p:incr and the rest are
-- commands, named as on a connection (they end in p:call), made once per
-- name. (No closure per pipeline: the JIT compiles a loop of them.)
local queue_methods = {}
function queue_methods.call(q, ...)
  if type((...)) ~= "string" then
    error("call: the command name must be a string, got " .. util.describe((...)), 2)
  end
  q._n = q._n + 1
  request(q._parts, ...)
end
local queue_mt = { __index = M.queue_index(queue_methods) }

-- Send what `parts` holds (n commands) and read the n replies.
local function exchange(self, parts, n)
  if n == 0 then return {} end
  local ok, err = send(self, parts)
  if not ok then return nil, err end
  local replies = {}
  for i = 1, n do
    local v
    v, err = read_one(self)
    if v == nil then return nil, err end
    replies[i] = v
  end
  return replies
end

--- Queue the commands `fn(p)` makes on `p` (as methods, or p:call) and
-- send them in one write; wait for every reply.
-- @treturn table the replies in order; an error reply stands in its place
--   as an error value (`redis.is_error`)
-- @return nil, err when the connection failed
function Redis:pipeline(fn)
  util.check_callable(fn, 2, "pipeline's function")
  local queue = setmetatable({ _parts = {}, _n = 0 }, queue_mt)
  fn(queue)
  return exchange(self, queue._parts, queue._n)
end

--- Send the commands of `list` in one write, as pipeline does: each a
-- table of the name and its arguments (`n`: its length, when it holds
-- nils), as `{ "SET", "k", "v" }`; the replies in order.
function Redis:pipeline_list(list)
  local parts = {}
  for i = 1, #list do
    local c = list[i]
    request(parts, unpack(c, 1, c.n or #c))
  end
  return exchange(self, parts, #list)
end

--- Subscribe to channels; returns the server's confirmations. The
-- connection then only reads messages (read_message) and (un)subscribes.
function Redis:subscribe(...)
  return confirmations(self, "SUBSCRIBE", ...)
end

--- Subscribe to channel patterns; as subscribe.
function Redis:psubscribe(...)
  return confirmations(self, "PSUBSCRIBE", ...)
end

--- Unsubscribe (from all channels when none are named); once no
-- subscription is left the connection runs commands again.
function Redis:unsubscribe(...)
  return confirmations(self, "UNSUBSCRIBE", ...)
end

--- Unsubscribe from patterns (from all when none are named).
function Redis:punsubscribe(...)
  return confirmations(self, "PUNSUBSCRIBE", ...)
end

--- Subscribe to shard channels (Redis 7, SSUBSCRIBE: on a cluster, the
-- node of their slot); their messages come with kind "smessage".
function Redis:ssubscribe(...)
  return confirmations(self, "SSUBSCRIBE", ...)
end

--- Unsubscribe from shard channels (from all when none are named).
function Redis:sunsubscribe(...)
  return confirmations(self, "SUNSUBSCRIBE", ...)
end

--- The next published message on a subscribed connection: `{kind =
-- "message", channel =, data =}` or `{kind = "pmessage", pattern =,
-- channel =, data =}`; nil, err (kind `timeout`) when none came within
-- `timeout` seconds (the connection stays subscribed).
function Redis:read_message(timeout)
  if timeout ~= nil and (type(timeout) ~= "number" or timeout <= 0) then
    error("read_message: timeout must be a positive number", 2)
  end
  local q = self._messages
  if q and #q > 0 then return table.remove(q, 1) end
  if failure(self) then return util.closed(self) end
  local stream = self.stream
  while true do
    stream:set_timeout(timeout or self._timeout)
    local v, err = read_one(self, true)
    stream:set_timeout(self._timeout)
    if v == nil then
      if err.kind == "timeout" and not failure(self) then
        return nil, core.error("timeout", format("redis: no message came within %g s",
          timeout or self._timeout))
      end
      return nil, err
    end
    local msg = message(v)
    if msg then return msg end
  end
end

--- Close the connection.
function Redis:close()
  util.close_connection(self)
end

--- True once closed (by either side, or a failure).
function Redis:closed()
  return failure(self) ~= nil or self.stream:closed()
end

local CONNECT_KEYS = { host = true, port = true, path = true, password = true,
  username = true, db = true, timeout = true, ssl_options = true, server_hostname = true,
  max_buffer_size = true }

local function check_keys(opts, who, level)
  for k in pairs(opts) do
    if not CONNECT_KEYS[k] then error(who .. ": unknown option " .. tostring(k), level + 1) end
  end
end

--- Connect (inside a coroutine), authenticate and select the database.
-- @tparam table opts `host` ("127.0.0.1"), `port` (6379) or `path` (a
--   unix socket), `password`,
--   `username`, `db`, `timeout` (seconds, for connecting and each reply),
--   `ssl_options`, `server_hostname`, `max_buffer_size` (the largest
--   reply, default 100 MiB: past it `nil, err` of kind `buffer_full`)
-- @treturn Redis
-- @return nil, err: I/O kinds as iostream.connect, or `redis` (a wrong
--   password, a bad db)
function M.connect(opts)
  opts = opts or {}
  if type(opts) ~= "table" then error("redis.connect: opts must be a table", 2) end
  check_keys(opts, "redis.connect", 2)
  util.need_coroutine("redis.connect", 2)
  local max = opts.max_buffer_size or 104857600
  if type(max) ~= "number" or max < 1 then
    error("redis.connect: max_buffer_size must be a positive number, got " ..
      util.describe(max), 2)
  end
  local stream, err
  if opts.path then
    if type(opts.path) ~= "string" then error("redis.connect: path must be a string", 2) end
    stream, err = iostream.connect_unix(opts.path, { max_buffer_size = max + 65536 })
  else
    local port = opts.port or 6379
    util.check_port(port, 2)
    stream, err = iostream.connect(opts.host or "127.0.0.1", port, {
      timeout = opts.timeout, ssl_options = opts.ssl_options,
      server_hostname = opts.server_hostname, max_buffer_size = max + 65536 })
  end
  if not stream then return nil, err end
  if opts.timeout then stream:set_timeout(opts.timeout) end
  local self = setmetatable({ stream = stream, _timeout = opts.timeout,
    _channels = {}, _patterns = {}, _shard_channels = {},
    _reader = setmetatable({ r = reader.new(stream), max_line = 65536, used = 0, max = max },
      StreamReader) }, Redis)
  if opts.password then
    local ok
    if opts.username then
      ok, err = self:call("AUTH", opts.username, opts.password)
    else
      ok, err = self:call("AUTH", opts.password)
    end
    if not ok then
      self:close()
      return nil, err
    end
  end
  if opts.db and opts.db ~= 0 then
    local ok
    ok, err = self:call("SELECT", opts.db)
    if not ok then
      self:close()
      return nil, err
    end
  end
  return self
end

-- ---- the pool -------------------------------------------------------------

--- A pool of at most `size` connections (default 16); callers wait in
-- FIFO order while every connection is busy, each at most
-- `queue_timeout` seconds (default 10). The other options are
-- redis.connect's. A subscribed connection is closed when given back.
-- @type RedisPool
local RedisPool = pool.Pool:extend()

local function subscribed(r) return r._subscribed and "discard" or nil end

function M.pool(opts)
  local size, qt, conn_opts = pool.options(opts, "redis.pool", 2)
  check_keys(conn_opts, "redis.pool", 2)
  local p = pool.new({ size = size, queue_timeout = qt,
    connect = function() return M.connect(conn_opts) end })
  return setmetatable(p, RedisPool)
end

--- Run fn(r) with a connection and give it back; fn's results. If fn
-- raises, that connection is closed (not given back) and the error goes on.
function RedisPool:with(fn)
  util.check_callable(fn, 2)
  util.need_coroutine("pool:with", 2)
  return pool.Pool.with(self, fn, subscribed)
end

--- Run one command on a pooled connection.
function RedisPool:call(name, ...)
  util.need_coroutine("pool:call", 2)
  local args = util.pack(...)
  return self:with(function(r) return r:call(name, unpack(args, 1, args.n)) end)
end

-- ---- what the cluster and sentinel clients share ------------------------------

--- Raise at `level` unless `list` is a non-empty list of "host:port"
-- strings: `who` names the caller ("redis.cluster"), `what` the option.
function M.check_addresses(list, who, what, level)
  if type(list) ~= "table" or #list == 0 then
    error(format("%s: %s must be a list of \"host:port\"", who, what), level + 1)
  end
  for _, a in ipairs(list) do
    if type(a) ~= "string" or not find(a, "^.+:%d+$") then
      error(format("%s: each of %s must be \"host:port\", got %s", who, what,
        util.describe(a)), level + 1)
    end
  end
end

--- redis.connect's options: those of `base`, with the host and port of
-- `addr` ("host:port").
function M.address_options(base, addr)
  local o = {}
  for k, v in pairs(base) do o[k] = v end
  local host, port = addr:match("^(.+):(%d+)$")
  o.host, o.port = host, tonumber(port)
  return o
end

--- A Redis Cluster client (squall.redis.cluster): `redis.cluster(opts)`.
function M.cluster(opts)
  local c, err = require("squall.redis.cluster").new(opts, 2) -- not a tail call: misuse
  return c, err                                               -- raises at the caller's line
end

--- A pool on the master a Redis Sentinel group names, following its
-- failovers (squall.redis.sentinel): `redis.sentinel(opts)`.
function M.sentinel(opts)
  local p, err = require("squall.redis.sentinel").new(opts, 2) -- (as cluster)
  return p, err
end

M.Redis = Redis
return M
