-- "scores.*": finished rounds in MariaDB; the player's counters in Redis.
local store = require "store"

local M = {}

--- scores.finish(points) -> {rank, best}: records the round (a prepared
-- INSERT: the values never touch the SQL text), then the player's rank by
-- best score.
function M.finish(conn, points)
  local uid = conn.data.uid
  if not uid then return nil, "log in first" end
  if type(points) ~= "number" or points % 1 ~= 0 or points < 0 then
    return nil, "points must be a non-negative integer"
  end
  local ok, err = store.mysql:query("INSERT INTO scores (uid, points) VALUES (?, ?)", uid, points)
  if not ok then return nil, tostring(err) end
  local rows
  rows, err = store.mysql:query([[SELECT MAX(points) AS best,
      (SELECT COUNT(*) FROM (SELECT uid FROM scores GROUP BY uid
        HAVING MAX(points) > (SELECT MAX(points) FROM scores WHERE uid = ?)) AS ahead) + 1 AS rnk
    FROM scores WHERE uid = ?]], uid, uid)
  if not rows then return nil, tostring(err) end
  local best, rank = rows[1].best, rows[1].rnk
  store.redis:with(function(r)
    r:hincrby("player:" .. uid, "rounds", 1)
    r:hset("player:" .. uid, "best", best)
  end)
  return { rank = rank, best = best }
end

--- scores.top(n) -> the n best players: {{uid, best}, ...}.
function M.top(_, n)
  n = math.min(tonumber(n) or 10, 100)
  local rows, err = store.mysql:query([[SELECT uid, MAX(points) AS best FROM scores
    GROUP BY uid ORDER BY best DESC, uid LIMIT ?]], n)
  if not rows then return nil, tostring(err) end
  local out = {}
  for i, row in ipairs(rows) do out[i] = { row.uid, row.best } end
  return out
end

return M
