/* storage/policy: LRU order; S3-FIFO's small queue, promotion, ghost, main reinsertion; the
 * busy-skip contract of victim scans; byte accounting with mixed sizes; removal from every
 * queue; and 100k random operations checked step by step against a plain-array model of the
 * same algorithm (policy.h). */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "gpu/codec/rng.h"
#include "storage/policy.h"

typedef struct obj {
    kvs_policy_node node;
    uint64_t key;
    uint64_t bytes;
    bool busy;
} obj;

#define OBJ_OF(n) ((obj *)((char *)(n)-offsetof(obj, node)))

static kvs_policy *make(kvs_policy_kind kind, uint64_t cap, const kvs_policy_opts *o)
{
    kvs_policy *p = NULL;
    kvs_err err;
    assert_int_equal(kvs_policy_create(kind, cap, o, &p, &err), 0);
    assert_non_null(p);
    return p;
}

static void put(kvs_policy *p, obj *o, uint64_t key, uint64_t bytes)
{
    memset(o, 0, sizeof *o);
    o->key = key;
    o->bytes = bytes;
    assert_int_equal(kvs_policy_insert(p, &o->node, key, bytes, NULL), 0);
}

/* Evicts idle objects (in scan order) until `bytes` more fit; returns how many. */
static int make_room(kvs_policy *p, uint64_t bytes)
{
    int n = 0;
    kvs_policy_cursor cur;
    kvs_policy_scan_begin(p, &cur);
    kvs_policy_node *v;
    while (kvs_policy_bytes(p) + bytes > kvs_policy_capacity(p) &&
           (v = kvs_policy_victim(p, &cur)) != NULL) {
        if (OBJ_OF(v)->busy)
            continue;
        kvs_policy_evicted(p, v);
        n++;
    }
    return n;
}

static obj *one_victim(kvs_policy *p)
{
    kvs_policy_cursor cur;
    kvs_policy_scan_begin(p, &cur);
    kvs_policy_node *v = kvs_policy_victim(p, &cur);
    return v ? OBJ_OF(v) : NULL;
}

static void evict_one(kvs_policy *p, const obj *expect)
{
    obj *v = one_victim(p);
    assert_ptr_equal(v, expect);
    kvs_policy_evicted(p, &v->node);
}

static kvs_policy_stats stats(const kvs_policy *p)
{
    kvs_policy_stats s;
    kvs_policy_get_stats(p, &s);
    return s;
}

static void test_parse_and_create(void **state)
{
    kvs_policy_kind k;
    kvs_err err;
    assert_int_equal(kvs_policy_kind_parse("lru", &k, &err), 0);
    assert_int_equal(k, KVS_POLICY_LRU);
    assert_int_equal(kvs_policy_kind_parse("s3fifo", &k, &err), 0);
    assert_int_equal(k, KVS_POLICY_S3FIFO);
    assert_int_equal(kvs_policy_kind_parse("s3-fifo", &k, &err), 0);
    assert_int_equal(kvs_policy_kind_parse("arc", &k, &err), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "lru, s3fifo"));
    assert_int_equal(kvs_policy_kind_parse(NULL, &k, &err), KVS_EINVAL);
    assert_string_equal(kvs_policy_name(KVS_POLICY_LRU), "lru");
    assert_string_equal(kvs_policy_name(KVS_POLICY_S3FIFO), "s3fifo");
    assert_string_equal(kvs_policy_name((kvs_policy_kind)7), "?");

    kvs_policy *p = NULL;
    assert_int_equal(kvs_policy_create((kvs_policy_kind)9, 100, NULL, &p, &err), KVS_EINVAL);
    assert_int_equal(kvs_policy_create(KVS_POLICY_LRU, 0, NULL, &p, &err), KVS_EINVAL);
    kvs_policy_opts o = {.small_percent = 51};
    assert_int_equal(kvs_policy_create(KVS_POLICY_S3FIFO, 100, &o, &p, &err), KVS_EINVAL);
    o = (kvs_policy_opts){.promote_threshold = 4};
    assert_int_equal(kvs_policy_create(KVS_POLICY_S3FIFO, 100, &o, &p, &err), KVS_EINVAL);
    o = (kvs_policy_opts){.ghost_entries = UINT64_MAX};
    assert_int_equal(kvs_policy_create(KVS_POLICY_S3FIFO, 100, &o, &p, &err), KVS_EINVAL);
    assert_null(p);
    kvs_policy_destroy(NULL);

    o = (kvs_policy_opts){.ghost_entries = 16};
    p = make(KVS_POLICY_S3FIFO, UINT64_MAX, &o); /* no overflow sizing S near 2^64 */
    assert_int_equal(kvs_policy_kind_of(p), KVS_POLICY_S3FIFO);
    assert_int_equal(kvs_policy_capacity(p), UINT64_MAX);
    obj a;
    put(p, &a, 1, 10);
    assert_int_equal(kvs_policy_insert(p, &a.node, 1, 10, &err), KVS_EINVAL); /* linked */
    obj b = {0};
    assert_int_equal(kvs_policy_insert(p, &b.node, 2, 0, &err), KVS_EINVAL); /* 0 bytes */
    assert_false(kvs_policy_node_linked(&b.node));
    kvs_policy_destroy(p);
}

