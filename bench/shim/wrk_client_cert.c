/*
 * wrk_client_cert.so: make wrk (or any OpenSSL client) present a TLS client certificate.
 *
 * wrk has no client-certificate option. This LD_PRELOAD shim interposes SSL_CTX_new(): it calls
 * the real one (found with dlsym(RTLD_NEXT)), then loads the certificate chain and private key
 * named by the environment into the new context, exactly as a client with a
 * `--cert/--key` flag would. wrk builds one SSL_CTX at start-up and every connection it opens
 * uses it, so every handshake presents the certificate; the TLS work stays inside wrk's own
 * threads (no stunnel hop, no extra copy).
 *
 *   WRK_CLIENT_CERT  PEM certificate chain (leaf first)        required to do anything
 *   WRK_CLIENT_KEY   PEM private key (default: WRK_CLIENT_CERT)
 *   WRK_NO_RESUME    if set and not empty: every connection makes a full handshake
 *
 * Why WRK_NO_RESUME: wrk ends a connection with SSL_shutdown() and SSL_clear(), which keeps the
 * session, so its next SSL_connect() resumes it (TLS 1.3 PSK with (EC)DHE, from the server's
 * session ticket): no certificate is sent or verified. Measured against a Python server, 2,475 of
 * 2,479 `Connection: close` requests were resumed. The shim then also interposes SSL_connect()
 * and drops the kept session first, so the connection makes the full handshake (certificate,
 * CertificateVerify, chain and CRL check) that a client without a ticket makes.
 *
 * Build (no OpenSSL headers needed: the few symbols are declared here and resolved at run time
 * from the libssl wrk is already linked with):
 *
 *   gcc -shared -fPIC -O2 -Wall -o wrk_client_cert.so wrk_client_cert.c -ldl
 *   WRK_CLIENT_CERT=alice.pem WRK_CLIENT_KEY=alice.key LD_PRELOAD=./wrk_client_cert.so wrk ...
 *
 * If the files cannot be loaded the process exits with status 97 instead of running a
 * benchmark whose every handshake would fail.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

typedef struct ssl_ctx_st SSL_CTX;
typedef struct ssl_method_st SSL_METHOD;

#define SHIM_SSL_FILETYPE_PEM 1

typedef struct ssl_st SSL;
typedef struct ssl_session_st SSL_SESSION;

typedef SSL_CTX *(*ctx_new_fn)(const SSL_METHOD *);
typedef int (*connect_fn)(SSL *);
typedef int (*set_session_fn)(SSL *, SSL_SESSION *);
typedef int (*in_before_fn)(const SSL *);
typedef int (*use_chain_fn)(SSL_CTX *, const char *);
typedef int (*use_key_fn)(SSL_CTX *, const char *, int);
typedef int (*check_key_fn)(const SSL_CTX *);
typedef unsigned long (*err_get_fn)(void);
typedef void (*err_string_fn)(unsigned long, char *, size_t);

static void fail(const char *what, const char *path) {
    char buf[256] = "";
    err_get_fn get = (err_get_fn)dlsym(RTLD_DEFAULT, "ERR_get_error");
    err_string_fn str = (err_string_fn)dlsym(RTLD_DEFAULT, "ERR_error_string_n");
    if (get && str) {
        unsigned long e = get();
        if (e) str(e, buf, sizeof buf);
    }
    fprintf(stderr, "wrk_client_cert: %s %s failed: %s\n", what, path ? path : "", buf);
    exit(97);
}

SSL_CTX *SSL_CTX_new(const SSL_METHOD *method) {
    static ctx_new_fn real = NULL;
    if (!real) {
        real = (ctx_new_fn)dlsym(RTLD_NEXT, "SSL_CTX_new");
        if (!real) {
            fprintf(stderr, "wrk_client_cert: SSL_CTX_new not found: %s\n", dlerror());
            exit(97);
        }
    }
    SSL_CTX *ctx = real(method);
    const char *cert = getenv("WRK_CLIENT_CERT");
    if (!ctx || !cert || !*cert) return ctx;
    const char *key = getenv("WRK_CLIENT_KEY");
    if (!key || !*key) key = cert;

    use_chain_fn use_chain =
        (use_chain_fn)dlsym(RTLD_DEFAULT, "SSL_CTX_use_certificate_chain_file");
    use_key_fn use_key = (use_key_fn)dlsym(RTLD_DEFAULT, "SSL_CTX_use_PrivateKey_file");
    check_key_fn check_key = (check_key_fn)dlsym(RTLD_DEFAULT, "SSL_CTX_check_private_key");
    if (!use_chain || !use_key || !check_key) {
        fprintf(stderr, "wrk_client_cert: OpenSSL symbols not found: %s\n", dlerror());
        exit(97);
    }
    if (use_chain(ctx, cert) != 1) fail("loading certificate chain", cert);
    if (use_key(ctx, key, SHIM_SSL_FILETYPE_PEM) != 1) fail("loading private key", key);
    if (check_key(ctx) != 1) fail("certificate/key mismatch", key);
    if (getenv("WRK_CLIENT_CERT_VERBOSE"))
        fprintf(stderr, "wrk_client_cert: client certificate %s loaded\n", cert);
    return ctx;
}

int SSL_connect(SSL *ssl) {
    static connect_fn real = NULL;
    static set_session_fn set_session = NULL;
    static in_before_fn in_before = NULL;
    static int no_resume = -1;
    if (!real) {
        real = (connect_fn)dlsym(RTLD_NEXT, "SSL_connect");
        set_session = (set_session_fn)dlsym(RTLD_DEFAULT, "SSL_set_session");
        in_before = (in_before_fn)dlsym(RTLD_DEFAULT, "SSL_in_before");
        if (!real || !set_session || !in_before) {
            fprintf(stderr, "wrk_client_cert: SSL_connect not found: %s\n", dlerror());
            exit(97);
        }
    }
    if (no_resume < 0) {
        const char *v = getenv("WRK_NO_RESUME");
        no_resume = v && *v;
    }
    /* wrk calls SSL_connect() again while a non-blocking handshake is under way: drop the
     * session only before a connection's handshake has begun. */
    if (no_resume && in_before(ssl)) set_session(ssl, NULL);
    return real(ssl);
}
