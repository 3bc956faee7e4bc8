--- Where the game keeps things: a player's live state in Redis (a hash per
-- player, fast and shared by every server process), finished rounds in
-- MariaDB (a table the leaderboard queries). One pool of each per process.
--
-- Set REDIS_PORT and MYSQL_PORT (and MYSQL_USER, MYSQL_PASSWORD,
-- MYSQL_DATABASE) to point it elsewhere; `./run` starts both servers of its
-- own and sets them.
local mysql = require "squall.mysql"
local redis = require "squall.redis"

local M = {}

local env = os.getenv
M.redis = redis.pool({ port = tonumber(env("REDIS_PORT")) or 6379, size = 16, timeout = 5 })
M.mysql = mysql.pool({ port = tonumber(env("MYSQL_PORT")) or 3306,
  user = env("MYSQL_USER") or "squall", password = env("MYSQL_PASSWORD") or "secret",
  database = env("MYSQL_DATABASE") or "squall_test", size = 8, timeout = 5 })

--- Create the scores table when it is missing (inside a coroutine).
function M.setup()
  return M.mysql:query([[CREATE TABLE IF NOT EXISTS scores (
    id BIGINT AUTO_INCREMENT PRIMARY KEY,
    uid VARCHAR(64) NOT NULL,
    points INT NOT NULL,
    played_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    KEY by_uid (uid)) ENGINE=InnoDB]])
end

return M