static void test_lru_order(void **state)
{
    kvs_policy *p = make(KVS_POLICY_LRU, 100, NULL);
    obj o[4];
    for (int i = 0; i < 4; i++)
        put(p, &o[i], (uint64_t)i, 10);
    assert_int_equal(kvs_policy_node_queue(&o[0].node), KVS_POLICY_Q_MAIN);
    kvs_policy_hit(p, &o[0].node); /* 0 becomes the newest: order 1, 2, 3, 0 */
    kvs_policy_cursor cur;
    kvs_policy_scan_begin(p, &cur);
    obj *expect[] = {&o[1], &o[2], &o[3], &o[0]};
    for (int i = 0; i < 4; i++)
        assert_ptr_equal(OBJ_OF(kvs_policy_victim(p, &cur)), expect[i]);
    assert_null(kvs_policy_victim(p, &cur));
    /* Nothing moved: the scan only offered. */
    evict_one(p, &o[1]);
    kvs_policy_hit(p, &o[2].node); /* 3, 0, 2 */
    evict_one(p, &o[3]);
    evict_one(p, &o[0]);
    evict_one(p, &o[2]);
    assert_null(one_victim(p));
    kvs_policy_stats s = stats(p);
    assert_int_equal(s.evicted[KVS_POLICY_Q_MAIN], 4);
    assert_int_equal(s.ghost_count, 0);
    assert_int_equal(kvs_policy_count(p), 0);
    assert_int_equal(kvs_policy_bytes(p), 0);
    kvs_policy_destroy(p);
}

/* A hot set that reached M survives a long stream of objects seen once: they enter S, leave
 * S for G, and never touch M. */
static void test_s3fifo_one_hit_wonders(void **state)
{
    kvs_policy *p = make(KVS_POLICY_S3FIFO, 1000, NULL); /* S: 100 bytes, M: 900 */
    static obj hot[50], cold[2000];
    for (int i = 0; i < 50; i++) {
        make_room(p, 10);
        put(p, &hot[i], (uint64_t)i, 10);
        kvs_policy_hit(p, &hot[i].node);
    }
    for (int i = 0; i < 2000; i++) {
        make_room(p, 10);
        put(p, &cold[i], 1000 + (uint64_t)i, 10);
        if (i == 100) { /* by now every hot object has been promoted */
            for (int h = 0; h < 50; h++)
                assert_int_equal(kvs_policy_node_queue(&hot[h].node), KVS_POLICY_Q_MAIN);
        }
    }
    kvs_policy_stats s = stats(p);
    assert_int_equal(s.promoted, 50);
    assert_int_equal(s.evicted[KVS_POLICY_Q_MAIN], 0);
    assert_int_equal(s.ghost_hits, 0);
    for (int h = 0; h < 50; h++)
        assert_int_equal(kvs_policy_node_queue(&hot[h].node), KVS_POLICY_Q_MAIN);
    /* The cold objects that are still cached sit in S; M holds only the hot set. */
    assert_int_equal(s.count[KVS_POLICY_Q_MAIN], 50);
    assert_true(s.evicted[KVS_POLICY_Q_SMALL] >= 2000 - 95);
    /* G remembers at most M's target in bytes (900 bytes = 90 objects of 10). */
    assert_int_equal(s.ghost_count, 90);
    assert_int_equal(s.ghost_bytes, 900);
    kvs_policy_destroy(p);
    /* LRU under the same stream keeps none of the hot set. */
    kvs_policy *l = make(KVS_POLICY_LRU, 1000, NULL);
    for (int i = 0; i < 50; i++) {
        make_room(l, 10);
        put(l, &hot[i], (uint64_t)i, 10);
        kvs_policy_hit(l, &hot[i].node);
    }
    for (int i = 0; i < 2000; i++) {
        make_room(l, 10);
        put(l, &cold[i], 1000 + (uint64_t)i, 10);
    }
    for (int h = 0; h < 50; h++)
        assert_false(kvs_policy_node_linked(&hot[h].node));
    kvs_policy_destroy(l);
}

