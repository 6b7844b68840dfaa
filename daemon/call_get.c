/* Get and GetMany: the server-streaming state machine (DESIGN §2, §4). Protocol only: where
 * the bytes come from and who decodes them is the data path's (storage/xfer.h). A Get is a
 * GetMany of one key that answers with that block or the error, so both share one machine.
 *
 *   start ──valid──> open and run up to GET_WINDOW items ahead of the sender
 *     └─bad─> fail(INVALID_ARGUMENT / NOT_FOUND)     (kvs_xfer_get_open + _run: read,
 *                                                     promote, decode into its buffer or
 *                                                     the region, or encoded bytes ready)
 *   SEND items[send]: not ready ──> wait (its ready callback resumes the sender)
 *                     ready, ok ──> header chunk ──> its layer chunks (none into a region)
 *                     ready, error ──> Get: fail; GetMany: header with the code; prefix:
 *                                      stop (reply OK: the leading present blocks were sent)
 *               ──> close it, open the next, send++ ... all sent ──> reply(status OK)
 *   send !ok (client gone) ──> abandon
 *
 * The call ends (reply, fail or abandon) only once no item is in the data path
 * (`inflight` 0): a prefix Get that stops early, or a client that goes away, leaves decodes
 * of items opened ahead running, and their buffers must outlive them.
 *
 * Each block stays held (neither eviction, demotion nor delete frees it or its slot) from
 * its open until it is sent. Each data chunk carries bytes of exactly one layer, so a worker
 * can start on layer l as soon as its bytes are in; a layer larger than the chunk size is
 * split, with `offset` locating the piece. Runs on CQ threads, except the data path's
 * callback (pool, loop or engine thread), which marks its item ready under
 * kvs_get_state.mu and resumes the sender only if the sender waits for that item (`waiting`:
 * so the sender runs in one place at a time, call.h invariant 1).
 */
#include <grpc/support/alloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "daemon/call.h"
#include "daemon/limits.h"
#include "daemon/region.h"
#include "daemon/wire.h"
#include "gpu/base/mem.h"
#include "gpu/codec/paged.h"
#include "kvstash/v1/kvstash.pb-c.h"
#include "pbc.h"
#include "storage/xfer.h"

/* Payload bytes per message: big enough to amortize per-message cost, small enough to
 * stay far below any sane --max-message. */
#define GET_CHUNK_MAX (1u << 20)
/* Blocks read and decoded ahead of the one being sent: overlaps decode with the network
 * and bounds a GetMany's buffers to this many blocks. Into a shared-memory region's slots
 * there are no buffers (the data path writes the caller's memory) and only a small header
 * goes on the wire per block, so the whole batch runs at once, up to the GPU engine's
 * largest batch: the engine then decodes many blocks per launch and per synchronization
 * instead of a few. Paged destinations decode into buffers first (then scatter): those
 * stay bounded. Encoded blocks are 4-7x smaller than decoded ones with a quantizing codec
 * (at most a little over one with codec none): twice as many go ahead, so the GPU tier's
 * fetches overlap the stream. */
#define GET_WINDOW 4
#define GET_WINDOW_ENCODED 8
#define GET_WINDOW_PAGED 16
#define GET_WINDOW_SLOTS 256

/* The bytes a block is sent from, shared by its item and the gRPC slices that send them
 * without a copy: gRPC may hold a slice after the send completes (until the bytes are
 * written), so they go back to the data path with the last reference, whoever drops it:
 * a decoded block's buffer (p), or an encoded Get (op), whose stored bytes stay held (the
 * block, or the fetch's buffer) until it is closed. */
typedef struct get_buf {
    atomic_uint refs;
    struct kvs_xfer *xfer;
    uint8_t *p;
    struct kvs_xfer_get *op;
} get_buf;

static void get_buf_unref(void *arg)
{
    get_buf *b = arg;
    if (b && atomic_fetch_sub(&b->refs, 1) == 1) {
        if (b->op)
            kvs_xfer_get_close(b->op);
        else
            kvs_xfer_host_free(b->xfer, b->p);
        free(b);
    }
}

