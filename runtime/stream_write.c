/* stream_write.c: the IOStream's write queue and the writers waiting on it
 * (stream_impl.h lists the files). */
#include "stream_impl.h"

/* ---- writes ----------------------------------------------------------- */

static void on_write(uv_write_t *req, int status);

void stream_mark_dirty(squall_stream *s) {
  if (s->dirty)
    return;
  s->dirty = 1;
  s->next_dirty = s->loop->dirty;
  s->loop->dirty = s;
}

/* Drop the hold for unsent bytes once everything reached the kernel. */
void stream_settle_unsent(squall_stream *s) {
  if (stream_unsent(s) == 0 && !s->in_flight) {
    /* Drained: give the write buffers back until the next write, and the
     * whole write state once no writer waits on it. */
    if (s->w != NULL) {
      squall_buffer_free(&s->w->wq);
      squall_buffer_free(&s->w->wflight);
      if (s->w->wwait == NULL) {
        free(s->w);
        s->w = NULL;
      }
    }
    if (s->tls != NULL)
      squall_buffer_free(&s->tls->wcipher);
  }
  if (s->held_unsent && stream_unsent(s) == 0) {
    s->held_unsent = 0;
    squall_stream_release(stream_loop_L(s), s);
  }
}

/* Whether waiter `w` may go on: how many of the bytes up to its mark are
 * still unsent. Under TLS stream_unsent() counts ciphertext, which is never
 * shorter than its plaintext, so this errs on the side of waiting. */
static int waiter_ready(const squall_stream *s, const struct write_waiter *w) {
  uint64_t after = s->w->queued_total - w->mark; /* queued later by others */
  uint64_t left = stream_unsent(s);
  left = left > after ? left - after : 0;
  return w->kind == WAIT_FLUSH ? left == 0 : left <= s->o.write_high_water;
}

/* Wake parked writers in order: each whose condition holds, up to the
 * first that must still wait; every one of them, with the stream's error,
 * once it closed for good. A woken coroutine may write and park again:
 * it goes to the tail, and the loop looks at the head afresh. */
void stream_wake_writers(squall_stream *s) {
  while (s->w != NULL && s->w->wwait != NULL) {
    if (stream_closing(s) || (stream_closed(s) && !stream_flushing(s)))
      stream_resume_first_writer(s, 0);
    else if (waiter_ready(s, s->w->wwait))
      stream_resume_first_writer(s, 1);
    else
      break;
  }
}

/* Send what is queued: one try_write of everything, the rest handed to
 * uv_write. Returns 0, or a libuv error (the stream is then closed). */
int stream_flush_writes(squall_stream *s) {
  stream_assert_flags(s);
  stream_remove_dirty(s);
  if (!s->connected || stream_closing(s))
    return 0;
  squall_buffer *out = s->w != NULL ? &s->w->wq : NULL;
  if (s->tls != NULL) {
    if ((out != NULL && squall_tls_write(s->tls->t, out) != SQUALL_TLS_OK) ||
        squall_tls_drain(s->tls->t, &s->tls->wcipher) != 0) {
      stream_tls_failed(s, squall_tls_error(s->tls->t));
      return UV_EPROTO;
    }
    if (stream_flushing(s) && !s->shutdown_sent &&
        (out == NULL || squall_buffer_len(out) == 0) &&
        squall_tls_handshake_done(s->tls->t)) {
      s->shutdown_sent = 1;
      squall_tls_shutdown(s->tls->t);
      squall_tls_drain(s->tls->t, &s->tls->wcipher);
    }
    out = &s->tls->wcipher;
  }
  if (s->in_flight || out == NULL || squall_buffer_len(out) == 0)
    return 0;
  uv_buf_t b = uv_buf_init((char *)squall_buffer_head(out),
                           (unsigned)squall_buffer_len(out));
  int n = uv_try_write((uv_stream_t *)&s->tcp, &b, 1);
  if (n == UV_EAGAIN || n == UV_ENOSYS)
    n = 0;
  if (n < 0) {
    stream_close_with(s, squall_uv_error_kind(n), uv_strerror(n));
    return n;
  }
  squall_stream_bytes_written += (uint64_t)n;
  squall_buffer_consume(out, (size_t)n);
  if (squall_buffer_len(out) > 0) {
    /* A TLS stream may have ciphertext (a handshake) and no write state. */
    struct stream_writes *w = stream_writes(s);
    if (w == NULL) {
      stream_close_with(s, "io", "out of memory");
      return UV_ENOMEM;
    }
    squall_buffer_swap(out, &w->wflight);
    b = uv_buf_init((char *)squall_buffer_head(&w->wflight),
                    (unsigned)squall_buffer_len(&w->wflight));
    int err = uv_write(&w->req, (uv_stream_t *)&s->tcp, &b, 1, on_write);
    if (err != 0) {
      stream_close_with(s, squall_uv_error_kind(err), uv_strerror(err));
      return err;
    }
    s->in_flight = 1;
  }
  return 0;
}

