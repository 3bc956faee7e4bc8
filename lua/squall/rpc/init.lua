--- MessagePack-RPC over TCP: servers, clients, and handler folders that
-- reload while the server runs.
--
--     local server = rpc.Server({ handlers = "handlers" })
--     server:route("sum", function(conn, a, b) return a + b end)
--     server:listen(5700)
--
--     local conn = assert(rpc.connect("127.0.0.1", 5700))
--     local three, err = conn:call("sum", 1, 2)
--
-- The wire format is the MessagePack-RPC specification: request
-- `[0, msgid, method, params]`, response `[1, msgid, error, result]`,
-- notification `[2, method, params]`, back to back on the stream. Both
-- ends of a connection may call each other; a request runs on the
-- coroutine that read it, and one that waits leaves the reading to
-- another (see "reading" below), so responses go out as they finish. See
-- docs/api.md (squall.rpc).
-- @module squall.rpc
local core = require "squall.core"
local gen = require "squall.gen"
local iostream = require "squall.iostream"
local lend_mod = require "squall.lend"
local log = require "squall.log"
local msgpack = require "squall.msgpack"
local rpc_frame = require "squall.rpc.frame"
local routers = require "squall.router"
local stats = require "squall.stats"
local TCPServer = require "squall.tcpserver"
local util = require "squall.util"

local M = {}

local null = msgpack.null
local write_message = rpc_frame.write_message
local create, yield, running = coroutine.create, coroutine.yield, coroutine.running
local type, tostring, error, pairs, select = type, tostring, error, pairs, select
local traceback, xpcall, format = debug.traceback, xpcall, string.format
local now = core.time
local fail, failure = util.fail, util.failure
local lend, keeper = lend_mod.lend, lend_mod.keeper
local read_on_loop -- the pooled readers' body, below

-- Stream methods, looked up once: a method call through the stream's
-- __index costs a Lua call of its own, per message.
local sm = iostream.methods
local s_closed, s_read_bytes, s_set_idle = sm.closed, sm.read_bytes, sm.set_idle

