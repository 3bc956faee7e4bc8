/* http.c: HTTP/1.1 message parsing for squall.httpserver, httpclient and
 * websocket, over llhttp (the parser Node.js uses; Debian's node-llhttp
 * ships its C sources and the Makefile compiles them in).
 *
 * A parser is a userdata fed from Lua strings: p:execute(data, pos) runs
 * llhttp over data from pos and stops after each whole message, so
 * pipelined requests come one at a time and the bytes after an Upgrade
 * request stay in `data` for the new protocol. The head (URL, header
 * names and values) collects in one buffer of the parser, so a head split
 * across reads costs no Lua string per piece; p:head() then gives it to
 * Lua in one call. Body bytes collect per execute in a second buffer.
 *
 * llhttp is strict by default (no lenient flags are set). What it lets
 * through and RFC 9112 forbids where request smuggling lives, this file
 * refuses itself: an obs-folded header line and whitespace before a
 * header's colon. (llhttp refuses Content-Length with Transfer-Encoding,
 * a second Content-Length, a Transfer-Encoding not ending in chunked, a
 * bare CR or LF and a bad chunk size.)
 */
#include <lauxlib.h>
#include <llhttp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "http.h"
#include "host.h"

#define PARSER_MT "squall.http_parser"
/* More header fields than this answer 431, whatever their size. */
#define MAX_HEADERS 256

typedef struct {
  char *d;
  size_t len, cap;
} bytes;

/* A header field: offsets into the head buffer (32-bit: a head is at
 * most max_head bytes, far below 4 GiB). */
typedef struct {
  uint32_t name, nlen, value, vlen;
} field;

typedef struct {
  llhttp_t p;
  bytes head; /* the URL (or a response's reason), then names and values */
  bytes body; /* body bytes of the current execute */
  field *hdr; /* the head's fields, grown as they come */
  int hdr_cap;
  int nhdr;
  int in; /* 0: before a field, 1: in a name, 2: in a value */
  /* where the last piece of a value ended, and the ends of this execute's
   * input and the last one's (obs-fold detection) */
  const char *span_end, *cur_start, *prev_end;
  size_t url_len;
  size_t max_head;
  double content_length; /* -1 when the head had none */
  int head_ready, done, paused, no_body;
  int keep_alive, chunked, upgrade; /* from the head */
  int in_body;                      /* past the head: fields now are trailers */
  size_t trailer_bytes;             /* their size so far */
  int status;                       /* nonzero once failed: 400, 431... */
  const char *reason;               /* what failed */
} parser;

static int grow(bytes *b, size_t more) {
  if (b->len + more <= b->cap)
    return 0;
  size_t cap = b->cap ? b->cap : 256;
  while (cap < b->len + more)
    cap *= 2;
  char *d = realloc(b->d, cap);
  if (!d)
    return -1;
  b->d = d;
  b->cap = cap;
  return 0;
}

/* Room for more fields: 8, then doubling up to MAX_HEADERS (a parser's
 * fixed size stays small: idle keep-alive connections each hold one). */
static int grow_fields(parser *p) {
  if (p->hdr_cap >= MAX_HEADERS)
    return 0;
  int cap = p->hdr_cap ? p->hdr_cap * 2 : 8;
  if (cap > MAX_HEADERS)
    cap = MAX_HEADERS;
  field *f = realloc(p->hdr, (size_t)cap * sizeof *f);
  if (f == NULL)
    return -1;
  p->hdr = f;
  p->hdr_cap = cap;
  return 0;
}

/* Free a buffer once its bytes are out (after each head and each body
 * piece): an idle keep-alive connection holds no buffer, at the cost of
 * a malloc per request. */
static void release(bytes *b) {
  free(b->d);
  b->d = NULL;
  b->cap = b->len = 0;
}

static int append(bytes *b, const char *at, size_t n) {
  if (n == 0)
    return 0;
  if (grow(b, n))
    return -1;
  memcpy(b->d + b->len, at, n);
  b->len += n;
  return 0;
}

