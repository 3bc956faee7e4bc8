-- "player.*" methods. Each gets the connection first; conn.data is the
-- application's own table for it.
local M = {}

local positions = {} -- uid -> {x, y}, shared by every connection

--- player.login(uid) -> a greeting. Remembers the uid on the connection,
-- so others can reach this player by it.
function M.login(conn, uid)
  if type(uid) ~= "string" or uid == "" then return nil, "uid must be a non-empty string" end
  if conn.server:find("uid", uid) then return nil, "uid " .. uid .. " is already logged in" end
  conn.data.uid = uid
  positions[uid] = positions[uid] or { 0, 0 }
  return "welcome, " .. uid
end

--- player.move(dx, dy) -> the new position {x, y}.
function M.move(conn, dx, dy)
  local uid = conn.data.uid
  if not uid then return nil, "log in first" end
  local p = positions[uid]
  p[1], p[2] = p[1] + (dx or 0), p[2] + (dy or 0)
  return { p[1], p[2] }
end

--- player.online() -> the uids logged in, sorted.
function M.online(conn)
  local uids = {}
  for c in conn.server:connections() do
    if c.data.uid then uids[#uids + 1] = c.data.uid end
  end
  table.sort(uids)
  return uids
end

return M
