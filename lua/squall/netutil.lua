--- Listening sockets.
-- @module squall.netutil
local core = require "squall.core"
local ioloop = require "squall.ioloop"
local log = require "squall.log"

local util = require "squall.util"

local M = {}

local listening = 0 -- accept handlers added and not removed

-- opts.family -> what core.bind_sockets takes (0: every family, as nil)
local FAMILIES = { inet = 4, inet6 = 6, [4] = 4, [6] = 6, unspec = 0 }

--- Bind listening sockets for `address` (nil or "" for every interface)
-- and `port`: one socket per address it resolves to, IPv4 and IPv6 each on
-- their own (IPV6_V6ONLY). Port 0 picks a free port, the same for all of
-- them. SO_REUSEADDR is always set; the sockets are close-on-exec.
-- @tparam number port
-- @tparam[opt] string address
-- @tparam[opt] table opts `family` ("unspec", the default: every family;
--   "inet", "inet6", 4 or 6), `backlog`
--   (default 128), `reuse_port` (SO_REUSEPORT)
-- @treturn table a list of sockets (`fileno`, `getsockname`, `close`)
-- @return nil, err (kinds `resolve`, `address_in_use`, `io`)
function M.bind_sockets(port, address, opts)
  util.check_main_thread("netutil.bind_sockets", 2)
  util.check_port(port, 2)
  if address ~= nil and type(address) ~= "string" then
    error("address must be a string or nil, got " .. type(address), 2)
  end
  opts = opts or {}
  local family = opts.family
  if family ~= nil then
    family = FAMILIES[family]
    if not family then error("unknown family " .. tostring(opts.family), 2) end
    if family == 0 then family = nil end
  end
  return core.bind_sockets(port, address, family, opts.backlog or 128,
    opts.reuse_port and true or false)
end

--- Accept connections on `sock` and call `callback(stream, address)` for
-- each, on the loop (address is `{host=, port=}`). At most a backlog's
-- worth is accepted per readiness event; aborted connections are skipped;
-- when the process runs out of file descriptors accepting pauses briefly
-- (logged once) instead of spinning.
-- @param sock a socket from bind_sockets
-- @tparam function callback
-- @tparam[opt] table opts stream options (`max_buffer_size`, ...)
-- @treturn function call it to stop accepting (the socket stays open)
function M.add_accept_handler(sock, callback, opts)
  if type(callback) ~= "function" then
    error("callback must be a function, got " .. type(callback), 2)
  end
  local acceptor = core.accept(ioloop.current():core_loop(), sock, function(stream, address)
    if stream == nil then
      -- runtime/tcp.c pauses accepting itself when fds run out.
      log.error("accepting on %s failed: %s", tostring(sock), tostring(address))
      return
    end
    callback(stream, address)
  end, opts)
  listening = listening + 1
  local removed = false
  return function()
    if not removed then
      removed = true
      listening = listening - 1
    end
    acceptor:close()
  end
end

--- How many accept handlers are on (added and not removed).
function M.listening()
  return listening
end

local ffi = require "ffi"
pcall(ffi.cdef, "int getpid(void); int getppid(void); int unsetenv(const char *name);")

--- The listening sockets systemd passed by socket activation
-- (`LISTEN_PID`, `LISTEN_FDS`; fds 3, 4, ...), for `server:add_sockets`.
-- Empty when this process was not socket-activated. As sd_listen_fds(1),
-- it unsets the variables, so a program it starts does not take them
-- again. Works before fork_processes (the children inherit the sockets,
-- as with bind) and in its children after it: systemd named their parent.
-- @treturn table a list of sockets (as bind_sockets gives)
function M.systemd_sockets()
  local pid, n = tonumber(os.getenv("LISTEN_PID")), tonumber(os.getenv("LISTEN_FDS"))
  if not pid or not n or n < 1 then return {} end
  if pid ~= ffi.C.getpid() and not (core.task_id() and pid == ffi.C.getppid()) then
    return {}
  end
  ffi.C.unsetenv("LISTEN_PID")
  ffi.C.unsetenv("LISTEN_FDS")
  ffi.C.unsetenv("LISTEN_FDNAMES")
  local socks = {}
  for fd = 3, 3 + n - 1 do socks[#socks + 1] = core.adopt_socket(fd) end
  return socks
end

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

return M
