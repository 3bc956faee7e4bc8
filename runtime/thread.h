/* thread.h: worker threads behind squall.thread.
 *
 * A pool of threads, each with a lua_State of its own, runs
 * require(module)[func](...) with arguments and results copied as
 * MessagePack; the loop learns of finished calls through a uv_async_t and
 * calls each one's Lua callback on its own thread. See thread.c.
 */
#ifndef SQUALL_THREAD_H
#define SQUALL_THREAD_H

#include <lua.h>

/* Add core.thread_pool to the table at the top of the stack. */
int squall_thread_open(lua_State *L);

#endif
