/* storage/store: namespaces, block lifecycle, LRU and S3-FIFO eviction, busy blocks, checksums,
 * accounting, a multi-threaded soak that checks the invariants of store.h, and the disk
 * tier behind the same verbs (spill, read back, promotion, delete/replace/drop, budget
 * eviction, corrupt records, write errors; one temporary directory per test). */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <lmdb.h>

#include "gpu/codec/codec.h"
#include "gpu/codec/format.h"
#include "gpu/codec/learn.h"
#include "storage/store.h"
#include "tests/support/kvs_test.h"

/* L=2 H=1 D=16 T=4 fp16: a full block's payload is 2*2*4*1*16*2 = 512 bytes, stored as an
 * encoded block of codec none (ENC(4) bytes: header, section table, the payload). */
static kvs_ns_spec small_spec(const char *name)
{
    kvs_ns_spec s = kvs_test_spec(2, 1, 16, 4, KVS_DTYPE_FP16, "none", "none", 0);
    snprintf(s.name, sizeof s.name, "%s", name);
    return s;
}

/* Encoded bytes of a small_spec block of t tokens, and what it is charged in the host tier
 * (its bookkeeping too). */
#define ENC(t) ((uint64_t)kvs_format_prefix_bytes(2) + 128u * (t))
#define HOST(t) (ENC(t) + KVS_STORE_BLOCK_META)

static kvs_store *new_store(uint64_t cap)
{
    kvs_store *st = NULL;
    kvs_store_opts o = {.host_capacity = cap};
    assert_int_equal(kvs_store_create(&o, &st, NULL), 0);
    return st;
}

/* Writes into dst (cap bytes) a valid encoded block of ns (codec none) holding t tokens
 * whose payload bytes all are `fill` (the store checks the block's own checksum, so its
 * blocks must be real ones); returns its length. */
static size_t encode_fill(kvs_ns *ns, uint32_t t, uint8_t fill, void *dst, size_t cap)
{
    uint64_t raw_bytes;
    assert_int_equal(kvs_spec_block_bytes(kvs_ns_spec_of(ns), t, &raw_bytes, NULL), 0);
    uint8_t *raw = malloc(raw_bytes);
    memset(raw, fill, raw_bytes);
    size_t len;
    kvs_err err;
    if (kvs_block_encode(kvs_ns_codec(ns, KVS_KEYS), kvs_ns_codec(ns, KVS_VALUES), kvs_ns_id(ns), t,
                         (const uint16_t *)raw, dst, cap, &len, &err))
        fail_msg("encode_fill: %s", err.msg);
    free(raw);
    return len;
}

/* Puts a block whose payload bytes are all `fill`; returns the commit's result. */
static int put(kvs_store *st, kvs_ns *ns, const char *key, uint32_t tokens, uint8_t fill,
               kvs_store_put_info *info, kvs_err *err)
{
    uint64_t raw_bytes;
    assert_int_equal(kvs_spec_block_bytes(kvs_ns_spec_of(ns), tokens, &raw_bytes, NULL), 0);
    uint64_t cap =
        kvs_block_encoded_max(kvs_ns_codec(ns, KVS_KEYS), kvs_ns_codec(ns, KVS_VALUES), tokens);
    kvs_block *blk;
    int rc = kvs_store_block_alloc(st, ns, tokens, cap, &blk, err);
    if (rc)
        return rc;
    size_t len = encode_fill(ns, tokens, fill, kvs_block_data(blk), cap);
    kvs_block_set_size(blk, len, raw_bytes);
    return kvs_store_block_commit(st, blk, key, strlen(key), info, err);
}

/* The block is a valid encoded block whose payload bytes all equal fill. */
static void expect_fill(kvs_ns *ns, kvs_block *blk, uint8_t fill)
{
    kvs_block_info info;
    assert_int_equal(kvs_format_parse(kvs_block_data(blk), kvs_block_size(blk), &info, NULL), 0);
    size_t pre = kvs_format_prefix_bytes(info.layers);
    const uint8_t *p = (const uint8_t *)kvs_block_data(blk) + pre;
    for (uint64_t i = 0; i < kvs_block_size(blk) - pre; i++)
        assert_int_equal(p[i], fill);
    (void)ns;
}

/* Gets key and checks every payload byte equals fill. */
static void expect_block(kvs_store *st, kvs_ns *ns, const char *key, uint8_t fill)
{
    kvs_block *blk;
    kvs_err err;
    assert_int_equal(kvs_store_get(st, ns, key, strlen(key), &blk, &err), 0);
    expect_fill(ns, blk, fill);
    kvs_store_block_release(st, blk);
}

static void expect_missing(kvs_store *st, kvs_ns *ns, const char *key)
{
    kvs_block *blk;
    kvs_err err;
    assert_int_equal(kvs_store_get(st, ns, key, strlen(key), &blk, &err), KVS_ENOTFOUND);
    assert_non_null(strstr(err.msg, "key"));
}

static void test_ns_validation(void **state)
{
    kvs_store *st = new_store(1 << 20);
    kvs_err err;
    kvs_ns_spec s = small_spec("m");
    s.head_dim = 24;
    assert_int_equal(kvs_store_ns_create(st, &s, NULL, &err), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "head_dim"));
    s = small_spec("bad name!");
    assert_int_equal(kvs_store_ns_create(st, &s, NULL, &err), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "name"));
    s = small_spec("m");
    strcpy(s.key_codec, "zip");
    assert_int_equal(kvs_store_ns_create(st, &s, NULL, &err), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "key_codec"));
    s = small_spec("m");
    s.dtype = KVS_DTYPE_UNSPECIFIED;
    assert_int_equal(kvs_store_ns_create(st, &s, NULL, &err), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "dtype"));
    s = small_spec("m");
    s.block_tokens = 4096;
    s.layers = 5; /* a full block is 5*2*4096*16*2 = 1.25 MiB > the 1 MiB tier */
    assert_int_equal(kvs_store_ns_create(st, &s, NULL, &err), KVS_ENOSPC);
    assert_non_null(strstr(err.msg, "block_tokens"));

    s = small_spec("m");
    assert_int_equal(kvs_store_ns_create(st, &s, NULL, &err), 0);
    assert_int_equal(kvs_store_ns_create(st, &s, NULL, &err), KVS_EEXIST);
    kvs_ns *ns;
    assert_int_equal(kvs_store_ns_find(st, "nope", &ns, &err), KVS_ENOTFOUND);
    assert_non_null(strstr(err.msg, "namespace"));
    kvs_store_destroy(st);
}

static void test_roundtrip_replace_delete(void **state)
{
    kvs_store *st = new_store(1 << 20);
    kvs_ns_spec s = small_spec("m");
    kvs_ns *ns;
    kvs_err err;
    assert_int_equal(kvs_store_ns_create(st, &s, &ns, &err), 0);
    kvs_store_put_info info;
    assert_int_equal(put(st, ns, "a", 4, 0x11, &info, &err), 0);
    assert_int_equal(info.tier, KVS_STORE_TIER_HOST);
    assert_int_equal(info.stored_bytes, ENC(4));
    assert_false(info.replaced);
    assert_int_equal(put(st, ns, "b", 1, 0x22, &info, &err), 0); /* partial block: 128 B */
    assert_int_equal(info.stored_bytes, ENC(1));
    expect_block(st, ns, "a", 0x11);
    expect_block(st, ns, "b", 0x22);

    assert_int_equal(put(st, ns, "a", 2, 0x33, &info, &err), 0);
    assert_true(info.replaced);
    expect_block(st, ns, "a", 0x33);

    kvs_store_stats stats;
    kvs_store_get_stats(st, &stats);
    assert_int_equal(stats.host_used, HOST(2) + HOST(1));
    assert_int_equal(stats.host_blocks, 2);

    kvs_store_key keys[3] = {{"a", 1}, {"zz", 2}, {"b", 1}};
    kvs_store_tier tiers[3];
    uint32_t prefix;
    kvs_store_lookup(st, ns, keys, 3, tiers, &prefix, NULL);
    assert_int_equal(prefix, 1); /* "zz" breaks the prefix even though "b" is present */
    assert_int_equal(tiers[0], KVS_STORE_TIER_HOST);
    assert_int_equal(tiers[1], KVS_STORE_TIER_NONE);
    assert_int_equal(tiers[2], KVS_STORE_TIER_HOST);

    assert_int_equal(kvs_store_delete(st, ns, keys, 3), 2);
    expect_missing(st, ns, "a");
    kvs_store_get_stats(st, &stats);
    assert_int_equal(stats.host_used, 0);
    assert_int_equal(stats.host_blocks, 0);
    kvs_ns_unref(ns);
    kvs_store_destroy(st);
}

static void test_lru_eviction_and_busy_blocks(void **state)
{
    kvs_store *st = new_store(4 * HOST(4)); /* room for exactly four full blocks */
    kvs_ns_spec s = small_spec("m");
    kvs_ns *ns;
    kvs_err err;
    assert_int_equal(kvs_store_ns_create(st, &s, &ns, &err), 0);
    const char *names[] = {"b0", "b1", "b2", "b3"};
    for (int i = 0; i < 4; i++)
        assert_int_equal(put(st, ns, names[i], 4, (uint8_t)i, NULL, &err), 0);
    expect_block(st, ns, "b0", 0); /* b0 becomes most recently used: b1 is the oldest */
    assert_int_equal(put(st, ns, "b4", 4, 4, NULL, &err), 0);
    expect_missing(st, ns, "b1");
    expect_block(st, ns, "b0", 0);

    /* A reader holds b2 (now the oldest): eviction skips it and takes b3. */
    kvs_block *held;
    assert_int_equal(kvs_store_get(st, ns, "b2", 2, &held, &err), 0);
    expect_block(st, ns, "b4", 4);
    expect_block(st, ns, "b0", 0); /* order now: b3 (oldest), b2 (held), b4, b0 */
    assert_int_equal(put(st, ns, "b5", 4, 5, NULL, &err), 0);
    expect_missing(st, ns, "b3");

    /* Deleting a held block unlinks it; its bytes stay valid until released. */
    kvs_store_key k2 = {"b2", 2};
    assert_int_equal(kvs_store_delete(st, ns, &k2, 1), 1);
    expect_missing(st, ns, "b2");
    expect_fill(ns, held, 2);
    kvs_store_stats stats;
    kvs_store_get_stats(st, &stats);
    assert_int_equal(stats.host_used, 4 * HOST(4)); /* held block still counted */
    assert_int_equal(stats.host_blocks, 3);
    kvs_store_block_release(st, held);
    kvs_store_get_stats(st, &stats);
    assert_int_equal(stats.host_used, 3 * HOST(4));
    assert_int_equal(stats.host_evictions, 2);

    /* When every block is busy nothing can be evicted: ENOSPC, nothing lost. */
    kvs_block *h[3];
    const char *live[] = {"b0", "b4", "b5"};
    for (int i = 0; i < 3; i++)
        assert_int_equal(kvs_store_get(st, ns, live[i], 2, &h[i], &err), 0);
    kvs_block *blk;
    assert_int_equal(kvs_store_block_alloc(st, ns, 4, ENC(4), &blk, &err), 0); /* the free slot */
    kvs_block *blk2;
    assert_int_equal(kvs_store_block_alloc(st, ns, 4, ENC(4), &blk2, &err), KVS_ENOSPC);
    assert_non_null(strstr(err.msg, "no room"));
    kvs_store_block_abort(st, blk);
    for (int i = 0; i < 3; i++)
        kvs_store_block_release(st, h[i]);
    expect_block(st, ns, "b0", 0);
    expect_block(st, ns, "b4", 4);
    expect_block(st, ns, "b5", 5);
    kvs_ns_unref(ns);
    kvs_store_destroy(st);
}

static void test_checksum_mismatch_is_data_loss(void **state)
{
    kvs_store *st = new_store(1 << 20);
    kvs_ns_spec s = small_spec("m");
    kvs_ns *ns;
    kvs_err err;
    assert_int_equal(kvs_store_ns_create(st, &s, &ns, &err), 0);
    assert_int_equal(put(st, ns, "a", 4, 0x5a, NULL, &err), 0);
    kvs_block *blk;
    assert_int_equal(kvs_store_get(st, ns, "a", 1, &blk, &err), 0);
    ((uint8_t *)kvs_block_data(blk))[100] ^= 0x01; /* simulate a flipped bit in RAM */
    kvs_store_block_release(st, blk);
    assert_int_equal(kvs_store_get(st, ns, "a", 1, &blk, &err), KVS_EDATALOSS);
    assert_non_null(strstr(err.msg, "checksum"));
    expect_missing(st, ns, "a"); /* dropped, not served again */
    kvs_store_stats stats;
    kvs_store_get_stats(st, &stats);
    assert_int_equal(stats.checksum_failures, 1);
    assert_int_equal(stats.host_used, 0);
    kvs_ns_unref(ns);
    kvs_store_destroy(st);
}

/* The host tier's eviction policy (opts.eviction, storage/policy.h): a working set is read
 * again, then a scan of one-off blocks twice the tier's size goes through. Returns how many
 * of the working set's 3 blocks are still there, each checked byte for byte. */
