/* Put and PutMany: the client-streaming state machine (DESIGN §2, §4). Protocol only: where
 * a block goes and who encodes it is the data path's (storage/xfer.h). A Put is a PutMany
 * of exactly one block that answers with that block's outcome (a status), so both share
 * one machine.
 *
 *   arrive ──slot (--max-puts, --max-puts-per-conn)──> start ──recv──> HEADER ──valid──┐
 *     └─ no slot: fail(RESOURCE_EXHAUSTED)        └─bad─> fail(INVALID_ARGUMENT / NOT_FOUND)
 *   ┌──────────────────────────────────────────────────────────────────────────────────┘
 *   ├─ region ref (shared memory): the payload is there already ──> complete
 *   └─recv──> DATA (the first takes the block's receive buffer from --recv-budget: when
 *             this call's own earlier blocks hold it, after they give it back (take_budget);
 *             else, or after BUDGET_WAIT_S, fails RESOURCE_EXHAUSTED) ──recv──> DATA ...
 *             ──> complete
 *   complete ──> kvs_xfer_put (reserve a tier, encode, commit) ──consumed──> receive buffer
 *             back to the budget (region reference dropped) ──done──> the block's result
 *             (PutMany: at once, and the next header may follow; Put: at the end of stream)
 *   end of stream, every block done ──> reply (PutReply / PutManyReply) or fail
 *   recv !ok (cancelled, --stream-idle, oversize message): abandon once no block is in
 *   the data path; a protocol error (truncated block, data without header): fail, likewise.
 *
 * What a Put holds while its client is sending (limits.h): a stream slot and, from a
 * block's first data chunk, its receive buffer counted in the receive budget; never room
 * in a tier. Only once a block's whole payload is here does the data path reserve it in a
 * tier, so a stalled or slow client never evicts committed blocks.
 *
 * Every size is checked against the namespace before anything is reserved (sizes come
 * from the namespace and the token count, never from the client), and each data chunk is
 * bounds-checked before it is copied. Runs on CQ threads, except the data path's
 * callbacks (pool, loop, engine or disk writer thread), which touch only the block they
 * are given and, under kvs_put_state.mu, the results; the answer is started once
 * (`finishing`) by whichever of them sees the stream ended and nothing outstanding.
 */
#include <errno.h>
#include <grpc/support/alloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "daemon/call.h"
#include "daemon/limits.h"
#include "daemon/region.h"
#include "daemon/wire.h"
#include "gpu/base/mem.h"
#include "gpu/codec/paged.h"
#include "kvstash/v1/kvstash.pb-c.h"
#include "storage/xfer.h"

/* One block of the stream, from its header until the data path is done with it. */
typedef struct kvs_put_block {
    kvs_call *c;
    uint32_t index;
    kvs_ns *ns;            /* reference */
    uint8_t *raw;          /* the payload: the receive buffer, or the region's bytes */
    uint64_t recv_held;    /* bytes of the receive budget raw holds (0: none, or released) */
    kvs_region *region;    /* shared memory: held until the payload is read */
    kvs_xfer_buf gathered; /* a paged block gathered by the data path (kvs_xfer_gather):
                            * raw is its ptr; kvs_xfer_buf_release */
    bool from_region;
    uint64_t expected, received;
    uint32_t tokens;
    uint8_t key[KVS_KEY_MAX];
    size_t key_len;
} kvs_put_block;

typedef struct kvs_put_result {
    int rc;
    char *msg; /* owned, when rc != 0 */
    kvs_store_put_info info;
    uint64_t raw_bytes;
} kvs_put_result;

void kvs_put_start(kvs_call *c, const uint8_t *req, size_t len)
{
    (void)req;
    (void)len;
    kvs_put_state *p = &c->u.put;
    p->many = c->rpc == KVS_RPC_PUT_MANY;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->budget_cv, NULL);
    p->mu_init = true;
    /* A stream slot first (daemon/limits.h): a client cannot open Puts without bound. */
    kvs_err err;
    char *peer = grpc_call_get_peer(c->call);
    int rc = kvs_limits_open(c->srv->limits, KVS_LIMITS_PUT, peer, &p->slot, &err);
    gpr_free(peer);
    if (rc)
        kvs_call_fail(c, rc, err.msg);
    else
        kvs_call_recv(c);
}

