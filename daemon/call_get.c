/* Get: the server-streaming state machine (DESIGN §2, §4). Protocol only: where the bytes
 * come from and who decodes them is the data path's (storage/xfer.h).
 *
 *   start ──valid──> kvs_xfer_get_open (the block, held) ──> kvs_xfer_get_run (read,
 *         promote, decode into our buffer or make the encoded bytes ready) ──done──>
 *         send header ──> SEND ──> send layer chunk ──┐
 *     └─bad─> fail(INVALID_ARGUMENT / NOT_FOUND / DATA_LOSS)               ▲   │
 *                                                                          └───┘
 *   all layers sent ──> reply(status OK)        send !ok (client gone) ──> abandon
 *
 * The block stays held (neither eviction, demotion nor delete frees it or its slot) until
 * the call is freed. Each data chunk carries bytes of exactly one layer, so a worker can
 * start on layer l as soon as its bytes are in; a layer larger than the chunk size is
 * split, with `offset` locating the piece. Runs on CQ threads, except the data path's
 * callback (pool, loop or engine thread); one step at a time per call.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "daemon/call.h"
#include "daemon/wire.h"
#include "kvstash/v1/kvstash.pb-c.h"
#include "pbc.h"
#include "storage/xfer.h"

/* Payload bytes per message: big enough to amortize per-message cost, small enough to
 * stay far below any sane --max-message. */
#define GET_CHUNK_MAX (1u << 20)

void kvs_get_cleanup(kvs_call *c)
{
    kvs_get_state *g = &c->u.get;
    kvs_xfer_get_close(g->op);
    g->op = NULL;
    kvs_call_buf_free(c, g->raw);
    g->raw = NULL;
    if (g->ns)
        kvs_ns_unref(g->ns);
    g->ns = NULL;
}

static int prepare(kvs_call *c, const Kvstash__V1__GetRequest *r, kvs_err *err)
{
    kvs_get_state *g = &c->u.get;
    int rc = kvs_wire_check_name(r->namespace_, "namespace", err);
    if (rc)
        return rc;
    if ((rc = kvs_store_ns_find(c->srv->store, r->namespace_, &g->ns, err)))
        return rc;
    const kvs_ns_spec *spec = kvs_ns_spec_of(g->ns);
    if ((rc = kvs_key_validate(r->key.len, err)))
        return rc;
    if (r->format != KVSTASH__V1__FORMAT__FORMAT_RAW &&
        r->format != KVSTASH__V1__FORMAT__FORMAT_ENCODED)
        return kvs_err_set(err, KVS_EINVAL, "format: unknown value %d", (int)r->format);
    g->encoded = r->format == KVSTASH__V1__FORMAT__FORMAT_ENCODED;
    if (g->encoded && (r->layer_begin || r->layer_end))
        return kvs_err_set(err, KVS_EINVAL,
                           "layer_begin: a layer range needs format RAW (an "
                           "encoded block is served whole)");
    if ((rc = kvs_wire_layer_range(r->layer_begin, r->layer_end, spec->layers, &g->layer_begin,
                                   &g->layer_end, err)))
        return rc;
    kvs_xfer_get_req q = {.ns = g->ns,
                          .key = r->key.data,
                          .key_len = r->key.len,
                          .encoded = g->encoded,
                          .layer_begin = g->layer_begin,
                          .layer_end = g->layer_end};
    if ((rc = kvs_xfer_get_open(c->srv->xfer, &q, &g->op, err)))
        return rc;
    if (g->encoded)
        return 0;
    /* Decode only the layers asked for (sections are independent). */
    uint64_t n = kvs_xfer_get_raw_bytes(g->op);
    if (!(g->raw = kvs_call_buf_alloc(c, n)))
        return kvs_err_set(err, KVS_ENOMEM, "decode: cannot allocate %llu bytes",
                           (unsigned long long)n);
    return 0;
}

/* The data path's answer (any thread): the bytes are ready; answer with the header chunk,
 * then stream (kvs_get_on_send). */
