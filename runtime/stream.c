/* stream.c: the IOStream read state machine, write queue, close, timeouts.
 *
 * The read path follows Tornado's steps, each a small function here:
 *   read_outcome          what a read gets now: data, closed, a failure, or
 * wait try_inline_read       a new read: take that outcome, or park
 *   find_read_pos         how many buffered bytes the pending read takes
 *   on_alloc, on_read     bytes from libuv land in the buffer's free tail
 *                         (or a shared scratch, for a buffer holding little)
 *   process_pending_read  finish, fail or keep waiting after new bytes
 *   resume_reader         resume the parked reader with its result
 * An unsatisfied read parks its coroutine (registry reference) and yields
 * from C; a satisfied one resumes it straight from libuv's read callback.
 *
 * Writes are gathered: write() appends to `wq` and returns. The queue goes
 * out with one uv_try_write when the writing coroutine next waits on this
 * stream or when the loop iteration ends (the loop's flush hook); what the
 * kernel did not take moves to `wflight` and is handed to uv_write. Only one
 * uv_write is in flight; later writes gather in `wq` meanwhile. Writers
 * that must wait (write_high_water, flush) queue in order on `wwait` and
 * are woken by wake_writers, each when its own bytes are out.
 */
#include "stream.h"

#include <lauxlib.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "buffer.h"
#include "coro.h"
#include "host.h"
#include "tcp.h"
#include "tls.h"

static const char STREAM_MT[] = "squall.stream";

enum read_kind { READ_NONE, READ_UNTIL, READ_PATTERN, READ_BYTES, READ_CLOSE };
enum write_wait { WAIT_HIGH_WATER, WAIT_FLUSH };

/* A coroutine parked in write() or flush(). Waiters form a FIFO on the
 * stream and are woken strictly in order, each when its own condition
 * holds: `mark` is the stream's byte count (queued_total) right after what
 * the waiter queued, so a writer waits until at most write_high_water of
 * the bytes up to its mark are unsent, and a flush until none are. Bytes
 * queued later by others never hold an earlier waiter back. Malloc'd when
 * a coroutine parks, freed when it is woken. */
struct write_waiter {
  struct write_waiter *next;
  int ref;           /* the parked coroutine */
  int kind;          /* enum write_wait */
  uint64_t mark;     /* queued_total when it parked */
  uint64_t deadline; /* uv_now() ms at which it times out; 0: never */
};

/* Owned by its userdata and by libuv (see stream.h for when it is freed).
 * Registry references are released in one place each: a parked
 * coroutine's by resume_parked (readers, writers, the handshake), the
 * close callback's by run_close_callback, the rest (delimiter, TLS
 * context) by clear_read or l_gc; the userdata's own by
 * squall_stream_release once the last hold goes. */
struct squall_stream {
  squall_handle h; /* first: the loop closes us through it */
  uv_tcp_t tcp;
  /* Made on first use, so an idle connection without a timeout does not
   * pay for them (memory per idle connection is a figure we track). */
  struct stream_timers *timers; /* read/handshake and write-wait timeouts */
  uv_write_t *wreq;             /* the one uv_write in flight */
  squall_loop *loop;
  squall_stream_opts o;
  squall_buffer rbuf;    /* received, not yet read */
  squall_buffer wq;      /* written, not yet tried */
  squall_buffer wflight; /* handed to uv_write */
  struct squall_stream *next_dirty;

  /* TLS, once start_tls ran: plaintext goes wq -> tls -> wcipher. */
  squall_tls *tls;
  squall_buffer wcipher; /* encrypted, not yet tried */
  int ctx_ref;           /* keeps the context (and its ALPN list) alive */
  int hs_ref;            /* a coroutine waiting for the handshake */

  /* The pending read. */
  int read_kind;
  int partial;
  size_t read_n;    /* READ_BYTES: how many */
  size_t max_bytes; /* READ_UNTIL/PATTERN: limit, SIZE_MAX for none */
  const char *delim;
  size_t dlen;
  int delim_ref; /* keeps `delim` (a Lua string) alive while parked */
  int reader_ref;

  struct write_waiter *wwait;      /* parked writers, oldest first */
  struct write_waiter **wwait_end; /* where the next one is linked */
  uint64_t queued_total;           /* bytes ever queued by write() */
  int close_cb_ref;
  int self_ref; /* the userdata, while `holds` > 0 */
  int holds;
  double timeout; /* seconds; 0: none */

  /* Why it closed: a kind from docs/guide.md's table (always a static string)
   * and a message, kept only once something failed. */
  const char *err_kind;
  char *err_msg;

  unsigned tcp_init : 1;      /* tcp handle initialized and not closed */
  unsigned connected : 1;     /* reading and writing are possible */
  unsigned reading : 1;       /* uv_read_start is active */
  unsigned eof : 1;           /* the peer closed; rbuf may still hold data */
  unsigned closed : 1;        /* closed, as close()/closed() see it */
  unsigned closing : 1;       /* uv_close called on the handles */
  unsigned flush_close : 1;   /* close once the queued writes are out */
  unsigned in_flight : 1;     /* a uv_write is pending */
  unsigned dirty : 1;         /* on the loop's dirty list */
  unsigned held_unsent : 1;   /* a hold for bytes not yet sent */
  unsigned ud_alive : 1;      /* the userdata is not collected */
  unsigned close_cb_run : 1;  /* the close callback has been called */
  unsigned need_pump : 1;     /* TLS holds data the reader can now take */
  unsigned tls_eof : 1;       /* the peer sent close_notify */
  unsigned shutdown_sent : 1; /* close_notify queued */
  unsigned idle : 1;          /* between requests (set_idle) */
  unsigned close_called : 1;  /* close() ran: a second one aborts */
  int handles_open;           /* libuv handles not yet closed */
  void (*reset_done)(squall_stream *, void *);
  void *reset_arg;
};

struct stream_timers {
  uv_timer_t r; /* a read or the handshake */
  uv_timer_t w; /* a write waiting under write_high_water */
};

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
  if (!lua_isnumber(L, -1) || n != (lua_Number)(uint64_t)n || n > 1e15 ||
      (n < 1 && !zero_ok))
    luaL_error(L, "option %s must be a positive integer", key);
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

static lua_State *loop_L(squall_stream *s) {
  return s->loop->finalizing ? NULL : s->loop->L;
}

void squall_stream_hold(lua_State *L, squall_stream *s, int idx) {
  if (s->holds++ == 0) {
    lua_pushvalue(L, idx);
    s->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  }
}

void squall_stream_release(lua_State *L, squall_stream *s) {
  if (s->holds > 0 && --s->holds == 0) {
    if (L != NULL)
      luaL_unref(L, LUA_REGISTRYINDEX, s->self_ref);
    s->self_ref = LUA_NOREF;
  }
}

void squall_stream_push(lua_State *L, squall_stream *s) {
  lua_rawgeti(L, LUA_REGISTRYINDEX, s->self_ref);
}

static void unref(lua_State *L, int *ref) {
  if (*ref != LUA_NOREF && *ref != LUA_REFNIL && L != NULL)
    luaL_unref(L, LUA_REGISTRYINDEX, *ref);
  *ref = LUA_NOREF;
}