static int working_set_after_scan(kvs_policy_kind kind)
{
    kvs_store *st = NULL;
    kvs_store_opts o = {.host_capacity = 10 * HOST(4), .eviction = kind};
    assert_int_equal(kvs_store_create(&o, &st, NULL), 0);
    kvs_ns_spec s = small_spec("p");
    kvs_ns *ns;
    kvs_err err;
    assert_int_equal(kvs_store_ns_create(st, &s, &ns, &err), 0);
    const char *ws[3] = {"w0", "w1", "w2"};
    for (int i = 0; i < 3; i++)
        assert_int_equal(put(st, ns, ws[i], 4, (uint8_t)(0x10 + i), NULL, &err), 0);
    for (int i = 0; i < 3; i++)
        expect_block(st, ns, ws[i], (uint8_t)(0x10 + i)); /* re-read: the working set */
    char key[8];
    kvs_store_stats stats;
    for (int i = 0; i < 20; i++) { /* never read again */
        snprintf(key, sizeof key, "s%d", i);
        assert_int_equal(put(st, ns, key, 4, (uint8_t)i, NULL, &err), 0);
        kvs_store_get_stats(st, &stats);
        assert_true(stats.host_used <= stats.host_capacity);
    }
    assert_int_equal(stats.host_evictions, 23 - 10);
    assert_int_equal(stats.host_blocks, 10);
    int alive = 0;
    for (int i = 0; i < 3; i++) {
        kvs_store_key k = {ws[i], 2};
        kvs_store_tier t;
        kvs_store_lookup(st, ns, &k, 1, &t, NULL, NULL);
        if (t == KVS_STORE_TIER_HOST) {
            expect_block(st, ns, ws[i], (uint8_t)(0x10 + i));
            alive++;
        }
    }
    kvs_ns_unref(ns);
    kvs_store_destroy(st);
    return alive;
}

/* Tiny blocks cannot hold more memory than the capacity says: each is charged its
 * bookkeeping (KVS_STORE_BLOCK_META) with its bytes, so a client writing one-token blocks
 * gets evictions at capacity / (bytes + META), not at capacity / bytes with three times
 * the capacity in index entries. */
static void test_tiny_blocks_charged_their_bookkeeping(void **state)
{
    (void)state;
    const uint64_t cap = 64u << 10, one = ENC(1) + KVS_STORE_BLOCK_META;
    kvs_store *st = new_store(cap);
    kvs_ns_spec spec = small_spec("tiny");
    kvs_ns *ns;
    kvs_err err;
    assert_int_equal(kvs_store_ns_create(st, &spec, &ns, &err), 0);
    char key[32];
    for (int i = 0; i < 1000; i++) {
        snprintf(key, sizeof key, "k%d", i);
        assert_int_equal(put(st, ns, key, 1, (uint8_t)(i % 100), NULL, &err), 0);
    }
    kvs_store_stats stats;
    kvs_store_get_stats(st, &stats);
    assert_int_equal(stats.host_blocks, cap / one);
    assert_int_equal(stats.host_used, stats.host_blocks * one);
    kvs_store_ns_info *list;
    size_t n;
    assert_int_equal(kvs_store_ns_list(st, &list, &n, &err), 0);
    assert_int_equal(n, 1);
    assert_int_equal(list[0].usage.stored_bytes, stats.host_blocks * ENC(1)); /* the bytes */
    assert_int_equal(list[0].usage.host_bytes, stats.host_used);              /* the charge */
    free(list);
    snprintf(key, sizeof key, "k%d", 999); /* the newest stays */
    expect_block(st, ns, key, (uint8_t)(999 % 100));
    kvs_ns_unref(ns);
    kvs_store_destroy(st);
}

static void test_policy_scan_resistance(void **state)
{
    /* LRU: the scan pushes the working set out (its blocks are the least recently used). */
    assert_int_equal(working_set_after_scan(0), 0); /* 0: the default, LRU */
    assert_int_equal(working_set_after_scan(KVS_POLICY_LRU), 0);
    /* S3-FIFO: read while in the small queue, the working set moved to the main queue; the
     * scan's blocks enter the small queue and leave from there. */
    assert_int_equal(working_set_after_scan(KVS_POLICY_S3FIFO), 3);

    /* S3-FIFO skips busy blocks too (policy.h's busy-skip contract): with every block held
     * nothing can be evicted (ENOSPC, nothing lost); the one let go is the one evicted. */
    kvs_store *st = NULL;
    kvs_store_opts o = {.host_capacity = 4 * HOST(4), .eviction = KVS_POLICY_S3FIFO};
    kvs_err err;
    assert_int_equal(kvs_store_create(&o, &st, &err), 0);
    kvs_ns_spec s = small_spec("b");
    kvs_ns *ns;
    assert_int_equal(kvs_store_ns_create(st, &s, &ns, &err), 0);
    const char *names[4] = {"a0", "a1", "a2", "a3"};
    kvs_block *held[4];
    for (int i = 0; i < 4; i++) {
        assert_int_equal(put(st, ns, names[i], 4, (uint8_t)i, NULL, &err), 0);
        assert_int_equal(kvs_store_get(st, ns, names[i], 2, &held[i], &err), 0);
    }
    kvs_block *blk;
    assert_int_equal(kvs_store_block_alloc(st, ns, 4, ENC(4), &blk, &err), KVS_ENOSPC);
    kvs_store_block_release(st, held[1]);
    assert_int_equal(put(st, ns, "a4", 4, 4, NULL, &err), 0);
    expect_missing(st, ns, "a1");
    for (int i = 0; i < 4; i++) {
        if (i != 1) {
            kvs_store_block_release(st, held[i]);
            expect_block(st, ns, names[i], (uint8_t)i);
        }
    }
    expect_block(st, ns, "a4", 4);
    /* An unknown policy is refused, naming the option. */
    kvs_store *bad = NULL;
    o.eviction = (kvs_policy_kind)9;
    assert_int_equal(kvs_store_create(&o, &bad, &err), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "eviction"));
    kvs_ns_unref(ns);
    kvs_store_destroy(st);
}

static void test_drop_namespace(void **state)
{
    kvs_store *st = new_store(1 << 20);
    kvs_ns_spec s1 = small_spec("one"), s2 = small_spec("two");
    kvs_ns *n1, *n2;
    kvs_err err;
    assert_int_equal(kvs_store_ns_create(st, &s1, &n1, &err), 0);
    assert_int_equal(kvs_store_ns_create(st, &s2, &n2, &err), 0);
    assert_int_equal(put(st, n1, "a", 4, 1, NULL, &err), 0);
    assert_int_equal(put(st, n1, "b", 4, 1, NULL, &err), 0);
    assert_int_equal(put(st, n2, "a", 4, 2, NULL, &err), 0);

    /* A Put in progress when its namespace is dropped is refused at commit. */
    kvs_block *filling;
    assert_int_equal(kvs_store_block_alloc(st, n1, 4, ENC(4), &filling, &err), 0);
    uint64_t dropped = 0;
    assert_int_equal(kvs_store_ns_drop(st, "one", &dropped, &err), 0);
    assert_int_equal(dropped, 2);
    encode_fill(n1, 4, 0, kvs_block_data(filling), ENC(4));
    assert_int_equal(kvs_store_block_commit(st, filling, "c", 1, NULL, &err), KVS_ENOTFOUND);
    assert_int_equal(kvs_store_ns_drop(st, "one", NULL, &err), KVS_ENOTFOUND);

    expect_block(st, n2, "a", 2);
    kvs_store_ns_info *list;
    size_t n;
    assert_int_equal(kvs_store_ns_list(st, &list, &n, &err), 0);
    assert_int_equal(n, 1);
    assert_string_equal(list[0].spec.name, "two");
    assert_int_equal(list[0].usage.blocks, 1);
    assert_int_equal(list[0].usage.stored_bytes, ENC(4));
    assert_int_equal(list[0].usage.tokens, 4);
    free(list);
    kvs_store_stats stats;
    kvs_store_get_stats(st, &stats);
    assert_int_equal(stats.host_used, HOST(4));
    kvs_ns_unref(n1);
    kvs_ns_unref(n2);
    kvs_store_destroy(st);
}

static void test_codec_state_versions(void **state)
{
    kvs_store *st = new_store(1 << 20);
    kvs_ns_spec s = small_spec("m");
    kvs_ns *ns;
    kvs_err err;
    assert_int_equal(kvs_store_ns_create(st, &s, &ns, &err), 0);
    const kvs_codec *v0 = kvs_ns_codec(ns, KVS_KEYS);
    assert_int_equal(kvs_codec_state_version(v0), 0);
    kvs_codec_state st1 = {.version = 1};
    kvs_codec *c1;
    assert_int_equal(kvs_codec_create(&s, KVS_KEYS, &st1, &c1, &err), 0);
    assert_int_equal(kvs_ns_codec_publish(ns, KVS_KEYS, c1, &err), 0);
    assert_ptr_equal(kvs_ns_codec(ns, KVS_KEYS), c1);            /* new blocks use v1 */
    assert_ptr_equal(kvs_ns_codec_version(ns, KVS_KEYS, 0), v0); /* old blocks still decode */
    assert_ptr_equal(kvs_ns_codec_version(ns, KVS_KEYS, 1), c1);
    assert_null(kvs_ns_codec_version(ns, KVS_KEYS, 2));
    assert_int_equal(kvs_codec_state_version(kvs_ns_codec(ns, KVS_VALUES)), 0);
    kvs_codec *again;
    assert_int_equal(kvs_codec_create(&s, KVS_KEYS, &st1, &again, &err), 0);
    assert_int_equal(kvs_ns_codec_publish(ns, KVS_KEYS, again, &err), KVS_EINVAL);
    kvs_codec_destroy(again);
    kvs_ns_unref(ns);
    kvs_store_destroy(st);
}

/* ---- soak: threads put/get/delete over a shared keyspace; bytes must always match the
 * key's fill pattern (key index in every byte), and accounting must end balanced. */

typedef struct soak_arg {
    kvs_store *st;
    kvs_ns *ns;
    unsigned seed;
    int bad;
} soak_arg;

static void *soak_thread(void *p)
{
    soak_arg *a = p;
    char key[16];
    for (int i = 0; i < 4000; i++) {
        unsigned r = rand_r(&a->seed);
        int k = (int)(r % 64);
        snprintf(key, sizeof key, "k%d", k);
        kvs_err err;
        switch ((r >> 8) % 4) {
        case 0:
        case 1: {
            uint32_t t = 1 + (r >> 12) % 4;
            uint64_t bytes = ENC(t);
            kvs_block *blk;
            if (kvs_store_block_alloc(a->st, a->ns, t, bytes, &blk, &err) == 0) {
                encode_fill(a->ns, t, (uint8_t)k, kvs_block_data(blk), bytes);
                if (kvs_store_block_commit(a->st, blk, key, strlen(key), NULL, &err))
                    a->bad++;
            }
            break;
        }
        case 2: {
            kvs_block *blk;
            int rc = kvs_store_get(a->st, a->ns, key, strlen(key), &blk, &err);
            if (rc == 0) {
                const uint8_t *d = kvs_block_data(blk);
                for (uint64_t j = kvs_format_prefix_bytes(2); j < kvs_block_size(blk); j++)
                    a->bad += d[j] != k;
                kvs_store_block_release(a->st, blk);
            } else if (rc != KVS_ENOTFOUND) {
                a->bad++;
            }
            break;
        }
        default: {
            kvs_store_key sk = {key, strlen(key)};
            kvs_store_delete(a->st, a->ns, &sk, 1);
        }
        }
    }
    return NULL;
}

static void soak(kvs_policy_kind eviction)
{
    kvs_store *st = NULL;
    kvs_store_opts o = {.host_capacity = 16 * HOST(4), /* small: eviction runs constantly */
                        .eviction = eviction};
    assert_int_equal(kvs_store_create(&o, &st, NULL), 0);
    kvs_ns_spec s = small_spec("m");
    kvs_ns *ns;
    assert_int_equal(kvs_store_ns_create(st, &s, &ns, NULL), 0);
    enum { T = 4 };
    pthread_t th[T];
    soak_arg args[T];
    for (int i = 0; i < T; i++) {
        args[i] = (soak_arg){st, ns, 1234u + (unsigned)i, 0};
        assert_int_equal(pthread_create(&th[i], NULL, soak_thread, &args[i]), 0);
    }
    for (int i = 0; i < T; i++) {
        pthread_join(th[i], NULL);
        assert_int_equal(args[i].bad, 0);
    }
    kvs_store_stats stats;
    kvs_store_get_stats(st, &stats);
    assert_true(stats.host_used <= stats.host_capacity);
    kvs_store_ns_info *list;
    size_t n;
    assert_int_equal(kvs_store_ns_list(st, &list, &n, NULL), 0);
    assert_int_equal(list[0].usage.host_bytes, stats.host_used); /* nothing held */
    assert_int_equal(list[0].usage.stored_bytes + stats.host_blocks * KVS_STORE_BLOCK_META,
                     stats.host_used);
    assert_int_equal(list[0].usage.blocks, stats.host_blocks);
    free(list);
    kvs_ns_unref(ns);
    kvs_store_destroy(st);
}

static void test_concurrent_soak(void **state)
{
    soak(KVS_POLICY_LRU);
    soak(KVS_POLICY_S3FIFO);
}

/* ---------------------------------------------------------------- gpu tier (bookkeeping:
 * the store never touches the region, so a fake device address stands in for it) */

#define FAKE_DEV ((uintptr_t)0x7f0000000000ull)

static kvs_store *new_gpu_store(uint64_t host_cap, uint64_t gpu_cap, uint64_t slab)
{
    kvs_store *st = NULL;
    kvs_store_opts o = {.host_capacity = host_cap,
                        .gpu = {{FAKE_DEV, gpu_cap}},
                        .gpu_slab = slab,
                        .gpu_high_pct = 75,
                        .gpu_low_pct = 50};
    assert_int_equal(kvs_store_create(&o, &st, NULL), 0);
    assert_true(kvs_store_has_gpu(st));
    return st;
}

static int put_gpu(kvs_store *st, kvs_ns *ns, const char *key, kvs_block **out, kvs_err *err)
{
    kvs_block *blk;
    int rc = kvs_store_block_alloc_gpu(st, 0, ns, 4, 0, 1000, &blk, err);
    if (rc)
        return rc;
    kvs_block_dev *d = kvs_block_device(blk);
    assert_non_null(d);
    assert_true((uintptr_t)d->slot >= FAKE_DEV && (uintptr_t)d->slot + 1000 <= FAKE_DEV + 8000);
    d->lens[0] = 7; /* what the engine writes */
    kvs_block_set_size(blk, 300, 512);
    if (out)
        *out = blk;
    return kvs_store_block_commit(st, blk, key, strlen(key), NULL, err);
}

