-- squall.json: numbers exactly, tables by squall.msgpack's rules, and
-- Python's json reading what Squall wrote.
local json = require "squall.json"
local msgpack = require "squall.msgpack"
local helpers = require "helpers"

describe("squall.json", function()
  it("writes every number so that it reads back the same", function()
    local values = { 0, -1, 123456789012345, 2 ^ 53, -2 ^ 53, 0.1, 1 / 3, 1e300, -2.5e-300,
      5e-324, 9007199254740993ULL, -9223372036854775807LL - 1 }
    local text = json.encode(values)
    assert.equal("[0,-1,123456789012345,9007199254740992,-9007199254740992,0.1," ..
      "0.3333333333333333,1e+300,-2.5e-300,4.94065645841247e-324,9007199254740993," ..
      "-9223372036854775808]", text)
    local back = json.decode(text)
    for i = 1, 10 do assert.equal(values[i], back[i]) end
    -- Python's json reads the same numbers (it keeps big integers exact)
    local path = os.tmpname()
    helpers.spit(path, text)
    local status, out = helpers.run(helpers.python .. " -c 'import json,sys; " ..
      "v = json.load(open(sys.argv[1])); print(v[2], repr(v[6]), v[10], v[11])' " .. path)
    os.remove(path)
    assert.equal(0, status)
    assert.equal("123456789012345 0.3333333333333333 9007199254740993 -9223372036854775808\n",
      out)
  end)

  it("encodes tables as squall.msgpack does, and null as null", function()
    assert.equal("[]", json.encode({}))
    assert.equal("{}", json.encode(msgpack.map({})))
    assert.equal("[1,null,3,null]", json.encode(msgpack.array({ 1, nil, 3 }, 4)))
    assert.equal('{"1.5":true}', json.encode({ [1.5] = true }))
    assert.equal('["x\\n\\"",null,false]', json.encode({ "x\n\"", json.null, false }))
    assert.equal(json.null, msgpack.null)
    local obj = json.decode(json.encode({ a = { b = "c" }, n = 2 }))
    assert.same({ a = { b = "c" }, n = 2 }, obj)
  end)

  it("raises for what JSON cannot hold, and decodes bad text as nil, err", function()
    for _, bad in ipairs({ { f = print }, { 0 / 0 }, { math.huge } }) do
      assert.has_error(function() json.encode(bad) end)
    end
    local deep = {}
    local cur = deep
    for _ = 1, 250 do cur[1] = {}; cur = cur[1] end
    assert.has_error(function() json.encode(deep) end)
    local v, err = json.decode("[1, 2")
    assert.is_nil(v)
    assert.equal("json", err.kind)
    v, err = json.decode(("["):rep(300) .. ("]"):rep(300))
    assert.is_nil(v)
    assert.equal("json", err.kind)
  end)
end)
