/* stream_read.c: the IOStream's read state machine (stream_impl.h
 * lists the files). */
#include "stream_impl.h"

/* ---- the read state machine ------------------------------------------ */

/* The longest match a Lua pattern can make, or SIZE_MAX when it has no
 * bound (a `*`, `+` or `-` quantifier, %b, %f or a back-reference). The
 * pattern is well-formed: string.find checked it when the read started. */
size_t stream_pattern_max_len(const char *p) {
  size_t n = 0;
  if (*p == '^')
    p++;
  while (*p != '\0') {
    if (*p == '(' || *p == ')') {
      p++;
      continue;
    }
    if (*p == '$' && p[1] == '\0')
      break;
    if (*p == '%') {
      if (p[1] == 'b' || p[1] == 'f' || (p[1] >= '0' && p[1] <= '9'))
        return SIZE_MAX;
      p += 2;
    } else if (*p == '[') {
      p++;
      if (*p == '^')
        p++;
      do { /* the first ']' of a set is literal */
        if (*p == '%')
          p++;
        p++;
      } while (*p != ']');
      p++;
    } else {
      p++;
    }
    if (*p == '*' || *p == '+' || *p == '-')
      return SIZE_MAX;
    if (*p == '?')
      p++;
    n++;
  }
  return n;
}

/* Why the last pattern search raised (find_pattern returned -2). */
static _Thread_local char pattern_error[200];

/* READ_PATTERN: where the first match ends, 0 when there is none yet, -1
 * past max_bytes, -2 when the search raised (pattern_error says why: a
 * pattern too complex for the bytes that came, out of memory).
 *
 * Where this belongs: here, in the read state machine, because
 * read_outcome is the one decision for every kind of read; the search is
 * Lua's own string.find (the pattern language is Lua's), taken once from
 * the registry (stream_lua.c stores it at load, so a program that replaces
 * string.find does not change how streams read). C adds only the bound
 * that makes the search resumable (stream_pattern_max_len).
 * string.find runs over what is buffered from `scanned`
 * on: a match of at most `match_max` bytes (stream_pattern_max_len) that starts
 * earlier would have been found by an earlier search, so a line arriving
 * in many chunks is searched in linear time overall. A pattern with no
 * bound, or anchored with `^`, is searched over the whole buffer each
 * time (docs/guide.md says what that costs; max_bytes bounds it). */
static long find_pattern(lua_State *L, squall_stream *s) {
  size_t len = squall_buffer_len(&s->rbuf);
  if (len == 0 || L == NULL)
    return 0;
  size_t from = 0, n = len;
  if (s->delim[0] == '^') {
    size_t k = s->match_max;
    /* An anchored, bounded pattern without `$` looks at k bytes at most. */
    if (k != SIZE_MAX && k < len && s->delim[strlen(s->delim) - 1] != '$')
      n = k;
  } else if (s->match_max != SIZE_MAX) {
    from = s->rbuf.scanned;
  }
  lua_getfield(L, LUA_REGISTRYINDEX, STREAM_FIND_KEY);
  lua_pushlstring(L, squall_buffer_head(&s->rbuf) + from, n - from);
  lua_pushstring(L, s->delim);
  long r = 0;
  if (lua_pcall(L, 2, 2, 0) == 0) {
    if (lua_isnumber(L, -1)) {
      size_t end = from + (size_t)lua_tointeger(L, -1);
      r = end > s->max_bytes ? -1 : (long)end;
    } else {
      if (len >= s->max_bytes)
        r = -1;
      /* No match starts before len - k + 1: each such attempt saw all of
       * its at most k bytes already. */
      if (s->match_max != SIZE_MAX && len >= s->match_max &&
          len - s->match_max + 1 > from)
        s->rbuf.scanned = len - s->match_max + 1;
    }
    lua_pop(L, 2);
  } else {
    const char *why = lua_tostring(L, -1);
    snprintf(pattern_error, sizeof pattern_error,
             "the pattern search failed: %s", why ? why : "(no message)");
    lua_pop(L, 1);
    r = -2;
  }
  return r;
}

/* How many buffered bytes the pending read takes: > 0 to finish it now,
 * 0 to keep waiting, -1 when it can never be satisfied (max_bytes). */