static void test_gpu_tier_and_demotion(void **state)
{
    /* 8 slots of 1000 bytes (slabs of 2000), high watermark 6000, low 4000. */
    kvs_store *st = new_gpu_store(1 << 20, 8000, 2000);
    kvs_ns_spec s = small_spec("g");
    kvs_ns *ns;
    kvs_err err;
    assert_int_equal(kvs_store_ns_create(st, &s, &ns, &err), 0);
    char key[16];
    for (int i = 0; i < 8; i++) {
        snprintf(key, sizeof key, "k%d", i);
        assert_int_equal(put_gpu(st, ns, key, NULL, &err), 0);
    }
    assert_int_equal(put_gpu(st, ns, "k8", NULL, &err), KVS_ENOSPC); /* full: never evicts */
    kvs_store_stats stats;
    kvs_store_get_stats(st, &stats);
    assert_int_equal(stats.gpu_used, 8000);
    assert_int_equal(stats.gpu_blocks, 8);
    assert_true(kvs_store_gpu_over_high(st, 0));

    /* Lookup reports the tier; Get hands out the GPU view (no checksum on the device). */
    kvs_store_key k0 = {"k0", 2};
    kvs_store_tier tier;
    kvs_store_lookup(st, ns, &k0, 1, &tier, NULL, NULL);
    assert_int_equal(tier, KVS_STORE_TIER_GPU);
    kvs_block *busy;
    assert_int_equal(kvs_store_get(st, ns, "k1", 2, &busy, &err), 0); /* k1 busy: not picked */
    assert_int_equal(kvs_block_device(busy)->lens[0], 7);

    /* Pick: oldest idle first (k0, k2, k3, k4) down to the low watermark. */
    kvs_block *picked[8];
    size_t n = kvs_store_gpu_pick(st, 0, picked, 8);
    assert_int_equal(n, 4);
    assert_int_equal(kvs_store_gpu_pick(st, 0, picked + n, 8), 0); /* picked once only */
    /* Demote k0 (a host copy replaces it), cancel k2, k3 is deleted meanwhile, k4 demoted. */
    kvs_block *nb;
    assert_int_equal(kvs_store_block_alloc(st, ns, 4, ENC(4), &nb, &err), 0);
    encode_fill(ns, 4, 0x5A, kvs_block_data(nb), ENC(4));
    kvs_store_demote_commit(st, picked[0], nb);
    kvs_store_lookup(st, ns, &k0, 1, &tier, NULL, NULL);
    assert_int_equal(tier, KVS_STORE_TIER_HOST);
    expect_block(st, ns, "k0", 0x5A); /* checksummed like any host block */
    kvs_store_demote_cancel(st, picked[1]);
    kvs_store_key k3 = {"k3", 2};
    assert_int_equal(kvs_store_delete(st, ns, &k3, 1), 1);
    assert_int_equal(kvs_store_block_alloc(st, ns, 4, ENC(4), &nb, &err), 0);
    kvs_store_demote_commit(st, picked[2], nb); /* k3 is gone: the copy is dropped */
    expect_missing(st, ns, "k3");
    assert_int_equal(kvs_store_block_alloc(st, ns, 4, ENC(4), &nb, &err), 0);
    encode_fill(ns, 4, 0x11, kvs_block_data(nb), ENC(4));
    kvs_store_demote_commit(st, picked[3], nb);
    expect_block(st, ns, "k4", 0x11);

    kvs_store_get_stats(st, &stats);
    assert_int_equal(stats.gpu_demotions, 2);
    assert_int_equal(stats.gpu_blocks, 5); /* k1 k2 k5 k6 k7 */
    assert_int_equal(stats.gpu_used, 5000);
    assert_int_equal(stats.host_blocks, 2);
    assert_int_equal(stats.host_used, 2 * HOST(4));
    /* Room again: new Puts land in the GPU tier; replacing a GPU block by a host one
     * frees its slot once the last reader lets go. */
    assert_int_equal(put_gpu(st, ns, "k8", NULL, &err), 0);
    assert_int_equal(put(st, ns, "k1", 4, 0x22, NULL, &err), 0);
    kvs_store_get_stats(st, &stats);
    assert_int_equal(stats.gpu_used, 6000); /* k1's slot is still held by its reader */
    kvs_store_block_release(st, busy);
    kvs_store_get_stats(st, &stats);
    assert_int_equal(stats.gpu_used, 5000);
    expect_block(st, ns, "k1", 0x22);

    /* Dropping the namespace returns every slot. */
    kvs_ns_unref(ns);
    assert_int_equal(kvs_store_ns_drop(st, "g", NULL, &err), 0);
    kvs_store_get_stats(st, &stats);
    assert_int_equal(stats.gpu_used, 0);
    assert_int_equal(stats.gpu_blocks, 0);
    assert_int_equal(stats.host_used, 0);
    kvs_store_destroy(st);
}

/* Several devices (issue 17): one gpu tier per device, each with its own slots, watermarks,
 * LRU and stats; a block stays on the device it was put on; placement of host bytes takes
 * the device with the most room; demotion picks one device's blocks only; the totals are
 * the devices' sums. Two fake device regions: 8 slots of 1000 on device 0, 4 on device 1. */
#define FAKE_DEV1 ((uintptr_t)0x7f1000000000ull)
static void test_gpu_tiers_per_device(void **state)
{
    kvs_store *st = NULL;
    kvs_store_opts o = {.host_capacity = 1 << 20,
                        .gpu = {{FAKE_DEV, 8000}, {FAKE_DEV1, 4000}},
                        .gpu_slab = 1000,
                        .gpu_high_pct = 75,
                        .gpu_low_pct = 50};
    assert_int_equal(kvs_store_create(&o, &st, NULL), 0);
    assert_int_equal(kvs_store_gpus(st), 2);
    kvs_ns_spec s = small_spec("m");
    kvs_ns *ns;
    kvs_err err;
    assert_int_equal(kvs_store_ns_create(st, &s, &ns, &err), 0);
    /* Placement by free bytes: device 0 (8000 free) until its room is device 1's (ties go
     * to the lower device), then in turns, up to both tiers' capacity (the watermarks are
     * demotion's: a Put fills a tier, then lands in the host tier and kicks demotion). */
    int want[12] = {0, 0, 0, 0, 0, 1, 0, 1, 0, 1, 0, 1};
    for (int i = 0; i < 12; i++) {
        int g = kvs_store_gpu_choose(st, ns, 1000);
        assert_int_equal(g, want[i]);
        kvs_block *blk;
        assert_int_equal(kvs_store_block_alloc_gpu(st, (unsigned)g, ns, 4, 0, 1000, &blk, &err), 0);
        assert_int_equal(kvs_block_gpu(blk), (unsigned)g);
        uintptr_t slot = (uintptr_t)kvs_block_device(blk)->slot, base = g ? FAKE_DEV1 : FAKE_DEV;
        assert_true(slot >= base && slot + 1000 <= base + (g ? 4000 : 8000));
        kvs_block_set_size(blk, 300, 512);
        char key[8];
        snprintf(key, sizeof key, "k%d", i);
        assert_int_equal(kvs_store_block_commit(st, blk, key, strlen(key), NULL, &err), 0);
    }
    assert_int_equal(kvs_store_gpu_choose(st, ns, 1000), -1); /* both full */
    kvs_store_stats stats;
    kvs_store_get_stats(st, &stats);
    assert_int_equal(stats.gpu_devices, 2);
    assert_int_equal(stats.gpu_dev[0].capacity, 8000);
    assert_int_equal(stats.gpu_dev[1].capacity, 4000);
    assert_int_equal(stats.gpu_capacity, 12000);
    assert_int_equal(stats.gpu_dev[0].used, 8000);
    assert_int_equal(stats.gpu_dev[1].used, 4000);
    assert_int_equal(stats.gpu_used, 12000);
    assert_int_equal(stats.gpu_dev[0].blocks, 8);
    assert_int_equal(stats.gpu_dev[1].blocks, 4);
    assert_int_equal(stats.gpu_blocks, 12);
    /* A device's own slots: device 1 is full; there is no device 2. */
    kvs_block *extra;
    assert_int_equal(kvs_store_block_alloc_gpu(st, 1, ns, 4, 0, 1000, &extra, &err), KVS_ENOSPC);
    assert_int_equal(kvs_store_block_alloc_gpu(st, 2, ns, 4, 0, 1000, &extra, &err), KVS_ENOSPC);
    assert_non_null(strstr(err.msg, "device 2"));
    /* Each device over its own high mark (6000 of 8000, 3000 of 4000); each round picks its
     * device's blocks only, oldest first, down to that device's low mark (4000, 2000). */
    assert_true(kvs_store_gpu_over_high(st, 0));
    assert_true(kvs_store_gpu_over_high(st, 1));
    kvs_block *picked[16];
    size_t n0 = kvs_store_gpu_pick(st, 0, picked, 16);
    assert_int_equal(n0, 4);
    size_t n1 = kvs_store_gpu_pick(st, 1, picked + n0, 16 - n0);
    assert_int_equal(n1, 2);
    for (size_t i = 0; i < n0 + n1; i++) {
        assert_int_equal(kvs_block_gpu(picked[i]), i < n0 ? 0 : 1);
        kvs_block *nb;
        assert_int_equal(kvs_store_block_alloc(st, ns, 4, ENC(4), &nb, &err), 0);
        encode_fill(ns, 4, 0x30, kvs_block_data(nb), ENC(4));
        kvs_store_demote_commit(st, picked[i], nb);
    }
    assert_false(kvs_store_gpu_over_high(st, 0));
    assert_false(kvs_store_gpu_over_high(st, 1));
    kvs_store_get_stats(st, &stats);
    assert_int_equal(stats.gpu_dev[0].demotions, 4);
    assert_int_equal(stats.gpu_dev[1].demotions, 2);
    assert_int_equal(stats.gpu_demotions, 6);
    assert_int_equal(stats.gpu_dev[0].used, 4000);
    assert_int_equal(stats.gpu_dev[1].used, 2000);
    /* A promotion goes to the device asked for, below that device's high mark only; a Get
     * hit counts on the block's device. k0 (device 0's oldest) is a host block now. */
    kvs_block *host;
    assert_int_equal(kvs_store_get(st, ns, "k0", 2, &host, &err), 0);
    assert_int_equal(kvs_block_tier(host), KVS_STORE_TIER_HOST);
    kvs_block *g1;
    assert_false(kvs_store_promote_begin(st, 1, host, 2000, &g1)); /* 2000 + 2000 > 3000 */
    assert_true(kvs_store_promote_begin(st, 1, host, 1000, &g1));
    assert_int_equal(kvs_block_gpu(g1), 1);
    kvs_block_device(g1)->lens[0] = 7;
    kvs_store_promote_commit(st, host, g1);
    kvs_store_block_release(st, host);
    kvs_block *hit;
    assert_int_equal(kvs_store_get(st, ns, "k0", 2, &hit, &err), 0);
    assert_int_equal(kvs_block_tier(hit), KVS_STORE_TIER_GPU);
    assert_int_equal(kvs_block_gpu(hit), 1);
    kvs_store_block_release(st, hit);
    kvs_store_get_stats(st, &stats);
    assert_int_equal(stats.gpu_dev[1].promotions, 1);
    assert_int_equal(stats.gpu_dev[0].promotions, 0);
    assert_int_equal(stats.gpu_dev[1].hits, 1);
    assert_int_equal(stats.gpu_dev[0].hits, 0);
    assert_int_equal(stats.gpu_dev[1].used, 3000);
    /* Dropping the namespace returns every device's slots. */
    kvs_ns_unref(ns);
    assert_int_equal(kvs_store_ns_drop(st, "m", NULL, &err), 0);
    kvs_store_get_stats(st, &stats);
    assert_int_equal(stats.gpu_dev[0].used + stats.gpu_dev[1].used, 0);
    assert_int_equal(stats.gpu_used, 0);
    assert_int_equal(stats.gpu_blocks, 0);
    kvs_store_destroy(st);
    (void)state;
}

/* Promotion of host blocks to the gpu tier (what kvs_tiering_promote drives): the gpu copy
 * takes the block's place, unless it was deleted meanwhile; one promotion at a time per
 * block; never above the high watermark; nothing with promotion off. */