static parser *of(llhttp_t *h) {
  return (parser *)h;
}

/* A failure of ours from a callback: llhttp stops with HPE_USER and
 * execute reports `status` and `reason`. */
static int fail(parser *p, int status, const char *reason) {
  p->status = status;
  p->reason = reason;
  return HPE_USER;
}

/* The head grew by n: refuse it past max_head (431). Each field counts
 * its ": " and CRLF, as it came on the wire. */
static int head_grew(parser *p, const char *at, size_t n) {
  if (p->head.len + n + 4 * (size_t)p->nhdr > p->max_head)
    return fail(p, 431, "the request head is larger than max_header_size");
  if (append(&p->head, at, n))
    return fail(p, 500, "out of memory");
  return 0;
}

static int on_message_begin(llhttp_t *h) {
  parser *p = of(h);
  p->head.len = 0;
  p->nhdr = 0;
  p->in = 0;
  p->url_len = 0;
  p->content_length = -1;
  p->in_body = 0;
  p->trailer_bytes = 0;
  return 0;
}

static int on_url(llhttp_t *h, const char *at, size_t n) {
  parser *p = of(h);
  int r = head_grew(p, at, n);
  p->url_len = p->head.len;
  return r;
}

/* Trailer fields after a chunked body are read and dropped (as Tornado
 * does); they count against max_head all the same. */
static int trailer(parser *p, size_t n) {
  p->trailer_bytes += n;
  if (p->trailer_bytes > p->max_head)
    return fail(p, 431, "the trailer fields are larger than max_header_size");
  return 0;
}

static int on_header_field(llhttp_t *h, const char *at, size_t n) {
  parser *p = of(h);
  if (p->in_body)
    return trailer(p, n);
  if (p->in != 1) {
    if (p->nhdr == p->hdr_cap && grow_fields(p))
      return fail(p, 500, "out of memory");
    if (p->nhdr == MAX_HEADERS)
      return fail(p, 431, "the request has too many header fields");
    p->hdr[p->nhdr].name = p->head.len;
    p->hdr[p->nhdr].nlen = 0;
    p->hdr[p->nhdr].value = 0;
    p->hdr[p->nhdr].vlen = 0;
    p->nhdr++;
    p->in = 1;
  }
  p->hdr[p->nhdr - 1].nlen += n;
  return head_grew(p, at, n);
}

static int on_header_value(llhttp_t *h, const char *at, size_t n) {
  parser *p = of(h);
  if (p->in_body)
    return trailer(p, n);
  if (p->nhdr == 0)
    return 0;
  if (p->in != 2) {
    p->hdr[p->nhdr - 1].value = p->head.len;
    p->in = 2;
  } else if (at != p->span_end &&
             !(p->span_end == p->prev_end && at == p->cur_start)) {
    /* llhttp joins an obs-folded line to the value it continues; a value
     * that goes on elsewhere than where its last piece ended (or at the
     * start of the next read, when that piece ended the last one) was
     * folded */
    return fail(p, 400, "a header line is folded (obs-fold)");
  }
  p->span_end = at + n;
  p->hdr[p->nhdr - 1].vlen += n;
  return head_grew(p, at, n);
}

static int on_header_field_complete(llhttp_t *h) {
  parser *p = of(h);
  if (!p->nhdr || p->in_body)
    return 0;
  /* llhttp takes "Name :" with the space in the name; RFC 9112 5.1 says
   * to refuse it */
  size_t nlen = p->hdr[p->nhdr - 1].nlen;
  const char *name = nlen ? p->head.d + p->hdr[p->nhdr - 1].name : "";
  if (memchr(name, ' ', nlen) || memchr(name, '\t', nlen))
    return fail(p, 400, "whitespace between a header name and its colon");
  /* a field with an empty value still gets its value's offset */
  p->hdr[p->nhdr - 1].value = p->head.len;
  return 0;
}

