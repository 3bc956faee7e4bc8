-- squall.reader on its own, over a real stream pair: the read buffer the
-- Redis and MySQL clients cut messages out of.
local reader = require "squall.reader"
local testing = require "squall.testing"
local helpers = require "helpers"

local async, pair = testing.async, helpers.stream_pair

describe("squall.reader", function()
  it("takes exact byte counts across chunks, leaving the rest buffered", async(function()
    local server, client = pair()
    local r = reader.new(server)
    client:write("abc")
    client:flush()
    assert.equal("ab", r:take(2))
    client:write("defgh")
    assert.equal("cdef", r:take(4)) -- one byte buffered, three more read
    assert.equal("gh", r:take(2))
    assert.equal(0, r:buffered())
  end))

  it("reads a value larger than its chunk whole", async(function()
    local server, client = pair()
    local r = reader.new(server)
    local big = ("0123456789"):rep(20000) -- 200 KB, past the 64 KiB chunk
    client:write("x" .. big)
    assert.equal("x", r:take(1))
    assert.equal(big, r:take(#big))
  end))

  it("cuts CRLF lines however they arrive, and refuses one past max", async(function()
    local server, client = pair()
    local r = reader.new(server)
    client:write("+OK\r")
    client:flush()
    local got
    local f = require("squall.gen").spawn(function() got = r:line(100) end)
    client:write("\n:42\r\n")
    f:result()
    assert.equal("+OK", got)
    assert.equal(":42", r:line(100))
    client:write(("y"):rep(50))
    local none, err = r:line(10, "a status line")
    assert.is_nil(none)
    assert.equal("protocol", err.kind)
    assert.matches("a status line longer than 10 bytes", tostring(err))
  end))

  it("counts what nobody read, in its buffer and in the stream", async(function()
    local server, client = pair()
    local r = reader.new(server)
    client:write("12345")
    assert.equal("1", r:take(1))
    assert.equal(4, r:unread())
    client:write("678")
    client:flush()
    helpers.eventually(function() return r:unread() == 7 end, "the three bytes")
  end))

  it("gives the stream's error when it closes mid-value", async(function()
    local server, client = pair()
    local r = reader.new(server)
    client:write("abc")
    client:close()
    local none, err = r:take(10)
    assert.is_nil(none)
    assert.equal("closed", err.kind)
  end))
end)
