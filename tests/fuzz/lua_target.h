/* lua_target.h: what the libFuzzer targets that check a parser from Lua
 * share. Each target keeps a Lua function (the chunk CHECK returns) in
 * one squall host state, made on the first input and closed at exit (so
 * LeakSanitizer sees what userdata own as freed), and calls it once per
 * input with the arguments the target pushed; an error aborts, which
 * libFuzzer reports with the input. */
#ifndef SQUALL_FUZZ_LUA_TARGET_H
#define SQUALL_FUZZ_LUA_TARGET_H

#include <lauxlib.h>
#include <lua.h>
#include <stdio.h>
#include <stdlib.h>

#include "../../runtime/host.h"

static lua_State *fuzz_L;

static void fuzz_close_state(void) {
  lua_close(fuzz_L);
}

/* The state, with the check function pushed. */
static lua_State *fuzz_check(const char *name, const char *check) {
  if (fuzz_L == NULL) {
    fuzz_L = squall_host_new();
    if (fuzz_L == NULL || luaL_loadstring(fuzz_L, check) != 0 ||
        lua_pcall(fuzz_L, 0, 1, 0) != 0) {
      fprintf(stderr, "%s: %s\n", name,
              fuzz_L ? lua_tostring(fuzz_L, -1) : "no state");
      abort();
    }
    lua_setfield(fuzz_L, LUA_REGISTRYINDEX, name);
    atexit(fuzz_close_state);
  }
  lua_getfield(fuzz_L, LUA_REGISTRYINDEX, name);
  return fuzz_L;
}

/* Call the check with the nargs values pushed after it; then collect, so
 * buffers are freed per input. */
static void fuzz_run(const char *name, int nargs) {
  if (lua_pcall(fuzz_L, nargs, 0, 0) != 0) {
    fprintf(stderr, "%s: %s\n", name, lua_tostring(fuzz_L, -1));
    abort();
  }
  lua_gc(fuzz_L, LUA_GCCOLLECT, 0);
}

#endif
