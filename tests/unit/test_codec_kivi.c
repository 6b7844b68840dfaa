/* gpu/codec/codec_kivi.c: per-channel keys / per-token values in groups of 32, the
 * half-step error bound per group, constant groups exact, LSB-first packing, exact
 * bits/element, bad lengths, block round trip, and the real sample (errors vs
 * quantizers-reference.md §6). */
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

/* fp16, seed 3 */
static kvs_ns_spec spec(uint32_t L, uint32_t H, uint32_t D, uint32_t T, const char *kc,
                        const char *vc)
{
    return kvs_test_spec(L, H, D, T, KVS_DTYPE_FP16, kc, vc, 3);
}

/* Encodes + decodes one section with codec `name`; checks determinism and bad lengths;
 * returns the encoded size. */
static size_t roundtrip(const kvs_ns_spec *s, kvs_kv kv, uint32_t t, const uint16_t *in,
                        uint16_t *out, uint8_t **enc_out)
{
    kvs_codec *c;
    kvs_err err;
    assert_int_equal(kvs_codec_create(s, kv, NULL, &c, &err), 0);
    size_t cap = kvs_codec_section_max(c, t), len = 0, len2 = 0;
    uint8_t *enc = malloc(cap + 1), *enc2 = malloc(cap);
    assert_int_equal(kvs_codec_encode(c, 0, t, in, enc, cap, &len, &err), 0);
    assert_int_equal(len, cap);
    assert_int_equal(kvs_codec_encode(c, 0, t, in, enc2, cap, &len2, &err), 0);
    assert_memory_equal(enc, enc2, len);
    assert_int_equal(kvs_codec_encode(c, 0, t, in, enc2, cap - 1, &len2, &err), KVS_ENOSPC);
    assert_int_equal(kvs_codec_decode(c, 0, t, enc, len - 1, out, &err), KVS_EPROTO);
    assert_int_equal(kvs_codec_decode(c, 0, t, enc, len + 1, out, &err), KVS_EPROTO);
    assert_int_equal(kvs_codec_decode(c, 0, t, enc, 0, out, &err), KVS_EPROTO);
    assert_int_equal(kvs_codec_decode(c, 0, t, enc, len, out, &err), 0);
    free(enc2);
    if (enc_out)
        *enc_out = enc;
    else
        free(enc);
    kvs_codec_destroy(c);
    return len;
}

/* Every element is within half a step (plus the fp16 rounding of the scale) of its
 * group's grid: keys grouped per (head, channel) over 32 tokens, values per (token,
 * head) over 32 channels. A wrong grouping breaks this bound. */
static void check_group_bound(const uint16_t *in, const uint16_t *out, uint32_t t, uint32_t H,
                              uint32_t D, unsigned bits, kvs_kv kv)
{
    double maxq = (1u << bits) - 1;
    uint32_t outer = kv == KVS_KEYS ? H * D : t * H, inner = kv == KVS_KEYS ? t : D;
    for (uint32_t o = 0; o < outer; o++)
        for (uint32_t g0 = 0; g0 < inner; g0 += 32) {
            uint32_t n = inner - g0 < 32 ? inner - g0 : 32;
            size_t idx[32];
            double mn = INFINITY, mx = -INFINITY;
            for (uint32_t i = 0; i < n; i++) {
                idx[i] = kv == KVS_KEYS ? (size_t)(g0 + i) * H * D + o : (size_t)o * D + g0 + i;
                double x = kvs_fp16_to_f32(in[idx[i]]);
                mn = fmin(mn, x);
                mx = fmax(mx, x);
            }
            double bound = (mx - mn) * (0.5 / maxq + 2e-3) + 1e-6;
            for (uint32_t i = 0; i < n; i++) {
                double e = fabs(kvs_fp16_to_f32(in[idx[i]]) - kvs_fp16_to_f32(out[idx[i]]));
                if (e > bound)
                    fail_msg("kv %d outer %u group %u elt %u: error %g > %g", kv, o, g0, i, e,
                             bound);
            }
        }
}

