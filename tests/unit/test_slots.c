/* storage/slots: slot addresses never overlap and stay inside the region, slabs are shared
 * between classes and given back when empty, capacity and ENOSPC are exact. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "storage/slots.h"

#define BASE ((uintptr_t)0x7000000000ull) /* never dereferenced: slots.c is bookkeeping */

static void test_fill_free_refill(void **state)
{
    kvs_slots *s;
    kvs_err err;
    /* 10.5 slabs of 1000 bytes: capacity rounds down to 10 slabs. */
    assert_int_equal(kvs_slots_create(BASE, 10500, 1000, &s, &err), 0);
    assert_int_equal(kvs_slots_capacity(s), 10000);
    /* Class 1: 300-byte slots, 3 per slab (100 bytes of each slab unused). */
    uintptr_t a[40];
    int n = 0;
    while (kvs_slots_alloc(s, 1, 300, &a[n], &err) == 0)
        n++;
    assert_int_equal(err.code, KVS_ENOSPC);
    assert_int_equal(n, 30);
    assert_int_equal(kvs_slots_used(s), 9000);
    assert_int_equal(kvs_slots_free_slabs(s), 0);
    assert_false(kvs_slots_can_alloc(s, 2, 100));
    /* Every slot inside the region, inside one slab, no two overlapping. */
    static unsigned char owner[10000];
    memset(owner, 0, sizeof owner);
    for (int i = 0; i < n; i++) {
        uint64_t off = a[i] - BASE;
        assert_true(off + 300 <= 10000);
        assert_int_equal(off / 1000, (off + 299) / 1000);
        for (int b = 0; b < 300; b++) {
            assert_int_equal(owner[off + b], 0);
            owner[off + b] = 1;
        }
    }
    /* Free one slot: class 1 reuses it, class 2 still has no slab. */
    kvs_slots_free(s, a[4]);
    assert_false(kvs_slots_can_alloc(s, 2, 100));
    assert_true(kvs_slots_can_alloc(s, 1, 300));
    uintptr_t again;
    assert_int_equal(kvs_slots_alloc(s, 1, 300, &again, &err), 0);
    assert_int_equal(again, a[4]);
    /* Empty one slab entirely: it goes back to the free list and class 2 gets it. */
    uint64_t slab0 = (a[0] - BASE) / 1000;
    int freed = 0;
    for (int i = 0; i < n; i++)
        if ((a[i] - BASE) / 1000 == slab0) {
            kvs_slots_free(s, a[i]);
            a[i] = 0;
            freed++;
        }
    assert_int_equal(freed, 3);
    assert_int_equal(kvs_slots_free_slabs(s), 1);
    uintptr_t small[10];
    for (int i = 0; i < 10; i++)
        assert_int_equal(kvs_slots_alloc(s, 2, 100, &small[i], &err), 0);
    for (int i = 0; i < 10; i++)
        assert_int_equal((small[i] - BASE) / 1000, slab0);
    assert_int_not_equal(kvs_slots_alloc(s, 2, 100, &again, &err), 0);
    assert_int_equal(kvs_slots_used(s), 9000 - 900 + 1000);
    kvs_slots_destroy(s);
}

static void test_bad_sizes(void **state)
{
    kvs_slots *s;
    kvs_err err;
    uintptr_t a;
    assert_int_not_equal(kvs_slots_create(BASE, 999, 1000, &s, &err), 0);
    assert_int_equal(kvs_slots_create(BASE, 4000, 1000, &s, &err), 0);
    assert_int_equal(kvs_slots_alloc(s, 1, 1001, &a, &err), KVS_EINVAL);
    assert_int_equal(kvs_slots_alloc(s, 1, 0, &a, &err), KVS_EINVAL);
    assert_int_equal(kvs_slots_alloc(s, 1, 500, &a, &err), 0);
    /* A class keeps its slot size while it holds slabs... */
    assert_int_equal(kvs_slots_alloc(s, 1, 400, &a, &err), KVS_EINVAL);
    kvs_slots_free(s, BASE);
    /* ...and may change it once it holds none. */
    assert_int_equal(kvs_slots_alloc(s, 1, 400, &a, &err), 0);
    assert_int_equal(kvs_slots_used(s), 400);
    kvs_slots_destroy(s);
}

/* Random alloc/free against a shadow map: no overlap, exact accounting. */
static void test_random(void **state)
{
    kvs_slots *s;
    kvs_err err;
    enum { SLAB = 4096, SLABS = 64, LIVE = 2000 };
    assert_int_equal(kvs_slots_create(BASE, SLAB * SLABS, SLAB, &s, &err), 0);
    static const uint64_t sizes[4] = {4096, 1000, 300, 64};
    static uint8_t owner[SLAB * SLABS];
    memset(owner, 0, sizeof owner);
    uintptr_t live[LIVE];
    int cls_of[LIVE], nlive = 0;
    uint64_t used = 0;
    srand(7);
    for (int step = 0; step < 100000; step++) {
        if (nlive < LIVE && (rand() % 3 || nlive == 0)) {
            int c = rand() % 4;
            uintptr_t a;
            if (kvs_slots_alloc(s, (uint32_t)c, sizes[c], &a, &err) != 0) {
                assert_int_equal(err.code, KVS_ENOSPC);
                continue;
            }
            uint64_t off = a - BASE;
            assert_true(off + sizes[c] <= SLAB * SLABS);
            for (uint64_t b = 0; b < sizes[c]; b++) {
                assert_int_equal(owner[off + b], 0);
                owner[off + b] = (uint8_t)(c + 1);
            }
            live[nlive] = a;
            cls_of[nlive++] = c;
            used += sizes[c];
        } else {
            int i = rand() % nlive;
            uint64_t off = live[i] - BASE;
            memset(owner + off, 0, sizes[cls_of[i]]);
            used -= sizes[cls_of[i]];
            kvs_slots_free(s, live[i]);
            live[i] = live[--nlive];
            cls_of[i] = cls_of[nlive];
        }
        assert_int_equal(kvs_slots_used(s), used);
    }
    while (nlive) {
        kvs_slots_free(s, live[--nlive]);
    }
    assert_int_equal(kvs_slots_used(s), 0);
    assert_int_equal(kvs_slots_free_slabs(s), SLABS);
    kvs_slots_destroy(s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fill_free_refill),
        cmocka_unit_test(test_bad_sizes),
        cmocka_unit_test(test_random),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
