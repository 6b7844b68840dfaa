/* Per-namespace quotas of the gpu and disk tiers (storage/store.h "Quotas"; the host tier's
 * is test_quota.py's): a quota under one full block is refused naming its field; a
 * namespace at its gpu quota is refused a slot (its Put goes to the host tier) and only its
 * own blocks are picked for demotion, promotion stays below its quota's high share; a
 * namespace whose spills pass its disk quota evicts its own oldest records, never another
 * namespace's, its usage is exact across a restart (the restore recomputes it) and its
 * quotas come back from their spec record (version 4; older versions still read); a run of
 * spills that the writer applies block by block counts the ones written before each (the
 * room hook's held items); a durable namespace at its disk quota has its Put refused naming
 * disk_quota_bytes. The gpu tier is bookkeeping only (a fake device address); the disk tier
 * is a real LMDB environment in a temporary directory per test. */
#define _GNU_SOURCE
#include <pthread.h>
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

#define FAKE_DEV ((uintptr_t)0x7f0000000000ull)
#define SLOT 1000 /* gpu slot bytes of every test block */

/* L=2 H=2 D=16 T=8 fp16, codec none: a full block is 2048 payload bytes (the least a quota
 * may be) and 2048 + a header as an encoded block (enc_full). */
static kvs_ns_spec spec_of(const char *name, uint64_t gpu_quota, uint64_t disk_quota)
{
    kvs_ns_spec s = kvs_test_spec(2, 2, 16, 8, KVS_DTYPE_FP16, "none", "none", 5);
    snprintf(s.name, sizeof s.name, "%s", name);
    s.gpu_quota = gpu_quota;
    s.disk_quota = disk_quota;
    return s;
}

static kvs_ns *ns_new(kvs_store *st, const kvs_ns_spec *s)
{
    kvs_ns *ns;
    kvs_err err;
    if (kvs_store_ns_create(st, s, &ns, &err))
        fail_msg("ns %s: %s", s->name, err.msg);
    return ns;
}

/* The usage counters of namespace `name` now. */
static kvs_ns_usage usage_of(kvs_store *st, const char *name)
{
    kvs_store_ns_info *v;
    size_t n;
    assert_int_equal(kvs_store_ns_list(st, &v, &n, NULL), 0);
    kvs_ns_usage u = {0};
    bool found = false;
    for (size_t i = 0; i < n; i++)
        if (strcmp(v[i].spec.name, name) == 0) {
            u = v[i].usage;
            found = true;
        }
    free(v);
    assert_true(found);
    return u;
}

static kvs_store_tier tier_of(kvs_store *st, kvs_ns *ns, const char *key)
{
    kvs_store_key k = {key, strlen(key)};
    kvs_store_tier t;
    kvs_store_lookup(st, ns, &k, 1, &t, NULL, NULL);
    return t;
}

/* ---------------------------------------------------------------- validation */

static void test_quota_under_a_block_is_refused(void **state)
{
    kvs_store *st;
    kvs_store_opts o = {.host_capacity = 1 << 20};
    assert_int_equal(kvs_store_create(&o, &st, NULL), 0);
    const struct {
        uint64_t gpu, disk;
        const char *field;
    } cases[] = {{2047, 0, "gpu_quota_bytes"}, {0, 1, "disk_quota_bytes"}};
    for (size_t i = 0; i < 2; i++) {
        kvs_ns_spec s = spec_of("q", cases[i].gpu, cases[i].disk);
        kvs_err err;
        assert_int_equal(kvs_store_ns_create(st, &s, NULL, &err), KVS_EINVAL);
        assert_non_null(strstr(err.msg, cases[i].field));
        assert_non_null(strstr(err.msg, "one full block"));
    }
    kvs_ns_spec s = spec_of("q", 2048, 2048); /* one full block each: fine */
    assert_int_equal(kvs_store_ns_create(st, &s, NULL, NULL), 0);
    kvs_store_destroy(st);
}

/* ---------------------------------------------------------------- gpu tier */

