--- Celery's Redis result backend: a task's state and result live at
-- `celery-task-meta-<id>` (JSON, expiring after result_expires) and each
-- write is PUBLISHed on a channel of the same name, so a waiting client
-- listens instead of polling (celery/backends/redis.py is the reference).
-- @module squall.celery.backend
local core = require "squall.core"
local message = require "squall.celery.message"
local redis = require "squall.redis"
local util = require "squall.util"

local M = {}

local now = core.time

--- @type Backend
local Backend = util.class()

--- A backend on the Redis that `conn_opts` names; results expire after
-- `expires` seconds.
function M.new(conn_opts, expires)
  local p, s = {}, {}
  for k, v in pairs(conn_opts) do p[k], s[k] = v, v end
  p.size, s.size = 8, 64
  return setmetatable({ pool = redis.pool(p), subscribers = redis.pool(s),
    expires = expires }, Backend)
end

local function key(id) return "celery-task-meta-" .. id end
M.key = key

--- A task's meta: the table (`status`, `result`, `traceback`...), with
-- status "PENDING" when nothing is stored; nil, err.
function Backend:meta(id)
  local text, err = self.pool:call("GET", key(id))
  if text == nil then return nil, err end
  if text == redis.null then return { status = "PENDING", task_id = id } end
  return message.parse_meta(text)
end

--- Store a task's state, as the Redis backend does: SETEX with the
-- expiry, and PUBLISH on the key's channel, in one MULTI. A SUCCESS
-- already stored is never overwritten (Celery's guard against a lost
-- worker's late duplicate).
function Backend:store(id, status, result, traceback, parent_id)
  local ok, text = pcall(message.meta, id, status, result, traceback, core.wall_time(),
    parent_id)
  if not ok then return nil, core.error("celery", "the result cannot be stored: " .. text) end
  local k = key(id)
  return self.pool:with(function(r)
    local current = r:get(k)
    local m = type(current) == "string" and message.parse_meta(current)
    if m and m.status == "SUCCESS" then return true end
    local replies, err = r:pipeline(function(p)
      p:multi(); p:setex(k, self.expires, text); p:publish(k, text); p:exec()
    end)
    if not replies then return nil, err end
    return true
  end)
end

--- Wait for a task to be ready (SUCCESS, FAILURE, REVOKED): subscribe to
-- its channel, then read its key (it may be ready already), then wait for
-- a message. `timeout` in seconds, nil for ever. Returns the meta, or
-- nil, err (kind `timeout`, or the connection's).
function Backend:wait(id, timeout)
  local deadline = timeout and now() + timeout
  local k = key(id)
  return self.subscribers:with(function(r)
    local ok, err = r:subscribe(k)
    if not ok then return nil, err end
    local m
    m, err = self:meta(id)
    while m and not message.READY[m.status] do
      local left = deadline and deadline - now()
      if left and left <= 0 then
        m, err = nil, core.error("timeout", string.format(
          "celery: task %s was not ready within %g s", id, timeout))
        break
      end
      local msg
      msg, err = r:read_message(left)
      if msg then
        m, err = message.parse_meta(msg.data)
      elseif err.kind == "timeout" then
        err = core.error("timeout", string.format("celery: task %s was not ready within %g s",
          id, timeout))
        m = nil
      else
        return nil, err -- the connection failed: the pool drops it
      end
    end
    r:unsubscribe(k)
    return m, err
  end)
end

--- Close the idle connections.
function Backend:close()
  self.pool:close()
  self.subscribers:close()
end

return M
