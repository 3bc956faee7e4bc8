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

/* The supervisor: its children, what it counts, and the signal state to
 * give back once it is done. */
typedef struct {
  child *kids;
  int n, alive, restarts, max_restarts;
  int stopping; /* children stopped on purpose are not restarted */
  int failed;   /* past max_restarts */
  sigset_t set, old_mask;
  struct sigaction old_chld;
} supervisor;

/* Block the supervised signals (so none is lost before sigwaitinfo takes
 * it) and catch SIGCHLD. */
static void supervise_begin(supervisor *sv) {
  fflush(NULL); /* buffered output would be written by every child */
  supervised_set(&sv->set);
  sigprocmask(SIG_BLOCK, &sv->set, &sv->old_mask);
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_sigchld;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGCHLD, &sa, &sv->old_chld);
}

/* The parent gives the signal state back as it found it. */
static void supervise_end(supervisor *sv) {
  free(sv->kids);
  sigaction(SIGCHLD, &sv->old_chld, NULL);
  sigprocmask(SIG_SETMASK, &sv->old_mask, NULL);
}

/* Fork the n children: 0 in a child (its task id in *id), 1 in the
 * parent, -1 with errno set when a fork failed (those started are sent
 * SIGTERM). */
static int start_children(supervisor *sv, int *id) {
  for (int i = 0; i < sv->n; i++) {
    int r = spawn(&sv->kids[i], i, &sv->old_mask);
    if (r == 0) {
      *id = i;
      return 0;
    }
    if (r < 0) {
      int e = errno;
      for (int j = 0; j < i; j++)
        kill(sv->kids[j].pid, SIGTERM);
      errno = e;
      return -1;
    }
  }
  return 1;
}

/* A child exited with `status`: count it, or restart it when it died
 * before a stop. 0 in the restarted child (its task id in *id), else 1. */
static int child_exited(supervisor *sv, child *c, int status, int *id) {
  pid_t pid = c->pid;
  c->pid = 0;
  int normal = WIFEXITED(status) && WEXITSTATUS(status) == 0;
  if (normal || sv->stopping) {
    sv->alive--;
    return 1;
  }
  if (WIFSIGNALED(status))
    log_line('W', "child %d (pid %d) killed by signal %d; restarting", c->id,
             (int)pid, WTERMSIG(status));
  else
    log_line('W', "child %d (pid %d) exited with status %d; restarting", c->id,
             (int)pid, WEXITSTATUS(status));
  if (++sv->restarts > sv->max_restarts) {
    sv->failed = 1;
    sv->alive--;
    sv->stopping = 1;
    kill_all(sv->kids, sv->n, SIGTERM);
    return 1;
  }
  int r = spawn(c, c->id, &sv->old_mask);
  if (r == 0) {
    *id = c->id;
    return 0;
  }
  if (r < 0)
    sv->alive--;
  return 1;
}

/* Reap every child that exited: 0 in a restarted child (its task id in
 * *id), else 1. */
static int reap(supervisor *sv, int *id) {
  int status;
  pid_t pid;
  while (sv->alive > 0 && (pid = waitpid(-1, &status, WNOHANG)) > 0) {
    int k = 0;
    while (k < sv->n && sv->kids[k].pid != pid)
      k++;
    if (k < sv->n && child_exited(sv, &sv->kids[k], status, id) == 0)
      return 0;
  }
  return 1;
}

/* Wait for the next signal: a child's exit (reaped next round), or one to
 * forward to every child. */
static void forward_next_signal(supervisor *sv) {
  int sig = sigwaitinfo(&sv->set, NULL);
  if (sig < 0 || sig == SIGCHLD)
    return;
  if (sig != SIGHUP)
    sv->stopping = 1;
  kill_all(sv->kids, sv->n, sig);
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
  supervisor sv;
  memset(&sv, 0, sizeof sv);
  sv.kids = calloc((size_t)n, sizeof *sv.kids);
  if (sv.kids == NULL)
    return luaL_error(L, "out of memory");
  sv.n = sv.alive = n;
  sv.max_restarts = max_restarts;
  supervise_begin(&sv);
  int id, r = start_children(&sv, &id);
  if (r < 0) {
    int e = errno;
    supervise_end(&sv);
    return luaL_error(L, "fork: %s", strerror(e));
  }
  if (r > 0) {
    log_line('I',
             "supervising %d processes; signal pid %d: TERM or INT stops "
             "them all, HUP reaches each (a reload under --reload)",
             n, (int)getpid());
    while ((r = reap(&sv, &id)) != 0 && sv.alive > 0)
      forward_next_signal(&sv);
  }
  if (r == 0) { /* a child: spawn set its signals up */
    free(sv.kids);
    lua_pushinteger(L, id);
    return 1;
  }
  supervise_end(&sv);
  if (sv.failed)
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

int squall_process_open(lua_State *L) {
  lua_pushcfunction(L, l_fork_processes);
  lua_setfield(L, -2, "fork_processes");
  lua_pushcfunction(L, l_task_id);
  lua_setfield(L, -2, "task_id");
  lua_pushcfunction(L, l_cpu_count);
  lua_setfield(L, -2, "cpu_count");
  return 0;
}
