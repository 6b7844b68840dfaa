/* Moving encoded blocks between the host and GPU tiers through the engine (issue 5: the
 * pinned host pool; not a test).
 *
 * Layout Llama-3-8B-like (L=32, H=8, D=128, T=16, fp16: 2 MiB raw per block). For each
 * codec, N blocks (default 2048) are encoded on the CPU once; then, with the blocks in
 * plain malloc'ed memory ("staged": the engine gathers sections into its pinned staging)
 * and in memory registered with the engine ("pinned": fixed-size codecs DMA straight
 * between block and slot):
 *   upload  every block into its own GPU-tier slot (promotion), all submitted at once;
 *   fetch   every slot back into a host block (demotion), framed and sealed.
 * Reports the wall time of each pass (median of 5), GB/s of encoded bytes and µs per
 * block. Every fetched block is checked equal to its source once per mode. Exits 77
 * without CUDA or a GPU.
 *
 *   kvs-bench-tier [--blocks N]
 */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "gpu/codec/codec.h"
#include "gpu/engine/engine.h"
#include "gpu/codec/format.h"
#include "tests/support/kvs_test.h"

enum { L = 32, H = 8, D = 128, T = 16, REPEATS = 5 };

static atomic_int pending, failed;

static void on_done(void *arg, int rc, const kvs_err *err)
{
    if (rc) {
        if (atomic_fetch_add(&failed, 1) == 0)
            fprintf(stderr, "kvs-bench-tier: %s\n", err ? err->msg : "failed");
    }
    atomic_fetch_sub(&pending, 1);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void wait_all(void)
{
    while (atomic_load(&pending) > 0)
        usleep(20);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

typedef struct blocks {
    uint32_t n;
    size_t stride, slot;
    uint8_t *src, *dst; /* n blocks each, at stride */
    size_t *len, *got;
    uint32_t *lens; /* 2L per block */
    uint8_t *tier;
} blocks;

/* One upload pass and one fetch pass; returns their times in t[0], t[1]. */
static int pass(kvs_engine *e, kvs_codec *k, kvs_codec *v, blocks *b, double t[2])
{
    kvs_err err;
    size_t cap = kvs_block_encoded_max(k, v, T);
    atomic_store(&pending, (int)b->n);
    double t0 = now_s();
    for (uint32_t i = 0; i < b->n; i++)
        if (kvs_engine_upload_dev(e, k, v, b->src + i * b->stride, b->len[i], KVS_BLOCK_VERIFIED,
                                  b->tier + i * b->slot, b->lens + 2 * L * i, on_done, NULL,
                                  &err)) {
            fprintf(stderr, "upload: %s\n", err.msg);
            return 1;
        }
    wait_all();
    t[0] = now_s() - t0;
    atomic_store(&pending, (int)b->n);
    t0 = now_s();
    for (uint32_t i = 0; i < b->n; i++)
        if (kvs_engine_fetch_dev(e, k, v, 1, T, b->tier + i * b->slot, b->lens + 2 * L * i,
                                 b->dst + i * b->stride, cap, &b->got[i], on_done, NULL, &err)) {
            fprintf(stderr, "fetch: %s\n", err.msg);
            return 1;
        }
    wait_all();
    t[1] = now_s() - t0;
    return atomic_load(&failed) ? 1 : 0;
}

static void bench_codec(kvs_engine *e, uint8_t *tier, size_t tier_bytes, uint32_t n,
                        const char *name)
{
    kvs_ns_spec s = kvs_test_spec(L, H, D, T, KVS_DTYPE_FP16, name, name, 7);
    kvs_codec *k, *v;
    kvs_err err;
    if (kvs_codec_create(&s, KVS_KEYS, NULL, &k, &err) ||
        kvs_codec_create(&s, KVS_VALUES, NULL, &v, &err)) {
        printf("| %s | codec: %s |\n", name, err.msg);
        return;
    }
    kvs_engine_prepare(e, k, NULL); /* as the store does for every codec it adds */
    kvs_engine_prepare(e, v, NULL);
    if (!kvs_engine_accepts(e, k, v)) {
        kvs_codec_destroy(k);
        kvs_codec_destroy(v);
        return;
    }
    blocks b = {.n = n};
    b.slot = kvs_engine_slot_bytes(k, v, T);
    b.stride = (kvs_block_encoded_max(k, v, T) + 4095) / 4096 * 4096;
    if (b.slot * n > tier_bytes)
        b.n = n = (uint32_t)(tier_bytes / b.slot);
    b.tier = tier;
    b.src = aligned_alloc(4096, b.stride * n);
    b.dst = aligned_alloc(4096, b.stride * n);
    b.len = calloc(n, sizeof *b.len);
    b.got = calloc(n, sizeof *b.got);
    b.lens = calloc((size_t)2 * L * n, sizeof *b.lens);
    uint64_t raw_bytes;
    kvs_spec_block_bytes(&s, T, &raw_bytes, NULL);
    uint16_t *raw = kvs_test_gauss_data(raw_bytes / 2, 11, 1.0, KVS_DTYPE_FP16);
    size_t enc_total = 0;
    for (uint32_t i = 0; i < n; i++) { /* distinct blocks: perturb one value each */
        raw[i % (raw_bytes / 2)] ^= 1;
        kvs_block_encode(k, v, 1, T, raw, b.src + i * b.stride, b.stride, &b.len[i], &err);
        enc_total += b.len[i];
    }
    free(raw);
    double res[2][2];
    for (int mode = 0; mode < 2; mode++) { /* 0 staged, 1 pinned */
        if (mode == 1 && (kvs_engine_host_register(e, b.src, b.stride * n, &err) ||
                          kvs_engine_host_register(e, b.dst, b.stride * n, &err))) {
            printf("| %s | pinned: %s |\n", name, err.msg);
            break;
        }
        double tu[REPEATS], tf[REPEATS], t[2] = {0, 0};
        int bad = 0;
        for (int r = 0; r < REPEATS && !bad; r++) {
            memset(b.dst, 0, b.stride * n);
            bad = pass(e, k, v, &b, t);
            tu[r] = t[0];
            tf[r] = t[1];
        }
        for (uint32_t i = 0; i < n && !bad; i++)
            bad = b.got[i] != b.len[i] ||
                  memcmp(b.dst + i * b.stride, b.src + i * b.stride, b.len[i]) != 0;
        if (bad) {
            printf("| %s | %s: FAILED (a fetched block differs or a job failed) |\n", name,
                   mode ? "pinned" : "staged");
            break;
        }
        qsort(tu, REPEATS, sizeof *tu, cmp_double);
        qsort(tf, REPEATS, sizeof *tf, cmp_double);
        res[mode][0] = tu[REPEATS / 2];
        res[mode][1] = tf[REPEATS / 2];
        if (mode == 1) {
            kvs_engine_host_unregister(e, b.src, b.stride * n);
            kvs_engine_host_unregister(e, b.dst, b.stride * n);
            for (int dir = 0; dir < 2; dir++)
                printf("| %s | %s | %u | %.0f | %.2f | %.1f | %.2f | %.1f | %.2fx |\n", name,
                       dir ? "fetch" : "upload", n, (double)enc_total / n / 1024.0,
                       enc_total / res[0][dir] / 1e9, res[0][dir] / n * 1e6,
                       enc_total / res[1][dir] / 1e9, res[1][dir] / n * 1e6,
                       res[0][dir] / res[1][dir]);
        }
    }
    free(b.src);
    free(b.dst);
    free(b.len);
    free(b.got);
    free(b.lens);
    kvs_codec_destroy(k);
    kvs_codec_destroy(v);
}

int main(int argc, char **argv)
{
    uint32_t n = 2048;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--blocks") && i + 1 < argc) {
            n = (uint32_t)strtoul(argv[++i], NULL, 10);
        } else {
            fprintf(stderr, "usage: kvs-bench-tier [--blocks N]\n");
            return 2;
        }
    }
    kvs_engine *e;
    kvs_err err;
    kvs_engine_opts o = {.device = 0};
    if (kvs_engine_create(&o, &e, &err)) {
        printf("kvs-bench-tier: %s\n", err.msg);
        return err.code == KVS_ENOTSUP ? 77 : 1;
    }
    size_t tier_bytes = (size_t)8 << 30;
    uint8_t *tier;
    if (kvs_engine_tier_alloc(e, tier_bytes, (void **)&tier, &err)) {
        printf("kvs-bench-tier: %s\n", err.msg);
        kvs_engine_destroy(e);
        return 1;
    }
    printf("kvs-bench-tier on %s: %u blocks of L=%d H=%d D=%d T=%d fp16, median of %d\n\n",
           kvs_engine_device_name(e), n, L, H, D, T, REPEATS);
    printf("| codec | move | blocks | KiB/block | staged GB/s | staged µs/block | pinned GB/s "
           "| pinned µs/block | speed-up |\n|---|---|---|---|---|---|---|---|---|\n");
    const char *codecs[] = {"none",       "fp8",        "kivi-2", "kivi-4",
                            "polarquant", "rotatekv-2", "squat-2"};
    for (size_t i = 0; i < sizeof codecs / sizeof *codecs; i++)
        bench_codec(e, tier, tier_bytes, n, codecs[i]);
    kvs_engine_destroy(e);
    return 0;
}
