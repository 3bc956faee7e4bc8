/* libFuzzer target for the HTTP/1.1 parser (runtime/http.c over llhttp).
 *
 * Each input is parsed twice, as requests (or as responses when it starts
 * with "HTTP/"): whole, and split in three pieces where its first bytes
 * say, each piece parsed up to every message end as squall.httpserver
 * does. Neither may crash or trip a sanitizer, and both must see the same
 * messages: the same heads, the same body bytes, the same ends and the
 * same refusal (the obs-fold check follows values across pieces; this is
 * where a split would show it wrong). Run by make check-fuzz over the
 * seeds in tests/fuzz/corpus/httpparse.
 */
#include <stddef.h>
#include <stdint.h>

#include "lua_target.h"

static const char CHECK[] =
    "local core = require 'squall.core'\n"
    "local function run(kind, pieces)\n"
    "  local p = core.http_parser(kind, 4096)\n"
    "  local out = {}\n"
    "  for _, data in ipairs(pieces) do\n"
    "    local pos = 1\n"
    "    while true do\n"
    "      local np, head, done, body, status, reason, a, b, ma, mi, h, ka, "
    "cl, "
    "ch, up = p:execute(data, pos)\n"
    "      assert(np >= pos and np <= #data + 1, 'position out of range')\n"
    "      if head then\n"
    "        local names = {}\n"
    "        for k, v in pairs(h) do names[#names + 1] = k .. '=' .. v end\n"
    "        table.sort(names)\n"
    "        out[#out + 1] = table.concat({ tostring(a), b, ma, mi, "
    "tostring(ka),\n"
    "          tostring(cl), tostring(ch), tostring(up), table.concat(names, "
    "';') }, ' ')\n"
    "      end\n"
    "      if body then\n"
    "        if out[#out] and out[#out]:sub(1, 5) == 'body:' then\n"
    "          out[#out] = out[#out] .. body\n"
    "        else out[#out + 1] = 'body:' .. body end\n"
    "      end\n"
    "      if done then out[#out + 1] = 'done' end\n"
    "      if status then\n"
    "        assert(status == 400 or status == 431, 'status ' .. status)\n"
    "        out[#out + 1] = 'refused ' .. status\n"
    "        local again = select(5, p:execute('GET / HTTP/1.1\\r\\n\\r\\n'))\n"
    "        assert(again == status, 'a refused parser took more input')\n"
    "        return table.concat(out, '\\n')\n"
    "      end\n"
    "      if np > #data then break end\n"
    "      pos = np\n"
    "    end\n"
    "  end\n"
    "  local done, status = p:finish()\n"
    "  if done then out[#out + 1] = 'done at close' end\n"
    "  if status then out[#out + 1] = 'refused at close' end\n"
    "  return table.concat(out, '\\n')\n"
    "end\n"
    "return function(data, a, b)\n"
    "  local kind = data:sub(1, 5) == 'HTTP/' and 'response' or 'request'\n"
    "  if a > b then a, b = b, a end\n"
    "  local whole = run(kind, { data })\n"
    "  local split = run(kind, { data:sub(1, a), data:sub(a + 1, b), "
    "data:sub(b + 1) })\n"
    "  if whole ~= split then\n"
    "    error(('whole and split differ (%d, %d):\\n%s\\n--\\n%s'):format(a, "
    "b, whole, split))\n"
    "  end\n"
    "end\n";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  lua_State *L = fuzz_check("httpparse_fuzz", CHECK);
  lua_pushlstring(L, (const char *)data, size);
  lua_pushinteger(L, size > 1 ? (lua_Integer)(data[1] % (size + 1)) : 0);
  lua_pushinteger(L, size > 2 ? (lua_Integer)(data[2] % (size + 1)) : 0);
  fuzz_run("httpparse_fuzz", 3);
  return 0;
}
