/* Every codec against adversarial finite input (an outside tester's report: a bf16 block
 * around +-3.0e38 put into rotatekv-2 was acknowledged and came back all NaN, because the
 * fp32 rotation overflowed and the range check let NaN through).
 *
 * For each codec (keys and values both), fp16 and bf16, two layouts (D = 128 and 64),
 * whole and partial blocks, and with a learned state where the codec has one (RotateKV
 * permutation, SQuat query subspace): the values at the edge of the dtype, alternating
 * signs, one hot token or channel, values spread up to the maximum, bf16 near 3e38,
 * subnormals, zeros, and huge and tiny in one group. kvs_block_encode must either refuse
 * the block (KVS_EINVAL, with a message that names what overflowed and prints no NaN/Inf)
 * or store it so that it decodes to finite elements and passes the section safety net
 * (kvs_codec_check_section). A second test checks that the safety net itself refuses a
 * non-finite parameter planted in each codec's sections. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <cmocka.h>

#include "gpu/codec/codec.h"
#include "gpu/codec/codec_rotatekv.h"
#include "gpu/codec/codec_squat.h"
#include "gpu/codec/format.h"
#include "gpu/codec/half.h"
#include "gpu/codec/rng.h"
#include "tests/support/kvs_test.h"

typedef enum pattern {
    P_MAX,         /* every element +max of the dtype */
    P_NEG_MAX,     /* every element -max */
    P_ALT_MAX,     /* +max, -max alternating along tokens and channels */
    P_TOKEN_MAX,   /* token 2 at +max, the rest N(0, 1) */
    P_CHANNEL_MAX, /* head 1, channel 5 at +max in every token, the rest N(0, 1) */
    P_SPREAD,      /* uniform in (-max, max) */
    P_BF16_3E38,   /* bf16 only: +-3.0e38 .. 3.3e38, random signs */
    P_SUBNORMAL,   /* random non-zero subnormals of both signs */
    P_ZERO,        /* all +0 */
    P_HUGE_TINY,   /* every 4th channel +-max, the others subnormal: both in every group */
    P_COUNT
} pattern;

static const char *const pattern_name[P_COUNT] = {
    "all +max",           "all -max",         "alternating +-max",  "one token at max",
    "one channel at max", "spread up to max", "bf16 around +-3e38", "tiny subnormals",
    "all zeros",          "huge and tiny",
};

typedef struct layout {
    uint32_t H, D;
} layout;

static const layout layouts[] = {{4, 128}, {8, 64}};
static const uint32_t tokens[] = {16, 5}; /* a whole block of T = 16 and a partial one */
#define L_LAYERS 2
#define T_BLOCK 16

static uint16_t max_of(kvs_dtype dt)
{
    return dt == KVS_DTYPE_BF16 ? 0x7F7F : 0x7BFF;
}

static uint16_t exp_mask(kvs_dtype dt)
{
    return dt == KVS_DTYPE_BF16 ? 0x7F80 : 0x7C00;
}

static uint16_t from_f32(float f, kvs_dtype dt)
{
    return dt == KVS_DTYPE_BF16 ? kvs_f32_to_bf16(f) : kvs_f32_to_fp16(f);
}

static double unit(kvs_rng *r) /* [0, 1) */
{
    return (double)(kvs_rng_next(r) >> 11) / 9007199254740992.0;
}

/* One raw block [L][2][t][H][D] of pattern p. malloc'd. */
static uint16_t *make_block(pattern p, kvs_dtype dt, uint32_t t, uint32_t H, uint32_t D,
                            uint64_t seed)
{
    size_t n = (size_t)L_LAYERS * 2 * t * H * D;
    uint16_t *raw = malloc(n * sizeof *raw), mx = max_of(dt);
    uint16_t sub = dt == KVS_DTYPE_BF16 ? 0x7F : 0x3FF; /* mantissa bits */
    kvs_rng r;
    kvs_rng_init(&r, seed, 0, 0, 0, 0);
    for (size_t i = 0; i < n; i++) {
        uint32_t j = (uint32_t)(i % D), h = (uint32_t)(i / D % H), tok = (uint32_t)(i / D / H % t);
        uint16_t sign = kvs_rng_next(&r) & 1 ? 0x8000 : 0;
        uint16_t tiny = (uint16_t)(sign | (1 + kvs_rng_next(&r) % sub));
        uint16_t small = from_f32((float)kvs_test_gauss(&r), dt);
        switch (p) {
        case P_MAX:
            raw[i] = mx;
            break;
        case P_NEG_MAX:
            raw[i] = mx | 0x8000;
            break;
        case P_ALT_MAX:
            raw[i] = (tok + j) & 1 ? mx | 0x8000 : mx;
            break;
        case P_TOKEN_MAX:
            raw[i] = tok == 2 ? mx : small;
            break;
        case P_CHANNEL_MAX:
            raw[i] = h == 1 && j == 5 ? mx : small;
            break;
        case P_SPREAD: /* |u| < 1, so the rounded value stays at or below max */
            raw[i] = from_f32((float)((2 * unit(&r) - 1) * kvs_test_to_f32(mx, dt)), dt);
            break;
        case P_BF16_3E38:
            raw[i] = sign | kvs_f32_to_bf16((float)(3.0e38 * (1 + 0.1 * unit(&r))));
            break;
        case P_SUBNORMAL:
            raw[i] = tiny;
            break;
        case P_ZERO:
            raw[i] = 0;
            break;
        case P_HUGE_TINY:
            raw[i] = j % 4 == 0 ? (tok & 1 ? mx | 0x8000 : mx) : tiny;
            break;
        default:
            fail();
        }
    }
    return raw;
}