static void test_s3fifo_promote_from_small(void **state)
{
    kvs_policy *p = make(KVS_POLICY_S3FIFO, 100, NULL); /* S: 10 bytes */
    obj o[3];
    put(p, &o[0], 0, 10);
    put(p, &o[1], 1, 10);
    put(p, &o[2], 2, 10);
    kvs_policy_hit(p, &o[0].node);
    /* S (30 bytes) is over its 10: the oldest, o0, was accessed and moves to M; o1 is the
     * victim. */
    evict_one(p, &o[1]);
    assert_int_equal(kvs_policy_node_queue(&o[0].node), KVS_POLICY_Q_MAIN);
    kvs_policy_stats s = stats(p);
    assert_int_equal(s.promoted, 1);
    assert_int_equal(s.ghost_count, 1);
    /* S now holds o2 (10 bytes, its target): still S first. */
    evict_one(p, &o[2]);
    /* S is empty: M. Promotion reset o0's counter, so it goes at once. */
    evict_one(p, &o[0]);
    s = stats(p);
    assert_int_equal(s.reinserted, 0);
    assert_int_equal(s.evicted[KVS_POLICY_Q_MAIN], 1);
    assert_int_equal(s.ghost_count, 2); /* M's evictions are not remembered */
    kvs_policy_destroy(p);

    /* The paper's Algorithm 1 variant: one access is not enough, two are. */
    kvs_policy_opts opt = {.promote_threshold = 2};
    p = make(KVS_POLICY_S3FIFO, 100, &opt);
    put(p, &o[0], 0, 10);
    put(p, &o[1], 1, 10);
    put(p, &o[2], 2, 10);
    kvs_policy_hit(p, &o[0].node);
    kvs_policy_hit(p, &o[1].node);
    kvs_policy_hit(p, &o[1].node);
    evict_one(p, &o[0]);
    evict_one(p, &o[2]);
    assert_int_equal(kvs_policy_node_queue(&o[1].node), KVS_POLICY_Q_MAIN);
    kvs_policy_destroy(p);
}

static void test_s3fifo_ghost_admission(void **state)
{
    kvs_policy *p = make(KVS_POLICY_S3FIFO, 100, NULL);
    obj a, b, c;
    put(p, &a, 7, 10);
    evict_one(p, &a); /* from S, never accessed: to G */
    kvs_policy_stats s = stats(p);
    assert_int_equal(s.ghost_count, 1);
    assert_int_equal(s.ghost_bytes, 10);
    put(p, &a, 7, 10); /* back: G knows it, straight to M */
    assert_int_equal(kvs_policy_node_queue(&a.node), KVS_POLICY_Q_MAIN);
    s = stats(p);
    assert_int_equal(s.ghost_hits, 1);
    assert_int_equal(s.ghost_count, 0); /* taken out of G */
    /* remove is not an eviction: nothing enters G, the key comes back through S. */
    put(p, &b, 8, 10);
    kvs_policy_remove(p, &b.node);
    assert_false(kvs_policy_node_linked(&b.node));
    put(p, &b, 8, 10);
    assert_int_equal(kvs_policy_node_queue(&b.node), KVS_POLICY_Q_SMALL);
    /* An eviction from M is not remembered either. */
    kvs_policy_remove(p, &b.node);
    evict_one(p, &a);
    put(p, &a, 7, 10);
    assert_int_equal(kvs_policy_node_queue(&a.node), KVS_POLICY_Q_SMALL);
    /* evicted() outside a scan, on an object of S: remembered. */
    put(p, &c, 9, 10);
    kvs_policy_evicted(p, &c.node);
    put(p, &c, 9, 10);
    assert_int_equal(kvs_policy_node_queue(&c.node), KVS_POLICY_Q_MAIN);
    kvs_policy_destroy(p);

    /* G bounded in entries: with room for 4, the 4 most recent of 6 evictions are kept. */
    kvs_policy_opts opt = {.ghost_entries = 4};
    p = make(KVS_POLICY_S3FIFO, 1000, &opt);
    obj o[6];
    for (int i = 0; i < 6; i++) {
        put(p, &o[i], 100 + (uint64_t)i, 10);
        kvs_policy_evicted(p, &o[i].node);
    }
    assert_int_equal(stats(p).ghost_count, 4);
    for (int i = 0; i < 6; i++) {
        put(p, &o[i], 100 + (uint64_t)i, 10);
        assert_int_equal(kvs_policy_node_queue(&o[i].node),
                         i < 2 ? KVS_POLICY_Q_SMALL : KVS_POLICY_Q_MAIN);
    }
    kvs_policy_destroy(p);
}

