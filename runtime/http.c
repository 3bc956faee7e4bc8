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
#include <stdlib.h>
#include <string.h>

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

/* p:needs_eof() -> true when the message's body runs until the close */
static int l_needs_eof(lua_State *L) {
  lua_pushboolean(L, llhttp_message_needs_eof(&check_parser(L)->p));
  return 1;
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

int squall_http_open(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"execute", l_execute},     {"finish", l_finish},
      {"head", l_head},           {"expect_no_body", l_expect_no_body},
      {"needs_eof", l_needs_eof}, {NULL, NULL},
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
  return 0;
}
