/* libFuzzer target for the MessagePack codecs: the C one (runtime/msgpack*.c,
 * and the RPC framing in runtime/rpc_frame.c) and the compiled one over the
 * FFI (lua/squall/msgpack/fast.lua, lua/squall/rpc/frame.lua).
 *
 * Each input is decoded whole and from a second position, and fed to
 * unpackers in three pieces split where its first bytes say; the check,
 * tests/fuzz/msgpack_check.lua, holds the two codecs to the same values and
 * the same bytes, and a decoded value to encoding again (anything else
 * aborts). Run from the repository's root by make check-fuzz, for a
 * bounded time, over the seeds in tests/fuzz/corpus/msgpack.
 */
#include <stddef.h>
#include <stdint.h>

#include "lua_target.h"

static const char CHECK[] = "return dofile('tests/fuzz/msgpack_check.lua')";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  lua_State *L = fuzz_check("msgpack_fuzz", CHECK);
  lua_pushlstring(L, (const char *)data, size);
  lua_pushinteger(L, size > 0 ? (lua_Integer)(data[0] % (size + 1)) : 0);
  lua_pushinteger(L, size > 1 ? (lua_Integer)(data[1] % (size + 1)) : 0);
  fuzz_run("msgpack_fuzz", 3);
  return 0;
}
