/* Chained block keys (DESIGN §1): kvs_key_chain / kvs_key_chain_seq against the documented
 * test vectors. The same vectors are checked from Python (tests/integration/test_kvctl.py),
 * so every language derives the same bytes.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kvstash.h"

static void hex_to_bytes(const char *hex, uint8_t out[KVS_CHAIN_KEY_LEN])
{
    assert_int_equal(strlen(hex), 2 * KVS_CHAIN_KEY_LEN);
    for (size_t i = 0; i < KVS_CHAIN_KEY_LEN; i++) {
        unsigned v;
        assert_int_equal(sscanf(hex + 2 * i, "%2x", &v), 1);
        out[i] = (uint8_t)v;
    }
}

static void assert_key_hex(const uint8_t *key, const char *hex)
{
    uint8_t want[KVS_CHAIN_KEY_LEN];
    hex_to_bytes(hex, want);
    if (memcmp(key, want, KVS_CHAIN_KEY_LEN) != 0) {
        char got[2 * KVS_CHAIN_KEY_LEN + 1];
        for (size_t i = 0; i < KVS_CHAIN_KEY_LEN; i++)
            snprintf(got + 2 * i, 3, "%02x", key[i]);
        fail_msg("key %s, want %s", got, hex);
    }
}

#define VEC_A "e5189a9599e3f86205ea23ef06e28b2d"
#define VEC_B "4e7b4f6b8cadfb2a1b1a20c2457494c4"
#define VEC_C "bad84e898fec8dace6ba4906880b0aa0"
#define VEC_D0 "5743eca2e6cb4ff364968042efc1ab1c"
#define VEC_D1 "167dcada5e24693142f2d30914aa1ff9"
#define VEC_D2 "c9a792cae25cff850cfce1943543bd36"
#define VEC_E "eba79aae3ad549248e53ecf0a17f8a77"

static const uint8_t zeros[KVS_CHAIN_KEY_LEN];

/* A: no tokens, prev = zeros; NULL prev means the same. */
static void test_vector_a_empty(void **state)
{
    uint8_t out[KVS_CHAIN_KEY_LEN];
    kvs_key_chain(zeros, NULL, 0, out);
    assert_key_hex(out, VEC_A);
    memset(out, 0xAA, sizeof out);
    kvs_key_chain(NULL, NULL, 0, out);
    assert_key_hex(out, VEC_A);
}

static void test_vector_b_first_block(void **state)
{
    const uint32_t toks[] = {1, 2, 3, 4};
    uint8_t out[KVS_CHAIN_KEY_LEN];
    kvs_key_chain(zeros, toks, 4, out);
    assert_key_hex(out, VEC_B);
    kvs_key_chain(NULL, toks, 4, out);
    assert_key_hex(out, VEC_B);
}

static void test_vector_c_chained(void **state)
{
    const uint32_t t1[] = {1, 2, 3, 4}, t2[] = {5, 6, 7, 8};
    uint8_t b[KVS_CHAIN_KEY_LEN], c[KVS_CHAIN_KEY_LEN];
    kvs_key_chain(NULL, t1, 4, b);
    kvs_key_chain(b, t2, 4, c);
    assert_key_hex(c, VEC_C);
}

/* D: 100..109 in blocks of 4; the helper agrees with step-by-step chaining, and the
 * last block is partial (2 tokens). */
static void test_vector_d_sequence(void **state)
{
    uint32_t toks[10];
    for (uint32_t i = 0; i < 10; i++)
        toks[i] = 100 + i;
    kvs_key keys[3];
    memset(keys, 0xEE, sizeof keys);
    size_t n = kvs_key_chain_seq(toks, 10, 4, keys, 3);
    assert_int_equal(n, 3);
    const char *want[3] = {VEC_D0, VEC_D1, VEC_D2};
    for (size_t i = 0; i < 3; i++) {
        assert_int_equal(keys[i].len, KVS_CHAIN_KEY_LEN);
        assert_key_hex(keys[i].bytes, want[i]);
    }

    /* Same keys one block at a time; the last block is partial (2 tokens). */
    uint8_t prev[KVS_CHAIN_KEY_LEN] = {0}, out[KVS_CHAIN_KEY_LEN];
    kvs_key_chain(prev, toks, 4, out);
    assert_key_hex(out, VEC_D0);
    memcpy(prev, out, sizeof prev);
    kvs_key_chain(prev, toks + 4, 4, out);
    assert_key_hex(out, VEC_D1);
    memcpy(prev, out, sizeof prev);
    kvs_key_chain(prev, toks + 8, 2, out);
    assert_key_hex(out, VEC_D2);
}

