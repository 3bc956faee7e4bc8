--- Hot reload: when a Lua module the program loaded changes on disk (or on
-- SIGHUP), load it again and put its functions into the old module table
-- in place.
--
--     squall --reload server.lua          -- or: require("squall.reload").enable()
--
-- What is reloaded: `require(name)` returns the new version from then on,
-- and the new functions are also put into the old module table in place,
-- recursing into tables both versions have (classes such as a TCPServer
-- subclass and their methods), so code holding the old table calls the new
-- functions: a server's next connection runs the new `handle_stream`. A
-- coroutine already running an old function finishes with it, and keeps
-- seeing the old table's data.
--
-- What is not: the old table's other values (data) are not overwritten;
-- upvalues of the old functions (module-level `local`s) are not carried
-- over, the new functions see the new version's own, so state that must
-- survive a reload belongs in a module that is not edited; the main script
-- is not a module and is not reloaded; squall's own modules and libraries
-- installed under /usr (Debian's and LuaRocks' trees) are never reloaded.
--
-- A module that fails to load or raises while loading leaves the old code
-- running; the error is logged with its file and line.
-- @module squall.reload
local core = require "squall.core"
local ioloop = require "squall.ioloop"
local log = require "squall.log"
local util = require "squall.util"

local M = {}

local enabled = false
local modules = {}   -- name -> path
local by_path = {}   -- path -> name
local dir_watch = setmetatable({}, { __mode = "k" }) -- loop -> { dir -> watcher }
local pending, flush_scheduled = {}, false
local versions = {}  -- name -> the module's tables so far (weak)
local installed = setmetatable({}, { __mode = "k" }) -- loops set up
local DEBOUNCE = 0.05 -- editors write a file in several steps
local folders = {}   -- absolute dir -> fn(path): watch_folder's trees
local pending_files = {} -- path -> fn, for files under those trees
-- path -> the stamp (time and size) the file had when it was (re)loaded: the
-- watchers start with the loop, so an edit made between loading and
-- starting is found by comparing (see install)
local stamps = {}

local function dirname(path)
  return path:match("^(.*)/[^/]*$") or "."
end

-- The real working directory (getcwd), not $PWD, which a launcher that
-- sets the directory may leave pointing elsewhere.
local function absolute(path)
  if path:sub(1, 1) == "/" then return path end
  local cwd = core.cwd()
  return cwd and (cwd .. "/" .. path:gsub("^%./", "")) or path
end

local function basename(path)
  return path:match("([^/]*)$")
end

local function traceback(e)
  return debug.traceback(tostring(e), 2)
end

-- Put the new version's functions into the old table, recursing into
-- tables both versions have (so a class table a server holds gets the new
-- methods); keys the old table lacks are added; its other values stay, so
-- code still running with the old table keeps seeing its data.
local function patch(old, new, seen)
  for k, v in pairs(new) do
    local o = rawget(old, k)
    if type(v) == "function" or o == nil then
      rawset(old, k, v)
    elseif type(v) == "table" and type(o) == "table" then
      if not seen[o] and not seen[v] then
        seen[o], seen[v] = true, true
        patch(o, v, seen)
      end
    end
  end
end

--- Load module `name` again from its file and patch it in place.
-- @treturn boolean true when it reloaded; false (and the error logged)
--   when the new code does not load, leaving the old code running
function M.reload(name)
  local path = modules[name] or package.searchpath(name, package.path)
  if not path then
    log.error("reload: cannot find module %s", name)
    return false
  end
  stamps[path] = core.file_stamp(path)
  local chunk, err = loadfile(path)
  if not chunk then
    log.error("reload of %s failed, keeping the old code: %s", name, err)
    return false
  end
  local ok, new = xpcall(chunk, traceback, name)
  if not ok then
    log.error("reload of %s failed, keeping the old code: %s", name, new)
    return false
  end
  if new == nil then new = true end
  local old = package.loaded[name]
  if type(new) == "table" then
    -- Every earlier version someone may still hold gets the new functions.
    local known = versions[name]
    if not known then
      known = setmetatable({}, { __mode = "k" })
      versions[name] = known
    end
    if type(old) == "table" then known[old] = true end
    for t in pairs(known) do patch(t, new, { [t] = true, [new] = true }) end
    known[new] = true
  end
  -- require() from now on returns the new version, constants and all.
  package.loaded[name] = new
  log.info("reloaded %s", name)
  return true
end

