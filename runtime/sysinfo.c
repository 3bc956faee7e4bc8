/* sysinfo.c: what the system says about this process and its files
 * (see sysinfo.h). Synchronous, for small answers only. */
#include "sysinfo.h"
#include "host.h"

#include <lauxlib.h>
#include <stdio.h>
#include <sys/resource.h>
#include <unistd.h>
#include <uv.h>

/* Entries of a folder, without "." and "..": a table of names, or nil,
 * err. Synchronous (uv_fs_scandir without a loop): for /proc and small
 * folders only. */
static int scandir_count(const char *path, lua_State *L) {
  uv_fs_t req;
  int n = uv_fs_scandir(NULL, &req, path, 0, NULL);
  if (n < 0) {
    uv_fs_req_cleanup(&req);
    return n;
  }
  uv_dirent_t ent;
  int i = 0;
  while (uv_fs_scandir_next(&req, &ent) != UV_EOF) {
    if (L != NULL) {
      lua_pushstring(L, ent.name);
      lua_rawseti(L, -2, ++i);
    } else {
      i++;
    }
  }
  uv_fs_req_cleanup(&req);
  return i;
}

/* core.listdir(path) -> {names...}, or nil, err. */
static int l_listdir(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  lua_newtable(L);
  int n = scandir_count(path, L);
  if (n < 0)
    return squall_push_uv_error(L, n);
  return 1;
}

/* core.process_stats(): what Prometheus clients export as process_*:
 * cpu (user+system seconds), rss and vsize (bytes), open_fds, max_fds,
 * and the parent's pid (a fork_processes child's supervisor). */
static int l_process_stats(lua_State *L) {
  lua_createtable(L, 0, 6);
  uv_rusage_t ru;
  if (uv_getrusage(&ru) == 0) {
    double cpu = (double)ru.ru_utime.tv_sec +
                 (double)ru.ru_utime.tv_usec / 1e6 +
                 (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
    lua_pushnumber(L, cpu);
    lua_setfield(L, -2, "cpu");
  }
  size_t rss;
  if (uv_resident_set_memory(&rss) == 0) {
    lua_pushnumber(L, (double)rss);
    lua_setfield(L, -2, "rss");
  }
  FILE *f = fopen("/proc/self/statm", "r");
  unsigned long pages;
  if (f != NULL) {
    if (fscanf(f, "%lu", &pages) == 1) {
      lua_pushnumber(L, (double)pages * (double)sysconf(_SC_PAGESIZE));
      lua_setfield(L, -2, "vsize");
    }
    fclose(f);
  }
  int fds = scandir_count("/proc/self/fd", NULL);
  if (fds > 0) {
    lua_pushinteger(L, fds - 1); /* less the one scandir itself held */
    lua_setfield(L, -2, "open_fds");
  }
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY) {
    lua_pushnumber(L, (double)rl.rlim_cur);
    lua_setfield(L, -2, "max_fds");
  }
  lua_pushinteger(L, (lua_Integer)uv_os_getppid());
  lua_setfield(L, -2, "ppid");
  return 1;
}

int squall_sysinfo_open(lua_State *L) {
  lua_pushcfunction(L, l_listdir);
  lua_setfield(L, -2, "listdir");
  lua_pushcfunction(L, l_process_stats);
  lua_setfield(L, -2, "process_stats");
  return 0;
}
