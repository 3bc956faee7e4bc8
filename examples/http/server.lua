--- A JSON API and a WebSocket chat room on one HTTPServer.
--
--     squall examples/http/server.lua [port]      (default 8080)
--
--     curl http://127.0.0.1:8080/api/notes
--     curl -d '{"text": "buy milk"}' http://127.0.0.1:8080/api/notes
--     curl http://127.0.0.1:8080/api/notes/1
--     curl -X DELETE http://127.0.0.1:8080/api/notes/1
--     open http://127.0.0.1:8080/ in a browser for the chat room, or
--     squall examples/http/client.lua 8080      (the API and the chat from Lua)
--
-- Notes live in memory. Each chat message goes to everyone in the room
-- as JSON: {"from": "...", "text": "..."}.
local httpserver = require "squall.httpserver"
local ioloop = require "squall.ioloop"
local json = require "squall.json"
local log = require "squall.log"
local websocket = require "squall.websocket"

local port = tonumber(arg and arg[1]) or 8080

local JSON = { ["Content-Type"] = "application/json" }

local function reply(status, value)
  return status, JSON, json.encode(value)
end

-- ---- the notes API ---------------------------------------------------------

local notes, next_id = {}, 1

local function note_list()
  local list = {}
  for id = 1, next_id - 1 do
    if notes[id] then list[#list + 1] = notes[id] end
  end
  return list -- an empty table encodes as []
end

local function api(req)
  local id = req.path:match("^/api/notes/(%d+)$")
  if req.path == "/api/notes" then
    if req.method == "GET" then return reply(200, note_list()) end
    if req.method == "POST" then
      local body, err = req:body()
      if not body then return reply(400, { error = tostring(err) }) end
      local ok, doc = pcall(json.decode, body)
      if not ok or type(doc) ~= "table" or type(doc.text) ~= "string" then
        return reply(400, { error = 'send a JSON object with a "text" string' })
      end
      local note = { id = next_id, text = doc.text }
      notes[next_id], next_id = note, next_id + 1
      return reply(201, note)
    end
    return reply(405, { error = "GET or POST" })
  elseif id then
    local note = notes[tonumber(id)]
    if not note then return reply(404, { error = "no note " .. id }) end
    if req.method == "GET" then return reply(200, note) end
    if req.method == "DELETE" then
      notes[note.id] = nil
      return 204
    end
    return reply(405, { error = "GET or DELETE" })
  end
  return reply(404, { error = "no such resource: " .. req.path })
end

-- ---- the chat room ---------------------------------------------------------

local room = {} -- ws -> name

local function broadcast(from, text)
  local msg = json.encode({ from = from, text = text })
  for ws in pairs(room) do ws:send(msg) end
end

local function chat(req)
  local ws = websocket.accept(req)
  if not ws then return end -- refused: the handshake was answered 400/426
  local name = req.args.name or ("guest" .. tostring(ws):match("%x+$"):sub(-4))
  room[ws] = name
  broadcast("server", name .. " joined")
  while true do
    local text = ws:receive()
    if not text then break end
    broadcast(name, text)
  end
  room[ws] = nil
  broadcast("server", name .. " left")
end

-- ---- the page --------------------------------------------------------------

local PAGE = [[<!doctype html>
<title>squall chat</title>
<ul id="log"></ul>
<form id="f"><input id="t" autofocus><button>send</button></form>
<script>
const ws = new WebSocket("ws://" + location.host + "/chat");
ws.onmessage = (e) => {
  const m = JSON.parse(e.data), li = document.createElement("li");
  li.textContent = m.from + ": " + m.text;
  document.getElementById("log").appendChild(li);
};
document.getElementById("f").onsubmit = (e) => {
  e.preventDefault();
  ws.send(document.getElementById("t").value);
  document.getElementById("t").value = "";
};
</script>
]]

local server = httpserver.HTTPServer(function(req)
  if req.path == "/" then return 200, { ["Content-Type"] = "text/html" }, PAGE end
  if req.path == "/chat" then return chat(req) end
  return api(req)
end)
server:listen(port, "127.0.0.1")
log.info("http example on http://127.0.0.1:%d/ (the API under /api/notes, chat at /chat)", port)

local loop = ioloop.current()
local function stop()
  -- finish requests in flight, then end
  require("squall.gen").spawn(function()
    server:close_gracefully(5)
    loop:stop()
  end)
end
loop:add_signal_handler("SIGINT", stop)
loop:add_signal_handler("SIGTERM", stop)
loop:start()
