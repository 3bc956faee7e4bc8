local gen = require "squall.gen"
local iostream = require "squall.iostream"
local process = require "squall.process"
local testing = require "squall.testing"
local helpers = require "helpers"
local tmpdir = helpers.tmpdir

local async, q, run = testing.async, helpers.q, helpers.run
local squall = helpers.squall_real


local function script(dir, code)
  local path = dir .. "/script.lua"
  local f = assert(io.open(path, "w"))
  f:write(code)
  f:close()
  return path
end

local function files(dir, pattern)
  local found = {}
  local p = io.popen("ls " .. q(dir))
  for name in p:lines() do
    local a, b = name:match(pattern)
    if a then found[#found + 1] = { a, b } end
  end
  p:close()
  return found
end

-- True once fn() is (helpers.eventually, within `secs`, default 10),
-- false if it never is.
local function eventually(fn, secs)
  return (pcall(helpers.eventually, fn, nil, secs or 10))
end

-- A child that records "<task>.<pid>" in dir and idles until dir/stop.
local IDLE_CHILD = [[
  local process = require "squall.process"
  local dir = arg[1]
  local id = process.fork_processes(tonumber(arg[2]), tonumber(arg[3]))
  local stat = io.open("/proc/self/stat")
  local pid = stat:read("*l"):match("^(%d+)")
  stat:close()
  io.open(dir .. "/" .. id .. "." .. pid, "w"):close()
  local loop = require("squall.ioloop").current()
  local function check()
    local f = io.open(dir .. "/stop")
    if f then f:close(); loop:stop() else loop:call_later(0.02, check) end
  end
  check()
  loop:start()
]]

describe("squall.process", function()
  it("cpu_count is at least 1 and task_id is nil in one process", function()
    assert.is_true(process.cpu_count() >= 1)
    assert.is_nil(process.task_id())
  end)

  it("gives each child its task id and the parent exits 0", function()
    local dir = tmpdir()
    local path = script(dir, [[
      local process = require "squall.process"
      local id = process.fork_processes(3)
      io.write(("child %d %d\n"):format(id, process.task_id()))
    ]])
    local status, out = run(q(squall) .. " " .. q(path))
    os.execute("rm -rf " .. q(dir))
    assert.equal(0, status)
    local ids = {}
    for a, b in out:gmatch("child (%d+) (%d+)") do
      assert.equal(a, b)
      ids[#ids + 1] = tonumber(a)
    end
    table.sort(ids)
    assert.same({ 0, 1, 2 }, ids)
  end)

  it("restarts a child killed with SIGKILL with the same id, and SIGTERM stops all",
    async(function()
      local dir = tmpdir()
      local path = script(dir, IDLE_CHILD)
      local wait, signal = helpers.start(("exec %s %s %s 2 5"):format(q(squall), q(path), q(dir)))
      assert.is_true(eventually(function() return #files(dir, "^(%d)%.(%d+)$") == 2 end))
      local victim
      for _, f in ipairs(files(dir, "^(%d)%.(%d+)$")) do
        if f[1] == "1" then victim = f[2] end
      end
      assert(os.execute("kill -KILL " .. victim) == 0)
      assert.is_true(eventually(function()
        local ones = 0
        for _, f in ipairs(files(dir, "^(%d)%.(%d+)$")) do
          if f[1] == "1" then ones = ones + 1 end
        end
        return ones == 2
      end), "task 1 was not restarted")
      assert.is_true(signal("TERM"))
      local status, _, err = wait()
      os.execute("rm -rf " .. q(dir))
      assert.equal(0, status, err)
      assert.matches("child 1 %(pid " .. victim .. "%) killed by signal 9", err)
    end, { timeout = 30 }))

  it("never loses a SIGTERM that comes right after a child died (20 trials)",
    async(function()
      -- The parent used to check for signals, then block in waitpid: a
      -- TERM in between, or one forwarded to a child still running the
      -- parent's handler, was lost and the parent waited forever.
      for trial = 1, 20 do
        local dir = tmpdir()
        local path = script(dir, IDLE_CHILD)
        local wait, signal = helpers.start(("exec %s %s %s 2 50"):format(q(squall), q(path),
          q(dir)), 10)
        assert.is_true(eventually(function() return #files(dir, "^(%d)%.(%d+)$") == 2 end))
        local victim = files(dir, "^(%d)%.(%d+)$")[1][2]
        assert(os.execute("kill -KILL " .. victim) == 0)
        assert.is_true(signal("TERM"))
        local status, _, err = wait()
        os.execute("rm -rf " .. q(dir))
        assert.equal(0, status, ("trial %d: %s"):format(trial, err))
      end
    end, { timeout = 120 }))

  it("a signal ignored before its watcher stays ignored once the watcher is gone", function()
    -- a fork_processes child starts with SIGHUP ignored; once its loop
    -- closed (libuv then sets SIG_DFL) a HUP its supervisor still forwards
    -- killed it before it exited
    local dir = tmpdir()
    local path = script(dir, [[
      local ffi = require "ffi"
      ffi.cdef("int kill(int, int); int getpid(void); " ..
        "typedef void (*sighandler_t)(int); sighandler_t signal(int, sighandler_t);")
      ffi.C.signal(1, ffi.cast("sighandler_t", 1)) -- SIGHUP: SIG_IGN
      local loop = require("squall.ioloop").new()
      loop:add_signal_handler("SIGHUP", function() end)
      loop:close(true)
      ffi.C.kill(ffi.C.getpid(), 1)
      io.write("survived")
    ]])
    local status, out, err = run(q(squall) .. " " .. q(path))
    os.execute("rm -rf " .. q(dir))
    assert.equal(0, status, err)
    assert.equal("survived", out)
  end)

  it("SIGHUP never kills a child, with or without reload", async(function()
    for _, reload in ipairs({ "", "--reload" }) do
      local dir = tmpdir()
      local path = script(dir, IDLE_CHILD)
      local wait, signal = helpers.start(("exec %s %s %s %s 2 5"):format(q(squall), reload,
        q(path), q(dir)), 30)
      local pattern = "^(%d)%.(%d+)$"
      assert.is_true(eventually(function() return #files(dir, pattern) == 2 end))
      -- a restarted child gets HUPs from its first moment, before it could
      -- install a handler
      assert(os.execute("kill -KILL " .. files(dir, pattern)[1][2]) == 0)
      for _ = 1, 20 do signal("HUP") end
      assert.is_true(eventually(function() return #files(dir, pattern) == 3 end))
      for _ = 1, 60 do signal("HUP") end
      io.open(dir .. "/stop", "w"):close()
      local status, _, err = wait()
      local started = #files(dir, pattern)
      os.execute("rm -rf " .. q(dir))
      assert.equal(0, status, err)
      assert.equal(3, started, err) -- two, and the one restart after the KILL
      local _, restarts = err:gsub("restarting", "")
      assert.equal(1, restarts, err)
    end
  end, { timeout = 60 }))

  it("exits 0 when every child exits normally", async(function()
    local dir = tmpdir()
    local path = script(dir, IDLE_CHILD)
    local wait = helpers.spawn(("timeout 20 %s %s %s 3"):format(q(squall), q(path), q(dir)))
    assert.is_true(eventually(function() return #files(dir, "^(%d)%.(%d+)$") == 3 end))
    io.open(dir .. "/stop", "w"):close()
    local status = wait()
    os.execute("rm -rf " .. q(dir))
    assert.equal(0, status)
  end, { timeout = 30 }))

  it("raises in the parent after max_restarts failures", function()
    local dir = tmpdir()
    local path = script(dir, [[
      local process = require "squall.process"
      process.fork_processes(2, 3)
      os.exit(3)
    ]])
    local status, _, err = run(q(squall) .. " " .. q(path))
    os.execute("rm -rf " .. q(dir))
    assert.equal(1, status)
    assert.matches("exited with status 3; restarting", err)
    assert.matches("children died more than 3 times", err)
  end)

  it("refuses to fork once an IOLoop exists", function()
    local status, _, err = run(q(squall) .. " -e " .. q([[
      require("squall.ioloop").current()
      require("squall.process").fork_processes(2)
    ]]))
    assert.equal(1, status)
    assert.matches("before any IOLoop is created", err)
  end)

  it("spreads connections across the children", async(function()
    local dir = tmpdir()
    local path = script(dir, [[
      local netutil = require "squall.netutil"
      local process = require "squall.process"
      local TCPServer = require "squall.tcpserver"
      local socks = assert(netutil.bind_sockets(0, "127.0.0.1"))
      local f = io.open(arg[1] .. "/port.tmp", "w")
      f:write(select(2, socks[1]:getsockname()))
      f:close()
      os.rename(arg[1] .. "/port.tmp", arg[1] .. "/port")
      local id = process.fork_processes(3)
      local server = TCPServer({ handle_stream = function(stream)
        stream:write(id .. "\n")
        stream:flush()
        -- hold the whole process, so the next connection goes elsewhere
        os.execute("sleep 0.3")
        stream:close()
      end })
      server:add_sockets(socks)
      local loop = require("squall.ioloop").current()
      loop:add_signal_handler("SIGTERM", function() loop:stop() end)
      loop:start()
    ]])
    local wait, signal = helpers.start(("exec %s %s %s"):format(q(squall), q(path), q(dir)))
    assert.is_true(eventually(function()
      local f = io.open(dir .. "/port")
      if f then f:close() end
      return f ~= nil
    end))
    local pf = assert(io.open(dir .. "/port"))
    local port = pf:read("*n")
    pf:close()
    -- rounds of 6 at once until two children have answered (a child that
    -- has not started accepting yet only delays this)
    local seen, n = {}, 0
    local function round()
      local clients = {}
      for i = 1, 6 do
        clients[i] = function()
          local c = assert(iostream.connect("127.0.0.1", port))
          local id = assert(c:read_until("\n"))
          if not seen[id] then seen[id], n = true, n + 1 end
          c:close()
        end
      end
      gen.multi(clients)
      return n >= 2
    end
    assert.is_true(eventually(round, 20), "only one child served")
    assert.is_true(signal("TERM"))
    assert.equal(0, (wait()))
    os.execute("rm -rf " .. q(dir))
  end, { timeout = 30 }))
end)
