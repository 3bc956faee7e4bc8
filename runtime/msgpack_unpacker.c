/* msgpack_unpacker.c: the streaming unpacker (see msgpack.h): bytes fed
 * in any chunks, values out once whole. A resumable scan measures the
 * next value (each byte once, however it was split); only a value the
 * scan found whole is decoded. */
#include "msgpack_impl.h"

#include <lauxlib.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "buffer.h"
#include "host.h"

const char MP_UNPACKER_MT[] = "squall.msgpack.unpacker";

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
  uint64_t n = mp_be(h, *hlen);
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
static int step(mp_unpacker *u, size_t size, uint64_t items) {
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
static int mp_measure(mp_unpacker *u) {
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

static mp_unpacker *mp_check_unpacker(lua_State *L) {
  return squall_checkudata(L, 1, MP_UNPACKER_MT);
}

static int mp_push_failed(lua_State *L, mp_unpacker *u) {
  lua_pushnil(L);
  squall_push_error(L, "msgpack", u->failed);
  return 2;
}

/* u:feed(chunk) */
static int l_unpacker_feed(lua_State *L) {
  mp_unpacker *u = mp_check_unpacker(L);
  size_t n;
  const char *s = luaL_checklstring(L, 2, &n);
  if (u->failed == NULL && squall_buffer_append(&u->buf, s, n) != 0)
    return luaL_error(L, "out of memory");
  return 0;
}

static void mp_consume(mp_unpacker *u) {
  squall_buffer_consume(&u->buf, u->scan);
  u->scan = 0;
  u->depth = 0;
  if (squall_buffer_len(&u->buf) == 0)
    squall_buffer_free(&u->buf);
}

static int mp_fail(lua_State *L, mp_unpacker *u, const char *err) {
  u->failed = strdup(err);
  return mp_push_failed(L, u);
}

int mp_take(lua_State *L, int (*push)(mp_dec *d)) {
  mp_unpacker *u = mp_check_unpacker(L);
  if (u->failed != NULL)
    return mp_push_failed(L, u);
  int r = mp_measure(u);
  if (r == 0) {
    lua_pushnil(L);
    return 1;
  }
  if (r < 0)
    return mp_push_failed(L, u);
  int top = lua_gettop(L);
  mp_dec d = {L,       (const unsigned char *)squall_buffer_head(&u->buf),
              u->scan, 0,
              NULL,    0};
  if (push(&d) != 0) {
    lua_settop(L, top);
    return mp_fail(L, u, d.err);
  }
  mp_consume(u);
  return lua_gettop(L) - top;
}

/* ---- the FFI fast path ------------------------------------------------
 *
 * lua/squall/msgpack/fast.lua decodes the common values in compiled Lua
 * straight from the unpacker's bytes, as iostream.lua reads lines from a
 * stream's. It may take bytes only between values: while a scan is under
 * way (the next value came in parts) or after the input broke, these say
 * there is nothing for it, and u:next() decides. `u` is the userdata's
 * payload (the FFI passes a userdata as a pointer to it). */

/* The bytes the fast path may decode now, or 0. At most max_size: a value
 * that needs more is not whole to it, and the scan then refuses it. */
int squall_mp_ffi_avail(const void *p) {
  const mp_unpacker *u = p;
  if (u->failed != NULL || u->depth != 0)
    return 0;
  size_t n = squall_buffer_len(&u->buf);
  if (n > u->max_size)
    n = u->max_size;
  return n > INT_MAX ? INT_MAX : (int)n;
}

/* The bytes fed and not taken; valid until the unpacker's next call. */
const unsigned char *squall_mp_ffi_head(const void *p) {
  const mp_unpacker *u = p;
  return (const unsigned char *)squall_buffer_head(&u->buf);
}

/* Take n bytes (a whole value the fast path decoded), as next() does. */
void squall_mp_ffi_consume(void *p, size_t n) {
  mp_unpacker *u = p;
  u->scan = n;
  mp_consume(u);
}

static int push_value(mp_dec *d) {
  return mp_dec_value(d, 1);
}

/* u:next() -> value | nil (incomplete) | nil, err */
static int l_unpacker_next(lua_State *L) {
  return mp_take(L, push_value);
}

/* u:buffered() -> bytes fed and not yet returned */
static int l_unpacker_buffered(lua_State *L) {
  lua_pushnumber(L, (lua_Number)squall_buffer_len(&mp_check_unpacker(L)->buf));
  return 1;
}

static int l_unpacker_gc(lua_State *L) {
  mp_unpacker *u = mp_check_unpacker(L);
  squall_buffer_free(&u->buf);
  free(u->failed);
  u->failed = NULL;
  return 0;
}

/* unpacker(max_size), as msgpack_setup returns it */
int mp_l_unpacker_new(lua_State *L) {
  lua_Number max = luaL_optnumber(L, 1, 16777216);
  luaL_argcheck(L, max >= 1, 1, "max_size must be positive");
  mp_unpacker *u = lua_newuserdata(L, sizeof *u);
  memset(u, 0, sizeof *u);
  u->max_size = max > 1e15 ? (size_t)1e15 : (size_t)max;
  luaL_getmetatable(L, MP_UNPACKER_MT);
  lua_setmetatable(L, -2);
  return 1;
}

void mp_unpacker_setup(lua_State *L) {
  luaL_getmetatable(L, MP_UNPACKER_MT);
  lua_pushvalue(L, 1);
  lua_pushcclosure(L, l_unpacker_next, 1);
  lua_setfield(L, -2, "next");
  lua_pop(L, 1);
}

void mp_unpacker_open(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"feed", l_unpacker_feed},
      {"buffered", l_unpacker_buffered},
      {"__gc", l_unpacker_gc},
      {NULL, NULL},
  };
  /* next decodes, so it needs the hooks: mp_unpacker_setup adds it */
  squall_new_metatable(L, MP_UNPACKER_MT, methods);
}
