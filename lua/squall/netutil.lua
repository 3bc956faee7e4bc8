--- Listening sockets.
-- @module squall.netutil
local core = require "squall.core"

local M = {}

local FAMILIES = { inet = 4, inet6 = 6, [4] = 4, [6] = 6, unspec = nil }

--- Bind listening sockets for `address` (nil or "" for every interface)
-- and `port`: one socket per address it resolves to, IPv4 and IPv6 each on
-- their own (IPV6_V6ONLY). Port 0 picks a free port, the same for all of
-- them. SO_REUSEADDR is always set; the sockets are close-on-exec.
-- @tparam number port
-- @tparam[opt] string address
-- @tparam[opt] table opts `family` ("inet", "inet6", 4 or 6), `backlog`
--   (default 128), `reuse_port` (SO_REUSEPORT)
-- @treturn table a list of sockets (`fileno`, `getsockname`, `close`)
-- @return nil, err (kinds `resolve`, `address_in_use`, `io`)
function M.bind_sockets(port, address, opts)
  if type(port) ~= "number" or port < 0 or port > 65535 or port % 1 ~= 0 then
    error("port must be an integer from 0 to 65535, got " .. tostring(port), 2)
  end
  if address ~= nil and type(address) ~= "string" then
    error("address must be a string or nil, got " .. type(address), 2)
  end
  opts = opts or {}
  local family = opts.family
  if family ~= nil then
    family = FAMILIES[family]
    if not family then error("unknown family " .. tostring(opts.family), 2) end
  end
  return core.bind_sockets(port, address, family, opts.backlog or 128,
    opts.reuse_port and true or false)
end

return M
