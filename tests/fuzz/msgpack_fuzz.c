/* libFuzzer target for the MessagePack parser (runtime/msgpack.c).
 *
 * Each input is decoded whole, and fed to a streaming unpacker in three
 * pieces split where its first bytes say, taking values in turn with
 * next and with the RPC framing's next_message (runtime/rpc_frame.c). Neither
 * may crash, leak or trip a sanitizer; a value that decodes must encode again
 * and decode to the same bytes' length (anything else aborts). Run by make
 * check-fuzz for a bounded time over the seeds in tests/fuzz/corpus/msgpack.
 */
#include <stddef.h>
#include <stdint.h>

#include "lua_target.h"

static const char CHECK[] =
    "local mp = require 'squall.msgpack'\n"
    "return function(data, a, b)\n"
    "  local v, pos = mp.decode(data)\n"
    "  if pos then\n"
    "    local s = mp.encode(v)\n"
    "    local w, p2 = mp.decode(s)\n"
    "    assert(p2 == #s + 1, 'our own encoding did not decode')\n"
    "    assert(mp.encode(w) ~= nil)\n"
    "  end\n"
    "  local u = mp.unpacker({ max_size = 65536 })\n"
    "  local take = { u.next, require('squall.core').rpc_frame_reader() }\n"
    "  local k = 0\n"
    "  for _, piece in ipairs({ data:sub(1, a), data:sub(a + 1, b), "
    "data:sub(b + 1) }) do\n"
    "    u:feed(piece)\n"
    "    while true do\n"
    "      k = k % 2 + 1\n"
    "      local x = take[k](u)\n"
    "      if x == nil then break end\n"
    "    end\n"
    "  end\n"
    "end\n";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  lua_State *L = fuzz_check("msgpack_fuzz", CHECK);
  lua_pushlstring(L, (const char *)data, size);
  lua_pushinteger(L, size > 0 ? (lua_Integer)(data[0] % (size + 1)) : 0);
  lua_pushinteger(L, size > 1 ? (lua_Integer)(data[1] % (size + 1)) : 0);
  fuzz_run("msgpack_fuzz", 3);
  return 0;
}
