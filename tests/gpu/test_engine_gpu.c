/* gpu/engine: batched GPU encode/decode of whole blocks against the CPU block path.
 *
 * For each codec the engine accepts: 300 blocks (full and partial) submitted from 4
 * threads so that batches form; every encoded block must equal kvs_block_encode's bytes
 * (tie-tolerant codecs: decoded values within 1 ulp instead), decode of every block and
 * of a layer range must equal kvs_block_decode; a block with a NaN fails alone, naming
 * the element, while the rest of its batch succeeds. GPU tier: the same blocks encoded
 * into device slots, fetched back (framed and sealed: the same bytes as the CPU's),
 * decoded from the slots whole and by layer range. Half the requests keep their raw input
 * and decoded output in pinned memory (moved by DMA in place), half in malloc'ed memory
 * (through the staging), mixed in the same batches. Exits 77 without a GPU.
 */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gpu/codec/codec.h"
#include "gpu/codec/fidelity.h"
#include "gpu/engine/engine.h"
#include "gpu/codec/format.h"
#include "gpu/codec/half.h"
#include "tests/support/kvs_test.h"

enum { L = 6, H = 4, D = 128, T = 16, BLOCKS = 300, THREADS = 4 };

static int failures;
static uint8_t *tier; /* device region for the GPU tier checks */
static size_t tier_bytes;

typedef struct req {
    uint32_t t;
    uint8_t *slot; /* device */
    uint32_t lens[2 * L];
    uint16_t *raw;
    uint8_t *gpu, *cpu;
    size_t gpu_len, cpu_len;
    uint16_t *dec_gpu, *dec_cpu;
    double sums[4]; /* measured encode (mode 7) */
    int skip;       /* ...not submitted there */
    atomic_int done;
    int rc;
    kvs_err err;
} req;

static void on_done(void *arg, int rc, const kvs_err *err)
{
    req *r = arg;
    r->rc = rc;
    if (err)
        r->err = *err;
    atomic_store(&r->done, 1);
}

static void wait_all(req *r, int n)
{
    for (int i = 0; i < n; i++)
        while (!atomic_load(&r[i].done))
            usleep(100);
}

typedef struct ctx {
    kvs_engine *e;
    kvs_codec *k, *v;
    req *r;
    int from, step;
    int decode; /* 0 encode, 1 decode, 2 encode into slot, 3 decode from slot, 4 fetch,
                 * 5 upload into slot, 6 fetch unsealed, 7 measured encode (blocks with
                 * NaN/Inf input skipped: their batches are redone on the CPU, unmeasured) */
} ctx;

static void *submitter(void *p)
{
    ctx *c = p;
    for (int i = c->from; i < BLOCKS; i += c->step) {
        req *r = &c->r[i];
        kvs_err err;
        size_t cap = kvs_block_encoded_max(c->k, c->v, r->t);
        int rc;
        switch (c->decode) {
        case 0:
        case 7:
            if (c->decode == 7 && r->skip) {
                atomic_store(&r->done, 1);
                continue;
            }
            rc = kvs_engine_encode(c->e, c->k, c->v, 7, r->t, r->raw, r->gpu, cap, &r->gpu_len,
                                   c->decode == 7 ? r->sums : NULL, on_done, r, &err);
            break;
        case 1:
            rc = kvs_engine_decode(c->e, c->k, c->v, r->cpu, r->cpu_len, KVS_BLOCK_UNTRUSTED, 0, L,
                                   r->dec_gpu, on_done, r, &err);
            break;
        case 2:
            rc = kvs_engine_encode_dev(c->e, c->k, c->v, r->t, r->raw, r->slot, r->lens, on_done, r,
                                       &err);
            break;
        case 3:
            rc = kvs_engine_decode_dev(c->e, c->k, c->v, r->t, r->slot, r->lens, 0, L, r->dec_gpu,
                                       on_done, r, &err);
            break;
        case 5:
            rc = kvs_engine_upload_dev(c->e, c->k, c->v, r->cpu, r->cpu_len, KVS_BLOCK_UNTRUSTED,
                                       r->slot, r->lens, on_done, r, &err);
            break;
        case 6:
            rc = kvs_engine_fetch_dev_unsealed(c->e, c->k, c->v, 7, r->t, r->slot, r->lens, r->gpu,
                                               cap, &r->gpu_len, on_done, r, &err);
            break;
        default:
            rc = kvs_engine_fetch_dev(c->e, c->k, c->v, 7, r->t, r->slot, r->lens, r->gpu, cap,
                                      &r->gpu_len, on_done, r, &err);
            break;
        }
        if (rc) {
            r->rc = rc;
            r->err = err;
            atomic_store(&r->done, 1);
        }
    }
    return NULL;
}

