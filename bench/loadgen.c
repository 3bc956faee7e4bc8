/* loadgen.c: the benchmark load generator (epoll, one thread, non-blocking).
 *
 *   loadgen echo -p PORT [-c conns] [-s msg_size] [-d depth] [-t secs]
 *       line echo: each connection keeps `depth` lines of `msg_size` bytes
 *       (newline last) in flight; prints msgs/s, MB/s, latency p50/p99/p999
 *       (microseconds) and errors. A fifth of the time warms up first.
 *   loadgen rpc -p PORT [-c conns] [-d depth] [-t secs]
 *       MessagePack-RPC: like echo, each connection keeps `depth` calls of
 *       sum(1, 2) in flight ([0, 0, "sum", [1, 2]]) and counts the answers
 *       ([1, 0, nil, 3]); prints calls/s as msgs_per_s and the latencies.
 *   loadgen idle -p PORT -c conns -t secs
 *       opens `conns` connections and holds them; prints how many are open
 *       (a line "ready" once all are connected, for the RSS measurement).
 *   loadgen pending -p PORT -c conns -t secs
 *       like idle, but each connection then sends one byte, and a moment
 *       later another (no newline): the server holds a few bytes per
 *       connection while its reader waits for the rest of a line.
 *   loadgen bulk -p PORT -n bytes
 *       one connection sends `bytes` then half-closes; the time until the
 *       server closes gives MB/s (the server reads it all first).
 *   loadgen line -p PORT -n bytes
 *       one line of `bytes` sent in 4 KiB writes; prints the time until the
 *       server's one-line answer, in ms and ms per MiB.
 * Output is one line of key=value pairs, for scripts/bench to parse; echo
 * and rpc also give total_msgs, every answer counted, the warm-up included
 * (scripts/bench divides the server's CPU time by it).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int connect_to(int port, int nodelay) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0)
    return -1;
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_port = htons((uint16_t)port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
    close(fd);
    return -1;
  }
  if (nodelay) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  return fd;
}

static void set_nonblocking(int fd) {
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

/* ---- latency histogram: 1 us buckets to 10 ms, then 100 us to 1 s ---- */

#define FINE 10000
#define COARSE 10000
static uint64_t hist[FINE + COARSE + 1];
static uint64_t samples;

static void record(uint64_t ns) {
  uint64_t us = ns / 1000;
  size_t b = us < FINE ? us : FINE + (us - FINE) / 100;
  if (b > FINE + COARSE)
    b = FINE + COARSE;
  hist[b]++;
  samples++;
}

static double percentile(double p) {
  uint64_t want = (uint64_t)(p * (double)samples), seen = 0;
  for (size_t b = 0; b <= FINE + COARSE; b++) {
    seen += hist[b];
    if (seen > want)
      return b < FINE ? (double)b : (double)(FINE + (b - FINE) * 100);
  }
  return 0;
}

/* ---- echo ------------------------------------------------------------- */

typedef struct {
  int fd;
  uint64_t *sent; /* send times of the lines in flight, a ring */
  int head, count;
  size_t partial; /* bytes of the current echoed line received */
  char *out;      /* bytes not yet written */
  size_t out_len, out_cap;
} econn;

static int depth, msg_size, errors;
static char *line;
/* What each answer must be: the line itself for echo. */
static const char *expect;
static size_t expect_size;
static uint64_t received, bytes_in;
static uint64_t all_received; /* warm-up included: for CPU per message */
static int counting;
/* ws mode: each connection opens with a WebSocket handshake */
static int ws_handshake;

/* Send an HTTP request on a blocking fd and read until the end of the
 * answer's head (and `tail`, when given, the end of its body). */
static int http_exchange(int fd, const char *req, const char *tail) {
  if (write(fd, req, strlen(req)) != (ssize_t)strlen(req))
    return -1;
  char buf[4096];
  size_t got = 0;
  for (;;) {
    ssize_t r = read(fd, buf + got, sizeof buf - 1 - got);
    if (r <= 0)
      return -1;
    got += (size_t)r;
    buf[got] = 0;
    char *end = strstr(buf, "\r\n\r\n");
    if (end && (!tail || strstr(end, tail)))
      return 0;
    if (got == sizeof buf - 1)
      return -1;
  }
}

static void queue_lines(econn *c, int n) {
  size_t need = c->out_len + (size_t)n * (size_t)msg_size;
  if (need > c->out_cap) {
    c->out_cap = need * 2;
    c->out = realloc(c->out, c->out_cap);
  }
  uint64_t t = now_ns();
  for (int i = 0; i < n; i++) {
    memcpy(c->out + c->out_len, line, (size_t)msg_size);
    c->out_len += (size_t)msg_size;
    c->sent[(c->head + c->count) % depth] = t;
    c->count++;
  }
}

static int flush_out(econn *c) {
  while (c->out_len > 0) {
    ssize_t n = write(c->fd, c->out, c->out_len);
    if (n < 0)
      return errno == EAGAIN ? 0 : -1;
    memmove(c->out, c->out + n, c->out_len - (size_t)n);
    c->out_len -= (size_t)n;
  }
  return 0;
}

