/* gpu/codec/codec: a block's encodings (issue 16 item 5, precision demotion). The spec's
 * host_codec and disk_codec are checked naming the field; kvs_block_encodings reads each
 * side's role (own, fallback, host, disk) back from a block's header, and
 * kvs_codec_create_enc builds the codec of a role; kvs_block_transcode re-encodes a block
 * with colder codecs: a side that keeps its codec keeps its bytes, a side that changes is
 * exactly the colder codec's encoding of the decoded side, and the result decodes with the
 * role's codec alone (a RotateKV tier codec without any learned state). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "gpu/codec/codec.h"
#include "gpu/codec/format.h"
#include "tests/support/kvs_test.h"

enum { L = 3, H = 2, D = 64, T = 32 };

static kvs_ns_spec tiered(const char *own, const char *host, const char *disk)
{
    kvs_ns_spec s = kvs_test_spec(L, H, D, T, KVS_DTYPE_FP16, own, own, 5);
    snprintf(s.host_codec, sizeof s.host_codec, "%s", host);
    snprintf(s.disk_codec, sizeof s.disk_codec, "%s", disk);
    return s;
}

static uint8_t *encode(const kvs_codec *k, const kvs_codec *v, uint32_t t, const uint16_t *raw,
                       size_t *len)
{
    size_t cap = kvs_block_encoded_max(k, v, t);
    uint8_t *enc = malloc(cap);
    kvs_err err;
    if (kvs_block_encode(k, v, 9, t, raw, enc, cap, len, &err))
        fail_msg("encode: %s", err.msg);
    return enc;
}

static kvs_codec *make_enc(const kvs_ns_spec *s, kvs_kv kv, kvs_enc role)
{
    kvs_codec *c = NULL;
    kvs_err err;
    if (kvs_codec_create_enc(s, kv, role, NULL, &c, &err))
        fail_msg("create_enc: %s", err.msg);
    return c;
}

static void test_spec_tier_codecs(void **state)
{
    (void)state;
    kvs_err err;
    kvs_ns_spec s = tiered("fp8", "kivi-4", "kivi-2");
    assert_int_equal(kvs_spec_validate(&s, &err), 0);
    /* Any codec: a learned one runs without its state (RotateKV: identity order). */
    s = tiered("fp8", "", "rotatekv-2");
    assert_int_equal(kvs_spec_validate(&s, &err), 0);
    s = tiered("fp8", "squat-2", "");
    assert_int_equal(kvs_spec_validate(&s, &err), 0);
    s = tiered("fp8", "kivi-9", "");
    assert_int_equal(kvs_spec_validate(&s, &err), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "host_codec: unknown codec 'kivi-9'"));
    s = tiered("fp8", "", "nope");
    assert_int_equal(kvs_spec_validate(&s, &err), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "disk_codec: unknown codec"));
    /* Not beside a bound: a re-encoded block cannot be measured against its Put any more. */
    s = tiered("fp8", "", "kivi-2");
    s.max_rel_error = 0.1;
    strcpy(s.fallback_codec, "none");
    assert_int_equal(kvs_spec_validate(&s, &err), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "disk_codec: 'kivi-2' given with max_rel_error"));
}

/* Every role's codec in a header reads back as that role; one the spec names for no role
 * reads as own (and kvs_block_check refuses it); a role the spec lacks cannot be made. */
