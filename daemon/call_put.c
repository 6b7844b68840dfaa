/* Put: the client-streaming state machine (DESIGN §2, §4). Protocol only: where the block
 * goes and who encodes it is the data path's (storage/xfer.h).
 *
 *   arrive ──slot (--max-puts, --max-puts-per-conn)──> start ──recv──> HEADER ──valid──┐
 *     └─ no slot: fail(RESOURCE_EXHAUSTED)        └─bad─> fail(INVALID_ARGUMENT / NOT_FOUND)
 *   ┌──────────────────────────────────────────────────────────────────────────────────┘
 *   └─recv──> DATA (the first takes the receive buffer from --recv-budget, or fails
 *             RESOURCE_EXHAUSTED) ──recv──> DATA ... ──end of stream──> complete? ──┐
 *             recv !ok (cancelled, --stream-idle, oversize message): abandon         │
 *                                       short: fail(INVALID_ARGUMENT "truncated") ──┤
 *   ┌────────────────────────────────────────────────────────────────────────────────┘
 *   └─> kvs_xfer_put (reserve a tier, encode, commit; a durable block once on disk)
 *         ──consumed──> receive buffer back to the budget ──done──> reply(PutReply) / fail
 *
 * What a Put holds while its client is sending (limits.h): a stream slot and, from its
 * first data chunk, a receive buffer counted in the receive budget; never room in a tier.
 * Only once the whole payload is here does the data path reserve the block in a tier, so
 * a stalled or slow client never evicts committed blocks; the receive buffer goes back to
 * the budget as soon as the payload is encoded, or when the call ends (a cancel included).
 *
 * Every size is checked against the namespace before anything is reserved (sizes come
 * from the namespace and the token count, never from the client), and each data chunk is
 * bounds-checked before it is copied. Runs on CQ threads, except the data path's
 * callbacks (pool, loop, engine or disk writer thread); one step at a time per call
 * (call.h invariant 1).
 */
#include <grpc/support/alloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "daemon/call.h"
#include "daemon/limits.h"
#include "daemon/wire.h"
#include "kvstash/v1/kvstash.pb-c.h"
#include "storage/xfer.h"

void kvs_put_start(kvs_call *c, const uint8_t *req, size_t len)
{
    (void)req;
    (void)len;
    /* A stream slot first (daemon/limits.h): a client cannot open Puts without bound. */
    kvs_err err;
    char *peer = grpc_call_get_peer(c->call);
    int rc = kvs_limits_put_open(c->srv->limits, peer, &c->u.put.slot, &err);
    gpr_free(peer);
    if (rc)
        kvs_call_fail(c, rc, err.msg);
    else
        kvs_call_recv(c);
}

/* Frees the receive buffer and gives its bytes back to the receive budget. Runs where the
 * payload stops being needed: once it is encoded (any thread) or at cleanup. */
static void raw_release(kvs_call *c)
{
    kvs_put_state *p = &c->u.put;
    kvs_call_buf_free(c, p->raw);
    p->raw = NULL;
    if (p->recv_held) {
        kvs_limits_recv_give(c->srv->limits, p->recv_held);
        p->recv_held = 0;
    }
}

void kvs_put_cleanup(kvs_call *c)
{
    kvs_put_state *p = &c->u.put;
    raw_release(c);
    if (p->ns)
        kvs_ns_unref(p->ns);
    kvs_limits_put_close(c->srv->limits, p->slot);
    p->slot = NULL;
    p->ns = NULL;
}

static int on_header(kvs_call *c, const Kvstash__V1__PutHeader *h, kvs_err *err)
{
    kvs_put_state *p = &c->u.put;
    int rc = kvs_wire_check_name(h->namespace_, "namespace", err);
    if (rc)
        return rc;
    rc = kvs_store_ns_find(c->srv->store, h->namespace_, &p->ns, err);
    if (rc)
        return rc;
    const kvs_ns_spec *spec = kvs_ns_spec_of(p->ns);
    if ((rc = kvs_key_validate(h->key.len, err)))
        return rc;
    if ((rc = kvs_spec_block_bytes(spec, h->tokens, &p->expected, err)))
        return rc;
    if ((int)h->dtype != (int)spec->dtype)
        return kvs_err_set(err, KVS_EINVAL, "dtype: %s given, namespace '%s' stores %s",
                           kvs_dtype_name((kvs_dtype)h->dtype), spec->name,
                           kvs_dtype_name(spec->dtype));
    if (h->payload_bytes && h->payload_bytes != p->expected)
        return kvs_err_set(err, KVS_EINVAL,
                           "payload_bytes: %llu given, but %u tokens of namespace '%s' take "
                           "%llu bytes",
                           (unsigned long long)h->payload_bytes, h->tokens, spec->name,
                           (unsigned long long)p->expected);
    memcpy(p->key, h->key.data, h->key.len);
    p->key_len = h->key.len;
    p->tokens = h->tokens;
    return 0;
}

/* The receive buffer, at the first data chunk: counted in the receive budget (sized from
 * the namespace, checked at the header), never in a tier. */
