/* msgpack_impl.h: what the MessagePack files share (msgpack.c decodes and
 * sets up, msgpack_encode.c encodes, msgpack_unpacker.c streams) and what
 * the RPC framing (rpc_frame.c) builds on: a decoder over a byte range and
 * an unpacker that says when the next value is whole. Not for other
 * runtime files: they see msgpack.h.
 */
#ifndef SQUALL_MSGPACK_IMPL_H
#define SQUALL_MSGPACK_IMPL_H

#include <lua.h>
#include <stddef.h>
#include <stdint.h>

#include "buffer.h"
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

/* Bytes fed, not yet returned as values, and a scan of the next value
 * that resumes where it stopped: `left[i]` items remain at nesting level
 * i. A value is decoded only once the scan found its end. */
typedef struct {
  squall_buffer buf;
  size_t scan; /* bytes of the next value measured so far */
  int depth;   /* open levels; 0: no scan in progress */
  size_t max_size;
  char *failed; /* the error once the stream broke; every next() says it */
  uint64_t left[SQUALL_MSGPACK_MAX_DEPTH + 2];
} mp_unpacker;

/* The unpacker at stack index 1 (raises for anything else). */
mp_unpacker *mp_check_unpacker(lua_State *L);

/* Advance the scan: 1 when the next value is whole (its bytes are
 * squall_buffer_head(&u->buf)[0, u->scan)), 0 when more bytes are needed,
 * -1 with u->failed set when the input is not MessagePack or the value
 * passes max_size. */
int mp_measure(mp_unpacker *u);

/* The value mp_measure found was taken: drop its bytes. */
void mp_consume(mp_unpacker *u);

/* Push nil and the unpacker's error (kind msgpack): 2. */
int mp_push_failed(lua_State *L, mp_unpacker *u);

/* The input broke with `err`: every later take says so. Pushes nil, err. */
int mp_fail(lua_State *L, mp_unpacker *u, const char *err);

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
