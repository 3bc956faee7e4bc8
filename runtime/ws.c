/* ws.c: WebSocket (RFC 6455) framing for squall.websocket.
 *
 * What runs per frame lives here: reading a frame header and unmasking
 * its payload, building a frame (masked with a random key from a client),
 * checking UTF-8 in text messages, and the handshake's accept key. The
 * message logic (fragments, control frames, the closing handshake) is in
 * lua/squall/websocket.lua. Everything here is a pure function of its
 * arguments, so the frame reader is fuzzed alone (tests/fuzz/ws_fuzz.c).
 */
#include <lauxlib.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <stdint.h>
#include <string.h>

#include "ws.h"

/* Add payload[0, len) XORed with the 4-byte mask key to b: masking and
 * unmasking are the same operation (RFC 6455 section 5.3). */
static void add_masked(luaL_Buffer *b, const unsigned char *payload, size_t len,
                       const unsigned char *key) {
  size_t done = 0;
  while (done < len) {
    size_t k = len - done;
    if (k > LUAL_BUFFERSIZE)
      k = LUAL_BUFFERSIZE;
    char *out = luaL_prepbuffer(b);
    for (size_t i = 0; i < k; i++)
      out[i] = (char)(payload[done + i] ^ key[(done + i) & 3]);
    luaL_addsize(b, k);
    done += k;
  }
}

/* core.ws_frame(data, pos, max_size, masked) ->
 *   nextpos, fin, opcode, payload   a whole frame from pos
 *   nil, need                       `need` more bytes are needed first
 *   false, code, reason             the frame breaks the RFC (1002) or is
 *                                   larger than max_size (1009)
 * `masked`: true when frames must be masked (a server reading a client),
 * false when they must not be. */
static int l_frame(lua_State *L) {
  size_t n;
  const unsigned char *d = (const unsigned char *)luaL_checklstring(L, 1, &n);
  lua_Number posn = luaL_checknumber(L, 2);
  lua_Number max = luaL_checknumber(L, 3);
  int must_mask = lua_toboolean(L, 4);
  if (posn < 1 || posn > (lua_Number)n + 1)
    return luaL_argerror(L, 2, "position out of range");
  size_t pos = (size_t)posn - 1, avail = n - pos;
  const unsigned char *p = d + pos;
  if (avail < 2) {
    lua_pushnil(L);
    lua_pushinteger(L, (lua_Integer)(2 - avail));
    return 2;
  }
  int fin = p[0] & 0x80, rsv = p[0] & 0x70, opcode = p[0] & 0x0f;
  int mask = p[1] & 0x80;
  uint64_t len = p[1] & 0x7f;
  size_t head = 2;
  const char *bad = NULL;
  if (rsv)
    bad = "reserved bits set without an extension";
  else if ((opcode > 2 && opcode < 8) || opcode > 10)
    bad = "unknown opcode";
  else if (opcode >= 8 && (!fin || len > 125))
    bad = "a control frame fragmented or over 125 bytes";
  else if (must_mask && !mask)
    bad = "a client frame without a mask";
  else if (!must_mask && mask)
    bad = "a masked frame from the server";
  if (bad) {
    lua_pushboolean(L, 0);
    lua_pushinteger(L, 1002);
    lua_pushstring(L, bad);
    return 3;
  }
  if (len == 126)
    head += 2;
  else if (len == 127)
    head += 8;
  if (mask)
    head += 4;
  if (avail < head) {
    lua_pushnil(L);
    lua_pushinteger(L, (lua_Integer)(head - avail));
    return 2;
  }
  if (len == 126) {
    len = ((uint64_t)p[2] << 8) | p[3];
  } else if (len == 127) {
    len = 0;
    for (int i = 0; i < 8; i++)
      len = (len << 8) | p[2 + i];
    if (len >> 63) {
      lua_pushboolean(L, 0);
      lua_pushinteger(L, 1002);
      lua_pushstring(L, "a frame length with its top bit set");
      return 3;
    }
  }
  if ((double)len > max) {
    lua_pushboolean(L, 0);
    lua_pushinteger(L, 1009);
    lua_pushstring(L, "the message is larger than max_message_size");
    return 3;
  }
  if (avail - head < len) {
    lua_pushnil(L);
    lua_pushnumber(L, (lua_Number)(len - (avail - head)));
    return 2;
  }
  const unsigned char *payload = p + head;
  lua_pushnumber(L, (lua_Number)(pos + head + len + 1));
  lua_pushboolean(L, fin);
  lua_pushinteger(L, opcode);
  if (!mask) {
    lua_pushlstring(L, (const char *)payload, (size_t)len);
    return 4;
  }
  const unsigned char *key = payload - 4;
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  add_masked(&b, payload, (size_t)len, key);
  luaL_pushresult(&b);
  return 4;
}