static int put_gpu(kvs_store *st, kvs_ns *ns, const char *key, kvs_err *err)
{
    kvs_block *blk;
    int rc = kvs_store_block_alloc_gpu(st, 0, ns, 4, 0, SLOT, &blk, err);
    if (rc)
        return rc;
    kvs_block_set_size(blk, 300, 512);
    return kvs_store_block_commit(st, blk, key, strlen(key), NULL, err);
}

/* Fills a host block of ns allocated for a full block with a real encoded block (the
 * store checks its checksum). */
static void encode_into(kvs_ns *ns, kvs_block *blk, uint8_t fill)
{
    uint64_t raw_bytes;
    assert_int_equal(kvs_spec_block_bytes(kvs_ns_spec_of(ns), 8, &raw_bytes, NULL), 0);
    const kvs_codec *k = kvs_ns_codec(ns, KVS_KEYS), *v = kvs_ns_codec(ns, KVS_VALUES);
    size_t len;
    kvs_err err;
    uint8_t *raw = malloc(raw_bytes);
    memset(raw, fill, raw_bytes);
    assert_int_equal(kvs_block_encode(k, v, kvs_ns_id(ns), 8, (const uint16_t *)raw,
                                      kvs_block_data(blk), kvs_block_encoded_max(k, v, 8), &len,
                                      &err),
                     0);
    free(raw);
    kvs_block_set_size(blk, len, raw_bytes);
}

static kvs_block *alloc_host(kvs_store *st, kvs_ns *ns)
{
    kvs_block *blk;
    kvs_err err;
    uint64_t cap =
        kvs_block_encoded_max(kvs_ns_codec(ns, KVS_KEYS), kvs_ns_codec(ns, KVS_VALUES), 8);
    assert_int_equal(kvs_store_block_alloc(st, ns, 8, cap, &blk, &err), 0);
    return blk;
}

static void put_host(kvs_store *st, kvs_ns *ns, const char *key, uint8_t fill)
{
    kvs_block *blk = alloc_host(st, ns);
    encode_into(ns, blk, fill);
    assert_int_equal(kvs_store_block_commit(st, blk, key, strlen(key), NULL, NULL), 0);
}

/* Ends a demotion as storage/tiering does once the engine fetched the bytes. */
static void demote(kvs_store *st, kvs_block *old)
{
    kvs_block *nb = alloc_host(st, kvs_block_ns(old));
    encode_into(kvs_block_ns(old), nb, 9);
    kvs_store_demote_commit(st, old, nb);
}

/* True if a promotion of host block `key` of ns to the gpu tier may start (it is then
 * cancelled: this only asks). */
static bool may_promote(kvs_store *st, kvs_ns *ns, const char *key)
{
    kvs_block *h, *g;
    assert_int_equal(kvs_store_get(st, ns, key, strlen(key), &h, NULL), 0);
    bool ok = kvs_store_promote_begin(st, 0, h, SLOT, &g);
    if (ok)
        kvs_store_promote_cancel(st, h, g);
    kvs_store_block_release(st, h);
    return ok;
}