static void run(kvs_engine *e, kvs_codec *k, kvs_codec *v, req *r, int decode)
{
    pthread_t th[THREADS];
    ctx cs[THREADS];
    for (int i = 0; i < BLOCKS; i++)
        atomic_store(&r[i].done, 0);
    for (int t = 0; t < THREADS; t++) {
        cs[t] = (ctx){e, k, v, r, t, THREADS, decode};
        pthread_create(&th[t], NULL, submitter, &cs[t]);
    }
    for (int t = 0; t < THREADS; t++)
        pthread_join(th[t], NULL);
    wait_all(r, BLOCKS);
}

static int ulps(uint16_t a, uint16_t b)
{
    int ia = a & 0x8000 ? -(int)(a & 0x7FFF) : (int)a;
    int ib = b & 0x8000 ? -(int)(b & 0x7FFF) : (int)b;
    return abs(ia - ib);
}

/* The decoded layers [lb, le) of request i equal the CPU decode of its CPU bytes. */
static int check_decoded(const char *name, const char *what, kvs_codec *k, kvs_codec *v, req *r,
                         int i, uint32_t lb, uint32_t le)
{
    kvs_err err;
    size_t per_layer = (size_t)2 * r[i].t * H * D;
    if (kvs_block_decode(k, v, r[i].cpu, r[i].cpu_len, 0, L, r[i].dec_cpu, &err) != 0) {
        printf("FAIL %s: CPU decode of block %d: %s\n", name, i, err.msg);
        return 1;
    }
    for (size_t j = 0; j < (le - lb) * per_layer; j++)
        if (ulps(r[i].dec_gpu[j], r[i].dec_cpu[lb * per_layer + j]) > 1) {
            printf("FAIL %s: %s: block %d element %zu: GPU %04x CPU %04x\n", name, what, i, j,
                   r[i].dec_gpu[j], r[i].dec_cpu[lb * per_layer + j]);
            return 1;
        }
    return 0;
}

/* Upload (promotion): the host blocks into fresh slots; fetching them back gives the same
 * bytes, and decoding from them the CPU's values. With `pin`, the blocks and the fetch
 * outputs live in memory registered with the engine, so fixed-size codecs take the direct
 * DMA path (no staging) both ways. */