/* Every sequence of tests/data/key-vectors.txt, the vector file the Python package and
 * an independent xxhash implementation (tests/integration) check too. */
static void test_vector_file(void **state)
{
    const char *path = KVS_SOURCE_DIR "/tests/data/key-vectors.txt";
    FILE *f = fopen(path, "r");
    if (!f)
        fail_msg("cannot open %s", path);
    char line[8192];
    int checked = 0;
    while (fgets(line, sizeof line, f)) {
        if (line[0] == '#' || line[0] == '\n')
            continue;
        char *save = NULL;
        const char *bt_s = strtok_r(line, " \n", &save);
        char *toks_s = strtok_r(NULL, " \n", &save);
        char *keys_s = strtok_r(NULL, " \n", &save);
        assert_non_null(bt_s);
        assert_non_null(toks_s);
        assert_non_null(keys_s);
        uint32_t toks[512];
        size_t n = 0;
        for (char *s2 = NULL, *t = strtok_r(toks_s, ",", &s2); t; t = strtok_r(NULL, ",", &s2)) {
            assert_true(n < 512);
            toks[n++] = (uint32_t)strtoul(t, NULL, 10);
        }
        kvs_key keys[64];
        size_t need = kvs_key_chain_seq(toks, n, (uint32_t)atoi(bt_s), keys, 64);
        size_t k = 0;
        for (char *s2 = NULL, *h = strtok_r(keys_s, ",", &s2); h; h = strtok_r(NULL, ",", &s2)) {
            assert_true(k < need);
            assert_int_equal(keys[k].len, KVS_CHAIN_KEY_LEN);
            assert_key_hex(keys[k].bytes, h);
            k++;
        }
        assert_int_equal(k, need);
        checked++;
    }
    fclose(f);
    assert_true(checked >= 5);
}

/* Token ids are little-endian uint32: the top value must not be truncated or sign-extended. */
static void test_vector_e_max_token(void **state)
{
    const uint32_t toks[] = {0xFFFFFFFFu};
    uint8_t out[KVS_CHAIN_KEY_LEN];
    kvs_key_chain(zeros, toks, 1, out);
    assert_key_hex(out, VEC_E);
}

/* The return value is the number of keys the sequence needs, even when max_keys is
 * smaller; only min(needed, max_keys) entries are written. */
static void test_seq_returns_needed(void **state)
{
    uint32_t toks[10];
    for (uint32_t i = 0; i < 10; i++)
        toks[i] = 100 + i;

    assert_int_equal(kvs_key_chain_seq(toks, 10, 4, NULL, 0), 3);

    kvs_key keys[3];
    memset(keys, 0xEE, sizeof keys);
    assert_int_equal(kvs_key_chain_seq(toks, 10, 4, keys, 1), 3);
    assert_int_equal(keys[0].len, KVS_CHAIN_KEY_LEN);
    assert_key_hex(keys[0].bytes, VEC_D0);
    /* Entries past max_keys are untouched. */
    assert_int_equal(keys[1].len, 0xEE);
    assert_int_equal(keys[2].bytes[0], 0xEE);

    memset(keys, 0xEE, sizeof keys);
    assert_int_equal(kvs_key_chain_seq(toks, 10, 4, keys, 2), 3);
    assert_key_hex(keys[1].bytes, VEC_D1);
    assert_int_equal(keys[2].len, 0xEE);

    /* Exact multiples and short sequences. */
    assert_int_equal(kvs_key_chain_seq(toks, 8, 4, NULL, 0), 2);
    assert_int_equal(kvs_key_chain_seq(toks, 1, 4, NULL, 0), 1);
    assert_int_equal(kvs_key_chain_seq(toks, 0, 4, NULL, 0), 0);

    /* A larger array than needed: only the needed keys, the rest untouched. */
    kvs_key many[5];
    memset(many, 0xEE, sizeof many);
    assert_int_equal(kvs_key_chain_seq(toks, 10, 4, many, 5), 3);
    assert_key_hex(many[2].bytes, VEC_D2);
    assert_int_equal(many[3].len, 0xEE);
}

