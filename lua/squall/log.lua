--- Logging to stderr with time and level, as Tornado's log formatter does.
-- @module squall.log
local core = require "squall.core"

local M = {}

local LEVELS = { debug = 10, info = 20, warn = 30, warning = 30, error = 40 }
local LETTERS = { [10] = "D", [20] = "I", [30] = "W", [40] = "E" }
local threshold = LEVELS.info
-- `squall --log-level LEVEL` sets this; forked children inherit it.
local env_level = os.getenv("SQUALL_LOG_LEVEL")
if env_level and env_level ~= "" then
  if LEVELS[env_level] then
    threshold = LEVELS[env_level]
  else
    io.stderr:write(("squall.log: ignoring SQUALL_LOG_LEVEL=%q (debug, info, warn, error)\n")
      :format(env_level))
  end
end

local format, select, tostring = string.format, select, tostring
local floor = math.floor

--- Set the lowest level that is written.
-- @tparam string level "debug", "info", "warn" or "error"
function M.set_level(level)
  local n = LEVELS[level]
  if not n then
    error(format("unknown log level %q (debug, info, warn, error)", tostring(level)), 2)
  end
  threshold = n
end

--- The current level's name.
function M.get_level()
  for name, n in pairs(LEVELS) do
    if n == threshold and name ~= "warning" then return name end
  end
end

--- True when messages at `level` are written.
function M.enabled(level)
  return (LEVELS[level] or 0) >= threshold
end

local function where(depth)
  if not depth then return "squall" end
  local info = debug.getinfo(depth, "Sl")
  if not info then return "?" end
  local src = info.short_src:match("([^/]+)%.lua$") or info.short_src
  return src .. ":" .. (info.currentline or 0)
end

local function emit(n, depth, fmt, ...)
  if n < threshold then return end
  local msg
  if select("#", ...) > 0 then
    local ok, s = pcall(format, fmt, ...)
    msg = ok and s or (tostring(fmt) .. " (bad log format: " .. s .. ")")
  else
    msg = tostring(fmt)
  end
  local now = core.wall_time()
  io.stderr:write(format("[%s %s.%03d %s] %s\n", LETTERS[n],
    os.date("%y%m%d %H:%M:%S", floor(now)), floor((now % 1) * 1000),
    where(depth), msg))
end

-- Each level checks the threshold before calling emit: a message that is
-- not written then costs no frame of emit's size. LuaJIT shrinks a
-- coroutine's stack only once it is past 94 slots, so a handler's
-- `log.debug(...)` before its first read would otherwise leave every idle
-- connection's coroutine about 100 bytes bigger for good.

--- Write at debug level. `fmt` and its arguments go through string.format
-- when arguments are given; otherwise `fmt` is written as it is.
function M.debug(fmt, ...) if threshold <= 10 then emit(10, 4, fmt, ...) end end
--- Write at info level.
function M.info(fmt, ...) if threshold <= 20 then emit(20, 4, fmt, ...) end end
--- Write at warning level.
function M.warn(fmt, ...) if threshold <= 30 then emit(30, 4, fmt, ...) end end
M.warning = M.warn
--- Write at error level.
function M.error(fmt, ...) emit(40, 4, fmt, ...) end

--- Write a message at `level` naming the caller `depth` levels up.
function M.log_at(level, depth, fmt, ...)
  emit(LEVELS[level] or 40, depth + 3, fmt, ...)
end

-- Errors raised in callbacks the C runtime dispatched arrive here.
core.set_reporter(function(what, msg)
  emit(40, nil, "uncaught error in %s: %s", what, tostring(msg))
end)

return M
