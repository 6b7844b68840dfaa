/* libkvstash: the channel's credentials (kvstash.h, kvs_client_opts' tls_* options).
 * Plaintext unless a tls_* option is set; then gRPC's SSL credentials, built from PEM
 * files read here so that a bad path or a file that is not PEM fails kvs_client_connect
 * naming the option, instead of every call failing later with UNAVAILABLE. The deep
 * check of the certificates is the handshake's (gRPC), not ours: libkvstash links no
 * TLS library of its own. */
#include <errno.h>
#include <grpc/grpc_security.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client/client_int.h"
#include "gpu/base/file.h"
#include "gpu/base/mem.h"

/* A PEM file is a few KiB; refuse what cannot be one before reading it all. */
#define PEM_MAX (1 << 20)

/* Reads path (the value of option `opt`) into *out, NUL-terminated, and checks it holds
 * a PEM block whose label ends with `label` ("CERTIFICATE", "PRIVATE KEY"). */
static int read_pem(const char *opt, const char *path, const char *label, char **out, size_t *len,
                    kvs_err *err)
{
    *out = NULL;
    if (!path[0])
        return kvs_err_set(err, KVS_EINVAL, "%s: empty path", opt);
    int rc = kvs_file_read_text(opt, path, PEM_MAX, out, len, err);
    if (rc)
        return rc;
    char *buf = *out;
    size_t n = *len;
    *out = NULL;
    char end[64];
    snprintf(end, sizeof end, "%s-----", label);
    /* Some "-----BEGIN ...<label>-----" line (a key file may start with EC PARAMETERS). */
    bool found = false;
    for (const char *b = strstr(buf, "-----BEGIN "); b && !found;
         b = strstr(b + 1, "-----BEGIN ")) {
        const char *eol = strchr(b, '\n');
        size_t line = eol ? (size_t)(eol - b) : strlen(b);
        while (line && (b[line - 1] == '\r' || b[line - 1] == ' '))
            line--;
        found = line >= strlen(end) && memcmp(b + line - strlen(end), end, strlen(end)) == 0;
    }
    if (!found) {
        kvs_file_free_secret(buf, n); /* it may have been a key */
        return kvs_err_set(err, KVS_EINVAL, "%s: '%s' holds no PEM %s (-----BEGIN ...%s)", opt,
                           path, label, end);
    }
    *out = buf;
    *len = n;
    return 0;
}

int kvs__tls_credentials(const kvs_client_opts *o, grpc_channel_credentials **out, kvs_err *err)
{
    *out = NULL;
    if (!o->tls_ca && !o->tls_cert && !o->tls_key && !o->tls_server_name) {
        *out = grpc_insecure_credentials_create();
        return *out ? 0
                    : kvs_err_set(err, KVS_EINTERNAL,
                                  "connect: grpc_insecure_credentials_create failed");
    }
    if (!o->tls_cert != !o->tls_key)
        return kvs_err_set(err, KVS_EINVAL, "%s: set without %s (a client certificate needs both)",
                           o->tls_cert ? "tls_cert" : "tls_key",
                           o->tls_cert ? "tls_key" : "tls_cert");
    if (o->tls_server_name && !o->tls_server_name[0])
        return kvs_err_set(err, KVS_EINVAL, "tls_server_name: empty");
    char *ca = NULL, *cert = NULL, *key = NULL;
    size_t ca_len = 0, cert_len = 0, key_len = 0;
    int rc = 0;
    if (o->tls_ca)
        rc = read_pem("tls_ca", o->tls_ca, "CERTIFICATE", &ca, &ca_len, err);
    if (!rc && o->tls_cert)
        rc = read_pem("tls_cert", o->tls_cert, "CERTIFICATE", &cert, &cert_len, err);
    if (!rc && o->tls_key)
        rc = read_pem("tls_key", o->tls_key, "PRIVATE KEY", &key, &key_len, err);
    if (!rc) {
        grpc_ssl_pem_key_cert_pair pair = {.private_key = key, .cert_chain = cert};
        /* No tls_ca: gRPC's default roots (GRPC_DEFAULT_SSL_ROOTS_FILE_PATH, else the
         * system's), for a daemon with a publicly signed certificate. gRPC copies the
         * PEM text. */
        *out = grpc_ssl_credentials_create_ex(ca, cert ? &pair : NULL, NULL, NULL);
        if (!*out)
            rc = kvs_err_set(err, KVS_EINTERNAL, "connect: grpc_ssl_credentials_create_ex failed");
    }
    kvs_file_free_secret(key, key_len);
    free(cert);
    free(ca);
    return rc;
}
