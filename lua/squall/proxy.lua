--- The PROXY protocol (HAProxy's send-proxy and send-proxy-v2): the header
-- a load balancer puts in front of a connection to say who the client is.
--
-- `proxy.parse(bytes)` is a pure parser (fuzzed alone by
-- tests/fuzz/proxy_fuzz.lua); `proxy.read_header(stream)` takes
-- exactly the header off a stream, never a byte of what follows. The
-- specification: haproxy's doc/proxy-protocol.txt.
-- @module squall.proxy
local bit = require "bit"

local M = {}

local byte, sub, find, format = string.byte, string.sub, string.find, string.format
local band, rshift = bit.band, bit.rshift

local V1_MAX = 107 -- "PROXY TCP6 <39> <39> <5> <5>\r\n"
local V2_SIG = "\r\n\r\n\0\r\nQUIT\n"
M.V2_SIGNATURE = V2_SIG

local function be16(s, i)
  local a, b = byte(s, i, i + 1)
  return a * 256 + b
end

local function ipv4(s, i)
  local a, b, c, d = byte(s, i, i + 3)
  return format("%d.%d.%d.%d", a, b, c, d)
end

local function ipv6(s, i)
  local parts = {}
  for k = 0, 7 do parts[k + 1] = format("%x", be16(s, i + 2 * k)) end
  -- the shortest form: the longest run of zero groups becomes "::"
  local best, best_len, run, run_len = nil, 1, nil, 0
  for k = 1, 8 do
    if parts[k] == "0" then
      if not run then run, run_len = k, 0 end
      run_len = run_len + 1
      if run_len > best_len then best, best_len = run, run_len end
    else
      run = nil
    end
  end
  if not best then return table.concat(parts, ":") end
  local head = table.concat(parts, ":", 1, best - 1)
  local tail = table.concat(parts, ":", best + best_len, 8)
  return head .. "::" .. tail
end

local function valid_v4(a)
  local p = { a:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$") }
  if #p ~= 4 then return false end
  for _, n in ipairs(p) do
    if #n > 3 or tonumber(n) > 255 then return false end
  end
  return true
end

local function valid_port(p)
  local n = tonumber(p)
  return p:match("^%d+$") and #p <= 5 and n <= 65535 and n
end

-- A v1 line without its "\r\n".
local function parse_v1(line)
  local proto, rest = line:match("^PROXY (%u+%d?)(.*)$")
  if not proto then return nil, "not a PROXY v1 header" end
  if proto == "UNKNOWN" then
    return { version = 1, command = "LOCAL", family = "UNKNOWN" }
  end
  if proto ~= "TCP4" and proto ~= "TCP6" then
    return nil, "unknown PROXY v1 protocol " .. proto
  end
  local src, dst, sport, dport = rest:match("^ (%S+) (%S+) (%S+) (%S+)$")
  if not src then return nil, "a malformed PROXY v1 header" end
  if proto == "TCP4" and not (valid_v4(src) and valid_v4(dst)) then
    return nil, "a PROXY v1 header with a bad IPv4 address"
  end
  if proto == "TCP6" and not (src:match("^[%x:.]+$") and src:find(":") and
      dst:match("^[%x:.]+$") and dst:find(":")) then
    return nil, "a PROXY v1 header with a bad IPv6 address"
  end
  local sp, dp = valid_port(sport), valid_port(dport)
  if not (sp and dp) then return nil, "a PROXY v1 header with a bad port" end
  return { version = 1, command = "PROXY", family = proto, src_addr = src, src_port = sp,
    dst_addr = dst, dst_port = dp }
end

-- The 16-byte v2 fixed part: its command, family and how long the rest is.
local function v2_fixed(s)
  if sub(s, 1, 12) ~= V2_SIG then return nil, "not a PROXY v2 header" end
  local vc, fam = byte(s, 13, 14)
  if rshift(vc, 4) ~= 2 then return nil, "PROXY v2 with an unknown version" end
  local cmd = band(vc, 15)
  if cmd > 1 then return nil, "PROXY v2 with an unknown command" end
  return cmd, fam, be16(s, 15)
end

-- The v2 header with this command and family (from v2_fixed) and this
-- address block.
local function parse_v2(cmd, fam, body)
  local info = { version = 2, command = cmd == 1 and "PROXY" or "LOCAL", family = "UNKNOWN" }
  if cmd == 0 then return info end -- LOCAL: health checks; addresses ignored
  local af, proto = rshift(fam, 4), band(fam, 15)
  if proto ~= 1 then return info end -- not a stream: treated as unknown
  if af == 1 then
    if #body < 12 then return nil, "PROXY v2 TCP4 address block too short" end
    info.family = "TCP4"
    info.src_addr, info.dst_addr = ipv4(body, 1), ipv4(body, 5)
    info.src_port, info.dst_port = be16(body, 9), be16(body, 11)
  elseif af == 2 then
    if #body < 36 then return nil, "PROXY v2 TCP6 address block too short" end
    info.family = "TCP6"
    info.src_addr, info.dst_addr = ipv6(body, 1), ipv6(body, 17)
    info.src_port, info.dst_port = be16(body, 33), be16(body, 35)
  end
  return info
end

--- Parse a PROXY header at the start of `bytes`.
-- @treturn table the header: `version` (1 or 2), `command` ("PROXY", or
--   "LOCAL" for a health check or v1's UNKNOWN), `family` ("TCP4",
--   "TCP6", "UNKNOWN"), and for PROXY over TCP `src_addr`, `src_port`,
--   `dst_addr`, `dst_port`
-- @treturn number how many bytes the header took
-- @return nil while `bytes` may still become a header (incomplete)
-- @return nil, err when it cannot
function M.parse(bytes)
  if #bytes == 0 then return nil end
  if byte(bytes, 1) == 13 then -- v2 starts "\r\n"
    local n = #bytes < 12 and #bytes or 12
    if sub(bytes, 1, n) ~= sub(V2_SIG, 1, n) then return nil, "not a PROXY header" end
    if #bytes < 16 then return nil end
    local cmd, fam, len = v2_fixed(bytes)
    if not cmd then return nil, fam end
    if #bytes < 16 + len then return nil end
    local info, err = parse_v2(cmd, fam, sub(bytes, 17, 16 + len))
    if not info then return nil, err end
    return info, 16 + len
  end
  local n = #bytes < 6 and #bytes or 6
  if sub(bytes, 1, n) ~= sub("PROXY ", 1, n) then return nil, "not a PROXY header" end
  local eol = find(bytes, "\r\n", 1, true)
  if not eol then
    if #bytes >= V1_MAX then return nil, "a PROXY v1 header longer than 107 bytes" end
    return nil
  end
  if eol + 1 > V1_MAX then return nil, "a PROXY v1 header longer than 107 bytes" end
  local info, err = parse_v1(sub(bytes, 1, eol - 1))
  if not info then return nil, err end
  return info, eol + 1
end

--- Read a PROXY header off `stream` (inside a coroutine), taking exactly
-- its bytes: what follows stays for the application.
-- @treturn table the header, as parse gives it
-- @return nil, err: kind `protocol` for a missing or malformed header,
--   or the stream's error (`timeout`, `closed`)
function M.read_header(stream)
  local core = require "squall.core"
  local function refuse(why) return nil, core.error("protocol", why) end
  -- 8 bytes tell the versions apart: "PROXY TC"/"PROXY UN" or v2's start.
  -- They are taken as they come (never more than 8, so nothing behind the
  -- header is read), and a first byte that starts neither is refused at
  -- once, not after proxy_timeout.
  local head = ""
  while #head < 8 do
    local chunk, err = stream:read_bytes(8 - #head, true)
    if not chunk then return nil, err end
    head = head .. chunk
    local n = #head < 6 and #head or 6
    if sub(head, 1, n) ~= sub("PROXY ", 1, n) and head ~= sub(V2_SIG, 1, #head) then
      return refuse("the connection did not start with a PROXY header")
    end
    if sub(head, 1, 6) == "PROXY " and find(head, "\n", 7, true) then
      return refuse("a malformed PROXY v1 header")
    end
  end
  -- Then exactly the header's bytes (a v1 line, or v2's fixed part and its
  -- address block), and M.parse, the parser the fuzz target runs, decides.
  local more, err
  if sub(head, 1, 6) == "PROXY " then
    -- to the first "\n": a line that ends without "\r\n" is refused there
    more, err = stream:read_until("\n", V1_MAX - 8)
    if not more then
      if err.kind == "unsatisfiable" then
        return refuse("a PROXY v1 header longer than 107 bytes")
      end
      return nil, err
    end
    if sub(more, -2) ~= "\r\n" then return refuse("a PROXY v1 header that ends without CRLF") end
  else
    more, err = stream:read_bytes(8)
    if not more then return nil, err end
    local cmd, fam, len = v2_fixed(head .. more)
    if not cmd then return refuse(fam) end
    if len > 0 then
      local body
      body, err = stream:read_bytes(len)
      if not body then return nil, err end
      more = more .. body
    end
  end
  local info, used = M.parse(head .. more)
  if not info then return refuse(used or "an incomplete PROXY header") end
  return info
end

return M
