/* core.c: the squall.core module, gathering each runtime file's functions
 * into one table. Lua never sees libuv; it sees these. */
#include <lauxlib.h>
#include <openssl/crypto.h>
#include <uv.h>

#include "coro.h"
#include "host.h"
#include "http.h"
#include "loop.h"
#include "msgpack.h"
#include "process.h"
#include "rpc_frame.h"
#include "stream.h"
#include "sysinfo.h"
#include "tcp.h"
#include "thread.h"
#include "tls.h"
#include "ws.h"

int luaopen_squall_core(lua_State *L) {
  lua_newtable(L);
  squall_host_open(L);
  squall_coro_open(L);
  squall_loop_open(L);
  squall_tcp_open(L);
  squall_stream_open(L);
  squall_tls_open(L);
  squall_process_open(L);
  squall_sysinfo_open(L);
  squall_msgpack_open(L);
  squall_rpc_frame_open(L);
  squall_http_open(L);
  squall_ws_open(L);
  squall_thread_open(L);
  lua_pushstring(L, SQUALL_VERSION);
  lua_setfield(L, -2, "version");
  lua_pushstring(L, uv_version_string());
  lua_setfield(L, -2, "libuv_version");
  lua_pushstring(L, OpenSSL_version(OPENSSL_VERSION));
  lua_setfield(L, -2, "openssl_version");
  return 1;
}
