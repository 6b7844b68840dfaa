/* Put: the client-streaming state machine (DESIGN §2, §4).
 *
 *   arrive ──slot (--max-puts, --max-puts-per-conn)──> start ──recv──> HEADER ──valid──┐
 *     └─ no slot: fail(RESOURCE_EXHAUSTED)        └─bad─> fail(INVALID_ARGUMENT / NOT_FOUND)
 *   ┌──────────────────────────────────────────────────────────────────────────────────┘
 *   └─recv──> DATA (the first takes the receive buffer from --recv-budget, or fails
 *             RESOURCE_EXHAUSTED) ──recv──> DATA ... ──end of stream──> complete? ──┐
 *             recv !ok (cancelled, --stream-idle, oversize message): abandon         │
 *                                       short: fail(INVALID_ARGUMENT "truncated") ──┤
 *   ┌────────────────────────────────────────────────────────────────────────────────┘
 *   └─> reserve the block in a tier (may evict) ──> ENCODE ──> commit ──> reply(PutReply)
 *   durable namespace: commit ──> DURABLE write (disk writer thread: LMDB commit + flush)
 *                                  ──ok──> reply(PutReply)   └─failed─> fail (durable_done)
 *
 * What a Put holds while its client is sending (limits.h): a stream slot and, from its
 * first data chunk, a receive buffer counted in the receive budget; never room in a tier.
 * Only once the whole payload is here is the block reserved in a tier, so a stalled or
 * slow client never evicts anyone's committed blocks; the receive buffer goes back to the
 * budget as soon as the payload is encoded, or when the call ends (a cancel included).
 *
 * Where the block goes (decided once the payload is complete): with a GPU engine that has
 * kernels for the namespace's codecs, a free GPU tier slot, and no RotateKV calibration
 * in progress (it needs the raw keys on the host), the engine encodes straight into the
 * slot; otherwise the block is reserved in the host tier and encoded by the engine (into
 * host memory) or by the CPU codecs on the libuv pool. A Put that finds the GPU tier full
 * kicks demotion (storage/tiering.h) and goes to the host.
 *
 * Every size is checked against the namespace before anything is reserved (sizes come
 * from the namespace and the token count, never from the client), and each data chunk is
 * bounds-checked before it is copied. Runs on CQ threads, except the encode (pool thread)
 * and what follows it (loop thread), and the answer to a durable Put (the disk writer's
 * thread, once its block is on disk: a durable block always goes to the host tier, from
 * where it is written); one step at a time per call (call.h invariant 1).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "daemon/call.h"
#include "daemon/limits.h"
#include "daemon/log.h"
#include "daemon/wire.h"
#include "daemon/work.h"
#include "gpu/base/mem.h"
#include "gpu/codec/codec.h"
#include "gpu/engine/engine.h"
#include "gpu/codec/format.h"
#include "kvstash/v1/kvstash.pb-c.h"
#include "gpu/codec/learn.h"
#include "storage/tiering.h"

void kvs_put_start(kvs_call *c)
{
    kvs_call_recv(c);
}

/* Frees the receive buffer and gives its bytes back to the receive budget. Runs where the
 * payload stops being needed: after the encode (pool or engine thread) or at cleanup. */
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
    if (p->blk)
        kvs_store_block_abort(c->srv->store, p->blk);
    raw_release(c);
    if (p->ns)
        kvs_ns_unref(p->ns);
    kvs_limits_put_close(c->srv->limits, p->slot);
    p->slot = NULL;
    p->blk = NULL;
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

/* The whole payload is here: reserve the block in a tier (the GPU tier when the engine
 * can encode into it, else the host tier, which may evict idle blocks). */
