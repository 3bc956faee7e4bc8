/* msgpack.c: MessagePack decoding, and core.msgpack_setup, which hands
 * Lua the codec (see msgpack.h). Formats follow the MessagePack
 * specification. Encoding is in msgpack_encode.c, the streaming unpacker
 * in msgpack_unpacker.c. */
#include "msgpack_impl.h"

#include <lauxlib.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "host.h"

static int fail(mp_dec *d, const char *err, size_t at) {
  d->err = err;
  d->err_at = at;
  return -1;
}

static int need(mp_dec *d, size_t n) {
  if (d->len - d->pos >= n)
    return 0;
  return fail(d, "truncated: the value ends past the input", d->len);
}

uint64_t mp_be(const unsigned char *p, int n) {
  uint64_t v = 0;
  for (int i = 0; i < n; i++)
    v = (v << 8) | p[i];
  return v;
}

/* Read an n-byte big-endian length or value after the type byte. */
static int read_be(mp_dec *d, int n, uint64_t *v) {
  if (need(d, (size_t)n) != 0)
    return -1;
  *v = mp_be(d->p + d->pos, n);
  d->pos += (size_t)n;
  return 0;
}

/* Integers up to 2^53 in magnitude are exact as Lua numbers. */
static const uint64_t TWO53 = (uint64_t)1 << 53;

/* Push an integer beyond 2^53 as 64-bit cdata, made by the Lua hook from
 * its 32-bit halves (the C API cannot make cdata). */
static void push_big(mp_dec *d, uint64_t bits, int is_signed) {
  lua_getfield(d->L, HOOKS, "make_int");
  lua_pushnumber(d->L, (lua_Number)(bits >> 32));
  lua_pushnumber(d->L, (lua_Number)(bits & 0xffffffffu));
  lua_pushboolean(d->L, is_signed);
  lua_call(d->L, 3, 1);
}

/* Push an integer: a number when |v| <= 2^53, else cdata. */
static void push_u64(mp_dec *d, uint64_t v) {
  if (v <= TWO53)
    lua_pushnumber(d->L, (lua_Number)v);
  else
    push_big(d, v, 0);
}

static void push_i64(mp_dec *d, int64_t v) {
  if (v >= 0)
    push_u64(d, (uint64_t)v);
  else if (v >= -(int64_t)TWO53)
    lua_pushnumber(d->L, (lua_Number)v);
  else
    push_big(d, (uint64_t)v, 1);
}

static int push_bytes(mp_dec *d, uint64_t n) {
  if (need(d, n) != 0)
    return -1;
  lua_pushlstring(d->L, (const char *)d->p + d->pos, (size_t)n);
  d->pos += n;
  return 0;
}

static int dec_array(mp_dec *d, uint64_t n, int depth) {
  /* Each element takes a byte at least: refuse a count the input cannot
   * hold before allocating for it. */
  if (n > d->len - d->pos)
    return need(d, n);
  lua_State *L = d->L;
  lua_createtable(L, (int)n, 0);
  for (uint64_t i = 1; i <= n; i++) {
    if (mp_dec_value(d, depth + 1) != 0)
      return -1;
    lua_rawseti(L, -2, (int)i);
  }
  return 0;
}

static int dec_map(mp_dec *d, uint64_t n, int depth) {
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
    if (mp_dec_value(d, depth + 1) != 0 || mp_dec_value(d, depth + 1) != 0)
      return -1;
    if (lua_type(L, -2) == LUA_TNUMBER &&
        lua_tonumber(L, -2) != lua_tonumber(L, -2))
      return fail(d, "a map key is NaN, which a Lua table cannot hold", d->pos);
    lua_rawset(L, -3);
  }
  return 0;
}

static int dec_ext(mp_dec *d, uint64_t n) {
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

int mp_dec_value(mp_dec *d, int depth) {
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

/* The big-endian float 64 and float 32 at p, for the compiled decoder
 * (lua/squall/msgpack/fast.lua): in C, because Lua over the FFI can only
 * pun bytes to a double through a union, whose byte stores the JIT's alias
 * analysis may move past the double's load. A NaN comes back as the one
 * LuaJIT uses, as lua_pushnumber makes it: the FFI passes a returned
 * double on as it is, and LuaJIT reads some NaNs' bits as other values
 * (all ones is nil). */
static double canonical(double f) {
  if (f != f) {
    uint64_t bits = (uint64_t)0xfff80000u << 32;
    memcpy(&f, &bits, sizeof f);
  }
  return f;
}

double squall_mp_ffi_float64(const unsigned char *p) {
  uint64_t bits = mp_be(p, 8);
  double f;
  memcpy(&f, &bits, sizeof f);
  return canonical(f);
}

double squall_mp_ffi_float32(const unsigned char *p) {
  uint32_t bits = (uint32_t)mp_be(p, 4);
  float f;
  memcpy(&f, &bits, sizeof f);
  return canonical(f);
}

/* Decode one value from p[0, len) onto L: the value and 0, or -1 with
 * nil and an error value (kind msgpack) pushed instead. *used gets the
 * bytes it took. */
static int decode_onto(lua_State *L, const unsigned char *p, size_t len,
                       size_t *used) {
  int top = lua_gettop(L);
  mp_dec d = {L, p, len, 0, NULL, 0};
  if (mp_dec_value(&d, 1) != 0) {
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

/* core.msgpack_setup(hooks) -> encode, decode, new_unpacker, encode_array,
 * write_array: closures over `hooks` ({classify =, make_int =, ext_mt =,
 * map_mt =}), which the registry keeps too (MP_HOOKS_KEY). */
static int l_setup(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_pushvalue(L, 1);
  lua_setfield(L, LUA_REGISTRYINDEX, MP_HOOKS_KEY);
  mp_unpacker_setup(L);
  lua_pushvalue(L, 1);
  lua_pushcclosure(L, mp_l_encode, 1);
  lua_pushvalue(L, 1);
  lua_pushcclosure(L, l_decode, 1);
  lua_pushvalue(L, 1);
  lua_pushcclosure(L, mp_l_unpacker_new, 1);
  lua_pushvalue(L, 1);
  lua_pushcclosure(L, mp_l_encode_array, 1);
  lua_pushvalue(L, 1);
  lua_pushcclosure(L, mp_l_write_array, 1);
  return 5;
}

int squall_msgpack_open(lua_State *L) {
  mp_unpacker_open(L);
  lua_pushcfunction(L, l_setup);
  lua_setfield(L, -2, "msgpack_setup");
  lua_pushlightuserdata(L, NULL); /* msgpack.null, as cjson.null */
  lua_setfield(L, -2, "msgpack_null");
  return 0;
}
