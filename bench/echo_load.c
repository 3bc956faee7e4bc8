/* echo_load.c: a load generator for line echo servers.
 *
 *   echo_load PORT CONNECTIONS DEPTH SECONDS [MSG_BYTES]
 *
 * Opens CONNECTIONS connections to 127.0.0.1:PORT; each keeps DEPTH lines
 * in flight (pipelined) and sends a new one for each line echoed back.
 * Prints the echoed messages per second. Lines are checked for order.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

static int depth, msg_bytes;
static unsigned long long received;
static char *line;
static int errors;

typedef struct client {
  uv_tcp_t tcp;
  uv_connect_t req;
  char buf[65536];
  size_t partial; /* bytes of the current echoed line seen */
} client;

static void on_written(uv_write_t *req, int status) {
  if (status < 0)
    errors++;
  free(req);
}

static void send_lines(client *c, int n) {
  static char out[1 << 20];
  size_t len = 0;
  for (int i = 0; i < n; i++) {
    memcpy(out + len, line, (size_t)msg_bytes);
    len += (size_t)msg_bytes;
  }
  uv_buf_t b = uv_buf_init(out, (unsigned)len);
  int done = uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
  if (done == UV_EAGAIN)
    done = 0;
  if (done < 0) {
    errors++;
    return;
  }
  if ((size_t)done < len) {
    uv_write_t *req = malloc(sizeof *req + len - (size_t)done);
    char *copy = (char *)(req + 1);
    memcpy(copy, out + done, len - (size_t)done);
    b = uv_buf_init(copy, (unsigned)(len - (size_t)done));
    uv_write(req, (uv_stream_t *)&c->tcp, &b, 1, on_written);
  }
}

static void on_alloc(uv_handle_t *h, size_t size, uv_buf_t *buf) {
  (void)size;
  client *c = h->data;
  *buf = uv_buf_init(c->buf, sizeof c->buf);
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
  client *c = s->data;
  if (n < 0) {
    errors++;
    uv_close((uv_handle_t *)s, NULL);
    return;
  }
  int lines = 0;
  for (ssize_t i = 0; i < n; i++) {
    if (buf->base[i] != line[c->partial])
      errors++;
    if (++c->partial == (size_t)msg_bytes) {
      c->partial = 0;
      lines++;
    }
  }
  received += (unsigned long long)lines;
  if (lines > 0)
    send_lines(c, lines);
}

static void on_connect(uv_connect_t *req, int status) {
  client *c = req->data;
  if (status < 0) {
    fprintf(stderr, "connect: %s\n", uv_strerror(status));
    exit(1);
  }
  uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
  send_lines(c, depth);
}

static void on_done(uv_timer_t *t) {
  uv_stop(t->loop);
}

int main(int argc, char **argv) {
  if (argc < 5) {
    fprintf(stderr, "usage: %s PORT CONNECTIONS DEPTH SECONDS [MSG_BYTES]\n",
            argv[0]);
    return 2;
  }
  int port = atoi(argv[1]), conns = atoi(argv[2]);
  depth = atoi(argv[3]);
  double seconds = atof(argv[4]);
  msg_bytes = argc > 5 ? atoi(argv[5]) : 32;
  line = malloc((size_t)msg_bytes);
  memset(line, 'x', (size_t)msg_bytes);
  line[msg_bytes - 1] = '\n';
  uv_loop_t *loop = uv_default_loop();
  struct sockaddr_in addr;
  uv_ip4_addr("127.0.0.1", port, &addr);
  for (int i = 0; i < conns; i++) {
    client *c = calloc(1, sizeof *c);
    uv_tcp_init(loop, &c->tcp);
    c->tcp.data = c;
    c->req.data = c;
    uv_tcp_connect(&c->req, &c->tcp, (struct sockaddr *)&addr, on_connect);
  }
  /* Warm up for a fifth of the time, then count. */
  uv_timer_t timer;
  uv_timer_init(loop, &timer);
  uv_timer_start(&timer, on_done, (uint64_t)(seconds * 200), 0);
  uv_run(loop, UV_RUN_DEFAULT);
  received = 0;
  uint64_t t0 = uv_hrtime();
  uv_timer_start(&timer, on_done, (uint64_t)(seconds * 1000), 0);
  uv_run(loop, UV_RUN_DEFAULT);
  double elapsed = (double)(uv_hrtime() - t0) / 1e9;
  printf("%.0f msgs/s (%llu in %.2fs, %d errors)\n", (double)received / elapsed,
         received, elapsed, errors);
  return errors != 0;
}
