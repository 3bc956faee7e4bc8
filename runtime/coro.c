/* coro.c: the one place coroutines are parked and resumed. */
#include "coro.h"

#include <lauxlib.h>

#include "host.h"

#define ON_FINISH_KEY "squall.coro.on_finish"
#define ON_KEPT_KEY "squall.coro.on_kept"

/* The coroutine squall_coro_resume is running now (innermost), or NULL.
 * A coroutine may wait only when it is this one: its yield then comes back
 * to squall_coro_resume. One started by coroutine.wrap or .resume would
 * hand its yield to that caller instead, and Squall's later resume would
 * run it from the wrong place (the result lost, the caller confused). */
static _Thread_local lua_State *resumed_now; /* per thread: workers too */

/* resumed_now is lent to a call (squall_coro_lend): if it yields now, the
 * call kept it. Saved and restored with resumed_now, so it belongs to one
 * level of resume: a coroutine the call resumes starts unlent. */
static _Thread_local int lent_now;

void squall_coro_lend(int on) {
  lent_now = on;
}

int squall_coro_can_wait(lua_State *L) {
  return L == resumed_now;
}

/* Push why the running code of L may not wait, naming `what`; the one
 * text for C's checks and Lua's (util.need_coroutine, through
 * core.wait_refusal). */
static void push_refusal(lua_State *L, const char *what) {
  int main_thread = lua_pushthread(L);
  lua_pop(L, 1);
  if (main_thread)
    lua_pushfstring(L,
                    "%s waits, so it must run inside a coroutine (gen.spawn, "
                    "a handler, or loop:run_sync)",
                    what);
  else
    lua_pushfstring(L,
                    "%s waits, but this coroutine was started with "
                    "coroutine.wrap or coroutine.resume, which would get its "
                    "yield: start it with gen.spawn",
                    what);
}

int squall_coro_check(lua_State *L, const char *what) {
  if (L == resumed_now)
    return 0;
  luaL_where(L, 1);
  push_refusal(L, what);
  lua_concat(L, 2);
  return lua_error(L);
}

/* core.wait_refusal(what) -> nil when the running coroutine may wait, else
 * why not. */
static int l_wait_refusal(lua_State *L) {
  const char *what = luaL_checkstring(L, 1);
  if (L == resumed_now)
    return 0;
  push_refusal(L, what);
  return 1;
}

int squall_coro_park(lua_State *L, const char *what) {
  squall_coro_check(L, what);
  lua_pushthread(L);
  return luaL_ref(L, LUA_REGISTRYINDEX);
}

lua_State *squall_coro_unpark(lua_State *L, int ref) {
  lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
  luaL_unref(L, LUA_REGISTRYINDEX, ref);
  return lua_tothread(L, -1);
}

/* A coroutine that is a key of a table given to core.on_finish(tbl, fn)
 * goes to fn(co, traceback) when it finishes (traceback nil when it
 * returned), and an error it raised skips the generic report. TCPServer
 * learns this way that a handler ended, so its coroutine needs no frame
 * of TCPServer's own under the handler (serve tail-calls handle_stream:
 * a shallower stack that the JIT-compiled handler loop does not grow, a
 * figure of memory per idle connection) nor an xpcall frame, and costs
 * no table entry besides the one in its server's table of running
 * handlers (the tbl). There are as many tables as servers, so the walk is
 * short. With `has_tb` the traceback is on top of L. Returns 1 when a
 * handler took it (the traceback is consumed), else 0 (it stays). */
static int run_on_finish(lua_State *L, lua_State *co, int has_tb) {
  int base = lua_gettop(L);
  lua_getfield(L, LUA_REGISTRYINDEX, ON_FINISH_KEY); /* base+1: groups */
  lua_pushnil(L);
  while (lua_next(L, base + 1) != 0) { /* base+2: tbl, base+3: fn */
    lua_pushthread(co);
    lua_xmove(co, L, 1);
    lua_rawget(L, base + 2);
    int mine = !lua_isnil(L, -1);
    lua_pop(L, 1);
    if (mine && lua_isfunction(L, base + 3)) {
      lua_pushthread(co);
      lua_xmove(co, L, 1);
      if (has_tb)
        lua_pushvalue(L, base);
      else
        lua_pushnil(L);
      if (squall_host_pcall(L, 2, 0) != 0)
        squall_host_report(L, "coroutine finish handler");
      lua_settop(L, base - has_tb); /* tbl, groups and the traceback */
      return 1;
    }
    lua_pop(L, 1); /* fn; tbl stays as the key */
  }
  lua_settop(L, base);
  return 0;
}

/* Resume co once: the lua_resume status; *kept says whether it yielded
 * while lent. */
static int resume_once(lua_State *L, lua_State *co, int nargs, int *kept) {
  lua_State *outer = resumed_now;
  int outer_lent = lent_now;
  resumed_now = co;
  lent_now = 0;
  int status = lua_resume(co, nargs);
  *kept = status == LUA_YIELD && lent_now;
  resumed_now = outer;
  lent_now = outer_lent;
  if (status == 0 || status == LUA_YIELD) {
    /* Yielded values go to whoever resumes it next: nobody here; a
     * finished coroutine's results go nowhere. */
    lua_settop(co, 0);
    if (status == 0)
      run_on_finish(L, co, 0);
    return status;
  }
  /* The coroutine is dead; build the report on L from co's stack. */
  lua_xmove(co, L, 1); /* the error value, described on L (protected) */
  luaL_traceback(L, co, squall_host_describe(L, -1), 0);
  lua_replace(L, -3); /* the traceback replaces the error value */
  lua_pop(L, 1);      /* the description */
  lua_settop(co, 0);
  if (!run_on_finish(L, co, 1))
    squall_host_report(L, "coroutine");
  return status;
}

