// clang-format off
/* stream_impl.h: what the stream files share, and nobody else.
 *
 * runtime/stream*.c implement one object, squall_stream (stream.h is its
 * public face), split by concern:
 *   stream.c        options, lifetime, resuming parked coroutines, close,
 *                   construction
 *   stream_read.c   the read state machine
 *   stream_write.c  the write queue and the writers waiting on it
 *   stream_tls.c    the TLS glue: the handshake, pumping records, alerts
 *   stream_lua.c    the Lua-facing methods (check, call, push),
 *                   squall_stream_open, and the FFI fast paths
 * The struct, its flags and the functions one file calls in another live
 * here; everything else is static to its file. */
// clang-format on
#ifndef SQUALL_STREAM_IMPL_H
#define SQUALL_STREAM_IMPL_H

#include "stream.h"

#include <assert.h>
#include <lauxlib.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "buffer.h"
#include "coro.h"
#include "host.h"
#include "tls.h"

#define STREAM_MT "squall.stream"

/* string.find as it was when the stream module loaded (stream_read.c). */
#define STREAM_FIND_KEY "squall.stream.find"

enum read_kind { READ_NONE, READ_UNTIL, READ_PATTERN, READ_BYTES, READ_CLOSE };

/* Where a stream is in its life. It only moves forward, and only through
 * stream_set_life, which asserts that:
 *   LIFE_OPEN      reading and writing
 *   LIFE_CLOSED    closed to the program (close() was called, the peer
 *                  ended, or an error closed it): closed() is true, what
 *                  was buffered before an EOF can still be read, and the
 *                  handles are still open
 *   LIFE_FLUSHING  closed, and the handles close once the queued writes
 *                  are out (stream_close_flushing; abort() or a second
 *                  close() cuts it short)
 *   LIFE_CLOSING   uv_close was called on the handles
 *                  (stream_close_handles): the stream is freed once they
 *                  and the userdata are gone (stream_maybe_free)
 * Entered from: OPEN -> CLOSED by close() and EOF; OPEN/CLOSED ->
 * FLUSHING by stream_close_flushing; any -> CLOSING by
 * stream_close_handles (stream_close_with, the flush done, the loop). */
enum stream_life { LIFE_OPEN, LIFE_CLOSED, LIFE_FLUSHING, LIFE_CLOSING };
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
 * Who releases each registry reference:
 * - a parked coroutine's: stream_resume_parked (readers, writers, the
 *   handshake);
 * - the close callback's: run_close_callback when it runs, else
 *   set_close_callback when replaced, or l_gc when the stream is collected
 *   unclosed;
 * - the delimiter's: stream_clear_read, or l_gc;
 * - the TLS context's: l_gc;
 * - the userdata's own: squall_stream_release once the last hold goes. */
struct squall_stream {
  squall_handle h; /* first: the loop closes us through it */
  uv_tcp_t tcp;
  /* Made on first use, so an idle connection without a timeout does not
   * pay for them (memory per idle connection is a figure we track). */
  struct stream_timers *timers; /* read/handshake and write-wait timeouts */
  struct stream_writes *w;      /* what is being written; NULL when idle */
  squall_loop *loop;
  squall_stream_opts o;
  squall_buffer rbuf; /* received, not yet read */
  struct squall_stream *next_dirty;

  /* TLS, once start_tls ran (NULL before: a plain connection carries
   * none of it). */
  struct stream_tls *tls;

  /* The pending read. */
  int read_kind;
  int partial;
  size_t read_n;    /* READ_BYTES: how many */
  size_t max_bytes; /* READ_UNTIL/PATTERN: limit, SIZE_MAX for none */
  const char *delim;
  union {
    size_t dlen;      /* READ_UNTIL: the delimiter's length */
    size_t match_max; /* READ_PATTERN: the longest match, SIZE_MAX: none */
  };
  int delim_ref; /* keeps `delim` (a Lua string) alive while parked */
  int reader_ref;

  int close_cb_ref;
  int self_ref; /* the userdata, while `holds` > 0 */
  int holds;
  double timeout;   /* seconds; 0: none */
  uint64_t idle_at; /* uv_now() when set_idle(true) came; kept while idle */

  /* Why it closed: a kind from docs/guide.md's table (always a static string)
   * and a message, kept only once something failed. */
  const char *err_kind;
  char *err_msg;

  unsigned tcp_init : 1;        /* tcp handle initialized and not closed */
  unsigned connected : 1;       /* reading and writing are possible */
  unsigned reading : 1;         /* uv_read_start is active */
  unsigned eof : 1;             /* the peer closed; rbuf may still hold data */
  unsigned life : 2;            /* enum stream_life: stream_set_life */
  unsigned in_flight : 1;       /* a uv_write is pending */
  unsigned dirty : 1;           /* on the loop's dirty list */
  unsigned held_unsent : 1;     /* a hold for bytes not yet sent */
  unsigned ud_alive : 1;        /* the userdata is not collected */
  unsigned close_cb_run : 1;    /* the close callback has been called */
  unsigned need_pump : 1;       /* TLS holds data the reader can now take */
  unsigned tls_eof : 1;         /* the peer sent close_notify */
  unsigned shutdown_sent : 1;   /* close_notify queued */
  unsigned idle : 1;            /* between requests (set_idle) */
  unsigned close_when_idle : 1; /* a graceful shutdown: close at set_idle */
  unsigned close_called : 1;    /* close() ran: a second one aborts */
  int handles_open;             /* libuv handles not yet closed */
};

