/* storage/xfer: the data path on the CPU (no engine), driven as the daemon's calls drive
 * it: Put, raw and encoded Get of host and disk blocks, with promotion on and off; the
 * bytes come back exactly, and every block is hashed once on each path (issue 11: the
 * store verifies a block when it finds or reads it, decoders do not hash it again).
 *
 * Hashes are counted by wrapping XXH3_64bits_reset, which only the block checksum
 * (gpu/codec/format.c) calls: the link wraps it for this test alone (tests/CMakeLists.txt).
 */
#define _GNU_SOURCE
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
#include "gpu/codec/fidelity.h"
#include "gpu/codec/format.h"
#include "gpu/codec/half.h"
#include "storage/disk.h"
#include "storage/store.h"
#include "storage/xfer.h"
#include "tests/support/kvs_test.h"
#include "tests/support/kvs_test_xfer.h"

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

static void fx_close(fx *f)
{
    kvs_xfer_destroy(f->x);
    kvs_ns_unref(f->ns);
    kvs_store_destroy(f->st);
    kvs_disk_close(f->disk);
    kvs_test_rmtree(f->dir);
}

/* ---------------------------------------------------------------- Put and Get */

/* Puts a block of t tokens drawn from seed under key; returns its raw payload. */
static uint16_t *put(fx *f, const char *key, uint32_t t, uint64_t seed)
{
    uint64_t bytes;
    assert_int_equal(kvs_spec_block_bytes(kvs_ns_spec_of(f->ns), t, &bytes, NULL), 0);
    uint16_t *raw = kvs_test_gauss_data(bytes / 2, seed, 1.0, KVS_DTYPE_FP16);
    kvs_test_put(f->x, f->ns, key, t, raw);
    return raw;
}

static uint16_t *get_ns(fx *f, kvs_ns *ns, const char *key, size_t *n, unsigned *fallback,
                        kvs_store_tier *tier);

/* A raw Get of every layer of key into a fresh buffer (*n bytes); the tier it came from. */
static uint16_t *get_raw(fx *f, const char *key, size_t *n, kvs_store_tier *tier)
{
    return get_ns(f, f->ns, key, n, NULL, tier);
}

