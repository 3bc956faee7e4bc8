--- The event loop: callbacks, timers, fd handlers and signals.
--
-- Each IOLoop owns a libuv loop (in runtime/loop.c). The callback queue and
-- the timer heap live here, in Lua, as in Tornado; one `poll` per iteration
-- waits for I/O no longer than the next timer is due.
--
-- One iteration: run the callbacks queued before it began, run the timers
-- that are due, then poll for I/O (without blocking when callbacks wait).
-- @module squall.ioloop
local core = require "squall.core"
local util = require "squall.util"
local log = require "squall.log"

local M = {
  NONE = 0,
  READ = 0x001,
  WRITE = 0x004,
  ERROR = 0x018,
}

local IOLoop = util.class()
M.IOLoop = IOLoop

local now = core.time
local xpcall, traceback, unpack, select = xpcall, debug.traceback, unpack, select
local type, tostring, error, format = type, tostring, error, string.format
local max, floor = math.max, math.floor
local pack, check_callable = util.pack, util.check_callable

local current

local describe = core.describe -- as runtime/host.c reports errors

local function on_error(e)
  return traceback(describe(e), 2)
end

-- Run one callback; an error is logged with its traceback, never raised.
local function run(fn, args)
  local ok, err
  if args then
    ok, err = xpcall(fn, on_error, unpack(args, 1, args.n))
  else
    ok, err = xpcall(fn, on_error)
  end
  if not ok then
    log.log_at("error", 1, "Exception in callback %s\n%s", tostring(fn), err)
  end
end



local function check_seconds(x, name, level)
  if type(x) ~= "number" or x ~= x then
    error(format("%s must be a number, got %s", name, type(x)), level + 1)
  end
end

local created = 0 -- loops this process made
local start_hooks = {}

--- How many IOLoops this process has made (squall.process refuses to fork
-- after the first: the children would share its epoll and timers).
function M.loops_created()
  return created
end

