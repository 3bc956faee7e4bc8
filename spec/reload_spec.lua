local iostream = require "squall.iostream"
local gen = require "squall.gen"
local testing = require "squall.testing"
local TCPServer = require "squall.tcpserver"
local reload = require "squall.reload"
local helpers = require "helpers"

local async, q = testing.async, helpers.q

local counter = 0
-- A fresh module directory and name, on package.path.
local function new_module(code)
  counter = counter + 1
  local dir = os.tmpname()
  os.remove(dir)
  assert(os.execute("mkdir -p " .. q(dir)) == 0)
  local name = ("reload_mod_%d_%d"):format(counter, os.time())
  package.path = dir .. "/?.lua;" .. package.path
  local path = dir .. "/" .. name .. ".lua"
  local function write(src)
    -- write then rename, as editors do
    local f = assert(io.open(path .. ".tmp", "w"))
    f:write(src)
    f:close()
    assert(os.rename(path .. ".tmp", path))
  end
  write(code)
  return name, write, dir
end

local function version_module(v)
  return ([[
    local M = {}
    M.version = %q
    function M.handle_stream(stream)
      while true do
        local line = stream:read_until("\n")
        if not line then return end
        stream:write(M.version .. " " .. line)
      end
    end
    return M
  ]]):format(v)
end

-- A server whose handle_stream looks the module up per connection.
local function serve(modname)
  local mod = require(modname)
  local server = TCPServer({ handle_stream = function(stream) mod.handle_stream(stream) end })
  local sock, port = testing.bind_unused_port()
  server:add_sockets({ sock })
  return server, port
end

local function ask(port, line)
  local c = assert(iostream.connect("127.0.0.1", port))
  c:write(line .. "\n")
  local r = c:read_until("\n")
  c:close()
  return r
end

-- True once fn() is (helpers.eventually, within 5 s), false if it never is.
local function eventually(fn)
  return (pcall(helpers.eventually, fn, nil, 5))
end

