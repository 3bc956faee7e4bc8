/* stream.h: the IOStream behind squall.iostream.
 *
 * A stream is a TCP connection with a read buffer, one pending read at a
 * time (the read state machine), a gathered write queue, a close callback
 * and timeouts. Lua sees it as a full userdata ("squall.stream") holding a
 * pointer to the C struct; the struct itself is malloc'd because libuv may
 * still hold its handles after the userdata is collected.
 *
 * Lifetime: the struct is freed when both (a) every libuv handle in it has
 * finished closing and (b) its userdata has been collected. While an
 * operation is pending (a parked reader or writer, bytes not yet sent, a
 * connect in progress) the userdata is anchored in the registry, so the
 * collector cannot close a stream under a waiting coroutine or lose
 * queued bytes. An unreferenced idle stream is closed by the collector.
 */
#ifndef SQUALL_STREAM_H
#define SQUALL_STREAM_H

#include <lua.h>
#include <stddef.h>
#include <uv.h>

#include "loop.h"

typedef struct squall_stream squall_stream;

/* Sizes from the options table of TCPServer, TCPClient and connect. */
typedef struct squall_stream_opts {
  size_t max_buffer_size;       /* default 104857600 */
  size_t read_chunk_size;       /* default 65536 */
  size_t write_high_water;      /* default 65536 */
  size_t max_write_buffer_size; /* 0: unlimited */
} squall_stream_opts;

/* Fill `o` from the options table at `idx` (nil or absent: defaults).
 * Raises on a value that is not a positive integer. */
void squall_stream_opts_read(lua_State *L, int idx, squall_stream_opts *o);

/* Push a new stream userdata for `loop` and return it. Its TCP handle is
 * not initialized yet: accept uses squall_stream_open_fd, connect uses
 * squall_stream_tcp after squall_stream_init_tcp. */
squall_stream *squall_stream_new(lua_State *L, squall_loop *loop,
                                 const squall_stream_opts *o);

/* Adopt a connected socket fd and start reading. Returns 0 or a libuv
 * error (the fd is closed on error). */
int squall_stream_open_fd(squall_stream *s, int fd);

/* Initialize the TCP handle for a connect attempt. Returns 0 or a libuv
 * error. */
int squall_stream_init_tcp(squall_stream *s);

/* The stream's TCP handle. */
uv_tcp_t *squall_stream_tcp(squall_stream *s);

/* Close a stream whose connect failed (no close callback is set yet). */
void squall_stream_abort(squall_stream *s);

/* Mark a connected stream ready and start reading. */
int squall_stream_connected(squall_stream *s);

/* Anchor/release the userdata at `idx` for a connect in progress. */
void squall_stream_hold(lua_State *L, squall_stream *s, int idx);
void squall_stream_release(lua_State *L, squall_stream *s);

/* Push the userdata of `s` (anchored) onto L. */
void squall_stream_push(lua_State *L, squall_stream *s);

/* The stream at argument `idx`; raises when it is not one. */
squall_stream *squall_stream_check(lua_State *L, int idx);

/* write() for bytes a C function made (msgpack.write_array): queue
 * p[0, n) on `s`, which must be argument 1 of the running C function;
 * that function returns what this returns (a wait past write_high_water
 * yields once it has returned, as write() does). */
int squall_stream_write_bytes(lua_State *L, squall_stream *s, const char *p,
                              size_t n);

/* write() for a C function that builds its bytes in place, in two steps
 * with nothing between them (http.c's responses): room for n bytes at the
 * end of the write queue of `s`, argument 1 of the running C function; or
 * NULL with what write() returns for a refused write pushed (*nret
 * results: closed, buffer_full). Raises when out of memory. */
char *squall_stream_write_reserve(lua_State *L, squall_stream *s, size_t n,
                                  int *nret);
/* Then count the n bytes written there as queued, as write() does but
 * without waiting: returns 0, with *over set when the unsent bytes are
 * past write_high_water (the caller may wait, with flush()); or pushes
 * nil, err and returns 2 when sending failed. */
int squall_stream_write_commit(lua_State *L, squall_stream *s, size_t n,
                               int *over);

/* The fast paths lua/squall/iostream.lua calls through the FFI (declared
 * there too; stream_lua.c says what they take). */
int squall_stream_ffi_line(squall_stream **p, const char *delim, size_t dlen,
                           double max_bytes);
const char *squall_stream_ffi_head(squall_stream **p);
void squall_stream_ffi_consume(squall_stream **p, size_t n);
int squall_stream_ffi_write(squall_stream **p, const char *data, size_t n);

/* Register the "squall.stream" metatable; adds core.stream_methods. */
int squall_stream_open(lua_State *L);

#endif
