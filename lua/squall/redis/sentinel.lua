--- Redis Sentinel: a pool of connections to the current master of a
-- monitored group (or to its replicas), that follows failovers.
--
--     local p = assert(redis.sentinel({ sentinels = { "127.0.0.1:26379" },
--       master = "mymaster", size = 8 }))
--     p:call("SET", "k", "v")             -- on the master, whoever it is now
--
-- The master's address comes from the first sentinel that answers
-- SENTINEL get-master-addr-by-name; every new connection checks with ROLE
-- that it reached a master (a sentinel may answer with an address that
-- was the master a moment ago). A watcher subscribed to +switch-master on
-- a sentinel moves the pool at once when a failover ends: connections to
-- the old master are closed as they come back, never handed out again.
-- A reply that says the node is a replica now (READONLY) moves it too.
-- See docs/api.md (squall.redis, "Past one Redis").
-- @module squall.redis.sentinel
local core = require "squall.core"
local gen = require "squall.gen"
local log = require "squall.log"
local pool = require "squall.pool"
local redis = require "squall.redis"
local util = require "squall.util"

local M = {}

local type, tostring, error, ipairs, pairs = type, tostring, error, ipairs, pairs
local format, match, lower = string.format, string.match, string.lower
local unpack = unpack

local CONN_KEYS = { password = true, username = true, db = true, timeout = true,
  ssl_options = true, server_hostname = true, max_buffer_size = true }
local OWN_KEYS = { sentinels = true, master = true, role = true, sentinel_password = true,
  size = true, queue_timeout = true }

local function check_opts(opts, level)
  if type(opts) ~= "table" then error("redis.sentinel: opts must be a table", level + 1) end
  for k in pairs(opts) do
    if not CONN_KEYS[k] and not OWN_KEYS[k] then
      error("redis.sentinel: unknown option " .. tostring(k), level + 1)
    end
  end
  redis.check_addresses(opts.sentinels, "redis.sentinel", "sentinels", level + 1)
  if type(opts.master) ~= "string" or opts.master == "" then
    error("redis.sentinel: master must be the monitored group's name", level + 1)
  end
  local role = opts.role or "master"
  if role ~= "master" and role ~= "replica" then
    error("redis.sentinel: role must be \"master\" or \"replica\"", level + 1)
  end
  return role
end

-- A connection to sentinel `addr` (its own password, if any).
local function sentinel_conn(self, addr)
  return redis.connect(redis.address_options({ password = self._sentinel_password,
    timeout = self._conn_opts.timeout or 5 }, addr))
end

