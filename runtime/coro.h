/* coro.h: parking a coroutine on an operation and resuming it.
 *
 * Every resume of a coroutine from C, and from Lua through core.resume,
 * goes through squall_coro_resume so that errors are reported the same way
 * everywhere, with the coroutine's own traceback.
 */
#ifndef SQUALL_CORO_H
#define SQUALL_CORO_H

#include <lua.h>

/* Anchor the running coroutine L in the registry so it is not collected
 * while parked; returns the reference for squall_coro_resume_ref. Raises
 * when L is the main thread (a yielding call needs a coroutine). */
int squall_coro_park(lua_State *L, const char *what);

/* Resume the suspended coroutine `co` with the nargs values on top of its
 * own stack. Values it yields are dropped; an error it raises is reported
 * with its traceback through squall_host_report. Returns the lua_resume
 * status. `L` is the running thread, used only for reporting. */
int squall_coro_resume(lua_State *L, lua_State *co, int nargs);

/* Push the parked coroutine `ref` onto L and release its reference. The
 * caller pushes the results onto the returned thread and calls
 * squall_coro_resume; the thread stays on L's stack (anchored) until the
 * caller pops it. */
lua_State *squall_coro_unpark(lua_State *L, int ref);

/* Add core.resume, core.running to the table at the top of the stack. */
int squall_coro_open(lua_State *L);

#endif
