/* Bearer-token checks: see auth.h. */
#include "daemon/auth.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/sha.h>

#include "gpu/base/mem.h"

#define PREFIX "Bearer "

struct kvs_auth {
    uint8_t client[SHA256_DIGEST_LENGTH], admin[SHA256_DIGEST_LENGTH];
    bool has_client, has_admin;
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

void kvs_auth_destroy(kvs_auth *a)
{
    if (a)
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

unsigned kvs_auth_roles(const kvs_auth *a, const void *value, size_t len)
{
    uint8_t d[SHA256_DIGEST_LENGTH];
    SHA256(value, len, d);
    /* No branch on the comparisons: both are computed, and == yields a value. */
    unsigned client = (unsigned)(CRYPTO_memcmp(d, a->client, sizeof d) == 0);
    unsigned admin = (unsigned)(CRYPTO_memcmp(d, a->admin, sizeof d) == 0);
    return (client & (unsigned)a->has_client) * KVS_AUTH_CLIENT |
           (admin & (unsigned)a->has_admin) * KVS_AUTH_ADMIN;
}

void kvs_auth_test_secret(kvs_auth *a, void **bytes, size_t *len)
{
    *bytes = a->client; /* client then admin: adjacent arrays of one struct */
    *len = sizeof a->client + sizeof a->admin;
}
