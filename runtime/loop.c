/* loop.c: the uv_loop behind an IOLoop, fd watchers and signals. */
#include "loop.h"

#include <lauxlib.h>
#include <math.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

#include "host.h"

#define LOOP_MT "squall.loop"
#define WATCH_MT "squall.fdwatch"
#define SIGNAL_MT "squall.signal"

/* Tornado's event bits, which ioloop.lua exposes. */
enum { EV_READ = 0x001, EV_WRITE = 0x004, EV_ERROR = 0x018 };

squall_loop *squall_loop_check(lua_State *L, int idx) {
  squall_loop *loop = luaL_checkudata(L, idx, LOOP_MT);
  if (loop->closed)
    luaL_error(L, "the IOLoop is closed");
  return loop;
}

void squall_loop_call(squall_loop *loop, int nargs, const char *where) {
  lua_State *L = loop->L;
  if (squall_host_pcall(L, nargs, 0) != 0)
    squall_host_report(L, where);
}

static void noop_async(uv_async_t *a) {
  (void)a;
}
/* The bound on a poll. libuv may run a due timer before it polls; stopping
 * the loop makes that poll not block, so the bound holds either way. */
static void bound_timer_cb(uv_timer_t *t) {
  uv_stop(t->loop);
}

/* core.loop_new() -> loop */
static int l_loop_new(lua_State *L) {
  squall_loop *loop = lua_newuserdata(L, sizeof *loop);
  memset(loop, 0, sizeof *loop);
  int err = uv_loop_init(&loop->uv);
  if (err != 0) {
    loop->closed = 1;
    return luaL_error(L, "uv_loop_init: %s", uv_strerror(err));
  }
  loop->uv.data = loop;
  uv_async_init(&loop->uv, &loop->wake, noop_async);
  uv_timer_init(&loop->uv, &loop->timer);
  uv_unref((uv_handle_t *)&loop->timer);
  luaL_getmetatable(L, LOOP_MT);
  lua_setmetatable(L, -2);
  return 1;
}

static void run_end_hook(squall_loop *loop) {
  if (loop->end_hook != NULL)
    loop->end_hook(loop, loop->end_hook_arg);
}

uint64_t squall_timeout_ms(double seconds) {
  /* 1e15 s is 31 million years; libuv clamps deadline overflow itself. */
  if (!(seconds > 0))
    return 0;
  if (seconds >= 1e15)
    return (uint64_t)1e18;
  return (uint64_t)ceil(seconds * 1000.0);
}

/* loop:poll(timeout): wait for I/O at most `timeout` seconds (0: do not
 * block, negative: until something happens), dispatch it, and return. */
static int l_poll(lua_State *L) {
  squall_loop *loop = squall_loop_check(L, 1);
  double timeout = luaL_checknumber(L, 2);
  lua_State *outer = loop->L;
  loop->L = L;
  /* Sending gathered writes may resume coroutines that queue callbacks
   * the timeout did not count on: then look at I/O without blocking. */
  if (loop->dirty != NULL) {
    run_end_hook(loop);
    timeout = 0;
  }
  if (timeout == 0) {
    uv_run(&loop->uv, UV_RUN_NOWAIT);
  } else {
    if (timeout > 0) {
      uv_update_time(&loop->uv);
      uv_timer_start(&loop->timer, bound_timer_cb, squall_timeout_ms(timeout),
                     0);
    }
    uv_run(&loop->uv, UV_RUN_ONCE);
    uv_timer_stop(&loop->timer);
  }
  run_end_hook(loop);
  loop->L = outer;
  return 0;
}

static void close_walk_cb(uv_handle_t *h, void *arg) {
  squall_loop *loop = arg;
  if (uv_is_closing(h))
    return;
  if (h == (uv_handle_t *)&loop->wake || h == (uv_handle_t *)&loop->timer) {
    uv_close(h, NULL);
    return;
  }
  squall_handle *sh = h->data;
  if (sh != NULL && sh->close != NULL)
    sh->close(sh);
  else
    uv_close(h, NULL);
}

static void loop_close(lua_State *L, squall_loop *loop) {
  if (loop->closed)
    return;
  lua_State *outer = loop->L;
  loop->L = L;
  if (!loop->finalizing)
    run_end_hook(loop);
  /* Close callbacks resume coroutines parked on the handles (with
   * `closed`), and Lua code may open new handles then (a spec body that
   * reconnects after its timeout): walk again until nothing is left, or
   * uv_run would wait on those for ever. */
  do {
    uv_walk(&loop->uv, close_walk_cb, loop);
  } while (uv_run(&loop->uv, UV_RUN_ONCE) != 0);
  loop->L = outer;
  uv_loop_close(&loop->uv);
  loop->closed = 1;
}