--- Call fn(loop) each time a loop's start() begins, from now on
-- (squall.reload sets up its watchers on the loop that actually runs).
function M.on_start(fn)
  check_callable(fn, 2)
  start_hooks[#start_hooks + 1] = fn
end

--- Create a new IOLoop (not made current).
function M.new()
  created = created + 1
  return setmetatable({
    _uv = core.loop_new(),
    _cb_fns = {}, _cb_args = {}, _ncb = 0,
    _heap = {}, _nheap = 0, _seq = 0, _cancelled = 0,
    _handlers = {}, _fdobjs = {},
    _signals = {},
    _running = false,
    _stopping = false,
    _closed = false,
  }, IOLoop)
end

--- The loop of this thread, created on first use.
-- ioloop.instance() is the same function.
function M.current()
  if current == nil or current._closed then
    current = M.new()
  end
  return current
end
M.instance = M.current

--- The host calls this when a script's main chunk returned: servers that
-- listen on a loop nobody started would never answer, and the process
-- would exit 0 at once; say so. (netutil counts the listeners.)
function M._at_script_end()
  local loop = current
  local n = package.loaded["squall.netutil"] and package.loaded["squall.netutil"].listening()
  if loop and not loop._closed and not loop._started and n and n > 0 then
    log.warn("the script ended with %d socket(s) listening but never started the IOLoop: " ..
      "end it with ioloop.current():start()", n)
  end
end

--- Forget the current loop; the next current() makes a new one.
function M.clear_current()
  current = nil
end

--- Make this loop the one current() returns.
function IOLoop:make_current()
  current = self
  return self
end

--- Monotonic time in seconds, on the clock call_at uses.
function IOLoop:time()
  return now()
end

--- Run fn(...) on the next iteration. Callbacks run in the order added.
function IOLoop:add_callback(fn, ...)
  check_callable(fn, 2)
  local n = self._ncb + 1
  self._ncb = n
  self._cb_fns[n] = fn
  if select("#", ...) > 0 then self._cb_args[n] = pack(...) end
end

--- Like add_callback, but fn runs in a new coroutine (gen.spawn).
function IOLoop:spawn_callback(fn, ...)
  check_callable(fn, 2)
  -- squall.gen is built on this module (its Futures wait on the loop), so
  -- the loop asks for it only when a method needs it: a circle by design,
  -- the one in this file
  local gen = require "squall.gen"
  self:add_callback(gen.spawn, fn, ...)
end

-- Timers: a binary heap ordered by (deadline, sequence), so equal
-- deadlines fire in the order they were set. remove_timeout marks an entry
-- dead; dead entries are dropped when they reach the top, or all at once
-- when they are the majority.
local function before(a, b)
  return a.deadline < b.deadline or (a.deadline == b.deadline and a.seq < b.seq)
end

local function heap_push(h, n, t)
  n = n + 1
  local i = n
  while i > 1 do
    local p = floor(i / 2)
    local parent = h[p]
    if not before(t, parent) then break end
    h[i] = parent
    i = p
  end
  h[i] = t
  return n
end

local function heap_pop(h, n)
  local top, last = h[1], h[n]
  h[n] = nil
  n = n - 1
  if n > 0 then
    local i = 1
    while true do
      local c = 2 * i
      if c > n then break end
      if c < n and before(h[c + 1], h[c]) then c = c + 1 end
      if not before(h[c], last) then break end
      h[i] = h[c]
      i = c
    end
    h[i] = last
  end
  top.in_heap = false
  return top, n
end

local function heap_compact(self)
  local live, n = {}, 0
  for i = 1, self._nheap do
    local t = self._heap[i]
    if t.fn then
      n = heap_push(live, n, t)
    else
      t.in_heap = false
    end
  end
  self._heap, self._nheap, self._cancelled = live, n, 0
end

--- Run fn(...) when loop:time() reaches `when`. Returns a handle for
-- remove_timeout.
function IOLoop:call_at(when, fn, ...)
  check_seconds(when, "deadline", 2)
  check_callable(fn, 2)
  local seq = self._seq + 1
  self._seq = seq
  local t = { deadline = when, seq = seq, fn = fn, in_heap = true }
  if select("#", ...) > 0 then t.args = pack(...) end
  self._nheap = heap_push(self._heap, self._nheap, t)
  return t
end

--- Same as call_at (Tornado's name).
IOLoop.add_timeout = IOLoop.call_at

--- Run fn(...) `delay` seconds from now.
function IOLoop:call_later(delay, fn, ...)
  check_seconds(delay, "delay", 2)
  return self:call_at(now() + delay, fn, ...)
end

--- Cancel a timeout. Harmless when it fired or was removed already.
function IOLoop:remove_timeout(t)
  if type(t) ~= "table" or not t.fn then return end
  t.fn, t.args = nil, nil
  if t.in_heap then
    self._cancelled = self._cancelled + 1
    if self._cancelled > 512 and self._cancelled > self._nheap / 2 then
      heap_compact(self)
    end
  end
end

local function fd_number(fd)
  if type(fd) == "number" then return fd end
  if (type(fd) == "table" or type(fd) == "userdata") and fd.fileno then
    return fd:fileno()
  end
  error(format("fd must be a number or have a fileno method, got %s", type(fd)), 3)
end

--- Call handler(fd, events) when fd is ready. `fd` is a number or an
-- object with :fileno(); it must be pollable (a socket, pipe, tty,
-- eventfd...). `events` is a bit set of READ, WRITE (ERROR is always on).
function IOLoop:add_handler(fd, handler, events)
  check_callable(handler, 2)
  local n = fd_number(fd)
  if self._handlers[n] then
    error(format("fd %d is already registered", n), 2)
  end
  self._handlers[n] = core.watch_fd(self._uv, n, events or M.READ,
    function(_, ev) handler(fd, ev) end)
  self._fdobjs[n] = fd
end

--- Change the events watched on fd.
function IOLoop:update_handler(fd, events)
  local n = fd_number(fd)
  local w = self._handlers[n]
  if not w then error(format("fd %d is not registered", n), 2) end
  w:update(events)
end

--- Stop watching fd. Harmless when it is not watched.
function IOLoop:remove_handler(fd)
  local n = fd_number(fd)
  local w = self._handlers[n]
  if w then
    self._handlers[n], self._fdobjs[n] = nil, nil
    w:close()
  end
end

-- "TERM" and "SIGTERM" name the same signal.
local function signal_name(signame, level)
  if type(signame) ~= "string" then
    error(format("signal name must be a string like \"SIGTERM\", got %s", type(signame)),
      level + 1)
  end
  if signame:sub(1, 3) ~= "SIG" then signame = "SIG" .. signame end
  return signame
end

--- Call fn(signame) on the loop when the process receives the signal
-- ("SIGTERM" or "TERM"; fn gets the "SIG" form). Replaces an earlier
-- handler for the same signal.
function IOLoop:add_signal_handler(signame, fn)
  signame = signal_name(signame, 2)
  check_callable(fn, 2)
  self:remove_signal_handler(signame)
  local ok, w = pcall(core.watch_signal, self._uv, signame, fn)
  if not ok then error(w, 2) end
  self._signals[signame] = w
end

--- Stop handling a signal (its default action applies again).
function IOLoop:remove_signal_handler(signame)
  signame = signal_name(signame, 2)
  local w = self._signals[signame]
  if w then
    self._signals[signame] = nil
    w:close()
  end
end

--- Call fn(future) on the loop when the future resolves.
function IOLoop:add_future(future, fn)
  check_callable(fn, 2)
  future:add_done_callback(function(f) self:add_callback(fn, f) end)
end

-- Run the timers due at `t0` that were set before the iteration began
-- (sequence number up to `seq0`); one set by this iteration's callbacks
-- waits for the next, as in Tornado.
local function run_timers(self, t0, seq0)
  local h = self._heap
  local due, ndue = nil, 0
  while self._nheap > 0 do
    local t = h[1]
    if t.fn and (t.deadline > t0 or t.seq > seq0) then break end
    local _
    _, self._nheap = heap_pop(h, self._nheap)
    if t.fn then
      ndue = ndue + 1
      due = due or {}
      due[ndue] = t
    else
      self._cancelled = self._cancelled - 1
    end
  end
  for i = 1, ndue do
    local t = due[i]
    local fn, args = t.fn, t.args
    if fn then -- an earlier timer may have removed it
      t.fn, t.args = nil, nil
      run(fn, args)
    end
  end
end

--- Run the loop until stop() is called.
function IOLoop:start()
  util.check_main_thread("IOLoop:start", 2)
  if self._closed then error("the IOLoop is closed", 2) end
  if self._running then error("the IOLoop is already running", 2) end
  self._running = true
  self._started = true
  local outer = current
  current = self
  for i = 1, #start_hooks do start_hooks[i](self) end
  local uv = self._uv
  while true do
    local t0, seq0 = now(), self._seq
    local n = self._ncb
    if n > 0 then
      local fns, args = self._cb_fns, self._cb_args
      self._cb_fns, self._cb_args, self._ncb = {}, {}, 0
      for i = 1, n do run(fns[i], args[i]) end
    end
    if self._nheap > 0 then run_timers(self, t0, seq0) end
    if self._stopping then break end
    local timeout = -1
    if self._ncb > 0 then
      timeout = 0
    elseif self._nheap > 0 then
      timeout = max(0, self._heap[1].deadline - now())
    end
    uv:poll(timeout)
    if self._stopping then break end
  end
  self._stopping = false
  self._running = false
  current = outer
end

--- Make start() return after the current iteration. If the loop is not
-- running, the next start() returns after one iteration.
function IOLoop:stop()
  self._stopping = true
end

--- True while start() runs.
function IOLoop:is_running()
  return self._running
end

--- Start the loop, run fn() in a coroutine, stop the loop when it returns
-- and return its results. Raises what fn raises, or an error of kind
-- "timeout" when `timeout` seconds pass first.
-- @tparam function fn
-- @tparam[opt] number timeout seconds
-- @tparam[opt] table opts `traceback = true`: a string error fn raised
--   comes with the coroutine's traceback (squall.testing uses it)
function IOLoop:run_sync(fn, timeout, opts)
  check_callable(fn, 2)
  if self._running then error("the IOLoop is already running", 2) end
  local trace = opts and opts.traceback
  local gen = require "squall.gen"
  local fut
  self:add_callback(function()
    fut = gen.task(fn)
    fut:add_done_callback(function() self:stop() end)
  end)
  local t, timed_out
  if timeout then
    t = self:call_later(timeout, function() timed_out = true; self:stop() end)
  end
  self:start()
  if t then self:remove_timeout(t) end
  if not (fut and fut:done()) then
    if timed_out then
      error(core.error("timeout", format("operation timed out after %g seconds", timeout)), 2)
    end
    -- someone else called stop() (Tornado's words)
    error("Event loop stopped before Future completed.", 2)
  end
  if fut:raised() then
    local err = fut:error()
    if trace and type(err) == "string" and fut:traceback() then
      err = fut:traceback()
    end
    error(err, 0)
  end
  return fut:result()
end

--- The runtime's own loop object under this IOLoop, for the modules that
-- open libuv handles on it (streams, acceptors, watchers, thread pools).
function IOLoop:core_loop()
  return self._uv
end

--- True once close() ran.
function IOLoop:closed()
  return self._closed == true
end

--- Close the loop: every fd handler, signal handler and stream still open
-- on it is closed. With all_fds, the fds given to add_handler are closed
-- too (numbers with close(2), objects with their close method). Pending
-- callbacks are dropped.
function IOLoop:close(all_fds)
  if self._closed then return end
  if self._running then error("cannot close a running IOLoop", 2) end
  for n, w in pairs(self._handlers) do
    w:close()
    local obj = self._fdobjs[n]
    if all_fds then
      if type(obj) == "number" then
        core.close_fd(obj)
      elseif obj.close then
        local ok, err = pcall(obj.close, obj)
        if not ok then log.warn("closing fd %d: %s", n, tostring(err)) end
      end
    end
  end
  self._handlers, self._fdobjs = {}, {}
  for name in pairs(self._signals) do self:remove_signal_handler(name) end
  self._uv:close()
  self._closed = true
  self._cb_fns, self._cb_args, self._ncb = {}, {}, 0
  self._heap, self._nheap = {}, 0
  if current == self then current = nil end
end

return M
