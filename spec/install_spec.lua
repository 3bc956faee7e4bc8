-- scripts/install-deps never removes a package (issue 16): against a
-- copy of this machine's dpkg database rewritten to hold Debian's LuaJIT
-- instead of OpenResty's, apt's simulated plan must remove nothing.
local helpers = require "helpers"

local q, run = helpers.q, helpers.run

local function slurp(path)
  local f = assert(io.open(path))
  local s = f:read("*a")
  f:close()
  return s
end

local function candidate(pkg)
  local _, out = run("apt-cache policy " .. q(pkg))
  local v = out:match("Candidate: (%S+)")
  if v and v ~= "(none)" then return v end
end

-- A dpkg admin dir whose status is this machine's without any LuaJIT
-- package or anything that depends on one (wrk, nginx's Lua module...),
-- plus `pkgs` (name -> architecture) as installed.
local function fake_admindir(pkgs)
  local dir = os.tmpname()
  os.remove(dir)
  assert(os.execute("mkdir -p " .. q(dir)) == 0)
  local kept = {}
  for stanza in (slurp("/var/lib/dpkg/status") .. "\n\n"):gmatch("(.-)\n\n+") do
    local name = stanza:match("^Package: (%S+)")
    local deps = stanza:match("\nDepends: ([^\n]*)") or ""
    if name and not name:match("luajit") and not deps:match("luajit") then
      kept[#kept + 1] = stanza
    end
  end
  for name, arch in pairs(pkgs) do
    kept[#kept + 1] = table.concat({ "Package: " .. name, "Status: install ok installed",
      "Priority: optional", "Section: libs", "Maintainer: spec", "Architecture: " .. arch,
      "Version: " .. candidate(name), "Description: installed for the spec" }, "\n")
  end
  local f = assert(io.open(dir .. "/status", "w"))
  f:write(table.concat(kept, "\n\n"), "\n")
  f:close()
  return dir
end

describe("scripts/install-deps", function()
  local have_lists = candidate("libluajit-5.1-dev") and candidate("libluajit2-5.1-dev")

  local function simulate(admindir)
    return run("SQUALL_DPKG_ADMINDIR=" .. q(admindir) .. " scripts/install-deps --simulate")
  end

  it("keeps Debian's libluajit-5.1-dev where it is installed", function()
    if not have_lists then return pending("apt has no package lists (apt-get update)") end
    local dir = fake_admindir({ ["libluajit-5.1-dev"] = "amd64", ["libluajit-5.1-2"] = "amd64",
      ["libluajit-5.1-common"] = "all", luajit = "amd64" })
    local status, out, err = simulate(dir)
    os.execute("rm -rf " .. q(dir))
    assert.equal(0, status, err)
    assert.is_nil(out:find("libluajit2", 1, true), out)
    assert.is_nil(out:find("\nRemv ", 1, true), out)
  end)

  it("installs the development files that match Debian's LuaJIT runtime", function()
    if not have_lists then return pending("apt has no package lists (apt-get update)") end
    local dir = fake_admindir({ ["libluajit-5.1-2"] = "amd64", ["libluajit-5.1-common"] = "all" })
    local status, out, err = simulate(dir)
    os.execute("rm -rf " .. q(dir))
    assert.equal(0, status, err)
    assert.matches("would install:.* libluajit%-5%.1%-dev", out)
    assert.matches("\nInst libluajit%-5%.1%-dev ", out)
    assert.is_nil(out:find("\nRemv ", 1, true), out)
  end)

  it("--bench skips a peer that would remove Debian's LuaJIT", function()
    if not have_lists then return pending("apt has no package lists (apt-get update)") end
    local dir = fake_admindir({ ["libluajit-5.1-dev"] = "amd64", ["libluajit-5.1-2"] = "amd64",
      ["libluajit-5.1-common"] = "all" })
    local status, out, err = run("SQUALL_DPKG_ADMINDIR=" .. q(dir) ..
      " scripts/install-deps --bench --simulate")
    os.execute("rm -rf " .. q(dir))
    assert.equal(0, status, err)
    assert.is_nil(out:find("\nRemv ", 1, true), out)
    assert.matches("skipping libnginx%-mod%-http%-lua", err)
  end)

  it("installs OpenResty's LuaJIT branch on a machine with neither", function()
    if not have_lists then return pending("apt has no package lists (apt-get update)") end
    local dir = fake_admindir({})
    local status, out, err = simulate(dir)
    os.execute("rm -rf " .. q(dir))
    assert.equal(0, status, err)
    assert.matches("would install:.* libluajit2%-5%.1%-dev", out)
    assert.is_nil(out:find("\nRemv ", 1, true), out)
  end)
end)
