--- IOStream: a TCP connection read and written from a coroutine.
--
-- The stream object is a userdata from runtime/stream.c; this module adds
-- the Lua side of its surface: callback style, `stream.error`,
-- `read_until_close(on_chunk)` and `connect`.
--
-- Inside a coroutine each read waits and returns its result, or `nil, err`
-- (docs/guide.md lists the error kinds). With a function as the last argument
-- a call returns at once and calls `callback(result, err)` later.
-- @module squall.iostream
local core = require "squall.core"
local ioloop = require "squall.ioloop"
local log = require "squall.log"
local netutil = require "squall.netutil"

local M = {}

local methods = core.stream_methods
local mt = core.stream_mt
-- The C methods as runtime/stream_lua.c made them, before this module
-- wraps some: kept in core, so a second load of this module (hot reload)
-- wraps them again instead of wrapping its own wrappers.
local c = core.stream_c_methods
if not c then
  c = {}
  for k, v in pairs(methods) do c[k] = v end
  core.stream_c_methods = c
end
local c_error = c._error
local create = coroutine.create
local resume = core.resume
local type, error, select, unpack = type, error, select, unpack

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

-- ---- callback style ----------------------------------------------------
-- Owned here, and only here: the C methods (runtime/stream_lua.c) know
-- only the direct style. Every waiting method also takes a function as
-- its last argument: it then runs in a coroutine of its own, returns at
-- once, and callback(result, err) runs on a later loop iteration.

--- Callback style: run `fn(s, ...)` in a coroutine of its own and pass
-- its results to `callback(result, err)` on a later loop iteration, never
-- synchronously (what every stream method does with a function last).
function M.call_back(fn, s, callback, ...)
  local loop = ioloop.current()
  local co = create(function(...)
    local r, err = fn(...)
    loop:add_callback(callback, r, err)
  end)
  resume(co, s, ...)
end

-- `direct` taking a callback as its last argument too.
local function callback_style(direct)
  return function(s, ...)
    local n = select("#", ...)
    if n > 0 and type((select(n, ...))) == "function" then
      local args = { ... }
      local callback = args[n]
      M.call_back(direct, s, callback, unpack(args, 1, n - 1))
      return
    end
    return direct(s, ...)
  end
end

local c_read_until_close = c.read_until_close
local c_read_bytes = c.read_bytes

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
    M.call_back(methods.read_until_close, s, callback, on_chunk)
    return
  end
  if on_chunk == nil then return c_read_until_close(s) end
  if type(on_chunk) ~= "function" then
    error("read_until_close: on_chunk must be a function", 2)
  end
  return read_chunks(s, on_chunk)
end

-- The hot path through the FFI (runtime/stream_lua.c): a line already
-- buffered, and a write that fits under write_high_water, are taken by
-- calls the JIT compiles into the handler's loop; everything else (parking,
-- errors, callbacks, TLS reads) goes to the C method, which decides it.
local ffi = require "ffi"
pcall(ffi.cdef, [[
int squall_stream_ffi_line(void *p, const char *delim, size_t dlen, double max_bytes);
const char *squall_stream_ffi_head(void *p);
void squall_stream_ffi_consume(void *p, size_t n);
int squall_stream_ffi_write(void *p, const char *data, size_t n);
]])
local C = ffi.C
local fast = pcall(function() return C.squall_stream_ffi_write end)
local ffi_string, getmetatable = ffi.string, getmetatable
local NO_LIMIT = 2 ^ 53 -- stands for "no max_bytes": no line is that long