/* Objects enter M through G, so the scan starts in M (S is empty, below its target). */
static void test_s3fifo_main_reinsertion(void **state)
{
    kvs_policy *p = make(KVS_POLICY_S3FIFO, 1000, NULL);
    obj o[4]; /* A B C D */
    for (int i = 0; i < 4; i++) {
        put(p, &o[i], (uint64_t)i, 10);
        kvs_policy_evicted(p, &o[i].node);
        put(p, &o[i], (uint64_t)i, 10);
        assert_int_equal(kvs_policy_node_queue(&o[i].node), KVS_POLICY_Q_MAIN);
    }
    for (int i = 0; i < 5; i++) /* capped at 3 */
        kvs_policy_hit(p, &o[0].node);
    kvs_policy_hit(p, &o[1].node);
    o[3].busy = true;

    kvs_policy_cursor cur;
    kvs_policy_scan_begin(p, &cur);
    /* A (3 -> 2) and B (1 -> 0) go back to the head; C is the first with no access. */
    assert_ptr_equal(OBJ_OF(kvs_policy_victim(p, &cur)), &o[2]);
    kvs_policy_evicted(p, &o[2].node);
    assert_int_equal(stats(p).reinserted, 2);
    /* M is D A B: D is offered (busy, skipped), A goes round again (2 -> 1), B is offered,
     * then A (1 -> 0, stays at the head) and A once more, now cold. Then nothing is left. */
    assert_ptr_equal(OBJ_OF(kvs_policy_victim(p, &cur)), &o[3]);
    assert_ptr_equal(OBJ_OF(kvs_policy_victim(p, &cur)), &o[1]);
    assert_ptr_equal(OBJ_OF(kvs_policy_victim(p, &cur)), &o[0]);
    assert_null(kvs_policy_victim(p, &cur));
    kvs_policy_stats s = stats(p);
    assert_int_equal(s.reinserted, 4);
    assert_int_equal(s.count[KVS_POLICY_Q_MAIN], 3);
    assert_int_equal(s.evicted[KVS_POLICY_Q_MAIN], 1);
    /* Skipping changed nothing: a new scan offers D first again. */
    evict_one(p, &o[3]);
    kvs_policy_destroy(p);
}

static void test_busy_skip(void **state)
{
    kvs_policy *p = make(KVS_POLICY_S3FIFO, 100, NULL);
    obj o[4];
    for (int i = 0; i < 4; i++)
        put(p, &o[i], (uint64_t)i, 10);
    o[0].busy = true;
    o[1].busy = true;
    kvs_policy_hit(p, &o[1].node); /* busy and accessed: still moves to M when reached */
    kvs_policy_cursor cur;
    kvs_policy_scan_begin(p, &cur);
    assert_ptr_equal(OBJ_OF(kvs_policy_victim(p, &cur)), &o[0]); /* skipped */
    assert_ptr_equal(OBJ_OF(kvs_policy_victim(p, &cur)), &o[2]); /* o1 promoted on the way */
    kvs_policy_evicted(p, &o[2].node);
    assert_int_equal(kvs_policy_node_queue(&o[1].node), KVS_POLICY_Q_MAIN);
    assert_int_equal(kvs_policy_node_queue(&o[0].node), KVS_POLICY_Q_SMALL);
    kvs_policy_stats s = stats(p);
    assert_int_equal(s.ghost_count, 1); /* o2 only: a skipped candidate is not recorded */
    /* The next scan offers the skipped object first again: same place, same counter. */
    kvs_policy_scan_begin(p, &cur);
    assert_ptr_equal(OBJ_OF(kvs_policy_victim(p, &cur)), &o[0]);
    /* Any other call during a scan restarts it at the oldest end. */
    kvs_policy_hit(p, &o[3].node);
    assert_ptr_equal(OBJ_OF(kvs_policy_victim(p, &cur)), &o[0]);
    /* A removal of the scan's next node cannot leave the cursor dangling. */
    assert_ptr_equal(OBJ_OF(kvs_policy_victim(p, &cur)), &o[1]); /* S done (o3 went to M) */
    kvs_policy_remove(p, &o[1].node);
    assert_ptr_equal(OBJ_OF(kvs_policy_victim(p, &cur)), &o[0]);
    /* Everything busy: the scan ends with NULL and loses nothing. */
    o[3].busy = true;
    kvs_policy_scan_begin(p, &cur);
    int offered = 0;
    while (kvs_policy_victim(p, &cur))
        offered++;
    assert_int_equal(offered, 2);
    assert_int_equal(kvs_policy_count(p), 2);
    assert_int_equal(make_room(p, 1000), 0);
    assert_true(kvs_policy_node_linked(&o[0].node));
    assert_true(kvs_policy_node_linked(&o[3].node));
    /* evicted() of an earlier candidate (not the last one) is allowed; the scan restarts. */
    o[0].busy = o[3].busy = false;
    kvs_policy_scan_begin(p, &cur);
    kvs_policy_node *first = kvs_policy_victim(p, &cur);
    kvs_policy_node *second = kvs_policy_victim(p, &cur);
    assert_non_null(second);
    kvs_policy_evicted(p, first);
    assert_ptr_equal(kvs_policy_victim(p, &cur), second);
    kvs_policy_destroy(p);

    /* M offered everything it had (busy) before S promoted an object into it: the scan still
     * offers the promoted object. */
    p = make(KVS_POLICY_S3FIFO, 100, NULL);
    obj x, a, b;
    put(p, &x, 1, 10);
    kvs_policy_evicted(p, &x.node);
    put(p, &x, 1, 10); /* in M */
    put(p, &a, 2, 3);
    put(p, &b, 3, 3);
    kvs_policy_hit(p, &a.node);
    kvs_policy_scan_begin(p, &cur);                        /* S: 6 bytes < 10: M first */
    assert_ptr_equal(kvs_policy_victim(p, &cur), &x.node); /* busy: skipped, M done */
    assert_ptr_equal(kvs_policy_victim(p, &cur), &a.node); /* S -> M, then offered in M */
    assert_ptr_equal(kvs_policy_victim(p, &cur), &b.node);
    assert_null(kvs_policy_victim(p, &cur));
    assert_int_equal(kvs_policy_node_queue(&a.node), KVS_POLICY_Q_MAIN);
    kvs_policy_destroy(p);
}