static void test_gpu_quota_demotes_own_blocks(void **state)
{
    /* 8 slots; the tier's watermarks 75% / 50% (6000 / 4000). A's quota of 4 slots has
     * marks of the same shares: 3000 and 2000. */
    kvs_store *st;
    kvs_store_opts o = {.host_capacity = 1 << 20,
                        .gpu = {{FAKE_DEV, 8 * SLOT}},
                        .gpu_slab = SLOT, /* one slot a slab: no fragmentation */
                        .gpu_high_pct = 75,
                        .gpu_low_pct = 50};
    assert_int_equal(kvs_store_create(&o, &st, NULL), 0);
    kvs_ns_spec sa = spec_of("a", 4 * SLOT, 0), sb = spec_of("b", 0, 0);
    kvs_ns *a = ns_new(st, &sa), *b = ns_new(st, &sb);
    kvs_err err;
    /* B's blocks are the oldest of the tier: without the quota they would go first. */
    assert_int_equal(put_gpu(st, b, "b0", &err), 0);
    assert_int_equal(put_gpu(st, b, "b1", &err), 0);
    char key[8];
    for (int i = 0; i < 4; i++) {
        snprintf(key, sizeof key, "a%d", i);
        assert_int_equal(put_gpu(st, a, key, &err), 0);
    }
    /* At its quota: the next slot is refused, naming the quota (the tier has room). */
    assert_int_equal(put_gpu(st, a, "a4", &err), KVS_ENOSPC);
    assert_non_null(strstr(err.msg, "gpu_quota_bytes"));
    assert_int_equal(usage_of(st, "a").gpu_bytes, 4 * SLOT);
    assert_int_equal(usage_of(st, "b").gpu_bytes, 2 * SLOT);
    kvs_store_stats s;
    kvs_store_get_stats(st, &s);
    assert_int_equal(s.gpu_used, 6 * SLOT); /* not above the tier's high watermark */

    /* A is above its quota's high share: a round picks A's two oldest, down to its low
     * share, and none of B's. */
    assert_true(kvs_store_gpu_over_high(st, 0));
    kvs_block *picked[8];
    assert_int_equal(kvs_store_gpu_pick(st, 0, picked, 8), 2);
    assert_ptr_equal(kvs_block_ns(picked[0]), a);
    assert_ptr_equal(kvs_block_ns(picked[1]), a);
    assert_int_equal(usage_of(st, "a").gpu_picked, 2 * SLOT);
    assert_false(kvs_store_gpu_over_high(st, 0)); /* the picks count as done */
    assert_int_equal(kvs_store_gpu_pick(st, 0, picked + 2, 6), 0);
    demote(st, picked[0]);
    kvs_store_demote_cancel(st, picked[1]); /* a failed fetch: it stays */
    assert_int_equal(tier_of(st, a, "a0"), KVS_STORE_TIER_HOST);
    assert_int_equal(tier_of(st, a, "a1"), KVS_STORE_TIER_GPU);
    assert_int_equal(tier_of(st, b, "b0"), KVS_STORE_TIER_GPU);
    assert_int_equal(tier_of(st, b, "b1"), KVS_STORE_TIER_GPU);
    kvs_ns_usage ua = usage_of(st, "a");
    assert_int_equal(ua.gpu_bytes, 3 * SLOT);
    assert_int_equal(ua.gpu_picked, 0);

    /* A promotion stays below the quota's high share (a promotion never causes a
     * demotion): the tier has room (5000 + 1000 <= 6000) for B's block, not for A's. */
    put_host(st, b, "bh", 3);
    assert_true(may_promote(st, b, "bh"));
    assert_false(may_promote(st, a, "a0"));

    /* Room in the quota again: A's next Put takes a slot; at the quota, the next is refused
     * while B, without one, still gets its slots. */
    assert_int_equal(put_gpu(st, a, "a4", &err), 0);
    assert_int_equal(put_gpu(st, a, "a5", &err), KVS_ENOSPC);
    assert_int_equal(put_gpu(st, b, "b2", &err), 0);
    assert_int_equal(kvs_store_gpu_pick(st, 0, picked, 8), 2); /* a1 and a2, A's oldest */
    demote(st, picked[0]);
    demote(st, picked[1]);
    assert_int_equal(usage_of(st, "a").gpu_bytes, 2 * SLOT);

    /* The tier's own shortage (7000 above 6000), with A within its quota's marks, takes
     * the least recently used blocks of anyone, down to 4000: b0, b1, then A's a3. */
    assert_int_equal(put_gpu(st, b, "b3", &err), 0);
    assert_int_equal(put_gpu(st, b, "b4", &err), 0);
    size_t n = kvs_store_gpu_pick(st, 0, picked, 8);
    assert_int_equal(n, 3);
    assert_ptr_equal(kvs_block_ns(picked[0]), b);
    assert_ptr_equal(kvs_block_ns(picked[1]), b);
    assert_ptr_equal(kvs_block_ns(picked[2]), a);
    for (size_t i = 0; i < n; i++)
        kvs_store_demote_cancel(st, picked[i]);

    /* Slots come back to the namespace with their blocks. */
    kvs_ns_unref(a);
    assert_int_equal(kvs_store_ns_drop(st, "a", NULL, &err), 0);
    assert_int_equal(usage_of(st, "b").gpu_bytes, 5 * SLOT);
    kvs_store_get_stats(st, &s);
    assert_int_equal(s.gpu_used, 5 * SLOT);
    kvs_ns_unref(b);
    kvs_store_destroy(st);
}

