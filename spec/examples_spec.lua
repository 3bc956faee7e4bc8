local iostream = require "squall.iostream"
local testing = require "squall.testing"
local helpers = require "helpers"

local async, q = testing.async, helpers.q

-- Start an example on a free port (in `dir`, when given; `more`: its
-- arguments after the port); returns its port and stop().
local function start(example, dir, more)
  return helpers.peer_server(function(port)
    return ("%s %s %d %s"):format(q(helpers.squall_real), example, port, more or "")
  end, { dir = dir, name = example, lifetime = 30, within = 5 })
end

describe("examples", function()
  it("echo.lua echoes lines and stops cleanly on SIGTERM", async(function()
    local port, stop = start("examples/echo.lua")
    local c = assert(iostream.connect("127.0.0.1", port))
    c:write("one\ntwo\n")
    assert.equal("one\n", c:read_until("\n"))
    assert.equal("two\n", c:read_until("\n"))
    local status, _, err = stop()
    assert.equal(0, status, err)
  end, { timeout = 15 }))

  it("http_hello.lua answers keep-alive, pipelined, HTTP/1.0 and bad requests",
    async(function()
      local port, stop = start("examples/http_hello.lua")
      local c = assert(iostream.connect("127.0.0.1", port))
      local function response()
        local head = assert(c:read_until("\r\n\r\n"))
        local body = assert(c:read_bytes(tonumber(head:match("Content%-Length: (%d+)"))))
        return head, body
      end
      -- 16 pipelined requests, one with a body, all on one connection
      local reqs = {}
      for i = 1, 16 do
        reqs[i] = i == 5 and "POST /form HTTP/1.1\r\nHost: x\r\ncontent-length: 3\r\n\r\na=1"
          or "GET /" .. i .. " HTTP/1.1\r\nHost: x\r\n\r\n"
      end
      c:write(table.concat(reqs))
      for _ = 1, 16 do
        local head, body = response()
        assert.matches("^HTTP/1.1 200 OK\r\n", head)
        assert.is_nil(head:find("Connection: close", 1, true))
        assert.equal("Hello, world!\n", body)
      end
      c:write("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
      local head = response()
      assert.matches("Connection: close", head)
      assert.equal("", c:read_until_close())
      -- HTTP/1.0 without keep-alive closes
      local old = assert(iostream.connect("127.0.0.1", port))
      old:write("GET / HTTP/1.0\r\n\r\n")
      assert.matches("Connection: close", old:read_until_close())
      -- garbage gets a 400 and the server goes on
      local bad = assert(iostream.connect("127.0.0.1", port))
      bad:write("NOT HTTP AT ALL\r\n\r\n")
      assert.matches("^HTTP/1.1 400 Bad Request", bad:read_until_close())
      local status, _, err = stop()
      assert.equal(0, status, err)
    end, { timeout = 15 }))

  it("http/: the notes API answers curl; the chat room joins Python and Squall clients",
    async(function()
      local port, stop = start("examples/http/server.lua")
      local base = "http://127.0.0.1:" .. port
      local function curl(args)
        local status, out, err = helpers.spawn("timeout 20 curl -s " .. args)()
        assert.equal(0, status, err)
        return out
      end
      local json = require "squall.json"
      assert.same({ id = 1, text = "milk" },
        json.decode(curl("-d '{\"text\": \"milk\"}' " .. q(base .. "/api/notes"))))
      assert.same({ { id = 1, text = "milk" } }, json.decode(curl(q(base .. "/api/notes"))))
      assert.matches('"error"', curl("-d 'not json' " .. q(base .. "/api/notes")))
      assert.equal("204", curl("-o /dev/null -w '%{http_code}' -X DELETE " ..
        q(base .. "/api/notes/1")))
      assert.equal('{"error":"no note 1"}', curl(q(base .. "/api/notes/1")))
      -- a Python websockets client in the room sees what the Squall client says
      local script = helpers.tmpscript([[
import asyncio, json, sys, websockets
async def main():
    async with websockets.connect("ws://127.0.0.1:%s/chat?name=py" % sys.argv[1]) as ws:
        print("joined", flush=True)
        while True:
            m = json.loads(await ws.recv())
            if m["from"] == "lua":
                print(m["text"])
                return
asyncio.run(main())
]])
      local out_file = os.tmpname()
      local py_wait = helpers.spawn(("timeout 20 %s %s %d | tee %s"):format(helpers.python,
        q(script), port, q(out_file)))
      helpers.eventually(function() return helpers.slurp(out_file):find("joined") end,
        "the Python client to join", 20)
      local status, out, err = helpers.spawn(("timeout 20 %s examples/http/client.lua %d")
        :format(q(helpers.squall_real), port))()
      assert.equal(0, status, err)
      assert.matches("chat\tlua: hello from Lua", out)
      local py_status, py_out = py_wait()
      assert.equal(0, py_status)
      assert.equal("joined\nhello from Lua\n", py_out)
      os.remove(script)
      os.remove(out_file)
      local stop_status, _, log = stop()
      assert.equal(0, stop_status, log)
    end, { timeout = 40 }))

  it("rpc/: the game server answers the Squall player", async(function()
    local port, stop = start("server.lua", "examples/rpc")
    local wait = helpers.spawn(("cd examples/rpc && timeout 20 %s client.lua %d")
      :format(q(helpers.squall_real), port))
    local status, out, err = wait()
    assert.equal(0, status, err)
    assert.equal("welcome, lua-player\nat 3,4\nlua-player heard lua-player: hello me\n" ..
      "online: lua-player\nremote: the peer answered an error: no such method: no.such\n", out)
    local stop_status, _, log = stop()
    assert.equal(0, stop_status, log)
    assert.matches("methods: chat.shout, chat.whisper, ping, player.login", log)
  end, { timeout = 30 }))

  it("metrics.lua exports its own and the built-in metrics, valid for promtool",
    async(function()
    local mport = helpers.free_port()
    local port, stop = start("examples/metrics.lua", nil, tostring(mport))
    local c = assert(iostream.connect("127.0.0.1", port))
    c:write("one\n" .. ("x"):rep(99) .. "\n")
    assert.equal("one\n", c:read_until("\n"))
    assert.equal(100, #c:read_until("\n"))
    local status, text = helpers.http_get(mport, "/metrics")
    assert.equal(200, status)
    assert.matches("\necho_lines_total 2\n", text)
    assert.matches('\necho_line_bytes_bucket{le="16"} 1\n', text)
    assert.matches('\necho_line_bytes_bucket{le="256"} 2\n', text)
    -- the echo client, and the scrape itself (/metrics is an HTTPServer)
    assert.matches("\nsquall_connections_open 2\n", text)
    local path = os.tmpname()
    helpers.spit(path, text)
    local rc, out, err = helpers.run("promtool check metrics < " .. q(path))
    os.remove(path)
    assert.equal(0, rc, out .. err)
    c:close()
    local stop_status, _, log = stop()
    assert.equal(0, stop_status, log)
  end, { timeout = 20 }))

  it("celery/: Lua calls Python's tasks and Python calls the Lua ones", async(function()
    local srv = helpers.start_redis()
    local redis = require "squall.redis"
    helpers.eventually(function() return (redis.connect({ port = srv.port })) end, "redis", 30)
    local broker = "redis://127.0.0.1:" .. srv.port .. "/0"
    local wait, signal = helpers.start(("cd examples/celery && BROKER=%s exec ./run")
      :format(q(broker)), 120)
    -- both workers are up once the Python one answers a ping
    helpers.eventually(function()
      local r = redis.connect({ port = srv.port })
      local n = r and r:scard("_kombu.binding.celery.pidbox")
      if r then r:close() end
      return n == 2
    end, "both workers", 60)
    local status, out, err = helpers.spawn(("cd examples/celery && BROKER=%s timeout 60 %s " ..
      "producer.lua"):format(q(broker), q(helpers.squall_real)))()
    assert.equal(0, status, err)
    for _, line in ipairs({ "pytasks.add ->\t5\n",
      "pytasks.slow_square (countdown 1 s) state:\tPENDING\npytasks.slow_square ->\t49\n",
      "revoked task ->\trevoked\tREVOKED\n", "text.words (on the Squall worker) ->\t5\n" }) do
      assert.is_truthy(out:find(line, 1, true), line)
    end
    status, out, err = helpers.spawn(("cd examples/celery && BROKER=%s timeout 60 %s " ..
      "pytasks.py"):format(q(broker), helpers.python))()
    assert.equal(0, status, err)
    assert.equal("text.words -> 3\ntext.shout -> HELLO FROM PYTHON!\n" ..
      "text.shout(\"\") raised LuaError: nothing to shout\n", out)
    signal("TERM")
    local _, _, log = wait()
    assert.matches("worker stopped", log)
    helpers.stop_server(srv)
  end, { timeout = 120 }))

  it("game/: keeps players in Redis and scores in MariaDB", async(function()
    assert(os.execute("scripts/gen-test-certs " .. q(helpers.certs)) == 0)
    local rd, my = helpers.start_redis(), helpers.start_mariadb()
    local mysql = require "squall.mysql"
    helpers.eventually(function()
      local db = mysql.connect({ port = my.port, user = "squall", password = "secret" })
      if db then db:close() end
      return db
    end, "mariadbd to accept", 60)
    local port = helpers.free_port()
    local env = ("REDIS_PORT=%d MYSQL_PORT=%d"):format(rd.port, my.port)
    local wait, signal = helpers.start(("cd examples/game && %s exec %s server.lua %d")
      :format(env, q(helpers.squall_real), port), 60)
    helpers.eventually(function()
      local c = iostream.connect("127.0.0.1", port)
      if c then c:close() end
      return c
    end, "the game server to listen", 20)
    local function play(uid)
      local status, out, err = helpers.spawn(("cd examples/game && timeout 20 %s client.lua %d %s")
        :format(q(helpers.squall_real), port, uid))()
      assert.equal(0, status, err)
      return out
    end
    assert.equal("ada at 0,0, 0 rounds played\nmoved to 2,-1\nscored 120: best 120, rank 1\n" ..
      "scored 90: best 120, rank 1\n1. ada 120\n", play("ada"))
    local again = play("ada")
    assert.matches("^ada at 2,%-1, 2 rounds played\nmoved to 4,%-2\n", again)
    -- the leaderboard holds both (a tie goes by uid)
    assert.matches("\n1%. ada 120\n2%. bob 120\n$", play("bob"))
    signal("TERM")
    local status, _, log = wait()
    assert.equal(0, status, log)
    assert.matches("methods: player.login, player.move, scores.finish, scores.top", log)
    helpers.stop_server(rd)
    helpers.stop_server(my)
  end, { timeout = 90 }))
end)
