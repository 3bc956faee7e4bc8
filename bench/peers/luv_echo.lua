-- luv (luvit's libuv binding) line echo on LuaJIT: callbacks, lines split
-- from each read, one write per line. Run with squall as the LuaJIT.
local uv = require "luv"
local server = uv.new_tcp()
server:bind("127.0.0.1", tonumber(arg[1]))
server:listen(1024, function()
  local client = uv.new_tcp()
  server:accept(client)
  local pending = ""
  client:read_start(function(err, data)
    if err or not data then client:close(); return end
    pending = pending .. data
    while true do
      local nl = pending:find("\n", 1, true)
      if not nl then break end
      client:write(pending:sub(1, nl))
      pending = pending:sub(nl + 1)
    end
  end)
end)
uv.run()
