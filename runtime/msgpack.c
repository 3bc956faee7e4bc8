/* msgpack.c: MessagePack encode, decode and a streaming unpacker (see
 * msgpack.h). Formats follow the MessagePack specification; encoding
 * always picks the shortest format for a value, as Python's msgpack does,
 * so either side re-encodes the other's bytes unchanged. */
#include "msgpack.h"

#include <lauxlib.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "buffer.h"
#include "host.h"
#include "stream.h"

static const char UNPACKER_MT[] = "squall.msgpack.unpacker";

/* The hooks table from core.msgpack_setup is upvalue 1 of every closure. */
#define HOOKS lua_upvalueindex(1)

/* ---- encoding ---------------------------------------------------------- */

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

static int l_encode(lua_State *L) {
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

static int l_encode_array(lua_State *L) {
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
static int l_write_array(lua_State *L) {
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

/* ---- decoding ---------------------------------------------------------- */

typedef struct {
  lua_State *L;
  const unsigned char *p;
  size_t len, pos;
  const char *err;
  size_t err_at; /* 0-based offset the error is about */
} dec;

static int fail(dec *d, const char *err, size_t at) {
  d->err = err;
  d->err_at = at;
  return -1;
}

static int need(dec *d, size_t n) {
  if (d->len - d->pos >= n)
    return 0;
  return fail(d, "truncated: the value ends past the input", d->len);
}

static uint64_t be(const unsigned char *p, int n) {
  uint64_t v = 0;
  for (int i = 0; i < n; i++)
    v = (v << 8) | p[i];
  return v;
}

/* Read an n-byte big-endian length or value after the type byte. */
static int read_be(dec *d, int n, uint64_t *v) {
  if (need(d, (size_t)n) != 0)
    return -1;
  *v = be(d->p + d->pos, n);
  d->pos += (size_t)n;
  return 0;
}

/* Integers up to 2^53 in magnitude are exact as Lua numbers. */
static const uint64_t TWO53 = (uint64_t)1 << 53;

/* Push an integer beyond 2^53 as 64-bit cdata, made by the Lua hook from
 * its 32-bit halves (the C API cannot make cdata). */
static void push_big(dec *d, uint64_t bits, int is_signed) {
  lua_getfield(d->L, HOOKS, "make_int");
  lua_pushnumber(d->L, (lua_Number)(bits >> 32));
  lua_pushnumber(d->L, (lua_Number)(bits & 0xffffffffu));
  lua_pushboolean(d->L, is_signed);
  lua_call(d->L, 3, 1);
}

/* Push an integer: a number when |v| <= 2^53, else cdata. */
static void push_u64(dec *d, uint64_t v) {
  if (v <= TWO53)
    lua_pushnumber(d->L, (lua_Number)v);
  else
    push_big(d, v, 0);
}

static void push_i64(dec *d, int64_t v) {
  if (v >= 0)
    push_u64(d, (uint64_t)v);
  else if (v >= -(int64_t)TWO53)
    lua_pushnumber(d->L, (lua_Number)v);
  else
    push_big(d, (uint64_t)v, 1);
}

static int push_bytes(dec *d, uint64_t n) {
  if (need(d, n) != 0)
    return -1;
  lua_pushlstring(d->L, (const char *)d->p + d->pos, (size_t)n);
  d->pos += n;
  return 0;
}

static int dec_value(dec *d, int depth);

static int dec_array(dec *d, uint64_t n, int depth) {
  /* Each element takes a byte at least: refuse a count the input cannot
   * hold before allocating for it. */
  if (n > d->len - d->pos)
    return need(d, n);
  lua_State *L = d->L;
  lua_createtable(L, (int)n, 0);
  for (uint64_t i = 1; i <= n; i++) {
    if (dec_value(d, depth + 1) != 0)
      return -1;
    lua_rawseti(L, -2, (int)i);
  }
  return 0;
}

static int dec_map(dec *d, uint64_t n, int depth) {
  if (n > (d->len - d->pos) / 2)
    return need(d, 2 * n);
  lua_State *L = d->L;
  lua_createtable(L, 0, (int)n);
  if (n == 0) {
    /* marked, so it encodes back as a map rather than an empty array */
    lua_getfield(L, HOOKS, "map_mt");
    lua_setmetatable(L, -2);
  }
  for (uint64_t i = 0; i < n; i++) {
    if (dec_value(d, depth + 1) != 0 || dec_value(d, depth + 1) != 0)
      return -1;
    if (lua_type(L, -2) == LUA_TNUMBER &&
        lua_tonumber(L, -2) != lua_tonumber(L, -2))
      return fail(d, "a map key is NaN, which a Lua table cannot hold", d->pos);
    lua_rawset(L, -3);
  }
  return 0;
}

static int dec_ext(dec *d, uint64_t n) {
  if (need(d, 1 + n) != 0)
    return -1;
  lua_State *L = d->L;
  lua_createtable(L, 0, 2);
  lua_pushnumber(L, (lua_Number)(int8_t)d->p[d->pos]);
  lua_setfield(L, -2, "type");
  lua_pushlstring(L, (const char *)d->p + d->pos + 1, (size_t)n);
  lua_setfield(L, -2, "data");
  d->pos += 1 + n;
  lua_getfield(L, HOOKS, "ext_mt");
  lua_setmetatable(L, -2);
  return 0;
}

static int dec_value(dec *d, int depth) {
  lua_State *L = d->L;
  if (need(d, 1) != 0)
    return -1;
  unsigned char t = d->p[d->pos++];
  uint64_t v;
  if (t <= 0x7f) {
    lua_pushnumber(L, t);
    return 0;
  }
  if (t >= 0xe0) {
    lua_pushnumber(L, (int8_t)t);
    return 0;
  }
  if ((t & 0xe0) == 0xa0)
    return push_bytes(d, t & 0x1f);
  /* Below, containers: each level holds a table, a key and a value. */
  if (depth > SQUALL_MSGPACK_MAX_DEPTH)
    return fail(d, "values nest deeper than 200 levels", d->pos - 1);
  if (!lua_checkstack(L, 4))
    return fail(d, "out of Lua stack", d->pos - 1);
  if ((t & 0xf0) == 0x90)
    return dec_array(d, t & 0x0f, depth);
  if ((t & 0xf0) == 0x80)
    return dec_map(d, t & 0x0f, depth);
  switch (t) {
  case 0xc0:
    lua_pushlightuserdata(L, NULL); /* msgpack.null */
    return 0;
  case 0xc2:
  case 0xc3:
    lua_pushboolean(L, t == 0xc3);
    return 0;
  case 0xc4:
  case 0xd9:
    return read_be(d, 1, &v) ? -1 : push_bytes(d, v);
  case 0xc5:
  case 0xda:
    return read_be(d, 2, &v) ? -1 : push_bytes(d, v);
  case 0xc6:
  case 0xdb:
    return read_be(d, 4, &v) ? -1 : push_bytes(d, v);
  case 0xc7:
    return read_be(d, 1, &v) ? -1 : dec_ext(d, v);
  case 0xc8:
    return read_be(d, 2, &v) ? -1 : dec_ext(d, v);
  case 0xc9:
    return read_be(d, 4, &v) ? -1 : dec_ext(d, v);
  case 0xca: {
    if (read_be(d, 4, &v))
      return -1;
    uint32_t bits = (uint32_t)v;
    float f;
    memcpy(&f, &bits, sizeof f);
    lua_pushnumber(L, f);
    return 0;
  }
  case 0xcb: {
    if (read_be(d, 8, &v))
      return -1;
    double f;
    memcpy(&f, &v, sizeof f);
    lua_pushnumber(L, f);
    return 0;
  }
  case 0xcc:
  case 0xcd:
  case 0xce:
  case 0xcf:
    if (read_be(d, 1 << (t - 0xcc), &v))
      return -1;
    push_u64(d, v);
    return 0;
  case 0xd0:
    return read_be(d, 1, &v) ? -1 : (push_i64(d, (int8_t)v), 0);
  case 0xd1:
    return read_be(d, 2, &v) ? -1 : (push_i64(d, (int16_t)v), 0);
  case 0xd2:
    return read_be(d, 4, &v) ? -1 : (push_i64(d, (int32_t)v), 0);
  case 0xd3:
    return read_be(d, 8, &v) ? -1 : (push_i64(d, (int64_t)v), 0);
  case 0xd4:
  case 0xd5:
  case 0xd6:
  case 0xd7:
  case 0xd8:
    return dec_ext(d, 1u << (t - 0xd4));
  case 0xdc:
    return read_be(d, 2, &v) ? -1 : dec_array(d, v, depth);
  case 0xdd:
    return read_be(d, 4, &v) ? -1 : dec_array(d, v, depth);
  case 0xde:
    return read_be(d, 2, &v) ? -1 : dec_map(d, v, depth);
  case 0xdf:
    return read_be(d, 4, &v) ? -1 : dec_map(d, v, depth);
  }
  /* the one byte the specification never uses */
  return fail(d, "invalid type byte 0xc1", d->pos - 1);
}

/* Decode one value from p[0, len) onto L: the value and 0, or -1 with
 * nil and an error value (kind msgpack) pushed instead. *used gets the
 * bytes it took. */
static int decode_onto(lua_State *L, const unsigned char *p, size_t len,
                       size_t *used) {
  int top = lua_gettop(L);
  dec d = {L, p, len, 0, NULL, 0};
  if (dec_value(&d, 1) != 0) {
    lua_settop(L, top);
    lua_pushnil(L);
    squall_push_error(
        L, "msgpack",
        lua_pushfstring(L, "%s (at byte %d)", d.err, (int)d.err_at + 1));
    lua_remove(L, -2); /* the formatted message */
    return -1;
  }
  *used = d.pos;
  return 0;
}

/* decode(s [, pos]) -> value, next_pos | nil, err (from msgpack_setup) */
static int l_decode(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  lua_Number pos = luaL_optnumber(L, 2, 1);
  luaL_argcheck(L, pos >= 1 && pos == floor(pos), 2,
                "pos must be a positive integer");
  /* Compared as a double, before any conversion: a pos past what size_t
   * holds (2^64, 1e300, inf) has no defined conversion. */
  if (pos > (lua_Number)len + 1) {
    lua_pushnil(L);
    squall_push_error(L, "msgpack",
                      lua_pushfstring(L,
                                      "pos %f is past the end of the %d bytes",
                                      pos, (int)len));
    lua_remove(L, -2); /* the formatted message */
    return 2;
  }
  size_t off = (size_t)pos - 1, used;
  if (decode_onto(L, (const unsigned char *)s + off, len - off, &used) != 0)
    return 2;
  lua_pushnumber(L, (lua_Number)(off + used + 1));
  return 2;
}

/* ---- the streaming unpacker -------------------------------------------- */

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
} unpacker;

/* How many header bytes follow the type byte, how many payload bytes
 * (known once the header is read) and how many items it contains. */
static void shape(unsigned char t, const unsigned char *h, int *hlen,
                  uint64_t *payload, uint64_t *items) {
  *hlen = 0;
  *payload = 0;
  *items = 0;
  if (t <= 0x7f || t >= 0xe0 || t == 0xc0 || t == 0xc2 || t == 0xc3)
    return;
  if ((t & 0xe0) == 0xa0) {
    *payload = t & 0x1f;
    return;
  }
  if ((t & 0xf0) == 0x90) {
    *items = t & 0x0f;
    return;
  }
  if ((t & 0xf0) == 0x80) {
    *items = 2u * (t & 0x0f);
    return;
  }
  switch (t) {
  case 0xc4:
  case 0xd9:
    *hlen = 1;
    break;
  case 0xc5:
  case 0xda:
    *hlen = 2;
    break;
  case 0xc6:
  case 0xdb:
    *hlen = 4;
    break;
  case 0xc7:
    *hlen = 1;
    break;
  case 0xc8:
    *hlen = 2;
    break;
  case 0xc9:
    *hlen = 4;
    break;
  case 0xca:
    *payload = 4;
    return;
  case 0xcb:
    *payload = 8;
    return;
  case 0xcc:
  case 0xd0:
    *payload = 1;
    return;
  case 0xcd:
  case 0xd1:
    *payload = 2;
    return;
  case 0xce:
  case 0xd2:
    *payload = 4;
    return;
  case 0xcf:
  case 0xd3:
    *payload = 8;
    return;
  case 0xd4:
    *payload = 2;
    return;
  case 0xd5:
    *payload = 3;
    return;
  case 0xd6:
    *payload = 5;
    return;
  case 0xd7:
    *payload = 9;
    return;
  case 0xd8:
    *payload = 17;
    return;
  case 0xdc:
    *hlen = 2;
    break;
  case 0xdd:
    *hlen = 4;
    break;
  case 0xde:
    *hlen = 2;
    break;
  case 0xdf:
    *hlen = 4;
    break;
  }
  if (h == NULL)
    return;
  uint64_t n = be(h, *hlen);
  if (t >= 0xdc && t <= 0xdd)
    *items = n;
  else if (t >= 0xde)
    *items = 2 * n;
  else if (t >= 0xc7 && t <= 0xc9)
    *payload = n + 1; /* the ext type byte, then the data */
  else
    *payload = n;
}

/* The scan took an item of `size` bytes holding `items` more (a
 * container's): count it, and open a level for those. -1 (u->failed set)
 * past the nesting limit. */
static int step(unpacker *u, size_t size, uint64_t items) {
  u->scan += size;
  u->left[u->depth - 1]--;
  if (items == 0)
    return 0;
  if (u->depth > SQUALL_MSGPACK_MAX_DEPTH) {
    u->failed = strdup("values nest deeper than 200 levels");
    return -1;
  }
  u->left[u->depth++] = items;
  return 0;
}

/* Advance the scan: 1 when the next value is complete (`scan` bytes), 0
 * when more bytes are needed, -1 with u->failed set when the input is not
 * MessagePack or the value passes max_size. */
static int measure(unpacker *u) {
  const unsigned char *p = (const unsigned char *)squall_buffer_head(&u->buf);
  size_t len = squall_buffer_len(&u->buf);
  if (u->depth == 0) {
    if (len == 0)
      return 0;
    u->depth = 1;
    u->left[0] = 1;
    u->scan = 0;
  }
  for (;;) {
    while (u->depth > 0 && u->left[u->depth - 1] == 0)
      u->depth--;
    if (u->depth == 0)
      return 1;
    if (u->scan >= len)
      return 0;
    unsigned char t = p[u->scan];
    if ((t & 0xe0) == 0x80) {
      /* a short array or map: its items follow, at one level deeper */
      if (step(u, 1, (t & 0x10) ? (uint64_t)(t & 0x0f) : 2u * (t & 0x0f)))
        return -1;
      continue;
    }
    if (t <= 0x7f || t >= 0xe0 || (t & 0xe0) == 0xa0) {
      /* the common one-byte headers: a small integer, a short string */
      size_t size = 1 + ((t & 0xe0) == 0xa0 ? (size_t)(t & 0x1f) : 0);
      if (u->scan + size > u->max_size) {
        u->failed = strdup("a value is larger than max_size");
        return -1;
      }
      if (len - u->scan < size)
        return 0;
      u->scan += size;
      u->left[u->depth - 1]--;
      continue;
    }
    if (t == 0xc1) {
      u->failed = strdup("invalid type byte 0xc1");
      return -1;
    }
    int hlen;
    uint64_t payload, items;
    shape(t, NULL, &hlen, &payload, &items);
    if (len - u->scan < 1 + (size_t)hlen)
      return 0;
    shape(t, p + u->scan + 1, &hlen, &payload, &items);
    uint64_t size = 1 + (uint64_t)hlen + payload;
    if (u->scan + size > u->max_size) {
      u->failed = strdup("a value is larger than max_size");
      return -1;
    }
    if (len - u->scan < size)
      return 0;
    if (step(u, (size_t)size, items))
      return -1;
  }
}

static unpacker *check_unpacker(lua_State *L) {
  return squall_checkudata(L, 1, UNPACKER_MT);
}

static int push_failed(lua_State *L, unpacker *u) {
  lua_pushnil(L);
  squall_push_error(L, "msgpack", u->failed);
  return 2;
}

/* u:feed(chunk) */
static int l_unpacker_feed(lua_State *L) {
  unpacker *u = check_unpacker(L);
  size_t n;
  const char *s = luaL_checklstring(L, 2, &n);
  if (u->failed == NULL && squall_buffer_append(&u->buf, s, n) != 0)
    return luaL_error(L, "out of memory");
  return 0;
}

enum take_mode { TAKE_VALUE, TAKE_ITEMS, TAKE_RPC };

/* Push the items of the short array at d->pos as values, MessagePack nil
 * as nil, after their count; an array too long to spread goes as -1 and
 * its table; anything else that is not an array as -2 alone. */
static int spread_params(dec *d, int depth) {
  const unsigned char *p = d->p + d->pos;
  uint64_t m = 0;
  int hlen = 0;
  if (d->pos < d->len && (p[0] & 0xf0) == 0x90) {
    m = p[0] & 0x0f;
  } else if (d->len - d->pos >= 3 && p[0] == 0xdc) {
    m = be(p + 1, 2);
    hlen = 2;
  } else if (d->len - d->pos >= 5 && p[0] == 0xdd) {
    m = be(p + 1, 4);
    hlen = 4;
  } else {
    /* not an array: invalid MessagePack-RPC, for the caller to refuse
     * (the value is not decoded; the scan already checked its bytes) */
    lua_pushnumber(d->L, -2);
    return 0;
  }
  if (m > 64 || !lua_checkstack(d->L, (int)m + 2)) {
    lua_pushnumber(d->L, -1);
    return dec_value(d, depth);
  }
  d->pos += 1 + (size_t)hlen;
  lua_pushnumber(d->L, (lua_Number)m);
  for (uint64_t i = 0; i < m; i++) {
    if (d->pos < d->len && d->p[d->pos] == 0xc0) {
      d->pos++;
      lua_pushnil(d->L);
    } else if (dec_value(d, depth + 1) != 0) {
      return -1;
    }
  }
  return 0;
}

/* Decode the next value the scan found complete onto L, as `mode` says:
 * - TAKE_VALUE: the value;
 * - TAKE_ITEMS: the items of an array of at most 8 as values after their
 *   count (-1 and the value for anything else);
 * - TAKE_RPC: as TAKE_ITEMS, but a MessagePack-RPC request [0, msgid,
 *   method, params] or notification [2, method, params] comes as 4,
 *   kind, msgid (nil for a notification), method, then its params spread
 *   by spread_params: no table for the message or its parameters.
 * Returns how many values it pushed: nil while the value is incomplete,
 * nil and an error once the input broke. */
static int take_value(lua_State *L, int mode) {
  unpacker *u = check_unpacker(L);
  if (u->failed != NULL)
    return push_failed(L, u);
  int r = measure(u);
  if (r == 0) {
    lua_pushnil(L);
    return 1;
  }
  if (r < 0)
    return push_failed(L, u);
  const unsigned char *p = (const unsigned char *)squall_buffer_head(&u->buf);
  int top = lua_gettop(L);
  int n = -1;
  if (mode != TAKE_VALUE && (p[0] & 0xf0) == 0x90 && (p[0] & 0x0f) <= 8)
    n = p[0] & 0x0f;
  dec d = {L, p, u->scan, n >= 0 ? 1 : 0, NULL, 0};
  int bad;
  if (mode == TAKE_RPC && u->scan > 1 &&
      ((n == 4 && p[1] == 0x00) || (n == 3 && p[1] == 0x02))) {
    lua_pushnumber(L, 4);
    lua_pushnumber(L, p[1]);
    d.pos = 2;
    if (n == 3)
      lua_pushnil(L);       /* a notification has no msgid */
    bad = dec_value(&d, 2); /* msgid, or the method */
    if (!bad && n == 4)
      bad = dec_value(&d, 2); /* the method */
    if (!bad)
      bad = spread_params(&d, 2);
  } else {
    if (mode != TAKE_VALUE)
      lua_pushnumber(L, n);
    bad = n < 0 ? dec_value(&d, 1) : 0;
    for (int i = 0; i < n && !bad; i++)
      bad = dec_value(&d, 2);
  }
  if (bad) {
    lua_settop(L, top);
    u->failed = strdup(d.err);
    return push_failed(L, u);
  }
  squall_buffer_consume(&u->buf, u->scan);
  u->scan = 0;
  u->depth = 0;
  if (squall_buffer_len(&u->buf) == 0)
    squall_buffer_free(&u->buf);
  return lua_gettop(L) - top;
}

/* u:next() -> value | nil (incomplete) | nil, err */
static int l_unpacker_next(lua_State *L) {
  return take_value(L, TAKE_VALUE);
}

/* u:next_items() -> n, item1..itemn when the next value is an array of
 * at most 8 items, -1, value for any other value; nil while incomplete;
 * nil, err. An RPC message is such an array: taking its items as values
 * saves the table each message would cost. */
static int l_unpacker_next_items(lua_State *L) {
  return take_value(L, TAKE_ITEMS);
}

/* u:next_rpc() -> as next_items, but a MessagePack-RPC request or
 * notification comes as 4, kind, msgid (nil for a notification), method,
 * nparams, params... (MessagePack nil as nil; nparams -1 and the table
 * for an array of more than 64, -2 alone when the params are not an
 * array): what squall.rpc dispatches, with no table built per message. */
static int l_unpacker_next_rpc(lua_State *L) {
  return take_value(L, TAKE_RPC);
}

/* u:buffered() -> bytes fed and not yet returned */
static int l_unpacker_buffered(lua_State *L) {
  lua_pushnumber(L, (lua_Number)squall_buffer_len(&check_unpacker(L)->buf));
  return 1;
}

static int l_unpacker_gc(lua_State *L) {
  unpacker *u = check_unpacker(L);
  squall_buffer_free(&u->buf);
  free(u->failed);
  u->failed = NULL;
  return 0;
}

/* unpacker(max_size), as msgpack_setup returns it */
static int l_unpacker(lua_State *L) {
  lua_Number max = luaL_optnumber(L, 1, 16777216);
  luaL_argcheck(L, max >= 1, 1, "max_size must be positive");
  unpacker *u = lua_newuserdata(L, sizeof *u);
  memset(u, 0, sizeof *u);
  u->max_size = max > 1e15 ? (size_t)1e15 : (size_t)max;
  luaL_getmetatable(L, UNPACKER_MT);
  lua_setmetatable(L, -2);
  return 1;
}

/* core.msgpack_setup(hooks) -> encode, decode, new_unpacker, encode_array,
 * write_array:
 * closures over `hooks` ({classify =, make_int =, ext_mt =, map_mt =}). */
static int l_setup(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  luaL_getmetatable(L, UNPACKER_MT);
  lua_pushvalue(L, 1);
  lua_pushcclosure(L, l_unpacker_next, 1);
  lua_setfield(L, -2, "next");
  lua_pushvalue(L, 1);
  lua_pushcclosure(L, l_unpacker_next_items, 1);
  lua_setfield(L, -2, "next_items");
  lua_pushvalue(L, 1);
  lua_pushcclosure(L, l_unpacker_next_rpc, 1);
  lua_setfield(L, -2, "next_rpc");
  lua_pop(L, 1);
  lua_pushvalue(L, 1);
  lua_pushcclosure(L, l_encode, 1);
  lua_pushvalue(L, 1);
  lua_pushcclosure(L, l_decode, 1);
  lua_pushvalue(L, 1);
  lua_pushcclosure(L, l_unpacker, 1);
  lua_pushvalue(L, 1);
  lua_pushcclosure(L, l_encode_array, 1);
  lua_pushvalue(L, 1);
  lua_pushcclosure(L, l_write_array, 1);
  return 5;
}

int squall_msgpack_open(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"feed", l_unpacker_feed},
      {"buffered", l_unpacker_buffered},
      {NULL, NULL},
  };
  /* next decodes, so it needs the hooks: l_setup adds it */
  squall_new_metatable(L, UNPACKER_MT, methods);
  luaL_getmetatable(L, UNPACKER_MT);
  lua_pushcfunction(L, l_unpacker_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  lua_pushcfunction(L, l_setup);
  lua_setfield(L, -2, "msgpack_setup");
  lua_pushlightuserdata(L, NULL); /* msgpack.null, as cjson.null */
  lua_setfield(L, -2, "msgpack_null");
  return 0;
}