/* After bytes went out (or failed to): wake the writers whose bytes are
 * out, then finish a close() that waited for them. */
static void after_progress(squall_stream *s) {
  stream_wake_writers(s);
  if (stream_flushing(s) && stream_unsent(s) == 0 && !stream_closing(s))
    stream_close_handles(s);
  stream_settle_unsent(s);
}

static void on_write(uv_write_t *req, int status) {
  squall_stream *s = req->data;
  stream_assert_flags(s);
  s->in_flight = 0;
  struct stream_writes *w = s->w; /* kept while a write is in flight */
  if (status >= 0)
    squall_stream_bytes_written += squall_buffer_len(&w->wflight);
  squall_buffer_consume(&w->wflight, squall_buffer_len(&w->wflight));
  if (status < 0) {
    if (!stream_closing(s))
      stream_close_with(s, squall_uv_error_kind(status), uv_strerror(status));
    squall_buffer_consume(&w->wq, squall_buffer_len(&w->wq));
    if (s->tls != NULL)
      squall_buffer_consume(&s->tls->wcipher,
                            squall_buffer_len(&s->tls->wcipher));
  } else {
    stream_flush_writes(s);
  }
  after_progress(s);
}

/* The loop's hook: send every stream's gathered writes. */
void stream_flush_dirty(squall_loop *loop, void *arg) {
  (void)arg;
  while (loop->dirty != NULL) {
    squall_stream *s = loop->dirty;
    if (s->need_pump) {
      s->need_pump = 0;
      stream_remove_dirty(s);
      int r = stream_tls_pump(s);
      if (r == SQUALL_TLS_OK && s->read_kind != READ_NONE)
        stream_process_pending_read(s);
      else if (r == SQUALL_TLS_EOF)
        stream_on_eof(s, UV_EOF);
      continue; /* stream_tls_pump marked it dirty again if it has output */
    }
    stream_flush_writes(s); /* takes it off the list */
    after_progress(s);
  }
}

static void on_write_timeout(uv_timer_t *t);

/* Point the write timer at the earliest deadline among the waiters (they
 * may differ: set_timeout can change between two writes). */
void stream_arm_write_timer(squall_stream *s) {
  if (s->timers == NULL || stream_closing(s))
    return;
  uint64_t first = 0;
  for (struct write_waiter *w = s->w ? s->w->wwait : NULL; w != NULL;
       w = w->next)
    if (w->deadline != 0 && (first == 0 || w->deadline < first))
      first = w->deadline;
  if (first == 0) {
    uv_timer_stop(&s->timers->w);
    return;
  }
  uint64_t now = uv_now(&s->loop->uv);
  uv_timer_start(&s->timers->w, on_write_timeout, first > now ? first - now : 0,
                 0);
}

/* Each waiter whose deadline passed gets `timeout`, in order; what it
 * queued stays queued. Then those behind may go on. */
static void on_write_timeout(uv_timer_t *t) {
  squall_stream *s = t->data;
  lua_State *L = stream_loop_L(s);
  if (L == NULL)
    return;
  uint64_t now = uv_now(&s->loop->uv);
  while (s->w != NULL) {
    struct write_waiter **link = &s->w->wwait;
    while (*link != NULL && ((*link)->deadline == 0 || (*link)->deadline > now))
      link = &(*link)->next;
    if (*link == NULL)
      break;
    int ref = stream_unlink_waiter(s, link);
    lua_pushnil(L);
    squall_push_error(L, "timeout", "the stream's timeout ran out");
    stream_resume_parked(s, ref, 2);
  }
  stream_arm_write_timer(s);
  stream_wake_writers(s);
}