/* loop:close(): close every handle still open on this loop. */
static int l_close(lua_State *L) {
  squall_loop *loop = luaL_checkudata(L, 1, LOOP_MT);
  loop_close(L, loop);
  return 0;
}

static int l_loop_gc(lua_State *L) {
  squall_loop *loop = luaL_checkudata(L, 1, LOOP_MT);
  loop->finalizing = 1;
  loop_close(L, loop);
  return 0;
}

/* core.time(): monotonic seconds, at nanosecond resolution. */
static int l_time(lua_State *L) {
  lua_pushnumber(L, (double)uv_hrtime() / 1e9);
  return 1;
}

/* core.wall_time(): seconds since the epoch, for log lines. */
static int l_wall_time(lua_State *L) {
  uv_timeval64_t tv;
  uv_gettimeofday(&tv);
  lua_pushnumber(L, (double)tv.tv_sec + (double)tv.tv_usec / 1e6);
  return 1;
}

/* core.close_fd(fd): close(2), for IOLoop:close(true). */
static int l_close_fd(lua_State *L) {
  close((int)luaL_checkinteger(L, 1));
  return 0;
}

/* --- watchers: what fd, signal and path watchers share ------------------ */

/* A watcher is owned by its Lua userdata, which it anchors in the registry
 * (self_ref) from start until the uv close callback has run; so the memory
 * outlives every libuv callback, and __gc never sees an open handle. Each
 * kind embeds this first and sets `handle` to its own libuv handle, whose
 * data points at `h`. */
typedef struct {
  squall_handle h;
  squall_loop *loop;
  uv_handle_t *handle;
  int fn_ref;   /* the Lua function called on events */
  int self_ref; /* the userdata, while open */
  int closing;
} watcher;

static void watcher_closed(uv_handle_t *h) {
  watcher *w = (watcher *)h->data;
  if (w->loop->finalizing) /* the registry goes with the state */
    return;
  lua_State *L = w->loop->L;
  luaL_unref(L, LUA_REGISTRYINDEX, w->fn_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, w->self_ref);
  w->fn_ref = w->self_ref = LUA_NOREF;
}

/* Stop watching; harmless when already closed. Also the loop's close. */
static void watcher_close(squall_handle *h) {
  watcher *w = (watcher *)h;
  if (w->closing)
    return;
  w->closing = 1;
  uv_close(w->handle, watcher_closed);
}

static void watcher_init(watcher *w, squall_loop *loop, uv_handle_t *handle) {
  w->h.close = watcher_close;
  w->loop = loop;
  w->handle = handle;
  w->fn_ref = w->self_ref = LUA_NOREF;
  handle->data = &w->h;
}

/* Anchor the function at `fn_idx` and the userdata at the top of L. */
static void watcher_anchor(lua_State *L, watcher *w, int fn_idx) {
  lua_pushvalue(L, fn_idx);
  w->fn_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushvalue(L, -1);
  w->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
}

/* A watcher whose start failed: close it and let libuv finish that now,
 * before an error unwinds (the userdata must outlive the handle). */
static void watcher_abandon(lua_State *L, watcher *w) {
  lua_State *outer = w->loop->L;
  w->loop->L = L;
  w->h.close(&w->h);
  uv_run(&w->loop->uv, UV_RUN_NOWAIT);
  w->loop->L = outer;
}

/* --- fd watchers (add_handler) ---------------------------------------- */

typedef struct {
  watcher w;
  uv_poll_t poll;
  int fd;
} fd_watch;

static int to_uv_events(int events) {
  int uv = 0;
  if (events & EV_READ)
    uv |= UV_READABLE;
  if (events & EV_WRITE)
    uv |= UV_WRITABLE;
  return uv;
}

static void watch_cb(uv_poll_t *p, int status, int uv_events) {
  fd_watch *w = (fd_watch *)p->data;
  lua_State *L = w->w.loop->L;
  int events = 0;
  if (status < 0)
    events = EV_ERROR;
  else {
    if (uv_events & UV_READABLE)
      events |= EV_READ;
    if (uv_events & UV_WRITABLE)
      events |= EV_WRITE;
    if (uv_events & UV_DISCONNECT)
      events |= EV_READ;
  }
  lua_rawgeti(L, LUA_REGISTRYINDEX, w->w.fn_ref);
  lua_pushinteger(L, w->fd);
  lua_pushinteger(L, events);
  squall_loop_call(w->w.loop, 2, "fd handler");
}

