/* gpu/codec/codec_fp8.c and gpu/half.h's e4m3fn conversions: the conversion of all 65536 fp16
 * inputs against a table built from the e4m3fn definition; round trips through the
 * codec and block API; per-head scales, zero heads, exact size, bad lengths. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "gpu/codec/codec.h"
#include "gpu/codec/half.h"
#include "tests/support/kvs_test.h"

/* ---------------------------------------------------------------- definitions */

/* e4m3fn by definition: sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is
 * subnormal (m * 2^-9); S.1111.111 is NaN; no infinities. */
static double fp8_def(unsigned code)
{
    unsigned s = code >> 7, e = (code >> 3) & 15, m = code & 7;
    if (e == 15 && m == 7)
        return NAN;
    double v = e == 0 ? ldexp(m, -9) : ldexp(8 + m, (int)e - 10);
    return s ? -v : v;
}

static double fp16_def(unsigned h)
{
    unsigned s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    double v;
    if (e == 31)
        v = m ? NAN : INFINITY;
    else
        v = e == 0 ? ldexp(m, -24) : ldexp(1024 + m, (int)e - 25);
    return s ? -v : v;
}

/* Expected fp8 code of x: NaN -> NaN (sign kept), |x| >= 448 (Inf included: SATFINITE)
 * -> +-448, else the nearest finite value by brute force, ties to the even code. */
static uint8_t fp8_expect(double x)
{
    unsigned sign = signbit(x) ? 0x80 : 0;
    if (isnan(x))
        return (uint8_t)(sign | 0x7F);
    double a = fabs(x);
    if (a >= 448)
        return (uint8_t)(sign | 0x7E);
    unsigned best = 0;
    double bd = INFINITY;
    for (unsigned c = 0; c <= 0x7E; c++) {
        double d = fabs(fp8_def(c) - a);
        if (d < bd || (d == bd && (c & 1) == 0 && (best & 1))) {
            bd = d;
            best = c;
        }
    }
    return (uint8_t)(sign | best);
}

static void test_fp8_table(void **state)
{
    unsigned bad = 0;
    for (unsigned h = 0; h < 65536; h++) {
        double x = fp16_def(h);
        uint8_t want = fp8_expect(x);
        uint8_t got = kvs_f32_to_fp8(kvs_fp16_to_f32((uint16_t)h));
        if (got != want && bad++ < 10)
            fprintf(stderr, "fp16 0x%04x (%g): got 0x%02x, want 0x%02x\n", h, x, got, want);
    }
    assert_int_equal(bad, 0);
    for (unsigned c = 0; c < 256; c++) {
        double want = fp8_def(c);
        float got = kvs_fp8_to_f32((uint8_t)c);
        if (isnan(want)) {
            assert_true(isnan(got));
            continue;
        }
        assert_true((double)got == want);
        assert_true((signbit(got) != 0) == (signbit(want) != 0));
        assert_int_equal(kvs_f32_to_fp8(got), c); /* every finite code round-trips */
    }
}

/* ---------------------------------------------------------------- codec helpers */

/* fp8 keys and values, seed 7 */
static kvs_ns_spec spec(uint32_t L, uint32_t H, uint32_t D, uint32_t T, kvs_dtype dt)
{
    return kvs_test_spec(L, H, D, T, dt, "fp8", "fp8", 7);
}

/* Encodes and decodes one section; returns the relative error; checks the size. */
static double roundtrip(const kvs_ns_spec *s, kvs_kv kv, uint32_t t, const uint16_t *in,
                        uint16_t *out, size_t *bytes)
{
    kvs_codec *c;
    kvs_err err;
    assert_int_equal(kvs_codec_create(s, kv, NULL, &c, &err), 0);
    size_t n = (size_t)t * s->kv_heads * s->head_dim, cap = kvs_codec_section_max(c, t), len = 0;
    assert_int_equal(cap, 4 * (size_t)s->kv_heads + n);
    uint8_t *enc = malloc(cap), *enc2 = malloc(cap);
    assert_int_equal(kvs_codec_encode(c, 0, t, in, enc, cap, &len, &err), 0);
    assert_int_equal(len, cap);
    size_t len2 = 0;
    assert_int_equal(kvs_codec_encode(c, 0, t, in, enc2, cap, &len2, &err), 0);
    assert_memory_equal(enc, enc2, len); /* deterministic */
    assert_int_equal(kvs_codec_decode(c, 0, t, enc, len, out, &err), 0);
    assert_int_equal(kvs_codec_decode(c, 0, t, enc, len - 1, out, &err), KVS_EPROTO);
    assert_int_equal(kvs_codec_decode(c, 0, t, enc, len + 1, out, &err), KVS_EPROTO);
    assert_int_equal(kvs_codec_decode(c, 0, t, enc, 0, out, &err), KVS_EPROTO);
    assert_int_equal(kvs_codec_decode(c, 0, t, enc, len, out, &err), 0);
    *bytes = len;
    free(enc);
    free(enc2);
    kvs_codec_destroy(c);
    return kvs_test_rel_err(in, out, n, s->dtype);
}

