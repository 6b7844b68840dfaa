/* daemon/auth: which roles an authorization value grants, and that the check never
 * branches on a token. Run plain, it checks the roles; run under valgrind (ctest
 * unit.test_auth_consttime), the tokens (bytes and lengths) and the digests made of them
 * are marked undefined once the handle exists, so memcheck fails the run at any branch or
 * index of a check that depends on a secret (the technique of Adam Langley's ctgrind).
 * The comparison it replaced read the configured token at every call and returned early
 * on a length mismatch (issue 10, fault 7); both are caught. */
#include <setjmp.h>
#include <stdarg.h>
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

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roles),
        cmocka_unit_test(test_unset_tokens),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
