/* gpu/codec/format + block framing with the `none` codec: bit-exact round trips, layer-range
 * decode, strict parsing (every flipped byte, truncation, bad version, bad table), and
 * the codec registry. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "gpu/codec/codec.h"
#include "gpu/codec/format.h"
#include "tests/support/kvs_test.h"

static kvs_ns_spec spec(kvs_dtype dt)
{
    return kvs_test_spec(3, 2, 16, 8, dt, "none", "none", 7);
}

typedef struct fixture {
    kvs_ns_spec s;
    kvs_codec *k, *v;
    uint16_t *raw;
    size_t n;
    uint8_t *enc;
    size_t len;
} fixture;

static void make(fixture *f, kvs_dtype dt, uint32_t t)
{
    f->s = spec(dt);
    kvs_err err;
    assert_int_equal(kvs_codec_create(&f->s, KVS_KEYS, NULL, &f->k, &err), 0);
    assert_int_equal(kvs_codec_create(&f->s, KVS_VALUES, NULL, &f->v, &err), 0);
    f->n = (size_t)f->s.layers * 2 * t * f->s.kv_heads * f->s.head_dim;
    f->raw = malloc(f->n * 2);
    assert_non_null(f->raw);
    uint32_t x = 12345;
    for (size_t i = 0; i < f->n; i++) {
        x = x * 1664525u + 1013904223u;
        uint16_t h = (uint16_t)(x >> 16);
        if ((h & 0x7C00) == 0x7C00 || (dt == KVS_DTYPE_BF16 && (h & 0x7F80) == 0x7F80))
            h &= 0xBFFF; /* keep every value finite in both dtypes */
        f->raw[i] = h;
    }
    size_t cap = kvs_block_encoded_max(f->k, f->v, t);
    f->enc = malloc(cap);
    assert_non_null(f->enc);
    assert_int_equal(kvs_block_encode(f->k, f->v, 42, t, f->raw, f->enc, cap, &f->len, &err), 0);
    assert_int_equal(f->len, cap); /* none: exact size */
}

static void unmake(fixture *f)
{
    kvs_codec_destroy(f->k);
    kvs_codec_destroy(f->v);
    free(f->raw);
    free(f->enc);
}

static void test_none_roundtrip_bit_exact(void **state)
{
    kvs_dtype dts[] = {KVS_DTYPE_FP16, KVS_DTYPE_BF16};
    for (int d = 0; d < 2; d++) {
        for (uint32_t t = 1; t <= 8; t += 3) {
            fixture f;
            make(&f, dts[d], t);
            uint16_t *out = malloc(f.n * 2);
            kvs_err err;
            assert_int_equal(kvs_block_decode(f.k, f.v, f.enc, f.len, 0, 3, out, &err), 0);
            assert_memory_equal(out, f.raw, f.n * 2);
            /* One layer alone: layer 1 is K and V of that layer. */
            size_t per_layer = f.n / 3;
            assert_int_equal(kvs_block_decode(f.k, f.v, f.enc, f.len, 1, 2, out, &err), 0);
            assert_memory_equal(out, f.raw + per_layer, per_layer * 2);
            kvs_block_info info;
            assert_int_equal(kvs_format_parse(f.enc, f.len, &info, &err), 0);
            assert_int_equal(info.ns_id, 42);
            assert_int_equal(info.tokens, t);
            assert_int_equal(info.seed, 7);
            assert_int_equal(info.dtype, dts[d]);
            /* 16 bits per element plus the header and the section table. */
            assert_int_equal(f.len, kvs_format_prefix_bytes(3) + f.n * 2);
            free(out);
            unmake(&f);
        }
    }
}

static void test_every_flipped_byte_is_caught(void **state)
{
    fixture f;
    make(&f, KVS_DTYPE_FP16, 2);
    uint16_t *out = malloc(f.n * 2);
    kvs_err err;
    for (size_t i = 0; i < f.len; i++) {
        f.enc[i] ^= 0x10;
        int rc = kvs_block_decode(f.k, f.v, f.enc, f.len, 0, 3, out, &err);
        assert_true(rc == KVS_EDATALOSS || rc == KVS_EPROTO);
        f.enc[i] ^= 0x10;
    }
    assert_int_equal(kvs_block_decode(f.k, f.v, f.enc, f.len, 0, 3, out, &err), 0);
    free(out);
    unmake(&f);
}