typedef struct kvs_get_item {
    kvs_call *c;
    uint32_t index;
    uint8_t key[KVS_KEY_MAX];
    size_t key_len;
    struct kvs_xfer_get *op; /* open from open_item until it is sent */
    uint8_t *raw;            /* decoded layers (rawbuf's), NULL when encoded or into a region */
    get_buf *rawbuf;         /* a reference: the decoded layers, or (encoded, from its header
                              * on) the op itself, which then moves here from `op` */
    kvs_region *region;      /* GetMany into shared memory: this block's slot, held */
    uint8_t *dst;            /* ...its bytes */
    bool closed;
    bool ready; /* under mu: rc and msg are final */
    int rc;
    char msg[256];
} kvs_get_item;

/* kvs_get_state.end_kind */
typedef enum end_kind { END_NONE, END_REPLY, END_FAIL, END_ABANDON } end_kind;

static void item_close(kvs_get_item *it)
{
    if (it->closed)
        return;
    it->closed = true;
    kvs_xfer_get_close(it->op);
    it->op = NULL;
    get_buf_unref(it->rawbuf);
    it->rawbuf = NULL;
    it->raw = NULL;
    kvs_region_release(it->region);
    it->region = NULL;
}

void kvs_get_cleanup(kvs_call *c)
{
    kvs_get_state *g = &c->u.get;
    for (uint32_t i = 0; g->items && i < g->n; i++)
        item_close(&g->items[i]);
    free(g->items);
    g->items = NULL;
    kvs_region_release(g->region);
    g->region = NULL;
    free(g->layout_bases);
    free(g->pages);
    g->layout_bases = NULL;
    g->pages = NULL;
    if (g->ns)
        kvs_ns_unref(g->ns);
    g->ns = NULL;
    if (g->mu_init)
        pthread_mutex_destroy(&g->mu);
    g->mu_init = false;
    kvs_limits_close(c->srv->limits, KVS_LIMITS_GET, g->slot);
    g->slot = NULL;
}

static void do_end(kvs_call *c, end_kind kind, int rc, const char *msg)
{
    if (kind == END_REPLY)
        kvs_call_reply(c, NULL);
    else if (kind == END_FAIL)
        kvs_call_fail(c, rc, msg);
    else
        kvs_call_abandon(c);
}

/* Ends the call now, or when the last item in flight is ready. */
static void end_call(kvs_call *c, end_kind kind, int rc, const char *msg)
{
    kvs_get_state *g = &c->u.get;
    pthread_mutex_lock(&g->mu);
    g->end_kind = kind;
    g->end_rc = rc;
    snprintf(g->end_msg, sizeof g->end_msg, "%s", msg ? msg : "");
    bool now = g->inflight == 0;
    pthread_mutex_unlock(&g->mu);
    if (now)
        do_end(c, kind, rc, msg);
}

static void advance(kvs_call *c);

static size_t put_varint(uint8_t *p, uint64_t v)
{
    size_t n = 0;
    do {
        p[n++] = (uint8_t)((v & 0x7f) | (v > 0x7f ? 0x80 : 0));
        v >>= 7;
    } while (v);
    return n;
}

/* GetChunk{data, layer, offset} in protobuf wire form around n bytes of b at p, which the
 * message references (one more reference on b) instead of copying. */
static grpc_byte_buffer *data_chunk_ref(get_buf *b, const uint8_t *p, uint64_t n, uint32_t layer,
                                        uint64_t offset)
{
    uint8_t head[11], tail[22];
    size_t h = 0, t = 0;
    head[h++] = 0x12; /* field 2, length-delimited */
    h += put_varint(head + h, n);
    if (layer) {
        tail[t++] = 0x18; /* field 3, varint */
        t += put_varint(tail + t, layer);
    }
    if (offset) {
        tail[t++] = 0x20; /* field 4, varint */
        t += put_varint(tail + t, offset);
    }
    atomic_fetch_add(&b->refs, 1);
    grpc_slice s[3] = {grpc_slice_from_copied_buffer((const char *)head, h),
                       grpc_slice_new_with_user_data((void *)(uintptr_t)p, n, get_buf_unref, b),
                       grpc_slice_from_copied_buffer((const char *)tail, t)};
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(s, t ? 3 : 2);
    for (int i = 0; i < 3; i++)
        grpc_slice_unref(s[i]);
    return bb;
}

