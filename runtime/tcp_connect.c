/* tcp_connect.c: core.connect (resolve, then each address in turn) and
 * core.connect_unix (see tcp.h). */
#include "tcp.h"

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <lauxlib.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/un.h>
#include <unistd.h>
#include <uv.h>

#include "coro.h"
#include "host.h"
#include "loop.h"
#include "stream.h"

/* Where a connect is. It moves one way: RESOLVING -> CONNECTING -> DONE,
 * or straight to DONE (a resolve that failed, the timeout, the loop
 * closing). Only finish() enters DONE, and it does so once. */
enum connect_state { RESOLVING, CONNECTING, DONE };

/* One core.connect in progress. It owns itself: `outstanding` counts what
 * libuv will still call back into it (the resolve request, the connect
 * request, the timer's close), and the last of those frees it. */
typedef struct connector {
  squall_handle h; /* first: the loop closes us through it */
  uv_getaddrinfo_t gai;
  uv_connect_t req;
  uv_timer_t timer;
  squall_loop *loop;
  squall_stream_opts opts;
  enum connect_state state;
  int outstanding;
  int co_ref; /* the connecting coroutine until DONE */
  /* This attempt's stream: each address gets a stream of its own, as
   * Tornado's connector makes one IOStream per attempt; a failed one is
   * closed like any other stream, and the one that connects is returned.
   * NULL between attempts. */
  squall_stream *s;
  struct addrinfo *res, *cur;
  struct sockaddr_storage src;
  int has_src_ip, src_port;
  int last_err;
  char host[256];
} connector;

/* One of libuv's callbacks into c has come: the last frees it. */
static void connector_unref(connector *c) {
  assert(c->outstanding > 0);
  if (--c->outstanding > 0)
    return;
  assert(c->state == DONE && c->s == NULL);
  if (c->res != NULL)
    uv_freeaddrinfo(c->res);
  free(c);
}

static void on_timer_closed(uv_handle_t *h) {
  connector_unref(h->data);
}

/* Close the attempt's stream (it is freed like any other). */
static void drop_attempt(connector *c) {
  if (c->s == NULL)
    return;
  squall_stream_abort(c->s);
  squall_stream_release(c->loop->L, c->s);
  c->s = NULL;
}

/* The one way a connect ends. Stops the timer and the resolve, then
 * resumes the coroutine with the stream (err 0 and no kind) or nil and an
 * error from `err` (a libuv error) or `kind`/`msg`. With `answer` 0 (the
 * loop is closing) the coroutine is let go without a resume. */
static void finish(connector *c, int err, const char *kind, const char *msg,
                   int answer) {
  assert(c->state != DONE);
  int was_resolving = c->state == RESOLVING;
  c->state = DONE;
  uv_close((uv_handle_t *)&c->timer, on_timer_closed);
  if (was_resolving)
    uv_cancel((uv_req_t *)&c->gai); /* on_resolved still comes */
  lua_State *L = c->loop->finalizing ? NULL : c->loop->L;
  squall_stream *s = c->s;
  c->s = NULL;
  if (L == NULL)
    return; /* the loop is being freed, with every stream */
  if (!answer) {
    luaL_unref(L, LUA_REGISTRYINDEX, c->co_ref);
    if (s != NULL)
      squall_stream_release(L, s); /* the loop closes it */
    return;
  }
  lua_State *co = squall_coro_unpark(L, c->co_ref);
  int n = 1;
  if (err == 0 && kind == NULL) {
    squall_stream_push(co, s);
    squall_stream_release(L, s);
    squall_stream_connected(s);
  } else {
    lua_pushnil(co);
    if (kind != NULL)
      squall_push_error(co, kind, msg);
    else
      squall_push_error(co, squall_uv_error_kind(err), uv_strerror(err));
    n = 2;
    if (s != NULL) {
      squall_stream_abort(s);
      squall_stream_release(L, s);
    }
  }
  squall_coro_resume(L, co, n);
  lua_pop(L, 1);
}