static void test_gpu_promotion(void **state)
{
    /* 8 slots of 1000 bytes (slabs of 2000), high watermark 6000. */
    kvs_store *st = new_gpu_store(1 << 20, 8000, 2000);
    kvs_ns_spec s = small_spec("p");
    kvs_ns *ns;
    kvs_err err;
    assert_int_equal(kvs_store_ns_create(st, &s, &ns, &err), 0);
    for (int i = 0; i < 3; i++) {
        char key[8];
        snprintf(key, sizeof key, "h%d", i);
        assert_int_equal(put(st, ns, key, 4, (uint8_t)(0x30 + i), NULL, &err), 0);
    }
    kvs_store_stats st0, st1;
    kvs_store_get_stats(st, &st0);

    kvs_block *h, *g, *g2;
    assert_int_equal(kvs_store_get(st, ns, "h0", 2, &h, &err), 0);
    assert_true(kvs_store_promote_begin(st, 0, h, 1000, &g));
    assert_false(kvs_store_promote_begin(st, 0, h, 1000, &g2)); /* one at a time */
    assert_int_equal(kvs_block_tier(g), KVS_STORE_TIER_GPU);
    assert_int_equal(kvs_block_size(g), kvs_block_size(h));
    kvs_store_block_release(st, h); /* the promoter's reference keeps it */
    kvs_block_device(g)->lens[0] = 9;
    kvs_store_promote_commit(st, h, g);
    kvs_store_key k0 = {"h0", 2};
    kvs_store_tier tier;
    kvs_store_lookup(st, ns, &k0, 1, &tier, NULL, NULL);
    assert_int_equal(tier, KVS_STORE_TIER_GPU);
    assert_int_equal(kvs_store_get(st, ns, "h0", 2, &g2, &err), 0);
    assert_int_equal(kvs_block_device(g2)->lens[0], 9);
    kvs_store_block_release(st, g2);
    kvs_store_get_stats(st, &st1);
    assert_int_equal(st1.gpu_promotions, 1);
    assert_int_equal(st1.gpu_blocks, 1);
    assert_int_equal(st1.gpu_used, 1000);
    assert_int_equal(st1.host_blocks, 2);
    assert_int_equal(st1.host_used, st0.host_used / 3 * 2);

    /* Deleted while the copy runs: the copy is dropped, its slot returned. */
    assert_int_equal(kvs_store_get(st, ns, "h1", 2, &h, &err), 0);
    assert_true(kvs_store_promote_begin(st, 0, h, 1000, &g));
    kvs_store_block_release(st, h);
    kvs_store_key k1 = {"h1", 2};
    assert_int_equal(kvs_store_delete(st, ns, &k1, 1), 1);
    kvs_store_promote_commit(st, h, g);
    expect_missing(st, ns, "h1");
    /* Cancelled (the upload failed): it stays a host block. */
    assert_int_equal(kvs_store_get(st, ns, "h2", 2, &h, &err), 0);
    assert_true(kvs_store_promote_begin(st, 0, h, 1000, &g));
    kvs_store_promote_cancel(st, h, g);
    kvs_store_block_release(st, h);
    expect_block(st, ns, "h2", 0x32);
    kvs_store_get_stats(st, &st1);
    assert_int_equal(st1.gpu_used, 1000);
    assert_int_equal(st1.gpu_promotions, 1);

    /* No promotion that would take the gpu tier past its high watermark. */
    char key[8];
    for (int i = 0; i < 5; i++) { /* 6000 used */
        snprintf(key, sizeof key, "g%d", i);
        assert_int_equal(put_gpu(st, ns, key, NULL, &err), 0);
    }
    assert_int_equal(kvs_store_get(st, ns, "h2", 2, &h, &err), 0);
    assert_false(kvs_store_promote_begin(st, 0, h, 1000, &g));
    kvs_store_block_release(st, h);
    kvs_ns_unref(ns);
    kvs_store_destroy(st);

    /* Promotion off: nothing moves up. */
    kvs_store_opts o = {
        .host_capacity = 1 << 20, .gpu = {{FAKE_DEV, 8000}}, .gpu_slab = 2000, .no_promote = true};
    assert_int_equal(kvs_store_create(&o, &st, NULL), 0);
    assert_int_equal(kvs_store_ns_create(st, &s, &ns, &err), 0);
    assert_int_equal(put(st, ns, "h0", 4, 1, NULL, &err), 0);
    assert_int_equal(kvs_store_get(st, ns, "h0", 2, &h, &err), 0);
    assert_false(kvs_store_promote_begin(st, 0, h, 1000, &g));
    kvs_store_block_release(st, h);
    kvs_ns_unref(ns);
    kvs_store_destroy(st);
}

/* Host blocks from a pinned pool (opts.host_pool): their bytes live in the pool, evicted
 * and deleted blocks give their slots back, a block too large for a slab falls back to
 * malloc, and everything reads back as usual. */
static void test_host_pool_blocks(void **state)
{
    kvs_hostpool *pool;
    kvs_hostpool_opts po = {.max_bytes = 4 << 20, .slab_bytes = 1 << 20};
    assert_int_equal(kvs_hostpool_create(&po, &pool, NULL), 0);
    kvs_store *st;
    kvs_store_opts o = {.host_capacity = 64 << 10, .host_pool = pool};
    assert_int_equal(kvs_store_create(&o, &st, NULL), 0);
    kvs_ns_spec s = small_spec("hp");
    kvs_ns *ns;
    kvs_err err;
    assert_int_equal(kvs_store_ns_create(st, &s, &ns, &err), 0);
    uint64_t one = HOST(4); /* a full block as stored, and its bookkeeping */
    int fit = (int)((64 << 10) / one);
    char key[16];
    for (int i = 0; i < fit + 3; i++) { /* the first 3 are evicted */
        snprintf(key, sizeof key, "b%d", i);
        assert_int_equal(put(st, ns, key, 4, (uint8_t)i, NULL, &err), 0);
    }
    kvs_block *b;
    assert_int_equal(kvs_store_get(st, ns, "b5", 2, &b, &err), 0);
    assert_true(kvs_hostpool_owns(pool, kvs_block_data(b)));
    kvs_store_block_release(st, b);
    for (int i = 3; i < fit + 3; i++) {
        snprintf(key, sizeof key, "b%d", i);
        expect_block(st, ns, key, (uint8_t)i);
    }
    expect_missing(st, ns, "b0");
    kvs_hostpool_stats ps;
    kvs_hostpool_get_stats(pool, &ps);
    assert_int_equal(ps.used, (uint64_t)fit * 4096); /* the smallest slot is 4 KiB */
    /* A shrunk block keeps its slot and its bytes. */
    kvs_block *blk;
    assert_int_equal(kvs_store_block_alloc(st, ns, 2, one, &blk, &err), 0);
    kvs_block_set_size(blk, encode_fill(ns, 2, 0x77, kvs_block_data(blk), one), 256);
    assert_int_equal(kvs_store_block_commit(st, blk, "half", 4, NULL, &err), 0);
    expect_block(st, ns, "half", 0x77);
    kvs_store_stats ss;
    kvs_store_get_stats(st, &ss);
    assert_true(ss.host_used <= 64 << 10);
    kvs_ns_unref(ns);
    assert_int_equal(kvs_store_ns_drop(st, "hp", NULL, &err), 0);
    kvs_hostpool_get_stats(pool, &ps);
    assert_int_equal(ps.used, 0); /* every slot back */
    kvs_store_destroy(st);

    /* Blocks larger than a slab: malloc, transparently. */
    o.host_capacity = 8 << 20;
    assert_int_equal(kvs_store_create(&o, &st, NULL), 0);
    kvs_ns_spec big = kvs_test_spec(4, 8, 128, 256, KVS_DTYPE_FP16, "none", "none", 0);
    snprintf(big.name, sizeof big.name, "big");
    assert_int_equal(kvs_store_ns_create(st, &big, &ns, &err), 0);
    assert_int_equal(put(st, ns, "B", 256, 0x42, NULL, &err), 0); /* 4 MiB */
    assert_int_equal(kvs_store_get(st, ns, "B", 1, &b, &err), 0);
    assert_false(kvs_hostpool_owns(pool, kvs_block_data(b)));
    kvs_store_block_release(st, b);
    expect_block(st, ns, "B", 0x42);
    kvs_ns_unref(ns);
    kvs_store_destroy(st);
    kvs_hostpool_destroy(pool);
}

static void test_gpu_abort_and_absent(void **state)
{
    kvs_store *st = new_store(1 << 20);
    kvs_ns_spec s = small_spec("a");
    kvs_ns *ns;
    kvs_err err;
    kvs_block *blk;
    assert_int_equal(kvs_store_ns_create(st, &s, &ns, &err), 0);
    assert_false(kvs_store_has_gpu(st));
    assert_int_equal(kvs_store_block_alloc_gpu(st, 0, ns, 4, 0, 100, &blk, &err), KVS_ENOSPC);
    assert_false(kvs_store_gpu_over_high(st, 0));
    kvs_ns_unref(ns);
    kvs_store_destroy(st);

    st = new_gpu_store(1 << 20, 4000, 1000);
    assert_int_equal(kvs_store_ns_create(st, &s, &ns, &err), 0);
    assert_int_equal(kvs_store_block_alloc_gpu(st, 0, ns, 4, 0, 1000, &blk, &err), 0);
    kvs_store_stats stats;
    kvs_store_get_stats(st, &stats);
    assert_int_equal(stats.gpu_used, 1000);
    kvs_store_block_abort(st, blk);
    kvs_store_get_stats(st, &stats);
    assert_int_equal(stats.gpu_used, 0);
    /* A slot larger than a slab is refused with a reason, not a crash. */
    assert_int_equal(kvs_store_block_alloc_gpu(st, 0, ns, 4, 0, 1001, &blk, &err), KVS_EINVAL);
    kvs_ns_unref(ns);
    kvs_store_destroy(st);
}

/* ---------------------------------------------------------------- disk tier */

typedef struct disk_fx {
    char dir[64];
    kvs_disk *disk;
    kvs_store *st;
    kvs_ns *ns;
} disk_fx;

/* A disk tier of `budget` bytes (unsynced: tests) in a fresh directory made in dir (64
 * bytes), named after tag. */
static kvs_disk *tmp_disk(char *dir, const char *tag, uint64_t budget)
{
    snprintf(dir, 64, "/tmp/kvs-test-%s-XXXXXX", tag);
    assert_non_null(mkdtemp(dir));
    kvs_err err;
    kvs_disk_opts dopts = {.nosync = true};
    kvs_disk *disk;
    if (kvs_disk_open(dir, budget, &dopts, &disk, &err))
        fail_msg("%s", err.msg);
    return disk;
}

/* A store of host_blocks full blocks (namespace "d": L=2 H=2 D=16 T=8, codec `codec`) over
 * a fresh disk tier of disk_budget bytes. */
static void fx_open_wm(disk_fx *f, const char *codec, uint64_t host_bytes, uint64_t disk_budget,
                       bool no_promote, unsigned high, unsigned low)
{
    f->disk = tmp_disk(f->dir, "store", disk_budget);
    kvs_err err;
    kvs_store_opts o = {.host_capacity = host_bytes,
                        .disk = f->disk,
                        .disk_capacity = disk_budget,
                        .spill_max = 64 << 20,
                        .no_promote = no_promote,
                        .host_high_pct = high,
                        .host_low_pct = low};
    assert_int_equal(kvs_store_create(&o, &f->st, &err), 0);
    kvs_ns_spec s = kvs_test_spec(2, 2, 16, 8, KVS_DTYPE_FP16, codec, codec, 5);
    snprintf(s.name, sizeof s.name, "d");
    assert_int_equal(kvs_store_ns_create(f->st, &s, &f->ns, &err), 0);
}

static void fx_open(disk_fx *f, const char *codec, uint64_t host_bytes, uint64_t disk_budget,
                    bool no_promote)
{
    /* Watermarks at 100%: background demotion never starts; blocks leave on demand. */
    fx_open_wm(f, codec, host_bytes, disk_budget, no_promote, 100, 100);
}

static void fx_close(disk_fx *f)
{
    kvs_ns_unref(f->ns);
    kvs_store_destroy(f->st);
    kvs_disk_close(f->disk);
    kvs_test_rmtree(f->dir);
}

/* Puts a real encoded block of t tokens drawn from seed under key; returns its bytes
 * (malloc'd) and length. */
static uint8_t *put_enc(disk_fx *f, const char *key, uint32_t t, uint64_t seed, size_t *len)
{
    const kvs_ns_spec *sp = kvs_ns_spec_of(f->ns);
    uint64_t raw_bytes;
    assert_int_equal(kvs_spec_block_bytes(sp, t, &raw_bytes, NULL), 0);
    uint16_t *raw = kvs_test_gauss_data(raw_bytes / 2, seed, 1.0, sp->dtype);
    const kvs_codec *k = kvs_ns_codec(f->ns, KVS_KEYS), *v = kvs_ns_codec(f->ns, KVS_VALUES);
    size_t cap = kvs_block_encoded_max(k, v, t);
    kvs_block *blk;
    kvs_err err;
    assert_int_equal(kvs_store_block_alloc(f->st, f->ns, t, cap, &blk, &err), 0);
    assert_int_equal(
        kvs_block_encode(k, v, kvs_ns_id(f->ns), t, raw, kvs_block_data(blk), cap, len, &err), 0);
    kvs_block_set_size(blk, *len, raw_bytes);
    uint8_t *copy = malloc(*len);
    memcpy(copy, kvs_block_data(blk), *len);
    assert_int_equal(kvs_store_block_commit(f->st, blk, key, strlen(key), NULL, &err), 0);
    free(raw);
    return copy;
}

static kvs_store_tier tier_of(disk_fx *f, const char *key)
{
    kvs_store_key k = {key, strlen(key)};
    kvs_store_tier t;
    kvs_store_lookup(f->st, f->ns, &k, 1, &t, NULL, NULL);
    return t;
}

/* Gets key and compares with want; returns the tier the block came in. */
static kvs_store_tier expect_bytes(disk_fx *f, const char *key, const uint8_t *want, size_t len)
{
    kvs_block *blk;
    kvs_err err;
    int rc = kvs_store_get(f->st, f->ns, key, strlen(key), &blk, &err);
    if (rc)
        fail_msg("get %s: %s", key, err.msg);
    assert_int_equal(kvs_block_size(blk), len);
    assert_memory_equal(kvs_block_data(blk), want, len);
    kvs_store_tier t = kvs_block_tier(blk);
    kvs_store_block_release(f->st, blk);
    return t;
}

#define NB 12

