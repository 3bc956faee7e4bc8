--- TCPServer: accept connections and serve each in its own coroutine.
--
--     local Echo = TCPServer:extend()
--     function Echo:handle_stream(stream, address) ... end
--     Echo():listen(8888)
--
-- @module squall.tcpserver
local core = require "squall.core"
local log = require "squall.log"
local netutil = require "squall.netutil"
local iostream = require "squall.iostream"
local stats = require "squall.stats"
local util = require "squall.util"

local TCPServer = util.class()

local type, tostring, error = type, tostring, error
local create = coroutine.create
local resume, on_finish = core.resume, core.on_finish
local start_tls = iostream.begin_tls
local proxy -- squall.proxy, loaded by a server that speaks it

local STREAM_OPTS = { "max_buffer_size", "read_chunk_size", "write_high_water",
  "max_write_buffer_size" }

-- A subclass is `local Echo = TCPServer:extend()` (squall.util's
-- classes); instances are made by calling it, `Echo(opts)`.

--- Create a server.
-- @tparam[opt] table opts `handle_stream` (instead of a subclass method),
--   `ssl_options` (checked now: a missing certfile, an unreadable file or a
--   key that does not match raises), `max_buffer_size`, `read_chunk_size`,
--   `write_high_water`, `max_write_buffer_size`, `proxy_protocol` (each
--   connection starts with a PROXY v1/v2 header naming the client; see
--   docs/deploy.md), `proxy_timeout` (seconds for that header, default 5)
function TCPServer.new(cls, opts)
  opts = opts or {}
  if type(opts) ~= "table" then error("options must be a table, got " .. util.describe(opts), 2) end
  local self = setmetatable({ _acceptors = {}, _sockets = {}, _stream_opts = {},
    _conns = {}, _nstreams = 0, _flushing = setmetatable({}, { __mode = "k" }) }, cls)
  -- the streams' own check (runtime/stream.c), now rather than at the
  -- first connection
  local sizes_ok, why = pcall(core.check_stream_options, opts)
  if not sizes_ok then error(why, 2) end
  for _, k in ipairs(STREAM_OPTS) do self._stream_opts[k] = opts[k] end
  if opts.handle_stream ~= nil then
    if type(opts.handle_stream) ~= "function" then
      error("handle_stream must be a function, got " .. util.describe(opts.handle_stream), 2)
    end
    self.handle_stream = function(_, ...) return opts.handle_stream(...) end
  end
  if opts.proxy_protocol ~= nil and type(opts.proxy_protocol) ~= "boolean" then
    error("proxy_protocol must be a boolean, got " .. util.describe(opts.proxy_protocol), 2)
  end
  if opts.proxy_timeout ~= nil and (type(opts.proxy_timeout) ~= "number" or
      opts.proxy_timeout <= 0) then
    error("proxy_timeout must be a positive number, got " .. util.describe(opts.proxy_timeout), 2)
  end
  if opts.proxy_protocol then
    proxy = proxy or require "squall.proxy"
    self._proxy_timeout = opts.proxy_timeout or 5
  end
  if opts.ssl_options ~= nil then
    -- Built (and its files checked) now, once for every connection.
    local ok, ctx = pcall(netutil.ssl_context, opts.ssl_options, true)
    if not ok then error(ctx, 2) end
    self._ssl_ctx = ctx
  end
  return self
end

--- Override in a subclass (or pass `handle_stream` to the constructor).
-- Runs in its own coroutine per connection; an error it raises is logged
-- with its traceback and closes that stream only.
function TCPServer:handle_stream(stream, address) -- luacheck: ignore 212
  error("TCPServer:handle_stream is not implemented", 2)
end

-- Running handlers: coroutine -> its stream (one table entry per
-- connection; close_gracefully walks it).
local function finished(server, co)
  -- A stream its handler closed with writes still queued lingers until
  -- they are out; close_gracefully's deadline aborts it.
  local stream = server._conns[co]
  if stream:closed() and stream:writing() then server._flushing[stream] = true end
  server._conns[co] = nil
  server._nstreams = server._nstreams - 1
  stats.connections_open = stats.connections_open - 1
  if server._drained and server._nstreams == 0 then server._drained() end
end

