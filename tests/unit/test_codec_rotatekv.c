/* gpu/codec/codec_rotatekv: rotatekv-2/-3/-4 (quantizers.md "rotatekv-2", quantizers-reference.md
 * §3, checklist §9.4): Hadamard involution, head grouping, permutation state (round trip,
 * validation, calibration), sinks, outlier channel, bits accounting, length checks, block
 * round trip, and the real sample tests/data/realkv-a-64.kvs against §6. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "gpu/codec/bitpack.h"
#include "gpu/codec/codec.h"
#include "gpu/codec/codec_rotatekv.h"
#include "gpu/codec/hadamard.h"
#include "gpu/codec/half.h"
#include "gpu/codec/quant.h"
#include "tests/support/kvs_test.h"

/* ---------------------------------------------------------------- helpers */

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static uint64_t next_u64(void)
{
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static double uniform(void)
{
    return ((double)(next_u64() >> 11) + 0.5) / 9007199254740992.0;
}

static float gauss(void)
{
    return (float)(sqrt(-2.0 * log(uniform())) * cos(6.283185307179586 * uniform()));
}

/* fp16, the same codec for keys and values, pre-RoPE keys, seed 2; validated */
static kvs_ns_spec make_spec(uint32_t L, uint32_t H, uint32_t D, uint32_t T, const char *codec)
{
    kvs_ns_spec s = kvs_test_spec(L, H, D, T, KVS_DTYPE_FP16, codec, codec, 2);
    s.keys_pre_rope = true;
    assert_int_equal(kvs_spec_validate(&s, NULL), 0);
    return s;
}

/* n fp16 Gaussian values times sigma. */
static uint16_t *gauss_fp16(size_t n, float sigma)
{
    uint16_t *h = malloc(n * sizeof *h);
    for (size_t i = 0; i < n; i++)
        h[i] = kvs_f32_to_fp16(sigma * gauss());
    return h;
}

/* Encodes and decodes one section; sets *len (if not NULL) to the encoded size. */
static void round_trip(const kvs_codec *c, uint32_t layer, uint32_t t, const uint16_t *in,
                       uint16_t *out, size_t *len)
{
    size_t cap = kvs_codec_section_max(c, t);
    uint8_t *enc = malloc(cap);
    kvs_err err;
    size_t n = 0;
    int rc = kvs_codec_encode(c, layer, t, in, enc, cap, &n, &err);
    if (rc)
        fail_msg("encode: %s", err.msg);
    assert_true(n <= cap);
    rc = kvs_codec_decode(c, layer, t, enc, n, out, &err);
    if (rc)
        fail_msg("decode: %s", err.msg);
    free(enc);
    if (len)
        *len = n;
}

static double section_err(const kvs_codec *c, const kvs_ns_spec *s, uint32_t layer, uint32_t t,
                          const uint16_t *in, size_t *len)
{
    size_t n = (size_t)t * s->kv_heads * s->head_dim;
    uint16_t *out = malloc(n * sizeof *out);
    round_trip(c, layer, t, in, out, len);
    double e = kvs_test_rel_err(in, out, n, KVS_DTYPE_FP16);
    free(out);
    return e;
}

/* Plain per-token quantization without rotation (the "per-token-2 G=128" row of §6):
 * groups of min(128, H*D) consecutive channels of the [H][D] vector, RotateKV form. */
static double plain_err(const uint16_t *in, uint32_t t, uint32_t C, unsigned bits, float clip)
{
    double num = 0, den = 0;
    uint32_t G = C < 128 ? C : 128;
    for (uint32_t i = 0; i < t; i++)
        for (uint32_t g = 0; g < C; g += G) {
            float v[128];
            float mn = INFINITY, mx = -INFINITY;
            for (uint32_t j = 0; j < G; j++) {
                v[j] = kvs_fp16_to_f32(in[(size_t)i * C + g + j]);
                mn = fminf(mn, v[j]);
                mx = fmaxf(mx, v[j]);
            }
            float z;
            kvs_minmax p = kvs_minmax_params_zp(mn, mx, clip, bits, &z);
            for (uint32_t j = 0; j < G; j++) {
                double d = kvs_minmax_decode(p, kvs_minmax_code_zp(p, z, v[j], bits)) - v[j];
                num += d * d;
                den += (double)v[j] * v[j];
            }
        }
    return sqrt(num / den);
}

/* ---------------------------------------------------------------- rotations */

static void test_fwht_involution(void **st)
{
    (void)st;
    for (size_t n = 64; n <= 4096; n *= 2) {
        float *x = malloc(n * sizeof *x), *y = malloc(n * sizeof *y);
        double mx = 0;
        for (size_t i = 0; i < n; i++)
            x[i] = y[i] = gauss();
        kvs_fwht(y, n);
        kvs_fwht(y, n);
        for (size_t i = 0; i < n; i++)
            mx = fmax(mx, fabs((double)y[i] - x[i]));
        /* log2(n) butterfly stages of fp32 rounding on O(1) values */
        assert_true(mx < 4e-6 * log2((double)n));
        free(x);
        free(y);
    }
}

static void test_head_group(void **st)
{
    (void)st;
    assert_int_equal(kvs_rotatekv_head_group(1), 1);
    assert_int_equal(kvs_rotatekv_head_group(2), 2);
    assert_int_equal(kvs_rotatekv_head_group(3), 1);
    assert_int_equal(kvs_rotatekv_head_group(4), 4);
    assert_int_equal(kvs_rotatekv_head_group(6), 2);
    assert_int_equal(kvs_rotatekv_head_group(8), 4);
    assert_int_equal(kvs_rotatekv_head_group(12), 4);
    /* H = 8, D = 64: two independent 256-point transforms; an impulse in head 0 spreads
     * over heads 0..3 only, with magnitude 1/16. */
    float x[8 * 64] = {0};
    x[0] = 1.0f;
    kvs_rotatekv_rotate_keys(8, 64, x);
    for (int j = 0; j < 8 * 64; j++)
        assert_true(j < 256 ? x[j] == 0.0625f : x[j] == 0.0f);
    kvs_rotatekv_rotate_keys(8, 64, x);
    assert_true(fabsf(x[0] - 1.0f) < 1e-6f);
}

/* ---------------------------------------------------------------- error on random data */

static void test_random_shapes(void **st)
{
    (void)st;
    static const uint32_t Ds[] = {64, 128, 256};
    static const uint32_t Hs[] = {4, 2, 3};
    /* Gaussian bounds (rel. L2), measured well below: 2 bits clip 0.8, 3/4 bits clip 1. */
    static const double bound[5] = {0, 0, 0.45, 0.24, 0.12};
    for (unsigned bits = 2; bits <= 4; bits++)
        for (size_t di = 0; di < 3; di++)
            for (size_t hi = 0; hi < 3; hi++) {
                char name[16];
                snprintf(name, sizeof name, "rotatekv-%u", bits);
                uint32_t H = Hs[hi], D = Ds[di], T = 32;
                kvs_ns_spec s = make_spec(1, H, D, T, name);
                kvs_codec *k = kvs_test_codec(&s, KVS_KEYS, NULL);
                kvs_codec *v = kvs_test_codec(&s, KVS_VALUES, NULL);
                const uint32_t ts[] = {T, 17, 1};
                for (size_t ti = 0; ti < 3; ti++) {
                    uint32_t t = ts[ti];
                    size_t n = (size_t)t * H * D;
                    uint16_t *in = gauss_fp16(n, 1.5f);
                    double ek = section_err(k, &s, 0, t, in, NULL);
                    double ev = section_err(v, &s, 0, t, in, NULL);
                    if (bits == 2 && ti == 0 && hi == 0)
                        print_message("gaussian rotatekv-%u D=%u H=%u t=%u: K %.4f V %.4f\n", bits,
                                      D, H, t, ek, ev);
                    /* one token = 1..4 groups: a noisier estimate */
                    double b = bound[bits] * (t == 1 ? 1.5 : 1.0);
                    if (!(ek < b && ev < b))
                        fail_msg("rotatekv-%u D=%u H=%u t=%u: K %.4f V %.4f > %.3f", bits, D, H, t,
                                 ek, ev, b);
                    free(in);
                }
                kvs_codec_destroy(k);
                kvs_codec_destroy(v);
            }
}

static void test_gaussian_report(void **st)
{
    (void)st;
    /* D = 128, H = 4, t = 64: the §6 geometry, Gaussian instead of real data. */
    for (unsigned bits = 2; bits <= 4; bits++) {
        char name[16];
        snprintf(name, sizeof name, "rotatekv-%u", bits);
        kvs_ns_spec s = make_spec(1, 4, 128, 64, name);
        kvs_codec *k = kvs_test_codec(&s, KVS_KEYS, NULL);
        kvs_codec *v = kvs_test_codec(&s, KVS_VALUES, NULL);
        uint16_t *in = gauss_fp16(64 * 512, 1.0f);
        double ek = section_err(k, &s, 0, 64, in, NULL);
        double ev = section_err(v, &s, 0, 64, in, NULL);
        print_message("gaussian D=128 H=4 t=64 %s: K %.4f V %.4f (plain per-token %.4f)\n", name,
                      ek, ev, plain_err(in, 64, 512, bits, bits == 2 ? 0.8f : 1.0f));
        free(in);
        kvs_codec_destroy(k);
        kvs_codec_destroy(v);
    }
}

/* ---------------------------------------------------------------- bits */

static void test_bits_accounting(void **st)
{
    (void)st;
    struct {
        uint32_t D;
        unsigned bits;
        double k, v;
    } cases[] = {
        {128, 2, 2.25, 2.25}, {64, 2, 2.25, 2.5},   {256, 2, 2.25, 2.25}, {128, 3, 3.25, 3.25},
        {64, 3, 3.25, 3.5},   {128, 4, 4.25, 4.25}, {64, 4, 4.25, 4.5},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char name[16];
        snprintf(name, sizeof name, "rotatekv-%u", cases[i].bits);
        uint32_t D = cases[i].D, H = 4, t = 64;
        kvs_ns_spec s = make_spec(1, H, D, t, name);
        kvs_codec *k = kvs_test_codec(&s, KVS_KEYS, NULL);
        kvs_codec *v = kvs_test_codec(&s, KVS_VALUES, NULL);
        size_t n = (size_t)t * H * D, lk, lv;
        uint16_t *in = gauss_fp16(n, 1.0f); /* Gaussian: no token is 8x the median norm */
        section_err(k, &s, 0, t, in, &lk);
        section_err(v, &s, 0, t, in, &lv);
        assert_true(lk * 8.0 / n == cases[i].k);
        assert_true(lv * 8.0 / n == cases[i].v);
        /* section_max: room for S = 4 sinks of 2 + 2*H*D bytes instead of records */
        size_t reck = lk / t;
        assert_int_equal(kvs_codec_section_max(k, t), (t - 4) * reck + 4 * (2 + 2 * H * D));
        assert_int_equal(kvs_codec_section_max(k, 2), 2 * (2 + 2 * H * D));
        free(in);
        kvs_codec_destroy(k);
        kvs_codec_destroy(v);
    }
    /* D = 64 with an odd number of 128-channel key groups: H = 3 -> 192 channels =
     * groups of 128 + 64: 2 bits + 2 groups * 32 bits per 192 elements. */
    kvs_ns_spec s = make_spec(1, 3, 64, 8, "rotatekv-2");
    kvs_codec *k = kvs_test_codec(&s, KVS_KEYS, NULL);
    size_t n = 8 * 192, lk;
    uint16_t *in = gauss_fp16(n, 1.0f);
    section_err(k, &s, 0, 8, in, &lk);
    assert_int_equal(lk, 8 * (192 * 2 / 8 + 2 * 4));
    free(in);
    kvs_codec_destroy(k);
}

/* ---------------------------------------------------------------- sinks */

static void test_sinks_bit_exact(void **st)
{
    (void)st;
    kvs_ns_spec s = make_spec(2, 4, 128, 32, "rotatekv-2");
    for (int kv = 0; kv < 2; kv++) {
        kvs_codec *c = kvs_test_codec(&s, (kvs_kv)kv, NULL);
        uint32_t t = 32, C = 512;
        size_t n = (size_t)t * C;
        uint16_t *in = gauss_fp16(n, 1.0f), *out = malloc(n * sizeof *out);
        /* token 0 (a BOS-like sink) and token 9 at 20x norm */
        for (uint32_t j = 0; j < C; j++) {
            in[j] = kvs_f32_to_fp16(20.0f * kvs_fp16_to_f32(in[j]));
            in[9 * C + j] = kvs_f32_to_fp16(-20.0f * kvs_fp16_to_f32(in[9 * C + j]));
        }
        size_t len;
        round_trip(c, 1, t, in, out, &len);
        size_t rec = C * 2 / 8 + 4 * 4;
        assert_int_equal(len, (t - 2) * rec + 2 * (2 + 2 * C));
        assert_memory_equal(out, in, C * 2);
        assert_memory_equal(out + 9 * C, in + 9 * C, C * 2);
        /* the others are quantized (not exact) and fine */
        assert_true(kvs_test_rel_err(in + C, out + C, 8 * C, KVS_DTYPE_FP16) < 0.45);
        assert_true(kvs_test_rel_err(in + C, out + C, 8 * C, KVS_DTYPE_FP16) > 0.0);

        /* six outliers: only the S = 4 largest become sinks */
        const uint32_t tok[6] = {1, 3, 5, 7, 11, 13};
        for (int i = 0; i < 6; i++) { /* norms 10, 11.5, ..., 17.5 times sqrt(C) */
            float g[512];
            double nn = 0;
            for (uint32_t j = 0; j < C; j++) {
                g[j] = gauss();
                nn += (double)g[j] * g[j];
            }
            float f = (float)((10.0 + 1.5 * i) * sqrt(C / nn));
            for (uint32_t j = 0; j < C; j++)
                in[tok[i] * C + j] = kvs_f32_to_fp16(f * g[j]);
        }
        round_trip(c, 0, t, in, out, &len);
        assert_int_equal(len, (t - 4) * rec + 4 * (2 + 2 * C));
        for (int i = 0; i < 6; i++) {
            int exact = memcmp(out + tok[i] * C, in + tok[i] * C, C * 2) == 0;
            /* tokens 0 and 9 (20x) and the two largest injected (17.5x, 16x) */
            assert_int_equal(exact, i >= 4);
        }
        assert_memory_equal(out, in, C * 2);
        free(in);
        free(out);
        kvs_codec_destroy(c);
    }
    /* t = 1 and t = 2: median is the token itself / the smaller one */
    kvs_codec *k = kvs_test_codec(&s, KVS_KEYS, NULL);
    uint16_t *in = gauss_fp16(2 * 512, 1.0f), out[2 * 512];
    size_t len;
    for (uint32_t j = 0; j < 512; j++)
        in[j] = kvs_f32_to_fp16(30.0f * kvs_fp16_to_f32(in[j]));
    round_trip(k, 0, 1, in, out, &len);
    assert_int_equal(len, 144);
    round_trip(k, 0, 2, in, out, &len);
    assert_int_equal(len, 144 + 2 + 1024);
    assert_memory_equal(out, in, 1024);
    free(in);
    kvs_codec_destroy(k);
}

/* Values beyond what fp16 group parameters hold (bf16 namespace): kept as sinks. */
static void test_range_sinks_bf16(void **st)
{
    (void)st;
    kvs_ns_spec s = make_spec(1, 4, 64, 16, "rotatekv-4");
    s.dtype = KVS_DTYPE_BF16;
    kvs_codec *k = kvs_test_codec(&s, KVS_KEYS, NULL);
    uint32_t t = 16, C = 256;
    uint16_t in[16 * 256], out[16 * 256];
    for (uint32_t i = 0; i < t * C; i++)
        in[i] = kvs_f32_to_bf16(gauss() * (i / C == 5 ? 1e6f : 1.0f));
    size_t len;
    round_trip(k, 0, t, in, out, &len);
    assert_memory_equal(out + 5 * C, in + 5 * C, C * 2);
    /* five such tokens do not fit S = 4 */
    for (uint32_t i = 0; i < 5 * C; i++)
        in[i] = kvs_f32_to_bf16(1e6f);
    uint8_t enc[16384];
    kvs_err err;
    assert_int_equal(kvs_codec_encode(k, 0, t, in, enc, sizeof enc, &len, &err), KVS_EINVAL);
    kvs_codec_destroy(k);
}

/* ---------------------------------------------------------------- permutation state */

static kvs_codec_state perm_state(uint32_t L, uint32_t C, const uint16_t *p /* [L][C] */,
                                  uint8_t *buf)
{
    buf[0] = (uint8_t)L, buf[1] = (uint8_t)(L >> 8), buf[2] = buf[3] = 0;
    buf[4] = (uint8_t)C, buf[5] = (uint8_t)(C >> 8), buf[6] = (uint8_t)(C >> 16), buf[7] = 0;
    for (size_t j = 0; j < (size_t)L * C; j++) {
        buf[8 + 2 * j] = (uint8_t)p[j];
        buf[9 + 2 * j] = (uint8_t)(p[j] >> 8);
    }
    return (kvs_codec_state){1, buf, 8 + (size_t)L * C * 2};
}

/* A permutation that maps whole quantization groups onto groups (shuffling within them)
 * quantizes every group's values identically: decode equals the identity state's decode
 * bit for bit, while the encoded bytes differ. This checks gather and inverse scatter. */
static void test_permutation_round_trip(void **st)
{
    (void)st;
    uint32_t L = 2, H = 4, D = 64, C = 256, t = 16;
    kvs_ns_spec s = make_spec(L, H, D, t, "rotatekv-2");
    uint16_t p[2 * 256];
    for (uint32_t l = 0; l < L; l++) {
        for (uint32_t j = 0; j < C; j++)
            p[l * C + j] = (uint16_t)((j + 128 * (l + 1)) % C); /* swap the two groups */
        for (uint32_t g = 0; g < C; g += 128)                   /* Fisher-Yates inside each group */
            for (uint32_t j = 127; j > 0; j--) {
                uint32_t r = (uint32_t)(next_u64() % (j + 1));
                uint16_t tmp = p[l * C + g + j];
                p[l * C + g + j] = p[l * C + g + r];
                p[l * C + g + r] = tmp;
            }
    }
    uint8_t buf[8 + 2 * 256 * 2];
    kvs_codec_state sp = perm_state(L, C, p, buf);
    kvs_codec *id = kvs_test_codec(&s, KVS_KEYS, NULL), *pc = kvs_test_codec(&s, KVS_KEYS, &sp);
    assert_int_equal(kvs_codec_state_version(pc), 1);
    size_t n = (size_t)t * C;
    uint16_t *in = gauss_fp16(n, 1.0f), *o1 = malloc(n * 2), *o2 = malloc(n * 2);
    for (uint32_t l = 0; l < L; l++) {
        uint8_t e1[8192], e2[8192];
        size_t l1, l2;
        assert_int_equal(kvs_codec_encode(id, l, t, in, e1, sizeof e1, &l1, NULL), 0);
        assert_int_equal(kvs_codec_encode(pc, l, t, in, e2, sizeof e2, &l2, NULL), 0);
        assert_int_equal(l1, l2);
        assert_true(memcmp(e1, e2, l1) != 0);
        assert_int_equal(kvs_codec_decode(id, l, t, e1, l1, o1, NULL), 0);
        assert_int_equal(kvs_codec_decode(pc, l, t, e2, l2, o2, NULL), 0);
        assert_memory_equal(o1, o2, n * 2);
    }
    /* the value codec ignores the state */
    kvs_codec *v = kvs_test_codec(&s, KVS_VALUES, &sp);
    kvs_codec_destroy(v);
    free(in);
    free(o1);
    free(o2);
    kvs_codec_destroy(id);
    kvs_codec_destroy(pc);
}

static void test_state_validation(void **st)
{
    (void)st;
    uint32_t L = 2, C = 256;
    kvs_ns_spec s = make_spec(L, 4, 64, 16, "rotatekv-2");
    uint16_t p[2 * 256];
    for (uint32_t j = 0; j < L * C; j++)
        p[j] = (uint16_t)(j % C);
    uint8_t buf[8 + 2 * 256 * 2];
    kvs_codec *c = NULL;
    kvs_err err;
    kvs_codec_state ok = perm_state(L, C, p, buf);
    assert_int_equal(kvs_codec_create(&s, KVS_KEYS, &ok, &c, &err), 0);
    kvs_codec_destroy(c);

    kvs_codec_state bad = ok;
    bad.len = ok.len - 2; /* truncated */
    assert_int_equal(kvs_codec_create(&s, KVS_KEYS, &bad, &c, &err), KVS_EINVAL);
    bad.len = 4;
    assert_int_equal(kvs_codec_create(&s, KVS_KEYS, &bad, &c, &err), KVS_EINVAL);
    p[C + 7] = 3; /* layer 1: channel 3 twice */
    bad = perm_state(L, C, p, buf);
    assert_int_equal(kvs_codec_create(&s, KVS_KEYS, &bad, &c, &err), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "layer 1"));
    p[C + 7] = 7;
    p[5] = 256; /* out of range */
    bad = perm_state(L, C, p, buf);
    assert_int_equal(kvs_codec_create(&s, KVS_KEYS, &bad, &c, &err), KVS_EINVAL);
    p[5] = 5;
    bad = perm_state(1, C, p, buf); /* wrong layer count */
    assert_int_equal(kvs_codec_create(&s, KVS_KEYS, &bad, &c, &err), KVS_EINVAL);
    /* version 0: identity, data ignored */
    kvs_codec_state v0 = {0, "junk", 4};
    assert_int_equal(kvs_codec_create(&s, KVS_KEYS, &v0, &c, &err), 0);
    kvs_codec_destroy(c);
    /* head_dim not a power of two */
    kvs_ns_spec s96 = make_spec(1, 4, 96, 16, "rotatekv-2");
    assert_int_equal(kvs_codec_create(&s96, KVS_VALUES, NULL, &c, &err), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "head_dim"));
}