/* core.watch_fd(loop, fd, events, fn) -> watcher; fn(fd, events) */
static int l_watch_fd(lua_State *L) {
  squall_loop *loop = squall_loop_check(L, 1);
  int fd = (int)luaL_checkinteger(L, 2);
  int events = (int)luaL_checkinteger(L, 3);
  luaL_checktype(L, 4, LUA_TFUNCTION);
  fd_watch *w = lua_newuserdata(L, sizeof *w);
  memset(w, 0, sizeof *w);
  w->fd = fd;
  int err = uv_poll_init(&loop->uv, &w->poll, fd);
  if (err != 0) {
    w->w.closing = 1; /* no handle was made: nothing to close */
    return luaL_error(L, "cannot watch fd %d: %s", fd, uv_strerror(err));
  }
  watcher_init(&w->w, loop, (uv_handle_t *)&w->poll);
  luaL_getmetatable(L, WATCH_MT);
  lua_setmetatable(L, -2);
  watcher_anchor(L, &w->w, 4);
  err = uv_poll_start(&w->poll, to_uv_events(events), watch_cb);
  if (err != 0) {
    watcher_abandon(L, &w->w);
    return luaL_error(L, "cannot watch fd %d: %s", fd, uv_strerror(err));
  }
  return 1;
}

static fd_watch *check_watch(lua_State *L) {
  fd_watch *w = luaL_checkudata(L, 1, WATCH_MT);
  if (w->w.closing)
    luaL_error(L, "fd handler is removed");
  return w;
}

/* watcher:update(events) */
static int l_watch_update(lua_State *L) {
  fd_watch *w = check_watch(L);
  int events = (int)luaL_checkinteger(L, 2);
  int err = uv_poll_start(&w->poll, to_uv_events(events), watch_cb);
  if (err != 0)
    return luaL_error(L, "cannot watch fd %d: %s", w->fd, uv_strerror(err));
  return 0;
}

/* watcher:close(): stop watching; harmless when already closed. */
static int l_watch_close(lua_State *L) {
  fd_watch *w = luaL_checkudata(L, 1, WATCH_MT);
  watcher_close(&w->w.h);
  return 0;
}

/* --- signals ------------------------------------------------------------ */

typedef struct {
  watcher w;
  uv_signal_t sig;
  const char *name;
  int index; /* in signals[] */
} sig_watch;

static const struct {
  const char *name;
  int num;
} signals[] = {
    {"SIGHUP", SIGHUP},   {"SIGINT", SIGINT},     {"SIGQUIT", SIGQUIT},
    {"SIGTERM", SIGTERM}, {"SIGUSR1", SIGUSR1},   {"SIGUSR2", SIGUSR2},
    {"SIGCHLD", SIGCHLD}, {"SIGWINCH", SIGWINCH}, {"SIGALRM", SIGALRM},
    {"SIGPIPE", SIGPIPE}, {"SIGCONT", SIGCONT},   {"SIGTSTP", SIGTSTP},
};

#define N_SIGNALS (sizeof signals / sizeof signals[0])

/* How many watchers each signal has, and what its disposition was before
 * the first: when the last goes, libuv sets SIG_DFL, and an ignored
 * signal must stay ignored (a fork_processes child starts with SIGHUP
 * ignored; a child whose loop had closed was killed by the next HUP its
 * supervisor forwarded). Signals are the process's: one count for all
 * threads. */
static int watchers_of[N_SIGNALS];
static int ignored_before[N_SIGNALS];

static void sig_watch_close(squall_handle *h) {
  sig_watch *w = (sig_watch *)h;
  if (w->w.closing)
    return;
  watcher_close(h); /* libuv restores SIG_DFL when it was the last */
  if (--watchers_of[w->index] == 0 && ignored_before[w->index])
    signal(signals[w->index].num, SIG_IGN);
}

static void signal_cb(uv_signal_t *s, int signum) {
  (void)signum;
  sig_watch *w = (sig_watch *)s->data;
  lua_State *L = w->w.loop->L;
  lua_rawgeti(L, LUA_REGISTRYINDEX, w->w.fn_ref);
  lua_pushstring(L, w->name);
  squall_loop_call(w->w.loop, 1, "signal handler");
}

