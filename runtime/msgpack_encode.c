/* msgpack_encode.c: a Lua value to MessagePack bytes (see msgpack.h).
 * Encoding always picks the shortest format for a value, as Python's
 * msgpack does, so either side re-encodes the other's bytes unchanged. */
#include "msgpack_impl.h"

#include <lauxlib.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "host.h"
/* A lower layer reaching up, on purpose: write_array encodes straight into
 * a stream's write queue (squall_stream_write_bytes), which saved the Lua
 * string each RPC response cost. It is the only stream call here. */
#include "stream.h"

/* Encoding stops at the first error and reports it once unwound, so the
 * buffer is freed before luaL_error jumps away. */
typedef struct {
  lua_State *L;
  char *p;
  size_t len, cap;
  const char *err;
  const char *bad_type; /* the type that cannot encode, for the message */
  int shared;           /* p is the shared scratch buffer */
} enc;

/* The encoding buffer, kept between calls (a malloc and free per message
 * showed in the RPC profile). An encode that starts while another is
 * running (a Lua hook encoding) gets a buffer of its own. */
static _Thread_local char *scratch;
static _Thread_local size_t scratch_cap;
static _Thread_local int scratch_busy;
enum { SCRATCH_KEEP = 65536 }; /* larger buffers are given back */

void squall_msgpack_thread_exit(void) {
  if (!scratch_busy) {
    free(scratch);
    scratch = NULL;
    scratch_cap = 0;
  }
}

static void enc_begin(enc *e, lua_State *L) {
  memset(e, 0, sizeof *e);
  e->L = L;
  if (!scratch_busy) {
    scratch_busy = 1;
    e->p = scratch;
    e->cap = scratch_cap;
    e->shared = 1;
  }
}

static void enc_end(enc *e) {
  if (!e->shared) {
    free(e->p);
    return;
  }
  if (e->cap > SCRATCH_KEEP) {
    free(e->p);
    e->p = NULL;
    e->cap = 0;
  }
  scratch = e->p;
  scratch_cap = e->cap;
  scratch_busy = 0;
}

static int grow(enc *e, size_t n) {
  if (e->cap - e->len >= n)
    return 0;
  size_t cap = e->cap ? e->cap : 256;
  while (cap - e->len < n)
    cap *= 2;
  char *p = realloc(e->p, cap);
  if (p == NULL) {
    e->err = "out of memory";
    return -1;
  }
  e->p = p;
  e->cap = cap;
  return 0;
}

static int put(enc *e, const void *src, size_t n) {
  if (grow(e, n) != 0)
    return -1;
  memcpy(e->p + e->len, src, n);
  e->len += n;
  return 0;
}

/* A type byte followed by `n` bytes of `v`, big-endian. */
static int put_be(enc *e, unsigned char type, uint64_t v, int n) {
  unsigned char b[9];
  b[0] = type;
  for (int i = 0; i < n; i++)
    b[1 + i] = (unsigned char)(v >> (8 * (n - 1 - i)));
  return put(e, b, (size_t)n + 1);
}

static int put_uint(enc *e, uint64_t v) {
  if (v < 128)
    return put_be(e, (unsigned char)v, 0, 0);
  if (v <= 0xff)
    return put_be(e, 0xcc, v, 1);
  if (v <= 0xffff)
    return put_be(e, 0xcd, v, 2);
  if (v <= 0xffffffffu)
    return put_be(e, 0xce, v, 4);
  return put_be(e, 0xcf, v, 8);
}

static int put_int(enc *e, int64_t v) {
  if (v >= 0)
    return put_uint(e, (uint64_t)v);
  if (v >= -32)
    return put_be(e, (unsigned char)(0xe0 | (v + 32)), 0, 0);
  if (v >= INT8_MIN)
    return put_be(e, 0xd0, (uint64_t)v, 1);
  if (v >= INT16_MIN)
    return put_be(e, 0xd1, (uint64_t)v, 2);
  if (v >= INT32_MIN)
    return put_be(e, 0xd2, (uint64_t)v, 4);
  return put_be(e, 0xd3, (uint64_t)v, 8);
}