static void test_bytes_mixed_sizes(void **state)
{
    kvs_policy *p = make(KVS_POLICY_S3FIFO, 100, NULL); /* S: 10 bytes, M: 90 */
    obj big[10], small[3];
    for (int i = 0; i < 10; i++) { /* 10 x 7 bytes through G into M */
        put(p, &big[i], 100 + (uint64_t)i, 7);
        kvs_policy_evicted(p, &big[i].node);
        put(p, &big[i], 100 + (uint64_t)i, 7);
    }
    put(p, &small[0], 1, 7);
    kvs_policy_stats s = stats(p);
    assert_int_equal(s.bytes[KVS_POLICY_Q_MAIN], 70);
    assert_int_equal(s.bytes[KVS_POLICY_Q_SMALL], 7);
    assert_int_equal(s.count[KVS_POLICY_Q_MAIN], 10);
    assert_int_equal(kvs_policy_bytes(p), 77);
    assert_int_equal(kvs_policy_count(p), 11);
    /* S holds 7 < 10 bytes: the victim comes from M. */
    evict_one(p, &big[0]);
    /* One more 3-byte object: S holds 10 >= 10, the victim comes from S. */
    put(p, &small[1], 2, 3);
    evict_one(p, &small[0]);
    s = stats(p);
    assert_int_equal(s.bytes[KVS_POLICY_Q_SMALL], 3);
    assert_int_equal(s.bytes[KVS_POLICY_Q_MAIN], 63);
    assert_int_equal(s.ghost_bytes, 7);
    /* G is bounded by M's target in bytes: 90. 13 more evictions of 7 bytes (91) push out
     * the oldest. */
    for (int i = 0; i < 13; i++) {
        obj t;
        put(p, &t, 1000 + (uint64_t)i, 7);
        kvs_policy_evicted(p, &t.node);
    }
    s = stats(p);
    assert_int_equal(s.ghost_bytes, 84);
    assert_int_equal(s.ghost_count, 12);
    put(p, &small[2], 1, 7); /* key 1 was the oldest: forgotten */
    assert_int_equal(kvs_policy_node_queue(&small[2].node), KVS_POLICY_Q_SMALL);
    /* Make room for 40 bytes, in the policy's order. */
    uint64_t before = kvs_policy_bytes(p);
    int n = make_room(p, 40);
    assert_true(kvs_policy_bytes(p) + 40 <= 100);
    assert_true(before + 40 > 100);
    assert_true(n >= 1);
    kvs_policy_destroy(p);
}