/* True if msg holds "nan" or a word "inf" (any case): a printf of a non-finite number. */
static bool prints_nonfinite(const char *msg)
{
    for (const char *p = msg; *p; p++) {
        if (strncasecmp(p, "nan", 3) == 0)
            return true;
        if (strncasecmp(p, "inf", 3) == 0 && (p == msg || !isalpha((unsigned char)p[-1])) &&
            !isalpha((unsigned char)p[3]))
            return true;
    }
    return false;
}

/* A refusal must say what overflowed and where. */
static bool names_overflow(const char *msg)
{
    return strstr(msg, "layer") &&
           (strstr(msg, "beyond") || strstr(msg, "overflow") || strstr(msg, "too large"));
}

/* Runs the safety net over every section of an encoded block. */
static int check_block(const kvs_codec *k, const kvs_codec *v, const uint8_t *enc, size_t len,
                       kvs_err *err)
{
    kvs_block_info info;
    int rc = kvs_format_parse(enc, len, &info, err);
    for (uint32_t l = 0; l < info.layers && rc == 0; l++)
        for (unsigned kv = 0; kv < 2 && rc == 0; kv++) {
            const uint8_t *p;
            size_t n;
            kvs_format_section(enc, l, kv, &p, &n);
            rc = kvs_codec_check_section(kv ? v : k, l, info.tokens, p, n, err);
        }
    return rc;
}

/* One case; returns the number of failures (printed). */
static int run_case(const kvs_codec *k, const kvs_codec *v, const char *what, pattern p, uint32_t t,
                    uint64_t seed)
{
    const kvs_ns_spec *s = kvs_codec_spec(k);
    kvs_dtype dt = s->dtype;
    uint16_t *raw = make_block(p, dt, t, s->kv_heads, s->head_dim, seed);
    size_t n = (size_t)L_LAYERS * 2 * t * s->kv_heads * s->head_dim;
    size_t cap = kvs_block_encoded_max(k, v, t), len = 0;
    uint8_t *enc = malloc(cap);
    uint16_t *dec = malloc(n * sizeof *dec);
    kvs_err err;
    kvs_err_clear(&err);
    int failures = 0;
#define CASE_FAIL(...)                                                                             \
    do {                                                                                           \
        print_message("FAIL %s, %s, D=%u, t=%u, %s: ", what, kvs_dtype_name(dt), s->head_dim, t,   \
                      pattern_name[p]);                                                            \
        print_message(__VA_ARGS__);                                                                \
        print_message("\n");                                                                       \
        failures++;                                                                                \
    } while (0)
    int rc = kvs_block_encode(k, v, 9, t, raw, enc, cap, &len, &err);
    if (rc == KVS_EINVAL) {
        if (prints_nonfinite(err.msg) || !names_overflow(err.msg))
            CASE_FAIL("refused with a message that does not name the overflow: %s", err.msg);
    } else if (rc != 0) {
        CASE_FAIL("encode returned %d: %s", rc, err.msg);
    } else {
        size_t bad = n;
        if ((rc = kvs_block_decode(k, v, enc, len, 0, L_LAYERS, dec, &err)) != 0)
            CASE_FAIL("stored, but decode returned %d: %s", rc, err.msg);
        for (size_t i = 0; i < n && rc == 0 && bad == n; i++)
            if ((dec[i] & exp_mask(dt)) == exp_mask(dt))
                bad = i;
        if (bad < n)
            CASE_FAIL("stored, but element %zu decodes to 0x%04x (not finite)", bad, dec[bad]);
        if ((rc = check_block(k, v, enc, len, &err)) != 0)
            CASE_FAIL("stored, but the safety net refuses it: %s", err.msg);
    }
#undef CASE_FAIL
    free(raw);
    free(enc);
    free(dec);
    return failures;
}