/* What a stream has while it writes: made by the first write, freed once
 * every byte is out and no writer waits (stream_settle_unsent), so an idle
 * connection carries none of it, as it carries no buffers. */
struct stream_writes {
  squall_buffer wq;                /* written, not yet tried */
  squall_buffer wflight;           /* handed to uv_write */
  struct write_waiter *wwait;      /* parked writers, oldest first */
  struct write_waiter **wwait_end; /* where the next one is linked */
  uint64_t queued_total; /* bytes queued by write() since it was made */
  uv_write_t req;        /* the one uv_write in flight */
};

/* What only a TLS stream has: plaintext goes wq -> OpenSSL -> wcipher. */
struct stream_tls {
  squall_tls *t;
  squall_buffer wcipher; /* encrypted, not yet tried */
  int ctx_ref;           /* keeps the context (and its ALPN list) alive */
  int hs_ref;            /* a coroutine waiting for the handshake */
};

struct stream_timers {
  uv_timer_t r; /* a read or the handshake */
  uv_timer_t w; /* a write waiting under write_high_water */
};

/* The flag combinations that are legal, checked where libuv calls back
 * and where a state changes (as libuv asserts its own): a stream closes
 * its handles only once closed; a uv_write in flight has its request and
 * a live handle; reading needs the TCP handle; a hold for unsent bytes is
 * one of the holds; the TLS flags need a TLS layer; a parked reader has a
 * read set up. */
/* Move `s` on to `to`: never back, and never twice to the same state
 * except LIFE_CLOSED (close() after an EOF closed it). */
static inline void stream_set_life(squall_stream *s, enum stream_life to) {
  assert(to > s->life || (to == LIFE_CLOSED && s->life == LIFE_CLOSED));
  s->life = to;
}

/* closed(): the program can no longer use it. */
static inline int stream_closed(const squall_stream *s) {
  return s->life >= LIFE_CLOSED;
}

static inline int stream_flushing(const squall_stream *s) {
  return s->life == LIFE_FLUSHING;
}

static inline int stream_closing(const squall_stream *s) {
  return s->life == LIFE_CLOSING;
}

static inline void stream_assert_flags(const squall_stream *s) {
  assert(!s->reading || s->life < LIFE_CLOSING);
  assert(!s->connected || s->tcp_init || s->life == LIFE_CLOSING);
  assert(!s->in_flight || (s->w != NULL && s->handles_open > 0));
  assert(!s->reading || s->tcp_init);
  assert(!s->held_unsent || s->holds > 0);
  assert(!(s->tls_eof || s->shutdown_sent || s->need_pump) || s->tls != NULL);
  assert(s->reader_ref == LUA_NOREF || s->read_kind != READ_NONE);
  (void)s;
}

/* Bytes every stream of this process read from and wrote to its sockets
 * (core.io_bytes, for squall.metrics). */
extern uint64_t squall_stream_bytes_read, squall_stream_bytes_written;

/* stream.c */
void stream_clear_read(squall_stream *s, lua_State *L);
void stream_close_flushing(squall_stream *s);
void stream_close_handles(squall_stream *s);
void stream_close_with(squall_stream *s, const char *kind, const char *msg);
lua_State *stream_loop_L(squall_stream *s);
void stream_maybe_free(squall_stream *s);
int stream_push_closed(lua_State *L, squall_stream *s);
int stream_push_outcome(squall_stream *s, int ok);
void stream_remove_dirty(squall_stream *s);
void stream_resume_first_writer(squall_stream *s, int ok);
void stream_resume_parked(squall_stream *s, int ref, int nres);
void stream_resume_reader(squall_stream *s, int nres);
void stream_set_error(squall_stream *s, const char *kind, const char *msg);
int stream_unlink_waiter(squall_stream *s, struct write_waiter **link);
void stream_unref(lua_State *L, int *ref);
size_t stream_unsent(const squall_stream *s);
struct stream_writes *stream_writes(squall_stream *s);

/* stream_read.c */
void stream_on_eof(squall_stream *s, ssize_t nread);
size_t stream_pattern_max_len(const char *p);
void stream_process_pending_read(squall_stream *s);
void stream_start_reading(squall_stream *s);
void stream_stop_reading(squall_stream *s);
int stream_try_inline_read(lua_State *L, squall_stream *s, const char *what);

/* stream_write.c */
void stream_arm_write_timer(squall_stream *s);
void stream_flush_dirty(squall_loop *loop, void *arg);
int stream_flush_writes(squall_stream *s);
void stream_mark_dirty(squall_stream *s);
void stream_settle_unsent(squall_stream *s);
int stream_wait_writer(lua_State *L, squall_stream *s, int kind,
                       const char *what);
void stream_wake_writers(squall_stream *s);
int stream_write_queued(lua_State *L, squall_stream *s, size_t total,
                        int may_wait);
int stream_write_refused(lua_State *L, squall_stream *s, size_t total);
int stream_write_too_big(const squall_stream *s, size_t n);

/* stream_tls.c */
int stream_l_get_alpn_protocol(lua_State *L);
int stream_l_get_peer_certificate(lua_State *L);
int stream_l_handshake(lua_State *L);
int stream_l_start_tls(lua_State *L);
int stream_l_tls_log(lua_State *L);
int stream_l_uses_tls(lua_State *L);
void stream_tls_failed(squall_stream *s, const char *msg);
int stream_tls_pump(squall_stream *s);
void stream_wake_handshake(squall_stream *s, int ok);

/* stream_lua.c */
int stream_busy(lua_State *L);
squall_stream *stream_check(lua_State *L, int idx);

#endif