/* An encoded Get of key: the stored block, copied out (*n bytes). */
static uint8_t *get_encoded(fx *f, const char *key, size_t *n)
{
    return kvs_test_get_encoded(f->x, f->ns, key, n);
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

/* ---------------------------------------------------------------- fidelity (issue 16) */

/* A namespace of the fixture's store: kivi-2 on both sides, shape as "x". */
/* An encoded Get into the caller's buffer (kvs_xfer_get_run with a host dst: a region
 * slot's case): the stored bytes land there, from the host tier and from a disk record,
 * and kvs_xfer_get_encoded names dst; a buffer a byte short is KVS_ENOSPC in done, with
 * nothing written past it; GPU memory or a paged destination is refused at run. */
static void encoded_into(fx *f, const char *key, const uint8_t *want, size_t len)
{
    kvs_xfer_get_req q = {.ns = f->ns, .key = key, .key_len = strlen(key), .encoded = true};
    uint8_t *buf = malloc(len + 16);
    const size_t caps[] = {len + 16, len, len - 1};
    for (size_t c = 0; c < 3; c++) {
        size_t cap = caps[c];
        memset(buf, 0xA5, len + 16);
        kvs_xfer_get *g;
        kvs_err err;
        assert_int_equal(kvs_xfer_get_open(f->x, &q, &g, &err), 0);
        kvs_xfer_buf dst = {.kind = KVS_XFER_HOST, .ptr = buf, .len = cap};
        kvs_test_result r = {0};
        assert_int_equal(kvs_xfer_get_run(g, &dst, kvs_test_get_done, &r, &err), 0);
        assert_true(r.called);
        if (cap < len) {
            assert_int_equal(r.rc, KVS_ENOSPC);
            assert_non_null(strstr(r.msg, "do not fit"));
            assert_int_equal(buf[cap], 0xA5);
        } else {
            size_t n;
            assert_int_equal(r.rc, 0);
            assert_ptr_equal(kvs_xfer_get_encoded(g, &n), buf);
            assert_int_equal(n, len);
            assert_memory_equal(buf, want, len);
            assert_int_equal(buf[len], 0xA5);
        }
        kvs_xfer_get_close(g);
    }
    kvs_xfer_get *g;
    kvs_err err;
    assert_int_equal(kvs_xfer_get_open(f->x, &q, &g, &err), 0);
    kvs_xfer_buf dev = {.kind = KVS_XFER_DEVICE, .ptr = buf, .len = len};
    kvs_test_result r = {0};
    assert_int_equal(kvs_xfer_get_run(g, &dev, kvs_test_get_done, &r, &err), KVS_EINVAL);
    assert_false(r.called);
    kvs_xfer_get_close(g);
    free(buf);
}

static void test_encoded_into_a_buffer(void **state)
{
    (void)state;
    for (int promote = 0; promote < 2; promote++) {
        fx f;
        fx_open(&f, promote);
        uint16_t *raw = put(&f, "e", 16, 3);
        size_t len;
        uint8_t *enc = get_encoded(&f, "e", &len);
        encoded_into(&f, "e", enc, len);
        to_disk(&f, "e");
        encoded_into(&f, "e", enc, len);
        free(enc);
        free(raw);
        fx_close(&f);
    }
}

static kvs_ns *ns_with(fx *f, const char *name, double sample, bool sample_set, double bound,
                       const char *fallback)
{
    kvs_ns_spec s = kvs_test_spec(2, 2, 32, 16, KVS_DTYPE_FP16, "kivi-2", "kivi-2", 7);
    snprintf(s.name, sizeof s.name, "%s", name);
    s.error_sample_set = sample_set;
    s.error_sample = sample;
    s.max_rel_error = bound;
    snprintf(s.fallback_codec, sizeof s.fallback_codec, "%s", fallback);
    kvs_ns *ns;
    kvs_err err;
    if (kvs_store_ns_create(f->st, &s, &ns, &err))
        fail_msg("namespace %s: %s", name, err.msg);
    return ns;
}

/* Puts raw (t tokens) into ns under key. */
static void put_raw(fx *f, kvs_ns *ns, const char *key, uint32_t t, uint16_t *raw)
{
    kvs_test_put(f->x, ns, key, t, raw);
}

/* A raw Get of every layer of key in ns into a fresh buffer (*n bytes); the fallback sides
 * the data path reports and the tier the block came from (each may be NULL). */
static uint16_t *get_ns(fx *f, kvs_ns *ns, const char *key, size_t *n, unsigned *fallback,
                        kvs_store_tier *tier)
{
    unsigned enc;
    uint16_t *out = kvs_test_get_raw(f->x, ns, key, n, &enc, tier);
    if (fallback)
        *fallback = kvs_enc_fallback(enc);
    return out;
}

static unsigned lookup_fallback(fx *f, kvs_ns *ns, const char *key)
{
    kvs_store_key k = {key, strlen(key)};
    kvs_store_tier t;
    uint8_t enc = 0xFF;
    kvs_store_lookup(f->st, ns, &k, 1, &t, NULL, &enc);
    assert_int_not_equal(t, KVS_STORE_TIER_NONE);
    return kvs_enc_fallback(enc);
}

static kvs_fidelity_stats fidelity_of(kvs_ns *ns)
{
    kvs_fidelity_stats st;
    kvs_fidelity_acc_read(kvs_ns_fidelity(ns), &st);
    return st;
}

/* A bound no 2-bit block meets, fallback none: the block is stored as it came (a raw Get
 * returns the input byte for byte), its header names none for both sides, Lookup and Get
 * say fallback, the namespace counts it; and all of it holds for the disk record, with
 * promotion off and on, and after the store is opened again on the same disk. */
static void test_bound_forces_fallback(void **state)
{
    (void)state;
    fx f;
    fx_open(&f, false);
    kvs_ns *ns = ns_with(&f, "tight", 0, false, 1e-4, "none");
    uint64_t bytes;
    assert_int_equal(kvs_spec_block_bytes(kvs_ns_spec_of(ns), 16, &bytes, NULL), 0);
    uint16_t *raw = kvs_test_gauss_data(bytes / 2, 41, 1.0, KVS_DTYPE_FP16);
    put_raw(&f, ns, "b", 16, raw);
    kvs_fidelity_stats st = fidelity_of(ns);
    assert_int_equal(st.checked, 1);
    assert_int_equal(st.fallback, 1);
    assert_int_equal(st.fallback_sides[KVS_KEYS], 1);
    assert_int_equal(st.fallback_sides[KVS_VALUES], 1);
    assert_int_equal(st.h[KVS_FIDELITY_KEYS].count, 1);
    assert_true(st.h[KVS_FIDELITY_KEYS].max == 0); /* measured as stored: none */
    assert_int_equal(lookup_fallback(&f, ns, "b"), KVS_FALLBACK_KEYS | KVS_FALLBACK_VALUES);

    size_t n;
    unsigned fb;
    uint16_t *got = get_ns(&f, ns, "b", &n, &fb, NULL);
    assert_int_equal(n, bytes);
    assert_memory_equal(got, raw, bytes);
    assert_int_equal(fb, 3);
    free(got);

    /* The encoded block's header names the fallback codec of each side. */
    kvs_xfer_get_req q = {.ns = ns, .key = "b", .key_len = 1, .encoded = true};
    kvs_xfer_get *g;
    kvs_err err;
    assert_int_equal(kvs_xfer_get_open(f.x, &q, &g, &err), 0);
    kvs_test_result r = {0};
    assert_int_equal(kvs_xfer_get_run(g, NULL, kvs_test_get_done, &r, &err), 0);
    size_t len;
    const uint8_t *enc = kvs_xfer_get_encoded(g, &len);
    kvs_block_info info;
    assert_int_equal(kvs_format_parse(enc, len, &info, &err), 0);
    assert_int_equal(info.k_codec, KVS_CODEC_NONE);
    assert_int_equal(info.v_codec, KVS_CODEC_NONE);
    kvs_xfer_get_close(g);

    /* On disk: decoded straight from LMDB's map (promotion off). */
    kvs_store_key k = {"b", 1};
    kvs_store_sel sel = {.ns = ns, .keys = &k, .n = 1};
    kvs_store_evict_info ei;
    assert_int_equal(kvs_store_evict(f.st, &sel, KVS_STORE_TIER_DISK, NULL, NULL, &ei, &err), 0);
    assert_int_equal(ei.moved, 1);
    assert_int_equal(lookup_fallback(&f, ns, "b"), 3);
    got = get_ns(&f, ns, "b", &n, &fb, NULL);
    assert_memory_equal(got, raw, bytes);
    assert_int_equal(fb, 3);
    free(got);

    /* A new store on the same disk: the namespace comes back with its bound, the disk
     * record's fallback sides from its header, and it decodes. */
    kvs_ns_unref(ns);
    kvs_xfer_destroy(f.x);
    kvs_ns_unref(f.ns);
    kvs_store_destroy(f.st);
    kvs_store_opts o = {.host_capacity = 4 << 20,
                        .disk = f.disk,
                        .disk_capacity = 16 << 20,
                        .host_high_pct = 100,
                        .host_low_pct = 100};
    if (kvs_store_create(&o, &f.st, &err))
        fail_msg("store: %s", err.msg);
    assert_int_equal(kvs_store_ns_find(f.st, "x", &f.ns, &err), 0);
    assert_int_equal(kvs_store_ns_find(f.st, "tight", &ns, &err), 0);
    assert_true(kvs_ns_spec_of(ns)->max_rel_error == 1e-4);
    assert_string_equal(kvs_ns_spec_of(ns)->fallback_codec, "none");
    assert_false(kvs_ns_spec_of(ns)->error_sample_set);
    kvs_xfer_opts xo = {.store = f.st};
    f.x = kvs_xfer_create(&xo);
    assert_int_equal(lookup_fallback(&f, ns, "b"), 3);
    got = get_ns(&f, ns, "b", &n, &fb, NULL); /* promotion on: read into the host tier */
    assert_memory_equal(got, raw, bytes);
    assert_int_equal(fb, 3);
    free(got);
    got = get_ns(&f, ns, "b", &n, &fb, NULL); /* ... the host copy keeps its sides */
    assert_memory_equal(got, raw, bytes);
    assert_int_equal(fb, 3);
    assert_int_equal(lookup_fallback(&f, ns, "b"), 3);
    free(got);
    free(raw);
    kvs_ns_unref(ns);
    fx_close(&f);
}

/* A generous bound: checked, never a fallback; the block is the kivi-2 encoding. */
static void test_bound_holds(void **state)
{
    (void)state;
    fx f;
    fx_open(&f, false);
    kvs_ns *ns = ns_with(&f, "loose", 0, false, 0.9, "fp8");
    uint64_t bytes;
    assert_int_equal(kvs_spec_block_bytes(kvs_ns_spec_of(ns), 16, &bytes, NULL), 0);
    uint16_t *raw = kvs_test_gauss_data(bytes / 2, 42, 1.0, KVS_DTYPE_FP16);
    put_raw(&f, ns, "b", 16, raw);
    kvs_fidelity_stats st = fidelity_of(ns);
    assert_int_equal(st.checked, 1);
    assert_int_equal(st.fallback, 0);
    assert_true(st.h[KVS_FIDELITY_KEYS].max > 0.05); /* kivi-2's error, measured */
    assert_int_equal(lookup_fallback(&f, ns, "b"), 0);
    free(raw);
    kvs_ns_unref(ns);
    fx_close(&f);
}

/* An adversarial block -- one outlier channel (15 sigma) in every token, which stretches
 * each per-token 2-bit value group so that the other channels lose their levels (value
 * error 0.66 against 0.38 for Gaussian data, measured) -- passes a bound of 0.5 that smooth
 * blocks meet: only its values fall back (fp8); its keys (per-channel groups, where a
 * constant outlier is harmless: error 0.11) stay kivi-2. A much larger outlier would dominate
 * the norm and lower the relative error again: the bound measures what it says. */
static void test_outliers_fall_back(void **state)
{
    (void)state;
    fx f;
    fx_open(&f, false);
    kvs_ns *ns = ns_with(&f, "mid", 0, false, 0.5, "fp8");
    const kvs_ns_spec *s = kvs_ns_spec_of(ns);
    uint64_t bytes;
    assert_int_equal(kvs_spec_block_bytes(s, 16, &bytes, NULL), 0);
    for (int i = 0; i < 4; i++) {
        char key[8];
        snprintf(key, sizeof key, "s%d", i);
        uint16_t *raw = kvs_test_gauss_data(bytes / 2, 50 + i, 1.0, KVS_DTYPE_FP16);
        put_raw(&f, ns, key, 16, raw);
        assert_int_equal(lookup_fallback(&f, ns, key), 0);
        free(raw);
    }
    uint16_t *raw = kvs_test_gauss_data(bytes / 2, 60, 1.0, KVS_DTYPE_FP16);
    size_t sec = (size_t)16 * s->kv_heads * s->head_dim;
    for (uint32_t l = 0; l < s->layers; l++)
        for (size_t tok = 0; tok < 16; tok++)
            for (uint32_t h = 0; h < s->kv_heads; h++)
                for (uint32_t kv = 0; kv < 2; kv++)
                    raw[(2 * l + kv) * sec + (tok * s->kv_heads + h) * s->head_dim + 5] =
                        kvs_f32_to_fp16(15.0f);
    put_raw(&f, ns, "adv", 16, raw);
    assert_int_equal(lookup_fallback(&f, ns, "adv"), KVS_FALLBACK_VALUES);
    kvs_fidelity_stats st = fidelity_of(ns);
    assert_int_equal(st.checked, 5);
    assert_int_equal(st.fallback, 1);
    assert_int_equal(st.fallback_sides[KVS_KEYS], 0);
    assert_int_equal(st.fallback_sides[KVS_VALUES], 1);
    /* The mixed block decodes: keys as kivi-2, values as fp8. */
    size_t n;
    unsigned fb;
    uint16_t *got = get_ns(&f, ns, "adv", &n, &fb, NULL);
    assert_int_equal(fb, KVS_FALLBACK_VALUES);
    double dv = 0, rv = 0;
    for (uint32_t l = 0; l < s->layers; l++)
        kvs_fidelity_sums(raw + (2 * l + 1) * sec, got + (2 * l + 1) * sec, sec, KVS_DTYPE_FP16,
                          &dv, &rv);
    assert_true(kvs_fidelity_ratio(dv, rv) < 0.1); /* fp8's error, far below the bound */
    free(got);
    free(raw);
    kvs_ns_unref(ns);
    fx_close(&f);
}

/* A fallback block that finds no room -- here a host quota of one raw block, which a
 * `none` fallback (raw size plus its header) cannot fit -- fails the Put with KVS_ENOSPC
 * naming max_rel_error (RESOURCE_EXHAUSTED on the wire), not as an encoder's failure, and
 * leaves nothing stored. */
static void test_fallback_without_room(void **state)
{
    (void)state;
    fx f;
    fx_open(&f, false);
    kvs_ns_spec s = kvs_test_spec(2, 2, 32, 16, KVS_DTYPE_FP16, "kivi-2", "kivi-2", 7);
    snprintf(s.name, sizeof s.name, "quota");
    s.max_rel_error = 1e-4;
    snprintf(s.fallback_codec, sizeof s.fallback_codec, "none");
    uint64_t bytes;
    assert_int_equal(kvs_spec_block_bytes(&s, 16, &bytes, NULL), 0);
    s.host_quota = bytes;
    kvs_ns *ns;
    kvs_err err;
    if (kvs_store_ns_create(f.st, &s, &ns, &err))
        fail_msg("namespace: %s", err.msg);
    uint16_t *raw = kvs_test_gauss_data(bytes / 2, 45, 1.0, KVS_DTYPE_FP16);
    kvs_test_result r = {0};
    kvs_xfer_put_req q = {.ns = ns,
                          .key = "q",
                          .key_len = 1,
                          .tokens = 16,
                          .src = {.kind = KVS_XFER_HOST, .ptr = (uint8_t *)raw, .len = bytes},
                          .done = kvs_test_put_done,
                          .arg = &r};
    assert_int_equal(kvs_xfer_put(f.x, &q, &err), 0);
    assert_true(r.called);
    assert_int_equal(r.rc, KVS_ENOSPC);
    assert_non_null(strstr(r.msg, "max_rel_error"));
    kvs_store_key k = {"q", 1};
    kvs_store_tier t;
    kvs_store_lookup(f.st, ns, &k, 1, &t, NULL, NULL);
    assert_int_equal(t, KVS_STORE_TIER_NONE);
    free(raw);
    kvs_ns_unref(ns);
    fx_close(&f);
}

/* Sampling: a share of 1 measures every Put, 0 none; unset follows the data path's
 * default, which a reload changes. No measured block is a fallback without a bound. */
static void test_sampling(void **state)
{
    (void)state;
    fx f;
    fx_open(&f, false);
    kvs_ns *all = ns_with(&f, "all", 1.0, true, 0, "");
    kvs_ns *off = ns_with(&f, "off", 0.0, true, 0, "");
    kvs_ns *dflt = ns_with(&f, "dflt", 0, false, 0, "");
    uint64_t bytes;
    assert_int_equal(kvs_spec_block_bytes(kvs_ns_spec_of(all), 16, &bytes, NULL), 0);
    uint16_t *raw = kvs_test_gauss_data(bytes / 2, 43, 1.0, KVS_DTYPE_FP16);
    for (int i = 0; i < 5; i++) {
        char key[8];
        snprintf(key, sizeof key, "k%d", i);
        put_raw(&f, all, key, 16, raw);
        put_raw(&f, off, key, 16, raw);
        put_raw(&f, dflt, key, 16, raw); /* default 0 (xo.error_sample unset) */
    }
    kvs_xfer_set_error_sample(f.x, 1.0);
    put_raw(&f, dflt, "late", 16, raw);
    assert_true(kvs_xfer_error_sample(f.x, kvs_ns_spec_of(dflt)) == 1.0);
    assert_true(kvs_xfer_error_sample(f.x, kvs_ns_spec_of(off)) == 0.0);
    kvs_fidelity_stats a = fidelity_of(all), o = fidelity_of(off), d = fidelity_of(dflt);
    assert_int_equal(a.h[KVS_FIDELITY_KEYS].count, 5);
    assert_int_equal(a.h[KVS_FIDELITY_VALUES].count, 5);
    assert_int_equal(a.checked, 0);
    assert_int_equal(a.fallback, 0);
    assert_true(a.h[KVS_FIDELITY_KEYS].sum > 5 * 0.05);
    assert_int_equal(o.h[KVS_FIDELITY_KEYS].count, 0);
    assert_int_equal(d.h[KVS_FIDELITY_KEYS].count, 1);
    /* A share of 0.3 measures about that share (2000 draws: within 5 sigma). */
    kvs_xfer_set_error_sample(f.x, 0.3);
    kvs_ns_spec tiny = kvs_test_spec(1, 1, 16, 1, KVS_DTYPE_FP16, "kivi-4", "kivi-4", 1);
    snprintf(tiny.name, sizeof tiny.name, "tiny");
    kvs_ns *t;
    kvs_err err;
    assert_int_equal(kvs_store_ns_create(f.st, &tiny, &t, &err), 0);
    uint64_t tb;
    assert_int_equal(kvs_spec_block_bytes(&tiny, 1, &tb, NULL), 0);
    uint16_t *traw = kvs_test_gauss_data(tb / 2, 44, 1.0, KVS_DTYPE_FP16);
    for (int i = 0; i < 2000; i++) {
        char key[8];
        snprintf(key, sizeof key, "%d", i % 50);
        put_raw(&f, t, key, 1, traw);
    }
    uint64_t c = fidelity_of(t).h[KVS_FIDELITY_KEYS].count;
    assert_true(c > 600 - 5 * 21 && c < 600 + 5 * 21);
    free(traw);
    free(raw);
    kvs_ns_unref(t);
    kvs_ns_unref(all);
    kvs_ns_unref(off);
    kvs_ns_unref(dflt);
    fx_close(&f);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_host_block_hashed_once),
        cmocka_unit_test(test_disk_block_hashed_once),
        cmocka_unit_test(test_encoded_into_a_buffer),
        cmocka_unit_test(test_bound_forces_fallback),
        cmocka_unit_test(test_bound_holds),
        cmocka_unit_test(test_outliers_fall_back),
        cmocka_unit_test(test_fallback_without_room),
        cmocka_unit_test(test_sampling),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