static void test_calibration(void **st)
{
    (void)st;
    /* freeze = argsort ascending, ties by channel */
    kvs_ns_spec s = make_spec(1, 1, 16, 4, "rotatekv-2");
    double sums[16] = {5, -1, 3, 3, 0, 9, -7, 2, 2, 2, 1, 4, -2, 8, 6, 7};
    void *state;
    size_t len;
    assert_int_equal(kvs_rotatekv_calib_freeze(&s, sums, &state, &len, NULL), 0);
    assert_int_equal(len, 8 + 32);
    static const uint16_t want[16] = {6, 12, 1, 4, 10, 7, 8, 9, 2, 3, 11, 0, 14, 15, 13, 5};
    for (int j = 0; j < 16; j++) {
        const uint8_t *b = (const uint8_t *)state + 8 + 2 * j;
        assert_int_equal(b[0] | b[1] << 8, want[j]);
    }
    free(state);

    /* keys with a mean per rotated channel: the permutation sorts those means */
    kvs_ns_spec s2 = make_spec(2, 4, 32, 16, "rotatekv-2");
    uint32_t n = 50, C = 128;
    float mean[128];
    for (uint32_t j = 0; j < C; j++) /* distinct means 0.5 apart, shuffled */
        mean[j] = 0.5f * ((float)j - 64.0f);
    for (uint32_t j = C - 1; j > 0; j--) {
        uint32_t r = (uint32_t)(next_u64() % (j + 1));
        float tmpm = mean[j];
        mean[j] = mean[r];
        mean[r] = tmpm;
    }
    uint16_t *keys = malloc(2 * (size_t)n * C * sizeof *keys);
    float tmp[128];
    for (uint32_t l = 0; l < 2; l++)
        for (uint32_t i = 0; i < n; i++) {
            for (uint32_t j = 0; j < C; j++)
                tmp[j] = mean[j] + 0.1f * gauss();
            kvs_rotatekv_rotate_keys(4, 32, tmp); /* input basis = rotate(rotated basis) */
            for (uint32_t j = 0; j < C; j++)
                keys[((size_t)l * n + i) * C + j] = kvs_f32_to_fp16(tmp[j]);
        }
    assert_int_equal(kvs_rotatekv_calibrate(&s2, keys, n, &state, &len, NULL), 0);
    assert_int_equal(len, 8 + 2 * 2 * C);
    for (uint32_t l = 0; l < 2; l++)
        for (uint32_t j = 1; j < C; j++) {
            const uint8_t *b = (const uint8_t *)state + 8 + 2 * (l * C + j);
            uint16_t cur = (uint16_t)(b[0] | b[1] << 8), prev = (uint16_t)(b[-2] | b[-1] << 8);
            assert_true(mean[prev] <= mean[cur]);
        }
    kvs_codec_state cs = {1, state, len};
    kvs_codec *c = kvs_test_codec(&s2, KVS_KEYS, &cs);
    kvs_codec_destroy(c);
    free(state);
    free(keys);
}

