/* stream_lua.c: the IOStream's Lua-facing methods (check the arguments,
 * call the core, push the results) and squall_stream_open (stream_impl.h lists
 * the files). */
#include "stream_impl.h"

#include <limits.h>

squall_stream *stream_check(lua_State *L, int idx) {
  squall_stream **p = squall_checkudata(L, idx, STREAM_MT);
  return *p;
}

int stream_busy(lua_State *L) {
  lua_pushnil(L);
  squall_push_error(L, "busy", "a read is already pending on this stream");
  return 2;
}

/* A max_bytes a read accepts: a positive integer (below 2^64, so the
 * conversion is defined). The C methods and the FFI path ask the same. */
static int max_bytes_valid(lua_Number n) {
  return n >= 1 && n < 18446744073709551616.0 && n == (lua_Number)(uint64_t)n;
}

static size_t opt_max_bytes(lua_State *L, int idx) {
  if (lua_isnoneornil(L, idx))
    return SIZE_MAX;
  lua_Number n = luaL_checknumber(L, idx);
  luaL_argcheck(L, max_bytes_valid(n), idx,
                "max_bytes must be a positive integer");
  return (size_t)n;
}

/* stream:read_until(delimiter [, max_bytes]) */
static int l_read_until(lua_State *L) {
  squall_stream *s = stream_check(L, 1);
  size_t dlen;
  const char *delim = luaL_checklstring(L, 2, &dlen);
  luaL_argcheck(L, dlen > 0, 2, "the delimiter is empty");
  size_t max_bytes = opt_max_bytes(L, 3);
  if (s->read_kind != READ_NONE)
    return stream_busy(L);
  s->read_kind = READ_UNTIL;
  s->delim = delim;
  s->dlen = dlen;
  s->max_bytes = max_bytes;
  squall_buffer_reset_scan(&s->rbuf);
  return stream_try_inline_read(L, s, "read_until");
}

/* stream:read_until_pattern(pattern [, max_bytes]) */
static int l_read_until_pattern(lua_State *L) {
  squall_stream *s = stream_check(L, 1);
  const char *pat = luaL_checkstring(L, 2);
  size_t max_bytes = opt_max_bytes(L, 3);
  /* A malformed pattern is misuse: raise here, not later in a callback. */
  lua_getfield(L, LUA_REGISTRYINDEX, STREAM_FIND_KEY);
  lua_pushliteral(L, "");
  lua_pushvalue(L, 2);
  lua_call(L, 2, 0);
  if (s->read_kind != READ_NONE)
    return stream_busy(L);
  s->read_kind = READ_PATTERN;
  s->delim = pat;
  s->match_max = stream_pattern_max_len(pat);
  squall_buffer_reset_scan(&s->rbuf);
  s->max_bytes = max_bytes;
  return stream_try_inline_read(L, s, "read_until_pattern");
}

/* stream:read_bytes(n [, partial]) */
static int l_read_bytes(lua_State *L) {
  squall_stream *s = stream_check(L, 1);
  lua_Number n = luaL_checknumber(L, 2);
  luaL_argcheck(L, n >= 0 && n == (lua_Number)(uint64_t)n, 2,
                "n must be a non-negative integer");
  int partial = lua_toboolean(L, 3);
  if (s->read_kind != READ_NONE)
    return stream_busy(L);
  if (n == 0) {
    lua_pushliteral(L, "");
    return 1;
  }
  s->read_kind = READ_BYTES;
  s->read_n = (size_t)n;
  s->partial = partial;
  if (s->read_n > s->o.max_buffer_size && !partial) {
    s->read_kind = READ_NONE;
    stream_close_with(s, "buffer_full",
                      "read_bytes asks for more than "
                      "max_buffer_size bytes");
    return stream_push_closed(L, s);
  }
  return stream_try_inline_read(L, s, "read_bytes");
}

/* stream:read_until_close(): everything until the peer closes. */
static int l_read_until_close(lua_State *L) {
  squall_stream *s = stream_check(L, 1);
  if (s->read_kind != READ_NONE)
    return stream_busy(L);
  s->read_kind = READ_CLOSE;
  return stream_try_inline_read(L, s, "read_until_close");
}

/* write(stream, data [, nowait]): data is a string or an array of
 * strings. With nowait the caller never waits past write_high_water
 * (iostream.lua's callback style passes it, and waits with flush in a
 * coroutine of its own). */