/* Frees the receive buffer (or drops the region) and gives its bytes back to the receive
 * budget. Runs where the payload stops being needed: once it is encoded (any thread) or
 * when the block ends. */
static void block_release_payload(kvs_put_block *b)
{
    if (b->region) {
        kvs_region_release(b->region);
        b->region = NULL;
    } else if (b->gathered.ptr) {
        kvs_xfer_buf_release(b->c->srv->xfer, &b->gathered);
    } else {
        kvs_call_buf_free(b->c, b->raw);
    }
    b->raw = NULL;
    if (b->recv_held) {
        kvs_limits_recv_give(b->c->srv->limits, b->recv_held);
        b->recv_held = 0;
        kvs_put_state *p = &b->c->u.put; /* a receive waiting in take_budget may go on */
        pthread_mutex_lock(&p->mu);
        p->budget_held--;
        p->budget_gen++;
        pthread_cond_broadcast(&p->budget_cv);
        pthread_mutex_unlock(&p->mu);
    }
}

/* How long a block waits for the budget its own call's blocks hold (take_budget). */
#define BUDGET_WAIT_S 10
/* Payload bytes that count as a client's progress for the idle sweep (with a header or a
 * block complete): a client must send at least this much per --stream-idle. */
#define PUT_PROGRESS_BYTES (64u << 10)

/* Takes bytes of the receive budget for block b (CQ thread). When the budget is held and
 * some of it by this call's own blocks in the data path (encodes are asynchronous: a
 * PutMany's blocks arrive faster than the pool or the GPU engine consumes them), waits for
 * them to give it back, up to BUDGET_WAIT_S, rather than fail the whole call: the stream
 * is not read meanwhile, so the client's sends back up (backpressure). Budget held by other
 * calls only, a block over the whole budget, or half the CQ threads waiting already:
 * RESOURCE_EXHAUSTED at once, as before. */
static int take_budget(kvs_call *c, kvs_put_block *b, uint64_t bytes, kvs_err *err)
{
    kvs_put_state *p = &c->u.put;
    /* A CQ thread that waits serves nothing else: at most half of them wait. */
    const unsigned most = c->srv->nthreads / 2 ? c->srv->nthreads / 2 : 1;
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += BUDGET_WAIT_S;
    pthread_mutex_lock(&p->mu);
    uint64_t gen = p->budget_gen; /* the releases the next take sees */
    pthread_mutex_unlock(&p->mu);
    int rc;
    while ((rc = kvs_limits_recv_take(c->srv->limits, bytes, err)) != 0) {
        kvs_limits_stats st; /* the budget's size: a block over it never fits */
        kvs_limits_get_stats(c->srv->limits, &st);
        bool slot = atomic_fetch_add(&c->srv->budget_waiters, 1) < most, late = false;
        pthread_mutex_lock(&p->mu);
        bool wait = slot && p->budget_held > 0 && bytes <= st.recv_budget;
        while (wait && !late && p->budget_gen == gen)
            late = pthread_cond_timedwait(&p->budget_cv, &p->mu, &deadline) == ETIMEDOUT;
        gen = p->budget_gen;
        pthread_mutex_unlock(&p->mu);
        atomic_fetch_sub(&c->srv->budget_waiters, 1);
        if (!wait || late)
            return rc;
    }
    b->recv_held = bytes;
    pthread_mutex_lock(&p->mu);
    p->budget_held++;
    pthread_mutex_unlock(&p->mu);
    /* The daemon may have kept the client waiting here: that is not the client's idleness. */
    kvs_call_progress(c);
    return 0;
}

static void block_free(kvs_put_block *b)
{
    if (!b)
        return;
    block_release_payload(b);
    if (b->ns)
        kvs_ns_unref(b->ns);
    free(b);
}

void kvs_put_cleanup(kvs_call *c)
{
    kvs_put_state *p = &c->u.put;
    block_free(p->cur);
    p->cur = NULL;
    for (uint32_t i = 0; i < p->blocks && p->results; i++)
        free(p->results[i].msg);
    free(p->layout_bases);
    p->layout_bases = NULL;
    free(p->results);
    p->results = NULL;
    if (p->mu_init) {
        pthread_mutex_destroy(&p->mu);
        pthread_cond_destroy(&p->budget_cv);
    }
    p->mu_init = false;
    kvs_limits_close(c->srv->limits, KVS_LIMITS_PUT, p->slot);
    p->slot = NULL;
}

