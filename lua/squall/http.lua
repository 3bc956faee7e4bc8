--- What squall.httpserver, squall.httpclient and squall.websocket share:
-- reason phrases, header tables that answer any spelling of a name, query
-- strings and header lines for a request. (Responses, their Date
-- included, are built in C: runtime/http_response.c.)
-- @module squall.http
local util = require "squall.util"

local M = {}

local type, tostring, error, pairs, tonumber = type, tostring, error, pairs, tonumber
local find, lower, gsub, char = string.find, string.lower, string.gsub, string.char

--- Reason phrases for the status codes a server sends.
M.REASONS = {
  [100] = "Continue", [101] = "Switching Protocols", [200] = "OK", [201] = "Created",
  [202] = "Accepted", [203] = "Non-Authoritative Information", [204] = "No Content",
  [205] = "Reset Content", [206] = "Partial Content", [300] = "Multiple Choices",
  [301] = "Moved Permanently", [302] = "Found", [303] = "See Other", [304] = "Not Modified",
  [307] = "Temporary Redirect", [308] = "Permanent Redirect", [400] = "Bad Request",
  [401] = "Unauthorized", [402] = "Payment Required", [403] = "Forbidden",
  [404] = "Not Found", [405] = "Method Not Allowed", [406] = "Not Acceptable",
  [408] = "Request Timeout", [409] = "Conflict", [410] = "Gone", [411] = "Length Required",
  [412] = "Precondition Failed", [413] = "Content Too Large", [414] = "URI Too Long",
  [415] = "Unsupported Media Type", [416] = "Range Not Satisfiable",
  [417] = "Expectation Failed", [421] = "Misdirected Request", [422] = "Unprocessable Content",
  [426] = "Upgrade Required", [428] = "Precondition Required", [429] = "Too Many Requests",
  [431] = "Request Header Fields Too Large", [500] = "Internal Server Error",
  [501] = "Not Implemented", [502] = "Bad Gateway", [503] = "Service Unavailable",
  [504] = "Gateway Timeout", [505] = "HTTP Version Not Supported",
}

-- Header tables answer any spelling of a name: the parser stores lower
-- case, and a miss looks again in lower case.
local HEADERS_MT = { __index = function(t, k)
  if type(k) ~= "string" then return nil end
  local l = lower(k)
  if l == k then return nil end
  return rawget(t, l)
end }
M.HEADERS_MT = HEADERS_MT

--- Decode a %-escaped query component ('+' is a space).
function M.unescape(s)
  s = gsub(s, "+", " ")
  return (gsub(s, "%%(%x%x)", function(h) return char(tonumber(h, 16)) end))
end
local unescape = M.unescape

--- A query string as a table: name -> value, or a list of values when a
-- name comes more than once (`a=1&a=2` gives { a = { "1", "2" } }).
function M.parse_query(q)
  local args = {}
  if not q or q == "" then return args end
  for pair in q:gmatch("[^&;]+") do
    local k, v = pair:match("^([^=]*)=?(.*)$")
    k, v = unescape(k), unescape(v)
    local old = args[k]
    if old == nil then
      args[k] = v
    elseif type(old) == "table" then
      old[#old + 1] = v
    else
      args[k] = { old, v }
    end
  end
  return args
end

-- Header names handlers send, checked once and kept in lower case (a
-- handler sends the same few names on every response).
local NAME_BAD = "[^%w!#$%%&'*+%-.^_`|~]"
local checked = setmetatable({}, { __mode = "k" })

local function header_line(k, v, level)
  if type(v) ~= "string" then v = tostring(v) end
  -- plain finds: the JIT compiles them, not a pattern's
  if find(v, "\n", 1, true) or find(v, "\r", 1, true) then
    error("header " .. k .. " holds CR or LF", level + 1)
  end
  return k .. ": " .. v .. "\r\n"
end

--- The header lines of `headers` (name -> value, or a list of values),
-- as one string, for a request (HTTPServer's responses are built in C,
-- core.http_response). Raises on a name or value that would break the
-- framing. Also returns the set of the names given, in lower case.
function M.header_lines(headers, level)
  level = (level or 1) + 1
  local text, names = "", {}
  for k, v in pairs(headers) do
    local l = checked[k]
    if not l then
      if type(k) ~= "string" or k == "" or find(k, NAME_BAD) then
        error("bad header name " .. util.describe(k), level)
      end
      l = lower(k)
      checked[k] = l
    end
    names[l] = true
    if type(v) == "table" then
      for i = 1, #v do text = text .. header_line(k, v[i], level) end
    else
      text = text .. header_line(k, v, level)
    end
  end
  return text, names
end

return M