static void test_disk_spill_get_promote(void **state)
{
    disk_fx f;
    fx_open(&f, "none", 3 * (2200 + KVS_STORE_BLOCK_META), 16 << 20,
            false); /* a none block of 8 tokens: ~2.1 KB */
    uint8_t *want[NB];
    size_t len[NB];
    char key[16];
    for (int i = 0; i < NB; i++) {
        snprintf(key, sizeof key, "k%d", i);
        want[i] = put_enc(&f, key, 8, 100 + i, &len[i]);
    }
    kvs_store_disk_wait(f.st);
    kvs_store_stats s;
    kvs_store_get_stats(f.st, &s);
    assert_true(kvs_store_has_disk(f.st));
    assert_int_equal(s.disk_blocks + s.host_blocks, NB);
    assert_true(s.disk_blocks >= NB - 3);
    assert_int_equal(s.disk_spills, s.disk_blocks);
    assert_int_equal(s.spill_dropped, 0);
    assert_int_equal(s.spill_pending, 0);
    assert_true(s.host_used <= s.host_capacity);
    assert_int_equal(tier_of(&f, "k0"), KVS_STORE_TIER_DISK);
    assert_int_equal(tier_of(&f, "k11"), KVS_STORE_TIER_HOST);

    /* Every block comes back byte for byte; a disk block is promoted to the host tier. */
    for (int i = 0; i < NB; i++) {
        snprintf(key, sizeof key, "k%d", i);
        expect_bytes(&f, key, want[i], len[i]);
    }
    /* Read last, with the writer idle: the reads above spilled k11, and a block read while
     * its write is queued is served from the host tier, then becomes a disk entry. */
    kvs_store_disk_wait(f.st);
    expect_bytes(&f, "k11", want[11], len[11]);
    assert_int_equal(tier_of(&f, "k11"), KVS_STORE_TIER_HOST);
    kvs_store_disk_wait(f.st);
    kvs_store_get_stats(f.st, &s);
    assert_true(s.disk_promotions >= NB - 3);
    assert_true(s.disk_hits >= NB - 3);
    assert_int_equal(s.disk_blocks + s.host_blocks, NB);
    /* Promoted blocks keep their record: evicting them again wrote nothing new, and a
     * second round of reads still finds everything. */
    for (int i = 0; i < NB; i++) {
        snprintf(key, sizeof key, "k%d", i);
        expect_bytes(&f, key, want[i], len[i]);
        free(want[i]);
    }
    kvs_disk_stats ds;
    assert_int_equal(kvs_disk_get_stats(f.disk, &ds, NULL), 0);
    assert_true(ds.blocks <= NB);
    fx_close(&f);
}

/* Waits (up to 10 s) until the host tier is at most `bytes` and the writer's queue is
 * empty: background demotion runs on the writer thread, after the batch it is kicked in. */
static void wait_host_at_most(disk_fx *f, uint64_t bytes)
{
    kvs_store_stats s;
    for (int i = 0; i < 1000; i++) {
        kvs_store_disk_wait(f->st);
        kvs_store_get_stats(f->st, &s);
        if (s.host_used <= bytes && s.spill_pending == 0)
            return;
        usleep(10000);
    }
    fail_msg("host tier still at %llu bytes (want <= %llu), %llu pending",
             (unsigned long long)s.host_used, (unsigned long long)bytes,
             (unsigned long long)s.spill_pending);
}

/* Above its high watermark the host tier demotes its idle blocks to disk in the background
 * (oldest first under LRU) down to the low watermark, without a Put asking for room, and
 * drops nothing; below it nothing moves. */
static void test_host_watermarks(void **state)
{
    disk_fx f;
    size_t one;
    uint8_t *probe;
    /* Size one block first (a none block of 8 tokens is ~2.1 KB). */
    fx_open(&f, "none", 1 << 20, 16 << 20, false);
    probe = put_enc(&f, "probe", 8, 1, &one);
    free(probe);
    fx_close(&f);

    /* Room for 20.5 blocks: the high watermark (50%) lies between 10 and 11 blocks, the
     * low one (30%) between 6 and 7. */
    one += KVS_STORE_BLOCK_META;
    const uint64_t cap = 20 * one + one / 2;
    fx_open_wm(&f, "none", cap, 16 << 20, false, 50, 30);
    uint8_t *want[NB];
    size_t len[NB];
    char key[16];
    for (int i = 0; i < 10; i++) {
        snprintf(key, sizeof key, "k%d", i);
        want[i] = put_enc(&f, key, 8, 200 + i, &len[i]);
    }
    kvs_store_disk_wait(f.st);
    kvs_store_stats s;
    kvs_store_get_stats(f.st, &s);
    assert_int_equal(s.disk_blocks, 0);
    assert_int_equal(s.host_blocks, 10);
    assert_int_equal(s.host_evictions, 0);

    /* The 11th crosses it: the 5 oldest go to disk, the 6 newest stay. */
    want[10] = put_enc(&f, "k10", 8, 210, &len[10]);
    wait_host_at_most(&f, cap / 100 * 30);
    kvs_store_get_stats(f.st, &s);
    assert_int_equal(s.host_blocks, 6);
    assert_int_equal(s.disk_blocks, 5);
    assert_int_equal(s.disk_spills, 5);
    assert_int_equal(s.spill_dropped, 0);
    assert_int_equal(tier_of(&f, "k0"), KVS_STORE_TIER_DISK);
    assert_int_equal(tier_of(&f, "k4"), KVS_STORE_TIER_DISK);
    assert_int_equal(tier_of(&f, "k5"), KVS_STORE_TIER_HOST);
    assert_int_equal(tier_of(&f, "k10"), KVS_STORE_TIER_HOST);

    /* Between the watermarks again: the next Put moves nothing (hysteresis). */
    want[11] = put_enc(&f, "k11", 8, 211, &len[11]);
    kvs_store_disk_wait(f.st);
    kvs_store_get_stats(f.st, &s);
    assert_int_equal(s.host_blocks, 7);
    assert_int_equal(s.disk_spills, 5);
    for (int i = 0; i < NB; i++) {
        snprintf(key, sizeof key, "k%d", i);
        expect_bytes(&f, key, want[i], len[i]);
        free(want[i]);
    }
    fx_close(&f);
}

static void test_disk_no_promote(void **state)
{
    disk_fx f;
    fx_open(&f, "kivi-2", 2 * 1024, 16 << 20, true);
    uint8_t *want[4];
    size_t len[4];
    char key[16];
    for (int i = 0; i < 4; i++) {
        snprintf(key, sizeof key, "k%d", i);
        want[i] = put_enc(&f, key, 8, 7 + i, &len[i]);
    }
    kvs_store_disk_wait(f.st);
    assert_int_equal(tier_of(&f, "k0"), KVS_STORE_TIER_DISK);
    assert_int_equal(expect_bytes(&f, "k0", want[0], len[0]), KVS_STORE_TIER_DISK);
    assert_int_equal(tier_of(&f, "k0"), KVS_STORE_TIER_DISK); /* stays on disk */
    for (int i = 0; i < 4; i++) {
        snprintf(key, sizeof key, "k%d", i);
        expect_bytes(&f, key, want[i], len[i]);
        free(want[i]);
    }
    kvs_store_stats s;
    kvs_store_get_stats(f.st, &s);
    assert_int_equal(s.disk_promotions, 0);
    fx_close(&f);
}

/* kvs_store_find leaves a disk block unread (no LMDB read on the caller's thread);
 * kvs_store_read finishes it like kvs_store_get. */
static void test_disk_find_then_read(void **state)
{
    disk_fx f;
    fx_open(&f, "none", 2 * (2200 + KVS_STORE_BLOCK_META), 16 << 20, false);
    size_t len;
    uint8_t *b0 = put_enc(&f, "k0", 8, 21, &len);
    free(put_enc(&f, "k1", 8, 22, &len));
    free(put_enc(&f, "k2", 8, 23, &len));
    kvs_store_disk_wait(f.st);
    assert_int_equal(tier_of(&f, "k0"), KVS_STORE_TIER_DISK);
    kvs_block *d, *got;
    kvs_err err;
    assert_int_equal(kvs_store_find(f.st, f.ns, "k0", 2, &d, &err), 0);
    assert_true(kvs_block_unread(d));
    assert_null(kvs_block_data(d));
    assert_int_equal(kvs_block_size(d), len);
    assert_int_equal(kvs_block_tokens(d), 8);
    assert_int_equal(kvs_store_read(f.st, d, &got, &err), 0);
    assert_false(kvs_block_unread(got));
    assert_memory_equal(kvs_block_data(got), b0, len);
    kvs_store_block_release(f.st, got);
    /* A host block comes back readable, and read hands it back as it is. */
    assert_int_equal(kvs_store_find(f.st, f.ns, "k2", 2, &d, &err), 0);
    assert_false(kvs_block_unread(d));
    assert_int_equal(kvs_store_read(f.st, d, &got, &err), 0);
    assert_ptr_equal(got, d);
    kvs_store_block_release(f.st, got);
    /* Deleted between find and read: the read answers not found and drops the entry. */
    kvs_store_disk_wait(f.st);
    const char *cold = tier_of(&f, "k1") == KVS_STORE_TIER_DISK ? "k1" : "k0";
    assert_int_equal(tier_of(&f, cold), KVS_STORE_TIER_DISK);
    assert_int_equal(kvs_store_find(f.st, f.ns, cold, 2, &d, &err), 0);
    kvs_store_key del = {cold, 2};
    assert_int_equal(kvs_store_delete(f.st, f.ns, &del, 1), 1);
    kvs_store_disk_wait(f.st);
    assert_int_equal(kvs_store_read(f.st, d, &got, &err), KVS_ENOTFOUND);
    free(b0);
    fx_close(&f);
}

static int noop_cb(const void *b, size_t n, void *a)
{
    return 0;
}

static int disk_present(disk_fx *f, const char *key)
{
    return kvs_disk_get(f->disk, kvs_ns_id(f->ns), key, strlen(key), noop_cb, NULL, NULL);
}

typedef struct seen {
    const uint8_t *want;
    size_t len;
    int calls;
} seen;

static int compare_view(const void *bytes, size_t len, void *arg)
{
    seen *v = arg;
    v->calls++;
    assert_int_equal(len, v->len);
    assert_memory_equal(bytes, v->want, len);
    return 0;
}

static int refuse_view(const void *bytes, size_t len, void *arg)
{
    return KVS_EPROTO;
}

/* With promotion off, a disk block can be read zero-copy (kvs_store_view): the callback
 * sees its verified bytes in LMDB's map, the block stays a disk entry; a corrupt record is
 * data loss and forgotten; the callback's error comes back as it is. */
static void test_disk_view(void **state)
{
    disk_fx f;
    fx_open(&f, "kivi-2", 2 * 1024, 16 << 20, true);
    uint8_t *want[4];
    size_t len[4];
    char key[8];
    for (int i = 0; i < 4; i++) {
        snprintf(key, sizeof key, "k%d", i);
        want[i] = put_enc(&f, key, 8, 40 + i, &len[i]);
    }
    kvs_store_disk_wait(f.st);
    assert_false(kvs_store_promotes(f.st));
    kvs_block *d, *h;
    kvs_err err;
    kvs_store_stats s0, s1;
    kvs_store_get_stats(f.st, &s0);
    assert_int_equal(kvs_store_find(f.st, f.ns, "k0", 2, &d, &err), 0);
    assert_true(kvs_block_unread(d));
    seen v = {want[0], len[0], 0};
    assert_int_equal(kvs_store_view(f.st, d, compare_view, &v, &err), 0);
    assert_int_equal(v.calls, 1);
    assert_true(kvs_block_unread(d)); /* nothing copied, still a disk entry */
    assert_int_equal(kvs_store_view(f.st, d, refuse_view, NULL, &err), KVS_EPROTO);
    kvs_store_block_release(f.st, d);
    assert_int_equal(tier_of(&f, "k0"), KVS_STORE_TIER_DISK);
    kvs_store_get_stats(f.st, &s1);
    assert_int_equal(s1.disk_hits, s0.disk_hits + 2);

    /* A record with a flipped byte: data loss, counted, the entry forgotten. */
    want[1][len[1] - 1] ^= 1;
    kvs_disk_item it = {kvs_ns_id(f.ns), "k1", 2, want[1], len[1]};
    assert_int_equal(kvs_disk_put_batch(f.disk, &it, 1, NULL), 0);
    assert_int_equal(kvs_store_find(f.st, f.ns, "k1", 2, &d, &err), 0);
    v = (seen){want[1], len[1], 0};
    assert_int_equal(kvs_store_view(f.st, d, compare_view, &v, &err), KVS_EDATALOSS);
    assert_int_equal(v.calls, 0);
    kvs_store_block_release(f.st, d);
    assert_int_equal(tier_of(&f, "k1"), KVS_STORE_TIER_NONE);
    kvs_store_get_stats(f.st, &s1);
    assert_int_equal(s1.checksum_failures, s0.checksum_failures + 1);

    /* Not an unread disk block: refused. */
    assert_int_equal(kvs_store_find(f.st, f.ns, "k3", 2, &h, &err), 0);
    if (!kvs_block_unread(h))
        assert_int_equal(kvs_store_view(f.st, h, compare_view, &v, &err), KVS_EINVAL);
    kvs_store_block_release(f.st, h);
    for (int i = 0; i < 4; i++)
        free(want[i]);
    fx_close(&f);
}

typedef struct barrier_seen {
    disk_fx *f;
    int rc, calls;
    bool record_gone;
} barrier_seen;

static int read_nothing(const void *bytes, size_t len, void *arg)
{
    return 0;
}

static void on_barrier(void *arg, int rc, const kvs_err *err)
{
    barrier_seen *b = arg;
    b->calls++;
    b->rc = rc;
    b->record_gone = kvs_disk_get(b->f->disk, kvs_ns_id(b->f->ns), "b0", 2, read_nothing, NULL,
                                  NULL) == KVS_ENOTFOUND;
}

/* kvs_store_disk_barrier runs once what was queued before it is applied: a deleted
 * block's record is gone from LMDB when it runs (a durable Delete answers then). */