/* Answers once the stream has ended and no block is in the data path (any thread). */
static void maybe_finish(kvs_call *c)
{
    kvs_put_state *p = &c->u.put;
    pthread_mutex_lock(&p->mu);
    bool go = p->ended && p->outstanding == 0 && !p->finishing;
    if (go)
        p->finishing = true;
    pthread_mutex_unlock(&p->mu);
    if (!go)
        return;
    if (p->abandoned) {
        kvs_call_abandon(c);
    } else if (p->fail_rc) {
        kvs_call_fail(c, p->fail_rc, p->fail_msg);
    } else if (!p->many) {
        const kvs_put_result *r = &p->results[0];
        if (r->rc) {
            kvs_call_fail(c, r->rc, r->msg ? r->msg : kvs_strerror(r->rc));
            return;
        }
        Kvstash__V1__PutReply reply = KVSTASH__V1__PUT_REPLY__INIT;
        reply.tier = (Kvstash__V1__Tier)r->info.tier;
        reply.encoded_bytes = r->info.stored_bytes;
        reply.raw_bytes = r->raw_bytes;
        reply.replaced = r->info.replaced;
        reply.fallback = kvs_enc_fallback(r->info.enc) != 0;
        kvs_call_reply(c, &reply.base);
    } else {
        Kvstash__V1__PutResult *rs = kvs_xcalloc(p->blocks ? p->blocks : 1, sizeof *rs);
        Kvstash__V1__PutResult **rp = kvs_xcalloc(p->blocks ? p->blocks : 1, sizeof *rp);
        for (uint32_t i = 0; i < p->blocks; i++) {
            const kvs_put_result *r = &p->results[i];
            kvstash__v1__put_result__init(&rs[i]);
            if (r->rc) {
                rs[i].code = (uint32_t)kvs_err_grpc_status(r->rc);
                rs[i].error = r->msg ? r->msg : (char *)(uintptr_t)kvs_strerror(r->rc);
            } else {
                rs[i].tier = (Kvstash__V1__Tier)r->info.tier;
                rs[i].encoded_bytes = r->info.stored_bytes;
                rs[i].replaced = r->info.replaced;
                rs[i].fallback = kvs_enc_fallback(r->info.enc) != 0;
            }
            rp[i] = &rs[i];
        }
        Kvstash__V1__PutManyReply reply = KVSTASH__V1__PUT_MANY_REPLY__INIT;
        reply.n_results = p->blocks;
        reply.results = rp;
        kvs_call_reply(c, &reply.base);
        free(rp);
        free(rs);
    }
}

/* A protocol error or a cancel: no more receives; the call ends once the blocks already
 * in the data path are done (they hold the call). */
static void stop(kvs_call *c, int rc, const char *msg)
{
    kvs_put_state *p = &c->u.put;
    pthread_mutex_lock(&p->mu);
    p->ended = true;
    if (rc == 0)
        p->abandoned = true;
    else if (!p->fail_rc) {
        p->fail_rc = rc;
        snprintf(p->fail_msg, sizeof p->fail_msg, "%s", msg);
    }
    pthread_mutex_unlock(&p->mu);
    maybe_finish(c);
}

/* Records block b's outcome (any thread). */
static void block_result(kvs_put_block *b, int rc, const char *msg, const kvs_store_put_info *info)
{
    kvs_call *c = b->c;
    kvs_put_state *p = &c->u.put;
    pthread_mutex_lock(&p->mu);
    kvs_put_result *r = &p->results[b->index];
    r->rc = rc;
    r->msg = rc ? kvs_xstrdup(msg ? msg : kvs_strerror(rc)) : NULL;
    if (info)
        r->info = *info;
    r->raw_bytes = b->expected;
    pthread_mutex_unlock(&p->mu);
}

static void put_consumed(void *arg)
{
    block_release_payload(arg);
}

/* The data path's answer for one block: stored (info), or why not. Runs on whichever
 * thread finished (loop, engine, or the disk writer's for a durable namespace). */
static void put_done(void *arg, int rc, const kvs_err *err, const kvs_store_put_info *info)
{
    kvs_put_block *b = arg;
    kvs_call *c = b->c;
    if (rc == 0)
        atomic_fetch_add(b->from_region ? &c->srv->put_region_bytes : &c->srv->put_wire_bytes,
                         b->expected);
    block_result(b, rc, err ? err->msg : NULL, rc ? NULL : info);
    block_free(b);
    kvs_put_state *p = &c->u.put;
    pthread_mutex_lock(&p->mu);
    p->outstanding--;
    pthread_mutex_unlock(&p->mu);
    maybe_finish(c);
}

