/* uv_baseline.c: the plain C libuv servers Squall is measured against.
 *
 *   uv_baseline echo PORT    echo every byte back (a line echo server)
 *   uv_baseline http PORT    answer each request head ("\r\n\r\n") with a
 *                            keep-alive "Hello, world!" response
 *   uv_baseline sink PORT    read and drop everything; close at EOF
 *
 * Written the way a careful libuv user would: one read buffer per
 * connection, one uv_try_write per read callback with uv_write only for
 * what the kernel did not take. No parsing beyond what the benchmark needs.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

static int http_mode, sink_mode;

static const char RESPONSE[] = "HTTP/1.1 200 OK\r\nServer: squall\r\n"
                               "Content-Type: text/plain\r\n"
                               "Content-Length: 14\r\n"
                               "Connection: keep-alive\r\n\r\nHello, world!\n";

typedef struct conn {
  uv_tcp_t tcp;
  int matched; /* bytes of "\r\n\r\n" matched so far (http) */
} conn;

/* libuv calls on_read right after on_alloc, so one read buffer serves
 * every connection and an idle one costs only its handle. */
static char read_buf[65536];

typedef struct wreq {
  uv_write_t req;
  char *data;
} wreq;

static void on_closed(uv_handle_t *h) {
  free(h->data);
}

static void on_written(uv_write_t *req, int status) {
  wreq *w = (wreq *)req;
  if (status < 0)
    uv_close((uv_handle_t *)req->handle, on_closed);
  free(w->data);
  free(w);
}

static void send_all(conn *c, const char *p, size_t n) {
  uv_buf_t b = uv_buf_init((char *)p, (unsigned)n);
  int done = uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
  if (done == UV_EAGAIN)
    done = 0;
  if (done < 0) {
    uv_close((uv_handle_t *)&c->tcp, on_closed);
    return;
  }
  if ((size_t)done == n)
    return;
  wreq *w = malloc(sizeof *w);
  w->data = malloc(n - (size_t)done);
  memcpy(w->data, p + done, n - (size_t)done);
  b = uv_buf_init(w->data, (unsigned)(n - (size_t)done));
  uv_write(&w->req, (uv_stream_t *)&c->tcp, &b, 1, on_written);
}

static void on_alloc(uv_handle_t *h, size_t size, uv_buf_t *buf) {
  (void)size;
  (void)h;
  *buf = uv_buf_init(read_buf, sizeof read_buf);
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
  conn *c = s->data;
  if (n < 0) {
    uv_close((uv_handle_t *)s, on_closed);
    return;
  }
  if (sink_mode)
    return;
  if (!http_mode) {
    send_all(c, buf->base, (size_t)n);
    return;
  }
  static const char END[] = "\r\n\r\n";
  int requests = 0;
  for (ssize_t i = 0; i < n; i++) {
    c->matched = buf->base[i] == END[c->matched] ? c->matched + 1
                 : buf->base[i] == '\r'          ? 1
                                                 : 0;
    if (c->matched == 4) {
      requests++;
      c->matched = 0;
    }
  }
  if (requests == 0)
    return;
  size_t len = sizeof RESPONSE - 1;
  char stackbuf[16 * (sizeof RESPONSE)];
  char *out = requests <= 16 ? stackbuf : malloc(len * (size_t)requests);
  for (int i = 0; i < requests; i++)
    memcpy(out + (size_t)i * len, RESPONSE, len);
  send_all(c, out, len * (size_t)requests);
  if (out != stackbuf)
    free(out);
}

static void on_connection(uv_stream_t *server, int status) {
  if (status < 0)
    return;
  conn *c = calloc(1, sizeof *c);
  uv_tcp_init(server->loop, &c->tcp);
  c->tcp.data = c;
  if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0) {
    uv_close((uv_handle_t *)&c->tcp, on_closed);
    return;
  }
  uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
}

int main(int argc, char **argv) {
  if (argc != 3 || (strcmp(argv[1], "echo") && strcmp(argv[1], "http") &&
                    strcmp(argv[1], "sink"))) {
    fprintf(stderr, "usage: %s echo|http|sink PORT\n", argv[0]);
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);
  http_mode = strcmp(argv[1], "http") == 0;
  sink_mode = strcmp(argv[1], "sink") == 0;
  uv_loop_t *loop = uv_default_loop();
  uv_tcp_t server;
  struct sockaddr_in addr;
  uv_ip4_addr("127.0.0.1", atoi(argv[2]), &addr);
  uv_tcp_init(loop, &server);
  int err = uv_tcp_bind(&server, (struct sockaddr *)&addr, 0);
  if (err == 0)
    err = uv_listen((uv_stream_t *)&server, 1024, on_connection);
  if (err != 0) {
    fprintf(stderr, "listen: %s\n", uv_strerror(err));
    return 1;
  }
  return uv_run(loop, UV_RUN_DEFAULT);
}
