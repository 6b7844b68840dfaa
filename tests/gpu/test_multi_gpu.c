/* Several GPU engines behind one data path (issue 17): the store's gpu tier per device,
 * storage/xfer's routing by device, storage/tiering's rounds per device.
 *
 * Two engines: on devices 0 and 1 where the process sees two GPUs (the cross-device moves
 * are then real), else both on device 0 (the multi-engine code path on one GPU: two
 * threads, streams, staging and tier regions, two gpu tiers in the store). Each engine's
 * tier region is allocated whole and given to the store but for its tail, which this test
 * uses as device memory of that "device" for sources and destinations.
 *
 * Checked, for a namespace whose codecs need device tables on each device (PolarQuant
 * keys) and one that does not (KIVI-2 keys, fp8 values): Puts from host memory spread over
 * both tiers (the device with the most room takes each); Puts from device memory stay on
 * their device; every block read back into host memory, into device memory of its own
 * device and of the other one (fetched encoded and decoded by the destination's engine)
 * equals the CPU reference decode byte for byte (the other device's read both by peer access,
 * where the devices allow it, and fetched through the host); an operator's evict demotes each
 * device's blocks through that device's engine (per-device demotion counts); a Get of a host
 * block into a device's memory promotes it to that device's tier (the reader's), from where it
 * reads back the same. Exits 77 without a GPU.
 */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gpu/codec/codec.h"
#include "gpu/engine/engine.h"
#include "storage/store.h"
#include "storage/tiering.h"
#include "storage/xfer.h"
#include "tests/support/kvs_test.h"

enum { L = 4, H = 4, D = 128, T = 16, BLOCKS = 24, DEVS = 2 };
#define TIER_BYTES ((uint64_t)96 << 20)
#define SCRATCH ((uint64_t)8 << 20) /* the tail of each region: test buffers */

static int failures;

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            failures++;                                                                            \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                                   \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fputc('\n', stderr);                                                                   \
        }                                                                                          \
    } while (0)

typedef struct waiter {
    atomic_int done;
    int rc;
    kvs_err err;
} waiter;

static void wait_for(waiter *w)
{
    for (int i = 0; i < 200000 && !atomic_load(&w->done); i++)
        usleep(50);
    if (!atomic_load(&w->done)) {
        fprintf(stderr, "FAIL: a data-path call never completed\n");
        exit(1);
    }
}

static void put_done(void *arg, int rc, const kvs_err *err, const kvs_store_put_info *info)
{
    (void)info;
    waiter *w = arg;
    w->rc = rc;
    if (err)
        w->err = *err;
    atomic_store(&w->done, 1);
}

static void get_done(void *arg, int rc, const kvs_err *err)
{
    waiter *w = arg;
    w->rc = rc;
    if (err)
        w->err = *err;
    atomic_store(&w->done, 1);
}

typedef struct fx {
    kvs_engine *e[DEVS];
    uint8_t *region[DEVS]; /* device; [0, TIER_BYTES - SCRATCH) is the store's tier */
    kvs_store *st;
    kvs_tiering *tier;
    kvs_xfer *x;      /* cross-device reads by peer access where the devices allow it */
    kvs_xfer *x_host; /* cross-device reads always fetched through the host (no_peer) */
} fx;

static int put(fx *f, kvs_ns *ns, const char *key, const uint16_t *raw, size_t bytes, int dev)
{
    waiter w = {0};
    kvs_xfer_put_req r = {
        .ns = ns,
        .key = key,
        .key_len = strlen(key),
        .tokens = T,
        .src = {.kind = KVS_XFER_HOST, .ptr = (uint8_t *)(uintptr_t)raw, .len = bytes},
        .done = put_done,
        .arg = &w};
    kvs_err err;
    if (dev >= 0) { /* device memory of engine dev: the raw block copied to its scratch */
        uint8_t *src = f->region[dev] + TIER_BYTES - SCRATCH;
        if (kvs_engine_copy(f->e[dev], src, raw, bytes, &err))
            return err.code;
        r.src =
            (kvs_xfer_buf){.kind = KVS_XFER_DEVICE, .ptr = src, .len = bytes, .gpu = (uint8_t)dev};
    }
    int rc = kvs_xfer_put(f->x, &r, &err);
    if (rc) {
        fprintf(stderr, "put %s: %s\n", key, err.msg);
        return rc;
    }
    wait_for(&w);
    if (w.rc)
        fprintf(stderr, "put %s: %s\n", key, w.err.msg);
    return w.rc;
}

