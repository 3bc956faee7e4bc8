/* process.c: fork_processes, child restarts, cpu_count (see process.h). */
#include "process.h"
#include "host.h"

#include <errno.h>
#include <lauxlib.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

static int task_id = -1; /* -1: not a child of fork_processes */

/* The supervisor never runs a signal handler: it keeps the signals it
 * acts on blocked and takes them one at a time with sigwaitinfo, after
 * reaping. A signal that arrives at any moment stays pending until then,
 * so none is lost between a check and a wait (a handler that set a flag
 * lost SIGTERMs that came just before waitpid blocked). */
static const int FORWARDED[] = {SIGTERM, SIGINT, SIGHUP};
#define N_FORWARDED (int)(sizeof FORWARDED / sizeof FORWARDED[0])

typedef struct {
  pid_t pid;
  int id;
} child;

/* One log line in squall.log's format, from C (the supervisor has no loop
 * and runs no Lua while it waits). */
static void log_line(char level, const char *fmt, ...) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  struct tm tm;
  localtime_r(&ts.tv_sec, &tm);
  char when[32];
  strftime(when, sizeof when, "%y%m%d %H:%M:%S", &tm);
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  fprintf(stderr, "[%c %s.%03ld squall.process] %s\n", level, when,
          ts.tv_nsec / 1000000, msg);
  fflush(stderr);
}

static void supervised_set(sigset_t *set) {
  sigemptyset(set);
  for (int i = 0; i < N_FORWARDED; i++)
    sigaddset(set, FORWARDED[i]);
  sigaddset(set, SIGCHLD);
}

/* Fork one child for task `id`, with the supervised signals still blocked
 * (as they are in the parent): the child resets their dispositions before
 * it unblocks them, so a signal forwarded at once is acted on by the
 * child's defaults, never by a handler it inherited. SIGHUP starts
 * ignored: it means "reload" to a child that installs a handler for it
 * (squall.reload) and nothing otherwise; it never kills one. Returns 0 in
 * the child, 1 in the parent, -1 on failure (errno set). */
static int spawn(child *c, int id, const sigset_t *old_mask) {
  pid_t pid = fork();
  if (pid < 0)
    return -1;
  if (pid == 0) {
    signal(SIGTERM, SIG_DFL);
    signal(SIGINT, SIG_DFL);
    signal(SIGCHLD, SIG_DFL);
    signal(SIGHUP, SIG_IGN);
    sigprocmask(SIG_SETMASK, old_mask, NULL);
    task_id = id;
    return 0;
  }
  c->pid = pid;
  c->id = id;
  return 1;
}

static void kill_all(child *kids, int n, int sig) {
  for (int k = 0; k < n; k++)
    if (kids[k].pid > 0)
      kill(kids[k].pid, sig);
}

static void on_sigchld(int sig) {
  (void)sig; /* a handler, not SIG_DFL, so SIGCHLD is surely queued */
}

/* core.fork_processes(n, max_restarts) -> task id, in each child; nil in
 * the parent once every child exited normally or stopped on a forwarded
 * signal. The parent raises when children died more than max_restarts
 * times. */
