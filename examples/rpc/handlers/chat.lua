-- "chat.*" methods: the server calling a client, found by its uid.
local M = {}

--- chat.whisper(to_uid, text) -> what the addressed player answered.
function M.whisper(conn, to_uid, text)
  local from = conn.data.uid
  if not from then return nil, "log in first" end
  local target = conn.server:find("uid", to_uid)
  if not target then return nil, "no player " .. tostring(to_uid) end
  -- a call from the server to that player's client, waiting for its answer
  local answer, err = target:call("on_whisper", from, text)
  if err then return nil, "could not reach " .. to_uid .. ": " .. tostring(err) end
  return answer
end

--- chat.shout(text): a notification to every other player; no answer.
function M.shout(conn, text)
  for c in conn.server:connections() do
    if c ~= conn and c.data.uid then c:notify("on_shout", conn.data.uid, text) end
  end
  return true
end

return M
