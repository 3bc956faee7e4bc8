--- Lua tasks for the Celery example: the function `words` here is the
-- task "text.words" (a tasks folder is collected as an RPC handlers
-- folder is, and reloads the same way under `squall --reload`).
local celery = require "squall.celery"
local log = require "squall.log"

local M = {}

--- Count the words of a text; kwargs `min_length` skips short ones.
function M.words(text, kwargs)
  local min = kwargs and kwargs.min_length or 1
  local n = 0
  for w in text:gmatch("%S+") do
    if #w >= min then n = n + 1 end
  end
  log.info("task %s: %d words", celery.current().id, n)
  return n
end

--- Shout a text back; a text that is empty fails (Python sees an exception).
function M.shout(text)
  if text == "" then return nil, "nothing to shout" end
  return text:upper() .. "!"
end

return M
