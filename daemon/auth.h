/* Bearer-token checks (DESIGN §9). The daemon keeps SHA-256 digests of
 * "Bearer <token>" for its tokens, never compares the secret itself: a presented
 * `authorization` value is hashed and its digest compared with each in constant time
 * (CRYPTO_memcmp), so neither the time taken nor an early exit tells a client how long the
 * token is or how much of it matched. tests/unit/test_auth.c runs the check under
 * valgrind with the tokens and their digests marked undefined: a branch on them fails it.
 *
 * Tenant tokens (README "Tenants"): a table of (namespace, token digest) grants, one row
 * per line of the tenant file; one token may appear on several rows. Every check walks
 * the whole table and combines the comparisons without an early exit, so the time taken
 * depends on the table's size only, never on which row (if any) matched. Namespace names
 * are not secret: comparing them may branch.
 *
 * Threading: built by create + add_tenant on one thread, then published (kvs_server.auth)
 * and immutable: every other function is thread-safe.
 */
#ifndef KVS_DAEMON_AUTH_H
#define KVS_DAEMON_AUTH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct kvs_auth kvs_auth;

enum {
    KVS_AUTH_CLIENT = 1, /* the data-path token (--token) */
    KVS_AUTH_ADMIN = 2,  /* the admin token (--admin-token) */
    KVS_AUTH_TENANT = 4, /* a tenant token: some namespaces only (kvs_auth_grants) */
};

#define KVS_AUTH_DIGEST_LEN 32 /* SHA-256 of the presented authorization value */

/* Digests of the client and admin tokens (client, admin: bytes and length, borrowed;
 * length 0 = no such token). Small fixed allocation: aborts when out of memory. */
kvs_auth *kvs_auth_create(const char *client, size_t client_len, const char *admin,
                          size_t admin_len);
/* Grants namespace ns (a checked name, copied; at most 64 bytes) to the token tok
 * (tok_len > 0 bytes, borrowed). Before the object is published only. Small allocation:
 * aborts when out of memory. Returns false if ns is too long (nothing added). */
bool kvs_auth_add_tenant(kvs_auth *a, const char *ns, const char *tok, size_t tok_len);
/* Tenant mode on, even with no row (an emptied tenant file): calls then need a token.
 * kvs_auth_add_tenant turns it on too. Before the object is published only. */
void kvs_auth_tenants_on(kvs_auth *a);
void kvs_auth_destroy(kvs_auth *a);

bool kvs_auth_has_client(const kvs_auth *a);
bool kvs_auth_has_admin(const kvs_auth *a);
bool kvs_auth_has_tenants(const kvs_auth *a);     /* tenant mode on */
size_t kvs_auth_tenant_grants(const kvs_auth *a); /* rows of the tenant table */

/* The digest the checks below take: of an `authorization` metadata value (borrowed,
 * len bytes). A call keeps this (not the auth object) to check grants later. */
void kvs_auth_digest(const void *value, size_t len, uint8_t out[KVS_AUTH_DIGEST_LEN]);

/* The roles (KVS_AUTH_* bits) a presented value's digest grants: the bits of the
 * configured tokens it equals, KVS_AUTH_TENANT if it equals any tenant token. Constant
 * time in the tokens. */
unsigned kvs_auth_roles_digest(const kvs_auth *a, const uint8_t d[KVS_AUTH_DIGEST_LEN]);
/* kvs_auth_roles_digest of kvs_auth_digest(value, len). Linear in len. */
unsigned kvs_auth_roles(const kvs_auth *a, const void *value, size_t len);

/* True if the tenant table grants namespace ns (NUL-terminated) to the token whose
 * digest is d. Constant time in the tokens: every row is compared. */
bool kvs_auth_grants(const kvs_auth *a, const uint8_t d[KVS_AUTH_DIGEST_LEN], const char *ns);

/* Tests: the bytes derived from the tokens (the digests), to mark them secret: the
 * client and admin digests, and the tenant table's digests (one array, *len bytes). */
void kvs_auth_test_secret(kvs_auth *a, void **bytes, size_t *len);
void kvs_auth_test_tenant_secret(kvs_auth *a, void **bytes, size_t *len);

#endif