/* ---------------------------------------------------------------- disk tier */

typedef struct fx {
    char dir[64];
    kvs_disk *disk;
    kvs_store *st;
} fx;

/* A store of 2 full blocks of host tier over a disk tier of disk_budget bytes in f->dir (a
 * fresh directory unless reopen). Watermarks at 100%: host blocks leave only on demand. */
static void fx_open(fx *f, uint64_t disk_budget, bool reopen)
{
    if (!reopen) {
        snprintf(f->dir, sizeof f->dir, "/tmp/kvs-test-quota-XXXXXX");
        assert_non_null(mkdtemp(f->dir));
    }
    kvs_err err;
    kvs_disk_opts dopts = {.nosync = true};
    if (kvs_disk_open(f->dir, disk_budget, &dopts, &f->disk, &err))
        fail_msg("%s", err.msg);
    kvs_store_opts o = {.host_capacity = 2 * (2200 + KVS_STORE_BLOCK_META),
                        .disk = f->disk,
                        .disk_capacity = disk_budget,
                        .spill_max = 64 << 20,
                        .no_promote = true, /* reads leave disk blocks where they are */
                        .host_high_pct = 100,
                        .host_low_pct = 100};
    if (kvs_store_create(&o, &f->st, &err))
        fail_msg("%s", err.msg);
}

static void fx_shut(fx *f)
{
    kvs_store_destroy(f->st);
    kvs_disk_close(f->disk);
}

static void fx_close(fx *f)
{
    fx_shut(f);
    kvs_test_rmtree(f->dir);
}

/* Puts a full block of ns whose payload is drawn from seed; returns its encoded bytes
 * (malloc'd) and their length. */
static uint8_t *put_seed(fx *f, kvs_ns *ns, const char *key, uint64_t seed, size_t *len)
{
    const kvs_ns_spec *sp = kvs_ns_spec_of(ns);
    uint64_t raw_bytes;
    assert_int_equal(kvs_spec_block_bytes(sp, 8, &raw_bytes, NULL), 0);
    uint16_t *raw = kvs_test_gauss_data(raw_bytes / 2, seed, 1.0, sp->dtype);
    const kvs_codec *k = kvs_ns_codec(ns, KVS_KEYS), *v = kvs_ns_codec(ns, KVS_VALUES);
    size_t cap = kvs_block_encoded_max(k, v, 8);
    kvs_block *blk;
    kvs_err err;
    assert_int_equal(kvs_store_block_alloc(f->st, ns, 8, cap, &blk, &err), 0);
    assert_int_equal(
        kvs_block_encode(k, v, kvs_ns_id(ns), 8, raw, kvs_block_data(blk), cap, len, &err), 0);
    free(raw);
    kvs_block_set_size(blk, *len, raw_bytes);
    uint8_t *copy = malloc(*len);
    memcpy(copy, kvs_block_data(blk), *len);
    assert_int_equal(kvs_store_block_commit(f->st, blk, key, strlen(key), NULL, &err), 0);
    return copy;
}

/* 0 and the block's bytes checked against want, or the get's error. */
static int get_check(fx *f, kvs_ns *ns, const char *key, const uint8_t *want, size_t len)
{
    kvs_block *blk;
    kvs_err err;
    int rc = kvs_store_get(f->st, ns, key, strlen(key), &blk, &err);
    if (rc)
        return rc;
    assert_int_equal(kvs_block_size(blk), len);
    assert_memory_equal(kvs_block_data(blk), want, len);
    kvs_store_block_release(f->st, blk);
    return 0;
}

static kvs_ns *find(kvs_store *st, const char *name)
{
    kvs_ns *ns;
    kvs_err err;
    if (kvs_store_ns_find(st, name, &ns, &err))
        fail_msg("%s", err.msg);
    return ns;
}

#define NQ 12

