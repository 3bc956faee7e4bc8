/* http.c: HTTP/1.1 message parsing for squall.httpserver, httpclient and
 * websocket, over llhttp (the parser Node.js uses; Debian's node-llhttp
 * ships its C sources and the Makefile compiles them in).
 *
 * A parser is a userdata fed from Lua strings: p:execute(data, pos) runs
 * llhttp over data from pos and stops after each whole message, so
 * pipelined requests come one at a time and the bytes after an Upgrade
 * request stay in `data` for the new protocol. The head (URL, header
 * names and values) collects in one buffer of the parser, so a head split
 * across reads costs no Lua string per piece; execute gives it to Lua in
 * one call when it is whole. While one execute runs, the head and the
 * body collect in this thread's scratch buffers, not the parser's own:
 * the usual head, whole in one read, costs no allocation, and a head left
 * unfinished when execute returns moves into the parser's own buffers
 * (spill), so an idle keep-alive connection holds none.
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
#include <time.h>

#include "http.h"
#include "host.h"
#include "stream.h"

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

/* Where a head collects: the URL (or a response's reason), then names
 * and values, and the fields' offsets into them. */
typedef struct {
  bytes b;
  field *f;
  int fcap;
} headbuf;

/* Every keep-alive connection holds one, idle or not: it is kept small
 * (32-bit sizes, since a head is at most max_head < 2 GiB; one-byte
 * flags; the own head buffer made only for a head that spans executes). */
typedef struct {
  llhttp_t p;
  headbuf *own; /* a head that spans executes (NULL otherwise) */
  headbuf *hb;  /* the scratch's or own, for the running execute */
  /* where the last piece of a value ended, and the ends of this execute's
   * input and the last one's (obs-fold detection) */
  const char *span_end, *cur_start, *prev_end;
  const char *reason;    /* what failed */
  double content_length; /* -1 when the head had none */
  uint32_t url_len;
  uint32_t max_head;
  uint32_t trailer_bytes; /* the trailer fields' size so far */
  uint16_t nhdr;
  uint16_t status; /* nonzero once failed: 400, 431... */
  uint8_t in;      /* 0: before a field, 1: in a name, 2: in a value */
  uint8_t in_head; /* a message began and its head is not whole */
  uint8_t head_ready, done, paused, no_body;
  uint8_t keep_alive, chunked, upgrade; /* from the head */
  uint8_t in_body; /* past the head: fields now are trailers */
} parser;

/* This thread's scratch, used only while one execute runs (see the top
 * of the file): a head, and the body bytes of that execute. */
static _Thread_local headbuf scratch_head;
static _Thread_local bytes scratch_body;

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

/* Room for more fields: 8, then doubling up to MAX_HEADERS. */
static int grow_fields(headbuf *hb) {
  if (hb->fcap >= MAX_HEADERS)
    return 0;
  int cap = hb->fcap ? hb->fcap * 2 : 8;
  if (cap > MAX_HEADERS)
    cap = MAX_HEADERS;
  field *f = realloc(hb->f, (size_t)cap * sizeof *f);
  if (f == NULL)
    return -1;
  hb->f = f;
  hb->fcap = cap;
  return 0;
}

/* Let a parser's own head buffers go (once its head is out, or at the
 * end): an idle keep-alive connection holds none. */
static void release_own(parser *p) {
  if (p->own == NULL)
    return;
  free(p->own->b.d);
  free(p->own->f);
  free(p->own);
  p->own = NULL;
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
  if (p->hb->b.len + n + 4 * (size_t)p->nhdr > p->max_head)
    return fail(p, 431, "the request head is larger than max_header_size");
  if (append(&p->hb->b, at, n))
    return fail(p, 500, "out of memory");
  return 0;
}

static int on_message_begin(llhttp_t *h) {
  parser *p = of(h);
  p->hb->b.len = 0;
  p->in_head = 1;
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
  p->url_len = p->hb->b.len;
  return r;
}

/* Trailer fields after a chunked body are read and dropped (as Tornado
 * does); they count against max_head all the same. */
static int trailer(parser *p, size_t n) {
  if (n > p->max_head - p->trailer_bytes)
    return fail(p, 431, "the trailer fields are larger than max_header_size");
  p->trailer_bytes += (uint32_t)n;
  return 0;
}

