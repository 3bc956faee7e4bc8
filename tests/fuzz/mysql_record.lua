--- Record the corpus seed for tests/fuzz/mysql_fuzz.lua: what a real
-- MariaDB sends during tests/fuzz/mysql_session.lua.
--     scripts/mariadb-scratch /tmp/m 33306 &
--     build/squall tests/fuzz/mysql_record.lua 33306 tests/fuzz/corpus/mysql/session
local ioloop = require "squall.ioloop"
local iostream = require "squall.iostream"
local mysql = require "squall.mysql"
local dir = (arg[0]:match("^(.*)/") or ".")
local session = dofile(dir .. "/mysql_session.lua")
local port, out = tonumber(arg[1]), arg[2]

ioloop.current():run_sync(function()
  local o = { port = port, user = "squall", password = "secret", database = "squall_test" }
  local setup = assert(mysql.connect(o))
  for _, sql in ipairs({
    "DROP TABLE IF EXISTS fuzz_types",
    [[CREATE TABLE fuzz_types (ti TINYINT, tu TINYINT UNSIGNED, si SMALLINT, i INT,
      bi BIGINT, bu BIGINT UNSIGNED, y YEAR, f FLOAT, d DOUBLE, de DECIMAL(20,4), dt DATE,
      dt6 DATETIME(6), ts TIMESTAMP NULL, tm TIME(3), s VARCHAR(20), b BLOB, bits BIT(9),
      j JSON, n INT)]],
    [[INSERT INTO fuzz_types VALUES (-1, 255, -300, 70000, -9223372036854775808,
      18446744073709551615, 1999, 1.5, 2.25, '-12.3400', '2020-01-02',
      '2020-01-02 03:04:05.000006', '2021-02-03 04:05:06', '-100:00:00.5', 'héllo',
      x'00ff0d0a', b'100000001', '[1]', NULL), (2, 0, 0, 0, 2, 3, 2000, 0, 0, 0,
      '1000-01-01', NULL, NULL, '00:00:00', '', '', b'0', '{}', 7)]],
    "CREATE TABLE IF NOT EXISTS fuzz_log (id INT AUTO_INCREMENT PRIMARY KEY, note BLOB)",
    "CREATE OR REPLACE PROCEDURE fuzz_two() BEGIN SELECT 1 AS a; SELECT 'b' AS b; END",
  }) do assert(setup:query(sql)) end
  setup:close()

  local stream = assert(iostream.connect("127.0.0.1", port))
  local got = {}
  local recorder = setmetatable({}, { __index = function(_, k)
    if k == "read_bytes" then
      return function(_, n)
        local data, err = stream:read_bytes(n)
        if data then got[#got + 1] = data end
        return data, err
      end
    end
    return function(_, ...) return stream[k](stream, ...) end
  end })
  session(mysql, recorder, function(v, err)
    assert(v ~= nil or err.kind == "mysql", tostring(err))
  end)
  local f = assert(io.open(out, "wb"))
  f:write(table.concat(got))
  f:close()
  print(("recorded %d bytes into %s"):format(#table.concat(got), out))
end)