/* Synthetic outlier channel (§9.4): one channel of head 0 carries a +20 sigma offset on
 * every token, as key outlier channels do. Rotation alone spreads it over 512 channels;
 * the calibrated reordering then groups channels of similar offset. */
static void test_outlier_channel(void **st)
{
    (void)st;
    uint32_t H = 4, D = 128, C = 512, t = 64;
    kvs_ns_spec s = make_spec(1, H, D, t, "rotatekv-2");
    size_t n = (size_t)t * C;
    uint16_t *in = malloc(n * 2), *out = malloc(n * 2);
    float chan_mean[512];
    for (uint32_t j = 0; j < C; j++)
        chan_mean[j] = 0.5f * gauss(); /* milder per-channel offsets */
    for (uint32_t i = 0; i < t; i++)
        for (uint32_t j = 0; j < C; j++)
            in[i * C + j] = kvs_f32_to_fp16(chan_mean[j] + gauss() + (j == 5 ? 20.0f : 0.0f) +
                                            (j == 300 ? -20.0f : 0.0f));
    double plain = plain_err(in, t, C, 2, 1.0f);
    double plain08 = plain_err(in, t, C, 2, 0.8f);
    kvs_codec *id = kvs_test_codec(&s, KVS_KEYS, NULL);
    round_trip(id, 0, t, in, out, NULL);
    double rot = kvs_test_rel_err(in, out, n, KVS_DTYPE_FP16);
    void *state;
    size_t len;
    assert_int_equal(kvs_rotatekv_calibrate(&s, in, t, &state, &len, NULL), 0);
    kvs_codec_state cs = {1, state, len};
    kvs_codec *pc = kvs_test_codec(&s, KVS_KEYS, &cs);
    round_trip(pc, 0, t, in, out, NULL);
    double both = kvs_test_rel_err(in, out, n, KVS_DTYPE_FP16);
    print_message("outlier channel K rel: plain per-token-2 clip1 %.4f clip0.8 %.4f, "
                  "rotation %.4f, rotation+reorder %.4f\n",
                  plain, plain08, rot, both);
    /* measured over 40 streams: both/plain 0.47..0.50, both/rot 0.66..0.69 */
    assert_true(both < 0.6 * plain);
    assert_true(both < 0.8 * rot);
    free(state);
    free(in);
    free(out);
    kvs_codec_destroy(id);
    kvs_codec_destroy(pc);
}

