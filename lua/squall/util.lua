--- Helpers the squall modules share: argument checks that raise at the
-- caller's line with what was given and what was expected.
-- @module squall.util
local core = require "squall.core"
local ffi = require "ffi"

local M = {}

local type, tostring, error, format, select = type, tostring, error, string.format, select
local setmetatable, getmetatable = setmetatable, getmetatable
local byte, find, tonumber = string.byte, string.find, tonumber

-- ---- classes ----------------------------------------------------------

-- Every class made here has this as its root: `extend` and a default
-- `new` come from it.
local Object = {}
Object.__index = Object

local function call_new(cls, ...) return cls.new(cls, ...) end

--- The one way squall builds objects. `local Pool = util.class()` makes a
-- class: its instances are `setmetatable(t, Pool)`, so methods live in
-- the class (`function Pool:get() ... end`); calling the class, `Pool(...)`,
-- calls `Pool.new(Pool, ...)` (the default makes an empty instance); a
-- subclass, `Pool:extend()` or `util.class(Pool)`, looks up in its base
-- what it does not define itself. `fields` (a table) becomes the class.
function M.class(base, fields)
  local cls = fields or {}
  cls.__index = cls
  return setmetatable(cls, { __index = base or Object, __call = call_new })
end

--- A subclass of this class (every class made by util.class has it).
function Object.extend(cls, fields)
  return M.class(cls, fields)
end

--- An empty instance (a class usually defines its own `new`).
function Object.new(cls)
  return setmetatable({}, cls)
end

--- A table of the arguments with their count in `n` (nils kept).
function M.pack(...)
  return { n = select("#", ...), ... }
end

--- How a value reads in an error message: `string "18999"`, `nil`,
-- `number 3.5`, `table`.
function M.describe(v)
  local t = type(v)
  if t == "string" then return format("string %q", v) end
  if t == "number" or t == "boolean" then return t .. " " .. tostring(v) end
  return t
end

--- Raise unless the caller may wait here: inside a coroutine that Squall
-- resumes (gen.spawn, a handler, run_sync), not outside every coroutine
-- nor in one started by coroutine.wrap/resume (that caller would get the
-- yield). `what` names the call; the error is at `level`, as for error().
-- Returns the running coroutine.
function M.need_coroutine(what, level)
  local why = core.wait_refusal(what) -- runtime/coro.c words it for C and Lua
  if why then error(why, level + 1) end
  return (coroutine.running())
end

--- Raise unless fn can be called (a function or a table with __call).
-- @tparam number level the caller's level, as for error()
function M.check_callable(fn, level, what)
  local t = type(fn)
  if t == "function" then return end
  local mt = getmetatable(fn)
  if mt and mt.__call then return end
  error(format("%s must be a function, got %s", what or "callback", M.describe(fn)), level + 1)
end

-- ---- client connections --------------------------------------------
-- A connection over one stream (squall.redis, squall.mysql, squall.rpc)
-- that fails for good keeps its first failure; these functions own that
-- state (the fields `_broken` and `_closed`, which no other module reads
-- or writes): fail or broken to set it, failure to ask, closed for what
-- every later call returns.

--- The error `conn` failed with for good, or nil while it is usable.
function M.failure(conn)
  return conn._broken
end

--- Mark `conn` failed with `err` unless it failed already (the stream is
-- left as it is); returns the first failure.
function M.fail(conn, err)
  if not conn._broken then conn._broken = err end
  return conn._broken
end

--- Fail for good with `err` and close the stream: the cause every later
-- call names (see closed). Returns nil, err: the call that met the
-- failure gets its own kind.
function M.broken(conn, err)
  if not conn._broken then
    conn._broken = err
    conn.stream:close()
  end
  return nil, err
end

--- For a client connection's close(): later calls get plain `closed`.
function M.close_connection(conn)
  if not conn._broken then
    conn._broken = core.error("closed", "the connection is closed")
    conn._closed = conn._broken
    conn.stream:close()
  end
end

--- What every call on a connection that failed (M.broken) or was closed
-- gets: nil, err of kind `closed`, with `err.cause` the first error
-- (none after close()).
function M.closed(conn)
  local e = conn._closed
  if not e then
    local first = conn._broken
    e = core.error("closed", "the connection failed earlier (" .. tostring(first) .. ")")
    e.cause = first
    conn._closed = e
  end
  return nil, e
end

-- ---- decimal integers ---------------------------------------------------

