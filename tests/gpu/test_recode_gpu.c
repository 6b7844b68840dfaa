/* gpu/engine: precision demotion on the device (kvs_engine_recode_dev, issue 16 item 5)
 * against the CPU transcode, the same check tests/unit/test_codec.c makes on the CPU alone.
 *
 * For each (own codec, colder codec) pair the engine runs, with both sides changing and
 * with the keys kept: blocks (full and partial) encoded into device slots with the own
 * codecs (kvs_engine_encode_dev), then re-encoded on the device and copied to the host
 * (kvs_engine_recode_dev), submitted together so that batches form. The reference is the
 * CPU's: the bytes the slot holds framed as a block (kvs_engine_fetch_dev, which
 * test_engine_gpu checks against kvs_block_encode), transcoded by kvs_block_transcode. The
 * recoded block must equal it byte for byte, or, where the device's decode of the slot is
 * an fp16 ulp off the CPU's (DESIGN §5 allows it; the count of exact blocks is printed),
 * decode to values within 1e-2 relative of the reference's (1e-3 with PolarQuant, whose
 * ties the engine test tolerates too); its header names the colder codec
 * (kvs_block_encodings reads the disk role back) and a kept side's sections are the slot's
 * own bytes. Exits 77 without a GPU.
 */
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gpu/codec/codec.h"
#include "gpu/codec/format.h"
#include "gpu/engine/engine.h"
#include "tests/support/kvs_test.h"

enum { L = 6, H = 4, D = 128, T = 16, BLOCKS = 40 };

static int failures;
static uint8_t *tier; /* device region: the slots */
static size_t tier_bytes;

