/* stream.c: the IOStream's core: options, lifetime, resuming parked
 * coroutines, close and construction. stream_impl.h lists the other files.
 *
 * How a stream works, across the files:
 *
 * Reads (stream_read.c) follow Tornado's steps, each a small function:
 *   read_outcome          what a read gets now: data, closed, a failure or
 *                         wait, decided in one place for both paths below
 *   try_inline_read       a new read: take that outcome, or park
 *   find_read_pos         how many buffered bytes the pending read takes
 *   on_alloc, on_read     bytes from libuv land in the buffer's free tail
 *                         (or a shared scratch, for a buffer holding little)
 *   process_pending_read  finish, fail or keep waiting after new bytes
 *   resume_reader         (here) resume the parked reader with its result
 * An unsatisfied read parks its coroutine (registry reference) and yields
 * from C; a satisfied one resumes it straight from libuv's read callback.
 *
 * Writes (stream_write.c) are gathered in a struct stream_writes made by
 * the first write and freed once all is out: write() appends to `wq` and
 * returns. The queue goes out with one uv_try_write when the writing
 * coroutine next waits on this stream or when the loop iteration ends (the
 * loop's flush hook); what the kernel did not take moves to `wflight` and
 * is handed to uv_write. Only one uv_write is in flight; later writes
 * gather in `wq` meanwhile. Writers that must wait (write_high_water,
 * flush) queue in order on `wwait` and are woken by wake_writers, each
 * when its own bytes are out.
 *
 * Under TLS (stream_tls.c) plaintext goes wq -> OpenSSL -> wcipher, and
 * ciphertext read lands in OpenSSL before the plaintext reaches rbuf.
 *
 * The hot path skips the Lua C API: lua/squall/iostream.lua takes a line
 * already in rbuf, and queues a write that needs no decision, through the
 * FFI functions at the end of stream_lua.c, so a handler's read/write loop
 * runs as one compiled trace. Everything else goes to the C methods.
 */
#include "stream_impl.h"

static const size_t DEFAULT_MAX_BUFFER = 104857600;
static const size_t DEFAULT_CHUNK = 65536;
static const size_t DEFAULT_HIGH_WATER = 65536;

/* ---- options ---------------------------------------------------------- */

static size_t opt_size(lua_State *L, int idx, const char *key, size_t dflt,
                       int zero_ok) {
  if (lua_isnoneornil(L, idx))
    return dflt;
  lua_getfield(L, idx, key);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return dflt;
  }
  lua_Number n = lua_tonumber(L, -1);
  if (lua_type(L, -1) != LUA_TNUMBER || n != (lua_Number)(uint64_t)n ||
      n > 1e15 || (n < 1 && !zero_ok)) {
    /* the type first: lua_tostring turns a number into a string */
    const char *type = luaL_typename(L, -1);
    int shown =
        lua_type(L, -1) == LUA_TNUMBER || lua_type(L, -1) == LUA_TSTRING;
    const char *value = shown ? lua_tostring(L, -1) : "";
    luaL_error(L, "%s must be a %s integer, got %s%s%s", key,
               zero_ok ? "non-negative" : "positive", type, shown ? " " : "",
               value);
  }
  lua_pop(L, 1);
  return (size_t)n;
}

void squall_stream_opts_read(lua_State *L, int idx, squall_stream_opts *o) {
  if (!lua_isnoneornil(L, idx))
    luaL_checktype(L, idx, LUA_TTABLE);
  o->max_buffer_size =
      opt_size(L, idx, "max_buffer_size", DEFAULT_MAX_BUFFER, 0);
  o->read_chunk_size = opt_size(L, idx, "read_chunk_size", DEFAULT_CHUNK, 0);
  o->write_high_water =
      opt_size(L, idx, "write_high_water", DEFAULT_HIGH_WATER, 1);
  o->max_write_buffer_size = opt_size(L, idx, "max_write_buffer_size", 0, 1);
}

/* ---- lifetime --------------------------------------------------------- */

lua_State *stream_loop_L(squall_stream *s) {
  return s->loop->finalizing ? NULL : s->loop->L;
}

