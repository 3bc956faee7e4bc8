/* ws.h: WebSocket framing, UTF-8 checks and the handshake key, for
 * squall.websocket. */
#ifndef SQUALL_WS_H
#define SQUALL_WS_H

#include <lua.h>
#include <stddef.h>

/* Whether s[0, n) is well-formed UTF-8 (RFC 3629). */
int squall_utf8_valid(const unsigned char *s, size_t n);

/* Add core.ws_frame, ws_build, utf8_valid and ws_accept to the table at
 * the top of the stack. */
int squall_ws_open(lua_State *L);

#endif