local int64_t, uint64_t = ffi.typeof("int64_t"), ffi.typeof("uint64_t")
local TWO53 = 9007199254740992
local LIMITS = { [false] = "9223372036854775807", [true] = "9223372036854775808",
  unsigned = "18446744073709551615" }

--- The exact value of a decimal integer's text (a protocol's: RESP, MySQL
-- text rows): a number when |v| <= 2^53, else int64_t (uint64_t when
-- `unsigned`) cdata; nil for text that is not `-?digits` or past the
-- 64-bit range (a wrapped value would be silently wrong).
function M.decimal_integer(s, unsigned)
  if not find(s, "^%-?%d+$") then return nil end
  local n = tonumber(s)
  if unsigned and n < 0 then return nil end
  if n < TWO53 and n > -TWO53 then return n end
  local neg = byte(s, 1) == 45
  local digits = neg and s:sub(2):gsub("^0+", "") or s:gsub("^0+", "")
  -- (2^53 + 1 reads as 2^53: only the text tells them apart)
  if digits == "9007199254740992" then return n end
  local limit = unsigned and LIMITS.unsigned or LIMITS[neg]
  if #digits > #limit or (#digits == #limit and digits > limit) then return nil end
  local v = ffi.new(unsigned and uint64_t or int64_t, 0)
  for i = 1, #digits do v = v * 10 + (byte(digits, i) - 48) end
  return neg and -v or v
end

--- Raise when called in a worker thread of squall.thread, where `what`
-- (starting threads, running an IOLoop, listening) cannot be done: most
-- often the main script was given to thread.run as a module, and loading
-- it there would start the whole program again in every worker.
function M.check_main_thread(what, level)
  if not core.in_worker then return end
  local loading = core.worker_loading
  local why = loading and format(" It ran while module %q loaded for thread.run: is %q " ..
    "the main script? Put the functions workers run in a module of their own that " ..
    "starts nothing when loaded.", loading, loading) or ""
  error(format("%s: not in a worker thread of squall.thread.%s", what, why), level + 1)
end

--- The paths `find root <what>` lists (`what`: find's tests, such as
-- "-type d"), root quoted for the shell: the one walk of a folder that
-- handler folders (squall.router) and hot reload (squall.reload) make.
function M.find(root, what)
  local found = {}
  local p = io.popen("find '" .. root:gsub("'", "'\\''") .. "' " .. what .. " 2>/dev/null")
  for line in p:lines() do found[#found + 1] = line end
  p:close()
  return found
end

--- Raise unless port is an integer from 0 to 65535.
function M.check_port(port, level)
  if type(port) ~= "number" or port < 0 or port > 65535 or port % 1 ~= 0 then
    local hint = type(port) == "string" and tonumber(port)
      and " (convert it with tonumber)" or ""
    error(format("port must be an integer from 0 to 65535, got %s%s", M.describe(port), hint),
      level + 1)
  end
end

-- ---- bytes: base64 and randomness, through OpenSSL ------------------------

pcall(ffi.cdef, [[
int EVP_EncodeBlock(unsigned char *t, const unsigned char *f, int n);
int EVP_DecodeBlock(unsigned char *t, const unsigned char *f, int n);
int RAND_bytes(unsigned char *buf, int num);
]])
local C = ffi.C
local floor, sub = math.floor, string.sub

local scratch, scratch_len = nil, 0
local function buffer(n)
  if n > scratch_len then
    scratch_len = n
    scratch = ffi.new("unsigned char[?]", n)
  end
  return scratch
end

--- Base64 (RFC 4648, padded).
function M.base64(s)
  local out = buffer(floor((#s + 2) / 3) * 4 + 1)
  return ffi.string(out, C.EVP_EncodeBlock(out, s, #s))
end

--- The bytes of base64 text, or nil when it is not base64.
function M.unbase64(s)
  if #s % 4 ~= 0 or find(s, "[^%w+/=]") then return nil end
  local out = buffer(#s / 4 * 3 + 1)
  local n = C.EVP_DecodeBlock(out, s, #s)
  if n < 0 then return nil end
  -- OpenSSL counts the padding as zero bytes
  if sub(s, -2) == "==" then n = n - 2 elseif sub(s, -1) == "=" then n = n - 1 end
  return ffi.string(out, n)
end

--- `n` random bytes from OpenSSL (keys, nonces); raises when it has none.
function M.random_bytes(n)
  local out = buffer(n > 0 and n or 1)
  if n > 0 and C.RAND_bytes(out, n) ~= 1 then error("no random bytes from OpenSSL", 2) end
  return ffi.string(out, n)
end

return M