void squall_stream_hold(lua_State *L, squall_stream *s, int idx) {
  if (s->holds++ == 0) {
    lua_pushvalue(L, idx);
    s->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  }
}

void squall_stream_release(lua_State *L, squall_stream *s) {
  assert(s->holds > 0); /* every release matches a hold */
  if (--s->holds == 0) {
    if (L != NULL)
      luaL_unref(L, LUA_REGISTRYINDEX, s->self_ref);
    s->self_ref = LUA_NOREF;
  }
}

void squall_stream_push(lua_State *L, squall_stream *s) {
  lua_rawgeti(L, LUA_REGISTRYINDEX, s->self_ref);
}

void stream_unref(lua_State *L, int *ref) {
  if (*ref != LUA_NOREF && *ref != LUA_REFNIL && L != NULL)
    luaL_unref(L, LUA_REGISTRYINDEX, *ref);
  *ref = LUA_NOREF;
}

void stream_remove_dirty(squall_stream *s) {
  if (!s->dirty)
    return;
  squall_stream **p = &s->loop->dirty;
  while (*p != NULL && *p != s)
    p = &(*p)->next_dirty;
  if (*p == s)
    *p = s->next_dirty;
  s->next_dirty = NULL;
  s->dirty = 0;
}

static void free_stream(squall_stream *s) {
  stream_remove_dirty(s);
  /* Only when the loop was finalized with writers parked: their
   * coroutines went with the Lua state. */
  if (s->w != NULL) {
    while (s->w->wwait != NULL) {
      struct write_waiter *w = s->w->wwait;
      s->w->wwait = w->next;
      free(w);
    }
    squall_buffer_free(&s->w->wq);
    squall_buffer_free(&s->w->wflight);
    free(s->w);
  }
  squall_buffer_free(&s->rbuf);
  if (s->tls != NULL) {
    squall_buffer_free(&s->tls->wcipher);
    squall_tls_free(s->tls->t);
    free(s->tls);
  }
  free(s->timers);
  free(s->err_msg);
  free(s);
}

void stream_maybe_free(squall_stream *s) {
  if (s->handles_open == 0 && !s->ud_alive)
    free_stream(s);
}

size_t stream_unsent(const squall_stream *s) {
  size_t n = s->tls != NULL ? squall_buffer_len(&s->tls->wcipher) : 0;
  if (s->w != NULL)
    n += squall_buffer_len(&s->w->wq) + squall_buffer_len(&s->w->wflight);
  return n;
}

/* The write state, made now if the stream has none; NULL when out of
 * memory. */
struct stream_writes *stream_writes(squall_stream *s) {
  if (s->w == NULL) {
    s->w = calloc(1, sizeof *s->w);
    if (s->w == NULL)
      return NULL;
    s->w->wwait_end = &s->w->wwait;
    s->w->req.data = s;
  }
  return s->w;
}

void stream_set_error(squall_stream *s, const char *kind, const char *msg) {
  if (s->err_kind != NULL)
    return; /* the first cause wins */
  s->err_kind = kind;
  s->err_msg = strdup(msg);
}

/* Push nil and the error a failed operation returns: the error that closed
 * the stream, or `closed`. */
int stream_push_closed(lua_State *L, squall_stream *s) {
  lua_pushnil(L);
  if (s->err_kind != NULL)
    squall_push_error(L, s->err_kind, s->err_msg ? s->err_msg : s->err_kind);
  else
    squall_push_error(L, "closed", "the stream is closed");
  return 2;
}

/* ---- resuming parked coroutines -------------------------------------- */

void stream_clear_read(squall_stream *s, lua_State *L) {
  s->read_kind = READ_NONE;
  s->delim = NULL;
  stream_unref(L, &s->delim_ref);
  if (s->timers != NULL && !stream_closing(s))
    uv_timer_stop(&s->timers->r);
}

/* Resume the coroutine parked as `ref` with the `nres` values on top of
 * the loop's thread, then drop the hold its wait took. The hold lasts
 * across the resume, so the collector cannot free the stream underneath.
 * Without a Lua state (the loop is being finalized) only the hold goes;
 * callers push nothing then. The one resume path for readers, writers and
 * handshakes. */
