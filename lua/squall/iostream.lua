--- IOStream: a TCP connection read and written from a coroutine.
--
-- The stream object is a userdata from runtime/stream.c; this module adds
-- the Lua side of its surface: callback style, `stream.error`,
-- `read_until_close(on_chunk)` and `connect`.
--
-- Inside a coroutine each read waits and returns its result, or `nil, err`
-- (see API.md for the error kinds). With a function as the last argument
-- a call returns at once and calls `callback(result, err)` later.
-- @module squall.iostream
local core = require "squall.core"
local ioloop = require "squall.ioloop"
local log = require "squall.log"

local M = {}

local methods = core.stream_methods
local mt = core.stream_mt
local c_error = methods._error
local create = coroutine.create
local resume = core.resume
local type, error = type, error

--- The stream's methods, for code that extends streams (TLS does).
M.methods = methods

-- `stream.error` is the error that closed the stream, or nil.
mt.__index = function(s, k)
  local m = methods[k]
  if m ~= nil then return m end
  if k == "error" then return c_error(s) end
  return nil
end

--- True when `x` is a stream.
function M.is_stream(x)
  return getmetatable(x) == mt
end

-- Callback style: run `fn(s, ...)` in a coroutine of its own and pass its
-- results to `callback` on a later loop iteration, never synchronously.
local function call_back(fn, s, callback, ...)
  local loop = ioloop.current()
  local co = create(function(...)
    local r, err = fn(...)
    loop:add_callback(callback, r, err)
  end)
  resume(co, s, ...)
end

-- runtime/stream.c hands a call whose last argument is a function here.
core.stream_call_back(call_back)

local c_read_until_close = methods.read_until_close
local c_read_bytes = methods.read_bytes

-- Stream every chunk to on_chunk as it arrives; "" once the peer closes.
local function read_chunks(s, on_chunk)
  while true do
    local data, err = c_read_bytes(s, 65536, true)
    if not data then
      if err.kind == "closed" and c_error(s) == nil then return "" end
      return nil, err
    end
    on_chunk(data)
  end
end

--- Read everything until the peer closes.
-- @tparam[opt] function on_chunk called with each chunk as it arrives;
--   then "" is returned
-- @tparam[opt] function callback callback style
-- @treturn string the data (or "" with on_chunk)
-- @return nil, err (`closed` when the stream was closed by us, `buffer_full`)
function methods.read_until_close(s, on_chunk, callback)
  if callback ~= nil then
    if type(callback) ~= "function" then
      error("read_until_close: callback must be a function", 2)
    end
    call_back(methods.read_until_close, s, callback, on_chunk)
    return
  end
  if on_chunk == nil then return c_read_until_close(s) end
  if type(on_chunk) ~= "function" then
    error("read_until_close: on_chunk must be a function", 2)
  end
  return read_chunks(s, on_chunk)
end

local c_write = methods.write
--- Queue data (a string or an array of strings) for writing; see API.md.
-- With a callback, it is called with (true) once the data reached the
-- kernel, or (nil, err).
function methods.write(s, data, callback)
  if callback == nil then return c_write(s, data) end
  if type(callback) ~= "function" then
    error("write: callback must be a function", 2)
  end
  -- Passing the callback tells C not to wait past write_high_water: the
  -- callback, not the caller, learns when the bytes are out.
  local ok, err = c_write(s, data, callback)
  if not ok then
    ioloop.current():add_callback(callback, nil, err)
    return
  end
  call_back(methods.flush, s, callback)
end

-- Addresses a PROXY protocol header gave (weak: they go with the stream).
local peer_addresses = setmetatable({}, { __mode = "k" })
local c_getpeername = methods.getpeername

--- Make getpeername() answer `host`, `port` from now on: the client a
-- load balancer's PROXY header named (TCPServer does this with
-- `proxy_protocol = true`).
function methods.set_peer_address(s, host, port)
  if type(host) ~= "string" then error("set_peer_address: host must be a string", 2) end
  if type(port) ~= "number" then error("set_peer_address: port must be a number", 2) end
  peer_addresses[s] = { host, port }
end

--- The peer's host and port (the PROXY header's client, if one was set).
function methods.getpeername(s)
  local p = peer_addresses[s]
  if p then return p[1], p[2] end
  return c_getpeername(s)
end

local c_set_close_callback = methods.set_close_callback
--- Call `fn()` once when the stream closes, whoever closed it (on the next
-- loop iteration when it is closed already). nil removes it.
function methods.set_close_callback(s, fn)
  if c_set_close_callback(s, fn) == false then
    ioloop.current():add_callback(fn)
  end
end

-- TLS failures are routine noise (scanners, broken clients): debug level.
core.stream_tls_log(function(msg) log.debug("TLS: %s", msg) end)

local SSL_KEYS = { certfile = true, keyfile = true, ca_certs = true, cert_reqs = true,
  ciphers = true, alpn_protocols = true, min_version = true }

-- Contexts are built once per ssl_options table, not per connection.
local contexts = setmetatable({}, { __mode = "k" })

