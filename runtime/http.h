/* http.h: HTTP/1.1 message parsing over llhttp, for squall.httpserver,
 * squall.httpclient and squall.websocket's handshake. */
#ifndef SQUALL_HTTP_H
#define SQUALL_HTTP_H

#include <lua.h>

/* Add core.http_parser to the table at the top of the stack. */
int squall_http_open(lua_State *L);

#endif