static void test_disk_quota_evicts_own_records(void **state)
{
    fx f;
    fx_open(&f, 16 << 20, false); /* the budget never runs short: only the quota does */
    kvs_ns_spec sd = spec_of("d", 0, 0), sq = spec_of("q", 0, 0);
    kvs_ns *d = ns_new(f.st, &sd);
    size_t len;
    uint8_t *probe = put_seed(&f, d, "probe", 1, &len); /* one block's encoded size */
    kvs_store_key pk = {"probe", 5};
    assert_int_equal(kvs_store_delete(f.st, d, &pk, 1), 1);
    free(probe);
    sq.disk_quota = 4 * len + len / 2; /* room for 4 records of q */
    kvs_ns *q = ns_new(f.st, &sq);

    /* D's three blocks reach the disk first: the oldest records there. */
    uint8_t *dw[3], *qw[NQ];
    size_t dl[3], ql[NQ];
    char key[16];
    for (int i = 0; i < 3; i++) {
        snprintf(key, sizeof key, "d%d", i);
        dw[i] = put_seed(&f, d, key, 10 + i, &dl[i]);
        kvs_store_disk_wait(f.st);
    }
    /* Q's spills pass its quota: its own oldest records go, never D's. */
    for (int i = 0; i < NQ; i++) {
        snprintf(key, sizeof key, "q%d", i);
        qw[i] = put_seed(&f, q, key, 100 + i, &ql[i]);
        kvs_store_disk_wait(f.st);
        assert_true(usage_of(f.st, "q").disk_bytes <= sq.disk_quota);
    }
    for (int i = 0; i < 3; i++) {
        snprintf(key, sizeof key, "d%d", i);
        assert_int_equal(get_check(&f, d, key, dw[i], dl[i]), 0);
        assert_int_equal(tier_of(f.st, d, key), KVS_STORE_TIER_DISK);
    }
    int held = 0;
    for (int i = 0; i < NQ; i++) {
        snprintf(key, sizeof key, "q%d", i);
        int rc = get_check(&f, q, key, qw[i], ql[i]);
        assert_true(rc == 0 || rc == KVS_ENOTFOUND);
        assert_true(rc != 0 || i >= NQ - 6); /* the newest stay: 2 in RAM, 4 on disk */
        held += rc == 0;
    }
    assert_int_equal(held, 6);
    kvs_ns_usage uq = usage_of(f.st, "q"), ud = usage_of(f.st, "d");
    assert_int_equal(uq.disk_bytes, 4 * len);
    assert_int_equal(ud.disk_bytes, 3 * len);
    kvs_store_stats s;
    kvs_store_get_stats(f.st, &s);
    assert_int_equal(s.disk_used, 7 * len);
    assert_int_equal(s.disk_evictions, NQ - 6);

    /* After a restart every namespace is charged exactly its records again (the host
     * blocks were not flushed: they are gone), and the quotas come back with the spec. */
    kvs_ns_unref(d);
    kvs_ns_unref(q);
    fx_shut(&f);
    fx_open(&f, 16 << 20, true);
    assert_int_equal(usage_of(f.st, "q").disk_bytes, 4 * len);
    assert_int_equal(usage_of(f.st, "d").disk_bytes, 3 * len);
    q = find(f.st, "q");
    d = find(f.st, "d");
    assert_int_equal(kvs_ns_spec_of(q)->disk_quota, sq.disk_quota);
    assert_int_equal(kvs_ns_spec_of(d)->disk_quota, 0);
    /* ...and is enforced from there: three more of Q's leave it at 4 records. */
    for (int i = 0; i < 3; i++) {
        snprintf(key, sizeof key, "r%d", i);
        free(put_seed(&f, q, key, 200 + i, &len));
        kvs_store_disk_wait(f.st);
    }
    assert_int_equal(usage_of(f.st, "q").disk_bytes, 4 * len);
    for (int i = 0; i < 3; i++) {
        snprintf(key, sizeof key, "d%d", i);
        assert_int_equal(get_check(&f, d, key, dw[i], dl[i]), 0);
        free(dw[i]);
    }
    for (int i = 0; i < NQ; i++)
        free(qw[i]);
    kvs_ns_unref(d);
    kvs_ns_unref(q);
    fx_close(&f);
}

/* Holds the disk writer (a barrier's callback runs on its thread) until opened. */
typedef struct gate {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool in, open;
} gate;

static void gate_cb(void *arg, int rc, const kvs_err *err)
{
    gate *g = arg;
    pthread_mutex_lock(&g->mu);
    g->in = true;
    pthread_cond_broadcast(&g->cv);
    while (!g->open)
        pthread_cond_wait(&g->cv, &g->mu);
    pthread_mutex_unlock(&g->mu);
}

