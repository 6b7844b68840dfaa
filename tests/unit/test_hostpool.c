/* storage/hostpool: slabs are committed and pinned once, the first time a block lands in
 * them, and unpinned at destroy; blocks are writable, never overlap, are reused after
 * free; a slot wastes at most an eighth; requests over a slab or past the reservation
 * get NULL (the caller mallocs); a failed pin leaves the slab usable, counted. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "storage/hostpool.h"

#define SLAB (1u << 20)

typedef struct pins {
    int pinned, unpinned, fail_next;
    void *last;
} pins;

static int fake_pin(void *ctx, void *addr, size_t bytes, kvs_err *err)
{
    pins *p = ctx;
    assert_int_equal(bytes, SLAB);
    assert_int_equal((uintptr_t)addr % 4096, 0);
    if (p->fail_next) {
        p->fail_next = 0;
        return kvs_err_set(err, KVS_EINTERNAL, "no");
    }
    p->pinned++;
    p->last = addr;
    return 0;
}

static void fake_unpin(void *ctx, void *addr, size_t bytes)
{
    ((pins *)ctx)->unpinned++;
}

static void test_alloc_pin_reuse(void **state)
{
    pins pc = {0};
    kvs_hostpool_opts o = {.max_bytes = 4 * SLAB,
                           .slab_bytes = SLAB,
                           .pin = fake_pin,
                           .unpin = fake_unpin,
                           .ctx = &pc};
    kvs_hostpool *p;
    kvs_err err;
    assert_int_equal(kvs_hostpool_create(&o, &p, &err), 0);
    kvs_hostpool_stats s;
    kvs_hostpool_get_stats(p, &s);
    assert_int_equal(s.reserved, 4 * SLAB);
    assert_int_equal(s.committed, 0); /* nothing committed before it is used */

    /* 100 KB blocks: the slot is the next eighth step (104 KiB... within 1/8). */
    void *a[64];
    int n = 0;
    for (; n < 64; n++) {
        a[n] = kvs_hostpool_alloc(p, 100000);
        if (!a[n])
            break;
        assert_true(kvs_hostpool_owns(p, a[n]));
        memset(a[n], n, 100000); /* writable */
    }
    kvs_hostpool_get_stats(p, &s);
    uint64_t slot = s.used / (uint64_t)n;
    assert_true(slot >= 100000 && slot <= 100000 + 100000 / 8);
    assert_int_equal(n, 4 * (SLAB / slot)); /* every slab filled, then NULL */
    assert_int_equal(pc.pinned, 4);         /* each slab pinned once */
    assert_int_equal(s.pinned, 4 * SLAB);
    for (int i = 0; i < n; i++) /* contents intact: no two blocks overlap */
        for (int j = 0; j < 100000; j += 997)
            assert_int_equal(((unsigned char *)a[i])[j], (unsigned char)i);

    /* Freed blocks are reused; committed slabs are not pinned again. */
    kvs_hostpool_free(p, a[3]);
    void *again = kvs_hostpool_alloc(p, 99000); /* same class */
    assert_ptr_equal(again, a[3]);
    assert_int_equal(pc.pinned, 4);
    for (int i = 0; i < n; i++)
        kvs_hostpool_free(p, i == 3 ? again : a[i]);
    kvs_hostpool_get_stats(p, &s);
    assert_int_equal(s.used, 0);
    /* Another size class takes the emptied slabs, still pinned from before. */
    void *big = kvs_hostpool_alloc(p, SLAB);
    assert_non_null(big);
    assert_int_equal(pc.pinned, 4);
    kvs_hostpool_free(p, big);
    /* Larger than a slab, or not in the pool: NULL / not owned. */
    assert_null(kvs_hostpool_alloc(p, SLAB + 1));
    int local;
    assert_false(kvs_hostpool_owns(p, &local));
    kvs_hostpool_destroy(p);
    assert_int_equal(pc.unpinned, 4);
}

static void test_pin_failure_and_small(void **state)
{
    pins pc = {.fail_next = 1};
    kvs_hostpool_opts o = {.max_bytes = 2 * SLAB,
                           .slab_bytes = SLAB,
                           .pin = fake_pin,
                           .unpin = fake_unpin,
                           .ctx = &pc};
    kvs_hostpool *p;
    assert_int_equal(kvs_hostpool_create(&o, &p, NULL), 0);
    /* The first slab's pin fails: it is used anyway, unpinned, and counted. */
    unsigned char *b = kvs_hostpool_alloc(p, 1);
    assert_non_null(b);
    b[0] = 1;
    b[4095] = 2; /* small blocks get a 4 KiB slot */
    kvs_hostpool_stats s;
    kvs_hostpool_get_stats(p, &s);
    assert_int_equal(s.pin_failures, 1);
    assert_int_equal(s.pinned, 0);
    assert_int_equal(s.committed, SLAB);
    assert_int_equal(s.used, 4096);
    kvs_hostpool_free(p, b);
    kvs_hostpool_destroy(p);
    assert_int_equal(pc.unpinned, 0); /* nothing was pinned */

    /* Without a pin callback: plain committed memory. Bad sizes are refused. */
    kvs_hostpool_opts plain = {.max_bytes = SLAB, .slab_bytes = SLAB};
    assert_int_equal(kvs_hostpool_create(&plain, &p, NULL), 0);
    void *c = kvs_hostpool_alloc(p, 5000);
    assert_non_null(c);
    memset(c, 7, 5000);
    kvs_hostpool_free(p, c);
    kvs_hostpool_destroy(p);
    kvs_hostpool_opts bad = {.max_bytes = SLAB, .slab_bytes = 1000};
    kvs_err err;
    assert_int_equal(kvs_hostpool_create(&bad, &p, &err), KVS_EINVAL);
    bad = (kvs_hostpool_opts){.max_bytes = 0};
    assert_int_equal(kvs_hostpool_create(&bad, &p, &err), KVS_EINVAL);
    kvs_hostpool_destroy(NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_alloc_pin_reuse),
        cmocka_unit_test(test_pin_failure_and_small),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