/* Sends bb, the stream's next message. The last one (every item sent, none in flight)
 * carries the status in the same batch: one write and one completion fewer per call, which
 * is a large part of a small Get's time. */
static void send_next(kvs_call *c, grpc_byte_buffer *bb)
{
    kvs_get_state *g = &c->u.get;
    bool last = false;
    if (g->send >= g->n) {
        pthread_mutex_lock(&g->mu);
        last = g->inflight == 0 && g->end_kind == END_NONE;
        if (last)
            g->end_kind = END_REPLY;
        pthread_mutex_unlock(&g->mu);
    }
    if (last)
        kvs_call_reply_buffer(c, bb);
    else
        kvs_call_send_buffer(c, bb);
}

/* The data path's answer for one item (any thread). */
static void item_ready(void *arg, int rc, const kvs_err *err)
{
    kvs_get_item *it = arg;
    kvs_call *c = it->c;
    kvs_get_state *g = &c->u.get;
    pthread_mutex_lock(&g->mu);
    it->rc = rc;
    if (rc == KVS_ENOSPC && it->dst) /* an encoded block larger than the region's slot */
        snprintf(it->msg, sizeof it->msg, "region_slot_bytes: %.200s",
                 err ? err->msg : "too small");
    else if (rc)
        snprintf(it->msg, sizeof it->msg, "%s", err ? err->msg : kvs_strerror(rc));
    it->ready = true;
    g->inflight--;
    bool resume = g->waiting && g->wait_for == it->index && g->end_kind == END_NONE;
    if (resume)
        g->waiting = false;
    bool ended = g->end_kind != END_NONE && g->inflight == 0;
    end_kind kind = g->end_kind;
    pthread_mutex_unlock(&g->mu);
    if (ended)
        do_end(c, kind, g->end_rc, g->end_msg);
    else if (resume)
        advance(c);
}

static void item_fail(kvs_get_item *it, int rc, const char *msg)
{
    kvs_get_state *g = &it->c->u.get;
    pthread_mutex_lock(&g->mu);
    it->rc = rc;
    snprintf(it->msg, sizeof it->msg, "%s", msg);
    it->ready = true;
    pthread_mutex_unlock(&g->mu);
}

/* Finds the item's block and starts its read and decode. */
static void open_item(kvs_call *c, kvs_get_item *it)
{
    kvs_get_state *g = &c->u.get;
    kvs_err err;
    kvs_err_clear(&err);
    kvs_xfer_get_req q = {.ns = g->ns,
                          .key = it->key,
                          .key_len = it->key_len,
                          .encoded = g->encoded,
                          .layer_begin = g->layer_begin,
                          .layer_end = g->layer_end};
    int rc = kvs_xfer_get_open(c->srv->xfer, &q, &it->op, &err);
    if (rc) {
        item_fail(it, rc, err.msg);
        return;
    }
    kvs_xfer_buf dst = {.kind = it->region && kvs_region_device(it->region) ? KVS_XFER_DEVICE
                                                                            : KVS_XFER_HOST,
                        .gpu = (uint8_t)(it->region ? kvs_region_gpu(it->region) : 0)};
    if (g->dev_paged) { /* the engine scatters into the pages in GPU memory */
        dst = (kvs_xfer_buf){.kind = KVS_XFER_DEVICE,
                             .ptr = kvs_region_base(g->region),
                             .len = kvs_region_len(g->region),
                             .lay = &g->layout,
                             .pages = g->pages + (size_t)it->index * g->pages_per_block,
                             .gpu = (uint8_t)kvs_region_gpu(g->region)};
    } else if (g->encoded && it->dst) { /* the stored bytes into the region's slot */
        dst.ptr = it->dst;
        dst.len = g->slot_bytes;
    } else if (!g->encoded) {
        dst.len = kvs_xfer_get_raw_bytes(it->op);
        if (it->dst && dst.len > g->slot_bytes) {
            snprintf(err.msg, sizeof err.msg,
                     "region_slot_bytes: the block's %llu bytes do not fit a slot of %llu",
                     (unsigned long long)dst.len, (unsigned long long)g->slot_bytes);
            item_fail(it, KVS_ENOSPC, err.msg);
            return;
        }
        if (!it->dst) {
            it->rawbuf = kvs_xcalloc(1, sizeof *it->rawbuf);
            atomic_init(&it->rawbuf->refs, 1);
            it->rawbuf->xfer = c->srv->xfer;
            it->rawbuf->p = it->raw = kvs_call_buf_alloc(c, dst.len);
        }
        if (!(dst.ptr = it->dst ? it->dst : it->raw)) {
            snprintf(err.msg, sizeof err.msg, "decode: cannot allocate %llu bytes",
                     (unsigned long long)dst.len);
            item_fail(it, KVS_ENOMEM, err.msg);
            return;
        }
    }
    pthread_mutex_lock(&g->mu);
    g->inflight++;
    pthread_mutex_unlock(&g->mu);
    if ((rc = kvs_xfer_get_run(it->op, g->encoded && !it->dst ? NULL : &dst, item_ready, it,
                               &err))) {
        pthread_mutex_lock(&g->mu);
        g->inflight--;
        pthread_mutex_unlock(&g->mu);
        item_fail(it, rc, err.msg);
    }
}

