--- HTTP/1.1 client: `fetch(url, opts)` from a coroutine.
--
--     local httpclient = require "squall.httpclient"
--     local res, err = httpclient.fetch("http://127.0.0.1:8080/x?y=1")
--     -- res.code, res.reason, res.headers (any case), res.body
--
-- Connections are kept alive in a pool per scheme, host and port (and TLS
-- options); responses are parsed by the same llhttp parser the server
-- uses (runtime/http.c). An HTTP error status is a response, not an error;
-- `nil, err` is for I/O failures (the core kinds: `refused`, `timeout`,
-- `closed`, `tls`, `resolve`...) and for a response that breaks HTTP
-- (kind `http`).
-- @module squall.httpclient
local core = require "squall.core"
local http = require "squall.http"
local ioloop = require "squall.ioloop"
local tcpclient = require "squall.tcpclient"
local util = require "squall.util"

local M = {}

local type, tostring, error, tonumber, pairs = type, tostring, error, tonumber, pairs
local find, lower, sub, format = string.find, string.lower, string.sub, string.format
local concat = table.concat
local now = core.time
local HEADERS_MT = http.HEADERS_MT

--- Idle connections kept per scheme, host and port.
M.max_idle_per_host = 16
--- Seconds an idle pooled connection is kept (servers close theirs too:
-- Tornado's and nginx's defaults are 60 and 75 seconds).
M.idle_seconds = 50

local DEFAULT_PORTS = { http = 80, https = 443 }

--- Split an absolute http(s) URL: scheme, host, port, target ("/p?q").
-- Returns nil, message for anything else.
function M.parse_url(url)
  if type(url) ~= "string" then return nil, "the URL must be a string" end
  local scheme, rest = url:match("^(%a[%w+.-]*)://(.*)$")
  scheme = scheme and lower(scheme)
  if not scheme or not DEFAULT_PORTS[scheme] then
    return nil, "not an http:// or https:// URL: " .. url
  end
  local authority, target = rest:match("^([^/?#]*)(.*)$")
  target = target:gsub("#.*$", "")
  if target == "" then target = "/" elseif sub(target, 1, 1) == "?" then target = "/" .. target end
  authority = authority:gsub("^.*@", "") -- userinfo is not sent
  local host, port = authority:match("^%[([^%]]+)%]:?(%d*)$")
  if not host then host, port = authority:match("^([^:]+):?(%d*)$") end
  if not host or host == "" then return nil, "no host in URL: " .. url end
  port = port ~= "" and tonumber(port) or DEFAULT_PORTS[scheme]
  if port < 1 or port > 65535 then return nil, "bad port in URL: " .. url end
  return scheme, host, port, target
end
local parse_url = M.parse_url

-- ---- the pool ----------------------------------------------------------------

-- key -> list of { stream, parser, data, pos, since }
local pools = setmetatable({}, { __mode = "k" })

local function pool_of(loop)
  local p = pools[loop]
  if not p then
    p = {}
    pools[loop] = p
  end
  return p
end