static void test_roundtrip_shapes(void **state)
{
    static const uint32_t dims[] = {64, 128, 256};
    static const uint32_t toks[] = {64, 17, 1};
    for (unsigned di = 0; di < 3; di++)
        for (unsigned ti = 0; ti < 3; ti++)
            for (int bf = 0; bf < 2; bf++) {
                kvs_dtype dt = bf ? KVS_DTYPE_BF16 : KVS_DTYPE_FP16;
                kvs_ns_spec s = spec(2, 3, dims[di], 64, dt);
                uint32_t t = toks[ti];
                size_t n = (size_t)t * 3 * dims[di], bytes;
                uint16_t *in = kvs_test_gauss_data(n, 11 + di * 7 + ti, 2.0, dt),
                         *out = malloc(n * 2);
                double e = roundtrip(&s, KVS_VALUES, t, in, out, &bytes);
                /* e4m3: 3 mantissa bits, relative rounding error <= 2^-4 per element;
                 * Gaussian data: about 0.026 (quantizers-reference.md §6). */
                if (di == 1 && ti == 0 && !bf)
                    fprintf(stderr, "fp8 gaussian D=128 t=64: rel err %.4f, %.4f bits/elt\n", e,
                            8.0 * bytes / n);
                assert_true(e < 0.035);
                assert_true(e > 0.01);
                for (size_t i = 0; i < n; i++) {
                    double x = kvs_test_to_f32(in[i], dt), y = kvs_test_to_f32(out[i], dt);
                    /* per element: 2^-4 relative for normals, plus the subnormal step
                     * (2^-10 * scale) and the output rounding */
                    assert_true(fabs(x - y) <= fabs(x) * (0.0625 + 0.01) + 1e-3);
                }
                free(in);
                free(out);
            }
}

/* Scales are per head: a tiny head next to a huge one keeps its relative precision;
 * an all-zero head decodes to exact zeros; the maximum is reproduced. */
static void test_per_head_scale(void **state)
{
    kvs_ns_spec s = spec(1, 3, 64, 16, KVS_DTYPE_FP16);
    uint32_t t = 16, D = 64;
    size_t n = (size_t)t * 3 * D, bytes;
    uint16_t *in = kvs_test_gauss_data(n, 5, 1.0, KVS_DTYPE_FP16), *out = malloc(n * 2);
    for (uint32_t tok = 0; tok < t; tok++)
        for (uint32_t j = 0; j < D; j++) {
            size_t i0 = ((size_t)tok * 3 + 0) * D + j, i1 = i0 + D, i2 = i1 + D;
            in[i0] = kvs_f32_to_fp16(kvs_fp16_to_f32(in[i0]) * 1e-3f);
            in[i1] = kvs_f32_to_fp16(kvs_fp16_to_f32(in[i1]) * 1e3f);
            in[i2] = (tok & 1) ? 0x8000 : 0; /* zeros, both signs */
        }
    in[5] = kvs_f32_to_fp16(0.01f); /* head 0's maximum */
    roundtrip(&s, KVS_KEYS, t, in, out, &bytes);
    double e0 = 0, n0 = 0;
    for (uint32_t tok = 0; tok < t; tok++)
        for (uint32_t j = 0; j < D; j++) {
            size_t i0 = ((size_t)tok * 3) * D + j;
            double x = kvs_fp16_to_f32(in[i0]), y = kvs_fp16_to_f32(out[i0]);
            e0 += (x - y) * (x - y);
            n0 += x * x;
            assert_true(kvs_fp16_to_f32(out[i0 + 2 * D]) == 0.0f);
        }
    assert_true(sqrt(e0 / n0) < 0.035);
    assert_true(fabsf(kvs_fp16_to_f32(out[5]) - 0.01f) <= 1e-5f);
    free(in);
    free(out);
}