static int prepare(kvs_call *c, const char *ns_name, Kvstash__V1__Format format,
                   uint32_t layer_begin, uint32_t layer_end, kvs_err *err)
{
    kvs_get_state *g = &c->u.get;
    int rc = kvs_call_ns_find(c, ns_name, &g->ns, err);
    if (rc)
        return rc;
    if (format != KVSTASH__V1__FORMAT__FORMAT_RAW && format != KVSTASH__V1__FORMAT__FORMAT_ENCODED)
        return kvs_err_set(err, KVS_EINVAL, "format: unknown value %d", (int)format);
    g->encoded = format == KVSTASH__V1__FORMAT__FORMAT_ENCODED;
    if (g->encoded && (layer_begin || layer_end))
        return kvs_err_set(err, KVS_EINVAL,
                           "layer_begin: a layer range needs format RAW (an "
                           "encoded block is served whole)");
    return kvs_wire_layer_range(layer_begin, layer_end, kvs_ns_spec_of(g->ns)->layers,
                                &g->layer_begin, &g->layer_end, err);
}

/* Items for n keys. */
static void items_alloc(kvs_call *c, uint32_t n)
{
    kvs_get_state *g = &c->u.get;
    g->n = n;
    g->items = kvs_xcalloc(n, sizeof *g->items);
    for (uint32_t i = 0; i < n; i++) {
        g->items[i].c = c;
        g->items[i].index = i;
    }
}

static int parse_get(kvs_call *c, const uint8_t *req, size_t len, kvs_err *err)
{
    Kvstash__V1__GetRequest *r = (Kvstash__V1__GetRequest *)kvs_wire_unpack(
        &kvstash__v1__get_request__descriptor, req, len, err);
    if (!r)
        return err->code;
    int rc = prepare(c, r->namespace_, r->format, r->layer_begin, r->layer_end, err);
    if (rc == 0)
        rc = kvs_key_validate(r->key.len, err);
    c->u.get.pack = r->pack_layers;
    if (rc == 0) {
        items_alloc(c, 1);
        memcpy(c->u.get.items[0].key, r->key.data, r->key.len);
        c->u.get.items[0].key_len = r->key.len;
    }
    kvstash__v1__get_request__free_unpacked(r, NULL);
    return rc;
}

/* GetMany into an engine's paged KV in shared memory: every item's pages are checked for a
 * full block against the region now (a partial block uses the first of them). */