static long find_read_pos(lua_State *L, squall_stream *s) {
  size_t len = squall_buffer_len(&s->rbuf);
  switch (s->read_kind) {
  case READ_UNTIL: {
    long at = squall_buffer_find(&s->rbuf, s->delim, s->dlen);
    if (at >= 0) {
      size_t end = (size_t)at + s->dlen;
      return end > s->max_bytes ? -1 : (long)end;
    }
    return len >= s->max_bytes ? -1 : 0;
  }
  case READ_PATTERN:
    return find_pattern(L, s);
  case READ_BYTES:
    if (len >= s->read_n)
      return (long)s->read_n;
    if (s->partial && len > 0)
      return (long)len;
    return 0;
  case READ_CLOSE:
    return s->eof ? (long)len : 0;
  default:
    return 0;
  }
}

/* Push the first n buffered bytes onto L as a string and consume them. */
static void push_consumed(lua_State *L, squall_stream *s, size_t n) {
  lua_pushlstring(L, squall_buffer_head(&s->rbuf), n);
  squall_buffer_consume(&s->rbuf, n);
}

/* What a read gets now: the one decision behind both a new read
 * (stream_try_inline_read) and a parked one after new bytes or EOF
 * (stream_process_pending_read), as OpenResty builds every receive result in
 * one place. OUTCOME_DATA sets *n to the bytes it takes. */
enum read_outcome {
  OUTCOME_WAIT,          /* not yet: park (or stay parked) */
  OUTCOME_DATA,          /* finish with *n buffered bytes */
  OUTCOME_CLOSED,        /* finish with nil, closed (or the stream's error) */
  OUTCOME_UNSATISFIABLE, /* max_bytes passed without the delimiter */
  OUTCOME_SEARCH_FAILED, /* the pattern search raised (pattern_error) */
  OUTCOME_BUFFER_FULL,   /* the read needs more than max_buffer_size */
};

static enum read_outcome read_outcome(lua_State *L, squall_stream *s,
                                      size_t *n) {
  /* After our own close(), reads fail even with bytes buffered. */
  if (stream_closed(s) && !s->eof)
    return OUTCOME_CLOSED;
  long pos = find_read_pos(L, s);
  if (pos > 0 || (s->read_kind == READ_CLOSE && s->eof)) {
    *n = pos > 0 ? (size_t)pos : 0;
    return OUTCOME_DATA;
  }
  if (pos == -2)
    return OUTCOME_SEARCH_FAILED;
  if (pos < 0)
    return OUTCOME_UNSATISFIABLE;
  if (s->eof)
    return OUTCOME_CLOSED;
  if (squall_buffer_len(&s->rbuf) >= s->o.max_buffer_size)
    return OUTCOME_BUFFER_FULL;
  return OUTCOME_WAIT;
}

/* Close the stream for a read that can never be satisfied; the error
 * strings live here only. */
static void fail_read(squall_stream *s, enum read_outcome o) {
  if (o == OUTCOME_UNSATISFIABLE)
    stream_close_with(s, "unsatisfiable",
                      "max_bytes reached without finding the delimiter");
  else if (o == OUTCOME_SEARCH_FAILED)
    stream_close_with(s, "unsatisfiable", pattern_error);
  else if (o == OUTCOME_BUFFER_FULL)
    stream_close_with(s, "buffer_full",
                      "the read needs more than max_buffer_size bytes");
}

/* The pending read, after new bytes or EOF: finish it, fail it, or keep
 * waiting. */
void stream_process_pending_read(squall_stream *s) {
  lua_State *L = stream_loop_L(s);
  size_t n = 0;
  enum read_outcome o = read_outcome(L, s, &n);
  if (o == OUTCOME_WAIT)
    return;
  if (o == OUTCOME_DATA || o == OUTCOME_CLOSED) {
    if (L == NULL) /* the loop is closing: nobody to resume */
      return;
    if (o == OUTCOME_DATA) {
      push_consumed(L, s, n);
      stream_resume_reader(s, 1);
      stream_start_reading(s);
    } else {
      stream_resume_reader(s, stream_push_closed(L, s));
    }
    return;
  }
  fail_read(s, o); /* stream_close_with wakes the reader with the error */
}

