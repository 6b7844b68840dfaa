/* gpu/codec/half.h: fp16 and bf16 conversions against the compiler's own IEEE conversions
 * (_Float16, and bf16 by truncation rules) on every fp16 input and on many fp32 inputs. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <math.h>

#include <cmocka.h>

#include "gpu/codec/half.h"

static void test_fp16_all_inputs(void **state)
{
    for (uint32_t h = 0; h < 65536; h++) {
        _Float16 r;
        uint16_t hb = (uint16_t)h;
        memcpy(&r, &hb, 2);
        float want = (float)r, got = kvs_fp16_to_f32(hb);
        if (isnan(want)) {
            assert_true(isnan(got));
            continue;
        }
        assert_int_equal(kvs_f32_bits(got), kvs_f32_bits(want));
        assert_int_equal(kvs_f32_to_fp16(got), hb); /* every fp16 survives the round trip */
    }
}

static void test_f32_to_fp16_rounding(void **state)
{
    uint64_t s = 88172645463325252ull;
    for (int i = 0; i < 2000000; i++) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        uint32_t u = (uint32_t)s;
        if (i & 1) /* half of the draws near the fp16 range, where rounding matters */
            u = (u & 0x87FFFFFFu) | 0x30000000u;
        float f = kvs_bits_f32(u);
        if (isnan(f))
            continue;
        _Float16 r = (_Float16)f;
        uint16_t want;
        memcpy(&want, &r, 2);
        assert_int_equal(kvs_f32_to_fp16(f), want);
    }
    /* Ties: 1 + 2^-11 is halfway between 1 and 1 + 2^-10 and rounds to even (1). */
    assert_int_equal(kvs_f32_to_fp16(1.0f + 0x1p-11f), 0x3C00);
    assert_int_equal(kvs_f32_to_fp16(1.0f + 3 * 0x1p-11f), 0x3C02);
    assert_int_equal(kvs_f32_to_fp16(65520.0f), 0x7C00); /* rounds past max: Inf */
    assert_int_equal(kvs_f32_to_fp16(65519.0f), 0x7BFF);
}

static void test_bf16(void **state)
{
    for (uint32_t h = 0; h < 65536; h++) {
        float f = kvs_bf16_to_f32((uint16_t)h);
        if (!isnan(f))
            assert_int_equal(kvs_f32_to_bf16(f), h);
    }
    assert_int_equal(kvs_f32_to_bf16(kvs_bits_f32(0x3F808000u)), 0x3F80); /* tie to even */
    assert_int_equal(kvs_f32_to_bf16(kvs_bits_f32(0x3F818000u)), 0x3F82);
    assert_int_equal(kvs_f32_to_bf16(kvs_bits_f32(0x3F808001u)), 0x3F81);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fp16_all_inputs),
        cmocka_unit_test(test_f32_to_fp16_rounding),
        cmocka_unit_test(test_bf16),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
