--- Celery tasks over Redis, in Celery's own wire format: a Squall program
-- sends tasks that Python Celery workers run, a Squall worker runs tasks
-- that Python sends, and results and revokes cross both ways.
--
--     local app = celery.new({ broker = "redis://127.0.0.1:6379/0",
--       backend = "redis://127.0.0.1:6379/0" })
--     local res = app:send_task("tasks.add", { 2, 3 }, nil, { countdown = 1 })
--     local five, err = res:get(10)
--
--     local worker = app:worker({ tasks = "tasks" })   -- tasks/*.lua
--     worker:start()
--
-- Task message protocol 2 with JSON or MessagePack bodies, kombu's Redis
-- transport (squall.celery.transport) and the Redis result backend
-- (squall.celery.backend); the reference is Debian's Celery 5.2 / kombu
-- 5.2. See docs/api.md (squall.celery).
-- @module squall.celery
local core = require "squall.core"
local ffi = require "ffi"
local json = require "squall.json"
local message = require "squall.celery.message"
local backend = require "squall.celery.backend"
local transport = require "squall.celery.transport"
local util = require "squall.util"

local M = {}

local type, error, tostring, format, pairs = type, error, tostring, string.format, pairs
local setmetatable = setmetatable
local wall = core.wall_time

-- ---- names ------------------------------------------------------------------

pcall(ffi.cdef, "int gethostname(char *name, size_t len); int getpid(void);")

--- This machine's host name.
function M.hostname()
  local buf = ffi.new("char[256]")
  if ffi.C.gethostname(buf, 256) ~= 0 then return "localhost" end
  return ffi.string(buf)
end

-- ---- the app ------------------------------------------------------------------

--- @type App
local App = util.class()

local APP_KEYS = { broker = true, backend = true, serializer = true, queue = true,
  result_expires = true, visibility_timeout = true, ssl_options = true }

local function positive(opts, k, default, level)
  local v = opts[k]
  if v == nil then return default end
  if type(v) ~= "number" or v <= 0 then
    error(format("celery.new: %s must be a positive number, got %s", k, util.describe(v)),
      level + 1)
  end
  return v
end

--- An app: where tasks go and results are kept.
-- @tparam table opts `broker` (a redis:// URL), `backend` (a redis:// URL
--   for results, or nil), `serializer` ("json" or "msgpack"), `queue`
--   ("celery"), `result_expires` (86400 s), `visibility_timeout` (3600 s),
--   `ssl_options` (for rediss:// URLs)
function M.new(opts)
  if type(opts) ~= "table" then error("celery.new: opts must be a table", 2) end
  for k in pairs(opts) do
    if not APP_KEYS[k] then error("celery.new: unknown option " .. tostring(k), 2) end
  end
  if opts.broker == nil then error("celery.new: broker (a redis:// URL) is required", 2) end
  local serializer = opts.serializer or "json"
  if not message.CONTENT_TYPES[serializer] then
    error(format("celery.new: serializer must be \"json\" or \"msgpack\", got %s",
      util.describe(serializer)), 2)
  end
  local queue = opts.queue or "celery"
  if type(queue) ~= "string" or queue == "" then
    error("celery.new: queue must be a non-empty string", 2)
  end
  local broker = transport.parse_url(opts.broker, 2, opts.ssl_options)
  local self = setmetatable({
    serializer = serializer,
    queue = queue,
    result_expires = positive(opts, "result_expires", 86400, 2),
    visibility_timeout = positive(opts, "visibility_timeout", 3600, 2),
    transport = transport.new(broker),
    origin = format("squall-%d@%s", ffi.C.getpid(), M.hostname()),
  }, App)
  if opts.backend ~= nil then
    self.backend = backend.new(transport.parse_url(opts.backend, 2, opts.ssl_options),
      self.result_expires)
  end
  return self
end

-- `expires` as memcached reads an expiry: up to 30 days, seconds from
-- now; above, a unix time.
local function absolute_expiry(expires, now)
  if expires <= 2592000 then return now + expires end
  return expires
end

local SEND_KEYS = { countdown = true, eta = true, expires = true, queue = true,
  task_id = true, priority = true }

local function check_number(options, k, level)
  local v = options[k]
  if v ~= nil and (type(v) ~= "number" or v ~= v) then
    error(format("send_task: %s must be a number, got %s", k, util.describe(v)), level + 1)
  end
  return v
end

--- Send task `name` with positional `args` (an array; `args.n` counts
-- trailing nils) and `kwargs` (a table of names), to be run by any
-- worker, Python's or Squall's, that serves its queue.
-- @tparam[opt] table options `countdown`, `eta` (unix time), `expires`,
--   `queue`, `task_id`, `priority` (0-9, kombu's steps 0, 3, 6, 9; a
--   lower number is taken first)
-- @treturn AsyncResult its `id`, `get(timeout)`, `state()`
-- @return nil, err (the broker's I/O kinds)
function App:send_task(name, args, kwargs, options)
  if type(name) ~= "string" or name == "" then
    error("send_task: name must be a non-empty string, got " .. util.describe(name), 2)
  end
  if args ~= nil and type(args) ~= "table" then
    error("send_task: args must be an array, got " .. util.describe(args), 2)
  end
  if kwargs ~= nil and type(kwargs) ~= "table" then
    error("send_task: kwargs must be a table, got " .. util.describe(kwargs), 2)
  end
  options = options or {}
  if type(options) ~= "table" then error("send_task: options must be a table", 2) end
  for k in pairs(options) do
    if not SEND_KEYS[k] then error("send_task: unknown option " .. tostring(k), 2) end
  end
  local countdown, eta = check_number(options, "countdown", 2), check_number(options, "eta", 2)
  local expires, priority = check_number(options, "expires", 2),
    check_number(options, "priority", 2)
  local queue = options.queue or self.queue
  if type(queue) ~= "string" then error("send_task: queue must be a string", 2) end
  local id = options.task_id or message.uuid()
  if type(id) ~= "string" then error("send_task: task_id must be a string", 2) end
  util.need_coroutine("send_task", 2)
  local now = wall()
  if countdown then eta = now + countdown end
  local ok, raw = pcall(message.task, { id = id, name = name, args = args or {},
    kwargs = kwargs, eta = eta, expires = expires and absolute_expiry(expires, now),
    queue = queue, priority = priority, origin = self.origin, serializer = self.serializer,
    sent = now })
  if not ok then error("send_task: the arguments cannot be sent: " .. tostring(raw), 2) end
  local pushed, err = self.transport:put(queue, priority, raw)
  if not pushed then return nil, err end
  return M.AsyncResult(self, id)
end

--- Revoke a task everywhere: every running worker, Python's or Squall's,
-- skips it (its state becomes REVOKED when a worker meets it).
-- @treturn boolean true, or nil, err
function App:revoke(id)
  if type(id) ~= "string" then error("revoke: id must be a string", 2) end
  util.need_coroutine("revoke", 2)
  local ok, err = self.transport:publish_fanout("celery.pidbox", message.control("revoke",
    { task_id = id, terminate = false, signal = "SIGTERM" }, wall()))
  if ok == nil then return nil, err end
  return true
end

--- A result for a task id sent earlier (or by someone else).
function App:result(id)
  if type(id) ~= "string" then error("result: id must be a string", 2) end
  return M.AsyncResult(self, id)
end

--- A worker for this app (see squall.celery.worker).
function App:worker(opts)
  local ok, w = pcall(require("squall.celery.worker").new, self, opts)
  if not ok then error(w, 2) end
  return w
end

--- Close the app's idle connections.
function App:close()
  self.transport:close()
  if self.backend then self.backend:close() end
end

-- ---- results ----------------------------------------------------------------

--- A task's result: `res.id`, `res:get(timeout)`, `res:state()`.
-- @type AsyncResult
local AsyncResult = util.class()

function M.AsyncResult(app, id)
  return setmetatable({ app = app, id = id }, AsyncResult)
end

local function need_backend(res, what)
  if not res.app.backend then
    error(what .. ": the app has no backend (celery.new{ backend = \"redis://...\" })", 3)
  end
end

-- What a ready meta gives get(): the value, or nil, err.
local function outcome(m)
  if m.status == "SUCCESS" then
    if m.result == json.null then return nil end
    return m.result
  end
  local r = type(m.result) == "table" and m.result or {}
  local text = message.exception_text(r.exc_message)
  local remote = { type = r.exc_type, message = text,
    traceback = type(m.traceback) == "string" and m.traceback or nil }
  local err
  if m.status == "REVOKED" then
    err = core.error("revoked", "the task was revoked" .. (text ~= "" and " (" .. text .. ")"
      or ""))
  else
    err = core.error("task", format("%s: %s", tostring(r.exc_type or "error"), text))
  end
  err.remote = remote
  return nil, err
end

--- Wait (inside a coroutine) for the task's result: its value; or nil,
-- err with kind `task` (it failed: `err.remote` = `{type, message,
-- traceback}`), `revoked`, `timeout` (none within `timeout` seconds; nil
-- waits for ever) or the backend's I/O kinds. Listens on the result's
-- channel: no polling.
function AsyncResult:get(timeout)
  need_backend(self, "get")
  if timeout ~= nil and (type(timeout) ~= "number" or timeout < 0) then
    error("get: timeout must be a non-negative number", 2)
  end
  util.need_coroutine("get", 2)
  local m, err = self.app.backend:wait(self.id, timeout)
  if not m then return nil, err end
  return outcome(m)
end

--- The task's state now: "PENDING", "STARTED", "RETRY", "SUCCESS",
-- "FAILURE" or "REVOKED"; nil, err when the backend cannot say.
function AsyncResult:state()
  need_backend(self, "state")
  util.need_coroutine("state", 2)
  local m, err = self.app.backend:meta(self.id)
  if not m then return nil, err end
  return m.status
end

-- ---- inside a task ---------------------------------------------------------

-- The request each running task's coroutine serves (weak: it goes with
-- the coroutine).
M._requests = setmetatable({}, { __mode = "k" })

--- Inside a task: `{ id, name, retries, args, kwargs, eta }` of the task
-- running in this coroutine, or nil outside one.
function M.current()
  return M._requests[coroutine.running() or false]
end

local retry_mt = { __tostring = function(r)
  return format("celery.retry (countdown %g, max_retries %d)", r.countdown, r.max_retries)
end }
M._retry_mt = retry_mt

--- Inside a task: end it with state RETRY and send it again with
-- `retries` + 1 after `countdown` seconds (default 180), as Python's
-- `self.retry()`; past `max_retries` (default 3) it is a FAILURE. Never
-- returns.
function M.retry(opts)
  opts = opts or {}
  if type(opts) ~= "table" then error("celery.retry: opts must be a table", 2) end
  local req = M.current()
  if not req then error("celery.retry: not inside a task", 2) end
  local countdown, max_retries = opts.countdown or 180, opts.max_retries or 3
  if type(countdown) ~= "number" or countdown < 0 then
    error("celery.retry: countdown must be a non-negative number", 2)
  end
  if type(max_retries) ~= "number" or max_retries < 0 then
    error("celery.retry: max_retries must be a non-negative number", 2)
  end
  error(setmetatable({ countdown = countdown, max_retries = max_retries }, retry_mt), 0)
end

M.App = App
M.AsyncResultClass = AsyncResult
return M