/* ---------------------------------------------------------------- determinism, lengths */

static void test_deterministic(void **st)
{
    (void)st;
    kvs_ns_spec s = make_spec(1, 4, 128, 16, "rotatekv-3");
    kvs_ns_spec s2 = s;
    s2.seed = 99;
    kvs_codec *a = kvs_test_codec(&s, KVS_KEYS, NULL), *b = kvs_test_codec(&s2, KVS_KEYS, NULL);
    uint16_t *in = gauss_fp16(16 * 512, 2.0f);
    uint8_t e1[8192], e2[8192], e3[8192];
    size_t l1, l2, l3;
    assert_int_equal(kvs_codec_encode(a, 0, 16, in, e1, sizeof e1, &l1, NULL), 0);
    assert_int_equal(kvs_codec_encode(a, 0, 16, in, e2, sizeof e2, &l2, NULL), 0);
    assert_int_equal(kvs_codec_encode(b, 0, 16, in, e3, sizeof e3, &l3, NULL), 0);
    assert_int_equal(l1, l2);
    assert_memory_equal(e1, e2, l1);
    /* no randomness in rotatekv: the seed does not change the bytes (documented) */
    assert_int_equal(l1, l3);
    assert_memory_equal(e1, e3, l1);
    free(in);
    kvs_codec_destroy(a);
    kvs_codec_destroy(b);
}

