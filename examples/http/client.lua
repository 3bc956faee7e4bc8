--- The http example's client: the notes API through squall.httpclient and
-- the chat room through squall.websocket.
--
--     squall examples/http/client.lua [port]      (default 8080)
local httpclient = require "squall.httpclient"
local ioloop = require "squall.ioloop"
local json = require "squall.json"
local websocket = require "squall.websocket"

local base = "http://127.0.0.1:" .. (tonumber(arg and arg[1]) or 8080)

local function call(method, path, doc)
  local res = assert(httpclient.fetch(base .. path, { method = method,
    body = doc and json.encode(doc), headers = doc and { ["Content-Type"] = "application/json" } }))
  print(method, path, res.code, res.body)
  return res
end

ioloop.current():run_sync(function()
  local made = json.decode(call("POST", "/api/notes", { text = "buy milk" }).body)
  call("GET", "/api/notes")
  call("GET", "/api/notes/" .. made.id)
  call("DELETE", "/api/notes/" .. made.id)
  call("GET", "/api/notes/" .. made.id)

  -- the chat: join as "lua", say hello, read the room until our own line
  local ws = assert(websocket.connect(base:gsub("^http", "ws") .. "/chat?name=lua"))
  assert(ws:send("hello from Lua"))
  while true do
    local msg = assert(ws:receive())
    local m = json.decode(msg)
    print("chat", m.from .. ": " .. m.text)
    if m.from == "lua" then break end
  end
  ws:close()
end, 30)
