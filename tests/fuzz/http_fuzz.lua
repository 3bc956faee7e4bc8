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
  function s.read_until(_, delim, max)
    local e = input:find(delim, pos, true)
    if not e then
      if #input - pos + 1 >= max then return nil, core.error("unsatisfiable", "too long") end
      return nil, core.error("closed", "end of input")
    end
    local stop = e + #delim - 1
    if stop - pos + 1 > max then return nil, core.error("unsatisfiable", "too long") end
    local line = input:sub(pos, stop)
    pos = stop + 1
    return line
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
  local answered = 0
  local p = 1
  while p <= #out do
    local head_end = out:find("\r\n\r\n", p, true)
    assert(head_end, "a response without a whole head")
    local head = out:sub(p, head_end + 3)
    assert(head:find("^HTTP/1%.1 %d%d%d "), "a bad status line")
    local len = tonumber(head:match("Content%-Length: (%d+)\r\n"))
    assert(len, "no Content-Length")
    p = head_end + 4 + len
    assert(p <= #out + 1, "a body shorter than its Content-Length")
    answered = answered + 1
  end
  return answered > 0
end)