describe("squall.reload", function()
  it("gives new connections the new code while an open one keeps the old",
    async(function()
      local name, write = new_module(version_module("v1"))
      reload.enable({ modules = { name } })
      local server, port = serve(name)
      local held = assert(iostream.connect("127.0.0.1", port))
      held:write("a\n")
      assert.equal("v1 a\n", held:read_until("\n"))
      local log = helpers.capture_log(function()
        write(version_module("v2"))
        assert.is_true(eventually(function() return ask(port, "b") == "v2 b\n" end))
      end)
      assert.matches("reloaded " .. name, log)
      held:write("c\n")
      assert.equal("v1 c\n", held:read_until("\n"))
      assert.is_not_nil(reload.watched()[name])
      server:stop()
    end, { timeout = 10 }))

  it("keeps the old code and logs file and line when the new code does not load",
    async(function()
      local name, write = new_module(version_module("good"))
      reload.enable({ modules = { name } })
      local server, port = serve(name)
      assert.equal("good x\n", ask(port, "x"))
      local log = helpers.capture_log(function(so_far)
        write("local M = {}\nfunction M.handle_stream(\n  syntax error here\nreturn M\n")
        helpers.eventually(function() return so_far():find("keeping the old code") end,
          "the refused reload's log line")
      end)
      assert.matches("reload of " .. name .. " failed, keeping the old code", log)
      assert.matches(name .. "%.lua:%d+:", log)
      assert.equal("good y\n", ask(port, "y"))
      -- one that raises while loading is refused the same way
      log = helpers.capture_log(function(so_far)
        write("error('refusing to load')\n")
        helpers.eventually(function() return so_far():find("refusing to load") end,
          "the refused reload's log line")
      end)
      assert.matches("refusing to load", log)
      assert.equal("good z\n", ask(port, "z"))
      server:stop()
    end, { timeout = 20 }))

  it("reloads on SIGHUP", async(function()
    local name = new_module("_G.reload_spec_loads = (_G.reload_spec_loads or 0) + 1\n" ..
      "return { n = _G.reload_spec_loads }")
    reload.enable({ modules = { name } })
    require(name)
    local before = _G.reload_spec_loads
    gen.sleep(0.05)
    local log = helpers.capture_log(function()
      -- the shell's parent is this process
      assert(os.execute("kill -HUP $PPID") == 0)
      assert.is_true(eventually(function() return _G.reload_spec_loads > before end))
    end)
    assert.matches("reloaded " .. name, log)
  end))

  it("drops no connection while reloading under steady load", async(function()
    local name, write = new_module(version_module("r0"))
    reload.enable({ modules = { name } })
    local server, port = serve(name)
    local running, served, failures = true, 0, {}
    local clients = {}
    for i = 1, 20 do
      clients[i] = function()
        while running do
          local c, err = iostream.connect("127.0.0.1", port)
          if not c then failures[#failures + 1] = tostring(err); return end
          c:write("ping\n")
          local r, rerr = c:read_until("\n")
          if not r or not r:match("^r%d+ ping\n$") then
            failures[#failures + 1] = tostring(r or rerr)
          end
          c:close()
          served = served + 1
        end
      end
    end
    local load = gen.spawn(gen.multi, clients)
    local reloads = 0
    local log = helpers.capture_log(function()
      for v = 1, 10 do
        write(version_module("r" .. v))
        if eventually(function() return ask(port, "probe") == ("r%d probe\n"):format(v) end) then
          reloads = reloads + 1
        end
      end
    end)
    running = false
    load:result()
    assert.matches("reloaded " .. name, log)
    assert.equal(10, reloads)
    assert.same({}, failures)
    assert.is_true(served > 100)
    server:stop()
  end, { timeout = 60 }))

  it("an edit made after loading and before the loop starts is not missed", async(function()
    -- the watchers start with the loop: a module and a handler file edited
    -- in between used to keep their old code until the next edit
    local dir = helpers.tmpdir()
    helpers.spit(dir .. "/greeter.lua", "return { word = function() return 'one' end }")
    helpers.spit(dir .. "/handlers/h.lua", "return { word = function() return 'one' end }")
    local port, port2 = helpers.free_port(), helpers.free_port()
    helpers.spit(dir .. "/main.lua", ([[
      package.path = "./?.lua;" .. package.path
      local greeter = require "greeter"
      local rpc = require "squall.rpc"
      local TCPServer = require "squall.tcpserver"
      rpc.Server({ handlers = "handlers" }):listen(%d, "127.0.0.1")
      TCPServer({ handle_stream = function(s)
        s:write(greeter.word() .. "\n")
        s:close()
      end }):listen(%d, "127.0.0.1")
      io.open("loaded", "w"):close()
      while not io.open("go") do os.execute("sleep 0.01") end -- the spec edits now
      local loop = require("squall.ioloop").current()
      loop:add_signal_handler("SIGTERM", function() loop:stop() end)
      loop:start()
    ]]):format(port, port2))
    local wait, signal = helpers.start(("cd %s && exec %s --reload main.lua")
      :format(q(dir), q(helpers.squall_real)), 30)
    helpers.eventually(function() return io.open(dir .. "/loaded") end, "the script to load", 10)
    helpers.spit(dir .. "/greeter.lua", "return { word = function() return 'two' end }")
    helpers.spit(dir .. "/handlers/h.lua", "return { word = function() return 'two' end }")
    helpers.spit(dir .. "/go", "")
    local rpc = require "squall.rpc"
    local function words()
      local c = iostream.connect("127.0.0.1", port2)
      local r = rpc.connect("127.0.0.1", port)
      if not (c and r) then return nil end
      local w = c:read_until("\n")
      local hw = r:call("h.word")
      c:close(); r:close()
      return w == "two\n" and hw == "two"
    end
    helpers.eventually(words, "both edits to be in force", 10)
    signal("TERM")
    local status, _, err = wait()
    os.execute("rm -rf " .. q(dir))
    assert.equal(0, status, err)
  end, { timeout = 30 }))

  it("squall --reload watches the script's modules", async(function()
    local dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir -p " .. q(dir)) == 0)
    local function write(path, src)
      local f = assert(io.open(path, "w"))
      f:write(src)
      f:close()
    end
    write(dir .. "/greeter.lua", "return { word = 'hello' }")
    local port = helpers.free_port()
    write(dir .. "/main.lua", ([[
      package.path = %q .. "/?.lua;" .. package.path
      local greeter = require "greeter"
      local TCPServer = require "squall.tcpserver"
      TCPServer({ handle_stream = function(s)
        s:write(require("greeter").word .. "\n")
        s:close()
      end }):listen(%d, "127.0.0.1")
      local loop = require("squall.ioloop").current()
      loop:add_signal_handler("SIGTERM", function() loop:stop() end)
      loop:call_later(15, function() loop:stop() end)
      local _ = greeter
      loop:start()
    ]]):format(dir, port))
    local squall = helpers.squall_real
    local wait, signal = helpers.start(("cd %s && exec %s --reload main.lua")
      :format(q(dir), q(squall)))
    local function stop() signal("TERM") end
    local function word()
      local c = iostream.connect("127.0.0.1", port)
      if not c then return nil end
      local w = c:read_until("\n")
      c:close()
      return w
    end
    if not eventually(function() return word() == "hello\n" end) then
      stop()
      local _, out, err = wait()
      error("the server did not answer: " .. out .. err)
    end
    write(dir .. "/greeter.lua", "return { word = 'howdy' }")
    assert.is_true(eventually(function() return word() == "howdy\n" end))
    stop()
    local status, _, err = wait()
    os.execute("rm -rf " .. q(dir))
    assert.equal(0, status, err)
    assert.matches("reloaded greeter", err)
  end, { timeout = 30 }))
end)