static void test_encodings(void **state)
{
    (void)state;
    kvs_ns_spec s = tiered("fp8", "kivi-4", "kivi-2");
    uint64_t bytes;
    assert_int_equal(kvs_spec_block_bytes(&s, T, &bytes, NULL), 0);
    uint16_t *raw = kvs_test_gauss_data(bytes / 2, 3, 1.0, KVS_DTYPE_FP16);
    static const kvs_enc roles[] = {KVS_ENC_OWN, KVS_ENC_HOST, KVS_ENC_DISK};
    for (int a = 0; a < 3; a++)
        for (int b = 0; b < 3; b++) {
            kvs_codec *k = make_enc(&s, KVS_KEYS, roles[a]);
            kvs_codec *v = make_enc(&s, KVS_VALUES, roles[b]);
            size_t len;
            uint8_t *enc = encode(k, v, T, raw, &len);
            kvs_block_info info;
            kvs_err err;
            assert_int_equal(kvs_format_parse(enc, len, &info, &err), 0);
            unsigned e = kvs_block_encodings(&s, &info);
            assert_int_equal(e, KVS_ENC_PACK(roles[a], roles[b]));
            assert_int_equal(kvs_enc_side(e, KVS_KEYS), roles[a]);
            assert_int_equal(kvs_enc_fallback(e), 0);
            assert_string_equal(kvs_spec_enc_codec(&s, KVS_VALUES, roles[b]),
                                roles[b] == KVS_ENC_OWN    ? "fp8"
                                : roles[b] == KVS_ENC_HOST ? "kivi-4"
                                                           : "kivi-2");
            free(enc);
            kvs_codec_destroy(k);
            kvs_codec_destroy(v);
        }
    /* A header naming none of the spec's codecs (polarquant): own, which the own codecs
     * refuse. */
    kvs_ns_spec p = tiered("polarquant", "", "");
    kvs_codec *pk = kvs_test_codec(&p, KVS_KEYS, NULL), *pv = kvs_test_codec(&p, KVS_VALUES, NULL);
    size_t len;
    uint8_t *enc = encode(pk, pv, T, raw, &len);
    kvs_block_info info;
    kvs_err err;
    assert_int_equal(kvs_format_parse(enc, len, &info, &err), 0);
    assert_int_equal(kvs_block_encodings(&s, &info), 0);
    kvs_codec *k = kvs_test_codec(&s, KVS_KEYS, NULL), *v = kvs_test_codec(&s, KVS_VALUES, NULL);
    assert_int_equal(kvs_block_check(k, v, &info, &err), KVS_EPROTO);
    kvs_codec_destroy(k);
    kvs_codec_destroy(v);
    free(enc);
    kvs_codec_destroy(pk);
    kvs_codec_destroy(pv);
    /* No host codec: that role cannot be made, the error names the field. */
    kvs_ns_spec q = tiered("fp8", "", "kivi-2");
    kvs_codec *none = NULL;
    assert_int_equal(kvs_codec_create_enc(&q, KVS_KEYS, KVS_ENC_HOST, NULL, &none, &err),
                     KVS_EINVAL);
    assert_null(none);
    assert_non_null(strstr(err.msg, "host_codec"));
    free(raw);
}

/* Transcoding (the CPU side of precision demotion): for each (own, colder) pair, with one
 * side kept and both changed, full and partial blocks. */
static void check_transcode(const char *own, const char *cold, bool keep_keys, uint32_t t)
{
    kvs_ns_spec s = tiered(own, "", cold);
    kvs_codec *k = kvs_test_codec(&s, KVS_KEYS, NULL), *v = kvs_test_codec(&s, KVS_VALUES, NULL);
    kvs_codec *ck = make_enc(&s, KVS_KEYS, KVS_ENC_DISK),
              *cv = make_enc(&s, KVS_VALUES, KVS_ENC_DISK);
    const kvs_codec *k2 = keep_keys ? k : ck;
    uint64_t bytes;
    assert_int_equal(kvs_spec_block_bytes(&s, t, &bytes, NULL), 0);
    uint16_t *raw = kvs_test_gauss_data(bytes / 2, 17 + t, 1.0, KVS_DTYPE_FP16);
    size_t len, len2;
    uint8_t *enc = encode(k, v, t, raw, &len);
    size_t cap = kvs_block_encoded_max(k2, cv, t);
    uint8_t *out = malloc(cap);
    kvs_err err;
    if (kvs_block_transcode(k, v, k2, cv, enc, len, out, cap, &len2, &err))
        fail_msg("%s -> %s: %s", own, cold, err.msg);
    kvs_block_info info, info2;
    assert_int_equal(kvs_format_parse(enc, len, &info, &err), 0);
    assert_int_equal(kvs_format_parse(out, len2, &info2, &err), 0); /* sealed */
    assert_int_equal(info2.ns_id, 9);
    assert_int_equal(info2.tokens, t);
    assert_int_equal(kvs_block_encodings(&s, &info2),
                     KVS_ENC_PACK(keep_keys ? KVS_ENC_OWN : KVS_ENC_DISK, KVS_ENC_DISK));
    /* The reference: each changed side is the cold codec's encoding of the decoded side. */
    uint16_t *dec = malloc(bytes), *want = malloc(bytes), *got = malloc(bytes);
    assert_int_equal(kvs_block_decode(k, v, enc, len, 0, L, dec, &err), 0);
    size_t rlen;
    uint8_t *ref = encode(ck, cv, t, dec, &rlen);
    for (uint32_t l = 0; l < L; l++)
        for (unsigned kv = 0; kv < 2; kv++) {
            const uint8_t *p, *q;
            size_t n, m;
            kvs_format_section(out, l, kv, &p, &n);
            kvs_format_section(kv == 0 && keep_keys ? enc : ref, l, kv, &q, &m);
            assert_int_equal(n, m);
            assert_memory_equal(p, q, n);
        }
    /* It decodes with the roles' codecs alone, and is no larger than what it was. */
    kvs_codec *dk = kvs_test_codec(&s, KVS_KEYS, NULL);
    kvs_codec *rk = keep_keys ? dk : make_enc(&s, KVS_KEYS, KVS_ENC_DISK);
    assert_int_equal(kvs_block_decode(rk, cv, out, len2, 0, L, got, &err), 0);
    assert_int_equal(kvs_block_decode(ck, cv, ref, rlen, 0, L, want, &err), 0);
    size_t sec = (size_t)t * H * D;
    for (uint32_t l = 0; l < L; l++) /* values: the cold codec's decode of the decode */
        assert_memory_equal(got + (2 * l + 1) * sec, want + (2 * l + 1) * sec, sec * 2);
    if (t == T) /* partial blocks: per-group overhead may make a colder codec larger */
        assert_true(len2 <= len);
    if (rk != dk)
        kvs_codec_destroy(rk);
    kvs_codec_destroy(dk);
    free(ref);
    free(dec);
    free(want);
    free(got);
    free(out);
    free(enc);
    free(raw);
    kvs_codec_destroy(k);
    kvs_codec_destroy(v);
    kvs_codec_destroy(ck);
    kvs_codec_destroy(cv);
}