--- Reload every watched module.
function M.reload_all()
  local names = {}
  for name in pairs(modules) do names[#names + 1] = name end
  table.sort(names)
  for _, name in ipairs(names) do M.reload(name) end
end

local function flush()
  flush_scheduled = false
  local names = {}
  for name in pairs(pending) do names[#names + 1] = name end
  pending = {}
  table.sort(names)
  for _, name in ipairs(names) do M.reload(name) end
  local files = pending_files
  pending_files = {}
  for path, fn in pairs(files) do
    stamps[path] = core.file_stamp(path)
    local ok, err = xpcall(fn, traceback, path)
    if not ok then log.error("reload of %s failed: %s", path, err) end
  end
end

-- The watch_folder tree that holds `dir`, if any.
local function folder_of(dir)
  for root, fn in pairs(folders) do
    if dir == root or dir:sub(1, #root + 1) == root .. "/" then return fn end
  end
end

local function schedule_flush()
  if not flush_scheduled then
    flush_scheduled = true
    ioloop.current():call_later(DEBOUNCE, flush)
  end
end

local function changed(dir, filename)
  if not filename then return end
  local path = dir .. "/" .. filename
  local name = by_path[path]
  if name then
    pending[name] = true
  elseif filename:match("%.lua$") and folder_of(dir) then
    pending_files[path] = folder_of(dir)
  else
    return
  end
  schedule_flush()
end

-- Watch the directory (not the file: editors replace files by renaming,
-- which would end a watch on the old file).
local function watch_dir(loop, dir)
  local dirs = dir_watch[loop]
  if not dirs then
    dirs = {}
    dir_watch[loop] = dirs
  end
  if dirs[dir] then return end
  local w, err = core.watch_path(loop:core_loop(), dir, function(filename)
    changed(dir, filename)
  end)
  if not w then
    log.warn("reload: cannot watch %s: %s", dir, tostring(err))
    return
  end
  dirs[dir] = w
end

-- Libraries installed on the system (Debian's and LuaRocks' trees) do not
-- change under a running program, and running their code again could undo
-- their setup: only the program's own modules are watched.
local SYSTEM_DIRS = { "/usr/share/lua/", "/usr/local/share/lua/", "/usr/lib/",
  "/usr/local/lib/", "/usr/share/squall/", "/usr/local/share/squall/" }

local function is_system(path)
  for _, dir in ipairs(SYSTEM_DIRS) do
    if path:sub(1, #dir) == dir then return true end
  end
  return false
end

local function track(name)
  if modules[name] or type(name) ~= "string" or name:match("^squall%.") then return end
  local path = package.searchpath(name, package.path)
  if not path or is_system(path) then return end -- C, preload or a library
  path = absolute(path)
  modules[name] = path
  stamps[path] = core.file_stamp(path)
  by_path[dirname(path) .. "/" .. basename(path)] = name
  for loop in pairs(installed) do
    if not loop:closed() then watch_dir(loop, dirname(path)) end
  end
end

local find = util.find -- what `find root ...` lists

-- Every directory under root (root included), found now.
local function subdirs(root)
  return find(root, "-type d")
end

-- The Lua files under root as they are now: path -> stamp.
local function lua_files(root)
  local now = {}
  for _, path in ipairs(find(root, "-name '*.lua' -type f")) do
    now[path] = core.file_stamp(path)
  end
  return now
end

local function watch_folder_on(loop, root)
  for _, dir in ipairs(subdirs(root)) do watch_dir(loop, dir) end
end

-- What changed since it was loaded and before the watchers ran: modules,
-- and files under the folders (new, edited or removed), queued for flush.
local function catch_up()
  for name, path in pairs(modules) do
    if core.file_stamp(path) ~= stamps[path] then pending[name] = true end
  end
  for root, fn in pairs(folders) do
    local now = lua_files(root)
    for path, t in pairs(now) do
      if t ~= stamps[path] then pending_files[path] = fn end
    end
    for path in pairs(stamps) do
      if now[path] == nil and path:sub(1, #root + 1) == root .. "/" and not by_path[path] then
        pending_files[path] = fn
      end
    end
  end
  if next(pending) or next(pending_files) then schedule_flush() end
end

-- Set up a loop: watchers for every tracked module and folder, and SIGHUP;
-- then what changed before they watched.
local function install(loop)
  if installed[loop] then return end
  installed[loop] = true
  for _, path in pairs(modules) do watch_dir(loop, dirname(path)) end
  for root in pairs(folders) do watch_folder_on(loop, root) end
  catch_up()
  loop:add_signal_handler("SIGHUP", function()
    M.reload_all()
    for root, fn in pairs(folders) do
      -- new subfolders are watched from now on; fn(nil): look at them all
      watch_folder_on(loop, root)
      local ok, err = xpcall(fn, traceback, nil)
      if not ok then log.error("reload of %s failed: %s", root, err) end
    end
  end)
end

--- True once reloading is on (enable, or `squall --reload`).
function M.enabled()
  return enabled
end

--- Watch a folder of Lua files that are not modules (RPC handler folders)
-- while reloading is on: `fn(path)` runs, debounced, when a `.lua` file
-- under it is written, created or removed, and `fn(nil)` on SIGHUP (look
-- at everything: subfolders made since are watched from then on).
-- @tparam string dir relative to the current directory, or absolute
-- @tparam function fn
-- @treturn boolean false when reloading is off (nothing is watched)
function M.watch_folder(dir, fn)
  if type(dir) ~= "string" then error("watch_folder: dir must be a string", 2) end
  if type(fn) ~= "function" then error("watch_folder: fn must be a function", 2) end
  if not enabled then return false end
  local root = absolute(dir):gsub("/+$", "")
  folders[root] = fn
  for path, t in pairs(lua_files(root)) do stamps[path] = t end
  for loop in pairs(installed) do
    if not loop:closed() then watch_folder_on(loop, root) end
  end
  return true
end

--- Turn reloading on: modules loaded so far and from now on are watched,
-- on the loop that runs (set up when it starts; fork_processes first is
-- fine: each child watches for itself).
-- @tparam[opt] table opts `modules`: a list of module names to watch
--   besides those loaded (they need not be loaded yet)
function M.enable(opts)
  opts = opts or {}
  for _, name in ipairs(opts.modules or {}) do track(name) end
  if enabled then return end
  enabled = true
  for name in pairs(package.loaded) do track(name) end
  local require_ = require
  -- Later requires are tracked as they happen. The real require is a
  -- tail call, so its "module not found" names the caller's line, not
  -- this file's.
  _G.require = function(name, ...)
    track(name)
    return require_(name, ...)
  end
  ioloop.on_start(install)
  if ioloop.loops_created() > 0 then
    local loop = ioloop.current()
    if loop:is_running() then install(loop) end
  end
end

--- The watched modules: a table of name -> file.
function M.watched()
  local copy = {}
  for k, v in pairs(modules) do copy[k] = v end
  return copy
end

return M
