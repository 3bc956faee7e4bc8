-- luacheck configuration: no globals anywhere; specs get busted's.
std = "luajit"
max_line_length = 100
files["spec/"] = { std = "+busted" }
ignore = { "212/self" } -- methods need not use self
-- capture_log swaps io.stderr to catch what squall.log writes.
files["spec/helpers.lua"] = { std = "+busted", ignore = { "122/io" } }
