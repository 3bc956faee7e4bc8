-- squall.log: the line format, levels, the caller's place, bad formats,
-- and the level set from the command line and the environment.
local log = require "squall.log"
local helpers = require "helpers"

local capture, q = helpers.capture_log, helpers.q

-- "[I 261201 03:04:05.678 log_spec:NN] msg": level letter, date, time to
-- the millisecond, the caller's file (without .lua) and line.
local LINE = "^%[(%u) (%d%d%d%d%d%d) (%d%d:%d%d:%d%d%.%d%d%d) ([^%]]+)%] (.*)\n$"

describe("squall.log", function()
  local saved
  before_each(function() saved = log.get_level() end)
  after_each(function() log.set_level(saved) end)

  it("writes one line: level, date and time, the caller's file and line, the message",
    function()
    log.set_level("info")
    local line_no
    local out = capture(function()
      line_no = debug.getinfo(1, "l").currentline + 1
      log.info("hello %s, %d", "world", 42)
    end)
    local letter, date, time, where, msg = out:match(LINE)
    assert.equal("I", letter)
    assert.equal(os.date("%y%m%d"), date)
    assert.truthy(time)
    assert.equal("log_spec:" .. line_no, where)
    assert.equal("hello world, 42", msg)
  end)

  it("writes each level with its letter, and nothing below the threshold", function()
    log.set_level("warn")
    local out = capture(function()
      log.debug("d"); log.info("i"); log.warn("w"); log.error("e")
    end)
    local letters = {}
    for l in out:gmatch("%[(%u) ") do letters[#letters + 1] = l end
    assert.same({ "W", "E" }, letters)
    assert.is_false(log.enabled("info"))
    assert.is_true(log.enabled("error"))
    log.set_level("debug")
    assert.equal("debug", log.get_level())
    out = capture(function() log.debug("now %s", "shown") end)
    assert.matches("^%[D .*%] now shown\n$", out)
  end)

  it("writes a message without arguments as it is, and survives a bad format", function()
    log.set_level("info")
    local out = capture(function() log.info("100% sure") end)
    assert.matches("%] 100%% sure\n$", out)
    out = capture(function() log.info("%d apples", "many") end)
    assert.matches("%%d apples %(bad log format: .*%)\n$", out)
  end)

  it("names the caller's caller with log_at", function()
    log.set_level("info")
    local function helper() log.log_at("warn", 2, "from the helper's caller") end
    local line_no
    local out = capture(function()
      line_no = debug.getinfo(1, "l").currentline + 1
      helper()
    end)
    local letter, _, _, where = out:match(LINE)
    assert.equal("W", letter)
    assert.equal("log_spec:" .. line_no, where)
  end)

  it("refuses an unknown level at the caller's line", function()
    assert.matches('unknown log level "loud"', helpers.raised(function() log.set_level("loud") end))
  end)

  it("takes the level from --log-level and SQUALL_LOG_LEVEL", function()
    local script = helpers.tmpscript([[
      local log = require "squall.log"
      log.debug("debug line"); log.info("info line"); log.warn("warn line")
    ]])
    local bin = q(helpers.squall_real)
    local _, _, err = helpers.run(bin .. " --log-level warn " .. q(script))
    assert.not_matches("info line", err)
    assert.matches("%[W [^%]]+%] warn line", err)
    _, _, err = helpers.run("SQUALL_LOG_LEVEL=debug " .. bin .. " " .. q(script))
    assert.matches("%[D [^%]]+%] debug line", err)
    _, _, err = helpers.run("SQUALL_LOG_LEVEL=loud " .. bin .. " " .. q(script))
    assert.matches('ignoring SQUALL_LOG_LEVEL="loud"', err)
    assert.matches("info line", err)
    os.remove(script)
  end)
end)
