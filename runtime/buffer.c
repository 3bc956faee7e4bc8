/* buffer.c: the byte buffer under every stream (see buffer.h). */
#include "buffer.h"

#include <stdlib.h>
#include <string.h>

/* The smallest allocation: a connection holding a few bytes of a request
 * keeps this much (nginx starts a request with 1 KiB too). */
enum { MIN_CAP = 1024 };

void squall_buffer_init(squall_buffer *b) {
  memset(b, 0, sizeof *b);
}

void squall_buffer_free(squall_buffer *b) {
  free(b->data);
  squall_buffer_init(b);
}

char *squall_buffer_reserve(squall_buffer *b, size_t n) {
  if (b->cap - b->end >= n)
    return b->data + b->end;
  size_t len = b->end - b->start;
  /* Sliding the held bytes to the front is enough when they are few: it
   * costs at most `len` bytes copied, and the consumed head is reclaimed. */
  if (b->cap - len >= n && len <= b->cap / 2) {
    memmove(b->data, b->data + b->start, len);
    b->start = 0;
    b->end = len;
    return b->data + b->end;
  }
  size_t want = len + n;
  if (want < len)
    return NULL; /* overflow */
  size_t cap = b->cap ? b->cap : MIN_CAP;
  while (cap < want) {
    if (cap > (size_t)-1 / 2) {
      cap = want;
      break;
    }
    cap *= 2;
  }
  /* realloc, not malloc + copy: for large buffers glibc moves the pages
   * with mremap, so growing a 64 MiB line neither copies it nor touches
   * its pages again (page faults dominated the time otherwise). */
  if (b->start > 0 && len > 0)
    memmove(b->data, b->data + b->start, len);
  char *data = realloc(b->data, cap);
  if (data == NULL) {
    b->start = 0; /* the bytes moved to the front; keep them valid */
    b->end = len;
    return NULL;
  }
  b->data = data;
  b->cap = cap;
  b->start = 0;
  b->end = len;
  return b->data + b->end;
}

void squall_buffer_commit(squall_buffer *b, size_t n) {
  b->end += n;
}

int squall_buffer_append(squall_buffer *b, const char *p, size_t n) {
  if (n == 0)
    return 0;
  char *tail = squall_buffer_reserve(b, n);
  if (tail == NULL)
    return -1;
  memcpy(tail, p, n);
  b->end += n;
  return 0;
}

void squall_buffer_consume(squall_buffer *b, size_t n) {
  size_t len = b->end - b->start;
  if (n >= len) {
    b->start = b->end = 0;
    b->scanned = 0;
    return;
  }
  b->start += n;
  b->scanned = b->scanned > n ? b->scanned - n : 0;
}

long squall_buffer_find(squall_buffer *b, const char *delim, size_t dlen) {
  size_t len = b->end - b->start;
  if (dlen == 0 || len < dlen)
    return -1;
  const char *head = b->data + b->start;
  size_t from = b->scanned;
  const char *hit = memmem(head + from, len - from, delim, dlen);
  if (hit != NULL) {
    b->scanned = (size_t)(hit - head);
    return (long)(hit - head);
  }
  /* A match may still begin in the last dlen-1 bytes once more arrive. */
  b->scanned = len - dlen + 1;
  return -1;
}

void squall_buffer_shrink(squall_buffer *b) {
  size_t len = b->end - b->start;
  if (len == 0) {
    squall_buffer_free(b);
    return;
  }
  size_t want = MIN_CAP;
  while (want < 2 * len)
    want *= 2;
  if (b->cap <= 2 * want)
    return; /* close enough: not worth a copy */
  memmove(b->data, b->data + b->start, len);
  b->start = 0;
  b->end = len;
  char *data = realloc(b->data, want);
  if (data == NULL)
    return; /* keep the larger block; the bytes are at its front */
  b->data = data;
  b->cap = want;
}

void squall_buffer_swap(squall_buffer *a, squall_buffer *b) {
  squall_buffer t = *a;
  *a = *b;
  *b = t;
}
