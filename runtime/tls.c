/* tls.c: OpenSSL contexts and a TLS layer under a stream (see tls.h). */
#include "tls.h"

#include <arpa/inet.h>
#include <lauxlib.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CTX_MT "squall.ssl_context"

/* The context userdata. The ALPN list (wire format) lives here because the
 * server's selection callback reads it for every handshake. */
typedef struct {
  SSL_CTX *ctx;
  int server_side;
  unsigned char alpn[256];
  unsigned alpn_len;
} tls_context;

struct squall_tls {
  SSL *ssl;
  BIO *rbio; /* ciphertext from the peer */
  BIO *wbio; /* ciphertext for the peer */
  int handshake_done;
  int failed;
  char err[256];
};

/* The reason at the top of OpenSSL's error queue, with the verification
 * result when that is what failed; clears the queue. */
static void describe_error(squall_tls *t, const char *what) {
  unsigned long e = ERR_get_error();
  long verify = t->ssl ? SSL_get_verify_result(t->ssl) : X509_V_OK;
  if (verify != X509_V_OK)
    snprintf(t->err, sizeof t->err, "%s: certificate verify failed: %s", what,
             X509_verify_cert_error_string(verify));
  else if (e != 0)
    snprintf(t->err, sizeof t->err, "%s: %s", what,
             ERR_reason_error_string(e) ? ERR_reason_error_string(e)
                                        : "unknown error");
  else
    snprintf(t->err, sizeof t->err, "%s failed", what);
  ERR_clear_error();
}

/* ---- contexts --------------------------------------------------------- */

static int file_readable(const char *path) {
  return access(path, R_OK) == 0;
}

/* Raise with the OpenSSL reason, naming the file. */
static int raise_ssl(lua_State *L, const char *what, const char *path) {
  unsigned long e = ERR_get_error();
  const char *reason = e ? ERR_reason_error_string(e) : NULL;
  ERR_clear_error();
  return luaL_error(L, "ssl_options: %s %s: %s", what, path,
                    reason ? reason : "cannot be used");
}

static const char *opt_string(lua_State *L, int idx, const char *key) {
  lua_getfield(L, idx, key);
  const char *s = NULL;
  if (!lua_isnil(L, -1)) {
    if (lua_type(L, -1) != LUA_TSTRING)
      luaL_error(L, "ssl_options: %s must be a string", key);
    s = lua_tostring(L, -1);
  }
  lua_pop(L, 1); /* the string stays alive in the options table */
  return s;
}

static int alpn_select(SSL *ssl, const unsigned char **out,
                       unsigned char *outlen, const unsigned char *in,
                       unsigned inlen, void *arg) {
  (void)ssl;
  tls_context *c = arg;
  /* The server's preference order wins, as in Tornado and nginx. */
  if (SSL_select_next_proto((unsigned char **)out, outlen, c->alpn, c->alpn_len,
                            in, inlen) != OPENSSL_NPN_NEGOTIATED)
    return SSL_TLSEXT_ERR_NOACK;
  return SSL_TLSEXT_ERR_OK;
}

static void read_alpn(lua_State *L, int idx, tls_context *c) {
  lua_getfield(L, idx, "alpn_protocols");
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return;
  }
  if (!lua_istable(L, -1))
    luaL_error(L, "ssl_options: alpn_protocols must be a list of strings");
  int n = (int)lua_objlen(L, -1);
  for (int i = 1; i <= n; i++) {
    lua_rawgeti(L, -1, i);
    size_t len;
    const char *p = lua_tolstring(L, -1, &len);
    if (p == NULL || len == 0 || len > 255 ||
        c->alpn_len + len + 1 > sizeof c->alpn)
      luaL_error(L, "ssl_options: bad alpn_protocols entry %d", i);
    c->alpn[c->alpn_len++] = (unsigned char)len;
    memcpy(c->alpn + c->alpn_len, p, len);
    c->alpn_len += (unsigned)len;
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
}

