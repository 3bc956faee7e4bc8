--- A Celery worker in Squall: takes task messages from Redis the way
-- kombu's transport does, runs each task in a coroutine of its own, and
-- writes results as Celery's Redis backend does, beside Python workers on
-- the same queues.
--
--     local worker = app:worker({ tasks = "tasks", concurrency = 100 })
--     worker:route("tasks.add", function(a, b) return a + b end)
--     worker:start()            -- consumes on the loop; returns at once
--     worker:stop(30)           -- (inside a coroutine) drains
--
-- Delivery: a message is recorded in `unacked` the moment it is taken, and
-- acknowledged before the task runs (after it, with `acks_late`); one held
-- by a worker that died goes back to its queue after the visibility
-- timeout. ETA and countdown tasks are held, unacknowledged, until due.
-- Revokes arrive on the pidbox broadcast, which also answers `celery
-- inspect ping`.
-- @module squall.celery.worker
local core = require "squall.core"
local gen = require "squall.gen"
local ioloop = require "squall.ioloop"
local json = require "squall.json"
local log = require "squall.log"
local message = require "squall.celery.message"
local backend_m = require "squall.celery.backend"
local routers = require "squall.router"
local transport_m = require "squall.celery.transport"
local util = require "squall.util"

local M = {}

local type, tostring, tonumber, pairs, ipairs, next, error, format = type, tostring,
  tonumber, pairs, ipairs, next, error, string.format
local unpack, xpcall, traceback, getmetatable = unpack, xpcall, debug.traceback, getmetatable
local wall, mono = core.wall_time, core.time
local null = json.null

local BACKOFF_MIN, BACKOFF_MAX = 0.1, 5
local BRPOP_TIMEOUT = 1 -- seconds: how long a stop may wait for the consumer
local TAKE_MAX = 100 -- messages taken at once, at most
local REVOKED_MAX = 50000 -- ids remembered, as Celery's LimitedSet

-- ---- metrics (made once, on the first worker) --------------------------------

local metrics_families
local function families()
  if not metrics_families then
    local metrics = require "squall.metrics"
    metrics_families = {
      tasks = metrics.counter("squall_celery_tasks_total",
        "Celery tasks this worker finished, by task name and final state",
        { "name", "state" }),
      run = metrics.histogram("squall_celery_task_run_seconds",
        "Celery task run time, by task name", { "name" }),
      wait = metrics.histogram("squall_celery_task_queue_wait_seconds",
        "Time from a Celery task's send (or its ETA) to its start, by task name " ..
        "(tasks sent by Squall, and ETA tasks)", { "name" }),
    }
  end
  return metrics_families
end

-- ---- the worker ------------------------------------------------------------------

--- @type Worker
local Worker = util.class()

local WORKER_KEYS = { tasks = true, queues = true, concurrency = true, acks_late = true,
  name = true }

function M.new(app, opts)
  opts = opts or {}
  if type(opts) ~= "table" then error("worker: opts must be a table", 2) end
  for k in pairs(opts) do
    if not WORKER_KEYS[k] then error("worker: unknown option " .. tostring(k), 2) end
  end
  local queues = opts.queues or { app.queue }
  if type(queues) ~= "table" or #queues == 0 then
    error("worker: queues must be a non-empty list of names", 2)
  end
  for _, q in ipairs(queues) do
    if type(q) ~= "string" or q == "" then error("worker: a queue name must be a string", 2) end
  end
  local concurrency = opts.concurrency or 100
  if type(concurrency) ~= "number" or concurrency < 1 or concurrency % 1 ~= 0 then
    error("worker: concurrency must be a positive integer, got " ..
      util.describe(concurrency), 2)
  end
  if opts.name ~= nil and type(opts.name) ~= "string" then
    error("worker: name must be a string", 2)
  end
  local self = setmetatable({
    app = app,
    transport = app.transport,
    backend = app.backend,
    queues = { unpack(queues) },
    concurrency = concurrency,
    acks_late = opts.acks_late == true,
    name = opts.name or ("squall@" .. require("squall.celery").hostname()),
    router = routers.new("celery", "tasks"),
    revoked = {}, revoked_order = {}, -- id -> true, and the ids in order (bounded)
    reserved = 0,    -- tasks taken (not ETA-held) whose run has not finished
    running = {},    -- coroutine -> the task it runs
    held = {},       -- delivery tag -> { task, timer }: ETA tasks not due yet
    n_held = 0,
    outbox = {},     -- acks and results not yet sent (see flusher)
    state = "new",   -- new, running, stopping, stopped
  }, Worker)
  if opts.tasks ~= nil then self.router:add_folder(opts.tasks, 3) end
  return self
