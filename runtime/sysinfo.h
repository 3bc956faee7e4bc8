/* sysinfo.h: what the system says about this process and its files:
 * a folder's entries (metrics' folder of peers) and the process figures
 * Prometheus clients export as process_* (squall.metrics).
 */
#ifndef SQUALL_SYSINFO_H
#define SQUALL_SYSINFO_H

#include <lua.h>

/* Add core.listdir and core.process_stats to the table at the top of the
 * stack. */
int squall_sysinfo_open(lua_State *L);

#endif
