/* storage/store_admin.c: the store's operator verbs. Verify (a host block corrupted in RAM,
 * disk records corrupted on disk, a host copy whose record went bad, GPU blocks skipped),
 * flush with a report (written, already, a failed write), and evict (keys and every block,
 * host -> disk in rounds of the spill budget, busy blocks skipped, blocks never moving up,
 * out of the store with their records, GPU blocks through a demotion callback, bad
 * arguments), and the host tier's capacity and policy changed at run time. One temporary
 * data directory per test. */
#define _GNU_SOURCE
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "gpu/codec/codec.h"
#include "gpu/codec/format.h"
#include "storage/store.h"
#include "tests/support/kvs_test.h"

typedef struct fx {
    char dir[64];
    kvs_disk *disk;
    kvs_store *st;
    kvs_ns *ns;
} fx;

/* A store of host_bytes over a fresh disk tier (16 MiB budget), namespace "d" (L=2 H=2 D=16
 * T=8, codec none: a full block is 2048 payload bytes + 84 of header). */
static void fx_open(fx *f, uint64_t host_bytes, uint64_t spill_max)
{
    snprintf(f->dir, sizeof f->dir, "/tmp/kvs-test-admin-XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    kvs_err err;
    kvs_disk_opts dopts = {.nosync = true};
    assert_int_equal(kvs_disk_open(f->dir, 16 << 20, &dopts, &f->disk, &err), 0);
    kvs_store_opts o = {.host_capacity = host_bytes,
                        .disk = f->disk,
                        .disk_capacity = 16 << 20,
                        .spill_max = spill_max,
                        /* no background demotion: blocks move only when asked to */
                        .host_high_pct = 100,
                        .host_low_pct = 100};
    assert_int_equal(kvs_store_create(&o, &f->st, &err), 0);
    kvs_ns_spec s = kvs_test_spec(2, 2, 16, 8, KVS_DTYPE_FP16, "none", "none", 5);
    snprintf(s.name, sizeof s.name, "d");
    assert_int_equal(kvs_store_ns_create(f->st, &s, &f->ns, &err), 0);
}

static void fx_close(fx *f)
{
    kvs_ns_unref(f->ns);
    kvs_store_destroy(f->st);
    kvs_disk_close(f->disk);
    kvs_test_rmtree(f->dir);
}

/* Puts a real encoded full block drawn from seed under key; returns its bytes (malloc'd). */
static uint8_t *put_enc(fx *f, const char *key, uint64_t seed, size_t *len)
{
    const kvs_ns_spec *sp = kvs_ns_spec_of(f->ns);
    uint64_t raw_bytes;
    assert_int_equal(kvs_spec_block_bytes(sp, 8, &raw_bytes, NULL), 0);
    uint16_t *raw = kvs_test_gauss_data(raw_bytes / 2, seed, 1.0, sp->dtype);
    const kvs_codec *k = kvs_ns_codec(f->ns, KVS_KEYS), *v = kvs_ns_codec(f->ns, KVS_VALUES);
    size_t cap = kvs_block_encoded_max(k, v, 8);
    kvs_block *blk;
    kvs_err err;
    assert_int_equal(kvs_store_block_alloc(f->st, f->ns, 8, cap, &blk, &err), 0);
    assert_int_equal(
        kvs_block_encode(k, v, kvs_ns_id(f->ns), 8, raw, kvs_block_data(blk), cap, len, &err), 0);
    kvs_block_set_size(blk, *len, raw_bytes);
    uint8_t *copy = malloc(*len);
    memcpy(copy, kvs_block_data(blk), *len);
    assert_int_equal(kvs_store_block_commit(f->st, blk, key, strlen(key), NULL, &err), 0);
    free(raw);
    return copy;
}

/* Allocates and fills a host block of ns with a valid encoded block of t tokens whose
 * payload bytes all are `fill` (the store checks blocks by their own checksum); the caller
 * commits it. fill must not make fp16 Inf/NaN patterns (0x7C..0x7F, 0xFC..0xFF). */
static kvs_block *filled_block(kvs_store *st, kvs_ns *ns, uint32_t t, uint8_t fill)
{
    const kvs_codec *k = kvs_ns_codec(ns, KVS_KEYS), *v = kvs_ns_codec(ns, KVS_VALUES);
    uint64_t raw_bytes;
    assert_int_equal(kvs_spec_block_bytes(kvs_ns_spec_of(ns), t, &raw_bytes, NULL), 0);
    size_t cap = kvs_block_encoded_max(k, v, t), len;
    kvs_block *blk;
    kvs_err err;
    assert_int_equal(kvs_store_block_alloc(st, ns, t, cap, &blk, &err), 0);
    uint8_t *raw = malloc(raw_bytes);
    memset(raw, fill, raw_bytes);
    assert_int_equal(kvs_block_encode(k, v, kvs_ns_id(ns), t, (const uint16_t *)raw,
                                      kvs_block_data(blk), cap, &len, &err),
                     0);
    free(raw);
    kvs_block_set_size(blk, len, raw_bytes);
    return blk;
}

static kvs_store_tier tier_of(kvs_store *st, kvs_ns *ns, const char *key)
{
    kvs_store_key k = {key, strlen(key)};
    kvs_store_tier t;
    kvs_store_lookup(st, ns, &k, 1, &t, NULL, NULL);
    return t;
}

static void expect_bytes(fx *f, const char *key, const uint8_t *want, size_t len)
{
    kvs_block *blk;
    kvs_err err;
    int rc = kvs_store_get(f->st, f->ns, key, strlen(key), &blk, &err);
    if (rc)
        fail_msg("get %s: %s", key, err.msg);
    assert_int_equal(kvs_block_size(blk), len);
    assert_memory_equal(kvs_block_data(blk), want, len);
    kvs_store_block_release(f->st, blk);
}

static int read_nothing(const void *bytes, size_t len, void *arg)
{
    return 0;
}

static bool on_disk(fx *f, const char *key)
{
    return kvs_disk_get(f->disk, kvs_ns_id(f->ns), key, strlen(key), read_nothing, NULL, NULL) == 0;
}

/* ---------------------------------------------------------------- verify */

static void test_verify(void **state)
{
    fx f;
    fx_open(&f, 3 * (2200 + KVS_STORE_BLOCK_META), 64 << 20);
    size_t len;
    uint8_t *b[5];
    char key[8];
    for (int i = 0; i < 5; i++) { /* k0 and k1 spill to disk */
        snprintf(key, sizeof key, "k%d", i);
        b[i] = put_enc(&f, key, (uint64_t)i + 1, &len);
    }
    kvs_store_disk_wait(f.st);
    assert_int_equal(tier_of(f.st, f.ns, "k0"), KVS_STORE_TIER_DISK);
    assert_int_equal(tier_of(f.st, f.ns, "k1"), KVS_STORE_TIER_DISK);
    kvs_store_verify_info vi;
    kvs_err err;
    assert_int_equal(kvs_store_verify(f.st, &vi, &err), 0);
    assert_int_equal(vi.host_checked, 3);
    assert_int_equal(vi.disk_checked, 2);
    assert_int_equal(vi.host_bad + vi.disk_bad + vi.gpu_skipped, 0);
    kvs_store_stats s; /* the progress counters a client polls: planned, then checked */
    kvs_store_get_stats(f.st, &s);
    assert_int_equal(s.verify_planned, 5);
    assert_int_equal(s.verify_checked, 5);

    /* k2, k3, k4 get records too (they stay in RAM). */
    kvs_store_flush_info fi;
    assert_int_equal(kvs_store_flush_sync(f.st, &fi, &err), 0);
    assert_int_equal(fi.written, 3);
    /* k0 (a disk entry): its record rewritten with a flipped payload bit. */
    b[0][len - 1] ^= 0x10;
    kvs_disk_item it = {kvs_ns_id(f.ns), "k0", 2, b[0], len};
    assert_int_equal(kvs_disk_put_batch(f.disk, &it, 1, NULL), 0);
    /* k2 (host): a flipped bit in RAM; it goes, and its (good) record with it. */
    kvs_block *blk;
    assert_int_equal(kvs_store_get(f.st, f.ns, "k2", 2, &blk, &err), 0);
    ((uint8_t *)kvs_block_data(blk))[100] ^= 0x01;
    kvs_store_block_release(f.st, blk);
    /* k3 (host, with a record): its record corrupted; the host copy is whole and stays,
     * without a record. */
    b[3][len - 1] ^= 0x10;
    it = (kvs_disk_item){kvs_ns_id(f.ns), "k3", 2, b[3], len};
    assert_int_equal(kvs_disk_put_batch(f.disk, &it, 1, NULL), 0);
    b[3][len - 1] ^= 0x10;

    assert_int_equal(kvs_store_verify(f.st, &vi, &err), 0);
    assert_int_equal(vi.host_checked, 3);
    assert_int_equal(vi.host_bad, 1);
    assert_int_equal(vi.disk_checked, 4); /* k0 k1 k3 k4: k2's record went first */
    assert_int_equal(vi.disk_bad, 2);
    kvs_store_stats s1;
    kvs_store_get_stats(f.st, &s1);
    assert_int_equal(s1.checksum_failures, 3);
    assert_int_equal(tier_of(f.st, f.ns, "k0"), KVS_STORE_TIER_NONE); /* index entry gone */
    assert_int_equal(tier_of(f.st, f.ns, "k2"), KVS_STORE_TIER_NONE);
    assert_int_equal(tier_of(f.st, f.ns, "k3"), KVS_STORE_TIER_HOST);
    assert_false(on_disk(&f, "k0"));
    assert_false(on_disk(&f, "k2"));
    assert_false(on_disk(&f, "k3"));
    assert_int_equal(s1.disk_used, 2 * len); /* k1's entry, k4's record */
    expect_bytes(&f, "k1", b[1], len);
    expect_bytes(&f, "k3", b[3], len);
    expect_bytes(&f, "k4", b[4], len);
    /* k3 has no record now: a flush writes it again. */
    assert_int_equal(kvs_store_flush_sync(f.st, &fi, &err), 0);
    assert_true(on_disk(&f, "k3"));
    assert_int_equal(kvs_store_verify(f.st, &vi, &err), 0);
    assert_int_equal(vi.host_bad + vi.disk_bad, 0);
    for (int i = 0; i < 5; i++)
        free(b[i]);
    fx_close(&f);
}

/* Many host blocks: verify pins and checks them in batches; bad ones at batch edges (the
 * last of a batch makes the walk restart) are each found once, every block checked once. */
static void test_verify_batches(void **state)
{
    kvs_store *st;
    kvs_store_opts o = {.host_capacity = 1 << 20};
    kvs_err err;
    assert_int_equal(kvs_store_create(&o, &st, &err), 0);
    kvs_ns_spec s = kvs_test_spec(2, 1, 16, 4, KVS_DTYPE_FP16, "none", "none", 0);
    snprintf(s.name, sizeof s.name, "v");
    kvs_ns *ns;
    assert_int_equal(kvs_store_ns_create(st, &s, &ns, &err), 0);
    enum { N = 600 };
    char key[8];
    for (int i = 0; i < N; i++) {
        kvs_block *blk = filled_block(st, ns, 1, (uint8_t)(1 + i % 0x70));
        snprintf(key, sizeof key, "b%d", i);
        assert_int_equal(kvs_store_block_commit(st, blk, key, strlen(key), NULL, &err), 0);
    }
    const int bad[4] = {0, 255, 256, N - 1};
    for (int i = 0; i < 4; i++) {
        snprintf(key, sizeof key, "b%d", bad[i]);
        kvs_block *blk;
        assert_int_equal(kvs_store_get(st, ns, key, strlen(key), &blk, &err), 0);
        ((uint8_t *)kvs_block_data(blk))[7] ^= 0x80;
        kvs_store_block_release(st, blk);
    }
    kvs_store_verify_info vi;
    assert_int_equal(kvs_store_verify(st, &vi, &err), 0);
    assert_int_equal(vi.host_checked, N);
    assert_int_equal(vi.host_bad, 4);
    for (int i = 0; i < 4; i++) {
        snprintf(key, sizeof key, "b%d", bad[i]);
        assert_int_equal(tier_of(st, ns, key), KVS_STORE_TIER_NONE);
    }
    assert_int_equal(kvs_store_verify(st, &vi, &err), 0);
    assert_int_equal(vi.host_checked, N - 4);
    assert_int_equal(vi.host_bad, 0);
    kvs_store_stats stats;
    kvs_store_get_stats(st, &stats);
    assert_int_equal(stats.host_used,
                     (N - 4) * (kvs_format_prefix_bytes(2) + 128 + KVS_STORE_BLOCK_META));
    assert_int_equal(stats.checksum_failures, 4);
    kvs_ns_unref(ns);
    kvs_store_destroy(st);
}

/* ---------------------------------------------------------------- flush */

static void test_flush(void **state)
{
    fx f;
    fx_open(&f, 1 << 20, 64 << 20);
    size_t len;
    uint8_t *b[4];
    char key[8];
    for (int i = 0; i < 3; i++) {
        snprintf(key, sizeof key, "f%d", i);
        b[i] = put_enc(&f, key, (uint64_t)i + 10, &len);
    }
    kvs_store_flush_info fi;
    kvs_err err;
    assert_int_equal(kvs_store_flush_sync(f.st, &fi, &err), 0);
    assert_int_equal(fi.written, 3);
    assert_int_equal(fi.failed + fi.already + fi.gpu_skipped, 0);
    for (int i = 0; i < 3; i++) {
        snprintf(key, sizeof key, "f%d", i);
        assert_true(on_disk(&f, key));
        assert_int_equal(tier_of(f.st, f.ns, key), KVS_STORE_TIER_HOST); /* and in RAM */
    }
    kvs_store_stats s;
    kvs_store_get_stats(f.st, &s);
    assert_int_equal(s.disk_used, 3 * len);
    assert_int_equal(s.flush_queued, 3); /* the progress counters a client polls */
    assert_int_equal(s.flush_done, 3);
    assert_int_equal(kvs_store_flush_sync(f.st, &fi, &err), 0);
    assert_int_equal(fi.written, 0);
    assert_int_equal(fi.already, 3);

    /* A write that fails: reported, counted, and the block stays served from RAM. */
    b[3] = put_enc(&f, "f3", 13, &len);
    kvs_disk_test_fail_write(f.disk, 1, EIO);
    assert_int_equal(kvs_store_flush_sync(f.st, &fi, &err), 0);
    assert_int_equal(fi.written, 0);
    assert_int_equal(fi.failed, 1);
    assert_false(on_disk(&f, "f3"));
    expect_bytes(&f, "f3", b[3], len);
    kvs_store_get_stats(f.st, &s);
    assert_int_equal(s.disk_write_errors, 1);
    assert_int_equal(kvs_store_flush_sync(f.st, &fi, &err), 0); /* the next try writes it */
    assert_int_equal(fi.written, 1);
    for (int i = 0; i < 4; i++)
        free(b[i]);
    fx_close(&f);

    /* Without a disk tier: refused, naming it. */
    kvs_store *st;
    kvs_store_opts o = {.host_capacity = 1 << 20};
    assert_int_equal(kvs_store_create(&o, &st, NULL), 0);
    assert_int_equal(kvs_store_flush_sync(st, &fi, &err), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "disk tier"));
    kvs_store_destroy(st);
}