static int l_write(lua_State *L) {
  squall_stream *s = stream_check(L, 1);
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
  int refused = stream_write_refused(L, s, total);
  if (refused)
    return refused;
  if (total == 0)
    return stream_write_queued(L, s, 0, 0);
  struct stream_writes *w = stream_writes(s);
  if (w == NULL)
    return luaL_error(L, "out of memory queueing a write");
  int err = 0;
  if (t == LUA_TSTRING) {
    err = squall_buffer_append(&w->wq, lua_tostring(L, 2), total);
  } else {
    for (int i = 1; i <= n && err == 0; i++) {
      lua_rawgeti(L, 2, i);
      size_t len;
      const char *p = lua_tolstring(L, -1, &len);
      err = squall_buffer_append(&w->wq, p, len);
      lua_pop(L, 1);
    }
  }
  if (err != 0)
    return luaL_error(L, "out of memory queueing a write");
  return stream_write_queued(L, s, total, !lua_toboolean(L, 3));
}

squall_stream *squall_stream_check(lua_State *L, int idx) {
  return stream_check(L, idx);
}

/* stream:flush(): wait until everything queued reached the kernel. */
static int l_flush(lua_State *L) {
  squall_stream *s = stream_check(L, 1);
  squall_coro_check(L, "flush");
  if (stream_closed(s) && !stream_flushing(s))
    return stream_push_closed(L, s);
  if (stream_flush_writes(s) != 0)
    return stream_push_closed(L, s);
  stream_settle_unsent(s);
  if (stream_unsent(s) == 0) {
    lua_pushboolean(L, 1);
    return 1;
  }
  return stream_wait_writer(L, s, WAIT_FLUSH, "flush");
}

/* stream:close() (and close_when_idle): flush what is queued, then close.
 * A reader parked on the stream gets nil, closed now. Called again while
 * the flush waits, it closes at once, as abort() does. */
static void close_by_program(squall_stream *s) {
  if (stream_closed(s)) {
    /* Only a flush this program asked for is cut short: one that began
     * when the peer half-closed still delivers what was written. */
    if (s->close_called && stream_flushing(s))
      stream_close_with(s, NULL, NULL);
    s->close_called = 1;
    return;
  }
  s->close_called = 1;
  stream_set_life(s, LIFE_CLOSED); /* the woken reader sees it closed */
  if (s->reader_ref != LUA_NOREF) {
    lua_State *LL = stream_loop_L(s);
    if (LL != NULL)
      stream_resume_reader(s, stream_push_closed(LL, s));
  }
  squall_buffer_free(&s->rbuf);
  stream_close_flushing(s);
}

static int l_close(lua_State *L) {
  close_by_program(stream_check(L, 1));
  return 0;
}

/* stream:abort(): close now, dropping whatever is still queued. */
static int l_abort(lua_State *L) {
  squall_stream *s = stream_check(L, 1);
  if (!stream_closing(s))
    stream_close_with(s, NULL, NULL);
  return 0;
}

/* ---- the rest of the Lua surface -------------------------------------- */

static int l_set_close_callback(lua_State *L) {
  squall_stream *s = stream_check(L, 1);
  if (!lua_isnil(L, 2))
    luaL_checktype(L, 2, LUA_TFUNCTION);
  stream_unref(L, &s->close_cb_ref);
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
  squall_stream *s = stream_check(L, 1);
  int idle = lua_toboolean(L, 2);
  if (idle && !s->idle)
    s->idle_at = uv_now(&s->loop->uv);
  s->idle = idle;
  if (idle && s->close_when_idle)
    close_by_program(s);
  return 0;
}

/* stream:close_when_idle(): close it now when it is idle, else as soon as
 * its handler marks it idle (TCPServer:close_gracefully). */
static int l_close_when_idle(lua_State *L) {
  squall_stream *s = stream_check(L, 1);
  if (s->idle)
    close_by_program(s);
  else
    s->close_when_idle = 1;
  return 0;
}

/* stream:get_close_callback() -> the function set_close_callback holds,
 * or nil (TCPServer:close_gracefully calls it from a callback of its own). */
static int l_close_callback(lua_State *L) {
  squall_stream *s = stream_check(L, 1);
  if (s->close_cb_ref == LUA_NOREF)
    return 0;
  lua_rawgeti(L, LUA_REGISTRYINDEX, s->close_cb_ref);
  return 1;
}