static void test_strict_parse(void **state)
{
    fixture f;
    make(&f, KVS_DTYPE_FP16, 4);
    kvs_block_info info;
    kvs_err err;
    for (size_t cut = 0; cut < f.len; cut += 7) /* every truncation is refused */
        assert_int_equal(kvs_format_parse(f.enc, cut, &info, &err), KVS_EPROTO);

    uint8_t *b = malloc(f.len);
    memcpy(b, f.enc, f.len);
    b[4] = 2; /* version 2 */
    kvs_format_seal(b, f.len);
    assert_int_equal(kvs_format_parse(b, f.len, &info, &err), KVS_EPROTO);
    assert_non_null(strstr(err.msg, "version"));

    memcpy(b, f.enc, f.len);
    b[64] = 0xFF; /* first section offset past the end, resealed: structure check */
    b[65] = 0xFF;
    kvs_format_seal(b, f.len);
    assert_int_equal(kvs_format_parse(b, f.len, &info, &err), KVS_EPROTO);

    memcpy(b, f.enc, f.len);
    memcpy(b, "KVS2", 4);
    assert_int_equal(kvs_format_parse(b, f.len, &info, &err), KVS_EPROTO);
    assert_non_null(strstr(err.msg, "magic"));

    /* A block of another layout is refused by a decoder of this namespace. */
    kvs_ns_spec other = f.s;
    other.kv_heads = 1;
    kvs_codec *k2, *v2;
    assert_int_equal(kvs_codec_create(&other, KVS_KEYS, NULL, &k2, &err), 0);
    assert_int_equal(kvs_codec_create(&other, KVS_VALUES, NULL, &v2, &err), 0);
    uint16_t *out = malloc(f.n * 2);
    assert_int_equal(kvs_block_decode(k2, v2, f.enc, f.len, 0, 3, out, &err), KVS_EPROTO);
    assert_int_equal(kvs_block_decode(f.k, f.v, f.enc, f.len, 2, 4, out, &err), KVS_EINVAL);
    kvs_codec_destroy(k2);
    kvs_codec_destroy(v2);
    free(out);
    free(b);
    unmake(&f);
}

static void test_registry(void **state)
{
    kvs_codec_id id;
    unsigned bits;
    assert_true(kvs_codec_lookup("none", &id, &bits));
    assert_int_equal(id, KVS_CODEC_NONE);
    assert_int_equal(bits, 16);
    assert_false(kvs_codec_lookup("zip", &id, &bits));
    assert_string_equal(kvs_codec_name(KVS_CODEC_NONE, 16), "none");
    char names[160];
    assert_non_null(strstr(kvs_codec_names(names, sizeof names), "none"));
    kvs_ns_spec s = spec(KVS_DTYPE_FP16);
    strcpy(s.value_codec, "zip");
    kvs_codec *c;
    kvs_err err;
    assert_int_equal(kvs_codec_create(&s, KVS_VALUES, NULL, &c, &err), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "value_codec"));
}

static void test_nan_input_names_the_element(void **state)
{
    kvs_ns_spec s = spec(KVS_DTYPE_FP16);
    kvs_codec *c;
    kvs_err err;
    assert_int_equal(kvs_codec_create(&s, KVS_VALUES, NULL, &c, &err), 0);
    uint16_t x[2 * 2 * 16] = {0};
    x[1 * 32 + 1 * 16 + 5] = 0x7E00; /* token 1, head 1, channel 5 */
    uint8_t out[256];
    size_t len;
    assert_int_equal(kvs_codec_encode(c, 2, 2, x, out, sizeof out, &len, &err), KVS_EINVAL);
    assert_string_equal(err.msg, "payload: NaN at layer 2, V, token 1, head 1, channel 5");
    kvs_codec_destroy(c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_none_roundtrip_bit_exact),
        cmocka_unit_test(test_every_flipped_byte_is_caught),
        cmocka_unit_test(test_strict_parse),
        cmocka_unit_test(test_registry),
        cmocka_unit_test(test_nan_input_names_the_element),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