static void test_transcode(void **state)
{
    (void)state;
    static const char *pairs[][2] = {{"none", "fp8"},       {"fp8", "kivi-4"},
                                     {"kivi-4", "kivi-2"},  {"none", "polarquant"},
                                     {"fp8", "rotatekv-2"}, {"rotatekv-4", "kivi-2"}};
    for (size_t i = 0; i < sizeof pairs / sizeof pairs[0]; i++)
        for (int keep = 0; keep < 2; keep++) {
            check_transcode(pairs[i][0], pairs[i][1], keep, T);
            check_transcode(pairs[i][0], pairs[i][1], keep, 7); /* a partial block */
        }
}

/* A block encoded with other codecs than the transcode's source is refused, and a too
 * small output buffer is an error, not an overflow. */
static void test_transcode_refuses(void **state)
{
    (void)state;
    kvs_ns_spec s = tiered("kivi-4", "", "kivi-2");
    kvs_codec *k = kvs_test_codec(&s, KVS_KEYS, NULL), *v = kvs_test_codec(&s, KVS_VALUES, NULL);
    kvs_codec *ck = make_enc(&s, KVS_KEYS, KVS_ENC_DISK),
              *cv = make_enc(&s, KVS_VALUES, KVS_ENC_DISK);
    uint64_t bytes;
    assert_int_equal(kvs_spec_block_bytes(&s, T, &bytes, NULL), 0);
    uint16_t *raw = kvs_test_gauss_data(bytes / 2, 4, 1.0, KVS_DTYPE_FP16);
    size_t len, len2;
    uint8_t *enc = encode(ck, cv, T, raw, &len);
    size_t cap = kvs_block_encoded_max(k, v, T);
    uint8_t *out = malloc(cap);
    kvs_err err;
    assert_int_equal(kvs_block_transcode(k, v, ck, cv, enc, len, out, cap, &len2, &err),
                     KVS_EPROTO);
    assert_int_equal(kvs_block_transcode(ck, cv, ck, cv, enc, len, out, 10, &len2, &err),
                     KVS_ENOSPC);
    free(out);
    free(enc);
    free(raw);
    kvs_codec_destroy(k);
    kvs_codec_destroy(v);
    kvs_codec_destroy(ck);
    kvs_codec_destroy(cv);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_spec_tier_codecs),
        cmocka_unit_test(test_encodings),
        cmocka_unit_test(test_transcode),
        cmocka_unit_test(test_transcode_refuses),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