/* The device of key's block (-1: not in a gpu tier). */
static int device_of(fx *f, kvs_ns *ns, const char *key)
{
    kvs_block *b;
    kvs_err err;
    if (kvs_store_get(f->st, ns, key, strlen(key), &b, &err))
        return -2;
    int g = kvs_block_tier(b) == KVS_STORE_TIER_GPU ? (int)kvs_block_gpu(b) : -1;
    kvs_store_block_release(f->st, b);
    return g;
}

/* A raw Get of key into out (host) through x, into host memory (dev < 0) or device dev's
 * memory. */
static int get(fx *f, kvs_xfer *x, kvs_ns *ns, const char *key, uint16_t *out, size_t bytes,
               int dev)
{
    kvs_xfer_get_req q = {.ns = ns, .key = key, .key_len = strlen(key), .layer_end = L};
    kvs_xfer_get *g;
    kvs_err err;
    int rc = kvs_xfer_get_open(x, &q, &g, &err);
    if (rc) {
        fprintf(stderr, "get %s: %s\n", key, err.msg);
        return rc;
    }
    kvs_xfer_buf dst = {.kind = KVS_XFER_HOST, .ptr = (uint8_t *)out, .len = bytes};
    uint8_t *dbuf = NULL;
    if (dev >= 0) {
        dbuf = f->region[dev] + TIER_BYTES - SCRATCH / 2;
        dst =
            (kvs_xfer_buf){.kind = KVS_XFER_DEVICE, .ptr = dbuf, .len = bytes, .gpu = (uint8_t)dev};
    }
    waiter w = {0};
    if ((rc = kvs_xfer_get_run(g, &dst, get_done, &w, &err)) == 0) {
        wait_for(&w);
        rc = w.rc;
        err = w.err;
    }
    kvs_xfer_get_close(g);
    if (rc == 0 && dbuf)
        rc = kvs_engine_copy(f->e[dev], out, dbuf, bytes, &err);
    if (rc)
        fprintf(stderr, "get %s into %s %d: %s\n", key, dev >= 0 ? "device" : "host", dev, err.msg);
    return rc;
}

static uint16_t *reference(kvs_ns *ns, const uint16_t *raw, size_t bytes)
{
    const kvs_codec *k = kvs_ns_codec(ns, KVS_KEYS), *v = kvs_ns_codec(ns, KVS_VALUES);
    size_t cap = kvs_block_encoded_max(k, v, T), len;
    uint8_t *enc = malloc(cap);
    uint16_t *dec = malloc(bytes);
    kvs_err err;
    if (kvs_block_encode(k, v, kvs_ns_id(ns), T, raw, enc, cap, &len, &err) ||
        kvs_block_decode(k, v, enc, len, 0, L, dec, &err)) {
        fprintf(stderr, "reference: %s\n", err.msg);
        exit(1);
    }
    free(enc);
    return dec;
}

static void check_reads(fx *f, kvs_ns *ns, const char *key, const uint16_t *want, size_t bytes,
                        const char *when)
{
    uint16_t *got = malloc(bytes);
    for (int via = 0; via < 2; via++)
        for (int dev = via ? 0 : -1; dev < DEVS; dev++) {
            memset(got, 0xEE, bytes);
            int rc = get(f, via ? f->x_host : f->x, ns, key, got, bytes, dev);
            CHECK(rc == 0 && memcmp(got, want, bytes) == 0, "%s: %s read into %s %d%s: rc %d, %s",
                  when, key, dev < 0 ? "host" : "device", dev, via ? " (through the host)" : "", rc,
                  rc ? "failed" : "bytes differ from the CPU reference");
        }
    free(got);
}

