--- examples/echo.lua with squall.metrics serving its built-in metrics on
-- MPORT (for make bench's overhead figure; the bench scrapes it once a
-- second, as Prometheus would).
--     squall bench/servers/echo_metrics.lua PORT MPORT
local metrics = require "squall.metrics"
metrics.serve(tonumber(arg[2]), "127.0.0.1")
-- echo.lua reads its port (and address) from arg
arg = { [0] = "examples/echo.lua", arg[1] } -- luacheck: ignore 121
dofile("examples/echo.lua")