/* ---------------------------------------------------------------- evict */

static void test_evict_host_to_disk(void **state)
{
    fx f;
    /* A spill budget of one block: moving many takes rounds. */
    fx_open(&f, 1 << 20, 2200);
    size_t len;
    uint8_t *b[8];
    char key[8];
    for (int i = 0; i < 8; i++) {
        snprintf(key, sizeof key, "e%d", i);
        b[i] = put_enc(&f, key, (uint64_t)i + 20, &len);
    }
    kvs_err err;
    kvs_store_evict_info ei;
    kvs_store_key keys[4] = {{"e0", 2}, {"e1", 2}, {"e2", 2}, {"zz", 2}};
    kvs_store_sel sel = {.ns = f.ns, .keys = keys, .n = 4};
    /* e1 is being read: skipped. */
    kvs_block *held;
    assert_int_equal(kvs_store_get(f.st, f.ns, "e1", 2, &held, &err), 0);
    assert_int_equal(kvs_store_evict(f.st, &sel, KVS_STORE_TIER_DISK, NULL, NULL, &ei, &err), 0);
    assert_int_equal(ei.moved, 2);
    assert_int_equal(ei.busy, 1);
    assert_int_equal(ei.absent, 1);
    assert_int_equal(ei.unchanged + ei.failed + ei.dropped, 0);
    assert_int_equal(tier_of(f.st, f.ns, "e0"), KVS_STORE_TIER_DISK);
    assert_int_equal(tier_of(f.st, f.ns, "e1"), KVS_STORE_TIER_HOST);
    assert_int_equal(tier_of(f.st, f.ns, "e2"), KVS_STORE_TIER_DISK);
    kvs_store_block_release(f.st, held);
    kvs_store_stats s;
    kvs_store_get_stats(f.st, &s);
    assert_int_equal(s.disk_blocks, 2);
    assert_int_equal(s.host_evictions, 2);
    assert_int_equal(s.spill_pending, 0);

    /* A Get promotes e0 (its record stays): evicting it again writes nothing. */
    expect_bytes(&f, "e0", b[0], len);
    assert_int_equal(tier_of(f.st, f.ns, "e0"), KVS_STORE_TIER_HOST);
    /* Every block of the namespace: six move (e0 without a write), e2 is there already. */
    sel = (kvs_store_sel){.ns = f.ns};
    assert_int_equal(kvs_store_evict(f.st, &sel, KVS_STORE_TIER_DISK, NULL, NULL, &ei, &err), 0);
    assert_int_equal(ei.moved, 7);
    assert_int_equal(ei.unchanged, 1);
    assert_int_equal(ei.busy + ei.failed + ei.absent, 0);
    kvs_store_get_stats(f.st, &s);
    assert_int_equal(s.disk_blocks, 8);
    assert_int_equal(s.host_blocks, 0);
    assert_int_equal(s.host_used, 0);
    assert_int_equal(s.disk_used, 8 * len);
    /* Nothing moves up. */
    assert_int_equal(kvs_store_evict(f.st, &sel, KVS_STORE_TIER_HOST, NULL, NULL, &ei, &err), 0);
    assert_int_equal(ei.moved, 0);
    assert_int_equal(ei.unchanged, 8);
    for (int i = 0; i < 8; i++) {
        snprintf(key, sizeof key, "e%d", i);
        expect_bytes(&f, key, b[i], len);
        free(b[i]);
    }
    fx_close(&f);
}