static int parse_version(lua_State *L, const char *v) {
  if (v == NULL || strcmp(v, "TLSv1.2") == 0 || strcmp(v, "1.2") == 0)
    return TLS1_2_VERSION;
  if (strcmp(v, "TLSv1.3") == 0 || strcmp(v, "1.3") == 0)
    return TLS1_3_VERSION;
  return luaL_error(L,
                    "ssl_options: min_version must be \"TLSv1.2\" or "
                    "\"TLSv1.3\", got \"%s\"",
                    v);
}

/* core.ssl_context(ssl_options, server_side) -> context
 * Raises a message naming the file or key at fault. */
static int l_ssl_context(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  int server_side = lua_toboolean(L, 2);
  const char *certfile = opt_string(L, 1, "certfile");
  const char *keyfile = opt_string(L, 1, "keyfile");
  const char *ca_certs = opt_string(L, 1, "ca_certs");
  const char *cert_reqs = opt_string(L, 1, "cert_reqs");
  const char *ciphers = opt_string(L, 1, "ciphers");
  const char *min_version = NULL;
  lua_getfield(L, 1, "min_version");
  if (lua_isnumber(L, -1))
    min_version = lua_tonumber(L, -1) >= 1.3 ? "1.3" : "1.2";
  else if (!lua_isnil(L, -1))
    min_version = luaL_checkstring(L, -1);
  lua_pop(L, 1);
  int version = parse_version(L, min_version);

  int verify = server_side ? SSL_VERIFY_NONE : SSL_VERIFY_PEER;
  if (cert_reqs != NULL) {
    if (strcmp(cert_reqs, "none") == 0)
      verify = SSL_VERIFY_NONE;
    else if (strcmp(cert_reqs, "optional") == 0)
      verify = SSL_VERIFY_PEER;
    else if (strcmp(cert_reqs, "required") == 0)
      verify = SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT;
    else
      return luaL_error(L,
                        "ssl_options: cert_reqs must be \"none\", "
                        "\"optional\" or \"required\", got \"%s\"",
                        cert_reqs);
  }
  if (server_side && certfile == NULL)
    return luaL_error(L, "ssl_options: a server needs certfile");
  if (keyfile != NULL && certfile == NULL)
    return luaL_error(L, "ssl_options: keyfile given without certfile");
  if (certfile != NULL && !file_readable(certfile))
    return luaL_error(L, "ssl_options: certfile %s cannot be read", certfile);
  if (keyfile != NULL && !file_readable(keyfile))
    return luaL_error(L, "ssl_options: keyfile %s cannot be read", keyfile);
  if (ca_certs != NULL && !file_readable(ca_certs))
    return luaL_error(L, "ssl_options: ca_certs %s cannot be read", ca_certs);

  tls_context *c = lua_newuserdata(L, sizeof *c);
  memset(c, 0, sizeof *c);
  luaL_getmetatable(L, CTX_MT);
  lua_setmetatable(L, -2);
  c->server_side = server_side;
  read_alpn(L, 1, c);
  c->ctx = SSL_CTX_new(server_side ? TLS_server_method() : TLS_client_method());
  if (c->ctx == NULL)
    return raise_ssl(L, "cannot create a context", "");
  SSL_CTX *ctx = c->ctx;
  SSL_CTX_set_min_proto_version(ctx, version);
  SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE |
                            SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
                            SSL_MODE_RELEASE_BUFFERS);
  SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION);
  if (certfile != NULL) {
    if (SSL_CTX_use_certificate_chain_file(ctx, certfile) != 1)
      return raise_ssl(L, "certfile", certfile);
    const char *kf = keyfile ? keyfile : certfile;
    if (SSL_CTX_use_PrivateKey_file(ctx, kf, SSL_FILETYPE_PEM) != 1)
      return raise_ssl(L, "keyfile", kf);
    if (SSL_CTX_check_private_key(ctx) != 1)
      return raise_ssl(L, "keyfile does not match the certificate in", kf);
  }
  if (ca_certs != NULL) {
    if (SSL_CTX_load_verify_locations(ctx, ca_certs, NULL) != 1)
      return raise_ssl(L, "ca_certs", ca_certs);
    if (server_side) {
      STACK_OF(X509_NAME) *names = SSL_load_client_CA_file(ca_certs);
      if (names != NULL)
        SSL_CTX_set_client_CA_list(ctx, names);
    }
  } else if (verify != SSL_VERIFY_NONE) {
    SSL_CTX_set_default_verify_paths(ctx);
  }
  SSL_CTX_set_verify(ctx, verify, NULL);
  if (ciphers != NULL && SSL_CTX_set_cipher_list(ctx, ciphers) != 1)
    return raise_ssl(L, "ciphers", ciphers);
  if (c->alpn_len > 0) {
    if (server_side)
      SSL_CTX_set_alpn_select_cb(ctx, alpn_select, c);
    else
      SSL_CTX_set_alpn_protos(ctx, c->alpn, c->alpn_len);
  }
  return 1;
}

