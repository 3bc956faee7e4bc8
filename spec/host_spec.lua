local helpers = require "helpers"
local run, q, squall = helpers.run, helpers.q, helpers.squall
local tmpscript = helpers.tmpscript


describe("the squall host", function()
  it("-v prints the versions of squall, LuaJIT, libuv and OpenSSL", function()
    local status, out = run(q(squall) .. " -v")
    assert.equal(0, status)
    assert.matches("^squall %d+%.%d+", out)
    assert.matches("LuaJIT 2%.1", out)
    assert.matches("libuv 1%.%d+", out)
    assert.matches("OpenSSL 3", out)
  end)

  it("-e runs code and exits 0", function()
    local status, out = run(q(squall) .. [[ -e 'io.write("ok", 1 + 1)']])
    assert.equal(0, status)
    assert.equal("ok2", out)
  end)

  it("runs the loop example from the README", function()
    local code = [[local l=require"squall.ioloop".current(); ]] ..
      [[l:call_later(0.05, function() print("hi"); l:stop() end); l:start()]]
    local status, out = run(q(squall) .. " -e " .. q(code))
    assert.equal(0, status)
    assert.equal("hi\n", out)
  end)

  it("sets arg as luajit does", function()
    local path = tmpscript([[
      io.write(arg[0], "|", arg[1], "|", arg[2], "|", #arg, "|", tostring(arg[-1] ~= nil))
      io.write("|", select("#", ...), ...)
    ]])
    local status, out = run(q(squall) .. " " .. q(path) .. " one 'two words'")
    os.remove(path)
    assert.equal(0, status)
    assert.equal(path .. "|one|two words|2|true|2onetwo words", out)
  end)

  it("exits 1 with a traceback when the script raises", function()
    local path = tmpscript("local function f() error('deliberate failure') end\nf()\n")
    local status, out, err = run(q(squall) .. " " .. q(path))
    os.remove(path)
    assert.equal(1, status)
    assert.equal("", out)
    assert.matches("deliberate failure", err)
    assert.matches("stack traceback", err)
    assert.matches(":1: in", err)
  end)

  it("exits 1 without a word for error() with nil, as luajit (busted's failing exit)",
    function()
    local status, out, err = run(q(squall) .. " -e 'error()'")
    assert.equal(1, status)
    assert.equal("", out .. err)
  end)

  it("exits 1 with a clear message for a syntax error or a missing script", function()
    local status, _, err = run(q(squall) .. " -e 'if then'")
    assert.equal(1, status)
    assert.matches("unexpected symbol", err)
    status, _, err = run(q(squall) .. " /nonexistent/script.lua")
    assert.equal(1, status)
    assert.matches("/nonexistent/script.lua", err)
  end)

  it("reports an unknown option with usage and exits non-zero", function()
    local status, _, err = run(q(squall) .. " --no-such-option")
    assert.not_equal(0, status)
    assert.matches("usage", err:lower())
  end)

  it("runs a script from stdin", function()
    local status, out = run("echo 'io.write(6*7)' | " .. q(squall) .. " -")
    assert.equal(0, status)
    assert.equal("42", out)
  end)

  it("finds lua/ modules with no environment variable", function()
    local status, out = run("env -u LUA_PATH -u LUA_PATH_5_1 " .. q(squall) ..
      [[ -e 'io.write(package.searchpath("squall.ioloop", package.path))']])
    assert.equal(0, status)
    assert.matches("squall/ioloop%.lua$", out)
  end)

  it("finds lua/ modules from an installed prefix", function()
    local prefix = os.tmpname()
    os.remove(prefix)
    local real = os.getenv("SQUALL_REAL_BIN")
    if not real then
      pending("the unwrapped squall binary is not known")
      return
    end
    assert(os.execute(("mkdir -p %s/bin %s/share/squall/lua/squall && cp %s %s/bin/ && " ..
      "cp lua/squall/*.lua %s/share/squall/lua/squall/"):format(q(prefix), q(prefix),
      q(real), q(prefix), q(prefix))) == 0)
    local status, out = run("cd / && " .. q(prefix .. "/bin/squall") ..
      [[ -e 'io.write(package.searchpath("squall.ioloop", package.path))']])
    os.execute("rm -rf " .. q(prefix))
    assert.equal(0, status)
    assert.equal(prefix .. "/bin/../share/squall/lua/squall/ioloop.lua", out)
  end)

  it("LUA_PATH adds to the search path", function()
    local dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir -p " .. q(dir)))
    local f = assert(io.open(dir .. "/extra_mod.lua", "w"))
    f:write("return 'extra'")
    f:close()
    local status, out = run("LUA_PATH=" .. q(dir .. "/?.lua;;") .. " " .. q(squall) ..
      [[ -e 'io.write(require "extra_mod", require("squall.ioloop") and "+ioloop")']])
    os.execute("rm -rf " .. q(dir))
    assert.equal(0, status)
    assert.equal("extra+ioloop", out)
  end)

  it("raises its soft open-files limit to the hard limit", function()
    if (os.getenv("SQUALL_WRAP") or ""):match("valgrind") then
      pending("valgrind keeps RLIMIT_NOFILE for itself")
      return
    end
    local status, out = run("ulimit -S -n 256; ulimit -H -n; " .. q(squall) ..
      [[ -e 'os.execute("ulimit -S -n")']])
    assert.equal(0, status)
    local hard, soft = out:match("^(%S+)\n(%S+)")
    assert.equal(hard, soft)
  end)

  it("is busted's interpreter (this spec runs inside it)", function()
    -- the process running this spec is the squall binary itself (valgrind
    -- runs it as a program of its own, so /proc/self/exe is valgrind's)
    local stat = io.open("/proc/self/stat")
    local pid = stat:read("*l"):match("^(%d+)")
    stat:close()
    local exe = io.popen("readlink /proc/" .. pid .. "/exe")
    -- (" (deleted)" when a build replaced the file since it started)
    local path = exe:read("*l"):gsub(" %(deleted%)$", "")
    exe:close()
    if not (os.getenv("SQUALL_WRAP") or ""):match("valgrind") then
      assert.matches("squall$", path)
    end
    -- squall.core is built in: no file on package.cpath provides it
    assert.is_nil(package.searchpath("squall.core", package.cpath))
    assert.matches("^%d+%.%d+", require("squall.core").version)
  end)
end)