static void test_evict_out(void **state)
{
    fx f;
    fx_open(&f, 3 * (2200 + KVS_STORE_BLOCK_META), 64 << 20);
    size_t len;
    char key[8];
    for (int i = 0; i < 5; i++) { /* o0 and o1 spill to disk */
        snprintf(key, sizeof key, "o%d", i);
        free(put_enc(&f, key, (uint64_t)i + 30, &len));
    }
    kvs_store_disk_wait(f.st);
    kvs_ns_spec s2 = kvs_test_spec(2, 2, 16, 8, KVS_DTYPE_FP16, "none", "none", 5);
    snprintf(s2.name, sizeof s2.name, "other");
    kvs_ns *other;
    kvs_err err;
    assert_int_equal(kvs_store_ns_create(f.st, &s2, &other, &err), 0);
    kvs_block *blk = filled_block(f.st, other, 8, 7);
    assert_int_equal(kvs_store_block_commit(f.st, blk, "x", 1, NULL, &err), 0);

    /* Keys: a disk block and a host block (being read: it goes all the same). */
    kvs_block *held;
    assert_int_equal(kvs_store_get(f.st, f.ns, "o4", 2, &held, &err), 0);
    kvs_store_key keys[2] = {{"o0", 2}, {"o4", 2}};
    kvs_store_sel sel = {.ns = f.ns, .keys = keys, .n = 2};
    kvs_store_evict_info ei;
    assert_int_equal(kvs_store_evict(f.st, &sel, KVS_STORE_TIER_NONE, NULL, NULL, &ei, &err), 0);
    assert_int_equal(ei.dropped, 2);
    assert_int_equal(tier_of(f.st, f.ns, "o0"), KVS_STORE_TIER_NONE);
    assert_int_equal(tier_of(f.st, f.ns, "o4"), KVS_STORE_TIER_NONE);
    assert_int_equal(kvs_block_size(held), len); /* the reader keeps its bytes */
    kvs_store_block_release(f.st, held);
    kvs_store_disk_wait(f.st);
    assert_false(on_disk(&f, "o0"));
    assert_true(on_disk(&f, "o1"));

    /* Every block of every namespace. */
    sel = (kvs_store_sel){0};
    assert_int_equal(kvs_store_evict(f.st, &sel, KVS_STORE_TIER_NONE, NULL, NULL, &ei, &err), 0);
    assert_int_equal(ei.dropped, 4); /* o1 o2 o3, and other's x */
    kvs_store_disk_wait(f.st);
    assert_false(on_disk(&f, "o1"));
    kvs_store_stats s;
    kvs_store_get_stats(f.st, &s);
    assert_int_equal(s.host_blocks + s.disk_blocks, 0);
    assert_int_equal(s.host_used + s.disk_used + s.spill_pending, 0);

    /* Bad arguments. */
    assert_int_equal(kvs_store_evict(f.st, &sel, KVS_STORE_TIER_GPU, NULL, NULL, &ei, &err),
                     KVS_EINVAL);
    assert_non_null(strstr(err.msg, "to"));
    sel = (kvs_store_sel){.keys = keys, .n = 1};
    assert_int_equal(kvs_store_evict(f.st, &sel, KVS_STORE_TIER_NONE, NULL, NULL, &ei, &err),
                     KVS_EINVAL);
    assert_non_null(strstr(err.msg, "keys"));
    kvs_ns_unref(other);
    fx_close(&f);

    kvs_store *st;
    kvs_store_opts o = {.host_capacity = 1 << 20};
    assert_int_equal(kvs_store_create(&o, &st, NULL), 0);
    sel = (kvs_store_sel){0};
    assert_int_equal(kvs_store_evict(st, &sel, KVS_STORE_TIER_DISK, NULL, NULL, &ei, &err),
                     KVS_EINVAL);
    assert_non_null(strstr(err.msg, "disk tier"));
    kvs_store_destroy(st);
}