static int l_is_idle(lua_State *L) {
  lua_pushboolean(L, stream_check(L, 1)->idle);
  return 1;
}

/* stream:idle_time(): seconds since the handler marked the stream idle
 * (by the loop's clock), or nil when it is not idle. HTTPServer's
 * idle_timeout sweeps with it instead of a timer per request. */
static int l_idle_time(lua_State *L) {
  squall_stream *s = stream_check(L, 1);
  if (!s->idle)
    return 0;
  lua_pushnumber(L, (double)(uv_now(&s->loop->uv) - s->idle_at) / 1000.0);
  return 1;
}

static int l_closed(lua_State *L) {
  lua_pushboolean(L, stream_closed(stream_check(L, 1)));
  return 1;
}

static int l_reading(lua_State *L) {
  lua_pushboolean(L, stream_check(L, 1)->read_kind != READ_NONE);
  return 1;
}

static int l_writing(lua_State *L) {
  squall_stream *s = stream_check(L, 1);
  lua_pushboolean(L, stream_unsent(s) > 0 &&
                         !stream_closing(s)); /* never, once closed */
  return 1;
}

/* stream:get_write_buffer_size(): bytes queued that the kernel has not
 * taken yet (asyncio's name); with TLS, counted after encryption. */
static int l_get_write_buffer_size(lua_State *L) {
  lua_pushnumber(L, (lua_Number)stream_unsent(stream_check(L, 1)));
  return 1;
}

/* stream:get_read_buffer_size(): bytes received and not yet read (a
 * client that sent nothing finds there what the peer sent unasked). */
static int l_get_read_buffer_size(lua_State *L) {
  lua_pushnumber(L, (lua_Number)squall_buffer_len(&stream_check(L, 1)->rbuf));
  return 1;
}

/* stream:_error(): the error that closed the stream, or nil. */
static int l_error(lua_State *L) {
  squall_stream *s = stream_check(L, 1);
  if (s->err_kind == NULL)
    return 0;
  squall_push_error(L, s->err_kind, s->err_msg ? s->err_msg : s->err_kind);
  return 1;
}

