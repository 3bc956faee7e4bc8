/* msgpack.h: the MessagePack codec behind squall.msgpack.
 *
 * Encoding walks a Lua value into a byte buffer; decoding builds Lua
 * values from bytes. Both are pure functions of their input (no socket,
 * no loop), so they can be fuzzed alone (tests/fuzz/msgpack_fuzz.c). The
 * unpacker is a userdata holding the bytes fed to it and how far a
 * resumable scan has measured the next value: each byte is measured once
 * and decoded once, however the value is split into chunks.
 *
 * What the Lua side decides (lua/squall/msgpack/) reaches C through
 * core.msgpack_setup: the metatables that mark arrays, maps, bin and ext
 * values, and two functions for LuaJIT's 64-bit cdata integers, which the
 * C API cannot make or inspect by type.
 */
#ifndef SQUALL_MSGPACK_H
#define SQUALL_MSGPACK_H

#include <lua.h>
#include <stddef.h>

/* Nesting deeper than this raises (encode) or fails (decode). */
#define SQUALL_MSGPACK_MAX_DEPTH 200

/* Free this thread's encoding buffer (each thread keeps one): a worker
 * thread calls it before it ends. */
void squall_msgpack_thread_exit(void);

/* Add core.msgpack_setup (which returns the encode, decode, unpacker,
 * encode_array and write_array functions) and core.msgpack_null to the table at
 * the top of the stack. */
int squall_msgpack_open(lua_State *L);

/* For lua/squall/msgpack/fast.lua, which decodes and encodes the common
 * values through the FFI (declared there too): the unpacker's bytes
 * (msgpack_unpacker.c says what these take), and floats to and from
 * their bytes (msgpack.c, msgpack_encode.c). */
int squall_mp_ffi_avail(const void *u);
const unsigned char *squall_mp_ffi_head(const void *u);
void squall_mp_ffi_consume(void *u, size_t n);
double squall_mp_ffi_float64(const unsigned char *p);
double squall_mp_ffi_float32(const unsigned char *p);
void squall_mp_ffi_put_float64(unsigned char *p, double d);

#endif
