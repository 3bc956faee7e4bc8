--- A squall client for line echo servers, plain or TLS.
--
--     squall bench/echo_client.lua PORT tls|plain msgs CONNS DEPTH SECONDS
--     squall bench/echo_client.lua PORT tls|plain bulk MEGABYTES
--
-- `msgs`: CONNS connections each keep DEPTH 32-byte lines in flight;
-- prints echoed lines per second. `bulk`: sends MEGABYTES in 16 KiB lines
-- over one connection while reading the echo; prints MB/s.
local ioloop = require "squall.ioloop"
local iostream = require "squall.iostream"
local gen = require "squall.gen"

local port = assert(tonumber(arg[1]), "PORT")
local tls = arg[2] == "tls"
local mode = arg[3]
local opts = tls and { ssl_options = { cert_reqs = "none" } } or nil

local loop = ioloop.current()

local function msgs(conns, depth, secs)
  local line = ("x"):rep(31) .. "\n"
  local batch = line:rep(depth)
  local count, running = 0, true
  local workers = {}
  for i = 1, conns do
    workers[i] = function()
      local s = assert(iostream.connect("127.0.0.1", port, opts))
      s:write(batch)
      while running do
        for _ = 1, depth do
          if s:read_until("\n") ~= line then error("bad echo") end
        end
        count = count + depth
        s:write(batch)
      end
      s:close()
    end
  end
  local t0
  loop:call_later(secs / 5, function() count = 0; t0 = loop:time() end)
  loop:call_later(secs / 5 + secs, function() running = false end)
  gen.multi(workers)
  return ("%.0f msgs/s"):format(count / (loop:time() - t0))
end

local function bulk(megabytes)
  local s = assert(iostream.connect("127.0.0.1", port, opts))
  local line = ("b"):rep(16383) .. "\n"
  local total = megabytes * 1024 * 1024
  local t0 = loop:time()
  gen.spawn(function()
    for _ = 1, total / #line do s:write(line) end
    s:flush()
  end)
  local got = 0
  while got < total do
    local chunk = assert(s:read_bytes(math.min(65536, total - got), true))
    got = got + #chunk
  end
  return ("%.0f MB/s"):format(total / (1024 * 1024) / (loop:time() - t0))
end

print(loop:run_sync(function()
  if mode == "bulk" then return bulk(tonumber(arg[4]) or 256) end
  return msgs(tonumber(arg[4]) or 50, tonumber(arg[5]) or 16, tonumber(arg[6]) or 3)
end))