static void test_disk_barrier(void **state)
{
    disk_fx f;
    fx_open(&f, "none", 1 << 20, 16 << 20, false);
    size_t len;
    free(put_enc(&f, "b0", 8, 1, &len));
    kvs_store_key k = {"b0", 2};
    kvs_store_evict_info ei;
    kvs_store_sel sel = {f.ns, &k, 1};
    kvs_err err;
    assert_int_equal(kvs_store_evict(f.st, &sel, KVS_STORE_TIER_DISK, NULL, NULL, &ei, &err), 0);
    assert_int_equal(ei.moved, 1);
    assert_int_equal(kvs_store_delete(f.st, f.ns, &k, 1), 1);
    barrier_seen b = {.f = &f, .rc = -1};
    kvs_store_disk_barrier(f.st, on_barrier, &b);
    kvs_store_disk_wait(f.st); /* the barrier ran before this returns (one FIFO) */
    assert_int_equal(b.calls, 1);
    assert_int_equal(b.rc, 0);
    assert_true(b.record_gone);
    fx_close(&f);
}

static void test_disk_delete_replace_drop(void **state)
{
    disk_fx f;
    fx_open(&f, "none", 2 * (2200 + KVS_STORE_BLOCK_META), 16 << 20, false);
    size_t len;
    char key[16];
    for (int i = 0; i < 6; i++) {
        snprintf(key, sizeof key, "k%d", i);
        free(put_enc(&f, key, 8, 40 + i, &len));
    }
    kvs_store_disk_wait(f.st);
    assert_int_equal(tier_of(&f, "k0"), KVS_STORE_TIER_DISK);
    assert_int_equal(disk_present(&f, "k0"), 0);

    kvs_store_key del = {"k0", 2};
    assert_int_equal(kvs_store_delete(f.st, f.ns, &del, 1), 1);
    kvs_store_disk_wait(f.st);
    assert_int_equal(disk_present(&f, "k0"), KVS_ENOTFOUND);
    assert_int_equal(tier_of(&f, "k0"), KVS_STORE_TIER_NONE);

    /* Replacing a disk block: the new bytes are served, the old record goes. */
    assert_int_equal(tier_of(&f, "k1"), KVS_STORE_TIER_DISK);
    uint8_t *nw = put_enc(&f, "k1", 3, 999, &len);
    kvs_store_disk_wait(f.st);
    expect_bytes(&f, "k1", nw, len);
    free(nw);
    kvs_store_stats s;
    kvs_store_get_stats(f.st, &s);
    assert_int_equal(s.disk_blocks + s.host_blocks, 5);

    uint64_t dropped = 0;
    assert_int_equal(kvs_store_ns_drop(f.st, "d", &dropped, NULL), 0);
    assert_int_equal(dropped, 5);
    kvs_store_disk_wait(f.st);
    kvs_disk_stats ds;
    assert_int_equal(kvs_disk_get_stats(f.disk, &ds, NULL), 0);
    assert_int_equal(ds.blocks, 0);
    kvs_store_get_stats(f.st, &s);
    assert_int_equal(s.disk_used, 0);
    assert_int_equal(s.disk_blocks, 0);
    fx_close(&f);
}

static void test_disk_corrupt_record_is_data_loss(void **state)
{
    disk_fx f;
    fx_open(&f, "none", 2 * (2200 + KVS_STORE_BLOCK_META), 16 << 20, false);
    size_t len;
    uint8_t *b0 = put_enc(&f, "k0", 8, 1, &len);
    free(put_enc(&f, "k1", 8, 2, &len));
    free(put_enc(&f, "k2", 8, 3, &len));
    kvs_store_disk_wait(f.st);
    assert_int_equal(tier_of(&f, "k0"), KVS_STORE_TIER_DISK);
    /* Rewrite k0's record with one payload bit flipped (the header stays valid). */
    b0[len - 1] ^= 0x10;
    kvs_disk_item it = {kvs_ns_id(f.ns), "k0", 2, b0, len};
    assert_int_equal(kvs_disk_put_batch(f.disk, &it, 1, NULL), 0);
    kvs_block *blk;
    kvs_err err;
    assert_int_equal(kvs_store_get(f.st, f.ns, "k0", 2, &blk, &err), KVS_EDATALOSS);
    assert_int_equal(tier_of(&f, "k0"), KVS_STORE_TIER_NONE);
    assert_int_equal(kvs_store_get(f.st, f.ns, "k0", 2, &blk, &err), KVS_ENOTFOUND);
    kvs_store_disk_wait(f.st); /* the attempted promotion may have spilled k1 */
    kvs_store_stats s;
    kvs_store_get_stats(f.st, &s);
    assert_int_equal(s.checksum_failures, 1);
    assert_int_equal(s.disk_blocks + s.host_blocks, 2);
    free(b0);
    fx_close(&f);
}

static void test_disk_budget_eviction(void **state)
{
    disk_fx f;
    fx_open(&f, "none", 2 * (2200 + KVS_STORE_BLOCK_META), 4 * 2200,
            false); /* room for 4 blocks on disk */
    uint8_t *want[NB];
    size_t len[NB];
    char key[16];
    for (int i = 0; i < NB; i++) {
        snprintf(key, sizeof key, "k%d", i);
        want[i] = put_enc(&f, key, 8, 300 + i, &len[i]);
        kvs_store_disk_wait(f.st);
    }
    kvs_store_stats s;
    kvs_store_get_stats(f.st, &s);
    assert_true(s.disk_used <= s.disk_capacity);
    assert_true(s.disk_evictions >= NB - 2 - 4);
    assert_true(s.host_blocks + s.disk_blocks >= 5); /* 2 in RAM, about 4 on disk */
    /* Served byte for byte or reported missing (reads promote, which spills and evicts
     * again meanwhile). */
    int found = 0;
    for (int i = 0; i < NB; i++) {
        snprintf(key, sizeof key, "k%d", i);
        kvs_block *blk;
        kvs_err err;
        int rc = kvs_store_get(f.st, f.ns, key, strlen(key), &blk, &err);
        if (rc == 0) {
            assert_memory_equal(kvs_block_data(blk), want[i], len[i]);
            kvs_store_block_release(f.st, blk);
            found++;
        } else {
            assert_int_equal(rc, KVS_ENOTFOUND);
        }
        free(want[i]);
    }
    assert_true(found >= 2);
    fx_close(&f);
}

static void test_disk_write_error(void **state)
{
    disk_fx f;
    fx_open(&f, "none", 2 * (2200 + KVS_STORE_BLOCK_META), 16 << 20, false);
    size_t len;
    free(put_enc(&f, "k0", 8, 1, &len));
    free(put_enc(&f, "k1", 8, 2, &len));
    kvs_disk_test_fail_write(f.disk, 1, 5 /* EIO */);
    uint8_t *b2 = put_enc(&f, "k2", 8, 3, &len); /* k0 goes to the writer, which fails */
    kvs_store_disk_wait(f.st);
    kvs_store_stats s;
    kvs_store_get_stats(f.st, &s);
    assert_int_equal(s.disk_write_errors, 1);
    assert_int_equal(s.spill_dropped, 1);
    assert_int_equal(tier_of(&f, "k0"), KVS_STORE_TIER_NONE);
    free(put_enc(&f, "k3", 8, 4, &len)); /* later writes work again */
    kvs_store_disk_wait(f.st);
    assert_int_equal(tier_of(&f, "k1"), KVS_STORE_TIER_DISK);
    expect_bytes(&f, "k2", b2, len);
    free(b2);
    fx_close(&f);
}

/* The disk tier's records are indexed in memory whatever their size: with blocks of a few
 * hundred bytes, its byte budget let the index outgrow RAM. disk_max_records bounds them:
 * past it the oldest non-durable records are evicted, as past the byte budget. */
static void test_disk_records_are_bounded(void **state)
{
    (void)state;
    disk_fx f;
    f.disk = tmp_disk(f.dir, "records", 16 << 20);
    kvs_err err;
    kvs_store_opts o = {.host_capacity = 2 * (2200 + KVS_STORE_BLOCK_META),
                        .disk = f.disk,
                        .disk_capacity = 16 << 20,
                        .disk_max_records = 3,
                        .spill_max = 64 << 20,
                        .host_high_pct = 100,
                        .host_low_pct = 100};
    assert_int_equal(kvs_store_create(&o, &f.st, &err), 0);
    kvs_ns_spec s = kvs_test_spec(2, 2, 16, 8, KVS_DTYPE_FP16, "none", "none", 5);
    snprintf(s.name, sizeof s.name, "d");
    assert_int_equal(kvs_store_ns_create(f.st, &s, &f.ns, &err), 0);
    char key[16];
    size_t len;
    uint8_t *last = NULL;
    for (int i = 0; i < 8; i++) { /* two stay in the host tier, the rest spill */
        snprintf(key, sizeof key, "k%d", i);
        free(last);
        last = put_enc(&f, key, 8, 900 + i, &len);
        kvs_store_disk_wait(f.st);
    }
    kvs_store_stats st;
    kvs_store_get_stats(f.st, &st);
    assert_int_equal(st.disk_max_records, 3);
    assert_int_equal(st.disk_records, 3);
    assert_int_equal(st.disk_blocks, 3);
    assert_int_equal(st.host_blocks, 2);
    assert_int_equal(st.disk_evictions, 3);
    assert_int_equal(tier_of(&f, "k0"), KVS_STORE_TIER_NONE); /* the oldest went */
    assert_int_equal(tier_of(&f, "k5"), KVS_STORE_TIER_DISK);
    expect_bytes(&f, "k7", last, len);
    free(last);
    fx_close(&f);
}

/* A GPU block with a disk record (a flushed host block, promoted), demoted with a re-encode
 * to a colder host codec: its record no longer holds its bytes and goes (store_gpu.c). The
 * tier's disk_used and the namespace's disk_bytes (its disk quota's measure) both give the
 * bytes back: disk_used alone did, and the namespace stayed charged for a record it no
 * longer had. */
static void test_demotion_recode_drops_the_record_everywhere(void **state)
{
    (void)state;
    char dir[64];
    kvs_disk *disk = tmp_disk(dir, "recode", 16 << 20);
    kvs_store_opts o = {.host_capacity = 1 << 20,
                        .disk = disk,
                        .disk_capacity = 16 << 20,
                        .spill_max = 1 << 20,
                        .host_high_pct = 100,
                        .host_low_pct = 100,
                        .gpu = {{FAKE_DEV, 8000}},
                        .gpu_slab = 2000,
                        .gpu_high_pct = 75,
                        .gpu_low_pct = 50};
    kvs_store *st;
    kvs_err err;
    assert_int_equal(kvs_store_create(&o, &st, &err), 0);
    kvs_ns_spec s = small_spec("r");
    kvs_ns *ns;
    assert_int_equal(kvs_store_ns_create(st, &s, &ns, &err), 0);
    assert_int_equal(put(st, ns, "k", 4, 0x21, NULL, &err), 0);
    assert_int_equal(kvs_store_flush(st), 1); /* a record for the host block */
    kvs_store_disk_wait(st);
    kvs_block *h, *g;
    assert_int_equal(kvs_store_get(st, ns, "k", 1, &h, &err), 0);
    assert_true(kvs_store_promote_begin(st, 0, h, 1000, &g));
    kvs_store_block_release(st, h);
    kvs_store_promote_commit(st, h, g); /* the record stays with the block (invariant 7) */
    kvs_store_stats stats;
    kvs_store_ns_info *list;
    size_t n;
    kvs_store_get_stats(st, &stats);
    assert_int_equal(kvs_store_ns_list(st, &list, &n, &err), 0);
    assert_int_equal(stats.disk_used, ENC(4));
    assert_int_equal(list[0].usage.disk_bytes, ENC(4));
    free(list);
    /* Over the GPU tier's high mark: the promoted block, the oldest, is picked first. */
    for (int i = 0; i < 6; i++) {
        char key[8];
        snprintf(key, sizeof key, "g%d", i);
        assert_int_equal(put_gpu(st, ns, key, NULL, &err), 0);
    }
    kvs_block *picked[8];
    size_t np = kvs_store_gpu_pick(st, 0, picked, 8);
    assert_true(np >= 1);
    assert_ptr_equal(picked[0], g);
    kvs_block *nb;
    assert_int_equal(kvs_store_block_alloc(st, ns, 4, ENC(4), &nb, &err), 0);
    encode_fill(ns, 4, 0x21, kvs_block_data(nb), ENC(4));
    kvs_block_set_enc(nb, KVS_ENC_PACK(KVS_ENC_HOST, KVS_ENC_HOST)); /* re-encoded colder */
    kvs_store_demote_commit(st, picked[0], nb);
    for (size_t i = 1; i < np; i++)
        kvs_store_demote_cancel(st, picked[i]);
    kvs_store_disk_wait(st);
    kvs_store_get_stats(st, &stats);
    assert_int_equal(kvs_store_ns_list(st, &list, &n, &err), 0);
    assert_int_equal(stats.disk_used, 0);
    assert_int_equal(list[0].usage.disk_bytes, 0);
    free(list);
    expect_block(st, ns, "k", 0x21);
    kvs_ns_unref(ns);
    kvs_store_destroy(st);
    kvs_disk_close(disk);
    kvs_test_rmtree(dir);
}

/* ---- durable namespaces */

typedef struct durable_wait {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool done;
    int rc;
    char msg[KVS_ERR_MSG_LEN];
} durable_wait;