static void check_upload(kvs_engine *e, kvs_codec *k, kvs_codec *v, req *r, const char *name,
                         size_t slot, int pin)
{
    kvs_err err;
    if ((2 + (size_t)pin) * slot * BLOCKS > tier_bytes) {
        printf("FAIL: tier region too small for the upload check\n");
        failures++;
        return;
    }
    size_t stride = (kvs_block_encoded_max(k, v, T) + 4095) / 4096 * 4096;
    uint8_t *cpu_save[BLOCKS], *gpu_save[BLOCKS];
    uint8_t *in = NULL, *outb = NULL;
    if (pin) {
        in = aligned_alloc(4096, stride * BLOCKS);
        outb = aligned_alloc(4096, stride * BLOCKS);
        if (!in || !outb || kvs_engine_host_register(e, in, stride * BLOCKS, &err) ||
            kvs_engine_host_register(e, outb, stride * BLOCKS, &err)) {
            printf("FAIL %s: pinned buffers: %s\n", name, err.msg);
            failures++;
            free(in);
            free(outb);
            return;
        }
        for (int i = 0; i < BLOCKS; i++) {
            cpu_save[i] = r[i].cpu;
            gpu_save[i] = r[i].gpu;
            memcpy(in + i * stride, r[i].cpu, r[i].cpu_len);
            r[i].cpu = in + i * stride;
            r[i].gpu = outb + i * stride;
        }
    }
    const char *how = pin ? "pinned" : "staged";
    for (int i = 0; i < BLOCKS; i++) {
        r[i].slot = tier + (size_t)((1 + pin) * BLOCKS + i) * slot;
        memset(r[i].lens, 0xFF, sizeof r[i].lens);
    }
    run(e, k, v, r, 5);
    for (int i = 0; i < BLOCKS; i++)
        if (r[i].rc) {
            printf("FAIL %s: %s upload of block %d: %s\n", name, how, i, r[i].err.msg);
            failures++;
        }
    for (int i = 0; i < BLOCKS; i++)
        memset(r[i].gpu, 0xA5, r[i].cpu_len);
    run(e, k, v, r, 4);
    for (int i = 0; i < BLOCKS; i++)
        if (r[i].rc || r[i].gpu_len != r[i].cpu_len || memcmp(r[i].gpu, r[i].cpu, r[i].cpu_len)) {
            printf("FAIL %s: %s uploaded block %d fetched back differs\n", name, how, i);
            failures++;
        }
    /* Unsealed: the checksum field left zero, the rest the same bytes; sealed here (as the
     * daemon's pool does), the block kvs_block_encode wrote. */
    for (int i = 0; i < BLOCKS; i++)
        memset(r[i].gpu, 0xA5, r[i].cpu_len);
    run(e, k, v, r, 6);
    for (int i = 0; i < BLOCKS; i++) {
        static const uint8_t zero[8];
        if (r[i].rc || r[i].gpu_len != r[i].cpu_len || memcmp(r[i].gpu + 56, zero, 8) != 0) {
            printf("FAIL %s: %s unsealed fetch of block %d: rc %d, %zu bytes, checksum field "
                   "not zero\n",
                   name, how, i, r[i].rc, r[i].gpu_len);
            failures++;
            continue;
        }
        kvs_format_seal(r[i].gpu, r[i].gpu_len);
        if (memcmp(r[i].gpu, r[i].cpu, r[i].cpu_len) != 0) {
            printf("FAIL %s: %s unsealed fetch of block %d, sealed, differs\n", name, how, i);
            failures++;
        }
    }
    for (int i = 0; i < BLOCKS; i++)
        memset(r[i].dec_gpu, 0xA5, (size_t)L * 2 * r[i].t * H * D * 2);
    run(e, k, v, r, 3);
    for (int i = 0; i < BLOCKS; i++)
        failures += r[i].rc != 0 || check_decoded(name, how, k, v, r, i, 0, L);
    /* A block with a flipped byte is refused before anything reaches the slot. */
    r[7].cpu[r[7].cpu_len / 2] ^= 0x40;
    if (kvs_engine_upload_dev(e, k, v, r[7].cpu, r[7].cpu_len, KVS_BLOCK_UNTRUSTED, r[7].slot,
                              r[7].lens, on_done, &r[7], &err) != KVS_EDATALOSS) {
        printf("FAIL %s: a corrupt block was not refused by upload\n", name);
        failures++;
    }
    r[7].cpu[r[7].cpu_len / 2] ^= 0x40;
    if (pin) {
        for (int i = 0; i < BLOCKS; i++) {
            r[i].cpu = cpu_save[i];
            r[i].gpu = gpu_save[i];
        }
        kvs_engine_host_unregister(e, in, stride * BLOCKS);
        kvs_engine_host_unregister(e, outb, stride * BLOCKS);
        free(in);
        free(outb);
    }
}

/* Measured encode (engine.h): the engine's error sums of every block (NaN/Inf blocks left
 * out: their batches are the CPU's) against the reference's, computed on the CPU from the
 * CPU decode of the bytes the engine wrote, side by side (kvs_fidelity_sums). The squared
 * references must agree to 1e-10 relative (the order of the additions); the squared
 * differences to 2%: the engine decodes on the GPU, whose values may differ from the CPU
 * decode's by an ulp (the decode checks above allow it). A section measured twice, left
 * out or taken from another block moves them far more. `none` measures exactly 0; a
 * lossy codec more than 0 on some blocks (not all: a 1-token KIVI block is exact). */
