/* Demotion rounds: see tiering.h. A round picks up to ROUND blocks (kvs_store_gpu_pick),
 * reserves a host block for each (which may evict host blocks, the host tier's usual
 * policy), and queues one engine job per block: a fetch, or, where the host tier's codecs
 * are colder (precision demotion, storage/store.h invariant 9), a re-encode on the device
 * before the copy (kvs_engine_recode_dev); the last completion of the round ends it and
 * kicks again. `busy` is the round's token: whoever sets it runs the round. Each device's
 * gpu tier has rounds of its own (its own token and count), run by its own engine. */
#include "storage/tiering.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "gpu/base/mem.h"
#include "gpu/codec/codec.h"
#include "gpu/codec/format.h"

#define ROUND 64

/* One device's demotion rounds. */
typedef struct dev_rounds {
    kvs_engine *eng;     /* the engine of the store's gpu tier of this device */
    atomic_bool busy;    /* a round is running */
    atomic_uint pending; /* fetches of the running round not yet completed */
} dev_rounds;

struct kvs_tiering {
    kvs_store *st;
    dev_rounds dev[KVS_STORE_GPUS_MAX];
    unsigned devs;
    kvs_tiering_run_fn run; /* completions off the engine thread (may be NULL: inline) */
    void *run_ctx;
    atomic_bool stopping;  /* no new rounds */
    atomic_uint promoting; /* promotions in flight (and callers inside kvs_tiering_promote) */
};

/* An explicit demotion (kvs_tiering_demote): its caller waits for pending to reach 0. */
typedef struct batch {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    size_t pending, moved; /* under mu */
} batch;

typedef struct move {
    kvs_tiering *t;
    dev_rounds *d; /* the block's device */
    batch *b;      /* NULL: a move of the watermark round */
    kvs_block *old, *nb;
    uint64_t raw_bytes;
    size_t len;
    int rc; /* the fetch's */
    /* The block's codecs and the host tier's for it; cpu: the engine has no kernels for the
     * latter, so the pool re-encodes the fetched block (kvs_block_transcode). */
    const kvs_codec *k, *v, *k2, *v2;
    bool cpu;
} move;

static void batch_start(batch *b)
{
    pthread_mutex_lock(&b->mu);
    b->pending++;
    pthread_mutex_unlock(&b->mu);
}

/* A move of b ended; after the unlock b may be gone (its waiter frees it). */
static void batch_end(batch *b, bool moved)
{
    pthread_mutex_lock(&b->mu);
    b->moved += moved;
    if (--b->pending == 0)
        pthread_cond_signal(&b->cv);
    pthread_mutex_unlock(&b->mu);
}

kvs_tiering *kvs_tiering_create(kvs_store *st, kvs_engine *const *engines, unsigned n,
                                kvs_tiering_run_fn run, void *run_ctx)
{
    kvs_tiering *t = kvs_xcalloc(1, sizeof *t);
    t->st = st;
    t->devs = n < KVS_STORE_GPUS_MAX ? n : KVS_STORE_GPUS_MAX;
    for (unsigned g = 0; g < t->devs; g++)
        t->dev[g].eng = engines[g];
    t->run = run;
    t->run_ctx = run_ctx;
    return t;
}

/* Hands an engine completion to the completion thread: commits, evictions (the next
 * round's reservations) and kicks never run on the engine thread, which only drives the
 * GPU. */
static void post(kvs_tiering *t, void (*fn)(void *), void *arg)
{
    if (t->run)
        t->run(t->run_ctx, NULL, fn, arg);
    else
        fn(arg);
}

static void kick_dev(kvs_tiering *t, unsigned g);

static void end_round(kvs_tiering *t, dev_rounds *d)
{
    atomic_store(&d->busy, false);
    if (!atomic_load(&t->stopping))
        kick_dev(t, (unsigned)(d - t->dev));
}

/* Completion thread: one block's bytes are on the host (or the fetch failed). Its codecs
 * are what its header says: the host tier's, or, where a re-encode could not be done, the
 * ones it had (it is still the block). */
static void fetched(void *arg)
{
    move *m = arg;
    kvs_tiering *t = m->t;
    dev_rounds *d = m->d;
    batch *b = m->b;
    int rc = m->rc;
    kvs_block_info info;
    if (rc == 0)
        rc = kvs_format_peek(kvs_block_data(m->nb), m->len, &info, NULL);
    if (rc == 0) {
        kvs_block_set_size(m->nb, m->len, m->raw_bytes);
        kvs_block_set_enc(m->nb, kvs_block_encodings(kvs_ns_spec_of(kvs_block_ns(m->old)), &info));
        kvs_store_demote_commit(t->st, m->old, m->nb);
    } else {
        kvs_store_block_abort(t->st, m->nb);
        kvs_store_demote_cancel(t->st, m->old);
    }
    free(m);
    if (b)
        batch_end(b, rc == 0);
    else if (atomic_fetch_sub(&d->pending, 1) == 1)
        end_round(t, d);
}

/* Pool thread: the engine fetched a block whose re-encode it cannot run; the CPU codecs
 * write the same bytes (gpu/codec/codec.h kvs_block_transcode). Should that fail, the
 * block goes down as it was fetched. */