static void durable_cb(void *arg, int rc, const kvs_err *err)
{
    durable_wait *w = arg;
    pthread_mutex_lock(&w->mu);
    w->done = true;
    w->rc = rc;
    snprintf(w->msg, sizeof w->msg, "%s", err ? err->msg : "");
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

/* Commits a block of `fill` bytes (t tokens, a real none-encoded block: the disk module
 * checks headers) durably under key and waits for its callback; returns the callback's rc.
 * *enc (may be NULL) receives a copy of the bytes (free it). */
static int put_durable(disk_fx *f, kvs_ns *ns, const char *key, uint64_t seed, uint8_t **enc,
                       size_t *len, char *msg)
{
    const kvs_ns_spec *sp = kvs_ns_spec_of(ns);
    uint64_t raw_bytes;
    assert_int_equal(kvs_spec_block_bytes(sp, 8, &raw_bytes, NULL), 0);
    uint16_t *raw = kvs_test_gauss_data(raw_bytes / 2, seed, 1.0, sp->dtype);
    const kvs_codec *k = kvs_ns_codec(ns, KVS_KEYS), *v = kvs_ns_codec(ns, KVS_VALUES);
    size_t cap = kvs_block_encoded_max(k, v, 8), n;
    kvs_block *blk;
    kvs_err err;
    assert_int_equal(kvs_store_block_alloc(f->st, ns, 8, cap, &blk, &err), 0);
    assert_int_equal(
        kvs_block_encode(k, v, kvs_ns_id(ns), 8, raw, kvs_block_data(blk), cap, &n, &err), 0);
    free(raw);
    kvs_block_set_size(blk, n, raw_bytes);
    if (enc) {
        *enc = malloc(n);
        memcpy(*enc, kvs_block_data(blk), n);
        *len = n;
    }
    durable_wait w = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};
    kvs_store_put_info info;
    assert_int_equal(
        kvs_store_block_commit_durable(f->st, blk, key, strlen(key), &info, durable_cb, &w, &err),
        0);
    assert_int_equal(info.tier, KVS_STORE_TIER_HOST);
    pthread_mutex_lock(&w.mu);
    while (!w.done)
        pthread_cond_wait(&w.cv, &w.mu);
    pthread_mutex_unlock(&w.mu);
    if (msg)
        strcpy(msg, w.msg);
    return w.rc;
}

typedef struct rec_copy {
    uint8_t *bytes;
    size_t len;
} rec_copy;

static int copy_rec(const void *b, size_t n, void *a)
{
    rec_copy *r = a;
    r->bytes = malloc(n);
    memcpy(r->bytes, b, n);
    r->len = n;
    return 0;
}

/* The disk record of key in ns equals want (len bytes). */
static void expect_record(disk_fx *f, kvs_ns *ns, const char *key, const uint8_t *want, size_t len)
{
    rec_copy r = {0};
    assert_int_equal(kvs_disk_get(f->disk, kvs_ns_id(ns), key, strlen(key), copy_rec, &r, NULL), 0);
    assert_int_equal(r.len, len);
    assert_memory_equal(r.bytes, want, len);
    free(r.bytes);
}

static void test_durable(void **state)
{
    /* Without a disk tier, a durable namespace is refused, naming the field. */
    kvs_store *plain = new_store(1 << 20);
    kvs_ns_spec s = small_spec("dur");
    s.durable = true;
    kvs_err err;
    assert_int_equal(kvs_store_ns_create(plain, &s, NULL, &err), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "durable"));
    kvs_store_destroy(plain);

    disk_fx f;
    fx_open(&f, "none", 64 << 10, 16 << 20, false);
    kvs_ns_spec ds = kvs_test_spec(2, 2, 16, 8, KVS_DTYPE_FP16, "none", "none", 5);
    snprintf(ds.name, sizeof ds.name, "dur");
    ds.durable = true;
    kvs_ns *ns;
    assert_int_equal(kvs_store_ns_create(f.st, &ds, &ns, &err), 0);

    /* Done means on disk: the record is there when the callback runs, and the block stays
     * in the host tier with its record (on_disk: counted in disk_used). */
    uint8_t *a, *b;
    size_t alen, blen;
    assert_int_equal(put_durable(&f, ns, "k0", 1, &a, &alen, NULL), 0);
    expect_record(&f, ns, "k0", a, alen);
    kvs_store_stats st;
    kvs_store_get_stats(f.st, &st);
    assert_int_equal(st.host_blocks, 1);
    assert_int_equal(st.disk_used, alen);
    kvs_store_key k0 = {"k0", 2};
    kvs_store_tier t;
    kvs_store_lookup(f.st, ns, &k0, 1, &t, NULL, NULL);
    assert_int_equal(t, KVS_STORE_TIER_HOST);

    /* Replacing writes over the record (no deletion queued before the write). */
    assert_int_equal(put_durable(&f, ns, "k0", 2, &b, &blen, NULL), 0);
    expect_record(&f, ns, "k0", b, blen);
    kvs_store_disk_wait(f.st);
    expect_record(&f, ns, "k0", b, blen);

    /* A failed write answers the error and leaves the key as it was before that Put: the
     * new block is unlinked and the block it replaced, acknowledged and still on disk
     * (nothing was written), is served again from its record (issue 10: a failed
     * overwrite used to delete it). */
    char msg[KVS_ERR_MSG_LEN];
    kvs_disk_test_fail_write(f.disk, 1, 5 /* EIO */);
    assert_int_equal(put_durable(&f, ns, "k0", 3, NULL, NULL, msg), KVS_EIO);
    assert_true(strlen(msg) > 0);
    kvs_store_lookup(f.st, ns, &k0, 1, &t, NULL, NULL);
    assert_int_equal(t, KVS_STORE_TIER_DISK);
    kvs_store_disk_wait(f.st);
    expect_record(&f, ns, "k0", b, blen);
    kvs_block *got;
    assert_int_equal(kvs_store_get(f.st, ns, "k0", 2, &got, &err), 0);
    assert_int_equal(kvs_block_size(got), blen);
    assert_memory_equal(kvs_block_data(got), b, blen);
    kvs_store_block_release(f.st, got);
    kvs_store_get_stats(f.st, &st);
    assert_int_equal(st.disk_write_errors, 1);
    assert_int_equal(st.disk_used, blen);

    /* Writes work again. Then a full map with nothing to evict: KVS_ENOSPC, same cleanup
     * (k2 first, so that no freed pages are pending: the disk module would retry). */
    assert_int_equal(put_durable(&f, ns, "k2", 5, NULL, NULL, NULL), 0);
    kvs_disk_test_fail_write(f.disk, 1, MDB_MAP_FULL);
    assert_int_equal(put_durable(&f, ns, "k1", 4, NULL, NULL, NULL), KVS_ENOSPC);
    kvs_store_key k1 = {"k1", 2};
    kvs_store_lookup(f.st, ns, &k1, 1, &t, NULL, NULL);
    assert_int_equal(t, KVS_STORE_TIER_NONE);
    kvs_store_disk_wait(f.st);
    kvs_store_get_stats(f.st, &st);
    assert_int_equal(st.host_blocks + st.disk_blocks, 2); /* k0, k2 */
    assert_int_equal(st.spill_dropped, 0);
    assert_int_equal(st.disk_write_errors, 1); /* a full map is not a write error */
    assert_int_equal(st.disk_refused, 1);
    free(a);
    free(b);
    kvs_ns_unref(ns);
    fx_close(&f);
}

/* ---- the durable contract on a full disk (issue 10, fault 1) */

/* Durable and non-durable namespaces share a disk budget of 8 blocks: non-durable records
 * are what gets evicted; once the budget holds only durable blocks, a durable Put is
 * refused (KVS_ENOSPC naming the disk tier) and every acknowledged durable block stays. */
static void test_disk_full_durable_contract(void **state)
{
    disk_fx f;
    fx_open(&f, "none", 2 * (2200 + KVS_STORE_BLOCK_META), 8 * 2200, false);
    kvs_ns_spec ds = kvs_test_spec(2, 2, 16, 8, KVS_DTYPE_FP16, "none", "none", 5);
    snprintf(ds.name, sizeof ds.name, "dur");
    ds.durable = true;
    kvs_ns *dur;
    kvs_err err;
    assert_int_equal(kvs_store_ns_create(f.st, &ds, &dur, &err), 0);
    char key[16], msg[KVS_ERR_MSG_LEN];
    size_t len;
    /* 4 non-durable blocks spill to disk (2 stay in RAM) */
    for (int i = 0; i < 6; i++) {
        snprintf(key, sizeof key, "n%d", i);
        free(put_enc(&f, key, 8, 500 + i, &len));
        kvs_store_disk_wait(f.st);
    }
    /* durable blocks until one is refused */
    uint8_t *want[16];
    size_t wlen[16];
    int acked = 0, rc = 0;
    for (; acked < 16; acked++) {
        snprintf(key, sizeof key, "d%d", acked);
        if ((rc = put_durable(&f, dur, key, 600 + acked, &want[acked], &wlen[acked], msg))) {
            free(want[acked]);
            break;
        }
    }
    assert_int_equal(rc, KVS_ENOSPC);
    assert_non_null(strstr(msg, "disk tier"));
    assert_true(acked >= 7); /* the budget's 8 blocks, less one of rounding at most */
    kvs_store_stats st;
    kvs_store_get_stats(f.st, &st);
    assert_true(st.disk_used <= st.disk_capacity);
    assert_int_equal(st.disk_refused, 1);
    /* every non-durable record was evicted to make room, every durable one stayed */
    for (int i = 0; i < acked; i++) {
        snprintf(key, sizeof key, "d%d", i);
        expect_record(&f, dur, key, want[i], wlen[i]);
    }
    for (int i = 0; i < 6; i++) {
        snprintf(key, sizeof key, "n%d", i);
        assert_int_equal(disk_present(&f, key), KVS_ENOTFOUND);
    }
    /* more non-durable puts: their victims cannot be written (no room), durable ones
     * are never taken for them */
    for (int i = 6; i < 12; i++) {
        snprintf(key, sizeof key, "n%d", i);
        free(put_enc(&f, key, 8, 500 + i, &len));
        kvs_store_disk_wait(f.st);
    }
    for (int i = 0; i < acked; i++) {
        snprintf(key, sizeof key, "d%d", i);
        expect_record(&f, dur, key, want[i], wlen[i]);
        free(want[i]);
    }
    /* deleting a durable block makes room for the next durable Put */
    kvs_store_key k0 = {"d0", 2};
    assert_int_equal(kvs_store_delete(f.st, dur, &k0, 1), 1);
    kvs_store_disk_wait(f.st);
    assert_int_equal(put_durable(&f, dur, "d-new", 700, NULL, NULL, NULL), 0);
    kvs_ns_unref(dur);
    fx_close(&f);
}

/* Eviction deletes records before it changes the index: when the deletion fails (a
 * write error), the entries stay indexed and their records stay, and both still agree. */
static void test_disk_evict_failure_keeps_index(void **state)
{
    disk_fx f;
    /* 4 blocks on disk; reads do not promote (a promotion would evict, and the checks
     * below would race the writer) */
    fx_open(&f, "none", 2 * (2200 + KVS_STORE_BLOCK_META), 4 * 2200, true);
    char key[16];
    size_t len;
    uint8_t *want[6];
    for (int i = 0; i < 6; i++) { /* k0..k3 on disk, k4, k5 in RAM */
        snprintf(key, sizeof key, "k%d", i);
        want[i] = put_enc(&f, key, 8, 800 + i, &len);
        kvs_store_disk_wait(f.st);
    }
    for (int i = 0; i < 4; i++) {
        snprintf(key, sizeof key, "k%d", i);
        assert_int_equal(tier_of(&f, key), KVS_STORE_TIER_DISK);
    }
    /* The next spill must evict k0; that deletion fails. */
    kvs_disk_test_fail_write(f.disk, 1, 5 /* EIO */);
    free(put_enc(&f, "k6", 8, 806, &len));
    kvs_store_disk_wait(f.st);
    for (int i = 0; i < 4; i++) { /* index and LMDB agree: all four still there */
        snprintf(key, sizeof key, "k%d", i);
        assert_int_equal(tier_of(&f, key), KVS_STORE_TIER_DISK);
        assert_int_equal(disk_present(&f, key), 0);
        expect_bytes(&f, key, want[i], len);
    }
    kvs_store_stats st;
    kvs_store_get_stats(f.st, &st);
    assert_true(st.disk_write_errors >= 1);
    assert_true(st.disk_used <= st.disk_capacity);
    for (int i = 0; i < 6; i++)
        free(want[i]);
    fx_close(&f);
}

/* A record deletion that fails (delete, replace) is retried before the next batch until
 * it goes through, and a later write of the same key is not undone by the retry. */
static void test_disk_failed_delete_retried(void **state)
{
    disk_fx f;
    fx_open(&f, "none", 2 * (2200 + KVS_STORE_BLOCK_META), 16 << 20, false);
    size_t len;
    char key[16];
    for (int i = 0; i < 4; i++) { /* k0, k1 spill to disk */
        snprintf(key, sizeof key, "k%d", i);
        free(put_enc(&f, key, 8, 900 + i, &len));
        kvs_store_disk_wait(f.st);
    }
    assert_int_equal(tier_of(&f, "k0"), KVS_STORE_TIER_DISK);
    assert_int_equal(tier_of(&f, "k1"), KVS_STORE_TIER_DISK);
    kvs_disk_test_fail_writes(f.disk, 1000, 5 /* EIO */);
    kvs_store_key dk[2] = {{"k0", 2}, {"k1", 2}};
    assert_int_equal(kvs_store_delete(f.st, f.ns, dk, 2), 2);
    kvs_store_disk_wait(f.st);
    kvs_store_disk_wait(f.st); /* a turn that retried, and failed again */
    assert_int_equal(tier_of(&f, "k0"), KVS_STORE_TIER_NONE);
    assert_int_equal(disk_present(&f, "k0"), 0); /* the deletion failed: still there */
    assert_int_equal(disk_present(&f, "k1"), 0);
    /* The disk works again: k1 is written anew; whenever the retry runs (before or after
     * that write, within one writer turn or not), k0 goes and the new k1 stays. */
    kvs_disk_test_fail_writes(f.disk, 0, 0);
    uint8_t *k1 = put_enc(&f, "k1", 8, 999, &len);
    for (int i = 4; i < 8; i++) { /* pushes k1 to disk, and runs the writer again */
        snprintf(key, sizeof key, "k%d", i);
        free(put_enc(&f, key, 8, 900 + i, &len));
        kvs_store_disk_wait(f.st);
    }
    kvs_store_disk_wait(f.st);
    assert_int_equal(disk_present(&f, "k0"), KVS_ENOTFOUND); /* retried */
    assert_int_equal(tier_of(&f, "k0"), KVS_STORE_TIER_NONE);
    expect_bytes(&f, "k1", k1, len);
    free(k1);
    fx_close(&f);
}