static void run_namespace(fx *f, const char *name, const char *kc, const char *vc, uint64_t seed)
{
    kvs_ns_spec s = kvs_test_spec(L, H, D, T, KVS_DTYPE_BF16, kc, vc, seed);
    snprintf(s.name, sizeof s.name, "%s", name);
    kvs_ns *ns;
    kvs_err err;
    if (kvs_store_ns_create(f->st, &s, &ns, &err)) {
        fprintf(stderr, "namespace %s: %s\n", name, err.msg);
        exit(1);
    }
    uint64_t bytes;
    kvs_spec_block_bytes(&s, T, &bytes, NULL);
    uint16_t *raw[BLOCKS], *want[BLOCKS];
    int on[DEVS] = {0}, dev_put[DEVS] = {0};
    kvs_store_stats before, after;
    kvs_store_get_stats(f->st, &before);
    for (int i = 0; i < BLOCKS; i++) {
        char key[16];
        snprintf(key, sizeof key, "%s%d", name, i);
        raw[i] = kvs_test_gauss_data(bytes / 2, seed * 1000 + (uint64_t)i, 1.0, KVS_DTYPE_BF16);
        want[i] = reference(ns, raw[i], bytes);
        /* The last DEVS blocks come from device memory of device i % DEVS. */
        int src_dev = i >= BLOCKS - DEVS ? i % DEVS : -1;
        CHECK(put(f, ns, key, raw[i], bytes, src_dev) == 0, "%s: put %s", name, key);
        int g = device_of(f, ns, key);
        CHECK(g >= 0, "%s: %s not in a gpu tier (%d)", name, key, g);
        if (g >= 0)
            on[g]++;
        if (src_dev >= 0) {
            CHECK(g == src_dev, "%s: %s put from device %d's memory landed on %d", name, key,
                  src_dev, g);
            dev_put[src_dev]++;
        }
    }
    for (int g = 0; g < DEVS; g++)
        CHECK(on[g] >= BLOCKS / 4, "%s: device %d holds %d of %d blocks: not spread", name, g,
              on[g], BLOCKS);
    kvs_store_get_stats(f->st, &after);
    for (int g = 0; g < DEVS; g++)
        CHECK(after.gpu_dev[g].blocks - before.gpu_dev[g].blocks == (uint64_t)on[g],
              "%s: device %d's stats count %llu new blocks, %d landed there", name, g,
              (unsigned long long)(after.gpu_dev[g].blocks - before.gpu_dev[g].blocks), on[g]);
    for (int i = 0; i < BLOCKS; i++) {
        char key[16];
        snprintf(key, sizeof key, "%s%d", name, i);
        check_reads(f, ns, key, want[i], bytes, "gpu tier");
    }
    /* Every block of the namespace to the host tier, each through its device's engine. */
    kvs_store_sel sel = {.ns = ns};
    kvs_store_evict_info info;
    kvs_store_get_stats(f->st, &before);
    if (kvs_store_evict(f->st, &sel, KVS_STORE_TIER_HOST, kvs_tiering_demote, f->tier, &info,
                        &err)) {
        fprintf(stderr, "evict: %s\n", err.msg);
        exit(1);
    }
    kvs_store_get_stats(f->st, &after);
    CHECK(info.moved == BLOCKS, "%s: evict moved %llu of %d", name, (unsigned long long)info.moved,
          BLOCKS);
    for (int g = 0; g < DEVS; g++)
        CHECK(after.gpu_dev[g].demotions - before.gpu_dev[g].demotions == (uint64_t)on[g],
              "%s: device %d demoted %llu, held %d", name, g,
              (unsigned long long)(after.gpu_dev[g].demotions - before.gpu_dev[g].demotions),
              on[g]);
    for (int i = 0; i < BLOCKS; i++) {
        char key[16];
        snprintf(key, sizeof key, "%s%d", name, i);
        CHECK(device_of(f, ns, key) == -1, "%s: %s still in a gpu tier after the evict", name, key);
        /* A Get into device near's memory promotes the host block to that device's tier (the
         * reader's, which has room), beside the Get; the promotion is asynchronous. */
        int near = i % DEVS, at = -1;
        uint16_t *got = malloc(bytes);
        CHECK(get(f, f->x, ns, key, got, bytes, near) == 0 && memcmp(got, want[i], bytes) == 0,
              "%s: %s read from the host tier into device %d", name, key, near);
        free(got);
        for (int w = 0; w < 400 && (at = device_of(f, ns, key)) < 0; w++)
            usleep(5000);
        CHECK(at == near, "%s: %s promoted to device %d, the reader was on %d", name, key, at,
              near);
        check_reads(f, ns, key, want[i], bytes, "promoted");
        free(raw[i]);
        free(want[i]);
    }
    printf("%s (%s/%s): %d + %d blocks on devices 0 + 1 (%d + %d put from device memory), "
           "read back into host and both devices' memory, demoted per device, promoted to the "
           "reader's device\n",
           name, kc, vc, on[0], on[1], dev_put[0], dev_put[1]);
    kvs_ns_unref(ns);
}