local read_until = callback_style(c.read_until)
--- Read up to and including `delim`; see docs/api.md.
function methods.read_until(s, delim, max_bytes, ...)
  if fast and getmetatable(s) == mt and type(delim) == "string" and select("#", ...) == 0 then
    local limit = max_bytes
    if limit == nil then limit = NO_LIMIT end
    if type(limit) == "number" then
      local n = C.squall_stream_ffi_line(s, delim, #delim, limit)
      if n > 0 then
        local line = ffi_string(C.squall_stream_ffi_head(s), n)
        C.squall_stream_ffi_consume(s, n)
        return line
      end
    end
  end
  return read_until(s, delim, max_bytes, ...)
end

local write = c.write

methods.read_until_pattern = callback_style(c.read_until_pattern)
methods.read_bytes = callback_style(c.read_bytes)
methods.flush = callback_style(c.flush)
--- Queue data (a string or an array of strings) for writing; see docs/api.md.
-- With a callback, it is called with (true) once the data reached the
-- kernel, or (nil, err).
function methods.write(s, data, callback)
  if callback == nil then
    if fast and type(data) == "string" and getmetatable(s) == mt and
        C.squall_stream_ffi_write(s, data, #data) ~= 0 then
      return true
    end
    return write(s, data)
  end
  if type(callback) ~= "function" then
    error("write: callback must be a function", 2)
  end
  -- nowait: the callback, not the caller, learns when the bytes are out
  local ok, err = write(s, data, true)
  if not ok then
    ioloop.current():add_callback(callback, nil, err)
    return
  end
  M.call_back(methods.flush, s, callback)
end

--- write() for the n bytes at p (a pointer the FFI can read, such as an
-- FFI buffer): no string is made when they can be queued at once.
function M.write_bytes(s, p, n)
  if fast and getmetatable(s) == mt and C.squall_stream_ffi_write(s, p, n) ~= 0 then
    return true
  end
  return write(s, ffi_string(p, n))
end

-- Addresses a PROXY protocol header gave (weak: they go with the stream).
local peer_addresses = setmetatable({}, { __mode = "k" })
local c_getpeername = c.getpeername

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

local c_set_close_callback = c.set_close_callback
--- Call `fn()` once when the stream closes, whoever closed it (on the next
-- loop iteration when it is closed already). nil removes it.
function methods.set_close_callback(s, fn)
  if c_set_close_callback(s, fn) == false then
    ioloop.current():add_callback(fn)
  end
end

-- TLS failures are routine noise (scanners, broken clients): debug level.
core.stream_tls_log(function(msg) log.debug("TLS: %s", msg) end)

--- The OpenSSL context for an ssl_options table: netutil.ssl_context,
-- kept here under its old name.
M.ssl_context = netutil.ssl_context

local c_start_tls, c_handshake = c._start_tls, c._handshake
-- The C primitives stay off the stream's methods: start_tls,
-- wait_for_handshake and begin_tls below are their public faces.
methods._start_tls, methods._handshake = nil, nil

--- Put TLS under `s` with `ctx` (netutil.ssl_context) without waiting:
-- the handshake runs as data arrives, and the first read (or
-- wait_for_handshake) waits for it. TCPServer starts TLS on each accepted
-- stream so, and tcpclient before it waits for the handshake.
-- @treturn boolean true, or nil, err
function M.begin_tls(s, ctx, server_hostname)
  return c_start_tls(s, ctx, server_hostname)
end

--- Put TLS under this stream (STARTTLS): flush what was written in
-- plaintext, then handshake. Data the peer sent after the plaintext part
-- is kept and read as TLS. Waits inside a coroutine for the handshake.
-- @tparam boolean server_side
-- @tparam table ssl_options
-- @tparam[opt] string server_hostname for SNI and verification (clients)
-- @treturn stream this same stream, now over TLS
-- @return nil, err (kind `tls`, `closed` or `timeout`)
function methods.start_tls(s, server_side, ssl_options, server_hostname)
  local ctx = netutil.ssl_context(ssl_options, server_side)
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
    M.call_back(c_handshake, s, callback)
    return
  end
  return c_handshake(s)
end

--- iostream.connect and iostream.connect_unix are tcpclient.connect and
-- tcpclient.connect_unix, kept here under their old names. Looked up when
-- first used, as squall.tcpclient is built on this module.
setmetatable(M, { __index = function(_, k)
  if k == "connect" or k == "connect_unix" then return require("squall.tcpclient")[k] end
end })

return M
