/* thread.c: worker threads for blocking or CPU-heavy Lua work (see
 * thread.h).
 *
 * A pool owns `size` threads, each with a lua_State of its own (LuaJIT
 * states are never shared between threads). A job carries its module and
 * function names and its arguments as MessagePack bytes: copying through
 * bytes is what keeps the states apart. A worker decodes, calls
 * require(module)[func](...) under pcall, and encodes (ok, results...)
 * back; the loop learns of finished jobs through a uv_async_t, never by
 * polling, and calls each job's Lua callback on the loop's thread.
 *
 * Lifetime: the pool is shared by the loop's side (its userdata and the
 * async handle) and its threads. Closing it (pool:close(), the loop
 * closing, or the collector) drops the jobs not yet started and tells the
 * threads to end after their current one, without waiting for them: a job
 * may run for minutes, and the loop must not. Each thread closes its own
 * state as it ends. When the loop closes (or collects the pool), the idle
 * threads are joined, so none is still ending when the process exits; one
 * busy with a job is detached and ends by itself. The pool's memory goes
 * with whichever side finishes last: the loop's, once the async handle is
 * closed and the userdata collected, or the last thread's. A thread wakes
 * the loop only while the async handle is not closing (checked under the
 * mutex).
 */
#include "thread.h"

#include <errno.h>
#include <lauxlib.h>
#include <pthread.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "host.h"
#include "loop.h"
#include "msgpack.h"

#define POOL_MT "squall.thread_pool"

typedef struct job {
  struct job *next;
  char *module, *func;
  char *data; /* arguments in, then (ok, results...) out, as MessagePack */
  size_t len;
  int failed;    /* the worker could not even run it: data is a message */
  lua_Number id; /* the caller's, handed back to the pool's callback */
} job;

struct pool;

/* One thread of a pool. */
typedef struct worker {
  struct pool *p;
  pthread_t t;
  int started;
  int busy; /* under the pool's mu: running a job */
} worker;

typedef struct pool {
  squall_handle h; /* first: the loop closes us through it */
  squall_loop *loop;
  uv_async_t async;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  job *todo, **todo_end; /* waiting for a worker, in order */
  job *done, **done_end; /* finished, for the loop */
  /* Under mu: */
  int threads_live;  /* started and not yet ended */
  int stopping;      /* no new job: threads end after their current one */
  int async_closing; /* threads must not wake the loop any more */
  int loop_done;     /* the async handle closed and the userdata gone */
  /* The loop's thread only: */
  int in_flight, async_open, ud_alive;
  int cb_ref;         /* on_done(id, ok, bytes), until the pool stops */
  char *path, *cpath; /* the host's package paths, for every worker */
  worker *workers;
  int nworkers;
} pool;

/* What a worker runs for each job (a chunk compiled once per state). */
static const char WORKER_CHUNK[] =
    "local mp = require 'squall.msgpack'\n"
    "local core = require 'squall.core'\n"
    "local unpack, pcall, select = unpack, pcall, select\n"
    "local function pack(...) return { n = select('#', ...), ... } end\n"
    /* util.check_main_thread reads these: a worker may not start threads,
     * run a loop or listen (the main script required as a module would
     * start them all again in every worker) */
    "core.in_worker = true\n"
    "return function(module, func, data)\n"
    "  local args = mp.decode(data)\n"
    "  local function run()\n"
    "    core.worker_loading = module\n"
    "    local ok, m = pcall(require, module)\n"
    "    core.worker_loading = nil\n"
    "    if not ok then error(m, 0) end\n"
    "    local f = type(m) == 'table' and m[func]\n"
    "    if type(f) ~= 'function' then\n"
    "      error(('%s.%s is not a function'):format(module, func), 0)\n"
    "    end\n"
    "    return f(mp.values(args))\n"
    "  end\n"
    "  local res = pack(pcall(run))\n"
    "  if not res[1] then return mp.encode_array(false, tostring(res[2])) end\n"
    "  local ok, bytes = pcall(mp.encode_array, unpack(res, 1, res.n))\n"
    "  if ok then return bytes end\n"
    "  return mp.encode_array(false, 'the results cannot be copied back: ' .. "
    "bytes)\n"
    "end\n";

