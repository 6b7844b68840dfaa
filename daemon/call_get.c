/* Get: the server-streaming state machine (DESIGN §2, §4).
 *
 *   start ──valid──> store_find (reader ref) [──READ (libuv pool: read_job; a disk block;
 *         RAW with promotion off and CPU codecs: decoded there, from LMDB's map)]
 *         ──DECODE (libuv pool: decode_job; RAW only)
 *         ──send header──> SEND ──> send layer chunk ──┐
 *     └─bad─> fail(INVALID_ARGUMENT / NOT_FOUND / DATA_LOSS / UNIMPLEMENTED)        ▲   │
 *                                                                                  └───┘
 *   all layers sent ──> reply(status OK)        send !ok (client gone) ──> abandon
 *
 * A GPU tier block is decoded by the engine straight from its slot (RAW), or fetched to
 * the host as an encoded block (ENCODED); a GPU tier block needs the engine (it is the only
 * way to its bytes). The block stays referenced (so neither eviction, demotion nor delete
 * frees it or its slot) until the call is freed. Each data chunk carries bytes of exactly one
 * layer, so a worker can start on layer l as soon as its bytes are in; a layer larger than the
 * chunk size is split, with `offset` locating the piece. Runs on CQ threads, except the disk read
 * and the CPU decode (pool threads) and what follows them (loop thread); one step at a time per
 * call.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "daemon/call.h"
#include "daemon/wire.h"
#include "daemon/work.h"
#include "gpu/base/mem.h"
#include "gpu/codec/codec.h"
#include "gpu/engine/engine.h"
#include "gpu/codec/format.h"
#include "storage/tiering.h"
#include "kvstash/v1/kvstash.pb-c.h"

/* Payload bytes per message: big enough to amortize per-message cost, small enough to
 * stay far below any sane --max-message. */
#define GET_CHUNK_MAX (1u << 20)

void kvs_get_cleanup(kvs_call *c)
{
    kvs_get_state *g = &c->u.get;
    kvs_call_buf_free(c, g->raw);
    g->raw = NULL;
    free(g->fetched);
    g->fetched = NULL;
    if (g->blk)
        kvs_store_block_release(c->srv->store, g->blk);
    if (g->ns)
        kvs_ns_unref(g->ns);
    g->blk = NULL;
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
    /* A disk block comes back unread: its LMDB read runs on the pool (kvs_get_start). */
    return kvs_store_find(c->srv->store, g->ns, r->key.data, r->key.len, &g->blk, err);
}

/* Sizes the stream and its buffers once the block's bytes are at hand. */
static int setup(kvs_call *c, kvs_err *err)
{
    kvs_get_state *g = &c->u.get;
    const kvs_ns_spec *spec = kvs_ns_spec_of(g->ns);
    uint32_t t = kvs_block_tokens(g->blk);
    g->layer = g->layer_begin;
    g->offset = 0;
    uint64_t limit = c->srv->cfg->max_message > 4096 ? c->srv->cfg->max_message - 1024 : 3072;
    g->chunk = limit < GET_CHUNK_MAX ? limit : GET_CHUNK_MAX;
    if (g->encoded) {
        /* The encoded block is one "layer" for streaming purposes: chunks of layer 0. A
         * GPU block is fetched first (kvs_get_start), into g->fetched. */
        g->layer_end = g->layer_begin + 1;
        if (kvs_block_tier(g->blk) == KVS_STORE_TIER_GPU) {
            size_t cap = kvs_block_encoded_max(kvs_ns_codec(g->ns, KVS_KEYS),
                                               kvs_ns_codec(g->ns, KVS_VALUES), t);
            if (!(g->fetched = kvs_trymalloc(cap)))
                return kvs_err_set(err, KVS_ENOMEM, "fetch: cannot allocate %zu bytes", cap);
            g->bytes = g->fetched;
            return 0;
        }
        g->bytes = kvs_block_data(g->blk);
        g->layer_bytes = kvs_block_size(g->blk);
        return 0;
    }
    /* Decode only the layers asked for (sections are independent); the decode itself
     * runs in decode_job. */
    g->layer_bytes = kvs_spec_layer_bytes(spec, t);
    uint64_t n = g->layer_bytes * (g->layer_end - g->layer_begin);
    if (!(g->raw = kvs_call_buf_alloc(c, n)))
        return kvs_err_set(err, KVS_ENOMEM, "decode: cannot allocate %llu bytes",
                           (unsigned long long)n);
    g->bytes = g->raw;
    return 0;
}

/* Decodes the requested layers of an encoded block into g->raw, with the codec state the
 * block was encoded with (it may predate the namespace's current state); g->err says why
 * not. */
