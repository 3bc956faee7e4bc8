/* C unit tests for runtime/buffer.c; prints TAP. */
#include "../runtime/buffer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int n_test, n_failed;

static void ok(int cond, const char *name) {
  n_test++;
  if (!cond)
    n_failed++;
  printf("%s %d - buffer: %s\n", cond ? "ok" : "not ok", n_test, name);
}

static void test_append_consume(void) {
  squall_buffer b;
  squall_buffer_init(&b);
  ok(squall_buffer_len(&b) == 0 && b.data == NULL, "starts empty, unallocated");
  ok(squall_buffer_append(&b, "hello ", 6) == 0, "append");
  ok(squall_buffer_append(&b, "world", 5) == 0, "append again");
  ok(squall_buffer_len(&b) == 11 &&
         memcmp(squall_buffer_head(&b), "hello world", 11) == 0,
     "holds both in order");
  squall_buffer_consume(&b, 6);
  ok(squall_buffer_len(&b) == 5 &&
         memcmp(squall_buffer_head(&b), "world", 5) == 0,
     "consume drops from the head");
  squall_buffer_consume(&b, 100);
  ok(squall_buffer_len(&b) == 0 && b.start == 0,
     "consume past the end empties");
  squall_buffer_free(&b);
  ok(b.data == NULL && b.cap == 0, "free releases");
}

static void test_reserve_commit(void) {
  squall_buffer b;
  squall_buffer_init(&b);
  char *tail = squall_buffer_reserve(&b, 100);
  ok(tail != NULL && squall_buffer_tail_room(&b) >= 100, "reserve gives room");
  memcpy(tail, "abc", 3);
  squall_buffer_commit(&b, 3);
  ok(squall_buffer_len(&b) == 3, "commit makes bytes held");
  /* Fill, consume most, and check reserve slides instead of growing. */
  size_t cap = b.cap;
  tail = squall_buffer_reserve(&b, cap - 3);
  memset(tail, 'x', cap - 3);
  squall_buffer_commit(&b, cap - 3);
  squall_buffer_consume(&b, cap - 10);
  tail = squall_buffer_reserve(&b, 100);
  ok(tail != NULL && b.cap == cap && b.start == 0, "reserve slides held bytes");
  ok(squall_buffer_len(&b) == 10 &&
         memcmp(squall_buffer_head(&b), "xxxxxxxxxx", 10) == 0,
     "sliding keeps the bytes");
  tail = squall_buffer_reserve(&b, 10 * cap);
  ok(tail != NULL && b.cap >= 11 * cap && squall_buffer_len(&b) == 10,
     "reserve grows and keeps the bytes");
  squall_buffer_free(&b);
}

static void test_find(void) {
  squall_buffer b;
  squall_buffer_init(&b);
  ok(squall_buffer_find(&b, "\r\n", 2) == -1, "find in empty");
  squall_buffer_append(&b, "GET / HTTP/1.1\r", 15);
  ok(squall_buffer_find(&b, "\r\n", 2) == -1, "half a delimiter is no match");
  squall_buffer_append(&b, "\nHost: x\r\n", 10);
  ok(squall_buffer_find(&b, "\r\n", 2) == 14,
     "a delimiter split across appends");
  squall_buffer_consume(&b, 16);
  squall_buffer_reset_scan(&b);
  ok(squall_buffer_find(&b, "\r\n", 2) == 7,
     "after consume, from the new head");
  ok(squall_buffer_find(&b, "zz", 2) == -1, "absent");
  squall_buffer_reset_scan(&b);
  ok(squall_buffer_find(&b, "H", 1) == 0, "match at the head");
  squall_buffer_free(&b);
}

static void test_find_is_linear(void) {
  squall_buffer b;
  squall_buffer_init(&b);
  const size_t chunks = 20000;
  size_t searched = 0;
  for (size_t i = 0; i < chunks; i++) {
    squall_buffer_append(&b, "abcdefgh", 8);
    /* What this search can look at: everything past the remembered
     * offset. Summed over all chunks that proves the search linear. */
    size_t before = b.scanned;
    long at = squall_buffer_find(&b, "\r\n\r\n", 4);
    searched += squall_buffer_len(&b) - before;
    if (at != -1)
      break;
  }
  squall_buffer_append(&b, "\r\n\r\n", 4);
  long at = squall_buffer_find(&b, "\r\n\r\n", 4);
  ok(at == (long)(chunks * 8), "finds the delimiter after 20000 chunks");
  /* Quadratic would be ~chunks^2 * 4 bytes; linear is ~chunks * 8 * 2. */
  ok(searched < chunks * 8 * 2, "total bytes searched stay linear");
  squall_buffer_free(&b);
}

static void test_swap(void) {
  squall_buffer a, b;
  squall_buffer_init(&a);
  squall_buffer_init(&b);
  squall_buffer_append(&a, "queued", 6);
  squall_buffer_swap(&a, &b);
  ok(squall_buffer_len(&a) == 0 && squall_buffer_len(&b) == 6 &&
         memcmp(squall_buffer_head(&b), "queued", 6) == 0,
     "swap trades contents");
  squall_buffer_free(&a);
  squall_buffer_free(&b);
}

static void test_large(void) {
  squall_buffer b;
  squall_buffer_init(&b);
  size_t total = 16u << 20;
  char *chunk = malloc(65536);
  int good = 1;
  for (size_t i = 0; i < 65536; i++)
    chunk[i] = (char)(i * 7);
  for (size_t off = 0; off < total; off += 65536)
    good &= squall_buffer_append(&b, chunk, 65536) == 0;
  ok(good && squall_buffer_len(&b) == total, "holds 16 MiB");
  good = 1;
  for (size_t off = 0; off < total; off += 65536) {
    good &= memcmp(squall_buffer_head(&b), chunk, 65536) == 0;
    squall_buffer_consume(&b, 65536);
  }
  ok(good && squall_buffer_len(&b) == 0, "gives the 16 MiB back intact");
  free(chunk);
  squall_buffer_free(&b);
}

static void test_shrink(void) {
  squall_buffer b;
  squall_buffer_init(&b);
  char *big = calloc(1, 1 << 20);
  squall_buffer_append(&b, big, 1 << 20);
  squall_buffer_append(&b, "abc\n", 4);
  squall_buffer_consume(&b, 1 << 20);
  ok(b.cap >= (1 << 20), "a burst leaves a large buffer behind");
  ok(squall_buffer_find(&b, "\n", 1) == 3, "the scan points at the newline");
  squall_buffer_shrink(&b);
  ok(b.cap == 1024 && squall_buffer_len(&b) == 4 &&
         memcmp(squall_buffer_head(&b), "abc\n", 4) == 0,
     "shrink keeps the bytes in 1 KiB");
  ok(squall_buffer_find(&b, "\n", 1) == 3, "and the scan still finds them");
  squall_buffer_consume(&b, 4);
  squall_buffer_shrink(&b);
  ok(b.data == NULL && b.cap == 0, "shrink of an empty buffer frees it");
  free(big);
}

int main(void) {
  test_shrink();
  test_append_consume();
  test_reserve_commit();
  test_find();
  test_find_is_linear();
  test_swap();
  test_large();
  printf("1..%d\n", n_test);
  return n_failed != 0;
}
