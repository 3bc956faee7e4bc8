/* coro.h: parking a coroutine on an operation and resuming it.
 *
 * Every resume of a coroutine from C, and from Lua through core.resume,
 * goes through squall_coro_resume so that errors are reported the same way
 * everywhere, with the coroutine's own traceback.
 */
#ifndef SQUALL_CORO_H
#define SQUALL_CORO_H

#include <lua.h>

/* True when L may wait: it is the coroutine squall_coro_resume is running
 * (not the main thread, nor one started by coroutine.wrap/resume). */
int squall_coro_can_wait(lua_State *L);

/* Return 0 when L may wait; otherwise raise, saying why, that `what` must
 * run in a coroutine Squall resumes. Call it before changing any state. */
int squall_coro_check(lua_State *L, const char *what);

/* Anchor the running coroutine L in the registry so it is not collected
 * while parked; returns the reference for squall_coro_unpark. Raises as
 * squall_coro_check does. */
int squall_coro_park(lua_State *L, const char *what);

/* Resume the suspended coroutine `co` with the nargs values on top of its
 * own stack. Values it yields are dropped; an error it raises is reported
 * with its traceback through squall_host_report, unless its owner asked
 * with core.on_finish to hear when it finishes (TCPServer does). Returns the
 * lua_resume status. `L` is the running thread: the report and the finish
 * handler run on it. */
int squall_coro_resume(lua_State *L, lua_State *co, int nargs);

/* Lending. A coroutine may run a call that might wait (an RPC handler)
 * itself, rather than on a coroutine of its own: that saves a resume and a
 * yield per call. It calls squall_coro_lend(1) before the call and
 * squall_coro_lend(0) after (squall.rpc does, through the FFI). If the
 * coroutine yields in between, the call keeps it, and squall_coro_resume,
 * once the yield reaches it, calls the core.on_kept hook with the
 * coroutine; the hook may return another coroutine and arguments, which
 * squall_coro_resume resumes at once to carry on the kept one's own work
 * (reading the connection's next requests). */
void squall_coro_lend(int on);

/* Push the parked coroutine `ref` onto L and release its reference. The
 * caller pushes the results onto the returned thread and calls
 * squall_coro_resume; the thread stays on L's stack (anchored) until the
 * caller pops it. */
lua_State *squall_coro_unpark(lua_State *L, int ref);

/* Add core.resume, core.on_finish, core.on_kept, core.can_wait to the table at
 * the top of the stack. */
int squall_coro_open(lua_State *L);

#endif
