/* stream_tls.c: the IOStream's TLS glue: the handshake, pumping records,
 * alerts (stream_impl.h lists the files). */
#include "stream_impl.h"

/* ---- TLS -------------------------------------------------------------- */

#define TLS_LOG_KEY "squall.stream.tls_log"

/* Resume a coroutine waiting for the handshake: true, or nil and the
 * stream's error. */
void stream_wake_handshake(squall_stream *s, int ok) {
  if (s->tls == NULL || s->tls->hs_ref == LUA_NOREF)
    return;
  int ref = s->tls->hs_ref;
  s->tls->hs_ref = LUA_NOREF;
  /* After close() the read timer bounds the flush instead. */
  if (s->timers != NULL && !stream_closing(s) && !stream_flushing(s))
    uv_timer_stop(&s->timers->r);
  stream_resume_parked(s, ref, stream_push_outcome(s, ok));
}

/* A TLS failure closes the stream with kind `tls`; it is logged once, at
 * debug level (scanners and broken clients make this routine noise). */
void stream_tls_failed(squall_stream *s, const char *msg) {
  lua_State *L = stream_loop_L(s);
  if (s->err_kind == NULL && L != NULL) {
    lua_getfield(L, LUA_REGISTRYINDEX, TLS_LOG_KEY);
    if (lua_isfunction(L, -1)) {
      lua_pushstring(L, msg);
      squall_loop_call(s->loop, 1, "TLS log");
    } else {
      lua_pop(L, 1);
    }
  }
  stream_close_with(s, "tls", msg);
}

/* After a TLS failure, OpenSSL has written an alert that says why
 * ("protocol version", "certificate required"): hand it to the kernel
 * with one try_write before the stream closes, as openssl s_server does,
 * so the peer learns the reason instead of seeing the connection drop. */
static void send_alert(squall_stream *s) {
  if (!s->connected || stream_closing(s) || s->in_flight ||
      squall_tls_drain(s->tls->t, &s->tls->wcipher) != 0 ||
      squall_buffer_len(&s->tls->wcipher) == 0)
    return;
  uv_buf_t b = uv_buf_init((char *)squall_buffer_head(&s->tls->wcipher),
                           (unsigned)squall_buffer_len(&s->tls->wcipher));
  int n = uv_try_write((uv_stream_t *)&s->tcp, &b, 1);
  if (n > 0) {
    squall_stream_bytes_written += (uint64_t)n;
    squall_buffer_consume(&s->tls->wcipher, (size_t)n);
  }
}

/* Decrypt what OpenSSL holds into the read buffer (never past
 * max_buffer_size), queue what it produced (handshake records, alerts) and
 * wake a handshake waiter. Returns SQUALL_TLS_OK, _EOF or _ERROR (the
 * stream is closed then). */
int stream_tls_pump(squall_stream *s) {
  if (s->tls == NULL || stream_closing(s))
    return SQUALL_TLS_ERROR;
  size_t len = squall_buffer_len(&s->rbuf);
  size_t room = s->o.max_buffer_size > len ? s->o.max_buffer_size - len : 0;
  int was_done = squall_tls_handshake_done(s->tls->t);
  int r = squall_tls_read(s->tls->t, &s->rbuf, room);
  if (r == SQUALL_TLS_ERROR) {
    send_alert(s);
    stream_tls_failed(s, squall_tls_error(s->tls->t));
    stream_wake_handshake(s, 0);
    return r;
  }
  if (r == SQUALL_TLS_EOF)
    s->tls_eof = 1;
  if (squall_tls_drain(s->tls->t, &s->tls->wcipher) != 0) {
    stream_tls_failed(s, "out of memory buffering TLS output");
    return SQUALL_TLS_ERROR;
  }
  if (squall_buffer_len(&s->tls->wcipher) > 0 ||
      (!was_done && squall_tls_handshake_done(s->tls->t) && s->w != NULL &&
       squall_buffer_len(&s->w->wq) > 0))
    stream_mark_dirty(s);
  if (!was_done && squall_tls_handshake_done(s->tls->t))
    stream_wake_handshake(s, 1);
  return r;
}