static int l_ctx_gc(lua_State *L) {
  tls_context *c = luaL_checkudata(L, 1, CTX_MT);
  if (c->ctx != NULL)
    SSL_CTX_free(c->ctx);
  c->ctx = NULL;
  return 0;
}

SSL_CTX *squall_tls_check_ctx(lua_State *L, int idx, int *server_side) {
  tls_context *c = luaL_checkudata(L, idx, CTX_MT);
  if (c->ctx == NULL)
    luaL_error(L, "the ssl context is gone");
  if (server_side != NULL)
    *server_side = c->server_side;
  return c->ctx;
}

/* ---- the layer -------------------------------------------------------- */

static int is_ip(const char *host) {
  unsigned char buf[sizeof(struct in6_addr)];
  return inet_pton(AF_INET, host, buf) == 1 ||
         inet_pton(AF_INET6, host, buf) == 1;
}

squall_tls *squall_tls_new(SSL_CTX *ctx, int server_side, const char *hostname,
                           char *err, size_t errlen) {
  squall_tls *t = calloc(1, sizeof *t);
  if (t == NULL) {
    snprintf(err, errlen, "out of memory");
    return NULL;
  }
  t->ssl = SSL_new(ctx);
  t->rbio = BIO_new(BIO_s_mem());
  t->wbio = BIO_new(BIO_s_mem());
  if (t->ssl == NULL || t->rbio == NULL || t->wbio == NULL) {
    snprintf(err, errlen, "cannot create a TLS session");
    BIO_free(t->rbio);
    BIO_free(t->wbio);
    SSL_free(t->ssl);
    free(t);
    ERR_clear_error();
    return NULL;
  }
  /* An empty memory BIO means "no data yet", not end of file. */
  BIO_set_mem_eof_return(t->rbio, -1);
  SSL_set_bio(t->ssl, t->rbio, t->wbio);
  if (server_side) {
    SSL_set_accept_state(t->ssl);
  } else {
    SSL_set_connect_state(t->ssl);
    if (hostname != NULL && hostname[0] != '\0') {
      if (is_ip(hostname)) {
        X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(t->ssl), hostname);
      } else {
        SSL_set_tlsext_host_name(t->ssl, hostname);
        SSL_set1_host(t->ssl, hostname);
      }
    }
  }
  return t;
}

void squall_tls_free(squall_tls *t) {
  if (t == NULL)
    return;
  SSL_free(t->ssl); /* frees both BIOs */
  free(t);
}

int squall_tls_feed(squall_tls *t, const char *p, size_t n) {
  return BIO_write(t->rbio, p, (int)n) == (int)n ? 0 : -1;
}

static int handshake(squall_tls *t) {
  if (t->handshake_done)
    return SQUALL_TLS_OK;
  ERR_clear_error();
  int r = SSL_do_handshake(t->ssl);
  if (r == 1) {
    t->handshake_done = 1;
    return SQUALL_TLS_OK;
  }
  int e = SSL_get_error(t->ssl, r);
  if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
    return SQUALL_TLS_OK;
  t->failed = 1;
  describe_error(t, "handshake");
  return SQUALL_TLS_ERROR;
}

