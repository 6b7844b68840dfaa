/* Token files and the tenant file: see tokens.h. Buffers holding a token are cleansed
 * before they are freed or go out of scope. */
#include "daemon/tokens.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <openssl/crypto.h>

#include "daemon/auth.h"
#include "daemon/log.h"
#include "gpu/base/mem.h"
#include "gpu/codec/spec.h"

bool kvs_tokens_from_files(const kvs_config *cfg)
{
    return cfg->token_file[0] || cfg->admin_token_file[0] || cfg->tenant_tokens[0];
}

/* Warns when the open file f (path, for key) can be read by group or others: it holds
 * secrets, and a token anyone on the host can read authenticates anyone. */
static void check_mode(FILE *f, const char *key, const char *path)
{
    struct stat st;
    if (fstat(fileno(f), &st) == 0 && (st.st_mode & (S_IRGRP | S_IROTH)))
        kvs_log(KVS_LOG_WARN, "%s: '%s' is readable by %s (mode %03o): it holds tokens; chmod 600",
                key, path, (st.st_mode & S_IROTH) ? "others" : "its group",
                (unsigned)(st.st_mode & 0777));
}

static FILE *open_file(const char *key, const char *path, kvs_err *err)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        kvs_err_set(err, KVS_EIO, "%s: cannot read '%s': %s", key, path, strerror(errno));
        return NULL;
    }
    check_mode(f, key, path);
    return f;
}

/* Reads the token in path into buf (cap >= KVS_TOKEN_MAX + 3): *len bytes, the trailing
 * newline dropped. */
static int read_token_file(const char *key, const char *path, char *buf, size_t cap, size_t *len,
                           kvs_err *err)
{
    FILE *f = open_file(key, path, err);
    if (!f)
        return err->code;
    size_t n = fread(buf, 1, cap, f);
    int rd_err = ferror(f);
    fclose(f);
    if (rd_err)
        return kvs_err_set(err, KVS_EIO, "%s: cannot read '%s': read error", key, path);
    if (n == cap)
        return kvs_err_set(err, KVS_EINVAL, "%s: '%s' is longer than a token (%d bytes at most)",
                           key, path, KVS_TOKEN_MAX);
    if (n && buf[n - 1] == '\n')
        n--;
    if (n && buf[n - 1] == '\r')
        n--;
    if (n == 0)
        return kvs_err_set(err, KVS_EINVAL, "%s: '%s' is empty (the file must hold the token)", key,
                           path);
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)buf[i];
        if (ch < 0x20 || ch == 0x7f) /* a header value cannot carry it; likely not a token */
            return kvs_err_set(err, KVS_EINVAL,
                               "%s: '%s' holds a %s after the token's first byte; it must hold "
                               "only the token",
                               key, path, ch == '\n' ? "second line" : "control character");
    }
    *len = n;
    return 0;
}

/* One token: the value of key `value_key` or, if its file key is set, the file's. */
static int token_of(const char *file_key, const char *path, const char *value, char *buf,
                    size_t cap, size_t *len, kvs_err *err)
{
    if (path[0])
        return read_token_file(file_key, path, buf, cap, len, err);
    *len = strlen(value);
    memcpy(buf, value, *len);
    return 0;
}

/* Reads the tenant file into a's table. */
static int load_tenants(kvs_auth *a, const char *path, kvs_err *err)
{
    FILE *f = open_file("tenant_tokens", path, err);
    if (!f)
        return err->code;
    /* On even with no line: an emptied file revokes every tenant but keeps the data path
     * closed to callers without a token. */
    kvs_auth_tenants_on(a);
    char *line = NULL;
    size_t cap = 0;
    ssize_t got;
    unsigned lineno = 0;
    int rc = 0;
    while (rc == 0 && (got = getline(&line, &cap, f)) >= 0) {
        lineno++;
        if (got > KVS_TOKEN_MAX + 2 * 64) {
            rc = kvs_err_set(err, KVS_EINVAL, "%s:%u: tenant_tokens: line too long", path, lineno);
            break;
        }
        const char *sep = " \t\r\n";
        char *save = NULL;
        char *ns = strtok_r(line, sep, &save);
        if (!ns || ns[0] == '#')
            continue;
        char *tok = strtok_r(NULL, sep, &save);
        char *extra = tok ? strtok_r(NULL, sep, &save) : NULL;
        if (!kvs_spec_name_ok(ns))
            rc = kvs_err_set(err, KVS_EINVAL,
                             "%s:%u: tenant_tokens: namespace '%.64s' is not 1..64 characters of "
                             "[A-Za-z0-9._-] (not \".\" or \"..\")",
                             path, lineno, ns);
        else if (!tok)
            rc = kvs_err_set(err, KVS_EINVAL,
                             "%s:%u: tenant_tokens: namespace '%s' has no token (want NAMESPACE "
                             "TOKEN)",
                             path, lineno, ns);
        else if (extra && extra[0] != '#')
            rc = kvs_err_set(err, KVS_EINVAL,
                             "%s:%u: tenant_tokens: more than two fields (want NAMESPACE TOKEN; a "
                             "token has no blanks)",
                             path, lineno);
        else if (strlen(tok) > KVS_TOKEN_MAX)
            rc = kvs_err_set(err, KVS_EINVAL, "%s:%u: tenant_tokens: token longer than %d bytes",
                             path, lineno, KVS_TOKEN_MAX);
        else
            kvs_auth_add_tenant(a, ns, tok, strlen(tok)); /* the name was checked */
        OPENSSL_cleanse(line, cap);
    }
    if (rc == 0 && ferror(f))
        rc = kvs_err_set(err, KVS_EIO, "tenant_tokens: cannot read '%s': read error", path);
    if (line)
        OPENSSL_cleanse(line, cap);
    free(line);
    fclose(f);
    return rc;
}

int kvs_tokens_load(const kvs_config *cfg, kvs_auth **out, kvs_err *err)
{
    enum { CAP = KVS_TOKEN_MAX + 3 };
    char *client = kvs_xmalloc(CAP), *admin = kvs_xmalloc(CAP);
    size_t client_len = 0, admin_len = 0;
    *out = NULL;
    int rc = token_of("token_file", cfg->token_file, cfg->token, client, CAP, &client_len, err);
    if (rc == 0)
        rc = token_of("admin_token_file", cfg->admin_token_file, cfg->admin_token, admin, CAP,
                      &admin_len, err);
    kvs_auth *a = NULL;
    if (rc == 0) {
        a = kvs_auth_create(client, client_len, admin, admin_len);
        if (cfg->tenant_tokens[0] && (rc = load_tenants(a, cfg->tenant_tokens, err))) {
            kvs_auth_destroy(a);
            a = NULL;
        }
    }
    OPENSSL_cleanse(client, CAP);
    OPENSSL_cleanse(admin, CAP);
    free(client);
    free(admin);
    *out = a;
    return rc;
}