static char *dup_bytes(const char *p, size_t n) {
  char *d = malloc(n + 1);
  if (d != NULL) {
    memcpy(d, p, n);
    d[n] = '\0';
  }
  return d;
}

/* A worker's state: the host's, with the caller's package paths and the
 * job runner on the registry. NULL (and `err` set) on failure. */
static lua_State *worker_state(pool *p, const char **err) {
  lua_State *L = squall_host_new();
  if (L == NULL) {
    *err = "out of memory creating a worker's Lua state";
    return NULL;
  }
  lua_getglobal(L, "package");
  lua_pushstring(L, p->path);
  lua_setfield(L, -2, "path");
  lua_pushstring(L, p->cpath);
  lua_setfield(L, -2, "cpath");
  lua_pop(L, 1);
  if (luaL_loadbuffer(L, WORKER_CHUNK, sizeof WORKER_CHUNK - 1,
                      "=(squall worker)") != 0 ||
      lua_pcall(L, 0, 1, 0) != 0) {
    *err = "the worker's runner did not load";
    lua_close(L);
    return NULL;
  }
  lua_setfield(L, LUA_REGISTRYINDEX, "squall.thread.run");
  return L;
}

/* Run one job in the worker's state; its data becomes the answer. */
static void run_job(lua_State *L, job *j) {
  lua_getfield(L, LUA_REGISTRYINDEX, "squall.thread.run");
  lua_pushstring(L, j->module);
  lua_pushstring(L, j->func);
  lua_pushlstring(L, j->data, j->len);
  int status = lua_pcall(L, 3, 1, 0);
  size_t n = 0;
  const char *out = lua_tolstring(L, -1, &n);
  free(j->data);
  j->data = dup_bytes(out ? out : "the worker failed", out ? n : 17);
  j->len = out ? n : 17;
  j->failed = status != 0 || out == NULL;
  lua_settop(L, 0);
  lua_gc(L, LUA_GCSTEP, 0);
}

static void free_pool(pool *p);

static void *worker_main(void *arg) {
  worker *w = arg;
  pool *p = w->p;
  const char *err = NULL;
  /* A worker yields the CPU to the event loop's thread: on Linux a
   * thread has a nice value of its own, and 5 above the loop's lets the
   * loop answer at once while the workers compute (make bench's echo p99
   * with both CPUs busy). Raising one's own nice needs no privilege. */
  pid_t tid = (pid_t)syscall(SYS_gettid);
  errno = 0;
  int nice_now = getpriority(PRIO_PROCESS, (id_t)tid);
  if (errno == 0)
    (void)setpriority(PRIO_PROCESS, (id_t)tid, nice_now + 5);
  lua_State *L = worker_state(p, &err);
  for (;;) {
    pthread_mutex_lock(&p->mu);
    while (p->todo == NULL && !p->stopping)
      pthread_cond_wait(&p->cv, &p->mu);
    if (p->stopping) {
      pthread_mutex_unlock(&p->mu);
      break;
    }
    job *j = p->todo;
    p->todo = j->next;
    if (p->todo == NULL)
      p->todo_end = &p->todo;
    w->busy = 1;
    pthread_mutex_unlock(&p->mu);

    if (L != NULL) {
      run_job(L, j);
    } else {
      free(j->data);
      j->data = dup_bytes(err, strlen(err));
      j->len = strlen(err);
      j->failed = 1;
    }
    j->next = NULL;
    pthread_mutex_lock(&p->mu);
    *p->done_end = j;
    p->done_end = &j->next;
    w->busy = 0;
    if (!p->async_closing)
      uv_async_send(&p->async);
    pthread_mutex_unlock(&p->mu);
  }
  if (L != NULL)
    lua_close(L);
  squall_msgpack_thread_exit();
  pthread_mutex_lock(&p->mu);
  int last = --p->threads_live == 0 && p->loop_done;
  pthread_mutex_unlock(&p->mu);
  if (last)
    free_pool(p);
  return NULL;
}

static void free_job(job *j) {
  free(j->module);
  free(j->func);
  free(j->data);
  free(j);
}

/* On the loop's thread: call back every finished job, in order (none
 * once the pool stopped: Lua failed those calls when it closed it). */