static int decode_bytes(kvs_call *c, const uint8_t *bytes, size_t len)
{
    kvs_get_state *g = &c->u.get;
    kvs_err *err = &g->err;
    kvs_block_info info;
    const kvs_codec *kc = NULL, *vc = NULL;
    kvs_err_clear(err);
    int rc = kvs_format_peek(bytes, len, &info, err);
    if (rc == 0) {
        kc = kvs_ns_codec_version(g->ns, KVS_KEYS, info.k_state);
        vc = kvs_ns_codec_version(g->ns, KVS_VALUES, info.v_state);
        /* A state this daemon does not hold (its record was unreadable at start,
         * storage/persist.c): a codec whose decode ignores the state decodes with any. */
        if (!kc && !kvs_codec_decode_needs_state(kvs_ns_codec(g->ns, KVS_KEYS)))
            kc = kvs_ns_codec(g->ns, KVS_KEYS);
        if (!vc && !kvs_codec_decode_needs_state(kvs_ns_codec(g->ns, KVS_VALUES)))
            vc = kvs_ns_codec(g->ns, KVS_VALUES);
        if (!kc || !vc)
            rc = kvs_err_set(err, KVS_EPROTO,
                             "codec state versions %u/%u unknown (their "
                             "records were unreadable at start)",
                             info.k_state, info.v_state);
    }
    if (rc == 0)
        rc = kvs_block_decode(kc, vc, bytes, len, g->layer_begin, g->layer_end, (uint16_t *)g->raw,
                              err);
    if (rc == KVS_EPROTO || rc == KVS_EDATALOSS) /* stored bytes we cannot read: data loss */
        rc = kvs_err_set(err, KVS_EDATALOSS, "key: stored block unreadable: %.180s", err->msg);
    return rc;
}

/* Pool thread: decode a block whose bytes are at hand. Only CLOSE is in flight meanwhile
 * (call.h inv. 1). */
static void decode_job(void *arg)
{
    kvs_call *c = arg;
    kvs_get_state *g = &c->u.get;
    g->rc = decode_bytes(c, kvs_block_data(g->blk), kvs_block_size(g->blk));
}

/* Inside LMDB's read transaction (kvs_store_view): decode straight from the map. */
static int decode_view(const void *bytes, size_t len, void *arg)
{
    return decode_bytes(arg, bytes, len);
}

/* Loop thread (or inline): answer with the header chunk, then stream (kvs_get_on_send). */
static void send_header(void *arg)
{
    kvs_call *c = arg;
    kvs_get_state *g = &c->u.get;
    if (g->rc) {
        kvs_call_fail(c, g->rc, g->err.msg);
        return;
    }
    const kvs_ns_spec *spec = kvs_ns_spec_of(g->ns);
    Kvstash__V1__GetHeader hdr = KVSTASH__V1__GET_HEADER__INIT;
    hdr.tokens = kvs_block_tokens(g->blk);
    hdr.dtype = (Kvstash__V1__Dtype)spec->dtype;
    hdr.layer_begin = g->encoded ? 0 : g->layer_begin;
    hdr.layer_end = g->encoded ? spec->layers : g->layer_end;
    hdr.total_bytes = g->layer_bytes * (g->layer_end - g->layer_begin);
    hdr.format = g->encoded ? KVSTASH__V1__FORMAT__FORMAT_ENCODED : KVSTASH__V1__FORMAT__FORMAT_RAW;
    hdr.tier = (Kvstash__V1__Tier)kvs_block_tier(g->blk);
    Kvstash__V1__GetChunk chunk = KVSTASH__V1__GET_CHUNK__INIT;
    chunk.header = &hdr;
    kvs_call_send(c, &chunk.base);
}

/* Engine thread: the GPU decode finished (or failed). */
static void engine_done(void *arg, int rc, const kvs_err *err)
{
    kvs_call *c = arg;
    kvs_get_state *g = &c->u.get;
    g->rc = rc;
    if (err)
        g->err = *err;
    send_header(c);
}

/* Engine thread: a GPU block's bytes reached the host (ENCODED Get). */
static void fetch_done(void *arg, int rc, const kvs_err *err)
{
    kvs_call *c = arg;
    kvs_get_state *g = &c->u.get;
    g->layer_bytes = g->fetched_len;
    engine_done(arg, rc, err);
}

/* A GPU tier block: decode from its slot, or fetch it, with the codecs of the state
 * versions it was encoded with. */
