/* host.c: the lua_State, package paths, tracebacks and error values. */
#include "host.h"

#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#include <lualib.h>

#define REPORTER_KEY "squall.reporter"
#define ERROR_MT "squall.error"

/* Where the lua/ modules live relative to the executable: the build tree
 * (build/squall next to lua/), then an installed prefix
 * (PREFIX/bin/squall with PREFIX/share/squall/lua). */
static const char *const lua_dirs[] = {"/../lua", "/../share/squall/lua"};

static int exe_dir(char *buf, size_t size) {
  size_t len = size;
  if (uv_exepath(buf, &len) != 0)
    return -1;
  char *slash = strrchr(buf, '/');
  if (slash == NULL)
    return -1;
  *slash = '\0';
  return 0;
}

/* Prepend our lua/ directory to package.path. LUA_PATH, handled by
 * luaopen_package, still adds to what follows. */
static void set_package_path(lua_State *L) {
  char dir[PATH_MAX];
  if (exe_dir(dir, sizeof dir) != 0)
    return;
  for (size_t i = 0; i < sizeof lua_dirs / sizeof lua_dirs[0]; i++) {
    char probe[PATH_MAX + 64];
    snprintf(probe, sizeof probe, "%s%s/squall/ioloop.lua", dir, lua_dirs[i]);
    if (access(probe, R_OK) != 0)
      continue;
    lua_getglobal(L, "package");
    lua_pushfstring(L, "%s%s/?.lua;%s%s/?/init.lua;", dir, lua_dirs[i], dir,
                    lua_dirs[i]);
    lua_getfield(L, -2, "path");
    lua_concat(L, 2);
    lua_setfield(L, -2, "path");
    lua_pop(L, 1);
    return;
  }
}

static int error_tostring(lua_State *L) {
  lua_getfield(L, 1, "kind");
  lua_getfield(L, 1, "message");
  if (lua_isstring(L, -1))
    lua_pushfstring(L, "%s: %s", luaL_optstring(L, -2, "error"),
                    lua_tostring(L, -1));
  else
    lua_pushstring(L, luaL_optstring(L, -2, "error"));
  return 1;
}

void squall_push_error(lua_State *L, const char *kind, const char *message) {
  lua_createtable(L, 0, 2);
  lua_pushstring(L, kind);
  lua_setfield(L, -2, "kind");
  lua_pushstring(L, message);
  lua_setfield(L, -2, "message");
  luaL_getmetatable(L, ERROR_MT);
  lua_setmetatable(L, -2);
}

const char *squall_uv_error_kind(int uv_err) {
  switch (uv_err) {
  case UV_EOF:
  case UV_ECONNRESET:
  case UV_EPIPE:
  case UV_ECANCELED:
  case UV_ENOTCONN:
    return "closed";
  case UV_ETIMEDOUT:
    return "timeout";
  case UV_ECONNREFUSED:
    return "refused";
  case UV_ENETUNREACH:
  case UV_EHOSTUNREACH:
    return "unreachable";
  case UV_EADDRINUSE:
    return "address_in_use";
  case UV_EAI_NONAME:
  case UV_EAI_AGAIN:
  case UV_EAI_FAIL:
  case UV_EAI_NODATA:
  case UV_EAI_FAMILY:
  case UV_EAI_SERVICE:
    return "resolve";
  default:
    return "io";
  }
}

int squall_push_uv_error(lua_State *L, int uv_err) {
  lua_pushnil(L);
  squall_push_error(L, squall_uv_error_kind(uv_err), uv_strerror(uv_err));
  return 2;
}

void squall_register_udata(lua_State *L, const char *name) {
  lua_pushlightuserdata(L, (void *)name);
  lua_pushvalue(L, -2);
  lua_rawset(L, LUA_REGISTRYINDEX);
}

void *squall_checkudata(lua_State *L, int idx, const char *name) {
  void *p = lua_touserdata(L, idx);
  if (p != NULL && lua_getmetatable(L, idx)) {
    lua_pushlightuserdata(L, (void *)name);
    lua_rawget(L, LUA_REGISTRYINDEX);
    int same = lua_rawequal(L, -1, -2);
    lua_pop(L, 2);
    if (same)
      return p;
  }
  luaL_typerror(L, idx, name);
  return NULL;
}

void squall_new_metatable(lua_State *L, const char *name,
                          const luaL_Reg *methods) {
  luaL_newmetatable(L, name);
  squall_register_udata(L, name);
  lua_pushvalue(L, -1);
  lua_setfield(L, -2, "__index");
  luaL_register(L, NULL, methods);
  lua_pop(L, 1);
}

static int call_tostring(lua_State *L) {
  luaL_callmeta(L, 1, "__tostring");
  return 1;
}

const char *squall_host_describe(lua_State *L, int idx) {
  if (lua_type(L, idx) == LUA_TSTRING || lua_type(L, idx) == LUA_TNUMBER) {
    lua_pushvalue(L, idx);
    return lua_tostring(L, -1);
  }
  if (luaL_getmetafield(L, idx, "__tostring")) {
    lua_pop(L, 1);
    /* In a pcall: a __tostring that raises must not take the process (or
     * the report of the first error) down with it. */
    lua_pushcfunction(L, call_tostring);
    lua_pushvalue(L, idx < 0 ? idx - 1 : idx);
    if (lua_pcall(L, 1, 1, 0) == 0 && lua_type(L, -1) == LUA_TSTRING)
      return lua_tostring(L, -1);
    const char *why = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1)
                                                     : "it returned no string";
    lua_pushfstring(L, "(error object's __tostring failed: %s)", why);
    lua_remove(L, -2);
    return lua_tostring(L, -1);
  }
  lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, idx));
  return lua_tostring(L, -1);
}

