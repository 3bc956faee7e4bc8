--- TCPClient: open a stream to a server.
--
--     local stream, err = TCPClient():connect("example.com", 80, {timeout = 5})
--     local stream, err = tcpclient.connect("example.com", 80, {timeout = 5})
--
-- The module is the TCPClient class (call it for a client); `connect` and
-- `connect_unix` also work as plain functions of the module, and
-- iostream.connect and iostream.connect_unix are these same functions.
-- @module squall.tcpclient
local core = require "squall.core"
local ioloop = require "squall.ioloop"
local iostream = require "squall.iostream"
local netutil = require "squall.netutil"
local util = require "squall.util"

local type, error, pairs, max = type, error, pairs, math.max
local getmetatable, setmetatable = getmetatable, setmetatable

local TCPClient = util.class()

--- Create a client. (Options for every connect may be given here.)
function TCPClient.new(_, defaults)
  return setmetatable({ _defaults = defaults or {} }, TCPClient)
end

-- An error says what it was connecting to ("refused: connecting to
-- 127.0.0.1:6379: connection refused"), so a pool's or a client's failure
-- names its server.
local function where(err, to, name)
  local msg = type(err) == "table" and err.message
  if type(msg) == "string" then
    if name and msg:sub(1, #name + 2) == name .. ": " then msg = msg:sub(#name + 3) end
    err.message = "connecting to " .. to .. ": " .. msg
  end
  return err
end

-- Connect to host:port (the work of both forms of connect).
local function connect(host, port, opts, callback, level)
  if type(host) ~= "string" then error("host must be a string", level) end
  if type(port) ~= "number" then error("port must be a number", level) end
  if type(opts) == "function" and callback == nil then opts, callback = nil, opts end
  local loop = ioloop.current()
  if callback then
    iostream.call_back(function(_, ...) return connect(...) end, nil, callback, host, port, opts,
      nil, 2)
    return
  end
  util.need_coroutine("connect", level)
  local ssl_options = opts and opts.ssl_options
  local ctx = ssl_options and netutil.ssl_context(ssl_options, false)
  local t0 = loop:time()
  local s, err = core.connect(loop:core_loop(), host, port, opts)
  if not s then return nil, where(err, host .. ":" .. port, host) end
  if not ctx then return s end
  -- The connect timeout bounds the handshake too.
  local timeout = opts.timeout
  if timeout then s:set_timeout(max(0.001, timeout - (loop:time() - t0))) end
  local ok
  ok, err = iostream.begin_tls(s, ctx, opts.server_hostname or host)
  if ok then ok, err = s:wait_for_handshake() end
  if not ok then
    s:close()
    return nil, err
  end
  if timeout then s:set_timeout(nil) end
  return s
end

--- Connect to host:port; waits inside a coroutine. As a method of a
-- client, the client's default options apply first.
-- @tparam string host a name (resolved without blocking the loop) or IP
-- @tparam number port
-- @tparam[opt] table opts `timeout`, `source_ip`, `source_port`,
--   `max_buffer_size`, `read_chunk_size`, `write_high_water`,
--   `max_write_buffer_size`, `ssl_options` (then the peer is verified
--   against the system CAs or `ca_certs` and `server_hostname`, default
--   `host`, unless `cert_reqs = "none"`)
-- @tparam[opt] function callback callback style: callback(stream, err)
-- @treturn stream
-- @return nil, err (kinds `resolve`, `refused`, `unreachable`, `timeout`,
--   `tls`, `io`)
function TCPClient.connect(...)
  local first = ...
  local s, err
  -- (not tail calls: misuse raises at level 3, the caller of this function)
  if getmetatable(first) ~= TCPClient then
    local host, port, opts, callback = ...
    s, err = connect(host, port, opts, callback, 3)
    return s, err
  end
  local self, host, port, opts = ...
  local merged = {}
  for k, v in pairs(self._defaults) do merged[k] = v end
  for k, v in pairs(opts or {}) do merged[k] = v end
  s, err = connect(host, port, merged, nil, 3)
  return s, err
end

--- Connect to a unix-domain stream socket (a local server's path, as
-- redis-server's unixsocket). Does not wait: a local connect succeeds or
-- fails at once.
-- @tparam string path
-- @tparam[opt] table opts the stream sizes (`max_buffer_size`...)
-- @treturn stream
-- @return nil, err (`refused`, `io`...)
function TCPClient.connect_unix(path, opts)
  if type(path) ~= "string" then error("path must be a string", 2) end
  if opts ~= nil and type(opts) ~= "table" then error("opts must be a table", 2) end
  local s, err = core.connect_unix(ioloop.current():core_loop(), path, opts)
  if not s then return nil, where(err, path) end
  return s
end

--- Nothing to release; here for Tornado compatibility.
function TCPClient:close() end -- luacheck: ignore 212

return TCPClient