/* The learned state of the key codec: a calibrated RotateKV permutation or a SQuat query
 * subspace, from Gaussian data; NULL data (version 0) for the other codecs. *owned gets
 * the bytes to free. */
static kvs_codec_state key_state(const kvs_ns_spec *s, const char *codec, void **owned)
{
    kvs_codec_state st = {0, NULL, 0};
    size_t C = (size_t)s->kv_heads * s->head_dim;
    void *bytes = NULL;
    size_t len = 0;
    if (strncmp(codec, "rotatekv", 8) == 0) {
        uint32_t n = 32;
        uint16_t *keys = kvs_test_gauss_data((size_t)s->layers * n * C, 11, 1.0, s->dtype);
        assert_int_equal(kvs_rotatekv_calibrate(s, keys, n, &bytes, &len, NULL), 0);
        free(keys);
    } else if (strncmp(codec, "squat", 5) == 0) {
        uint32_t n = 8, qh = 2 * s->kv_heads;
        uint16_t *q =
            kvs_test_gauss_data((size_t)s->layers * n * qh * s->head_dim, 12, 1.0, s->dtype);
        assert_int_equal(kvs_squat_state_from_queries(s, qh, q, n, &bytes, &len, NULL), 0);
        free(q);
    }
    if (bytes)
        st = (kvs_codec_state){1, bytes, len};
    *owned = bytes;
    return st;
}

/* Every pattern, dtype, layout and block length for one codec name (the test's state). */
static void test_codec(void **state)
{
    const char *codec = *state;
    int failures = 0, cases = 0;
    for (int d = 0; d < 2; d++) {
        kvs_dtype dt = d ? KVS_DTYPE_BF16 : KVS_DTYPE_FP16;
        for (size_t li = 0; li < sizeof layouts / sizeof layouts[0]; li++) {
            kvs_ns_spec s =
                kvs_test_spec(L_LAYERS, layouts[li].H, layouts[li].D, T_BLOCK, dt, codec, codec, 5);
            s.keys_pre_rope = true;
            kvs_err err;
            if (kvs_spec_validate(&s, &err))
                fail_msg("spec: %s", err.msg);
            void *owned;
            kvs_codec_state st = key_state(&s, codec, &owned);
            for (int learned = 0; learned < (st.version ? 2 : 1); learned++) {
                kvs_codec *k = kvs_test_codec(&s, KVS_KEYS, learned ? &st : NULL);
                kvs_codec *v = kvs_test_codec(&s, KVS_VALUES, NULL);
                if (learned && strncmp(codec, "squat", 5) == 0)
                    assert_true(kvs_squat_subspace_heads(k) > 0);
                char what[64];
                snprintf(what, sizeof what, "%s%s", codec, learned ? " (learned state)" : "");
                for (int p = 0; p < P_COUNT; p++) {
                    if (p == P_BF16_3E38 && dt != KVS_DTYPE_BF16)
                        continue;
                    for (size_t ti = 0; ti < sizeof tokens / sizeof tokens[0]; ti++) {
                        failures += run_case(k, v, what, (pattern)p, tokens[ti],
                                             1000u * (uint64_t)p + tokens[ti]);
                        cases++;
                    }
                }
                kvs_codec_destroy(k);
                kvs_codec_destroy(v);
            }
            free(owned);
        }
    }
    if (failures)
        fail_msg("%s: %d of %d cases failed", codec, failures, cases);
}

/* ---------------------------------------------------------------- the safety net */

/* Byte offset of one floating-point field in a section of each codec, written by hand
 * from the layouts (gpu/codec/codec_<name>.c header comments), and its width (2: fp16, 4:
 * fp32, 1: an e4m3fn code). */
typedef struct planted {
    const char *codec;
    kvs_kv kv;
    size_t (*offset)(uint32_t t, uint32_t H, uint32_t D);
    unsigned width;
} planted;

static size_t fp8_scale(uint32_t t, uint32_t H, uint32_t D)
{
    (void)t, (void)D;
    return 4 * (size_t)(H - 1); /* the last head's fp32 scale */
}

static size_t fp8_code(uint32_t t, uint32_t H, uint32_t D)
{
    return 4 * (size_t)H + (size_t)t * H * D - 1; /* the last code */
}

static size_t kivi2_key_param(uint32_t t, uint32_t H, uint32_t D)
{
    /* codes [H][D] rows of t*2/8 bytes (t <= 32: one group), then {scale, lo} pairs */
    return (size_t)H * D * (t * 2 / 8) + 4 * 3 + 2; /* lo of row 3 */
}

