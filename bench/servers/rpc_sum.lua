--- MessagePack-RPC: a server answering sum(a, b), for make bench.
--     squall bench/servers/rpc_sum.lua PORT
local ioloop = require "squall.ioloop"
local rpc = require "squall.rpc"

local server = rpc.Server()
server:route("sum", function(_, a, b) return a + b end)
server:listen(tonumber(arg[1]), "127.0.0.1")
ioloop.current():start()
