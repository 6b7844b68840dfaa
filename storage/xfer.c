/* The data path: see xfer.h for what it decides and the order of each operation.
 *
 * Ownership: a Put's op (put_op) is owned by whichever step runs, one at a time (the
 * caller's thread, then the engine or the pool, then the completion thread, then the disk
 * writer for a durable block), and freed by finish_put after the caller's done. A Get's
 * op is the caller's from open to close; between run and its done the data path works on
 * it and the caller does not touch it.
 */
#include "storage/xfer.h"

#include <math.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "gpu/base/mem.h"
#include "gpu/codec/codec.h"
#include "gpu/codec/codec_squat.h"
#include "gpu/codec/fidelity.h"
#include "gpu/codec/format.h"
#include "gpu/codec/learn.h"
#include "gpu/engine/engine.h"
#include "storage/tiering.h"

enum { ENCODE = 0, DECODE = 1, MEASURE = 2, CPU = 0, GPU = 1 };

/* Raw bytes up to which a codec-none host block is copied on the caller's thread (a Get's
 * CQ thread in the daemon): 256 KiB copies in tens of microseconds. */
#define XFER_INLINE_MAX (256u << 10)

struct kvs_xfer {
    kvs_xfer_opts o;
    /* kvs_xfer_stats, [op][where]; counted by whichever thread finishes the codec work. */
    atomic_uint_fast64_t ops[3][2], ns[3][2], raw_bytes[3][2], encoded_bytes[3][2];
    atomic_uint_fast64_t sample_bits; /* the default error_sample (a double's bits): live */
    atomic_uint_fast64_t draws;       /* the sampling stream's position */
    unsigned engines;                 /* opts.engine[0..engines) are set */
    /* peer[d][s]: engine d decodes blocks of device s's tier straight from their slots
     * (kvs_engine_peer_enable at create; the diagonal always) */
    bool peer[KVS_STORE_GPUS_MAX][KVS_STORE_GPUS_MAX];
    atomic_uint turn; /* the next engine for host bytes (eng_for) */
};

/* Device g's engine, or NULL when there is none. */
static kvs_engine *eng_at(const kvs_xfer *x, unsigned g)
{
    return g < x->engines ? x->o.engine[g] : NULL;
}

/* The engine that codes bytes in b: a DEVICE buffer's own device's; for host bytes the
 * engines in turn (their queues and staging share the load); NULL without one. */
