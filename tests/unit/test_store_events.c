/* storage/store events (store.h "Events", opts.on_event): each change of the index is
 * reported once, in order, through the one sink: commits, replaces, deletes, host eviction,
 * GPU demotion and promotion, spills to the disk tier and promotion back, an operator's
 * evict, a namespace drop (one CLEARED); nothing for reads, for the restore at create or
 * for destroy. A multi-threaded soak over a disk tier checks the property the sink exists
 * for: replaying the events gives, for every key, the tier Lookup reports. */
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

/* ---------------------------------------------------------------- the recording sink */

typedef struct rec {
    kvs_store_event_kind kind;
    kvs_store_tier tier;
    uint32_t block_tokens;
    char ns[KVS_NAME_MAX + 1];
    uint8_t key[KVS_KEY_MAX];
    size_t key_len;
} rec;

/* Everything the sink saw. The store calls it under its lock, so appends never race;
 * the test reads it once the operations that emit are done. */
typedef struct recorder {
    rec *v;
    size_t n, cap;
} recorder;

static void record(void *ctx, const kvs_store_event *ev)
{
    recorder *r = ctx;
    if (r->n == r->cap) {
        r->cap = r->cap ? 2 * r->cap : 64;
        r->v = realloc(r->v, r->cap * sizeof *r->v);
        assert_non_null(r->v);
    }
    rec *e = &r->v[r->n++];
    memset(e, 0, sizeof *e);
    e->kind = ev->kind;
    e->tier = ev->tier;
    e->block_tokens = ev->block_tokens;
    snprintf(e->ns, sizeof e->ns, "%s", ev->ns);
    assert_true(ev->key_len <= KVS_KEY_MAX);
    assert_true((ev->key == NULL) == (ev->kind == KVS_STORE_EV_CLEARED));
    if (ev->key)
        memcpy(e->key, ev->key, ev->key_len);
    e->key_len = ev->key_len;
}

static const char *tier_word(kvs_store_tier t)
{
    return t == KVS_STORE_TIER_GPU ? "gpu" : t == KVS_STORE_TIER_HOST ? "host" : "disk";
}

/* The events recorded since *from, as "+host a, -host a, clear m" (keys are text here),
 * and *from moved past them. */
static const char *since(recorder *r, size_t *from)
{
    static char buf[4096];
    size_t o = 0;
    buf[0] = 0;
    for (size_t i = *from; i < r->n && o < sizeof buf - 100; i++) {
        const rec *e = &r->v[i];
        const char *sep = i > *from ? ", " : "";
        if (e->kind == KVS_STORE_EV_CLEARED)
            o += (size_t)snprintf(buf + o, sizeof buf - o, "%sclear %s", sep, e->ns);
        else
            o += (size_t)snprintf(buf + o, sizeof buf - o, "%s%c%s %.*s", sep,
                                  e->kind == KVS_STORE_EV_STORED ? '+' : '-', tier_word(e->tier),
                                  (int)e->key_len, (const char *)e->key);
    }
    *from = r->n;
    return buf;
}

/* ---------------------------------------------------------------- blocks */

/* L=2 H=1 D=16 T=4 fp16, codec none: ENC(t) encoded bytes for t tokens. */
static kvs_ns_spec small_spec(const char *name)
{
    kvs_ns_spec s = kvs_test_spec(2, 1, 16, 4, KVS_DTYPE_FP16, "none", "none", 0);
    snprintf(s.name, sizeof s.name, "%s", name);
    return s;
}

#define ENC(t) ((uint64_t)kvs_format_prefix_bytes(2) + 128u * (t))
#define HOST(t) (ENC(t) + KVS_STORE_BLOCK_META) /* its host tier charge */

