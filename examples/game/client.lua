--- A player for examples/game/server.lua: logs in, moves, finishes two
-- rounds and prints the leaderboard.
--
--     ../../build/squall client.lua [port] [uid]
local ioloop = require "squall.ioloop"
local rpc = require "squall.rpc"

local port = tonumber(arg and arg[1]) or 5710
local uid = arg and arg[2] or "ada"

ioloop.current():run_sync(function()
  local conn = assert(rpc.connect("127.0.0.1", port))
  local state = assert(conn:call("player.login", uid))
  print(("%s at %d,%d, %d rounds played"):format(uid, state.x, state.y, state.rounds))
  local pos = assert(conn:call("player.move", 2, -1))
  print(("moved to %d,%d"):format(pos[1], pos[2]))
  for _, points in ipairs({ 120, 90 }) do
    local r = assert(conn:call("scores.finish", points))
    print(("scored %d: best %d, rank %d"):format(points, r.best, r.rank))
  end
  for i, row in ipairs(assert(conn:call("scores.top", 5))) do
    print(("%d. %s %d"):format(i, row[1], row[2]))
  end
  conn:close()
end, 15)
