/* gpu/codec/spec: payload NaN/Inf detection names the element; dtype helpers. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "gpu/codec/spec.h"
#include "tests/support/kvs_test.h"

static kvs_ns_spec spec(kvs_dtype dt)
{
    return kvs_test_spec(3, 2, 16, 8, dt, "none", "none", 0);
}

/* Index of (layer, kv, token, head, channel) in [L][2][t][H][D]. */
static size_t at(const kvs_ns_spec *s, uint32_t t, uint32_t l, uint32_t kv, uint32_t tok,
                 uint32_t h, uint32_t c)
{
    return ((((size_t)l * 2 + kv) * t + tok) * s->kv_heads + h) * s->head_dim + c;
}

static void test_finite(void **state)
{
    kvs_err err;
    kvs_ns_spec s = spec(KVS_DTYPE_FP16);
    uint32_t t = 5; /* partial block */
    uint64_t bytes;
    assert_int_equal(kvs_spec_block_bytes(&s, t, &bytes, &err), 0);
    uint16_t *x = calloc(bytes / 2, 2);
    assert_non_null(x);
    for (size_t i = 0; i < bytes / 2; i++)
        x[i] = (uint16_t)(0x3C00 ^ (i & 0x83FF)); /* finite values of both signs, incl. max */
    x[7] = 0x7BFF;                                /* 65504, the largest finite fp16 */
    assert_int_equal(kvs_payload_check_finite(&s, t, x, &err), 0);

    x[at(&s, t, 2, 1, 4, 1, 15)] = 0x7E00; /* NaN in the very last element */
    assert_int_equal(kvs_payload_check_finite(&s, t, x, &err), KVS_EINVAL);
    assert_string_equal(err.msg, "payload: NaN at layer 2, V, token 4, head 1, channel 15");
    x[at(&s, t, 1, 0, 3, 0, 2)] = 0xFC00; /* an earlier -Inf is reported first */
    assert_int_equal(kvs_payload_check_finite(&s, t, x, &err), KVS_EINVAL);
    assert_string_equal(err.msg, "payload: -Inf at layer 1, K, token 3, head 0, channel 2");
    free(x);

    s = spec(KVS_DTYPE_BF16);
    assert_int_equal(kvs_spec_block_bytes(&s, 8, &bytes, &err), 0);
    x = calloc(bytes / 2, 2);
    assert_non_null(x);
    x[0] = 0x7C00; /* fp16 Inf, but a finite bf16 (2^121) */
    assert_int_equal(kvs_payload_check_finite(&s, 8, x, &err), 0);
    x[at(&s, 8, 0, 1, 0, 1, 0)] = 0x7F80; /* bf16 +Inf */
    assert_int_equal(kvs_payload_check_finite(&s, 8, x, &err), KVS_EINVAL);
    assert_string_equal(err.msg, "payload: +Inf at layer 0, V, token 0, head 1, channel 0");
    free(x);
}

static void test_dtype(void **state)
{
    assert_int_equal(kvs_dtype_parse("fp16"), KVS_DTYPE_FP16);
    assert_int_equal(kvs_dtype_parse("bf16"), KVS_DTYPE_BF16);
    assert_int_equal(kvs_dtype_parse("fp32"), KVS_DTYPE_UNSPECIFIED);
    assert_int_equal(kvs_dtype_size(KVS_DTYPE_BF16), 2);
    assert_int_equal(kvs_dtype_size(KVS_DTYPE_UNSPECIFIED), 0);
    assert_string_equal(kvs_dtype_name(KVS_DTYPE_FP16), "fp16");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_finite),
        cmocka_unit_test(test_dtype),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