static void on_async(uv_async_t *a) {
  pool *p = a->data;
  lua_State *L = p->loop->finalizing ? NULL : p->loop->L;
  pthread_mutex_lock(&p->mu);
  job *list = p->done;
  p->done = NULL;
  p->done_end = &p->done;
  int stopping = p->stopping;
  pthread_mutex_unlock(&p->mu);
  while (list != NULL) {
    job *j = list;
    list = j->next;
    if (p->in_flight > 0 && --p->in_flight == 0)
      uv_unref((uv_handle_t *)&p->async); /* idle: do not hold the loop */
    if (L != NULL && !stopping) {
      lua_rawgeti(L, LUA_REGISTRYINDEX, p->cb_ref);
      lua_pushnumber(L, j->id);
      lua_pushboolean(L, !j->failed);
      lua_pushlstring(L, j->data, j->len);
      squall_loop_call(p->loop, 3, "thread callback");
    }
    free_job(j);
  }
}

static void free_pool(pool *p) {
  for (job *lists[2] = {p->todo, p->done}, **l = lists; l < lists + 2; l++)
    while (*l != NULL) {
      job *j = *l;
      *l = j->next;
      free_job(j);
    }
  free(p->path);
  free(p->cpath);
  free(p->workers);
  pthread_mutex_destroy(&p->mu);
  pthread_cond_destroy(&p->cv);
  free(p);
}

/* The loop's side is finished with the pool once its async handle is
 * closed and its userdata collected; the last thread may still run. */
static void loop_side_done(pool *p) {
  if (p->async_open || p->ud_alive)
    return;
  pthread_mutex_lock(&p->mu);
  p->loop_done = 1;
  int last = p->threads_live == 0;
  pthread_mutex_unlock(&p->mu);
  if (last)
    free_pool(p);
}

static void async_closed(uv_handle_t *h) {
  pool *p = h->data;
  p->async_open = 0;
  loop_side_done(p);
}

/* Take no more jobs and drop those not started; the threads end after
 * their current job, unwaited. Lua fails every call still waiting. */
static void stop_pool(pool *p) {
  pthread_mutex_lock(&p->mu);
  if (p->stopping) {
    pthread_mutex_unlock(&p->mu);
    return;
  }
  p->stopping = 1;
  job *todo = p->todo;
  p->todo = NULL;
  p->todo_end = &p->todo;
  pthread_cond_broadcast(&p->cv);
  pthread_mutex_unlock(&p->mu);
  while (todo != NULL) {
    job *j = todo;
    todo = j->next;
    free_job(j);
  }
  lua_State *L = p->loop->finalizing ? NULL : p->loop->L;
  if (L != NULL)
    luaL_unref(L, LUA_REGISTRYINDEX, p->cb_ref);
  p->cb_ref = LUA_NOREF;
  if (p->in_flight > 0) {
    p->in_flight = 0;
    uv_unref((uv_handle_t *)&p->async);
  }
}

/* Stop, join the idle threads (they end at once) and detach the busy
 * ones, and close the async handle: the loop closing, or the collector.
 * Runs once. */
static void close_pool(squall_handle *h) {
  pool *p = (pool *)h;
  stop_pool(p);
  pthread_mutex_lock(&p->mu);
  if (p->async_closing) {
    pthread_mutex_unlock(&p->mu);
    return;
  }
  p->async_closing = 1;
  pthread_mutex_unlock(&p->mu);
  for (int i = 0; i < p->nworkers; i++) {
    worker *w = &p->workers[i];
    if (!w->started)
      continue;
    pthread_mutex_lock(&p->mu);
    int busy = w->busy;
    pthread_mutex_unlock(&p->mu);
    if (busy)
      pthread_detach(w->t);
    else
      pthread_join(w->t, NULL);
  }
  uv_close((uv_handle_t *)&p->async, async_closed);
}

static pool *check_pool(lua_State *L) {
  pool **pp = squall_checkudata(L, 1, POOL_MT);
  if (*pp == NULL || (*pp)->stopping)
    luaL_error(L, "the thread pool is closed");
  return *pp;
}

/* pool:submit(module, func, args_bytes, id): the pool's on_done(id, ok,
 * bytes) runs on the loop once a worker is done (bytes: (ok, results...)
 * as MessagePack, or a message when not ok). */