end

--- Run `fn(...)` for task `name` (or every function of a table as
-- "name.f"), beside the tasks folder's.
function Worker:route(name, target)
  self.router:route(name, target, 2)
  return self
end

--- The task names this worker runs, sorted.
function Worker:tasks()
  return self.router:names()
end

-- ---- talking to Redis through failures ----------------------------------------

-- Run fn() until it gives a value: a broker that went away is waited for
-- with backoff (logged once), so an ack or a result is not lost on the
-- way. Gives up, returning what fn last said, once the worker stopped.
local function persist(self, what, fn)
  local delay, said = BACKOFF_MIN, false
  while true do
    local v, err = fn()
    if v ~= nil then
      if said then log.info("celery: %s: the broker is back", what) end
      return v
    end
    if self.state == "stopped" then return nil, err end
    if not said then
      log.warn("celery: %s failed (%s); retrying with backoff", what, tostring(err))
      said = true
    end
    gen.sleep(delay)
    delay = math.min(delay * 2, BACKOFF_MAX)
  end
end

-- Acknowledgements and results leave through the outbox: what the tasks
-- that finished meanwhile queued goes in one MULTI pipeline (one round
-- trip for many tasks, and one system call each way). The flusher keeps a
-- batch until Redis took it, so nothing queued is lost while Redis is away.
local function post(self, op)
  local box = self.outbox
  box[#box + 1] = op
  local wake = self.outbox_wake
  if wake then
    self.outbox_wake = nil
    wake:set_result(true)
  end
end

local function flush(self, batch)
  return self.transport.pool:with(function(r)
    return r:pipeline(function(p)
      p:multi()
      for _, op in ipairs(batch) do
        if op[1] == "ack" then
          transport_m.ack_commands(p, op[2])
        else
          self.backend:store_command(p, op[2], op[3])
        end
      end
      p:exec()
    end)
  end)
end

local function flusher(self)
  while true do
    if #self.outbox == 0 then
      local f = self.flushed
      if f then
        self.flushed = nil
        f:set_result(true)
      end
      if self.state == "stopped" then break end
      self.outbox_wake = gen.Future()
      self.outbox_wake:result()
    else
      local batch = self.outbox
      self.outbox = {}
      self.flushing = true
      persist(self, "acknowledging and storing " .. #batch .. " result(s)", function()
        return flush(self, batch)
      end)
      self.flushing = false
    end
  end
end

local function ack(self, task)
  post(self, { "ack", task.delivery_tag })
end

local function store(self, task, status, result, tb)
  if not self.backend then return end
  local text, err = backend_m.meta_text(task.id, status, result, tb, task.parent_id)
  if not text then
    -- cannot be encoded: store why instead
    log.error("celery: %s", tostring(err))
    text = backend_m.meta_text(task.id, "FAILURE", message.exception("EncodeError",
      err.message, "kombu.exceptions"), nil, task.parent_id)
  end
  post(self, { "store", task.id, text })
end

-- The counter's child for (name, state), found once.
local counted = {}
local function count(name, state)
  local by_state = counted[name]
  if not by_state then
    by_state = {}
    counted[name] = by_state
  end
  local c = by_state[state]
  if not c then
    c = families().tasks:child({ name = name, state = state })
    by_state[state] = c
  end
  c.value = c.value + 1
end

-- Remember a revoked id (bounded: the oldest are forgotten first).
local function remember_revoked(self, id)
  if self.revoked[id] then return end
  self.revoked[id] = true
  local order = self.revoked_order
  order[#order + 1] = id
  if #order > REVOKED_MAX then
    self.revoked[table.remove(order, 1)] = nil
  end
end

-- ---- running a task ------------------------------------------------------------

local retry_mt = require("squall.celery")._retry_mt
local requests = require("squall.celery")._requests

-- The slot a task took is free again; the consumer may take another.
local function release_slot(self)
  self.reserved = self.reserved - 1
  local slot = self.slot
  if slot and self.reserved < self.concurrency then
    self.slot = nil
    slot:set_result(true)
  end
end

-- The task's positional arguments (JSON null as nil) and, when not empty,
-- its kwargs after them (a copy: the message's stay as they came).
local function call_args(task)
  local args, n = {}, task.nargs
  for i = 1, n do
    local v = task.args[i]
    if v ~= null then args[i] = v end
  end
  if next(task.kwargs) ~= nil then
    n = n + 1
    args[n] = task.kwargs
  end
  return args, n
end

local function send_retry(self, task, r, tb)
  local now = wall()
  local raw = message.task({ id = task.id, name = task.name, args = task.raw_args,
    kwargs = task.kwargs, eta = now + r.countdown, expires = task.expires,
    retries = task.retries + 1, root_id = task.root_id, parent_id = task.id,
    queue = task.routing_key or self.app.queue, priority = 0, origin = self.app.origin,
    serializer = self.app.serializer, sent = now })
  store(self, task, "RETRY", nil, tb)
  persist(self, "sending the retry of " .. task.id, function()
    return self.transport:put(task.routing_key or self.app.queue, 0, raw)
  end)
end

-- Run one task to its end: store its outcome, acknowledge (acks_late),
-- count it.
local function run_task(self, task, fn, slot)
  local co = coroutine.running()
  self.running[co] = task
  requests[co] = { id = task.id, name = task.name, retries = task.retries,
    args = task.raw_args, kwargs = task.kwargs, eta = task.eta }
  local f = families()
  local t0 = mono()
  if task.sent or task.eta then
    f.wait:observe(math.max(0, wall() - (task.eta or task.sent)), { name = task.name })
  end
  local args, n = call_args(task)
  local raised
  local res = util.pack(xpcall(fn, function(e)
    raised = e
    local described, text = pcall(tostring, e)
    return traceback(described and text or type(e), 2)
  end, unpack(args, 1, n)))
  f.run:observe(mono() - t0, { name = task.name })
  local state
  if not res[1] and getmetatable(raised) == retry_mt then
    if task.retries >= raised.max_retries then
      state = "FAILURE"
      store(self, task, state, message.exception("MaxRetriesExceededError",
        format("Can't retry %s[%s] args:%s kwargs:%s", task.name, task.id,
          message.py_repr(task.raw_args), message.py_repr(task.kwargs)), "celery.exceptions"),
        res[2])
    else
      state = "RETRY"
      send_retry(self, task, raised, res[2])
    end
  elseif not res[1] then
    state = "FAILURE"
    log.error("celery: task %s[%s] raised: %s", task.name, task.id, res[2])
    local described, text = pcall(tostring, raised)
    store(self, task, state, message.exception("LuaError", described and text or type(raised),
      "squall"), res[2])
  elseif res[2] == nil and res[3] ~= nil then
    state = "FAILURE"
    local described, text = pcall(tostring, res[3])
    store(self, task, state, message.exception("LuaError", described and text or
      type(res[3]), "squall"), nil)
  else
    state = "SUCCESS"
    store(self, task, state, res[2], nil)
  end
  if self.acks_late then ack(self, task) end
  count(task.name, state)
  self.running[co] = nil
  requests[co] = nil
  if slot then release_slot(self) end
  if self.state == "stopping" and next(self.running) == nil and self.drained then
    self.drained:set_result(true)
  end
end

-- A task that will not run: REVOKED (revoked, expired) or FAILURE
-- (unregistered), stored and acknowledged.
local function refuse(self, task, status, exc_type, text, module)
  store(self, task, status, message.exception(exc_type, text, module), nil)
  ack(self, task)
  count(task.name, status)
end

-- Start a task that is due: revoked and expired ones are refused here too
-- (a revoke may have come while it was held).
local function start(self, task, slot)
  if self.revoked[task.id] then
    log.info("celery: task %s[%s] revoked: not run", task.name, task.id)
    refuse(self, task, "REVOKED", "TaskRevokedError", "revoked", "celery.exceptions")
    if slot then release_slot(self) end
    return
  end
  if task.expires and task.expires <= wall() then
    log.info("celery: task %s[%s] expired: not run", task.name, task.id)
    refuse(self, task, "REVOKED", "TaskRevokedError", "expired", "celery.exceptions")
    if slot then release_slot(self) end
    return
  end
  local fn = self.router.methods[task.name]
  if not fn then -- (its file was removed while the task was held)
    refuse(self, task, "FAILURE", "NotRegistered", task.name, "celery.exceptions")
    if slot then release_slot(self) end
    return
  end
  if not self.acks_late then ack(self, task) end
  gen.spawn(run_task, self, task, fn, slot)
end

-- ---- taking messages ---------------------------------------------------------------

-- The queue a list belongs to (the list of a priority step ends in SEP n).
local function queue_of(key)
  return key:match("^(.*)" .. transport_m.SEP .. "%d$") or key
end

-- One message BRPOP gave: record it as unacked, then run, hold or refuse it.
local function received(self, conn, key, raw, recorded)
  local task, err, id, env = message.parse_task(raw)
  if not task then
    -- rejected, as Celery's worker rejects it: logged, its id (if any)
    -- marked FAILURE; nothing is run
    log.error("celery: rejecting a message from %s: %s", queue_of(key), tostring(err))
    if id and self.backend then
      store(self, { id = id }, "FAILURE", message.exception("InvalidTaskError",
        tostring(err.message), "celery.exceptions"), nil)
    end
    if recorded then
      -- the take script recorded it by the tag it read (Redis' own JSON
      -- reader may accept what ours refuses): forget it, or it would come
      -- back after every visibility timeout
      local props = type(env) == "table" and env.properties
      local tag = type(props) == "table" and props.delivery_tag or
        raw:match('"delivery_tag"%s*:%s*"([^"]+)"')
      if type(tag) == "string" then post(self, { "ack", tag }) end
    end
    count("(invalid)", "REJECTED")
    return
  end
  task.raw_args = task.args
  task.routing_key = task.routing_key or queue_of(key)
  recorded = recorded or persist(self, "recording " .. task.id .. " as unacked", function()
    if conn and not conn:closed() then
      local ok = self.transport:deliver(conn, task.delivery_tag, raw, task.exchange,
        task.routing_key)
      if ok then return ok end
    end
    return self.transport.pool:with(function(r)
      return self.transport:deliver(r, task.delivery_tag, raw, task.exchange, task.routing_key)
    end)
  end)
  if not recorded then
    -- stopped while the broker was away: give the message back
    self.transport:put(queue_of(key), 0, raw)
    return
  end
  if not self.router.methods[task.name] then
    log.error("celery: received unregistered task of type %q (id %s)", task.name, task.id)
    refuse(self, task, "FAILURE", "NotRegistered", task.name, "celery.exceptions")
    return
  end
  if task.eta and task.eta > wall() and not self.revoked[task.id] then
    local loop = ioloop.current()
    local entry = { task = task }
    entry.timer = loop:call_later(task.eta - wall(), function()
      if self.held[task.delivery_tag] ~= entry then return end
      self.held[task.delivery_tag] = nil
      self.n_held = self.n_held - 1
      gen.spawn(start, self, task, nil)
    end)
    self.held[task.delivery_tag] = entry
    self.n_held = self.n_held + 1
    return
  end
  self.reserved = self.reserved + 1
  start(self, task, true)
end

-- Wait until fewer than `concurrency` tasks are reserved.
local function wait_for_slot(self)
  while self.reserved >= self.concurrency and self.state == "running" do
    self.slot = self.slot or gen.Future()
    self.slot:result()
  end
end

-- The consumer: BRPOP over the queues (each queue's plain list first,
-- then its priority lists), rotating the queue just served to the end as
-- kombu does; reconnects with backoff.
local function consume(self)
  local conn
  local delay, said = BACKOFF_MIN, false
  while self.state == "running" do
    wait_for_slot(self)
    if self.state ~= "running" then break end
    if not conn or conn:closed() then
      local err
      conn, err = self.transport:connect()
      if not conn then
        if not said then
          log.warn("celery: worker %s cannot reach the broker (%s); retrying with backoff",
            self.name, tostring(err))
          said = true
        end
        gen.sleep(delay)
        delay = math.min(delay * 2, BACKOFF_MAX)
      else
        if said then log.info("celery: worker %s reached the broker again", self.name) end
        delay, said = BACKOFF_MIN, false
        for _, q in ipairs(self.queues) do self.transport:bind(q) end
      end
    else
      self.consumer_conn = conn
      -- what waits is taken in batches (recorded as unacked by the same
      -- step); only an empty queue is waited on with BRPOP
      local keys = transport_m.brpop_keys(self.queues)
      local got, err = self.transport:take(conn, keys,
        math.min(self.concurrency - self.reserved, TAKE_MAX))
      if type(got) == "table" and #got > 0 then
        for i = 1, #got, 2 do received(self, nil, got[i], got[i + 1], true) end
        if #self.queues > 1 then -- fair: the next batch starts at the next queue
          self.queues[#self.queues + 1] = table.remove(self.queues, 1)
        end
      elseif type(got) == "table" then
        keys[#keys + 1] = BRPOP_TIMEOUT
        local reply
        reply, err = conn:call("BRPOP", unpack(keys))
        if type(reply) == "table" then
          received(self, conn, reply[1], reply[2])
        elseif reply == nil and err then
          conn:close()
        end
      elseif err then
        log.warn("celery: worker %s: taking messages failed: %s", self.name, tostring(err))
        conn:close()
      end
    end
  end
  if conn then conn:close() end
  self.consumer_conn = nil
end

-- ---- the pidbox: revoke, ping -----------------------------------------------------------

local function handle_control(self, body)
  local dest = body.destination
  if type(dest) == "table" and next(dest) ~= nil then
    local mine = false
    for _, d in ipairs(dest) do if d == self.name then mine = true end end
    if not mine then return end
  end
  local args = type(body.arguments) == "table" and body.arguments or {}
  local reply
  if body.method == "ping" then
    reply = { ok = "pong" }
  elseif body.method == "revoke" then
    local ids = args.task_id
    if type(ids) == "string" then ids = { ids } end
    local named = {}
    for _, id in ipairs(type(ids) == "table" and ids or {}) do
      if type(id) == "string" then
        remember_revoked(self, id)
        named[#named + 1] = id
        -- a held ETA task is refused now, not when due
        for tag, entry in pairs(self.held) do
          if entry.task.id == id then
            self.held[tag] = nil
            self.n_held = self.n_held - 1
            ioloop.current():remove_timeout(entry.timer)
            gen.spawn(start, self, entry.task, nil)
          end
        end
      end
    end
    log.info("celery: tasks flagged as revoked: %s", table.concat(named, ", "))
    reply = { ok = "tasks " .. table.concat(named, ", ") .. " flagged as revoked" }
  else
    reply = { error = "No such command: " .. tostring(body.method) }
  end
  local to = body.reply_to
  if type(to) == "table" and type(to.routing_key) == "string" then
    local raw = message.control_reply({ [self.name] = reply }, body.ticket, to.routing_key)
    self.transport:reply(to.exchange or "reply.celery.pidbox", to.routing_key, raw)
  end
end

local function listen_pidbox(self)
  local channel = self.transport:fanout_channel("celery.pidbox")
  local mailbox = self.name .. ".celery.pidbox"
  local delay = BACKOFF_MIN
  while self.state == "running" do
    local conn = self.transport:connect()
    if conn then
      self.pidbox_conn = conn
      conn:call("SADD", "_kombu.binding.celery.pidbox",
        transport_m.SEP .. transport_m.SEP .. mailbox)
      local ok = conn:psubscribe(channel)
      self.pidbox_ready = self.pidbox_ready or gen.Future()
      if ok and not self.pidbox_ready:done() then self.pidbox_ready:set_result(true) end
      delay = BACKOFF_MIN
      while ok and self.state == "running" do
        local msg, err = conn:read_message(BRPOP_TIMEOUT)
        if msg then
          local body, headers = message.parse_control(msg.data)
          local expires = body and tonumber(headers.expires)
          if not body then
            log.warn("celery: a pidbox message that cannot be read: %s", tostring(headers))
          elseif not (expires and expires > 0 and expires < wall()) then
            local done, why = xpcall(handle_control, traceback, self, body)
            if not done then log.error("celery: pidbox %s failed: %s", body.method, why) end
          end
        elseif err.kind ~= "timeout" then
          ok = false
        end
      end
      conn:close()
    end
    if self.state == "running" then
      gen.sleep(delay)
      delay = math.min(delay * 2, BACKOFF_MAX)
    end
  end
  self.pidbox_conn = nil
end

-- Push back what workers that died left unacked, every so often (kombu
-- does it between polls).
local function restorer(self)
  local vt = self.app.visibility_timeout
  local period = math.max(0.25, math.min(vt / 4, 10))
  while self.state == "running" do
    local n = self.transport:restore_visible(vt)
    if n and n > 0 then
      log.info("celery: restored %d unacknowledged message(s) older than %g s", n, vt)
    end
    gen.sleep(period)
  end
end

--- Start consuming on the loop and return (as a server's listen does).
-- Inside a coroutine it waits until the worker listens for broadcasts,
-- so a revoke sent right after start() reaches it.
function Worker:start()
  if self.state ~= "new" then error("worker:start: the worker was started already", 2) end
  self.state = "running"
  self.pidbox_ready = gen.Future()
  self.consumer = gen.spawn(consume, self)
  self.pidbox = gen.spawn(listen_pidbox, self)
  self.restoring = gen.spawn(restorer, self)
  self.flushing_loop = gen.spawn(flusher, self)
  if core.can_wait() then gen.with_timeout(5, self.pidbox_ready) end
  return self
end

--- Stop gracefully (inside a coroutine): take no new task, give the held
-- ETA tasks back to their queue, let running tasks finish for at most
-- `seconds` (default 30); tasks still running then are cut short (with
-- acks_late their messages go back to the queue too).
-- @treturn boolean true, or false and how many were cut short
function Worker:stop(seconds)
  seconds = seconds or 30
  if type(seconds) ~= "number" or seconds < 0 then
    error("worker:stop: seconds must be a non-negative number", 2)
  end
  util.need_coroutine("worker:stop", 2)
  if self.state ~= "running" then return true end
  self.state = "stopping"
  if self.slot then self.slot:set_result(false) end
  -- the consumer ends after its BRPOP returns (a message it brings is
  -- recorded and run or held, then given back below)
  gen.with_timeout(BRPOP_TIMEOUT + 5, self.consumer)
  if self.pidbox_conn then self.pidbox_conn:close() end
  self.transport.pool:call("SREM", "_kombu.binding.celery.pidbox",
    transport_m.SEP .. transport_m.SEP .. self.name .. ".celery.pidbox")
  for tag, entry in pairs(self.held) do
    ioloop.current():remove_timeout(entry.timer)
    self.held[tag] = nil
    self.transport:restore(tag)
  end
  self.n_held = 0
  if next(self.running) ~= nil then
    self.drained = gen.Future()
    gen.with_timeout(seconds, self.drained)
  end
  local cut = 0
  for _, task in pairs(self.running) do
    cut = cut + 1
    if self.acks_late then self.transport:restore(task.delivery_tag) end
  end
  -- what finished goes out before the worker says it stopped
  if #self.outbox > 0 or self.flushing then
    self.flushed = gen.Future()
    gen.with_timeout(math.max(1, seconds), self.flushed)
  end
  self.state = "stopped"
  local wake = self.outbox_wake
  if wake then
    self.outbox_wake = nil
    wake:set_result(true)
  end
  if cut > 0 then return false, cut end
  return true
end

--- The worker's counts now: running tasks, ETA tasks held, reserved.
function Worker:counts()
  local n = 0
  for _ in pairs(self.running) do n = n + 1 end
  return n, self.n_held, self.reserved
end

M.Worker = Worker
return M