static int l_set_timeout(lua_State *L) {
  squall_stream *s = stream_check(L, 1);
  if (lua_isnoneornil(L, 2)) {
    s->timeout = 0;
    return 0;
  }
  lua_Number t = luaL_checknumber(L, 2);
  luaL_argcheck(L, t > 0, 2, "timeout must be positive (or nil for none)");
  if (s->timers == NULL && !stream_closing(s)) {
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
  squall_stream *s = stream_check(L, 1);
  if (stream_closed(s) || !s->tcp_init)
    return stream_push_closed(L, s);
  int err = uv_tcp_nodelay(&s->tcp, lua_isnone(L, 2) || lua_toboolean(L, 2));
  if (err != 0)
    return squall_push_uv_error(L, err);
  lua_pushboolean(L, 1);
  return 1;
}

static int l_fileno(lua_State *L) {
  squall_stream *s = stream_check(L, 1);
  uv_os_fd_t fd;
  if (stream_closing(s) || !s->tcp_init ||
      uv_fileno((uv_handle_t *)&s->tcp, &fd) != 0) {
    lua_pushinteger(L, -1);
    return 1;
  }
  lua_pushinteger(L, fd);
  return 1;
}

static int sockname(lua_State *L, int peer) {
  squall_stream *s = stream_check(L, 1);
  if (stream_closing(s) || !s->tcp_init)
    return stream_push_closed(L, s);
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
  stream_unref(RL, &s->close_cb_ref);
  stream_unref(RL, &s->delim_ref);
  if (s->tls != NULL)
    stream_unref(RL, &s->tls->ctx_ref);
  s->close_cb_run = 1;
  if (!stream_closing(s))
    stream_close_with(s, NULL, NULL);
  stream_maybe_free(s);
  return 0;
}

/* ---- the FFI fast paths ----------------------------------------------
 *
 * lua/squall/iostream.lua calls these through the FFI, so a handler's loop
 * of read_until and write compiles into one trace instead of stopping at
 * every lua_CFunction. They only take the common case, a line already
 * buffered or a write that fits under write_high_water on a stream that
 * already holds itself for unsent bytes, and change nothing otherwise:
 * returning 0 sends the caller to the C method, which decides every other
 * case (parking, errors, callbacks) in one place. `p` is the userdata's
 * payload (the FFI passes a userdata as a pointer to it). */

/* The length of the line read_until(delim, max_bytes) takes now, or 0
 * (a line past 2 GiB goes the slow way: the FFI returns an int as a plain
 * Lua number). */
int squall_stream_ffi_line(squall_stream **p, const char *delim, size_t dlen,
                           double max_bytes) {
  squall_stream *s = *p;
  if (s->read_kind != READ_NONE || s->tls != NULL || dlen == 0 ||
      (stream_closed(s) && !s->eof) || !(s->reading || s->eof))
    return 0;
  if (!max_bytes_valid(max_bytes))
    return 0;
  squall_buffer_reset_scan(&s->rbuf);
  long at = squall_buffer_find(&s->rbuf, delim, dlen);
  if (at < 0 || (double)((size_t)at + dlen) > max_bytes ||
      (size_t)at + dlen > INT_MAX)
    return 0;
  return (int)((size_t)at + dlen);
}

/* The buffered bytes; valid until the stream's next C call. */
const char *squall_stream_ffi_head(squall_stream **p) {
  return squall_buffer_head(&(*p)->rbuf);
}

/* Take n bytes that squall_stream_ffi_line measured. */
void squall_stream_ffi_consume(squall_stream **p, size_t n) {
  squall_buffer_consume(&(*p)->rbuf, n);
}

/* Queue data[0, n) as write() would without waiting: 1 when it did. */
int squall_stream_ffi_write(squall_stream **p, const char *data, size_t n) {
  squall_stream *s = *p;
  if (stream_closed(s) || !s->held_unsent || s->w == NULL || n == 0)
    return 0;
  if (stream_unsent(s) + n > s->o.write_high_water ||
      stream_write_too_big(s, n))
    return 0;
  if (squall_buffer_append(&s->w->wq, data, n) != 0)
    return 0;
  s->w->queued_total += n;
  stream_mark_dirty(s);
  return 1;
}

static int l_tostring(lua_State *L) {
  squall_stream *s = stream_check(L, 1);
  lua_pushfstring(L, "squall.stream (%s): %p",
                  stream_closed(s) ? "closed" : "open", (void *)s);
  return 1;
}

/* core.io_bytes(): bytes read, bytes written by every stream so far. */
static int l_io_bytes(lua_State *L) {
  lua_pushnumber(L, (lua_Number)squall_stream_bytes_read);
  lua_pushnumber(L, (lua_Number)squall_stream_bytes_written);
  return 2;
}

/* core.check_stream_options(opts): raise as a stream would for opts (the
 * one check: TCPServer asks it when it is made, not at the first
 * connection). */
static int l_check_stream_options(lua_State *L) {
  squall_stream_opts o;
  squall_stream_opts_read(L, 1, &o);
  return 0;
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
      {"get_read_buffer_size", l_get_read_buffer_size},
      {"_error", l_error},
      {"set_timeout", l_set_timeout},
      {"set_nodelay", l_set_nodelay},
      {"fileno", l_fileno},
      {"getpeername", l_getpeername},
      {"getsockname", l_getsockname},
      {"_start_tls", stream_l_start_tls},
      {"_handshake", stream_l_handshake},
      {"get_alpn_protocol", stream_l_get_alpn_protocol},
      {"get_peer_certificate", stream_l_get_peer_certificate},
      {"uses_tls", stream_l_uses_tls},
      {"set_idle", l_set_idle},
      {"is_idle", l_is_idle},
      {"close_when_idle", l_close_when_idle},
      {"get_close_callback", l_close_callback},
      {"idle_time", l_idle_time},
      {NULL, NULL},
  };
  lua_getglobal(L, "string");
  lua_getfield(L, -1, "find");
  lua_setfield(L, LUA_REGISTRYINDEX, STREAM_FIND_KEY);
  lua_pop(L, 1);
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
  lua_pushcfunction(L, stream_l_tls_log);
  lua_setfield(L, -2, "stream_tls_log");
  lua_pushcfunction(L, l_io_bytes);
  lua_setfield(L, -2, "io_bytes");
  lua_pushcfunction(L, l_check_stream_options);
  lua_setfield(L, -2, "check_stream_options");
  return 0;
}