static void test_roundtrip_shapes(void **state)
{
    static const uint32_t dims[] = {64, 128, 256};
    static const uint32_t toks[] = {64, 40, 16, 1};
    static const char *names[] = {"kivi-2", "kivi-3", "kivi-4"};
    static const unsigned bits[] = {2, 3, 4};
    static const double bound[] = {0.55, 0.26, 0.12};
    for (unsigned bi = 0; bi < 3; bi++)
        for (unsigned di = 0; di < 3; di++)
            for (unsigned ti = 0; ti < 4; ti++)
                for (int kv = 0; kv < 2; kv++) {
                    kvs_ns_spec s = spec(1, 2, dims[di], 64, names[bi], names[bi]);
                    uint32_t t = toks[ti], D = dims[di];
                    size_t n = (size_t)t * 2 * D;
                    uint16_t *in = kvs_test_gauss_data(n, 100 + 10 * di + ti, 1.0, KVS_DTYPE_FP16),
                             *out = malloc(n * 2);
                    roundtrip(&s, (kvs_kv)kv, t, in, out, NULL);
                    check_group_bound(in, out, t, 2, D, bits[bi], (kvs_kv)kv);
                    double e = kvs_test_rel_err(in, out, n, KVS_DTYPE_FP16);
                    if (D == 128 && t == 64)
                        fprintf(stderr, "%s %s gaussian D=128 t=64: rel err %.4f\n", names[bi],
                                kv ? "V" : "K", e);
                    if (t > 1)
                        assert_true(e < bound[bi]);
                    free(in);
                    free(out);
                }
}

/* Constant groups (a key channel constant over the tokens, a value vector constant over
 * its 32 channels) store scale 0 and decode exactly. */
static void test_constant_groups(void **state)
{
    kvs_ns_spec s = spec(1, 2, 64, 64, "kivi-2", "kivi-2");
    uint32_t t = 48, H = 2, D = 64;
    size_t n = (size_t)t * H * D;
    uint16_t *k = malloc(n * 2), *v = malloc(n * 2), *out = malloc(n * 2);
    kvs_rng r;
    kvs_rng_init(&r, 1, 0, 0, 0, 0);
    for (uint32_t tok = 0; tok < t; tok++)
        for (uint32_t h = 0; h < H; h++)
            for (uint32_t j = 0; j < D; j++) {
                size_t i = ((size_t)tok * H + h) * D + j;
                k[i] = kvs_f32_to_fp16((float)(j * 0.37 - h * 5.1 + (tok >= 32 ? 0.001 : 0)));
                v[i] = kvs_f32_to_fp16((float)(tok * 0.71 - h + (j >= 32 ? 3.3 : 0)));
            }
    roundtrip(&s, KVS_KEYS, t, k, out, NULL);
    assert_memory_equal(k, out, n * 2);
    roundtrip(&s, KVS_VALUES, t, v, out, NULL);
    assert_memory_equal(v, out, n * 2);
    memset(k, 0, n * 2);
    roundtrip(&s, KVS_KEYS, t, k, out, NULL);
    assert_memory_equal(k, out, n * 2);
    free(k);
    free(v);
    free(out);
}

/* Codes are packed LSB first: codes 0,1,2,3 of a group are the byte 0b11100100. */
static void test_packing_order(void **state)
{
    kvs_ns_spec s = spec(1, 1, 16, 4, "kivi-2", "kivi-2");
    uint16_t in[4 * 16], out[4 * 16];
    for (uint32_t tok = 0; tok < 4; tok++)
        for (uint32_t j = 0; j < 16; j++)
            in[tok * 16 + j] = kvs_f32_to_fp16((float)(j == 0 ? tok : (tok + j) % 4));
    uint8_t *enc;
    /* keys: 16 channel rows of 1 byte (4 tokens x 2 bits), then 16 x (scale, lo) */
    size_t len = roundtrip(&s, KVS_KEYS, 4, in, out, &enc);
    assert_int_equal(len, 16 + 16 * 4);
    assert_int_equal(enc[0], 0xE4);  /* channel 0: codes 0,1,2,3 */
    assert_int_equal(enc[1], 0x39);  /* channel 1: 1,2,3,0 */
    assert_int_equal(enc[16], 0x00); /* channel 0 scale = fp16 1.0 = 0x3C00 */
    assert_int_equal(enc[17], 0x3C);
    assert_int_equal(enc[18] | enc[19], 0); /* lo = 0 */
    assert_memory_equal(in, out, sizeof in);
    free(enc);
    /* values: per token 16 channels x 2 bits = 4 bytes, then per token one group */
    len = roundtrip(&s, KVS_VALUES, 4, in, out, &enc);
    assert_int_equal(len, 4 * 4 + 4 * 4);
    assert_int_equal(enc[0], 0 | 1 << 2 | 2 << 4 | 3 << 6); /* token 0: codes 0,1,2,3 = 0xE4 */
    assert_memory_equal(in, out, sizeof in);
    free(enc);
    /* 4 bits: codes 0,5,10,15 -> bytes 0x50, 0xFA */
    kvs_ns_spec s4 = spec(1, 1, 16, 4, "kivi-4", "kivi-4");
    len = roundtrip(&s4, KVS_KEYS, 4, in, out, &enc);
    assert_int_equal(len, 16 * 2 + 16 * 4);
    assert_int_equal(enc[0], 0x50);
    assert_int_equal(enc[1], 0xFA);
    free(enc);
}

