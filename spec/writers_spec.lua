-- Several coroutines writing to one stream: order, backpressure, flush,
-- timeouts and close, each writer on its own (API.md, squall.iostream).
local gen = require "squall.gen"
local testing = require "squall.testing"
local helpers = require "helpers"

local pair, eventually = helpers.stream_pair, helpers.eventually
local async = testing.async
local MiB = 2 ^ 20
local HW = 65536 -- the default write_high_water

-- Read exactly n bytes in chunks a client with a small buffer can hold,
-- pausing between chunks when `pause` is set (a slow reader).
local function read_all(client, n, pause)
  local parts, got = {}, 0
  while got < n do
    local chunk = assert(client:read_bytes(math.min(16384, n - got), true))
    parts[#parts + 1] = chunk
    got = got + #chunk
    if pause then gen.sleep(pause) end
  end
  return table.concat(parts)
end

describe("several writers on one stream", function()
  it("flush and a second writer wait behind a writer parked past high water",
    async(function()
      -- The reproduction from issue 13: the peer buffers 64 KiB and does
      -- not read, so 8 MiB back up into the server's queue.
      local server, client = pair(nil, { max_buffer_size = 65536 })
      local order = {}
      local w1 = gen.spawn(function()
        assert.is_true(server:write(("a"):rep(8 * MiB)))
        order[#order + 1] = "w1"
      end)
      assert.is_false(w1:done())
      local fl = gen.spawn(function()
        assert.is_true(server:flush())
        order[#order + 1] = "flush"
      end)
      assert.is_false(fl:done()) -- it used to return true at once
      local max_after = 0
      local w2 = gen.spawn(function()
        for _ = 1, 8 do
          assert.is_true(server:write(("b"):rep(MiB)))
          -- once write() returns, at most high water of its bytes are unsent
          max_after = math.max(max_after, server:get_write_buffer_size())
        end
        order[#order + 1] = "w2"
      end)
      assert.is_false(w2:done()) -- it used to write 8 MiB without waiting
      assert.is_true(server:get_write_buffer_size() <= 9 * MiB)

      local got = read_all(client, 16 * MiB)
      assert.is_true(got == ("a"):rep(8 * MiB) .. ("b"):rep(8 * MiB))
      w1:result(); fl:result(); w2:result()
      assert.same({ "w1", "flush", "w2" }, order)
      assert.is_true(max_after <= HW)
      assert.is_true(server:flush())
      assert.is_false(server:writing())
    end, { timeout = 20 }))

  it("keeps write order byte-exact for many writers and a slow reader",
    async(function()
      local server, client = pair(nil, { max_buffer_size = 65536 })
      local calls, total = {}, 0
      local bound = 0
      local writers = {}
      -- sizes vary so writers interleave in odd places
      local function piece(w, i)
        return ("%d:%d;"):format(w, i) .. ("x"):rep((w * 7919 + i * 104729) % 40000)
      end
      for w = 1, 4 do
        for i = 1, 40 do total = total + #piece(w, i) end
      end
      for w = 1, 4 do
        writers[w] = gen.spawn(function()
          for i = 1, 40 do
            local p = piece(w, i)
            calls[#calls + 1] = p -- recorded before write() appends it
            assert.is_true(server:write(p))
            bound = math.max(bound, server:get_write_buffer_size())
            if i % 7 == 0 then gen.sleep(0) end
          end
        end)
      end
      local got = read_all(client, 160 * 3, 0.001) -- a slow start
      got = got .. read_all(client, total - #got)
      for w = 1, 4 do writers[w]:result() end
      assert.equal(total, #got)
      assert.is_true(got == table.concat(calls))
      -- each writer holds at most its one piece beyond high water
      assert.is_true(bound <= HW + 4 * 40000, "write buffer reached " .. bound)
    end, { timeout = 20 }))

  it("wakes every waiter exactly once when the peer closes", async(function()
    local server, client = pair(nil, { max_buffer_size = 65536 })
    local waiters = {}
    -- more than the kernel's socket buffers take, so the rest must wait
    local first = gen.spawn(function() return server:write(("y"):rep(32 * MiB)) end)
    assert.is_false(first:done())
    for w = 1, 5 do
      -- a Future raises when set twice, so a double wake fails the spec
      local f = gen.Future()
      waiters[w] = f
      gen.spawn(function()
        local ok, err
        if w == 3 then
          ok, err = server:flush()
        else
          ok, err = server:write(("z"):rep(2 * MiB))
        end
        f:set_result(ok, err)
      end)
    end
    for w = 1, 5 do assert.is_false(waiters[w]:done()) end
    read_all(client, 64 * 1024, 0.001) -- read slowly, then stop
    client:close()
    for w = 1, 5 do
      local ok, err = waiters[w]:result()
      assert.is_nil(ok)
      assert.equal("closed", err.kind)
    end
    assert.equal("closed", select(2, first:result()).kind)
    assert.is_true(server:closed())
  end, { timeout = 20 }))

  it("times out each waiter on its own and keeps what it queued", async(function()
    local server, client = pair(nil, { max_buffer_size = 65536 })
    server:set_timeout(0.2)
    local results = {}
    local fs = {}
    -- 32 MiB: more than the kernel's socket buffers take
    for w = 1, 3 do
      fs[w] = gen.spawn(function()
        local ok, err = server:write((tostring(w)):rep(w == 1 and 32 * MiB or MiB))
        results[w] = { ok, err and err.kind }
      end)
    end
    for w = 1, 3 do fs[w]:result() end
    for w = 1, 3 do assert.same({ nil, "timeout" }, results[w]) end
    assert.is_false(server:closed())
    server:set_timeout(nil)
    local got = read_all(client, 34 * MiB)
    assert.is_true(got == ("1"):rep(32 * MiB) .. ("2"):rep(MiB) .. ("3"):rep(MiB))
  end, { timeout = 20 }))

  it("runs write callbacks in write order, each once its bytes are out",
    async(function()
      local server, client = pair(nil, { max_buffer_size = 65536 })
      local done = {}
      local last = gen.Future()
      -- callback style never waits, even inside a coroutine
      server:write(("p"):rep(4 * MiB), function(ok) done[#done + 1] = { 1, ok } end)
      server:write(("q"):rep(MiB), function(ok) done[#done + 1] = { 2, ok } end)
      server:write("end", function(ok)
        done[#done + 1] = { 3, ok }
        last:set_result()
      end)
      assert.equal(0, #done)
      assert.is_true(server:get_write_buffer_size() > HW)
      local got = read_all(client, 5 * MiB + 3)
      assert.equal(5 * MiB + 3, #got)
      last:result()
      assert.same({ { 1, true }, { 2, true }, { 3, true } }, done)
    end, { timeout = 20 }))

  it("a writer woken by close() of the stream gets nil, closed", async(function()
    local server, client = pair(nil, { max_buffer_size = 65536 })
    -- bounds the flush-on-close against this peer; long enough that the
    -- peer's close, not the timeout, wakes the writers on a busy machine
    -- (5 s ran out under 16 busy loops)
    server:set_timeout(30 * helpers.scale)
    -- more than the kernel buffers on loopback (tcp_wmem plus tcp_rmem can
    -- take several MiB), so the write must wait
    local f = gen.spawn(function() return server:write(("c"):rep(64 * MiB)) end)
    assert.is_false(f:done())
    local g = gen.spawn(function() return server:flush() end)
    eventually(function() return server:writing() end, "bytes queued")
    client:close()
    local ok, err = f:result()
    assert.is_nil(ok)
    assert.equal("closed", err.kind)
    ok, err = g:result()
    assert.is_nil(ok)
    assert.equal("closed", err.kind)
  end, { timeout = 60 }))
end)
