--- Fuzz target for the MySQL client's packet parsers (handshake,
-- authentication, OK/ERR/EOF, column definitions, text and binary rows),
-- run by make check-fuzz through tests/fuzz/driver.lua. Each input is what
-- a server sends during tests/fuzz/mysql_session.lua, replayed through a
-- stream over the input's bytes. Nothing may raise; every call gives a
-- result table or nil and an error value with a kind.
local mysql = require "squall.mysql"
local core = require "squall.core"
local dir = (arg[0]:match("^(.*)/") or ".")
local driver = dofile(dir .. "/driver.lua")
local session = dofile(dir .. "/mysql_session.lua")

local function replay(input)
  -- Where each packet ends, as its header says: a real server answers
  -- only what it was asked, so a read never returns bytes past the packet
  -- being read (the client takes bytes nobody asked for as a broken peer).
  local ends, i = {}, 1
  while i + 3 <= #input do
    i = i + 4 + input:byte(i) + input:byte(i + 1) * 256 + input:byte(i + 2) * 65536
    ends[#ends + 1] = i - 1
  end
  local pos, k = 1, 1
  return {
    read_bytes = function(_, n, partial)
      -- partial reads come in chunks of random sizes, as from a socket
      if partial then
        while ends[k] and ends[k] < pos do k = k + 1 end
        n = math.min(n, math.random(1, 300), (ends[k] or #input) - pos + 1)
      end
      if n == 0 or pos + n - 1 > #input then
        pos = #input + 1
        return nil, core.error("closed", "end of input")
      end
      local s = input:sub(pos, pos + n - 1)
      pos = pos + n
      return s
    end,
    write = function() return true end,
    close = function() end,
    closed = function() return pos > #input end,
    get_read_buffer_size = function() return 0 end,
    start_tls = function() return nil, core.error("tls", "no TLS in the fuzz target") end,
  }
end

local KINDS = { mysql = true, protocol = true, closed = true, buffer_full = true, tls = true }

driver.run("mysql", function(input)
  local results = 0
  -- the one raise allowed: a prepared statement whose (corrupted)
  -- placeholder count differs from the arguments is the caller's mistake
  local ok, e = pcall(session, mysql, replay(input), function(v, err)
    if v ~= nil then
      assert(type(v) == "table" or v == true, "a result that is not a table")
      results = results + 1
    else
      assert(type(err) == "table" and KINDS[err.kind], "an error without a kind: " ..
        tostring(err))
    end
  end)
  if not ok and not tostring(e):find("placeholders, got", 1, true) then error(e, 0) end
  return results > 0
end)
