/* tcp.c: bind_sockets, the listening socket, accepting and connecting. */
#include "tcp.h"

#include <arpa/inet.h>
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

#define SOCKET_MT "squall.socket"
#define ACCEPTOR_MT "squall.acceptor"

struct acceptor;

/* A listening socket: owned by its userdata. While an acceptor watches it,
 * `acc` points there, and closing the socket stops the acceptor first. */
typedef struct {
  int fd;
  int family;
  int backlog;
  struct acceptor *acc;
} listen_socket;

static void acceptor_stop(struct acceptor *a);

static int push_errno_error(lua_State *L, int err) {
  return squall_push_uv_error(L, uv_translate_sys_error(err));
}

static int open_listener(const struct addrinfo *ai, int port, int reuse_port,
                         int backlog, int *out_fd) {
  int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
                  ai->ai_protocol);
  if (fd < 0)
    return errno;
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (reuse_port &&
      setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0)
    goto fail;
  struct sockaddr_storage addr;
  memcpy(&addr, ai->ai_addr, ai->ai_addrlen);
  if (ai->ai_family == AF_INET6) {
    /* Each family gets its own socket, as Tornado does. */
    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    ((struct sockaddr_in6 *)&addr)->sin6_port = htons((uint16_t)port);
  } else {
    ((struct sockaddr_in *)&addr)->sin_port = htons((uint16_t)port);
  }
  if (bind(fd, (struct sockaddr *)&addr, ai->ai_addrlen) != 0)
    goto fail;
  if (listen(fd, backlog) != 0)
    goto fail;
  *out_fd = fd;
  return 0;
fail:;
  int err = errno;
  close(fd);
  return err;
}

static int bound_port(int fd) {
  struct sockaddr_storage ss;
  socklen_t len = sizeof ss;
  if (getsockname(fd, (struct sockaddr *)&ss, &len) != 0)
    return 0;
  if (ss.ss_family == AF_INET6)
    return ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
  return ntohs(((struct sockaddr_in *)&ss)->sin_port);
}

/* core.bind_sockets(port, address|nil, family, backlog, reuse_port)
 *   -> {socket, ...} | nil, err
 * family: 0 (any), 4 or 6. */
static int l_bind_sockets(lua_State *L) {
  lua_Integer port = luaL_checkinteger(L, 1);
  const char *address = luaL_optstring(L, 2, NULL);
  lua_Integer family = luaL_optinteger(L, 3, 0);
  int backlog = (int)luaL_optinteger(L, 4, 128);
  int reuse_port = lua_toboolean(L, 5);
  luaL_argcheck(L, port >= 0 && port <= 65535, 1, "port out of range");
  luaL_argcheck(L, family == 0 || family == 4 || family == 6, 3,
                "family must be 4, 6 or nil");
  if (address != NULL && address[0] == '\0')
    address = NULL;

  struct addrinfo hints, *res = NULL;
  memset(&hints, 0, sizeof hints);
  hints.ai_family = family == 4 ? AF_INET : family == 6 ? AF_INET6 : AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_ADDRCONFIG | AI_NUMERICSERV;
  /* getaddrinfo needs a node or a service; the port is set per socket. */
  int gai = getaddrinfo(address, "0", &hints, &res);
  if (gai == EAI_NONAME || gai == EAI_ADDRFAMILY) {
    /* loopback-only hosts have no address ADDRCONFIG counts */
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    gai = getaddrinfo(address, "0", &hints, &res);
  }
  if (gai != 0) {
    char msg[300];
    snprintf(msg, sizeof msg, "%s: %s", address ? address : "*",
             gai_strerror(gai));
    lua_pushnil(L);
    squall_push_error(L, "resolve", msg);
    return 2;
  }

  lua_newtable(L);
  int n = 0, err = 0;
  int bind_port = (int)port;
  for (struct addrinfo *ai = res; ai != NULL; ai = ai->ai_next) {
    /* getaddrinfo may list one address several times; bind it once. */
    int dup = 0;
    for (struct addrinfo *p = res; p != ai; p = p->ai_next)
      if (p->ai_addrlen == ai->ai_addrlen &&
          memcmp(p->ai_addr, ai->ai_addr, ai->ai_addrlen) == 0)
        dup = 1;
    if (dup)
      continue;
    int fd = -1;
    err = open_listener(ai, bind_port, reuse_port, backlog, &fd);
    if (err == EAFNOSUPPORT || (err == EADDRNOTAVAIL &&
                                ai->ai_family == AF_INET6 && address == NULL)) {
      err = 0; /* no IPv6 on this host: serve the other family */
      continue;
    }
    if (err != 0)
      break;
    /* Port 0 picks a free port for the first socket; the others share it. */
    if (bind_port == 0)
      bind_port = bound_port(fd);
    listen_socket *s = lua_newuserdata(L, sizeof *s);
    s->fd = fd;
    s->family = ai->ai_family;
    s->backlog = backlog > 0 ? backlog : 128;
    s->acc = NULL;
    luaL_getmetatable(L, SOCKET_MT);
    lua_setmetatable(L, -2);
    lua_rawseti(L, -2, ++n);
  }
  freeaddrinfo(res);
  if (err != 0) {
    for (int i = 1; i <= n; i++) {
      lua_rawgeti(L, -1, i);
      listen_socket *s = lua_touserdata(L, -1);
      close(s->fd);
      s->fd = -1;
      lua_pop(L, 1);
    }
    return push_errno_error(L, err);
  }
  return 1;
}

