--- A pool of connections shared by the database clients (squall.redis,
-- squall.mysql): at most `size` open; callers wait in FIFO order while
-- every connection is busy, each at most `queue_timeout` seconds. A
-- connection that failed is dropped, so the pool recovers by itself once
-- the server is back: the next caller connects anew.
--
--     local p = pool.new({ size = 8, connect = function() return redis.connect(o) end })
--     p:with(function(conn) ... end)
--
-- A connection is any object with `closed()` and `close()`.
-- @module squall.pool
local core = require "squall.core"
local gen = require "squall.gen"
local ioloop = require "squall.ioloop"
local util = require "squall.util"

local M = {}

local type, error, format, remove = type, error, string.format, table.remove
local xpcall, traceback, unpack = xpcall, debug.traceback, unpack

--- Check a pool's own options; returns size, queue_timeout, and the other
-- options (those the connections get).
-- @tparam string who the caller's name for error messages ("redis.pool")
function M.options(opts, who, level)
  opts = opts or {}
  if type(opts) ~= "table" then error(who .. ": opts must be a table", level + 1) end
  local size, qt = opts.size or 16, opts.queue_timeout or 10
  if type(size) ~= "number" or size < 1 or size % 1 ~= 0 then
    error(format("%s: size must be a positive integer, got %s", who, util.describe(size)),
      level + 1)
  end
  if type(qt) ~= "number" or qt <= 0 then
    error(format("%s: queue_timeout must be a positive number, got %s", who,
      util.describe(qt)), level + 1)
  end
  local rest = {}
  for k, v in pairs(opts) do
    if k ~= "size" and k ~= "queue_timeout" then rest[k] = v end
  end
  return size, qt, rest
end

--- @type Pool
local Pool = util.class()

--- A new pool. `connect()` makes a connection (or returns nil, err);
-- `reset(conn)`, if given, readies a connection for its next user when
-- it is released with "reset" and returns true, or nil, err to drop it.
-- @tparam table opts `size` (16), `queue_timeout` (10 s), `connect`, `reset`
function M.new(opts)
  local size, qt, rest = M.options(opts, "pool.new", 2)
  util.check_callable(rest.connect, 2, "pool.new: connect")
  if rest.reset ~= nil then util.check_callable(rest.reset, 2, "pool.new: reset") end
  return setmetatable({ _connect = rest.connect, _reset = rest.reset, _size = size,
    _queue_timeout = qt, _idle = {}, _open = 0, _waiters = {},
    _lent = {} }, Pool) -- connections handed out and not yet given back
end

--- A connection for the caller (inside a coroutine): an idle one, a new
-- one while fewer than `size` are open, or, in turn, the next one given
-- back. nil, err when connecting fails or `queue_timeout` passes (kind
-- `timeout`).
function Pool:acquire()
  util.need_coroutine("pool:acquire", 2)
  local loop = ioloop.current()
  local deadline, woken
  while true do
    local idle = self._idle
    while #idle > 0 do
      local c = remove(idle)
      if not c:closed() then
        self._lent[c] = true
        return c
      end
      self._open = self._open - 1
    end
    if self._open < self._size then
      self._open = self._open + 1
      local c, err = self._connect()
      if not c then
        self._open = self._open - 1
        self:_wake()
        return nil, err
      end
      self._lent[c] = true
      return c
    end
    -- Wait in turn. A caller woken for a connection that someone else took
    -- meanwhile goes back to the head of the line, with its first deadline.
    deadline = deadline or loop:time() + self._queue_timeout
    local f = gen.Future()
    if woken then
      table.insert(self._waiters, 1, f)
    else
      self._waiters[#self._waiters + 1] = f
    end
    local left = deadline - loop:time()
    local ok, err
    if left > 0 then ok, err = gen.with_timeout(left, f) end
    if ok == nil then
      for i, w in ipairs(self._waiters) do
        if w == f then remove(self._waiters, i) break end
      end
      return nil, core.error("timeout", format(
        "no connection came free within queue_timeout (%g s)", self._queue_timeout))
    end
    if err then return nil, err end
    woken = true -- a connection was given back (or dropped): look again
  end
end

local function wake(w)
  if not w:done() then w:set_result(true) end
end

-- Wake the first waiter on the next iteration, in arrival order. (No
-- closure: a release that wakes nobody, the usual case, compiles.)
function Pool:_wake()
  local w = remove(self._waiters, 1)
  if w then ioloop.current():add_callback(wake, w) end
end

--- Give a connection back. `how`: nil keeps it for the next caller,
-- "reset" runs the pool's reset first, "discard" closes it. Raises for a
-- connection this pool did not lend, or one given back already (a second
-- release would hand one connection to two callers).
function Pool:release(c, how)
  if not self._lent[c] then
    error("release: this connection is not in use from this pool (given back twice?)", 2)
  end
  self._lent[c] = nil
  if how == "reset" and self._reset and not c:closed() then
    local ok = self._reset(c)
    if not ok then how = "discard" end
  end
  if how == "discard" or c:closed() then
    if not c:closed() then c:close() end
    self._open = self._open - 1
  else
    self._idle[#self._idle + 1] = c
  end
  self:_wake()
end

--- Run fn(conn) with a connection and give it back (with `how`, as
-- release, or with what how(conn) returns); fn's results. If fn raises,
-- that connection is closed, not given back, and the error goes on.
function Pool:with(fn, how)
  util.check_callable(fn, 2)
  util.need_coroutine("pool:with", 2)
  local c, err = self:acquire()
  if not c then return nil, err end
  local res = util.pack(xpcall(fn, traceback, c))
  if not res[1] then
    self:release(c, "discard")
    error(res[2], 0)
  end
  if type(how) == "function" then how = how(c) end
  self:release(c, how)
  return unpack(res, 2, res.n)
end

--- How many connections are open, and how many of those are idle.
function Pool:counts()
  return self._open, #self._idle
end

--- Close every idle connection. Busy ones stay with their users, and the
-- pool stays usable: the next caller connects anew.
function Pool:close()
  for _, c in ipairs(self._idle) do c:close() end
  self._open = self._open - #self._idle
  self._idle = {}
end

M.Pool = Pool
return M