static void try_next_address(connector *c);

static void on_connected(uv_connect_t *req, int status) {
  connector *c = req->data;
  if (c->state == CONNECTING) {
    if (status == 0) {
      finish(c, 0, NULL, NULL, 1);
    } else {
      c->last_err = status;
      drop_attempt(c);
      c->cur = c->cur->ai_next;
      try_next_address(c);
    }
  }
  connector_unref(c); /* after: try_next_address may count a new request */
}

static int bind_source(connector *c, int family) {
  struct sockaddr_storage ss;
  memset(&ss, 0, sizeof ss);
  if (c->has_src_ip) {
    if (c->src.ss_family != family)
      return UV_EAFNOSUPPORT;
    ss = c->src;
  } else {
    ss.ss_family = (sa_family_t)family;
  }
  if (family == AF_INET)
    ((struct sockaddr_in *)&ss)->sin_port = htons((uint16_t)c->src_port);
  else
    ((struct sockaddr_in6 *)&ss)->sin6_port = htons((uint16_t)c->src_port);
  return uv_tcp_bind(squall_stream_tcp(c->s), (struct sockaddr *)&ss, 0);
}

/* Start connecting to c->cur or the first usable address after it; when
 * none is left, finish with the last error. */
static void try_next_address(connector *c) {
  assert(c->state == CONNECTING && c->s == NULL);
  for (; c->cur != NULL; c->cur = c->cur->ai_next) {
    int family = c->cur->ai_family;
    if (family != AF_INET && family != AF_INET6)
      continue;
    if (c->has_src_ip && c->src.ss_family != family)
      continue;
    lua_State *L = c->loop->L;
    c->s = squall_stream_new(L, c->loop, &c->opts);
    squall_stream_hold(L, c->s, -1);
    lua_pop(L, 1);
    int err = squall_stream_init_tcp(c->s);
    if (err == 0 && (c->has_src_ip || c->src_port))
      err = bind_source(c, family);
    if (err == 0)
      err = uv_tcp_connect(&c->req, squall_stream_tcp(c->s), c->cur->ai_addr,
                           on_connected);
    if (err == 0) {
      c->outstanding++;
      return;
    }
    c->last_err = err;
    drop_attempt(c);
  }
  finish(c, c->last_err ? c->last_err : UV_EADDRNOTAVAIL, NULL, NULL, 1);
}

static void on_resolved(uv_getaddrinfo_t *req, int status,
                        struct addrinfo *res) {
  connector *c = req->data;
  c->res = res;
  if (c->state == RESOLVING) {
    if (status < 0) {
      char msg[300];
      snprintf(msg, sizeof msg, "%s: %s", c->host, uv_strerror(status));
      finish(c, 0, "resolve", msg, 1);
    } else {
      c->state = CONNECTING;
      c->cur = res;
      try_next_address(c);
    }
  }
  connector_unref(c);
}

static void on_connect_timeout(uv_timer_t *t) {
  connector *c = t->data;
  char msg[300];
  snprintf(msg, sizeof msg, "timed out connecting to %s", c->host);
  finish(c, 0, "timeout", msg, 1);
}

static void close_connector_for_loop(squall_handle *h) {
  connector *c = (connector *)h;
  if (c->state != DONE)
    finish(c, UV_ECANCELED, NULL, NULL, 0);
}

/* core.connect_unix(loop, path, opts) -> stream | nil, err. A local
 * unix-domain stream socket connects at once or fails at once (no
 * resolver, no network), so this does not wait. libuv's TCP handle
 * drives any stream socket, so the stream is the same kind as a TCP one
 * (getpeername has no host and port to give). */