void stream_resume_parked(squall_stream *s, int ref, int nres) {
  lua_State *L = stream_loop_L(s);
  if (L == NULL) {
    squall_stream_release(NULL, s);
    return;
  }
  lua_State *co = squall_coro_unpark(L, ref);
  lua_insert(L, -(nres + 1)); /* the thread below its results */
  lua_xmove(L, co, nres);
  squall_coro_resume(L, co, nres);
  lua_pop(L, 1);
  squall_stream_release(L, s);
}

/* Push what a write or handshake wait returns: true, or nil and the
 * stream's error. Returns how many values (none without a Lua state). */
int stream_push_outcome(squall_stream *s, int ok) {
  lua_State *L = stream_loop_L(s);
  if (L == NULL)
    return 0;
  if (!ok)
    return stream_push_closed(L, s);
  lua_pushboolean(L, 1);
  return 1;
}

/* Resume the parked reader with the `nres` results on the loop's thread. */
void stream_resume_reader(squall_stream *s, int nres) {
  stream_assert_flags(s);
  int ref = s->reader_ref;
  s->reader_ref = LUA_NOREF;
  stream_clear_read(s, stream_loop_L(s));
  stream_resume_parked(s, ref, nres);
}

/* Unlink the waiter at `link`, free it, and return its coroutine's ref
 * for stream_resume_parked. */
int stream_unlink_waiter(squall_stream *s, struct write_waiter **link) {
  struct write_waiter *w = *link;
  int ref = w->ref;
  *link = w->next;
  if (*link == NULL)
    s->w->wwait_end = link;
  free(w);
  return ref;
}

/* Resume the oldest parked writer with true, or nil and the stream's
 * error. */
void stream_resume_first_writer(squall_stream *s, int ok) {
  int ref = stream_unlink_waiter(s, &s->w->wwait);
  stream_arm_write_timer(s);
  stream_resume_parked(s, ref, stream_push_outcome(s, ok));
}

/* ---- close ------------------------------------------------------------ */

static void run_close_callback(squall_stream *s) {
  lua_State *L = stream_loop_L(s);
  if (s->close_cb_run)
    return;
  s->close_cb_run = 1;
  int ref = s->close_cb_ref;
  s->close_cb_ref = LUA_NOREF;
  if (ref == LUA_NOREF || L == NULL)
    return;
  lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
  luaL_unref(L, LUA_REGISTRYINDEX, ref);
  squall_loop_call(s->loop, 0, "close callback");
}

static void on_handle_closed(uv_handle_t *h) {
  squall_stream *s = h->data;
  if (h == (uv_handle_t *)&s->tcp) {
    s->tcp_init = 0;
    /* Whoever still waits learns the stream closed; then the callback. */
    lua_State *L = stream_loop_L(s);
    if (s->reader_ref != LUA_NOREF && L != NULL)
      stream_resume_reader(s, stream_push_closed(L, s));
    stream_wake_writers(s); /* closing: every one of them, with the error */
    if (s->tls != NULL && s->tls->hs_ref != LUA_NOREF)
      stream_wake_handshake(s, 0);
    if (s->held_unsent) {
      s->held_unsent = 0;
      squall_stream_release(L, s);
    }
    run_close_callback(s);
  }
  assert(s->handles_open > 0 && stream_closing(s));
  s->handles_open--;
  stream_maybe_free(s);
}

/* Close the libuv handles; the stream is freed once they are done. */
void stream_close_handles(squall_stream *s) {
  stream_assert_flags(s);
  if (stream_closing(s))
    return;
  stream_set_life(s, LIFE_CLOSING);
  stream_remove_dirty(s);
  stream_stop_reading(s);

  if (s->tcp_init)
    uv_close((uv_handle_t *)&s->tcp, on_handle_closed);
  if (s->timers != NULL) {
    uv_close((uv_handle_t *)&s->timers->r, on_handle_closed);
    uv_close((uv_handle_t *)&s->timers->w, on_handle_closed);
  }
  if (!s->tcp_init) {
    /* Never connected: no tcp close callback will say goodbye. */
    lua_State *L = stream_loop_L(s);
    if (s->reader_ref != LUA_NOREF && L != NULL)
      stream_resume_reader(s, stream_push_closed(L, s));
    run_close_callback(s);
  }
}

