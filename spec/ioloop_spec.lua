local ioloop = require "squall.ioloop"
local gen = require "squall.gen"
local testing = require "squall.testing"
local helpers = require "helpers"
local ffi = require "ffi"
local bit = require "bit"

ffi.cdef [[
int pipe(int fds[2]);
long write(int fd, const void *buf, size_t n);
long read(int fd, void *buf, size_t n);
int close(int fd);
]]

-- A fresh loop per test, closed afterwards.
local function with_loop(fn)
  return function()
    local loop = ioloop.new()
    loop:make_current()
    local ok, err = pcall(fn, loop)
    loop:close(true)
    ioloop.clear_current()
    if not ok then error(err, 0) end
  end
end

describe("squall.ioloop", function()
  it("current() and instance() are the same loop", function()
    ioloop.clear_current()
    local a = ioloop.current()
    assert.equal(a, ioloop.instance())
    assert.equal(a, ioloop.current())
    a:close()
    assert.not_equal(a, ioloop.current())
    ioloop.current():close()
  end)

  it("time() is monotonic seconds", with_loop(function(loop)
    local t1 = loop:time()
    assert.is_number(t1)
    loop:call_later(0.02, function() loop:stop() end)
    loop:start()
    local t2 = loop:time()
    assert.is_true(t2 - t1 >= 0.019, "elapsed " .. (t2 - t1))
  end))

  it("runs callbacks in the order they were added, with their arguments",
    with_loop(function(loop)
      local seen = {}
      for i = 1, 5 do loop:add_callback(function(a, b) seen[#seen + 1] = a .. b end, i, "x") end
      loop:add_callback(function() loop:stop() end)
      loop:start()
      assert.same({ "1x", "2x", "3x", "4x", "5x" }, seen)
    end))

  it("runs callbacks added during an iteration on the next one", with_loop(function(loop)
    local order = {}
    loop:add_callback(function()
      order[#order + 1] = "a"
      loop:add_callback(function() order[#order + 1] = "c"; loop:stop() end)
    end)
    loop:add_callback(function() order[#order + 1] = "b" end)
    loop:start()
    assert.same({ "a", "b", "c" }, order)
  end))

  it("fires timers by deadline, and ties in the order they were set", with_loop(function(loop)
    local order = {}
    local when = loop:time() + 0.03
    loop:call_at(when, function() order[#order + 1] = "tie1" end)
    loop:call_later(0.01, function() order[#order + 1] = "early" end)
    loop:call_at(when, function() order[#order + 1] = "tie2" end)
    loop:add_timeout(when, function() order[#order + 1] = "tie3" end)
    loop:call_at(when + 0.01, function() loop:stop() end)
    loop:start()
    assert.same({ "early", "tie1", "tie2", "tie3" }, order)
  end))

  it("passes arguments to timer callbacks", with_loop(function(loop)
    local got
    loop:call_later(0, function(...) got = { ... }; loop:stop() end, 1, nil, 3)
    loop:start()
    assert.same({ 1, nil, 3 }, got)
  end))

  it("does not fire a timer before its deadline", with_loop(function(loop)
    local t0 = loop:time()
    local fired_at
    loop:call_later(0.05, function() fired_at = loop:time(); loop:stop() end)
    loop:start()
    assert.is_true(fired_at - t0 >= 0.05, "fired after " .. (fired_at - t0))
  end))

  it("logs a callback that raises, with its traceback, and goes on", with_loop(function(loop)
    local after = false
    local text = helpers.capture_log(function()
      loop:add_callback(function() error("boom in callback") end)
      loop:call_later(0, function() error({ code = 7 }) end)
      loop:call_later(0.01, function() after = true; loop:stop() end)
      loop:start()
    end)
    assert.is_true(after)
    assert.matches("boom in callback", text, 1, true)
    assert.matches("stack traceback", text, 1, true)
    assert.matches("error object", text, 1, true)
  end))

  it("remove_timeout cancels, and is harmless when fired or removed", with_loop(function(loop)
    local fired = {}
    local t1 = loop:call_later(0.01, function() fired[#fired + 1] = "t1" end)
    local t2 = loop:call_later(0.01, function() fired[#fired + 1] = "t2" end)
    loop:remove_timeout(t1)
    loop:remove_timeout(t1)
    loop:call_later(0.03, function() loop:stop() end)
    loop:start()
    assert.same({ "t2" }, fired)
    loop:remove_timeout(t2) -- already fired
    loop:remove_timeout(nil)
  end))

  it("a timer may remove another timer due in the same iteration", with_loop(function(loop)
    local fired = {}
    local when = loop:time() + 0.01
    local t2
    loop:call_at(when, function() fired[#fired + 1] = 1; loop:remove_timeout(t2) end)
    t2 = loop:call_at(when, function() fired[#fired + 1] = 2 end)
    loop:call_at(when + 0.01, function() loop:stop() end)
    loop:start()
    assert.same({ 1 }, fired)
  end))

  it("keeps order through many timers and cancellations", with_loop(function(loop)
    local fired, handles = {}, {}
    local base = loop:time() + 0.01
    for i = 1, 2000 do
      handles[i] = loop:call_at(base + (i % 10) * 0.001, function() fired[#fired + 1] = i end)
    end
    for i = 1, 2000, 2 do loop:remove_timeout(handles[i]) end
    loop:call_at(base + 0.05, function() loop:stop() end)
    loop:start()
    assert.equal(1000, #fired)
    -- by deadline bucket, then by the order they were set
    for k = 2, #fired do
      local a, b = fired[k - 1], fired[k]
      assert.is_true(a % 10 < b % 10 or (a % 10 == b % 10 and a < b))
    end
  end))

  it("stop() from a callback makes start() return", with_loop(function(loop)
    local later = false
    loop:add_callback(function() loop:stop() end)
    loop:call_later(0.5, function() later = true end)
    local t0 = loop:time()
    loop:start()
    assert.is_false(later)
    assert.is_true(loop:time() - t0 < 0.4)
    assert.is_false(loop:is_running())
  end))

  it("refuses to start twice", with_loop(function(loop)
    local err
    loop:add_callback(function()
      local ok, e = pcall(loop.start, loop)
      err = not ok and e
      loop:stop()
    end)
    loop:start()
    assert.matches("already running", err)
  end))

  it("raises at once on misuse", with_loop(function(loop)
    assert.has_error(function() loop:add_callback(42) end,
      "callback must be a function, got number 42")
    assert.has_error(function() loop:call_later("soon", print) end)
    assert.has_error(function() loop:add_handler({}, print, ioloop.READ) end)
  end))

  describe("run_sync", function()
    it("returns the function's results", with_loop(function(loop)
      local a, b, c = loop:run_sync(function()
        gen.sleep(0.01)
        return 1, nil, "three"
      end)
      assert.equal(1, a)
      assert.is_nil(b)
      assert.equal("three", c)
    end))

    it("raises the function's error", with_loop(function(loop)
      local ok, err = pcall(loop.run_sync, loop, function()
        gen.sleep(0)
        error({ kind = "mine" })
      end)
      assert.is_false(ok)
      assert.same({ kind = "mine" }, err)
      assert.has_error(function()
        loop:run_sync(function() error("plain", 0) end)
      end, "plain")
    end))

    it("raises a timeout error when the function takes too long", with_loop(function(loop)
      local ok, err = pcall(loop.run_sync, loop, function() gen.sleep(5) end, 0.05)
      assert.is_false(ok)
      assert.equal("timeout", err.kind)
      assert.matches("timed out after 0.05 seconds", tostring(err))
      -- the loop is usable again afterwards
      assert.equal(7, loop:run_sync(function() return 7 end))
    end))

    it("works with a function that never waits", with_loop(function(loop)
      assert.equal("now", loop:run_sync(function() return "now" end, 1))
    end))
  end)

  describe("add_handler", function()
    it("calls the handler when a pipe is readable, with fd and READ", with_loop(function(loop)
      local fds = ffi.new("int[2]")
      assert.equal(0, ffi.C.pipe(fds))
      local r, w = fds[0], fds[1]
      local got, events = {}, nil
      loop:add_handler(r, function(fd, ev)
        assert.equal(r, fd)
        events = ev
        local buf = ffi.new("char[64]")
        local n = ffi.C.read(fd, buf, 64)
        got[#got + 1] = ffi.string(buf, n)
        if #got == 2 then loop:stop() end
      end, ioloop.READ)
      loop:call_later(0.01, function() ffi.C.write(w, "one", 3) end)
      loop:call_later(0.03, function() ffi.C.write(w, "two", 3) end)
      loop:call_later(2, function() loop:stop() end)
      loop:start()
      assert.same({ "one", "two" }, got)
      assert.equal(ioloop.READ, bit.band(events, ioloop.READ))
      loop:remove_handler(r)
      loop:remove_handler(r) -- harmless twice
      ffi.C.close(r); ffi.C.close(w)
    end))

    it("update_handler switches to WRITE, remove_handler stops the calls", with_loop(function(loop)
      local fds = ffi.new("int[2]")
      assert.equal(0, ffi.C.pipe(fds))
      local r, w = fds[0], fds[1]
      local writes = 0
      loop:add_handler(w, function(_, ev)
        if bit.band(ev, ioloop.WRITE) ~= 0 then
          writes = writes + 1
          loop:remove_handler(w)
        end
      end, ioloop.READ)
      loop:call_later(0.01, function() loop:update_handler(w, ioloop.WRITE) end)
      loop:call_later(0.05, function() loop:stop() end)
      loop:start()
      assert.equal(1, writes)
      ffi.C.close(r); ffi.C.close(w)
    end))

    it("refuses an fd registered twice and an fd that cannot be polled", with_loop(function(loop)
      local fds = ffi.new("int[2]")
      assert.equal(0, ffi.C.pipe(fds))
      loop:add_handler(fds[0], function() end, ioloop.READ)
      assert.has_error(function() loop:add_handler(fds[0], function() end, ioloop.READ) end)
      local f = assert(io.open("/etc/hostname"))
      local fd = tonumber(helpers.run("true") and 0) -- stdin may be a tty or file
      local _ = fd
      f:close()
      loop:remove_handler(fds[0])
      ffi.C.close(fds[0]); ffi.C.close(fds[1])
    end))

    it("accepts objects with fileno() and passes them back", with_loop(function(loop)
      local fds = ffi.new("int[2]")
      assert.equal(0, ffi.C.pipe(fds))
      local obj = { fileno = function() return fds[0] end }
      local got
      loop:add_handler(obj, function(o) got = o; loop:stop() end, ioloop.READ)
      ffi.C.write(fds[1], "x", 1)
      loop:call_later(2, function() loop:stop() end)
      loop:start()
      assert.equal(obj, got)
      loop:remove_handler(obj)
      ffi.C.close(fds[0]); ffi.C.close(fds[1])
    end))
  end)

  it("runs a signal handler on the loop when the process gets the signal", with_loop(function(loop)
    local got
    loop:add_signal_handler("SIGUSR1", function(name) got = name; loop:stop() end)
    -- the shell's parent is this process
    loop:add_callback(function() os.execute("kill -USR1 $PPID") end)
    loop:call_later(5, function() loop:stop() end)
    loop:start()
    assert.equal("SIGUSR1", got)
    loop:remove_signal_handler("SIGUSR1")
    local ok, err = pcall(loop.add_signal_handler, loop, "SIGNOPE", print)
    assert.is_false(ok)
    assert.matches("unknown signal name 'SIGNOPE' %(SIGHUP, SIGINT", err)
  end))

  it("takes signal names with or without SIG", with_loop(function(loop)
    local got
    loop:add_signal_handler("USR2", function(name) got = name; loop:stop() end)
    loop:add_callback(function() os.execute("kill -USR2 $PPID") end)
    loop:call_later(5, function() loop:stop() end)
    loop:start()
    assert.equal("SIGUSR2", got)
    loop:remove_signal_handler("USR2")
    assert.has_error(function() loop:add_signal_handler(15, print) end,
      'signal name must be a string like "SIGTERM", got number')
  end))

  it("add_future calls back on the loop when the future resolves", with_loop(function(loop)
    local f = gen.Future()
    local got
    loop:add_future(f, function(fut) got = { fut:result() }; loop:stop() end)
    loop:call_later(0.01, function() f:set_result("done", 2) end)
    loop:start()
    assert.same({ "done", 2 }, got)
  end))

  it("spawn_callback runs the function in a coroutine", with_loop(function(loop)
    local slept = false
    loop:spawn_callback(function(x)
      assert.is_not_nil(coroutine.running())
      gen.sleep(0.01)
      slept = x
      loop:stop()
    end, "yes")
    loop:start()
    assert.equal("yes", slept)
  end))

  it("close() ends even when a coroutine it wakes opens new connections", function()
    -- a spec that timed out while its body read: close() woke the read with
    -- `closed`, the body connected again, and close() waited on that for ever
    local script = helpers.tmpscript([[
local ioloop = require "squall.ioloop"
local iostream = require "squall.iostream"
local testing = require "squall.testing"
local TCPServer = require "squall.tcpserver"
local loop = ioloop.current()
local sock, port = testing.bind_unused_port()
TCPServer({ handle_stream = function(s) s:read_until_close() end }):add_sockets({ sock })
print(pcall(loop.run_sync, loop, function()
  for _ = 1, 1000 do
    local c = iostream.connect("127.0.0.1", port)
    if c then c:read_until_close() end
  end
end, 0.2))
loop:close(true)
print("closed")
]])
    local status, out, err = helpers.run(("timeout 20 %s %s"):format(helpers.q(helpers.squall),
      helpers.q(script)))
    os.remove(script)
    assert.equal(0, status, err)
    assert.matches("false\t.*timed out.*\nclosed\n$", out)
  end)

  it("testing.async runs a spec on a fresh loop", testing.async(function()
    local before = ioloop.current():time()
    gen.sleep(0.01)
    assert.is_true(ioloop.current():time() > before)
  end))
end)
