--- MySQL authentication, squall.mysql's own (not a public module): the
-- handshake, the password scrambles (mysql_native_password,
-- caching_sha2_password, mysql_clear_password) and the exchanges after the
-- handshake response.
local core = require "squall.core"

local sub, byte, char, format = string.sub, string.byte, string.char, string.format
local rep, concat, band, bor, bxor = string.rep, table.concat, bit.band, bit.bor, bit.bxor
local W = require "squall.mysql.wire"
local packet_kind = W.packet_kind
local protocol_error, u16, u32, nul_str, le32 = W.protocol_error, W.u16, W.u32, W.nul_str, W.le32
local lenenc_int, read_packet, send, parse_err = W.lenenc_int, W.read_packet, W.send, W.parse_err
local CLIENT_LONG_PASSWORD, CLIENT_LONG_FLAG = W.CLIENT_LONG_PASSWORD, W.CLIENT_LONG_FLAG
local CLIENT_CONNECT_WITH_DB, CLIENT_PROTOCOL_41 = W.CLIENT_CONNECT_WITH_DB, W.CLIENT_PROTOCOL_41
local CLIENT_SSL, CLIENT_TRANSACTIONS = W.CLIENT_SSL, W.CLIENT_TRANSACTIONS
local CLIENT_SECURE_CONNECTION = W.CLIENT_SECURE_CONNECTION
local CLIENT_MULTI_RESULTS = W.CLIENT_MULTI_RESULTS
local CLIENT_PS_MULTI_RESULTS = W.CLIENT_PS_MULTI_RESULTS
local CLIENT_PLUGIN_AUTH = W.CLIENT_PLUGIN_AUTH
local CLIENT_PLUGIN_AUTH_LENENC = W.CLIENT_PLUGIN_AUTH_LENENC
local CLIENT_DEPRECATE_EOF, MAX_PAYLOAD = W.CLIENT_DEPRECATE_EOF, W.MAX_PAYLOAD
local CHARSETS, broken = W.CHARSETS, W.broken

local A = {}

-- ---- authentication --------------------------------------------------------