/* core.ws_build(opcode, payload, mask[, fin]) -> one frame's bytes; mask
 * (a client's frames) uses a fresh random key per frame, as RFC 6455
 * section 5.3 asks. fin defaults to true. */
static int l_build(lua_State *L) {
  lua_Integer opcode = luaL_checkinteger(L, 1);
  size_t len;
  const unsigned char *payload =
      (const unsigned char *)luaL_checklstring(L, 2, &len);
  int mask = lua_toboolean(L, 3);
  int fin = lua_isnoneornil(L, 4) ? 1 : lua_toboolean(L, 4);
  unsigned char head[14];
  size_t h = 0;
  head[h++] = (unsigned char)((fin ? 0x80 : 0) | (opcode & 0x0f));
  unsigned char m = mask ? 0x80 : 0;
  if (len < 126) {
    head[h++] = (unsigned char)(m | len);
  } else if (len < 65536) {
    head[h++] = m | 126;
    head[h++] = (unsigned char)(len >> 8);
    head[h++] = (unsigned char)len;
  } else {
    head[h++] = m | 127;
    for (int i = 7; i >= 0; i--)
      head[h++] = (unsigned char)((uint64_t)len >> (8 * i));
  }
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  if (!mask) {
    luaL_addlstring(&b, (const char *)head, h);
    luaL_addlstring(&b, (const char *)payload, len);
    luaL_pushresult(&b);
    return 1;
  }
  unsigned char key[4];
  if (RAND_bytes(key, 4) != 1)
    return luaL_error(L, "no random bytes for a WebSocket mask");
  memcpy(head + h, key, 4);
  h += 4;
  luaL_addlstring(&b, (const char *)head, h);
  add_masked(&b, payload, len, key);
  luaL_pushresult(&b);
  return 1;
}

/* Whether s[0, n) is UTF-8 as RFC 3629 defines it: no overlong forms, no
 * surrogates, nothing past U+10FFFF. */
int squall_utf8_valid(const unsigned char *s, size_t n) {
  size_t i = 0;
  while (i < n) {
    unsigned char c = s[i];
    if (c < 0x80) {
      i++;
      continue;
    }
    size_t k;
    unsigned lo = 0x80, hi = 0xbf;
    if (c >= 0xc2 && c <= 0xdf)
      k = 1;
    else if (c >= 0xe0 && c <= 0xef) {
      k = 2;
      if (c == 0xe0)
        lo = 0xa0;
      else if (c == 0xed)
        hi = 0x9f;
    } else if (c >= 0xf0 && c <= 0xf4) {
      k = 3;
      if (c == 0xf0)
        lo = 0x90;
      else if (c == 0xf4)
        hi = 0x8f;
    } else
      return 0;
    if (i + k >= n) /* the sequence runs past the end */
      return 0;
    if (s[i + 1] < lo || s[i + 1] > hi)
      return 0;
    for (size_t j = 2; j <= k; j++)
      if ((s[i + j] & 0xc0) != 0x80)
        return 0;
    i += k + 1;
  }
  return 1;
}

/* core.utf8_valid(s) -> boolean */
static int l_utf8_valid(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  lua_pushboolean(L, squall_utf8_valid((const unsigned char *)s, n));
  return 1;
}

/* core.ws_accept(key) -> base64(SHA-1(key .. the RFC's GUID)), the
 * Sec-WebSocket-Accept value for a Sec-WebSocket-Key */
static int l_accept(lua_State *L) {
  static const char GUID[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
  size_t n;
  const char *key = luaL_checklstring(L, 1, &n);
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int mdlen = 0;
  EVP_MD_CTX *ctx = EVP_MD_CTX_new();
  if (ctx == NULL || EVP_DigestInit_ex(ctx, EVP_sha1(), NULL) != 1 ||
      EVP_DigestUpdate(ctx, key, n) != 1 ||
      EVP_DigestUpdate(ctx, GUID, sizeof GUID - 1) != 1 ||
      EVP_DigestFinal_ex(ctx, md, &mdlen) != 1) {
    EVP_MD_CTX_free(ctx);
    return luaL_error(L, "SHA-1 failed");
  }
  EVP_MD_CTX_free(ctx);
  unsigned char out[64];
  int len = EVP_EncodeBlock(out, md, (int)mdlen);
  lua_pushlstring(L, (const char *)out, (size_t)len);
  return 1;
}

int squall_ws_open(lua_State *L) {
  static const luaL_Reg fns[] = {
      {"ws_frame", l_frame},
      {"ws_build", l_build},
      {"utf8_valid", l_utf8_valid},
      {"ws_accept", l_accept},
      {NULL, NULL},
  };
  for (const luaL_Reg *r = fns; r->name; r++) {
    lua_pushcfunction(L, r->func);
    lua_setfield(L, -2, r->name);
  }
  return 0;
}
