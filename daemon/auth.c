/* Bearer-token checks: see auth.h. */
#include "daemon/auth.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/sha.h>

#include "gpu/base/mem.h"

#define PREFIX "Bearer "
#define NS_MAX 64 /* kvs_wire_check_name's limit */

_Static_assert(KVS_AUTH_DIGEST_LEN == SHA256_DIGEST_LENGTH, "the digest is SHA-256");

struct kvs_auth {
    uint8_t client[SHA256_DIGEST_LENGTH], admin[SHA256_DIGEST_LENGTH];
    bool has_client, has_admin;
    /* The tenant table: row i grants ns[i] to the token whose digest is tdig[i]. The
     * digests are one array so that the tests can mark them all secret at once. */
    uint8_t (*tdig)[SHA256_DIGEST_LENGTH];
    char (*ns)[NS_MAX + 1];
    size_t n, cap;
    bool tenants; /* tenant mode (kvs_auth_tenants_on) */
};

static void digest_token(const char *tok, size_t len, uint8_t out[SHA256_DIGEST_LENGTH])
{
    size_t n = sizeof PREFIX - 1 + len;
    char *v = kvs_xmalloc(n); /* small: a token from the config */
    memcpy(v, PREFIX, sizeof PREFIX - 1);
    memcpy(v + sizeof PREFIX - 1, tok, len);
    SHA256((const unsigned char *)v, n, out);
    OPENSSL_cleanse(v, n);
    free(v);
}

kvs_auth *kvs_auth_create(const char *client, size_t client_len, const char *admin,
                          size_t admin_len)
{
    kvs_auth *a = kvs_xcalloc(1, sizeof *a);
    if ((a->has_client = client_len > 0))
        digest_token(client, client_len, a->client);
    if ((a->has_admin = admin_len > 0))
        digest_token(admin, admin_len, a->admin);
    return a;
}

bool kvs_auth_add_tenant(kvs_auth *a, const char *ns, const char *tok, size_t tok_len)
{
    size_t nl = strlen(ns);
    if (nl == 0 || nl > NS_MAX || tok_len == 0)
        return false;
    if (a->n == a->cap) {
        size_t cap = a->cap ? 2 * a->cap : 8;
        a->tdig = kvs_xrealloc(a->tdig, cap * sizeof *a->tdig);
        a->ns = kvs_xrealloc(a->ns, cap * sizeof *a->ns);
        a->cap = cap;
    }
    digest_token(tok, tok_len, a->tdig[a->n]);
    memcpy(a->ns[a->n], ns, nl + 1);
    a->n++;
    a->tenants = true;
    return true;
}

void kvs_auth_tenants_on(kvs_auth *a)
{
    a->tenants = true;
}

void kvs_auth_destroy(kvs_auth *a)
{
    if (!a)
        return;
    if (a->tdig)
        OPENSSL_cleanse(a->tdig, a->cap * sizeof *a->tdig);
    free(a->tdig);
    free(a->ns);
    OPENSSL_cleanse(a, sizeof *a);
    free(a);
}

bool kvs_auth_has_client(const kvs_auth *a)
{
    return a->has_client;
}

bool kvs_auth_has_admin(const kvs_auth *a)
{
    return a->has_admin;
}

bool kvs_auth_has_tenants(const kvs_auth *a)
{
    return a->tenants;
}

size_t kvs_auth_tenant_grants(const kvs_auth *a)
{
    return a->n;
}

void kvs_auth_digest(const void *value, size_t len, uint8_t out[KVS_AUTH_DIGEST_LEN])
{
    SHA256(value, len, out);
}

unsigned kvs_auth_roles_digest(const kvs_auth *a, const uint8_t d[KVS_AUTH_DIGEST_LEN])
{
    /* No branch on the comparisons: all are computed, and == yields a value. */
    unsigned client = (unsigned)(CRYPTO_memcmp(d, a->client, SHA256_DIGEST_LENGTH) == 0);
    unsigned admin = (unsigned)(CRYPTO_memcmp(d, a->admin, SHA256_DIGEST_LENGTH) == 0);
    unsigned tenant = 0;
    for (size_t i = 0; i < a->n; i++) /* every row, whatever matched before */
        tenant |= (unsigned)(CRYPTO_memcmp(d, a->tdig[i], SHA256_DIGEST_LENGTH) == 0);
    return (client & (unsigned)a->has_client) * KVS_AUTH_CLIENT |
           (admin & (unsigned)a->has_admin) * KVS_AUTH_ADMIN | tenant * KVS_AUTH_TENANT;
}

unsigned kvs_auth_roles(const kvs_auth *a, const void *value, size_t len)
{
    uint8_t d[SHA256_DIGEST_LENGTH];
    kvs_auth_digest(value, len, d);
    return kvs_auth_roles_digest(a, d);
}

bool kvs_auth_grants(const kvs_auth *a, const uint8_t d[KVS_AUTH_DIGEST_LEN], const char *ns)
{
    unsigned granted = 0;
    for (size_t i = 0; i < a->n; i++) {
        /* The name test may branch (names are public); the digest test yields a value
         * that is only combined, so neither the row nor the match shows in the time. */
        unsigned name = (unsigned)(strcmp(ns, a->ns[i]) == 0);
        unsigned tok = (unsigned)(CRYPTO_memcmp(d, a->tdig[i], SHA256_DIGEST_LENGTH) == 0);
        granted |= name & tok;
    }
    return granted != 0;
}

void kvs_auth_test_secret(kvs_auth *a, void **bytes, size_t *len)
{
    *bytes = a->client; /* client then admin: adjacent arrays of one struct */
    *len = sizeof a->client + sizeof a->admin;
}

void kvs_auth_test_tenant_secret(kvs_auth *a, void **bytes, size_t *len)
{
    *bytes = a->tdig;
    *len = a->n * sizeof *a->tdig;
}