-- A replica from SENTINEL replicas' reply that is up, or nil.
local function healthy_replicas(reply)
  local out = {}
  if type(reply) ~= "table" then return out end
  for _, r in ipairs(reply) do
    local f = {}
    if type(r) == "table" then
      for i = 1, #r - 1, 2 do f[r[i]] = r[i + 1] end
    end
    local flags = f.flags or ""
    if f.ip and f.port and not flags:find("s_down", 1, true) and
      not flags:find("o_down", 1, true) and not flags:find("disconnected", 1, true) and
      f["master-link-status"] ~= "err" then
      out[#out + 1] = f.ip .. ":" .. f.port
    end
  end
  return out
end

--- @type SentinelPool
local SentinelPool = pool.Pool:extend()

-- Ask the sentinels, in turn, where the master (or a replica) is. The one
-- that answers goes first next time. Returns the address or nil, err.
local function resolve(self)
  local last
  for i, addr in ipairs(self._sentinels) do
    local s, err = sentinel_conn(self, addr)
    if s then
      local v
      if self._role == "master" then
        v, err = s:call("SENTINEL", "get-master-addr-by-name", self._master)
        if type(v) == "table" and v[1] and v[2] then
          v = v[1] .. ":" .. v[2]
        elseif v ~= nil then
          err, v = core.error("redis", "sentinel " .. addr .. " knows no master " ..
            self._master), nil
        end
      else
        v, err = s:call("SENTINEL", "replicas", self._master)
        if v ~= nil then
          local ups = healthy_replicas(v)
          if #ups == 0 then
            err, v = core.error("redis", "sentinel " .. addr .. " knows no replica of " ..
              self._master .. " that is up"), nil
          else
            self._next = (self._next or 0) + 1
            v = ups[self._next % #ups + 1]
          end
        end
      end
      s:close()
      if v then
        if i > 1 then
          table.remove(self._sentinels, i)
          table.insert(self._sentinels, 1, addr)
        end
        return v
      end
    end
    last = err
  end
  return nil, core.error(last and last.kind or "closed", format(
    "redis.sentinel: no sentinel told where %s's %s is (%s)", self._master, self._role,
    tostring(last)))
end

-- The pool moves: connections made before now are closed when seen.
local function move(self, addr)
  if addr and addr ~= self._addr then
    log.info("redis.sentinel: %s's %s is now %s (was %s)", self._master, self._role, addr,
      tostring(self._addr))
  end
  self._addr = addr
  self._gen = self._gen + 1
  pool.Pool.close(self) -- the idle ones now; lent ones as they come back
end

-- A new connection to the master (or a replica), checked with ROLE.
local function connect(self)
  local tries = 0
  while true do
    -- a master's address is kept; replicas are asked for each time, so
    -- the connections spread over them
    local addr = self._role == "master" and self._addr or nil
    local err
    if not addr then
      addr, err = resolve(self)
      if not addr then return nil, err end
      self._addr = addr
    end
    local gen_now = self._gen
    local r
    r, err = redis.connect(redis.address_options(self._conn_opts, addr))
    if r then
      local role
      role, err = r:call("ROLE")
      local want = self._role == "master" and "master" or "slave"
      if type(role) == "table" and role[1] == want then
        r._sentinel_gen = gen_now
        return r
      end
      r:close()
      if role ~= nil then
        err = core.error("redis", format("%s is a %s, not %s's %s", addr,
          tostring(role[1]), self._master, self._role))
      end
    end
    -- ask again: a failover may be under way
    tries = tries + 1
    if self._addr == addr then self._addr = nil end
    if tries >= 3 then return nil, err end
    gen.sleep(0.1 * tries)
  end
end

-- Connections from before the last move are closed, not lent.
function SentinelPool:acquire()
  while true do
    local c, err = pool.Pool.acquire(self)
    if not c then return nil, err end
    if c._sentinel_gen == self._gen then return c end
    pool.Pool.release(self, c, "discard")
  end
end

local function how(self)
  return function(c)
    if c._subscribed or c._sentinel_gen ~= self._gen then return "discard" end
  end
end

--- Run fn(r) with a connection to the current master and give it back;
-- fn's results. If fn raises, that connection is closed and the error
-- goes on.
function SentinelPool:with(fn)
  util.check_callable(fn, 2)
  util.need_coroutine("pool:with", 2)
  return pool.Pool.with(self, fn, how(self))
end

--- Run one command on a pooled connection. A READONLY reply (the node
-- was demoted under us) moves the pool and runs the command once more.
function SentinelPool:call(name, ...)
  util.need_coroutine("pool:call", 2)
  local args = util.pack(...)
  for _ = 1, 2 do
    local gen_before = self._gen
    local v, err = self:with(function(r) return r:call(name, unpack(args, 1, args.n)) end)
    if v ~= nil or err.kind ~= "redis" or not match(err.message, "^READONLY") or
      self._role ~= "master" then
      return v, err
    end
    if self._gen == gen_before then move(self, nil) end
  end
  return nil, core.error("redis", "READONLY: the master keeps moving")
end

--- Where the pool's connections go now ("host:port"), as last resolved.
function SentinelPool:address()
  return self._addr
end

--- Stop following the sentinels and close the idle connections.
function SentinelPool:close()
  self._closed = true
  if self._watch_conn then self._watch_conn:close() end
  pool.Pool.close(self)
end

-- The watcher: subscribed to +switch-master (and, for replicas, the
-- events that change them) on one sentinel after another, for as long
-- as the pool is open.
local function watch(self)
  local i = 0
  while not self._closed do
    i = i % #self._sentinels + 1
    local s = sentinel_conn(self, self._sentinels[i])
    if s then
      self._watch_conn = s
      local ok = s:subscribe("+switch-master", "+slave", "+sdown", "-sdown", "+odown")
      while ok and not self._closed do
        local msg, err = s:read_message(60)
        if msg then
          local name, _, _, ip, port = match(msg.data or "",
            "^(%S+) (%S+) (%S+) (%S+) (%S+)$")
          if msg.channel == "+switch-master" and name == self._master then
            move(self, self._role == "master" and (ip .. ":" .. port) or nil)
          elseif self._role == "replica" and (msg.data or ""):find(" " .. self._master .. " ",
            1, true) then
            move(self, nil) -- the replicas changed: ask again for the next connections
          end
        elseif err.kind ~= "timeout" then
          break
        end
      end
      s:close()
      self._watch_conn = nil
    end
    if not self._closed then gen.sleep(0.5) end
  end
end

--- A pool on the current master of `master` (or, with role = "replica",
-- on its replicas, in turn), told by `sentinels`. Waits (inside a
-- coroutine) for the first answer.
-- @tparam table opts `sentinels` ("host:port" list), `master` (the
--   group's name), `role` ("master"), `sentinel_password`, the pool's
--   `size` (16) and `queue_timeout`, and redis.connect's `password`,
--   `username`, `db`, `timeout`, `ssl_options`, `server_hostname`,
--   `max_buffer_size`
-- @treturn SentinelPool
-- @return nil, err when no sentinel answered
function M.new(opts, level)
  level = (level or 1) + 1
  local role = check_opts(opts, level)
  util.need_coroutine("redis.sentinel", level)
  local size, qt = pool.options({ size = opts.size, queue_timeout = opts.queue_timeout },
    "redis.sentinel", level)
  local conn_opts = {}
  for k in pairs(CONN_KEYS) do conn_opts[k] = opts[k] end
  local sentinels = {}
  for i, s in ipairs(opts.sentinels) do sentinels[i] = s end
  local self
  self = pool.new({ size = size, queue_timeout = qt,
    connect = function() return connect(self) end })
  self._sentinels, self._master, self._role = sentinels, opts.master, lower(role)
  self._sentinel_password, self._conn_opts, self._gen = opts.sentinel_password, conn_opts, 0
  setmetatable(self, SentinelPool)
  local addr, err = resolve(self)
  if not addr then return nil, err end
  self._addr = addr
  gen.spawn(watch, self)
  return self
end

M.SentinelPool = SentinelPool
return M
