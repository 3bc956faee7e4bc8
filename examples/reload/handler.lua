--- The reloadable part of examples/reload/server.lua: edit `greeting` or
-- `handle_stream` while the server runs and the next connection gets the
-- new code. A client already connected keeps the code it started with.
local Handler = {}

Handler.greeting = "hello"

function Handler.handle_stream(stream)
  stream:write("connected; each line you send comes back greeted\n")
  while true do
    local line = stream:read_until("\n", 65536)
    if not line then return end
    stream:write(Handler.greeting .. ", " .. line)
  end
end

return Handler
