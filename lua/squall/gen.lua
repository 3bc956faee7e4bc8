--- Coroutines: sleep, spawn, Future, with_timeout, multi.
--
-- A coroutine waits by registering who will resume it and yielding; every
-- resume goes through core.resume (runtime/coro.c), which reports an error
-- the coroutine did not catch with its traceback.
-- @module squall.gen
local core = require "squall.core"
local util = require "squall.util"
local ioloop = require "squall.ioloop"
local log = require "squall.log"

local M = {}

local pack, check_callable = util.pack, util.check_callable

local resume = core.resume
local yield, create = coroutine.yield, coroutine.create
local traceback, xpcall, unpack = debug.traceback, xpcall, unpack
local type, error, format = type, error, string.format


local need_coroutine = util.need_coroutine


--- A Future: a result that arrives later.
-- @type Future
local Future = util.class()
M.FutureClass = Future

--- Create an unresolved Future.
function M.Future()
  return setmetatable({ _done = false }, Future)
end

--- True when `x` is a Future.
function M.is_future(x)
  return getmetatable(x) == Future
end

function Future:_finish(result, err, raised, tb)
  if self._done then error("the Future is already resolved", 3) end
  self._done = true
  self._result, self._error, self._raised, self._traceback = result, err, raised, tb
  local cbs = self._callbacks
  if cbs then
    self._callbacks = nil
    local loop = ioloop.current()
    for i = 1, #cbs do loop:add_callback(cbs[i], self) end
  end
end

--- Resolve with result values. Raises if already resolved.
function Future:set_result(...)
  self:_finish(pack(...), nil, false)
end

--- Resolve with an error: result() then returns nil, err.
function Future:set_error(err)
  if err == nil then error("set_error needs an error value", 2) end
  self:_finish(nil, err, false)
end

--- True once resolved.
function Future:done()
  return self._done
end

--- The error it resolved with, or nil.
function Future:error()
  return self._error
end

--- True when its coroutine raised (not set_error): the error is what it
-- raised, and traceback() says where.
function Future:raised()
  return self._raised == true
end

--- The traceback of an error its coroutine raised, or nil.
function Future:traceback()
  return self._traceback
end

--- The result values; inside a coroutine, waits until resolved first.
-- Returns nil, err when it resolved with an error.
function Future:result()
  if not self._done then
    local co = need_coroutine("Future:result()", 2)
    self:add_done_callback(function() resume(co) end)
    repeat yield() until self._done
  end
  if self._error ~= nil then return nil, self._error end
  local r = self._result
  return unpack(r, 1, r.n)
end

--- Call fn(future) on the loop once resolved (on the next iteration if it
-- is resolved already).
function Future:add_done_callback(fn)
  check_callable(fn, 2)
  if self._done then
    ioloop.current():add_callback(fn, self)
  else
    local cbs = self._callbacks
    if not cbs then
      cbs = {}
      self._callbacks = cbs
    end
    cbs[#cbs + 1] = fn
  end
end

-- Coroutine bodies run fn under xpcall, so an error is caught inside the
-- coroutine with its traceback, whoever resumes it.
local last_traceback
local describe = core.describe -- as runtime/host.c reports errors
local function capture(e)
  last_traceback = traceback(describe(e), 2)
  return e
end

local function finish_task(fut, log_errors, ok, ...)
  if ok then
    fut:_finish(pack(...), nil, false)
  else
    local tb = last_traceback
    if log_errors then
      log.log_at("error", 2, "Uncaught error in coroutine: %s", tb)
    end
    fut:_finish(nil, (...), true, tb)
  end
end

local function task_body(fut, fn, log_errors, ...)
  finish_task(fut, log_errors, xpcall(fn, capture, ...))
end

local function start_task(fn, log_errors, ...)
  local fut = M.Future()
  resume(create(task_body), fut, fn, log_errors, ...)
  return fut
end

--- Start fn(...) in a new coroutine now. It runs until it first waits.
-- An error it raises is logged with its traceback. Returns a Future of
-- its results (nil, err when it raised).
function M.spawn(fn, ...)
  check_callable(fn, 2)
  return start_task(fn, true, ...)
end

--- Like spawn, for a caller that takes the error from the Future itself
-- (run_sync): an error it raises is not logged.
function M.task(fn, ...)
  check_callable(fn, 2)
  return start_task(fn, false, ...)
end

--- Suspend the running coroutine for `seconds`.
function M.sleep(seconds)
  if type(seconds) ~= "number" or seconds ~= seconds then
    error(format("seconds must be a number, got %s", type(seconds)), 2)
  end
  local co = need_coroutine("gen.sleep", 2)
  local woke = false
  ioloop.current():call_later(seconds, function()
    woke = true
    resume(co)
  end)
  repeat yield() until woke
end

local function reraise(fut)
  if fut._raised then error(fut._error, 0) end
end

--- Run fn(...) in a new coroutine (or wait on a Future given in its place)
-- for at most `seconds`. Returns its results, or nil and an error of kind
-- "timeout". An error fn raises is raised again here. On timeout fn goes
-- on running; an error it raises later is logged.
function M.with_timeout(seconds, fn, ...)
  if type(seconds) ~= "number" or seconds ~= seconds then
    error(format("seconds must be a number, got %s", type(seconds)), 2)
  end
  local co = need_coroutine("gen.with_timeout", 2)
  local fut
  if M.is_future(fn) then
    fut = fn
  else
    check_callable(fn, 2)
    fut = start_task(fn, false, ...)
  end
  if not fut:done() then
    local loop = ioloop.current()
    local timed_out = false
    local t = loop:call_later(seconds, function()
      timed_out = true
      resume(co)
    end)
    fut:add_done_callback(function()
      if not timed_out then resume(co) end
    end)
    repeat yield() until fut:done() or timed_out
    loop:remove_timeout(t)
    if not fut:done() then
      if fut ~= fn then
        fut:add_done_callback(function(f)
          if f._raised then
            log.error("Error in coroutine after its timeout: %s", f._traceback)
          end
        end)
      end
      return nil, core.error("timeout", format("timed out after %g seconds", seconds))
    end
  end
  reraise(fut)
  return fut:result()
end

--- Wait for all of `children` (Futures, or functions started in new
-- coroutines) and return a table of their first results, with the same
-- keys. Returns nil, err when one resolved with an error (the first met
-- in `pairs` order, which is not the order they resolved in); an error a
-- function raised is raised again here.
function M.multi(children)
  if type(children) ~= "table" then
    error(format("multi expects a table, got %s", type(children)), 2)
  end
  need_coroutine("gen.multi", 2)
  local futs = {}
  for k, c in pairs(children) do
    if M.is_future(c) then
      futs[k] = c
    else
      check_callable(c, 2)
      futs[k] = start_task(c, false)
    end
  end
  local results = {}
  for k, f in pairs(futs) do
    if not f:done() then f:result() end
    reraise(f)
    if f._error ~= nil then return nil, f._error end
    results[k] = f._result[1]
  end
  return results
end

return M