/* ---- learned codec state survives a restart */

static kvs_store *open_store(kvs_disk *disk, uint32_t calib_tokens)
{
    kvs_store *st;
    kvs_err err;
    kvs_store_opts o = {.host_capacity = 1 << 20,
                        .disk = disk,
                        .disk_capacity = 16 << 20,
                        .calib_tokens = calib_tokens};
    if (kvs_store_create(&o, &st, &err))
        fail_msg("store: %s", err.msg);
    return st;
}

static kvs_ns *find_ns(kvs_store *st, const char *name)
{
    kvs_ns *ns;
    kvs_err err;
    if (kvs_store_ns_find(st, name, &ns, &err))
        fail_msg("%s", err.msg);
    return ns;
}

static void test_codec_state_persisted(void **state)
{
    char dir[64];
    kvs_disk *disk = tmp_disk(dir, "state", 16 << 20);
    kvs_err err;
    kvs_store *st = open_store(disk, 8);

    /* RotateKV: one block of 8 tokens calibrates (version 1); a block encoded with v1
     * goes to disk. */
    kvs_ns_spec rs = kvs_test_spec(2, 2, 16, 8, KVS_DTYPE_FP16, "rotatekv-2", "rotatekv-2", 3);
    snprintf(rs.name, sizeof rs.name, "rk");
    kvs_ns *rk;
    assert_int_equal(kvs_store_ns_create(st, &rs, &rk, &err), 0);
    uint64_t raw_bytes;
    assert_int_equal(kvs_spec_block_bytes(&rs, 8, &raw_bytes, NULL), 0);
    uint16_t *raw = kvs_test_gauss_data(raw_bytes / 2, 11, 1.0, rs.dtype);
    assert_int_equal(kvs_learn_keys(kvs_ns_learner(rk), rk, 8, raw, &err), 0);
    assert_int_equal(kvs_codec_state_version(kvs_ns_codec(rk, KVS_KEYS)), 1);
    const kvs_codec *k = kvs_ns_codec(rk, KVS_KEYS), *v = kvs_ns_codec(rk, KVS_VALUES);
    size_t cap = kvs_block_encoded_max(k, v, 8), len;
    kvs_block *blk;
    assert_int_equal(kvs_store_block_alloc(st, rk, 8, cap, &blk, &err), 0);
    assert_int_equal(
        kvs_block_encode(k, v, kvs_ns_id(rk), 8, raw, kvs_block_data(blk), cap, &len, &err), 0);
    kvs_block_set_size(blk, len, raw_bytes);
    uint8_t *enc = malloc(len);
    memcpy(enc, kvs_block_data(blk), len);
    assert_int_equal(kvs_store_block_commit(st, blk, "b", 1, NULL, &err), 0);
    uint16_t *before = malloc(raw_bytes);
    assert_int_equal(kvs_block_decode(k, v, enc, len, 0, 2, before, &err), 0);

    /* SQuat: queries publish version 1. */
    kvs_ns_spec ss = kvs_test_spec(2, 2, 16, 8, KVS_DTYPE_FP16, "squat-2", "kivi-2", 4);
    snprintf(ss.name, sizeof ss.name, "sq");
    kvs_ns *sq;
    assert_int_equal(kvs_store_ns_create(st, &ss, &sq, &err), 0);
    uint16_t *q = kvs_test_gauss_data(2 * 4 * 2 * 16, 12, 1.0, ss.dtype);
    uint32_t ver = 0;
    assert_int_equal(kvs_learn_queries(kvs_ns_learner(sq), sq, 2, 4, q, &ver, &err), 0);
    assert_int_equal(ver, 1);
    assert_int_equal(kvs_store_flush(st), 1); /* the RotateKV block */

    /* An orphan state record (namespace id 77 has no spec) and an unreadable state
     * record of "rk" (version 2: its block would be skipped, the rest restores). */
    assert_int_equal(kvs_disk_ns_put(disk, 77, "K\0\0\0\1", 5, "junk", 4, &err), 0);
    assert_int_equal(kvs_disk_ns_put(disk, kvs_ns_id(rk), "K\0\0\0\2", 5, "KST1junk", 8, &err), 0);
    kvs_ns_unref(rk);
    kvs_ns_unref(sq);
    kvs_store_destroy(st);

    st = open_store(disk, 8);
    rk = find_ns(st, "rk");
    assert_int_equal(kvs_codec_state_version(kvs_ns_codec(rk, KVS_KEYS)), 1);
    assert_false(kvs_learn_wants_keys(kvs_ns_learner(rk))); /* calibration is done */
    kvs_block *got;
    assert_int_equal(kvs_store_get(st, rk, "b", 1, &got, &err), 0);
    assert_int_equal(kvs_block_size(got), len);
    assert_memory_equal(kvs_block_data(got), enc, len);
    uint16_t *after = malloc(raw_bytes);
    assert_int_equal(kvs_block_decode(kvs_ns_codec_version(rk, KVS_KEYS, 1),
                                      kvs_ns_codec_version(rk, KVS_VALUES, 0), kvs_block_data(got),
                                      len, 0, 2, after, &err),
                     0);
    assert_memory_equal(after, before, raw_bytes); /* the same permutation decodes it */
    kvs_store_block_release(st, got);
    sq = find_ns(st, "sq");
    assert_int_equal(kvs_codec_state_version(kvs_ns_codec(sq, KVS_KEYS)), 1);
    assert_int_equal(kvs_learn_queries(kvs_ns_learner(sq), sq, 2, 4, q, &ver, &err), 0);
    assert_int_equal(ver, 2); /* numbering goes on after the restored version */
    /* The orphan's records are gone and its id is not handed out again. */
    assert_int_equal(kvs_disk_ns_get(disk, 77, "K\0\0\0\1", 5, noop_cb, NULL, NULL), KVS_ENOTFOUND);
    kvs_ns_spec ns3 = small_spec("third");
    kvs_ns *third;
    assert_int_equal(kvs_store_ns_create(st, &ns3, &third, &err), 0);
    assert_true(kvs_ns_id(third) > 77);
    kvs_ns_unref(third);
    kvs_ns_unref(rk);
    kvs_ns_unref(sq);
    kvs_store_destroy(st);

    /* Version 2 of "sq" was recorded too: a third start has both. */
    st = open_store(disk, 8);
    sq = find_ns(st, "sq");
    assert_int_equal(kvs_codec_state_version(kvs_ns_codec(sq, KVS_KEYS)), 2);
    assert_non_null(kvs_ns_codec_version(sq, KVS_KEYS, 1));
    kvs_ns_unref(sq);
    kvs_store_destroy(st);
    kvs_disk_close(disk);
    free(raw);
    free(q);
    free(enc);
    free(before);
    free(after);
    kvs_test_rmtree(dir);
}

/* Encodes a block of t tokens for spec (state version kstate for the keys) stamped with
 * ns_id and stores it in the disk tier directly; returns its bytes (malloc'd). */
static uint8_t *disk_block(kvs_disk *disk, const kvs_ns_spec *spec, uint32_t ns_id, uint32_t kstate,
                           uint32_t t, const char *key, size_t *len)
{
    kvs_err err;
    kvs_codec_state cs = {.version = kstate};
    kvs_codec *k, *v;
    assert_int_equal(kvs_codec_create(spec, KVS_KEYS, &cs, &k, &err), 0);
    assert_int_equal(kvs_codec_create(spec, KVS_VALUES, NULL, &v, &err), 0);
    uint64_t raw_bytes;
    assert_int_equal(kvs_spec_block_bytes(spec, t, &raw_bytes, NULL), 0);
    uint16_t *raw = kvs_test_gauss_data(raw_bytes / 2, 5 + t, 1.0, spec->dtype);
    size_t cap = kvs_block_encoded_max(k, v, t);
    uint8_t *enc = malloc(cap);
    assert_int_equal(kvs_block_encode(k, v, ns_id, t, raw, enc, cap, len, &err), 0);
    kvs_disk_item it = {ns_id, key, strlen(key), enc, *len};
    assert_int_equal(kvs_disk_put_batch(disk, &it, 1, &err), 0);
    kvs_codec_destroy(k);
    kvs_codec_destroy(v);
    free(raw);
    return enc;
}

/* At start, a block of a codec state the daemon does not hold is indexed (its bytes are
 * served; a codec that ignores the state decodes it), and blocks that can never be
 * served (no namespace, a token count the namespace does not allow) are deleted rather
 * than left outside the index. */
static void test_restore_unknown_state_and_unservable(void **state)
{
    char dir[64];
    kvs_disk *disk = tmp_disk(dir, "restore", 16 << 20);
    kvs_err err;
    kvs_store *st = open_store(disk, 0);
    kvs_ns_spec ks = kvs_test_spec(2, 2, 16, 8, KVS_DTYPE_FP16, "kivi-2", "kivi-2", 6);
    snprintf(ks.name, sizeof ks.name, "kv");
    kvs_ns *ns;
    assert_int_equal(kvs_store_ns_create(st, &ks, &ns, &err), 0);
    uint32_t id = kvs_ns_id(ns);
    kvs_ns_unref(ns);
    kvs_store_destroy(st);

    size_t len, l2, l3;
    uint8_t *odd = disk_block(disk, &ks, id, 3, 8, "odd-state", &len);
    kvs_ns_spec big = ks;
    big.block_tokens = 16;
    free(disk_block(disk, &big, id, 0, 16, "too-long", &l2));
    free(disk_block(disk, &ks, 99, 0, 8, "no-ns", &l3));

    st = open_store(disk, 0);
    ns = find_ns(st, "kv");
    kvs_store_key keys[2] = {{"odd-state", 9}, {"too-long", 8}};
    kvs_store_tier tiers[2];
    kvs_store_lookup(st, ns, keys, 2, tiers, NULL, NULL);
    assert_int_equal(tiers[0], KVS_STORE_TIER_DISK);
    assert_int_equal(tiers[1], KVS_STORE_TIER_NONE);
    kvs_block *got;
    assert_int_equal(kvs_store_get(st, ns, "odd-state", 9, &got, &err), 0);
    assert_int_equal(kvs_block_size(got), len);
    assert_memory_equal(kvs_block_data(got), odd, len);
    assert_null(kvs_ns_codec_version(ns, KVS_KEYS, 3));
    assert_false(kvs_codec_decode_needs_state(kvs_ns_codec(ns, KVS_KEYS)));
    uint64_t raw_bytes;
    assert_int_equal(kvs_spec_block_bytes(&ks, 8, &raw_bytes, NULL), 0);
    uint16_t *out = malloc(raw_bytes);
    assert_int_equal(kvs_block_decode(kvs_ns_codec(ns, KVS_KEYS), kvs_ns_codec(ns, KVS_VALUES),
                                      kvs_block_data(got), len, 0, 2, out, &err),
                     0);
    kvs_store_block_release(st, got);
    assert_int_equal(kvs_disk_get(disk, id, "too-long", 8, noop_cb, NULL, NULL), KVS_ENOTFOUND);
    assert_int_equal(kvs_disk_get(disk, 99, "no-ns", 5, noop_cb, NULL, NULL), KVS_ENOTFOUND);
    kvs_store_stats s;
    kvs_store_get_stats(st, &s);
    assert_int_equal(s.disk_blocks, 0); /* the one entry was promoted by the get */
    assert_int_equal(s.host_blocks, 1);
    assert_int_equal(s.disk_used, len);
    kvs_ns_unref(ns);
    kvs_store_destroy(st);
    kvs_disk_close(disk);
    free(odd);
    free(out);
    kvs_test_rmtree(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ns_validation),
        cmocka_unit_test(test_roundtrip_replace_delete),
        cmocka_unit_test(test_lru_eviction_and_busy_blocks),
        cmocka_unit_test(test_tiny_blocks_charged_their_bookkeeping),
        cmocka_unit_test(test_demotion_recode_drops_the_record_everywhere),
        cmocka_unit_test(test_disk_records_are_bounded),
        cmocka_unit_test(test_policy_scan_resistance),
        cmocka_unit_test(test_checksum_mismatch_is_data_loss),
        cmocka_unit_test(test_drop_namespace),
        cmocka_unit_test(test_codec_state_versions),
        cmocka_unit_test(test_concurrent_soak),
        cmocka_unit_test(test_gpu_tier_and_demotion),
        cmocka_unit_test(test_gpu_promotion),
        cmocka_unit_test(test_gpu_tiers_per_device),
        cmocka_unit_test(test_host_pool_blocks),
        cmocka_unit_test(test_gpu_abort_and_absent),
        cmocka_unit_test(test_disk_spill_get_promote),
        cmocka_unit_test(test_host_watermarks),
        cmocka_unit_test(test_disk_no_promote),
        cmocka_unit_test(test_disk_view),
        cmocka_unit_test(test_disk_barrier),
        cmocka_unit_test(test_disk_delete_replace_drop),
        cmocka_unit_test(test_disk_corrupt_record_is_data_loss),
        cmocka_unit_test(test_disk_budget_eviction),
        cmocka_unit_test(test_disk_write_error),
        cmocka_unit_test(test_disk_find_then_read),
        cmocka_unit_test(test_durable),
        cmocka_unit_test(test_disk_full_durable_contract),
        cmocka_unit_test(test_disk_evict_failure_keeps_index),
        cmocka_unit_test(test_disk_failed_delete_retried),
        cmocka_unit_test(test_codec_state_persisted),
        cmocka_unit_test(test_restore_unknown_state_and_unservable),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