static void recode_job(void *arg)
{
    move *m = arg;
    uint8_t *data = kvs_block_data(m->nb);
    size_t cap = kvs_block_encoded_max(m->k2, m->v2, kvs_block_tokens(m->old)), len;
    uint8_t *tmp = kvs_trymalloc(cap);
    if (tmp &&
        kvs_block_transcode(m->k, m->v, m->k2, m->v2, data, m->len, tmp, cap, &len, NULL) == 0) {
        memcpy(data, tmp, len); /* smaller: every side that changed got smaller */
        m->len = len;
    }
    free(tmp);
}

/* Engine thread: the fetch ended; the rest runs on the completion thread (after a CPU
 * re-encode on the pool, where one is due). */
static void on_fetched(void *arg, int rc, const kvs_err *err)
{
    (void)err;
    move *m = arg;
    m->rc = rc;
    if (rc == 0 && m->cpu && m->t->run)
        m->t->run(m->t->run_ctx, recode_job, fetched, m);
    else if (rc == 0 && m->cpu) {
        recode_job(m);
        fetched(m);
    } else {
        post(m->t, fetched, m);
    }
}

/* Queues the demotion of one picked block for the round (b NULL) or for batch b; false if
 * it could not start (cancelled). */
static bool start_move(kvs_tiering *t, kvs_block *old, batch *b)
{
    unsigned g = kvs_block_gpu(old);
    dev_rounds *dr = &t->dev[g];
    kvs_ns *ns = kvs_block_ns(old);
    const kvs_block_dev *d = kvs_block_device(old);
    uint32_t tokens = kvs_block_tokens(old);
    unsigned enc = kvs_block_enc(old), to = kvs_ns_colder(ns, enc, KVS_ENC_HOST, tokens);
    const kvs_codec *k, *v, *k2, *v2;
    uint64_t raw_bytes = 0;
    kvs_err err;
    if (kvs_ns_codecs_enc(ns, enc, d->k_state, d->v_state, &k, &v, NULL) ||
        kvs_ns_codecs_enc(ns, to, d->k_state, d->v_state, &k2, &v2, NULL) ||
        kvs_spec_block_bytes(kvs_ns_spec_of(ns), tokens, &raw_bytes, &err)) {
        kvs_store_demote_cancel(t->st, old);
        return false;
    }
    move *m = kvs_xcalloc(1, sizeof *m);
    /* Re-encoded on the device when the engine runs the host tier's codecs, else on the
     * pool once fetched; the host block is reserved for the block as it is (a re-encode
     * only makes it smaller, and the engine falls back to it: engine.h). */
    bool recode = to != enc, gpu = recode && kvs_engine_accepts(dr->eng, k2, v2);
    *m = (move){.t = t,
                .d = dr,
                .b = b,
                .old = old,
                .raw_bytes = raw_bytes,
                .k = k,
                .v = v,
                .k2 = k2,
                .v2 = v2,
                .cpu = recode && !gpu};
    uint64_t cap = kvs_block_encoded_max(k, v, tokens);
    if (kvs_store_block_alloc_nodrop(t->st, ns, tokens, cap, &m->nb, &err)) {
        free(m); /* no room without losing a block: try again next round */
        kvs_store_demote_cancel(t->st, old);
        return false;
    }
    if (b)
        batch_start(b);
    else
        atomic_fetch_add(&dr->pending, 1);
    int rc =
        gpu ? kvs_engine_recode_dev(dr->eng, k, v, k2, v2, kvs_ns_id(ns), tokens, d->slot, d->lens,
                                    kvs_block_data(m->nb), cap, &m->len, on_fetched, m, &err)
            : kvs_engine_fetch_dev(dr->eng, k, v, kvs_ns_id(ns), tokens, d->slot, d->lens,
                                   kvs_block_data(m->nb), cap, &m->len, on_fetched, m, &err);
    if (rc) {
        if (b)
            batch_end(b, false);
        else
            atomic_fetch_sub(&dr->pending, 1);
        kvs_store_block_abort(t->st, m->nb);
        kvs_store_demote_cancel(t->st, old);
        free(m);
        return false;
    }
    return true;
}

/* Starts a round of device g's tier if it is above its high watermark and none runs. */
static void kick_dev(kvs_tiering *t, unsigned g)
{
    dev_rounds *d = &t->dev[g];
    if (atomic_load(&t->stopping) || !kvs_store_gpu_over_high(t->st, g))
        return;
    if (atomic_exchange(&d->busy, true))
        return; /* a round is running; its end kicks again */
    kvs_block *picked[ROUND];
    size_t n = kvs_store_gpu_pick(t->st, g, picked, ROUND);
    /* The round's own token keeps `pending` above zero until every move is queued, so a
     * fast completion cannot end the round early. */
    atomic_store(&d->pending, 1);
    size_t started = 0;
    for (size_t i = 0; i < n; i++)
        started += start_move(t, picked[i], NULL);
    if (atomic_fetch_sub(&d->pending, 1) == 1) {
        /* Nothing in flight: either nothing was picked or every move was refused. Do not
         * kick again from here (it would spin); the next Put or timer will. */
        atomic_store(&d->busy, false);
        if (started)
            kick_dev(t, g);
    }
}

