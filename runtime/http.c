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

int squall_http_open(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"finish", l_finish},
      {"expect_no_body", l_expect_no_body},
      {"__gc", l_gc},
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
  squall_http_response_open(L);
  return 0;
}