/* Puts a real encoded block (the store checks its checksum on reads) of t tokens. */
static int put(kvs_store *st, kvs_ns *ns, const char *key, uint32_t t, kvs_err *err)
{
    const kvs_codec *k = kvs_ns_codec(ns, KVS_KEYS), *v = kvs_ns_codec(ns, KVS_VALUES);
    uint64_t raw_bytes;
    assert_int_equal(kvs_spec_block_bytes(kvs_ns_spec_of(ns), t, &raw_bytes, NULL), 0);
    size_t cap = kvs_block_encoded_max(k, v, t), len;
    kvs_block *blk;
    int rc = kvs_store_block_alloc(st, ns, t, cap, &blk, err);
    if (rc)
        return rc;
    uint16_t *raw = calloc(1, raw_bytes);
    assert_int_equal(
        kvs_block_encode(k, v, kvs_ns_id(ns), t, raw, kvs_block_data(blk), cap, &len, err), 0);
    free(raw);
    kvs_block_set_size(blk, len, raw_bytes);
    return kvs_store_block_commit(st, blk, key, strlen(key), NULL, err);
}

static void get_release(kvs_store *st, kvs_ns *ns, const char *key)
{
    kvs_block *blk;
    kvs_err err;
    if (kvs_store_get(st, ns, key, strlen(key), &blk, &err))
        fail_msg("get %s: %s", key, err.msg);
    kvs_store_block_release(st, blk);
}

static kvs_store *new_store(recorder *r, uint64_t host_cap)
{
    kvs_store *st = NULL;
    kvs_store_opts o = {.host_capacity = host_cap, .on_event = record, .event_ctx = r};
    assert_int_equal(kvs_store_create(&o, &st, NULL), 0);
    return st;
}

/* ---------------------------------------------------------------- host tier */

static void test_put_get_replace_delete(void **state)
{
    recorder r = {0};
    size_t at = 0;
    kvs_store *st = new_store(&r, 1 << 20);
    kvs_ns_spec s = small_spec("m");
    kvs_ns *ns;
    kvs_err err;
    assert_int_equal(kvs_store_ns_create(st, &s, &ns, &err), 0);
    assert_string_equal(since(&r, &at), ""); /* a namespace is no block */

    assert_int_equal(put(st, ns, "a", 4, &err), 0);
    assert_int_equal(put(st, ns, "b", 2, &err), 0);
    assert_string_equal(since(&r, &at), "+host a, +host b");
    assert_string_equal(r.v[0].ns, "m");
    assert_int_equal(r.v[0].block_tokens, 4); /* the namespace's T, also for a short block */
    assert_int_equal(r.v[1].block_tokens, 4);

    /* Reads and lookups change nothing. */
    get_release(st, ns, "a");
    kvs_store_key keys[2] = {{"a", 1}, {"zz", 2}};
    kvs_store_tier tiers[2];
    kvs_store_lookup(st, ns, keys, 2, tiers, NULL, NULL);
    kvs_block *blk;
    assert_int_equal(kvs_store_get(st, ns, "zz", 2, &blk, &err), KVS_ENOTFOUND);
    assert_string_equal(since(&r, &at), "");

    /* A replace: the old block leaves, the new one comes. */
    assert_int_equal(put(st, ns, "a", 3, &err), 0);
    assert_string_equal(since(&r, &at), "-host a, +host a");

    /* Delete: what exists, once. */
    assert_int_equal(kvs_store_delete(st, ns, keys, 2), 1);
    assert_int_equal(kvs_store_delete(st, ns, keys, 1), 0);
    assert_string_equal(since(&r, &at), "-host a");

    /* A Put aborted before its commit was never in the index. */
    assert_int_equal(kvs_store_block_alloc(st, ns, 4, ENC(4), &blk, &err), 0);
    kvs_store_block_abort(st, blk);
    assert_string_equal(since(&r, &at), "");

    kvs_ns_unref(ns);
    kvs_store_destroy(st);
    assert_string_equal(since(&r, &at), ""); /* b went with the store: not an eviction */
    free(r.v);
}