static void test_bad_lengths(void **st)
{
    (void)st;
    uint32_t t = 8, C = 256;
    kvs_ns_spec s = make_spec(1, 4, 64, t, "rotatekv-2");
    for (int kv = 0; kv < 2; kv++) {
        kvs_codec *c = kvs_test_codec(&s, (kvs_kv)kv, NULL);
        size_t max = kvs_codec_section_max(c, t), rec = kv ? 64 + 4 * 4 : 64 + 2 * 4;
        uint8_t *buf = malloc(max + 64);
        for (size_t i = 0; i < max + 64; i++)
            buf[i] = (uint8_t)next_u64();
        uint16_t out[8 * 256];
        kvs_err err;
        size_t per = 2 + 2 * C - rec;
        for (size_t len = 0; len <= max + 64; len++) {
            bool valid = len >= t * rec && (len - t * rec) % per == 0 && (len - t * rec) / per <= 4;
            int rc = kvs_codec_decode(c, 0, t, buf, len, out, &err);
            if (!valid)
                assert_int_equal(rc, KVS_EPROTO);
            else if (len == t * rec)
                assert_int_equal(rc, 0); /* any bytes decode: no sink list to check */
        }
        /* a valid length with a bad sink list: out of order, repeated, out of range */
        size_t len2 = t * rec + 2 * per;
        uint8_t *list = buf + (t - 2) * rec;
        list[0] = 3, list[1] = 0, list[2] = 1, list[3] = 0;
        assert_int_equal(kvs_codec_decode(c, 0, t, buf, len2, out, &err), KVS_EPROTO);
        list[2] = 3;
        assert_int_equal(kvs_codec_decode(c, 0, t, buf, len2, out, &err), KVS_EPROTO);
        list[2] = 8;
        assert_int_equal(kvs_codec_decode(c, 0, t, buf, len2, out, &err), KVS_EPROTO);
        list[2] = 7;
        assert_int_equal(kvs_codec_decode(c, 0, t, buf, len2, out, &err), 0);
        /* encode into a buffer that is too small */
        uint16_t *in = gauss_fp16((size_t)t * C, 1.0f);
        size_t len;
        assert_int_equal(kvs_codec_encode(c, 0, t, in, buf, t * rec - 1, &len, &err), KVS_ENOSPC);
        assert_int_equal(kvs_codec_encode(c, 0, t, in, buf, t * rec, &len, &err), 0);
        assert_int_equal(len, t * rec);
        /* layer out of range */
        assert_int_not_equal(kvs_codec_decode(c, 1, t, buf, len, out, &err), 0);
        free(in);
        free(buf);
        kvs_codec_destroy(c);
    }
}