/* Hands a complete block to the data path; it belongs to the data path from here. */
static void dispatch(kvs_call *c, kvs_put_block *b)
{
    kvs_put_state *p = &c->u.put;
    pthread_mutex_lock(&p->mu);
    p->outstanding++;
    pthread_mutex_unlock(&p->mu);
    kvs_err err;
    kvs_err_clear(&err);
    /* Device memory: a CUDA IPC region's bytes, or a block the engine gathered from one. */
    bool dev = b->gathered.ptr ? b->gathered.kind == KVS_XFER_DEVICE
                               : b->region && kvs_region_device(b->region);
    unsigned gpu = b->gathered.ptr ? b->gathered.gpu : b->region ? kvs_region_gpu(b->region) : 0;
    kvs_xfer_put_req r = {.ns = b->ns,
                          .key = b->key,
                          .key_len = b->key_len,
                          .tokens = b->tokens,
                          .src = {.kind = dev ? KVS_XFER_DEVICE : KVS_XFER_HOST,
                                  .ptr = b->raw,
                                  .len = b->expected,
                                  .gpu = (uint8_t)gpu},
                          .consumed = put_consumed,
                          .done = put_done,
                          .arg = b};
    if (kvs_xfer_put(c->srv->xfer, &r, &err))
        put_done(b, err.code, &err, NULL);
}

/* A paged block in a region (gpu/codec/paged.h): the data path gathers it into a buffer
 * of its own (kvs_xfer_gather: host memory from shared memory, device memory from a CUDA
 * IPC region), counted in the receive budget as if it had arrived on the stream, so the
 * rest of the Put sees one kind of block. The layout is checked against the region's bytes
 * before any is read. */
static int gather_paged(kvs_call *c, kvs_put_block *b, const Kvstash__V1__PutHeader *h,
                        const kvs_ns_spec *spec, kvs_err *err)
{
    kvs_put_state *p = &c->u.put;
    int rc;
    if (h->layout) {
        if (!p->layout_bases)
            p->layout_bases = kvs_xcalloc(2 * KVS_MAX_LAYERS, sizeof *p->layout_bases);
        if ((rc = kvs_wire_paged_layout(h->layout, spec, &p->layout, p->layout_bases, err)))
            return rc;
        p->have_layout = true;
    } else if (!p->have_layout) {
        return kvs_err_set(err, KVS_EINVAL,
                           "layout: missing (pages given, and no earlier "
                           "header of the stream had a layout)");
    }
    kvs_region *g;
    uint8_t *base;
    if ((rc = kvs_regions_acquire(c->srv->regions, h->region.data, h->region.len, 0, 0, "region",
                                  &g, &base, err)))
        return rc;
    rc = kvs_paged_check(&p->layout, spec, kvs_region_len(g), h->pages, h->n_pages, h->tokens, err);
    if (rc == 0 && (rc = take_budget(c, b, b->expected, err)) == 0) {
        kvs_xfer_buf pages = {.kind = kvs_region_device(g) ? KVS_XFER_DEVICE : KVS_XFER_HOST,
                              .ptr = base,
                              .len = kvs_region_len(g),
                              .lay = &p->layout,
                              .pages = h->pages,
                              .gpu = (uint8_t)kvs_region_gpu(g)};
        rc = kvs_xfer_gather(c->srv->xfer, &pages, h->tokens, &b->gathered, err);
        b->raw = b->gathered.ptr;
    }
    if (rc == 0) {
        b->received = b->expected;
        b->from_region = true;
    }
    kvs_region_release(g);
    return rc;
}

