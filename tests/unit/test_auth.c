/* daemon/auth: which roles an authorization value grants, and that the check never
 * branches on a token. Run plain, it checks the roles; run under valgrind (ctest
 * unit.test_auth_consttime), the tokens (bytes and lengths) and the digests made of them
 * are marked undefined once the handle exists, so memcheck fails the run at any branch or
 * index of a check that depends on a secret (the technique of Adam Langley's ctgrind).
 * The comparison it replaced read the configured token at every call and returned early
 * on a length mismatch (issue 10, fault 7); both are caught. The tenant table (issue 14)
 * is checked the same way: its digests are marked undefined too. */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>
#include <valgrind/memcheck.h>

#include "daemon/auth.h"

/* The roles, made defined for the assertions (the one branch the caller must take). */
static unsigned roles_of(const kvs_auth *a, const char *value)
{
    unsigned r = kvs_auth_roles(a, value, strlen(value));
    VALGRIND_MAKE_MEM_DEFINED(&r, sizeof r);
    return r;
}

static void test_roles(void **state)
{
    (void)state;
    char client[] = "s3cret-client", admin[] = "adm1n";
    kvs_auth *a = kvs_auth_create(client, strlen(client), admin, strlen(admin));
    /* Secret from here on (deriving the digests at start may look at the tokens; no
     * check of a presented value may). */
    void *secret;
    size_t n;
    kvs_auth_test_secret(a, &secret, &n);
    VALGRIND_MAKE_MEM_UNDEFINED(secret, n);
    VALGRIND_MAKE_MEM_UNDEFINED(client, sizeof client);
    VALGRIND_MAKE_MEM_UNDEFINED(admin, sizeof admin);
    assert_true(kvs_auth_has_client(a) && kvs_auth_has_admin(a));
    assert_int_equal(roles_of(a, "Bearer s3cret-client"), KVS_AUTH_CLIENT);
    assert_int_equal(roles_of(a, "Bearer adm1n"), KVS_AUTH_ADMIN);
    assert_int_equal(roles_of(a, "Bearer s3cret-clien"), 0);   /* a prefix */
    assert_int_equal(roles_of(a, "Bearer s3cret-client!"), 0); /* longer */
    assert_int_equal(roles_of(a, "Bearer S3cret-client"), 0);
    assert_int_equal(roles_of(a, "bearer s3cret-client"), 0);
    assert_int_equal(roles_of(a, "s3cret-client"), 0);
    assert_int_equal(roles_of(a, ""), 0);
    kvs_auth_destroy(a);
}

static void test_unset_tokens(void **state)
{
    (void)state;
    kvs_auth *a = kvs_auth_create("", 0, "tok", 3);
    assert_false(kvs_auth_has_client(a));
    assert_true(kvs_auth_has_admin(a));
    /* "Bearer " is the digest of an empty token, which must grant nothing. */
    assert_int_equal(roles_of(a, "Bearer "), 0);
    assert_int_equal(roles_of(a, "Bearer tok"), KVS_AUTH_ADMIN);
    kvs_auth_destroy(a);
    a = kvs_auth_create(NULL, 0, NULL, 0);
    assert_false(kvs_auth_has_client(a) || kvs_auth_has_admin(a));
    assert_int_equal(roles_of(a, "Bearer "), 0);
    kvs_auth_destroy(a);
}

/* kvs_auth_grants, made defined for the assertions as roles_of. */
static bool grants(const kvs_auth *a, const char *value, const char *ns)
{
    uint8_t d[KVS_AUTH_DIGEST_LEN];
    kvs_auth_digest(value, strlen(value), d);
    bool g = kvs_auth_grants(a, d, ns);
    VALGRIND_MAKE_MEM_DEFINED(&g, sizeof g);
    return g;
}

/* The tenant table: a token reaches exactly the namespaces on its lines; under valgrind
 * the table's digests and the tokens are secret, so a check that stopped at the matching
 * row, or branched on a digest byte, fails the run. */
static void test_tenants(void **state)
{
    (void)state;
    char ta[] = "tenant-a-token", tb[] = "tenant-b-token", admin[] = "adm1n";
    kvs_auth *a = kvs_auth_create(NULL, 0, admin, strlen(admin));
    assert_false(kvs_auth_has_tenants(a));
    assert_true(kvs_auth_add_tenant(a, "a-ns", ta, strlen(ta)));
    assert_true(kvs_auth_add_tenant(a, "b-ns", tb, strlen(tb)));
    assert_true(kvs_auth_add_tenant(a, "a-ns2", ta, strlen(ta))); /* two namespaces */
    assert_false(kvs_auth_add_tenant(a, "", ta, strlen(ta)));
    assert_false(kvs_auth_add_tenant(a, "x", ta, 0));
    assert_true(kvs_auth_has_tenants(a));
    assert_int_equal(kvs_auth_tenant_grants(a), 3);
    void *secret;
    size_t n;
    kvs_auth_test_secret(a, &secret, &n);
    VALGRIND_MAKE_MEM_UNDEFINED(secret, n);
    kvs_auth_test_tenant_secret(a, &secret, &n);
    assert_int_equal(n, 3 * KVS_AUTH_DIGEST_LEN);
    VALGRIND_MAKE_MEM_UNDEFINED(secret, n);
    VALGRIND_MAKE_MEM_UNDEFINED(ta, sizeof ta);
    VALGRIND_MAKE_MEM_UNDEFINED(tb, sizeof tb);

    assert_int_equal(roles_of(a, "Bearer tenant-a-token"), KVS_AUTH_TENANT);
    assert_int_equal(roles_of(a, "Bearer tenant-b-token"), KVS_AUTH_TENANT);
    assert_int_equal(roles_of(a, "Bearer adm1n"), KVS_AUTH_ADMIN);
    assert_int_equal(roles_of(a, "Bearer tenant-a-toke"), 0);
    assert_int_equal(roles_of(a, "tenant-a-token"), 0);

    assert_true(grants(a, "Bearer tenant-a-token", "a-ns"));   /* granted */
    assert_true(grants(a, "Bearer tenant-a-token", "a-ns2"));  /* its second line */
    assert_false(grants(a, "Bearer tenant-a-token", "b-ns"));  /* the other tenant's */
    assert_false(grants(a, "Bearer tenant-a-token", "nope"));  /* no such namespace */
    assert_false(grants(a, "Bearer tenant-a-token", "a-ns3")); /* exact names only */
    assert_false(grants(a, "Bearer tenant-a-token", "a-n"));
    assert_true(grants(a, "Bearer tenant-b-token", "b-ns"));
    assert_false(grants(a, "Bearer tenant-b-token", "a-ns"));
    assert_false(grants(a, "Bearer unknown", "a-ns")); /* unknown token */
    assert_false(grants(a, "Bearer adm1n", "a-ns"));   /* admin is no tenant */
    assert_false(grants(a, "Bearer ", "a-ns"));
    kvs_auth_destroy(a);

    /* Tenant mode with an emptied file: on, and nothing granted. */
    a = kvs_auth_create(NULL, 0, NULL, 0);
    kvs_auth_tenants_on(a);
    assert_true(kvs_auth_has_tenants(a));
    assert_int_equal(roles_of(a, "Bearer tenant-a-token"), 0);
    assert_false(grants(a, "Bearer tenant-a-token", "a-ns"));
    kvs_auth_destroy(a);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roles),
        cmocka_unit_test(test_unset_tokens),
        cmocka_unit_test(test_tenants),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
