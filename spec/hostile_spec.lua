-- The clients against peers that break their protocol in ways no real
-- server does (issue 21): fake Redis, MySQL and RPC servers on free ports,
-- each sending what a hostile or broken one would. Every failure is
-- `nil, err` with a kind, nothing is silently wrong, and a connection that
-- failed answers later calls with kind closed and the first error as cause.
local gen = require "squall.gen"
local mysql = require "squall.mysql"
local redis = require "squall.redis"
local rpc = require "squall.rpc"
local TCPServer = require "squall.tcpserver"
local testing = require "squall.testing"
local helpers = require "helpers"

local async, eventually = testing.async, helpers.eventually
local char = string.char

-- A server whose handle_stream is `fn`, on a free port.
local function fake(fn)
  local server = TCPServer({ handle_stream = fn })
  local sock, port = testing.bind_unused_port()
  server:add_sockets({ sock })
  return server, port
end

-- What a later call on a failed connection gets: closed, its cause the
-- first error (of kind first_kind), or none after close().
local function assert_closed_by(first_kind, v, err)
  assert.is_nil(v)
  assert.equal("closed", err.kind)
  assert.equal(first_kind, err.cause and err.cause.kind, tostring(err))
end

describe("a hostile Redis", function()
  -- Answers each command (one RESP array) with the next of `replies`.
  local function fake_redis(replies)
    return fake(function(stream)
      for _, reply in ipairs(replies) do
        local head = stream:read_until("\r\n")
        if not head then return end
        for _ = 1, tonumber(head:match("%*(%d+)")) do
          local len = stream:read_until("\r\n")
          stream:read_bytes(tonumber(len:match("%$(%d+)")) + 2)
        end
        stream:write(reply)
      end
      stream:read_until_close()
    end)
  end

  it("refuses an integer reply past int64 instead of wrapping it", async(function()
    local server, port = fake_redis({ ":9223372036854775807\r\n", ":99999999999999999999\r\n",
      "+never\r\n" })
    local r = assert(redis.connect({ port = port }))
    assert.equal("9223372036854775807LL", tostring(r:incr("n")))
    local v, err = r:incr("n")
    assert.is_nil(v)
    assert.equal("protocol", err.kind)
    assert.matches("bad integer reply 99999999999999999999", tostring(err))
    assert_closed_by("protocol", r:get("k"))
    assert_closed_by("protocol", r:pipeline(function(p) p:get("k") end))
    server:stop()
  end))

  it("breaks the connection on a reply nobody asked for", async(function()
    local message = "*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nx\r\n"
    for _, extra in ipairs({ "+EXTRA\r\n", message }) do
      local server, port = fake_redis({ "+OK\r\n" .. extra, "$5\r\nwrong\r\n" })
      local r = assert(redis.connect({ port = port }))
      assert.equal("OK", r:set("k", "v"))
      eventually(function() return r._reader.r:unread() > 0 end, "the extra bytes")
      local v, err = r:get("k")
      assert.is_nil(v)
      assert.equal("protocol", err.kind)
      assert.matches("nobody asked for", tostring(err))
      assert_closed_by("protocol", r:get("k"))
      server:stop()
    end
  end))

  it("says closed, not the first error, after close()", async(function()
    local server, port = fake_redis({ "+OK\r\n" })
    local r = assert(redis.connect({ port = port }))
    r:close()
    assert_closed_by(nil, r:get("k"))
    server:stop()
  end))
end)

-- ---- MySQL ------------------------------------------------------------------

