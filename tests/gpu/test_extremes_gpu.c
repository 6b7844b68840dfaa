/* Extreme values through the GPU engine (issue 10, fault 4): every codec x dtype x two
 * layouts x full and partial blocks x adversarial finite patterns (the largest value of
 * the dtype, alternating signs, one hot token or channel, values spread up to the largest,
 * bf16 near 3e38, subnormals, zeros, huge and tiny mixed), with learned codec states
 * where the codec has them. The engine must give exactly the CPU reference's answer: the
 * same refusal (rc and message) or the same bytes. Its kernels flag what they refuse and
 * the engine then re-encodes on the CPU, so this checks that no kernel accepts a block
 * the reference refuses (tests/unit/test_codec_extremes.c holds the reference to "refused
 * or finite"). Exits 77 without a GPU. */
#include <math.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/codec/codec.h"
#include "gpu/codec/codec_rotatekv.h"
#include "gpu/codec/codec_squat.h"
#include "gpu/engine/engine.h"
#include "gpu/codec/half.h"
#include "gpu/codec/rng.h"

typedef struct req {
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

static double unit(kvs_rng *r)
{
    return (double)(kvs_rng_next(r) >> 11) / 9007199254740992.0;
}

static double gauss(kvs_rng *r)
{
    double u1 = ((kvs_rng_next(r) >> 11) + 1.0) / 9007199254740992.0, u2 = unit(r);
    return sqrt(-2 * log(u1)) * cos(6.283185307179586 * u2);
}

static uint16_t f2h(float f, kvs_dtype dt)
{
    return dt == KVS_DTYPE_BF16 ? kvs_f32_to_bf16(f) : kvs_f32_to_fp16(f);
}

static float h2f(uint16_t h, kvs_dtype dt)
{
    return dt == KVS_DTYPE_BF16 ? kvs_bf16_to_f32(h) : kvs_fp16_to_f32(h);
}

enum {
    P_MAX,
    P_NMAX,
    P_ALT,
    P_TOKEN,
    P_CHANNEL,
    P_SPREAD,
    P_3E38,
    P_SUB,
    P_ZERO,
    P_MIX,
    P_GAUSS,
    NP
};
static const char *pattern_name[NP] = {"max",         "-max",      "alternating", "hot token",
                                       "hot channel", "spread",    "3e38",        "subnormal",
                                       "zero",        "huge+tiny", "gauss"};

/* n elements [..][t][H][D] of pattern p in dtype dt. malloc'd. */
static uint16_t *make(int p, kvs_dtype dt, size_t n, uint32_t t, uint32_t H, uint32_t D,
                      uint64_t seed)
{
    uint16_t *raw = malloc(n * 2), mx = dt == KVS_DTYPE_BF16 ? 0x7F7F : 0x7BFF;
    uint16_t sub = dt == KVS_DTYPE_BF16 ? 0x7F : 0x3FF;
    kvs_rng r;
    kvs_rng_init(&r, seed, 0, 0, 0, 0);
    for (size_t i = 0; i < n; i++) {
        uint32_t j = i % D, h = i / D % H, tok = i / D / H % t;
        uint16_t sign = kvs_rng_next(&r) & 1 ? 0x8000 : 0;
        uint16_t tiny = sign | (uint16_t)(1 + kvs_rng_next(&r) % sub);
        uint16_t small = f2h((float)gauss(&r), dt);
        switch (p) {
        case P_MAX:
            raw[i] = mx;
            break;
        case P_NMAX:
            raw[i] = mx | 0x8000;
            break;
        case P_ALT:
            raw[i] = (tok + j) & 1 ? mx | 0x8000 : mx;
            break;
        case P_TOKEN:
            raw[i] = tok == 2 % t ? mx : small;
            break;
        case P_CHANNEL:
            raw[i] = h == 1 % H && j == 5 ? mx : small;
            break;
        case P_SPREAD:
            raw[i] = f2h((float)((2 * unit(&r) - 1) * h2f(mx, dt)), dt);
            break;
        case P_3E38:
            raw[i] = sign | kvs_f32_to_bf16((float)(3.0e38 * (1 + 0.1 * unit(&r))));
            break;
        case P_SUB:
            raw[i] = tiny;
            break;
        case P_ZERO:
            raw[i] = 0;
            break;
        case P_MIX:
            raw[i] = j % 4 == 0 ? (tok & 1 ? mx | 0x8000 : mx) : tiny;
            break;
        default:
            raw[i] = small;
            break;
        }
    }
    return raw;
}

static int cases, gpu_cases, refused, failures;

/* One block through kvs_block_encode and through the engine: the same outcome. */
static void compare(kvs_engine *e, const kvs_codec *k, const kvs_codec *v, const kvs_ns_spec *s,
                    int p, uint32_t t, bool learned)
{
    size_t C = (size_t)s->kv_heads * s->head_dim, n = 2 * (size_t)s->layers * t * C;
    size_t cap = kvs_block_encoded_max(k, v, t), l1 = 0, l2 = 0;
    uint16_t *raw = make(p, s->dtype, n, t, s->kv_heads, s->head_dim, 1000u * (unsigned)p + t);
    uint8_t *c1 = malloc(cap), *c2 = malloc(cap);
    kvs_err e1, err;
    kvs_err_clear(&e1);
    int rc1 = kvs_block_encode(k, v, 9, t, raw, c1, cap, &l1, &e1);
    cases++;
    refused += rc1 != 0;
    req r;
    atomic_init(&r.done, 0);
    r.rc = -1;
    kvs_err_clear(&r.err);
    if (kvs_engine_encode(e, k, v, 9, t, raw, c2, cap, &l2, NULL, on_done, &r, &err)) {
        printf("FAIL: submit: %s\n", err.msg);
        failures++;
    } else {
        while (!atomic_load(&r.done))
            sched_yield();
        gpu_cases++;
        bool same = (rc1 == 0) == (r.rc == 0) &&
                    (rc1 ? !strcmp(e1.msg, r.err.msg) : l1 == l2 && !memcmp(c1, c2, l1));
        if (!same) {
            printf("MISMATCH %s %s D=%u t=%u %s%s: CPU %d '%s', GPU %d '%s'\n", s->key_codec,
                   kvs_dtype_name(s->dtype), s->head_dim, t, pattern_name[p],
                   learned ? " (learned state)" : "", rc1, e1.msg, r.rc, r.err.msg);
            failures++;
        }
    }
    free(raw);
    free(c1);
    free(c2);
}

/* The codec states a namespace of this codec learns (RotateKV order, SQuat subspace), from
 * data of the huge+tiny pattern; *len 0 for the others. */
static void learn_state(const kvs_ns_spec *s, void **state, size_t *len)
{
    size_t C = (size_t)s->kv_heads * s->head_dim;
    *state = NULL;
    *len = 0;
    if (!strncmp(s->key_codec, "rotatekv", 8)) {
        uint16_t *keys =
            make(P_MIX, s->dtype, s->layers * 32 * C, 32, s->kv_heads, s->head_dim, 11);
        kvs_rotatekv_calibrate(s, keys, 32, state, len, NULL);
        free(keys);
    } else if (!strncmp(s->key_codec, "squat", 5)) {
        uint32_t qh = 2 * s->kv_heads;
        uint16_t *q =
            make(P_GAUSS, s->dtype, s->layers * 8 * qh * s->head_dim, 8, qh, s->head_dim, 12);
        kvs_squat_state_from_queries(s, qh, q, 8, state, len, NULL);
        free(q);
    }
}

int main(void)
{
    kvs_engine *e;
    kvs_err err;
    kvs_engine_opts o = {
        .device = 0, .staging_bytes = 64u << 20, .max_batch = 16, .deadline_us = 50};
    if (kvs_engine_create(&o, &e, &err) != 0) {
        printf("test_extremes_gpu: %s: skipped\n", err.msg);
        return err.code == KVS_ENOTSUP ? 77 : 1;
    }
    printf("test_extremes_gpu: %s\n", kvs_engine_device_name(e));
    char names[256];
    kvs_codec_names(names, sizeof names);
    static const uint32_t layouts[][2] = {{4, 128}, {8, 64}}; /* H, D */
    static const uint32_t tokens[] = {16, 5};
    for (char *name = strtok(names, ", "); name; name = strtok(NULL, ", "))
        for (int d = 0; d < 2; d++)
            for (int li = 0; li < 2; li++) {
                kvs_ns_spec s = {.layers = 2,
                                 .kv_heads = layouts[li][0],
                                 .head_dim = layouts[li][1],
                                 .block_tokens = 16,
                                 .dtype = d ? KVS_DTYPE_BF16 : KVS_DTYPE_FP16,
                                 .keys_pre_rope = true,
                                 .seed = 5};
                snprintf(s.name, sizeof s.name, "t");
                snprintf(s.key_codec, sizeof s.key_codec, "%s", name);
                snprintf(s.value_codec, sizeof s.value_codec, "%s", name);
                if (kvs_spec_validate(&s, &err))
                    continue; /* a layout this codec refuses at create */
                void *sb;
                size_t sl;
                learn_state(&s, &sb, &sl);
                kvs_codec_state st = {1, sb, sl};
                for (int learned = 0; learned < (sb ? 2 : 1); learned++) {
                    kvs_codec *k, *v;
                    if (kvs_codec_create(&s, KVS_KEYS, learned ? &st : NULL, &k, &err) ||
                        kvs_codec_create(&s, KVS_VALUES, NULL, &v, &err)) {
                        printf("FAIL: codec %s: %s\n", name, err.msg);
                        return 1;
                    }
                    kvs_engine_prepare(e, k, NULL);
                    kvs_engine_prepare(e, v, NULL);
                    if (kvs_engine_accepts(e, k, v))
                        for (int p = 0; p < NP; p++)
                            for (int ti = 0; ti < 2; ti++)
                                if (p != P_3E38 || s.dtype == KVS_DTYPE_BF16)
                                    compare(e, k, v, &s, p, tokens[ti], learned);
                    kvs_codec_destroy(k);
                    kvs_codec_destroy(v);
                }
                free(sb);
            }
    kvs_engine_destroy(e);
    printf("test_extremes_gpu: %d blocks, %d through the GPU, %d refused by the reference, %d "
           "failures\n",
           cases, gpu_cases, refused, failures);
    return failures || gpu_cases == 0 ? 1 : 0;
}