/* ---------------------------------------------------------------- host tier at run time */

/* kvs_store_set_host (a SIGHUP reload): a smaller capacity evicts idle blocks down to it
 * (a busy one stays), the policy switches with every block still evictable through it,
 * and bad arguments change nothing. */
static void test_set_host(void **state)
{
    (void)state;
    kvs_store *st;
    kvs_err err;
    kvs_store_opts o = {.host_capacity = 1 << 20};
    assert_int_equal(kvs_store_create(&o, &st, NULL), 0);
    kvs_ns_spec s = kvs_test_spec(2, 2, 16, 8, KVS_DTYPE_FP16, "none", "none", 0);
    kvs_ns *ns;
    assert_int_equal(kvs_store_ns_create(st, &s, &ns, &err), 0);
    char key[16];
    for (int i = 0; i < 100; i++) { /* ~2.1 KB each: ~210 KB */
        snprintf(key, sizeof key, "k%d", i);
        assert_int_equal(
            kvs_store_block_commit(st, filled_block(st, ns, 8, 0x11), key, strlen(key), NULL, &err),
            0);
    }
    kvs_store_stats ss;
    kvs_store_get_stats(st, &ss);
    assert_int_equal(ss.host_blocks, 100);
    uint64_t one = ss.host_used / 100;
    /* k99, the newest, is being read: busy, so it must survive the shrink. */
    kvs_block *held;
    assert_int_equal(kvs_store_get(st, ns, "k99", 3, &held, &err), 0);

    assert_int_equal(kvs_store_set_host(st, 0, KVS_POLICY_LRU, NULL, &err), KVS_EINVAL);
    assert_int_equal(kvs_store_set_host(st, 1 << 20, (kvs_policy_kind)9, NULL, &err), KVS_EINVAL);
    kvs_store_get_stats(st, &ss);
    assert_int_equal(ss.host_capacity, 1 << 20);
    assert_int_equal(ss.host_blocks, 100);

    uint64_t evicted = 0, cap = 10 * one + one / 2;
    assert_int_equal(kvs_store_set_host(st, cap, KVS_POLICY_S3FIFO, &evicted, &err), 0);
    kvs_store_get_stats(st, &ss);
    assert_int_equal(ss.host_capacity, cap);
    assert_true(ss.host_used <= cap);
    assert_int_equal(ss.host_blocks, 10);
    assert_int_equal(evicted, 90);
    assert_int_equal(tier_of(st, ns, "k99"), KVS_STORE_TIER_HOST); /* busy: kept */
    assert_int_equal(tier_of(st, ns, "k0"), KVS_STORE_TIER_NONE);  /* oldest: evicted */
    kvs_store_block_release(st, held);

    /* Every block moved into the new policy: new Puts evict through it and stay within. */
    for (int i = 100; i < 140; i++) {
        snprintf(key, sizeof key, "k%d", i);
        assert_int_equal(
            kvs_store_block_commit(st, filled_block(st, ns, 8, 0x22), key, strlen(key), NULL, &err),
            0);
    }
    kvs_store_get_stats(st, &ss);
    assert_true(ss.host_used <= cap);
    assert_int_equal(ss.host_blocks, 10);
    /* Back to LRU and a larger tier: nothing evicted, blocks kept. */
    assert_int_equal(kvs_store_set_host(st, 1 << 20, KVS_POLICY_LRU, &evicted, &err), 0);
    assert_int_equal(evicted, 0);
    kvs_store_get_stats(st, &ss);
    assert_int_equal(ss.host_blocks, 10);
    kvs_ns_unref(ns);
    kvs_store_destroy(st);
}