static int run_echo(int port, int conns, double secs) {
  if (line == NULL) {
    line = malloc((size_t)msg_size);
    memset(line, 'x', (size_t)msg_size);
    line[msg_size - 1] = '\n';
    expect = line;
    expect_size = (size_t)msg_size;
  }
  int ep = epoll_create1(0);
  econn *cs = calloc((size_t)conns, sizeof *cs);
  for (int i = 0; i < conns; i++) {
    cs[i].fd = connect_to(port, 1);
    if (cs[i].fd < 0) {
      fprintf(stderr, "connect: %s\n", strerror(errno));
      return 1;
    }
    if (ws_handshake &&
        http_exchange(
            cs[i].fd,
            "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: "
            "dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            NULL) != 0) {
      fprintf(stderr, "loadgen: the WebSocket handshake failed\n");
      return 1;
    }
    set_nonblocking(cs[i].fd);
    cs[i].sent = calloc((size_t)depth, sizeof(uint64_t));
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLET,
                             .data.ptr = &cs[i]};
    epoll_ctl(ep, EPOLL_CTL_ADD, cs[i].fd, &ev);
    queue_lines(&cs[i], depth);
    flush_out(&cs[i]);
  }
  static char buf[1 << 16];
  struct epoll_event evs[256];
  uint64_t start = now_ns(), warm = start + (uint64_t)(secs * 0.2e9), t0 = 0,
           end = warm + (uint64_t)(secs * 1e9);
  for (;;) {
    uint64_t t = now_ns();
    if (!counting && t >= warm) {
      counting = 1;
      received = bytes_in = samples = 0;
      memset(hist, 0, sizeof hist);
      t0 = t;
    }
    if (t >= end)
      break;
    int n = epoll_wait(ep, evs, 256, 10);
    for (int i = 0; i < n; i++) {
      econn *c = evs[i].data.ptr;
      if (evs[i].events & EPOLLOUT && flush_out(c) != 0)
        errors++;
      if (!(evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)))
        continue;
      for (;;) {
        ssize_t r = read(c->fd, buf, sizeof buf);
        if (r < 0 && errno == EAGAIN)
          break;
        if (r <= 0) {
          errors++;
          epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
          break;
        }
        int lines = 0;
        uint64_t when = now_ns();
        for (ssize_t k = 0; k < r; k++) {
          if (buf[k] != expect[c->partial])
            errors++;
          if (++c->partial == expect_size) {
            c->partial = 0;
            lines++;
            record(when - c->sent[c->head]);
            c->head = (c->head + 1) % depth;
            c->count--;
          }
        }
        received += (uint64_t)lines;
        all_received += (uint64_t)lines;
        bytes_in += (uint64_t)r;
        if (lines > 0) {
          queue_lines(c, lines);
          if (flush_out(c) != 0)
            errors++;
        }
      }
    }
  }
  double el = (double)(now_ns() - t0) / 1e9;
  printf(
      "total_msgs=%llu msgs_per_s=%.0f mb_per_s=%.1f p50_us=%.0f p99_us=%.0f "
      "p999_us=%.0f errors=%d\n",
      (unsigned long long)all_received, (double)received / el,
      (double)bytes_in / el / 1048576.0, percentile(0.5), percentile(0.99),
      percentile(0.999), errors);
  return errors != 0;
}

/* ---- idle, bulk, line ------------------------------------------------- */

static void send_byte_each(const int *fds, int n) {
  for (int i = 0; i < n; i++)
    if (write(fds[i], "x", 1) != 1)
      errors++;
}

/* pending: 1 sends a byte of a line on each, 2 one HTTP request (then
 * the connection is an idle keep-alive one) */
static int run_idle(int port, int conns, double secs, int pending) {
  int open_ = 0;
  int first_err = 0;
  int *fds = calloc((size_t)conns, sizeof *fds);
  for (int i = 0; i < conns; i++) {
    int fd = connect_to(port, 0);
    if (fd >= 0 && pending == 2 &&
        http_exchange(fd, "GET / HTTP/1.1\r\nHost: x\r\n\r\n", "\n") != 0) {
      close(fd);
      fd = -1;
    }
    if (fd >= 0) {
      fds[open_++] = fd;
    } else {
      if (errors++ == 0)
        first_err = errno;
    }
  }
  if (pending == 1) {
    struct timespec gap = {0, 200 * 1000 * 1000};
    send_byte_each(fds, open_);
    nanosleep(&gap, NULL);
    send_byte_each(fds, open_);
  }
  if (errors > 0)
    fprintf(stderr, "loadgen: %d connects failed, the first with: %s\n", errors,
            strerror(first_err));
  printf("ready open=%d\n", open_);
  fflush(stdout);
  struct timespec ts = {(time_t)secs,
                        (long)((secs - (double)(time_t)secs) * 1e9)};
  nanosleep(&ts, NULL);
  printf("open=%d errors=%d\n", open_, errors);
  free(fds);
  return errors != 0;
}

