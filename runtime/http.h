/* http.h: HTTP/1.1 message parsing over llhttp (http.c), for
 * squall.httpserver, squall.httpclient and squall.websocket's handshake,
 * and the responses HTTPServer sends (http_response.c). */
#ifndef SQUALL_HTTP_H
#define SQUALL_HTTP_H

#include <lua.h>

/* Add core.http_parser, and what squall_http_response_open adds, to the
 * table at the top of the stack. */
int squall_http_open(lua_State *L);

/* http_response.c: add core.http_response and core.http_send to the
 * table at the top of the stack. */
void squall_http_response_open(lua_State *L);

#endif
