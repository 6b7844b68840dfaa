/* Synchronous Put and Get through the data path (storage/xfer.h) for the store tests: their
 * kvs_xfer has no engine and no pool (run NULL), so every callback has run when the call
 * returns. Failures are cmocka failures (fail_msg / assert_*): for test bodies only.
 * Single-threaded. */
#ifndef KVS_TEST_XFER_H
#define KVS_TEST_XFER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "storage/xfer.h"

/* What a data-path callback reported. */
typedef struct kvs_test_result {
    bool called;
    int rc;
    char msg[256]; /* the error's message when rc != 0 */
} kvs_test_result;

/* kvs_xfer_put_req.done / kvs_xfer_get_run's done: record into the kvs_test_result at arg. */
void kvs_test_put_done(void *arg, int rc, const kvs_err *err, const kvs_store_put_info *info);
void kvs_test_get_done(void *arg, int rc, const kvs_err *err);

/* Puts raw (t tokens of ns's shape, host memory) under key; fails the test unless stored. */
void kvs_test_put(kvs_xfer *x, kvs_ns *ns, const char *key, uint32_t t, const uint16_t *raw);

/* A raw Get of every layer of key (malloc'd, *n bytes); the block's codec roles (*enc,
 * gpu/codec/codec.h kvs_enc packed) and the tier it came from (*tier), each may be NULL. */
uint16_t *kvs_test_get_raw(kvs_xfer *x, kvs_ns *ns, const char *key, size_t *n, unsigned *enc,
                           kvs_store_tier *tier);

/* An encoded Get of key: the stored block, copied out (malloc'd, *n bytes). */
uint8_t *kvs_test_get_encoded(kvs_xfer *x, kvs_ns *ns, const char *key, size_t *n);

#endif