static void remove_dirty(squall_stream *s) {
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
  remove_dirty(s);
  /* Only when the loop was finalized with writers parked: their
   * coroutines went with the Lua state. */
  while (s->wwait != NULL) {
    struct write_waiter *w = s->wwait;
    s->wwait = w->next;
    free(w);
  }
  squall_buffer_free(&s->rbuf);
  squall_buffer_free(&s->wq);
  squall_buffer_free(&s->wflight);
  squall_buffer_free(&s->wcipher);
  squall_tls_free(s->tls);
  free(s->timers);
  free(s->wreq);
  free(s->err_msg);
  free(s);
}

static void maybe_free(squall_stream *s) {
  if (s->handles_open == 0 && !s->ud_alive)
    free_stream(s);
}

static size_t unsent(const squall_stream *s) {
  return squall_buffer_len(&s->wq) + squall_buffer_len(&s->wflight) +
         squall_buffer_len(&s->wcipher);
}

static void set_error(squall_stream *s, const char *kind, const char *msg) {
  if (s->err_kind != NULL)
    return; /* the first cause wins */
  s->err_kind = kind;
  s->err_msg = strdup(msg);
}

/* Push nil and the error a failed operation returns: the error that closed
 * the stream, or `closed`. */
static int push_closed(lua_State *L, squall_stream *s) {
  lua_pushnil(L);
  if (s->err_kind != NULL)
    squall_push_error(L, s->err_kind, s->err_msg ? s->err_msg : s->err_kind);
  else
    squall_push_error(L, "closed", "the stream is closed");
  return 2;
}

static void close_handles(squall_stream *s);

/* ---- resuming parked coroutines -------------------------------------- */

static void clear_read(squall_stream *s, lua_State *L) {
  s->read_kind = READ_NONE;
  s->delim = NULL;
  unref(L, &s->delim_ref);
  if (s->timers != NULL && !s->closing)
    uv_timer_stop(&s->timers->r);
}

/* Resume the parked reader with what `push` leaves on its stack. The
 * stream stays anchored until the reader has run, so the collector cannot
 * free it underneath. */
/* Resume the coroutine parked as `ref` with the `nres` values on top of
 * the loop's thread, then drop the hold its wait took. The hold lasts
 * across the resume, so the collector cannot free the stream underneath.
 * Without a Lua state (the loop is being finalized) only the hold goes;
 * callers push nothing then. The one resume path for readers, writers and
 * handshakes. */