-- Behind a load balancer: take the PROXY header off the stream first
-- (before TLS), and use the client's address it gives. A connection
-- without a valid header is closed. Returns the address, or nil.
local function accept_proxied(server, stream, address)
  stream:set_timeout(server._proxy_timeout)
  local info, err = proxy.read_header(stream)
  stream:set_timeout(nil)
  if not info then
    -- a bare TCP health check connects and closes: not worth a warning
    local say = (err.kind == "closed") and log.debug or log.warn
    say("PROXY header from %s:%s: %s; closing", tostring(address.host),
      tostring(address.port), tostring(err))
    stream:abort()
    return nil
  end
  if info.command == "PROXY" and info.src_addr then
    address = { host = info.src_addr, port = info.src_port }
    stream:set_peer_address(info.src_addr, info.src_port)
  end
  if server._ssl_ctx then start_tls(stream, server._ssl_ctx) end
  return address
end

-- The coroutine body serving one connection. It tail-calls handle_stream,
-- so no frame of ours sits under the handler: runtime/coro.c calls the
-- server's on_finish when the coroutine ends, with the traceback when it
-- raised. A shallower stack matters: a JIT-compiled handler loop entered
-- with this frame below it grew most coroutines' stacks (about 200 bytes
-- per idle connection; memory per idle connection is a figure we track).
local function serve(server, stream, address)
  if server._proxy_timeout then
    address = accept_proxied(server, stream, address)
    if not address then return end
  end
  return server.handle_stream(server, stream, address)
end

-- Misuse that would otherwise fail far from its cause: `Echo:listen()`
-- on the class, and a server that has no handle_stream, which used to fail
-- only when the first client came.
local function check_server(self, what, level)
  if type(self) ~= "table" or rawget(self, "_sockets") == nil then
    error(("%s: call it on a server, as Server():%s(...), not Server:%s(...)")
      :format(what, what, what), level + 1)
  end
  if self.handle_stream == TCPServer.handle_stream then
    error(what .. ": the server has no handle_stream (pass one to TCPServer{ handle_stream = " ..
      "function(stream, address) ... end } or define it in a subclass)", level + 1)
  end
end