/* core.adopt_socket(fd) -> a listening socket for an fd another process
 * opened and handed over (systemd socket activation). Raises unless it is
 * a listening stream socket; it becomes close-on-exec and non-blocking,
 * as bind_sockets' are. */
static int l_adopt_socket(lua_State *L) {
  int fd = (int)luaL_checkinteger(L, 1);
  int type = 0, listening = 0;
  socklen_t len = sizeof type;
  struct sockaddr_storage ss;
  socklen_t slen = sizeof ss;
  if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0 ||
      type != SOCK_STREAM)
    return luaL_error(L, "fd %d is not a stream socket", fd);
  len = sizeof listening;
  if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) != 0 ||
      !listening)
    return luaL_error(L, "fd %d is not listening", fd);
  if (getsockname(fd, (struct sockaddr *)&ss, &slen) != 0)
    return push_errno_error(L, errno);
  fcntl(fd, F_SETFD, FD_CLOEXEC);
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  listen_socket *s = lua_newuserdata(L, sizeof *s);
  s->fd = fd;
  s->family = ss.ss_family;
  s->backlog = 128;
  s->acc = NULL;
  luaL_getmetatable(L, SOCKET_MT);
  lua_setmetatable(L, -2);
  return 1;
}

static listen_socket *check_socket(lua_State *L) {
  listen_socket *s = luaL_checkudata(L, 1, SOCKET_MT);
  if (s->fd < 0)
    luaL_error(L, "socket is closed");
  return s;
}

static int l_socket_fileno(lua_State *L) {
  lua_pushinteger(L, check_socket(L)->fd);
  return 1;
}

/* socket:getsockname() -> host, port */
static int l_socket_getsockname(lua_State *L) {
  listen_socket *s = check_socket(L);
  struct sockaddr_storage ss;
  socklen_t len = sizeof ss;
  if (getsockname(s->fd, (struct sockaddr *)&ss, &len) != 0)
    return push_errno_error(L, errno);
  return squall_push_sockaddr(L, (struct sockaddr *)&ss);
}

static int l_socket_family(lua_State *L) {
  lua_pushinteger(L, check_socket(L)->family == AF_INET6 ? 6 : 4);
  return 1;
}

static int l_socket_close(lua_State *L) {
  listen_socket *s = luaL_checkudata(L, 1, SOCKET_MT);
  if (s->acc != NULL)
    acceptor_stop(s->acc);
  if (s->fd >= 0)
    close(s->fd);
  s->fd = -1;
  return 0;
}