static int paged_prepare(kvs_call *c, const Kvstash__V1__GetManyRequest *r, kvs_err *err)
{
    kvs_get_state *g = &c->u.get;
    const kvs_ns_spec *spec = kvs_ns_spec_of(g->ns);
    if (g->encoded)
        return kvs_err_set(err, KVS_EINVAL, "layout: paged blocks need format RAW");
    if (!r->layout)
        return kvs_err_set(err, KVS_EINVAL, "layout: missing (pages given)");
    g->layout_bases = kvs_xcalloc(2 * KVS_MAX_LAYERS, sizeof *g->layout_bases);
    int rc = kvs_wire_paged_layout(r->layout, spec, &g->layout, g->layout_bases, err);
    if (rc)
        return rc;
    if (g->layout.page_tokens == 0)
        return kvs_err_set(err, KVS_EINVAL, "layout.page_tokens: must be at least 1");
    uint32_t ppb = kvs_paged_pages(&g->layout, spec->block_tokens);
    if (r->n_pages != (size_t)ppb * g->n)
        return kvs_err_set(err, KVS_EINVAL,
                           "pages: %zu page ids for %u keys of %u pages each (block_tokens %u, "
                           "page_tokens %u)",
                           r->n_pages, g->n, ppb, spec->block_tokens, g->layout.page_tokens);
    uint8_t *base;
    if ((rc = kvs_regions_acquire(c->srv->regions, r->region.data, r->region.len, 0, 0, "region",
                                  &g->region, &base, err)))
        return rc;
    /* GPU memory: the engine scatters each block as it decodes it, no buffer here. */
    g->dev_paged = kvs_region_device(g->region);
    g->pages = kvs_xcalloc(r->n_pages, sizeof *g->pages);
    memcpy(g->pages, r->pages, r->n_pages * sizeof *g->pages);
    g->pages_per_block = ppb;
    g->paged = true;
    for (uint32_t i = 0; i < g->n; i++)
        if ((rc = kvs_paged_check(&g->layout, spec, kvs_region_len(g->region), g->pages + i * ppb,
                                  ppb, spec->block_tokens, err)))
            return kvs_err_prefix(err, "key %u", i);
    return 0;
}

static int parse_get_many(kvs_call *c, const uint8_t *req, size_t len, kvs_err *err)
{
    kvs_get_state *g = &c->u.get;
    Kvstash__V1__GetManyRequest *r = (Kvstash__V1__GetManyRequest *)kvs_wire_unpack(
        &kvstash__v1__get_many_request__descriptor, req, len, err);
    if (!r)
        return err->code;
    kvs_store_key *keys = NULL;
    int rc = prepare(c, r->namespace_, r->format, r->layer_begin, r->layer_end, err);
    if (rc)
        goto out;
    g->prefix = r->prefix;
    g->pack = true;
    if (r->n_keys == 0 || r->n_keys > c->srv->cfg->max_keys) {
        rc = kvs_wire_check_keys(r->keys, r->n_keys, c->srv->cfg->max_keys, NULL, err);
        goto out;
    }
    keys = kvs_xcalloc(r->n_keys, sizeof *keys);
    if ((rc = kvs_wire_check_keys(r->keys, r->n_keys, c->srv->cfg->max_keys, keys, err)))
        goto out;
    if (r->region.len == 0 && (r->n_region_offsets || r->region_slot_bytes)) {
        rc = kvs_err_set(err, KVS_EINVAL, "region_offsets: given without a region");
        goto out;
    }
    if (r->region.len == 0 && (r->layout || r->n_pages)) {
        rc = kvs_err_set(err, KVS_EINVAL, "layout, pages: given without a region");
        goto out;
    }
    if (r->region.len && !(r->layout || r->n_pages) && r->n_region_offsets != r->n_keys) {
        rc = kvs_err_set(err, KVS_EINVAL, "region_offsets: %zu offsets for %zu keys (one each)",
                         r->n_region_offsets, r->n_keys);
        goto out;
    }
    if (r->region.len && !(r->layout || r->n_pages) && r->region_slot_bytes == 0) {
        rc = kvs_err_set(err, KVS_EINVAL, "region_slot_bytes: needed with a region (> 0)");
        goto out;
    }
    items_alloc(c, (uint32_t)r->n_keys);
    g->slot_bytes = r->region_slot_bytes;
    g->slots = r->region.len && !(r->layout || r->n_pages);
    for (uint32_t i = 0; i < g->n; i++) {
        kvs_get_item *it = &g->items[i];
        memcpy(it->key, keys[i].data, keys[i].len);
        it->key_len = keys[i].len;
        if (!r->region.len || r->layout || r->n_pages)
            continue;
        char field[48];
        snprintf(field, sizeof field, "region_offsets[%u]", i);
        if ((rc = kvs_regions_acquire(c->srv->regions, r->region.data, r->region.len,
                                      r->region_offsets[i], g->slot_bytes, field, &it->region,
                                      &it->dst, err)))
            goto out;
        if (g->encoded && kvs_region_device(it->region)) {
            rc = kvs_err_set(err, KVS_EINVAL,
                             "format: ENCODED into GPU memory (a CUDA IPC region) is not "
                             "supported: ask for RAW (decoded there by the daemon's GPU) or "
                             "name a shared-memory region");
            goto out;
        }
    }
    if (r->layout || r->n_pages)
        rc = paged_prepare(c, r, err);
out:
    free(keys);
    kvstash__v1__get_many_request__free_unpacked(r, NULL);
    return rc;
}

