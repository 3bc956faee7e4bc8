--- IOStream: a TCP connection read and written from a coroutine.
--
-- The stream object is a userdata from runtime/stream.c; this module adds
-- the Lua side of its surface: callback style, `stream.error`,
-- `read_until_close(on_chunk)` and `connect`.
--
-- Inside a coroutine each read waits and returns its result, or `nil, err`
-- (see API.md for the error kinds). With a function as the last argument
-- a call returns at once and calls `callback(result, err)` later.
-- @module squall.iostream
local core = require "squall.core"
local ioloop = require "squall.ioloop"

local M = {}

local methods = core.stream_methods
local mt = core.stream_mt
local c_error = methods._error
local create = coroutine.create
local resume = core.resume
local type, error = type, error

--- The stream's methods, for code that extends streams (TLS does).
M.methods = methods

-- `stream.error` is the error that closed the stream, or nil.
mt.__index = function(s, k)
  local m = methods[k]
  if m ~= nil then return m end
  if k == "error" then return c_error(s) end
  return nil
end

--- True when `x` is a stream.
function M.is_stream(x)
  return getmetatable(x) == mt
end

-- Callback style: run `fn(s, ...)` in a coroutine of its own and pass its
-- results to `callback` on a later loop iteration, never synchronously.
local function call_back(fn, s, callback, ...)
  local loop = ioloop.current()
  local co = create(function(...)
    local r, err = fn(...)
    loop:add_callback(callback, r, err)
  end)
  resume(co, s, ...)
end

-- runtime/stream.c hands a call whose last argument is a function here.
core.stream_call_back(call_back)

local c_read_until_close = methods.read_until_close
local c_read_bytes = methods.read_bytes

-- Stream every chunk to on_chunk as it arrives; "" once the peer closes.
local function read_chunks(s, on_chunk)
  while true do
    local data, err = c_read_bytes(s, 65536, true)
    if not data then
      if err.kind == "closed" and c_error(s) == nil then return "" end
      return nil, err
    end
    on_chunk(data)
  end
end

--- Read everything until the peer closes.
-- @tparam[opt] function on_chunk called with each chunk as it arrives;
--   then "" is returned
-- @tparam[opt] function callback callback style
-- @treturn string the data (or "" with on_chunk)
-- @return nil, err (`closed` when the stream was closed by us, `buffer_full`)
function methods.read_until_close(s, on_chunk, callback)
  if callback ~= nil then
    if type(callback) ~= "function" then
      error("read_until_close: callback must be a function", 2)
    end
    call_back(methods.read_until_close, s, callback, on_chunk)
    return
  end
  if on_chunk == nil then return c_read_until_close(s) end
  if type(on_chunk) ~= "function" then
    error("read_until_close: on_chunk must be a function", 2)
  end
  return read_chunks(s, on_chunk)
end

local c_write = methods.write
--- Queue data (a string or an array of strings) for writing; see API.md.
-- With a callback, it is called with (true) once the data reached the
-- kernel, or (nil, err).
function methods.write(s, data, callback)
  if callback == nil then return c_write(s, data) end
  if type(callback) ~= "function" then
    error("write: callback must be a function", 2)
  end
  local ok, err = c_write(s, data)
  if not ok then
    ioloop.current():add_callback(callback, nil, err)
    return
  end
  call_back(methods.flush, s, callback)
end

local c_set_close_callback = methods.set_close_callback
--- Call `fn()` once when the stream closes, whoever closed it (on the next
-- loop iteration when it is closed already). nil removes it.
function methods.set_close_callback(s, fn)
  if c_set_close_callback(s, fn) == false then
    ioloop.current():add_callback(fn)
  end
end

--- Connect to host:port. Waits inside a coroutine.
-- @tparam string host a name (resolved without blocking the loop) or IP
-- @tparam number port
-- @tparam[opt] table opts `timeout`, `source_ip`, `source_port`,
--   `max_buffer_size`, `read_chunk_size`, `write_high_water`,
--   `max_write_buffer_size`
-- @treturn stream
-- @return nil, err (kinds `resolve`, `refused`, `unreachable`, `timeout`, `io`)
function M.connect(host, port, opts, callback)
  if type(host) ~= "string" then error("host must be a string", 2) end
  if type(port) ~= "number" then error("port must be a number", 2) end
  if type(opts) == "function" and callback == nil then opts, callback = nil, opts end
  local loop = ioloop.current()
  if callback then
    call_back(function(_, ...) return core.connect(loop._uv, ...) end, nil, callback,
      host, port, opts)
    return
  end
  return core.connect(loop._uv, host, port, opts)
end

return M
