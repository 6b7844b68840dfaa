/* TLS files of the gRPC listener: see tls.h. The PEM text is checked with OpenSSL's
 * parsers (libcrypto, already linked for the token digests) because gRPC 1.51 checks it
 * only when the listener is created, and then fails with "cannot listen", which names
 * neither the key nor the file. */
#include "daemon/tls.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include "daemon/log.h"
#include "gpu/base/file.h"
#include "gpu/base/mem.h"

struct kvs_tls {
    pthread_mutex_t mu; /* a leaf: guards the fields below (gRPC's threads fetch) */
    char *cert;         /* PEM certificate chain, leaf first (tls_cert) */
    char *key;          /* PEM private key (tls_key); wiped before it is freed */
    size_t key_cap;     /* bytes of `key` to wipe */
    char *client_ca;    /* PEM CA certificates (tls_client_ca), or NULL: no client certificates */
    bool fresh;         /* loaded, not yet handed to gRPC (the state diagram in tls.h) */
    bool mutual;        /* fixed at load: the listener's client certificate policy */
};

/* Frees the PEM text (the key wiped first). Under mu, or before anyone else sees t. */
static void free_pem(kvs_tls *t)
{
    if (t->key)
        OPENSSL_cleanse(t->key, t->key_cap);
    free(t->key);
    free(t->cert);
    free(t->client_ca);
    t->key = t->cert = t->client_ca = NULL;
    t->key_cap = 0;
}

/* Reads path (for key) into a NUL-terminated buffer (*len bytes before the NUL): a PEM
 * file, so never empty (gRPC takes the text as a C string: kvs_file_read_text refuses NULs,
 * e.g. a DER file). */
static int read_pem(const char *key, const char *path, char **out, size_t *len, kvs_err *err)
{
    int rc = kvs_file_read_text(key, path, KVS_TLS_FILE_MAX, out, len, err);
    if (rc == KVS_EINVAL && strstr(err->msg, "NUL byte"))
        kvs_err_set(err, KVS_EINVAL,
                    "%s: '%s' is binary, not PEM (DER? convert it with openssl "
                    "x509 -inform der)",
                    key, path);
    if (rc)
        return rc;
    if (*len == 0) {
        free(*out);
        *out = NULL;
        return kvs_err_set(err, KVS_EINVAL, "%s: '%s' is empty (want a PEM file)", key, path);
    }
    return 0;
}

/* Parses every certificate of the PEM text; *leaf (if not NULL) gets the first (owned by
 * the caller: X509_free). Fails unless there is at least one and all of them parse. */
static int parse_certs(const char *key, const char *path, const char *pem, size_t len, X509 **leaf,
                       kvs_err *err)
{
    BIO *bio = BIO_new_mem_buf(pem, (int)len);
    if (!bio)
        return kvs_err_set(err, KVS_ENOMEM, "%s: BIO_new_mem_buf failed", key);
    ERR_clear_error();
    unsigned n = 0;
    int rc = 0;
    X509 *x;
    while ((x = PEM_read_bio_X509(bio, NULL, NULL, NULL))) {
        if (n++ == 0 && leaf) {
            *leaf = x;
            /* Worth a line in the log, not a refusal: clocks differ, and the peer
             * decides. */
            if (X509_cmp_current_time(X509_get0_notAfter(x)) < 0)
                kvs_log(KVS_LOG_WARN, "%s: the certificate in '%s' has expired", key, path);
            else if (X509_cmp_current_time(X509_get0_notBefore(x)) > 0)
                kvs_log(KVS_LOG_WARN, "%s: the certificate in '%s' is not valid yet", key, path);
        } else {
            X509_free(x);
        }
    }
    /* The loop ends on "no start line" once the text is used up; any other error means
     * a block that is not a certificate, or a damaged one. */
    unsigned long e = ERR_peek_last_error();
    bool clean_end = ERR_GET_LIB(e) == ERR_LIB_PEM && ERR_GET_REASON(e) == PEM_R_NO_START_LINE;
    if (e && !clean_end)
        rc = kvs_err_set(
            err, KVS_EINVAL, "%s: '%s': certificate %u is damaged or not a PEM certificate (%s)",
            key, path, n + 1, ERR_reason_error_string(e) ? ERR_reason_error_string(e) : "?");
    else if (n == 0)
        rc = kvs_err_set(err, KVS_EINVAL, "%s: '%s' holds no PEM certificate", key, path);
    ERR_clear_error();
    BIO_free(bio);
    if (rc && leaf && *leaf) {
        X509_free(*leaf);
        *leaf = NULL;
    }
    return rc;
}

/* A passphrase callback that has none: an encrypted key fails to load instead of
 * prompting on the terminal. */
static int no_passphrase(char *buf, int size, int rwflag, void *u)
{
    (void)buf, (void)size, (void)rwflag, (void)u;
    return -1;
}

static int check_key(const char *path, const char *pem, size_t len, X509 *leaf,
                     const char *cert_path, kvs_err *err)
{
    if (strstr(pem, "-----BEGIN ENCRYPTED PRIVATE KEY-----") ||
        strstr(pem, "Proc-Type: 4,ENCRYPTED"))
        return kvs_err_set(err, KVS_EINVAL,
                           "tls_key: '%s' is protected by a passphrase; give the key unencrypted "
                           "(openssl pkey -in KEY -out KEY.plain), mode 0600",
                           path);
    BIO *bio = BIO_new_mem_buf(pem, (int)len);
    if (!bio)
        return kvs_err_set(err, KVS_ENOMEM, "tls_key: BIO_new_mem_buf failed");
    ERR_clear_error();
    EVP_PKEY *pkey = PEM_read_bio_PrivateKey(bio, NULL, no_passphrase, NULL);
    BIO_free(bio);
    int rc = 0;
    if (!pkey)
        rc = kvs_err_set(err, KVS_EINVAL, "tls_key: '%s' holds no PEM private key", path);
    else if (X509_check_private_key(leaf, pkey) != 1)
        rc = kvs_err_set(err, KVS_EINVAL,
                         "tls_key: '%s' is not the key of the certificate in tls_cert '%s'", path,
                         cert_path);
    ERR_clear_error();
    EVP_PKEY_free(pkey);
    return rc;
}