static size_t kivi2_value_param(uint32_t t, uint32_t H, uint32_t D)
{
    return (size_t)t * H * D * 2 / 8 + 4 * 1; /* scale of the second group */
}

static size_t pq_radius(uint32_t t, uint32_t H, uint32_t D)
{
    (void)D;
    return 2 * (size_t)(t * H - 1); /* some radius: the plane holds t*H*D/16 of them */
}

static size_t rkv2_param(uint32_t t, uint32_t H, uint32_t D)
{
    /* record 1 (no sinks in Gaussian data): C*2/8 code bytes, then {scale, lo} per group */
    size_t C = (size_t)H * D, rec = C * 2 / 8 + 4 * (C / 128);
    (void)t;
    return rec + C * 2 / 8;
}

static void test_safety_net(void **state)
{
    (void)state;
    static const planted cases[] = {
        {"fp8", KVS_KEYS, fp8_scale, 4},           {"fp8", KVS_VALUES, fp8_code, 1},
        {"kivi-2", KVS_KEYS, kivi2_key_param, 2},  {"kivi-2", KVS_VALUES, kivi2_value_param, 2},
        {"squat-2", KVS_KEYS, kivi2_key_param, 2}, {"polarquant", KVS_VALUES, pq_radius, 2},
        {"rotatekv-2", KVS_KEYS, rkv2_param, 2},   {"rotatekv-2", KVS_VALUES, rkv2_param, 2},
    };
    uint32_t H = 4, D = 128, t = 16;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const planted *pc = &cases[i];
        kvs_ns_spec s = kvs_test_spec(2, H, D, T_BLOCK, KVS_DTYPE_FP16, pc->codec, pc->codec, 5);
        kvs_codec *c = kvs_test_codec(&s, pc->kv, NULL);
        size_t ne = (size_t)t * H * D, cap = kvs_codec_section_max(c, t), len;
        uint16_t *in = kvs_test_gauss_data(ne, 21, 1.0, KVS_DTYPE_FP16);
        uint8_t *sec = malloc(cap);
        kvs_err err;
        assert_int_equal(kvs_codec_encode(c, 1, t, in, sec, cap, &len, &err), 0);
        assert_int_equal(kvs_codec_check_section(c, 1, t, sec, len, &err), 0);
        size_t off = pc->offset(t, H, D);
        assert_true(off + pc->width <= len);
        /* NaN, then Inf, of the field's format */
        static const uint8_t nan4[] = {0x00, 0x00, 0xC0, 0x7F}, inf4[] = {0x00, 0x00, 0x80, 0xFF};
        static const uint8_t nan2[] = {0x00, 0x7E}, inf2[] = {0x00, 0x7C};
        static const uint8_t nan1[] = {0x7F}, nan1n[] = {0xFF};
        const uint8_t *bad[2] = {pc->width == 4   ? nan4
                                 : pc->width == 2 ? nan2
                                                  : nan1,
                                 pc->width == 4   ? inf4
                                 : pc->width == 2 ? inf2
                                                  : nan1n};
        for (int b = 0; b < 2; b++) {
            uint8_t saved[4];
            memcpy(saved, sec + off, pc->width);
            memcpy(sec + off, bad[b], pc->width);
            kvs_err_clear(&err);
            int rc = kvs_codec_check_section(c, 1, t, sec, len, &err);
            if (rc != KVS_EINVAL)
                fail_msg("%s %s: planted non-finite field at %zu accepted (rc %d)", pc->codec,
                         pc->kv == KVS_KEYS ? "K" : "V", off, rc);
            if (!strstr(err.msg, "layer 1") || !strstr(err.msg, "not finite") ||
                prints_nonfinite(err.msg))
                fail_msg("%s: message '%s'", pc->codec, err.msg);
            memcpy(sec + off, saved, pc->width);
        }
        assert_int_equal(kvs_codec_check_section(c, 1, t, sec, len, &err), 0);
        free(in);
        free(sec);
        kvs_codec_destroy(c);
    }
}

/* SQuat's query state from finite but huge bf16 queries: the Gram overflows fp32, which
 * is refused when the state is built; a state that holds an Inf anyway (built from
 * Grams) is refused when the codec is created, so no compensation can turn keys NaN. */