static void check_measured(kvs_engine *e, kvs_codec *k, kvs_codec *v, req *r, int nan_at, int nan2)
{
    const char *name = kvs_codec_name(kvs_codec_id_of(k), kvs_codec_bits(k));
    bool lossless = kvs_codec_id_of(k) == KVS_CODEC_NONE && kvs_codec_id_of(v) == KVS_CODEC_NONE;
    const kvs_ns_spec *s = kvs_codec_spec(k);
    for (int i = 0; i < BLOCKS; i++) {
        r[i].skip = i == nan_at || i == nan2;
        r[i].sums[0] = r[i].sums[1] = r[i].sums[2] = r[i].sums[3] = -1;
    }
    run(e, k, v, r, 7);
    int measured = 0, lossy_seen = 0;
    for (int i = 0; i < BLOCKS; i++) {
        kvs_err err;
        if (r[i].skip)
            continue;
        if (r[i].rc || kvs_block_decode(k, v, r[i].gpu, r[i].gpu_len, 0, L, r[i].dec_cpu, &err)) {
            printf("FAIL %s: measured encode of block %d: %s\n", name, i,
                   r[i].rc ? r[i].err.msg : err.msg);
            failures++;
            continue;
        }
        size_t sec = (size_t)r[i].t * H * D;
        double want[4] = {0, 0, 0, 0};
        for (uint32_t l = 0; l < L; l++)
            for (unsigned kv = 0; kv < 2; kv++) {
                size_t off = (2 * (size_t)l + kv) * sec;
                kvs_fidelity_sums(r[i].raw + off, r[i].dec_cpu + off, sec, s->dtype, &want[2 * kv],
                                  &want[2 * kv + 1]);
            }
        for (int q = 0; q < 4; q++) {
            double tol = (q % 2 == 0 ? 2e-2 : 1e-10) * fabs(want[q]);
            if (!(fabs(r[i].sums[q] - want[q]) <= tol) ||
                (q % 2 == 0 && lossless && r[i].sums[q] != 0)) {
                printf("FAIL %s: block %d: measured %s %s %.17g, CPU %.17g\n", name, i,
                       q < 2 ? "keys" : "values", q % 2 ? "ref2" : "diff2", r[i].sums[q], want[q]);
                failures++;
                break;
            }
        }
        measured++;
        lossy_seen += r[i].sums[0] > 0 && r[i].sums[2] > 0;
    }
    /* A lossy codec's blocks have an error (a 1-token block may not: KIVI's per-channel
     * range of one token is exact). */
    if (lossless == (lossy_seen > 0)) {
        printf("FAIL %s: %d blocks with an error in both sides\n", name, lossy_seen);
        failures++;
    }
    if (measured != BLOCKS - 2) {
        printf("FAIL %s: %d blocks measured of %d\n", name, measured, BLOCKS - 2);
        failures++;
    }
    for (int i = 0; i < BLOCKS; i++)
        r[i].skip = 0;
}

