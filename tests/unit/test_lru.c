/* storage/lru: order of eviction, touch, removal from the middle. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "storage/lru.h"

static void test_order_and_touch(void **state)
{
    kvs_lru lru;
    kvs_lru_node n[4];
    kvs_lru_init(&lru);
    assert_null(kvs_lru_oldest(&lru));
    for (int i = 0; i < 4; i++)
        kvs_lru_push(&lru, &n[i]);
    assert_int_equal(lru.count, 4);
    assert_ptr_equal(kvs_lru_oldest(&lru), &n[0]);

    kvs_lru_touch(&lru, &n[0]); /* 0 becomes the newest: 1 is now the oldest */
    assert_ptr_equal(kvs_lru_oldest(&lru), &n[1]);

    /* Walk oldest -> newest: 1, 2, 3, 0. */
    kvs_lru_node *expect[] = {&n[1], &n[2], &n[3], &n[0]};
    kvs_lru_node *it = kvs_lru_oldest(&lru);
    for (int i = 0; i < 4; i++, it = kvs_lru_newer(&lru, it))
        assert_ptr_equal(it, expect[i]);
    assert_null(it);

    kvs_lru_remove(&lru, &n[2]);
    assert_false(kvs_lru_linked(&n[2]));
    assert_true(kvs_lru_linked(&n[3]));
    assert_int_equal(lru.count, 3);
    assert_ptr_equal(kvs_lru_newer(&lru, &n[1]), &n[3]);
    kvs_lru_remove(&lru, &n[1]);
    kvs_lru_remove(&lru, &n[3]);
    kvs_lru_remove(&lru, &n[0]);
    assert_null(kvs_lru_oldest(&lru));
    assert_int_equal(lru.count, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_order_and_touch)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
