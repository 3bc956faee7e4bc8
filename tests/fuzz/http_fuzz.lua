--- Fuzz target for squall.metrics' HTTP request reader (the /metrics
-- endpoint), run by make check-fuzz through tests/fuzz/driver.lua. Each
-- input is what a client sends, read through a stream over its bytes.
-- Nothing may raise; every request gets a whole response (status line,
-- Content-Length matching the body), and the stream ends closed.
local core = require "squall.core"
local metrics = require "squall.metrics"
local dir = (arg[0]:match("^(.*)/") or ".")
local driver = dofile(dir .. "/driver.lua")

local function replay(input)
  local pos, out, closed = 1, {}, false
  local s = {}
  function s.set_timeout() end
  function s.read_bytes(_, n, partial)
    -- partial reads come in chunks of random sizes, as from a socket
    if partial then n = math.min(n, math.random(1, 600), #input - pos + 1) end
    if n == 0 or pos + n - 1 > #input then return nil, core.error("closed", "end of input") end
    local chunk = input:sub(pos, pos + n - 1)
    pos = pos + n
    return chunk
  end
  function s.write(_, data) out[#out + 1] = data return true end
  function s.close() closed = true end
  return s, function() return table.concat(out), closed end
end

driver.run("http", function(input)
  local s, result = replay(input)
  metrics._handle_http(s)
  local out, closed = result()
  assert(closed, "the stream was left open")
  -- the request heads in order, as the server cuts them: a HEAD's answer
  -- has no body
  local methods, q = {}, 1
  while true do
    local e = input:find("\r\n\r\n", q, true)
    if not e then break end
    methods[#methods + 1] = input:match("^(%u+) ", q) or "?"
    q = e + 4
  end
  local answered = 0
  local p = 1
  while p <= #out do
    local head_end = out:find("\r\n\r\n", p, true)
    assert(head_end, "a response without a whole head")
    local head = out:sub(p, head_end + 3)
    assert(head:find("^HTTP/1%.1 %d%d%d "), "a bad status line")
    local len = tonumber(head:match("Content%-Length: (%d+)\r\n"))
    assert(len, "no Content-Length")
    answered = answered + 1
    -- (400 and 431 answer a head the server could not read: with a body)
    local status = head:match("^HTTP/1%.1 (%d+)")
    local bodyless = methods[answered] == "HEAD" and status ~= "400" and status ~= "431"
    p = head_end + 4 + (bodyless and 0 or len)
    assert(p <= #out + 1, "a body shorter than its Content-Length")
  end
  return answered > 0
end)
