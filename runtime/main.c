/* main.c: the squall command.
 *
 *   squall [options] [script [args...]]
 *     -e code   run code (may repeat; runs before the script)
 *     -l name   require library `name`
 *     -v, --version  print versions of squall, LuaJIT, libuv and OpenSSL
 *     -h, --help     print usage and exit 0
 *     --reload  reload changed Lua modules while running (squall.reload)
 *     --log-level LEVEL  debug|info|warn|error (sets SQUALL_LOG_LEVEL,
 *               which squall.log reads, so forked children inherit it)
 *     --        stop handling options
 *     -         run standard input
 *
 * Options and `arg` follow luajit's, so squall stands in for it as an
 * interpreter (busted --lua=build/squall). Exit status: 0 when the script
 * ends normally, 1 with a traceback on stderr when it raises.
 */
#include <luajit.h>
#include <openssl/crypto.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>
#include <uv.h>

#include "host.h"

static const char *progname = "squall";

static void usage(FILE *to) {
  fprintf(to,
          "usage: %s [options] [script [args...]]\n"
          "  -e code            run code\n"
          "  -l name            require library name\n"
          "  -v, --version      show versions\n"
          "  -h, --help         show this help\n"
          "  --reload           reload changed Lua modules while running\n"
          "  --log-level LEVEL  debug, info, warn or error (default info;\n"
          "                     also SQUALL_LOG_LEVEL)\n"
          "  --                 stop handling options\n"
          "  -                  run standard input\n",
          progname);
}

static int valid_level(const char *l) {
  return strcmp(l, "debug") == 0 || strcmp(l, "info") == 0 ||
         strcmp(l, "warn") == 0 || strcmp(l, "warning") == 0 ||
         strcmp(l, "error") == 0;
}

static void print_versions(void) {
  printf("squall %s\n%s\nlibuv %s\n%s\n", SQUALL_VERSION, LUAJIT_VERSION,
         uv_version_string(), OpenSSL_version(OPENSSL_VERSION));
  fflush(stdout);
}

/* A server should hold thousands of connections without the user touching
 * ulimit: raise the soft open-files limit to the hard one, as Go and nginx
 * do. Failure is harmless: we run with what we have. */
static void raise_nofile_limit(void) {
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
}

/* As lua.c: a nil error object (busted's `error()` to exit 1 under Lua
 * 5.1) fails the run without a message. */
static int report(lua_State *L, int status) {
  if (status != 0 && !lua_isnil(L, -1)) {
    fprintf(stderr, "%s: %s\n", progname, squall_host_describe(L, -1));
    fflush(stderr);
    lua_pop(L, 2);
  } else if (status != 0) {
    lua_pop(L, 1);
  }
  return status;
}

/* arg[0] is the script, arg[1..] its arguments, arg[-n..-1] what came
 * before it, as in luajit. */
static void set_arg_table(lua_State *L, char **argv, int argc, int script) {
  lua_createtable(L, argc - script, script);
  for (int i = 0; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i - script);
  }
  lua_setglobal(L, "arg");
}

static int run_chunk(lua_State *L, int status, int nargs) {
  if (status == 0) {
    lua_insert(L, -(nargs + 1));
    status = squall_host_pcall(L, nargs, 0);
  } else {
    /* The load error is on top of the script's arguments: keep it. */
    lua_insert(L, -(nargs + 1));
    lua_pop(L, nargs);
  }
  return report(L, status);
}

static int run_script(lua_State *L, char **argv, int argc, int script) {
  const char *name = argv[script];
  if (strcmp(name, "-") == 0 && strcmp(argv[script - 1], "--") != 0)
    name = NULL; /* stdin */
  int nargs = argc - script - 1;
  luaL_checkstack(L, nargs + 3, "too many arguments to script");
  for (int i = script + 1; i < argc; i++)
    lua_pushstring(L, argv[i]);
  return run_chunk(L, luaL_loadfile(L, name), nargs);
}