static void test_remove_everywhere(void **state)
{
    kvs_policy_kind kinds[] = {KVS_POLICY_LRU, KVS_POLICY_S3FIFO};
    for (int k = 0; k < 2; k++) {
        kvs_policy *p = make(kinds[k], 100, NULL);
        obj m, s1, s2, s3;
        put(p, &m, 1, 10);
        kvs_policy_evicted(p, &m.node);
        put(p, &m, 1, 10); /* M for S3-FIFO (LRU: its only queue) */
        put(p, &s1, 2, 10);
        put(p, &s2, 3, 10);
        put(p, &s3, 4, 10);
        kvs_policy_hit(p, &s2.node);
        kvs_policy_remove(p, &m.node);
        kvs_policy_remove(p, &s2.node); /* middle */
        kvs_policy_remove(p, &s3.node); /* newest */
        kvs_policy_remove(p, &s1.node); /* last */
        kvs_policy_stats st = stats(p);
        for (int q = 1; q < 3; q++) {
            assert_int_equal(st.bytes[q], 0);
            assert_int_equal(st.count[q], 0);
        }
        assert_int_equal(st.ghost_count, 0);
        assert_null(one_victim(p));
        /* The nodes can be inserted again. */
        put(p, &s1, 2, 10);
        assert_int_equal(kvs_policy_count(p), 1);
        kvs_policy_destroy(p);
    }
}

/* ------------------------------------------------ randomized check against a model */

/* The model: the same algorithm over plain arrays (index 0 = oldest), O(n) per step. */
#define U 2000 /* key universe */
#define CAP 1000

typedef struct model {
    bool s3;
    uint32_t threshold;
    uint64_t small_target, ghost_max_bytes, ghost_cap;
    int q[3][U];
    int n[3];
    int queue[U]; /* kvs_policy_queue of each key */
    int freq[U];
    uint64_t bytes[3];
    /* ghost: every addition in order; live ones still remembered */
    struct {
        uint64_t hash, bytes;
        bool live;
    } * g;
    size_t gcap_alloc, ghead, gtail;
    uint64_t glive, gbytes;
    /* cursor */
    int cstate[2], cnext[2];
    int last;
} model;

static uint64_t key_bytes(int key)
{
    return key % 4 == 0 ? 23 : 9;
}

static int m_pos(const model *m, int q, int key)
{
    for (int i = 0; i < m->n[q]; i++)
        if (m->q[q][i] == key)
            return i;
    fail_msg("key %d not in queue %d", key, q);
    return -1;
}

static void m_push(model *m, int q, int key)
{
    m->q[q][m->n[q]++] = key;
    m->queue[key] = q;
    m->bytes[q] += key_bytes(key);
}

static void m_unlink(model *m, int key)
{
    int q = m->queue[key];
    int i = m_pos(m, q, key);
    memmove(&m->q[q][i], &m->q[q][i + 1], (size_t)(m->n[q] - i - 1) * sizeof(int));
    m->n[q]--;
    m->bytes[q] -= key_bytes(key);
    m->queue[key] = 0;
    m->freq[key] = 0;
}

static int m_ghost_find(const model *m, uint64_t hash)
{
    for (size_t i = m->gtail; i < m->ghead; i++)
        if (m->g[i].live && m->g[i].hash == hash)
            return (int)i;
    return -1;
}

static void m_ghost_kill(model *m, int i)
{
    m->g[i].live = false;
    m->glive--;
    m->gbytes -= m->g[i].bytes;
}

static void m_ghost_drop_tail(model *m)
{
    size_t i = m->gtail++;
    if (m->g[i].live)
        m_ghost_kill(m, (int)i);
}

static void m_ghost_add(model *m, uint64_t hash, uint64_t bytes)
{
    int i = m_ghost_find(m, hash);
    if (i >= 0)
        m_ghost_kill(m, i);
    if (m->ghead - m->gtail == m->ghost_cap)
        m_ghost_drop_tail(m);
    assert_true(m->ghead < m->gcap_alloc);
    m->g[m->ghead].hash = hash;
    m->g[m->ghead].bytes = bytes;
    m->g[m->ghead].live = true;
    m->ghead++;
    m->glive++;
    m->gbytes += bytes;
    while (m->gbytes > m->ghost_max_bytes)
        m_ghost_drop_tail(m);
}

static void m_insert(model *m, int key)
{
    int q = KVS_POLICY_Q_MAIN;
    if (m->s3) {
        int i = m_ghost_find(m, (uint64_t)key);
        if (i >= 0)
            m_ghost_kill(m, i);
        else
            q = KVS_POLICY_Q_SMALL;
    }
    m->freq[key] = 0;
    m_push(m, q, key);
}