static void test_host_eviction(void **state)
{
    recorder r = {0};
    size_t at = 0;
    kvs_store *st = new_store(&r, 2 * HOST(4)); /* two full blocks */
    kvs_ns_spec s = small_spec("m");
    kvs_ns *ns;
    kvs_err err;
    assert_int_equal(kvs_store_ns_create(st, &s, &ns, &err), 0);
    assert_int_equal(put(st, ns, "a", 4, &err), 0);
    assert_int_equal(put(st, ns, "b", 4, &err), 0);
    get_release(st, ns, "a"); /* b is now the least recently used */
    assert_int_equal(put(st, ns, "c", 4, &err), 0);
    /* No disk tier: the victim leaves the store before its replacement is linked. */
    assert_string_equal(since(&r, &at), "+host a, +host b, -host b, +host c");

    /* A smaller host tier at run time evicts too. */
    assert_int_equal(kvs_store_set_host(st, HOST(4), KVS_POLICY_LRU, NULL, &err), 0);
    assert_string_equal(since(&r, &at), "-host a");

    /* An operator's evict out of the store. */
    kvs_store_sel sel = {.ns = ns};
    kvs_store_evict_info ei;
    assert_int_equal(kvs_store_evict(st, &sel, KVS_STORE_TIER_NONE, NULL, NULL, &ei, &err), 0);
    assert_int_equal(ei.dropped, 1);
    assert_string_equal(since(&r, &at), "-host c");
    kvs_ns_unref(ns);
    kvs_store_destroy(st);
    free(r.v);
}

static void test_ns_drop_clears(void **state)
{
    recorder r = {0};
    size_t at = 0;
    kvs_store *st = new_store(&r, 1 << 20);
    kvs_ns_spec s = small_spec("m"), s2 = small_spec("other");
    kvs_ns *ns, *ns2;
    kvs_err err;
    assert_int_equal(kvs_store_ns_create(st, &s, &ns, &err), 0);
    assert_int_equal(kvs_store_ns_create(st, &s2, &ns2, &err), 0);
    for (int i = 0; i < 5; i++) {
        char key[8];
        snprintf(key, sizeof key, "k%d", i);
        assert_int_equal(put(st, ns, key, 4, &err), 0);
    }
    assert_int_equal(put(st, ns2, "x", 4, &err), 0);
    since(&r, &at);
    uint64_t dropped;
    assert_int_equal(kvs_store_ns_drop(st, "m", &dropped, &err), 0);
    assert_int_equal(dropped, 5);
    /* One event for the namespace, none per block; the other namespace keeps its own. */
    assert_string_equal(since(&r, &at), "clear m");
    assert_int_equal(r.v[r.n - 1].tier, KVS_STORE_TIER_NONE);
    assert_int_equal(kvs_store_ns_drop(st, "m", NULL, &err), KVS_ENOTFOUND);
    assert_string_equal(since(&r, &at), "");
    /* A Put that was filling while its namespace went is refused: nothing reported. */
    assert_int_equal(put(st, ns, "late", 4, &err), KVS_ENOTFOUND);
    assert_string_equal(since(&r, &at), "");
    kvs_ns_unref(ns);
    kvs_ns_unref(ns2);
    kvs_store_destroy(st);
    free(r.v);
}

/* ---------------------------------------------------------------- gpu tier (the store never
 * touches the region: a fake device address stands in for it, as in test_store.c) */

#define FAKE_DEV ((uintptr_t)0x7f0000000000ull)

static int put_gpu(kvs_store *st, kvs_ns *ns, const char *key, kvs_err *err)
{
    kvs_block *blk;
    int rc = kvs_store_block_alloc_gpu(st, 0, ns, 4, 0, 1000, &blk, err);
    if (rc)
        return rc;
    kvs_block_set_size(blk, 300, 512);
    return kvs_store_block_commit(st, blk, key, strlen(key), NULL, err);
}