/* bits/element = bytes * 8 / elements: b + 32/G with G = min(32, t) tokens for keys and
 * min(32, D) channels for values (quantizers-reference.md §1). */
static void test_bits(void **state)
{
    struct {
        const char *name;
        uint32_t t, D;
        double k, v;
    } cases[] = {
        {"kivi-2", 32, 128, 3.0, 3.0},
        {"kivi-2", 64, 128, 3.0, 3.0},
        {"kivi-2", 16, 128, 4.0, 3.0},
        {"kivi-2", 32, 64, 3.0, 3.0},
        {"kivi-3", 32, 128, 4.0, 4.0},
        {"kivi-4", 32, 128, 5.0, 5.0},
        {"kivi-4", 16, 256, 6.0, 5.0},
        /* t = 40: groups of 32 + 8 tokens: 2 + 2*32/40 */
        {"kivi-2", 40, 128, 2.0 + 64.0 / 40, 3.0},
    };
    for (unsigned i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        kvs_ns_spec s = spec(1, 4, cases[i].D, 64, cases[i].name, cases[i].name);
        kvs_codec *k, *v;
        assert_int_equal(kvs_codec_create(&s, KVS_KEYS, NULL, &k, NULL), 0);
        assert_int_equal(kvs_codec_create(&s, KVS_VALUES, NULL, &v, NULL), 0);
        double elems = (double)cases[i].t * 4 * cases[i].D;
        double kb = kvs_codec_section_max(k, cases[i].t) * 8.0 / elems;
        double vb = kvs_codec_section_max(v, cases[i].t) * 8.0 / elems;
        fprintf(stderr, "%s t=%u D=%u: K %.4f V %.4f bits/elt\n", cases[i].name, cases[i].t,
                cases[i].D, kb, vb);
        assert_true(fabs(kb - cases[i].k) < 1e-12);
        assert_true(fabs(vb - cases[i].v) < 1e-12);
        kvs_codec_destroy(k);
        kvs_codec_destroy(v);
    }
}

/* bf16 input beyond the fp16 range of the group parameters is refused, not stored as
 * Inf; bf16 input inside it round-trips. */
static void test_bf16_range(void **state)
{
    kvs_ns_spec s = spec(1, 1, 16, 8, "kivi-2", "kivi-2");
    s.dtype = KVS_DTYPE_BF16;
    kvs_codec *c;
    kvs_err err;
    assert_int_equal(kvs_codec_create(&s, KVS_KEYS, NULL, &c, &err), 0);
    uint16_t in[8 * 16], out[8 * 16];
    for (int i = 0; i < 8 * 16; i++)
        in[i] = kvs_f32_to_bf16((float)(i % 7) - 3.0f);
    uint8_t enc[256];
    size_t len;
    assert_int_equal(kvs_codec_encode(c, 0, 8, in, enc, sizeof enc, &len, &err), 0);
    assert_int_equal(kvs_codec_decode(c, 0, 8, enc, len, out, &err), 0);
    in[3] = kvs_f32_to_bf16(1e6f);
    assert_int_equal(kvs_codec_encode(c, 0, 8, in, enc, sizeof enc, &len, &err), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "channel 3"));
    kvs_codec_destroy(c);
}

/* Decoding arbitrary bytes of the right length never fails or reads out of bounds. */
static void test_garbage(void **state)
{
    kvs_ns_spec s = spec(1, 3, 64, 48, "kivi-4", "kivi-2");
    for (int kv = 0; kv < 2; kv++) {
        kvs_codec *c;
        assert_int_equal(kvs_codec_create(&s, (kvs_kv)kv, NULL, &c, NULL), 0);
        for (uint32_t t = 1; t <= 48; t += 7) {
            size_t n = kvs_codec_section_max(c, t);
            uint8_t *b = malloc(n);
            kvs_rng r;
            kvs_rng_init(&r, t, 0, 0, 0, 0);
            for (size_t i = 0; i < n; i++)
                b[i] = (uint8_t)kvs_rng_next(&r);
            uint16_t *out = malloc((size_t)t * 3 * 64 * 2);
            assert_int_equal(kvs_codec_decode(c, 0, t, b, n, out, NULL), 0);
            free(b);
            free(out);
        }
        kvs_codec_destroy(c);
    }
}