static void test_disk_quota_counts_a_run_block_by_block(void **state)
{
    /* Ten spills of Q queued while the writer waits reach it as one run; the run does not fit
     * the quota, so the writer writes block by block: each must count the ones written
     * before it (which the index learns of only after the run), or all ten would go. */
    fx f;
    fx_open(&f, 16 << 20, false);
    kvs_ns_spec sq = spec_of("q", 0, 0);
    sq.disk_quota = 4 * 2200;
    kvs_ns *q = ns_new(f.st, &sq);
    gate g = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};
    kvs_store_disk_barrier(f.st, gate_cb, &g);
    pthread_mutex_lock(&g.mu);
    while (!g.in)
        pthread_cond_wait(&g.cv, &g.mu);
    pthread_mutex_unlock(&g.mu);
    size_t len = 0;
    char key[16];
    for (int i = 0; i < 12; i++) { /* the host tier holds 2: 10 spills wait */
        snprintf(key, sizeof key, "q%d", i);
        free(put_seed(&f, q, key, 300 + i, &len));
    }
    kvs_store_stats s;
    kvs_store_get_stats(f.st, &s);
    assert_int_equal(s.spill_pending, 10 * len);
    pthread_mutex_lock(&g.mu);
    g.open = true;
    pthread_cond_broadcast(&g.cv);
    pthread_mutex_unlock(&g.mu);
    kvs_store_disk_wait(f.st);
    kvs_ns_usage u = usage_of(f.st, "q");
    assert_int_equal(u.disk_bytes, 4 * len); /* 4 written, 6 refused by the quota */
    kvs_store_get_stats(f.st, &s);
    assert_int_equal(s.disk_used, 4 * len);
    assert_int_equal(s.spill_dropped, 6);
    assert_int_equal(s.disk_write_errors, 0); /* a quota is no write error */
    assert_int_equal(u.blocks, 2 + 4);
    /* The run's newest are the ones written (victims leave in eviction order: the oldest
     * of a run are the coldest), q6..q9; q10 and q11 are in the host tier. */
    for (int i = 0; i < 12; i++) {
        snprintf(key, sizeof key, "q%d", i);
        assert_int_equal(tier_of(f.st, q, key), i < 6    ? KVS_STORE_TIER_NONE
                                                : i < 10 ? KVS_STORE_TIER_DISK
                                                         : KVS_STORE_TIER_HOST);
    }
    kvs_ns_unref(q);
    fx_close(&f);
}

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

/* A durable Put of a full block from seed: the durable callback's rc (msg: its message). */
static int put_durable(fx *f, kvs_ns *ns, const char *key, uint64_t seed, char *msg)
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
    durable_wait w = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};
    assert_int_equal(
        kvs_store_block_commit_durable(f->st, blk, key, strlen(key), NULL, durable_cb, &w, &err),
        0);
    pthread_mutex_lock(&w.mu);
    while (!w.done)
        pthread_cond_wait(&w.cv, &w.mu);
    pthread_mutex_unlock(&w.mu);
    if (msg)
        strcpy(msg, w.msg);
    return w.rc;
}

