--- Pub/sub through a Redis Cluster: the subscribe, ssubscribe, their
-- unsubscribe forms and read_message of squall.redis.cluster's client.
-- cluster.lua installs them, handing over how it routes (node_for,
-- slot_of) and how it waits between retries (backoff).
-- @module squall.redis.cluster_pubsub
local core = require "squall.core"
local gen = require "squall.gen"
local redis = require "squall.redis"
local util = require "squall.util"

local M = {}

local type, error, pairs, ipairs, next = type, error, pairs, ipairs, next
local format, lower = string.format, string.lower
local unpack = unpack

local node_for, slot_of, backoff -- from cluster.lua (install)

-- Subscriptions live on connections of their own, one per node, each
-- driven by one reader task: messages go to the client's queue in
-- arrival order, and a (un)subscribe waits for the reader to run it
-- between two reads (it reads with a short timeout, so none waits long).
-- SUBSCRIBE and PSUBSCRIBE go to one master (Redis Cluster sends every
-- PUBLISH to all nodes), SSUBSCRIBE to the master of each channel's slot.
-- When a node's connection fails, its reader connects again, or, once
-- the map no longer names that node, moves its subscriptions to the
-- nodes that hold them now.
local POLL = 0.1
local reader

local function subscriber(self, addr)
  local sub = self._subs[addr]
  if sub then return sub end
  sub = { addr = addr, ops = {}, sets = { SUBSCRIBE = {}, PSUBSCRIBE = {}, SSUBSCRIBE = {} } }
  self._subs[addr] = sub
  gen.spawn(reader, self, sub)
  return sub
end

local UNSUB = { SUBSCRIBE = "UNSUBSCRIBE", PSUBSCRIBE = "PUNSUBSCRIBE",
  SSUBSCRIBE = "SUNSUBSCRIBE" }
local SET_OF = { SUBSCRIBE = "SUBSCRIBE", PSUBSCRIBE = "PSUBSCRIBE",
  SSUBSCRIBE = "SSUBSCRIBE", UNSUBSCRIBE = "SUBSCRIBE", PUNSUBSCRIBE = "PSUBSCRIBE",
  SUNSUBSCRIBE = "SSUBSCRIBE" }