static void test_gpu_demote_promote(void **state)
{
    recorder r = {0};
    size_t at = 0;
    kvs_store *st = NULL;
    kvs_store_opts o = {.host_capacity = 1 << 20,
                        .gpu = {{FAKE_DEV, 4000}}, /* 4 slots of 1000 */
                        .gpu_slab = 2000,
                        .gpu_high_pct = 50,
                        .gpu_low_pct = 25,
                        .on_event = record,
                        .event_ctx = &r};
    assert_int_equal(kvs_store_create(&o, &st, NULL), 0);
    kvs_ns_spec s = small_spec("g");
    kvs_ns *ns;
    kvs_err err;
    assert_int_equal(kvs_store_ns_create(st, &s, &ns, &err), 0);
    assert_int_equal(put_gpu(st, ns, "g0", &err), 0);
    assert_int_equal(put_gpu(st, ns, "g1", &err), 0);
    assert_int_equal(put_gpu(st, ns, "g2", &err), 0);
    assert_string_equal(since(&r, &at), "+gpu g0, +gpu g1, +gpu g2");

    /* Demotion: picked blocks stay where they are until the copy is committed. */
    kvs_block *picked[4];
    assert_int_equal(kvs_store_gpu_pick(st, 0, picked, 4), 2); /* g0, g1: down to 1000 */
    assert_string_equal(since(&r, &at), "");
    kvs_block *nb;
    assert_int_equal(kvs_store_block_alloc(st, ns, 4, ENC(4), &nb, &err), 0);
    kvs_store_demote_commit(st, picked[0], nb);
    assert_string_equal(since(&r, &at), "-gpu g0, +host g0");
    /* g1 deleted during its copy: the delete is the one event, the copy is dropped. */
    kvs_store_key k1 = {"g1", 2};
    assert_int_equal(kvs_store_delete(st, ns, &k1, 1), 1);
    assert_int_equal(kvs_store_block_alloc(st, ns, 4, ENC(4), &nb, &err), 0);
    kvs_store_demote_commit(st, picked[1], nb);
    assert_string_equal(since(&r, &at), "-gpu g1");

    /* Promotion: the GPU copy takes the host block's place; a cancelled one changes nothing. */
    assert_int_equal(put(st, ns, "h", 4, &err), 0);
    since(&r, &at);
    kvs_block *h, *g;
    assert_int_equal(kvs_store_get(st, ns, "h", 1, &h, &err), 0);
    assert_true(kvs_store_promote_begin(st, 0, h, 1000, &g));
    kvs_store_promote_cancel(st, h, g);
    assert_string_equal(since(&r, &at), "");
    assert_true(kvs_store_promote_begin(st, 0, h, 1000, &g));
    kvs_store_block_release(st, h);
    kvs_store_promote_commit(st, h, g);
    assert_string_equal(since(&r, &at), "-host h, +gpu h");
    kvs_ns_unref(ns);
    kvs_store_destroy(st);
    free(r.v);
}

/* ---------------------------------------------------------------- disk tier */

typedef struct disk_fx {
    char dir[64];
    kvs_disk *disk;
    kvs_store *st;
    kvs_ns *ns;
} disk_fx;

/* A store of host_bytes over a disk tier in a fresh directory (or f->dir again: reopen);
 * namespace "d" (small_spec). Watermarks at 100%: no background demotion unless wm. */
static void fx_open(disk_fx *f, recorder *r, uint64_t host_bytes, bool wm, bool reopen)
{
    if (!reopen) {
        snprintf(f->dir, sizeof f->dir, "/tmp/kvs-test-events-XXXXXX");
        assert_non_null(mkdtemp(f->dir));
    }
    kvs_err err;
    kvs_disk_opts dopts = {.nosync = true};
    if (kvs_disk_open(f->dir, 64 << 20, &dopts, &f->disk, &err))
        fail_msg("%s", err.msg);
    kvs_store_opts o = {.host_capacity = host_bytes,
                        .disk = f->disk,
                        .disk_capacity = 64 << 20,
                        .spill_max = 1 << 20,
                        .host_high_pct = wm ? 60 : 100,
                        .host_low_pct = wm ? 40 : 100,
                        .on_event = record,
                        .event_ctx = r};
    assert_int_equal(kvs_store_create(&o, &f->st, &err), 0);
    kvs_ns_spec s = small_spec("d");
    int rc = kvs_store_ns_find(f->st, "d", &f->ns, &err);
    if (rc == KVS_ENOTFOUND)
        rc = kvs_store_ns_create(f->st, &s, &f->ns, &err);
    if (rc)
        fail_msg("%s", err.msg);
}

static void fx_close(disk_fx *f, bool remove_dir)
{
    kvs_ns_unref(f->ns);
    kvs_store_destroy(f->st);
    kvs_disk_close(f->disk);
    if (remove_dir)
        kvs_test_rmtree(f->dir);
}