typedef struct req {
    uint32_t t;
    uint8_t *slot;
    uint32_t lens[2 * L];
    uint16_t *raw;
    uint8_t *fetched, *recoded;
    size_t fetched_len, recoded_len, recoded_cap;
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

static bool check_rc(const char *what, const char *pair, req *r, int i)
{
    if (r[i].rc == 0)
        return true;
    printf("FAIL %s: %s of block %d: %s\n", pair, what, i, r[i].err.msg);
    failures++;
    return false;
}

static size_t recode_cap(const kvs_codec *k, const kvs_codec *v, const kvs_codec *k2,
                         const kvs_codec *v2, uint32_t t)
{
    size_t a = kvs_block_encoded_max(k, v, t), b = kvs_block_encoded_max(k2, v2, t);
    return a > b ? a : b;
}

static kvs_codec *make(kvs_engine *e, const kvs_ns_spec *s, kvs_kv kv, kvs_enc role)
{
    kvs_codec *c = NULL;
    kvs_err err;
    if (kvs_codec_create_enc(s, kv, role, NULL, &c, &err)) {
        printf("FAIL: codec: %s\n", err.msg);
        failures++;
        return NULL;
    }
    kvs_engine_prepare(e, c, NULL); /* as the store does for every codec it adds */
    return c;
}

static void check_pair(kvs_engine *e, const char *own, const char *cold, int keep_keys)
{
    char pair[80];
    snprintf(pair, sizeof pair, "%s -> %s%s", own, cold, keep_keys ? " (keys kept)" : "");
    kvs_ns_spec s = kvs_test_spec(L, H, D, T, KVS_DTYPE_FP16, own, own, 21);
    snprintf(s.disk_codec, sizeof s.disk_codec, "%s", cold);
    kvs_codec *k = make(e, &s, KVS_KEYS, KVS_ENC_OWN), *v = make(e, &s, KVS_VALUES, KVS_ENC_OWN);
    kvs_codec *ck = make(e, &s, KVS_KEYS, KVS_ENC_DISK),
              *cv = make(e, &s, KVS_VALUES, KVS_ENC_DISK);
    if (!k || !v || !ck || !cv)
        return;
    const kvs_codec *k2 = keep_keys ? k : ck;
    if (!kvs_engine_accepts(e, k, v) || !kvs_engine_accepts(e, k2, cv)) {
        printf("%-36s not accepted by the engine (no kernels)\n", pair);
        goto out;
    }
    int before = failures;
    bool tie =
        kvs_codec_id_of(cv) == KVS_CODEC_POLARQUANT || kvs_codec_id_of(k) == KVS_CODEC_POLARQUANT;
    size_t slot = kvs_engine_slot_bytes(k, v, T);
    if (slot * BLOCKS > tier_bytes) {
        printf("FAIL %s: tier region too small\n", pair);
        failures++;
        goto out;
    }
    req *r = calloc(BLOCKS, sizeof *r);
    for (int i = 0; i < BLOCKS; i++) {
        r[i].t = i % 4 == 3 ? 1 + (uint32_t)(i % T) : T; /* mostly full, some partial */
        r[i].slot = tier + (size_t)i * slot;
        r[i].raw = kvs_test_gauss_data((size_t)L * 2 * r[i].t * H * D, 300 + (uint64_t)i, 1.0,
                                       KVS_DTYPE_FP16);
        size_t cap = kvs_block_encoded_max(k, v, r[i].t);
        r[i].fetched = malloc(cap);
        /* The engine's contract: room for both encodings. A short block can be larger in
         * the colder codec (fp8 -> kivi-4 at 4 tokens: a scale per group); the store never
         * demotes such a block (kvs_ns_colder), but the engine must still recode it. */
        r[i].recoded_cap = recode_cap(k, v, k2, cv, r[i].t);
        r[i].recoded = malloc(r[i].recoded_cap);
    }
    kvs_err err;
    /* 1. Into the slots with the own codecs. */
    for (int i = 0; i < BLOCKS; i++)
        if (kvs_engine_encode_dev(e, k, v, r[i].t, r[i].raw, r[i].slot, r[i].lens, on_done, &r[i],
                                  &err))
            on_done(&r[i], err.code, &err);
    wait_all(r, BLOCKS);
    for (int i = 0; i < BLOCKS; i++) {
        check_rc("slot encode", pair, r, i);
        atomic_store(&r[i].done, 0);
    }
    /* 2. The slots as they are (the CPU reference's input). */
    for (int i = 0; i < BLOCKS; i++)
        if (kvs_engine_fetch_dev(e, k, v, 7, r[i].t, r[i].slot, r[i].lens, r[i].fetched,
                                 kvs_block_encoded_max(k, v, r[i].t), &r[i].fetched_len, on_done,
                                 &r[i], &err))
            on_done(&r[i], err.code, &err);
    wait_all(r, BLOCKS);
    for (int i = 0; i < BLOCKS; i++) {
        check_rc("fetch", pair, r, i);
        atomic_store(&r[i].done, 0);
    }
    /* 3. Re-encoded on the device, all submitted at once (batches). */
    for (int i = 0; i < BLOCKS; i++)
        if (kvs_engine_recode_dev(e, k, v, k2, cv, 7, r[i].t, r[i].slot, r[i].lens, r[i].recoded,
                                  r[i].recoded_cap, &r[i].recoded_len, on_done, &r[i], &err))
            on_done(&r[i], err.code, &err);
    wait_all(r, BLOCKS);
    /* 4. Against the CPU's transcode of the slot's bytes. */
    int exact = 0;
    for (int i = 0; i < BLOCKS && failures == before; i++) {
        if (!check_rc("recode", pair, r, i))
            continue;
        uint32_t t = r[i].t;
        size_t cap = kvs_block_encoded_max(k2, cv, t), want_len;
        uint8_t *want = malloc(cap);
        if (kvs_block_transcode(k, v, k2, cv, r[i].fetched, r[i].fetched_len, want, cap, &want_len,
                                &err)) {
            printf("FAIL %s: CPU transcode of block %d: %s\n", pair, i, err.msg);
            failures++;
            free(want);
            continue;
        }
        kvs_block_info info;
        if (kvs_format_parse(r[i].recoded, r[i].recoded_len, &info, &err)) {
            printf("FAIL %s: recoded block %d does not parse: %s\n", pair, i, err.msg);
            failures++;
        } else if (kvs_block_encodings(&s, &info) !=
                   KVS_ENC_PACK(keep_keys ? KVS_ENC_OWN : KVS_ENC_DISK, KVS_ENC_DISK)) {
            printf("FAIL %s: block %d: its header names the wrong codecs\n", pair, i);
            failures++;
        } else if (r[i].recoded_len == want_len && !memcmp(r[i].recoded, want, want_len)) {
            exact++;
        } else {
            /* The device's decode of the slot agrees with the CPU's within an fp16 ulp
             * (DESIGN §5; bit for bit where the math is fixed-point), and an ulp may move an
             * element to the next level of the colder codec, or a RotateKV sink: compare
             * what both decode to. */
            size_t n = (size_t)L * 2 * t * H * D;
            uint16_t *a = malloc(n * 2), *b = malloc(n * 2);
            double rel = 1;
            if (kvs_block_decode(k2, cv, r[i].recoded, r[i].recoded_len, 0, L, a, &err) == 0 &&
                kvs_block_decode(k2, cv, want, want_len, 0, L, b, &err) == 0)
                rel = kvs_test_rel_err(b, a, n, KVS_DTYPE_FP16);
            if (!(rel < (tie ? 1e-3 : 1e-2))) {
                printf("FAIL %s: block %d: device re-encode decodes %.3g off the CPU's\n", pair, i,
                       rel);
                failures++;
            }
            free(a);
            free(b);
        }
        /* A kept side is the slot's bytes, untouched. */
        for (uint32_t l = 0; keep_keys && l < L && failures == before; l++) {
            const uint8_t *p, *q;
            size_t n1, n2;
            kvs_format_section(r[i].recoded, l, 0, &p, &n1);
            kvs_format_section(r[i].fetched, l, 0, &q, &n2);
            if (n1 != n2 || memcmp(p, q, n1)) {
                printf("FAIL %s: block %d layer %u: kept keys changed\n", pair, i, l);
                failures++;
            }
        }
        free(want);
    }
    for (int i = 0; i < BLOCKS; i++) {
        free(r[i].raw);
        free(r[i].fetched);
        free(r[i].recoded);
    }
    free(r);
    printf("%-36s %s (%d of %d blocks byte for byte)\n", pair,
           failures == before ? "device matches the CPU transcode" : "MISMATCH", exact, BLOCKS);
out:
    kvs_codec_destroy(k);
    kvs_codec_destroy(v);
    kvs_codec_destroy(ck);
    kvs_codec_destroy(cv);
}

int main(void)
{
    kvs_engine *e;
    kvs_err err;
    kvs_engine_opts o = {
        .device = 0, .staging_bytes = 64u << 20, .max_batch = 16, .deadline_us = 500};
    if (kvs_engine_create(&o, &e, &err) != 0) {
        printf("test_recode_gpu: %s: skipped\n", err.msg);
        return err.code == KVS_ENOTSUP ? 77 : 1;
    }
    printf("test_recode_gpu: %s\n", kvs_engine_device_name(e));
    tier_bytes = (size_t)256 << 20;
    if (kvs_engine_tier_alloc(e, tier_bytes, (void **)&tier, &err) != 0) {
        printf("FAIL: tier: %s\n", err.msg);
        return 1;
    }
    /* The CPU test's pairs (tests/unit/test_codec.c test_transcode): fixed-size codecs both
     * ways, a variable-size source (RotateKV) and target, a tie-tolerant target. */
    static const char *pairs[][2] = {{"none", "fp8"},       {"fp8", "kivi-4"},
                                     {"kivi-4", "kivi-2"},  {"none", "polarquant"},
                                     {"fp8", "rotatekv-2"}, {"rotatekv-4", "kivi-2"}};
    for (size_t i = 0; i < sizeof pairs / sizeof pairs[0]; i++)
        for (int keep = 0; keep < 2; keep++)
            check_pair(e, pairs[i][0], pairs[i][1], keep);
    kvs_engine_destroy(e);
    printf("test_recode_gpu: %d failures\n", failures);
    return failures ? 1 : 0;
}