void kvs_get_start(kvs_call *c, const uint8_t *req, size_t len)
{
    kvs_get_state *g = &c->u.get;
    g->many = c->rpc == KVS_RPC_GET_MANY;
    pthread_mutex_init(&g->mu, NULL);
    g->mu_init = true;
    kvs_err err;
    kvs_err_clear(&err);
    /* A stream slot first (daemon/limits.h): each Get holds read-ahead buffers for as long
     * as its client keeps it open, so their number is bounded. */
    char *peer = grpc_call_get_peer(c->call);
    int rc = kvs_limits_open(c->srv->limits, KVS_LIMITS_GET, peer, &g->slot, &err);
    gpr_free(peer);
    if (rc == 0)
        rc = g->many ? parse_get_many(c, req, len, &err) : parse_get(c, req, len, &err);
    if (rc) {
        /* Nothing was opened, nothing is in flight: end now. */
        kvs_call_fail(c, rc, err.msg);
        return;
    }
    g->chunk = c->srv->cfg->max_message > 4096 ? c->srv->cfg->max_message - 1024 : 3072;
    if (g->chunk > GET_CHUNK_MAX)
        g->chunk = GET_CHUNK_MAX;
    advance(c);
}

/* Headers of region slots sent in one message at most (GetChunk.more): a message per
 * block cost more than the block's own move once the GPU engine decodes a batch at once. */
#define GET_HEADERS_MAX 64

/* The codecs a served block is stored with (GetHeader fields 16-18): of each side's role
 * (gpu/codec/codec.h kvs_enc): the namespace's own, its fallback codec for a side whose
 * error passed max_rel_error, or a colder tier's. */
static void header_codecs(const kvs_ns_spec *spec, unsigned enc, Kvstash__V1__GetHeader *hdr)
{
    hdr->fallback = kvs_enc_fallback(enc) != 0;
    hdr->key_codec = kvs_pb_str(kvs_spec_enc_codec(spec, KVS_KEYS, kvs_enc_side(enc, KVS_KEYS)));
    hdr->value_codec =
        kvs_pb_str(kvs_spec_enc_codec(spec, KVS_VALUES, kvs_enc_side(enc, KVS_VALUES)));
}

/* A region slot's header (ok or error): the bytes are in the slot already. */
static void slot_header(kvs_call *c, const kvs_get_item *it, Kvstash__V1__GetHeader *hdr)
{
    kvs_get_state *g = &c->u.get;
    const kvs_ns_spec *spec = kvs_ns_spec_of(g->ns);
    hdr->index = it->index;
    if (it->rc) {
        hdr->code = (uint32_t)kvs_err_grpc_status(it->rc);
        hdr->error = (char *)(uintptr_t)it->msg; /* packed only */
        return;
    }
    hdr->tokens = kvs_xfer_get_tokens(it->op);
    hdr->dtype = (Kvstash__V1__Dtype)spec->dtype;
    hdr->tier = (Kvstash__V1__Tier)kvs_xfer_get_tier(it->op);
    if (g->encoded) { /* the stored block, whole */
        size_t len;
        kvs_xfer_get_encoded(it->op, &len);
        hdr->format = KVSTASH__V1__FORMAT__FORMAT_ENCODED;
        hdr->layer_end = spec->layers;
        hdr->total_bytes = len;
    } else {
        hdr->format = KVSTASH__V1__FORMAT__FORMAT_RAW;
        hdr->layer_begin = g->layer_begin;
        hdr->layer_end = g->layer_end;
        hdr->total_bytes =
            kvs_spec_layer_bytes(spec, hdr->tokens) * (g->layer_end - g->layer_begin);
    }
    header_codecs(spec, kvs_xfer_get_enc(it->op), hdr);
    atomic_fetch_add(&c->srv->get_region_bytes, hdr->total_bytes);
}

/* GetMany into region slots: items[send]'s header, and those of the items after it that
 * are ready too (a prefix GetMany stops before an error: advance ends the call there). */