static int put_double(enc *e, double d) {
  uint64_t bits;
  memcpy(&bits, &d, sizeof bits);
  return put_be(e, 0xcb, bits, 8);
}

/* The 8 big-endian bytes of d at p, for the compiled encoder
 * (lua/squall/msgpack/fast.lua; msgpack.c says why in C). */
void squall_mp_ffi_put_float64(unsigned char *p, double d) {
  uint64_t bits;
  memcpy(&bits, &d, sizeof bits);
  for (int i = 0; i < 8; i++)
    p[i] = (unsigned char)(bits >> (8 * (7 - i)));
}

/* An integral number in [-2^63, 2^64) encodes as an integer; any other
 * number (fractions, inf, nan, huge values) as float 64. */
static int put_number(enc *e, double d) {
  if (d == floor(d)) {
    if (d >= 0 && d < 18446744073709551616.0)
      return put_uint(e, (uint64_t)d);
    if (d < 0 && d >= -9223372036854775808.0)
      return put_int(e, (int64_t)d);
  }
  return put_double(e, d);
}

/* A header for a str/bin/array/map of length n: the fix form when `fix`
 * is nonzero and n fits under fix_max, then the 8/16/32-bit forms (t8
 * may be 0 where the format has none). */
static int put_len(enc *e, size_t n, unsigned fix, size_t fix_max,
                   unsigned char t8, unsigned char t16, unsigned char t32) {
  if (fix && n <= fix_max)
    return put_be(e, (unsigned char)(fix | n), 0, 0);
  if (t8 && n <= 0xff)
    return put_be(e, t8, n, 1);
  if (n <= 0xffff)
    return put_be(e, t16, n, 2);
  if (n <= 0xffffffffu)
    return put_be(e, t32, n, 4);
  e->err = "a string or table is longer than MessagePack allows (2^32-1)";
  return -1;
}

static int put_str(enc *e, const char *s, size_t n) {
  if (put_len(e, n, 0xa0, 31, 0xd9, 0xda, 0xdb) != 0)
    return -1;
  return put(e, s, n);
}

static int put_bin(enc *e, const char *s, size_t n) {
  if (put_len(e, n, 0, 0, 0xc4, 0xc5, 0xc6) != 0)
    return -1;
  return put(e, s, n);
}

static int put_ext(enc *e, lua_Number type, const char *s, size_t n) {
  if (type != floor(type) || type < -128 || type > 127) {
    e->err = "an ext type must be an integer from -128 to 127";
    return -1;
  }
  unsigned char fix = 0;
  switch (n) {
  case 1:
    fix = 0xd4;
    break;
  case 2:
    fix = 0xd5;
    break;
  case 4:
    fix = 0xd6;
    break;
  case 8:
    fix = 0xd7;
    break;
  case 16:
    fix = 0xd8;
    break;
  }
  int r = fix ? put_be(e, fix, 0, 0) : put_len(e, n, 0, 0, 0xc7, 0xc8, 0xc9);
  unsigned char t = (unsigned char)(int8_t)type;
  if (r != 0 || put(e, &t, 1) != 0)
    return -1;
  return put(e, s, n);
}

static int enc_value(enc *e, int idx, int depth);

/* A 64-bit cdata integer: the Lua hook says which (the C API cannot),
 * and its 8 bytes are read in place. */
static int put_cdata(enc *e, int idx) {
  lua_State *L = e->L;
  lua_getfield(L, HOOKS, "classify");
  lua_pushvalue(L, idx);
  lua_call(L, 1, 1);
  const char *kind = lua_tostring(L, -1);
  int r;
  if (kind != NULL && (kind[0] == 'i' || kind[0] == 'u')) {
    uint64_t v;
    memcpy(&v, lua_topointer(L, idx), sizeof v);
    r = kind[0] == 'i' ? put_int(e, (int64_t)v) : put_uint(e, v);
  } else {
    e->err = "cannot encode a cdata value (only int64_t and uint64_t)";
    r = -1;
  }
  lua_pop(L, 1);
  return r;
}