/* After the script's main chunk: squall.ioloop, if it was loaded, says
 * whether servers listen on a loop nobody started (a script that forgot
 * its loop:start() would otherwise exit 0 at once, silently). */
static void check_script_end(lua_State *L) {
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "loaded");
  lua_getfield(L, -1, "squall.ioloop");
  if (lua_istable(L, -1)) {
    lua_getfield(L, -1, "_at_script_end");
    if (lua_isfunction(L, -1))
      (void)squall_host_pcall(L, 0, 0); /* a failure has nothing to add */
  }
  lua_settop(L, 0);
}

static int require_lib(lua_State *L, const char *name) {
  lua_getglobal(L, "require");
  lua_pushstring(L, name);
  return report(L, squall_host_pcall(L, 1, 0));
}

int main(int argc, char **argv) {
  if (argc > 0 && argv[0] != NULL)
    progname = argv[0];
  /* A peer that vanishes mid-write must give EPIPE, not kill the server. */
  signal(SIGPIPE, SIG_IGN);
  raise_nofile_limit();

  /* First pass: find the script and check the options. */
  int script = argc, has_e = 0, has_v = 0;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (a[0] != '-' || strcmp(a, "-") == 0) {
      script = i;
      break;
    }
    if (strcmp(a, "--") == 0) {
      if (i + 1 < argc)
        script = i + 1;
      break;
    }
    if (strcmp(a, "-e") == 0 || strcmp(a, "-l") == 0 ||
        strcmp(a, "--log-level") == 0) {
      if (++i >= argc) {
        fprintf(stderr, "%s: '%s' needs an argument\n", progname, a);
        usage(stderr);
        return 1;
      }
      has_e |= a[1] == 'e';
      if (a[1] == '-') {
        if (!valid_level(argv[i])) {
          fprintf(stderr,
                  "%s: --log-level takes debug, info, warn or error, "
                  "got '%s'\n",
                  progname, argv[i]);
          return 1;
        }
        setenv("SQUALL_LOG_LEVEL", argv[i], 1);
      }
    } else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
      usage(stdout);
      return 0;
    } else if (strcmp(a, "-v") == 0 || strcmp(a, "--version") == 0) {
      has_v = 1;
    } else if (strcmp(a, "--reload") == 0) {
      /* handled in the second pass */
    } else {
      fprintf(stderr, "%s: unrecognized option '%s'\n", progname, a);
      usage(stderr);
      return 1;
    }
  }
  if (has_v)
    print_versions();
  if (has_v && !has_e && script == argc)
    return 0;

  lua_State *L = squall_host_new();
  if (L == NULL) {
    fprintf(stderr, "%s: cannot create Lua state: not enough memory\n",
            progname);
    return 1;
  }
  set_arg_table(L, argv, argc, script);

  int status = 0;
  for (int i = 1; i < script && status == 0; i++) {
    if (strcmp(argv[i], "-e") == 0) {
      const char *code = argv[++i];
      status = run_chunk(
          L, luaL_loadbuffer(L, code, strlen(code), "=(command line)"), 0);
    } else if (strcmp(argv[i], "-l") == 0) {
      status = require_lib(L, argv[++i]);
    } else if (strcmp(argv[i], "--log-level") == 0) {
      i++; /* set in the environment by the first pass */
    } else if (strcmp(argv[i], "--reload") == 0) {
      const char *code = "require('squall.reload').enable()";
      status = run_chunk(
          L, luaL_loadbuffer(L, code, strlen(code), "=(--reload)"), 0);
    }
  }
  if (status == 0 && script < argc) {
    status = run_script(L, argv, argc, script);
    if (status == 0)
      check_script_end(L);
  } else if (status == 0 && !has_e && !has_v) {
    /* Nothing to run: read a script from stdin, as `lua -` does, unless a
     * person is typing, who wants to know how to use us. */
    if (isatty(0)) {
      usage(stderr);
      lua_close(L);
      return 1;
    }
    status = run_chunk(L, luaL_loadfile(L, NULL), 0);
  }
  lua_close(L);
  return status == 0 ? 0 : 1;
}