/* stream:_start_tls(context, hostname): put TLS under this stream. Bytes
 * already buffered are the peer's first TLS records, so they go to
 * OpenSSL. The caller (iostream.lua) flushed plaintext writes first. */
int stream_l_start_tls(lua_State *L) {
  squall_stream *s = stream_check(L, 1);
  int server_side = 0;
  SSL_CTX *ctx = squall_tls_check_ctx(L, 2, &server_side);
  const char *hostname = luaL_optstring(L, 3, NULL);
  if (s->tls != NULL)
    return luaL_error(L, "start_tls: the stream already uses TLS");
  if (s->read_kind != READ_NONE)
    return luaL_error(L, "start_tls: a read is pending");
  if (stream_closed(s))
    return stream_push_closed(L, s);
  if (stream_unsent(s) > 0)
    return luaL_error(L, "start_tls: plaintext writes are still queued");
  char err[256];
  struct stream_tls *tls = calloc(1, sizeof *tls);
  if (tls == NULL)
    return luaL_error(L, "start_tls: out of memory");
  tls->t = squall_tls_new(ctx, server_side, hostname, err, sizeof err);
  if (tls->t == NULL) {
    free(tls);
    lua_pushnil(L);
    squall_push_error(L, "tls", err);
    return 2;
  }
  tls->ctx_ref = tls->hs_ref = LUA_NOREF;
  s->tls = tls;
  lua_pushvalue(L, 2);
  s->tls->ctx_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  size_t len = squall_buffer_len(&s->rbuf);
  if (len > 0) {
    squall_tls_feed(s->tls->t, squall_buffer_head(&s->rbuf), len);
    squall_buffer_consume(&s->rbuf, len);
  }
  /* A client's hello goes out now; a server answers what it was fed. */
  if (stream_tls_pump(s) == SQUALL_TLS_ERROR)
    return stream_push_closed(L, s);
  stream_flush_writes(s);
  lua_pushboolean(L, 1);
  return 1;
}

static void on_handshake_timeout(uv_timer_t *t) {
  squall_stream *s = t->data;
  stream_close_with(s, "timeout", "the TLS handshake did not finish in time");
  stream_wake_handshake(s, 0);
}

/* stream:_handshake(): wait until the TLS handshake is done. */
int stream_l_handshake(lua_State *L) {
  squall_stream *s = stream_check(L, 1);
  if (s->tls == NULL)
    return luaL_error(L, "the stream does not use TLS");
  if (stream_closed(s))
    return stream_push_closed(L, s);
  if (squall_tls_handshake_done(s->tls->t)) {
    lua_pushboolean(L, 1);
    return 1;
  }
  if (s->tls->hs_ref != LUA_NOREF)
    return stream_busy(L);
  s->tls->hs_ref = squall_coro_park(L, "the TLS handshake");
  squall_stream_hold(L, s, 1);
  if (s->timeout > 0 && s->timers != NULL)
    uv_timer_start(&s->timers->r, on_handshake_timeout,
                   squall_timeout_ms(s->timeout), 0);
  stream_start_reading(s);
  return lua_yield(L, 0);
}

int stream_l_get_alpn_protocol(lua_State *L) {
  squall_stream *s = stream_check(L, 1);
  if (s->tls == NULL) {
    lua_pushnil(L);
    return 1;
  }
  return squall_tls_push_alpn(L, s->tls->t);
}

int stream_l_get_peer_certificate(lua_State *L) {
  squall_stream *s = stream_check(L, 1);
  if (s->tls == NULL) {
    lua_pushnil(L);
    return 1;
  }
  return squall_tls_push_peer_certificate(L, s->tls->t);
}

int stream_l_uses_tls(lua_State *L) {
  lua_pushboolean(L, stream_check(L, 1)->tls != NULL);
  return 1;
}

/* core.stream_tls_log(fn): fn(message) logs a TLS failure. */
int stream_l_tls_log(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_settop(L, 1);
  lua_setfield(L, LUA_REGISTRYINDEX, TLS_LOG_KEY);
  return 0;
}
