/* coro.c: the one place coroutines are parked and resumed. */
#include "coro.h"

#include <lauxlib.h>

#include "host.h"

#define ON_ERROR_KEY "squall.coro.on_error"

/* The coroutine squall_coro_resume is running now (innermost), or NULL.
 * A coroutine may wait only when it is this one: its yield then comes back
 * to squall_coro_resume. One started by coroutine.wrap or .resume would
 * hand its yield to that caller instead, and Squall's later resume would
 * run it from the wrong place (the result lost, the caller confused). */
static _Thread_local lua_State *resumed_now; /* per thread: workers too */

int squall_coro_can_wait(lua_State *L) {
  return L == resumed_now;
}

int squall_coro_check(lua_State *L, const char *what) {
  if (L == resumed_now)
    return 0;
  if (lua_pushthread(L)) {
    lua_pop(L, 1);
    return luaL_error(L,
                      "%s waits, so it must run inside a coroutine "
                      "(or pass a callback)",
                      what);
  }
  lua_pop(L, 1);
  return luaL_error(L,
                    "%s waits, but this coroutine was started with "
                    "coroutine.wrap or coroutine.resume, which would get its "
                    "yield: start it with gen.spawn (or pass a callback)",
                    what);
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

int squall_coro_resume(lua_State *L, lua_State *co, int nargs) {
  lua_State *outer = resumed_now;
  resumed_now = co;
  int status = lua_resume(co, nargs);
  resumed_now = outer;
  if (status == 0 || status == LUA_YIELD) {
    /* Yielded values go to whoever resumes it next: nobody here. */
    lua_settop(co, 0);
    return status;
  }
  /* The coroutine is dead; build the report on L from co's stack. */
  lua_xmove(co, L, 1); /* the error value, described on L (protected) */
  luaL_traceback(L, co, squall_host_describe(L, -1), 0);
  lua_replace(L, -3); /* the traceback replaces the error value */
  lua_pop(L, 1);      /* the description */
  /* A coroutine that is a key of a table given to core.on_error(tbl, fn)
   * goes to fn(co, traceback) instead of the generic report: TCPServer
   * cleans up after its handlers this way, without an xpcall frame on
   * every connection's stack and without an entry per connection (its
   * table of running handlers is the tbl). There are as many tables as
   * servers, so the walk is short, and it happens only on an error. */
  lua_pushthread(co);
  lua_xmove(co, L, 1); /* [tb, co] */
  lua_settop(co, 0);
  lua_getfield(L, LUA_REGISTRYINDEX, ON_ERROR_KEY); /* [tb, co, groups] */
  lua_pushnil(L);
  while (lua_next(L, -2) != 0) { /* [..., groups, tbl, fn] */
    lua_pushvalue(L, -4);
    lua_rawget(L, -3);
    int mine = !lua_isnil(L, -1);
    lua_pop(L, 1);
    if (mine && lua_isfunction(L, -1)) {
      lua_pushvalue(L, -4); /* co: [tb, co, groups, tbl, fn, co] */
      lua_pushvalue(L, -6); /* the traceback */
      if (squall_host_pcall(L, 2, 0) != 0)
        squall_host_report(L, "coroutine error handler");
      lua_pop(L, 4); /* tbl, groups, co, the traceback */
      return status;
    }
    lua_pop(L, 1);
  }
  lua_pop(L, 2); /* groups, co */
  squall_host_report(L, "coroutine");
  return status;
}

/* core.on_error(tbl, fn): when a coroutine that is a key of `tbl` dies of
 * an error, call fn(co, traceback) instead of logging it; fn nil forgets
 * tbl. Both are held weakly: the owner of tbl keeps fn too. */
static int l_on_error(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  if (!lua_isnil(L, 2))
    luaL_checktype(L, 2, LUA_TFUNCTION);
  lua_settop(L, 2);
  lua_getfield(L, LUA_REGISTRYINDEX, ON_ERROR_KEY);
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
  lua_newtable(L); /* table of coroutines -> error handler, weak */
  lua_createtable(L, 0, 1);
  lua_pushliteral(L, "kv");
  lua_setfield(L, -2, "__mode");
  lua_setmetatable(L, -2);
  lua_setfield(L, LUA_REGISTRYINDEX, ON_ERROR_KEY);
  lua_pushcfunction(L, l_on_error);
  lua_setfield(L, -2, "on_error");
  lua_pushcfunction(L, l_resume);
  lua_setfield(L, -2, "resume");
  return 0;
}