static kvs_engine *eng_for(kvs_xfer *x, const kvs_xfer_buf *b)
{
    if (b->kind == KVS_XFER_DEVICE)
        return eng_at(x, b->gpu);
    if (x->engines <= 1)
        return eng_at(x, 0);
    return x->o.engine[atomic_fetch_add_explicit(&x->turn, 1, memory_order_relaxed) % x->engines];
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void count(kvs_xfer *x, int op, int where, uint64_t t0, uint64_t raw, uint64_t enc)
{
    atomic_fetch_add_explicit(&x->ops[op][where], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&x->ns[op][where], now_ns() - t0, memory_order_relaxed);
    atomic_fetch_add_explicit(&x->raw_bytes[op][where], raw, memory_order_relaxed);
    atomic_fetch_add_explicit(&x->encoded_bytes[op][where], enc, memory_order_relaxed);
}

void kvs_xfer_get_stats(kvs_xfer *x, kvs_xfer_stats *out)
{
    memset(out, 0, sizeof *out);
    for (int op = 0; op < 3; op++)
        for (int w = 0; w < 2; w++) {
            out->ops[op][w] = atomic_load_explicit(&x->ops[op][w], memory_order_relaxed);
            out->ns[op][w] = atomic_load_explicit(&x->ns[op][w], memory_order_relaxed);
            out->raw_bytes[op][w] =
                atomic_load_explicit(&x->raw_bytes[op][w], memory_order_relaxed);
            out->encoded_bytes[op][w] =
                atomic_load_explicit(&x->encoded_bytes[op][w], memory_order_relaxed);
        }
}

static void xlog(kvs_xfer *x, kvs_log_level lvl, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

kvs_xfer *kvs_xfer_create(const kvs_xfer_opts *o)
{
    kvs_xfer *x = kvs_xcalloc(1, sizeof *x);
    x->o = *o;
    while (x->engines < KVS_STORE_GPUS_MAX && o->engine[x->engines])
        x->engines++;
    for (unsigned d = 0; d < x->engines; d++)
        for (unsigned s = 0; s < x->engines; s++) {
            kvs_err err;
            x->peer[d][s] =
                d == s ||
                (!o->no_peer && kvs_engine_peer_enable(o->engine[d], o->engine[s], &err) == 0);
            if (d != s && !o->no_peer)
                xlog(x, KVS_LOG_INFO, "GPU %u reads GPU %u's tier: %s", d, s,
                     x->peer[d][s] ? "by peer access (encoded bytes over the link)" : err.msg);
        }
    kvs_xfer_set_error_sample(x, o->error_sample);
    return x;
}

void kvs_xfer_set_error_sample(kvs_xfer *x, double share)
{
    uint64_t bits;
    memcpy(&bits, &share, sizeof bits);
    atomic_store_explicit(&x->sample_bits, bits, memory_order_relaxed);
}

double kvs_xfer_error_sample(kvs_xfer *x, const kvs_ns_spec *spec)
{
    if (spec->max_rel_error > 0)
        return 1.0;
    if (spec->error_sample_set)
        return spec->error_sample;
    uint64_t bits = atomic_load_explicit(&x->sample_bits, memory_order_relaxed);
    double share;
    memcpy(&share, &bits, sizeof share);
    return share;
}

void kvs_xfer_destroy(kvs_xfer *x)
{
    free(x);
}

uint8_t *kvs_xfer_host_alloc(kvs_xfer *x, size_t n)
{
    kvs_hostpool *pool = kvs_store_host_pool(x->o.store);
    uint8_t *p = pool ? kvs_hostpool_alloc(pool, n) : NULL;
    return p ? p : kvs_trymalloc(n);
}

void kvs_xfer_host_free(kvs_xfer *x, uint8_t *p)
{
    kvs_hostpool *pool = kvs_store_host_pool(x->o.store);
    if (p && kvs_hostpool_owns(pool, p))
        kvs_hostpool_free(pool, p);
    else
        free(p);
}

int kvs_xfer_gather(kvs_xfer *x, const kvs_xfer_buf *src, uint32_t tokens, kvs_xfer_buf *out,
                    kvs_err *err)
{
    const kvs_paged_layout *lay = src->lay;
    const size_t bytes = kvs_paged_block_bytes(lay, tokens, 0, lay->layers);
    *out = (kvs_xfer_buf){.kind = src->kind, .len = bytes};
    if (src->kind == KVS_XFER_HOST) {
        if (!(out->ptr = kvs_xfer_host_alloc(x, bytes)))
            return kvs_err_set(err, KVS_ENOMEM,
                               "layout: cannot allocate %zu bytes to gather a "
                               "block from its pages",
                               bytes);
        kvs_paged_gather(lay, src->ptr, src->pages, tokens, 0, lay->layers, out->ptr);
        return 0;
    }
    kvs_engine *eng = eng_at(x, src->gpu);
    if (!eng)
        return kvs_err_set(err, KVS_EUNAVAIL, "layout: pages in GPU memory, and no GPU engine");
    void *dev = NULL;
    out->gpu = src->gpu;
    int rc = kvs_engine_gather_dev(eng, lay, src->ptr, src->pages, tokens, &dev, err);
    out->ptr = dev;
    return rc;
}

void kvs_xfer_buf_release(kvs_xfer *x, kvs_xfer_buf *b)
{
    if (b->kind == KVS_XFER_DEVICE)
        kvs_engine_dev_free(eng_at(x, b->gpu), b->ptr);
    else
        kvs_xfer_host_free(x, b->ptr);
    b->ptr = NULL;
}

static void xlog(kvs_xfer *x, kvs_log_level lvl, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void xlog(kvs_xfer *x, kvs_log_level lvl, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    kvs_vlogf(x->o.log, x->o.log_ctx, lvl, fmt, ap);
    va_end(ap);
}

/* Runs fn then done through the caller's pool, or inline; fn NULL: done alone, on the
 * caller's completion thread. */
static void run(kvs_xfer *x, void (*fn)(void *), void (*done)(void *), void *arg)
{
    if (x->o.run) {
        x->o.run(x->o.run_ctx, fn, done, arg);
    } else {
        if (fn)
            fn(arg);
        done(arg);
    }
}

/* ---------------------------------------------------------------- Put */

typedef struct put_op {
    kvs_xfer *x;
    kvs_xfer_put_req r;
    uint8_t key[KVS_KEY_MAX];
    kvs_block *blk;         /* FILLING until commit hands it to the store */
    bool gpu;               /* blk is a GPU tier slot: the engine encodes into it */
    bool measure;           /* the block is measured once encoded (check_block) */
    double sums[4];         /* the engine's error sums (kvs_engine_encode); NaN: none */
    bool no_room;           /* rc KVS_ENOSPC is the store's (a fallback block), not a coder's */
    bool consumed;          /* r.consumed has run */
    uint8_t *bounce;        /* a GPU source copied to the host for the CPU encode */
    kvs_engine *eng;        /* the engine that codes it (eng_for, or its slot's device's) */
    const kvs_codec *k, *v; /* the codecs it is encoded with... */
    unsigned enc;           /* ...and their roles (gpu/codec/codec.h kvs_enc), packed */
    uint64_t raw_bytes;
    size_t enc_len;
    uint64_t t0; /* monotonic ns at the engine's submission (kvs_xfer_stats) */
    int rc;
    kvs_err err;
    kvs_store_put_info info;
} put_op;

static void consume(put_op *op)
{
    if (!op->consumed && op->r.consumed)
        op->r.consumed(op->r.arg);
    op->consumed = true;
    kvs_xfer_host_free(op->x, op->bounce);
    op->bounce = NULL;
}

static void finish_put(put_op *op, int rc, const kvs_err *err)
{
    consume(op);
    if (op->blk)
        kvs_store_block_abort(op->x->o.store, op->blk);
    op->r.done(op->r.arg, rc, rc ? err : NULL, rc ? NULL : &op->info);
    free(op);
}

/* The codecs a Put encodes with: the namespace's current ones in the GPU tier; in the host
 * tier, the host tier's codec for a side where it is colder (precision demotion: store.h
 * invariant 9, the same rule as a demotion's). */
static void put_codecs(put_op *op, bool host)
{
    kvs_ns *ns = op->r.ns;
    op->enc = host ? kvs_ns_colder(ns, 0, KVS_ENC_HOST, op->r.tokens) : 0;
    op->k = kvs_ns_enc_codec(ns, KVS_KEYS, kvs_enc_side(op->enc, KVS_KEYS));
    op->v = kvs_ns_enc_codec(ns, KVS_VALUES, kvs_enc_side(op->enc, KVS_VALUES));
}

/* Placement (xfer.h): the GPU tier when the engine can encode into a slot there, else
 * the host tier (which may evict to make room). A measured block goes to the host tier:
 * its bytes are checked on the CPU (xfer.h "Fidelity"). */
static int reserve(put_op *op, kvs_err *err)
{
    kvs_xfer *x = op->x;
    kvs_ns *ns = op->r.ns;
    const kvs_ns_spec *spec = kvs_ns_spec_of(ns);
    kvs_store *st = x->o.store;
    put_codecs(op, false);
    /* A durable block is written from host memory: it never takes a GPU slot. A RotateKV
     * namespace still calibrating needs the raw keys on the host. */
    op->eng = eng_for(x, &op->r.src);
    if (op->eng && kvs_store_has_gpu(st) && !spec->durable && !op->measure &&
        !kvs_learn_wants_keys(kvs_ns_learner(ns)) && kvs_engine_accepts(op->eng, op->k, op->v)) {
        /* One slot size per namespace: a full block's (a partial block fits in it). Bytes
         * on a device stay on it; host bytes go where there is most room. */
        uint64_t slot = kvs_engine_slot_bytes(op->k, op->v, spec->block_tokens);
        int g =
            op->r.src.kind == KVS_XFER_DEVICE ? op->r.src.gpu : kvs_store_gpu_choose(st, ns, slot);
        kvs_engine *eng = g >= 0 ? eng_at(x, (unsigned)g) : NULL;
        if (eng && kvs_engine_accepts(eng, op->k, op->v) &&
            kvs_store_block_alloc_gpu(st, (unsigned)g, ns, op->r.tokens, 0, slot, &op->blk, NULL) ==
                0) {
            op->eng = eng;
            kvs_block_dev *d = kvs_block_device(op->blk);
            op->gpu = true;
            d->k_state = kvs_codec_state_version(op->k);
            d->v_state = kvs_codec_state_version(op->v);
            return 0;
        }
        kvs_tiering_kick(x->o.tiering); /* full: demote, and land in the host tier now */
    }
    put_codecs(op, true);
    uint64_t enc_max = kvs_block_encoded_max(op->k, op->v, op->r.tokens);
    return kvs_store_block_alloc(st, ns, op->r.tokens, enc_max, &op->blk, err);
}

/* Disk writer thread: the durable write of the block is done (store.h); only now is the
 * Put answered. A failure leaves nothing of the block, so the answer says "not stored":
 * KVS_ENOSPC when the disk tier has no room for it (or KVS_E2BIG: too big for one
 * transaction), KVS_EUNAVAIL when the write or its flush failed (a retry may succeed),
 * KVS_ENOTFOUND when the namespace was dropped meanwhile, KVS_EINTERNAL otherwise. */
static void durable_done(void *arg, int rc, const kvs_err *err)
{
    if (rc == 0) {
        finish_put(arg, 0, NULL);
        return;
    }
    int code = rc == KVS_ENOSPC || rc == KVS_E2BIG || rc == KVS_ENOMEM ? rc
               : rc == KVS_EIO                                         ? KVS_EUNAVAIL
               : rc == KVS_ENOTFOUND                                   ? KVS_ENOTFOUND
                                                                       : KVS_EINTERNAL;
    kvs_err e2;
    kvs_err_set(&e2, code, "durable: the block did not reach disk and is not stored: %s",
                err ? err->msg : kvs_strerror(rc));
    finish_put(arg, code, &e2);
}

/* Commits the encoded block and ends the Put (durable: once it is on disk). */
static void commit(void *arg)
{
    put_op *op = arg;
    kvs_xfer *x = op->x;
    if (op->rc) { /* an encoder's "no room" is ours, not the client's; the store's is */
        finish_put(op, op->rc == KVS_ENOSPC && !op->no_room ? KVS_EINTERNAL : op->rc, &op->err);
        return;
    }
    if (op->gpu) { /* its size as an encoded block, as if it were framed on the host */
        const kvs_block_dev *d = kvs_block_device(op->blk);
        uint32_t L = kvs_ns_spec_of(op->r.ns)->layers;
        op->enc_len = kvs_format_prefix_bytes(L);
        for (uint32_t i = 0; i < 2 * L; i++)
            op->enc_len += d->lens[i];
        count(x, ENCODE, GPU, op->t0, op->raw_bytes, op->enc_len);
    }
    kvs_block_set_size(op->blk, op->enc_len, op->raw_bytes);
    kvs_block_set_enc(op->blk, op->enc);
    kvs_block *blk = op->blk;
    op->blk = NULL; /* the store owns it from here, committed or not */
    kvs_store *st = x->o.store;
    int rc;
    if (kvs_ns_spec_of(op->r.ns)->durable) {
        /* durable_done ends the Put, maybe before this returns: op is not ours after. */
        if ((rc = kvs_store_block_commit_durable(st, blk, op->key, op->r.key_len, &op->info,
                                                 durable_done, op, &op->err)))
            finish_put(op, rc, &op->err);
        return;
    }
    rc = kvs_store_block_commit(st, blk, op->key, op->r.key_len, &op->info, &op->err);
    bool kick = rc == 0 && op->info.tier == KVS_STORE_TIER_GPU;
    struct kvs_tiering *tiering = x->o.tiering;
    finish_put(op, rc, &op->err);
    if (kick)
        kvs_tiering_kick(tiering); /* returns at once below the high watermark */
}

/* ---------------------------------------------------------------- fidelity
 * What a Put's block is checked against (xfer.h "Fidelity"): decided in `measured`, done
 * in check_block, both here and nowhere else. */

static uint64_t splitmix64(uint64_t z)
{
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Whether this Put's block is measured: every one of a namespace with a bound, else the
 * share error_sample of them, drawn from a hashed counter (no lock: concurrent Puts take
 * distinct positions of one uniform stream). */
static bool measured(kvs_xfer *x, const kvs_ns_spec *spec)
{
    double share = kvs_xfer_error_sample(x, spec);
    if (!(share > 0))
        return false;
    if (share >= 1)
        return true;
    uint64_t r = splitmix64(atomic_fetch_add_explicit(&x->draws, 1, memory_order_relaxed));
    return (double)(r >> 11) * 0x1.0p-53 < share;
}

/* Encodes the block again with the fallback codec for `sides` (KVS_FALLBACK_*): in place
 * when the encoding fits the block's reservation, else into a new host block that replaces
 * it (a none fallback needs the raw size; the reservation had the own codecs' size). */
static int refit(put_op *op, unsigned sides, const uint16_t *raw, kvs_err *err)
{
    kvs_ns *ns = op->r.ns;
    kvs_store *st = op->x->o.store;
    const kvs_codec *k =
        sides & KVS_FALLBACK_KEYS ? kvs_ns_enc_codec(ns, KVS_KEYS, KVS_ENC_FALLBACK) : op->k;
    const kvs_codec *v =
        sides & KVS_FALLBACK_VALUES ? kvs_ns_enc_codec(ns, KVS_VALUES, KVS_ENC_FALLBACK) : op->v;
    size_t cap = kvs_block_encoded_max(k, v, op->r.tokens), len;
    kvs_block *blk = op->blk;
    int rc;
    if (cap > kvs_block_size(blk) &&
        (rc = kvs_store_block_alloc(st, ns, op->r.tokens, cap, &blk, err))) {
        op->no_room = rc == KVS_ENOSPC;
        return kvs_err_prefix(err, "max_rel_error: the block's error passed the bound, and "
                                   "there is no room to store it with its fallback codec");
    }
    uint64_t t0 = now_ns();
    rc = kvs_block_encode(k, v, kvs_ns_id(ns), op->r.tokens, raw, kvs_block_data(blk),
                          kvs_block_size(blk), &len, err);
    if (rc) {
        if (blk != op->blk)
            kvs_store_block_abort(st, blk);
        return rc;
    }
    count(op->x, ENCODE, CPU, t0, op->raw_bytes, len);
    if (blk != op->blk) {
        kvs_store_block_abort(st, op->blk);
        op->blk = blk;
    }
    op->k = k;
    op->v = v;
    op->enc_len = len;
    if (sides & KVS_FALLBACK_KEYS)
        op->enc = kvs_enc_set(op->enc, KVS_KEYS, KVS_ENC_FALLBACK);
    if (sides & KVS_FALLBACK_VALUES)
        op->enc = kvs_enc_set(op->enc, KVS_VALUES, KVS_ENC_FALLBACK);
    return 0;
}

/* True if side kv's own codec and the namespace's fallback differ (else falling back would
 * store the same bytes). */
static bool can_fall_back(const kvs_codec *own, const kvs_codec *fallback)
{
    return fallback && (kvs_codec_id_of(own) != kvs_codec_id_of(fallback) ||
                        kvs_codec_bits(own) != kvs_codec_bits(fallback));
}

/* The sides (KVS_FALLBACK_*) of a measured block over its namespace's bound that its
 * fallback codec would store differently; 0 without a bound. */
static unsigned sides_over(const put_op *op, const kvs_fidelity_sample *m)
{
    kvs_ns *ns = op->r.ns;
    double bound = kvs_ns_spec_of(ns)->max_rel_error;
    unsigned sides = 0;
    if (!(bound > 0))
        return 0;
    if (m->err[KVS_FIDELITY_KEYS] > bound &&
        can_fall_back(op->k, kvs_ns_enc_codec(ns, KVS_KEYS, KVS_ENC_FALLBACK)))
        sides |= KVS_FALLBACK_KEYS;
    if (m->err[KVS_FIDELITY_VALUES] > bound &&
        can_fall_back(op->v, kvs_ns_enc_codec(ns, KVS_VALUES, KVS_ENC_FALLBACK)))
        sides |= KVS_FALLBACK_VALUES;
    return sides;
}

/* The query Gram a namespace's blocks are measured with (the logit error): its current key
 * codec's, when that is squat with a subspace; else NULL. */
static const kvs_codec *gram_of(kvs_ns *ns)
{
    const kvs_codec *cur = kvs_ns_codec(ns, KVS_KEYS);
    return kvs_squat_subspace_heads(cur) ? cur : NULL;
}

/* The engine's measurement of op's block, from its sums: false when it made none (the CPU
 * encoded the block, the engine redid its batch on the CPU, or the logit error is wanted). */
static bool engine_sample(const put_op *op, kvs_fidelity_sample *m)
{
    if (isnan(op->sums[0]))
        return false;
    *m = (kvs_fidelity_sample){0};
    m->err[KVS_FIDELITY_KEYS] = kvs_fidelity_ratio(op->sums[0], op->sums[1]);
    m->err[KVS_FIDELITY_VALUES] = kvs_fidelity_ratio(op->sums[2], op->sums[3]);
    return true;
}

/* Decodes op's block on the CPU and measures it against raw (counted as a CPU measure). */
static int cpu_measure(put_op *op, const kvs_codec *gram, const uint16_t *raw,
                       kvs_fidelity_sample *m, kvs_err *e)
{
    uint64_t t0 = now_ns();
    int rc =
        kvs_fidelity_measure(op->k, op->v, gram, raw, kvs_block_data(op->blk), op->enc_len, m, e);
    if (rc == 0)
        count(op->x, MEASURE, CPU, t0, op->raw_bytes, op->enc_len);
    return rc;
}

/* Pool thread, after the encode and before consume (the input must still be there):
 * measures the block against its input (decoding it on the CPU, unless the engine measured
 * it: engine_sample); with a bound, a side whose error passed it is stored with the fallback
 * codec (refit) and measured again on the CPU, so the namespace's figures describe the
 * blocks as stored. Under a bound every failure fails the Put (the bound is a promise); a
 * sample that cannot be measured is logged and the block stored all the same. */
static void check_block(put_op *op)
{
    kvs_ns *ns = op->r.ns;
    const kvs_ns_spec *spec = kvs_ns_spec_of(ns);
    const uint16_t *raw = (const uint16_t *)op->r.src.ptr;
    const kvs_codec *gram = gram_of(ns);
    double bound = spec->max_rel_error;
    kvs_fidelity_sample m;
    kvs_err e;
    int rc = engine_sample(op, &m) ? 0 : cpu_measure(op, gram, raw, &m, &e);
    unsigned sides = rc == 0 ? sides_over(op, &m) : 0;
    if (rc == 0 && sides && (rc = refit(op, sides, raw, &e)) == 0)
        rc = cpu_measure(op, gram, raw, &m, &e);
    if (rc == 0) {
        kvs_fidelity_acc_add(kvs_ns_fidelity(ns), &m, bound > 0, sides);
    } else if (bound > 0) {
        op->rc = e.code;
        op->err = e;
    } else {
        xlog(op->x, KVS_LOG_WARN, "namespace '%s': error sample not measured: %s", spec->name,
             e.msg);
    }
}

/* Pool thread: measure (or refit) a block the GPU engine encoded into host memory. */
static void measure_job(void *arg)
{
    put_op *op = arg;
    check_block(op);
    consume(op);
}

/* Pool thread: learn, encode on the CPU (and measure). */
static void encode_job(void *arg)
{
    put_op *op = arg;
    const uint16_t *raw = (const uint16_t *)op->r.src.ptr;
    kvs_err_clear(&op->err);
    /* RotateKV namespaces learn their key channel order from the first blocks they store
     * (gpu/codec/learn.h); a calibration failure costs quality, never the Put. */
    kvs_err lerr;
    if (kvs_learn_keys(kvs_ns_learner(op->r.ns), op->r.ns, op->r.tokens, raw, &lerr))
        xlog(op->x, KVS_LOG_WARN, "namespace '%s': calibration: %s", kvs_ns_spec_of(op->r.ns)->name,
             lerr.msg);
    /* The codecs current now (calibration may just have published new ones), of the host
     * tier (this block's). NaN/Inf input fails here, naming the element. */
    put_codecs(op, true);
    uint64_t t0 = now_ns();
    op->rc =
        kvs_block_encode(op->k, op->v, kvs_ns_id(op->r.ns), op->r.tokens, raw,
                         kvs_block_data(op->blk), kvs_block_size(op->blk), &op->enc_len, &op->err);
    if (op->rc == 0)
        count(op->x, ENCODE, CPU, t0, op->raw_bytes, op->enc_len);
    if (op->rc == 0 && op->measure)
        check_block(op);
    consume(op);
}

/* Engine thread: the GPU encode finished (or failed: its error names the cause); the
 * commit runs on the completion thread. */
static void engine_encoded(void *arg, int rc, const kvs_err *err)
{
    put_op *op = arg;
    op->rc = rc;
    if (err)
        op->err = *err;
    /* A slot's encoded size is known at commit (its section lengths): counted there. */
    if (rc == 0 && !op->gpu)
        count(op->x, ENCODE, GPU, op->t0, op->raw_bytes, op->enc_len);
    if (rc == 0 && op->measure) {
        /* The engine measured it (its time is the encode's): done here unless a side passed
         * the bound. A refit, or a CPU measurement, goes to the pool, never here: the input
         * stays till then. */
        kvs_fidelity_sample m;
        bool measured = engine_sample(op, &m);
        if (measured)
            count(op->x, MEASURE, GPU, now_ns(), op->raw_bytes, op->enc_len);
        if (!measured || sides_over(op, &m)) {
            run(op->x, measure_job, commit, op);
            return;
        }
        kvs_fidelity_acc_add(kvs_ns_fidelity(op->r.ns), &m,
                             kvs_ns_spec_of(op->r.ns)->max_rel_error > 0, 0);
    }
    consume(op);
    run(op->x, NULL, commit, op);
}

/* Copies a GPU source to the host (the CPU reads it to encode, calibrate or measure). */
static int bounce(put_op *op, kvs_err *err)
{
    kvs_xfer *x = op->x;
    if (!(op->bounce = kvs_xfer_host_alloc(x, op->raw_bytes)))
        return kvs_err_set(err, KVS_ENOMEM,
                           "payload: cannot allocate %llu bytes to copy it from the GPU",
                           (unsigned long long)op->raw_bytes);
    if (kvs_engine_copy(eng_at(x, op->r.src.gpu), op->bounce, op->r.src.ptr, op->raw_bytes, err))
        return KVS_EINTERNAL;
    op->r.src = (kvs_xfer_buf){.kind = KVS_XFER_HOST, .ptr = op->bounce, .len = op->raw_bytes};
    return 0;
}

int kvs_xfer_put(kvs_xfer *x, const kvs_xfer_put_req *r, kvs_err *err)
{
    const kvs_ns_spec *spec = kvs_ns_spec_of(r->ns);
    uint64_t raw_bytes;
    int rc = kvs_key_validate(r->key_len, err);
    if (rc == 0)
        rc = kvs_spec_block_bytes(spec, r->tokens, &raw_bytes, err);
    if (rc)
        return rc;
    if ((r->src.kind != KVS_XFER_HOST && r->src.kind != KVS_XFER_DEVICE) ||
        (r->src.kind == KVS_XFER_DEVICE && !eng_at(x, r->src.gpu)) || r->src.len != raw_bytes)
        return kvs_err_set(err, KVS_EINVAL, "payload: %zu bytes given, %u tokens take %llu",
                           r->src.len, r->tokens, (unsigned long long)raw_bytes);
    put_op *op = kvs_xcalloc(1, sizeof *op); /* small and fixed (STYLE: may abort) */
    op->x = x;
    op->r = *r;
    memcpy(op->key, r->key, r->key_len);
    op->r.key = op->key;
    op->raw_bytes = raw_bytes;
    op->measure = measured(x, spec);
    op->sums[0] = NAN; /* until the engine measures it */
    if ((rc = reserve(op, err))) {
        free(op);
        return rc;
    }
    /* The coder: the engine when it has kernels for both codecs, else the CPU codecs on
     * the pool. Either way commit runs next. */
    kvs_engine *eng = op->eng;
    kvs_err e2;
    op->t0 = now_ns();
    if (op->gpu) {
        kvs_block_dev *d = kvs_block_device(op->blk);
        if (kvs_engine_encode_dev(eng, op->k, op->v, r->tokens, (const uint16_t *)r->src.ptr,
                                  d->slot, d->lens, engine_encoded, op, &e2) != 0)
            finish_put(op, KVS_EINTERNAL, &e2);
        return 0;
    }
    bool on_engine = eng && !kvs_learn_wants_keys(kvs_ns_learner(r->ns)) &&
                     kvs_engine_accepts(eng, op->k, op->v);
    /* The CPU encodes (and calibrates) from host memory, and measures a block against its
     * input there: a GPU source is copied here. */
    if (r->src.kind == KVS_XFER_DEVICE && (op->measure || !on_engine) && bounce(op, &e2)) {
        finish_put(op, e2.code, &e2);
        return 0;
    }
    /* The engine measures what it encodes (engine.h "Measured encode"), but for the
     * logit error, which needs the query Gram the CPU holds: NaN sums say "measure on the
     * CPU", as they do when the engine could not. */
    double *sums = op->measure && !gram_of(r->ns) ? op->sums : NULL;
    if (on_engine && kvs_engine_encode(eng, op->k, op->v, kvs_ns_id(r->ns), r->tokens,
                                       (const uint16_t *)op->r.src.ptr, kvs_block_data(op->blk),
                                       kvs_block_size(op->blk), &op->enc_len, sums, engine_encoded,
                                       op, &e2) == 0)
        return 0;
    if (op->r.src.kind == KVS_XFER_DEVICE && bounce(op, &e2)) { /* the engine refused it */
        finish_put(op, e2.code, &e2);
        return 0;
    }
    /* As on Get: a small codec-none block is one memcpy, cheaper than the pool's hops;
     * a RotateKV namespace that calibrates is not codec none. */
    if (raw_bytes <= XFER_INLINE_MAX && !op->measure && kvs_codec_id_of(op->k) == KVS_CODEC_NONE &&
        kvs_codec_id_of(op->v) == KVS_CODEC_NONE) {
        encode_job(op);
        commit(op);
        return 0;
    }
    run(x, encode_job, commit, op);
    return 0;
}

/* ---------------------------------------------------------------- Get */

struct kvs_xfer_get {
    kvs_xfer *x;
    kvs_ns *ns;
    kvs_block *blk; /* reader reference */
    bool encoded;
    uint32_t lb, le;
    kvs_xfer_buf dst;
    kvs_engine_paged paged; /* dst.lay set: the engine's view of it */
    uint8_t *fetched;       /* encoded Get of a GPU block, or a raw one into another device's
                             * memory: the block fetched to the host (not into dst) */
    size_t fetched_len;     /* ...or into an encoded Get's dst: its bytes there */
    bool cross;             /* fetched to be decoded by the destination's engine (xfer.h) */
    bool decoded;           /* decoded straight from LMDB's map by the read */
    uint64_t t0, enc_len;   /* a GPU decode: its submission (monotonic ns), the slot's bytes */
    int rc;
    kvs_err err;
    void (*done)(void *arg, int rc, const kvs_err *err);
    void *arg;
};

int kvs_xfer_get_open(kvs_xfer *x, const kvs_xfer_get_req *r, kvs_xfer_get **out, kvs_err *err)
{
    kvs_block *blk;
    int rc = kvs_store_find(x->o.store, r->ns, r->key, r->key_len, &blk, err);
    if (rc)
        return rc;
    kvs_xfer_get *g = kvs_xcalloc(1, sizeof *g);
    *g = (kvs_xfer_get){.x = x,
                        .ns = r->ns,
                        .blk = blk,
                        .encoded = r->encoded,
                        .lb = r->layer_begin,
                        .le = r->layer_end};
    *out = g;
    return 0;
}

uint32_t kvs_xfer_get_tokens(const kvs_xfer_get *g)
{
    return kvs_block_tokens(g->blk);
}

kvs_store_tier kvs_xfer_get_tier(const kvs_xfer_get *g)
{
    return kvs_block_tier(g->blk);
}

unsigned kvs_xfer_get_enc(const kvs_xfer_get *g)
{
    return kvs_block_enc(g->blk);
}

uint64_t kvs_xfer_get_raw_bytes(const kvs_xfer_get *g)
{
    return kvs_spec_layer_bytes(kvs_ns_spec_of(g->ns), kvs_block_tokens(g->blk)) * (g->le - g->lb);
}

const uint8_t *kvs_xfer_get_encoded(const kvs_xfer_get *g, size_t *len)
{
    if (g->encoded && g->dst.ptr) { /* copied or fetched into the caller's buffer (run's dst) */
        *len = g->fetched_len;
        return g->dst.ptr;
    }
    if (g->fetched) {
        *len = g->fetched_len;
        return g->fetched;
    }
    *len = kvs_block_size(g->blk);
    return kvs_block_data(g->blk);
}

void kvs_xfer_get_close(kvs_xfer_get *g)
{
    if (!g)
        return;
    kvs_xfer_host_free(g->x, g->fetched);
    if (g->blk) /* NULL after a failed disk read, which dropped it */
        kvs_store_block_release(g->x->o.store, g->blk);
    free(g);
}

static void finish_get(kvs_xfer_get *g, int rc, const kvs_err *err)
{
    g->done(g->arg, rc, rc ? err : NULL);
}

/* Decodes the requested layers of encoded bytes into dst with the codecs the block was
 * encoded with (kvs_ns_block_codecs: its state versions, or the namespace's fallback codec
 * for a side stored with it); bytes we stored but cannot read are data loss. The
 * bytes come from the store, which verified their checksum when it found the host block
 * or read the disk record (store.h, invariant 4): not hashed again. */
static int decode_bytes(kvs_xfer_get *g, const uint8_t *bytes, size_t len)
{
    kvs_err *err = &g->err;
    kvs_block_info info;
    const kvs_codec *k = NULL, *v = NULL;
    kvs_err_clear(err);
    int rc = kvs_format_peek(bytes, len, &info, err);
    if (rc == 0)
        rc = kvs_ns_block_codecs(g->ns, &info, &k, &v, NULL, err);
    uint64_t t0 = now_ns();
    if (rc == 0 && g->dst.lay) /* only the engine scatters into GPU pages */
        return kvs_err_set(err, KVS_EUNAVAIL,
                           "layout: a paged destination in GPU memory needs the GPU engine, which "
                           "cannot decode this block now");
    /* The CPU decodes into host memory: into a GPU destination through a host buffer. */
    bool dev = g->dst.kind == KVS_XFER_DEVICE;
    uint8_t *out = dev ? kvs_trymalloc(g->dst.len) : g->dst.ptr;
    if (rc == 0 && !out)
        rc = kvs_err_set(err, KVS_ENOMEM, "decode: cannot allocate %zu bytes", g->dst.len);
    if (rc == 0 &&
        (rc = kvs_block_decode_verified(k, v, bytes, len, g->lb, g->le, (uint16_t *)out, err)) == 0)
        count(g->x, DECODE, CPU, t0, g->dst.len, len);
    if (dev && rc == 0)
        rc = kvs_engine_copy(eng_at(g->x, g->dst.gpu), g->dst.ptr, out, g->dst.len, err);
    if (dev)
        free(out);
    if (rc == KVS_EPROTO || rc == KVS_EDATALOSS)
        rc = kvs_err_set(err, KVS_EDATALOSS, "key: stored block unreadable: %.180s", err->msg);
    return rc;
}

/* Pool thread: decode a block whose bytes are at hand. */
static void decode_job(void *arg)
{
    kvs_xfer_get *g = arg;
    g->rc = decode_bytes(g, kvs_block_data(g->blk), kvs_block_size(g->blk));
}

/* Pool thread: decode a GPU block fetched for another device on the CPU. */
static void decode_fetched_job(void *arg)
{
    kvs_xfer_get *g = arg;
    g->rc = decode_bytes(g, g->fetched, g->fetched_len);
}

static void decoded(void *arg)
{
    kvs_xfer_get *g = arg;
    finish_get(g, g->rc, &g->err);
}

/* Inside LMDB's read transaction (kvs_store_view): decode straight from the map. */
static int decode_view(const void *bytes, size_t len, void *arg)
{
    return decode_bytes(arg, bytes, len);
}

/* An encoded block's len bytes into an encoded Get's dst, when they fit. */
static int into_dst(kvs_xfer_get *g, const uint8_t *bytes, size_t len)
{
    if (len > g->dst.len)
        return kvs_err_set(&g->err, KVS_ENOSPC,
                           "the encoded block's %zu bytes do not fit the destination's %zu", len,
                           g->dst.len);
    memcpy(g->dst.ptr, bytes, len);
    g->fetched_len = len;
    return 0;
}

/* Pool thread (or the caller's, for a small block): a host block's stored bytes into an
 * encoded Get's dst. */
static void copy_encoded_job(void *arg)
{
    kvs_xfer_get *g = arg;
    kvs_err_clear(&g->err);
    g->rc = into_dst(g, kvs_block_data(g->blk), kvs_block_size(g->blk));
}

/* Pool thread: a GPU block fetched unsealed for an encoded Get: moved into dst if it was
 * fetched beside it (dst smaller than the largest block), then sealed. Many blocks hash
 * at once here instead of one after another on the engine thread. */
static void seal_job(void *arg)
{
    kvs_xfer_get *g = arg;
    if (g->rc)
        return;
    uint8_t *block = g->dst.ptr ? g->dst.ptr : g->fetched;
    if (g->dst.ptr && g->fetched) {
        if ((g->rc = into_dst(g, g->fetched, g->fetched_len)))
            return;
        kvs_xfer_host_free(g->x, g->fetched);
        g->fetched = NULL;
    }
    kvs_format_seal(block, g->fetched_len);
}

/* An engine's result, kept for the continuation (the engine's err does not outlive its
 * callback). */
static void record(kvs_xfer_get *g, int rc, const kvs_err *err)
{
    g->rc = rc;
    if (err)
        g->err = *err;
}

/* Engine thread: an encoded Get's fetch finished; sealed and answered from the pool. */
static void fetch_done(void *arg, int rc, const kvs_err *err)
{
    kvs_xfer_get *g = arg;
    record(g, rc, err);
    run(g->x, seal_job, decoded, g);
}

/* Engine thread: the GPU decode finished; the answer goes out from the completion
 * thread. */
static void engine_done(void *arg, int rc, const kvs_err *err)
{
    kvs_xfer_get *g = arg;
    record(g, rc, err);
    if (rc == 0)
        count(g->x, DECODE, GPU, g->t0, g->dst.len, g->enc_len);
    run(g->x, NULL, decoded, g);
}

static int decode_host(kvs_xfer_get *g, kvs_engine *eng, const kvs_codec *k, const kvs_codec *v,
                       const uint8_t *bytes, size_t len, kvs_err *err);

/* Completion thread: a GPU block fetched from its device for a destination on another
 * one; the destination's engine decodes the fetched bytes (ours: framed and hashed by the
 * fetch, so not hashed again). */
static void cross_fetched(void *arg)
{
    kvs_xfer_get *g = arg;
    g->cross = false; /* the decode below is counted as any other */
    const kvs_block_dev *d = kvs_block_device(g->blk);
    const kvs_codec *k, *v;
    int rc = g->rc;
    if (rc == 0 &&
        kvs_ns_codecs_enc(g->ns, kvs_block_enc(g->blk), d->k_state, d->v_state, &k, &v, NULL))
        rc = kvs_err_set(&g->err, KVS_EINTERNAL, "GPU tier block without its codec state");
    if (rc) {
        finish_get(g, rc, &g->err);
        return;
    }
    if (decode_host(g, eng_at(g->x, g->dst.gpu), k, v, g->fetched, g->fetched_len, &g->err))
        run(g->x, decode_fetched_job, decoded, g); /* that engine cannot: the CPU */
}

/* Engine thread (the block's device): its fetch for another device ended. */
static void cross_done(void *arg, int rc, const kvs_err *err)
{
    kvs_xfer_get *g = arg;
    record(g, rc, err);
    run(g->x, NULL, cross_fetched, g);
}

/* A GPU tier block: decode from its slot, or fetch it, with the codecs of the state
 * versions it was encoded with. */
static int start_gpu(kvs_xfer_get *g, kvs_err *err)
{
    kvs_engine *eng = eng_at(g->x, kvs_block_gpu(g->blk));
    const kvs_block_dev *d = kvs_block_device(g->blk);
    const kvs_codec *k, *v;
    uint32_t t = kvs_block_tokens(g->blk);
    if (!eng ||
        kvs_ns_codecs_enc(g->ns, kvs_block_enc(g->blk), d->k_state, d->v_state, &k, &v, NULL))
        return kvs_err_set(err, KVS_EINTERNAL, "GPU tier block without its engine or codec state");
    int rc;
    g->cross = !g->encoded && g->dst.kind == KVS_XFER_DEVICE && g->dst.gpu != kvs_block_gpu(g->blk);
    if (g->cross && g->x->peer[g->dst.gpu][kvs_block_gpu(g->blk)] &&
        kvs_engine_accepts(eng_at(g->x, g->dst.gpu), k, v)) {
        /* The destination's engine reads the slot by peer access. */
        g->cross = false;
        eng = eng_at(g->x, g->dst.gpu);
    }
    if (g->encoded || g->cross) {
        /* Unsealed: an encoded Get's block is sealed on the pool (seal_job), a cross one is
         * decoded as verified bytes (from our own slot). Straight into an encoded Get's dst
         * (a shared-memory region's slot: pinned, so by DMA) when it holds the largest block. */
        size_t cap = kvs_block_encoded_max(k, v, t);
        uint8_t *out = g->encoded && g->dst.ptr && g->dst.len >= cap ? g->dst.ptr : NULL;
        if (!out && !(out = g->fetched = kvs_xfer_host_alloc(g->x, cap)))
            return kvs_err_set(err, KVS_ENOMEM, "fetch: cannot allocate %zu bytes", cap);
        rc = kvs_engine_fetch_dev_unsealed(eng, k, v, kvs_ns_id(g->ns), t, d->slot, d->lens, out,
                                           cap, &g->fetched_len, g->cross ? cross_done : fetch_done,
                                           g, err);
    } else {
        g->t0 = now_ns();
        g->enc_len = kvs_format_prefix_bytes(kvs_ns_spec_of(g->ns)->layers);
        for (uint32_t i = 0; i < 2 * kvs_ns_spec_of(g->ns)->layers; i++)
            g->enc_len += d->lens[i];
        rc = g->dst.lay ? kvs_engine_decode_dev_paged(eng, k, v, t, d->slot, d->lens, g->lb, g->le,
                                                      &g->paged, engine_done, g, err)
                        : kvs_engine_decode_dev(eng, k, v, t, d->slot, d->lens, g->lb, g->le,
                                                (uint16_t *)g->dst.ptr, engine_done, g, err);
    }
    if (rc && rc != KVS_EDATALOSS) /* the engine refused a submission: ours, not the client's */
        rc = err->code = KVS_EINTERNAL;
    return rc;
}

/* The block's bytes are at hand (a GPU slot, host memory): decode or hand them out. */
static void dispatch(kvs_xfer_get *g)
{
    kvs_xfer *x = g->x;
    kvs_err err;
    if (kvs_block_tier(g->blk) == KVS_STORE_TIER_GPU) {
        int rc = start_gpu(g, &err);
        if (rc)
            finish_get(g, rc, &err);
        return;
    }
    /* A hot host block moves up to the GPU tier (when allowed and there is room), beside
     * this Get, which goes on reading the host copy. */
    kvs_tiering_promote(x->o.tiering, g->blk, g->dst.kind == KVS_XFER_DEVICE ? g->dst.gpu : -1);
    if (g->encoded && !g->dst.ptr) {
        finish_get(g, 0, NULL); /* the stored bytes go out as they are */
        return;
    }
    if (g->encoded) { /* ...into dst: a small block here, a large one on the pool */
        if (kvs_block_size(g->blk) <= XFER_INLINE_MAX) {
            copy_encoded_job(g);
            decoded(g);
        } else {
            run(x, copy_encoded_job, decoded, g);
        }
        return;
    }
    /* A small block stored as it is (codec none) is one memcpy: cheaper here, on the
     * caller's thread, than the engine's batching wait or the pool's two thread hops
     * (a 128 KiB Get's latency is mostly those). */
    if (!g->dst.lay && g->dst.kind == KVS_XFER_HOST && g->dst.len <= XFER_INLINE_MAX &&
        kvs_block_enc(g->blk) == 0 &&
        kvs_codec_id_of(kvs_ns_codec(g->ns, KVS_KEYS)) == KVS_CODEC_NONE &&
        kvs_codec_id_of(kvs_ns_codec(g->ns, KVS_VALUES)) == KVS_CODEC_NONE) {
        decode_job(g);
        decoded(g);
        return;
    }
    /* The engine when it has kernels for the block's codecs, else the pool. */
    kvs_block_info info;
    const kvs_codec *k, *v;
    if (kvs_format_peek(kvs_block_data(g->blk), kvs_block_size(g->blk), &info, NULL) == 0 &&
        kvs_ns_block_codecs(g->ns, &info, &k, &v, NULL, NULL) == 0 &&
        decode_host(g, eng_for(x, &g->dst), k, v, kvs_block_data(g->blk), kvs_block_size(g->blk),
                    &g->err) == 0)
        return;
    run(x, decode_job, decoded, g);
}

/* Submits the decode of encoded host bytes (verified: the store's, or our own fetch) into
 * dst to eng (may be NULL); nonzero when eng cannot take it (the caller decodes on the
 * CPU or fails). */
static int decode_host(kvs_xfer_get *g, kvs_engine *eng, const kvs_codec *k, const kvs_codec *v,
                       const uint8_t *bytes, size_t len, kvs_err *err)
{
    if (!eng || !kvs_engine_accepts(eng, k, v))
        return kvs_err_set(err, KVS_EUNAVAIL, "decode: no GPU engine runs these codecs");
    g->t0 = now_ns(); /* before the submission: the engine may finish before it returns */
    g->enc_len = len;
    return g->dst.lay ? kvs_engine_decode_paged(eng, k, v, bytes, len, KVS_BLOCK_VERIFIED, g->lb,
                                                g->le, &g->paged, engine_done, g, err)
                      : kvs_engine_decode(eng, k, v, bytes, len, KVS_BLOCK_VERIFIED, g->lb, g->le,
                                          (uint16_t *)g->dst.ptr, engine_done, g, err);
}

/* Pool thread: read a disk block (LMDB read transaction, verified). A raw Get that the
 * CPU decodes, with promotion off, decodes straight from LMDB's map (nothing is kept, so
 * nothing needs a copy); otherwise the block is copied out (the copy is the promoted
 * host block, or what the engine or the encoded stream reads later). */
static void read_job(void *arg)
{
    kvs_xfer_get *g = arg;
    kvs_store *st = g->x->o.store;
    kvs_engine *eng = eng_for(g->x, &g->dst);
    kvs_err_clear(&g->err);
    if (!g->encoded && !kvs_store_promotes(st) &&
        (!eng || !kvs_engine_accepts(eng, kvs_ns_codec(g->ns, KVS_KEYS),
                                     kvs_ns_codec(g->ns, KVS_VALUES)))) {
        g->decoded = true;
        g->rc = kvs_store_view(st, g->blk, decode_view, g, &g->err);
        return;
    }
    kvs_block *d = g->blk;
    g->blk = NULL; /* kvs_store_read takes over our reference on d, in every case */
    g->rc = kvs_store_read(st, d, &g->blk, &g->err);
}

static void read_done(void *arg)
{
    kvs_xfer_get *g = arg;
    if (g->rc || g->decoded)
        finish_get(g, g->rc, &g->err);
    else
        dispatch(g);
}

int kvs_xfer_get_run(kvs_xfer_get *g, const kvs_xfer_buf *dst,
                     void (*done)(void *arg, int rc, const kvs_err *err), void *arg, kvs_err *err)
{
    if (g->encoded && dst && (dst->kind != KVS_XFER_HOST || dst->lay || !dst->ptr))
        return kvs_err_set(err, KVS_EINVAL,
                           "get: an encoded block goes into host memory, whole (not paged)");
    if (!g->encoded && (!dst || (dst->kind != KVS_XFER_HOST && dst->kind != KVS_XFER_DEVICE) ||
                        (dst->kind == KVS_XFER_DEVICE && !eng_at(g->x, dst->gpu)) ||
                        (dst->lay && dst->kind != KVS_XFER_DEVICE) ||
                        (!dst->lay && dst->len < kvs_xfer_get_raw_bytes(g))))
        return kvs_err_set(err, KVS_EINVAL, "get: destination of %zu bytes, %llu needed",
                           dst ? dst->len : 0, (unsigned long long)kvs_xfer_get_raw_bytes(g));
    if (dst)
        g->dst = *dst;
    if (dst && dst->lay)
        g->paged = (kvs_engine_paged){dst->lay, dst->ptr, dst->pages};
    g->done = done;
    g->arg = arg;
    if (kvs_block_unread(g->blk))
        run(g->x, read_job, read_done, g);
    else
        dispatch(g);
    return 0;
}
