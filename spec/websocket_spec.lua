-- squall.websocket in both directions against the reference peers Debian
-- ships: Python's websockets and Node's ws, as clients of a Squall server
-- and as servers for the Squall client; raw sockets for each protocol
-- violation and the close code it earns.
local gen = require "squall.gen"
local httpserver = require "squall.httpserver"
local iostream = require "squall.iostream"
local testing = require "squall.testing"
local websocket = require "squall.websocket"
local helpers = require "helpers"

local async = testing.async
local q = helpers.q

-- An HTTPServer whose /ws echoes every message with its kind, answers
-- "close" by closing with 4000 "bye", and records how each peer closed.
local function echo_server(opts)
  local closes = {}
  local server, port = helpers.http_server(function(req)
    if req.path ~= "/ws" then return 404, nil, "no" end
    local ws = websocket.accept(req, opts)
    if not ws then return end
    while true do
      local msg, kind = ws:receive()
      if not msg then
        closes[#closes + 1] = { ws.close_code, ws.close_reason, kind.kind }
        return
      end
      if msg == "close" then
        ws:close(4000, "bye")
        closes[#closes + 1] = { ws.close_code, ws.close_reason, "initiated" }
        return
      end
      ws:send(kind .. ":" .. msg, kind)
    end
  end)
  return server, port, closes
end

local client, python = helpers.run_ok, helpers.run_python

local function node(code, ...)
  local path = os.tmpname() .. ".js"
  helpers.spit(path, code)
  local args = {}
  for i, a in ipairs({ ... }) do args[i] = q(tostring(a)) end
  local out = client(("env NODE_PATH=/usr/share/nodejs node %s %s"):format(q(path),
    table.concat(args, " ")))
  os.remove(path)
  return out
end

local peer_server = helpers.peer_server

-- Raw: a masked client frame.
local function frame(op, payload, fin, rsv)
  local b1 = (fin == false and 0 or 0x80) + (rsv or 0) + op
  local key = "\1\2\3\4"
  local masked = payload:gsub("()(.)", function(i, c)
    return string.char(bit.bxor(c:byte(), key:byte((i - 1) % 4 + 1)))
  end)
  local len = #payload
  local head
  if len < 126 then head = string.char(b1, 0x80 + len)
  else head = string.char(b1, 0x80 + 126, math.floor(len / 256), len % 256) end
  return head .. key .. masked
end

-- Open a raw handshake to port; returns the stream after the 101.
local function raw_ws(port)
  local s = assert(iostream.connect("127.0.0.1", port))
  s:set_timeout(10 * helpers.scale)
  s:write("GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" ..
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
  local head = assert(s:read_until("\r\n\r\n"))
  assert.matches("^HTTP/1%.1 101 ", head)
  assert.matches("Sec%-WebSocket%-Accept: s3pPLMBiTxaQ9kYGzzhZRbK%+xOo=\r\n", head)
  return s
end

-- Read the server's frames until it closes: the close frame's code.
local function close_code_from(s)
  local all = s:read_until_close() or ""
  local i = all:find("\136", 1, true) -- 0x88: a final close frame
  assert(i, "no close frame in " .. ("%q"):format(all))
  return all:byte(i + 2) * 256 + all:byte(i + 3)
end

describe("squall.websocket", function()
  describe("a Squall server", function()
    it("talks to Python's websockets client: text, binary, fragments, ping, close codes",
      async(function()
        local server, port, closes = echo_server()
        local out = python([[
import asyncio, sys, websockets
async def main():
    async with websockets.connect("ws://127.0.0.1:%s/ws" % sys.argv[1]) as ws:
        await ws.send("héllo")
        print(await ws.recv())
        await ws.send(b"\x00\xff")
        print(repr(await ws.recv()))
        await ws.send(["frag", "ment", "ed"])
        print(await ws.recv())
        pong = await ws.ping(b"p")
        await asyncio.wait_for(pong, 5)
        print("pong")
        await ws.send("x" * 70000)
        print(len(await ws.recv()))
        await ws.send("close")
        try:
            await ws.recv()
        except websockets.ConnectionClosed as e:
            print(e.rcvd.code, e.rcvd.reason)
    async with websockets.connect("ws://127.0.0.1:%s/ws" % sys.argv[1]) as ws:
        await ws.close(4001, "done")
asyncio.run(main())
]], port)
        assert.equal("text:héllo\nb'binary:\\x00\\xff'\ntext:fragmented\npong\n70005\n" ..
          "4000 bye\n", out)
        helpers.eventually(function() return #closes == 2 end, "both closes")
        assert.same({ 4000, "bye", "initiated" }, closes[1])
        assert.same({ 4001, "done", "closed" }, closes[2])
        server:stop()
      end, { timeout = 40 }))

    it("talks to Node's ws client", async(function()
      local server, port = echo_server()
      local out = node([[
const WebSocket = require("ws");
const ws = new WebSocket("ws://127.0.0.1:" + process.argv[2] + "/ws");
const got = [];
ws.on("open", () => {
  ws.send("from node");
  ws.send(Buffer.from([1, 2, 3]));
  ws.send("fr", { fin: false });
  ws.send("ag", { fin: true });
  ws.send("close");
});
ws.on("message", (data, isBinary) => got.push((isBinary ? "B " : "T ") + data.toString("hex")));
ws.on("close", (code, reason) => {
  console.log(got.join("\n"));
  console.log(code, reason.toString());
});
]], port)
      local hex = function(s)
        return (s:gsub(".", function(c) return ("%02x"):format(c:byte()) end))
      end
      assert.equal(table.concat({ "T " .. hex("text:from node"), "B " .. hex("binary:\1\2\3"),
        "T " .. hex("text:frag"), "4000 bye" }, "\n") .. "\n", out)
      server:stop()
    end, { timeout = 40 }))

    it("closes with 1002, 1007 and 1009 on violations, answering pings between fragments",
      async(function()
        local server, port = echo_server({ max_message_size = 1000 })
        -- a ping between two fragments is answered at once; the message follows
        local s = raw_ws(port)
        s:write(frame(1, "ab", false) .. frame(9, "hi") .. frame(0, "cd", true))
        local pong = assert(s:read_bytes(4))
        assert.equal("\138\2hi", pong)
        local msg = assert(s:read_bytes(2 + #"text:abcd"))
        assert.equal("\129\9text:abcd", msg)
        s:close()
        local cases = {
          { frame(1, "x", true, 0x40), 1002, "a reserved bit" },
          { "\129\1x", 1002, "an unmasked client frame" },
          { frame(0, "x"), 1002, "a continuation with no message" },
          { frame(1, "a", false) .. frame(1, "b"), 1002, "a new message inside a fragmented one" },
          { frame(9, ("p"):rep(126)), 1002, "a ping over 125 bytes" },
          { frame(3, "x"), 1002, "an unknown opcode" },
          { frame(8, "\3\237"), 1002, "close code 1005 on the wire" },
          { frame(8, "\1"), 1002, "a close frame of one byte" },
          { frame(1, "\192\128"), 1007, "overlong UTF-8" },
          { frame(1, "\237\160\128"), 1007, "a UTF-16 surrogate" },
          { frame(1, "ab", false) .. frame(0, "\255"), 1007, "invalid UTF-8 across fragments" },
          { frame(2, ("z"):rep(1001)), 1009, "a message over max_message_size" },
          { frame(2, ("z"):rep(600), false) .. frame(0, ("z"):rep(600)), 1009,
            "fragments over max_message_size" },
        }
        for _, c in ipairs(cases) do
          s = raw_ws(port)
          s:write(c[1])
          assert.equal(c[2], close_code_from(s), c[3])
          s:close()
        end
        server:stop()
      end, { timeout = 30 }))

    it("refuses a bad handshake: 426 for another version, 400 for a bad key", async(function()
      local server, port = echo_server()
      local function ask(extra)
        local s = assert(iostream.connect("127.0.0.1", port))
        s:write("GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" ..
          extra .. "\r\n")
        local all = s:read_until_close()
        s:close()
        return all
      end
      local all = ask("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n")
      assert.matches("^HTTP/1%.1 426 ", all)
      assert.matches("Sec%-WebSocket%-Version: 13\r\n", all)
      all = ask("Sec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n")
      assert.matches("^HTTP/1%.1 400 ", all)
      server:stop()
    end))

    it("chooses a subprotocol the client offers", async(function()
      local server, port = echo_server({ protocols = { "chat.v2", "chat.v1" } })
      local ws = assert(websocket.connect("ws://127.0.0.1:" .. port .. "/ws",
        { protocols = { "other", "chat.v1" } }))
      assert.equal("chat.v1", ws.protocol)
      ws:close()
      server:stop()
    end))
  end)

  describe("the Squall client", function()
    it("talks to Python's websockets server", async(function()
      local script = helpers.tmpscript([[
import asyncio, sys, websockets
async def echo(ws, path=None):
    async for msg in ws:
        if msg == "close":
            await ws.close(4002, "py bye")
            return
        await ws.send(msg)
async def main():
    async with websockets.serve(echo, "127.0.0.1", int(sys.argv[1]), max_size=2**24):
        await asyncio.Future()
asyncio.run(main())
]])
      local port, stop = peer_server(function(p)
        return ("%s %s %d"):format(helpers.python, q(script), p)
      end)
      local ws = assert(websocket.connect("ws://127.0.0.1:" .. port .. "/"))
      assert(ws:send("hello"))
      assert.same({ "hello", "text" }, { ws:receive() })
      local big = ("\0\1\2"):rep(400000)
      assert(ws:send(big, "binary"))
      local got, kind = ws:receive()
      assert.equal("binary", kind)
      assert.equal(big, got)
      assert(ws:ping("x"))
      assert(ws:send("close"))
      local msg, err = ws:receive()
      assert.is_nil(msg)
      assert.equal("closed", err.kind)
      assert.equal(4002, ws.close_code)
      assert.equal("py bye", ws.close_reason)
      stop()
      os.remove(script)
    end, { timeout = 40 }))

    it("talks to Node's ws server and closes with a code Node sees", async(function()
      local path = os.tmpname() .. ".js"
      local log = os.tmpname()
      helpers.spit(path, [[
const fs = require("fs");
const WebSocket = require("ws");
const wss = new WebSocket.Server({ host: "127.0.0.1", port: +process.argv[2] });
wss.on("connection", (ws) => {
  ws.on("message", (data, isBinary) => ws.send(data, { binary: isBinary }));
  ws.on("close", (code, reason) => fs.appendFileSync(process.argv[3], code + " " + reason + "\n"));
});
]])
      local port, stop = peer_server(function(p)
        return ("env NODE_PATH=/usr/share/nodejs node %s %d %s"):format(q(path), p, q(log))
      end)
      local ws = assert(websocket.connect("ws://127.0.0.1:" .. port .. "/"))
      for i = 1, 20 do assert(ws:send("m" .. i)) end
      for i = 1, 20 do assert.same({ "m" .. i, "text" }, { ws:receive() }) end
      ws:close(4003, "lua bye")
      assert.equal(4003, ws.close_code) -- Node echoes the code
      helpers.eventually(function() return helpers.slurp(log) == "4003 lua bye\n" end,
        "Node's close log")
      stop()
      os.remove(path)
      os.remove(log)
    end, { timeout = 40 }))

    it("talks to a Squall server; receive() ends with closed after close()", async(function()
      local server, port = echo_server()
      local ws = assert(websocket.connect("ws://127.0.0.1:" .. port .. "/ws"))
      local reader = gen.Future()
      gen.spawn(function()
        local seen = {}
        while true do
          local msg, err = ws:receive()
          if not msg then
            reader:set_result({ seen, err.kind })
            return
          end
          seen[#seen + 1] = msg
        end
      end)
      assert(ws:send("one"))
      assert(ws:send("two", "binary"))
      ws:close()
      local r = reader:result()
      assert.equal("closed", r[2])
      assert.equal(1000, ws.close_code)
      local msg, err = ws:receive()
      assert.is_nil(msg)
      assert.equal("closed", err.kind)
      server:stop()
    end))

    it("refuses a server that does not switch protocols", async(function()
      local sock, port = testing.bind_unused_port()
      local server = httpserver.HTTPServer(function() return 200, nil, "plain" end)
      server:add_sockets({ sock })
      local ws, err = websocket.connect("ws://127.0.0.1:" .. port .. "/")
      assert.is_nil(ws)
      assert.equal("http", err.kind)
      assert.matches("200", tostring(err))
      server:stop()
    end))
  end)
end)
