/* Bearer-token checks (DESIGN §9). The daemon keeps SHA-256 digests of
 * "Bearer <token>" for its tokens, never compares the secret itself: a presented
 * `authorization` value is hashed and its digest compared with each in constant time
 * (CRYPTO_memcmp), so neither the time taken nor an early exit tells a client how long the
 * token is or how much of it matched. tests/unit/test_auth.c runs the check under
 * valgrind with the tokens and their digests marked undefined: a branch on them fails it.
 *
 * Threading: immutable after create; every function is thread-safe.
 */
#ifndef KVS_DAEMON_AUTH_H
#define KVS_DAEMON_AUTH_H

#include <stdbool.h>
#include <stddef.h>

typedef struct kvs_auth kvs_auth;

enum {
    KVS_AUTH_CLIENT = 1, /* the data-path token (--token) */
    KVS_AUTH_ADMIN = 2,  /* the admin token (--admin-token) */
};

/* Digests of the client and admin tokens (client, admin: bytes and length, borrowed;
 * length 0 = no such token). Small fixed allocation: aborts when out of memory. */
kvs_auth *kvs_auth_create(const char *client, size_t client_len, const char *admin,
                          size_t admin_len);
void kvs_auth_destroy(kvs_auth *a);

bool kvs_auth_has_client(const kvs_auth *a);
bool kvs_auth_has_admin(const kvs_auth *a);

/* The roles (KVS_AUTH_* bits) an `authorization` metadata value (borrowed) grants: the
 * bits of the configured tokens whose "Bearer <token>" equals it. Constant time in the
 * tokens; linear in len. */
unsigned kvs_auth_roles(const kvs_auth *a, const void *value, size_t len);

/* Tests: the bytes derived from the tokens (the digests), to mark them secret. */
void kvs_auth_test_secret(kvs_auth *a, void **bytes, size_t *len);

#endif
