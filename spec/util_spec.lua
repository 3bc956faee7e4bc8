-- squall.util on its own: classes, argument checks, decimal integers and
-- a connection's failure state.
local util = require "squall.util"
local testing = require "squall.testing"
local helpers = require "helpers"

describe("squall.util", function()
  it("builds classes: calling one runs new, extend subclasses it", function()
    local Base = util.class()
    function Base.new(cls, x) return setmetatable({ x = x }, cls) end
    function Base:double() return self.x * 2 end
    local Sub = Base:extend()
    function Sub:triple() return self.x * 3 end
    local s = Sub(5)
    assert.equal(10, s:double())
    assert.equal(15, s:triple())
    assert.is_nil(Base(1).triple)
  end)

  it("describes values for messages and checks ports at the caller's line", function()
    assert.equal("nil", util.describe(nil))
    assert.matches("^string", util.describe("18999"))
    assert.matches("18999", util.describe("18999"))
    local ok, err = pcall(function() util.check_port("8080", 1) end)
    assert.is_false(ok)
    assert.matches("util_spec.lua:%d+:", err)
    assert.has_no.errors(function() util.check_port(0, 1); util.check_port(65535, 1) end)
    assert.has_error(function() util.check_port(65536, 1) end)
    assert.has_error(function() util.check_port(1.5, 1) end)
  end)

  it("reads decimal integers exactly, refusing what 64 bits cannot hold", function()
    assert.equal(42, util.decimal_integer("42"))
    assert.equal(-7, util.decimal_integer("-7"))
    assert.equal(9007199254740992, util.decimal_integer("9007199254740992"))
    assert.equal("9223372036854775807LL", tostring(util.decimal_integer("9223372036854775807")))
    assert.equal("-9223372036854775808LL",
      tostring(util.decimal_integer("-9223372036854775808")))
    assert.is_nil(util.decimal_integer("9223372036854775808"))
    assert.equal("18446744073709551615ULL",
      tostring(util.decimal_integer("18446744073709551615", true)))
    assert.is_nil(util.decimal_integer("18446744073709551616", true))
    assert.is_nil(util.decimal_integer("-1", true))
    assert.is_nil(util.decimal_integer("1e3"))
    assert.is_nil(util.decimal_integer(" 1"))
  end)

  it("keeps a connection's first failure, closing its stream once", testing.async(function()
    local server, client = helpers.stream_pair()
    local conn = { stream = client }
    assert.is_nil(util.failure(conn))
    local first = require("squall.core").error("protocol", "bad reply")
    local none, err = util.broken(conn, first)
    assert.is_nil(none)
    assert.equal(first, err)
    assert.is_true(client:closed())
    -- a later failure does not replace the first; every later call says closed
    util.fail(conn, require("squall.core").error("timeout", "late"))
    assert.equal(first, util.failure(conn))
    local _, later = util.closed(conn)
    assert.equal("closed", later.kind)
    assert.equal(first, later.cause)
    server:close()
  end))
end)