local function xor_strings(a, b)
  local out = {}
  for k = 1, #a do
    out[k] = char(bxor(byte(a, k), byte(b, (k - 1) % #b + 1)))
  end
  return concat(out)
end

-- mysql_native_password: SHA1(pw) XOR SHA1(scramble .. SHA1(SHA1(pw))).
local function native_scramble(password, scramble)
  if password == "" then return "" end
  local h1 = core.digest("sha1", password)
  return xor_strings(h1, core.digest("sha1", scramble .. core.digest("sha1", h1)))
end

-- caching_sha2_password: SHA256(pw) XOR SHA256(SHA256(SHA256(pw)) .. scramble).
local function sha2_scramble(password, scramble)
  if password == "" then return "" end
  local h1 = core.digest("sha256", password)
  return xor_strings(h1, core.digest("sha256", core.digest("sha256", h1) .. scramble))
end

-- The answer to `plugin`'s challenge, or nil, why. The password goes in
-- clear (mysql_clear_password) only over TLS or a unix socket, as
-- libmysqlclient refuses it elsewhere.
local function auth_response(plugin, password, scramble, secure)
  if plugin == "mysql_native_password" then return native_scramble(password, scramble) end
  if plugin == "caching_sha2_password" then return sha2_scramble(password, scramble) end
  if plugin == "mysql_clear_password" then
    if not secure then
      return nil, "the server asked for the password in clear (mysql_clear_password); " ..
        "that needs ssl_options or a unix socket"
    end
    return password .. "\0"
  end
  return nil, format("authentication plugin %q is not supported", plugin)
end

-- Authentication takes at most a switch and caching_sha2_password's
-- exchanges (public key, then the encrypted password): a server asking
-- again and again is refused, not answered for ever.
local MAX_AUTH_ROUNDS = 8

-- After the handshake response: OK, or an auth switch, or
-- caching_sha2_password's more-data exchanges.
local function finish_auth(self, plugin, password, scramble)
  for _ = 1, MAX_AUTH_ROUNDS do
    local p, err = read_packet(self)
    if not p then return nil, err end
    local kind = packet_kind(p)
    if kind == "OK" then
      return true
    elseif kind == "ERR" then
      return nil, parse_err(p)
    elseif kind == "EOF" then -- an authentication switch
      if #p == 1 then
        return nil, core.error("mysql", "the server asked for the old (pre-4.1) password hash, " ..
          "which is not supported")
      end
      local data
      plugin, data = nul_str(p, 2)
      scramble = sub(p, data)
      if byte(scramble, -1) == 0 then scramble = sub(scramble, 1, -2) end
      local resp, why = auth_response(plugin, password, scramble, self._secure)
      if not resp then return nil, core.error("mysql", why) end
      local ok
      ok, err = send(self, resp)
      if not ok then return nil, err end
    elseif kind == "MORE_DATA" and plugin == "caching_sha2_password" then
      local what = byte(p, 2)
      if what == 0x04 then
        -- full authentication: the password in clear over TLS or a unix
        -- socket, else encrypted with the server's RSA key
        local ok
        if self._secure then
          ok, err = send(self, password .. "\0")
        else
          ok, err = send(self, "\2")
          if not ok then return nil, err end
          local key
          key, err = read_packet(self)
          if not key then return nil, err end
          if packet_kind(key) ~= "MORE_DATA" then
            return nil, core.error("mysql", "the server sent no public key")
          end
          local enc, why = core.rsa_encrypt(sub(key, 2), xor_strings(password .. "\0", scramble))
          if not enc then
            return nil, core.error("mysql", "the server's public key is unusable: " .. why)
          end
          ok, err = send(self, enc)
        end
        if not ok then return nil, err end
      elseif what ~= 0x03 then -- 0x03: fast authentication succeeded; OK follows
        return nil, protocol_error("unexpected authentication data")
      end
    else
      return nil, protocol_error("unexpected packet during authentication")
    end
  end
  return nil, protocol_error(format("more than %d authentication round trips", MAX_AUTH_ROUNDS))
end


local function handshake(self, opts)
  local p, err = read_packet(self)
  if not p then return nil, err end
  if packet_kind(p) == "ERR" then return nil, parse_err(p) end
  if byte(p, 1) ~= 10 then
    return nil, protocol_error(format("unsupported protocol version %d", byte(p, 1)))
  end
  local version, i = nul_str(p, 2)
  self.server_version = version:gsub("^5%.5%.5%-", "") -- MariaDB's replication prefix
  self.thread_id = u32(p, i)
  local scramble = sub(p, i + 4, i + 11)
  local caps = u16(p, i + 13)
  local auth_len
  if #p > i + 18 then
    caps = caps + u16(p, i + 18) * 65536
    auth_len = byte(p, i + 20)
  end
  local plugin = "mysql_native_password"
  if auth_len then
    local rest_len = math.max(13, auth_len - 8)
    scramble = scramble .. sub(p, i + 31, i + 31 + rest_len - 2) -- without its NUL
    if band(caps, CLIENT_PLUGIN_AUTH) ~= 0 then
      plugin = nul_str(p, i + 31 + rest_len)
    end
  end
  if band(caps, CLIENT_PROTOCOL_41) == 0 then
    return nil, protocol_error("the server does not speak protocol 4.1")
  end

  local want = bor(CLIENT_LONG_PASSWORD, CLIENT_LONG_FLAG, CLIENT_PROTOCOL_41,
    CLIENT_TRANSACTIONS, CLIENT_SECURE_CONNECTION, CLIENT_MULTI_RESULTS,
    CLIENT_PS_MULTI_RESULTS, CLIENT_PLUGIN_AUTH, CLIENT_PLUGIN_AUTH_LENENC, CLIENT_DEPRECATE_EOF)
  if opts.database then want = bor(want, CLIENT_CONNECT_WITH_DB) end
  local client_caps = band(want, caps)
  if band(caps, CLIENT_DEPRECATE_EOF) ~= 0 then self._deprecate_eof = true end
  local charset = CHARSETS[opts.charset or "utf8mb4"]
  self._secure = opts.path ~= nil

  if opts.ssl_options then
    if band(caps, CLIENT_SSL) == 0 then
      return nil, core.error("tls", "the server does not support TLS")
    end
    client_caps = bor(client_caps, CLIENT_SSL)
    local ok
    ok, err = send(self, le32(client_caps) .. le32(MAX_PAYLOAD) .. char(charset) .. rep("\0", 23))
    if not ok then return nil, err end
    ok, err = self.stream:start_tls(false, opts.ssl_options,
      opts.server_hostname or opts.host or "127.0.0.1")
    if not ok then return broken(self, err) end
    self._secure = true
  end

  local password = opts.password or ""
  local resp = auth_response(plugin, password, scramble, self._secure)
  if not resp then -- answer with the native hash; the server switches us
    plugin = "mysql_native_password"
    resp = native_scramble(password, scramble)
  end
  local parts = { le32(client_caps), le32(MAX_PAYLOAD), char(charset), rep("\0", 23),
    (opts.user or "") .. "\0" }
  if band(client_caps, CLIENT_PLUGIN_AUTH_LENENC) ~= 0 then
    parts[#parts + 1] = lenenc_int(#resp) .. resp
  else
    parts[#parts + 1] = char(#resp) .. resp
  end
  if band(client_caps, CLIENT_CONNECT_WITH_DB) ~= 0 then
    parts[#parts + 1] = opts.database .. "\0"
  end
  if band(client_caps, CLIENT_PLUGIN_AUTH) ~= 0 then parts[#parts + 1] = plugin .. "\0" end
  local ok
  ok, err = send(self, concat(parts))
  if not ok then return nil, err end
  return finish_auth(self, plugin, password, scramble)
end

--- Connect (inside a coroutine) and authenticate.
-- @tparam table opts `host` ("127.0.0.1"), `port` (3306) or `path` (a unix
--   socket), `user`, `password`, `database`, `charset` ("utf8mb4"),
--   `timeout` (seconds: for the whole connect, TLS and authentication
--   included, then for each wait after), `ssl_options` (TLS, as
--   iostream's), `server_hostname`, `max_buffer_size` (the largest result,
--   default 100 MiB: its bytes and an estimate of the tables built for
--   it), `compact_arrays` (rows as arrays in column order)
-- @treturn Connection
-- @return nil, err: I/O kinds as iostream.connect, `mysql` (a wrong
--   password: err.code 1045), `tls`, `protocol`, `timeout`

A.native_scramble = native_scramble
A.sha2_scramble = sha2_scramble
A.handshake = handshake

return A
