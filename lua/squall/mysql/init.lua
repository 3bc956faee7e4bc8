--- A MySQL and MariaDB client on squall.iostream: the client/server
-- protocol (protocol 41), mysql_native_password and caching_sha2_password,
-- TLS, the text protocol, server-side prepared statements with the binary
-- protocol (cached per connection), transactions and a pool that resets
-- a connection before its next user. Every call waits inside a coroutine,
-- as lua-resty-mysql does on OpenResty's cosockets.
--
--     local db = assert(mysql.connect({ host = "127.0.0.1", user = "u",
--       password = "p", database = "game" }))
--     local rows = db:query("SELECT id, name FROM t WHERE id > ?", 10)
--     rows[1].name, rows.columns          --> "x", { "id", "name" }
--
-- With arguments a query is a prepared statement: values are never spliced
-- into SQL text. See docs/api.md (squall.mysql) for the type mapping.
--
-- The files: wire.lua (constants, fields, packets, packet_kind), auth.lua
-- (the handshake and authentication), results.lua (columns, values, rows),
-- this one (connect, queries, statements, transactions, the pool).
--
-- Errors come one way to the user: misuse (a bad option, a wrong number of
-- arguments) raises at the caller's line; everything from the server or
-- the socket is nil, err. Inside, a reader returns nil, err too, except a
-- field parser given a malformed packet (a length past its end), which
-- raises: the three places that parse a server's answer (the handshake, a
-- prepare, a command's results) run it under `guarded`, which turns the
-- raise into a `protocol` error and breaks the connection, since where
-- the next packet starts is no longer known.
-- @module squall.mysql
local bit = require "bit"
local core = require "squall.core"
local ffi = require "ffi"
local gen = require "squall.gen"
local iostream = require "squall.iostream"
local pool = require "squall.pool"
local reader = require "squall.reader"
local util = require "squall.util"

local type, tostring, error, select, pairs, ipairs = type, tostring, error, select, pairs, ipairs
local setmetatable, xpcall, pcall, unpack = setmetatable, xpcall, pcall, unpack
local char, format, concat, band = string.char, string.format, table.concat, bit.band
local bor, rshift, traceback = bit.bor, bit.rshift, debug.traceback
local null = core.msgpack_null
local now = core.time
local W = require "squall.mysql.wire"
local packet_kind = W.packet_kind
local protocol_error, u16, u32, le32 = W.protocol_error, W.u16, W.u32, W.le32
local le64_int, le64_uint, le64_double = W.le64_int, W.le64_uint, W.le64_double
local lenenc_int, read_packet, send, command = W.lenenc_int, W.read_packet, W.send, W.command
local parse_err, SERVER_STATUS_IN_TRANS = W.parse_err, W.SERVER_STATUS_IN_TRANS
local COM_QUIT, COM_QUERY, COM_PING = W.COM_QUIT, W.COM_QUERY, W.COM_PING
local COM_STMT_PREPARE, COM_STMT_EXECUTE = W.COM_STMT_PREPARE, W.COM_STMT_EXECUTE
local COM_STMT_CLOSE, COM_RESET_CONNECTION = W.COM_STMT_CLOSE, W.COM_RESET_CONNECTION
local MAX_STATEMENTS, CHARSETS, int64_t = W.MAX_STATEMENTS, W.CHARSETS, W.int64_t
local uint64_t, broken = W.uint64_t, W.broken
local R = require "squall.mysql.results"
local read_columns, guarded, read_results = R.read_columns, R.guarded, R.read_results
local A = require "squall.mysql.auth"
local handshake = A.handshake

local M = {}

--- What SQL NULL is: the same NULL light userdata as msgpack.null,
-- redis.null and cjson.null.
M.null = core.msgpack_null
M._native_scramble, M._sha2_scramble = A.native_scramble, A.sha2_scramble

--- A connection (from mysql.connect or a pool).
-- @type MySQLConnection
local MySQLConnection = util.class()


-- ---- connecting -------------------------------------------------------------

local CONNECT_KEYS = { host = true, port = true, path = true, user = true, password = true,
  database = true, charset = true, timeout = true, ssl_options = true,
  server_hostname = true, max_buffer_size = true, compact_arrays = true }