static void test_bits_and_layout(void **state)
{
    /* 8 + 32/(t*D) bits/element: one fp32 scale per head, then [t][H][D] codes. */
    kvs_ns_spec s = spec(1, 4, 128, 64, KVS_DTYPE_FP16);
    kvs_codec *c;
    assert_int_equal(kvs_codec_create(&s, KVS_KEYS, NULL, &c, NULL), 0);
    size_t bytes = kvs_codec_section_max(c, 64);
    assert_int_equal(bytes, 16 + 64 * 4 * 128);
    double bits = 8.0 * bytes / (64 * 4 * 128);
    assert_true(fabs(bits - (8.0 + 32.0 / (64 * 128))) < 1e-12);
    uint16_t in[4 * 128] = {0};
    in[128 + 3] = kvs_f32_to_fp16(-2.0f); /* head 1, channel 3: amax 2 -> scale 2/448 */
    in[128 + 4] = kvs_f32_to_fp16(1.0f);
    uint8_t enc[16 + 4 * 128];
    size_t len;
    assert_int_equal(kvs_codec_encode(c, 0, 1, in, enc, sizeof enc, &len, NULL), 0);
    assert_int_equal(len, sizeof enc);
    float sc;
    memcpy(&sc, enc + 4, 4); /* little-endian host */
    assert_true(sc == 2.0f / 448.0f);
    assert_int_equal(enc[16 + 128 + 3], 0xFE); /* -448 */
    assert_int_equal(enc[16 + 128 + 4], kvs_f32_to_fp8(1.0f / (2.0f / 448.0f)));
    assert_int_equal(enc[0] | enc[1] | enc[2] | enc[3], 0); /* zero head: scale 0 */
    assert_int_equal(kvs_codec_encode(c, 0, 1, in, enc, sizeof enc - 1, &len, NULL), KVS_ENOSPC);
    kvs_codec_destroy(c);
}

static void test_block_roundtrip(void **state)
{
    kvs_ns_spec s = spec(3, 2, 64, 32, KVS_DTYPE_BF16);
    strcpy(s.value_codec, "none");
    kvs_codec *k, *v;
    kvs_err err;
    assert_int_equal(kvs_codec_create(&s, KVS_KEYS, NULL, &k, &err), 0);
    assert_int_equal(kvs_codec_create(&s, KVS_VALUES, NULL, &v, &err), 0);
    uint32_t t = 20;
    size_t sec = (size_t)t * 2 * 64, n = 3 * 2 * sec;
    uint16_t *raw = kvs_test_gauss_data(n, 99, 3.0, KVS_DTYPE_BF16), *back = malloc(n * 2);
    size_t cap = kvs_block_encoded_max(k, v, t), len;
    uint8_t *enc = malloc(cap);
    assert_int_equal(kvs_block_encode(k, v, 1, t, raw, enc, cap, &len, &err), 0);
    assert_int_equal(kvs_block_decode(k, v, enc, len, 0, 3, back, &err), 0);
    for (uint32_t l = 0; l < 3; l++) {
        const uint16_t *K = raw + 2 * l * sec, *V = K + sec;
        assert_true(kvs_test_rel_err(K, back + 2 * l * sec, sec, KVS_DTYPE_BF16) < 0.035);
        assert_memory_equal(V, back + (2 * l + 1) * sec, sec * 2); /* none: exact */
    }
    /* one layer alone */
    assert_int_equal(kvs_block_decode(k, v, enc, len, 1, 2, back, &err), 0);
    assert_true(kvs_test_rel_err(raw + 2 * sec, back, sec, KVS_DTYPE_BF16) < 0.035);
    enc[len - 1] ^= 1;
    assert_int_equal(kvs_block_decode(k, v, enc, len, 0, 3, back, &err), KVS_EDATALOSS);
    free(raw);
    free(back);
    free(enc);
    kvs_codec_destroy(k);
    kvs_codec_destroy(v);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fp8_table),       cmocka_unit_test(test_roundtrip_shapes),
        cmocka_unit_test(test_per_head_scale),  cmocka_unit_test(test_bits_and_layout),
        cmocka_unit_test(test_block_roundtrip),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