int squall_tls_read(squall_tls *t, squall_buffer *plain, size_t room) {
  if (t->failed)
    return SQUALL_TLS_ERROR;
  if (handshake(t) != SQUALL_TLS_OK)
    return SQUALL_TLS_ERROR;
  if (!t->handshake_done)
    return SQUALL_TLS_OK;
  while (room > 0) {
    size_t want = room < 16384 ? room : 16384;
    char *p = squall_buffer_reserve(plain, want);
    if (p == NULL)
      return SQUALL_TLS_OK;
    ERR_clear_error();
    int n = SSL_read(t->ssl, p, (int)want);
    if (n > 0) {
      squall_buffer_commit(plain, (size_t)n);
      room -= (size_t)n;
      continue;
    }
    int e = SSL_get_error(t->ssl, n);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
      return SQUALL_TLS_OK;
    if (e == SSL_ERROR_ZERO_RETURN)
      return SQUALL_TLS_EOF;
    t->failed = 1;
    describe_error(t, "record");
    return SQUALL_TLS_ERROR;
  }
  return SQUALL_TLS_OK;
}

int squall_tls_write(squall_tls *t, squall_buffer *plain) {
  if (t->failed)
    return SQUALL_TLS_ERROR;
  if (!t->handshake_done)
    return SQUALL_TLS_OK; /* plaintext waits for the handshake */
  while (squall_buffer_len(plain) > 0) {
    size_t len = squall_buffer_len(plain);
    int chunk = len > (1u << 30) ? (1 << 30) : (int)len;
    ERR_clear_error();
    int n = SSL_write(t->ssl, squall_buffer_head(plain), chunk);
    if (n <= 0) {
      int e = SSL_get_error(t->ssl, n);
      if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
        return SQUALL_TLS_OK;
      t->failed = 1;
      describe_error(t, "write");
      return SQUALL_TLS_ERROR;
    }
    squall_buffer_consume(plain, (size_t)n);
  }
  return SQUALL_TLS_OK;
}

int squall_tls_drain(squall_tls *t, squall_buffer *out) {
  size_t n = BIO_ctrl_pending(t->wbio);
  if (n == 0)
    return 0;
  char *p = squall_buffer_reserve(out, n);
  if (p == NULL)
    return -1;
  int got = BIO_read(t->wbio, p, (int)n);
  if (got > 0)
    squall_buffer_commit(out, (size_t)got);
  return 0;
}

void squall_tls_shutdown(squall_tls *t) {
  if (t->handshake_done && !t->failed) {
    ERR_clear_error();
    SSL_shutdown(t->ssl);
    ERR_clear_error();
  }
}

int squall_tls_handshake_done(const squall_tls *t) {
  return t->handshake_done;
}

size_t squall_tls_pending(const squall_tls *t) {
  return (size_t)SSL_pending(t->ssl) + BIO_ctrl_pending(t->rbio);
}

int squall_tls_truncated(const squall_tls *t) {
  return !t->handshake_done || BIO_ctrl_pending(t->rbio) > 0 ||
         SSL_has_pending(t->ssl);
}

const char *squall_tls_error(const squall_tls *t) {
  return t->err[0] ? t->err : "TLS failure";
}

int squall_tls_push_alpn(lua_State *L, const squall_tls *t) {
  const unsigned char *p = NULL;
  unsigned len = 0;
  SSL_get0_alpn_selected(t->ssl, &p, &len);
  if (p == NULL || len == 0)
    lua_pushnil(L);
  else
    lua_pushlstring(L, (const char *)p, len);
  return 1;
}

static void push_name(lua_State *L, const X509_NAME *name) {
  char buf[512];
  X509_NAME_oneline(name, buf, sizeof buf);
  lua_pushstring(L, buf);
}

static void push_time(lua_State *L, const ASN1_TIME *t) {
  struct tm tm;
  char buf[32];
  if (ASN1_TIME_to_tm(t, &tm) == 1 &&
      strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm) > 0)
    lua_pushstring(L, buf);
  else
    lua_pushnil(L);
}