local function check_opts(opts, who, level)
  if type(opts) ~= "table" then error(who .. ": opts must be a table", level + 1) end
  for k in pairs(opts) do
    if not CONNECT_KEYS[k] then
      error(format("%s: unknown option %s", who, tostring(k)), level + 1)
    end
  end
  for _, k in ipairs({ "host", "path", "user", "password", "database", "charset",
    "server_hostname" }) do
    if opts[k] ~= nil and type(opts[k]) ~= "string" then
      error(format("%s: %s must be a string, got %s", who, k, util.describe(opts[k])),
        level + 1)
    end
  end
  if opts.charset and not CHARSETS[opts.charset] then
    error(format("%s: unknown charset %q (utf8mb4, utf8, latin1, ascii, binary)", who,
      opts.charset), level + 1)
  end
  if opts.port ~= nil then util.check_port(opts.port, level + 1) end
  if opts.compact_arrays ~= nil and type(opts.compact_arrays) ~= "boolean" then
    error(format("%s: compact_arrays must be a boolean, got %s", who,
      util.describe(opts.compact_arrays)), level + 1)
  end
  if opts.timeout ~= nil and (type(opts.timeout) ~= "number" or opts.timeout <= 0) then
    error(format("%s: timeout must be a positive number, got %s", who,
      util.describe(opts.timeout)), level + 1)
  end
end


function M.connect(opts)
  opts = opts or {}
  check_opts(opts, "mysql.connect", 2)
  util.need_coroutine("mysql.connect", 2)
  local max_buffer = opts.max_buffer_size or 104857600
  local deadline = opts.timeout and now() + opts.timeout
  local stream, err
  local sopts = { max_buffer_size = max_buffer + 65536, timeout = opts.timeout }
  if opts.path then
    stream, err = iostream.connect_unix(opts.path, sopts)
  else
    stream, err = iostream.connect(opts.host or "127.0.0.1", opts.port or 3306, sopts)
  end
  if not stream then return nil, err end
  stream:set_nodelay(true)
  if opts.timeout then stream:set_timeout(opts.timeout) end
  return M._over_stream(stream, opts, deadline)
end

-- The protocol over a connected stream (or anything with its read_bytes,
-- write, start_tls and close: the fuzz target replays recorded bytes).
-- With a deadline (core.time()), the handshake must be done by then.
function M._over_stream(stream, opts, deadline)
  -- packets are cut out of one buffered read: a point select's four
  -- packets cost one read, not eight
  local self = setmetatable({ stream = stream, _reader = reader.new(stream), _seq = 0, _used = 0,
    _max_buffer = opts.max_buffer_size or 104857600, _stmts = {}, _nstmts = 0, _status = 0,
    _compact = opts.compact_arrays == true }, MySQLConnection)
  local finished, ok, err = false, nil, nil
  local function run()
    ok, err = guarded(self, pcall(handshake, self, opts))
    finished = true
  end
  if deadline then
    gen.with_timeout(math.max(0, deadline - now()), run)
  else
    run()
  end
  if not finished then
    err = core.error("timeout", format("mysql: connecting took longer than timeout (%g s)",
      opts.timeout))
  end
  if not ok then
    broken(self, err)
    return nil, err
  end
  return self
end

-- ---- queries ---------------------------------------------------------------

