/* process.c: fork_processes, child restarts, cpu_count (see process.h). */
#include "process.h"

#include <errno.h>
#include <lauxlib.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>
#include <uv.h>

static int task_id = -1; /* -1: not a child of fork_processes */

/* Signals the parent got and has not forwarded yet. */
static volatile sig_atomic_t pending[NSIG];

static void note_signal(int sig) {
  pending[sig] = 1;
}

static const int FORWARDED[] = {SIGTERM, SIGINT, SIGHUP};
#define N_FORWARDED (int)(sizeof FORWARDED / sizeof FORWARDED[0])

typedef struct {
  pid_t pid;
  int id;
} child;

static void set_handlers(void (*handler)(int)) {
  for (int i = 0; i < N_FORWARDED; i++) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = handler;
    sigemptyset(&sa.sa_mask);
    /* No SA_RESTART: waitpid must return so the parent can forward. */
    sigaction(FORWARDED[i], &sa, NULL);
  }
}

/* Fork one child for task `id`. Returns 0 in the child, 1 in the parent,
 * -1 on failure (errno set). */
static int spawn(child *c, int id) {
  pid_t pid = fork();
  if (pid < 0)
    return -1;
  if (pid == 0) {
    set_handlers(SIG_DFL);
    task_id = id;
    return 0;
  }
  c->pid = pid;
  c->id = id;
  return 1;
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
  memset((void *)pending, 0, sizeof pending);
  set_handlers(note_signal);
  for (int i = 0; i < n; i++) {
    int r = spawn(&kids[i], i);
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
      return luaL_error(L, "fork: %s", strerror(e));
    }
  }

  int alive = n, restarts = 0, stopping = 0, failed = 0;
  while (alive > 0) {
    for (int i = 0; i < N_FORWARDED; i++) {
      int sig = FORWARDED[i];
      if (!pending[sig])
        continue;
      pending[sig] = 0;
      if (sig != SIGHUP)
        stopping = 1; /* children stopped on purpose are not restarted */
      for (int k = 0; k < n; k++)
        if (kids[k].pid > 0)
          kill(kids[k].pid, sig);
    }
    int status;
    pid_t pid = waitpid(-1, &status, 0);
    if (pid < 0) {
      if (errno == EINTR)
        continue;
      break; /* ECHILD: nobody left */
    }
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
      fprintf(stderr,
              "[W squall.process] child %d (pid %d) killed by signal "
              "%d; restarting\n",
              kids[k].id, (int)pid, WTERMSIG(status));
    else
      fprintf(stderr,
              "[W squall.process] child %d (pid %d) exited with "
              "status %d; restarting\n",
              kids[k].id, (int)pid, WEXITSTATUS(status));
    if (++restarts > max_restarts) {
      failed = 1;
      alive--;
      stopping = 1;
      for (int j = 0; j < n; j++)
        if (kids[j].pid > 0)
          kill(kids[j].pid, SIGTERM);
      continue;
    }
    int r = spawn(&kids[k], kids[k].id);
    if (r == 0) {
      int id = kids[k].id;
      free(kids);
      lua_pushinteger(L, id);
      return 1;
    }
    if (r < 0)
      alive--;
  }
  free(kids);
  set_handlers(SIG_DFL);
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

int squall_process_open(lua_State *L) {
  lua_pushcfunction(L, l_fork_processes);
  lua_setfield(L, -2, "fork_processes");
  lua_pushcfunction(L, l_task_id);
  lua_setfield(L, -2, "task_id");
  lua_pushcfunction(L, l_cpu_count);
  lua_setfield(L, -2, "cpu_count");
  return 0;
}