/* The key is a secret: say so when others may read it (tokens.c does the same). */
static void check_key_mode(const char *path)
{
    struct stat st;
    if (stat(path, &st) == 0 && (st.st_mode & S_IROTH))
        kvs_log(KVS_LOG_WARN,
                "tls_key: '%s' is readable by others (mode %03o): it holds the private key; "
                "chmod 600",
                path, (unsigned)(st.st_mode & 0777));
}

int kvs_tls_load(const kvs_config *cfg, kvs_tls **out, kvs_err *err)
{
    *out = NULL;
    if (!cfg->tls_cert[0])
        return 0; /* config.c refused tls_key or tls_client_ca without it */
    kvs_tls *t = kvs_xcalloc(1, sizeof *t);
    pthread_mutex_init(&t->mu, NULL);
    size_t cert_len = 0, key_len = 0, ca_len = 0;
    X509 *leaf = NULL;
    int rc = read_pem("tls_cert", cfg->tls_cert, &t->cert, &cert_len, err);
    if (!rc)
        rc = parse_certs("tls_cert", cfg->tls_cert, t->cert, cert_len, &leaf, err);
    if (!rc && !(rc = read_pem("tls_key", cfg->tls_key, &t->key, &key_len, err))) {
        t->key_cap = key_len;
        check_key_mode(cfg->tls_key);
        rc = check_key(cfg->tls_key, t->key, key_len, leaf, cfg->tls_cert, err);
    }
    if (!rc && cfg->tls_client_ca[0] &&
        !(rc = read_pem("tls_client_ca", cfg->tls_client_ca, &t->client_ca, &ca_len, err)))
        rc = parse_certs("tls_client_ca", cfg->tls_client_ca, t->client_ca, ca_len, NULL, err);
    X509_free(leaf);
    if (rc) {
        kvs_tls_destroy(t);
        return rc;
    }
    t->fresh = true;
    t->mutual = t->client_ca != NULL;
    *out = t;
    return 0;
}

/* gRPC's certificate-config fetcher (any of its threads, at the listener's creation and at
 * each handshake): the files loaded since the last fetch, once. gRPC copies the PEM text
 * into the config, so ours (the key) is wiped right away; the client CA is kept, as a
 * reload needs it to compare. */
static grpc_ssl_certificate_config_reload_status fetch(void *arg,
                                                       grpc_ssl_server_certificate_config **out)
{
    kvs_tls *t = arg;
    pthread_mutex_lock(&t->mu);
    if (!t->fresh) {
        pthread_mutex_unlock(&t->mu);
        return GRPC_SSL_CERTIFICATE_CONFIG_RELOAD_UNCHANGED;
    }
    grpc_ssl_pem_key_cert_pair pair = {.private_key = t->key, .cert_chain = t->cert};
    /* gRPC 1.51 asserts that a fetched config has root certificates, even when no client
     * certificate is asked for: without a client CA our own chain stands in, never used
     * (the listener does not request client certificates then). */
    *out =
        grpc_ssl_server_certificate_config_create(t->client_ca ? t->client_ca : t->cert, &pair, 1);
    t->fresh = false;
    OPENSSL_cleanse(t->key, t->key_cap);
    pthread_mutex_unlock(&t->mu);
    return *out ? GRPC_SSL_CERTIFICATE_CONFIG_RELOAD_NEW : GRPC_SSL_CERTIFICATE_CONFIG_RELOAD_FAIL;
}

grpc_server_credentials *kvs_tls_server_credentials(kvs_tls *tls)
{
    if (!tls)
        return grpc_insecure_server_credentials_create();
    /* Without a client CA no certificate is asked for; with one, a client without a
     * certificate signed by it fails the handshake (it never reaches a call). */
    grpc_ssl_server_credentials_options *o =
        grpc_ssl_server_credentials_create_options_using_config_fetcher(
            tls->mutual ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                        : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE,
            fetch, tls);
    return o ? grpc_ssl_server_credentials_create_with_options(o) : NULL;
}

int kvs_tls_reload(kvs_tls *live, kvs_tls *next, kvs_err *err)
{
    if (live->mutual != next->mutual) {
        kvs_tls_destroy(next);
        return kvs_err_set(err, KVS_EINVAL,
                           "tls_client_ca: turning mutual TLS %s needs a restart (the running "
                           "certificate stays)",
                           live->mutual ? "off" : "on");
    }
    pthread_mutex_lock(&live->mu);
    free_pem(live);
    live->cert = next->cert;
    live->key = next->key;
    live->key_cap = next->key_cap;
    live->client_ca = next->client_ca;
    live->fresh = true;
    pthread_mutex_unlock(&live->mu);
    next->cert = next->key = next->client_ca = NULL; /* live's now */
    kvs_tls_destroy(next);
    return 0;
}

bool kvs_tls_mutual(const kvs_tls *tls)
{
    return tls && tls->mutual;
}

void kvs_tls_destroy(kvs_tls *tls)
{
    if (!tls)
        return;
    free_pem(tls);
    pthread_mutex_destroy(&tls->mu);
    free(tls);
}