-- Queue `cmd` with `names` on node sub and wait for the reader to run it.
local function ask(sub, cmd, names)
  local f = gen.Future()
  sub.ops[#sub.ops + 1] = { cmd = cmd, names = names, fut = f }
  return f:result()
end

-- Where a subscription of kind `set` (SUBSCRIBE, PSUBSCRIBE: any master;
-- SSUBSCRIBE: its slot's master) belongs now.
local function home(self, set, name)
  if set == "SSUBSCRIBE" then return node_for(self, slot_of(name), false) end
  return self._pubsub_home or node_for(self, nil, false)
end

-- Move what node `sub` held to where it belongs now (its node is gone).
local function rehome(self, sub)
  self._subs[sub.addr] = nil
  sub.closed = true
  for set, names in pairs(sub.sets) do
    for name in pairs(names) do
      if set ~= "SSUBSCRIBE" then self._pubsub_home = nil end
      local to = subscriber(self, home(self, set, name))
      to.sets[set][name] = true -- its reader subscribes on connecting
      if to.conn and not to.conn:closed() then
        to.ops[#to.ops + 1] = { cmd = set, names = { name } }
      end
    end
  end
  for _, op in ipairs(sub.ops) do
    if op.fut then op.fut:set_result(nil, core.error("closed", "the node " .. sub.addr ..
      " went away; subscribe again")) end
  end
end

function reader(self, sub)
  local o = redis.address_options(self._conn_opts, sub.addr)
  local fails = 0
  while not sub.closed do
    if not sub.conn or sub.conn:closed() then
      local conn, err = redis.connect(o)
      if conn then
        -- subscribe again to what this node held
        for set, names in pairs(sub.sets) do
          local list = {}
          for name in pairs(names) do list[#list + 1] = name end
          if #list > 0 and conn:call(set, unpack(list)) == nil then
            conn:close()
            conn = nil
            break
          end
        end
      end
      if conn then
        sub.conn, fails = conn, 0
      else
        fails = fails + 1
        if fails >= 3 then
          -- the node is down: once the map has moved on, so do its subscriptions
          self:refresh()
          if not self._masters[sub.addr] then
            rehome(self, sub)
            return
          end
        end
        for _, op in ipairs(sub.ops) do
          if op.fut then op.fut:set_result(nil, err) end
        end
        sub.ops = {}
        backoff(self, fails)
      end
    else
      local conn = sub.conn
      while #sub.ops > 0 do
        local op = table.remove(sub.ops, 1)
        local got, err = conn:call(op.cmd, unpack(op.names))
        if got then
          local set = sub.sets[SET_OF[op.cmd]]
          for _, c in ipairs(got) do
            if type(c[2]) == "string" then
              set[c[2]] = (UNSUB[op.cmd] and true) or nil
            end
          end
        end
        if op.fut then op.fut:set_result(got, err) end
      end
      local msg, err = conn:read_message(POLL)
      if msg then
        local q = self._messages
        q[#q + 1] = msg
        local w = self._message_waiter
        if w then
          self._message_waiter = nil
          w:set_result(true)
        end
      elseif err.kind ~= "timeout" then
        conn:close()
      end
      local idle = true
      for _, names in pairs(sub.sets) do
        if next(names) then idle = false end
      end
      if idle and #sub.ops == 0 then
        -- nothing held here any more
        conn:close()
        self._subs[sub.addr] = nil
        return
      end
    end
  end
end

-- (un)subscribe through the nodes the names belong to; the confirmations
-- of all of them, in order of the nodes.
local function subscription(self, cmd, ...)
  util.need_coroutine("cluster:" .. lower(cmd), 3)
  local set = SET_OF[cmd]
  local names = { ... }
  local by_node, order = {}, {}
  if #names == 0 then
    -- an unsubscribe naming nothing: everywhere it has something
    for addr, sub in pairs(self._subs) do
      if next(sub.sets[set]) then
        by_node[addr] = {}
        order[#order + 1] = addr
      end
    end
  else
    for _, name in ipairs(names) do
      if type(name) ~= "string" then
        error(lower(cmd) .. ": a channel must be a string, got " .. util.describe(name), 3)
      end
      local addr = home(self, set, name)
      if not UNSUB[cmd] then
        -- an unsubscribe goes where the name is held
        for a, sub in pairs(self._subs) do
          if sub.sets[set][name] then addr = a end
        end
      end
      if set ~= "SSUBSCRIBE" then self._pubsub_home = addr end
      if not by_node[addr] then
        by_node[addr] = {}
        order[#order + 1] = addr
      end
      local l = by_node[addr]
      l[#l + 1] = name
    end
  end
  local all = {}
  for _, addr in ipairs(order) do
    local got, err = ask(subscriber(self, addr), cmd, by_node[addr])
    if not got then return nil, err end
    for _, c in ipairs(got) do all[#all + 1] = c end
  end
  return all
end

--- The next message of any subscription, in arrival order, as a
-- connection's read_message gives it; nil, err (kind `timeout`) when
-- none came within `timeout` seconds (by default, wait for one).
local function read_message(self, timeout)
  if timeout ~= nil and (type(timeout) ~= "number" or timeout <= 0) then
    error("read_message: timeout must be a positive number", 2)
  end
  util.need_coroutine("cluster:read_message", 2)
  local q = self._messages
  while #q == 0 do
    local f = gen.Future()
    self._message_waiter = f
    if timeout then
      local ok = gen.with_timeout(timeout, f)
      if not ok and #q == 0 then
        if self._message_waiter == f then self._message_waiter = nil end
        return nil, core.error("timeout", format("redis.cluster: no message came within %g s",
          timeout))
      end
    else
      f:result()
    end
  end
  return table.remove(q, 1)
end

--- Add the pub/sub methods to the cluster client class `Cluster`;
-- `routing` has node_for(self, slot, readonly), slot_of(name) and
-- backoff(self, tries) from cluster.lua.
function M.install(Cluster, routing)
  node_for, slot_of, backoff = routing.node_for, routing.slot_of, routing.backoff
  --- Subscribe to channels (on one master: a cluster delivers every
  -- PUBLISH everywhere); the confirmations. Messages: read_message.
  function Cluster:subscribe(...) return subscription(self, "SUBSCRIBE", ...) end
  --- Subscribe to channel patterns, as subscribe.
  function Cluster:psubscribe(...) return subscription(self, "PSUBSCRIBE", ...) end
  --- Subscribe to shard channels, each on the master of its slot.
  function Cluster:ssubscribe(...) return subscription(self, "SSUBSCRIBE", ...) end
  --- Unsubscribe (from every channel when none are named).
  function Cluster:unsubscribe(...) return subscription(self, "UNSUBSCRIBE", ...) end
  --- Unsubscribe from patterns (from all when none are named).
  function Cluster:punsubscribe(...) return subscription(self, "PUNSUBSCRIBE", ...) end
  --- Unsubscribe from shard channels (from all when none are named).
  function Cluster:sunsubscribe(...) return subscription(self, "SUNSUBSCRIBE", ...) end
  Cluster.read_message = read_message
end

--- End every subscription of client `c` (its close() calls this).
function M.close(c)
  for addr, sub in pairs(c._subs) do
    sub.closed = true
    if sub.conn then sub.conn:close() end
    c._subs[addr] = nil
  end
end

return M
