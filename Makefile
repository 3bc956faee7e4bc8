# Squall: make (build), make run, make test, make check, make bench, make install.
PREFIX ?= /usr/local
CC ?= cc
PKGS := luajit libuv openssl
BUSTED ?= busted

CFLAGS ?= -O2 -g
CFLAGS += -D_GNU_SOURCE -std=gnu11 -Wall -Wextra -Werror -fno-strict-aliasing
PKG_CFLAGS = $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS = $(shell pkg-config --libs $(PKGS) 2>/dev/null)
# The C modules are registered by the host; luajit needs its symbols
# exported for the busted C helpers (lfs, term) it loads at run time.
LDFLAGS += -Wl,-E
LDLIBS += $(PKG_LIBS) -lm

SRCS := $(wildcard runtime/*.c)
HDRS := $(wildcard runtime/*.h)

# llhttp, Node's HTTP parser, from the C sources Debian's node-llhttp
# ships. Its generated code leaves parameters unused; that one warning is
# off for it alone, everything else stays -Werror.
LLHTTP_DIR ?= /usr/share/llhttp
LLHTTP_INC ?= /usr/share/include/llhttp
LLHTTP_NAMES := llhttp api http
LLHTTP_FLAGS := -I$(LLHTTP_INC)
CFLAGS += $(LLHTTP_FLAGS)
LLHTTP_OBJS := $(LLHTTP_NAMES:%=build/llhttp/%.o)
LUA_SRCS := $(shell find lua -name '*.lua')

# The sanitizer build lives beside build/ so its lua/ lookup (../lua) works.
ASAN_DIR := build-asan
ASAN_FLAGS := -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all

.PHONY: all run run-tls bench bench-quick bench-deps test check check-asan check-valgrind check-fuzz lint format install deb deps clean

C_TESTS := $(patsubst tests/%.c,%,$(wildcard tests/*_test.c))

all: build/squall $(C_TESTS:%=build/tests/%)

deps:
	@scripts/install-deps

# Test certificates for the TLS specs, made fresh (never committed).
CERTS := build/certs/.done
$(CERTS): scripts/gen-test-certs
	@rm -rf build/certs
	scripts/gen-test-certs build/certs

# pkg-config says which development files are missing (its message, not a
# compiler's "lauxlib.h: No such file" later).
build/squall: $(SRCS) $(HDRS) $(LLHTTP_OBJS) Makefile
	@pkg-config --exists $(PKGS) || { pkg-config --print-errors --exists $(PKGS); \
	  echo "squall needs the development files of $(PKGS): scripts/install-deps installs them"; \
	  exit 1; }
	@mkdir -p build
	$(CC) $(CFLAGS) $(PKG_CFLAGS) $(SRCS) $(LLHTTP_OBJS) -o $@ $(LDFLAGS) $(LDLIBS)

$(LLHTTP_DIR)/%.c:
	@echo "llhttp's C sources are missing ($@): scripts/install-deps installs node-llhttp"; exit 1

build/llhttp/%.o: $(LLHTTP_DIR)/%.c
	@mkdir -p build/llhttp
	$(CC) $(CFLAGS) -Wno-unused-parameter -c $< -o $@

$(ASAN_DIR)/llhttp/%.o: $(LLHTTP_DIR)/%.c
	@mkdir -p $(ASAN_DIR)/llhttp
	$(CC) -D_GNU_SOURCE -std=gnu11 -Wall -Wextra -Werror -Wno-unused-parameter $(ASAN_FLAGS) $(LLHTTP_FLAGS) -c $< -o $@

$(ASAN_DIR)/squall: $(SRCS) $(HDRS) $(LLHTTP_NAMES:%=$(ASAN_DIR)/llhttp/%.o) Makefile
	@mkdir -p $(ASAN_DIR)
	$(CC) -D_GNU_SOURCE -std=gnu11 -Wall -Wextra -Werror $(ASAN_FLAGS) $(LLHTTP_FLAGS) $(PKG_CFLAGS) $(SRCS) \
	  $(LLHTTP_NAMES:%=$(ASAN_DIR)/llhttp/%.o) -o $@ -Wl,-E $(LDLIBS)

# C unit tests link the one runtime file they test.
build/tests/buffer_test: tests/buffer_test.c runtime/buffer.c runtime/buffer.h
	@mkdir -p build/tests
	$(CC) $(CFLAGS) tests/buffer_test.c runtime/buffer.c -o $@

$(ASAN_DIR)/tests/buffer_test: tests/buffer_test.c runtime/buffer.c runtime/buffer.h
	@mkdir -p $(ASAN_DIR)/tests
	$(CC) -D_GNU_SOURCE -std=gnu11 -Wall -Wextra -Werror $(ASAN_FLAGS) tests/buffer_test.c runtime/buffer.c -o $@

# The main example: an echo server on 127.0.0.1:8888 (try: nc 127.0.0.1 8888);
# `make run PORT=9000` for another port.
PORT ?= 8888
run: deps build/squall
	build/squall examples/echo.lua $(PORT)

# The echo server over TLS on 127.0.0.1:8443, with the test certificates
# (try: openssl s_client -connect 127.0.0.1:8443 -quiet); TLS_PORT= for another.
TLS_PORT ?= 8443
run-tls: deps build/squall $(CERTS)
	build/squall examples/tls_echo.lua $(TLS_PORT)

# The plain C libuv baseline servers, and the load generator the
# benchmarks run against squall, the baseline and the peers.
build/uv_baseline: bench/baseline/uv_servers.c
	@mkdir -p build
	$(CC) $(CFLAGS) $< -o $@ $(PKG_LIBS)

build/loadgen: bench/loadgen.c
	@mkdir -p build
	$(CC) $(CFLAGS) $< -o $@

BENCH_TOOLS := build/squall build/uv_baseline build/loadgen $(CERTS)

# Every scenario, twice, side by side: build/bench/report.md and .png.
bench: bench-deps $(BENCH_TOOLS)
	scripts/bench

# One short pass of each scenario.
bench-quick: bench-deps $(BENCH_TOOLS)
	scripts/bench --quick

bench-deps:
	@scripts/install-deps --bench

# Every spec, inside the real host. scripts/run-tests prints the closing
# "N passed, N failed" line.
test: deps all $(CERTS)
	@scripts/run-tests build/squall

check: deps lint check-asan check-valgrind check-fuzz

# Fuzz targets for every wire parser: libFuzzer (clang) for the C ones
# (tests/fuzz/NAME_fuzz.c), a seeded mutation driver for the Lua ones
# (tests/fuzz/NAME_fuzz.lua). Each runs for FUZZ_SECONDS from the seeds in
# tests/fuzz/corpus/NAME; what libFuzzer finds new goes to a scratch
# folder, not into the repository.
FUZZ_TARGETS := $(patsubst tests/fuzz/%_fuzz.c,%,$(wildcard tests/fuzz/*_fuzz.c))
FUZZ_SECONDS ?= 20
FUZZ_SRCS := $(filter-out runtime/main.c,$(SRCS))

# In build/, so the host finds lua/ as ../lua from the binary.
FUZZ_FLAGS := -D_GNU_SOURCE -std=gnu11 -Wall -Wextra -Werror -g -O1 $(LLHTTP_FLAGS)
# (kept between runs: make would delete them as intermediate files)
.SECONDARY: $(LLHTTP_NAMES:%=build/fuzz-llhttp/%.o)
build/fuzz-llhttp/%.o: $(LLHTTP_DIR)/%.c
	@mkdir -p build/fuzz-llhttp
	clang $(FUZZ_FLAGS) -Wno-unused-parameter -fsanitize=fuzzer-no-link,address,undefined -c $< -o $@

build/%_fuzz: tests/fuzz/%_fuzz.c tests/fuzz/lua_target.h $(FUZZ_SRCS) $(HDRS) \
  $(LLHTTP_NAMES:%=build/fuzz-llhttp/%.o)
	@mkdir -p build
	clang $(FUZZ_FLAGS) -fsanitize=fuzzer,address,undefined $(PKG_CFLAGS) $< $(FUZZ_SRCS) \
	  $(LLHTTP_NAMES:%=build/fuzz-llhttp/%.o) -o $@ -Wl,-E $(LDLIBS)

check-fuzz: $(FUZZ_TARGETS:%=build/%_fuzz) build/squall
	@for t in $(FUZZ_TARGETS); do \
	  scratch=$$(mktemp -d); \
	  echo "fuzz: $$t for $(FUZZ_SECONDS) s"; \
	  ASAN_OPTIONS=detect_leaks=1 LSAN_OPTIONS=suppressions=$(CURDIR)/tests/lsan.supp \
	    build/$${t}_fuzz -max_total_time=$(FUZZ_SECONDS) -max_len=4096 -print_final_stats=1 -artifact_prefix=build/ \
	    $$scratch tests/fuzz/corpus/$$t >$$scratch.log 2>&1; \
	  status=$$?; \
	  grep -E "^stat::number_of_executed_units|ERROR|SUMMARY|_fuzz:" $$scratch.log; \
	  [ "$$status" = 0 ] || tail -40 $$scratch.log; \
	  rm -rf $$scratch $$scratch.log; \
	  [ "$$status" = 0 ] || { echo "fuzz: $$t failed"; exit 1; }; \
	done
	@# Parsers written in Lua have seeded mutation drivers of their own.
	@for f in tests/fuzz/*_fuzz.lua; do \
	  t=$$(basename $$f _fuzz.lua); \
	  echo "fuzz: $$t for $(FUZZ_SECONDS) s"; \
	  build/squall $$f $(FUZZ_SECONDS) tests/fuzz/corpus/$$t || { echo "fuzz: $$t failed"; exit 1; }; \
	done

check-asan: $(ASAN_DIR)/squall $(C_TESTS:%=$(ASAN_DIR)/tests/%) $(CERTS)
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
	  LSAN_OPTIONS=suppressions=$(CURDIR)/tests/lsan.supp:print_suppressions=0 \
	  scripts/run-tests $(ASAN_DIR)/squall

check-valgrind: all $(CERTS)
	SQUALL_TEST_TIMEOUT_SCALE=10 SQUALL_WRAP="valgrind -q --error-exitcode=99 --leak-check=full \
	  --errors-for-leak-kinds=definite --show-leak-kinds=definite \
	  --suppressions=$(CURDIR)/tests/valgrind.supp" \
	  scripts/run-tests build/squall

lint:
	luacheck -q lua spec examples bench tests
	clang-format --dry-run --Werror $(SRCS) $(HDRS) tests/*.c tests/fuzz/*.c tests/fuzz/*.h bench/*.c bench/baseline/*.c

format:
	clang-format -i $(SRCS) $(HDRS) tests/*.c tests/fuzz/*.c tests/fuzz/*.h bench/*.c bench/baseline/*.c

install: build/squall
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/share/squall/lua
	install -m 755 build/squall $(DESTDIR)$(PREFIX)/bin/squall
	cd lua && find squall -type d -exec install -d $(DESTDIR)$(PREFIX)/share/squall/lua/{} \; \
	  && find squall -type f -name '*.lua' -exec install -m 644 {} $(DESTDIR)$(PREFIX)/share/squall/lua/{} \;
	cd examples && find . -type d -exec install -d $(DESTDIR)$(PREFIX)/share/squall/examples/{} \; \
	  && find . -type f ! -perm -u+x -exec install -m 644 {} $(DESTDIR)$(PREFIX)/share/squall/examples/{} \; \
	  && find . -type f -perm -u+x -exec install -m 755 {} $(DESTDIR)$(PREFIX)/share/squall/examples/{} \;

# A Debian package of squall, its Lua modules and the examples, built with
# dpkg-deb from what `make install PREFIX=/usr` lays out.
VERSION := $(shell sed -n 's/^\#define SQUALL_VERSION "\(.*\)"/\1/p' runtime/host.h)
DEB_ARCH := $(shell dpkg --print-architecture 2>/dev/null || echo amd64)
DEB := build/squall_$(VERSION)_$(DEB_ARCH).deb

deb: build/squall $(LUA_SRCS)
	rm -rf build/deb
	$(MAKE) --no-print-directory install DESTDIR=$(CURDIR)/build/deb PREFIX=/usr
	mkdir -p build/deb/DEBIAN
	printf '%s\n' 'Package: squall' 'Version: $(VERSION)' 'Architecture: $(DEB_ARCH)' \
	  'Maintainer: Squall developers <squall@localhost>' 'Section: interpreters' \
	  'Priority: optional' \
	  'Depends: libluajit2-5.1-2 | libluajit-5.1-2, libuv1 (>= 1.44), libssl3, lua-cjson' \
	  'Description: Tornado-style network servers in Lua on LuaJIT, libuv and OpenSSL' \
	  ' The squall host runs Lua scripts with an IOLoop, IOStreams, TCPServer,' \
	  ' TLS, multi-process servers, hot reload, MessagePack and MessagePack-RPC.' \
	  > build/deb/DEBIAN/control
	dpkg-deb --root-owner-group --build build/deb $(DEB) >/dev/null
	@echo "built $(DEB)"

clean:
	rm -rf build $(ASAN_DIR)
