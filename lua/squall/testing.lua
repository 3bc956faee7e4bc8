--- Helpers for busted specs that exercise the loop over real sockets.
-- @module squall.testing
local ioloop = require "squall.ioloop"
local netutil = require "squall.netutil"

local M = {}

-- Under valgrind everything is many times slower; make check sets this so
-- spec timeouts stay meaningful without being edited.
local scale = tonumber(os.getenv("SQUALL_TEST_TIMEOUT_SCALE")) or 1

--- Wrap `fn` for busted's `it`: it runs in a coroutine on a fresh IOLoop
-- (made current for its duration, closed afterwards), and the spec fails
-- when fn raises or does not return within `opts.timeout` seconds
-- (default 5).
-- @tparam function fn the spec body; it may wait (sleep, read, ...)
-- @tparam[opt] table opts `{timeout = seconds}`
-- @treturn function for `it(name, ...)`
function M.async(fn, opts)
  local timeout = (opts and opts.timeout or 5) * scale
  return function(...)
    local args = { n = select("#", ...), ... }
    local loop = ioloop.new()
    loop:make_current()
    local ok, err = pcall(loop.run_sync, loop, function()
      return fn(unpack(args, 1, args.n))
    end, timeout, { traceback = true })
    loop:close(true)
    ioloop.clear_current()
    if not ok then error(err, 0) end
  end
end

--- Bind a listening socket to 127.0.0.1 on a free port.
-- @treturn socket the listening socket (see netutil.bind_sockets)
-- @treturn number its port
function M.bind_unused_port()
  local socks, err = netutil.bind_sockets(0, "127.0.0.1")
  if not socks then error("bind_unused_port: " .. tostring(err), 2) end
  local _, port = socks[1]:getsockname()
  return socks[1], port
end

return M