/* Length n when the table's keys are exactly 1..n (0 when empty), else -1. */
static long array_len(lua_State *L, int idx) {
  long n = 0;
  double max = 0;
  lua_pushnil(L);
  while (lua_next(L, idx) != 0) {
    lua_pop(L, 1);
    if (lua_type(L, -1) != LUA_TNUMBER) {
      lua_pop(L, 1);
      return -1;
    }
    double k = lua_tonumber(L, -1);
    if (k < 1 || k != floor(k)) {
      lua_pop(L, 1);
      return -1;
    }
    if (k > max)
      max = k;
    n++;
  }
  return max == (double)n ? n : -1;
}

static int enc_array(enc *e, int idx, long n, int depth) {
  if (put_len(e, (size_t)n, 0x90, 15, 0, 0xdc, 0xdd) != 0)
    return -1;
  for (long i = 1; i <= n; i++) {
    lua_rawgeti(e->L, idx, (int)i);
    int r = enc_value(e, lua_gettop(e->L), depth + 1);
    lua_pop(e->L, 1);
    if (r != 0)
      return -1;
  }
  return 0;
}

static int enc_map(enc *e, int idx, int depth) {
  lua_State *L = e->L;
  size_t n = 0;
  lua_pushnil(L);
  while (lua_next(L, idx) != 0) {
    lua_pop(L, 1);
    n++;
  }
  if (put_len(e, n, 0x80, 15, 0, 0xde, 0xdf) != 0)
    return -1;
  lua_pushnil(L);
  while (lua_next(L, idx) != 0) {
    int top = lua_gettop(L);
    if (enc_value(e, top - 1, depth + 1) != 0 ||
        enc_value(e, top, depth + 1) != 0) {
      lua_pop(L, 2);
      return -1;
    }
    lua_pop(L, 1);
  }
  return 0;
}

/* A table: as its marker says (msgpack.array/map/bin/ext set a metatable
 * with a __msgpack field), else an array when its keys are 1..n. */
static int enc_table(enc *e, int idx, int depth) {
  lua_State *L = e->L;
  if (depth > SQUALL_MSGPACK_MAX_DEPTH) {
    e->err = "tables nest deeper than 200 levels (or hold a cycle)";
    return -1;
  }
  luaL_checkstack(L, 8, "msgpack.encode");
  const char *mark = NULL;
  if (lua_getmetatable(L, idx)) {
    lua_getfield(L, -1, "__msgpack");
    mark = lua_tostring(L, -1);
    lua_pop(L, 1);
    if (mark == NULL)
      lua_pop(L, 1);
  }
  if (mark == NULL) {
    long n = array_len(L, idx);
    return n >= 0 ? enc_array(e, idx, n, depth) : enc_map(e, idx, depth);
  }
  int r;
  /* the metatable stays on the stack under what follows */
  if (strcmp(mark, "array") == 0) {
    lua_getfield(L, -1, "n");
    long n = lua_isnumber(L, -1) ? (long)lua_tonumber(L, -1)
                                 : (long)lua_objlen(L, idx);
    lua_pop(L, 1);
    r = enc_array(e, idx, n, depth);
  } else if (strcmp(mark, "map") == 0) {
    r = enc_map(e, idx, depth);
  } else if (strcmp(mark, "bin") == 0) {
    lua_rawgeti(L, idx, 1);
    size_t n;
    const char *s = lua_tolstring(L, -1, &n);
    r = s ? put_bin(e, s, n) : (e->err = "msgpack.bin holds no string", -1);
    lua_pop(L, 1);
  } else if (strcmp(mark, "ext") == 0) {
    lua_getfield(L, idx, "type");
    lua_getfield(L, idx, "data");
    size_t n;
    const char *s = lua_tolstring(L, -1, &n);
    if (s == NULL || !lua_isnumber(L, -2)) {
      e->err = "an ext value needs a number .type and a string .data";
      r = -1;
    } else {
      r = put_ext(e, lua_tonumber(L, -2), s, n);
    }
    lua_pop(L, 2);
  } else {
    e->err = "unknown __msgpack marker";
    r = -1;
  }
  lua_pop(L, 1);
  return r;
}

