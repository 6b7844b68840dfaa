/* Synchronous Put and Get through the data path; contracts in tests/support/kvs_test_xfer.h. */
#include "tests/support/kvs_test_xfer.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

void kvs_test_put_done(void *arg, int rc, const kvs_err *err, const kvs_store_put_info *info)
{
    (void)info;
    kvs_test_get_done(arg, rc, err);
}

void kvs_test_get_done(void *arg, int rc, const kvs_err *err)
{
    kvs_test_result *r = arg;
    r->called = true;
    r->rc = rc;
    snprintf(r->msg, sizeof r->msg, "%s", rc && err ? err->msg : "");
}

void kvs_test_put(kvs_xfer *x, kvs_ns *ns, const char *key, uint32_t t, const uint16_t *raw)
{
    uint64_t bytes;
    assert_int_equal(kvs_spec_block_bytes(kvs_ns_spec_of(ns), t, &bytes, NULL), 0);
    kvs_test_result r = {0};
    kvs_xfer_put_req q = {
        .ns = ns,
        .key = key,
        .key_len = strlen(key),
        .tokens = t,
        .src = {.kind = KVS_XFER_HOST, .ptr = (uint8_t *)(uintptr_t)raw, .len = bytes},
        .done = kvs_test_put_done,
        .arg = &r};
    kvs_err err;
    if (kvs_xfer_put(x, &q, &err))
        fail_msg("put %s: %s", key, err.msg);
    assert_true(r.called);
    if (r.rc)
        fail_msg("put %s: %s", key, r.msg);
}

uint16_t *kvs_test_get_raw(kvs_xfer *x, kvs_ns *ns, const char *key, size_t *n, unsigned *enc,
                           kvs_store_tier *tier)
{
    kvs_xfer_get_req q = {.ns = ns,
                          .key = key,
                          .key_len = strlen(key),
                          .layer_begin = 0,
                          .layer_end = kvs_ns_spec_of(ns)->layers};
    kvs_xfer_get *g;
    kvs_err err;
    if (kvs_xfer_get_open(x, &q, &g, &err))
        fail_msg("get %s: %s", key, err.msg);
    *n = kvs_xfer_get_raw_bytes(g);
    uint16_t *out = malloc(*n);
    assert_non_null(out);
    kvs_xfer_buf dst = {.kind = KVS_XFER_HOST, .ptr = (uint8_t *)out, .len = *n};
    kvs_test_result r = {0};
    if (kvs_xfer_get_run(g, &dst, kvs_test_get_done, &r, &err))
        fail_msg("get %s: %s", key, err.msg);
    assert_true(r.called);
    if (r.rc)
        fail_msg("get %s: %s", key, r.msg);
    if (enc)
        *enc = kvs_xfer_get_enc(g);
    if (tier)
        *tier = kvs_xfer_get_tier(g);
    kvs_xfer_get_close(g);
    return out;
}

uint8_t *kvs_test_get_encoded(kvs_xfer *x, kvs_ns *ns, const char *key, size_t *n)
{
    kvs_xfer_get_req q = {.ns = ns, .key = key, .key_len = strlen(key), .encoded = true};
    kvs_xfer_get *g;
    kvs_err err;
    if (kvs_xfer_get_open(x, &q, &g, &err))
        fail_msg("get %s: %s", key, err.msg);
    kvs_test_result r = {0};
    if (kvs_xfer_get_run(g, NULL, kvs_test_get_done, &r, &err))
        fail_msg("get %s: %s", key, err.msg);
    assert_true(r.called);
    if (r.rc)
        fail_msg("get %s: %s", key, r.msg);
    const uint8_t *b = kvs_xfer_get_encoded(g, n);
    uint8_t *copy = malloc(*n);
    assert_non_null(copy);
    memcpy(copy, b, *n);
    kvs_xfer_get_close(g);
    return copy;
}
