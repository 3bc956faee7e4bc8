/* rpc_frame.c: MessagePack-RPC messages out of an unpacker (see
 * rpc_frame.h). The codec (msgpack*.c) knows nothing of RPC; this file
 * knows the three message shapes and spreads what squall.rpc dispatches
 * onto the stack, so a request costs no table. */
#include "rpc_frame.h"

#include <lauxlib.h>

#include "msgpack_impl.h"

/* The count of an array whose header is at d->pos (the header skipped), or
 * -1 when the value there is not an array (nothing skipped). */
static int64_t array_header(mp_dec *d) {
  const unsigned char *p = d->p + d->pos;
  size_t left = d->len - d->pos;
  if (left >= 1 && (p[0] & 0xf0) == 0x90) {
    d->pos += 1;
    return p[0] & 0x0f;
  }
  if (left >= 3 && p[0] == 0xdc) {
    d->pos += 3;
    return (int64_t)mp_be(p + 1, 2);
  }
  if (left >= 5 && p[0] == 0xdd) {
    d->pos += 5;
    return (int64_t)mp_be(p + 1, 4);
  }
  return -1;
}

/* The message type at d->pos when it is 0, 1 or 2 in any integer format
 * (skipped), else -1 (nothing skipped). */
static int message_type(mp_dec *d) {
  const unsigned char *p = d->p + d->pos;
  size_t left = d->len - d->pos, n = 0;
  uint64_t v;
  if (left >= 1 && p[0] <= 0x7f) {
    v = p[0];
  } else if (left >= 2 && (p[0] == 0xcc || p[0] == 0xd0)) {
    v = p[1];
    n = 1;
  } else if (left >= 3 && (p[0] == 0xcd || p[0] == 0xd1)) {
    v = mp_be(p + 1, 2);
    n = 2;
  } else if (left >= 5 && (p[0] == 0xce || p[0] == 0xd2)) {
    v = mp_be(p + 1, 4);
    n = 4;
  } else if (left >= 9 && (p[0] == 0xcf || p[0] == 0xd3)) {
    v = mp_be(p + 1, 8);
    n = 8;
  } else {
    return -1;
  }
  if (v > 2)
    return -1;
  d->pos += 1 + n;
  return (int)v;
}

/* Push the params: their count and each value, PARAMS_TABLE and their
 * table, or PARAMS_NOT_ARRAY alone (the value is not decoded; the scan
 * already checked its bytes). */
static int push_params(mp_dec *d) {
  size_t at = d->pos;
  int64_t m = array_header(d);
  if (m < 0) {
    lua_pushnumber(d->L, RPC_FRAME_PARAMS_NOT_ARRAY);
    return 0;
  }
  if (m > RPC_FRAME_MAX_SPREAD || !lua_checkstack(d->L, (int)m + 2)) {
    d->pos = at;
    lua_pushnumber(d->L, RPC_FRAME_PARAMS_TABLE);
    return mp_dec_value(d, 2);
  }
  lua_pushnumber(d->L, (lua_Number)m);
  for (int64_t i = 0; i < m; i++) {
    if (d->pos < d->len && d->p[d->pos] == 0xc0) {
      d->pos++;
      lua_pushnil(d->L);
    } else if (mp_dec_value(d, 3) != 0) {
      return -1;
    }
  }
  return 0;
}

/* Push the message in p[0, len), as rpc_frame.h says: 0, or -1 with d->err
 * set. */
static int push_message(mp_dec *d) {
  int64_t n = array_header(d);
  int type = n == 3 || n == 4 ? message_type(d) : -1;
  if (n == 4 && type == RPC_FRAME_REQUEST) {
    lua_pushnumber(d->L, RPC_FRAME_REQUEST);
    if (mp_dec_value(d, 2) != 0 || mp_dec_value(d, 2) != 0)
      return -1; /* msgid, method */
    return push_params(d);
  }
  if (n == 3 && type == RPC_FRAME_NOTIFY) {
    lua_pushnumber(d->L, RPC_FRAME_NOTIFY);
    lua_pushnil(d->L); /* a notification has no msgid */
    if (mp_dec_value(d, 2) != 0)
      return -1; /* method */
    return push_params(d);
  }
  if (n == 4 && type == RPC_FRAME_RESPONSE) {
    lua_pushnumber(d->L, RPC_FRAME_RESPONSE);
    for (int i = 0; i < 3; i++) /* msgid, error, result */
      if (mp_dec_value(d, 2) != 0)
        return -1;
    return 0;
  }
  lua_pushnumber(d->L, RPC_FRAME_OTHER);
  d->pos = 0;
  return mp_dec_value(d, 1);
}

/* next_message(unpacker), a closure over the msgpack hooks. */
static int l_next_message(lua_State *L) {
  return mp_take(L, push_message);
}

/* core.rpc_frame_reader() -> next_message */
static int l_reader(lua_State *L) {
  lua_getfield(L, LUA_REGISTRYINDEX, MP_HOOKS_KEY);
  if (!lua_istable(L, -1))
    return luaL_error(L, "rpc_frame_reader: squall.msgpack is not loaded");
  lua_pushcclosure(L, l_next_message, 1);
  return 1;
}

int squall_rpc_frame_open(lua_State *L) {
  lua_pushcfunction(L, l_reader);
  lua_setfield(L, -2, "rpc_frame_reader");
  static const struct {
    const char *name;
    int value;
  } names[] = {
      {"REQUEST", RPC_FRAME_REQUEST},
      {"RESPONSE", RPC_FRAME_RESPONSE},
      {"NOTIFY", RPC_FRAME_NOTIFY},
      {"OTHER", RPC_FRAME_OTHER},
      {"PARAMS_TABLE", RPC_FRAME_PARAMS_TABLE},
      {"PARAMS_NOT_ARRAY", RPC_FRAME_PARAMS_NOT_ARRAY},
      {"MAX_SPREAD", RPC_FRAME_MAX_SPREAD},
  };
  lua_createtable(L, 0, (int)(sizeof names / sizeof names[0]));
  for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
    lua_pushnumber(L, names[i].value);
    lua_setfield(L, -2, names[i].name);
  }
  lua_setfield(L, -2, "rpc_frame_constants");
  return 0;
}
