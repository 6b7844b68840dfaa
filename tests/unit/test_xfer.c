/* storage/xfer: the data path on the CPU (no engine), driven as the daemon's calls drive
 * it: Put, raw and encoded Get of host and disk blocks, with promotion on and off; the
 * bytes come back exactly, and every block is hashed once on each path (issue 11: the
 * store verifies a block when it finds or reads it, decoders do not hash it again).
 *
 * Hashes are counted by wrapping XXH3_64bits_reset, which only the block checksum
 * (gpu/codec/format.c) calls: the link wraps it for this test alone (tests/CMakeLists.txt).
 */
#define _GNU_SOURCE
#include <ftw.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#define XXH_STATIC_LINKING_ONLY
#include <xxhash.h>

#include "gpu/codec/codec.h"
#include "gpu/codec/format.h"
#include "storage/disk.h"
#include "storage/store.h"
#include "storage/xfer.h"
#include "tests/support/kvs_test.h"

/* ---------------------------------------------------------------- hash counter */

static unsigned hashes; /* blocks hashed (sealed or verified) since the last reset */

XXH_errorcode __real_XXH3_64bits_reset(XXH3_state_t *st);
XXH_errorcode __wrap_XXH3_64bits_reset(XXH3_state_t *st);
XXH_errorcode __wrap_XXH3_64bits_reset(XXH3_state_t *st)
{
    hashes++;
    return __real_XXH3_64bits_reset(st);
}

/* ---------------------------------------------------------------- fixture */

typedef struct fx {
    char dir[64];
    kvs_disk *disk;
    kvs_store *st;
    kvs_ns *ns;
    kvs_xfer *x;
} fx;

