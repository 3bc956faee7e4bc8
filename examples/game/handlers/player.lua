-- "player.*": a player's live state, in a Redis hash player:<uid>.
local store = require "store"

local M = {}

local function key(uid) return "player:" .. uid end

--- player.login(uid) -> the player's state {x, y, rounds, best}; a new
-- player starts at 0,0.
function M.login(conn, uid)
  if type(uid) ~= "string" or not uid:match("^[%w_%-]+$") or #uid > 64 then
    return nil, "uid must be 1 to 64 letters, digits, _ or -"
  end
  conn.data.uid = uid
  return store.redis:with(function(r)
    r:hsetnx(key(uid), "x", 0)
    r:hsetnx(key(uid), "y", 0)
    local s = assert(r:hgetall(key(uid)))
    local state = { rounds = 0, best = 0 }
    for i = 1, #s, 2 do state[s[i]] = tonumber(s[i + 1]) end
    return state
  end)
end

--- player.move(dx, dy) -> the new position {x, y}, both updated at once
-- (MULTI/EXEC), so two servers moving one player never lose a step.
function M.move(conn, dx, dy)
  local uid = conn.data.uid
  if not uid then return nil, "log in first" end
  if type(dx) ~= "number" or type(dy) ~= "number" then return nil, "dx, dy must be numbers" end
  local res, err = store.redis:with(function(r)
    return r:pipeline(function(p)
      p:multi()
      p:hincrby(key(uid), "x", dx)
      p:hincrby(key(uid), "y", dy)
      p:exec()
    end)
  end)
  if not res then return nil, tostring(err) end
  local xy = res[4] -- EXEC's results
  return { xy[1], xy[2] }
end

return M