static int on_header(kvs_call *c, const Kvstash__V1__PutHeader *h, kvs_err *err)
{
    kvs_put_state *p = &c->u.put;
    if (!p->many && p->blocks)
        return kvs_err_set(err, KVS_EINVAL, "header: sent twice (only the first chunk is one)");
    if (p->cur)
        return kvs_err_set(err, KVS_EINVAL,
                           "header: block %u got %llu of its %llu bytes before the next header",
                           p->cur->index, (unsigned long long)p->cur->received,
                           (unsigned long long)p->cur->expected);
    if (p->blocks >= c->srv->cfg->max_keys)
        return kvs_err_set(err, KVS_EINVAL,
                           "header: more than %u blocks in one PutMany (--max-keys)",
                           c->srv->cfg->max_keys);
    kvs_put_block *b = kvs_xcalloc(1, sizeof *b);
    b->c = c;
    b->index = p->blocks;
    int rc = kvs_call_ns_find(c, h->namespace_, &b->ns, err);
    if (rc)
        goto fail;
    const kvs_ns_spec *spec = kvs_ns_spec_of(b->ns);
    if ((rc = kvs_key_validate(h->key.len, err)))
        goto fail;
    if ((rc = kvs_spec_block_bytes(spec, h->tokens, &b->expected, err)))
        goto fail;
    if ((int)h->dtype != (int)spec->dtype) {
        rc = kvs_err_set(err, KVS_EINVAL, "dtype: %s given, namespace '%s' stores %s",
                         kvs_dtype_name((kvs_dtype)h->dtype), spec->name,
                         kvs_dtype_name(spec->dtype));
        goto fail;
    }
    if (h->payload_bytes && h->payload_bytes != b->expected) {
        rc = kvs_err_set(err, KVS_EINVAL,
                         "payload_bytes: %llu given, but %u tokens of namespace '%s' take %llu "
                         "bytes",
                         (unsigned long long)h->payload_bytes, h->tokens, spec->name,
                         (unsigned long long)b->expected);
        goto fail;
    }
    bool paged = h->layout || h->n_pages;
    if (!h->region.len && (h->region_offset || paged)) {
        rc = kvs_err_set(err, KVS_EINVAL, "%s: given without a region",
                         paged ? "layout, pages" : "region_offset");
        goto fail;
    }
    if (paged)
        rc = gather_paged(c, b, h, spec, err);
    else if (h->region.len)
        rc = kvs_regions_acquire(c->srv->regions, h->region.data, h->region.len, h->region_offset,
                                 b->expected, "region", &b->region, &b->raw, err);
    if (rc)
        goto fail;
    memcpy(b->key, h->key.data, h->key.len);
    b->key_len = h->key.len;
    b->tokens = h->tokens;
    if (b->region) {
        b->received = b->expected;
        b->from_region = true;
    }
    pthread_mutex_lock(&p->mu);
    if (p->blocks == p->results_cap) {
        p->results_cap = p->results_cap ? 2 * p->results_cap : 8;
        p->results = kvs_xrealloc(p->results, p->results_cap * sizeof *p->results);
    }
    memset(&p->results[p->blocks], 0, sizeof *p->results);
    p->blocks++;
    pthread_mutex_unlock(&p->mu);
    if (b->received == b->expected && p->many)
        dispatch(c, b); /* complete already: the payload was in shared memory */
    else
        p->cur = b;
    return 0;
fail:
    block_free(b);
    return rc;
}

/* The receive buffer, at the block's first data chunk: counted in the receive budget
 * (sized from the namespace, checked at the header), never in a tier. */
static int recv_buffer(kvs_call *c, kvs_put_block *b, kvs_err *err)
{
    int rc = take_budget(c, b, b->expected, err);
    if (rc)
        return rc;
    if (!(b->raw = kvs_call_buf_alloc(c, b->expected)))
        return kvs_err_set(err, KVS_ENOMEM, "payload: cannot allocate %llu bytes",
                           (unsigned long long)b->expected); /* block_free gives it back */
    return 0;
}

/* Counts n bytes just copied into the current block; PutMany hands a complete block to the
 * data path at once. */
static void received(kvs_call *c, uint64_t n)
{
    kvs_put_state *p = &c->u.put;
    p->cur->received += n;
    if (p->many && p->cur->received == p->cur->expected) {
        kvs_put_block *b = p->cur;
        p->cur = NULL;
        dispatch(c, b);
    }
}