static int on_header_value_complete(llhttp_t *h) {
  of(h)->in = 0;
  return 0;
}

static int on_headers_complete(llhttp_t *h) {
  parser *p = of(h);
  if (h->flags & F_CONTENT_LENGTH)
    p->content_length = (double)h->content_length;
  /* what the head says, kept now: llhttp resets its flags at the
   * message's end, which may come in the same execute */
  p->keep_alive = llhttp_should_keep_alive(h);
  p->chunked = (h->flags & F_CHUNKED) != 0;
  p->upgrade = h->upgrade;
  p->head_ready = 1;
  p->in_body = 1;
  return p->no_body ? 1 : 0;
}

static int on_body(llhttp_t *h, const char *at, size_t n) {
  parser *p = of(h);
  if (append(&p->body, at, n))
    return fail(p, 500, "out of memory");
  return 0;
}

static int on_message_complete(llhttp_t *h) {
  of(h)->done = 1;
  return HPE_PAUSED;
}

static llhttp_settings_t settings;

static parser *check_parser(lua_State *L) {
  return luaL_checkudata(L, 1, PARSER_MT);
}

/* The status an llhttp error answers: 400 for everything a client sent
 * wrong (ours carry their own). */
static void failed(parser *p, llhttp_errno_t err) {
  if (p->status)
    return; /* fail() said why */
  p->status = 400;
  p->reason = llhttp_get_error_reason(&p->p);
  if (!p->reason || !*p->reason)
    p->reason = llhttp_errno_name(err);
}

/* p:execute(data, pos) -> nextpos, head, done, body, status, reason.
 * Parses data from pos until the end or the end of one message. head is
 * true once that message's head is whole (read it with p:head()), done
 * once the message is whole; body is the body bytes met (or nil); status
 * and reason say why the input was refused (400, 431...), and the parser
 * refuses everything after. */
static int l_execute(lua_State *L) {
  parser *p = check_parser(L);
  size_t n;
  const char *data = luaL_checklstring(L, 2, &n);
  lua_Number pos = luaL_optnumber(L, 3, 1);
  if (pos < 1)
    pos = 1;
  if (pos > (lua_Number)n + 1)
    pos = (lua_Number)n + 1;
  size_t start = (size_t)pos - 1;
  p->body.len = 0;
  p->head_ready = p->done = 0;
  size_t used = 0;
  if (!p->status) {
    if (p->paused) {
      llhttp_resume(&p->p);
      p->paused = 0;
    }
    p->cur_start = data + start;
    llhttp_errno_t err = llhttp_execute(&p->p, data + start, n - start);
    p->prev_end = data + n;
    if (err == HPE_OK) {
      used = n - start;
    } else {
      used = (size_t)(llhttp_get_error_pos(&p->p) - (data + start));
      if (err == HPE_PAUSED)
        p->paused = 1;
      else
        failed(p, err);
    }
  }
  lua_pushnumber(L, (lua_Number)(start + used + 1));
  lua_pushboolean(L, p->head_ready);
  lua_pushboolean(L, p->done);
  if (p->body.len)
    lua_pushlstring(L, p->body.d, p->body.len);
  else
    lua_pushnil(L);
  if (p->body.cap)
    release(&p->body);
  if (p->status) {
    lua_pushinteger(L, p->status);
    lua_pushstring(L, p->reason);
    return 6;
  }
  return 4;
}

/* p:finish() -> done, status, reason: the peer closed. A response whose
 * body runs until the close is whole now; anything else unfinished is
 * refused. */
static int l_finish(lua_State *L) {
  parser *p = check_parser(L);
  p->done = 0;
  /* paused at a message's end: the close comes between messages */
  if (!p->status && !p->paused) {
    llhttp_errno_t err = llhttp_finish(&p->p);
    if (err == HPE_PAUSED)
      p->paused = 1;
    else if (err != HPE_OK)
      failed(p, err);
  }
  lua_pushboolean(L, p->done);
  if (p->status) {
    lua_pushinteger(L, p->status);
    lua_pushstring(L, p->reason);
    return 3;
  }
  return 1;
}