static void resume_parked(squall_stream *s, int ref, int nres) {
  lua_State *L = loop_L(s);
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
static int push_outcome(squall_stream *s, int ok) {
  lua_State *L = loop_L(s);
  if (L == NULL)
    return 0;
  if (!ok)
    return push_closed(L, s);
  lua_pushboolean(L, 1);
  return 1;
}

/* Resume the parked reader with the `nres` results on the loop's thread. */
static void resume_reader(squall_stream *s, int nres) {
  int ref = s->reader_ref;
  s->reader_ref = LUA_NOREF;
  clear_read(s, loop_L(s));
  resume_parked(s, ref, nres);
}

/* Unlink the waiter at `link`, free it, and return its coroutine's ref
 * for resume_parked. */
static int unlink_waiter(squall_stream *s, struct write_waiter **link) {
  struct write_waiter *w = *link;
  int ref = w->ref;
  *link = w->next;
  if (*link == NULL)
    s->wwait_end = link;
  free(w);
  return ref;
}

static void arm_write_timer(squall_stream *s);

/* Resume the oldest parked writer with true, or nil and the stream's
 * error. */
static void resume_first_writer(squall_stream *s, int ok) {
  int ref = unlink_waiter(s, &s->wwait);
  arm_write_timer(s);
  resume_parked(s, ref, push_outcome(s, ok));
}

/* ---- the read state machine ------------------------------------------ */

/* The longest match a Lua pattern can make, or SIZE_MAX when it has no
 * bound (a `*`, `+` or `-` quantifier, %b, %f or a back-reference). The
 * pattern is well-formed: string.find checked it when the read started. */
static size_t pattern_max_len(const char *p) {
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

/* READ_PATTERN: where the first match ends, 0 when there is none yet, -1
 * past max_bytes. string.find runs over what is buffered from `scanned`
 * on: a match of at most `dlen` bytes (pattern_max_len) that starts
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
    size_t k = s->dlen;
    /* An anchored, bounded pattern without `$` looks at k bytes at most. */
    if (k != SIZE_MAX && k < len && s->delim[strlen(s->delim) - 1] != '$')
      n = k;
  } else if (s->dlen != SIZE_MAX) {
    from = s->rbuf.scanned;
  }
  lua_getglobal(L, "string");
  lua_getfield(L, -1, "find");
  lua_remove(L, -2);
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
      if (s->dlen != SIZE_MAX && len >= s->dlen && len - s->dlen + 1 > from)
        s->rbuf.scanned = len - s->dlen + 1;
    }
    lua_pop(L, 2);
  } else {
    lua_pop(L, 1);
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

static void close_with(squall_stream *s, const char *kind, const char *msg);
static void close_flushing(squall_stream *s);
static void start_reading(squall_stream *s);
static int tls_pump(squall_stream *s);
static void tls_failed(squall_stream *s, const char *msg);
static void mark_dirty(squall_stream *s);

/* What a read gets now: the one decision behind both a new read
 * (try_inline_read) and a parked one after new bytes or EOF
 * (process_pending_read), as OpenResty builds every receive result in one
 * place. OUTCOME_DATA sets *n to the bytes it takes. */
enum read_outcome {
  OUTCOME_WAIT,          /* not yet: park (or stay parked) */
  OUTCOME_DATA,          /* finish with *n buffered bytes */
  OUTCOME_CLOSED,        /* finish with nil, closed (or the stream's error) */
  OUTCOME_UNSATISFIABLE, /* max_bytes passed without the delimiter */
  OUTCOME_BUFFER_FULL,   /* the read needs more than max_buffer_size */
};

static enum read_outcome read_outcome(lua_State *L, squall_stream *s,
                                      size_t *n) {
  /* After our own close(), reads fail even with bytes buffered. */
  if (s->closed && !s->eof)
    return OUTCOME_CLOSED;
  long pos = find_read_pos(L, s);
  if (pos > 0 || (s->read_kind == READ_CLOSE && s->eof)) {
    *n = pos > 0 ? (size_t)pos : 0;
    return OUTCOME_DATA;
  }
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
    close_with(s, "unsatisfiable",
               "max_bytes reached without finding the delimiter");
  else if (o == OUTCOME_BUFFER_FULL)
    close_with(s, "buffer_full",
               "the read needs more than max_buffer_size bytes");
}

/* The pending read, after new bytes or EOF: finish it, fail it, or keep
 * waiting. */
static void process_pending_read(squall_stream *s) {
  lua_State *L = loop_L(s);
  size_t n = 0;
  enum read_outcome o = read_outcome(L, s, &n);
  if (o == OUTCOME_WAIT)
    return;
  if (o == OUTCOME_DATA || o == OUTCOME_CLOSED) {
    if (L == NULL) /* the loop is closing: nobody to resume */
      return;
    if (o == OUTCOME_DATA) {
      push_consumed(L, s, n);
      resume_reader(s, 1);
      start_reading(s);
    } else {
      resume_reader(s, push_closed(L, s));
    }
    return;
  }
  fail_read(s, o); /* close_with wakes the reader with the error */
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

static void stop_reading(squall_stream *s) {
  if (s->reading) {
    uv_read_stop((uv_stream_t *)&s->tcp);
    s->reading = 0;
  }
}

static void on_eof(squall_stream *s, ssize_t nread);

/* Bytes every stream of this process read from and wrote to its sockets
 * (TLS records included): squall.metrics' squall_bytes_*_total. Streams
 * live on the main loop's thread only, so plain counters do. */
static uint64_t bytes_read, bytes_written;

static void on_read(uv_stream_t *h, ssize_t nread, const uv_buf_t *buf) {
  (void)buf;
  squall_stream *s = h->data;
  if (nread > 0)
    bytes_read += (uint64_t)nread;
  if (nread > 0 && s->tls != NULL) {
    if (squall_tls_feed(s->tls, buf->base, (size_t)nread) != 0) {
      close_with(s, "tls", "out of memory buffering TLS input");
      return;
    }
    int r = tls_pump(s);
    if (r == SQUALL_TLS_ERROR)
      return;
    if (r == SQUALL_TLS_EOF)
      nread = UV_EOF; /* close_notify: a clean end, handled below */
  }
  if (nread > 0) {
    if (s->tls == NULL && buf->base == read_scratch) {
      if (squall_buffer_append(&s->rbuf, read_scratch, (size_t)nread) != 0) {
        close_with(s, "io", "out of memory buffering a read");
        return;
      }
    } else if (s->tls == NULL) {
      squall_buffer_commit(&s->rbuf, (size_t)nread);
    }
    if (s->read_kind != READ_NONE)
      process_pending_read(s);
    /* Backpressure: nobody reads and the buffer is full. */
    if (!s->closed && s->read_kind == READ_NONE &&
        squall_buffer_len(&s->rbuf) >= s->o.max_buffer_size)
      stop_reading(s);
    return;
  }
  if (nread == 0 || nread == UV_ENOBUFS) {
    if (nread == UV_ENOBUFS)
      stop_reading(s);
    return;
  }
  on_eof(s, nread);
}

static void on_eof(squall_stream *s, ssize_t nread) {
  /* EOF or a socket error: what is buffered stays readable, and a reader
   * woken now already sees the stream closed. */
  s->eof = 1;
  s->closed = 1;
  stop_reading(s);
  if (nread != UV_EOF)
    set_error(s, squall_uv_error_kind((int)nread), uv_strerror((int)nread));
  else if (s->tls != NULL && !s->tls_eof && squall_tls_truncated(s->tls))
    tls_failed(s, squall_tls_handshake_done(s->tls)
                      ? "the peer closed the connection mid-record"
                      : "the peer closed the connection during the handshake");
  if (s->read_kind != READ_NONE)
    process_pending_read(s);
  if (nread == UV_EOF)
    close_flushing(s);
  else
    close_with(s, NULL, NULL);
}

static void start_reading(squall_stream *s) {
  if (s->tls != NULL && !s->closing && squall_tls_pending(s->tls) > 0) {
    /* No socket event will come for what OpenSSL already holds: decrypt
     * it from the loop's flush hook. */
    s->need_pump = 1;
    mark_dirty(s);
  }
  if (s->reading || !s->connected || s->closed || s->eof)
    return;
  if (squall_buffer_len(&s->rbuf) >= s->o.max_buffer_size)
    return;
  if (uv_read_start((uv_stream_t *)&s->tcp, on_alloc, on_read) == 0)
    s->reading = 1;
}

static void on_read_timeout(uv_timer_t *t) {
  squall_stream *s = t->data;
  lua_State *L = loop_L(s);
  if (s->reader_ref == LUA_NOREF || L == NULL)
    return;
  lua_pushnil(L);
  squall_push_error(L, "timeout", "the stream's timeout ran out");
  resume_reader(s, 2);
}

static squall_stream *check_stream(lua_State *L, int idx) {
  squall_stream **p = squall_checkudata(L, idx, STREAM_MT);
  return *p;
}

static int flush_writes(squall_stream *s);

/* Start the read set up in `s`: finish it from the buffer, fail it, or
 * park the calling coroutine until on_read finishes it. */
static int try_inline_read(lua_State *L, squall_stream *s, const char *what) {
  size_t n = 0;
  enum read_outcome o = read_outcome(L, s, &n);
  if (o == OUTCOME_DATA) {
    push_consumed(L, s, n);
    clear_read(s, L);
    start_reading(s);
    return 1;
  }
  if (o != OUTCOME_WAIT) {
    clear_read(s, L);
    fail_read(s, o);
    return push_closed(L, s);
  }
  /* It must wait: only a coroutine can, and nothing changed yet. */
  if (!squall_coro_can_wait(L)) {
    clear_read(s, L);
    return squall_coro_check(L, what);
  }
  /* About to wait: what this coroutine wrote goes out first. */
  flush_writes(s);
  if (s->closed && !s->eof) {
    clear_read(s, L);
    return push_closed(L, s);
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
  s->reader_ref = squall_coro_park(L, what);
  if (s->timeout > 0 && s->timers != NULL)
    uv_timer_start(&s->timers->r, on_read_timeout,
                   squall_timeout_ms(s->timeout), 0);
  start_reading(s);
  return lua_yield(L, 0);
}

#define CALL_BACK_KEY "squall.stream.call_back"

/* Callback style: when the last argument is a function, hand the call to
 * the Lua helper iostream.lua registered (core.stream_call_back), which
 * runs `fn` in a coroutine of its own and calls the callback later.
 * Returns 1 when it did. Checked in C so the direct style pays nothing. */
static int call_back(lua_State *L, lua_CFunction fn) {
  int top = lua_gettop(L);
  if (top < 2 || lua_type(L, top) != LUA_TFUNCTION)
    return 0;
  lua_getfield(L, LUA_REGISTRYINDEX, CALL_BACK_KEY);
  if (lua_isnil(L, -1))
    luaL_error(L, "callback style needs squall.iostream loaded");
  lua_pushcfunction(L, fn);
  lua_pushvalue(L, 1);
  lua_pushvalue(L, top);
  for (int i = 2; i < top; i++)
    lua_pushvalue(L, i);
  lua_call(L, top + 1, 0);
  return 1;
}

static int l_stream_call_back(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_settop(L, 1);
  lua_setfield(L, LUA_REGISTRYINDEX, CALL_BACK_KEY);
  return 0;
}

static int busy(lua_State *L) {
  lua_pushnil(L);
  squall_push_error(L, "busy", "a read is already pending on this stream");
  return 2;
}

static size_t opt_max_bytes(lua_State *L, int idx) {
  if (lua_isnoneornil(L, idx))
    return SIZE_MAX;
  lua_Number n = luaL_checknumber(L, idx);
  luaL_argcheck(L, n >= 1 && n == (lua_Number)(uint64_t)n, idx,
                "max_bytes must be a positive integer");
  return (size_t)n;
}

/* stream:read_until(delimiter [, max_bytes]) */
static int l_read_until(lua_State *L) {
  squall_stream *s = check_stream(L, 1);
  if (call_back(L, l_read_until))
    return 0;
  size_t dlen;
  const char *delim = luaL_checklstring(L, 2, &dlen);
  luaL_argcheck(L, dlen > 0, 2, "the delimiter is empty");
  size_t max_bytes = opt_max_bytes(L, 3);
  if (s->read_kind != READ_NONE)
    return busy(L);
  s->read_kind = READ_UNTIL;
  s->delim = delim;
  s->dlen = dlen;
  s->max_bytes = max_bytes;
  squall_buffer_reset_scan(&s->rbuf);
  return try_inline_read(L, s, "read_until");
}

/* stream:read_until_pattern(pattern [, max_bytes]) */
static int l_read_until_pattern(lua_State *L) {
  squall_stream *s = check_stream(L, 1);
  if (call_back(L, l_read_until_pattern))
    return 0;
  const char *pat = luaL_checkstring(L, 2);
  size_t max_bytes = opt_max_bytes(L, 3);
  /* A malformed pattern is misuse: raise here, not later in a callback. */
  lua_getglobal(L, "string");
  lua_getfield(L, -1, "find");
  lua_pushliteral(L, "");
  lua_pushvalue(L, 2);
  lua_call(L, 2, 0);
  lua_pop(L, 1);
  if (s->read_kind != READ_NONE)
    return busy(L);
  s->read_kind = READ_PATTERN;
  s->delim = pat;
  s->dlen = pattern_max_len(pat);
  squall_buffer_reset_scan(&s->rbuf);
  s->max_bytes = max_bytes;
  return try_inline_read(L, s, "read_until_pattern");
}

/* stream:read_bytes(n [, partial]) */
static int l_read_bytes(lua_State *L) {
  squall_stream *s = check_stream(L, 1);
  if (call_back(L, l_read_bytes))
    return 0;
  lua_Number n = luaL_checknumber(L, 2);
  luaL_argcheck(L, n >= 0 && n == (lua_Number)(uint64_t)n, 2,
                "n must be a non-negative integer");
  int partial = lua_toboolean(L, 3);
  if (s->read_kind != READ_NONE)
    return busy(L);
  if (n == 0) {
    lua_pushliteral(L, "");
    return 1;
  }
  s->read_kind = READ_BYTES;
  s->read_n = (size_t)n;
  s->partial = partial;
  if (s->read_n > s->o.max_buffer_size && !partial) {
    s->read_kind = READ_NONE;
    close_with(s, "buffer_full",
               "read_bytes asks for more than "
               "max_buffer_size bytes");
    return push_closed(L, s);
  }
  return try_inline_read(L, s, "read_bytes");
}

/* stream:read_until_close(): everything until the peer closes. */
static int l_read_until_close(lua_State *L) {
  squall_stream *s = check_stream(L, 1);
  if (s->read_kind != READ_NONE)
    return busy(L);
  s->read_kind = READ_CLOSE;
  return try_inline_read(L, s, "read_until_close");
}

/* ---- TLS -------------------------------------------------------------- */

#define TLS_LOG_KEY "squall.stream.tls_log"

/* Resume a coroutine waiting for the handshake: true, or nil and the
 * stream's error. */
static void wake_handshake(squall_stream *s, int ok) {
  if (s->hs_ref == LUA_NOREF)
    return;
  int ref = s->hs_ref;
  s->hs_ref = LUA_NOREF;
  /* After close() the read timer bounds the flush instead. */
  if (s->timers != NULL && !s->closing && !s->flush_close)
    uv_timer_stop(&s->timers->r);
  resume_parked(s, ref, push_outcome(s, ok));
}

/* A TLS failure closes the stream with kind `tls`; it is logged once, at
 * debug level (scanners and broken clients make this routine noise). */
static void tls_failed(squall_stream *s, const char *msg) {
  lua_State *L = loop_L(s);
  if (s->err_kind == NULL && L != NULL) {
    lua_getfield(L, LUA_REGISTRYINDEX, TLS_LOG_KEY);
    if (lua_isfunction(L, -1)) {
      lua_pushstring(L, msg);
      squall_loop_call(s->loop, 1, "TLS log");
    } else {
      lua_pop(L, 1);
    }
  }
  close_with(s, "tls", msg);
}

/* After a TLS failure, OpenSSL has written an alert that says why
 * ("protocol version", "certificate required"): hand it to the kernel
 * with one try_write before the stream closes, as openssl s_server does,
 * so the peer learns the reason instead of seeing the connection drop. */
static void send_alert(squall_stream *s) {
  if (!s->connected || s->closing || s->in_flight ||
      squall_tls_drain(s->tls, &s->wcipher) != 0 ||
      squall_buffer_len(&s->wcipher) == 0)
    return;
  uv_buf_t b = uv_buf_init((char *)squall_buffer_head(&s->wcipher),
                           (unsigned)squall_buffer_len(&s->wcipher));
  int n = uv_try_write((uv_stream_t *)&s->tcp, &b, 1);
  if (n > 0) {
    bytes_written += (uint64_t)n;
    squall_buffer_consume(&s->wcipher, (size_t)n);
  }
}

/* Decrypt what OpenSSL holds into the read buffer (never past
 * max_buffer_size), queue what it produced (handshake records, alerts) and
 * wake a handshake waiter. Returns SQUALL_TLS_OK, _EOF or _ERROR (the
 * stream is closed then). */
static int tls_pump(squall_stream *s) {
  if (s->tls == NULL || s->closing)
    return SQUALL_TLS_ERROR;
  size_t len = squall_buffer_len(&s->rbuf);
  size_t room = s->o.max_buffer_size > len ? s->o.max_buffer_size - len : 0;
  int was_done = squall_tls_handshake_done(s->tls);
  int r = squall_tls_read(s->tls, &s->rbuf, room);
  if (r == SQUALL_TLS_ERROR) {
    send_alert(s);
    tls_failed(s, squall_tls_error(s->tls));
    wake_handshake(s, 0);
    return r;
  }
  if (r == SQUALL_TLS_EOF)
    s->tls_eof = 1;
  if (squall_tls_drain(s->tls, &s->wcipher) != 0) {
    tls_failed(s, "out of memory buffering TLS output");
    return SQUALL_TLS_ERROR;
  }
  if (squall_buffer_len(&s->wcipher) > 0 ||
      (!was_done && squall_tls_handshake_done(s->tls) &&
       squall_buffer_len(&s->wq) > 0))
    mark_dirty(s);
  if (!was_done && squall_tls_handshake_done(s->tls))
    wake_handshake(s, 1);
  return r;
}

/* stream:_start_tls(context, hostname): put TLS under this stream. Bytes
 * already buffered are the peer's first TLS records, so they go to
 * OpenSSL. The caller (iostream.lua) flushed plaintext writes first. */
static int l_start_tls(lua_State *L) {
  squall_stream *s = check_stream(L, 1);
  int server_side = 0;
  SSL_CTX *ctx = squall_tls_check_ctx(L, 2, &server_side);
  const char *hostname = luaL_optstring(L, 3, NULL);
  if (s->tls != NULL)
    return luaL_error(L, "start_tls: the stream already uses TLS");
  if (s->read_kind != READ_NONE)
    return luaL_error(L, "start_tls: a read is pending");
  if (s->closed)
    return push_closed(L, s);
  if (unsent(s) > 0)
    return luaL_error(L, "start_tls: plaintext writes are still queued");
  char err[256];
  s->tls = squall_tls_new(ctx, server_side, hostname, err, sizeof err);
  if (s->tls == NULL) {
    lua_pushnil(L);
    squall_push_error(L, "tls", err);
    return 2;
  }
  lua_pushvalue(L, 2);
  s->ctx_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  size_t len = squall_buffer_len(&s->rbuf);
  if (len > 0) {
    squall_tls_feed(s->tls, squall_buffer_head(&s->rbuf), len);
    squall_buffer_consume(&s->rbuf, len);
  }
  /* A client's hello goes out now; a server answers what it was fed. */
  if (tls_pump(s) == SQUALL_TLS_ERROR)
    return push_closed(L, s);
  flush_writes(s);
  lua_pushboolean(L, 1);
  return 1;
}

static void on_handshake_timeout(uv_timer_t *t) {
  squall_stream *s = t->data;
  close_with(s, "timeout", "the TLS handshake did not finish in time");
  wake_handshake(s, 0);
}

/* stream:_handshake(): wait until the TLS handshake is done. */
static int l_handshake(lua_State *L) {
  squall_stream *s = check_stream(L, 1);
  if (s->tls == NULL)
    return luaL_error(L, "the stream does not use TLS");
  if (s->closed)
    return push_closed(L, s);
  if (squall_tls_handshake_done(s->tls)) {
    lua_pushboolean(L, 1);
    return 1;
  }
  if (s->hs_ref != LUA_NOREF)
    return busy(L);
  s->hs_ref = squall_coro_park(L, "the TLS handshake");
  squall_stream_hold(L, s, 1);
  if (s->timeout > 0 && s->timers != NULL)
    uv_timer_start(&s->timers->r, on_handshake_timeout,
                   squall_timeout_ms(s->timeout), 0);
  start_reading(s);
  return lua_yield(L, 0);
}

static int l_get_alpn_protocol(lua_State *L) {
  squall_stream *s = check_stream(L, 1);
  if (s->tls == NULL) {
    lua_pushnil(L);
    return 1;
  }
  return squall_tls_push_alpn(L, s->tls);
}

static int l_get_peer_certificate(lua_State *L) {
  squall_stream *s = check_stream(L, 1);
  if (s->tls == NULL) {
    lua_pushnil(L);
    return 1;
  }
  return squall_tls_push_peer_certificate(L, s->tls);
}

static int l_uses_tls(lua_State *L) {
  lua_pushboolean(L, check_stream(L, 1)->tls != NULL);
  return 1;
}

/* core.stream_tls_log(fn): fn(message) logs a TLS failure. */
static int l_stream_tls_log(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_settop(L, 1);
  lua_setfield(L, LUA_REGISTRYINDEX, TLS_LOG_KEY);
  return 0;
}

/* ---- writes ----------------------------------------------------------- */

static void on_write(uv_write_t *req, int status);

static void mark_dirty(squall_stream *s) {
  if (s->dirty)
    return;
  s->dirty = 1;
  s->next_dirty = s->loop->dirty;
  s->loop->dirty = s;
}

/* Drop the hold for unsent bytes once everything reached the kernel. */
static void settle_unsent(squall_stream *s) {
  if (unsent(s) == 0 && !s->in_flight) {
    /* Drained: give the write buffers back until the next write. */
    squall_buffer_free(&s->wq);
    squall_buffer_free(&s->wflight);
    squall_buffer_free(&s->wcipher);
  }
  if (s->held_unsent && unsent(s) == 0) {
    s->held_unsent = 0;
    squall_stream_release(loop_L(s), s);
  }
}

/* Whether waiter `w` may go on: how many of the bytes up to its mark are
 * still unsent. Under TLS unsent() counts ciphertext, which is never
 * shorter than its plaintext, so this errs on the side of waiting. */
static int waiter_ready(const squall_stream *s, const struct write_waiter *w) {
  uint64_t after = s->queued_total - w->mark; /* queued later by others */
  uint64_t left = unsent(s);
  left = left > after ? left - after : 0;
  return w->kind == WAIT_FLUSH ? left == 0 : left <= s->o.write_high_water;
}

/* Wake parked writers in order: each whose condition holds, up to the
 * first that must still wait; every one of them, with the stream's error,
 * once it closed for good. A woken coroutine may write and park again:
 * it goes to the tail, and the loop looks at the head afresh. */
static void wake_writers(squall_stream *s) {
  while (s->wwait != NULL) {
    if (s->closing || (s->closed && !s->flush_close))
      resume_first_writer(s, 0);
    else if (waiter_ready(s, s->wwait))
      resume_first_writer(s, 1);
    else
      break;
  }
}

/* Send what is queued: one try_write of everything, the rest handed to
 * uv_write. Returns 0, or a libuv error (the stream is then closed). */
static int flush_writes(squall_stream *s) {
  remove_dirty(s);
  if (!s->connected || s->closing)
    return 0;
  squall_buffer *out = &s->wq;
  if (s->tls != NULL) {
    if (squall_tls_write(s->tls, &s->wq) != SQUALL_TLS_OK ||
        squall_tls_drain(s->tls, &s->wcipher) != 0) {
      tls_failed(s, squall_tls_error(s->tls));
      return UV_EPROTO;
    }
    if (s->flush_close && !s->shutdown_sent && squall_buffer_len(&s->wq) == 0 &&
        squall_tls_handshake_done(s->tls)) {
      s->shutdown_sent = 1;
      squall_tls_shutdown(s->tls);
      squall_tls_drain(s->tls, &s->wcipher);
    }
    out = &s->wcipher;
  }
  if (s->in_flight || squall_buffer_len(out) == 0)
    return 0;
  uv_buf_t b = uv_buf_init((char *)squall_buffer_head(out),
                           (unsigned)squall_buffer_len(out));
  int n = uv_try_write((uv_stream_t *)&s->tcp, &b, 1);
  if (n == UV_EAGAIN || n == UV_ENOSYS)
    n = 0;
  if (n < 0) {
    close_with(s, squall_uv_error_kind(n), uv_strerror(n));
    return n;
  }
  bytes_written += (uint64_t)n;
  squall_buffer_consume(out, (size_t)n);
  if (squall_buffer_len(out) > 0) {
    squall_buffer_swap(out, &s->wflight);
    b = uv_buf_init((char *)squall_buffer_head(&s->wflight),
                    (unsigned)squall_buffer_len(&s->wflight));
    if (s->wreq == NULL) {
      s->wreq = malloc(sizeof *s->wreq);
      if (s->wreq == NULL) {
        close_with(s, "io", "out of memory");
        return UV_ENOMEM;
      }
      s->wreq->data = s;
    }
    int err = uv_write(s->wreq, (uv_stream_t *)&s->tcp, &b, 1, on_write);
    if (err != 0) {
      close_with(s, squall_uv_error_kind(err), uv_strerror(err));
      return err;
    }
    s->in_flight = 1;
  }
  return 0;
}

/* After bytes went out (or failed to): wake the writers whose bytes are
 * out, then finish a close() that waited for them. */
static void after_progress(squall_stream *s) {
  wake_writers(s);
  if (s->flush_close && unsent(s) == 0 && !s->closing)
    close_handles(s);
  settle_unsent(s);
}

static void on_write(uv_write_t *req, int status) {
  squall_stream *s = req->data;
  s->in_flight = 0;
  if (status >= 0)
    bytes_written += squall_buffer_len(&s->wflight);
  squall_buffer_consume(&s->wflight, squall_buffer_len(&s->wflight));
  if (status < 0) {
    if (!s->closing)
      close_with(s, squall_uv_error_kind(status), uv_strerror(status));
    squall_buffer_consume(&s->wq, squall_buffer_len(&s->wq));
    squall_buffer_consume(&s->wcipher, squall_buffer_len(&s->wcipher));
  } else {
    flush_writes(s);
  }
  after_progress(s);
}

/* The loop's hook: send every stream's gathered writes. */
static void flush_dirty(squall_loop *loop, void *arg) {
  (void)arg;
  while (loop->dirty != NULL) {
    squall_stream *s = loop->dirty;
    if (s->need_pump) {
      s->need_pump = 0;
      remove_dirty(s);
      int r = tls_pump(s);
      if (r == SQUALL_TLS_OK && s->read_kind != READ_NONE)
        process_pending_read(s);
      else if (r == SQUALL_TLS_EOF)
        on_eof(s, UV_EOF);
      continue; /* tls_pump marked it dirty again if it has output */
    }
    flush_writes(s); /* takes it off the list */
    after_progress(s);
  }
}

static void on_write_timeout(uv_timer_t *t);

/* Point the write timer at the earliest deadline among the waiters (they
 * may differ: set_timeout can change between two writes). */
static void arm_write_timer(squall_stream *s) {
  if (s->timers == NULL || s->closing)
    return;
  uint64_t first = 0;
  for (struct write_waiter *w = s->wwait; w != NULL; w = w->next)
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
  lua_State *L = loop_L(s);
  if (L == NULL)
    return;
  uint64_t now = uv_now(&s->loop->uv);
  for (;;) {
    struct write_waiter **link = &s->wwait;
    while (*link != NULL && ((*link)->deadline == 0 || (*link)->deadline > now))
      link = &(*link)->next;
    if (*link == NULL)
      break;
    int ref = unlink_waiter(s, link);
    lua_pushnil(L);
    squall_push_error(L, "timeout", "the stream's timeout ran out");
    resume_parked(s, ref, 2);
  }
  arm_write_timer(s);
  wake_writers(s);
}

/* Park the calling coroutine at the tail of the writers' queue until
 * waiter_ready holds for it (woken by wake_writers), it times out, or the
 * stream closes. */
static int wait_writer(lua_State *L, squall_stream *s, int kind,
                       const char *what) {
  squall_coro_check(L, what);
  struct write_waiter *w = malloc(sizeof *w);
  if (w == NULL)
    return luaL_error(L, "out of memory");
  w->ref = squall_coro_park(L, what);
  w->kind = kind;
  w->mark = s->queued_total;
  w->deadline = 0;
  w->next = NULL;
  if (s->timeout > 0 && s->timers != NULL)
    w->deadline = uv_now(&s->loop->uv) + squall_timeout_ms(s->timeout);
  *s->wwait_end = w;
  s->wwait_end = &w->next;
  squall_stream_hold(L, s, 1);
  arm_write_timer(s);
  return lua_yield(L, 0);
}

/* Before queueing `total` bytes: 0 when they may be queued, else the
 * results pushed (nil and closed, or buffer_full past
 * max_write_buffer_size). */
static int write_refused(lua_State *L, squall_stream *s, size_t total) {
  if (s->closed)
    return push_closed(L, s);
  if (s->o.max_write_buffer_size > 0 &&
      unsent(s) + total > s->o.max_write_buffer_size) {
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
static int write_queued(lua_State *L, squall_stream *s, size_t total,
                        int may_wait) {
  s->queued_total += total;
  if (total == 0) {
    lua_pushboolean(L, 1);
    return 1;
  }
  if (!s->held_unsent) {
    s->held_unsent = 1;
    squall_stream_hold(L, s, 1);
  }
  mark_dirty(s);
  if (unsent(s) > s->o.write_high_water) {
    if (flush_writes(s) != 0)
      return push_closed(L, s);
    settle_unsent(s);
    if (unsent(s) > s->o.write_high_water && may_wait &&
        squall_coro_can_wait(L))
      return wait_writer(L, s, WAIT_HIGH_WATER, "write");
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* stream:write(data [, callback]): data is a string or an array of
 * strings. With a callback (iostream.lua waits for it with flush in a
 * coroutine of its own) the caller never waits here. */
static int l_write(lua_State *L) {
  squall_stream *s = check_stream(L, 1);
  size_t total = 0;
  int t = lua_type(L, 2);
  int n = 0;
  if (t == LUA_TTABLE) {
    n = (int)lua_objlen(L, 2);
    for (int i = 1; i <= n; i++) {
      lua_rawgeti(L, 2, i);
      if (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER)
        return luaL_error(L,
                          "bad argument #1 to 'write' (item %d is %s, "
                          "not a string)",
                          i, luaL_typename(L, -1));
      total += lua_objlen(L, -1);
      lua_pop(L, 1);
    }
  } else if (t != LUA_TSTRING) {
    return luaL_argerror(L, 2, "string or array of strings expected");
  }
  if (t == LUA_TSTRING)
    total = lua_objlen(L, 2);
  int refused = write_refused(L, s, total);
  if (refused)
    return refused;
  int err = 0;
  if (t == LUA_TSTRING) {
    err = squall_buffer_append(&s->wq, lua_tostring(L, 2), total);
  } else {
    for (int i = 1; i <= n && err == 0; i++) {
      lua_rawgeti(L, 2, i);
      size_t len;
      const char *p = lua_tolstring(L, -1, &len);
      err = squall_buffer_append(&s->wq, p, len);
      lua_pop(L, 1);
    }
  }
  if (err != 0)
    return luaL_error(L, "out of memory queueing a write");
  return write_queued(L, s, total, lua_isnoneornil(L, 3));
}

squall_stream *squall_stream_check(lua_State *L, int idx) {
  return check_stream(L, idx);
}

int squall_stream_write_bytes(lua_State *L, squall_stream *s, const char *p,
                              size_t n) {
  int refused = write_refused(L, s, n);
  if (refused)
    return refused;
  if (squall_buffer_append(&s->wq, p, n) != 0)
    return luaL_error(L, "out of memory queueing a write");
  return write_queued(L, s, n, 1);
}

/* stream:flush(): wait until everything queued reached the kernel. */
static int l_flush(lua_State *L) {
  squall_stream *s = check_stream(L, 1);
  if (call_back(L, l_flush))
    return 0;
  squall_coro_check(L, "flush");
  if (s->closed && !s->flush_close)
    return push_closed(L, s);
  if (flush_writes(s) != 0)
    return push_closed(L, s);
  settle_unsent(s);
  if (unsent(s) == 0) {
    lua_pushboolean(L, 1);
    return 1;
  }
  return wait_writer(L, s, WAIT_FLUSH, "flush");
}

/* ---- close ------------------------------------------------------------ */

static void run_close_callback(squall_stream *s) {
  lua_State *L = loop_L(s);
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
    if (s->reset_done != NULL) {
      /* A failed connect attempt, not the end of the stream. */
      void (*done)(squall_stream *, void *) = s->reset_done;
      s->reset_done = NULL;
      s->handles_open--;
      done(s, s->reset_arg);
      if (s->closing)
        maybe_free(s);
      return;
    }
    s->tcp_init = 0;
    /* Whoever still waits learns the stream closed; then the callback. */
    lua_State *L = loop_L(s);
    if (s->reader_ref != LUA_NOREF && L != NULL)
      resume_reader(s, push_closed(L, s));
    wake_writers(s); /* closing: every one of them, with the error */
    if (s->hs_ref != LUA_NOREF)
      wake_handshake(s, 0);
    if (s->held_unsent) {
      s->held_unsent = 0;
      squall_stream_release(L, s);
    }
    run_close_callback(s);
  }
  s->handles_open--;
  maybe_free(s);
}

/* Close the libuv handles; the stream is freed once they are done. */
static void close_handles(squall_stream *s) {
  if (s->closing)
    return;
  s->closing = 1;
  s->closed = 1;
  remove_dirty(s);
  stop_reading(s);

  if (s->tcp_init)
    uv_close((uv_handle_t *)&s->tcp, on_handle_closed);
  if (s->timers != NULL) {
    uv_close((uv_handle_t *)&s->timers->r, on_handle_closed);
    uv_close((uv_handle_t *)&s->timers->w, on_handle_closed);
  }
  if (!s->tcp_init) {
    /* Never connected: no tcp close callback will say goodbye. */
    lua_State *L = loop_L(s);
    if (s->reader_ref != LUA_NOREF && L != NULL)
      resume_reader(s, push_closed(L, s));
    run_close_callback(s);
  }
}

/* Close now, recording why (`kind` NULL: a clean close). Queued writes are
 * dropped: this is the path for errors and for the peer going away. */
static void close_with(squall_stream *s, const char *kind, const char *msg) {
  if (kind != NULL)
    set_error(s, kind, msg);
  s->closed = 1;
  s->flush_close = 0;
  close_handles(s);
}

/* The loop is closing: close without flushing. */
static void close_for_loop(squall_handle *h) {
  close_with((squall_stream *)h, NULL, NULL);
}

static void on_close_timeout(uv_timer_t *t) {
  close_with(t->data, "timeout",
             "close() could not send what was queued within the stream's "
             "timeout");
}

/* Close once what is queued has gone out (the peer may still read after
 * closing its side, and nothing written is dropped). The wait is bounded
 * by the stream's timeout; without one it lasts as long as the peer
 * reads, unless abort() (or a second close()) cuts it short. */
static void close_flushing(squall_stream *s) {
  if (s->closing)
    return;
  s->closed = 1;
  s->flush_close = 1; /* for TLS: close_notify follows the last record */
  if (s->tls == NULL || squall_tls_handshake_done(s->tls))
    stop_reading(s); /* else the handshake must finish before the flush */
  if (s->connected && (unsent(s) > 0 || s->tls != NULL) &&
      flush_writes(s) == 0 && unsent(s) > 0) {
    /* after_progress closes once the queue is out. The read timer is
     * free: no read can wait on a closed stream. */
    if (s->timeout > 0 && s->timers != NULL)
      uv_timer_start(&s->timers->r, on_close_timeout,
                     squall_timeout_ms(s->timeout), 0);
    return;
  }
  close_handles(s);
}

/* stream:close(): flush what is queued, then close. A reader parked on
 * the stream gets nil, closed now. Called again while the flush waits,
 * it closes at once, as abort() does. */
static int l_close(lua_State *L) {
  squall_stream *s = check_stream(L, 1);
  if (s->closed) {
    /* Only a flush this program asked for is cut short: one that began
     * when the peer half-closed still delivers what was written. */
    if (s->close_called && s->flush_close && !s->closing)
      close_with(s, NULL, NULL);
    s->close_called = 1;
    return 0;
  }
  s->close_called = 1;
  s->closed = 1; /* what the woken reader does next sees it closed */
  if (s->reader_ref != LUA_NOREF) {
    lua_State *LL = loop_L(s);
    if (LL != NULL)
      resume_reader(s, push_closed(LL, s));
  }
  squall_buffer_free(&s->rbuf);
  close_flushing(s);
  return 0;
}

/* stream:abort(): close now, dropping whatever is still queued. */
static int l_abort(lua_State *L) {
  squall_stream *s = check_stream(L, 1);
  if (!s->closing)
    close_with(s, NULL, NULL);
  return 0;
}

/* ---- the rest of the Lua surface -------------------------------------- */

static int l_set_close_callback(lua_State *L) {
  squall_stream *s = check_stream(L, 1);
  if (!lua_isnil(L, 2))
    luaL_checktype(L, 2, LUA_TFUNCTION);
  unref(L, &s->close_cb_ref);
  if (lua_isnil(L, 2))
    return 0;
  if (s->close_cb_run) {
    /* Closed already: iostream.lua runs it on the next iteration, as
     * Tornado does. */
    lua_pushboolean(L, 0);
    return 1;
  }
  lua_pushvalue(L, 2);
  s->close_cb_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushboolean(L, 1);
  return 1;
}

/* stream:set_idle(flag): the handler is between requests, so a graceful
 * shutdown may close this stream without losing a request. */
static int l_set_idle(lua_State *L) {
  check_stream(L, 1)->idle = lua_toboolean(L, 2);
  return 0;
}

static int l_is_idle(lua_State *L) {
  lua_pushboolean(L, check_stream(L, 1)->idle);
  return 1;
}

static int l_closed(lua_State *L) {
  lua_pushboolean(L, check_stream(L, 1)->closed);
  return 1;
}

static int l_reading(lua_State *L) {
  lua_pushboolean(L, check_stream(L, 1)->read_kind != READ_NONE);
  return 1;
}

static int l_writing(lua_State *L) {
  squall_stream *s = check_stream(L, 1);
  lua_pushboolean(L, unsent(s) > 0 && !s->closing); /* never, once closed */
  return 1;
}

/* stream:get_write_buffer_size(): bytes queued that the kernel has not
 * taken yet (asyncio's name); with TLS, counted after encryption. */
static int l_get_write_buffer_size(lua_State *L) {
  lua_pushnumber(L, (lua_Number)unsent(check_stream(L, 1)));
  return 1;
}

/* stream:_error(): the error that closed the stream, or nil. */
static int l_error(lua_State *L) {
  squall_stream *s = check_stream(L, 1);
  if (s->err_kind == NULL)
    return 0;
  squall_push_error(L, s->err_kind, s->err_msg ? s->err_msg : s->err_kind);
  return 1;
}

static int l_set_timeout(lua_State *L) {
  squall_stream *s = check_stream(L, 1);
  if (lua_isnoneornil(L, 2)) {
    s->timeout = 0;
    return 0;
  }
  lua_Number t = luaL_checknumber(L, 2);
  luaL_argcheck(L, t > 0, 2, "timeout must be positive (or nil for none)");
  if (s->timers == NULL && !s->closing) {
    s->timers = malloc(sizeof *s->timers);
    if (s->timers == NULL)
      return luaL_error(L, "out of memory");
    uv_timer_init(&s->loop->uv, &s->timers->r);
    uv_timer_init(&s->loop->uv, &s->timers->w);
    s->timers->r.data = s->timers->w.data = s;
    s->handles_open += 2;
  }
  s->timeout = t;
  return 0;
}

static int l_set_nodelay(lua_State *L) {
  squall_stream *s = check_stream(L, 1);
  if (s->closed || !s->tcp_init)
    return push_closed(L, s);
  int err = uv_tcp_nodelay(&s->tcp, lua_isnone(L, 2) || lua_toboolean(L, 2));
  if (err != 0)
    return squall_push_uv_error(L, err);
  lua_pushboolean(L, 1);
  return 1;
}

static int l_fileno(lua_State *L) {
  squall_stream *s = check_stream(L, 1);
  uv_os_fd_t fd;
  if (s->closing || !s->tcp_init ||
      uv_fileno((uv_handle_t *)&s->tcp, &fd) != 0) {
    lua_pushinteger(L, -1);
    return 1;
  }
  lua_pushinteger(L, fd);
  return 1;
}

static int sockname(lua_State *L, int peer) {
  squall_stream *s = check_stream(L, 1);
  if (s->closing || !s->tcp_init)
    return push_closed(L, s);
  struct sockaddr_storage ss;
  int len = sizeof ss;
  int err = peer ? uv_tcp_getpeername(&s->tcp, (struct sockaddr *)&ss, &len)
                 : uv_tcp_getsockname(&s->tcp, (struct sockaddr *)&ss, &len);
  if (err != 0)
    return squall_push_uv_error(L, err);
  return squall_push_sockaddr(L, (struct sockaddr *)&ss);
}

static int l_getpeername(lua_State *L) {
  return sockname(L, 1);
}

static int l_getsockname(lua_State *L) {
  return sockname(L, 0);
}

static int l_gc(lua_State *L) {
  squall_stream **p = luaL_checkudata(L, 1, STREAM_MT);
  squall_stream *s = *p;
  if (s == NULL)
    return 0;
  *p = NULL;
  s->ud_alive = 0;
  lua_State *RL = s->loop->finalizing ? NULL : L;
  unref(RL, &s->close_cb_ref);
  unref(RL, &s->delim_ref);
  unref(RL, &s->ctx_ref);
  s->close_cb_run = 1;
  if (!s->closing)
    close_with(s, NULL, NULL);
  maybe_free(s);
  return 0;
}

static int l_tostring(lua_State *L) {
  squall_stream *s = check_stream(L, 1);
  lua_pushfstring(L, "squall.stream (%s): %p", s->closed ? "closed" : "open",
                  (void *)s);
  return 1;
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
  s->wwait_end = &s->wwait;
  s->close_cb_ref = s->self_ref = LUA_NOREF;
  s->ctx_ref = s->hs_ref = LUA_NOREF;
  s->max_bytes = SIZE_MAX;
  s->ud_alive = 1;
  s->handles_open = 0;
  *p = s;
  luaL_getmetatable(L, STREAM_MT);
  lua_setmetatable(L, -2);
  if (loop->end_hook == NULL)
    loop->end_hook = flush_dirty;
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

void squall_stream_reset_tcp(squall_stream *s,
                             void (*done)(squall_stream *, void *), void *arg) {
  s->reset_done = done;
  s->reset_arg = arg;
  s->reading = 0;
  s->tcp_init = 0; /* closing: close_handles must not close it again */
  uv_close((uv_handle_t *)&s->tcp, on_handle_closed);
}

void squall_stream_abort(squall_stream *s) {
  close_with(s, NULL, NULL);
}

int squall_stream_connected(squall_stream *s) {
  s->connected = 1;
  start_reading(s);
  return 0;
}

int squall_stream_open_fd(squall_stream *s, int fd) {
  int err = squall_stream_init_tcp(s);
  if (err == 0)
    err = uv_tcp_open(&s->tcp, fd);
  if (err != 0) {
    close(fd);
    close_with(s, squall_uv_error_kind(err), uv_strerror(err));
    return err;
  }
  return squall_stream_connected(s);
}

uv_tcp_t *squall_stream_tcp(squall_stream *s) {
  return &s->tcp;
}

/* core.io_bytes(): bytes read, bytes written by every stream so far. */
static int l_io_bytes(lua_State *L) {
  lua_pushnumber(L, (lua_Number)bytes_read);
  lua_pushnumber(L, (lua_Number)bytes_written);
  return 2;
}

int squall_stream_open(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"read_until", l_read_until},
      {"read_until_pattern", l_read_until_pattern},
      {"read_bytes", l_read_bytes},
      {"read_until_close", l_read_until_close},
      {"write", l_write},
      {"flush", l_flush},
      {"close", l_close},
      {"abort", l_abort},
      {"set_close_callback", l_set_close_callback},
      {"closed", l_closed},
      {"reading", l_reading},
      {"writing", l_writing},
      {"get_write_buffer_size", l_get_write_buffer_size},
      {"_error", l_error},
      {"set_timeout", l_set_timeout},
      {"set_nodelay", l_set_nodelay},
      {"fileno", l_fileno},
      {"getpeername", l_getpeername},
      {"getsockname", l_getsockname},
      {"_start_tls", l_start_tls},
      {"_handshake", l_handshake},
      {"get_alpn_protocol", l_get_alpn_protocol},
      {"get_peer_certificate", l_get_peer_certificate},
      {"uses_tls", l_uses_tls},
      {"set_idle", l_set_idle},
      {"is_idle", l_is_idle},
      {NULL, NULL},
  };
  luaL_newmetatable(L, STREAM_MT);
  squall_register_udata(L, STREAM_MT);
  lua_newtable(L);
  luaL_register(L, NULL, methods);
  lua_pushvalue(L, -1);
  lua_setfield(L, -3, "__index");
  lua_setfield(L, -3, "stream_methods"); /* core.stream_methods */
  lua_pushcfunction(L, l_gc);
  lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, l_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_setfield(L, -2, "stream_mt"); /* core.stream_mt */
  lua_pushcfunction(L, l_stream_call_back);
  lua_setfield(L, -2, "stream_call_back");
  lua_pushcfunction(L, l_stream_tls_log);
  lua_setfield(L, -2, "stream_tls_log");
  lua_pushcfunction(L, l_io_bytes);
  lua_setfield(L, -2, "io_bytes");
  return 0;
}
