/* tls.h: OpenSSL contexts and the TLS layer under a stream.
 *
 * A context ("squall.ssl_context" userdata) is built once from an
 * ssl_options table and shared by every connection of a server or client.
 * A squall_tls is one connection's SSL object between two memory BIOs:
 * the stream (stream_read.c and stream_tls.c) feeds it the ciphertext
 * libuv read, takes plaintext out into the stream's read buffer, puts
 * plaintext in, and sends the ciphertext it drains. The read state machine
 * never knows TLS is there.
 *
 * Ownership: a squall_tls belongs to its stream, which frees it exactly
 * once with squall_tls_free. It holds its own reference to the SSL_CTX.
 */
#ifndef SQUALL_TLS_H
#define SQUALL_TLS_H

#include <lua.h>
#include <openssl/ssl.h>
#include <stddef.h>

#include "buffer.h"

typedef struct squall_tls squall_tls;

enum {
  SQUALL_TLS_OK = 0,     /* progress made or more input needed */
  SQUALL_TLS_EOF = 1,    /* the peer sent close_notify */
  SQUALL_TLS_ERROR = -1, /* failed: squall_tls_error says why */
};

/* The SSL_CTX of the context userdata at `idx`; raises if it is not one. */
SSL_CTX *squall_tls_check_ctx(lua_State *L, int idx, int *server_side);

/* A TLS layer over `ctx`. A client sends SNI for `hostname` and verifies
 * the peer's name against it (unless the context does not verify).
 * Returns NULL with a message in `err` on failure. */
squall_tls *squall_tls_new(SSL_CTX *ctx, int server_side, const char *hostname,
                           char *err, size_t errlen);
void squall_tls_free(squall_tls *t);

/* Hand ciphertext read from the socket to OpenSSL. Returns 0 or -1. */
int squall_tls_feed(squall_tls *t, const char *p, size_t n);

/* Drive the handshake, then decrypt into `plain`, taking at most `room`
 * bytes. Returns SQUALL_TLS_OK, _EOF or _ERROR. */
int squall_tls_read(squall_tls *t, squall_buffer *plain, size_t room);

/* Encrypt what `plain` holds (all of it, once the handshake is done).
 * Returns SQUALL_TLS_OK or _ERROR. */
int squall_tls_write(squall_tls *t, squall_buffer *plain);

/* Move the ciphertext OpenSSL produced into `out`. Returns 0 or -1. */
int squall_tls_drain(squall_tls *t, squall_buffer *out);

/* Queue close_notify (sent by the next drain). */
void squall_tls_shutdown(squall_tls *t);

int squall_tls_handshake_done(const squall_tls *t);

/* Decrypted or undecrypted bytes OpenSSL still holds. */
size_t squall_tls_pending(const squall_tls *t);

/* True when the peer's last record is incomplete (a truncated stream). */
int squall_tls_truncated(const squall_tls *t);

/* Why the last call failed. */
const char *squall_tls_error(const squall_tls *t);

/* Push the negotiated ALPN protocol (or nil). */
int squall_tls_push_alpn(lua_State *L, const squall_tls *t);

/* Push the peer's certificate as {subject=, issuer=, not_after=,
 * not_before=, serial=} (or nil). */
int squall_tls_push_peer_certificate(lua_State *L, const squall_tls *t);

/* Add core.ssl_context, digest and rsa_encrypt to the table at the top of
 * the stack. */
int squall_tls_open(lua_State *L);

#endif