static int run_bulk(int port, uint64_t bytes) {
  int fd = connect_to(port, 0);
  if (fd < 0)
    return 1;
  static char buf[1 << 16];
  memset(buf, 'b', sizeof buf);
  uint64_t t0 = now_ns(), left = bytes;
  while (left > 0) {
    size_t n = left < sizeof buf ? (size_t)left : sizeof buf;
    ssize_t w = write(fd, buf, n);
    if (w <= 0) {
      errors++;
      break;
    }
    left -= (uint64_t)w;
  }
  shutdown(fd, SHUT_WR);
  while (read(fd, buf, sizeof buf) > 0) {
  }
  double el = (double)(now_ns() - t0) / 1e9;
  printf("mb_per_s=%.0f seconds=%.2f errors=%d\n",
         (double)bytes / el / 1048576.0, el, errors);
  close(fd);
  return errors != 0;
}

static int run_line(int port, uint64_t bytes) {
  int fd = connect_to(port, 1);
  if (fd < 0)
    return 1;
  static char chunk[4096];
  memset(chunk, 'l', sizeof chunk);
  uint64_t t0 = now_ns(), left = bytes;
  while (left > 0) {
    size_t n = left < sizeof chunk ? (size_t)left : sizeof chunk;
    if (n == left)
      chunk[n - 1] = '\n';
    ssize_t w = write(fd, chunk, n);
    if (w <= 0) {
      errors++;
      break;
    }
    left -= (uint64_t)w;
  }
  char answer[64];
  ssize_t r = read(fd, answer, sizeof answer);
  if (r <= 0)
    errors++;
  double ms = (double)(now_ns() - t0) / 1e6;
  printf("ms=%.1f ms_per_mib=%.2f errors=%d\n", ms,
         ms / ((double)bytes / 1048576.0), errors);
  close(fd);
  return errors != 0;
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr,
            "usage: loadgen echo|rpc|idle|pending|bulk|line -p PORT [-c conns] "
            "[-s size] [-d depth] [-t secs] [-n bytes]\n");
    return 2;
  }
  const char *mode = argv[1];
  int port = 0, conns = 50;
  double secs = 5;
  uint64_t bytes = 1u << 30;
  msg_size = 64;
  depth = 1;
  for (int i = 2; i + 1 < argc; i += 2) {
    const char *o = argv[i], *v = argv[i + 1];
    if (!strcmp(o, "-p"))
      port = atoi(v);
    else if (!strcmp(o, "-c"))
      conns = atoi(v);
    else if (!strcmp(o, "-s"))
      msg_size = atoi(v);
    else if (!strcmp(o, "-d"))
      depth = atoi(v);
    else if (!strcmp(o, "-t"))
      secs = atof(v);
    else if (!strcmp(o, "-n"))
      bytes = strtoull(v, NULL, 10);
  }
  if (port <= 0 || msg_size < 2 || depth < 1 || conns < 1) {
    fprintf(stderr, "loadgen: bad arguments\n");
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);
  if (!strcmp(mode, "echo"))
    return run_echo(port, conns, secs);
  if (!strcmp(mode, "rpc")) {
    static char request[] = "\x94\x00\x00\xa3sum\x92\x01\x02";
    static const char answer[] = "\x94\x01\x00\xc0\x03";
    line = request;
    msg_size = (int)sizeof request - 1;
    expect = answer;
    expect_size = sizeof answer - 1;
    return run_echo(port, conns, secs);
  }
  if (!strcmp(mode, "ws")) {
    /* a masked text frame of msg_size bytes (the zero key leaves the
     * payload as it is); the echo comes back unmasked */
    size_t n = (size_t)msg_size, h = n < 126 ? 2 : 4;
    char *frame = malloc(h + 4 + n), *answer = malloc(h + n);
    frame[0] = answer[0] = (char)0x81;
    if (n < 126) {
      frame[1] = (char)(0x80 | n);
      answer[1] = (char)n;
    } else {
      frame[1] = (char)(0x80 | 126);
      answer[1] = 126;
      frame[2] = answer[2] = (char)(n >> 8);
      frame[3] = answer[3] = (char)(n & 255);
    }
    memset(frame + h, 0, 4);
    memset(frame + h + 4, 'w', n);
    memset(answer + h, 'w', n);
    line = frame;
    msg_size = (int)(h + 4 + n);
    expect = answer;
    expect_size = h + n;
    ws_handshake = 1;
    return run_echo(port, conns, secs);
  }
  if (!strcmp(mode, "httpidle"))
    return run_idle(port, conns, secs, 2);
  if (!strcmp(mode, "idle"))
    return run_idle(port, conns, secs, 0);
  if (!strcmp(mode, "pending"))
    return run_idle(port, conns, secs, 1);
  if (!strcmp(mode, "bulk"))
    return run_bulk(port, bytes);
  if (!strcmp(mode, "line"))
    return run_line(port, bytes);
  fprintf(stderr, "loadgen: unknown mode %s\n", mode);
  return 2;
}