void kvs_tiering_kick(kvs_tiering *t)
{
    for (unsigned g = 0; t && g < t->devs; g++)
        kick_dev(t, g);
}

size_t kvs_tiering_demote(void *arg, kvs_block **picked, size_t n)
{
    kvs_tiering *t = arg;
    batch b = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER, .pending = 1};
    /* Our own token keeps pending above zero until every move is queued. */
    for (size_t i = 0; i < n; i++)
        start_move(t, picked[i], &b);
    pthread_mutex_lock(&b.mu);
    b.pending--;
    while (b.pending > 0)
        pthread_cond_wait(&b.cv, &b.mu);
    size_t moved = b.moved;
    pthread_mutex_unlock(&b.mu);
    pthread_cond_destroy(&b.cv);
    pthread_mutex_destroy(&b.mu);
    return moved;
}

/* A promotion: the host block (with the promoter's reference) and its gpu copy. */
typedef struct promo {
    kvs_tiering *t;
    kvs_engine *eng; /* of the device it goes to */
    kvs_block *old, *g;
    int rc; /* the upload's */
} promo;

/* Completion thread: the host block's sections are in the slot (or the copy failed). */
static void uploaded(void *arg)
{
    promo *p = arg;
    kvs_tiering *t = p->t;
    if (p->rc == 0)
        kvs_store_promote_commit(t->st, p->old, p->g);
    else
        kvs_store_promote_cancel(t->st, p->old, p->g);
    free(p);
    atomic_fetch_sub(&t->promoting, 1);
}

/* Engine thread: the upload ended; the swap runs on the completion thread. */
static void on_uploaded(void *arg, int rc, const kvs_err *err)
{
    (void)err;
    promo *p = arg;
    p->rc = rc;
    post(p->t, uploaded, p);
}

/* Begins blk's promotion to device g's tier (g < 0: none) if its engine runs k and v. */
static bool promote_on(kvs_tiering *t, int g, kvs_block *blk, const kvs_codec *k,
                       const kvs_codec *v, uint64_t slot, kvs_block **out)
{
    return g >= 0 && (unsigned)g < t->devs && kvs_engine_accepts(t->dev[g].eng, k, v) &&
           kvs_store_promote_begin(t->st, (unsigned)g, blk, slot, out);
}

void kvs_tiering_promote(kvs_tiering *t, kvs_block *blk, int near)
{
    if (!t || kvs_block_tier(blk) != KVS_STORE_TIER_HOST)
        return;
    /* Counted before the check, so that destroy either sees us or we see it stopping. */
    atomic_fetch_add(&t->promoting, 1);
    kvs_ns *ns = kvs_block_ns(blk);
    kvs_block_info info;
    const kvs_codec *k = NULL, *v = NULL;
    promo *p = NULL;
    if (!atomic_load(&t->stopping) &&
        kvs_format_peek(kvs_block_data(blk), kvs_block_size(blk), &info, NULL) == 0 &&
        kvs_ns_block_codecs(ns, &info, &k, &v, NULL, NULL) == 0) {
        /* One slot size per namespace and encodings, a full block's, as Puts use: a block
         * stored with other codecs than the namespace's own (a fallback, a colder tier's)
         * keeps them on the GPU (storage/slots.h, store.h invariant 9). On the reader's
         * device when it has room, so its next Get decodes there; else the roomiest. */
        uint64_t slot = kvs_engine_slot_bytes(k, v, kvs_ns_spec_of(ns)->block_tokens);
        p = kvs_xcalloc(1, sizeof *p);
        *p = (promo){.t = t, .old = blk};
        int g = near;
        if (!promote_on(t, g, blk, k, v, slot, &p->g)) {
            g = kvs_store_gpu_choose(t->st, ns, slot);
            if (g == near || !promote_on(t, g, blk, k, v, slot, &p->g))
                g = -1;
        }
        if (g >= 0) {
            p->eng = t->dev[g].eng;
        } else {
            free(p);
            p = NULL;
        }
    }
    if (!p) {
        atomic_fetch_sub(&t->promoting, 1);
        return;
    }
    kvs_block_dev *d = kvs_block_device(p->g);
    d->k_state = info.k_state;
    d->v_state = info.v_state;
    kvs_err err;
    if (kvs_engine_upload_dev(p->eng, k, v, kvs_block_data(blk), kvs_block_size(blk),
                              KVS_BLOCK_VERIFIED, d->slot, d->lens, on_uploaded, p, &err))
        on_uploaded(p, -1, &err); /* refused (a malformed block: its Get will say so) */
}

static bool rounds_running(kvs_tiering *t)
{
    for (unsigned g = 0; g < t->devs; g++)
        if (atomic_load(&t->dev[g].busy))
            return true;
    return false;
}

void kvs_tiering_destroy(kvs_tiering *t)
{
    if (!t)
        return;
    atomic_store(&t->stopping, true);
    while (rounds_running(t) || atomic_load(&t->promoting)) {
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    free(t);
}