/* ---------------------------------------------------------------- blocks */

static void test_block_round_trip(void **st)
{
    (void)st;
    uint32_t L = 3, H = 2, D = 128, T = 16, C = H * D;
    kvs_ns_spec s = make_spec(L, H, D, T, "rotatekv-4");
    snprintf(s.value_codec, sizeof s.value_codec, "rotatekv-2");
    uint32_t t = 11;
    size_t sec = (size_t)t * C, n = 2 * L * sec;
    uint16_t *raw = gauss_fp16(n, 1.0f), *dec = malloc(n * 2);
    for (uint32_t j = 0; j < C; j++) /* a sink in layer 1's values */
        raw[(2 * 1 + 1) * sec + 4 * C + j] = kvs_f32_to_fp16(25.0f * gauss());
    void *state;
    size_t slen;
    /* calibrate keys on the block itself: [L][t][H][D] gathered from [L][2][t][H][D] */
    uint16_t *keys = malloc(L * sec * 2);
    for (uint32_t l = 0; l < L; l++)
        memcpy(keys + l * sec, raw + 2 * l * sec, sec * 2);
    assert_int_equal(kvs_rotatekv_calibrate(&s, keys, t, &state, &slen, NULL), 0);
    kvs_codec_state cs = {3, state, slen};
    kvs_codec *k = kvs_test_codec(&s, KVS_KEYS, &cs), *v = kvs_test_codec(&s, KVS_VALUES, NULL);
    size_t cap = kvs_block_encoded_max(k, v, t), len;
    uint8_t *enc = malloc(cap);
    kvs_err err;
    assert_int_equal(kvs_block_encode(k, v, 7, t, raw, enc, cap, &len, &err), 0);
    assert_int_equal(kvs_block_decode(k, v, enc, len, 0, L, dec, &err), 0);
    for (uint32_t l = 0; l < L; l++) {
        double ek = kvs_test_rel_err(raw + 2 * l * sec, dec + 2 * l * sec, sec, KVS_DTYPE_FP16);
        double ev =
            kvs_test_rel_err(raw + (2 * l + 1) * sec, dec + (2 * l + 1) * sec, sec, KVS_DTYPE_FP16);
        assert_true(ek < 0.11);
        assert_true(ev < 0.45);
    }
    assert_memory_equal(dec + 3 * sec + 4 * C, raw + 3 * sec + 4 * C, C * 2);
    /* one layer on its own decodes to the same elements */
    uint16_t *one = malloc(2 * sec * 2);
    assert_int_equal(kvs_block_decode(k, v, enc, len, 1, 2, one, &err), 0);
    assert_memory_equal(one, dec + 2 * sec, 2 * sec * 2);
    /* a decoder with another state version refuses the block */
    kvs_codec *k0 = kvs_test_codec(&s, KVS_KEYS, NULL);
    assert_int_equal(kvs_block_decode(k0, v, enc, len, 0, L, dec, &err), KVS_EPROTO);
    kvs_codec_destroy(k0);
    free(one);
    free(keys);
    free(state);
    free(enc);
    free(raw);
    free(dec);
    kvs_codec_destroy(k);
    kvs_codec_destroy(v);
}