local function take(key)
  local list = pool_of(ioloop.current())[key]
  local t = now()
  while list and #list > 0 do
    local c = list[#list]
    list[#list] = nil
    if not c.stream:closed() and t - c.since < M.idle_seconds then return c end
    c.stream:close()
  end
  return nil
end

local function give_back(key, c)
  local pool = pool_of(ioloop.current())
  local list = pool[key]
  if not list then
    list = {}
    pool[key] = list
  end
  if #list >= M.max_idle_per_host then
    c.stream:close()
    return
  end
  c.since = now()
  c.stream:set_timeout(nil)
  list[#list + 1] = c
end

--- Close every idle pooled connection (of the current loop).
function M.close_idle()
  local pool = pool_of(ioloop.current())
  for key, list in pairs(pool) do
    for _, c in ipairs(list) do c.stream:close() end
    pool[key] = nil
  end
end

-- ---- one request ----------------------------------------------------------------

local function http_error(msg)
  return core.error("http", msg)
end

local function timeout_error(secs)
  return core.error("timeout", format("the request timed out after %g seconds", secs))
end

-- The request's bytes.
local function request_text(method, host, port, scheme, target, headers, body, level)
  local text, has = "", {}
  if headers then text, has = http.header_lines(headers, level + 1) end
  if not has.host then
    local h = find(host, ":", 1, true) and "[" .. host .. "]" or host
    if port ~= DEFAULT_PORTS[scheme] then h = h .. ":" .. port end
    text = "Host: " .. h .. "\r\n" .. text
  end
  if not has["user-agent"] then text = text .. "User-Agent: squall\r\n" end
  if body and not has["content-length"] and not has["transfer-encoding"] then
    text = text .. "Content-Length: " .. #body .. "\r\n"
  elseif not body and (method == "POST" or method == "PUT" or method == "PATCH") and
      not has["content-length"] then
    text = text .. "Content-Length: 0\r\n"
  end
  return method .. " " .. target .. " HTTP/1.1\r\n" .. text .. "\r\n" .. (body or "")
end

-- Read one response on c. Returns the response table and whether the
-- connection can be used again, or nil, err, and whether any byte of the
-- response came (a pooled connection the server had closed gives none).
local function read_response(c, method, deadline, secs, max_body)
  local parser = c.parser
  parser:expect_no_body(method == "HEAD")
  local res, parts, n, got = nil, {}, 0, false
  while true do
    if c.pos > #c.data then
      local left = deadline - now()
      if left <= 0 then return nil, timeout_error(secs), got end
      c.stream:set_timeout(left)
      local chunk, err = c.stream:read_bytes(65536, true)
      if not chunk then
        if err.kind == "closed" and c.stream.error == nil and res then
          -- a body that runs until the close
          local done, status, reason = parser:finish()
          if status then return nil, http_error(reason), true end
          if done then
            res.body = concat(parts, "", 1, n)
            return res, false
          end
        end
        if err.kind == "timeout" then err = timeout_error(secs) end
        return nil, err, got
      end
      got = true
      c.data, c.pos = chunk, 1
    end
    local pos, head, done, body, status, reason, code, why, _, _, headers, keep =
      parser:execute(c.data, c.pos)
    c.pos = pos
    if status then return nil, http_error("bad response: " .. tostring(reason)), true end
    if head then
      res = { code = code, reason = why, headers = setmetatable(headers, HEADERS_MT),
        keep_alive = keep }
      n = 0
    end
    if body then
      n = n + 1
      parts[n] = body
      max_body = max_body - #body
      if max_body < 0 then
        return nil, http_error("the response body is larger than max_body_size"), true
      end
    end
    if done then
      if res.code >= 100 and res.code < 200 and res.code ~= 101 then
        res = nil -- an interim response (100 Continue): the real one follows
      else
        res.body = concat(parts, "", 1, n)
        return res, res.keep_alive and res.code ~= 101
      end
    end
  end
end

local IDEMPOTENT = { GET = true, HEAD = true, PUT = true, DELETE = true, OPTIONS = true,
  TRACE = true }

local function one(scheme, host, port, target, opts, deadline, level)
  local method = opts.method
  local key = scheme .. "://" .. host .. ":" .. port ..
    (opts.ssl_options and ("#" .. tostring(opts.ssl_options)) or "")
  local text = request_text(method, host, port, scheme, target, opts.headers, opts.body,
    level + 1)
  local secs = opts.timeout
  for attempt = 1, 2 do
    local c = take(key)
    local reused = c ~= nil
    if not c then
      local left = deadline - now()
      if left <= 0 then return nil, timeout_error(secs) end
      local s, err = tcpclient.connect(host, port, {
        timeout = left, ssl_options = scheme == "https" and (opts.ssl_options or {}) or nil,
        server_hostname = opts.server_hostname })
      if not s then return nil, err end
      c = { stream = s, parser = core.http_parser("response", opts.max_header_size or 65536),
        data = "", pos = 1 }
    end
    local ok, err = c.stream:write(text)
    local res, again, got
    if ok then
      res, again, got = read_response(c, method, deadline, secs, opts.max_body_size or 104857600)
      if not res then err = again end
    else
      got = false
    end
    if res then
      if again and c.pos > #c.data then give_back(key, c) else c.stream:close() end
      return res
    end
    c.stream:close()
    -- a kept-alive connection the server closed meanwhile: once more on a
    -- new one, when the request may be sent twice
    if not (reused and not got and IDEMPOTENT[method] and attempt == 1 and
        err.kind ~= "timeout") then
      return nil, err
    end
  end
end

local REDIRECTS = { [301] = true, [302] = true, [303] = true, [307] = true, [308] = true }

-- Where a Location header leads from the URL it answered.
local function resolve(base_scheme, base_host, base_port, base_target, location)
  if location:match("^%a[%w+.-]*://") then return location end
  local origin = base_scheme .. "://" ..
    (find(base_host, ":", 1, true) and "[" .. base_host .. "]" or base_host) .. ":" .. base_port
  if sub(location, 1, 2) == "//" then return base_scheme .. ":" .. location end
  if sub(location, 1, 1) == "/" then return origin .. location end
  local dir = base_target:gsub("[?#].*$", ""):match("^(.*/)") or "/"
  return origin .. dir .. location
end

local OPTS = { method = true, headers = true, body = true, timeout = true, ssl_options = true,
  follow_redirects = true, max_redirects = true, max_body_size = true, max_header_size = true,
  server_hostname = true }

--- Fetch `url`; waits inside a coroutine.
-- @tparam string url `http://` or `https://`
-- @tparam[opt] table opts `method` ("GET"), `headers`, `body` (a string),
--   `timeout` (seconds for the whole request, 20), `ssl_options` (as
--   tcpclient's; https verifies against the system CAs by default),
--   `follow_redirects` (false), `max_redirects` (5), `max_body_size`
-- @return the response { code, reason, headers, body, url }, or nil, err
function M.fetch(url, opts)
  util.need_coroutine("httpclient.fetch", 2)
  opts = opts or {}
  if type(opts) ~= "table" then
    error("fetch: opts must be a table, got " .. util.describe(opts), 2)
  end
  for k in pairs(opts) do
    if not OPTS[k] then error("fetch: unknown option " .. util.describe(k), 2) end
  end
  local o = {}
  for k, v in pairs(opts) do o[k] = v end
  o.method = o.method and tostring(o.method):upper() or "GET"
  if not o.method:match("^[%u%-]+$") then
    error("fetch: bad method " .. util.describe(opts.method), 2)
  end
  if o.body ~= nil and type(o.body) ~= "string" then
    error("fetch: body must be a string, got " .. util.describe(o.body), 2)
  end
  if o.headers ~= nil and type(o.headers) ~= "table" then
    error("fetch: headers must be a table, got " .. util.describe(o.headers), 2)
  end
  o.timeout = o.timeout or 20
  if type(o.timeout) ~= "number" or o.timeout <= 0 then
    error("fetch: timeout must be a positive number, got " .. util.describe(o.timeout), 2)
  end
  local deadline = now() + o.timeout
  local left = o.follow_redirects and (o.max_redirects or 5) or 0
  while true do
    local scheme, host, port, target = parse_url(url)
    if not scheme then error("fetch: " .. host, 2) end
    local res, err = one(scheme, host, port, target, o, deadline, 2)
    if not res then return nil, err end
    res.url = url
    local location = res.headers.location
    if not (REDIRECTS[res.code] and location and left > 0) then return res end
    left = left - 1
    url = resolve(scheme, host, port, target, location)
    if res.code == 303 or ((res.code == 301 or res.code == 302) and o.method == "POST") then
      o.method, o.body = "GET", nil
    end
  end
end

return M