-- Bind one argument: its type (2 bytes) and value; nil for NULL.
local function bind(v, k)
  local t = type(v)
  if t == "string" then
    return "\253\0", lenenc_int(#v) .. v
  elseif t == "number" then
    if v % 1 == 0 and v >= -9223372036854775808 and v < 9223372036854775808 then
      return "\8\0", le64_int(v)
    end
    return "\5\0", le64_double(v)
  elseif t == "boolean" then
    return "\1\0", v and "\1" or "\0"
  elseif t == "cdata" then
    if ffi.istype(uint64_t, v) then return "\8\128", le64_uint(v) end
    if ffi.istype(int64_t, v) then return "\8\0", le64_int(v) end
  elseif v == nil or v == null then
    return "\6\0", nil
  end
  error(format("query: argument %d must be nil, mysql.null, a boolean, a number, " ..
    "an int64/uint64 cdata or a string, got %s", k, util.describe(v)), 4)
end

local function close_statement(self, sql)
  local st = self._stmts[sql]
  if not st then return end
  self._stmts[sql] = nil
  self._nstmts = self._nstmts - 1
  -- COM_STMT_CLOSE has no answer
  self._seq = 0
  send(self, COM_STMT_CLOSE .. le32(st.id))
end

-- COM_STMT_PREPARE's answer: the statement, its parameter and column
-- definitions (with EOFs unless deprecated).
local function read_prepared(self, sql)
  local p, err = read_packet(self)
  if not p then return nil, err end
  if packet_kind(p) == "ERR" then return nil, parse_err(p) end
  if packet_kind(p) ~= "OK" then
    return broken(self, protocol_error("a bad COM_STMT_PREPARE answer"))
  end
  local st = { id = u32(p, 2), ncols = u16(p, 6), nparams = u16(p, 8), sql = sql }
  if st.nparams > 0 then
    local cols
    cols, err = read_columns(self, st.nparams)
    if not cols then return nil, err end
  end
  if st.ncols > 0 then
    local cols
    cols, err = read_columns(self, st.ncols)
    if not cols then return nil, err end
    st.columns = cols
  end
  return st
end

local function prepare(self, sql)
  local st = self._stmts[sql]
  if st then return st end
  local ok, err = command(self, COM_STMT_PREPARE .. sql)
  if not ok then return nil, err end
  st, err = guarded(self, pcall(read_prepared, self, sql))
  if not st then return nil, err end
  if self._nstmts >= MAX_STATEMENTS then
    close_statement(self, (next(self._stmts)))
  end
  self._stmts[sql] = st
  self._nstmts = self._nstmts + 1
  return st
end

local function execute(self, st, n, ...)
  if n ~= st.nparams then
    error(format("query: the statement has %d placeholders, got %d arguments", st.nparams, n), 3)
  end
  local parts = { COM_STMT_EXECUTE, le32(st.id), "\0\1\0\0\0" } -- no cursor, 1 iteration
  if n > 0 then
    local bitmap, types, values = {}, {}, {}
    for k = 1, rshift(n + 7, 3) do bitmap[k] = 0 end
    for k = 1, n do
      local tcode, value = bind(select(k, ...), k)
      types[k] = tcode
      if value == nil then
        local b = rshift(k - 1, 3) + 1
        bitmap[b] = bor(bitmap[b], bit.lshift(1, band(k - 1, 7)))
      else
        values[#values + 1] = value
      end
    end
    for k = 1, #bitmap do bitmap[k] = char(bitmap[k]) end
    parts[4] = concat(bitmap)
    parts[5] = "\1" -- new parameters bound: types follow
    parts[6] = concat(types)
    parts[7] = concat(values)
  end
  local ok, err = command(self, concat(parts))
  if not ok then return nil, err end
  local res, cols = read_results(self, true, st.columns)
  if res and cols then st.columns = cols end
  return res, cols
end

--- Run a statement. Without arguments it goes as text (COM_QUERY); with
-- arguments (any, nil included) as a prepared statement, prepared once
-- per connection and cached.
-- @treturn table rows (`rows[i].name`, `rows.columns` the names in order)
--   for a result set; for others `affected_rows`, `insert_id`,
--   `warnings`. Results after the first (a CALL's) are in `.more`.
-- @return nil, err: kind `mysql` (`err.code`, `err.sqlstate`; the
--   connection stays usable), or I/O kinds (`closed`, `timeout`,
--   `buffer_full`, `protocol`: the connection is closed then)
function MySQLConnection:query(sql, ...)
  if type(sql) ~= "string" then
    error("query: sql must be a string, got " .. util.describe(sql), 2)
  end
  local n = select("#", ...)
  if n == 0 then
    local ok, err = command(self, COM_QUERY .. sql)
    if not ok then return nil, err end
    local res
    res, err = read_results(self, false)
    if res == nil then return nil, err end
    return res
  end
  local st, err = prepare(self, sql)
  if not st then return nil, err end
  local res
  res, err = execute(self, st, n, ...)
  if res == nil then return nil, err end
  return res
end

--- Run fn(db) inside START TRANSACTION: COMMIT when it returns a true
-- value (its results are returned), ROLLBACK when it returns nil/false
-- (its `nil, err` is returned) or raises (then `nil, err` of kind
-- `transaction` with the error and its traceback).
function MySQLConnection:transaction(fn)
  util.check_callable(fn, 2)
  local ok, err = self:query("START TRANSACTION")
  if not ok then return nil, err end
  local raised
  local res = util.pack(xpcall(fn, function(e)
    raised = e
    local described, text = pcall(tostring, e) -- (a table's __tostring may raise)
    return traceback(described and text or type(e), 2)
  end, self))
  if res[1] and res[2] then
    ok, err = self:query("COMMIT")
    if not ok then return nil, err end
    return unpack(res, 2, res.n)
  end
  if not util.failure(self) then self:query("ROLLBACK") end
  if not res[1] then
    local e = core.error("transaction", "the transaction's function raised: " .. tostring(res[2]))
    e.cause, e.traceback = raised, res[2]
    return nil, e
  end
  return res[2], res[3]
end

--- True while a transaction is open (the server's last status said so).
function MySQLConnection:in_transaction()
  return band(self._status, SERVER_STATUS_IN_TRANS) ~= 0
end

-- A command answered by OK: true, or nil, err.
local function simple(self, com)
  local ok, err = command(self, com)
  if not ok then return nil, err end
  local res
  res, err = read_results(self, false)
  if not res then return nil, err end
  return true
end

--- COM_PING: true, or nil, err.
function MySQLConnection:ping()
  return simple(self, COM_PING)
end

--- Reset the session (COM_RESET_CONNECTION): roll back, drop temporary
-- tables, user variables and prepared statements, restore the session
-- variables; the connection keeps its user, database and charset.
function MySQLConnection:reset()
  self._stmts, self._nstmts = {}, 0 -- the server drops every prepared statement
  return simple(self, COM_RESET_CONNECTION)
end

--- Close the connection (COM_QUIT, then the socket).
function MySQLConnection:close()
  if not util.failure(self) then
    self._seq = 0
    send(self, COM_QUIT)
    util.close_connection(self)
  end
end

--- True once closed (by either side, or a failure).
function MySQLConnection:closed()
  return util.failure(self) ~= nil or self.stream:closed()
end

-- ---- the pool -------------------------------------------------------------

--- A pool of at most `size` connections (default 16; `queue_timeout`
-- default 10 s; the other options are mysql.connect's). A connection is
-- reset (COM_RESET_CONNECTION) before its next user after `with` and
-- `transaction`, and after a `query` that left a transaction open or was
-- not a plain SELECT, INSERT, UPDATE, DELETE or REPLACE.
-- @type MySQLPool
local MySQLPool = pool.Pool:extend()

local function reset(db) return db:reset() end

function M.pool(opts)
  local size, qt, conn_opts = pool.options(opts, "mysql.pool", 2)
  check_opts(conn_opts, "mysql.pool", 2)
  local p = pool.new({ size = size, queue_timeout = qt, reset = reset,
    connect = function() return M.connect(conn_opts) end })
  return setmetatable(p, MySQLPool)
end

local PLAIN = { select = true, insert = true, update = true, delete = true, replace = true }

--- Run one statement on a pooled connection (as MySQLConnection:query).
function MySQLPool:query(sql, ...)
  if type(sql) ~= "string" then
    error("query: sql must be a string, got " .. util.describe(sql), 2)
  end
  util.need_coroutine("pool:query", 2)
  local db, err = self:acquire()
  if not db then return nil, err end
  local res = util.pack(pcall(db.query, db, sql, ...))
  local how
  if not res[1] then
    how = "discard"
  elseif db:in_transaction() then
    how = "reset"
  else
    local word = sql:match("^%s*(%a+)")
    if not word or not PLAIN[word:lower()] then how = "reset" end
  end
  self:release(db, how)
  if not res[1] then error(res[2], 0) end
  return res[2], res[3]
end

--- Run fn(db) with a connection, then reset it and give it back.
function MySQLPool:with(fn)
  util.check_callable(fn, 2)
  util.need_coroutine("pool:with", 2)
  return pool.Pool.with(self, fn, "reset")
end

--- db:transaction(fn) on a pooled connection.
function MySQLPool:transaction(fn)
  util.check_callable(fn, 2)
  util.need_coroutine("pool:transaction", 2)
  return pool.Pool.with(self, function(db) return db:transaction(fn) end, "reset")
end

M.Connection = MySQLConnection
return M