/* ---------------------------------------------------------------- real sample */

typedef struct sample {
    kvs_test_sample file;
    const uint16_t *k, *kpre, *v, *q; /* [6][64][H][128], q [6][64][8][128] */
} sample;

static bool load_sample(sample *s)
{
    if (!kvs_test_sample_load(&s->file))
        return false;
    s->k = kvs_test_sample_array(&s->file, "k", "[6, 64, 4, 128]");
    s->kpre = kvs_test_sample_array(&s->file, "k_pre_rope", "[6, 64, 4, 128]");
    s->v = kvs_test_sample_array(&s->file, "v", "[6, 64, 4, 128]");
    s->q = kvs_test_sample_array(&s->file, "q", "[6, 64, 8, 128]");
    assert_true(s->file.size >= 1183744 + 6 * 64 * 8 * 128 * 2);
    return true;
}

/* RoPE, rotate-half, theta 10000, position pos, on one head (§9.1). */
static void rope(float *x, uint32_t D, uint32_t pos)
{
    for (uint32_t i = 0; i < D / 2; i++) {
        double ang = pos * pow(10000.0, -2.0 * i / D);
        double c = cos(ang), sn = sin(ang), a = x[i], b = x[i + D / 2];
        x[i] = (float)(a * c - b * sn);
        x[i + D / 2] = (float)(b * c + a * sn);
    }
}

