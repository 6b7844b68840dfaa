/* storage/index: identity, replacement, removal, growth and namespace separation. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "storage/index.h"

static void test_insert_find_remove(void **state)
{
    kvs_index *ix = kvs_index_create();
    kvs_index_node a, b, a2;
    kvs_index_node_init(&a, 1, "alpha", 5);
    kvs_index_node_init(&b, 1, "beta", 4);
    assert_null(kvs_index_insert(ix, &a));
    assert_null(kvs_index_insert(ix, &b));
    assert_int_equal(kvs_index_count(ix), 2);
    assert_ptr_equal(kvs_index_find(ix, 1, "alpha", 5), &a);
    assert_ptr_equal(kvs_index_find(ix, 1, "beta", 4), &b);
    assert_null(kvs_index_find(ix, 1, "alph", 4)); /* prefix is another key */
    assert_null(kvs_index_find(ix, 1, "gamma", 5));

    /* Same identity replaces and hands the old node back. */
    kvs_index_node_init(&a2, 1, "alpha", 5);
    assert_ptr_equal(kvs_index_insert(ix, &a2), &a);
    assert_int_equal(kvs_index_count(ix), 2);
    assert_ptr_equal(kvs_index_find(ix, 1, "alpha", 5), &a2);

    kvs_index_remove(ix, &a2);
    assert_null(kvs_index_find(ix, 1, "alpha", 5));
    assert_int_equal(kvs_index_count(ix), 1);
    kvs_index_destroy(ix);
}

static void test_namespaces_are_separate(void **state)
{
    kvs_index *ix = kvs_index_create();
    kvs_index_node a, b;
    kvs_index_node_init(&a, 1, "same", 4);
    kvs_index_node_init(&b, 2, "same", 4);
    assert_null(kvs_index_insert(ix, &a));
    assert_null(kvs_index_insert(ix, &b)); /* not a replacement: other namespace */
    assert_ptr_equal(kvs_index_find(ix, 1, "same", 4), &a);
    assert_ptr_equal(kvs_index_find(ix, 2, "same", 4), &b);
    assert_null(kvs_index_find(ix, 3, "same", 4));
    kvs_index_destroy(ix);
}

static void test_growth_keeps_every_node(void **state)
{
    enum { N = 20000 }; /* well past the initial 1024 buckets: several doublings */
    kvs_index *ix = kvs_index_create();
    kvs_index_node *nodes = calloc(N, sizeof *nodes);
    assert_non_null(nodes);
    char key[32];
    for (int i = 0; i < N; i++) {
        int n = snprintf(key, sizeof key, "key-%d", i);
        kvs_index_node_init(&nodes[i], (uint32_t)(i % 3), key, (size_t)n);
        assert_null(kvs_index_insert(ix, &nodes[i]));
    }
    assert_int_equal(kvs_index_count(ix), N);
    for (int i = 0; i < N; i++) {
        int n = snprintf(key, sizeof key, "key-%d", i);
        assert_ptr_equal(kvs_index_find(ix, (uint32_t)(i % 3), key, (size_t)n), &nodes[i]);
    }
    for (int i = 0; i < N; i += 2)
        kvs_index_remove(ix, &nodes[i]);
    assert_int_equal(kvs_index_count(ix), N / 2);
    for (int i = 0; i < N; i++) {
        int n = snprintf(key, sizeof key, "key-%d", i);
        kvs_index_node *f = kvs_index_find(ix, (uint32_t)(i % 3), key, (size_t)n);
        if (i % 2)
            assert_ptr_equal(f, &nodes[i]);
        else
            assert_null(f);
    }
    free(nodes);
    kvs_index_destroy(ix);
}

static void test_binary_keys(void **state)
{
    kvs_index *ix = kvs_index_create();
    uint8_t k1[64], k2[64];
    memset(k1, 0, sizeof k1);
    memset(k2, 0, sizeof k2);
    k2[63] = 1; /* differ only in the last of 64 bytes */
    kvs_index_node a, b;
    kvs_index_node_init(&a, 7, k1, 64);
    kvs_index_node_init(&b, 7, k2, 64);
    assert_null(kvs_index_insert(ix, &a));
    assert_null(kvs_index_insert(ix, &b));
    assert_ptr_equal(kvs_index_find(ix, 7, k1, 64), &a);
    assert_ptr_equal(kvs_index_find(ix, 7, k2, 64), &b);
    assert_null(kvs_index_find(ix, 7, k1, 63));
    kvs_index_destroy(ix);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_insert_find_remove),
        cmocka_unit_test(test_namespaces_are_separate),
        cmocka_unit_test(test_growth_keeps_every_node),
        cmocka_unit_test(test_binary_keys),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
