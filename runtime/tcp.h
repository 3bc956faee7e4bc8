/* tcp.h: listening sockets (bind_sockets), accept (tcp.c) and connect
 * (tcp_connect.c).
 *
 * A listening socket is a Lua full userdata ("squall.socket") owning a
 * plain non-blocking, close-on-exec fd; it is closed by :close() or by the
 * garbage collector.
 */
#ifndef SQUALL_TCP_H
#define SQUALL_TCP_H

#include <lua.h>
#include <sys/socket.h>

/* Add core.bind_sockets, adopt_socket, accept, connect, connect_unix and
 * udp_send to the table at the top of the stack. */
int squall_tcp_open(lua_State *L);

/* tcp_connect.c's half of squall_tcp_open: core.connect and
 * core.connect_unix. */
void squall_tcp_connect_open(lua_State *L);

#endif