static int on_data(kvs_call *c, const uint8_t *data, uint64_t n, kvs_err *err)
{
    kvs_put_state *p = &c->u.put;
    kvs_put_block *b = p->cur;
    if (!b && !p->blocks)
        return kvs_err_set(err, KVS_EINVAL, "header: the first chunk of a Put must be a header");
    if (!b || n > b->expected - b->received || (b->region && n))
        return kvs_err_set(err, KVS_EINVAL,
                           p->many ? "data: after block %u was complete (%s; send its next "
                                     "header first)"
                                   : "payload: more than the bytes block %u takes (%s)",
                           p->blocks - 1,
                           b && b->region ? "its payload is in shared memory"
                                          : "it has all its bytes");
    if (n > 0 && !b->raw) { /* the first data: the receive buffer is taken now */
        int rc = recv_buffer(c, b, err);
        if (rc)
            return rc;
    }
    if (n > 0) { /* an empty chunk carries a NULL pointer: nothing to copy */
        memcpy(b->raw + b->received, data, n);
        received(c, n);
    }
    return 0;
}

static int on_chunk(kvs_call *c, const uint8_t *buf, size_t len, kvs_err *err)
{
    Kvstash__V1__PutChunk *m = (Kvstash__V1__PutChunk *)kvs_wire_unpack(
        &kvstash__v1__put_chunk__descriptor, buf, len, err);
    if (!m)
        return err->code;
    int rc = 0;
    if (m->kind_case == KVSTASH__V1__PUT_CHUNK__KIND_HEADER)
        rc = on_header(c, m->header, err);
    else if (m->kind_case == KVSTASH__V1__PUT_CHUNK__KIND_DATA)
        rc = on_data(c, m->data.data, m->data.len, err);
    else if (!c->u.put.blocks)
        rc = kvs_err_set(err, KVS_EINVAL, "header: the first chunk of a Put must be a header");
    kvstash__v1__put_chunk__free_unpacked(m, NULL);
    return rc;
}

static void on_end(kvs_call *c)
{
    kvs_put_state *p = &c->u.put;
    char msg[256];
    if (!p->blocks && !p->many) {
        stop(c, KVS_EINVAL, "header: the stream ended before a header was sent");
        return;
    }
    if (p->cur && p->cur->received != p->cur->expected) {
        snprintf(msg, sizeof msg,
                 "payload: block %u got %llu of %llu bytes (truncated stream: the client "
                 "half-closed early)",
                 p->cur->index, (unsigned long long)p->cur->received,
                 (unsigned long long)p->cur->expected);
        stop(c, KVS_EINVAL, msg);
        return;
    }
    if (p->cur) { /* Put: its one block is complete */
        kvs_put_block *b = p->cur;
        p->cur = NULL;
        dispatch(c, b);
    }
    pthread_mutex_lock(&p->mu);
    p->ended = true;
    pthread_mutex_unlock(&p->mu);
    maybe_finish(c);
}

void kvs_put_on_recv(kvs_call *c, bool ok)
{
    if (!ok) { /* cancelled, deadline, or grpc refused an oversize message */
        stop(c, 0, NULL);
        return;
    }
    if (!c->recv) {
        kvs_call_progress(c);
        on_end(c);
        return;
    }
    kvs_err err;
    kvs_err_clear(&err);
    kvs_put_state *p = &c->u.put;
    kvs_put_block *b = p->cur;
    uint32_t blocks_before = p->blocks;
    p->idle_bytes += grpc_byte_buffer_length(c->recv);
    int rc = 0;
    uint64_t n = 0;
    /* Data chunks (all but a block's header) go straight from the gRPC slices into the
     * receive buffer; anything else takes the protobuf-c path. */
    int fast = b && b->raw && !b->region ? kvs_wire_put_data(c->recv, b->raw + b->received,
                                                             b->expected - b->received, &n, &err)
                                         : 0;
    if (fast == 1) {
        received(c, n);
    } else if (fast < 0) {
        rc = fast;
    } else {
        grpc_slice s = kvs_call_flatten(c->recv);
        rc = on_chunk(c, GRPC_SLICE_START_PTR(s), GRPC_SLICE_LENGTH(s), &err);
        grpc_slice_unref(s);
    }
    grpc_byte_buffer_destroy(c->recv);
    c->recv = NULL;
    /* Progress that counts for the idle sweep: a header, PUT_PROGRESS_BYTES of payload, a
     * block complete. Tiny messages alone are not: a client sending its payload a byte at
     * a time held its slot, buffer and budget for as long as it liked. */
    if (rc == 0 && (p->blocks != blocks_before || p->idle_bytes >= PUT_PROGRESS_BYTES ||
                    p->cur != b || (b && b->received == b->expected))) {
        p->idle_bytes = 0;
        kvs_call_progress(c);
    }
    if (rc)
        stop(c, rc, err.msg);
    else
        kvs_call_recv(c);
}
