-- squall.mysql against a real MariaDB (Debian's mariadbd), started by
-- scripts/mariadb-scratch on a free port in a temporary folder for this
-- file and stopped after it.
local ffi = require "ffi"
local gen = require "squall.gen"
local mysql = require "squall.mysql"
local TCPServer = require "squall.tcpserver"
local testing = require "squall.testing"
local helpers = require "helpers"

local async, eventually, q = testing.async, helpers.eventually, helpers.q
local raised = helpers.raised

local C = helpers.certs

local start_mariadb, stop_mariadb = helpers.start_mariadb, helpers.stop_server

local function opts(srv, extra)
  local o = { port = srv.port, user = "squall", password = "secret", database = "squall_test",
    timeout = 10 * helpers.scale }
  for k, v in pairs(extra or {}) do o[k] = v end
  return o
end

local function connect(srv, extra)
  return helpers.serving(srv, function() return mysql.connect(opts(srv, extra)) end,
    "mariadbd", 60)
end

describe("squall.mysql", function()
  local srv
  -- the server is up before the first spec (a busy machine may take a
  -- while to start it)
  setup(async(function()
    assert(os.execute("scripts/gen-test-certs " .. q(C)) == 0)
    srv = start_mariadb()
    connect(srv):close()
  end, { timeout = 120 }))
  teardown(async(function() stop_mariadb(srv) end))

  it("maps every type, in the text and the binary protocol alike", async(function()
    local db = connect(srv)
    assert.matches("MariaDB", db.server_version)
    assert(db:query([[CREATE TEMPORARY TABLE types (
      ti TINYINT, tu TINYINT UNSIGNED, si SMALLINT, mi MEDIUMINT, i INT, iu INT UNSIGNED,
      bi BIGINT, bu BIGINT UNSIGNED, y YEAR, f FLOAT, d DOUBLE, de DECIMAL(30,10),
      dt DATE, dtt DATETIME, dt6 DATETIME(6), ts TIMESTAMP(3) NULL, tm TIME, tmn TIME(2),
      s VARCHAR(20), b MEDIUMBLOB, bits BIT(12), e ENUM('a','b'), j JSON, n INT)]]))
    local blob = "\0\1\2\r\n\255" .. ("z"):rep(70000)
    assert(db:query([[INSERT INTO types VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?,
      ?, ?, ?, ?, ?, ?, ?, ?, b'101000000001', ?, ?, ?)]],
      -128, 255, -32768, -8388608, -2147483648, 4294967295,
      ffi.new("int64_t", -9223372036854775807LL - 1), 18446744073709551615ULL, 2024, 1.25,
      0.1, "12345678901234567890.0123456789", "2024-02-29", "2024-02-29 23:59:58",
      "2024-02-29 23:59:58.000001", "2001-02-03 04:05:06.789", "-838:59:59", "12:34:56.78",
      "héllo", blob, "b", '{"k": [1, 2]}', nil))
    local text = assert(db:query("SELECT * FROM types"))
    local binary = assert(db:query("SELECT * FROM types WHERE ? = 1", 1))
    for _, rows in ipairs({ text, binary }) do
      local r = rows[1]
      assert.equal(-128, r.ti); assert.equal(255, r.tu); assert.equal(-32768, r.si)
      assert.equal(-8388608, r.mi); assert.equal(-2147483648, r.i)
      assert.equal(4294967295, r.iu)
      assert.equal("cdata", type(r.bi)); assert.is_true(r.bi == -9223372036854775807LL - 1)
      assert.equal("cdata", type(r.bu)); assert.is_true(r.bu == 18446744073709551615ULL)
      assert.equal(2024, r.y); assert.equal(1.25, r.f); assert.equal(0.1, r.d)
      assert.equal("12345678901234567890.0123456789", r.de)
      assert.equal("2024-02-29", r.dt); assert.equal("2024-02-29 23:59:58", r.dtt)
      assert.equal("2024-02-29 23:59:58.000001", r.dt6)
      assert.equal("2001-02-03 04:05:06.789", r.ts)
      assert.equal("-838:59:59", r.tm); assert.equal("12:34:56.78", r.tmn)
      assert.equal("héllo", r.s); assert.equal(blob, r.b)
      assert.equal("\10\1", r.bits); assert.equal("b", r.e)
      assert.equal('{"k": [1, 2]}', r.j); assert.equal(mysql.null, r.n)
    end
    assert.same({ "ti", "tu", "si", "mi", "i", "iu", "bi", "bu", "y", "f", "d", "de", "dt",
      "dtt", "dt6", "ts", "tm", "tmn", "s", "b", "bits", "e", "j", "n" }, binary.columns)
    db:close()
  end, { timeout = 60 }))

  it("binds arguments by position: NULL, booleans, exact integers, binary strings",
    async(function()
    local db = connect(srv)
    local r = assert(db:query("SELECT ? AS a, ? AS b, ? AS c, ? AS d, ? AS e, ? AS f, ? AS g",
      nil, true, false, 9007199254740993LL, 2 ^ 53, 0.5, "\0'; DROP TABLE x; --"))[1]
    assert.equal(mysql.null, r.a); assert.equal(1, r.b); assert.equal(0, r.c)
    assert.is_true(r.d == 9007199254740993LL); assert.equal(2 ^ 53, r.e)
    assert.equal(0.5, r.f); assert.equal("\0'; DROP TABLE x; --", r.g)
    -- a wrong count of arguments is a mistake at the caller's line
    assert.matches("query: the statement has 2 placeholders, got 1 arguments",
      raised(function() db:query("SELECT ? + ?", 1) end))
    assert.matches("argument 1 must be nil, mysql.null, a boolean, a number, an int64/uint64 " ..
      "cdata or a string, got table", raised(function() db:query("SELECT ?", {}) end))
    assert.equal(2, db:query("SELECT ? + 1 AS n", 1)[1].n) -- still usable
    db:close()
  end, { timeout = 60 }))

  it("prepares a statement once per connection and reuses it", async(function()
    local db = connect(srv)
    local function prepares()
      return tonumber(db:query("SHOW SESSION STATUS LIKE 'Com_stmt_prepare'")[1].Value)
    end
    local before = prepares()
    for k = 1, 50 do assert.equal(k, db:query("SELECT ? AS k", k)[1].k) end
    assert.equal(before + 1, prepares())
    db:close()
  end, { timeout = 60 }))

  it("keeps every column of the same name with compact_arrays", async(function()
    local db = connect(srv)
    local rows = assert(db:query("SELECT 1 AS id, 2 AS id"))
    assert.equal(2, rows[1].id) -- keyed by name: the last wins
    db:close()
    db = connect(srv, { compact_arrays = true })
    for _, res in ipairs({ assert(db:query("SELECT 1 AS id, NULL AS x, 2 AS id")),
      assert(db:query("SELECT ? AS id, NULL AS x, 2 AS id", 1)) }) do
      assert.same({ 1, mysql.null, 2 }, res[1])
      assert.same({ "id", "x", "id" }, res.columns)
    end
    db:close()
    local pool = mysql.pool(opts(srv, { compact_arrays = true, size = 1 }))
    assert.same({ { 1, 2 } }, { assert(pool:query("SELECT 1 AS a, 2 AS a"))[1] })
    pool:close()
    assert.matches("compact_arrays must be a boolean",
      raised(function() mysql.connect({ compact_arrays = 1 }) end))
  end))

  it("returns OK results, server errors with code and SQLSTATE, and stays usable",
    async(function()
    local db = connect(srv)
    assert(db:query("CREATE TEMPORARY TABLE t (id INT AUTO_INCREMENT PRIMARY KEY, " ..
      "name VARCHAR(10) UNIQUE)"))
    local res = assert(db:query("INSERT INTO t (name) VALUES (?), (?)", "a", "b"))
    assert.equal(2, res.affected_rows); assert.equal(1, res.insert_id)
    local v, err = db:query("INSERT INTO t (name) VALUES (?)", "a")
    assert.is_nil(v)
    assert.equal("mysql", err.kind); assert.equal(1062, err.code)
    assert.equal("23000", err.sqlstate); assert.matches("Duplicate entry", tostring(err))
    v, err = db:query("SELEKT 1")
    assert.is_nil(v); assert.equal(1064, err.code); assert.equal("42000", err.sqlstate)
    v, err = db:query("SELECT * FROM no_such_table WHERE id = ?", 1)
    assert.is_nil(v); assert.equal(1146, err.code)
    assert.equal(2, #db:query("SELECT * FROM t"))
    assert.is_true(db:ping())
    db:close()
  end, { timeout = 60 }))

  it("reads many rows, several results from a CALL, and packets over 16 MiB",
    async(function()
    local db = connect(srv)
    local rows = assert(db:query("SELECT seq FROM seq_1_to_20000"))
    assert.equal(20000, #rows); assert.equal(20000, rows[20000].seq)
    assert(db:query("CREATE OR REPLACE PROCEDURE two() BEGIN SELECT 1 AS a; " ..
      "SELECT 2 AS b; END"))
    local res = assert(db:query("CALL two()"))
    assert.equal(1, res[1].a)
    assert.equal(2, res.more[1][1].b)
    assert.equal(0, res.more[2].affected_rows)
    -- one value split over two packets, each way
    local big = ("0123456789abcdef"):rep(1100000) -- 17.6 MB
    local echoed = assert(db:query("SELECT ? AS v, LENGTH(?) AS n", big, big))[1]
    assert.equal(#big, echoed.n); assert.equal(big, echoed.v)
    assert.equal(1, db:query("SELECT 1 AS x")[1].x)
    db:close()
  end, { timeout = 60 }))

  it("commits, and rolls back when the function raises or returns nil, err",
    async(function()
    local db = connect(srv)
    assert(db:query("CREATE TEMPORARY TABLE acct (id INT PRIMARY KEY, n INT) ENGINE=InnoDB"))
    assert(db:query("INSERT INTO acct VALUES (1, 100)"))
    local ok = db:transaction(function(tx)
      assert(tx:query("UPDATE acct SET n = n - ? WHERE id = 1", 30))
      assert.is_true(tx:in_transaction())
      return "done"
    end)
    assert.equal("done", ok)
    assert.is_false(db:in_transaction())
    local v, err = db:transaction(function(tx)
      tx:query("UPDATE acct SET n = 0 WHERE id = 1")
      return nil, "changed my mind"
    end)
    assert.is_nil(v); assert.equal("changed my mind", err)
    v, err = db:transaction(function(tx)
      tx:query("UPDATE acct SET n = 0 WHERE id = 1")
      error({ code = "boom" })
    end)
    assert.is_nil(v); assert.equal("transaction", err.kind)
    assert.same({ code = "boom" }, err.cause) -- what was raised, as raised
    assert.matches("stack traceback", err.traceback)
    v, err = db:transaction(function() error("bang") end)
    assert.is_nil(v); assert.matches("bang", tostring(err))
    assert.equal(70, db:query("SELECT n FROM acct")[1].n)
    db:close()
  end, { timeout = 60 }))

  it("refuses a wrong password with code 1045", async(function()
    connect(srv):close()
    local db, err = mysql.connect(opts(srv, { password = "wrong" }))
    assert.is_nil(db)
    assert.equal("mysql", err.kind); assert.equal(1045, err.code)
    assert.matches("Access denied", tostring(err))
  end, { timeout = 60 }))

  it("connects over TLS (verified) and over the unix socket", async(function()
    local db = connect(srv, { ssl_options = { ca_certs = C .. "/ca.pem" },
      server_hostname = "localhost" })
    assert.matches("^TLSv1", db:query("SHOW SESSION STATUS LIKE 'Ssl_version'")[1].Value)
    db:close()
    -- a certificate the client does not trust
    local bad, err = mysql.connect(opts(srv, { ssl_options = { ca_certs = C .. "/other-ca.pem" },
      server_hostname = "localhost" }))
    assert.is_nil(bad); assert.equal("tls", err.kind)
    local o = opts(srv, { path = srv.dir .. "/sock" })
    o.port = nil
    local u = assert(mysql.connect(o))
    assert.matches("localhost", u:query("SELECT CURRENT_USER() AS u")[1].u)
    u:close()
  end, { timeout = 60 }))

  it("fails a query that outlives the timeout, and a result past max_buffer_size",
    async(function()
    local db = connect(srv, { timeout = 0.3 })
    local v, err = db:query("SELECT SLEEP(3)")
    assert.is_nil(v); assert.equal("timeout", err.kind)
    assert.is_true(db:closed())
    v, err = db:query("SELECT 1") -- a failed connection: closed, the timeout its cause
    assert.is_nil(v); assert.equal("closed", err.kind); assert.equal("timeout", err.cause.kind)
    db = connect(srv, { max_buffer_size = 100000 })
    v, err = db:query("SELECT REPEAT('x', 1000) AS s FROM seq_1_to_1000")
    assert.is_nil(v); assert.equal("buffer_full", err.kind)
    assert.matches("max_buffer_size", tostring(err))
    assert.is_true(db:closed())
  end, { timeout = 60 }))

  describe("pool", function()
    it("queues callers in order, times out when every connection stays busy",
      async(function()
      connect(srv):close()
      local pool = mysql.pool(opts(srv, { size = 2, queue_timeout = 0.5 * helpers.scale }))
      local order, done = {}, {}
      for k = 1, 6 do
        done[k] = gen.spawn(function()
          return pool:with(function(db)
            order[#order + 1] = k -- the order in which callers got a connection
            return assert(db:query("SELECT ? AS k, SLEEP(0.05) AS s", k))[1].k
          end)
        end)
      end
      for k = 1, 6 do assert.equal(k, done[k]:result()) end
      -- the first two connect at once (either may finish first); the
      -- others waited, and got theirs in the order they came
      assert.same({ 1, 2 }, { math.min(order[1], order[2]), math.max(order[1], order[2]) })
      assert.same({ 3, 4, 5, 6 }, { unpack(order, 3) })
      local open = pool:counts()
      assert.equal(2, open)
      -- both busy for longer than queue_timeout: the third caller gives up
      local hold = {}
      for k = 1, 2 do
        hold[k] = gen.spawn(function()
          return pool:query("SELECT SLEEP(?)", 2 * helpers.scale)
        end)
      end
      local v, err = pool:query("SELECT 1")
      assert.is_nil(v); assert.equal("timeout", err.kind)
      assert.matches("queue_timeout", tostring(err))
      for k = 1, 2 do assert(hold[k]:result()) end
      assert.equal(1, pool:query("SELECT 1 AS one")[1].one)
      pool:close()
    end, { timeout = 60 }))

    it("resets a connection's session before the next user", async(function()
      local pool = mysql.pool(opts(srv, { size = 1 }))
      assert(pool:with(function(db)
        assert(db:query("SET @mine = 42"))
        assert(db:query("CREATE TEMPORARY TABLE scratch (x INT)"))
        return true
      end))
      local r = pool:query("SELECT @mine AS m")
      assert.equal(mysql.null, r[1].m)
      local v, err = pool:query("SELECT * FROM scratch")
      assert.is_nil(v); assert.equal(1146, err.code)
      -- a transaction left open by a query is rolled back, not inherited
      assert(pool:query("START TRANSACTION"))
      assert.equal(0, pool:query("SELECT @@in_transaction AS t")[1].t)
      assert.equal(1, (pool:counts()))
      pool:close()
    end, { timeout = 60 }))

    it("gives a clear error while the server is down and recovers by itself",
      async(function()
      local dir = helpers.tmpdir()
      local own = start_mariadb(dir)
      connect(own):close()
      local pool = mysql.pool(opts(own, { size = 4 }))
      assert.equal(1, pool:query("SELECT 1 AS x")[1].x)
      -- the server goes away in the middle of a query
      local mid = gen.spawn(function() return pool:query("SELECT SLEEP(30)") end)
      eventually(function()
        local n = tonumber(pool:query("SELECT COUNT(*) AS n FROM information_schema.processlist " ..
          "WHERE info LIKE 'SELECT SLEEP(30)%'")[1].n)
        return n == 1
      end, "the query to start")
      own.signal("KILL")
      own.wait()
      local v, err = mid:result()
      assert.is_nil(v); assert.equal("closed", err.kind)
      v, err = pool:query("SELECT 1")
      assert.is_nil(v); assert.equal("refused", err.kind)
      -- back on the same port: the pool connects anew
      own = start_mariadb(dir, own.port)
      local r = eventually(function() return (pool:query("SELECT 2 AS x")) end,
        "the pool to reconnect", 60)
      assert.equal(2, r[1].x)
      pool:close()
      stop_mariadb(own)
    end, { timeout = 120 }))
  end)
end)

describe("squall.mysql without a server", function()
  it("computes both authentication scrambles as the servers do", function()
    -- expected values from Python's hashlib, an independent implementation
    local function hex(s)
      return (s:gsub(".", function(c) return ("%02x"):format(c:byte()) end))
    end
    local scramble = "abcdefghijklmnopqrst"
    assert.equal("8817c50fa779daef010ee7577825b0847df9842e",
      hex(mysql._native_scramble("secret", scramble)))
    assert.equal("", mysql._native_scramble("", scramble))
    assert.equal("c76e2898612a4cf042c77fa8c4702c4c64c0c2c557c53c4d75595aaa6abae809",
      hex(mysql._sha2_scramble("secret", scramble)))
  end)

  it("refuses to send the password in clear over plain TCP", async(function()
    -- a scripted peer (no Debian server asks for this by default): the
    -- greeting a real mariadbd sent (the fuzz corpus' first packet), then
    -- an authentication switch to mysql_clear_password
    local session = helpers.slurp("tests/fuzz/corpus/mysql/session")
    local greeting = session:sub(1, 4 + session:byte(1) + session:byte(2) * 256)
    local heard = gen.Future()
    local server = TCPServer({ handle_stream = function(stream)
      stream:write(greeting)
      local head = stream:read_bytes(4)
      local body = stream:read_bytes(head:byte(1) + head:byte(2) * 256)
      local switch = "\254mysql_clear_password\0"
      stream:write(string.char(#switch, 0, 0, 2) .. switch)
      heard:set_result(body, stream:read_until_close())
    end })
    local sock, port = testing.bind_unused_port()
    server:add_sockets({ sock })
    local db, err = mysql.connect({ port = port, user = "squall", password = "secret" })
    assert.is_nil(db)
    assert.equal("mysql", err.kind)
    assert.matches("in clear .* needs ssl_options or a unix socket", tostring(err))
    local _, after = heard:result()
    assert.is_nil(after:find("secret", 1, true)) -- the password never went out
    server:stop()
  end))

  it("raises at the caller's line for bad options", function()
    assert.matches("mysql.connect: unknown option prot",
      raised(function() mysql.connect({ prot = 3306 }) end))
    assert.matches('got string "3306"', raised(function() mysql.connect({ port = "3306" }) end))
    assert.matches("size must be a positive integer, got number 0",
      raised(function() mysql.pool({ size = 0 }) end))
    assert.matches('unknown charset "klingon"',
      raised(function() mysql.connect({ charset = "klingon" }) end))
    assert.matches("unknown option pasword",
      raised(function() mysql.pool({ pasword = "x" }) end))
  end)
end)
