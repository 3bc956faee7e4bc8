/* http_response.c: HTTP/1.1 responses for squall.httpserver, built in C
 * (http.c parses; this writes). core.http_send builds a whole response
 * straight into a stream's write queue, core.http_response a streamed
 * response's head as a string. Header names are checked as tokens and
 * values for CR and LF, so a handler cannot split a response. */
#include <lauxlib.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "http.h"
#include "stream.h"

/* tchar (RFC 9110 5.6.2): what a header name may hold, by byte (a
 * table: every response's names go through here). */
static unsigned char tchar[256];

static void init_tchar(void) {
  for (int c = 0; c < 256; c++)
    tchar[c] = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
               (c >= '0' && c <= '9') ||
               (c && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}

static int token_char(unsigned char c) {
  return tchar[c];
}

static int same_name(const char *k, size_t n, const char *lower) {
  return strlen(lower) == n && strncasecmp(k, lower, n) == 0;
}

/* The value at idx as a header value (a string or a number), checked
 * for CR and LF, which would end the field early. NULL and *why set when
 * it is neither. */
static const char *field_value(lua_State *L, int idx, size_t *vn,
                               const char **why) {
  if (lua_type(L, idx) != LUA_TSTRING && lua_type(L, idx) != LUA_TNUMBER) {
    *why = "a value must be a string or a number";
    return NULL;
  }
  const char *v = lua_tolstring(L, idx, vn);
  if (memchr(v, '\r', *vn) || memchr(v, '\n', *vn)) {
    *why = "holds CR or LF";
    return NULL;
  }
  return v;
}

/* Walk the header table at index idx: with out == NULL, check it and add up
 * the bytes its fields take (and note the fields the server would add);
 * else write them to out. Returns the bytes, or -1 with the error message
 * pushed when the table holds a name or a value that would break the
 * framing (the stack is then as walk_fields found it, plus that). */
typedef struct {
  int len, te, date, conn, chunked, close;
} seen_fields;

static ptrdiff_t walk_fields(lua_State *L, int idx, char *out,
                             seen_fields *seen) {
  size_t total = 0;
  int top = lua_gettop(L);
  lua_pushnil(L);
  while (lua_next(L, idx) != 0) {
    if (lua_type(L, -2) != LUA_TSTRING) {
      const char *t = luaL_typename(L, -2);
      lua_settop(L, top);
      lua_pushfstring(L, "bad header name (a %s)", t);
      return -1;
    }
    size_t kn;
    const char *k = lua_tolstring(L, -2, &kn);
    if (out == NULL) {
      int bad = kn == 0;
      for (size_t i = 0; i < kn && !bad; i++)
        bad = !token_char((unsigned char)k[i]);
      if (bad) {
        lua_pushfstring(
            L, kn ? "bad header name %s" : "bad header name (empty)", k);
        lua_replace(L, top + 1);
        lua_settop(L, top + 1);
        return -1;
      }
      const char *v = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "";
      if (same_name(k, kn, "content-length"))
        seen->len = 1;
      else if (same_name(k, kn, "transfer-encoding")) {
        seen->te = 1;
        seen->chunked = strcasestr(v, "chunked") != NULL;
      } else if (same_name(k, kn, "date"))
        seen->date = 1;
      else if (same_name(k, kn, "connection")) {
        seen->conn = 1;
        if (strcasestr(v, "close") != NULL)
          seen->close = 1;
      }
    }
    int vi = lua_gettop(L);
    int n = lua_type(L, vi) == LUA_TTABLE ? (int)lua_objlen(L, vi) : 1;
    for (int i = 1; i <= n; i++) {
      int at = vi;
      if (lua_type(L, vi) == LUA_TTABLE) {
        lua_rawgeti(L, vi, i);
        at = lua_gettop(L);
      }
      size_t vn;
      const char *why = NULL;
      const char *v = field_value(L, at, &vn, &why);
      if (v == NULL) {
        lua_pushfstring(L, "header %s: %s", k, why);
        lua_replace(L, top + 1);
        lua_settop(L, top + 1);
        return -1;
      }
      if (out != NULL) {
        memcpy(out + total, k, kn);
        memcpy(out + total + kn, ": ", 2);
        memcpy(out + total + kn + 2, v, vn);
        memcpy(out + total + kn + 2 + vn, "\r\n", 2);
      }
      total += kn + vn + 4;
      if (at != vi)
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
  }
  return (ptrdiff_t)total;
}

/* The Date header's value for now, made once a second (this thread's). */
static const char *http_date(size_t *n) {
  static _Thread_local time_t made = -1;
  static _Thread_local char text[40];
  static _Thread_local size_t len;
  time_t t = time(NULL);
  if (t != made) {
    /* IMF-fixdate (RFC 9110 5.6.7) with English names whatever the
     * locale (strftime's %a and %b follow LC_TIME) */
    static const char days[] = "SunMonTueWedThuFriSat";
    static const char months[] = "JanFebMarAprMayJunJulAugSepOctNovDec";
    struct tm tm;
    gmtime_r(&t, &tm);
    len = (size_t)snprintf(
        text, sizeof text, "%.3s, %02d %.3s %04d %02d:%02d:%02d GMT",
        days + 3 * tm.tm_wday, tm.tm_mday, months + 3 * tm.tm_mon,
        tm.tm_year + 1900, tm.tm_hour, tm.tm_min, tm.tm_sec);
    made = t;
  }
  *n = len;
  return text;
}

static size_t put(char *to, size_t at, const char *from, size_t n) {
  memcpy(to + at, from, n);
  return at + n;
}

/* Bodies up to this size go out in the same string as the head. */
#define INLINE_BODY 32768

/* A response being made: what its arguments say and what the server
 * adds, measured before a byte is written. */
typedef struct {
  int status;
  const char *line, *body;
  size_t line_n, body_n, fields, en, total;
  int hdr_idx; /* the headers' stack index, or 0 for none */
  int head_req, http10, bodiless, chunked, close, send_body, apart;
  seen_fields seen;
  char extra[160]; /* what the server adds (plain copies: no printf here) */
} response;

/* Read the arguments from `at` on (status, line, headers, body, date,
 * head, http10, keep) and measure the response. Returns 0, or -1 with
 * the reason pushed when a header would break the framing. */
static int prepare(lua_State *L, int at, response *r) {
  r->status = (int)luaL_checkinteger(L, at);
  r->line = luaL_checklstring(L, at + 1, &r->line_n);
  r->hdr_idx = lua_isnoneornil(L, at + 2) ? 0 : at + 2;
  if (r->hdr_idx)
    luaL_checktype(L, at + 2, LUA_TTABLE);
  int has_body = !lua_isnoneornil(L, at + 3);
  r->body_n = 0;
  r->body = has_body ? luaL_checklstring(L, at + 3, &r->body_n) : NULL;
  size_t date_n;
  const char *date = lua_isnoneornil(L, at + 4)
                         ? http_date(&date_n)
                         : luaL_checklstring(L, at + 4, &date_n);
  r->head_req = lua_toboolean(L, at + 5);
  r->http10 = lua_toboolean(L, at + 6);
  r->bodiless = r->status < 200 || r->status == 204 || r->status == 304;
  r->seen = (seen_fields){0, 0, 0, 0, 0, !lua_toboolean(L, at + 7)};
  ptrdiff_t walked =
      r->hdr_idx ? walk_fields(L, r->hdr_idx, NULL, &r->seen) : 0;
  if (walked < 0)
    return -1;
  r->fields = (size_t)walked;
  r->chunked = r->seen.te && r->seen.chunked;
  r->close = r->seen.close;
  char *extra = r->extra;
  size_t en = 0;
  if (!r->seen.date) {
    if (date_n > 64)
      date_n = 64;
    en = put(extra, en, "Date: ", 6);
    en = put(extra, en, date, date_n);
    en = put(extra, en, "\r\n", 2);
  }
  if (!r->bodiless && !r->seen.len && !r->seen.te) {
    if (has_body) {
      char digits[24];
      size_t d = sizeof digits, v = r->body_n;
      do {
        digits[--d] = (char)('0' + v % 10);
        v /= 10;
      } while (v);
      en = put(extra, en, "Content-Length: ", 16);
      en = put(extra, en, digits + d, sizeof digits - d);
      en = put(extra, en, "\r\n", 2);
    } else if (!r->http10) {
      en = put(extra, en, "Transfer-Encoding: chunked\r\n", 28);
      r->chunked = 1;
    } else {
      r->close = 1; /* an HTTP/1.0 body without a length ends at the close */
    }
  }
  if (!r->seen.conn) {
    if (r->close)
      en = put(extra, en, "Connection: close\r\n", 19);
    else if (r->http10)
      en = put(extra, en, "Connection: keep-alive\r\n", 24);
  }
  r->en = en;
  r->send_body = has_body && !r->head_req && !r->bodiless;
  return 0;
}

/* Write the response measured by prepare to out (r->total bytes). */
static void emit(lua_State *L, response *r, char *out) {
  size_t at = put(out, 0, r->line, r->line_n);
  if (r->hdr_idx)
    walk_fields(L, r->hdr_idx, out + at, &r->seen);
  at += r->fields;
  at = put(out, at, r->extra, r->en);
  at = put(out, at, "\r\n", 2);
  if (r->send_body && !r->apart)
    put(out, at, r->body, r->body_n);
}

/* core.http_response(status, line, headers, body, date, head, http10,
 * keep) -> text, chunked, close, body_apart (date nil: now); or nil and
 * why, for a header name or value that would break the framing
 *
 * A response head in one string: `line` (the status line), the handler's
 * `headers` (name -> value or list of values; names checked as tokens,
 * values for CR and LF), then what the server adds unless the handler set
 * it: Date, the framing (Content-Length for a `body`, chunked when `body`
 * is nil and the request is HTTP/1.1, else the close), Connection. The
 * body follows in the same string when it is short (body_apart is true
 * when the caller must write it), and not at all for HEAD or a status
 * without one. `keep`: whether the request allows keeping the
 * connection. chunked: a streamed body must be chunk-framed; close: the
 * connection ends after. HTTPServer's streamed responses (req:start)
 * take their head from here; whole ones go through http_send. */
static int l_response(lua_State *L) {
  response r;
  if (prepare(L, 1, &r) != 0) {
    lua_pushnil(L);
    lua_insert(L, -2);
    return 2; /* nil, why */
  }
  r.apart = r.send_body && r.body_n > INLINE_BODY;
  r.total =
      r.line_n + r.fields + r.en + 2 + (r.send_body && !r.apart ? r.body_n : 0);
  /* written in the closure's scratch (kept between calls, up to 64 KiB),
   * else a userdata of its own: the GC frees either, even on an error */
  char *out;
  if (r.total <= lua_objlen(L, lua_upvalueindex(1))) {
    out = lua_touserdata(L, lua_upvalueindex(1));
  } else if (r.total <= 65536) {
    out = lua_newuserdata(L, 65536);
    lua_replace(L, lua_upvalueindex(1));
  } else {
    out = lua_newuserdata(L, r.total);
  }
  emit(L, &r, out);
  lua_pushlstring(L, out, r.total);
  lua_pushboolean(L, r.chunked && !r.bodiless && !r.head_req);
  lua_pushboolean(L, r.close);
  lua_pushboolean(L, r.apart);
  return 4;
}

/* core.http_send(stream, status, line, headers, body, date, head, http10,
 * keep) -> true, close, over | nil, err | false, why
 *
 * A whole response (as http_response makes it, body included) built
 * straight into the stream's write queue: no Lua string, one C call. This
 * is the hot path of every request HTTPServer answers. It never waits:
 * `over` says the queue is now past write_high_water (the caller waits
 * then, as write() would have). nil, err: the stream refused the write
 * (closed, buffer_full). false, why: a header would break the framing,
 * and nothing was written. */
static int l_send(lua_State *L) {
  squall_stream *s = squall_stream_check(L, 1);
  response r;
  if (prepare(L, 2, &r) != 0) {
    lua_pushboolean(L, 0);
    lua_insert(L, -2);
    return 2; /* false, why */
  }
  r.apart = 0;
  r.total = r.line_n + r.fields + r.en + 2 + (r.send_body ? r.body_n : 0);
  int nret = 0;
  char *out = squall_stream_write_reserve(L, s, r.total, &nret);
  if (out == NULL)
    return nret; /* nil, err */
  emit(L, &r, out);
  int over = 0;
  nret = squall_stream_write_commit(L, s, r.total, &over);
  if (nret != 0)
    return nret; /* nil, err */
  lua_pushboolean(L, 1);
  lua_pushboolean(L, r.close);
  lua_pushboolean(L, over);
  return 3;
}

void squall_http_response_open(lua_State *L) {
  init_tchar();
  lua_newuserdata(L, 4096); /* http_response's scratch */
  lua_pushcclosure(L, l_response, 1);
  lua_setfield(L, -2, "http_response");
  lua_pushcfunction(L, l_send);
  lua_setfield(L, -2, "http_send");
}