/* GPU tier: encode into slots, fetch back, decode from slots (whole, and layers 1..3). */
static void test_tier(kvs_engine *e, kvs_codec *k, kvs_codec *v, req *r, int nan_at, int nan2)
{
    size_t slot = kvs_engine_slot_bytes(k, v, T);
    if (slot * BLOCKS > tier_bytes) {
        printf("FAIL: tier region too small\n");
        failures++;
        return;
    }
    const char *name = kvs_codec_name(kvs_codec_id_of(k), kvs_codec_bits(k));
    int tie = kvs_codec_id_of(k) == KVS_CODEC_POLARQUANT;
    for (int i = 0; i < BLOCKS; i++) {
        r[i].slot = tier + (size_t)i * slot;
        if (i == nan_at || i == nan2) { /* restore the bad inputs: they must fail alone */
            size_t n = (size_t)L * 2 * r[i].t * H * D;
            r[i].raw[i == nan_at ? n / 3 : n - 1] = i == nan_at ? 0x7E00 : 0xFC00;
        }
    }
    run(e, k, v, r, 2);
    for (int i = 0; i < BLOCKS; i++) {
        int bad = i == nan_at || i == nan2;
        if (bad != (r[i].rc != 0) || (bad && r[i].rc != KVS_EINVAL)) {
            printf("FAIL %s: slot encode of block %d: rc %d %s\n", name, i, r[i].rc, r[i].err.msg);
            failures++;
        }
    }
    /* The NaN blocks' slots hold nothing valid: give them block 0's contents for the rest. */
    for (int b = 0; b < 2; b++) {
        int i = b ? nan2 : nan_at;
        r[i].slot = r[0].slot;
        memcpy(r[i].lens, r[0].lens, sizeof r[i].lens);
    }
    for (int i = 0; i < BLOCKS; i++)
        memset(r[i].gpu, 0xA5, r[i].cpu_len);
    run(e, k, v, r, 4);
    for (int i = 0; i < BLOCKS; i++) {
        kvs_block_info info;
        kvs_err err;
        if (r[i].rc) {
            printf("FAIL %s: fetch of block %d: %s\n", name, i, r[i].err.msg);
            failures++;
        } else if (kvs_format_parse(r[i].gpu, r[i].gpu_len, &info, &err) != 0) {
            printf("FAIL %s: fetched block %d does not parse: %s\n", name, i, err.msg);
            failures++;
        } else if (!tie && (r[i].gpu_len != r[i].cpu_len ||
                            memcmp(r[i].gpu, r[i].cpu, r[i].cpu_len) != 0)) {
            printf("FAIL %s: fetched block %d differs from kvs_block_encode\n", name, i);
            failures++;
        }
    }
    /* Decode from the slots; tie-tolerant codecs compare with the CPU decode of the bytes
     * the GPU wrote (fetched above). */
    for (int i = 0; i < BLOCKS && tie; i++)
        if (r[i].rc == 0) {
            memcpy(r[i].cpu, r[i].gpu, r[i].gpu_len);
            r[i].cpu_len = r[i].gpu_len;
        }
    for (int i = 0; i < BLOCKS; i++)
        memset(r[i].dec_gpu, 0xA5, (size_t)L * 2 * r[i].t * H * D * 2);
    run(e, k, v, r, 3);
    for (int i = 0; i < BLOCKS; i++) {
        if (r[i].rc) {
            printf("FAIL %s: slot decode of block %d: %s\n", name, i, r[i].err.msg);
            failures++;
        } else {
            failures += check_decoded(name, "slot decode", k, v, r, i, 0, L);
        }
    }
    atomic_store(&r[5].done, 0);
    kvs_err err;
    if (kvs_engine_decode_dev(e, k, v, r[5].t, r[5].slot, r[5].lens, 1, 4, r[5].dec_gpu, on_done,
                              &r[5], &err) != 0) {
        printf("FAIL %s: slot layer range submit: %s\n", name, err.msg);
        failures++;
    } else {
        wait_all(&r[5], 1);
        failures += r[5].rc != 0 || check_decoded(name, "slot layer range", k, v, r, 5, 1, 4);
    }

    check_upload(e, k, v, r, name, slot, 0);
    check_upload(e, k, v, r, name, slot, 1);
}