static void test_durable_over_disk_quota_is_refused(void **state)
{
    fx f;
    fx_open(&f, 16 << 20, false);
    kvs_ns_spec sp = spec_of("dq", 0, 5000); /* two records of about 2100 bytes */
    sp.durable = true;
    kvs_ns *dq = ns_new(f.st, &sp);
    char msg[KVS_ERR_MSG_LEN];
    assert_int_equal(put_durable(&f, dq, "k0", 1, NULL), 0);
    assert_int_equal(put_durable(&f, dq, "k1", 2, NULL), 0);
    /* Its records are never evicted (durable): the third is refused, naming the quota. */
    assert_int_equal(put_durable(&f, dq, "k2", 3, msg), KVS_ENOSPC);
    assert_non_null(strstr(msg, "disk_quota_bytes"));
    assert_int_equal(tier_of(f.st, dq, "k2"), KVS_STORE_TIER_NONE);
    assert_int_not_equal(tier_of(f.st, dq, "k0"), KVS_STORE_TIER_NONE);
    assert_int_not_equal(tier_of(f.st, dq, "k1"), KVS_STORE_TIER_NONE);
    kvs_store_stats s;
    kvs_store_get_stats(f.st, &s);
    assert_int_equal(s.disk_refused, 1);
    /* A delete gives its share back; replacing a block charges only the difference. */
    kvs_store_key k0 = {"k0", 2};
    assert_int_equal(kvs_store_delete(f.st, dq, &k0, 1), 1);
    assert_int_equal(put_durable(&f, dq, "k2", 3, NULL), 0);
    assert_int_equal(put_durable(&f, dq, "k2", 4, NULL), 0);
    kvs_store_disk_wait(f.st);
    kvs_store_get_stats(f.st, &s);
    assert_int_equal(usage_of(f.st, "dq").disk_bytes, s.disk_used);
    assert_true(s.disk_used <= sp.disk_quota);
    kvs_ns_unref(dq);
    fx_close(&f);
}

/* A spec record of each version the restore reads (persist.c), written as an older build
 * wrote it: its quotas are what it says, the ones it lacks none. */
static void test_spec_records_of_every_version(void **state)
{
    fx f;
    fx_open(&f, 16 << 20, false);
    kvs_ns_spec s = spec_of("v4", 4096, 8192);
    kvs_ns_unref(ns_new(f.st, &s)); /* version 4: a gpu or disk quota */
    fx_shut(&f);
    kvs_err err;
    kvs_disk_opts dopts = {.nosync = true};
    assert_int_equal(kvs_disk_open(f.dir, 16 << 20, &dopts, &f.disk, &err), 0);
    static const char *const old[] = {
        "kvs-ns 1 v1 2 2 16 8 1 none none 0 0 5",
        "kvs-ns 2 v2 2 2 16 8 1 none none 0 0 5 3000",
        "kvs-ns 3 v3 2 2 16 8 1 none none 0 0 5 3000 - 0.5 fp8",
        "kvs-ns 5 v5 2 2 16 8 1 none none 0 0 5 3000 - 0 - 4096 0 kivi-4 kivi-2",
    };
    for (uint32_t i = 0; i < 4; i++)
        assert_int_equal(kvs_disk_ns_put(f.disk, 100 + i, "", 0, old[i], strlen(old[i]), &err), 0);
    kvs_disk_close(f.disk);
    fx_open(&f, 16 << 20, true);
    const struct {
        const char *name;
        uint64_t host, gpu, disk;
    } want[] = {{"v1", 0, 0, 0},
                {"v2", 3000, 0, 0},
                {"v3", 3000, 0, 0},
                {"v4", 0, 4096, 8192},
                {"v5", 3000, 4096, 0}};
    for (size_t i = 0; i < 5; i++) {
        kvs_ns *ns = find(f.st, want[i].name);
        const kvs_ns_spec *sp = kvs_ns_spec_of(ns);
        assert_int_equal(sp->host_quota, want[i].host);
        assert_int_equal(sp->gpu_quota, want[i].gpu);
        assert_int_equal(sp->disk_quota, want[i].disk);
        kvs_ns_unref(ns);
    }
    kvs_ns *v3 = find(f.st, "v3");
    assert_string_equal(kvs_ns_spec_of(v3)->fallback_codec, "fp8");
    kvs_ns_unref(v3);
    kvs_ns *v5 = find(f.st, "v5"); /* version 5: the tier codecs after version 4's quotas */
    assert_string_equal(kvs_ns_spec_of(v5)->host_codec, "kivi-4");
    assert_string_equal(kvs_ns_spec_of(v5)->disk_codec, "kivi-2");
    kvs_ns_unref(v5);
    fx_close(&f);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_quota_under_a_block_is_refused),
        cmocka_unit_test(test_gpu_quota_demotes_own_blocks),
        cmocka_unit_test(test_disk_quota_evicts_own_records),
        cmocka_unit_test(test_disk_quota_counts_a_run_block_by_block),
        cmocka_unit_test(test_durable_over_disk_quota_is_refused),
        cmocka_unit_test(test_spec_records_of_every_version),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
