--- Metrics of every worker of one fork_processes, squall.metrics' own (not
-- a public module).
local core = require "squall.core"
local iostream = require "squall.iostream"
local msgpack = require "squall.msgpack"
local netutil = require "squall.netutil"
local R = require "squall.metrics.registry"

local type, tonumber, ipairs, pcall = type, tonumber, ipairs, pcall
local format, sort = string.format, table.sort

local W = {}

-- Workers of one fork_processes find each other through a folder named
-- by their supervisor's pid: each writes there the port of a listener
-- on 127.0.0.1 that answers with its snapshot (MessagePack) and closes.
local peers_dir, my_id

function W.started() return peers_dir ~= nil end

local function worker_dir(ppid)
  return (os.getenv("TMPDIR") or "/tmp") .. "/squall-metrics-" .. ppid
end

function W.start(id, ppid)
  local dir = worker_dir(ppid)
  os.execute(format("mkdir -p '%s'", dir)) -- once per worker, at serve
  local socks = assert(netutil.bind_sockets(0, "127.0.0.1"))
  local _, port = socks[1]:getsockname()
  -- (plain accept handlers, not a TCPServer: scrapes are not the
  -- application's connections)
  netutil.add_accept_handler(socks[1], function(stream)
    stream:write(msgpack.encode(R.collect()))
    stream:close()
  end)
  local tmp = format("%s/%d.port.tmp", dir, id)
  local f = assert(io.open(tmp, "w"))
  f:write(port)
  f:close()
  assert(os.rename(tmp, format("%s/%d.port", dir, id)))
  peers_dir, my_id = dir, id
end

-- Every worker's snapshot merged: samples get the label worker.
function W.collect_all()
  local mine = R.collect()
  if not peers_dir then return mine end
  local merged, by_name = {}, {}
  local function add(families, worker)
    for _, f in ipairs(families) do
      local m = by_name[f.name]
      if not m then
        m = { name = f.name, help = f.help, kind = f.kind, samples = {} }
        by_name[f.name] = m
        merged[#merged + 1] = m
      end
      for _, s in ipairs(f.samples) do
        s.worker = worker
        m.samples[#m.samples + 1] = s
      end
    end
  end
  local names = core.listdir(peers_dir) or {}
  local ids = {}
  for _, name in ipairs(names) do
    local id = tonumber(name:match("^(%d+)%.port$"))
    if id then ids[#ids + 1] = id end
  end
  sort(ids)
  for _, id in ipairs(ids) do
    if id == my_id then
      add(mine, id)
    else
      local f = io.open(format("%s/%d.port", peers_dir, id))
      local port = f and tonumber(f:read("*a"))
      if f then f:close() end
      local stream = port and iostream.connect("127.0.0.1", port, { timeout = 1 })
      if stream then
        stream:set_timeout(1)
        local data = stream:read_until_close()
        stream:close()
        local ok, families = pcall(msgpack.decode, data or "")
        if ok and type(families) == "table" then add(families, id) end
      end
    end
  end
  return merged
end

return W