/* Same block tokens after a different prefix give a different key; swapped tokens within
 * a block and swapped blocks give different keys. */
static void test_chain_order_sensitive(void **state)
{
    const uint32_t t1[] = {1, 2, 3, 4}, t2[] = {5, 6, 7, 8}, t1r[] = {4, 3, 2, 1};
    uint8_t a[KVS_CHAIN_KEY_LEN], b[KVS_CHAIN_KEY_LEN], ab[KVS_CHAIN_KEY_LEN],
        ba[KVS_CHAIN_KEY_LEN], r[KVS_CHAIN_KEY_LEN];
    kvs_key_chain(NULL, t1, 4, a);
    kvs_key_chain(NULL, t2, 4, b);
    kvs_key_chain(a, t2, 4, ab);
    kvs_key_chain(b, t1, 4, ba);
    kvs_key_chain(NULL, t1r, 4, r);
    assert_memory_not_equal(ab, ba, KVS_CHAIN_KEY_LEN);
    assert_memory_not_equal(ab, b, KVS_CHAIN_KEY_LEN); /* prefix matters */
    assert_memory_not_equal(a, r, KVS_CHAIN_KEY_LEN);  /* order within a block matters */

    /* Block boundaries matter: [1,2,3,4][5,6,7,8] vs [1,2][3,4,5,6][7,8]. */
    const uint32_t seq[] = {1, 2, 3, 4, 5, 6, 7, 8};
    kvs_key k4[2], k2[4];
    assert_int_equal(kvs_key_chain_seq(seq, 8, 4, k4, 2), 2);
    assert_int_equal(kvs_key_chain_seq(seq, 8, 2, k2, 4), 4);
    assert_key_hex(k4[1].bytes, VEC_C);
    assert_memory_not_equal(k4[1].bytes, k2[3].bytes, KVS_CHAIN_KEY_LEN);

    /* Deterministic: same input, same bytes. */
    uint8_t again[KVS_CHAIN_KEY_LEN];
    kvs_key_chain(a, t2, 4, again);
    assert_memory_equal(again, ab, KVS_CHAIN_KEY_LEN);
}

/* Long blocks (more tokens than any internal batch), checked against Python's
 * xxhash.xxh3_128_digest(bytes(16) + struct.pack('<nI', *tokens), seed=0). */
static void test_long_blocks(void **state)
{
    uint32_t toks[600];
    uint8_t out[KVS_CHAIN_KEY_LEN];
    for (uint32_t i = 0; i < 600; i++)
        toks[i] = i;
    kvs_key_chain(NULL, toks, 600, out);
    assert_key_hex(out, "5811110aa6b8b9ec8b5d7e1fc82b8dc9");
    for (uint32_t i = 0; i < 257; i++)
        toks[i] = (uint32_t)((uint64_t)i * 2654435761u);
    kvs_key_chain(NULL, toks, 257, out);
    assert_key_hex(out, "daf5e836510c02bf2a8ce805eeca8940");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_vector_file),          cmocka_unit_test(test_vector_a_empty),
        cmocka_unit_test(test_vector_b_first_block), cmocka_unit_test(test_vector_c_chained),
        cmocka_unit_test(test_vector_d_sequence),    cmocka_unit_test(test_vector_e_max_token),
        cmocka_unit_test(test_seq_returns_needed),   cmocka_unit_test(test_chain_order_sensitive),
        cmocka_unit_test(test_long_blocks),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
