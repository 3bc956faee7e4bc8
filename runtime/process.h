/* process.h: fork_processes, child restarts, task_id, cpu_count.
 *
 * The parent of fork_processes never returns to Lua: it waits for its
 * children in C, restarts those that die abnormally, forwards SIGTERM,
 * SIGINT and SIGHUP to them, and exits when they are all gone. Each child
 * returns its task id. No state here is shared with the rest of runtime/.
 */
#ifndef SQUALL_PROCESS_H
#define SQUALL_PROCESS_H

#include <lua.h>

/* Add core.fork_processes, core.task_id, core.cpu_count. */
int squall_process_open(lua_State *L);

#endif