static void send_slot_headers(kvs_call *c)
{
    kvs_get_state *g = &c->u.get;
    Kvstash__V1__GetHeader hdrs[GET_HEADERS_MAX], *more[GET_HEADERS_MAX];
    Kvstash__V1__GetChunk chunk = KVSTASH__V1__GET_CHUNK__INIT;
    size_t n = 0;
    do {
        hdrs[n] = (Kvstash__V1__GetHeader)KVSTASH__V1__GET_HEADER__INIT;
        slot_header(c, &g->items[g->send], &hdrs[n]);
        if (n)
            more[n - 1] = &hdrs[n];
        n++;
        g->send++;
        if (g->send >= g->n || n == GET_HEADERS_MAX)
            break;
        kvs_get_item *nx = &g->items[g->send];
        pthread_mutex_lock(&g->mu);
        bool ready = nx->ready;
        pthread_mutex_unlock(&g->mu);
        if (!ready || (nx->rc && g->prefix))
            break;
    } while (1);
    chunk.header = &hdrs[0];
    chunk.n_more = n - 1;
    chunk.more = more;
    send_next(c, kvs_call_pack(&chunk.base));
}

/* The header of items[send] (ready): its data follows unless it went into the region. */
static void send_header(kvs_call *c, kvs_get_item *it)
{
    if (c->u.get.slots || c->u.get.dev_paged) { /* the bytes are in the region already */
        send_slot_headers(c);
        return;
    }
    kvs_get_state *g = &c->u.get;
    const kvs_ns_spec *spec = kvs_ns_spec_of(g->ns);
    Kvstash__V1__GetHeader hdr = KVSTASH__V1__GET_HEADER__INIT;
    Kvstash__V1__GetChunk chunk = KVSTASH__V1__GET_CHUNK__INIT;
    chunk.header = &hdr;
    hdr.index = it->index;
    if (it->rc) {
        hdr.code = (uint32_t)kvs_err_grpc_status(it->rc);
        hdr.error = it->msg;
        g->send++; /* no data follows */
        send_next(c, kvs_call_pack(&chunk.base));
        return;
    }
    hdr.tokens = kvs_xfer_get_tokens(it->op);
    hdr.dtype = (Kvstash__V1__Dtype)spec->dtype;
    hdr.format = g->encoded ? KVSTASH__V1__FORMAT__FORMAT_ENCODED : KVSTASH__V1__FORMAT__FORMAT_RAW;
    hdr.tier = (Kvstash__V1__Tier)kvs_xfer_get_tier(it->op);
    header_codecs(spec, kvs_xfer_get_enc(it->op), &hdr);
    hdr.layer_begin = g->encoded ? 0 : g->layer_begin;
    hdr.layer_end = g->encoded ? spec->layers : g->layer_end;
    g->layer = g->layer_begin;
    g->offset = 0;
    if (g->encoded) { /* the encoded block is one "layer" for streaming purposes */
        size_t len;
        g->bytes = kvs_xfer_get_encoded(it->op, &len);
        g->layer_bytes = len;
        g->layer_stop = g->layer_begin + 1;
    } else {
        g->bytes = it->dst ? it->dst : it->raw;
        g->layer_bytes = kvs_spec_layer_bytes(spec, hdr.tokens);
        g->layer_stop = g->layer_end;
    }
    hdr.total_bytes = g->layer_bytes * (g->layer_stop - g->layer_begin);
    if (g->paged) { /* into the engine's pages: scattered, only the header is sent */
        kvs_paged_scatter(&g->layout, kvs_region_base(g->region),
                          g->pages + (size_t)it->index * g->pages_per_block, hdr.tokens,
                          g->layer_begin, g->layer_end, it->raw);
        atomic_fetch_add(&c->srv->get_region_bytes, hdr.total_bytes);
        g->send++;
        send_next(c, kvs_call_pack(&chunk.base));
        return;
    }
    atomic_fetch_add(&c->srv->get_wire_bytes, hdr.total_bytes);
    g->header_out = true;
    if (g->encoded) { /* its data chunks reference the stored bytes: the op outlives them */
        it->rawbuf = kvs_xcalloc(1, sizeof *it->rawbuf);
        atomic_init(&it->rawbuf->refs, 1);
        it->rawbuf->op = it->op;
        it->op = NULL;
    }
    kvs_call_send(c, &chunk.base);
}