static int l_socket_tostring(lua_State *L) {
  listen_socket *s = luaL_checkudata(L, 1, SOCKET_MT);
  lua_pushfstring(L, "squall.socket (fd %d)", s->fd);
  return 1;
}

/* ---- accepting ------------------------------------------------------ */

/* Accepts connections on a listening socket and hands each to a Lua
 * function as a new stream. malloc'd: owned by its userdata and by libuv
 * (freed once both its handles closed and the userdata is collected).
 * While accepting it anchors its own userdata (and through it the socket
 * and the function), so a server that drops the handle keeps serving. */
typedef struct acceptor {
  squall_handle h;
  uv_poll_t poll;
  uv_timer_t pause; /* back-off after EMFILE */
  squall_loop *loop;
  listen_socket *sock;
  int sock_ref, fn_ref, self_ref;
  squall_stream_opts opts;
  int handles_open;
  int stopped;
  int ud_alive;
  uint64_t warned_at; /* loop time (ms) of the last fd-exhaustion report */
} acceptor;

static const uint64_t EMFILE_PAUSE_MS = 100;
/* Running out of fds tends to last; say so once a minute, not per pause. */
static const uint64_t EMFILE_REPORT_MS = 60000;

static void acceptor_closed(uv_handle_t *h) {
  acceptor *a = h->data;
  if (--a->handles_open == 0 && !a->ud_alive)
    free(a);
}

static void acceptor_stop(acceptor *a) {
  if (a->stopped)
    return;
  a->stopped = 1;
  if (a->sock != NULL)
    a->sock->acc = NULL;
  a->sock = NULL;
  uv_close((uv_handle_t *)&a->poll, acceptor_closed);
  uv_close((uv_handle_t *)&a->pause, acceptor_closed);
  lua_State *L = a->loop->finalizing ? NULL : a->loop->L;
  if (L == NULL)
    return; /* the registry goes with the state */
  luaL_unref(L, LUA_REGISTRYINDEX, a->sock_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, a->fn_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, a->self_ref);
  a->sock_ref = a->fn_ref = a->self_ref = LUA_NOREF;
}

static void close_acceptor_for_loop(squall_handle *h) {
  acceptor_stop((acceptor *)h);
}

/* Report an accept failure to the Lua function as fn(nil, err). */
static void report_accept_error(acceptor *a, int sys_err) {
  lua_State *L = a->loop->L;
  lua_rawgeti(L, LUA_REGISTRYINDEX, a->fn_ref);
  squall_push_uv_error(L, uv_translate_sys_error(sys_err));
  squall_loop_call(a->loop, 2, "accept handler");
}

static void on_accept_ready(uv_poll_t *p, int status, int events);

static void on_accept_resume(uv_timer_t *t) {
  acceptor *a = t->data;
  if (!a->stopped)
    uv_poll_start(&a->poll, UV_READABLE, on_accept_ready);
}

/* Accept at most a backlog's worth, so one busy listener cannot starve the
 * rest of the loop; the poll reports the socket again if more wait. */
static void on_accept_ready(uv_poll_t *p, int status, int events) {
  (void)events;
  acceptor *a = p->data;
  if (status < 0)
    return;
  int limit = a->sock->backlog;
  for (int i = 0; i < limit && !a->stopped; i++) {
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    int fd = accept4(a->sock->fd, (struct sockaddr *)&ss, &len,
                     SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      int e = errno;
      if (e == EAGAIN || e == EWOULDBLOCK)
        return;
      if (e == ECONNABORTED || e == EINTR || e == EPROTO || e == EPERM)
        continue; /* that one connection is gone; the next may be fine */
      if (e == EMFILE || e == ENFILE || e == ENOBUFS || e == ENOMEM) {
        /* Out of fds: the pending connection stays readable, so polling
         * on would spin. Pause, say so once, and try again later. */
        uv_poll_stop(&a->poll);
        uv_timer_start(&a->pause, on_accept_resume, EMFILE_PAUSE_MS, 0);
        uint64_t now = uv_now(&a->loop->uv);
        if (a->warned_at == 0 || now - a->warned_at >= EMFILE_REPORT_MS) {
          a->warned_at = now ? now : 1;
          report_accept_error(a, e);
        }
        return;
      }
      report_accept_error(a, e);
      return;
    }
    lua_State *L = a->loop->L;
    lua_rawgeti(L, LUA_REGISTRYINDEX, a->fn_ref);
    squall_stream *s = squall_stream_new(L, a->loop, &a->opts);
    if (squall_stream_open_fd(s, fd) != 0) {
      lua_pop(L, 2);
      continue;
    }
    lua_createtable(L, 0, 2);
    squall_push_sockaddr(L, (struct sockaddr *)&ss);
    lua_setfield(L, -3, "port");
    lua_setfield(L, -2, "host");
    squall_loop_call(a->loop, 2, "accept handler");
  }
}

