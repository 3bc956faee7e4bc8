/* libFuzzer target for the WebSocket frame reader and UTF-8 check
 * (runtime/ws.c).
 *
 * Each input is read as a stream of frames, from a client (masked) and
 * from a server (unmasked), whole and split in two where its first byte
 * says: both reads must give the same frames and the same refusal. Every
 * frame read is built again with ws_build and read back to the same
 * payload. utf8_valid must agree with a plain Lua reading of RFC 3629.
 * Run by make check-fuzz over the seeds in tests/fuzz/corpus/ws.
 */
#include <stddef.h>
#include <stdint.h>

#include "lua_target.h"

static const char CHECK[] =
    "local core = require 'squall.core'\n"
    "local function utf8_ref(s)\n"
    "  local i, n = 1, #s\n"
    "  while i <= n do\n"
    "    local c = s:byte(i)\n"
    "    local k, min\n"
    "    if c < 0x80 then k, min = 0, 0\n"
    "    elseif c >= 0xc0 and c < 0xe0 then k, min = 1, 0x80\n"
    "    elseif c >= 0xe0 and c < 0xf0 then k, min = 2, 0x800\n"
    "    elseif c >= 0xf0 and c < 0xf8 then k, min = 3, 0x10000\n"
    "    else return false end\n"
    "    if i + k > n then return false end\n"
    "    local cp = k == 0 and c or c % (2 ^ (6 - k))\n"
    "    for j = 1, k do\n"
    "      local d = s:byte(i + j)\n"
    "      if d < 0x80 or d > 0xbf then return false end\n"
    "      cp = cp * 64 + d % 64\n"
    "    end\n"
    "    if cp < min or cp > 0x10ffff or (cp >= 0xd800 and cp <= 0xdfff) then\n"
    "      return false end\n"
    "    i = i + k + 1\n"
    "  end\n"
    "  return true\n"
    "end\n"
    "local function read(pieces, masked)\n"
    "  local out, data, pos = {}, '', 1\n"
    "  for _, piece in ipairs(pieces) do\n"
    "    data, pos = data:sub(pos) .. piece, 1\n"
    "    while true do\n"
    "      local np, a, b, c = core.ws_frame(data, pos, 1000, masked)\n"
    "      if np == nil then assert(a > 0) break end\n"
    "      if np == false then\n"
    "        out[#out + 1] = 'refused ' .. a\n"
    "        return table.concat(out, '|')\n"
    "      end\n"
    "      assert(np > pos and np <= #data + 1)\n"
    "      pos = np\n"
    "      out[#out + 1] = tostring(a) .. ' ' .. b .. ' ' .. c\n"
    "      local again = core.ws_build(b, c, masked, a)\n"
    "      local np2, a2, b2, c2 = core.ws_frame(again, 1, 1000, masked)\n"
    "      assert(np2 == #again + 1 and a2 == a and b2 == b and c2 == c,\n"
    "        'a built frame read back differently')\n"
    "    end\n"
    "  end\n"
    "  return table.concat(out, '|')\n"
    "end\n"
    "return function(data, a)\n"
    "  assert(core.utf8_valid(data) == utf8_ref(data), 'utf8_valid "
    "disagrees')\n"
    "  for _, masked in ipairs({ true, false }) do\n"
    "    local whole = read({ data }, masked)\n"
    "    local split = read({ data:sub(1, a), data:sub(a + 1) }, masked)\n"
    "    assert(whole == split, 'whole and split reads differ')\n"
    "  end\n"
    "end\n";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  lua_State *L = fuzz_check("ws_fuzz", CHECK);
  lua_pushlstring(L, (const char *)data, size);
  lua_pushinteger(L, size > 0 ? (lua_Integer)(data[0] % (size + 1)) : 0);
  fuzz_run("ws_fuzz", 2);
  return 0;
}
