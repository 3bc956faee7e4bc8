-- squall.msgpack against the specification and Python's msgpack.
local msgpack = require "squall.msgpack"
local helpers = require "helpers"
local ffi = require "ffi"
local slurp, spit = helpers.slurp, helpers.spit

local q, run = helpers.q, helpers.run
local null = msgpack.null
local PEER = "/usr/bin/python3 spec/fixtures/msgpack_peer.py"

local function hex(s)
  return (s:gsub(".", function(c) return ("%02x"):format(c:byte()) end))
end



-- Every value in s, in order.
local function decode_all(s)
  local out, pos = {}, 1
  while pos <= #s do
    local v, nxt = msgpack.decode(s, pos)
    assert(nxt, tostring(select(2, msgpack.decode(s, pos))))
    out[#out + 1] = v
    pos = nxt
  end
  return out
end

local big = {}
for i = 1, 70000 do big[i] = i % 7 end
local wide = {}
for i = 1, 40 do wide["key" .. i] = i end
local sparse = { [1] = "one", [3] = "three" }
-- maps of several keys re-encode in the order Lua's table iterates them
local reorders = { [wide] = true, [sparse] = true }

-- One value of every format, as Lua writes them.
local VALUES = {
  null, true, false, 0, 1, 127, 128, 255, 256, 65535, 65536, 2 ^ 32 - 1, 2 ^ 32, 2 ^ 53,
  ffi.new("uint64_t", 2 ^ 53) + 1, 18446744073709551615ULL, ffi.new("int64_t", 5), -1, -32, -33,
  -128, -129, -32768, -32769, -2 ^ 31, -2 ^ 31 - 1, -2 ^ 53, -9223372036854775807LL - 1, 1.5,
  -0.25, 1e300, math.huge, -math.huge, "", "str", "h\195\169llo", ("x"):rep(31),
  ("x"):rep(32), ("y"):rep(255), ("y"):rep(256), ("z"):rep(70000), msgpack.bin(""),
  msgpack.bin("\0\255bin"), msgpack.bin(("b"):rep(300)), msgpack.bin(("b"):rep(70000)), {},
  { 1, 2, 3 }, msgpack.array({ 1, nil, 3 }, 3), msgpack.array({}, 2), big, { a = 1 }, wide,
  msgpack.map({}), sparse, { nested = { list = { 1, { x = { true, null } } } } },
  msgpack.ext(5, "a"), msgpack.ext(3, "ab"), msgpack.ext(3, "abcd"), msgpack.ext(7, "12345678"),
  msgpack.ext(1, ("0"):rep(16)), msgpack.ext(2, "abc"), msgpack.ext(9, ("e"):rep(300)),
  msgpack.ext(9, ("e"):rep(70000)),
}

-- What decoding `v` gives, encoded: bin decodes to a Lua string, which
-- encodes as str; everything else comes back byte for byte.
local function expected(v)
  local mt = getmetatable(v)
  if mt and mt.__msgpack == "bin" then return msgpack.encode(v[1]) end
  return msgpack.encode(v)
end

describe("squall.msgpack", function()
  it("encodes each type in its shortest format", function()
    local cases = {
      { 0, "00" }, { 127, "7f" }, { 128, "cc80" }, { 256, "cd0100" }, { 65536, "ce00010000" },
      { 2 ^ 32, "cf0000000100000000" }, { -1, "ff" }, { -32, "e0" }, { -33, "d0df" },
      { -129, "d1ff7f" }, { -32769, "d2ffff7fff" }, { -2 ^ 31 - 1, "d3ffffffff7fffffff" },
      { 1.5, "cb3ff8000000000000" }, { true, "c3" }, { false, "c2" }, { null, "c0" },
      { "abc", "a3616263" }, { ("x"):rep(32), "d920" .. ("78"):rep(32) }, { {}, "90" },
      { { 1, 2 }, "920102" }, { { a = 1 }, "81a16101" }, { msgpack.map({}), "80" },
      { msgpack.bin("ab"), "c4026162" }, { msgpack.ext(5, "abcd"), "d60561626364" },
      { msgpack.ext(5, "abc"), "c70305616263" }, { msgpack.ext(-3, "ab"), "d5fd6162" },
      { 18446744073709551615ULL, "cfffffffffffffffff" },
      { ffi.new("int64_t", -5), "fb" }, { ffi.new("uint64_t", 300), "cd012c" },
    }
    for _, c in ipairs(cases) do
      assert.equal(c[2], hex(msgpack.encode(c[1])), tostring(c[1]))
    end
  end)

  it("round-trips every value, and every integer exactly", function()
    for i, v in ipairs(VALUES) do
      local s = msgpack.encode(v)
      local d, pos = msgpack.decode(s)
      assert.equal(#s + 1, pos)
      if reorders[v] then
        assert.same(msgpack.decode(expected(v)), d)
      else
        assert.equal(hex(expected(v)), hex(msgpack.encode(d)), "value " .. i)
      end
    end
    local u = msgpack.decode(msgpack.encode(18446744073709551615ULL))
    assert.is_true(ffi.istype("uint64_t", u))
    assert.is_true(u == 18446744073709551615ULL)
    local n = msgpack.decode(msgpack.encode(-9223372036854775807LL - 1))
    assert.is_true(ffi.istype("int64_t", n))
    assert.equal(2 ^ 53, msgpack.decode(msgpack.encode(2 ^ 53)))
    assert.equal("number", type(msgpack.decode(msgpack.encode(-2 ^ 53))))
  end)

  it("Python's msgpack re-encodes Squall's bytes unchanged", function()
    local src, dst = os.tmpname(), os.tmpname()
    local parts = {}
    for i, v in ipairs(VALUES) do parts[i] = msgpack.encode(v) end
    spit(src, table.concat(parts))
    local status, _, err = run(("%s repack %s %s"):format(PEER, q(src), q(dst)))
    assert.equal(0, status, err)
    local back = slurp(dst)
    os.remove(src); os.remove(dst)
    assert.equal(#table.concat(parts), #back)
    -- value by value, for a readable failure
    local pos = 1
    for i, p in ipairs(parts) do
      assert.equal(hex(p):sub(1, 80), hex(back:sub(pos, pos + #p - 1)):sub(1, 80), "value " .. i)
      assert.is_true(p == back:sub(pos, pos + #p - 1), "value " .. i)
      pos = pos + #p
    end
  end)

  it("decodes what Python's msgpack writes", function()
    local path = os.tmpname()
    local status, _, err = run(("%s sample %s"):format(PEER, q(path)))
    assert.equal(0, status, err)
    local v = decode_all(slurp(path))
    os.remove(path)
    assert.equal(null, v[1])
    assert.is_true(v[2]); assert.is_false(v[3])
    assert.equal(2 ^ 53, v[14])
    assert.is_true(v[15] == 9007199254740993ULL)
    assert.is_true(v[16] == 18446744073709551615ULL)
    assert.equal(-2 ^ 53, v[26])
    assert.is_true(v[27] == -9007199254740993LL)
    assert.is_true(v[28] == -9223372036854775807LL - 1)
    assert.equal(1.5, v[29]); assert.equal(1e300, v[31])
    assert.equal("h\195\169llo", v[34]); assert.equal(70000, #v[37])
    assert.equal("\0\255bin", v[39])
    assert.same({ null, null, 3 }, v[43])
    assert.same({ 1, { x = { true, null } } }, v[48].nested.list)
    assert.equal("one", v[47][1])
    assert.is_true(msgpack.is_ext(v[49]))
    assert.equal(5, v[49].type); assert.equal("a", v[49].data)
    assert.equal(3, v[50].type)
    assert.equal(300, #v[54].data)
    assert.equal(1.5, v[55]) -- float 32
  end)

  it("refuses what it cannot encode, at the caller", function()
    local cyc = {}
    cyc.me = cyc
    for _, bad in ipairs({ print, coroutine.create(print), cyc, io.stdout, ffi.new("char[4]") }) do
      local ok, err = pcall(msgpack.encode, bad)
      assert.is_false(ok)
      assert.matches("msgpack.encode: ", err)
    end
    local deep = {}
    local cur = deep
    for _ = 2, 200 do cur[1] = {}; cur = cur[1] end
    assert.is_string(msgpack.encode(deep)) -- 200 levels
    cur[1] = {}
    assert.has_error(function() msgpack.encode(deep) end)
  end)

  it("returns nil, err of kind msgpack for invalid or truncated bytes", function()
    for _, bad in ipairs({ "", "\193", "\146\1", "\218\0\5ab", "\223\255\255\255\255",
      "\221\255\255\255\255", ("\145"):rep(201) .. "\1", "\199\5\1ab" }) do
      local v, err = msgpack.decode(bad)
      assert.is_nil(v)
      assert.equal("msgpack", err.kind, hex(bad))
    end
    assert.matches("at byte 1", tostring(select(2, msgpack.decode("\193"))))
    assert.is_string(msgpack.decode(("\145"):rep(199) .. "\161x", 1) and "ok")
  end)

  it("encode_array keeps nils in their places", function()
    assert.equal("940102c0a178", hex(msgpack.encode_array(1, 2, nil, "x")))
    assert.equal("90", hex(msgpack.encode_array()))
    assert.has_error(function() msgpack.encode_array(1, print) end)
  end)

  it("values gives a decoded array's items, msgpack.null as nil", function()
    local t = msgpack.decode(msgpack.encode_array(1, nil, "x", nil))
    local a, b, c, d = msgpack.values(t)
    assert.equal(1, a); assert.is_nil(b); assert.equal("x", c); assert.is_nil(d)
    local u = msgpack.decode(msgpack.encode_array(1, nil, 3, nil))
    assert.equal(4, select("#", msgpack.values(u)))
    assert.equal(2, select("#", msgpack.values({ 1, msgpack.null, 3 }, 2)))
  end)

  it("values refuses more items than a call can take, before looking at any", function()
    -- keys 1, 2, 4, ... 2^29: #t is a border near 2^29, and a loop to it
    -- froze the loop for seconds (issue 21)
    local keys = {}
    for k = 0, 29 do keys[2 ^ k] = k end
    local holey = msgpack.decode(msgpack.encode(msgpack.map(keys)))
    assert.is_true(#holey > msgpack.MAX_VALUES)
    local ok, err = pcall(msgpack.values, holey)
    assert.is_false(ok)
    assert.matches("more than a call can take", err)
    local long = {}
    for i = 1, msgpack.MAX_VALUES + 1 do long[i] = i end
    assert.is_false((pcall(msgpack.values, long)))
    assert.equal(msgpack.MAX_VALUES, select("#", msgpack.values(long, 2)))
  end)

  it("decodes from a position and returns the next one", function()
    local s = msgpack.encode("a") .. msgpack.encode({ 1 }) .. msgpack.encode(7)
    local a, p = msgpack.decode(s)
    local b, p2 = msgpack.decode(s, p)
    local c, p3 = msgpack.decode(s, p2)
    assert.equal("a", a); assert.same({ 1 }, b); assert.equal(7, c)
    assert.equal(#s + 1, p3)
    -- past the end: nil, err, whatever the number (2^64 has no size_t)
    for _, pos in ipairs({ #s + 2, 2 ^ 53, 2 ^ 64, 1e300, math.huge }) do
      local v, err = msgpack.decode(s, pos)
      assert.is_nil(v)
      assert.equal("msgpack", err.kind)
      assert.matches("past the end", tostring(err))
    end
    assert.equal("truncated", tostring(select(2, msgpack.decode(s, #s + 1))):match("truncated"))
  end)

  describe("unpacker", function()
    it("yields each value as it completes, however the bytes are split", function()
      math.randomseed(tonumber(os.getenv("SQUALL_FUZZ_SEED")) or 42)
      local parts, want = {}, {}
      for i, v in ipairs(VALUES) do parts[i], want[i] = msgpack.encode(v), expected(v) end
      local s = table.concat(parts)
      for _ = 1, 5 do
        local u = msgpack.unpacker({ max_size = 1e6 })
        local got, i = {}, 1
        while i <= #s do
          local n = math.random(1, 3000)
          u:feed(s:sub(i, i + n - 1))
          i = i + n
          while true do
            local v, err = u:next()
            assert.is_nil(err)
            if v == nil then break end
            got[#got + 1] = msgpack.encode(v)
          end
        end
        assert.equal(#parts, #got)
        for k = 1, #parts do
          if reorders[VALUES[k]] then
            assert.same(msgpack.decode(want[k]), msgpack.decode(got[k]))
          else
            assert.is_true(want[k] == got[k], "value " .. k)
          end
        end
        assert.equal(0, u:buffered())
      end
    end)

    it("fails with kind msgpack on invalid bytes and past max_size, and stays failed", function()
      local u = msgpack.unpacker({ max_size = 100 })
      u:feed(msgpack.encode("ok"))
      assert.equal("ok", u:next())
      u:feed(msgpack.encode(("x"):rep(200)):sub(1, 3))
      local v, err = u:next()
      assert.is_nil(v)
      assert.equal("msgpack", err.kind)
      assert.matches("larger than max_size", tostring(err))
      assert.equal("msgpack", select(2, u:next()).kind)
      local w = msgpack.unpacker()
      w:feed("\1\193")
      assert.equal(1, w:next())
      assert.equal("msgpack", select(2, w:next()).kind)
    end)

    it("rpc_frame_reader spreads requests and notifications, nil in place", function()
      local core = require("squall.core")
      local F = core.rpc_frame_constants
      local next_message = core.rpc_frame_reader()
      local u = msgpack.unpacker()
      u:feed(msgpack.encode_array(0, 7, "sum", msgpack.array({ 1, nil, 3 }, 3)) ..
        msgpack.encode_array(2, "tick", {}) ..
        msgpack.encode_array(1, 7, nil, { 9 }))
      local r = { next_message(u) }
      assert.equal(F.REQUEST, r[1]); assert.equal(7, r[2])
      assert.equal("sum", r[3]); assert.equal(3, r[4])
      assert.equal(1, r[5]); assert.is_nil(r[6]); assert.equal(3, r[7])
      local kind, msgid, method, count = next_message(u)
      assert.equal(F.NOTIFY, kind); assert.is_nil(msgid)
      assert.equal("tick", method); assert.equal(0, count)
      -- a response: msgid, error, result
      local rkind, rid, rerr, rres = next_message(u)
      assert.equal(F.RESPONSE, rkind); assert.equal(7, rid)
      assert.equal(msgpack.null, rerr); assert.same({ 9 }, rres)
      assert.is_nil(next_message(u))
      -- more than MAX_SPREAD parameters come as their table
      local many = {}
      for i = 1, F.MAX_SPREAD + 6 do many[i] = i end
      u:feed(msgpack.encode_array(0, 1, "f", many))
      local _, _, _, c2, t = next_message(u)
      assert.equal(F.PARAMS_TABLE, c2); assert.equal(F.MAX_SPREAD + 6, #t)
      -- params that are not an array at all: nothing decoded
      u:feed(msgpack.encode_array(0, 2, "f", { a = 1 }) .. msgpack.encode_array(2, "g", 5))
      local k3, _, _, c3, t3 = next_message(u)
      assert.equal(F.REQUEST, k3); assert.equal(F.PARAMS_NOT_ARRAY, c3); assert.is_nil(t3)
      assert.equal(F.PARAMS_NOT_ARRAY, select(4, next_message(u)))
      -- the message type in a longer integer format (0xcc 0x00) is still a request
      u:feed("\148\204\0\5\161f\145\1")
      local k4, id4, m4, n4, p4 = next_message(u)
      assert.same({ F.REQUEST, 5, "f", 1, 1 }, { k4, id4, m4, n4, p4 })
      -- anything else comes whole, as OTHER
      u:feed(msgpack.encode({ 0, 1, "f" }) .. msgpack.encode("x") .. msgpack.encode({ a = 1 }))
      local k5, v5 = next_message(u)
      assert.equal(F.OTHER, k5); assert.same({ 0, 1, "f" }, v5)
      assert.same({ F.OTHER, "x" }, { next_message(u) })
      local k6, v6 = next_message(u)
      assert.equal(F.OTHER, k6); assert.same({ a = 1 }, v6)
      -- bytes that are not MessagePack break it for good
      u:feed("\193")
      local none, err = next_message(u)
      assert.is_nil(none); assert.equal("msgpack", err.kind)
      assert.equal("msgpack", select(2, next_message(u)).kind)
    end)

    it("refuses a container whose items pass max_size before they all arrive", function()
      local u = msgpack.unpacker({ max_size = 1000 })
      u:feed("\221\0\1\0\0") -- an array of 65536 items
      assert.is_nil((u:next()))
      u:feed(("\1"):rep(2000))
      local v, err = u:next()
      assert.is_nil(v)
      assert.equal("msgpack", err.kind)
    end)
  end)

  describe("the compiled codec (squall.msgpack.fast, squall.rpc.frame)", function()
    -- The fuzz target's check: it asserts that both codecs, and both RPC
    -- readers, give the same for an input split at a and b.
    local check = dofile("tests/fuzz/msgpack_check.lua")
    local fast = require "squall.msgpack.fast"
    local c_decode = msgpack.c_codec.decode

    local function splits(s)
      for a = 0, math.min(#s, 12) do check(s, a, math.min(#s, a + 5)) end
      check(s, #s, #s)
    end

    it("gives what the C codec gives, for every value and the fuzz seeds", function()
      for _ = 1, 3 do -- the later rounds run compiled
        for _, v in ipairs(VALUES) do splits(msgpack.c_codec.encode(v)) end
        for name in io.popen("ls tests/fuzz/corpus/msgpack"):lines() do
          splits(slurp("tests/fuzz/corpus/msgpack/" .. name))
        end
      end
    end)

    it("takes the common values itself and leaves the rest to C", function()
      local function takes(s)
        return select(2, fast.value(ffi.cast("const uint8_t *", s), 0, #s, 1)) ~= nil
      end
      for _, v in ipairs({ 1, -5, 2 ^ 53, 1.5, "s", ("x"):rep(300), true, null, { 1, "a" },
        { k = { 1, 2 } }, msgpack.map({}), msgpack.bin("b") }) do
        assert.is_true(takes(msgpack.encode(v)), tostring(v))
      end
      local deep = {}
      local t = deep
      for _ = 1, fast.MAX_DEPTH + 1 do t[1] = {}; t = t[1] end
      for _, v in ipairs({ msgpack.ext(1, "x"), 18446744073709551615ULL, -2 ^ 53 - 2, deep }) do
        local s = msgpack.encode(v)
        assert.is_false(takes(s), tostring(v))
        assert.equal(s, msgpack.encode((msgpack.decode(s)))) -- C decoded it
      end
      assert.is_false(takes("\193"))
      assert.equal("invalid type byte 0xc1 (at byte 1)", select(2, msgpack.decode("\193")).message)
      assert.is_false(takes("\146\1")) -- truncated
      assert.equal("msgpack", select(2, msgpack.decode("\146\1")).kind)
    end)

    it("decodes a NaN as the NaN LuaJIT uses, whatever its bits, and float after float",
      function()
        -- all ones is LuaJIT's nil once it is a Lua value's bits
        local s = "\148\203" .. ("\255"):rep(8) .. "\202" .. ("\255"):rep(4) ..
          "\203\63\248\0\0\0\0\0\0" .. "\203\0\0\0\1\96\150\26\126"
        local want = c_decode(s)
        for _ = 1, 300 do -- compiled after the first rounds
          local t = msgpack.decode(s)
          assert.equal(4, #t)
          assert.is_true(t[1] ~= t[1] and t[2] ~= t[2])
          assert.equal(1.5, t[3])
          assert.equal(want[4], t[4])
        end
      end)
  end)
end)