/* Trim the optional whitespace llhttp leaves at a value's end. */
static size_t trimmed(const char *v, size_t n) {
  while (n && (v[n - 1] == ' ' || v[n - 1] == '\t'))
    n--;
  return n;
}

/* The header table: lower-case names; a name that came twice gets its
 * values joined with ", " (RFC 9110 5.3). */
static void push_headers(lua_State *L, parser *p) {
  char name[256];
  const char *base = p->head.d ? p->head.d : "";
  lua_createtable(L, 0, p->nhdr);
  for (int i = 0; i < p->nhdr; i++) {
    size_t nlen = p->hdr[i].nlen;
    const char *src = base + p->hdr[i].name;
    const char *v = base + p->hdr[i].value;
    size_t vlen = trimmed(v, p->hdr[i].vlen);
    if (nlen < sizeof name) {
      for (size_t k = 0; k < nlen; k++) {
        char c = src[k];
        name[k] = (c >= 'A' && c <= 'Z') ? (char)(c + 32) : c;
      }
      lua_pushlstring(L, name, nlen);
    } else {
      luaL_Buffer b;
      luaL_buffinit(L, &b);
      for (size_t k = 0; k < nlen; k++) {
        char c = src[k];
        luaL_addchar(&b, (c >= 'A' && c <= 'Z') ? (char)(c + 32) : c);
      }
      luaL_pushresult(&b);
    }
    lua_pushvalue(L, -1);
    lua_rawget(L, -3);
    if (lua_isnil(L, -1)) {
      lua_pop(L, 1);
      lua_pushlstring(L, v, vlen);
    } else {
      lua_pushliteral(L, ", ");
      lua_pushlstring(L, v, vlen);
      lua_concat(L, 3);
    }
    lua_rawset(L, -3);
  }
}

/* p:head() -> for a request: method, target, major, minor, headers,
 * keep_alive, content_length (nil when none), chunked, upgrade; for a
 * response: status, reason, major, minor, headers, keep_alive,
 * content_length, chunked, upgrade. Once per message: the head's bytes
 * are let go. */
static int l_head(lua_State *L) {
  parser *p = check_parser(L);
  llhttp_t *h = &p->p;
  if (h->type == HTTP_REQUEST) {
    lua_pushstring(L, llhttp_method_name((llhttp_method_t)h->method));
  } else {
    lua_pushinteger(L, h->status_code);
  }
  lua_pushlstring(L, p->url_len ? p->head.d : "", p->url_len);
  lua_pushinteger(L, h->http_major);
  lua_pushinteger(L, h->http_minor);
  push_headers(L, p);
  /* a head is read once: its buffer may go now */
  p->nhdr = 0;
  p->url_len = 0;
  release(&p->head);
  free(p->hdr);
  p->hdr = NULL;
  p->hdr_cap = 0;
  lua_pushboolean(L, p->keep_alive);
  if (p->content_length >= 0)
    lua_pushnumber(L, p->content_length);
  else
    lua_pushnil(L);
  lua_pushboolean(L, p->chunked);
  lua_pushboolean(L, p->upgrade);
  return 9;
}

/* p:expect_no_body(yes): the next response answers a HEAD request (or is
 * otherwise known to have no body), whatever its head says. */
static int l_expect_no_body(lua_State *L) {
  check_parser(L)->no_body = lua_toboolean(L, 2);
  return 0;
}

static int l_gc(lua_State *L) {
  parser *p = check_parser(L);
  free(p->head.d);
  free(p->body.d);
  free(p->hdr);
  p->hdr = NULL;
  p->hdr_cap = 0;
  p->head.d = p->body.d = NULL;
  p->head.cap = p->body.cap = 0;
  return 0;
}

/* core.http_parser(kind, max_head) -> a parser for "request" or
 * "response" messages whose heads are at most max_head bytes */