int main(void)
{
    int ndev = 0;
    kvs_err err;
    if (kvs_engine_device_count(&ndev, &err) || ndev == 0) {
        printf("skipped: no GPU (%s)\n", ndev ? "" : err.msg);
        return 77;
    }
    int devs[DEVS] = {0, ndev >= 2 ? 1 : 0};
    fx f = {0};
    kvs_store_opts so = {
        .host_capacity = (uint64_t)256 << 20, .gpu_high_pct = 90, .gpu_low_pct = 80};
    for (int g = 0; g < DEVS; g++) {
        kvs_engine_opts o = {.device = devs[g]};
        if (kvs_engine_create(&o, &f.e[g], &err)) {
            printf("skipped: engine on device %d: %s\n", devs[g], err.msg);
            return 77;
        }
        void *base;
        if (kvs_engine_tier_alloc(f.e[g], TIER_BYTES, &base, &err)) {
            fprintf(stderr, "tier %d: %s\n", g, err.msg);
            return 1;
        }
        f.region[g] = base;
        so.gpu[g].base = (uintptr_t)base;
        so.gpu[g].capacity = TIER_BYTES - SCRATCH;
        so.engine[g] = f.e[g];
        printf("engine %d: %s\n", g, kvs_engine_device_name(f.e[g]));
    }
    if (kvs_store_create(&so, &f.st, &err)) {
        fprintf(stderr, "store: %s\n", err.msg);
        return 1;
    }
    f.tier = kvs_tiering_create(f.st, f.e, DEVS, NULL, NULL);
    kvs_xfer_opts xo = {.store = f.st, .tiering = f.tier}; /* run NULL: inline */
    for (int g = 0; g < DEVS; g++)
        xo.engine[g] = f.e[g];
    f.x = kvs_xfer_create(&xo);
    xo.no_peer = true;
    f.x_host = kvs_xfer_create(&xo);
    printf("%s\n", ndev >= 2 ? "two devices: cross-device reads are real"
                             : "one device: both engines on it (the multi-engine code path)");
    run_namespace(&f, "pq", "polarquant", "kivi-2", 3);
    run_namespace(&f, "kv", "kivi-2", "fp8", 4);
    kvs_xfer_destroy(f.x);
    kvs_xfer_destroy(f.x_host);
    kvs_tiering_destroy(f.tier);
    kvs_store_destroy(f.st);
    for (int g = DEVS - 1; g >= 0; g--)
        kvs_engine_destroy(f.e[g]);
    printf("%s: %d failures\n", failures ? "FAILED" : "passed", failures);
    return failures ? 1 : 0;
}
