/* msgpack_impl.h: what the MessagePack files share (msgpack.c decodes and
 * sets up, msgpack_encode.c encodes, msgpack_unpacker.c streams) and what
 * the RPC framing (rpc_frame.c) builds on: a decoder over a byte range and
 * mp_take, which hands it the unpacker's next whole value. Not for other
 * runtime files: they see msgpack.h.
 */
#ifndef SQUALL_MSGPACK_IMPL_H
#define SQUALL_MSGPACK_IMPL_H

#include <lua.h>
#include <stddef.h>
#include <stdint.h>

#include "msgpack.h"

/* The hooks table from core.msgpack_setup is upvalue 1 of every closure
 * that encodes or decodes ({classify =, make_int =, ext_mt =, map_mt =}). */
#define HOOKS lua_upvalueindex(1)

/* The registry key under which core.msgpack_setup keeps the hooks, for
 * closures made later (rpc_frame.c's reader). */
#define MP_HOOKS_KEY "squall.msgpack.hooks"

extern const char MP_UNPACKER_MT[];

/* ---- decoding (msgpack.c) ---- */

/* A decode of p[pos, len) onto L. On failure err says why and err_at
 * where (0-based). */
typedef struct {
  lua_State *L;
  const unsigned char *p;
  size_t len, pos;
  const char *err;
  size_t err_at; /* 0-based offset the error is about */
} mp_dec;

/* Push the value at d->pos and move past it: 0, or -1 with d->err set
 * (what it pushed is left for the caller to drop). Runs under HOOKS. */
int mp_dec_value(mp_dec *d, int depth);

/* An n-byte big-endian number. */
uint64_t mp_be(const unsigned char *p, int n);

/* ---- the unpacker (msgpack_unpacker.c) ---- */

/* Take the next whole value from the unpacker at stack index 1, pushed
 * by `push` (a decode of its bytes: 0, or -1 with d->err set); returns
 * how many values it pushed. nil while the value is incomplete; nil, err
 * (kind msgpack) once the input broke, which every later take says too.
 * u:next() and rpc_frame.c's next_message are both this. */
int mp_take(lua_State *L, int (*push)(mp_dec *d));

/* unpacker(max_size), as msgpack_setup returns it. */
int mp_l_unpacker_new(lua_State *L);

/* The unpacker metatable: mp_unpacker_open makes it, mp_unpacker_setup
 * adds next (a closure over the hooks at index 1). */
void mp_unpacker_open(lua_State *L);
void mp_unpacker_setup(lua_State *L);

/* ---- encoding (msgpack_encode.c), each a closure over HOOKS ---- */

int mp_l_encode(lua_State *L);       /* encode(value) */
int mp_l_encode_array(lua_State *L); /* encode_array(...) */
int mp_l_write_array(lua_State *L);  /* write_array(stream, ...) */

#endif