static void m_hit(model *m, int key)
{
    if (!m->s3) {
        m_unlink(m, key);
        m_push(m, KVS_POLICY_Q_MAIN, key);
    } else if (m->freq[key] < 3) {
        m->freq[key]++;
    }
}

static void m_evicted(model *m, int key)
{
    int q = m->queue[key];
    m_unlink(m, key);
    if (m->s3 && q == KVS_POLICY_Q_SMALL)
        m_ghost_add(m, (uint64_t)key, key_bytes(key));
}

static void m_scan_begin(model *m)
{
    m->cstate[0] = m->cstate[1] = 0; /* 0 idle, 1 scanning, 2 done */
    m->last = -1;
}

static int m_newer(const model *m, int q, int key)
{
    int i = m_pos(m, q, key);
    return i + 1 < m->n[q] ? m->q[q][i + 1] : -1;
}

static void m_advance(model *m, int slot, int next)
{
    m->cnext[slot] = next;
    if (next < 0)
        m->cstate[slot] = 2;
}

static int m_victim(model *m)
{
    m->last = -1;
    for (;;) {
        int slot;
        if (!m->s3) {
            slot = m->cstate[1] == 2 ? -1 : 1;
        } else {
            int want = m->bytes[KVS_POLICY_Q_SMALL] >= m->small_target ? 0 : 1;
            slot = m->cstate[want] != 2 ? want : m->cstate[1 - want] != 2 ? 1 - want : -1;
        }
        if (slot < 0)
            return -1;
        int q = slot == 0 ? KVS_POLICY_Q_SMALL : KVS_POLICY_Q_MAIN;
        if (m->cstate[slot] == 0) {
            m->cstate[slot] = 1;
            m_advance(m, slot, m->n[q] ? m->q[q][0] : -1);
            continue;
        }
        int key = m->cnext[slot];
        int newer = m_newer(m, q, key);
        if (m->s3 && slot == 0 && m->freq[key] >= (int)m->threshold) {
            m_advance(m, 0, newer);
            m_unlink(m, key);
            m_push(m, KVS_POLICY_Q_MAIN, key);
            if (m->cstate[1] == 2) {
                m->cstate[1] = 1;
                m->cnext[1] = key;
            }
            continue;
        }
        if (m->s3 && slot == 1 && m->freq[key] > 0) {
            int f = m->freq[key] - 1;
            m_unlink(m, key);
            m_push(m, KVS_POLICY_Q_MAIN, key);
            m->freq[key] = f;
            m->cnext[1] = newer >= 0 ? newer : key;
            continue;
        }
        m_advance(m, slot, newer);
        m->last = key;
        return key;
    }
}

static void check_same(const kvs_policy *p, const model *m, const obj *objs, bool full)
{
    kvs_policy_stats s = stats(p);
    for (int q = 1; q < 3; q++) {
        assert_int_equal(s.bytes[q], m->bytes[q]);
        assert_int_equal(s.count[q], m->n[q]);
    }
    assert_int_equal(s.ghost_count, m->glive);
    assert_int_equal(s.ghost_bytes, m->gbytes);
    if (full)
        for (int k = 0; k < U; k++)
            assert_int_equal(kvs_policy_node_queue(&objs[k].node), m->queue[k]);
}