static int l_new(lua_State *L) {
  static const char *const kinds[] = {"request", "response", NULL};
  int kind = luaL_checkoption(L, 1, NULL, kinds);
  lua_Number max = luaL_optnumber(L, 2, 65536);
  luaL_argcheck(L, max >= 1, 2, "max_head must be positive");
  parser *p = lua_newuserdata(L, sizeof *p);
  memset(p, 0, sizeof *p);
  llhttp_init(&p->p, kind == 0 ? HTTP_REQUEST : HTTP_RESPONSE, &settings);
  /* field offsets are 32-bit */
  p->max_head = max > 2147483647.0 ? 2147483647 : (size_t)max;
  p->content_length = -1;
  luaL_getmetatable(L, PARSER_MT);
  lua_setmetatable(L, -2);
  return 1;
}

/* ---- responses ---------------------------------------------------------- */

/* tchar (RFC 9110 5.6.2): what a header name may hold. */
static int token_char(unsigned char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
         (c >= '0' && c <= '9') || (c && strchr("!#$%&'*+-.^_`|~", c));
}

static int same_name(const char *k, size_t n, const char *lower) {
  return strlen(lower) == n && strncasecmp(k, lower, n) == 0;
}

/* The value at idx as a header value (a string or a number), checked
 * for CR and LF, which would end the field early. */
static const char *field_value(lua_State *L, int idx, const char *k,
                               size_t *vn) {
  if (lua_type(L, idx) != LUA_TSTRING && lua_type(L, idx) != LUA_TNUMBER)
    luaL_error(L, "header %s: a value must be a string or a number", k);
  const char *v = lua_tolstring(L, idx, vn);
  if (memchr(v, '\r', *vn) || memchr(v, '\n', *vn))
    luaL_error(L, "header %s holds CR or LF", k);
  return v;
}

/* Walk the header table at index 3: with out == NULL, check it and add up
 * the bytes its fields take (and note the fields the server would add);
 * else write them to out. Returns the bytes. */
typedef struct {
  int len, te, date, conn, chunked, close;
} seen_fields;