static int l_submit(lua_State *L) {
  pool *p = check_pool(L);
  size_t mlen, flen, n;
  const char *module = luaL_checklstring(L, 2, &mlen);
  const char *func = luaL_checklstring(L, 3, &flen);
  const char *data = luaL_checklstring(L, 4, &n);
  lua_Number id = luaL_checknumber(L, 5);
  job *j = calloc(1, sizeof *j);
  if (j == NULL)
    return luaL_error(L, "out of memory");
  j->module = dup_bytes(module, mlen);
  j->func = dup_bytes(func, flen);
  j->data = dup_bytes(data, n);
  j->len = n;
  j->id = id;
  if (j->module == NULL || j->func == NULL || j->data == NULL) {
    free_job(j);
    return luaL_error(L, "out of memory");
  }
  if (p->in_flight++ == 0)
    uv_ref((uv_handle_t *)&p->async);
  pthread_mutex_lock(&p->mu);
  *p->todo_end = j;
  p->todo_end = &j->next;
  pthread_cond_signal(&p->cv);
  pthread_mutex_unlock(&p->mu);
  return 0;
}

static int l_pool_close(lua_State *L) {
  pool **pp = squall_checkudata(L, 1, POOL_MT);
  if (*pp != NULL)
    stop_pool(*pp);
  return 0;
}

static int l_pool_gc(lua_State *L) {
  pool **pp = squall_checkudata(L, 1, POOL_MT);
  pool *p = *pp;
  if (p == NULL)
    return 0;
  *pp = NULL;
  p->ud_alive = 0;
  close_pool(&p->h);
  loop_side_done(p);
  return 0;
}

/* core.thread_pool(loop, size, path, cpath, on_done) -> pool, where
 * on_done(id, ok, bytes) runs for each job submitted with `id` */
static int l_thread_pool(lua_State *L) {
  squall_loop *loop = squall_loop_check(L, 1);
  int size = (int)luaL_checkinteger(L, 2);
  luaL_argcheck(L, size >= 1 && size <= 256, 2, "size must be from 1 to 256");
  const char *path = luaL_checkstring(L, 3);
  const char *cpath = luaL_checkstring(L, 4);
  luaL_checktype(L, 5, LUA_TFUNCTION);
  pool **pp = lua_newuserdata(L, sizeof *pp);
  *pp = NULL;
  luaL_getmetatable(L, POOL_MT);
  lua_setmetatable(L, -2);
  pool *p = calloc(1, sizeof *p);
  if (p == NULL)
    return luaL_error(L, "out of memory");
  p->h.close = close_pool;
  p->loop = loop;
  p->todo_end = &p->todo;
  p->done_end = &p->done;
  p->ud_alive = 1;
  p->path = dup_bytes(path, strlen(path));
  p->cpath = dup_bytes(cpath, strlen(cpath));
  p->workers = calloc((size_t)size, sizeof *p->workers);
  p->nworkers = size;
  pthread_mutex_init(&p->mu, NULL);
  pthread_cond_init(&p->cv, NULL);
  if (p->path == NULL || p->cpath == NULL || p->workers == NULL) {
    free_pool(p);
    return luaL_error(L, "out of memory");
  }
  uv_async_init(&loop->uv, &p->async, on_async);
  p->async.data = p;
  p->async_open = 1;
  uv_unref((uv_handle_t *)&p->async);
  lua_pushvalue(L, 5);
  p->cb_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  *pp = p;
  int started = 0;
  for (; started < size; started++) {
    worker *w = &p->workers[started];
    w->p = p;
    pthread_mutex_lock(&p->mu);
    int failed = pthread_create(&w->t, NULL, worker_main, w);
    if (!failed) {
      w->started = 1;
      p->threads_live++;
    }
    pthread_mutex_unlock(&p->mu);
    if (failed)
      break;
  }
  if (started == 0) {
    close_pool(&p->h);
    return luaL_error(L, "could not start any worker thread");
  }
  return 1;
}

int squall_thread_open(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"submit", l_submit},
      {"close", l_pool_close},
      {"__gc", l_pool_gc},
      {NULL, NULL},
  };
  squall_new_metatable(L, POOL_MT, methods);
  lua_pushcfunction(L, l_thread_pool);
  lua_setfield(L, -2, "thread_pool");
  return 0;
}