-- The message kinds and the params' counts that are not counts, as
-- runtime/rpc_frame.h names them: next_message (rpc/frame.lua, in front
-- of rpc_frame.c's) spreads a message on the stack, so a request costs no
-- table.
local frame = core.rpc_frame_constants
local REQUEST, RESPONSE, NOTIFY = frame.REQUEST, frame.RESPONSE, frame.NOTIFY
local PARAMS_TABLE, PARAMS_NOT_ARRAY = frame.PARAMS_TABLE, frame.PARAMS_NOT_ARRAY
local next_message = rpc_frame.next_message
local DEFAULTS = { call_timeout = 30, max_message_size = 16777216, max_pending = 256 }

local function rpc_error(kind, message, remote)
  local e = core.error(kind, message)
  e.remote = remote
  return e
end

-- Methods by name, from routes and handler folders (squall.router).
local function new_router()
  return routers.new("rpc", "handlers")
end

-- ---- connections ----------------------------------------------------------

--- One MessagePack-RPC connection, either side: `conn:call`, `conn:notify`,
-- `conn:close`; `conn.id`, `conn.address`, `conn.data` (the application's),
-- and on a server's side `conn.server`.
-- @type RpcConnection
local RpcConnection = util.class()

local next_conn_id = 0

local function new_connection(stream, address, opts, router)
  next_conn_id = next_conn_id + 1
  return setmetatable({
    id = next_conn_id,
    address = address,
    data = {},
    stream = stream,
    _router = router,
    _pending = {},     -- msgid -> Future of this side's calls
    _late = {},        -- msgids whose calls timed out: a late answer is dropped
    _next_msgid = 0,
    _inflight = 0,     -- the peer's requests running here
    _slot = nil,       -- a Future the reader waits on past max_pending
    _call_timeout = opts.call_timeout or DEFAULTS.call_timeout,
    _max_pending = opts.max_pending or DEFAULTS.max_pending,
    _max_message_size = opts.max_message_size or DEFAULTS.max_message_size,
  }, RpcConnection)
end

-- Send one message, the array of the n (3 or 4) values after it; a closed
-- stream is the caller's to report.
local function send(conn, n, a, b, c, d)
  local ok, sent, err = pcall(write_message, conn.stream, n, a, b, c, d)
  if not ok then return nil, rpc_error("msgpack", sent) end
  return sent, err
end

local function params_of(...)
  local n = select("#", ...)
  local t = { ... }
  for i = 1, n do
    -- a hole would make the table a map: mark it as the array it is
    if t[i] == nil then return msgpack.array(t, n) end
  end
  return t
end

-- What a call on a closed connection gets: kind closed, with the error
-- that ended the connection as its cause (none after close()).
local function closed(conn)
  if not failure(conn) then
    fail(conn, conn.stream.error or rpc_error("closed", "the connection closed"))
  end
  return util.closed(conn)
end

--- Call `method` on the peer and wait for its answer (inside a coroutine).
-- @return the result (nil for a nil result)
-- @return nil, err: kind `remote` (`err.remote` is the peer's error
--   value), `timeout` (after `call_timeout`; the connection stays
--   usable), `closed`, `protocol`
function RpcConnection:call(method, ...)
  if type(method) ~= "string" then
    error("call: method must be a string, got " .. util.describe(method), 2)
  end
  if self.stream:closed() then return closed(self) end
  local msgid = self._next_msgid
  self._next_msgid = (msgid + 1) % 4294967296
  local fut = gen.Future()
  self._pending[msgid] = fut
  local ok, err = send(self, 4, REQUEST, msgid, method, params_of(...))
  if not ok then
    self._pending[msgid] = nil
    return nil, err
  end
  local done, result, remote = gen.with_timeout(self._call_timeout, fut)
  if done == nil then
    -- result is with_timeout's error (kind timeout)
    if self._pending[msgid] == fut then
      self._pending[msgid] = nil
      self._late[msgid] = true
    end
    return nil, result
  end
  if done == true then
    if result == null then return nil end
    return result
  end
  return nil, remote
end

--- Send a notification: no answer is expected.
-- @treturn boolean true, or nil, err (`closed`)
function RpcConnection:notify(method, ...)
  if type(method) ~= "string" then
    error("notify: method must be a string, got " .. util.describe(method), 2)
  end
  if self.stream:closed() then return closed(self) end
  return send(self, 3, NOTIFY, method, params_of(...))
end

--- Close the connection; calls waiting on it get `closed`.
function RpcConnection:close()
  util.close_connection(self)
end

--- True once the connection closed.
function RpcConnection:closed()
  return self.stream:closed()
end

local function finish_request(conn)
  conn._inflight = conn._inflight - 1
  if conn._inflight == 0 and conn._marked_busy then
    conn._marked_busy = false
    s_set_idle(conn.stream, true)
  end
  local slot = conn._slot
  if slot and conn._inflight < conn._max_pending then
    conn._slot = nil
    slot:set_result()
  end
end

-- Run a handler for the peer's request (msgid) or notification (nil
-- msgid), with its parameters as values (nils in place), and answer a
-- request.
local function serve(conn, msgid, method, ...)
  local fn = conn._router.methods[method]
  local result, err
  local observe = stats.rpc_observe -- set while squall.metrics watches
  local t0 = observe and now()
  if not fn then
    err = "no such method: " .. tostring(method)
    if msgid == nil then log.warn("rpc: notification for no such method: %s", tostring(method)) end
  else
    -- On the reader's own coroutine, lent: if the handler waits, it keeps
    -- this coroutine and another reads on (hand_on, below).
    lend(1)
    local ok, r, e = xpcall(fn, traceback, conn, ...)
    lend(0)
    if not ok then
      -- (r as it is: the log's format survives a __tostring that raises)
      log.error("rpc: %s raised: %s", method, r)
      stats.handler_errors = stats.handler_errors + 1
      err = "internal error"
    elseif r == nil and e ~= nil then
      err = e
    else
      result = r
    end
  end
  if observe then observe(fn and method or "(unknown)", now() - t0, err ~= nil) end
  if msgid == nil then return end
  -- (send, written out: this is the path every answer takes.) A closed
  -- stream refuses the write: the caller is gone, nothing to do.
  local encoded, werr = pcall(write_message, conn.stream, 4, RESPONSE, msgid, err, result)
  if not encoded then
    log.error("rpc: the answer of %s cannot be encoded: %s", method, tostring(werr))
    send(conn, 4, RESPONSE, msgid, "internal error", nil)
  end
  finish_request(conn)
end

-- A message broke the protocol: log it once and close.
local function protocol_error(conn, why)
  if not failure(conn) then
    fail(conn, rpc_error("protocol", why))
    log.warn("rpc: closing connection %d (%s:%s): %s", conn.id,
      tostring(conn.address and conn.address.host), tostring(conn.address and conn.address.port),
      why)
  end
  conn.stream:abort()
  return false
end

-- A request or notification with more parameters than a call can take:
-- answered with an error (a notification is logged); the connection goes on.
local MAX_PARAMS = msgpack.MAX_VALUES - 8 -- room for serve's own arguments
local function too_many_params(conn, msgid, method, n)
  local why = format("too many parameters for %s: %d (at most %d)", method, n, MAX_PARAMS)
  if msgid == nil then
    log.warn("rpc: connection %d: dropping a notification: %s", conn.id, why)
    return true
  end
  send(conn, 4, RESPONSE, msgid, why, nil)
  return true
end

-- One message, as next_message gives it (runtime/rpc_frame.h); true to
-- read on, false when it is incomplete or broke the protocol.
local function dispatch(conn, kind, b, c, d, ...)
  if kind == REQUEST or kind == NOTIFY then
    -- b: msgid (nil for a notification), c: method, d: nparams, params...
    if (kind == REQUEST and type(b) ~= "number") or type(c) ~= "string" then
      return protocol_error(conn, "a request is not [0, msgid, method, params]" ..
        " nor a notification [2, method, params]")
    end
    if d == PARAMS_NOT_ARRAY then
      return protocol_error(conn, "the params of " .. c .. " are not an array")
    end
    local params = ... -- only read when not spread (d == PARAMS_TABLE)
    if d == PARAMS_TABLE and #params > MAX_PARAMS then
      -- valid MessagePack-RPC, but more arguments than a Lua call takes
      return too_many_params(conn, b, c, #params)
    end
    if kind == REQUEST then conn._inflight = conn._inflight + 1 end
    if d == PARAMS_TABLE then
      serve(conn, b, c, msgpack.values(params))
    else
      serve(conn, b, c, ...)
    end
  elseif kind == RESPONSE then
    -- b: msgid, c: error, d: result
    local fut = conn._pending[b]
    if fut == nil then
      if conn._late[b] then
        conn._late[b] = nil -- the call timed out: dropped, as promised
      else
        log.warn("rpc: connection %d: dropping a response to unknown msgid %s", conn.id,
          tostring(b))
      end
      return true
    end
    conn._pending[b] = nil
    if c == null then
      fut:set_result(true, d)
    else
      fut:set_result(false, nil, rpc_error("remote", "the peer answered an error: " ..
        (type(c) == "string" and c or util.describe(c)), c))
    end
  elseif kind == nil then
    -- nothing whole yet, or (b) the input is not MessagePack
    if b ~= nil then return protocol_error(conn, tostring(b)) end
    return false
  elseif type(b) ~= "table" then
    return protocol_error(conn, "a message is not an array: " .. util.describe(b))
  else
    return protocol_error(conn, "a message is not a MessagePack-RPC request, response " ..
      "or notification")
  end
  return true
end

-- ---- reading ----------------------------------------------------------------
-- One coroutine at a time reads a connection (conn._reader) and runs each
-- request itself, lent to the handler (squall.lend): a request costs no
-- resume or yield. A handler that waits keeps that coroutine; hand_on
-- then gives the reading to a coroutine from the pool at once, so the
-- requests behind it run meanwhile, and the keeper, once its handler is
-- done and answered, leaves: it reads no more.

-- Idle coroutines that read on for a kept one (creating one costs more
-- than a request).
local idle_readers, n_idle = {}, 0
local MAX_IDLE = 64

-- A request kept conn's reader `co`: the connection is busy for
-- close_gracefully until it finishes, and a coroutine from the pool reads
-- on, resumed with conn (core resumes what this returns at once).
local function hand_on(_, conn)
  if conn._inflight > 0 and not conn._marked_busy then
    conn._marked_busy = true
    s_set_idle(conn.stream, false)
  end
  local co
  if n_idle > 0 then
    co = idle_readers[n_idle]
    idle_readers[n_idle] = nil
    n_idle = n_idle - 1
  else
    co = create(read_on_loop)
  end
  conn._reader = co
  return co, conn
end

-- Read and run messages while this coroutine, `me`, is conn's reader:
-- true once the connection ended, false when a request kept `me` and
-- another coroutine read on. The unpacker's buffered messages come first:
-- a new reader starts where the kept one stopped.
local function read_messages(conn, me)
  local stream, unpacker = conn.stream, conn._unpacker
  local feed = unpacker.feed
  conn._reader = me
  keeper(me, hand_on, conn)
  while true do
    while not failure(conn) do
      -- Backpressure: past max_pending running requests, read no more. A
      -- peer gone meanwhile gets no answers: what it sent past the bound
      -- is dropped, never run beyond max_pending.
      while conn._inflight >= conn._max_pending do
        if s_closed(stream) then return true end
        conn._slot = conn._slot or gen.Future()
        conn._slot:result()
      end
      if not dispatch(conn, next_message(unpacker)) then break end
      if conn._reader ~= me then return false end
    end
    if failure(conn) or s_closed(stream) then return true end
    local chunk = s_read_bytes(stream, 65536, true)
    if not chunk then return true end
    feed(unpacker, chunk)
  end
end

-- A server's on_connect or on_close, when it has one.
local function call_hook(self, name, conn)
  local hook = self[name]
  if hook then
    local ok, err = xpcall(hook, traceback, conn)
    if not ok then log.error("rpc: %s raised: %s", name, tostring(err)) end
  end
end

-- The connection ended: close it, fail the calls still waiting, and tell
-- the server (once, whichever reader saw the end).
local function finish(conn)
  if conn._finished then return end
  conn._finished = true
  local stream = conn.stream
  stream:close()
  local err = failure(conn) or stream.error or rpc_error("closed", "the connection closed")
  if err.kind ~= "protocol" and err.kind ~= "closed" then
    err = rpc_error("closed", "the connection closed: " .. tostring(err))
  end
  fail(conn, err)
  local pending = conn._pending
  conn._pending = {}
  for _, fut in pairs(pending) do fut:set_result(false, nil, err) end
  if conn._slot then conn._slot:set_result() end
  local server = conn.server
  if server then
    server._rpc_conns[conn] = nil
    call_hook(server, "on_close", conn)
  end
  if conn._ended then conn._ended:set_result() end
end

-- Read conn on the running coroutine until it ends (then finish it) or a
-- request keeps the coroutine. Whatever went wrong, the connection ends.
local function read_on(conn)
  local me = running()
  local ok, ended = xpcall(read_messages, traceback, conn, me)
  keeper(me, nil)
  if not ok then
    log.error("rpc: connection %d failed: %s", conn.id, ended)
    fail(conn, rpc_error("closed", "the connection failed"))
    ended = true
  end
  if ended then finish(conn) end
end

-- A pooled reader: read on for a kept one, then wait in the pool.
function read_on_loop(conn)
  local self = running()
  while true do
    read_on(conn)
    if n_idle >= MAX_IDLE then return end
    n_idle = n_idle + 1
    idle_readers[n_idle] = self
    conn = nil -- luacheck: ignore (an idle reader holds no connection)
    conn = yield()
  end
end

-- While paused at max_pending the reader waits on _slot, not on the
-- stream: a peer that goes away meanwhile must wake it too.
local function wake_on_close(conn)
  return function()
    local slot = conn._slot
    if slot then
      conn._slot = nil
      slot:set_result()
    end
  end
end

-- The connection's own coroutine (the server's handle_stream, or the
-- client's): it reads first, and returns once the connection has ended,
-- whoever read it last (a server counts a connection as served until its
-- handle_stream returns: close_gracefully waits for it).
local function run_connection(conn)
  conn._unpacker = msgpack.unpacker({ max_size = conn._max_message_size })
  s_set_idle(conn.stream, true)
  conn.stream:set_close_callback(wake_on_close(conn))
  read_on(conn)
  if not conn._finished then
    conn._ended = gen.Future()
    conn._ended:result()
  end
end

-- ---- server ---------------------------------------------------------------

--- A MessagePack-RPC server: a TCPServer (listen, bind, start,
-- add_sockets, stop, close_gracefully) whose connections speak RPC.
-- @type Server
local Server = TCPServer:extend()
M.ServerClass = Server

--- Create a server.
-- @tparam[opt] table opts `handlers` (a folder), `call_timeout` (30),
--   `max_message_size` (16 MiB), `max_pending` (256), and every TCPServer
--   option (`ssl_options`, `max_buffer_size`...)
function M.Server(opts)
  opts = opts or {}
  if type(opts) ~= "table" then error("rpc.Server: opts must be a table", 2) end
  for k, v in pairs(DEFAULTS) do
    local given = opts[k]
    if given ~= nil and (type(given) ~= "number" or given <= 0) then
      error(format("rpc.Server: %s must be a positive number, got %s", k, util.describe(given)), 2)
    end
    if given == nil then opts[k] = v end
  end
  local ok, self = pcall(TCPServer.new, Server, opts)
  if not ok then error(self, 2) end
  self._opts = opts
  self._router = new_router()
  self._rpc_conns = {}
  if opts.handlers ~= nil then self._router:add_folder(opts.handlers, 2) end
  return self
end

--- Answer `name` with fn(conn, ...), or every function of a table as
-- "name.f".
function Server:route(name, target)
  self._router:route(name, target, 2)
  return self
end

--- The methods this server answers, sorted.
function Server:methods()
  return self._router:names()
end

--- Iterate over the open connections: `for conn in server:connections()`.
function Server:connections()
  local list = {}
  for conn in pairs(self._rpc_conns) do list[#list + 1] = conn end
  table.sort(list, function(a, b) return a.id < b.id end)
  local i = 0
  return function()
    i = i + 1
    return list[i]
  end
end

--- The connection whose `conn.data[key] == value` (a player's uid...).
function Server:find(key, value)
  for conn in pairs(self._rpc_conns) do
    if conn.data[key] == value then return conn end
  end
end

function Server:handle_stream(stream, address)
  local conn = new_connection(stream, address, self._opts, self._router)
  conn.server = self
  self._rpc_conns[conn] = true
  call_hook(self, "on_connect", conn)
  run_connection(conn)
end

-- ---- client ---------------------------------------------------------------

--- Connect to an RPC server. The connection answers the server's calls
-- with `opts.routes` (name -> function or table) and `opts.handlers` (a
-- folder), as a server does.
-- @tparam string host
-- @tparam number port
-- @tparam[opt] table opts `timeout` (connect), `call_timeout` (30),
--   `ssl_options`, `server_hostname`, `handlers`, `routes`,
--   `max_message_size`, `max_pending`
-- @treturn RpcConnection
-- @return nil, err (as iostream.connect)
function M.connect(host, port, opts)
  opts = opts or {}
  if type(opts) ~= "table" then error("rpc.connect: opts must be a table", 2) end
  util.check_port(port, 2)
  util.need_coroutine("rpc.connect", 2)
  local router = new_router()
  for name, target in pairs(opts.routes or {}) do router:route(name, target, 2) end
  if opts.handlers ~= nil then router:add_folder(opts.handlers, 2) end
  local stream, err = iostream.connect(host, port, {
    timeout = opts.timeout, ssl_options = opts.ssl_options,
    server_hostname = opts.server_hostname,
  })
  if not stream then return nil, err end
  local conn = new_connection(stream, { host = host, port = port }, opts, router)
  gen.spawn(run_connection, conn)
  return conn
end

M.Connection = RpcConnection

return M