/* core.accept(loop, socket, fn, opts) -> acceptor
 * Calls fn(stream, {host=, port=}) for each connection, fn(nil, err) when
 * accepting fails. */
static int l_accept(lua_State *L) {
  squall_loop *loop = squall_loop_check(L, 1);
  listen_socket *sock = luaL_checkudata(L, 2, SOCKET_MT);
  luaL_checktype(L, 3, LUA_TFUNCTION);
  squall_stream_opts opts;
  squall_stream_opts_read(L, 4, &opts);
  if (sock->fd < 0)
    return luaL_error(L, "socket is closed");
  if (sock->acc != NULL)
    return luaL_error(L, "socket already has an accept handler");
  acceptor **box = lua_newuserdata(L, sizeof *box);
  *box = NULL;
  acceptor *a = calloc(1, sizeof *a);
  if (a == NULL)
    return luaL_error(L, "out of memory");
  a->h.close = close_acceptor_for_loop;
  a->loop = loop;
  a->sock = sock;
  a->opts = opts;
  a->ud_alive = 1;
  int err = uv_poll_init_socket(&loop->uv, &a->poll, sock->fd);
  if (err != 0) {
    free(a);
    return squall_push_uv_error(L, err);
  }
  uv_timer_init(&loop->uv, &a->pause);
  a->poll.data = a->pause.data = a;
  a->handles_open = 2;
  *box = a;
  luaL_getmetatable(L, ACCEPTOR_MT);
  lua_setmetatable(L, -2);
  lua_pushvalue(L, 2);
  a->sock_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushvalue(L, 3);
  a->fn_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushvalue(L, -1);
  a->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  sock->acc = a;
  uv_poll_start(&a->poll, UV_READABLE, on_accept_ready);
  return 1;
}

static int l_acceptor_close(lua_State *L) {
  acceptor **box = luaL_checkudata(L, 1, ACCEPTOR_MT);
  if (*box != NULL)
    acceptor_stop(*box);
  return 0;
}

static int l_acceptor_gc(lua_State *L) {
  acceptor **box = luaL_checkudata(L, 1, ACCEPTOR_MT);
  acceptor *a = *box;
  if (a == NULL)
    return 0;
  *box = NULL;
  a->ud_alive = 0;
  if (!a->stopped)
    acceptor_stop(a);
  if (a->handles_open == 0)
    free(a);
  return 0;
}

/* ---- connecting ------------------------------------------------------ */

/* One iostream.connect in progress: resolve, then try each address in
 * turn until one connects. Owned by itself: freed when it is finished and
 * no libuv request or handle of its own is outstanding. */
typedef struct connector {
  squall_handle h; /* the loop closes us (the timer) through it */
  uv_getaddrinfo_t gai;
  uv_connect_t req;
  uv_timer_t timer;
  squall_loop *loop;
  squall_stream_opts opts;
  /* This attempt's stream: each address gets a stream of its own, as
   * Tornado's connector makes one IOStream per attempt; a failed one is
   * closed like any other stream, and the one that connects is returned.
   * NULL between attempts. */
  squall_stream *s;
  struct addrinfo *res, *cur;
  struct sockaddr_storage src;
  int has_src_ip, src_port;
  int co_ref;
  int last_err;
  int done;
  int pending; /* getaddrinfo or connect requests outstanding */
  int resolving;
  int timer_open;
  char host[256];
} connector;