/* Close now, recording why (`kind` NULL: a clean close). Queued writes are
 * dropped: this is the path for errors and for the peer going away. */
void stream_close_with(squall_stream *s, const char *kind, const char *msg) {
  if (kind != NULL)
    stream_set_error(s, kind, msg);
  stream_close_handles(s); /* a flush in progress is abandoned */
}

/* The loop is closing: close without flushing. */
static void close_for_loop(squall_handle *h) {
  stream_close_with((squall_stream *)h, NULL, NULL);
}

static void on_close_timeout(uv_timer_t *t) {
  stream_close_with(
      t->data, "timeout",
      "close() could not send what was queued within the stream's "
      "timeout");
}

/* Close once what is queued has gone out (the peer may still read after
 * closing its side, and nothing written is dropped). The wait is bounded
 * by the stream's timeout; without one it lasts as long as the peer
 * reads, unless abort() (or a second close()) cuts it short. */
void stream_close_flushing(squall_stream *s) {
  if (stream_closing(s))
    return;
  /* Called again while flushing (the peer's EOF came), it looks again
   * whether the flush is done. TLS: close_notify follows the last record. */
  if (!stream_flushing(s))
    stream_set_life(s, LIFE_FLUSHING);
  if (s->tls == NULL || squall_tls_handshake_done(s->tls->t))
    stream_stop_reading(
        s); /* else the handshake must finish before the flush */
  if (s->connected && (stream_unsent(s) > 0 || s->tls != NULL) &&
      stream_flush_writes(s) == 0 && stream_unsent(s) > 0) {
    /* after_progress closes once the queue is out. The read timer is
     * free: no read can wait on a closed stream. */
    if (s->timeout > 0 && s->timers != NULL)
      uv_timer_start(&s->timers->r, on_close_timeout,
                     squall_timeout_ms(s->timeout), 0);
    return;
  }
  stream_close_handles(s);
}

/* ---- construction ----------------------------------------------------- */

squall_stream *squall_stream_new(lua_State *L, squall_loop *loop,
                                 const squall_stream_opts *o) {
  squall_stream **p = lua_newuserdata(L, sizeof *p);
  *p = NULL;
  squall_stream *s = calloc(1, sizeof *s);
  if (s == NULL)
    luaL_error(L, "out of memory creating a stream");
  s->h.close = close_for_loop;
  s->loop = loop;
  s->o = *o;
  s->delim_ref = s->reader_ref = LUA_NOREF;
  s->close_cb_ref = s->self_ref = LUA_NOREF;
  s->max_bytes = SIZE_MAX;
  s->ud_alive = 1;
  s->handles_open = 0;
  *p = s;
  luaL_getmetatable(L, STREAM_MT);
  lua_setmetatable(L, -2);
  if (loop->end_hook == NULL)
    loop->end_hook = stream_flush_dirty;
  return s;
}

int squall_stream_init_tcp(squall_stream *s) {
  int err = uv_tcp_init(&s->loop->uv, &s->tcp);
  if (err != 0)
    return err;
  s->tcp.data = s;
  s->tcp_init = 1;
  s->handles_open++;
  return 0;
}

void squall_stream_abort(squall_stream *s) {
  stream_close_with(s, NULL, NULL);
}

int squall_stream_connected(squall_stream *s) {
  s->connected = 1;
  stream_start_reading(s);
  return 0;
}

int squall_stream_open_fd(squall_stream *s, int fd) {
  int err = squall_stream_init_tcp(s);
  if (err == 0)
    err = uv_tcp_open(&s->tcp, fd);
  if (err != 0) {
    close(fd);
    stream_close_with(s, squall_uv_error_kind(err), uv_strerror(err));
    return err;
  }
  return squall_stream_connected(s);
}

uv_tcp_t *squall_stream_tcp(squall_stream *s) {
  return &s->tcp;
}
