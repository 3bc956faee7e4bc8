--- Redis Cluster: the same commands as a connection, sent to the node
-- that holds each key's slot (CRC16 of the key, or of its {hash tag}).
--
--     local c = assert(redis.cluster({ nodes = { "127.0.0.1:7000" } }))
--     c:set("user:{42}:name", "x")        -- to the master of its slot
--     c:pipeline(function(p) p:get("a") p:get("b") end)  -- split per node
--
-- The slot map comes from CLUSTER SLOTS, and which arguments are keys
-- from COMMAND (both asked of a seed when the client is made). A MOVED
-- reply updates the map (and has it read again) and the command goes to
-- the node named; ASK sends ASKING then the command there, once.
-- TRYAGAIN, CLUSTERDOWN and a node that refuses connections are retried
-- after a growing delay with the map read again, at most max_redirects
-- times: a failover resolves within them. A command whose connection
-- failed after it was sent is not retried (it may have run): `nil, err`.
-- See docs/api.md (squall.redis, "Past one Redis").
-- @module squall.redis.cluster
local bit = require "bit"
local core = require "squall.core"
local gen = require "squall.gen"
local pool = require "squall.pool"
local redis = require "squall.redis"
local util = require "squall.util"

local M = {}

local type, tostring, tonumber, error, select, pairs, ipairs = type, tostring, tonumber,
  error, select, pairs, ipairs
local byte, find, format, lower, match = string.byte, string.find, string.format,
  string.lower, string.match
local band, bxor, lshift, rshift = bit.band, bit.bxor, bit.lshift, bit.rshift
local unpack, min = unpack, math.min
local xpcall, traceback = xpcall, debug.traceback

local NSLOTS = 16384

-- ---- slots ---------------------------------------------------------------

-- CRC16-CCITT (XMODEM), the hash Redis Cluster's keyHashSlot uses.
local CRC = {}
for i = 0, 255 do
  local c = lshift(i, 8)
  for _ = 1, 8 do
    c = band(c, 0x8000) ~= 0 and bxor(lshift(c, 1), 0x1021) or lshift(c, 1)
    c = band(c, 0xffff)
  end
  CRC[i] = c
end

local function crc16(s, i, j)
  local crc = 0
  for k = i, j do
    crc = bxor(band(lshift(crc, 8), 0xffff), CRC[bxor(rshift(crc, 8), byte(s, k))])
  end
  return crc
end

