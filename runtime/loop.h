/* loop.h: the uv_loop behind an IOLoop.
 *
 * A squall_loop is a Lua full userdata ("squall.loop") that embeds the
 * uv_loop_t. The Lua IOLoop (lua/squall/ioloop.lua) keeps callbacks and
 * the timer heap itself and calls loop:poll(timeout) once per iteration;
 * everything libuv calls back happens inside that poll (or inside
 * loop:close), on the Lua thread that called it, which is recorded in `L`.
 *
 * Handles created on a loop (fd watchers, signals, streams, servers) are
 * owned by their own Lua userdata; when the loop is closed every handle
 * still open is closed with it, through its squall_handle's close
 * function.
 */
#ifndef SQUALL_LOOP_H
#define SQUALL_LOOP_H

#include <lua.h>
#include <uv.h>

typedef struct squall_loop squall_loop;
struct squall_stream;

/* Called before each poll and after it, before returning to Lua: streams
 * use it to send the writes gathered meanwhile, so callbacks and timers
 * get their writes out before the loop blocks. */
typedef void (*squall_loop_hook)(squall_loop *loop, void *arg);

struct squall_loop {
  uv_loop_t uv;
  uv_async_t wake;  /* kept referenced so poll(-1) blocks, as Tornado does */
  uv_timer_t timer; /* bounds one poll by the next Lua timer's deadline */
  lua_State *L;     /* the thread inside poll/close; valid only there */
  squall_loop_hook end_hook;
  void *end_hook_arg;
  /* Streams with writes gathered and unsent, flushed once per iteration
   * (end_hook). Only a pointer: the loop never looks inside a stream, it
   * hands the list back to stream_write.c; the list lives here so a write
   * costs no allocation of a node of its own. */
  struct squall_stream *dirty;
  int closed;
  int finalizing; /* closed by the garbage collector: call no Lua code */
};

/* Every handle squall creates starts with this header in its struct, and
 * sets uv handle->data to the header, so that closing the loop can close
 * each handle through its own function. */
typedef struct squall_handle {
  void (*close)(struct squall_handle *h);
} squall_handle;

/* Check that argument `idx` is an open loop; raises otherwise. */
squall_loop *squall_loop_check(lua_State *L, int idx);

/* Call the function at the top of the stack (below its nargs arguments)
 * with a traceback handler; an error is reported, never propagated. */
void squall_loop_call(squall_loop *loop, int nargs, const char *where);

/* A timeout in seconds as libuv milliseconds: rounded up, so a timer never
 * fires before its time, and clamped, so math.huge or 1e300 means "in a
 * very long time" rather than an overflowed cast (which fired at once).
 * Zero, negative or NaN give 0. The one conversion every timer uses. */
uint64_t squall_timeout_ms(double seconds);

/* Add core.loop_new, time, wall_time, close_fd, watch_fd, watch_signal and
 * watch_path. */
int squall_loop_open(lua_State *L);

#endif