/* Sends the next message of the stream, or waits for the item it needs (see the diagram).
 * Runs on a CQ thread after a send, at start, or on the thread whose ready callback
 * resumed a waiting sender. */
static void advance(kvs_call *c)
{
    kvs_get_state *g = &c->u.get;
    /* Items before the one being sent are done: their bytes were copied into messages. */
    for (uint32_t i = g->send; i-- > 0 && !g->items[i].closed;)
        item_close(&g->items[i]);
    if (g->send >= g->n) {
        end_call(c, END_REPLY, 0, NULL);
        return;
    }
    uint32_t window = g->slots || g->dev_paged ? GET_WINDOW_SLOTS
                      : g->paged               ? GET_WINDOW_PAGED
                      : g->encoded             ? GET_WINDOW_ENCODED
                                               : GET_WINDOW;
    for (uint32_t i = g->next_open; i < g->n && i < g->send + window; i++)
        open_item(c, &g->items[g->next_open++]);
    kvs_get_item *it = &g->items[g->send];
    if (!g->header_out) {
        pthread_mutex_lock(&g->mu);
        bool ready = it->ready;
        if (!ready) {
            g->waiting = true;
            g->wait_for = g->send;
        }
        pthread_mutex_unlock(&g->mu);
        if (!ready)
            return; /* item_ready resumes */
        if (it->rc && (!g->many || g->prefix)) {
            /* Get: the error is the answer. Prefix: the leading present blocks were sent. */
            end_call(c, g->many ? END_REPLY : END_FAIL, it->rc, it->msg);
            return;
        }
        send_header(c, it);
        return;
    }
    uint64_t n = g->layer_bytes - g->offset;
    uint32_t layers = 1; /* whole layers in this chunk */
    if (g->pack && g->offset == 0 && !g->encoded && g->layer_bytes <= g->chunk) {
        /* Per-message cost dominates small layers (a 1-token block: 32 layers of 4 KiB), so
         * as many whole layers as fit go in one message. */
        layers = (uint32_t)(g->chunk / g->layer_bytes);
        if (layers > g->layer_stop - g->layer)
            layers = g->layer_stop - g->layer;
        n = (uint64_t)layers * g->layer_bytes;
    } else if (n > g->chunk) {
        n = g->chunk;
    }
    const uint8_t *data =
        g->bytes + (uint64_t)(g->layer - g->layer_begin) * g->layer_bytes + g->offset;
    /* The bytes go out by reference, no copy into the message: decoded layers, or the
     * encoded block held by its op (rawbuf); into a region nothing follows the header. */
    grpc_byte_buffer *bb =
        it->rawbuf ? data_chunk_ref(it->rawbuf, data, n, g->encoded ? 0 : g->layer, g->offset)
                   : NULL;
    Kvstash__V1__GetChunk chunk = KVSTASH__V1__GET_CHUNK__INIT;
    /* protobuf-c's data field is not const; the message is only packed (read) */
    chunk.data.data = (uint8_t *)(uintptr_t)data;
    chunk.data.len = n;
    chunk.layer = g->encoded ? 0 : g->layer;
    chunk.offset = g->offset;
    /* Advance before sending: the send may complete, and this handler run again on
     * another CQ thread, before send_next returns. The item is closed by that next run
     * (or, after the last message, by the call's cleanup), after the message was packed
     * (a copy) or with its slices holding a reference to the bytes. */
    g->offset += n;
    if (layers > 1) {
        g->layer += layers;
        g->offset = 0;
        if (g->layer >= g->layer_stop) {
            g->header_out = false;
            g->send++;
        }
    } else if (g->offset == g->layer_bytes) {
        g->layer++;
        g->offset = 0;
        if (g->layer >= g->layer_stop) {
            g->header_out = false;
            g->send++;
        }
    }
    if (bb)
        send_next(c, bb);
    else
        send_next(c, kvs_call_pack(&chunk.base));
}

void kvs_get_on_send(kvs_call *c, bool ok)
{
    if (!ok) { /* the client went away or the deadline passed */
        end_call(c, END_ABANDON, 0, NULL);
        return;
    }
    advance(c);
}