--- The slot (0-16383) of a key: CRC16 of the part between the first "{"
-- and the "}" after it when that part is not empty (a hash tag), else of
-- the whole key.
function M.slot(key)
  local s = find(key, "{", 1, true)
  if s then
    local e = find(key, "}", s + 1, true)
    if e and e > s + 1 then return crc16(key, s + 1, e - 1) % NSLOTS end
  end
  return crc16(key, 1, #key) % NSLOTS
end
local slot_of = M.slot

-- ---- options -----------------------------------------------------------------

local OPTS = { nodes = true, pool = true, read_from_replicas = true, max_redirects = true,
  retry_delay = true, password = true, username = true, timeout = true,
  ssl_options = true, server_hostname = true, max_buffer_size = true }

local function check_opts(opts, level)
  if type(opts) ~= "table" then error("redis.cluster: opts must be a table", level + 1) end
  for k in pairs(opts) do
    if not OPTS[k] then error("redis.cluster: unknown option " .. tostring(k), level + 1) end
  end
  redis.check_addresses(opts.nodes, "redis.cluster", "nodes", level + 1)
  local mr = opts.max_redirects or 5
  if type(mr) ~= "number" or mr < 0 or mr % 1 ~= 0 then
    error("redis.cluster: max_redirects must be a non-negative integer", level + 1)
  end
  local rd = opts.retry_delay or 0.1
  if type(rd) ~= "number" or rd <= 0 then
    error("redis.cluster: retry_delay must be a positive number", level + 1)
  end
  if opts.pool ~= nil and type(opts.pool) ~= "table" then
    error("redis.cluster: pool must be a table ({ size =, queue_timeout = })", level + 1)
  end
  return mr, rd
end

-- ---- the client --------------------------------------------------------------

--- A cluster client: every command as a method (as on a connection),
-- `c:call(name, ...)`, `c:pipeline(fn)` (or `c:pipeline()` and
-- `p:execute()`), `c:transaction(fn)`, `c:refresh()`, `c:close()`.
-- @type Cluster
local Cluster = util.class()

-- Commands as methods, as on a connection: c:hset(...) is
-- c:call("HSET", ...), and c:client_list() is c:call("CLIENT", "LIST").
redis.command_methods(Cluster)

-- The pool of connections to node `addr` ("host:port"), made when first
-- needed. With read_from_replicas every connection says READONLY (a
-- master ignores it, and a replica then serves reads).
local function make_pool(self, addr)
  local o = redis.address_options(self._conn_opts, addr)
  local readonly = self._read_from_replicas
  local p = pool.new({ size = self._pool_size, queue_timeout = self._queue_timeout,
    connect = function()
      local r, err = redis.connect(o)
      if r and readonly then
        local ok
        ok, err = r:call("READONLY")
        if not ok then
          r:close()
          return nil, err
        end
      end
      return r, err
    end })
  self._pools[addr] = p
  return p
end

local function node_pool(self, addr)
  return self._pools[addr] or make_pool(self, addr)
end

-- A connection given back: kept unless it was left subscribed.
local function keep_unless_subscribed(r)
  return r._subscribed and "discard" or nil
end

-- Run fn(r, x) on a connection to addr. Returns fn's results, or nil,
-- err, sent: sent is false when no connection could be had (nothing ran).
local function on_node(self, addr, fn, x)
  local p = node_pool(self, addr)
  local r, err = p:acquire()
  if not r then return nil, err, false end
  local ok, a, b = xpcall(fn, traceback, r, x)
  if not ok then
    p:release(r, "discard")
    error(a, 0)
  end
  p:release(r, keep_unless_subscribed(r))
  return a, b, true
end

-- Read CLUSTER SLOTS from one node and make the slot map of it. Returns
-- true or nil, err.
local function load_slots(self, addr)
  local v, err = on_node(self, addr, function(r) return r:call("CLUSTER", "SLOTS") end)
  if v == nil then return nil, err end
  if type(v) ~= "table" or #v == 0 then
    return nil, core.error("redis", "CLUSTER SLOTS from " .. addr .. " gave no slots")
  end
  local slots, masters = {}, {}
  for _, range in ipairs(v) do
    local first, last, m = range[1], range[2], range[3]
    if type(first) ~= "number" or type(last) ~= "number" or type(m) ~= "table" then
      return nil, core.error("protocol", "a CLUSTER SLOTS range from " .. addr ..
        " is not [first, last, master...]")
    end
    local shard = { master = m[1] .. ":" .. tostring(m[2]), replicas = {}, next = 0 }
    masters[shard.master] = true
    for i = 4, #range do
      local rep = range[i]
      if type(rep) == "table" then shard.replicas[#shard.replicas + 1] = rep[1] .. ":" ..
        tostring(rep[2]) end
    end
    for s = first, last do slots[s] = shard end
  end
  self._slots, self._masters = slots, masters
  return true
end

--- Read the slot map again (inside a coroutine), from the nodes known,
-- then the seeds; concurrent callers share one reading. Returns true, or
-- nil, err when no node answered.
function Cluster:refresh()
  if self._refreshing then return self._refreshing:result() end
  local f = gen.Future()
  self._refreshing = f
  local tried, last = {}, nil
  local order = {}
  for addr in pairs(self._masters or {}) do order[#order + 1] = addr end
  for _, addr in ipairs(self._seeds) do order[#order + 1] = addr end
  local ok = false
  for _, addr in ipairs(order) do
    if not tried[addr] then
      tried[addr] = true
      local done, err = load_slots(self, addr)
      if done then
        ok = true
        break
      end
      last = err
    end
  end
  self._refreshing = nil
  if ok then
    f:set_result(true)
    return true
  end
  local err = core.error(last and last.kind or "closed",
    "redis.cluster: no node gave the slot map (" .. tostring(last) .. ")")
  f:set_result(nil, err)
  return nil, err
end

-- Which arguments of a command are keys: COMMAND's first key, last key
-- and step (positions count the command name as 0; a negative last
-- counts from the end), per lower-case name and "name|subcommand".
local function load_commands(self)
  local v, err
  for _, addr in ipairs(self._seeds) do
    v, err = on_node(self, addr, function(r) return r:call("COMMAND") end)
    if v then break end
  end
  if not v then return nil, err end
  local cmds = {}
  local function add(entry, prefix)
    if type(entry) ~= "table" or type(entry[1]) ~= "string" then return end
    local flags = {}
    if type(entry[3]) == "table" then
      for _, f in ipairs(entry[3]) do flags[f] = true end
    end
    local name = lower(entry[1])
    cmds[name] = { first = entry[4], last = entry[5], step = entry[6],
      readonly = flags.readonly or false, movable = flags.movablekeys or false,
      sub = type(entry[10]) == "table" and #entry[10] > 0 }
    if type(entry[10]) == "table" and not prefix then
      for _, s in ipairs(entry[10]) do add(s, name) end
    end
  end
  for _, entry in ipairs(v) do add(entry) end
  self._commands = cmds
  return true
end

--- Connect to a cluster (inside a coroutine): read the slot map and the
-- command table from the first seed that answers.
-- @tparam table opts `nodes` (seeds, "host:port"), `pool` (`size` 8,
--   `queue_timeout`: each node's pool), `read_from_replicas` (false),
--   `max_redirects` (5), `retry_delay` (0.1 s, doubling to 1 s), and
--   redis.connect's `password`, `username`, `timeout`, `ssl_options`,
--   `server_hostname`, `max_buffer_size`
-- @treturn Cluster
-- @return nil, err when no seed answered
function M.new(opts, level)
  level = (level or 1) + 1
  local mr, rd = check_opts(opts, level)
  util.need_coroutine("redis.cluster", level)
  local popts = opts.pool or {}
  local size, qt = pool.options({ size = popts.size or 8, queue_timeout = popts.queue_timeout },
    "redis.cluster: pool", level)
  local conn_opts = {}
  for _, k in ipairs({ "password", "username", "timeout", "ssl_options", "server_hostname",
    "max_buffer_size" }) do conn_opts[k] = opts[k] end
  local seeds = {}
  for i, n in ipairs(opts.nodes) do seeds[i] = n end
  local self = setmetatable({ _seeds = seeds, _pools = {}, _conn_opts = conn_opts,
    _pool_size = size, _queue_timeout = qt, _read_from_replicas = opts.read_from_replicas
      and true or false, _max_redirects = mr, _retry_delay = rd, _slots = {},
    _masters = {}, _subs = {}, _messages = {}, _by_name = {} }, Cluster)
  local ok, err = self:refresh()
  if not ok then return nil, err end
  ok, err = load_commands(self)
  if not ok then return nil, err end
  return self
end

local CROSSSLOT = "CROSSSLOT Keys in request don't hash to the same slot"

-- Commands travel as tables: the name, its arguments, and n (how many
-- of those, when some are nil): { "SET", "k", "v", n = 3 }. A COMMAND key
-- position p (the name is 0) is c[p + 1].

-- COMMAND GETKEYS for c, run on connection r.
local function getkeys(r, c)
  return r:call("COMMAND", "GETKEYS", unpack(c, 1, c.n))
end

-- Where command c goes: its slot (false for a command without keys) and
-- whether it only reads; or nil, err for keys in different slots.
local function route(self, c)
  local name = c[1]
  -- COMMAND's entry by the name as given ("GET", "get"), found once
  local info = self._by_name[name]
  if info == nil then
    info = self._commands[lower(name)] or false
    self._by_name[name] = info
  end
  if info and info.sub and type(c[2]) == "string" then
    info = self._commands[lower(name) .. "|" .. lower(c[2])] or info
  end
  if not info then return false, false end
  local keys, first, last, step = c, info.first, info.last, info.step
  if info.movable then
    local lname = lower(name)
    if lname == "eval" or lname == "evalsha" or lname == "eval_ro" or lname == "evalsha_ro"
      or lname == "fcall" or lname == "fcall_ro" then
      first, last, step = 3, 2 + (tonumber(c[3]) or 0), 1 -- the keys after numkeys
    else
      -- the server knows where the keys are (ZUNIONSTORE, XREAD, SORT...)
      local v, err = on_node(self, next(self._masters) or self._seeds[1], getkeys, c)
      if v == nil then
        if err and err.kind == "redis" then return false, info.readonly end
        return nil, err
      end
      keys, first, last, step = v, 0, #v - 1, 1
    end
  elseif not first or first <= 0 then
    return false, info.readonly
  end
  local n = keys == c and c.n - 1 or last
  if last < 0 then last = n + 1 + last end
  if last > n then last = n end
  local slot
  for p = first, last, step > 0 and step or 1 do
    local k = keys[p + 1]
    local s = slot_of(type(k) == "string" and k or tostring(k))
    if slot and s ~= slot then return nil, core.error("redis", CROSSSLOT) end
    slot = s
  end
  if not slot then return false, info.readonly end
  return slot, info.readonly
end

-- The node for a slot: its master, or with read_from_replicas and a
-- read-only command its replicas in turn (the master when it has none).
-- A slot no shard holds (a map being read again) goes to any master.
local function node_for(self, slot, readonly)
  local shard = slot and self._slots[slot]
  if not shard then
    local any = next(self._masters)
    return any or self._seeds[1]
  end
  local reps = shard.replicas
  if readonly and self._read_from_replicas and #reps > 0 then
    shard.next = shard.next + 1
    return reps[shard.next % #reps + 1]
  end
  return shard.master
end

-- What an error reply asks of the client: "moved" or "ask" (with the
-- slot and the node), "retry" (TRYAGAIN, CLUSTERDOWN, LOADING,
-- MASTERDOWN, READONLY on a replica that was a master), or nil.
local function redirect(message)
  local kind, slot, addr = match(message, "^(%u+) (%d+) (%S+)$")
  if kind == "MOVED" then return "moved", tonumber(slot), addr end
  if kind == "ASK" then return "ask", tonumber(slot), addr end
  local word = match(message, "^(%u+)")
  if word == "TRYAGAIN" or word == "CLUSTERDOWN" or word == "LOADING" or
    word == "MASTERDOWN" or word == "READONLY" then
    return "retry"
  end
  return nil
end

-- The wait before the retry after `tries` others: retry_delay doubling,
-- at most a second.
local function backoff(self, tries)
  gen.sleep(min(self._retry_delay * 2 ^ (tries - 1), 1))
end

-- Command x.c on connection r, after ASKING when x.asking.
local function call_on(r, x)
  if x.asking then
    local ok, e = r:call("ASKING")
    if not ok then return nil, e end
  end
  local c = x.c
  return r:call(unpack(c, 1, c.n))
end

-- Run command c (its slot known) with redirects and retries.
local function run(self, slot, readonly, c)
  local x = { c = c, asking = false }
  local ask, tries = nil, 0
  while true do
    local addr = ask or node_for(self, slot, readonly)
    local to_replica = readonly and self._masters[addr] == nil and ask == nil
    x.asking = ask ~= nil
    ask = nil
    local v, err, sent = on_node(self, addr, call_on, x)
    if v ~= nil then return v end
    local what, s, to
    if err.kind == "redis" then
      what, s, to = redirect(err.message)
      if not what then return nil, err end
      -- "MOVED 3999 :6381": the node that answered did not know the
      -- host's name (cluster-preferred-endpoint-type): it is its own
      if to and find(to, "^:%d+$") then to = match(addr, "^(.+):%d+$") .. to end
    elseif sent then
      -- the connection failed with the command sent: it may have run
      return nil, err
    elseif to_replica then
      readonly = false -- a replica is down: its master reads as well
      what = "replica"
    else
      what = "down" -- no connection to that node: it may be failing over
    end
    tries = tries + 1
    if tries > self._max_redirects then
      return nil, core.error(err.kind, format("%s (after %d redirects and retries)",
        tostring(err.message or err), tries - 1))
    end
    if what == "moved" then
      -- the map is out of date: this slot points at the node named now,
      -- and the whole map is read again meanwhile (resharding moves many)
      self._slots[s] = { master = to, replicas = {}, next = 0 }
      self._masters[to] = true
      if not self._refreshing then gen.spawn(self.refresh, self) end
    elseif what == "ask" then
      ask = to
    elseif what ~= "replica" then
      backoff(self, tries)
      self:refresh()
    end
  end
end

--- Run a command on the node its keys hash to: the reply, or nil, err
-- (kind `redis` for an error reply, CROSSSLOT when the keys are in
-- different slots).
function Cluster:call(name, ...)
  if type(name) ~= "string" then
    error("call: the command name must be a string, got " .. util.describe(name), 2)
  end
  util.need_coroutine("cluster:call", 2)
  local c = { name, n = select("#", ...) + 1, ... }
  local slot, readonly = route(self, c)
  if slot == nil then return nil, readonly end
  return run(self, slot or nil, readonly, c)
end

-- A pipeline's queue: commands as methods, recorded.
local Queue = {}
Queue.__index = redis.queue_index(Queue)
function Queue.call(q, name, ...)
  if type(name) ~= "string" then
    error("call: the command name must be a string, got " .. util.describe(name), 2)
  end
  local cmds = q._cmds
  cmds[#cmds + 1] = { name, n = select("#", ...) + 1, ... }
end
--- Send what was queued (a pipeline made without a function).
function Queue.execute(q)
  local cmds = q._cmds
  q._cmds = {}
  return q._cluster:_pipeline(cmds)
end

-- Error values for a pipeline's places, as a connection's pipeline has.
local function error_value(err)
  return redis.error_value(err.message or tostring(err), err.kind)
end

-- Run recorded commands, split per node (the nodes at once), with the
-- replies in order. A reply that redirects or asks for a retry runs again
-- through call(); a node no connection could be had to gets its commands
-- run one by one the same way; one whose connection failed with them sent
-- gets error values.
-- A node's part of a pipeline (its commands, and where each stands in
-- the whole as part.at[k]), sent on connection r.
local function send_part(r, part)
  return r:pipeline_list(part)
end

-- Send one node's part of pipeline `pl` and put its replies in place; a
-- reply that redirects, and the commands of a node no connection could
-- be had to, go to pl.again.
local function send_group(self, pl, addr)
  local part = pl.parts[addr]
  local replies, again = pl.replies, pl.again
  local v, err, sent = on_node(self, addr, send_part, part)
  if v == nil then
    for _, i in ipairs(part.at) do
      if sent then replies[i] = error_value(err) else again[#again + 1] = i end
    end
    return true
  end
  for k, i in ipairs(part.at) do
    local r = v[k]
    if redis.is_error(r) and redirect(r.message) then
      again[#again + 1] = i
    else
      replies[i] = r
    end
  end
  return true
end

function Cluster:_pipeline(cmds)
  local replies, parts, order = {}, {}, {}
  for i, c in ipairs(cmds) do
    local slot, readonly = route(self, c)
    if slot == nil then
      replies[i] = error_value(readonly)
    else
      local addr = node_for(self, slot or nil, readonly)
      local part = parts[addr]
      if not part then
        part = { at = {} }
        parts[addr] = part
        order[#order + 1] = addr
      end
      local k = #part + 1
      part[k], part.at[k] = c, i
    end
  end
  local pl = { parts = parts, replies = replies, again = {} }
  if #order == 1 then
    send_group(self, pl, order[1])
  elseif #order > 1 then
    local tasks = {}
    for k, addr in ipairs(order) do tasks[k] = gen.task(send_group, self, pl, addr) end
    gen.multi(tasks)
  end
  local again = pl.again
  if #again > 0 then
    table.sort(again)
    for _, i in ipairs(again) do
      local slot, readonly = route(self, cmds[i])
      local v, err = run(self, slot or nil, readonly, cmds[i])
      replies[i] = v == nil and error_value(err) or v
    end
  end
  return replies
end

--- Queue the commands `fn(p)` makes on `p` and send them, split per
-- node; returns the replies in order (an error reply, or a command that
-- failed, stands in its place as an error value: redis.is_error). With
-- no `fn`, returns the queue: call `p:execute()` to send it.
function Cluster:pipeline(fn)
  util.need_coroutine("cluster:pipeline", 2)
  local q = setmetatable({ _cmds = {}, _cluster = self }, Queue)
  if fn == nil then return q end
  util.check_callable(fn, 2, "pipeline's function")
  fn(q)
  return q:execute()
end

--- MULTI, the commands `fn(t)` makes on `t`, EXEC, on the one node that
-- holds their keys (which must share a slot: a hash tag). Returns EXEC's
-- reply (the replies in order), or nil, err (CROSSSLOT, EXECABORT...).
function Cluster:transaction(fn)
  util.check_callable(fn, 2, "transaction's function")
  util.need_coroutine("cluster:transaction", 2)
  local q = setmetatable({ _cmds = {}, _cluster = self }, Queue)
  fn(q)
  local cmds = q._cmds
  local slot
  for _, c in ipairs(cmds) do
    local s, err = route(self, c)
    if s == nil then return nil, err end
    if s then
      if slot and s ~= slot then return nil, core.error("redis", CROSSSLOT) end
      slot = s
    end
  end
  local tries = 0
  while true do
    local list = { { "MULTI" } }
    for _, c in ipairs(cmds) do list[#list + 1] = c end
    list[#list + 1] = { "EXEC" }
    local v, err, sent = on_node(self, node_for(self, slot, false), send_part, list)
    if v == nil and sent then return nil, err end
    local moved = v == nil
    if v then
      for k = 2, #v - 1 do
        if redis.is_error(v[k]) and redirect(v[k].message) then moved = true end
      end
      if not moved then
        local exec = v[#v]
        if redis.is_error(exec) then return nil, core.error(exec.kind or "redis", exec.message) end
        if redis.is_error(v[1]) then return nil, core.error("redis", v[1].message) end
        return exec
      end
    end
    tries = tries + 1
    if tries > self._max_redirects then
      return nil, err or core.error("redis", "the transaction's slot kept moving")
    end
    backoff(self, tries)
    self:refresh()
  end
end

-- Pub/sub (subscribe, ssubscribe, read_message...) is in
-- squall.redis.cluster_pubsub, which routes with these.
require("squall.redis.cluster_pubsub").install(Cluster, { node_for = node_for,
  slot_of = slot_of, backoff = backoff })

--- Close every idle pooled connection and every subscription; the
-- client stays usable (the next command connects anew).
function Cluster:close()
  for _, p in pairs(self._pools) do p:close() end
  require("squall.redis.cluster_pubsub").close(self)
end

M.Cluster = Cluster
return M