static int l_connect_unix(lua_State *L) {
  squall_loop *loop = squall_loop_check(L, 1);
  size_t len;
  const char *path = luaL_checklstring(L, 2, &len);
  squall_stream_opts opts;
  squall_stream_opts_read(L, 3, &opts);
  struct sockaddr_un sun;
  memset(&sun, 0, sizeof sun);
  sun.sun_family = AF_UNIX;
  luaL_argcheck(L, len > 0 && len < sizeof sun.sun_path, 2,
                "the socket path is empty or too long");
  memcpy(sun.sun_path, path, len);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return squall_push_uv_error(L, uv_translate_sys_error(errno));
  if (connect(fd, (struct sockaddr *)&sun, sizeof sun) != 0) {
    int e = errno;
    close(fd);
    return squall_push_uv_error(L, uv_translate_sys_error(e));
  }
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  squall_stream *st = squall_stream_new(L, loop, &opts);
  int err = squall_stream_open_fd(st, fd);
  if (err != 0)
    return squall_push_uv_error(L, err);
  return 1;
}

/* core.connect(loop, host, port, opts) -> stream | nil, err  (waits)
 * opts: timeout, source_ip, source_port and the stream sizes. */
static int l_connect(lua_State *L) {
  squall_loop *loop = squall_loop_check(L, 1);
  const char *host = luaL_checkstring(L, 2);
  lua_Integer port = luaL_checkinteger(L, 3);
  luaL_argcheck(L, port > 0 && port <= 65535, 3, "port out of range");
  squall_stream_opts opts;
  squall_stream_opts_read(L, 4, &opts);
  double timeout = 0;
  const char *src_ip = NULL;
  lua_Integer src_port = 0;
  if (!lua_isnoneornil(L, 4)) {
    lua_getfield(L, 4, "timeout");
    timeout = luaL_optnumber(L, -1, 0);
    lua_getfield(L, 4, "source_ip");
    src_ip = luaL_optstring(L, -1, NULL);
    lua_getfield(L, 4, "source_port");
    src_port = luaL_optinteger(L, -1, 0);
    lua_pop(L, 3);
    luaL_argcheck(L, timeout >= 0, 4, "timeout must not be negative");
    luaL_argcheck(L, src_port >= 0 && src_port <= 65535, 4,
                  "source_port out of range");
  }
  struct sockaddr_storage src;
  memset(&src, 0, sizeof src);
  if (src_ip != NULL &&
      uv_ip4_addr(src_ip, 0, (struct sockaddr_in *)&src) != 0 &&
      uv_ip6_addr(src_ip, 0, (struct sockaddr_in6 *)&src) != 0)
    return luaL_error(L, "source_ip %s is not an IP address", src_ip);
  squall_coro_check(L, "connect");

  connector *c = calloc(1, sizeof *c);
  if (c == NULL)
    return luaL_error(L, "out of memory");
  c->h.close = close_connector_for_loop;
  c->loop = loop;
  c->opts = opts;
  c->state = RESOLVING;
  c->co_ref = LUA_NOREF;
  c->src = src;
  c->has_src_ip = src_ip != NULL;
  c->src_port = (int)src_port;
  snprintf(c->host, sizeof c->host, "%s", host);
  c->gai.data = c->req.data = c->timer.data = c;
  uv_timer_init(&loop->uv, &c->timer);
  c->outstanding = 1; /* the timer, until its close callback */

  char service[8];
  snprintf(service, sizeof service, "%d", (int)port);
  struct addrinfo hints;
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  int err =
      uv_getaddrinfo(&loop->uv, &c->gai, on_resolved, host, service, &hints);
  if (err != 0) {
    /* nobody is parked yet: no finish, just the timer to close */
    c->state = DONE;
    uv_close((uv_handle_t *)&c->timer, on_timer_closed);
    return squall_push_uv_error(L, err);
  }
  c->outstanding++;
  c->co_ref = squall_coro_park(L, "connect");
  if (timeout > 0)
    uv_timer_start(&c->timer, on_connect_timeout, squall_timeout_ms(timeout),
                   0);
  return lua_yield(L, 0);
}

void squall_tcp_connect_open(lua_State *L) {
  lua_pushcfunction(L, l_connect);
  lua_setfield(L, -2, "connect");
  lua_pushcfunction(L, l_connect_unix);
  lua_setfield(L, -2, "connect_unix");
}