static int on_header_field(llhttp_t *h, const char *at, size_t n) {
  parser *p = of(h);
  if (p->in_body)
    return trailer(p, n);
  headbuf *hb = p->hb;
  if (p->in != 1) {
    if (p->nhdr == hb->fcap && grow_fields(hb))
      return fail(p, 500, "out of memory");
    if (p->nhdr == MAX_HEADERS)
      return fail(p, 431, "the request has too many header fields");
    hb->f[p->nhdr] = (field){(uint32_t)hb->b.len, 0, 0, 0};
    p->nhdr++;
    p->in = 1;
  }
  hb->f[p->nhdr - 1].nlen += (uint32_t)n;
  return head_grew(p, at, n);
}

static int on_header_value(llhttp_t *h, const char *at, size_t n) {
  parser *p = of(h);
  if (p->in_body)
    return trailer(p, n);
  if (p->nhdr == 0)
    return 0;
  field *f = &p->hb->f[p->nhdr - 1];
  if (p->in != 2) {
    f->value = (uint32_t)p->hb->b.len;
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
  f->vlen += (uint32_t)n;
  return head_grew(p, at, n);
}

static int on_header_field_complete(llhttp_t *h) {
  parser *p = of(h);
  if (!p->nhdr || p->in_body)
    return 0;
  /* llhttp takes "Name :" with the space in the name; RFC 9112 5.1 says
   * to refuse it */
  field *f = &p->hb->f[p->nhdr - 1];
  const char *name = f->nlen ? p->hb->b.d + f->name : "";
  if (memchr(name, ' ', f->nlen) || memchr(name, '\t', f->nlen))
    return fail(p, 400, "whitespace between a header name and its colon");
  /* a field with an empty value still gets its value's offset */
  f->value = (uint32_t)p->hb->b.len;
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
  p->in_head = 0;
  p->in_body = 1;
  return p->no_body ? 1 : 0;
}

static int on_body(llhttp_t *h, const char *at, size_t n) {
  if (append(&scratch_body, at, n))
    return fail(of(h), 500, "out of memory");
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

/* check_parser for execute, the hot one: its metatable is upvalue 2, so
 * no registry lookup by name. */
static parser *check_parser_fast(lua_State *L) {
  parser *p = lua_touserdata(L, 1);
  if (p == NULL || !lua_getmetatable(L, 1) ||
      !lua_rawequal(L, -1, lua_upvalueindex(2)))
    luaL_typerror(L, 1, PARSER_MT);
  lua_pop(L, 1);
  return p;
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
  const headbuf *hb = p->hb;
  const char *base = hb->b.d ? hb->b.d : "";
  lua_createtable(L, 0, p->nhdr);
  for (int i = 0; i < p->nhdr; i++) {
    size_t nlen = hb->f[i].nlen;
    const char *src = base + hb->f[i].name;
    const char *v = base + hb->f[i].value;
    size_t vlen = trimmed(v, hb->f[i].vlen);
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

/* Push the head just made whole: for a request method, target, major,
 * minor, headers, keep_alive, content_length (nil when none), chunked,
 * upgrade; for a response the status code and reason in the first two
 * places. The method names come from the table at upvalue 1, made once. */
static void push_head(lua_State *L, parser *p) {
  llhttp_t *h = &p->p;
  if (h->type == HTTP_REQUEST) {
    lua_rawgeti(L, lua_upvalueindex(1), h->method);
  } else {
    lua_pushinteger(L, h->status_code);
  }
  lua_pushlstring(L, p->url_len ? p->hb->b.d : "", p->url_len);
  lua_pushinteger(L, h->http_major);
  lua_pushinteger(L, h->http_minor);
  push_headers(L, p);
  lua_pushboolean(L, p->keep_alive);
  if (p->content_length >= 0)
    lua_pushnumber(L, p->content_length);
  else
    lua_pushnil(L);
  lua_pushboolean(L, p->chunked);
  lua_pushboolean(L, p->upgrade);
}

/* At the end of an execute that ran in the scratch: a head still coming
 * moves to the parser's own buffers, where the next execute goes on. */
static int spill(parser *p) {
  if (p->hb != &scratch_head || !p->in_head || p->status ||
      (scratch_head.b.len == 0 && p->nhdr == 0))
    return 0;
  if (p->own == NULL && (p->own = calloc(1, sizeof *p->own)) == NULL)
    return -1;
  headbuf *from = &scratch_head, *to = p->own;
  if (append(&to->b, from->b.d, from->b.len))
    return -1;
  while (to->fcap < p->nhdr)
    if (grow_fields(to))
      return -1;
  if (p->nhdr)
    memcpy(to->f, from->f, (size_t)p->nhdr * sizeof *to->f);
  /* value spans compare input pointers (obs-fold), not buffer ones */
  return 0;
}

/* p:execute(data, pos) -> nextpos, head, done, body, status, reason,
 * and after them the head's values when head is true (see push_head).
 * Parses data from pos until the end or the end of one message. head is
 * true once that message's head is whole, done once the message is
 * whole; body is the body bytes met (or nil); status and reason say why
 * the input was refused (400, 431...), and the parser refuses everything
 * after. */
static int l_execute(lua_State *L) {
  parser *p = check_parser_fast(L);
  size_t n;
  const char *data = luaL_checklstring(L, 2, &n);
  lua_Number pos = luaL_optnumber(L, 3, 1);
  if (pos < 1)
    pos = 1;
  if (pos > (lua_Number)n + 1)
    pos = (lua_Number)n + 1;
  size_t start = (size_t)pos - 1;
  scratch_body.len = 0;
  p->head_ready = p->done = 0;
  size_t used = 0;
  if (!p->status) {
    if (p->paused) {
      llhttp_resume(&p->p);
      p->paused = 0;
    }
    /* a head begun in an earlier execute goes on in the parser's own
     * buffers; anything else collects in the scratch */
    if (p->in_head && p->own != NULL) {
      p->hb = p->own;
    } else {
      p->hb = &scratch_head;
      scratch_head.b.len = 0;
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
    if (spill(p))
      fail(p, 500, "out of memory");
  }
  lua_pushnumber(L, (lua_Number)(start + used + 1));
  lua_pushboolean(L, p->head_ready);
  lua_pushboolean(L, p->done);
  if (scratch_body.len)
    lua_pushlstring(L, scratch_body.d, scratch_body.len);
  else
    lua_pushnil(L);
  int pushed = 4;
  if (p->status) {
    lua_pushinteger(L, p->status);
    lua_pushstring(L, p->reason);
    pushed = 6;
  }
  if (p->head_ready) {
    /* (a head may come whole in an execute that then fails in the body) */
    lua_settop(L, lua_gettop(L) - pushed + 6);
    push_head(L, p);
    if (p->hb == p->own)
      release_own(p);
    p->nhdr = 0;
    p->url_len = 0;
    pushed = 15;
  }
  /* a thread keeps at most 64 KiB of scratch between executes */
  if (scratch_body.cap > 65536) {
    free(scratch_body.d);
    memset(&scratch_body, 0, sizeof scratch_body);
  }
  if (scratch_head.b.cap > 65536) {
    free(scratch_head.b.d);
    memset(&scratch_head.b, 0, sizeof scratch_head.b);
  }
  return pushed;
}

/* p:finish() -> done, status, reason: the peer closed. A response whose
 * body runs until the close is whole now; anything else unfinished is
 * refused. */
static int l_finish(lua_State *L) {
  parser *p = check_parser(L);
  p->done = 0;
  p->hb = p->own != NULL ? p->own : &scratch_head;
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

/* p:expect_no_body(yes): the next response answers a HEAD request (or is
 * otherwise known to have no body), whatever its head says. */
static int l_expect_no_body(lua_State *L) {
  check_parser(L)->no_body = lua_toboolean(L, 2);
  return 0;
}

static int l_gc(lua_State *L) {
  release_own(check_parser(L));
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
  p->max_head = max > 2147483647.0 ? 2147483647u : (uint32_t)max;
  p->content_length = -1;
  p->hb = p->own != NULL ? p->own : &scratch_head;
  luaL_getmetatable(L, PARSER_MT);
  lua_setmetatable(L, -2);
  return 1;
}

/* ---- responses ---------------------------------------------------------- */

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

int squall_http_open(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"finish", l_finish},
      {"expect_no_body", l_expect_no_body},
      {NULL, NULL},
  };
  init_tchar();
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
  /* execute's upvalues: the method names by llhttp's number (pushed
   * without a strlen and a hash each request), and the metatable */
  lua_newtable(L);
#define METHOD_NAME(num, name, string)                                         \
  lua_pushliteral(L, #string);                                                 \
  lua_rawseti(L, -2, num);
  HTTP_ALL_METHOD_MAP(METHOD_NAME)
#undef METHOD_NAME
  lua_pushvalue(L, -2);
  lua_pushcclosure(L, l_execute, 2);
  lua_setfield(L, -2, "execute");
  lua_pop(L, 1);
  lua_pushcfunction(L, l_new);
  lua_setfield(L, -2, "http_parser");
  lua_newuserdata(L, 4096); /* http_response's scratch */
  lua_pushcclosure(L, l_response, 1);
  lua_setfield(L, -2, "http_response");
  lua_pushcfunction(L, l_send);
  lua_setfield(L, -2, "http_send");
  return 0;
}
