/* host.h: the lua_State of the squall executable.
 *
 * The host owns one lua_State for the life of the process. It sets the
 * package paths so that the project's lua/ modules are found from the build
 * tree and from an installed prefix, registers the built-in C module
 * `squall.core`, and provides the error helpers every other file uses:
 * a traceback message handler, the error-value constructor, and the one
 * place a Lua error raised inside a callback is reported.
 */
#ifndef SQUALL_HOST_H
#define SQUALL_HOST_H

#include <lauxlib.h>
#include <lua.h>
#include <sys/socket.h>

#define SQUALL_VERSION "0.1.0"

/* Create the state: standard libraries, package paths, preloads.
 * Returns NULL when memory is exhausted. The caller lua_close()s it. */
lua_State *squall_host_new(void);

/* Message handler for lua_pcall: turns the error at the top into
 * "message\nstack traceback:...". Non-string errors are kept as they are
 * unless they have a __tostring metamethod. */
int squall_host_traceback(lua_State *L);

/* Push a readable string for the error value at `idx` and return it: a
 * string as it is, else its __tostring called under pcall (one that raises
 * is described, never propagated), else its type. */
const char *squall_host_describe(lua_State *L, int idx);

/* lua_pcall with squall_host_traceback as the message handler. On error the
 * message (with traceback) is left on the stack, as lua_pcall does. */
int squall_host_pcall(lua_State *L, int nargs, int nresults);

/* Report the error message at the top of L (popping it) through the Lua
 * reporter installed by squall.log (`core.set_reporter`), or to stderr when
 * none is installed or the reporter itself fails. `where` names the kind of
 * callback that raised, for the log line. */
void squall_host_report(lua_State *L, const char *where);

/* Push an error value: a table {kind=, message=} whose metatable gives
 * tostring(err) == "kind: message". The one constructor for err values. */
void squall_push_error(lua_State *L, const char *kind, const char *message);

/* Push nil and an error value built from a libuv error code, and return 2:
 * the tail of every Lua-facing function that fails on I/O. */
int squall_push_uv_error(lua_State *L, int uv_err);

/* The error kind (docs/guide.md) for a libuv error code. */
const char *squall_uv_error_kind(int uv_err);

/* Remember the metatable at the top of the stack as the one of type
 * `name` (a static string: its address is the key), for
 * squall_checkudata. */
void squall_register_udata(lua_State *L, const char *name);

/* luaL_checkudata without interning the type's name on every call (which
 * hashed it each time, on every stream call): the metatable is found by
 * the address of `name`, as squall_register_udata stored it. */
void *squall_checkudata(lua_State *L, int idx, const char *name);

/* Register metatable `name` whose __index is itself, holding `methods`
 * (metamethods such as __gc among them).
 * Most C types use it; the stream (stream_lua.c) builds its own, because
 * its methods table is also core.stream_methods for iostream.lua to extend,
 * and tls.c's context has no methods, only __gc. */
void squall_new_metatable(lua_State *L, const char *name,
                          const luaL_Reg *methods);

/* Add the host's functions (set_reporter, error) to the squall.core table
 * at the top of the stack. */
int squall_host_open(lua_State *L);

/* Registers squall.core: defined in core.c, gathering every C module. */
int luaopen_squall_core(lua_State *L);

/* Push host and port of a socket address; returns 2. */
int squall_push_sockaddr(lua_State *L, const struct sockaddr *sa);

#endif