static void test_disk_moves(void **state)
{
    recorder r = {0};
    size_t at = 0;
    disk_fx f;
    /* Room for 4 blocks; a multiple of 100, so that watermarks of 100% are the capacity
     * itself (they are computed as capacity / 100 * pct) and no background demotion runs. */
    const uint64_t cap = (4 * HOST(4) + 99) / 100 * 100;
    fx_open(&f, &r, cap, false, false);
    kvs_err err;
    assert_int_equal(put(f.st, f.ns, "a", 4, &err), 0);
    assert_int_equal(put(f.st, f.ns, "b", 4, &err), 0);
    assert_string_equal(since(&r, &at), "+host a, +host b");

    /* Down to the disk tier: a leaves the host tier only once its record is committed. */
    kvs_store_key ka = {"a", 1};
    kvs_store_sel sel = {.ns = f.ns, .keys = &ka, .n = 1};
    kvs_store_evict_info ei;
    assert_int_equal(kvs_store_evict(f.st, &sel, KVS_STORE_TIER_DISK, NULL, NULL, &ei, &err), 0);
    assert_string_equal(since(&r, &at), "-host a, +disk a");
    /* A Get promotes it (its record stays); evicting it again needs no write. */
    get_release(f.st, f.ns, "a");
    assert_string_equal(since(&r, &at), "-disk a, +host a");
    assert_int_equal(kvs_store_evict(f.st, &sel, KVS_STORE_TIER_DISK, NULL, NULL, &ei, &err), 0);
    assert_string_equal(since(&r, &at), "-host a, +disk a");
    /* Out of the store, from the disk tier. */
    assert_int_equal(kvs_store_evict(f.st, &sel, KVS_STORE_TIER_NONE, NULL, NULL, &ei, &err), 0);
    assert_string_equal(since(&r, &at), "-disk a");

    /* A Put past the capacity spills the oldest block through the disk writer, whose commit
     * may come before or after the Put's own link (another thread). */
    assert_int_equal(put(f.st, f.ns, "c", 4, &err), 0);
    assert_int_equal(put(f.st, f.ns, "d", 4, &err), 0);
    assert_int_equal(put(f.st, f.ns, "e", 4, &err), 0);
    assert_int_equal(put(f.st, f.ns, "f", 4, &err), 0);
    kvs_store_disk_wait(f.st);
    const char *got = since(&r, &at);
    if (strcmp(got, "+host c, +host d, +host e, -host b, +disk b, +host f") &&
        strcmp(got, "+host c, +host d, +host e, +host f, -host b, +disk b"))
        fail_msg("spill: %s", got);

    /* A restart indexes what the disk tier holds (flushed first) without a word... */
    kvs_store_flush(f.st);
    assert_string_equal(since(&r, &at), ""); /* copies: the blocks stay in the host tier */
    fx_close(&f, false);
    assert_string_equal(since(&r, &at), "");
    fx_open(&f, &r, cap, false, true);
    assert_string_equal(since(&r, &at), "");
    kvs_store_key kb = {"b", 1};
    kvs_store_tier t;
    kvs_store_lookup(f.st, f.ns, &kb, 1, &t, NULL, NULL);
    assert_int_equal(t, KVS_STORE_TIER_DISK);
    /* ...and reports what happens from then on. */
    get_release(f.st, f.ns, "b");
    assert_string_equal(since(&r, &at), "-disk b, +host b");
    fx_close(&f, true);
    free(r.v);
}

/* ---------------------------------------------------------------- replay soak */

enum { SOAK_KEYS = 48, SOAK_THREADS = 4, SOAK_OPS = 1500 };

typedef struct soak_arg {
    disk_fx *f;
    unsigned seed;
} soak_arg;