static void get_ready(void *arg, int rc, const kvs_err *err)
{
    kvs_call *c = arg;
    kvs_get_state *g = &c->u.get;
    if (rc) {
        kvs_call_fail(c, rc, err ? err->msg : kvs_strerror(rc));
        return;
    }
    const kvs_ns_spec *spec = kvs_ns_spec_of(g->ns);
    g->layer = g->layer_begin;
    g->offset = 0;
    uint64_t limit = c->srv->cfg->max_message > 4096 ? c->srv->cfg->max_message - 1024 : 3072;
    g->chunk = limit < GET_CHUNK_MAX ? limit : GET_CHUNK_MAX;
    if (g->encoded) { /* the encoded block is one "layer" for streaming purposes */
        size_t len;
        g->bytes = kvs_xfer_get_encoded(g->op, &len);
        g->layer_bytes = len;
        g->layer_end = g->layer_begin + 1;
    } else {
        g->bytes = g->raw;
        g->layer_bytes = kvs_spec_layer_bytes(spec, kvs_xfer_get_tokens(g->op));
    }
    Kvstash__V1__GetHeader hdr = KVSTASH__V1__GET_HEADER__INIT;
    hdr.tokens = kvs_xfer_get_tokens(g->op);
    hdr.dtype = (Kvstash__V1__Dtype)spec->dtype;
    hdr.layer_begin = g->encoded ? 0 : g->layer_begin;
    hdr.layer_end = g->encoded ? spec->layers : g->layer_end;
    hdr.total_bytes = g->layer_bytes * (g->layer_end - g->layer_begin);
    hdr.format = g->encoded ? KVSTASH__V1__FORMAT__FORMAT_ENCODED : KVSTASH__V1__FORMAT__FORMAT_RAW;
    hdr.tier = (Kvstash__V1__Tier)kvs_xfer_get_tier(g->op);
    Kvstash__V1__GetChunk chunk = KVSTASH__V1__GET_CHUNK__INIT;
    chunk.header = &hdr;
    kvs_call_send(c, &chunk.base);
}

void kvs_get_start(kvs_call *c, const uint8_t *req, size_t len)
{
    kvs_err err;
    kvs_err_clear(&err);
    Kvstash__V1__GetRequest *r = (Kvstash__V1__GetRequest *)kvs_wire_unpack(
        &kvstash__v1__get_request__descriptor, req, len, &err);
    if (!r) {
        kvs_call_fail(c, err.code, err.msg);
        return;
    }
    int rc = prepare(c, r, &err);
    kvstash__v1__get_request__free_unpacked(r, NULL);
    kvs_get_state *g = &c->u.get;
    if (rc == 0) {
        kvs_xfer_buf dst = {KVS_XFER_HOST, g->raw, g->raw ? kvs_xfer_get_raw_bytes(g->op) : 0};
        rc = kvs_xfer_get_run(g->op, g->encoded ? NULL : &dst, get_ready, c, &err);
    }
    if (rc)
        kvs_call_fail(c, rc, err.msg);
}

void kvs_get_on_send(kvs_call *c, bool ok)
{
    kvs_get_state *g = &c->u.get;
    if (!ok) { /* the client went away or the deadline passed */
        kvs_call_abandon(c);
        return;
    }
    if (g->layer >= g->layer_end) {
        kvs_call_reply(c, NULL);
        return;
    }
    uint64_t n = g->layer_bytes - g->offset;
    if (n > g->chunk)
        n = g->chunk;
    Kvstash__V1__GetChunk chunk = KVSTASH__V1__GET_CHUNK__INIT;
    /* protobuf-c's data field is not const; the message is only packed (read) */
    chunk.data.data =
        (uint8_t *)(uintptr_t)(g->bytes + (uint64_t)(g->layer - g->layer_begin) * g->layer_bytes +
                               g->offset);
    chunk.data.len = n;
    chunk.layer = g->encoded ? 0 : g->layer;
    chunk.offset = g->offset;
    /* Advance before sending: the send may complete, and this handler run again on
     * another CQ thread, before kvs_call_send returns. */
    g->offset += n;
    if (g->offset == g->layer_bytes) {
        g->layer++;
        g->offset = 0;
    }
    kvs_call_send(c, &chunk.base);
}