static int enc_value(enc *e, int idx, int depth) {
  lua_State *L = e->L;
  switch (lua_type(L, idx)) {
  case LUA_TNIL:
    return put_be(e, 0xc0, 0, 0);
  case LUA_TBOOLEAN:
    return put_be(e, lua_toboolean(L, idx) ? 0xc3 : 0xc2, 0, 0);
  case LUA_TNUMBER:
    return put_number(e, lua_tonumber(L, idx));
  case LUA_TSTRING: {
    size_t n;
    const char *s = lua_tolstring(L, idx, &n);
    return put_str(e, s, n);
  }
  case LUA_TTABLE:
    return enc_table(e, idx, depth);
  case LUA_TLIGHTUSERDATA:
    if (lua_touserdata(L, idx) == NULL)
      return put_be(e, 0xc0, 0, 0); /* msgpack.null */
    break;
  case 10: /* LUA_TCDATA in LuaJIT */
    return put_cdata(e, idx);
  }
  e->bad_type = luaL_typename(L, idx); /* a static string */
  e->err = "cannot encode a value of type";
  return -1;
}

/* encode(value) -> string; raises for what cannot encode (from
 * msgpack_setup). */
/* Raise for a failed encoding, once its buffer is released. */
static int enc_fail(lua_State *L, enc *e, const char *who) {
  const char *err = e->err, *bad = e->bad_type;
  enc_end(e);
  return luaL_error(L, "%s: %s%s%s", who, err, bad ? " " : "", bad ? bad : "");
}

int mp_l_encode(lua_State *L) {
  luaL_checkany(L, 1);
  lua_settop(L, 1);
  enc e;
  enc_begin(&e, L);
  if (enc_value(&e, 1, 1) != 0)
    return enc_fail(L, &e, "msgpack.encode");
  lua_pushlstring(L, e.p, e.len);
  enc_end(&e);
  return 1;
}

/* encode_array(...) (from msgpack_setup) -> the encoding of an array of its
 * arguments, nil ones included: what an RPC message is, without building
 * a table for it. */
static int encode_args(enc *e, int first, int last) {
  int r = put_len(e, (size_t)(last - first + 1), 0x90, 15, 0, 0xdc, 0xdd);
  for (int i = first; i <= last && r == 0; i++)
    r = enc_value(e, i, 2);
  return r;
}

int mp_l_encode_array(lua_State *L) {
  enc e;
  enc_begin(&e, L);
  if (encode_args(&e, 1, lua_gettop(L)) != 0)
    return enc_fail(L, &e, "msgpack.encode_array");
  lua_pushlstring(L, e.p, e.len);
  enc_end(&e);
  return 1;
}

/* write_array(stream, ...) (from msgpack_setup):
 * stream:write(encode_array(...)) with no Lua string in between: the bytes go
 * from the encoding buffer into the stream's write queue. Returns what write()
 * returns, waiting as it does past write_high_water (after the copy, so the
 * buffer is free again by then). */
int mp_l_write_array(lua_State *L) {
  squall_stream *s = squall_stream_check(L, 1); /* raises before we begin */
  enc e;
  enc_begin(&e, L);
  if (encode_args(&e, 2, lua_gettop(L)) != 0)
    return enc_fail(L, &e, "msgpack.write_array");
  /* write() copies the bytes in before it may wait (a wait yields only
   * once this function returns), so the buffer is released after it */
  int r = squall_stream_write_bytes(L, s, e.p, e.len);
  enc_end(&e);
  return r;
}