static void connector_maybe_free(connector *c) {
  if (c->done && c->pending == 0 && !c->timer_open) {
    if (c->res != NULL)
      uv_freeaddrinfo(c->res);
    free(c);
  }
}

static void connector_timer_closed(uv_handle_t *h) {
  connector *c = h->data;
  c->timer_open = 0;
  connector_maybe_free(c);
}

/* Resume the connecting coroutine with the stream, or nil and an error
 * built from `err` (a libuv error) or `kind`/`msg`. */
static void connect_finish(connector *c, int err, const char *kind,
                           const char *msg) {
  if (c->done)
    return;
  c->done = 1;
  uv_close((uv_handle_t *)&c->timer, connector_timer_closed);
  lua_State *L = c->loop->finalizing ? NULL : c->loop->L;
  squall_stream *s = c->s;
  c->s = NULL;
  if (L == NULL)
    return;
  lua_State *co = squall_coro_unpark(L, c->co_ref);
  int n;
  if (err == 0 && kind == NULL) {
    squall_stream_push(co, s);
    n = 1;
  } else {
    lua_pushnil(co);
    if (kind != NULL)
      squall_push_error(co, kind, msg);
    else
      squall_push_error(co, squall_uv_error_kind(err), uv_strerror(err));
    n = 2;
    if (s != NULL)
      squall_stream_abort(s);
  }
  if (s != NULL)
    squall_stream_release(L, s);
  if (err == 0 && kind == NULL)
    squall_stream_connected(s);
  squall_coro_resume(L, co, n);
  lua_pop(L, 1);
}

static void try_next_address(connector *c);

/* Close the failed attempt's stream (it is freed like any other). */
static void drop_attempt(connector *c) {
  if (c->s == NULL)
    return;
  squall_stream_abort(c->s);
  squall_stream_release(c->loop->L, c->s);
  c->s = NULL;
}

static void on_connected(uv_connect_t *req, int status) {
  connector *c = req->data;
  c->pending--;
  if (c->done) {
    connector_maybe_free(c);
    return;
  }
  if (status == 0) {
    connect_finish(c, 0, NULL, NULL);
    connector_maybe_free(c);
    return;
  }
  c->last_err = status;
  drop_attempt(c);
  c->cur = c->cur->ai_next;
  try_next_address(c);
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

static void try_next_address(connector *c) {
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
      c->pending++;
      return;
    }
    c->last_err = err;
    drop_attempt(c);
  }
  connect_finish(c, c->last_err ? c->last_err : UV_EADDRNOTAVAIL, NULL, NULL);
  connector_maybe_free(c);
}

static void on_resolved(uv_getaddrinfo_t *req, int status,
                        struct addrinfo *res) {
  connector *c = req->data;
  c->pending--;
  c->resolving = 0;
  c->res = res;
  if (c->done) {
    connector_maybe_free(c);
    return;
  }
  if (status < 0) {
    char msg[300];
    snprintf(msg, sizeof msg, "%s: %s", c->host, uv_strerror(status));
    connect_finish(c, 0, "resolve", msg);
    connector_maybe_free(c);
    return;
  }
  c->cur = res;
  try_next_address(c);
}

static void on_connect_timeout(uv_timer_t *t) {
  connector *c = t->data;
  if (c->resolving)
    uv_cancel((uv_req_t *)&c->gai);
  char msg[300];
  snprintf(msg, sizeof msg, "timed out connecting to %s", c->host);
  connect_finish(c, 0, "timeout", msg);
  connector_maybe_free(c);
}