static void test_codec(kvs_engine *e, const char *name)
{
    kvs_ns_spec s = kvs_test_spec(L, H, D, T, KVS_DTYPE_FP16, name, name, 99);
    kvs_codec *k, *v;
    kvs_err err;
    if (kvs_codec_create(&s, KVS_KEYS, NULL, &k, &err) ||
        kvs_codec_create(&s, KVS_VALUES, NULL, &v, &err)) {
        printf("FAIL %s: %s\n", name, err.msg);
        failures++;
        return;
    }
    kvs_engine_prepare(e, k, NULL); /* as the store does for every codec it adds */
    kvs_engine_prepare(e, v, NULL);
    if (!kvs_engine_accepts(e, k, v)) {
        printf("%-12s not accepted by the engine (no kernels)\n", name);
        kvs_codec_destroy(k);
        kvs_codec_destroy(v);
        return;
    }
    int before = failures;
    req *r = calloc(BLOCKS, sizeof *r);
    uint64_t x = 0x1234567ull + (uint64_t)name[0];
    int nan_at = 77, nan2 = 78; /* two bad requests, likely in one batch: both must fail */
    /* Even requests keep their raw input and decode output in memory registered with the
     * engine (DMA'd in place), odd ones in malloc'ed memory (through the staging): batches
     * mix both. */
    size_t rstride = ((size_t)L * 2 * T * H * D * 2 + 4095) / 4096 * 4096;
    size_t rbytes = rstride * (BLOCKS / 2 + 1);
    uint8_t *raw_pin = aligned_alloc(4096, rbytes), *dec_pin = aligned_alloc(4096, rbytes);
    if (!raw_pin || !dec_pin || kvs_engine_host_register(e, raw_pin, rbytes, &err) ||
        kvs_engine_host_register(e, dec_pin, rbytes, &err)) {
        printf("FAIL %s: pinned raw buffers: %s\n", name, err.msg);
        failures++;
        exit(1);
    }
    for (int i = 0; i < BLOCKS; i++) {
        r[i].t = i % 5 == 4 ? 1 + (uint32_t)(i % T) : T; /* mostly full, some partial */
        size_t n = (size_t)L * 2 * r[i].t * H * D;
        r[i].raw = i % 2 ? malloc(n * 2) : (uint16_t *)(raw_pin + (size_t)(i / 2) * rstride);
        r[i].dec_gpu = i % 2 ? malloc(n * 2) : (uint16_t *)(dec_pin + (size_t)(i / 2) * rstride);
        r[i].dec_cpu = malloc(n * 2);
        size_t cap = kvs_block_encoded_max(k, v, r[i].t);
        r[i].gpu = malloc(cap);
        r[i].cpu = malloc(cap);
        for (size_t j = 0; j < n; j++) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            r[i].raw[j] = kvs_f32_to_fp16((float)((int64_t)(x >> 40) - (1 << 23)) / (1 << 22));
        }
        if (i == nan_at)
            r[i].raw[n / 3] = 0x7E00;
        if (i == nan2)
            r[i].raw[n - 1] = 0xFC00; /* -Inf, last element */
        int rc = kvs_block_encode(k, v, 7, r[i].t, r[i].raw, r[i].cpu, cap, &r[i].cpu_len, &err);
        if ((rc != 0) != (i == nan_at || i == nan2)) {
            printf("FAIL %s: CPU encode of block %d: %s\n", name, i, err.msg);
            failures++;
        }
    }
    run(e, k, v, r, 0);
    int tie = kvs_codec_id_of(k) == KVS_CODEC_POLARQUANT;
    for (int i = 0; i < BLOCKS; i++) {
        if (i == nan_at || i == nan2) {
            if (r[i].rc != KVS_EINVAL || !strstr(r[i].err.msg, i == nan_at ? "NaN" : "-Inf")) {
                printf("FAIL %s: block with NaN: rc %d %s\n", name, r[i].rc, r[i].err.msg);
                failures++;
            }
            continue;
        }
        if (r[i].rc) {
            printf("FAIL %s: engine encode of block %d: %s\n", name, i, r[i].err.msg);
            failures++;
        } else if (r[i].gpu_len != r[i].cpu_len ||
                   (!tie && memcmp(r[i].gpu, r[i].cpu, r[i].cpu_len) != 0)) {
            printf("FAIL %s: block %d: engine bytes differ from kvs_block_encode\n", name, i);
            failures++;
        }
        kvs_block_info info;
        if (r[i].rc == 0 && kvs_format_parse(r[i].gpu, r[i].gpu_len, &info, &err) != 0) {
            printf("FAIL %s: block %d does not parse: %s\n", name, i, err.msg);
            failures++;
        }
    }
    check_measured(e, k, v, r, nan_at, nan2);
    /* Decode the CPU's bytes on the engine; compare with the CPU decode. */
    for (int b = 0; b < 2; b++) { /* the NaN blocks have no CPU bytes: reuse block 0's */
        int i = b ? nan2 : nan_at;
        r[i].cpu_len = r[0].cpu_len;
        memcpy(r[i].cpu, r[0].cpu, r[0].cpu_len);
        r[i].t = r[0].t;
    }
    run(e, k, v, r, 1);
    for (int i = 0; i < BLOCKS; i++) {
        size_t n = (size_t)L * 2 * r[i].t * H * D;
        if (r[i].rc ||
            kvs_block_decode(k, v, r[i].cpu, r[i].cpu_len, 0, L, r[i].dec_cpu, &err) != 0) {
            printf("FAIL %s: decode of block %d: %s\n", name, i, r[i].rc ? r[i].err.msg : err.msg);
            failures++;
            continue;
        }
        for (size_t j = 0; j < n; j++)
            if (ulps(r[i].dec_gpu[j], r[i].dec_cpu[j]) > 1) {
                printf("FAIL %s: block %d element %zu: GPU %04x CPU %04x\n", name, i, j,
                       r[i].dec_gpu[j], r[i].dec_cpu[j]);
                failures++;
                break;
            }
    }
    /* A layer range decodes exactly those layers. */
    atomic_store(&r[0].done, 0);
    if (kvs_engine_decode(e, k, v, r[0].cpu, r[0].cpu_len, KVS_BLOCK_UNTRUSTED, 2, 4, r[0].dec_gpu,
                          on_done, &r[0], &err) != 0) {
        printf("FAIL %s: layer range submit: %s\n", name, err.msg);
        failures++;
    } else {
        wait_all(&r[0], 1);
        size_t per_layer = (size_t)2 * r[0].t * H * D;
        kvs_block_decode(k, v, r[0].cpu, r[0].cpu_len, 0, L, r[0].dec_cpu, &err);
        for (size_t j = 0; j < 2 * per_layer; j++)
            if (ulps(r[0].dec_gpu[j], r[0].dec_cpu[2 * per_layer + j]) > 1) {
                printf("FAIL %s: layer range element %zu\n", name, j);
                failures++;
                break;
            }
    }
    test_tier(e, k, v, r, nan_at, nan2);
    for (int i = 0; i < BLOCKS; i++) {
        if (i % 2) {
            free(r[i].raw);
            free(r[i].dec_gpu);
        }
        free(r[i].gpu);
        free(r[i].cpu);
        free(r[i].dec_cpu);
    }
    kvs_engine_host_unregister(e, raw_pin, rbytes);
    kvs_engine_host_unregister(e, dec_pin, rbytes);
    free(raw_pin);
    free(dec_pin);
    free(r);
    kvs_codec_destroy(k);
    kvs_codec_destroy(v);
    printf("%-12s %s\n", name, failures == before ? "engine matches CPU" : "MISMATCH");
}

int main(void)
{
    kvs_engine *e;
    kvs_err err;
    kvs_engine_opts o = {
        .device = 0, .staging_bytes = 64u << 20, .max_batch = 64, .deadline_us = 500};
    if (kvs_engine_create(&o, &e, &err) != 0) {
        printf("test_engine_gpu: %s: skipped\n", err.msg);
        return err.code == KVS_ENOTSUP ? 77 : 1;
    }
    printf("test_engine_gpu: %s\n", kvs_engine_device_name(e));
    tier_bytes = (size_t)512 << 20;
    if (kvs_engine_tier_alloc(e, tier_bytes, (void **)&tier, &err) != 0) {
        printf("FAIL: tier: %s\n", err.msg);
        return 1;
    }
    char names[256];
    kvs_codec_names(names, sizeof names);
    for (char *tok = strtok(names, ", "); tok; tok = strtok(NULL, ", "))
        test_codec(e, tok);
    kvs_engine_destroy(e);
    printf("test_engine_gpu: %d failures\n", failures);
    return failures ? 1 : 0;
}