int squall_host_traceback(lua_State *L) {
  if (!lua_isstring(L, 1)) {
    /* Error objects (tables) pass through untouched so callers can inspect
     * them; those with __tostring still get a readable traceback. */
    if (!luaL_getmetafield(L, 1, "__tostring"))
      return 1;
    lua_pop(L, 1);
    squall_host_describe(L, 1);
    lua_replace(L, 1);
  }
  luaL_traceback(L, L, lua_tostring(L, 1), 1);
  return 1;
}

int squall_host_pcall(lua_State *L, int nargs, int nresults) {
  int base = lua_gettop(L) - nargs;
  lua_pushcfunction(L, squall_host_traceback);
  lua_insert(L, base);
  int status = lua_pcall(L, nargs, nresults, base);
  lua_remove(L, base);
  return status;
}

void squall_host_report(lua_State *L, const char *where) {
  lua_getfield(L, LUA_REGISTRYINDEX, REPORTER_KEY);
  if (lua_isfunction(L, -1)) {
    lua_pushstring(L, where);
    lua_pushvalue(L, -3);
    if (lua_pcall(L, 2, 0, 0) == 0) {
      lua_pop(L, 1);
      return;
    }
    fprintf(stderr, "squall: error in the error reporter: %s\n",
            lua_tostring(L, -1));
  }
  lua_pop(L, 1);
  const char *msg = lua_tostring(L, -1);
  fprintf(stderr, "squall: uncaught error in %s: %s\n", where,
          msg ? msg : "(error object is not a string)");
  lua_pop(L, 1);
}

static int set_reporter(lua_State *L) {
  if (!lua_isnoneornil(L, 1))
    luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_settop(L, 1);
  lua_setfield(L, LUA_REGISTRYINDEX, REPORTER_KEY);
  return 0;
}

static int new_error(lua_State *L) {
  squall_push_error(L, luaL_checkstring(L, 1), luaL_optstring(L, 2, NULL));
  return 1;
}

/* core.cwd(): the real working directory (getcwd), not $PWD, which a
 * launcher that sets the directory (supervisord, Python's cwd=) leaves
 * pointing elsewhere. */
static int l_cwd(lua_State *L) {
  char buf[4096];
  size_t len = sizeof buf;
  int err = uv_cwd(buf, &len);
  if (err != 0)
    return squall_push_uv_error(L, err);
  lua_pushlstring(L, buf, len);
  return 1;
}

/* core.file_stamp(path): a string that changes when the file is written
 * (its modification time and size: two writes within one tick of the
 * kernel's coarse clock share a time), or nil, err. squall.reload compares
 * it with the stamp the file had when loaded, so an edit made before its
 * watcher started is not missed. */
static int l_file_stamp(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  uv_fs_t req;
  int err = uv_fs_stat(NULL, &req, path, NULL);
  if (err == 0)
    lua_pushfstring(L, "%d.%d/%d", (int)req.statbuf.st_mtim.tv_sec,
                    (int)req.statbuf.st_mtim.tv_nsec, (int)req.statbuf.st_size);
  uv_fs_req_cleanup(&req);
  if (err != 0)
    return squall_push_uv_error(L, err);
  return 1;
}

/* core.describe(v) -> what an error report says of v (see
 * squall_host_describe): ioloop.lua and gen.lua describe errors this way
 * too, so a report reads the same wherever it was made. */
static int l_describe(lua_State *L) {
  luaL_checkany(L, 1);
  squall_host_describe(L, 1);
  return 1;
}

int squall_host_open(lua_State *L) {
  lua_pushcfunction(L, l_describe);
  lua_setfield(L, -2, "describe");
  lua_pushcfunction(L, l_cwd);
  lua_setfield(L, -2, "cwd");
  lua_pushcfunction(L, l_file_stamp);
  lua_setfield(L, -2, "file_stamp");
  if (luaL_newmetatable(L, ERROR_MT)) {
    lua_pushcfunction(L, error_tostring);
    lua_setfield(L, -2, "__tostring");
  }
  lua_pop(L, 1);
  lua_pushcfunction(L, set_reporter);
  lua_setfield(L, -2, "set_reporter");
  lua_pushcfunction(L, new_error);
  lua_setfield(L, -2, "error");
  return 0;
}

lua_State *squall_host_new(void) {
  lua_State *L = luaL_newstate();
  if (L == NULL)
    return NULL;
  lua_gc(L, LUA_GCSTOP, 0);
  luaL_openlibs(L);
  set_package_path(L);
  /* host.c and core.c call each other on purpose: the host registers
   * squall.core (core.c gathers every module, this file's among them), and
   * core.c adds the host's own functions (squall_host_open). */
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "preload");
  lua_pushcfunction(L, luaopen_squall_core);
  lua_setfield(L, -2, "squall.core");
  lua_pop(L, 2);
  lua_gc(L, LUA_GCRESTART, 0);
  return L;
}

/* Used by tcp.c (accepted peers, bound sockets) and stream_lua.c
 * (getpeername, getsockname). */
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