static void test_squat_huge_queries(void **state)
{
    (void)state;
    kvs_ns_spec s = kvs_test_spec(2, 4, 64, T_BLOCK, KVS_DTYPE_BF16, "squat-2", "squat-2", 5);
    uint32_t n = 4, qh = 8;
    size_t dd = (size_t)s.head_dim * s.head_dim;
    /* [L][2][n][qh][D] elements: twice the [L][n][qh][D] queries needed */
    uint16_t *q = make_block(P_BF16_3E38, KVS_DTYPE_BF16, n, qh, s.head_dim, 31);
    void *bytes = NULL;
    size_t len;
    kvs_err err;
    assert_int_equal(kvs_squat_state_from_queries(&s, qh, q, n, &bytes, &len, &err), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "overflows"));
    assert_false(prints_nonfinite(err.msg));
    float *gram = calloc((size_t)s.layers * s.kv_heads * dd, sizeof *gram);
    uint64_t rows[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    for (size_t i = 0; i < (size_t)s.layers * s.kv_heads * dd; i += s.head_dim + 1)
        gram[i] = 1.0f; /* identity Grams */
    gram[5 * dd + 3] = gram[5 * dd + 3 * s.head_dim] = INFINITY;
    assert_int_equal(kvs_squat_state_from_grams(&s, gram, rows, &bytes, &len, NULL), 0);
    kvs_codec_state st = {1, bytes, len};
    kvs_codec *k = NULL;
    assert_int_equal(kvs_codec_create(&s, KVS_KEYS, &st, &k, &err), KVS_EINVAL);
    assert_false(prints_nonfinite(err.msg));
    free(bytes);
    free(gram);
    free(q);
}

/* The input check every Put's payload passes (NaN and Inf refused, naming the element),
 * for every 16-bit pattern in every lane of the 64-bit words it reads four at a time, in K
 * and in V, fp16 and bf16: refused exactly when the exponent is all ones, and the message
 * names the planted element. */
static void test_nonfinite_every_pattern_every_lane(void **state)
{
    (void)state;
    for (int bf = 0; bf < 2; bf++) {
        kvs_dtype dt = bf ? KVS_DTYPE_BF16 : KVS_DTYPE_FP16;
        uint16_t mask = bf ? 0x7F80 : 0x7C00;
        kvs_ns_spec s = kvs_test_spec(1, 1, 16, 1, dt, "none", "none", 1);
        kvs_codec *k = kvs_test_codec(&s, KVS_KEYS, NULL),
                  *v = kvs_test_codec(&s, KVS_VALUES, NULL);
        size_t cap = kvs_block_encoded_max(k, v, 1), len;
        uint8_t *enc = malloc(cap);
        uint16_t x[32];
        kvs_err err;
        static const unsigned pos[] = {0, 5, 10, 15, 16 + 3, 16 + 12};
        for (uint32_t p = 0; p < sizeof pos / sizeof *pos; p++)
            for (uint32_t val = 0; val < 0x10000; val++) {
                memset(x, 0, sizeof x);
                x[pos[p]] = (uint16_t)val;
                int rc = kvs_block_encode(k, v, 1, 1, x, enc, cap, &len, &err);
                bool bad = (val & mask) == mask;
                if (rc != (bad ? KVS_EINVAL : 0))
                    fail_msg("%s 0x%04x at element %u: rc %d (%s)", bf ? "bf16" : "fp16", val,
                             pos[p], rc, rc ? err.msg : "");
                if (bad) {
                    char want[64];
                    snprintf(want, sizeof want, "%s, token 0, head 0, channel %u",
                             pos[p] < 16 ? "K" : "V", pos[p] % 16);
                    if (!strstr(err.msg, want))
                        fail_msg("0x%04x at %u: '%s' does not name it", val, pos[p], err.msg);
                }
            }
        free(enc);
        kvs_codec_destroy(k);
        kvs_codec_destroy(v);
    }
}

/* One test per codec name (cmocka passes the name as the test's state). */
#define CODEC_TEST(name)                                                                           \
    {                                                                                              \
        name, test_codec, NULL, NULL, (void *)(uintptr_t)(name)                                    \
    }

int main(void)
{
    const struct CMUnitTest tests[] = {
        CODEC_TEST("none"),
        CODEC_TEST("fp8"),
        CODEC_TEST("kivi-2"),
        CODEC_TEST("kivi-3"),
        CODEC_TEST("kivi-4"),
        CODEC_TEST("polarquant"),
        CODEC_TEST("rotatekv-2"),
        CODEC_TEST("rotatekv-3"),
        CODEC_TEST("rotatekv-4"),
        CODEC_TEST("squat-2"),
        CODEC_TEST("squat-4"),
        cmocka_unit_test(test_safety_net),
        cmocka_unit_test(test_squat_huge_queries),
        cmocka_unit_test(test_nonfinite_every_pattern_every_lane),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