static int reserve_block(kvs_call *c, kvs_err *err)
{
    kvs_put_state *p = &c->u.put;
    const kvs_ns_spec *spec = kvs_ns_spec_of(p->ns);
    kvs_store *st = c->srv->store;
    kvs_engine *eng = c->srv->engine;
    kvs_codec *kc = (kvs_codec *)kvs_ns_codec(p->ns, KVS_KEYS);
    kvs_codec *vc = (kvs_codec *)kvs_ns_codec(p->ns, KVS_VALUES);
    /* A durable block is written from host memory: it never takes a GPU slot. */
    if (eng && kvs_store_has_gpu(st) && !spec->durable &&
        !kvs_learn_wants_keys(kvs_ns_learner(p->ns)) && kvs_engine_accepts(eng, kc, vc)) {
        /* One slot size per namespace: a full block's (a partial block fits in it). */
        uint64_t slot = kvs_engine_slot_bytes(kc, vc, spec->block_tokens);
        kvs_err e2;
        if (kvs_store_block_alloc_gpu(st, p->ns, p->tokens, slot, &p->blk, &e2) == 0) {
            kvs_block_dev *d = kvs_block_device(p->blk);
            p->gpu = true;
            p->kc = kc;
            p->vc = vc;
            d->k_state = kvs_codec_state_version(kc);
            d->v_state = kvs_codec_state_version(vc);
            return 0;
        }
        kvs_tiering_kick(c->srv->tiering);
    }
    uint64_t enc_max = kvs_block_encoded_max(kc, vc, p->tokens);
    return kvs_store_block_alloc(st, p->ns, p->tokens, enc_max, &p->blk, err);
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

/* Pool thread: learn, encode. The call has no batch but CLOSE in flight (call.h invariant
 * 1), so nothing else touches its state meanwhile. */
static void encode_job(void *arg)
{
    kvs_call *c = arg;
    kvs_put_state *p = &c->u.put;
    kvs_err_clear(&p->err);
    /* RotateKV namespaces learn their key channel order from the first blocks they store
     * (gpu/codec/learn.h); a calibration failure costs quality, never the Put. */
    if (kvs_learn_keys(kvs_ns_learner(p->ns), p->ns, kvs_block_tokens(p->blk),
                       (const uint16_t *)p->raw, &p->err))
        kvs_log(KVS_LOG_WARN, "call#%llu Put: namespace '%s': calibration: %s",
                (unsigned long long)c->id, kvs_ns_spec_of(p->ns)->name, p->err.msg);
    /* NaN/Inf input fails here, naming the element. */
    p->rc = kvs_block_encode(kvs_ns_codec(p->ns, KVS_KEYS), kvs_ns_codec(p->ns, KVS_VALUES),
                             kvs_ns_id(p->ns), kvs_block_tokens(p->blk), (const uint16_t *)p->raw,
                             kvs_block_data(p->blk), kvs_block_size(p->blk), &p->enc_len, &p->err);
    raw_release(c);
}

static void reply_put(kvs_call *c)
{
    kvs_put_state *p = &c->u.put;
    Kvstash__V1__PutReply reply = KVSTASH__V1__PUT_REPLY__INIT;
    reply.tier = (Kvstash__V1__Tier)p->info.tier;
    reply.encoded_bytes = p->info.stored_bytes;
    reply.raw_bytes = p->received;
    reply.replaced = p->info.replaced;
    kvs_call_reply(c, &reply.base);
}

/* Disk writer thread: the durable write of a Put's block is done (store.h,
 * kvs_store_durable_fn). Only now is the Put answered. A failure leaves nothing of the
 * block behind, so the status says "not stored": RESOURCE_EXHAUSTED when the disk tier is
 * full of blocks it cannot evict (map full after eviction) or the block is too big for
 * one transaction, UNAVAILABLE when the write or its flush failed (the daemon keeps
 * serving; a retry may succeed), NOT_FOUND when the namespace was dropped meanwhile, and
 * INTERNAL for anything else. */
static void durable_done(void *arg, int rc, const kvs_err *err)
{
    kvs_call *c = arg;
    if (rc == 0) {
        reply_put(c);
        return;
    }
    int code = rc == KVS_ENOSPC || rc == KVS_E2BIG || rc == KVS_ENOMEM ? rc
               : rc == KVS_EIO                                         ? KVS_EUNAVAIL
               : rc == KVS_ENOTFOUND                                   ? KVS_ENOTFOUND
                                                                       : KVS_EINTERNAL;
    char msg[KVS_ERR_MSG_LEN + 64];
    snprintf(msg, sizeof msg, "durable: the block did not reach disk and is not stored: %s",
             err ? err->msg : kvs_strerror(rc));
    kvs_call_fail(c, code, msg);
}

/* Loop thread (or inline): commit the encoded block and answer. */
static void encode_done(void *arg)
{
    kvs_call *c = arg;
    kvs_put_state *p = &c->u.put;
    if (p->rc) {
        kvs_call_fail(c, p->rc == KVS_ENOSPC ? KVS_EINTERNAL : p->rc, p->err.msg);
        return;
    }
    if (p->gpu) { /* its size as an encoded block, as if it were framed on the host */
        const kvs_block_dev *d = kvs_block_device(p->blk);
        uint32_t L = kvs_ns_spec_of(p->ns)->layers;
        p->enc_len = kvs_format_prefix_bytes(L);
        for (uint32_t i = 0; i < 2 * L; i++)
            p->enc_len += d->lens[i];
    }
    kvs_block_set_size(p->blk, p->enc_len, p->expected);
    kvs_block *blk = p->blk;
    p->blk = NULL; /* the store owns it from here, committed or not */
    kvs_store *st = c->srv->store;
    if (kvs_ns_spec_of(p->ns)->durable) {
        /* durable_done answers, maybe before this returns: c is not ours after success. */
        int rc = kvs_store_block_commit_durable(st, blk, p->key, p->key_len, &p->info, durable_done,
                                                c, &p->err);
        if (rc)
            kvs_call_fail(c, rc, p->err.msg);
        return;
    }
    int rc = kvs_store_block_commit(st, blk, p->key, p->key_len, &p->info, &p->err);
    if (rc) {
        kvs_call_fail(c, rc, p->err.msg);
        return;
    }
    /* Read before replying: the call may be freed once the reply is out. */
    bool kick = p->info.tier == KVS_STORE_TIER_GPU;
    struct kvs_tiering *tiering = c->srv->tiering;
    reply_put(c);
    if (kick)
        kvs_tiering_kick(tiering); /* returns at once below the high watermark */
}

/* Engine thread: the GPU encode finished (or failed: its error names the cause). */
static void engine_done(void *arg, int rc, const kvs_err *err)
{
    kvs_call *c = arg;
    kvs_put_state *p = &c->u.put;
    p->rc = rc;
    if (err)
        p->err = *err;
    raw_release(c);
    encode_done(c);
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
    if (reserve_block(c, &err)) {
        kvs_call_fail(c, err.code, err.msg);
        return;
    }
    /* The GPU engine encodes when it has kernels for both codecs; otherwise the CPU codecs
     * run on the libuv pool. Either way encode_done commits and replies. */
    kvs_engine *eng = c->srv->engine;
    if (p->gpu) {
        kvs_block_dev *d = kvs_block_device(p->blk);
        if (kvs_engine_encode_dev(eng, p->kc, p->vc, kvs_block_tokens(p->blk),
                                  (const uint16_t *)p->raw, d->slot, d->lens, engine_done, c,
                                  &err) != 0)
            kvs_call_fail(c, KVS_EINTERNAL, err.msg);
        return;
    }
    kvs_codec *kc = (kvs_codec *)kvs_ns_codec(p->ns, KVS_KEYS);
    kvs_codec *vc = (kvs_codec *)kvs_ns_codec(p->ns, KVS_VALUES);
    if (eng && !kvs_learn_wants_keys(kvs_ns_learner(p->ns)) && kvs_engine_accepts(eng, kc, vc) &&
        kvs_engine_encode(eng, kc, vc, kvs_ns_id(p->ns), kvs_block_tokens(p->blk),
                          (const uint16_t *)p->raw, kvs_block_data(p->blk), kvs_block_size(p->blk),
                          &p->enc_len, engine_done, c, &p->err) == 0)
        return;
    kvs_call_run_work(c, encode_job, encode_done);
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