local function le16(n) return char(n % 256, math.floor(n / 256) % 256) end
local function le24(n) return le16(n % 65536) .. char(math.floor(n / 65536) % 256) end
local function le32(n) return le16(n % 65536) .. le16(math.floor(n / 65536)) end
local function lenenc(s) return char(#s) .. s end

local function packet(seq, payload) return le24(#payload) .. char(seq % 256) .. payload end

-- Protocol 10 with 4.1 auth, no CLIENT_DEPRECATE_EOF (EOF packets end
-- columns and rows), mysql_native_password.
local GREETING = packet(0, "\10" .. "5.7.99-fake\0" .. le32(7) .. "abcdefgh" .. "\0" ..
  le16(0xA201) .. "\45" .. le16(2) .. le16(0x000A) .. "\21" .. ("\0"):rep(10) ..
  "ijklmnopqrst\0" .. "mysql_native_password\0")

local function ok_packet(seq, status)
  return packet(seq, "\0\0\0" .. le16(status or 2) .. "\0\0")
end
local function eof(seq) return packet(seq, "\254\0\0\2\0") end

-- A column definition: its name and type (3 INT, 8 BIGINT, 253 VARCHAR).
local function column(seq, name, ctype)
  return packet(seq, lenenc("def") .. lenenc("db") .. lenenc("t") .. lenenc("t") ..
    lenenc(name) .. lenenc(name) .. "\12" .. le16(45) .. le32(20) .. char(ctype) ..
    le16(0) .. "\0" .. "\0\0")
end

-- A text result: columns {name, type} and rows of text values.
local function result(cols, rows)
  local out, seq = { packet(1, char(#cols)) }, 2
  for _, c in ipairs(cols) do
    out[#out + 1] = column(seq, c[1], c[2])
    seq = seq + 1
  end
  out[#out + 1] = eof(seq)
  seq = seq + 1
  for _, row in ipairs(rows) do
    local vals = {}
    for i, v in ipairs(row) do vals[i] = lenenc(v) end
    out[#out + 1] = packet(seq, table.concat(vals))
    seq = seq + 1
  end
  out[#out + 1] = eof(seq)
  return table.concat(out)
end

local function read_packet(stream)
  local head = stream:read_bytes(4)
  if not head then return nil end
  local len = head:byte(1) + head:byte(2) * 256 + head:byte(3) * 65536
  return len > 0 and stream:read_bytes(len) or ""
end

-- A MySQL server that greets, accepts any login, then answers the n-th
-- command with answers[n] (a string, or a function(stream) that writes).
local function fake_mysql(answers)
  return fake(function(stream)
    stream:write(GREETING)
    if not read_packet(stream) then return end
    stream:write(ok_packet(2))
    for _, answer in ipairs(answers) do
      if not read_packet(stream) then return end
      if type(answer) == "function" then answer(stream) else stream:write(answer) end
    end
    stream:read_until_close()
  end)
end

local function connect(port, extra)
  local o = { port = port, user = "u", password = "p" }
  for k, v in pairs(extra or {}) do o[k] = v end
  return mysql.connect(o)
end

describe("a hostile MySQL server", function()
  it("refuses numbers that are not numbers, and rows longer than their columns",
    async(function()
    local cases = {
      { { { "n", 8 } }, { { "99999999999999999999" } }, "holds \"9999999999" },
      { { { "n", 8 } }, { { "-9223372036854775809" } }, "not a number" },
      { { { "n", 3 } }, { { "abc" } }, "holds \"abc\", not a number" },
      { { { "n", 3 } }, { { "0x10" } }, "not a number" },
      { { { "n", 3 } }, { { "1", "2" } }, "more values than its 1 columns" },
    }
    for _, case in ipairs(cases) do
      local server, port = fake_mysql({ result(case[1], case[2]) })
      local db = assert(connect(port))
      local rows, err = db:query("SELECT n")
      assert.is_nil(rows)
      assert.equal("protocol", err.kind)
      assert.matches(case[3], tostring(err), 1, true)
      assert_closed_by("protocol", db:query("SELECT 1"))
      server:stop()
    end
    -- and what is in range reads exactly
    local server, port = fake_mysql({ result({ { "a", 8 }, { "b", 8 } },
      { { "9223372036854775807", "-9223372036854775808" } }) })
    local db = assert(connect(port))
    local rows = assert(db:query("SELECT a, b"))
    assert.equal("9223372036854775807LL", tostring(rows[1].a))
    assert.equal("-9223372036854775808LL", tostring(rows[1].b))
    db:close()
    server:stop()
  end))

  it("breaks the connection on a second OK nobody asked for", async(function()
    local server, port = fake_mysql({ ok_packet(1) .. ok_packet(2), ok_packet(1) })
    local db = assert(connect(port))
    assert.equal(0, assert(db:query("DELETE FROM t")).affected_rows)
    eventually(function() return db._reader:unread() > 0 end, "the second OK")
    local res, err = db:query("DELETE FROM t")
    assert.is_nil(res)
    assert.equal("protocol", err.kind)
    assert.matches("nobody asked for", tostring(err))
    assert_closed_by("protocol", db:ping())
    server:stop()
  end))

  it("caps authentication round trips, and timeout bounds the whole connect",
    async(function()
    local switch = "\254mysql_native_password\0" .. ("s"):rep(20) .. "\0"
    local function switcher(pause)
      return fake(function(stream)
        stream:write(GREETING)
        local seq = 2
        while read_packet(stream) do
          if pause then gen.sleep(pause) end
          stream:write(packet(seq, switch))
          seq = seq + 2
        end
      end)
    end
    local server, port = switcher(nil)
    local db, err = connect(port, { timeout = 30 })
    assert.is_nil(db)
    assert.equal("protocol", err.kind)
    assert.matches("more than 8 authentication round trips", tostring(err))
    server:stop()
    -- one switch every 0.3 s: each read is in time, the whole is not
    server, port = switcher(0.3 * helpers.scale)
    db, err = connect(port, { timeout = 1 * helpers.scale })
    assert.is_nil(db)
    assert.equal("timeout", err.kind)
    assert.matches("connecting took longer than timeout", tostring(err))
    server:stop()
  end, { timeout = 30 }))

  it("counts what a result builds against max_buffer_size, not only its bytes",
    async(function()
    -- endless "more results": 11-byte OK packets, each a Lua table
    local sent = 0
    local server, port = fake_mysql({ function(stream)
      local seq = 1
      while not stream:closed() do
        local batch = {}
        for i = 1, 1000 do batch[i] = ok_packet(seq + i - 1, 0x000A) end
        seq = seq + 1000
        if not stream:write(table.concat(batch)) then return end
        sent = sent + 1000
        gen.sleep(0)
      end
    end })
    local limit = 1048576
    local db = assert(connect(port, { max_buffer_size = limit }))
    collectgarbage()
    local before = collectgarbage("count")
    local res, err = db:query("CALL endless()")
    local grown = (collectgarbage("count") - before) * 1024
    assert.is_nil(res)
    assert.equal("buffer_full", err.kind)
    assert.is_true(grown < 3 * limit, ("%d bytes built under a limit of %d"):format(grown, limit))
    assert.is_true(sent > 0)
    server:stop()
  end))
end)

-- ---- RPC --------------------------------------------------------------------

describe("a hostile RPC server", function()
  it("fails the pending call with protocol, every later one with closed", async(function()
    local server, port = fake(function(stream)
      stream:read_bytes(1)
      stream:write("\193") -- never valid MessagePack
      stream:read_until_close()
    end)
    local c = assert(rpc.connect("127.0.0.1", port))
    local v, err = c:call("sum", 1, 2)
    assert.is_nil(v)
    assert.equal("protocol", err.kind)
    assert_closed_by("protocol", c:call("sum", 1, 2))
    assert_closed_by("protocol", c:notify("tick"))
    server:stop()
  end))

  it("says closed after close(), with no cause", async(function()
    local server, port = fake(function(stream) stream:read_until_close() end)
    local c = assert(rpc.connect("127.0.0.1", port))
    c:close()
    assert_closed_by(nil, c:call("sum", 1, 2))
    server:stop()
  end))
end)