--- Start accepting on sockets from netutil.bind_sockets.
function TCPServer:add_sockets(sockets)
  check_server(self, "add_sockets", 2)
  if type(sockets) ~= "table" then
    error("add_sockets: sockets must be a list from netutil.bind_sockets, got " ..
      util.describe(sockets), 2)
  end
  local ctx = self._ssl_ctx
  if not self._on_finish then
    -- Every handler's coroutine ends here. Who calls this: when any
    -- coroutine returns or raises, runtime/coro.c's squall_coro_resume
    -- calls run_on_finish, which looks the coroutine up among the keys of
    -- each table given to core.on_finish (ours: _conns, registered just
    -- below) and calls that table's function: this one. `tb` is the
    -- traceback when it raised. The server holds the function:
    -- core.on_finish holds it weakly.
    self._on_finish = function(co, tb)
      if tb then
        local stream = self._conns[co]
        local host, port = stream:getpeername()
        if not host then host, port = "?", "?" end -- closed before it raised
        log.error("Error in handle_stream for %s:%s\n%s", tostring(host), tostring(port), tb)
        stats.handler_errors = stats.handler_errors + 1
        stream:close()
      end
      finished(self, co)
    end
    on_finish(self._conns, self._on_finish)
  end
  for _, sock in ipairs(sockets) do
    self._sockets[#self._sockets + 1] = sock
    self._acceptors[#self._acceptors + 1] = netutil.add_accept_handler(sock,
      function(stream, address)
        -- The handshake runs as data arrives; the handler's first read
        -- waits for it.
        if ctx and not self._proxy_timeout then start_tls(stream, ctx) end
        local co = create(serve)
        self._conns[co] = stream
        self._nstreams = self._nstreams + 1
        stats.connections_accepted = stats.connections_accepted + 1
        stats.connections_open = stats.connections_open + 1
        resume(co, self, stream, address)
      end, self._stream_opts)
  end
end

-- listen's and bind's sockets: raises at the caller's caller (level 3)
-- when the port cannot be had, as a taken port is the caller's to fix.
local function bound(self, what, failed, port, address, opts)
  check_server(self, what, 3)
  util.check_port(port, 3)
  local socks, err = netutil.bind_sockets(port, address, opts)
  if not socks then
    error(string.format("%s %s:%s: %s", failed, tostring(address or "*"), tostring(port),
      tostring(err)), 3)
  end
  return socks
end

--- Bind to `port` on `address` (every interface when nil) and start
-- accepting. May be called for several ports. Raises when it cannot bind.
-- @return the list of sockets bound
function TCPServer:listen(port, address, opts)
  local socks = bound(self, "listen", "cannot listen on", port, address, opts)
  self:add_sockets(socks)
  return socks
end

--- Bind now, accept once `start` is called (for fork_processes).
function TCPServer:bind(port, address, opts)
  local socks = bound(self, "bind", "cannot bind", port, address, opts)
  self._pending = self._pending or {}
  for _, s in ipairs(socks) do self._pending[#self._pending + 1] = s end
  return socks
end

--- Start accepting on the sockets from `bind`, in `n` processes (0 or nil:
-- one per CPU; 1: this process only). See process.fork_processes.
function TCPServer:start(n, max_restarts)
  check_server(self, "start", 2)
  if not self._pending and #self._sockets == 0 then
    error("start: nothing to start: call bind(port) first", 2)
  end
  if n ~= 1 then
    if #self._sockets > 0 then
      error("start: use bind(), not listen(), before start(n): listen() already accepts " ..
        "in this process, and fork_processes must run before any IOLoop exists", 2)
    end
    local ok, err = pcall(require("squall.process").fork_processes, n, max_restarts)
    if not ok then error(err, 2) end
  end
  local pending = self._pending or {}
  self._pending = nil
  self:add_sockets(pending)
end

--- Stop accepting and close the listening sockets. Open streams go on.
function TCPServer:stop()
  for _, remove in ipairs(self._acceptors) do remove() end
  for _, sock in ipairs(self._sockets) do sock:close() end
  self._acceptors, self._sockets = {}, {}
end

--- The number of handle_stream coroutines still running.
function TCPServer:active_streams()
  return self._nstreams
end

--- True once close_gracefully has begun.
function TCPServer:draining()
  return self._draining == true
end

-- A Future resolved once every stream in `streams` has closed: each
-- one's close callback counts it, then calls the callback its handler set.
local function all_closed(gen, streams)
  local fut, left = gen.Future(), #streams
  for _, stream in ipairs(streams) do
    local prev = stream:get_close_callback()
    stream:set_close_callback(function()
      left = left - 1
      if left == 0 then fut:set_result(true) end
      if prev then prev() end
    end)
  end
  if left == 0 then fut:set_result(true) end
  return fut
end

--- Stop accepting, then wait (inside a coroutine) until every running
-- handle_stream has returned, closing at once the streams whose handler
-- marked them idle (`stream:set_idle(true)` between requests) and, at the
-- deadline, every stream still open.
-- @tparam[opt=30] number deadline seconds
-- @treturn boolean true when every handler finished before the deadline
-- @treturn number how many streams were closed at the deadline
function TCPServer:close_gracefully(deadline)
  deadline = deadline or 30
  if type(deadline) ~= "number" or deadline < 0 then
    error("deadline must be a non-negative number", 2)
  end
  local gen = require "squall.gen"
  local loop = require("squall.ioloop").current()
  self:stop()
  self._draining = true
  local t_end = loop:time() + deadline
  local closed = 0
  if self._nstreams > 0 then
    -- Every handler's end is an event (finished() calls _drained), and so
    -- is a handler marking its stream idle (close_when_idle closes it
    -- then, in C): nothing is polled.
    local all_done = gen.Future()
    self._drained = function() if not all_done:done() then all_done:set_result(true) end end
    for _, stream in pairs(self._conns) do stream:close_when_idle() end
    gen.with_timeout(deadline, all_done)
    if self._nstreams > 0 then
      for _, stream in pairs(self._conns) do
        if not stream:closed() then closed = closed + 1 end
        stream:abort() -- the time is up: what is still queued is dropped
      end
      -- handlers see `closed` on their next call and return
      gen.with_timeout(1, all_done)
    end
    self._drained = nil
  end
  -- Streams whose handlers closed them but whose peers have not read what
  -- was queued: wait for their close until the deadline too, then drop them.
  local flushing = {}
  for stream in pairs(self._flushing) do
    if stream:writing() then flushing[#flushing + 1] = stream end
  end
  self._flushing = setmetatable({}, { __mode = "k" })
  if #flushing > 0 then
    gen.with_timeout(math.max(0, t_end - loop:time()), all_closed(gen, flushing))
    for _, stream in ipairs(flushing) do
      if stream:writing() then
        closed = closed + 1
        stream:abort()
      end
    end
  end
  return closed == 0, closed
end

return TCPServer