static void *soak_thread(void *p)
{
    soak_arg *a = p;
    char key[16];
    for (int i = 0; i < SOAK_OPS; i++) {
        unsigned x = rand_r(&a->seed);
        snprintf(key, sizeof key, "k%u", x % SOAK_KEYS);
        kvs_store_key sk = {key, strlen(key)};
        kvs_err err;
        kvs_block *blk;
        switch ((x >> 8) % 8) {
        case 0:
        case 1:
        case 2:
            put(a->f->st, a->f->ns, key, 1 + (x >> 12) % 4, &err); /* ENOSPC: all busy */
            break;
        case 3:
        case 4:
        case 5: /* a disk block is read back and promoted */
            if (kvs_store_get(a->f->st, a->f->ns, key, sk.len, &blk, &err) == 0)
                kvs_store_block_release(a->f->st, blk);
            break;
        case 6:
            kvs_store_delete(a->f->st, a->f->ns, &sk, 1);
            break;
        default: {
            kvs_store_sel sel = {.ns = a->f->ns, .keys = &sk, .n = 1};
            kvs_store_evict_info ei;
            kvs_store_evict(a->f->st, &sel,
                            (x >> 16) % 2 ? KVS_STORE_TIER_DISK : KVS_STORE_TIER_NONE, NULL, NULL,
                            &ei, &err);
        }
        }
    }
    return NULL;
}

/* Threads put, get (promoting), delete and evict over a small host tier that spills to
 * disk in the background; then, once the disk writer is idle, the events replayed in order
 * must give exactly the tier of every key that Lookup reports. */
static void test_replay_matches_index(void **state)
{
    recorder r = {0};
    disk_fx f;
    fx_open(&f, &r, 8 * HOST(4), true, false);
    pthread_t th[SOAK_THREADS];
    soak_arg args[SOAK_THREADS];
    for (int i = 0; i < SOAK_THREADS; i++) {
        args[i] = (soak_arg){&f, 77u + (unsigned)i};
        assert_int_equal(pthread_create(&th[i], NULL, soak_thread, &args[i]), 0);
    }
    for (int i = 0; i < SOAK_THREADS; i++)
        pthread_join(th[i], NULL);
    kvs_store_disk_wait(f.st);
    kvs_store_disk_wait(f.st); /* background demotion queued by the last batch */

    kvs_store_tier replay[SOAK_KEYS] = {0};
    size_t moves = 0;
    for (size_t i = 0; i < r.n; i++) {
        const rec *e = &r.v[i];
        assert_int_equal(e->kind == KVS_STORE_EV_CLEARED, 0);
        unsigned k = (unsigned)strtoul((const char *)e->key + 1, NULL, 10);
        assert_true(k < SOAK_KEYS);
        if (e->kind == KVS_STORE_EV_STORED) {
            assert_int_equal(replay[k], KVS_STORE_TIER_NONE); /* one place at a time */
            replay[k] = e->tier;
        } else {
            assert_int_equal(replay[k], e->tier); /* removed from where it was */
            replay[k] = KVS_STORE_TIER_NONE;
            moves += i + 1 < r.n && r.v[i + 1].kind == KVS_STORE_EV_STORED &&
                     r.v[i + 1].key_len == e->key_len &&
                     memcmp(r.v[i + 1].key, e->key, e->key_len) == 0 && r.v[i + 1].tier != e->tier;
        }
    }
    size_t present = 0;
    for (unsigned k = 0; k < SOAK_KEYS; k++) {
        char key[16];
        snprintf(key, sizeof key, "k%u", k);
        kvs_store_key sk = {key, strlen(key)};
        kvs_store_tier t;
        kvs_store_lookup(f.st, f.ns, &sk, 1, &t, NULL, NULL);
        if (t != replay[k])
            fail_msg("%s: the index says %d, the events %d", key, t, replay[k]);
        present += t != KVS_STORE_TIER_NONE;
    }
    /* The soak did what it is for: blocks moved between tiers and some are left. */
    assert_true(moves > 10);
    assert_true(present > 0);
    fx_close(&f, true);
    free(r.v);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_put_get_replace_delete),
        cmocka_unit_test(test_host_eviction),
        cmocka_unit_test(test_ns_drop_clears),
        cmocka_unit_test(test_gpu_demote_promote),
        cmocka_unit_test(test_disk_moves),
        cmocka_unit_test(test_replay_matches_index),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