static int l_fork_processes(lua_State *L) {
  int n = (int)luaL_checkinteger(L, 1);
  int max_restarts = (int)luaL_optinteger(L, 2, 100);
  luaL_argcheck(L, n > 0 && n <= 4096, 1, "process count out of range");
  luaL_argcheck(L, max_restarts >= 0, 2, "max_restarts must not be negative");
  if (task_id >= 0)
    return luaL_error(L, "fork_processes: already forked (task %d)", task_id);
  child *kids = calloc((size_t)n, sizeof *kids);
  if (kids == NULL)
    return luaL_error(L, "out of memory");
  fflush(NULL); /* buffered output would be written by every child */
  sigset_t set, old_mask;
  supervised_set(&set);
  sigprocmask(SIG_BLOCK, &set, &old_mask);
  struct sigaction sa, old_chld;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_sigchld;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGCHLD, &sa, &old_chld);
  for (int i = 0; i < n; i++) {
    int r = spawn(&kids[i], i, &old_mask);
    if (r == 0) {
      free(kids);
      lua_pushinteger(L, i);
      return 1;
    }
    if (r < 0) {
      int e = errno;
      for (int j = 0; j < i; j++)
        kill(kids[j].pid, SIGTERM);
      free(kids);
      sigaction(SIGCHLD, &old_chld, NULL);
      sigprocmask(SIG_SETMASK, &old_mask, NULL);
      return luaL_error(L, "fork: %s", strerror(e));
    }
  }
  log_line('I',
           "supervising %d processes; signal pid %d: TERM or INT stops "
           "them all, HUP reaches each (a reload under --reload)",
           n, (int)getpid());

  int alive = n, restarts = 0, stopping = 0, failed = 0;
  while (alive > 0) {
    /* Reap whoever exited; restart those that died before a stop. */
    int status;
    pid_t pid;
    while (alive > 0 && (pid = waitpid(-1, &status, WNOHANG)) > 0) {
      int k = 0;
      while (k < n && kids[k].pid != pid)
        k++;
      if (k == n)
        continue;
      kids[k].pid = 0;
      int normal = WIFEXITED(status) && WEXITSTATUS(status) == 0;
      if (normal || stopping) {
        alive--;
        continue;
      }
      if (WIFSIGNALED(status))
        log_line('W', "child %d (pid %d) killed by signal %d; restarting",
                 kids[k].id, (int)pid, WTERMSIG(status));
      else
        log_line('W', "child %d (pid %d) exited with status %d; restarting",
                 kids[k].id, (int)pid, WEXITSTATUS(status));
      if (++restarts > max_restarts) {
        failed = 1;
        alive--;
        stopping = 1;
        kill_all(kids, n, SIGTERM);
        continue;
      }
      int r = spawn(&kids[k], kids[k].id, &old_mask);
      if (r == 0) {
        int id = kids[k].id;
        free(kids);
        lua_pushinteger(L, id);
        return 1;
      }
      if (r < 0)
        alive--;
    }
    if (alive == 0)
      break;
    /* Then wait for the next signal: a child's exit, or one to forward. */
    int sig = sigwaitinfo(&set, NULL);
    if (sig < 0 || sig == SIGCHLD)
      continue;
    if (sig != SIGHUP)
      stopping = 1; /* children stopped on purpose are not restarted */
    kill_all(kids, n, sig);
  }
  free(kids);
  sigaction(SIGCHLD, &old_chld, NULL);
  sigprocmask(SIG_SETMASK, &old_mask, NULL);
  if (failed)
    return luaL_error(L, "fork_processes: children died more than %d times",
                      max_restarts);
  lua_pushnil(L); /* the parent: process.lua exits 0, closing the state */
  return 1;
}

/* core.task_id() -> id, or nil outside fork_processes' children. */
static int l_task_id(lua_State *L) {
  if (task_id < 0)
    lua_pushnil(L);
  else
    lua_pushinteger(L, task_id);
  return 1;
}

static int l_cpu_count(lua_State *L) {
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  lua_pushinteger(L, n > 0 ? n : 1);
  return 1;
}

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

int squall_process_open(lua_State *L) {
  lua_pushcfunction(L, l_listdir);
  lua_setfield(L, -2, "listdir");
  lua_pushcfunction(L, l_process_stats);
  lua_setfield(L, -2, "process_stats");
  lua_pushcfunction(L, l_fork_processes);
  lua_setfield(L, -2, "fork_processes");
  lua_pushcfunction(L, l_task_id);
  lua_setfield(L, -2, "task_id");
  lua_pushcfunction(L, l_cpu_count);
  lua_setfield(L, -2, "cpu_count");
  return 0;
}
