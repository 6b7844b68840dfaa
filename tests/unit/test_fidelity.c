/* gpu/codec/fidelity and the fallback half of the codec layer (issue 16, items 3-4): the
 * measured error of a block against its input (zero for none, the codec's own error for a
 * lossy one, the SQuat logit error from the query Gram equal to the error computed from
 * the query rows), the accumulator's histogram, and the fallback fields of a spec (checks
 * that name the field; a block's fallback sides read from its header). */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "gpu/codec/codec.h"
#include "gpu/codec/codec_squat.h"
#include "gpu/codec/fidelity.h"
#include "gpu/codec/format.h"
#include "gpu/codec/half.h"
#include "tests/support/kvs_test.h"

enum { L = 2, H = 2, D = 64, T = 16 };

/* cmocka 1.1 has no double assertions. */
#define assert_close(a, b, tol)                                                                    \
    do {                                                                                           \
        double a_ = (a), b_ = (b);                                                                 \
        if (!(fabs(a_ - b_) <= (tol)))                                                             \
            fail_msg("%s = %.17g, expected %.17g (within %g)", #a, a_, b_, (double)(tol));         \
    } while (0)

/* Encodes raw with (k, v); the caller frees the block. */
static uint8_t *encode(const kvs_codec *k, const kvs_codec *v, uint32_t t, const uint16_t *raw,
                       size_t *len)
{
    size_t cap = kvs_block_encoded_max(k, v, t);
    uint8_t *enc = malloc(cap);
    kvs_err err;
    if (kvs_block_encode(k, v, 1, t, raw, enc, cap, len, &err))
        fail_msg("encode: %s", err.msg);
    return enc;
}

static double side_err(const kvs_ns_spec *s, uint32_t t, const uint16_t *a, const uint16_t *b,
                       unsigned kv)
{
    size_t sec = (size_t)t * s->kv_heads * s->head_dim;
    double d2 = 0, r2 = 0;
    for (uint32_t l = 0; l < s->layers; l++)
        kvs_fidelity_sums(a + (2 * l + kv) * sec, b + (2 * l + kv) * sec, sec, s->dtype, &d2, &r2);
    return kvs_fidelity_ratio(d2, r2);
}

/* The measure is the relative error of each side, as a decode and a direct comparison
 * give it: exactly 0 for none, the codec's error otherwise. */
static void test_measure_matches_decode(void **state)
{
    (void)state;
    const char *codecs[] = {"none", "fp8", "kivi-2", "kivi-4", "polarquant"};
    double prev = -1;
    for (size_t c = 0; c < sizeof codecs / sizeof *codecs; c++) {
        kvs_ns_spec s = kvs_test_spec(L, H, D, T, KVS_DTYPE_FP16, codecs[c], "none", 3);
        kvs_codec *k = kvs_test_codec(&s, KVS_KEYS, NULL),
                  *v = kvs_test_codec(&s, KVS_VALUES, NULL);
        uint32_t t = 11; /* a partial block */
        uint64_t bytes;
        assert_int_equal(kvs_spec_block_bytes(&s, t, &bytes, NULL), 0);
        uint16_t *raw = kvs_test_gauss_data(bytes / 2, 5 + c, 1.0, KVS_DTYPE_FP16);
        size_t len;
        uint8_t *enc = encode(k, v, t, raw, &len);
        uint16_t *dec = malloc(bytes);
        kvs_err err;
        assert_int_equal(kvs_block_decode(k, v, enc, len, 0, L, dec, &err), 0);
        kvs_fidelity_sample m;
        if (kvs_fidelity_measure(k, v, NULL, raw, enc, len, &m, &err))
            fail_msg("%s: %s", codecs[c], err.msg);
        assert_false(m.has_logits);
        assert_close(m.err[KVS_FIDELITY_KEYS], side_err(&s, t, raw, dec, 0), 1e-12);
        assert_close(m.err[KVS_FIDELITY_VALUES], 0.0, 0.0); /* values: none */
        if (c == 0)
            assert_close(m.err[KVS_FIDELITY_KEYS], 0.0, 0.0);
        else
            assert_true(m.err[KVS_FIDELITY_KEYS] > 0 && m.err[KVS_FIDELITY_KEYS] < 1);
        /* The test helper's independent definition agrees on one layer's keys. */
        size_t sec = (size_t)t * H * D;
        double one = kvs_test_rel_err(raw, dec, sec, KVS_DTYPE_FP16);
        assert_true(fabs(one - side_err(&(kvs_ns_spec){.layers = 1,
                                                       .kv_heads = H,
                                                       .head_dim = D,
                                                       .dtype = KVS_DTYPE_FP16},
                                        t, raw, dec, 0)) < 1e-9);
        if (c == 2)
            prev = m.err[KVS_FIDELITY_KEYS];
        if (c == 3) /* kivi-4 is finer than kivi-2 on the same data class */
            assert_true(m.err[KVS_FIDELITY_KEYS] < prev);
        free(dec);
        free(enc);
        free(raw);
        kvs_codec_destroy(k);
        kvs_codec_destroy(v);
    }
}

/* A side whose input is zero: 0 when it decodes to zero, else 1; never NaN. */
static void test_zero_input(void **state)
{
    (void)state;
    assert_close(kvs_fidelity_ratio(0, 0), 0.0, 0.0);
    assert_close(kvs_fidelity_ratio(4, 0), 1.0, 0.0);
    assert_close(kvs_fidelity_ratio(1, 4), 0.5, 1e-15);
    kvs_ns_spec s = kvs_test_spec(L, H, D, T, KVS_DTYPE_BF16, "kivi-2", "fp8", 3);
    kvs_codec *k = kvs_test_codec(&s, KVS_KEYS, NULL), *v = kvs_test_codec(&s, KVS_VALUES, NULL);
    uint64_t bytes;
    assert_int_equal(kvs_spec_block_bytes(&s, T, &bytes, NULL), 0);
    uint16_t *raw = calloc(1, bytes);
    size_t len;
    uint8_t *enc = encode(k, v, T, raw, &len);
    kvs_fidelity_sample m;
    kvs_err err;
    assert_int_equal(kvs_fidelity_measure(k, v, NULL, raw, enc, len, &m, &err), 0);
    assert_close(m.err[KVS_FIDELITY_KEYS], 0.0, 0.0);
    assert_close(m.err[KVS_FIDELITY_VALUES], 0.0, 0.0);
    free(enc);
    free(raw);
    kvs_codec_destroy(k);
    kvs_codec_destroy(v);
}

/* SQuat with queries: the logit error from the Gram equals ||Q (K^-K)^T|| / ||Q K^T|| over
 * every query row and key token of each (layer, kv-head), computed from the rows. */
static void test_logit_error_from_gram(void **state)
{
    (void)state;
    enum { QH = 4, NQ = 24 };
    kvs_ns_spec s = kvs_test_spec(L, H, D, T, KVS_DTYPE_FP16, "squat-2", "none", 9);
    size_t nq = (size_t)L * NQ * QH * D;
    uint16_t *q = kvs_test_gauss_data(nq, 77, 1.0, KVS_DTYPE_FP16);
    void *st;
    size_t st_len;
    kvs_err err;
    assert_int_equal(kvs_squat_state_from_queries(&s, QH, q, NQ, &st, &st_len, &err), 0);
    kvs_codec_state cs = {1, st, st_len};
    kvs_codec *k = kvs_test_codec(&s, KVS_KEYS, &cs), *v = kvs_test_codec(&s, KVS_VALUES, NULL);
    free(st);
    uint64_t bytes;
    assert_int_equal(kvs_spec_block_bytes(&s, T, &bytes, NULL), 0);
    uint16_t *raw = kvs_test_gauss_data(bytes / 2, 78, 1.0, KVS_DTYPE_FP16);
    size_t len;
    uint8_t *enc = encode(k, v, T, raw, &len);
    uint16_t *dec = malloc(bytes);
    assert_int_equal(kvs_block_decode(k, v, enc, len, 0, L, dec, &err), 0);
    kvs_fidelity_sample m;
    assert_int_equal(kvs_fidelity_measure(k, v, k, raw, enc, len, &m, &err), 0);
    assert_true(m.has_logits);
    double num = 0, den = 0;
    for (uint32_t l = 0; l < L; l++)
        for (uint32_t qi = 0; qi < NQ; qi++)
            for (uint32_t qh = 0; qh < QH; qh++) {
                uint32_t h = qh / (QH / H);
                const uint16_t *qr = q + (((size_t)l * NQ + qi) * QH + qh) * D;
                for (uint32_t tok = 0; tok < T; tok++) {
                    size_t base = ((2 * (size_t)l) * T + tok) * H * D + (size_t)h * D;
                    double a = 0, b = 0;
                    for (uint32_t c = 0; c < D; c++) {
                        double x = kvs_fp16_to_f32(qr[c]);
                        a += x * kvs_fp16_to_f32(raw[base + c]);
                        b += x * kvs_fp16_to_f32(dec[base + c]);
                    }
                    num += (b - a) * (b - a);
                    den += a * a;
                }
            }
    double want = sqrt(num / den);
    /* The Gram is stored as fp32: agreement to a few parts in a million. */
    assert_true(fabs(m.err[KVS_FIDELITY_LOGITS] - want) < 1e-4 * want);
    assert_true(m.err[KVS_FIDELITY_LOGITS] > 0);
    /* A codec without a subspace gives no logit measure. */
    assert_int_equal(kvs_fidelity_measure(k, v, v, raw, enc, len, &m, &err), 0);
    assert_false(m.has_logits);
    free(dec);
    free(enc);
    free(raw);
    free(q);
    kvs_codec_destroy(k);
    kvs_codec_destroy(v);
}

/* Buckets are cumulative and end at the count; sum, max and the fallback counts. */
static void test_accumulator(void **state)
{
    (void)state;
    kvs_fidelity_acc a;
    memset(&a, 0, sizeof a);
    kvs_fidelity_stats st;
    kvs_fidelity_acc_read(&a, &st);
    assert_int_equal(st.h[KVS_FIDELITY_KEYS].count, 0);
    double ks[] = {0.0, 0.001, 0.0011, 0.3, 2.0};
    for (size_t i = 0; i < 5; i++) {
        kvs_fidelity_sample m = {.err = {ks[i], 0.5 * ks[i], 0}, .has_logits = i == 4};
        kvs_fidelity_acc_add(&a, &m, i >= 3, i == 4 ? KVS_FALLBACK_VALUES : 0);
    }
    kvs_fidelity_acc_read(&a, &st);
    const kvs_fidelity_hist *h = &st.h[KVS_FIDELITY_KEYS];
    assert_int_equal(h->count, 5);
    assert_close(h->sum, 2.3021, 1e-12);
    assert_close(h->max, 2.0, 0.0);
    assert_int_equal(h->buckets[0], 2); /* 0 and 0.001 are <= 0.001 */
    assert_int_equal(h->buckets[1], 3); /* 0.0011 <= 0.002 */
    assert_int_equal(h->buckets[7], 3); /* <= 0.2 */
    assert_int_equal(h->buckets[8], 4); /* 0.3 <= 0.5 */
    assert_int_equal(h->buckets[9], 4); /* <= 1 */
    assert_int_equal(h->buckets[KVS_FIDELITY_NBOUNDS], 5);
    assert_close(st.h[KVS_FIDELITY_VALUES].max, 1.0, 0.0);
    assert_int_equal(st.h[KVS_FIDELITY_LOGITS].count, 1);
    assert_int_equal(st.checked, 2);
    assert_int_equal(st.fallback, 1);
    assert_int_equal(st.fallback_sides[KVS_KEYS], 0);
    assert_int_equal(st.fallback_sides[KVS_VALUES], 1);
}

static void expect_invalid(const kvs_ns_spec *s, const char *field)
{
    kvs_err err;
    assert_int_equal(kvs_spec_validate(s, &err), KVS_EINVAL);
    if (strncmp(err.msg, field, strlen(field)) != 0)
        fail_msg("expected an error naming %s, got: %s", field, err.msg);
}

/* The fidelity fields of a spec: every refusal names its field. */
static void test_spec_fields(void **state)
{
    (void)state;
    kvs_ns_spec s = kvs_test_spec(L, H, D, T, KVS_DTYPE_FP16, "kivi-2", "kivi-2", 1);
    kvs_err err;
    assert_int_equal(kvs_spec_validate(&s, &err), 0);
    s.error_sample_set = true;
    s.error_sample = 1.5;
    expect_invalid(&s, "error_sample");
    s.error_sample = NAN;
    expect_invalid(&s, "error_sample");
    s.error_sample = 0;
    assert_int_equal(kvs_spec_validate(&s, &err), 0);
    s.max_rel_error = -0.1;
    expect_invalid(&s, "max_rel_error");
    s.max_rel_error = INFINITY;
    expect_invalid(&s, "max_rel_error");
    s.max_rel_error = 0.1;
    expect_invalid(&s, "fallback_codec"); /* a bound needs a fallback ... */
    kvs_spec_fill_defaults(&s);
    assert_string_equal(s.fallback_codec, "none"); /* ... which defaults to none */
    assert_int_equal(kvs_spec_validate(&s, &err), 0);
    strcpy(s.fallback_codec, "rotatekv-2"); /* learns state */
    expect_invalid(&s, "fallback_codec");
    strcpy(s.fallback_codec, "squat-2");
    expect_invalid(&s, "fallback_codec");
    strcpy(s.fallback_codec, "zstd");
    expect_invalid(&s, "fallback_codec");
    strcpy(s.fallback_codec, "kivi-2"); /* the namespace's own codec on both sides */
    expect_invalid(&s, "fallback_codec");
    strcpy(s.value_codec, "polarquant"); /* ... on one side only: keys can still fall back */
    assert_int_equal(kvs_spec_validate(&s, &err), 0);
    strcpy(s.fallback_codec, "fp8");
    assert_int_equal(kvs_spec_validate(&s, &err), 0);
    s.max_rel_error = 0; /* a fallback without a bound */
    expect_invalid(&s, "fallback_codec");
}

/* Which sides of a block are fallbacks, from its header alone; the fallback codec decodes
 * them, and a mixed block (keys own, values fallback) passes kvs_block_check. */
static void test_block_fallback_sides(void **state)
{
    (void)state;
    kvs_ns_spec s = kvs_test_spec(L, H, D, T, KVS_DTYPE_FP16, "kivi-2", "polarquant", 1);
    s.max_rel_error = 0.05;
    strcpy(s.fallback_codec, "fp8");
    kvs_codec *k = kvs_test_codec(&s, KVS_KEYS, NULL), *v = kvs_test_codec(&s, KVS_VALUES, NULL);
    kvs_codec *fk, *fv;
    kvs_err err;
    assert_int_equal(kvs_codec_create_enc(&s, KVS_KEYS, KVS_ENC_FALLBACK, NULL, &fk, &err), 0);
    assert_int_equal(kvs_codec_create_enc(&s, KVS_VALUES, KVS_ENC_FALLBACK, NULL, &fv, &err), 0);
    assert_int_equal(kvs_codec_id_of(fk), KVS_CODEC_FP8);
    uint64_t bytes;
    assert_int_equal(kvs_spec_block_bytes(&s, T, &bytes, NULL), 0);
    uint16_t *raw = kvs_test_gauss_data(bytes / 2, 12, 1.0, KVS_DTYPE_FP16);
    const kvs_codec *pairs[4][2] = {{k, v}, {fk, v}, {k, fv}, {fk, fv}};
    for (unsigned i = 0; i < 4; i++) {
        size_t len;
        uint8_t *enc = encode(pairs[i][0], pairs[i][1], T, raw, &len);
        kvs_block_info info;
        assert_int_equal(kvs_format_parse(enc, len, &info, &err), 0);
        assert_int_equal(kvs_block_fallback(&s, &info), i); /* bit 0 keys, bit 1 values */
        uint16_t *dec = malloc(bytes);
        assert_int_equal(kvs_block_decode(pairs[i][0], pairs[i][1], enc, len, 0, L, dec, &err), 0);
        /* ... and the namespace's own codecs refuse a block with a fallback side. */
        if (i)
            assert_int_equal(kvs_block_decode(k, v, enc, len, 0, L, dec, &err), KVS_EPROTO);
        free(dec);
        free(enc);
    }
    /* Without a fallback in the spec, no side is one. */
    kvs_ns_spec plain = s;
    plain.fallback_codec[0] = 0;
    size_t len;
    uint8_t *enc = encode(fk, fv, T, raw, &len);
    kvs_block_info info;
    assert_int_equal(kvs_format_peek(enc, len, &info, &err), 0);
    assert_int_equal(kvs_block_fallback(&plain, &info), 0);
    kvs_codec *none_c = NULL;
    assert_int_equal(kvs_codec_create_enc(&plain, KVS_KEYS, KVS_ENC_FALLBACK, NULL, &none_c, &err),
                     KVS_EINVAL);
    assert_null(none_c);
    assert_non_null(strstr(err.msg, "fallback_codec"));
    free(enc);
    free(raw);
    kvs_codec_destroy(k);
    kvs_codec_destroy(v);
    kvs_codec_destroy(fk);
    kvs_codec_destroy(fv);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_measure_matches_decode),
        cmocka_unit_test(test_zero_input),
        cmocka_unit_test(test_logit_error_from_gram),
        cmocka_unit_test(test_accumulator),
        cmocka_unit_test(test_spec_fields),
        cmocka_unit_test(test_block_fallback_sides),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