static void fx_open(fx *f, bool promote)
{
    snprintf(f->dir, sizeof f->dir, "/tmp/kvs-test-xfer-XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    kvs_err err;
    kvs_disk_opts dopts = {.nosync = true};
    if (kvs_disk_open(f->dir, 16 << 20, &dopts, &f->disk, &err))
        fail_msg("%s", err.msg);
    kvs_store_opts o = {.host_capacity = 4 << 20,
                        .disk = f->disk,
                        .disk_capacity = 16 << 20,
                        .no_promote = !promote,
                        .host_high_pct = 100,
                        .host_low_pct = 100};
    if (kvs_store_create(&o, &f->st, &err))
        fail_msg("store: %s", err.msg);
    /* KIVI: a real quantizer whose decode needs no learned state. */
    kvs_ns_spec s = kvs_test_spec(2, 2, 32, 16, KVS_DTYPE_FP16, "kivi-4", "kivi-4", 7);
    snprintf(s.name, sizeof s.name, "x");
    if (kvs_store_ns_create(f->st, &s, &f->ns, &err))
        fail_msg("namespace: %s", err.msg);
    kvs_xfer_opts xo = {.store = f->st}; /* no engine, no tiering; run NULL: inline */
    f->x = kvs_xfer_create(&xo);
}

static int rm_one(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(p);
}

static void fx_close(fx *f)
{
    kvs_xfer_destroy(f->x);
    kvs_ns_unref(f->ns);
    kvs_store_destroy(f->st);
    kvs_disk_close(f->disk);
    nftw(f->dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

/* ---------------------------------------------------------------- Put and Get */

typedef struct result {
    bool called;
    int rc;
    char msg[256];
} result;

static void put_done(void *arg, int rc, const kvs_err *err, const kvs_store_put_info *info)
{
    (void)info;
    result *r = arg;
    r->called = true;
    r->rc = rc;
    snprintf(r->msg, sizeof r->msg, "%s", rc && err ? err->msg : "");
}

static void get_done(void *arg, int rc, const kvs_err *err)
{
    result *r = arg;
    r->called = true;
    r->rc = rc;
    snprintf(r->msg, sizeof r->msg, "%s", rc && err ? err->msg : "");
}

/* Puts a block of t tokens drawn from seed under key; returns its raw payload. */
static uint16_t *put(fx *f, const char *key, uint32_t t, uint64_t seed)
{
    uint64_t bytes;
    assert_int_equal(kvs_spec_block_bytes(kvs_ns_spec_of(f->ns), t, &bytes, NULL), 0);
    uint16_t *raw = kvs_test_gauss_data(bytes / 2, seed, 1.0, KVS_DTYPE_FP16);
    result r = {0};
    kvs_xfer_put_req q = {.ns = f->ns,
                          .key = key,
                          .key_len = strlen(key),
                          .tokens = t,
                          .src = {.kind = KVS_XFER_HOST, .ptr = (uint8_t *)raw, .len = bytes},
                          .done = put_done,
                          .arg = &r};
    kvs_err err;
    if (kvs_xfer_put(f->x, &q, &err))
        fail_msg("put %s: %s", key, err.msg);
    assert_true(r.called);
    if (r.rc)
        fail_msg("put %s: %s", key, r.msg);
    return raw;
}

/* A raw Get of every layer of key into a fresh buffer (*n bytes); the tier it came from. */
static uint16_t *get_raw(fx *f, const char *key, size_t *n, kvs_store_tier *tier)
{
    kvs_xfer_get_req q = {.ns = f->ns,
                          .key = key,
                          .key_len = strlen(key),
                          .layer_begin = 0,
                          .layer_end = kvs_ns_spec_of(f->ns)->layers};
    kvs_xfer_get *g;
    kvs_err err;
    if (kvs_xfer_get_open(f->x, &q, &g, &err))
        fail_msg("get %s: %s", key, err.msg);
    *n = kvs_xfer_get_raw_bytes(g);
    uint16_t *out = malloc(*n);
    kvs_xfer_buf dst = {.kind = KVS_XFER_HOST, .ptr = (uint8_t *)out, .len = *n};
    result r = {0};
    if (kvs_xfer_get_run(g, &dst, get_done, &r, &err))
        fail_msg("get %s: %s", key, err.msg);
    assert_true(r.called);
    if (r.rc)
        fail_msg("get %s: %s", key, r.msg);
    *tier = kvs_xfer_get_tier(g);
    kvs_xfer_get_close(g);
    return out;
}

/* An encoded Get of key: the stored block, copied out (*n bytes). */
static uint8_t *get_encoded(fx *f, const char *key, size_t *n)
{
    kvs_xfer_get_req q = {.ns = f->ns, .key = key, .key_len = strlen(key), .encoded = true};
    kvs_xfer_get *g;
    kvs_err err;
    if (kvs_xfer_get_open(f->x, &q, &g, &err))
        fail_msg("get %s: %s", key, err.msg);
    result r = {0};
    if (kvs_xfer_get_run(g, NULL, get_done, &r, &err))
        fail_msg("get %s: %s", key, err.msg);
    assert_true(r.called);
    assert_int_equal(r.rc, 0);
    const uint8_t *b = kvs_xfer_get_encoded(g, n);
    uint8_t *copy = malloc(*n);
    memcpy(copy, b, *n);
    kvs_xfer_get_close(g);
    return copy;
}

/* The CPU reference: what a raw Get must return for the block encoded from raw. */
static uint16_t *reference(fx *f, const uint16_t *raw, uint32_t t)
{
    uint64_t n;
    assert_int_equal(kvs_spec_block_bytes(kvs_ns_spec_of(f->ns), t, &n, NULL), 0);
    const kvs_codec *k = kvs_ns_codec(f->ns, KVS_KEYS), *v = kvs_ns_codec(f->ns, KVS_VALUES);
    size_t cap = kvs_block_encoded_max(k, v, t), len;
    uint8_t *enc = malloc(cap);
    uint16_t *dec = malloc(n);
    kvs_err err;
    assert_int_equal(kvs_block_encode(k, v, kvs_ns_id(f->ns), t, raw, enc, cap, &len, &err), 0);
    assert_int_equal(kvs_block_decode(k, v, enc, len, 0, kvs_codec_spec(k)->layers, dec, &err), 0);
    free(enc);
    return dec;
}

/* Moves key's block to the disk tier (operator evict), as its disk record alone. */
static void to_disk(fx *f, const char *key)
{
    kvs_store_key k = {key, strlen(key)};
    kvs_store_sel sel = {.ns = f->ns, .keys = &k, .n = 1};
    kvs_store_evict_info info;
    kvs_err err;
    if (kvs_store_evict(f->st, &sel, KVS_STORE_TIER_DISK, NULL, NULL, &info, &err))
        fail_msg("evict: %s", err.msg);
    assert_int_equal(info.moved, 1);
}

/* ---------------------------------------------------------------- tests */

static void check_get(fx *f, const char *key, const uint16_t *want, kvs_store_tier want_tier)
{
    size_t n;
    kvs_store_tier tier;
    hashes = 0;
    uint16_t *got = get_raw(f, key, &n, &tier);
    assert_int_equal(tier, want_tier);
    assert_memory_equal(got, want, n);
    /* One verification on the way: by the store (find, or the disk read), not again by
     * the decoder. */
    assert_int_equal(hashes, 1);
    free(got);
}

static void test_host_block_hashed_once(void **state)
{
    (void)state;
    fx f;
    fx_open(&f, true);
    hashes = 0;
    uint16_t *raw = put(&f, "a", 16, 1);
    assert_int_equal(hashes, 1); /* sealed by the encoder; the commit does not hash again */
    uint16_t *want = reference(&f, raw, 16);
    check_get(&f, "a", want, KVS_STORE_TIER_HOST);
    check_get(&f, "a", want, KVS_STORE_TIER_HOST); /* every Get verifies: invariant 4 */

    hashes = 0;
    size_t len;
    uint8_t *enc = get_encoded(&f, "a", &len);
    assert_int_equal(hashes, 1);
    kvs_block_info info;
    assert_int_equal(kvs_format_parse(enc, len, &info, NULL), 0); /* a real sealed block */
    assert_int_equal(info.tokens, 16);
    free(enc);
    free(want);
    free(raw);
    fx_close(&f);
}

static void test_disk_block_hashed_once(void **state)
{
    (void)state;
    for (int promote = 0; promote < 2; promote++) {
        fx f;
        fx_open(&f, promote);
        uint16_t *raw = put(&f, "d", 9, 2); /* a partial block */
        uint16_t *want = reference(&f, raw, 9);
        to_disk(&f, "d");
        /* Promotion off: decoded straight from LMDB's map; on: read into the host tier,
         * where the next Get finds it (and verifies it, once, again). */
        check_get(&f, "d", want, promote ? KVS_STORE_TIER_HOST : KVS_STORE_TIER_DISK);
        check_get(&f, "d", want, promote ? KVS_STORE_TIER_HOST : KVS_STORE_TIER_DISK);
        free(want);
        free(raw);
        fx_close(&f);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_host_block_hashed_once),
        cmocka_unit_test(test_disk_block_hashed_once),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
