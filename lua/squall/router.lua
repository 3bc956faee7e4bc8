--- Functions by name, from routes and from folders of handler files that
-- reload while the program runs: what squall.rpc answers methods with and
-- squall.celery runs tasks with. A file `dir/a/b.lua` returning a table
-- gives its function `f` the name "a.b.f"; files and folders whose names
-- start with "_" are left out. With reload on, an edited file replaces
-- exactly the names it gave, a new file adds its own, a removed one takes
-- its away, and a file that fails to load keeps the old ones (logged).
-- @module squall.router
local core = require "squall.core"
local log = require "squall.log"
local reload = require "squall.reload"
local util = require "squall.util"

local M = {}

local type, tostring, pairs, ipairs, error = type, tostring, pairs, ipairs, error
local traceback, xpcall = debug.traceback, xpcall

-- Methods by name, and the methods each handler file added (so a reload
-- of the file replaces exactly those).
local Router = util.class()

--- A router: `who` names it in log lines ("rpc", "celery"), `what` in
-- errors about its folder option ("handlers", "tasks").
function M.new(who, what)
  return setmetatable({ methods = {}, by_file = {}, who = who, what = what }, Router)
end

function Router:route(name, target, level)
  if type(name) ~= "string" or name == "" then
    error("route: the name must be a non-empty string, got " .. util.describe(name), level + 1)
  end
  if type(target) == "table" then
    local n = 0
    for k, v in pairs(target) do
      if type(k) == "string" and type(v) == "function" then
        self.methods[name .. "." .. k] = v
        n = n + 1
      end
    end
    if n == 0 then error("route: the table " .. name .. " has no functions", level + 1) end
    return
  end
  util.check_callable(target, level + 1, "route: the handler")
  self.methods[name] = target
end

--- The names routed, sorted.
function Router:names()
  local names = {}
  for name in pairs(self.methods) do names[#names + 1] = name end
  table.sort(names)
  return names
end

-- Load one handler file: `dir/a/b.lua` returning {f = fn} answers "a.b.f".
-- A file that fails to load keeps the methods it had (logged with its
-- file and line).
function Router:load_file(dir, path)
  local rel = path:sub(#dir + 2):gsub("%.lua$", "")
  local prefix = rel:gsub("/", ".")
  local f = io.open(path)
  if not f then
    -- removed: its methods go with it
    for name in pairs(self.by_file[path] or {}) do self.methods[name] = nil end
    self.by_file[path] = nil
    return true
  end
  f:close()
  local chunk, err = loadfile(path)
  local ok, mod = false, err
  if chunk then ok, mod = xpcall(chunk, traceback) end
  if ok and type(mod) ~= "table" then
    ok, mod = false, path .. " returned " .. type(mod) .. ", not a table of functions"
  end
  if not ok then
    log.error("%s: cannot load handler file %s, %s: %s", self.who, path, self.by_file[path] and
      "keeping its old methods" or "so it has no methods yet", tostring(mod))
    return false
  end
  local names = {}
  for k, v in pairs(mod) do
    if type(k) == "string" and type(v) == "function" then names[prefix .. "." .. k] = v end
  end
  for name in pairs(self.by_file[path] or {}) do
    if not names[name] then self.methods[name] = nil end
  end
  for name, fn in pairs(names) do self.methods[name] = fn end
  self.by_file[path] = names
  return true
end

-- Collect every handler file under `dir`; files and folders whose names
-- start with "_" are left out.
function Router:load_folder(dir)
  local files = {}
  for _, path in ipairs(util.find(dir, "-name '*.lua' -type f")) do
    if not path:sub(#dir + 2):match("^_") and not path:sub(#dir + 2):match("/_") then
      files[#files + 1] = path
    end
  end
  table.sort(files)
  for _, path in ipairs(files) do self:load_file(dir, path) end
end

-- Handlers from a folder, reloaded on change while reloading is on.
function Router:add_folder(dir, level)
  if type(dir) ~= "string" then
    error(self.what .. " must be a folder path, got " .. util.describe(dir), level + 1)
  end
  local probe = io.open(dir .. "/.")
  if not probe then
    error(self.what .. ": the folder " .. dir .. " does not exist", level + 1)
  end
  probe:close()
  dir = dir:gsub("/+$", "")
  self:load_folder(dir)
  local cwd = core.cwd()
  local abs = dir:sub(1, 1) == "/" and dir or (cwd .. "/" .. dir:gsub("^%./", ""))
  reload.watch_folder(abs, function(path)
    if path == nil then
      self:load_folder(dir)
    elseif not path:sub(#abs + 2):match("^_") and not path:sub(#abs + 2):match("/_") then
      -- keep paths as the folder was named, so by_file stays consistent
      local rel = dir .. path:sub(#abs + 1)
      if self:load_file(dir, rel) then log.info("%s: reloaded %s", self.who, rel) end
    end
  end)
end

M.Router = Router
return M