--- The OpenSSL context for an ssl_options table (built once per table and
-- side). Raises with a message naming the file or key at fault.
-- @tparam table ssl_options `certfile`, `keyfile`, `ca_certs`, `cert_reqs`,
--   `ciphers`, `alpn_protocols`, `min_version`
-- @tparam boolean server_side
function M.ssl_context(ssl_options, server_side)
  if type(ssl_options) ~= "table" then
    error("ssl_options must be a table, got " .. type(ssl_options), 2)
  end
  local by_side = contexts[ssl_options]
  if not by_side then
    -- A typo (keyfle) would otherwise be ignored and fail far away.
    for k in pairs(ssl_options) do
      if not SSL_KEYS[k] then
        error(("ssl_options: unknown key %s (certfile, keyfile, ca_certs, cert_reqs, " ..
          "ciphers, alpn_protocols, min_version)"):format(
          type(k) == "string" and ("%q"):format(k) or tostring(k)), 2)
      end
    end
    by_side = {}
    contexts[ssl_options] = by_side
  end
  local side = server_side and "server" or "client"
  local ctx = by_side[side]
  if not ctx then
    local ok, res = pcall(core.ssl_context, ssl_options, server_side)
    if not ok then error(res, 2) end
    ctx = res
    by_side[side] = ctx
  end
  return ctx
end

local c_start_tls, c_handshake = methods._start_tls, methods._handshake

--- Put TLS under this stream (STARTTLS): flush what was written in
-- plaintext, then handshake. Data the peer sent after the plaintext part
-- is kept and read as TLS. Waits inside a coroutine for the handshake.
-- @tparam boolean server_side
-- @tparam table ssl_options
-- @tparam[opt] string server_hostname for SNI and verification (clients)
-- @treturn stream this same stream, now over TLS
-- @return nil, err (kind `tls`, `closed` or `timeout`)
function methods.start_tls(s, server_side, ssl_options, server_hostname)
  local ctx = M.ssl_context(ssl_options, server_side)
  local ok, err = s:flush()
  if not ok then return nil, err end
  ok, err = c_start_tls(s, ctx, server_hostname)
  if not ok then return nil, err end
  ok, err = c_handshake(s)
  if not ok then return nil, err end
  return s
end

--- Wait until the TLS handshake is done (a TLS server's handle_stream
-- starts while it may still run; get_alpn_protocol and
-- get_peer_certificate answer only after it). Waits inside a coroutine.
-- @tparam[opt] function callback callback style
-- @treturn boolean true
-- @return nil, err (kind `tls` with OpenSSL's reason, `closed`, `timeout`)
function methods.wait_for_handshake(s, callback)
  if not s:uses_tls() then
    error("wait_for_handshake: the stream does not use TLS", 2)
  end
  if callback ~= nil then
    if type(callback) ~= "function" then
      error("wait_for_handshake: callback must be a function", 2)
    end
    call_back(c_handshake, s, callback)
    return
  end
  return c_handshake(s)
end

--- Connect to a unix-domain stream socket (a local server's path, as
-- redis-server's unixsocket). Does not wait: a local connect succeeds or
-- fails at once.
-- @tparam string path
-- @tparam[opt] table opts the stream sizes (`max_buffer_size`...)
-- @treturn stream
-- @return nil, err (`refused`, `io`...)
function M.connect_unix(path, opts)
  if type(path) ~= "string" then error("path must be a string", 2) end
  if opts ~= nil and type(opts) ~= "table" then error("opts must be a table", 2) end
  return core.connect_unix(ioloop.current()._uv, path, opts)
end

--- Connect to host:port. Waits inside a coroutine.
-- @tparam string host a name (resolved without blocking the loop) or IP
-- @tparam number port
-- @tparam[opt] table opts `timeout`, `source_ip`, `source_port`,
--   `max_buffer_size`, `read_chunk_size`, `write_high_water`,
--   `max_write_buffer_size`, `ssl_options` (then the peer is verified
--   against the system CAs or `ca_certs` and `server_hostname`, default
--   `host`, unless `cert_reqs = "none"`)
-- @treturn stream
-- @return nil, err (kinds `resolve`, `refused`, `unreachable`, `timeout`,
--   `tls`, `io`)
function M.connect(host, port, opts, callback)
  if type(host) ~= "string" then error("host must be a string", 2) end
  if type(port) ~= "number" then error("port must be a number", 2) end
  if type(opts) == "function" and callback == nil then opts, callback = nil, opts end
  local loop = ioloop.current()
  if callback then
    call_back(function(_, ...) return M.connect(...) end, nil, callback, host, port, opts)
    return
  end
  local ssl_options = opts and opts.ssl_options
  local ctx = ssl_options and M.ssl_context(ssl_options, false)
  local t0 = loop:time()
  local s, err = core.connect(loop._uv, host, port, opts)
  if not s or not ctx then return s, err end
  -- The connect timeout bounds the handshake too.
  local timeout = opts.timeout
  if timeout then s:set_timeout(math.max(0.001, timeout - (loop:time() - t0))) end
  local ok
  ok, err = c_start_tls(s, ctx, opts.server_hostname or host)
  if ok then ok, err = c_handshake(s) end
  if not ok then
    s:close()
    return nil, err
  end
  if timeout then s:set_timeout(nil) end
  return s
end

return M
