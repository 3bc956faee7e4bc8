--- Fuzz target for Celery's wire format (squall.celery.message), run by
-- make check-fuzz through tests/fuzz/driver.lua. Each input is read three
-- ways: as a message off a queue (the kombu envelope), as the body inside
-- a well-formed envelope (JSON, or MessagePack when it starts with a
-- MessagePack array byte), and as a result meta and a control message.
-- Nothing may raise; what is refused comes as nil and an error with a
-- kind; a task that is accepted is encoded again and reads back the same.
local message = require "squall.celery.message"
local json = require "squall.json"
local driver = dofile((arg[0]:match("^(.*)/") or ".") .. "/driver.lua")

local KINDS = { celery = true, json = true, msgpack = true }

local function check_refusal(v, err)
  if v == nil then
    assert(type(err) == "table" and KINDS[err.kind], "a refusal without a kind: " .. tostring(err))
  end
end

local function check_task(raw)
  local t, err = message.parse_task(raw)
  check_refusal(t, err)
  if not t then return false end
  assert(type(t.id) == "string" and type(t.name) == "string", "a task without id or name")
  assert(type(t.args) == "table" and type(t.kwargs) == "table", "args or kwargs not tables")
  assert(t.nargs >= 0 and t.nargs % 1 == 0, "a bad argument count")
  assert(t.eta == nil or type(t.eta) == "number", "an eta that is not a time")
  -- what was accepted goes out again and reads the same
  local ok, again = pcall(message.task, { id = t.id, name = t.name, args = t.args,
    kwargs = t.kwargs, eta = t.eta, expires = t.expires, retries = t.retries, queue = "q",
    serializer = "json", origin = "fuzz" })
  if ok then
    local back = assert(message.parse_task(again), "a task encoded again does not read back")
    assert(back.id == t.id and back.name == t.name and back.nargs == t.nargs,
      "a task encoded again reads back differently")
  else
    -- only what JSON cannot hold (NaN, infinities from a MessagePack body)
    assert(tostring(again):find("no JSON form"), "re-encoding raised: " .. tostring(again))
  end
  return true
end

driver.run("celery", function(input)
  local accepted = check_task(input)
  -- the input as a body inside a good envelope
  local msgpack_body = input:byte(1) and (input:byte(1) >= 0x90 and input:byte(1) <= 0x9f or
    input:byte(1) == 0xdc or input:byte(1) == 0xdd)
  local env = json.encode({ body = message.base64(input),
    ["content-type"] = msgpack_body and "application/x-msgpack" or "application/json",
    ["content-encoding"] = "utf-8",
    headers = { id = "fuzz-id", task = "fuzz.task", eta = json.null, expires = json.null },
    properties = { body_encoding = "base64", delivery_tag = "t",
      delivery_info = { exchange = "", routing_key = "q" } } })
  accepted = check_task(env) or accepted
  local m, err = message.parse_meta(input)
  check_refusal(m, err)
  local c, cerr = message.parse_control(input)
  check_refusal(c, cerr)
  for _, s in ipairs({ input, input:sub(1, 40) }) do
    local t = message.parse_time(s)
    assert(t == nil or type(t) == "number", "a time that is not a number")
  end
  return accepted or m ~= nil or c ~= nil
end)