static void real_run(const sample *sm, unsigned bits, bool pre_rope, double *ek, double *ev,
                     double *el, double *eplain, unsigned *sinks)
{
    const uint32_t L = 6, n = 64, C = 512;
    const size_t sec = (size_t)n * C;
    char name[16];
    snprintf(name, sizeof name, "rotatekv-%u", bits);
    kvs_ns_spec s = make_spec(L, 4, 128, 64, name);
    s.keys_pre_rope = pre_rope;
    const uint16_t *keys = pre_rope ? sm->kpre : sm->k;
    void *state;
    size_t slen;
    assert_int_equal(kvs_rotatekv_calibrate(&s, keys, n, &state, &slen, NULL), 0);
    kvs_codec_state cs = {1, state, slen};
    kvs_codec *k = kvs_test_codec(&s, KVS_KEYS, &cs), *v = kvs_test_codec(&s, KVS_VALUES, NULL);
    uint16_t *out = malloc(sec * 2);
    float *kf = malloc(sec * 4), *kh = malloc(sec * 4);
    *ek = *ev = *el = *eplain = 0;
    *sinks = 0;
    size_t rec = C * bits / 8 + 16;
    for (uint32_t l = 0; l < L; l++) {
        size_t len;
        const uint16_t *kin = keys + l * sec, *vin = sm->v + l * sec;
        round_trip(k, l, n, kin, out, &len);
        *sinks += (unsigned)((len - n * rec) / (2 + 2 * C - rec));
        *ek += kvs_test_rel_err(kin, out, sec, KVS_DTYPE_FP16) / L;
        *eplain += plain_err(kin, n, C, 2, 1.0f) / L;
        /* logits against the post-RoPE keys of the file */
        for (size_t i = 0; i < sec; i++) {
            kf[i] = kvs_fp16_to_f32(sm->k[l * sec + i]);
            kh[i] = kvs_fp16_to_f32(out[i]);
        }
        if (pre_rope)
            for (uint32_t i = 0; i < n; i++)
                for (uint32_t h = 0; h < 4; h++)
                    rope(kh + (i * 4 + h) * 128, 128, i);
        *el += kvs_test_logit_err(sm->q + l * (size_t)n * 8 * 128, kf, kh, n, 8, 4, 128) / L;
        round_trip(v, l, n, vin, out, &len);
        *sinks += (unsigned)((len - n * rec) / (2 + 2 * C - rec));
        *ev += kvs_test_rel_err(vin, out, sec, KVS_DTYPE_FP16) / L;
    }
    free(out);
    free(kf);
    free(kh);
    free(state);
    kvs_codec_destroy(k);
    kvs_codec_destroy(v);
}

static void test_real_sample(void **st)
{
    (void)st;
    sample sm = {0};
    if (!load_sample(&sm)) {
        print_message("realkv-a-64.kvs not found (set KVS_TEST_DATA): skipped\n");
        skip();
    }
    /* rope(k_pre) reproduces the file's post-RoPE keys (convention check, §9.1) */
    float x[128];
    double mx = 0;
    for (uint32_t i = 0; i < 64; i++) {
        for (uint32_t d = 0; d < 128; d++)
            x[d] = kvs_fp16_to_f32(sm.kpre[(2 * 64 * 4 + i * 4 + 1) * 128 + d]);
        rope(x, 128, i);
        for (uint32_t d = 0; d < 128; d++)
            mx = fmax(mx, fabs(x[d] - kvs_fp16_to_f32(sm.k[(2 * 64 * 4 + i * 4 + 1) * 128 + d])));
    }
    print_message("max |rope(k_pre) - k| layer 2 head 1: %.4f\n", mx);
    assert_true(mx < 0.01);
    static const double ref_k[5] = {0, 0, 0.253, 0, 0.062}, ref_v[5] = {0, 0, 0.402, 0, 0.100};
    for (unsigned bits = 2; bits <= 4; bits++)
        for (int pre = 1; pre >= 0; pre--) {
            double ek, ev, el, ep;
            unsigned sinks;
            real_run(&sm, bits, pre, &ek, &ev, &el, &ep, &sinks);
            print_message("realkv-a-64 rotatekv-%u %s keys, self-calibrated: K %.4f V %.4f "
                          "logits %.4f (plain per-token-2 K %.4f), sinks %u",
                          bits, pre ? "pre-RoPE" : "post-RoPE", ek, ev, el, ep, sinks);
            if (ref_k[bits] > 0)
                print_message("; §6 ref K %.3f V %.3f", ref_k[bits], ref_v[bits]);
            print_message("\n");
            if (bits == 2 && pre) {
                /* §6: 0.253 / 0.402 on 512 tokens calibrated on another sample */
                assert_true(ek > 0.20 && ek < 0.30);
                assert_true(ev > 0.34 && ev < 0.46);
                assert_true(ek < 0.6 * ep);
            }
            if (bits == 4 && pre) {
                assert_true(ek < 0.08);
                assert_true(ev < 0.12);
            }
        }
    kvs_test_sample_free(&sm.file);
}

int main(void)
{
    /* fixed by default; RKV_TEST_SEED=n reruns every random test with another stream */
    const char *seed = getenv("RKV_TEST_SEED");
    if (seed)
        rng_state = strtoull(seed, NULL, 0);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fwht_involution),  cmocka_unit_test(test_head_group),
        cmocka_unit_test(test_random_shapes),    cmocka_unit_test(test_gaussian_report),
        cmocka_unit_test(test_bits_accounting),  cmocka_unit_test(test_sinks_bit_exact),
        cmocka_unit_test(test_range_sinks_bf16), cmocka_unit_test(test_permutation_round_trip),
        cmocka_unit_test(test_state_validation), cmocka_unit_test(test_calibration),
        cmocka_unit_test(test_outlier_channel),  cmocka_unit_test(test_deterministic),
        cmocka_unit_test(test_bad_lengths),      cmocka_unit_test(test_block_round_trip),
        cmocka_unit_test(test_real_sample),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