static size_t read_chunk(const squall_stream *s) {
  size_t len = squall_buffer_len(&s->rbuf);
  size_t room = s->o.max_buffer_size > len ? s->o.max_buffer_size - len : 0;
  size_t chunk = s->o.read_chunk_size;
  if (chunk > s->o.max_buffer_size / 2)
    chunk = s->o.max_buffer_size / 2;
  if (chunk == 0)
    chunk = 1;
  return chunk < room ? chunk : room;
}

/* A read that cannot land in the stream's own buffer lands here, and
 * on_read copies what came: libuv calls on_read right after on_alloc, so
 * one buffer serves every stream. Ciphertext always comes here, on its way
 * to OpenSSL. */
static char read_scratch[65536];

/* Where the next read lands. Straight into the buffer's free tail when a
 * whole chunk fits there (a bulk transfer, after its first chunk: no
 * copy); into the scratch when the buffer holds less than a chunk, so a
 * connection holding a few bytes keeps a buffer the size of those bytes
 * instead of a whole chunk (5,000 slow clients would pin 100 KB each);
 * else the buffer grows by a chunk, as a long line needs. */
static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  (void)suggested;
  squall_stream *s = h->data;
  if (s->tls != NULL) {
    *buf = uv_buf_init(read_scratch, sizeof read_scratch);
    return;
  }
  size_t chunk = read_chunk(s);
  if (chunk == 0) {
    *buf = uv_buf_init(NULL, 0);
    return;
  }
  if (squall_buffer_tail_room(&s->rbuf) >= chunk) {
    *buf = uv_buf_init(s->rbuf.data + s->rbuf.end, (unsigned)chunk);
    return;
  }
  if (squall_buffer_len(&s->rbuf) < chunk) {
    if (chunk > sizeof read_scratch)
      chunk = sizeof read_scratch;
    *buf = uv_buf_init(read_scratch, (unsigned)chunk);
    return;
  }
  char *tail = squall_buffer_reserve(&s->rbuf, chunk);
  *buf = uv_buf_init(tail, tail ? (unsigned)chunk : 0);
}

void stream_stop_reading(squall_stream *s) {
  if (s->reading) {
    uv_read_stop((uv_stream_t *)&s->tcp);
    s->reading = 0;
  }
}

/* Bytes every stream of this process read from and wrote to its sockets
 * (TLS records included): squall.metrics' squall_bytes_*_total. Streams
 * live on the main loop's thread only, so plain counters do. */
uint64_t squall_stream_bytes_read, squall_stream_bytes_written;

static void on_read(uv_stream_t *h, ssize_t nread, const uv_buf_t *buf) {
  (void)buf;
  squall_stream *s = h->data;
  stream_assert_flags(s);
  if (nread > 0)
    squall_stream_bytes_read += (uint64_t)nread;
  if (nread > 0 && s->tls != NULL) {
    if (squall_tls_feed(s->tls->t, buf->base, (size_t)nread) != 0) {
      stream_close_with(s, "tls", "out of memory buffering TLS input");
      return;
    }
    int r = stream_tls_pump(s);
    if (r == SQUALL_TLS_ERROR)
      return;
    if (r == SQUALL_TLS_EOF)
      nread = UV_EOF; /* close_notify: a clean end, handled below */
  }
  if (nread > 0) {
    if (s->tls == NULL && buf->base == read_scratch) {
      if (squall_buffer_append(&s->rbuf, read_scratch, (size_t)nread) != 0) {
        stream_close_with(s, "io", "out of memory buffering a read");
        return;
      }
    } else if (s->tls == NULL) {
      squall_buffer_commit(&s->rbuf, (size_t)nread);
    }
    if (s->read_kind != READ_NONE)
      stream_process_pending_read(s);
    /* Backpressure: nobody reads and the buffer is full. */
    if (!stream_closed(s) && s->read_kind == READ_NONE &&
        squall_buffer_len(&s->rbuf) >= s->o.max_buffer_size)
      stream_stop_reading(s);
    return;
  }
  if (nread == 0 || nread == UV_ENOBUFS) {
    if (nread == UV_ENOBUFS)
      stream_stop_reading(s);
    return;
  }
  stream_on_eof(s, nread);
}