/* core.watch_signal(loop, "SIGTERM", fn) -> watcher; fn(name) */
static int l_watch_signal(lua_State *L) {
  squall_loop *loop = squall_loop_check(L, 1);
  const char *name = luaL_checkstring(L, 2);
  luaL_checktype(L, 3, LUA_TFUNCTION);
  size_t i;
  for (i = 0; i < N_SIGNALS; i++)
    if (strcmp(signals[i].name, name) == 0)
      break;
  if (i == N_SIGNALS)
    return luaL_error(L,
                      "unknown signal name '%s' (SIGHUP, SIGINT, SIGQUIT, "
                      "SIGTERM, SIGUSR1, SIGUSR2, SIGCHLD, SIGWINCH, SIGALRM, "
                      "SIGPIPE, SIGCONT or SIGTSTP)",
                      name);
  sig_watch *w = lua_newuserdata(L, sizeof *w);
  memset(w, 0, sizeof *w);
  w->name = signals[i].name;
  w->index = (int)i;
  uv_signal_init(&loop->uv, &w->sig);
  watcher_init(&w->w, loop, (uv_handle_t *)&w->sig);
  w->w.h.close = sig_watch_close;
  if (watchers_of[i]++ == 0) {
    struct sigaction sa;
    ignored_before[i] =
        sigaction(signals[i].num, NULL, &sa) == 0 && sa.sa_handler == SIG_IGN;
  }
  /* A signal handler alone does not keep the loop alive. */
  uv_unref((uv_handle_t *)&w->sig);
  luaL_getmetatable(L, SIGNAL_MT);
  lua_setmetatable(L, -2);
  watcher_anchor(L, &w->w, 3);
  int err = uv_signal_start(&w->sig, signal_cb, signals[i].num);
  if (err != 0) {
    watcher_abandon(L, &w->w);
    return luaL_error(L, "cannot watch %s: %s", name, uv_strerror(err));
  }
  return 1;
}

static int l_signal_close(lua_State *L) {
  sig_watch *w = luaL_checkudata(L, 1, SIGNAL_MT);
  sig_watch_close(&w->w.h);
  return 0;
}

/* --- file system events -------------------------------------------------- */

#define PATH_MT "squall.path_watch"

/* A watched file or directory (inotify through uv_fs_event). */
typedef struct {
  watcher w;
  uv_fs_event_t ev;
} path_watch;

static void path_cb(uv_fs_event_t *e, const char *filename, int events,
                    int status) {
  path_watch *w = (path_watch *)e->data;
  if (w->w.closing)
    return;
  lua_State *L = w->w.loop->L;
  lua_rawgeti(L, LUA_REGISTRYINDEX, w->w.fn_ref);
  if (filename != NULL)
    lua_pushstring(L, filename);
  else
    lua_pushnil(L);
  lua_pushinteger(L, status < 0 ? -1 : events);
  squall_loop_call(w->w.loop, 2, "path watcher");
}

/* core.watch_path(loop, path, fn) -> watcher | nil, err
 * fn(filename, events) when something in `path` changes. It does not keep
 * the loop alive. */
static int l_watch_path(lua_State *L) {
  squall_loop *loop = squall_loop_check(L, 1);
  const char *path = luaL_checkstring(L, 2);
  luaL_checktype(L, 3, LUA_TFUNCTION);
  path_watch *w = lua_newuserdata(L, sizeof *w);
  memset(w, 0, sizeof *w);
  uv_fs_event_init(&loop->uv, &w->ev);
  watcher_init(&w->w, loop, (uv_handle_t *)&w->ev);
  uv_unref((uv_handle_t *)&w->ev);
  luaL_getmetatable(L, PATH_MT);
  lua_setmetatable(L, -2);
  watcher_anchor(L, &w->w, 3);
  int err = uv_fs_event_start(&w->ev, path_cb, path, 0);
  if (err != 0) {
    watcher_abandon(L, &w->w);
    return squall_push_uv_error(L, err);
  }
  return 1;
}

static int l_path_close(lua_State *L) {
  path_watch *w = luaL_checkudata(L, 1, PATH_MT);
  watcher_close(&w->w.h);
  return 0;
}

int squall_loop_open(lua_State *L) {
  static const luaL_Reg loop_m[] = {
      {"poll", l_poll}, {"close", l_close}, {"__gc", l_loop_gc}, {NULL, NULL}};
  static const luaL_Reg watch_m[] = {
      {"update", l_watch_update}, {"close", l_watch_close}, {NULL, NULL}};
  static const luaL_Reg signal_m[] = {{"close", l_signal_close}, {NULL, NULL}};
  squall_new_metatable(L, LOOP_MT, loop_m);
  squall_new_metatable(L, WATCH_MT, watch_m);
  squall_new_metatable(L, SIGNAL_MT, signal_m);
  static const luaL_Reg path_m[] = {{"close", l_path_close}, {NULL, NULL}};
  squall_new_metatable(L, PATH_MT, path_m);
  static const luaL_Reg fns[] = {
      {"loop_new", l_loop_new},     {"time", l_time},
      {"wall_time", l_wall_time},   {"close_fd", l_close_fd},
      {"watch_fd", l_watch_fd},     {"watch_signal", l_watch_signal},
      {"watch_path", l_watch_path}, {NULL, NULL}};
  luaL_register(L, NULL, fns);
  return 0;
}
