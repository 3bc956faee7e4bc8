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

-- SETEX and PUBLISH, as the Redis backend does, unless a SUCCESS is
-- stored already (Celery's guard against a lost worker's late
-- duplicate), in one step. KEYS[1]: the key; ARGV: expiry, meta.
local STORE = [[
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, m = pcall(cjson.decode, cur)
  if ok and type(m) == 'table' and m.status == 'SUCCESS' then return 0 end
end
redis.call('SETEX', KEYS[1], ARGV[1], ARGV[2])
redis.call('PUBLISH', KEYS[1], ARGV[2])
return 1
]]

--- The meta to store for a task: its JSON, or nil, err (kind `celery`)
-- when the result cannot be encoded.
function M.meta_text(id, status, result, traceback, parent_id)
  local ok, text = pcall(message.meta, id, status, result, traceback, core.wall_time(),
    parent_id)
  if not ok then return nil, core.error("celery", "the result cannot be stored: " .. text) end
  return text
end

--- The command that stores `text` (from meta_text) for task `id`, added
-- to pipeline `p`.
function Backend:store_command(p, id, text)
  p:eval(STORE, 1, key(id), self.expires, text)
end

--- Store a task's state, as the Redis backend does: SETEX with the
-- expiry and PUBLISH on the key's channel; a SUCCESS already stored is
-- never overwritten.
function Backend:store(id, status, result, traceback, parent_id)
  local text, err = M.meta_text(id, status, result, traceback, parent_id)
  if not text then return nil, err end
  local ok
  ok, err = self.pool:call("EVAL", STORE, 1, key(id), self.expires, text)
  if ok == nil then return nil, err end
  return true
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
      if msg and msg.channel ~= k then
        -- (a connection used before may still hold a message of another
        -- task's channel, published before it unsubscribed)
        m = { status = "PENDING" }
      elseif msg then
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
