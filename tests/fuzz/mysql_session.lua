--- The session the MySQL fuzz target replays, and that
-- tests/fuzz/mysql_record.lua recorded from a real mariadbd into the
-- corpus: a handshake, then text and binary results of every type, a
-- server error, an OK, a CALL's several results, a ping and a reset.
return function(mysql, stream, check)
  local db, err = mysql._over_stream(stream, { user = "squall", password = "secret",
    database = "squall_test" })
  check(db, err)
  if not db then return end
  local steps = {
    { "SELECT * FROM fuzz_types" },
    { "SELECT * FROM fuzz_types WHERE ? = ? OR ? IS NULL", 1, 1.5, "x" },
    { "SELECT seq, seq * 2 AS d FROM seq_1_to_50" },
    { "SELEKT 1" },
    { "SELECT * FROM fuzz_types WHERE ? = 2", 2 },
    { "INSERT INTO fuzz_log (note) VALUES (?)", "\0binary'" },
    { "CALL fuzz_two()" },
  }
  for _, step in ipairs(steps) do
    check(db:query(unpack(step)))
    if db:closed() then return end
  end
  check(db:ping())
  check(db:reset())
  check(db:query("SELECT ? AS one", nil))
end
