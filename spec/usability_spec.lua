-- What a new user trips over (issue 16): misuse raises at the user's own
-- line saying what was given and what was expected; the command line.
local ioloop = require "squall.ioloop"
local iostream = require "squall.iostream"
local gen = require "squall.gen"
local TCPServer = require "squall.tcpserver"
local testing = require "squall.testing"
local helpers = require "helpers"
local tmpscript = helpers.tmpscript

local q, run, async = helpers.q, helpers.run, testing.async
local squall = helpers.squall
local C = helpers.certs


-- The error `fn` raises; it must name this file (the caller's line).
local raised = helpers.raised

describe("misuse raises at the user's line", function()
  local function handler() end

  it("a port given as a string", function()
    local err = raised(function() TCPServer({ handle_stream = handler }):listen("18999") end)
    assert.matches('got string "18999" %(convert it with tonumber%)', err)
  end)

  it("listen called on the class", function()
    local Echo = TCPServer:extend()
    function Echo.handle_stream() end
    local err = raised(function() Echo:listen(8888) end)
    assert.matches("call it on a server, as Server%(%):listen", err)
  end)

  it("a server without handle_stream, at listen, bind and add_sockets", function()
    assert.matches("has no handle_stream", raised(function() TCPServer():listen(0) end))
    assert.matches("has no handle_stream", raised(function() TCPServer():bind(0) end))
    assert.matches("has no handle_stream", raised(function() TCPServer():add_sockets({}) end))
  end)

  it("an unknown ssl_options key, named", function()
    local err = raised(function()
      TCPServer({ handle_stream = handler,
        ssl_options = { certfile = C .. "/server.pem", keyfle = C .. "/server.key" } })
    end)
    assert.matches('unknown key "keyfle"', err)
  end)

  it("a call that waits, made outside a coroutine", function()
    local redis = require "squall.redis"
    local mysql = require "squall.mysql"
    local rpc = require "squall.rpc"
    local thread = require "squall.thread"
    local calls = {
      function() iostream.connect("127.0.0.1", 1) end,
      function() redis.connect({ port = 1 }) end,
      function() mysql.connect({ port = 1 }) end,
      function() rpc.connect("127.0.0.1", 1) end,
      function() thread.run("string", "rep", "x", 2) end,
      function() redis.pool({ port = 1 }):call("GET", "k") end,
      function() mysql.pool({ port = 1 }):query("SELECT 1") end,
    }
    for _, call in ipairs(calls) do
      assert.matches("waits", raised(call))
    end
  end)

  it("a refused connection names where it went", async(function()
    local redis = require "squall.redis"
    local port = helpers.free_port()
    local r, err = redis.connect({ port = port })
    assert.is_nil(r)
    assert.equal("refused", err.kind)
    assert.matches("connecting to 127.0.0.1:" .. port .. ": ", tostring(err))
    local _, perr = redis.pool({ port = port }):call("GET", "k")
    assert.matches("connecting to 127.0.0.1:" .. port, tostring(perr))
    local _, uerr = iostream.connect_unix("/nonexistent/redis.sock")
    assert.matches("connecting to /nonexistent/redis.sock: ", tostring(uerr))
  end))

  it("listen before start(n), and start with nothing bound", function()
    local server = TCPServer({ handle_stream = handler })
    local err = raised(function()
      server:listen(0, "127.0.0.1")
      server:start(2)
    end)
    assert.matches("use bind%(%), not listen%(%), before start", err)
    server:stop()
    assert.matches("nothing to start: call bind%(port%) first",
      raised(function() TCPServer({ handle_stream = handler }):start(1) end))
  end)

  it("a callback that is not a function", function()
    local loop = ioloop.new()
    local err = raised(function() loop:add_callback(42) end)
    loop:close()
    assert.matches("got number 42", err)
  end)
end)

describe("the command line", function()
  it("-h and --help print usage on stdout and exit 0", function()
    for _, flag in ipairs({ "-h", "--help" }) do
      local status, out = run(q(squall) .. " " .. flag)
      assert.equal(0, status)
      assert.matches("^usage: ", out)
      assert.matches("%-%-log%-level LEVEL", out)
    end
  end)

  it("--version prints what -v prints", function()
    local _, v = run(q(squall) .. " -v")
    local status, out = run(q(squall) .. " --version")
    assert.equal(0, status)
    assert.equal(v, out)
  end)

  it("--log-level and SQUALL_LOG_LEVEL set the level", function()
    local code = q([[local log = require "squall.log"; log.debug("dbg"); log.info("inf")]])
    local _, _, err = run(q(squall) .. " --log-level debug -e " .. code)
    assert.matches("%[D %d+ [%d:.]+ %(command line%):1%] dbg", err)
    _, _, err = run("SQUALL_LOG_LEVEL=warn " .. q(squall) .. " -e " .. code)
    assert.equal("", err)
    local status
    status, _, err = run(q(squall) .. " --log-level loud -e 'print(1)'")
    assert.equal(1, status)
    assert.matches("%-%-log%-level takes debug, info, warn or error, got 'loud'", err)
  end)

  it("--log-level takes warning, as squall.log does", function()
    local code = q([[local log = require "squall.log"; log.info("inf"); log.warning("w")]])
    local status, _, err = run(q(squall) .. " --log-level warning -e " .. code)
    assert.equal(0, status, err)
    assert.matches("^%[W [^\n]*%] w\n$", err)
  end)

  it("a script that listens but never starts its loop says so", function()
    local path = tmpscript([[
local TCPServer = require "squall.tcpserver"
TCPServer({ handle_stream = function() end }):listen(0, "127.0.0.1")
]])
    local status, _, err = run(q(squall) .. " " .. q(path))
    assert.equal(0, status)
    assert.matches("ended with 1 socket%(s%) listening but never started the IOLoop", err)
    -- one that starts it and stops says nothing of the kind
    local ok_path = tmpscript([[
local ioloop = require "squall.ioloop"
local TCPServer = require "squall.tcpserver"
TCPServer({ handle_stream = function() end }):listen(0, "127.0.0.1")
ioloop.current():add_callback(function() ioloop.current():stop() end)
ioloop.current():start()
]])
    status, _, err = run(q(squall) .. " " .. q(ok_path))
    os.remove(path); os.remove(ok_path)
    assert.equal(0, status)
    assert.equal("", err)
  end)

  it("--reload with a missing module names the script's line", function()
    local path = tmpscript("local x = 1\nrequire 'no_such_module_here'\n")
    local status, _, err = run(q(squall) .. " --reload " .. q(path))
    os.remove(path)
    assert.equal(1, status)
    assert.matches(path:gsub("%p", "%%%0") .. ":2: module 'no_such_module_here' not found", err)
  end)

  it("the process supervisor logs in squall.log's format, naming its pid", function()
    local path = tmpscript([[require("squall.process").fork_processes(2)]])
    local status, _, err = run(q(squall) .. " " .. q(path))
    os.remove(path)
    assert.equal(0, status)
    assert.matches("^%[I %d%d%d%d%d%d %d%d:%d%d:%d%d%.%d%d%d squall%.process%] supervising 2 " ..
      "processes; signal pid %d+", err)
  end)
end)

describe("TLS handshake timing", function()
  it("handle_stream may start before the handshake; wait_for_handshake waits for it",
    async(function()
      local seen = gen.Future()
      local sock, port = testing.bind_unused_port()
      local server = TCPServer({
        ssl_options = { certfile = C .. "/server.pem", keyfile = C .. "/server.key",
          alpn_protocols = { "squall/1" } },
        handle_stream = function(stream)
          local before = stream:get_alpn_protocol()
          assert(stream:wait_for_handshake())
          seen:set_result(before, stream:get_alpn_protocol())
          stream:write("hi\n")
        end })
      server:add_sockets({ sock })
      local c = assert(iostream.connect("127.0.0.1", port, {
        ssl_options = { ca_certs = C .. "/ca.pem", alpn_protocols = { "squall/1" } },
        server_hostname = "localhost" }))
      assert.equal("hi\n", c:read_until("\n"))
      local before, after = seen:result()
      assert.is_nil(before)
      assert.equal("squall/1", after)
      c:close()
      server:stop()
    end))

  it("wait_for_handshake on a plain stream is misuse", async(function()
    local server = helpers.stream_pair()
    local err = raised(function() server:wait_for_handshake() end)
    assert.matches("does not use TLS", err)
  end))
end)