/* Park the calling coroutine at the tail of the writers' queue until
 * waiter_ready holds for it (woken by stream_wake_writers), it times out, or
 * the stream closes. */
int stream_wait_writer(lua_State *L, squall_stream *s, int kind,
                       const char *what) {
  squall_coro_check(L, what);
  struct stream_writes *ws = stream_writes(s);
  struct write_waiter *w = ws != NULL ? malloc(sizeof *w) : NULL;
  if (w == NULL)
    return luaL_error(L, "out of memory");
  w->ref = squall_coro_park(L, what);
  w->kind = kind;
  w->mark = ws->queued_total;
  w->deadline = 0;
  w->next = NULL;
  if (s->timeout > 0 && s->timers != NULL)
    w->deadline = uv_now(&s->loop->uv) + squall_timeout_ms(s->timeout);
  *ws->wwait_end = w;
  ws->wwait_end = &w->next;
  squall_stream_hold(L, s, 1);
  stream_arm_write_timer(s);
  return lua_yield(L, 0);
}

/* Whether queueing `n` more bytes would pass max_write_buffer_size. */
int stream_write_too_big(const squall_stream *s, size_t n) {
  return s->o.max_write_buffer_size > 0 &&
         stream_unsent(s) + n > s->o.max_write_buffer_size;
}

/* Before queueing `total` bytes: 0 when they may be queued, else the
 * results pushed (nil and closed, or buffer_full past
 * max_write_buffer_size). */
int stream_write_refused(lua_State *L, squall_stream *s, size_t total) {
  if (stream_closed(s))
    return stream_push_closed(L, s);
  if (stream_write_too_big(s, total)) {
    lua_pushnil(L);
    squall_push_error(L, "buffer_full",
                      "the write would pass max_write_buffer_size");
    return 2;
  }
  return 0;
}

/* After `total` bytes were appended to wq: count them, hold the stream
 * for them, and send at once when past write_high_water, waiting there
 * (when `may_wait` and the caller can) until the kernel took enough.
 * The stream is argument 1. Returns the results of write(). */
int stream_write_queued(lua_State *L, squall_stream *s, size_t total,
                        int may_wait) {
  if (total == 0) {
    lua_pushboolean(L, 1);
    return 1;
  }
  s->w->queued_total += total;
  if (!s->held_unsent) {
    s->held_unsent = 1;
    squall_stream_hold(L, s, 1);
  }
  stream_mark_dirty(s);
  if (stream_unsent(s) > s->o.write_high_water) {
    if (stream_flush_writes(s) != 0)
      return stream_push_closed(L, s);
    stream_settle_unsent(s);
    if (stream_unsent(s) > s->o.write_high_water && may_wait &&
        squall_coro_can_wait(L))
      return stream_wait_writer(L, s, WAIT_HIGH_WATER, "write");
  }
  lua_pushboolean(L, 1);
  return 1;
}

int squall_stream_write_bytes(lua_State *L, squall_stream *s, const char *p,
                              size_t n) {
  int refused = stream_write_refused(L, s, n);
  if (refused)
    return refused;
  if (n == 0)
    return stream_write_queued(L, s, 0, 1);
  if (stream_writes(s) == NULL || squall_buffer_append(&s->w->wq, p, n) != 0)
    return luaL_error(L, "out of memory queueing a write");
  return stream_write_queued(L, s, n, 1);
}

char *squall_stream_write_reserve(lua_State *L, squall_stream *s, size_t n,
                                  int *nret) {
  *nret = stream_write_refused(L, s, n);
  if (*nret)
    return NULL;
  char *tail = stream_writes(s) ? squall_buffer_reserve(&s->w->wq, n) : NULL;
  if (tail == NULL)
    luaL_error(L, "out of memory queueing a write");
  return tail;
}

int squall_stream_write_commit(lua_State *L, squall_stream *s, size_t n,
                               int *over) {
  squall_buffer_commit(&s->w->wq, n);
  int r = stream_write_queued(L, s, n, 0);
  if (r != 1 || !lua_toboolean(L, -1))
    return r; /* nil, err: the send failed and closed the stream */
  lua_pop(L, 1);
  *over = stream_unsent(s) > s->o.write_high_water;
  return 0;
}
