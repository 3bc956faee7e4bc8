/* buffer.h: a growable byte buffer for stream reads and writes.
 *
 * Bytes live in data[start, end). Reads from libuv land directly in the free
 * tail (squall_buffer_reserve then squall_buffer_commit); consumers take from
 * the head (squall_buffer_consume). A delimiter search remembers how far it
 * got (`scanned`), so a line arriving in many chunks is searched in linear
 * time overall, not once per chunk from the start.
 *
 * Ownership: the struct is embedded in its owner (a stream); the owner calls
 * squall_buffer_free exactly once. No function here touches Lua or libuv.
 */
#ifndef SQUALL_BUFFER_H
#define SQUALL_BUFFER_H

#include <stddef.h>

typedef struct squall_buffer {
  char *data;
  size_t start;   /* first unconsumed byte */
  size_t end;     /* one past the last byte */
  size_t cap;     /* allocated size of data */
  size_t scanned; /* bytes from start known not to begin the delimiter */
} squall_buffer;

/* An empty buffer; allocates nothing until the first reserve. */
void squall_buffer_init(squall_buffer *b);

/* Release the storage; the buffer is empty and usable again afterwards. */
void squall_buffer_free(squall_buffer *b);

/* Bytes held. */
static inline size_t squall_buffer_len(const squall_buffer *b) {
  return b->end - b->start;
}

/* Pointer to the first byte held (never NULL, even before the first
 * allocation: a zero offset from NULL is undefined behaviour in C). */
static inline const char *squall_buffer_head(const squall_buffer *b) {
  return b->data != NULL ? b->data + b->start : "";
}

/* Make room for at least `n` more bytes at the tail, moving held bytes to
 * the front or growing the storage. Returns the tail pointer, or NULL when
 * memory is exhausted (the buffer is unchanged then). */
char *squall_buffer_reserve(squall_buffer *b, size_t n);

/* Free bytes at the tail without moving or growing anything. */
static inline size_t squall_buffer_tail_room(const squall_buffer *b) {
  return b->cap - b->end;
}

/* Mark `n` bytes written into the tail (after reserve) as held. */
void squall_buffer_commit(squall_buffer *b, size_t n);

/* Append a copy of `n` bytes. Returns 0, or -1 when memory is exhausted. */
int squall_buffer_append(squall_buffer *b, const char *p, size_t n);

/* Drop `n` bytes (at most the length) from the head. */
void squall_buffer_consume(squall_buffer *b, size_t n);

/* Find `delim` (`dlen` > 0 bytes) among the held bytes, resuming after the
 * part searched by earlier calls with the same delimiter. Returns the
 * offset from the head of the first match, or -1. Call
 * squall_buffer_reset_scan when the delimiter changes. */
long squall_buffer_find(squall_buffer *b, const char *delim, size_t dlen);

/* Forget how far earlier searches got. */
static inline void squall_buffer_reset_scan(squall_buffer *b) {
  b->scanned = 0;
}

/* Give back storage far larger than what is held: after a burst, a
 * connection that keeps a few bytes should not keep the burst's buffer.
 * Frees it when empty; otherwise keeps at least twice the length (and 1
 * KiB), moving the bytes to the front. The remembered scan stays valid. */
void squall_buffer_shrink(squall_buffer *b);

/* Swap the contents of two buffers (the write queue and the bytes handed to
 * the kernel trade places this way, with no copy). */
void squall_buffer_swap(squall_buffer *a, squall_buffer *b);

#endif