static void test_block_roundtrip(void **state)
{
    kvs_ns_spec s = spec(4, 2, 128, 32, "kivi-2", "kivi-4");
    kvs_codec *k, *v;
    kvs_err err;
    assert_int_equal(kvs_codec_create(&s, KVS_KEYS, NULL, &k, &err), 0);
    assert_int_equal(kvs_codec_create(&s, KVS_VALUES, NULL, &v, &err), 0);
    for (uint32_t t = 32; t >= 1; t = t == 32 ? 7 : 0) {
        size_t sec = (size_t)t * 2 * 128, n = 4 * 2 * sec;
        uint16_t *raw = kvs_test_gauss_data(n, t, 1.0, KVS_DTYPE_FP16), *back = malloc(n * 2),
                 *one = malloc(sec * 2);
        size_t cap = kvs_block_encoded_max(k, v, t), len;
        uint8_t *enc = malloc(cap);
        assert_int_equal(kvs_block_encode(k, v, 9, t, raw, enc, cap, &len, &err), 0);
        assert_int_equal(len, cap);
        assert_int_equal(kvs_block_decode(k, v, enc, len, 0, 4, back, &err), 0);
        for (uint32_t l = 0; l < 4; l++)
            for (int kv = 0; kv < 2; kv++) {
                /* the block decodes like the codec on each section alone */
                const uint16_t *x = raw + (2 * l + kv) * sec;
                roundtrip(&s, (kvs_kv)kv, t, x, one, NULL);
                assert_memory_equal(one, back + (2 * l + kv) * sec, sec * 2);
            }
        free(raw);
        free(back);
        free(one);
        free(enc);
    }
    kvs_codec_destroy(k);
    kvs_codec_destroy(v);
}

/* ---------------------------------------------------------------- real sample */

static void test_real_sample(void **state)
{
    kvs_test_sample sm;
    if (!kvs_test_sample_load(&sm))
        fail_msg("cannot open realkv-a-64.kvs (set KVS_TEST_DATA)");
    assert_memory_equal(sm.bytes, "KVSAMPLE1\n", 10);
    const uint16_t *K = kvs_test_sample_array(&sm, "k", "[6, 64, 4, 128]");
    const uint16_t *V = kvs_test_sample_array(&sm, "v", "[6, 64, 4, 128]");
    const size_t sec = 32 * 4 * 128;
    uint16_t *out = malloc(sec * 2);
    static const char *names[] = {"kivi-2", "kivi-4"};
    for (int bi = 0; bi < 2; bi++) {
        kvs_ns_spec s = spec(6, 4, 128, 32, names[bi], names[bi]);
        double ek = 0, ev = 0;
        for (uint32_t l = 0; l < 6; l++) {
            double nk = 0, dk = 0, nv = 0, dv = 0;
            for (uint32_t blk = 0; blk < 2; blk++) {
                const uint16_t *k = K + ((size_t)l * 64 + blk * 32) * 4 * 128;
                const uint16_t *v = V + ((size_t)l * 64 + blk * 32) * 4 * 128;
                roundtrip(&s, KVS_KEYS, 32, k, out, NULL);
                for (size_t i = 0; i < sec; i++) {
                    double x = kvs_fp16_to_f32(k[i]), d = x - kvs_fp16_to_f32(out[i]);
                    nk += d * d;
                    dk += x * x;
                }
                roundtrip(&s, KVS_VALUES, 32, v, out, NULL);
                for (size_t i = 0; i < sec; i++) {
                    double x = kvs_fp16_to_f32(v[i]), d = x - kvs_fp16_to_f32(out[i]);
                    nv += d * d;
                    dv += x * x;
                }
            }
            ek += sqrt(nk / dk) / 6;
            ev += sqrt(nv / dv) / 6;
        }
        /* quantizers-reference.md §6 (512 tokens): kivi-2 K 0.256 V 0.401, kivi-4 K 0.050
         * V 0.080. This sample is its first 64 tokens. */
        fprintf(stderr, "%s real sample (64 tokens, t=32 blocks): K rel %.4f, V rel %.4f\n",
                names[bi], ek, ev);
        if (bi == 0) {
            assert_true(ek > 0.15 && ek < 0.35);
            assert_true(ev > 0.25 && ev < 0.5);
        } else {
            assert_true(ek > 0.02 && ek < 0.08);
            assert_true(ev > 0.04 && ev < 0.12);
        }
    }
    free(out);
    kvs_test_sample_free(&sm);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip_shapes), cmocka_unit_test(test_constant_groups),
        cmocka_unit_test(test_packing_order),    cmocka_unit_test(test_bits),
        cmocka_unit_test(test_bf16_range),       cmocka_unit_test(test_garbage),
        cmocka_unit_test(test_block_roundtrip),  cmocka_unit_test(test_real_sample),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