int squall_tls_push_peer_certificate(lua_State *L, const squall_tls *t) {
  X509 *cert = SSL_get1_peer_certificate(t->ssl);
  if (cert == NULL) {
    lua_pushnil(L);
    return 1;
  }
  lua_createtable(L, 0, 5);
  push_name(L, X509_get_subject_name(cert));
  lua_setfield(L, -2, "subject");
  push_name(L, X509_get_issuer_name(cert));
  lua_setfield(L, -2, "issuer");
  push_time(L, X509_get0_notAfter(cert));
  lua_setfield(L, -2, "not_after");
  push_time(L, X509_get0_notBefore(cert));
  lua_setfield(L, -2, "not_before");
  BIGNUM *bn = ASN1_INTEGER_to_BN(X509_get0_serialNumber(cert), NULL);
  char *hex = bn ? BN_bn2hex(bn) : NULL;
  lua_pushstring(L, hex ? hex : "");
  lua_setfield(L, -2, "serial");
  OPENSSL_free(hex);
  BN_free(bn);
  X509_free(cert);
  return 1;
}

/* core.digest(name, data): the raw digest ("sha1", "sha256", ...). The
 * MySQL client's authentication scrambles need SHA-1 and SHA-256. */
static int l_digest(lua_State *L) {
  const char *name = luaL_checkstring(L, 1);
  size_t n;
  const char *data = luaL_checklstring(L, 2, &n);
  const EVP_MD *md = EVP_get_digestbyname(name);
  if (md == NULL)
    return luaL_argerror(L, 1, "unknown digest");
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (EVP_Digest(data, n, out, &len, md, NULL) != 1)
    return luaL_error(L, "digest %s failed", name);
  lua_pushlstring(L, (const char *)out, len);
  return 1;
}

/* core.rsa_encrypt(pem, data): data encrypted with the PEM public key and
 * RSA-OAEP padding (caching_sha2_password's full authentication without
 * TLS); nil, message when the key is unusable. */
static int l_rsa_encrypt(lua_State *L) {
  size_t pem_len, n;
  const char *pem = luaL_checklstring(L, 1, &pem_len);
  const char *data = luaL_checklstring(L, 2, &n);
  BIO *bio = BIO_new_mem_buf(pem, (int)pem_len);
  EVP_PKEY *key = bio ? PEM_read_bio_PUBKEY(bio, NULL, NULL, NULL) : NULL;
  BIO_free(bio);
  EVP_PKEY_CTX *ctx = key ? EVP_PKEY_CTX_new(key, NULL) : NULL;
  unsigned char *out = NULL;
  size_t out_len = 0;
  int ok =
      ctx != NULL && EVP_PKEY_encrypt_init(ctx) == 1 &&
      EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_OAEP_PADDING) == 1 &&
      EVP_PKEY_encrypt(ctx, NULL, &out_len, (const unsigned char *)data, n) ==
          1 &&
      (out = OPENSSL_malloc(out_len)) != NULL &&
      EVP_PKEY_encrypt(ctx, out, &out_len, (const unsigned char *)data, n) == 1;
  if (ok)
    lua_pushlstring(L, (const char *)out, out_len);
  OPENSSL_free(out);
  EVP_PKEY_CTX_free(ctx);
  EVP_PKEY_free(key);
  if (ok)
    return 1;
  char msg[256];
  ERR_error_string_n(ERR_get_error(), msg, sizeof msg);
  ERR_clear_error();
  lua_pushnil(L);
  lua_pushstring(L, msg);
  return 2;
}

int squall_tls_open(lua_State *L) {
  luaL_newmetatable(L, CTX_MT);
  lua_pushcfunction(L, l_ctx_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  lua_pushcfunction(L, l_ssl_context);
  lua_setfield(L, -2, "ssl_context");
  lua_pushcfunction(L, l_digest);
  lua_setfield(L, -2, "digest");
  lua_pushcfunction(L, l_rsa_encrypt);
  lua_setfield(L, -2, "rsa_encrypt");
  return 0;
}