static void start_gpu(kvs_call *c)
{
    kvs_get_state *g = &c->u.get;
    kvs_engine *eng = c->srv->engine;
    const kvs_block_dev *d = kvs_block_device(g->blk);
    const kvs_codec *kc = kvs_ns_codec_version(g->ns, KVS_KEYS, d->k_state);
    const kvs_codec *vc = kvs_ns_codec_version(g->ns, KVS_VALUES, d->v_state);
    uint32_t t = kvs_block_tokens(g->blk);
    kvs_err err;
    int rc;
    if (!eng || !kc || !vc) {
        kvs_call_fail(c, KVS_EINTERNAL, "GPU tier block without its engine or codec state");
        return;
    }
    if (g->encoded)
        rc = kvs_engine_fetch_dev(eng, kc, vc, kvs_ns_id(g->ns), t, d->slot, d->lens, g->fetched,
                                  kvs_block_encoded_max(kc, vc, t), &g->fetched_len, fetch_done, c,
                                  &err);
    else
        rc = kvs_engine_decode_dev(eng, kc, vc, t, d->slot, d->lens, g->layer_begin, g->layer_end,
                                   (uint16_t *)g->raw, engine_done, c, &err);
    if (rc)
        kvs_call_fail(c, rc == KVS_EDATALOSS ? rc : KVS_EINTERNAL, err.msg);
}

/* Decode or send a block whose bytes are at hand (setup done). */
static void dispatch(kvs_call *c)
{
    kvs_get_state *g = &c->u.get;
    if (kvs_block_tier(g->blk) == KVS_STORE_TIER_GPU) {
        start_gpu(c);
        return;
    }
    /* A hot host block moves up to the GPU tier (when allowed and there is room), beside
     * this Get, which goes on reading the host copy. */
    kvs_tiering_promote(c->srv->tiering, g->blk);
    if (g->encoded) {
        send_header(c); /* the stored bytes go out as they are */
        return;
    }
    /* GPU engine when it has kernels for the block's codecs, else the libuv pool. */
    kvs_engine *eng = c->srv->engine;
    kvs_block_info info;
    kvs_codec *kc = NULL, *vc = NULL;
    if (eng && kvs_format_peek(kvs_block_data(g->blk), kvs_block_size(g->blk), &info, NULL) == 0 &&
        (kc = (kvs_codec *)kvs_ns_codec_version(g->ns, KVS_KEYS, info.k_state)) &&
        (vc = (kvs_codec *)kvs_ns_codec_version(g->ns, KVS_VALUES, info.v_state)) &&
        kvs_engine_accepts(eng, kc, vc) &&
        kvs_engine_decode(eng, kc, vc, kvs_block_data(g->blk), kvs_block_size(g->blk),
                          g->layer_begin, g->layer_end, (uint16_t *)g->raw, engine_done, c,
                          &g->err) == 0)
        return;
    kvs_call_run_work(c, decode_job, send_header);
}

/* Pool thread: read a disk block (LMDB read transaction, verified) and size the stream.
 * A RAW Get that the CPU decodes, with promotion off, decodes straight from LMDB's map
 * (nothing is kept, so nothing needs a copy); otherwise the block is copied out (the
 * copy is the promoted host block, or what the engine or the ENCODED stream reads later).
 * Only CLOSE is in flight meanwhile (call.h invariant 1). */
static void read_job(void *arg)
{
    kvs_call *c = arg;
    kvs_get_state *g = &c->u.get;
    kvs_store *st = c->srv->store;
    kvs_engine *eng = c->srv->engine;
    if (!g->encoded && !kvs_store_promotes(st) &&
        (!eng || !kvs_engine_accepts(eng, (kvs_codec *)kvs_ns_codec(g->ns, KVS_KEYS),
                                     (kvs_codec *)kvs_ns_codec(g->ns, KVS_VALUES)))) {
        kvs_err_clear(&g->err);
        g->decoded = true;
        g->rc = setup(c, &g->err);
        if (g->rc == 0)
            g->rc = kvs_store_view(st, g->blk, decode_view, c, &g->err);
        return;
    }
    kvs_block *d = g->blk;
    g->blk = NULL; /* kvs_store_read takes over our reference on d */
    kvs_err_clear(&g->err);
    g->rc = kvs_store_read(c->srv->store, d, &g->blk, &g->err);
    if (g->rc == 0)
        g->rc = setup(c, &g->err);
}

/* Loop thread (or inline): the disk read is done. */
static void read_done(void *arg)
{
    kvs_call *c = arg;
    kvs_get_state *g = &c->u.get;
    if (g->rc)
        kvs_call_fail(c, g->rc, g->err.msg);
    else if (g->decoded)
        send_header(c);
    else
        dispatch(c);
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
    if (rc == 0 && kvs_block_unread(g->blk)) {
        kvs_call_run_work(c, read_job, read_done);
        return;
    }
    if (rc == 0)
        rc = setup(c, &err);
    if (rc) {
        kvs_call_fail(c, rc, err.msg);
        return;
    }
    dispatch(c);
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
    chunk.data.data =
        (uint8_t *)g->bytes + (uint64_t)(g->layer - g->layer_begin) * g->layer_bytes + g->offset;
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