static int recv_buffer(kvs_call *c, kvs_err *err)
{
    kvs_put_state *p = &c->u.put;
    int rc = kvs_limits_recv_take(c->srv->limits, p->expected, err);
    if (rc)
        return rc;
    p->recv_held = p->expected;
    if (!(p->raw = kvs_call_buf_alloc(c, p->expected)))
        return kvs_err_set(err, KVS_ENOMEM, "payload: cannot allocate %llu bytes",
                           (unsigned long long)p->expected); /* cleanup gives it back */
    return 0;
}

static int on_chunk(kvs_call *c, const uint8_t *buf, size_t len, kvs_err *err)
{
    kvs_put_state *p = &c->u.put;
    Kvstash__V1__PutChunk *m = (Kvstash__V1__PutChunk *)kvs_wire_unpack(
        &kvstash__v1__put_chunk__descriptor, buf, len, err);
    if (!m)
        return err->code;
    int rc = 0;
    if (m->kind_case == KVSTASH__V1__PUT_CHUNK__KIND_HEADER) {
        if (p->ns)
            rc = kvs_err_set(err, KVS_EINVAL, "header: sent twice (only the first chunk is one)");
        else
            rc = on_header(c, m->header, err);
    } else if (!p->ns) {
        rc = kvs_err_set(err, KVS_EINVAL, "header: the first chunk of a Put must be a header");
    } else if (m->kind_case == KVSTASH__V1__PUT_CHUNK__KIND_DATA) {
        uint64_t n = m->data.len;
        if (n > p->expected - p->received)
            rc = kvs_err_set(err, KVS_EINVAL,
                             "payload: more than the %llu bytes that %u tokens take",
                             (unsigned long long)p->expected, p->tokens);
        else if (n > 0 && !p->raw) /* the first data: the receive buffer is taken now */
            rc = recv_buffer(c, err);
        if (rc == 0 && n > 0) { /* an empty chunk carries a NULL pointer: nothing to copy */
            memcpy(p->raw + p->received, m->data.data, n);
            p->received += n;
        }
    }
    kvstash__v1__put_chunk__free_unpacked(m, NULL);
    return rc;
}

/* The data path has read the payload (any thread; the call has no batch but CLOSE in
 * flight, call.h invariant 1). */
static void put_consumed(void *arg)
{
    raw_release(arg);
}

/* The data path's answer: stored (info), or why not. Runs on whichever thread finished
 * (loop, engine, or the disk writer's for a durable namespace). */
static void put_done(void *arg, int rc, const kvs_err *err, const kvs_store_put_info *info)
{
    kvs_call *c = arg;
    kvs_put_state *p = &c->u.put;
    if (rc) {
        kvs_call_fail(c, rc, err ? err->msg : kvs_strerror(rc));
        return;
    }
    Kvstash__V1__PutReply reply = KVSTASH__V1__PUT_REPLY__INIT;
    reply.tier = (Kvstash__V1__Tier)info->tier;
    reply.encoded_bytes = info->stored_bytes;
    reply.raw_bytes = p->received;
    reply.replaced = info->replaced;
    kvs_call_reply(c, &reply.base);
}

static void on_end(kvs_call *c)
{
    kvs_put_state *p = &c->u.put;
    kvs_err err;
    kvs_err_clear(&err);
    if (!p->ns) {
        kvs_call_fail(c, KVS_EINVAL, "header: the stream ended before a header was sent");
        return;
    }
    if (p->received != p->expected) {
        snprintf(err.msg, sizeof err.msg,
                 "payload: got %llu of %llu bytes (truncated stream: the client half-closed "
                 "early)",
                 (unsigned long long)p->received, (unsigned long long)p->expected);
        kvs_call_fail(c, KVS_EINVAL, err.msg);
        return;
    }
    kvs_xfer_put_req r = {.ns = p->ns,
                          .key = p->key,
                          .key_len = p->key_len,
                          .tokens = p->tokens,
                          .src = {KVS_XFER_HOST, p->raw, p->expected},
                          .consumed = put_consumed,
                          .done = put_done,
                          .arg = c};
    if (kvs_xfer_put(c->srv->xfer, &r, &err))
        kvs_call_fail(c, err.code, err.msg);
}

void kvs_put_on_recv(kvs_call *c, bool ok)
{
    if (!ok) { /* cancelled, deadline, or grpc refused an oversize message */
        kvs_call_abandon(c);
        return;
    }
    if (!c->recv) {
        on_end(c);
        return;
    }
    kvs_err err;
    kvs_err_clear(&err);
    kvs_put_state *p = &c->u.put;
    int rc = 0;
    uint64_t n = 0;
    /* Data chunks (all but the first message) go straight from the gRPC slices into the
     * receive buffer; anything else takes the protobuf-c path. */
    int fast = p->raw ? kvs_wire_put_data(c->recv, p->raw + p->received, p->expected - p->received,
                                          &n, &err)
                      : 0;
    if (fast == 1) {
        p->received += n;
    } else if (fast < 0) {
        rc = fast;
    } else {
        grpc_slice s = kvs_call_flatten(c->recv);
        rc = on_chunk(c, GRPC_SLICE_START_PTR(s), GRPC_SLICE_LENGTH(s), &err);
        grpc_slice_unref(s);
    }
    grpc_byte_buffer_destroy(c->recv);
    c->recv = NULL;
    if (rc)
        kvs_call_fail(c, rc, err.msg);
    else
        kvs_call_recv(c);
}