static void run_random(kvs_policy_kind kind, uint32_t threshold, int ops, uint64_t seed)
{
    kvs_policy_opts opt = {.promote_threshold = threshold, .ghost_entries = 40};
    kvs_policy *p = make(kind, CAP, &opt);
    model *m = calloc(1, sizeof *m);
    assert_non_null(m);
    m->s3 = kind == KVS_POLICY_S3FIFO;
    m->threshold = threshold;
    m->small_target = CAP / 10;
    m->ghost_max_bytes = CAP - CAP / 10;
    m->ghost_cap = 40;
    m->gcap_alloc = (size_t)ops * 8 + 16;
    m->g = calloc(m->gcap_alloc, sizeof *m->g);
    assert_non_null(m->g);
    obj *objs = calloc(U, sizeof *objs);
    assert_non_null(objs);
    kvs_rng r;
    kvs_rng_init(&r, seed, 0, 0, 0, 1);

    kvs_policy_cursor cur;
    kvs_policy_scan_begin(p, &cur);
    m_scan_begin(m);
    uint64_t hits = 0, candidates = 0;
    for (int op = 0; op < ops; op++) {
        /* Half the accesses go to 150 hot keys, the rest anywhere: reuse and one-offs. */
        uint64_t x = kvs_rng_next(&r);
        int key = (int)(x % 2 ? (x >> 8) % 150 : (x >> 8) % U);
        unsigned what = (unsigned)((x >> 40) % 100);
        obj *o = &objs[key];
        bool linked = kvs_policy_node_linked(&o->node);
        assert_int_equal(linked, m->queue[key] != 0);
        if (what < 80) { /* access: hit or miss + make room + insert */
            if (linked) {
                kvs_policy_hit(p, &o->node);
                m_hit(m, key);
                hits++;
            } else {
                kvs_policy_scan_begin(p, &cur);
                m_scan_begin(m);
                bool room = true;
                while (kvs_policy_bytes(p) + key_bytes(key) > CAP) {
                    kvs_policy_node *v = kvs_policy_victim(p, &cur);
                    int mv = m_victim(m);
                    if (!v) {
                        assert_int_equal(mv, -1);
                        room = false;
                        break;
                    }
                    candidates++;
                    assert_int_equal((int)OBJ_OF(v)->key, mv);
                    if (kvs_rng_next(&r) % 5 == 0) /* busy: skipped */
                        continue;
                    kvs_policy_evicted(p, v);
                    m_evicted(m, mv);
                }
                if (room) {
                    o->key = (uint64_t)key;
                    assert_int_equal(
                        kvs_policy_insert(p, &o->node, (uint64_t)key, key_bytes(key), NULL), 0);
                    m_insert(m, key);
                }
            }
        } else if (what < 88) { /* delete */
            if (linked) {
                kvs_policy_remove(p, &o->node);
                m_unlink(m, key);
            }
        } else if (what < 92) { /* an operator's evict, outside any scan */
            if (linked) {
                kvs_policy_evicted(p, &o->node);
                m_evicted(m, key);
            }
        } else { /* a scan interrupted by other calls: it restarts */
            kvs_policy_scan_begin(p, &cur);
            m_scan_begin(m);
            int steps = (int)(kvs_rng_next(&r) % 6);
            for (int i = 0; i < steps; i++) {
                kvs_policy_node *v = kvs_policy_victim(p, &cur);
                int mv = m_victim(m);
                assert_int_equal(v ? (int)OBJ_OF(v)->key : -1, mv);
                if (!v)
                    break;
                candidates++;
                unsigned act = (unsigned)(kvs_rng_next(&r) % 4);
                if (act == 0) {
                    kvs_policy_evicted(p, v); /* the last candidate: the scan goes on */
                    m_evicted(m, mv);
                } else if (act == 1 && kvs_policy_node_linked(&o->node)) {
                    kvs_policy_hit(p, &o->node); /* restarts the scan */
                    m_hit(m, key);
                    m_scan_begin(m);
                }
            }
        }
        check_same(p, m, objs, op % 97 == 0);
    }
    check_same(p, m, objs, true);
    kvs_policy_stats s = stats(p);
    print_message("%s/%u: %llu hits, %llu candidates, %llu ghost hits, %llu promoted, %llu "
                  "reinserted\n",
                  kvs_policy_name(kind), threshold, (unsigned long long)hits,
                  (unsigned long long)candidates, (unsigned long long)s.ghost_hits,
                  (unsigned long long)s.promoted, (unsigned long long)s.reinserted);
    /* The run exercised every path. */
    assert_true(hits > (uint64_t)ops / 10);
    assert_true(candidates > (uint64_t)ops / 10);
    if (m->s3) {
        assert_true(s.ghost_hits > 100);
        assert_true(s.promoted > (threshold == 1 ? 1000u : 10u));
        assert_true(s.reinserted > 100);
    }
    free(objs);
    free(m->g);
    free(m);
    kvs_policy_destroy(p);
}

static void test_random_s3fifo(void **state)
{
    run_random(KVS_POLICY_S3FIFO, 1, 100000, 42);
}

static void test_random_s3fifo_threshold2(void **state)
{
    run_random(KVS_POLICY_S3FIFO, 2, 30000, 7);
}

static void test_random_lru(void **state)
{
    run_random(KVS_POLICY_LRU, 1, 30000, 9);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse_and_create),
        cmocka_unit_test(test_lru_order),
        cmocka_unit_test(test_s3fifo_one_hit_wonders),
        cmocka_unit_test(test_s3fifo_promote_from_small),
        cmocka_unit_test(test_s3fifo_ghost_admission),
        cmocka_unit_test(test_s3fifo_main_reinsertion),
        cmocka_unit_test(test_busy_skip),
        cmocka_unit_test(test_bytes_mixed_sizes),
        cmocka_unit_test(test_remove_everywhere),
        cmocka_unit_test(test_random_s3fifo),
        cmocka_unit_test(test_random_s3fifo_threshold2),
        cmocka_unit_test(test_random_lru),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
