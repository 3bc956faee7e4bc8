/* tcp.c: bind_sockets and the listening socket object. */
#include "tcp.h"

#include <arpa/inet.h>
#include <errno.h>
#include <lauxlib.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#include "host.h"

#define SOCKET_MT "squall.socket"

typedef struct {
  int fd;
  int family;
} listen_socket;

int squall_push_sockaddr(lua_State *L, const struct sockaddr *sa) {
  char host[INET6_ADDRSTRLEN] = "";
  int port = 0;
  if (sa->sa_family == AF_INET) {
    const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
    inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
    port = ntohs(in->sin_port);
  } else if (sa->sa_family == AF_INET6) {
    const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
    inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
    port = ntohs(in6->sin6_port);
  }
  lua_pushstring(L, host);
  lua_pushinteger(L, port);
  return 2;
}

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
  hints.ai_flags = AI_PASSIVE | AI_ADDRCONFIG;
  int gai = getaddrinfo(address, NULL, &hints, &res);
  if (gai == EAI_NONAME || gai == EAI_ADDRFAMILY) {
    hints.ai_flags = AI_PASSIVE; /* loopback-only hosts lack ADDRCONFIG */
    gai = getaddrinfo(address, NULL, &hints, &res);
  }
  if (gai != 0) {
    lua_pushnil(L);
    lua_pushfstring(L, "%s: %s", address ? address : "*", gai_strerror(gai));
    squall_push_error(L, "resolve", lua_tostring(L, -1));
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

int squall_tcp_open(lua_State *L) {
  static const luaL_Reg socket_m[] = {{"fileno", l_socket_fileno},
                                      {"getsockname", l_socket_getsockname},
                                      {"family", l_socket_family},
                                      {"close", l_socket_close},
                                      {"__gc", l_socket_close},
                                      {"__tostring", l_socket_tostring},
                                      {NULL, NULL}};
  luaL_newmetatable(L, SOCKET_MT);
  lua_pushvalue(L, -1);
  lua_setfield(L, -2, "__index");
  luaL_register(L, NULL, socket_m);
  lua_pop(L, 1);
  lua_pushcfunction(L, l_bind_sockets);
  lua_setfield(L, -2, "bind_sockets");
  return 0;
}