static int can_resume(lua_State *L, lua_State *co);

/* co yielded while lent: the call it ran keeps it. Ask the hook
 * (core.on_kept) what carries on co's own work. It returns nothing, or a
 * coroutine and its arguments, which are pushed: the thread at the
 * returned index, its arguments moved onto it. 0 when nothing follows. */
static int carry_on(lua_State *L, lua_State *co, int *nargs) {
  int base = lua_gettop(L);
  lua_getfield(L, LUA_REGISTRYINDEX, ON_KEPT_KEY);
  if (!lua_isfunction(L, -1)) {
    lua_settop(L, base);
    return 0;
  }
  lua_pushthread(co);
  lua_xmove(co, L, 1);
  if (squall_host_pcall(L, 1, LUA_MULTRET) != 0) {
    squall_host_report(L, "core.on_kept hook");
    lua_settop(L, base);
    return 0;
  }
  lua_State *next = lua_gettop(L) > base ? lua_tothread(L, base + 1) : NULL;
  int n = lua_gettop(L) - base - 1;
  if (next == NULL || !can_resume(L, next) ||
      !lua_checkstack(next, n + LUA_MINSTACK)) {
    lua_settop(L, base);
    return 0;
  }
  lua_xmove(L, next, n); /* the thread stays on L: anchored while it runs */
  *nargs = n;
  return base + 1;
}

int squall_coro_resume(lua_State *L, lua_State *co, int nargs) {
  int kept;
  int status = resume_once(L, co, nargs, &kept);
  /* A loop, not a recursion: when what carries on is kept in turn (the
   * next request waits too), its successor starts here as well, and the C
   * stack stays as deep as one resume. */
  while (kept) {
    int at = carry_on(L, co, &nargs);
    if (at == 0)
      break;
    co = lua_tothread(L, at);
    resume_once(L, co, nargs, &kept);
    lua_remove(L, at);
  }
  return status;
}

/* core.on_kept(fn): call fn(co) when co yields while lent
 * (squall_coro_lend); fn returns nothing, or a coroutine and the arguments
 * to resume it with at once. One hook for the process; nil removes it. */
static int l_on_kept(lua_State *L) {
  if (!lua_isnil(L, 1))
    luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_settop(L, 1);
  lua_setfield(L, LUA_REGISTRYINDEX, ON_KEPT_KEY);
  return 0;
}

/* core.on_finish(tbl, fn): when a coroutine that is a key of `tbl`
 * finishes, call fn(co, traceback), traceback nil when it returned; fn
 * nil forgets tbl. Both are held weakly: the owner of tbl keeps fn too. */
static int l_on_finish(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  if (!lua_isnil(L, 2))
    luaL_checktype(L, 2, LUA_TFUNCTION);
  lua_settop(L, 2);
  lua_getfield(L, LUA_REGISTRYINDEX, ON_FINISH_KEY);
  lua_insert(L, 1);
  lua_rawset(L, 1);
  return 0;
}

/* What coroutine.status would say, without the coroutine library. */
static int can_resume(lua_State *L, lua_State *co) {
  if (co == L)
    return 0;
  if (lua_status(co) == LUA_YIELD)
    return 1;
  if (lua_status(co) != 0)
    return 0;
  lua_Debug ar;
  if (lua_getstack(co, 0, &ar) > 0)
    return 0;                /* normal: it resumed another coroutine */
  return lua_gettop(co) > 0; /* not started yet */
}

/* core.resume(co, ...): resume a suspended coroutine; returns true, or
 * false when it cannot be resumed (dead, running). */
static int l_resume(lua_State *L) {
  lua_State *co = lua_tothread(L, 1);
  luaL_argcheck(L, co != NULL, 1, "coroutine expected");
  if (!can_resume(L, co)) {
    lua_pushboolean(L, 0);
    return 1;
  }
  int nargs = lua_gettop(L) - 1;
  /* lua_xmove does not grow the target's stack: a new coroutine has
   * room for a few dozen values, and an RPC request may bring thousands. */
  if (!lua_checkstack(co, nargs + LUA_MINSTACK))
    return luaL_error(L, "resume: too many arguments (%d)", nargs);
  lua_xmove(L, co, nargs);
  squall_coro_resume(L, co, nargs);
  lua_pushboolean(L, 1);
  return 1;
}

/* core.can_wait(): true when the running coroutine may wait (gen.lua asks
 * before it yields; see resumed_now). */
static int l_can_wait(lua_State *L) {
  lua_pushboolean(L, squall_coro_can_wait(L));
  return 1;
}

int squall_coro_open(lua_State *L) {
  lua_pushcfunction(L, l_can_wait);
  lua_setfield(L, -2, "can_wait");
  lua_pushcfunction(L, l_wait_refusal);
  lua_setfield(L, -2, "wait_refusal");
  lua_newtable(L); /* handler tables -> their finish function, weak */
  lua_createtable(L, 0, 1);
  lua_pushliteral(L, "kv");
  lua_setfield(L, -2, "__mode");
  lua_setmetatable(L, -2);
  lua_setfield(L, LUA_REGISTRYINDEX, ON_FINISH_KEY);
  lua_pushcfunction(L, l_on_finish);
  lua_setfield(L, -2, "on_finish");
  lua_pushcfunction(L, l_resume);
  lua_setfield(L, -2, "resume");
  lua_pushcfunction(L, l_on_kept);
  lua_setfield(L, -2, "on_kept");
  return 0;
}
