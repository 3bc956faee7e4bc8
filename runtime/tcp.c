/* tcp.c: bind_sockets, the listening socket, accepting, UDP datagrams.
 * Connecting is in tcp_connect.c. */
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
  lua_pushcfunction(L, l_udp_send);
  lua_setfield(L, -2, "udp_send");
  squall_tcp_connect_open(L);
  return 0;
}