static void close_connector_for_loop(squall_handle *h) {
  connector *c = (connector *)h;
  if (!c->done) {
    c->done = 1;
    uv_close((uv_handle_t *)&c->timer, connector_timer_closed);
    lua_State *L = c->loop->finalizing ? NULL : c->loop->L;
    if (L != NULL) {
      luaL_unref(L, LUA_REGISTRYINDEX, c->co_ref);
      if (c->s != NULL)
        squall_stream_release(L, c->s);
    }
    if (c->resolving)
      uv_cancel((uv_req_t *)&c->gai);
  }
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
    return push_errno_error(L, errno);
  if (connect(fd, (struct sockaddr *)&sun, sizeof sun) != 0) {
    int e = errno;
    close(fd);
    return push_errno_error(L, e);
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
  c->src = src;
  c->has_src_ip = src_ip != NULL;
  snprintf(c->host, sizeof c->host, "%s", host);
  c->src_port = (int)src_port;
  c->gai.data = c->req.data = c->timer.data = c;
  uv_timer_init(&loop->uv, &c->timer);
  c->timer_open = 1;

  c->opts = opts;

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
    c->done = 1;
    uv_close((uv_handle_t *)&c->timer, connector_timer_closed);
    return squall_push_uv_error(L, err);
  }
  c->pending++;
  c->resolving = 1;
  c->co_ref = squall_coro_park(L, "connect");
  if (timeout > 0)
    uv_timer_start(&c->timer, on_connect_timeout, squall_timeout_ms(timeout),
                   0);
  return lua_yield(L, 0);
}

/* core.udp_send(ip, port, data): one datagram, sent without waiting
 * (InfluxDB's UDP listener). One socket per address family, made on first
 * use and kept (after fork_processes each worker makes its own). Returns
 * true, or nil, err (a full socket buffer is kind io: the datagram is
 * dropped, as UDP may). */
static int l_udp_send(lua_State *L) {
  static int fds[2] = {-1, -1};
  const char *ip = luaL_checkstring(L, 1);
  int port = (int)luaL_checkinteger(L, 2);
  size_t len;
  const char *data = luaL_checklstring(L, 3, &len);
  struct sockaddr_storage ss;
  int v6 = strchr(ip, ':') != NULL;
  int err = v6 ? uv_ip6_addr(ip, port, (struct sockaddr_in6 *)&ss)
               : uv_ip4_addr(ip, port, (struct sockaddr_in *)&ss);
  if (err != 0)
    return luaL_argerror(L, 1, "an IPv4 or IPv6 address");
  int *fd = &fds[v6];
  if (*fd < 0) {
    *fd = socket(v6 ? AF_INET6 : AF_INET,
                 SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (*fd < 0)
      return squall_push_uv_error(L, uv_translate_sys_error(errno));
  }
  socklen_t sl = v6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
  if (sendto(*fd, data, len, 0, (struct sockaddr *)&ss, sl) < 0)
    return squall_push_uv_error(L, uv_translate_sys_error(errno));
  lua_pushboolean(L, 1);
  return 1;
}

int squall_tcp_open(lua_State *L) {
  static const luaL_Reg socket_m[] = {{"fileno", l_socket_fileno},
                                      {"getsockname", l_socket_getsockname},
                                      {"family", l_socket_family},
                                      {"close", l_socket_close},
                                      {"__gc", l_socket_close},
                                      {"__tostring", l_socket_tostring},
                                      {NULL, NULL}};
  squall_new_metatable(L, SOCKET_MT, socket_m);
  lua_pushcfunction(L, l_bind_sockets);
  lua_setfield(L, -2, "bind_sockets");
  lua_pushcfunction(L, l_adopt_socket);
  lua_setfield(L, -2, "adopt_socket");

  static const luaL_Reg acceptor_m[] = {
      {"close", l_acceptor_close}, {"__gc", l_acceptor_gc}, {NULL, NULL}};
  squall_new_metatable(L, ACCEPTOR_MT, acceptor_m);
  lua_pushcfunction(L, l_accept);
  lua_setfield(L, -2, "accept");
  lua_pushcfunction(L, l_connect);
  lua_setfield(L, -2, "connect");
  lua_pushcfunction(L, l_connect_unix);
  lua_setfield(L, -2, "connect_unix");
  lua_pushcfunction(L, l_udp_send);
  lua_setfield(L, -2, "udp_send");
  return 0;
}