/* ---------------------------------------------------------------- gpu blocks */

#define FAKE_DEV ((uintptr_t)0x7f0000000000ull)

typedef struct fake_demoter {
    kvs_store *st;
    kvs_ns *ns;
    size_t calls, refuse; /* refuse: how many of each batch to cancel */
} fake_demoter;

/* What storage/tiering does once the engine fetched the bytes: a host copy (here 0x5A)
 * takes the GPU block's place. */
static size_t fake_demote(void *arg, kvs_block **picked, size_t n)
{
    fake_demoter *fd = arg;
    fd->calls++;
    size_t moved = 0;
    for (size_t i = 0; i < n; i++) {
        if (i < fd->refuse) {
            kvs_store_demote_cancel(fd->st, picked[i]);
            continue;
        }
        kvs_block *nb = filled_block(fd->st, fd->ns, 4, 0x5A);
        kvs_store_demote_commit(fd->st, picked[i], nb);
        moved++;
    }
    return moved;
}

static void test_evict_gpu(void **state)
{
    kvs_store *st;
    kvs_store_opts o = {.host_capacity = 1 << 20, .gpu = {{FAKE_DEV, 8000}}, .gpu_slab = 2000};
    assert_int_equal(kvs_store_create(&o, &st, NULL), 0);
    kvs_ns_spec s = kvs_test_spec(2, 1, 16, 4, KVS_DTYPE_FP16, "none", "none", 0);
    snprintf(s.name, sizeof s.name, "g");
    kvs_ns *ns;
    kvs_err err;
    assert_int_equal(kvs_store_ns_create(st, &s, &ns, &err), 0);
    char key[8];
    for (int i = 0; i < 6; i++) {
        kvs_block *blk;
        assert_int_equal(kvs_store_block_alloc_gpu(st, 0, ns, 4, 0, 1000, &blk, &err), 0);
        kvs_block_set_size(blk, 300, 512);
        snprintf(key, sizeof key, "g%d", i);
        assert_int_equal(kvs_store_block_commit(st, blk, key, strlen(key), NULL, &err), 0);
    }
    kvs_store_verify_info vi;
    assert_int_equal(kvs_store_verify(st, &vi, &err), 0);
    assert_int_equal(vi.gpu_skipped, 6);
    assert_int_equal(vi.host_checked, 0);

    /* Keys g0 g1 to the host tier; g1 is being read. */
    kvs_block *held;
    assert_int_equal(kvs_store_get(st, ns, "g1", 2, &held, &err), 0);
    fake_demoter fd = {.st = st, .ns = ns};
    kvs_store_key keys[2] = {{"g0", 2}, {"g1", 2}};
    kvs_store_sel sel = {.ns = ns, .keys = keys, .n = 2};
    kvs_store_evict_info ei;
    assert_int_equal(kvs_store_evict(st, &sel, KVS_STORE_TIER_HOST, fake_demote, &fd, &ei, &err),
                     0);
    assert_int_equal(ei.moved, 1);
    assert_int_equal(ei.busy, 1);
    assert_int_equal(tier_of(st, ns, "g0"), KVS_STORE_TIER_HOST);
    assert_int_equal(tier_of(st, ns, "g1"), KVS_STORE_TIER_GPU);
    kvs_store_block_release(st, held);
    /* Without a demoter GPU blocks stay (counted busy). */
    assert_int_equal(kvs_store_evict(st, &sel, KVS_STORE_TIER_HOST, NULL, NULL, &ei, &err), 0);
    assert_int_equal(ei.moved, 0);
    assert_int_equal(ei.busy, 1);
    assert_int_equal(ei.unchanged, 1);
    /* Every block; a demoter that cancels the first of each batch stops once a round moves
     * nothing, so the call ends. */
    fd.refuse = 1;
    sel = (kvs_store_sel){.ns = ns};
    assert_int_equal(kvs_store_evict(st, &sel, KVS_STORE_TIER_HOST, fake_demote, &fd, &ei, &err),
                     0);
    assert_int_equal(ei.moved, 4); /* g1..g5 minus one cancel per round: 4, then 0 of 1 */
    assert_int_equal(ei.busy, 1);
    assert_int_equal(ei.unchanged, 1);
    kvs_store_stats stats;
    kvs_store_get_stats(st, &stats);
    assert_int_equal(stats.gpu_blocks, 1);
    assert_int_equal(stats.host_blocks, 5);
    assert_int_equal(stats.gpu_demotions, 5);
    /* Out, from the GPU tier: its slot comes back. */
    assert_int_equal(kvs_store_evict(st, &sel, KVS_STORE_TIER_NONE, NULL, NULL, &ei, &err), 0);
    assert_int_equal(ei.dropped, 6);
    kvs_store_get_stats(st, &stats);
    assert_int_equal(stats.gpu_used + stats.host_used, 0);
    kvs_ns_unref(ns);
    kvs_store_destroy(st);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_verify),    cmocka_unit_test(test_verify_batches),
        cmocka_unit_test(test_flush),     cmocka_unit_test(test_evict_host_to_disk),
        cmocka_unit_test(test_evict_out), cmocka_unit_test(test_evict_gpu),
        cmocka_unit_test(test_set_host),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