static size_t walk_fields(lua_State *L, char *out, seen_fields *seen) {
  size_t total = 0;
  lua_pushnil(L);
  while (lua_next(L, 3) != 0) {
    if (lua_type(L, -2) != LUA_TSTRING)
      luaL_error(L, "bad header name (a %s)", luaL_typename(L, -2));
    size_t kn;
    const char *k = lua_tolstring(L, -2, &kn);
    if (out == NULL) {
      if (kn == 0)
        luaL_error(L, "bad header name (empty)");
      for (size_t i = 0; i < kn; i++)
        if (!token_char((unsigned char)k[i]))
          luaL_error(L, "bad header name %s", k);
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
      const char *v = field_value(L, at, k, &vn);
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
  return total;
}

static size_t put(char *to, size_t at, const char *from, size_t n) {
  memcpy(to + at, from, n);
  return at + n;
}

/* Bodies up to this size go out in the same string as the head. */
#define INLINE_BODY 32768

/* core.http_response(status, line, headers, body, date, head, http10,
 * keep) -> text, chunked, close, body_apart
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
 * connection ends after. One C call and one string per response: this is
 * the hot path of every request HTTPServer answers. */
static int l_response(lua_State *L) {
  int status = (int)luaL_checkinteger(L, 1);
  size_t line_n;
  const char *line = luaL_checklstring(L, 2, &line_n);
  int has_headers = !lua_isnoneornil(L, 3);
  if (has_headers)
    luaL_checktype(L, 3, LUA_TTABLE);
  int has_body = !lua_isnoneornil(L, 4);
  size_t body_n = 0;
  const char *body = has_body ? luaL_checklstring(L, 4, &body_n) : NULL;
  size_t date_n;
  const char *date = luaL_checklstring(L, 5, &date_n);
  int head_req = lua_toboolean(L, 6), http10 = lua_toboolean(L, 7);
  int bodiless = status < 200 || status == 204 || status == 304;
  seen_fields seen = {0, 0, 0, 0, 0, !lua_toboolean(L, 8)};
  size_t fields = has_headers ? walk_fields(L, NULL, &seen) : 0;
  int chunked = seen.te && seen.chunked, close = seen.close;
  char extra[160]; /* what the server adds (plain copies: no printf here) */
  size_t en = 0;
  if (!seen.date) {
    if (date_n > 64)
      date_n = 64;
    en = put(extra, en, "Date: ", 6);
    en = put(extra, en, date, date_n);
    en = put(extra, en, "\r\n", 2);
  }
  if (!bodiless && !seen.len && !seen.te) {
    if (has_body) {
      char digits[24];
      size_t d = sizeof digits, v = body_n;
      do {
        digits[--d] = (char)('0' + v % 10);
        v /= 10;
      } while (v);
      en = put(extra, en, "Content-Length: ", 16);
      en = put(extra, en, digits + d, sizeof digits - d);
      en = put(extra, en, "\r\n", 2);
    } else if (!http10) {
      en = put(extra, en, "Transfer-Encoding: chunked\r\n", 28);
      chunked = 1;
    } else {
      close = 1; /* an HTTP/1.0 body without a length ends at the close */
    }
  }
  if (!seen.conn) {
    if (close)
      en = put(extra, en, "Connection: close\r\n", 19);
    else if (http10)
      en = put(extra, en, "Connection: keep-alive\r\n", 24);
  }
  int send_body = has_body && !head_req && !bodiless;
  int apart = send_body && body_n > INLINE_BODY;
  size_t total = line_n + fields + en + 2 + (send_body && !apart ? body_n : 0);
  /* written in the closure's scratch (kept between calls, up to 64 KiB),
   * else a userdata of its own: the GC frees either, even on an error */
  char *out;
  if (total <= lua_objlen(L, lua_upvalueindex(1))) {
    out = lua_touserdata(L, lua_upvalueindex(1));
  } else if (total <= 65536) {
    out = lua_newuserdata(L, 65536);
    lua_replace(L, lua_upvalueindex(1));
  } else {
    out = lua_newuserdata(L, total);
  }
  memcpy(out, line, line_n);
  if (has_headers)
    walk_fields(L, out + line_n, &seen);
  memcpy(out + line_n + fields, extra, en);
  memcpy(out + line_n + fields + en, "\r\n", 2);
  if (send_body && !apart)
    memcpy(out + line_n + fields + en + 2, body, body_n);
  lua_pushlstring(L, out, total);
  lua_pushboolean(L, chunked && !bodiless && !head_req);
  lua_pushboolean(L, close);
  lua_pushboolean(L, apart);
  return 4;
}

int squall_http_open(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"execute", l_execute}, {"finish", l_finish},
      {"head", l_head},       {"expect_no_body", l_expect_no_body},
      {NULL, NULL},
  };
  llhttp_settings_init(&settings);
  settings.on_message_begin = on_message_begin;
  settings.on_url = on_url;
  settings.on_status = on_url; /* a response's reason takes the URL's place */
  settings.on_header_field = on_header_field;
  settings.on_header_value = on_header_value;
  settings.on_header_field_complete = on_header_field_complete;
  settings.on_header_value_complete = on_header_value_complete;
  settings.on_headers_complete = on_headers_complete;
  settings.on_body = on_body;
  settings.on_message_complete = on_message_complete;
  squall_new_metatable(L, PARSER_MT, methods);
  luaL_getmetatable(L, PARSER_MT);
  lua_pushcfunction(L, l_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  lua_pushcfunction(L, l_new);
  lua_setfield(L, -2, "http_parser");
  lua_newuserdata(L, 4096); /* http_response's scratch */
  lua_pushcclosure(L, l_response, 1);
  lua_setfield(L, -2, "http_response");
  return 0;
}