void stream_on_eof(squall_stream *s, ssize_t nread) {
  /* EOF or a socket error: what is buffered stays readable, and a reader
   * woken now already sees the stream closed. */
  s->eof = 1;
  if (s->life < LIFE_CLOSED)
    stream_set_life(s, LIFE_CLOSED);
  stream_stop_reading(s);
  if (nread != UV_EOF)
    stream_set_error(s, squall_uv_error_kind((int)nread),
                     uv_strerror((int)nread));
  else if (s->tls != NULL && !s->tls_eof && squall_tls_truncated(s->tls->t))
    stream_tls_failed(
        s, squall_tls_handshake_done(s->tls->t)
               ? "the peer closed the connection mid-record"
               : "the peer closed the connection during the handshake");
  if (s->read_kind != READ_NONE)
    stream_process_pending_read(s);
  if (nread == UV_EOF)
    stream_close_flushing(s);
  else
    stream_close_with(s, NULL, NULL);
}

void stream_start_reading(squall_stream *s) {
  if (s->tls != NULL && !stream_closing(s) &&
      squall_tls_pending(s->tls->t) > 0) {
    /* No socket event will come for what OpenSSL already holds: decrypt
     * it from the loop's flush hook. */
    s->need_pump = 1;
    stream_mark_dirty(s);
  }
  if (s->reading || !s->connected || stream_closed(s) || s->eof)
    return;
  if (squall_buffer_len(&s->rbuf) >= s->o.max_buffer_size)
    return;
  if (uv_read_start((uv_stream_t *)&s->tcp, on_alloc, on_read) == 0)
    s->reading = 1;
}

static void on_read_timeout(uv_timer_t *t) {
  squall_stream *s = t->data;
  lua_State *L = stream_loop_L(s);
  if (s->reader_ref == LUA_NOREF || L == NULL)
    return;
  lua_pushnil(L);
  squall_push_error(L, "timeout", "the stream's timeout ran out");
  stream_resume_reader(s, 2);
}

/* Start the read set up in `s`: finish it from the buffer, fail it, or
 * park the calling coroutine until on_read finishes it. */
int stream_try_inline_read(lua_State *L, squall_stream *s, const char *what) {
  stream_assert_flags(s);
  size_t n = 0;
  enum read_outcome o = read_outcome(L, s, &n);
  if (o == OUTCOME_DATA) {
    push_consumed(L, s, n);
    stream_clear_read(s, L);
    stream_start_reading(s);
    return 1;
  }
  if (o != OUTCOME_WAIT) {
    stream_clear_read(s, L);
    fail_read(s, o);
    return stream_push_closed(L, s);
  }
  /* It must wait: only a coroutine can, and nothing changed yet. */
  if (!squall_coro_can_wait(L)) {
    stream_clear_read(s, L);
    return squall_coro_check(L, what);
  }
  /* About to wait: what this coroutine wrote goes out first. */
  stream_flush_writes(s);
  if (stream_closed(s) && !s->eof) {
    stream_clear_read(s, L);
    return stream_push_closed(L, s);
  }
  if (s->delim != NULL && s->delim_ref == LUA_NOREF) {
    lua_pushvalue(L, 2);
    s->delim_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  /* An idle connection parked here holds no buffer (it is allocated again
   * when data arrives), and one holding part of a message keeps only about
   * twice that: memory per idle connection is a figure we track. */
  squall_buffer_shrink(&s->rbuf);
  squall_stream_hold(L, s, 1);
  /* Likewise the write state, when the flush above sent everything: a
   * keep-alive connection parked between requests keeps no write buffer
   * (about 1.3 KB each). A busy stream makes it again on its next write:
   * a malloc and a hold per park, not per message. */
  stream_settle_unsent(s);
  s->reader_ref = squall_coro_park(L, what);
  if (s->timeout > 0 && s->timers != NULL)
    uv_timer_start(&s->timers->r, on_read_timeout,
                   squall_timeout_ms(s->timeout), 0);
  stream_start_reading(s);
  return lua_yield(L, 0);
}
