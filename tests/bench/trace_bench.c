/* kvs-trace-bench: hit ratio of the eviction policies (storage/policy.h) on a synthetic
 * prefix-reuse workload of KV blocks (issue 5, item 3).
 *
 *   kvs-trace-bench [--seed N] [--requests N] [--trace scan|lowscan|both]
 *                   [--caps 1,2,5,10,20] [--gap TICKS] [--small-percent P] [--tail-first]
 *                   [--breakdown] [--tiny]
 *
 * Workload (generated from --seed with xoshiro256**, gpu/codec/rng.h; no files). Requests arrive
 * one per tick. A request is a list of blocks, each identified by a chained key: key(i) =
 * hash(key(i-1), content(i)), as inference servers key prefix blocks, so the same content
 * after a different prefix is a different block. Two namespaces (models) with different
 * block sizes share the cache. Kinds of request:
 *  - system prompts: a few per namespace, tens of blocks each, chosen by Zipf(1.0); most
 *    requests start with one;
 *  - conversations: a new conversation's later turns come back after an exponential gap
 *    (mean --gap ticks); each turn re-reads the whole history and appends new blocks (the
 *    user's message and the reply); the number of turns is geometric;
 *  - documents: drawn from Zipf(alpha) per namespace, read as a prefix (whole or cut), then
 *    a one-off question block;
 *  - scans: one-off long prompts, hundreds of blocks that are never read again.
 * A new arrival picks conversation/document/scan by the trace's mix; due conversation
 * turns go first. Two traces differ only in that mix: scan-heavy (35/40/25%: most stored
 * bytes are scans) and low-scan (45/53/2%).
 *
 * Replay, like a server over a prefix cache: the request looks its blocks up in order;
 * block i counts as a hit only if blocks 0..i are all cached (after the first miss the rest
 * of the prompt is recomputed, so later cached blocks are of no use); every missing block
 * is then stored (an existing one is left alone). A request holds references to the blocks
 * it read or stored until it ends: the eviction scan skips them (kvs_policy_victim's
 * busy-skip contract); a block that finds no room is not stored ("dropped"). The policy
 * sees a request's hits and stores in prompt order (--tail-first: last block first, so
 * that a prefix's first blocks are the most recent, as vLLM frees a sequence's blocks
 * tail first; RESULTS.md: it makes no measurable difference on these traces). The cache is
 * a byte budget: capacity = a share of the trace's unique bytes (--caps, percent). Hit
 * ratio by blocks = hit blocks / looked-up blocks, by bytes = hit bytes / looked-up bytes.
 * "inf" is the same replay with an unbounded cache (only first references miss).
 *
 * Policies: lru; s3fifo (the defaults: S = 10% of capacity, promote_threshold 1);
 * s3fifo-2 (threshold 2: the paper's Algorithm 1 and its simulator's default); s3fifo-sP
 * (threshold 1, S = --small-percent, default 30: a larger S keeps a conversation's new
 * blocks until its next turn; RESULTS.md).
 *
 * Output: the generator's parameters and one markdown table per trace on stdout. The same
 * --seed gives the same numbers. Exit 0; 2 for usage errors, 1 if a policy call fails.
 * Single-threaded; everything is freed before exit.
 */
#include <math.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/base/err.h"
#include "gpu/base/mem.h"
#include "gpu/codec/rng.h"
#include "storage/policy.h"

#define MAX_NS 2
#define MAX_CAPS 16
#define MAX_TURNS 32
#define N_CAT 4

enum { CAT_SYS, CAT_CONV, CAT_DOC, CAT_SCAN };
static const char *const cat_name[N_CAT] = {"system", "conversation", "document", "scan"};

/* ---------------------------------------------------------------- workload */

typedef struct trace_params {
    const char *name;
    uint64_t requests;
    uint64_t ns_bytes[MAX_NS]; /* block size per namespace */
    double ns_share[MAX_NS];   /* share of new arrivals */
    uint32_t sys_prompts;      /* per namespace */
    uint32_t sys_min, sys_max; /* blocks */
    double sys_share;          /* requests that start with a system prompt */
    double p_conv, p_doc, p_scan;
    double turns_mean;
    uint32_t turn_min, turn_max; /* blocks appended per turn */
    double gap_mean;             /* ticks between two turns of a conversation */
    uint32_t docs;               /* per namespace */
    double doc_alpha;
    uint32_t doc_min, doc_max;
    double doc_whole; /* reads of the whole document (else a random prefix) */
    uint32_t scan_min, scan_max;
} trace_params;

typedef struct conv {
    uint8_t ns;
    int32_t sys; /* -1: none */
    uint32_t len, turns_left;
} conv;

typedef struct pending {
    uint64_t due;
    uint32_t conv;
} pending;

typedef struct request {
    uint8_t ns, cat;
    uint32_t n;     /* blocks */
    uint32_t n_sys; /* leading system-prompt blocks */
    uint64_t *keys; /* borrowed from the generator until the next gen_next */
} request;

typedef struct gen {
    const trace_params *tp;
    kvs_rng rng;
    uint64_t tick;
    double *doc_cdf, sys_cdf[64];
    uint32_t *sys_len[MAX_NS];
    uint32_t *doc_len[MAX_NS];
    conv *convs;
    size_t n_convs, cap_convs;
    pending *heap;
    size_t n_heap, cap_heap;
    uint64_t *keys;
    size_t cap_keys;
} gen;

static double uniform(kvs_rng *r)
{
    return (double)(kvs_rng_next(r) >> 11) * 0x1.0p-53;
}

static uint32_t range(kvs_rng *r, uint32_t lo, uint32_t hi)
{
    return lo + (uint32_t)(kvs_rng_next(r) % (uint64_t)(hi - lo + 1));
}

static uint32_t draw_cdf(kvs_rng *r, const double *cdf, uint32_t n)
{
    double u = uniform(r);
    uint32_t lo = 0, hi = n - 1;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (cdf[mid] < u)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static void zipf_cdf(double *cdf, uint32_t n, double alpha)
{
    double sum = 0;
    for (uint32_t i = 0; i < n; i++)
        cdf[i] = sum += pow((double)(i + 1), -alpha);
    for (uint32_t i = 0; i < n; i++)
        cdf[i] /= sum;
    cdf[n - 1] = 1.0;
}

static uint64_t chain(uint64_t prev, uint64_t content)
{
    uint64_t x = prev ^ (content * 0xD6E8FEB86659FD93ull);
    return kvs_splitmix64(&x) | 1; /* never 0: 0 marks an empty index slot */
}

static uint64_t content_id(unsigned ns, unsigned cat, uint64_t id, uint32_t i)
{
    return ((uint64_t)ns << 62) ^ ((uint64_t)cat << 58) ^ (id << 16) ^ i;
}

static void heap_push(gen *g, pending x)
{
    if (g->n_heap == g->cap_heap) {
        g->cap_heap = g->cap_heap ? 2 * g->cap_heap : 1024;
        g->heap = realloc(g->heap, g->cap_heap * sizeof *g->heap);
        if (!g->heap) {
            fprintf(stderr, "kvs-trace-bench: out of memory\n");
            exit(1);
        }
    }
    size_t i = g->n_heap++;
    while (i > 0 && g->heap[(i - 1) / 2].due > x.due) {
        g->heap[i] = g->heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    g->heap[i] = x;
}

static pending heap_pop(gen *g)
{
    pending top = g->heap[0], last = g->heap[--g->n_heap];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= g->n_heap)
            break;
        if (c + 1 < g->n_heap && g->heap[c + 1].due < g->heap[c].due)
            c++;
        if (g->heap[c].due >= last.due)
            break;
        g->heap[i] = g->heap[c];
        i = c;
    }
    if (g->n_heap)
        g->heap[i] = last;
    return top;
}

static void gen_init(gen *g, const trace_params *tp, uint64_t seed)
{
    memset(g, 0, sizeof *g);
    g->tp = tp;
    kvs_rng_init(&g->rng, seed, 0, 0, 0, 0x7ace);
    /* Lengths of prompts and documents: part of the workload, drawn from the seed. */
    kvs_rng lens;
    kvs_rng_init(&lens, seed, 0, 0, 0, 0x1e5);
    for (unsigned ns = 0; ns < MAX_NS; ns++) {
        g->sys_len[ns] = kvs_xcalloc(tp->sys_prompts, sizeof(uint32_t));
        g->doc_len[ns] = kvs_xcalloc(tp->docs, sizeof(uint32_t));
        for (uint32_t i = 0; i < tp->sys_prompts; i++)
            g->sys_len[ns][i] = range(&lens, tp->sys_min, tp->sys_max);
        for (uint32_t i = 0; i < tp->docs; i++)
            g->doc_len[ns][i] = range(&lens, tp->doc_min, tp->doc_max);
    }
    g->doc_cdf = kvs_xcalloc(tp->docs, sizeof(double));
    zipf_cdf(g->doc_cdf, tp->docs, tp->doc_alpha);
    zipf_cdf(g->sys_cdf, tp->sys_prompts, 1.0);
    g->cap_keys = tp->sys_max + MAX_TURNS * tp->turn_max + tp->doc_max + tp->scan_max + 1;
    g->keys = kvs_xcalloc(g->cap_keys, sizeof(uint64_t));
}

static void gen_free(gen *g)
{
    for (unsigned ns = 0; ns < MAX_NS; ns++) {
        free(g->sys_len[ns]);
        free(g->doc_len[ns]);
    }
    free(g->doc_cdf);
    free(g->convs);
    free(g->heap);
    free(g->keys);
}

/* Appends the system prompt's blocks; returns the chain head after them. */
static uint64_t put_sys(gen *g, request *rq, unsigned ns, int32_t sys)
{
    uint64_t prev = 0x5eed0000ull + ns;
    if (sys < 0)
        return prev;
    for (uint32_t i = 0; i < g->sys_len[ns][sys]; i++)
        rq->keys[rq->n++] = prev = chain(prev, content_id(ns, 1, (uint64_t)sys, i));
    rq->n_sys = rq->n;
    return prev;
}

static int32_t pick_sys(gen *g)
{
    if (uniform(&g->rng) >= g->tp->sys_share)
        return -1;
    return (int32_t)draw_cdf(&g->rng, g->sys_cdf, g->tp->sys_prompts);
}

static void conv_turn(gen *g, request *rq, uint32_t ci)
{
    const trace_params *tp = g->tp;
    conv *c = &g->convs[ci];
    rq->ns = c->ns;
    rq->cat = CAT_CONV;
    uint64_t prev = put_sys(g, rq, c->ns, c->sys);
    c->len += range(&g->rng, tp->turn_min, tp->turn_max);
    for (uint32_t i = 0; i < c->len; i++)
        rq->keys[rq->n++] = prev = chain(prev, content_id(c->ns, 2, ci, i));
    if (c->turns_left-- > 1) {
        double gap = -tp->gap_mean * log(1.0 - uniform(&g->rng));
        heap_push(g, (pending){g->tick + 1 + (uint64_t)gap, ci});
    }
}

static void gen_next(gen *g, request *rq)
{
    const trace_params *tp = g->tp;
    rq->keys = g->keys;
    rq->n = rq->n_sys = 0;
    g->tick++;
    if (g->n_heap && g->heap[0].due <= g->tick) {
        conv_turn(g, rq, heap_pop(g).conv);
        return;
    }
    unsigned ns = uniform(&g->rng) < tp->ns_share[0] ? 0 : 1;
    double u = uniform(&g->rng);
    int32_t sys = pick_sys(g);
    rq->ns = (uint8_t)ns;
    if (u < tp->p_conv) {
        if (g->n_convs == g->cap_convs) {
            g->cap_convs = g->cap_convs ? 2 * g->cap_convs : 1024;
            g->convs = realloc(g->convs, g->cap_convs * sizeof *g->convs);
            if (!g->convs) {
                fprintf(stderr, "kvs-trace-bench: out of memory\n");
                exit(1);
            }
        }
        uint32_t turns = 1;
        while (turns < MAX_TURNS && uniform(&g->rng) >= 1.0 / tp->turns_mean)
            turns++;
        g->convs[g->n_convs] = (conv){(uint8_t)ns, sys, 0, turns};
        conv_turn(g, rq, (uint32_t)g->n_convs++);
    } else if (u < tp->p_conv + tp->p_doc) {
        rq->cat = CAT_DOC;
        uint64_t prev = put_sys(g, rq, ns, sys);
        uint32_t d = draw_cdf(&g->rng, g->doc_cdf, tp->docs);
        uint32_t len = g->doc_len[ns][d];
        if (uniform(&g->rng) >= tp->doc_whole)
            len = range(&g->rng, 1, len);
        for (uint32_t i = 0; i < len; i++)
            rq->keys[rq->n++] = prev = chain(prev, content_id(ns, 3, d, i));
        rq->keys[rq->n++] = chain(prev, content_id(ns, 4, g->tick, 0)); /* the question */
    } else {
        rq->cat = CAT_SCAN;
        uint64_t prev = put_sys(g, rq, ns, sys);
        uint32_t len = range(&g->rng, tp->scan_min, tp->scan_max);
        for (uint32_t i = 0; i < len; i++)
            rq->keys[rq->n++] = prev = chain(prev, content_id(ns, 5, g->tick, i));
    }
}

/* ---------------------------------------------------------------- cache */

typedef struct blk {
    kvs_policy_node node;
    uint64_t key;
    uint64_t pin; /* busy while == the current request's number */
    uint32_t bytes;
} blk;

#define BLK_OF(n) ((blk *)((char *)(n)-offsetof(blk, node)))

/* Open addressing key -> slot + 1 (0 = empty), linear probing, backward-shift deletion. */
typedef struct table {
    uint64_t *keys;
    uint32_t *vals;
    uint64_t mask, count;
} table;

static void table_init(table *t, uint64_t min_slots)
{
    uint64_t n = 1024;
    while (n < 2 * min_slots)
        n *= 2;
    t->keys = kvs_xcalloc(n, sizeof(uint64_t));
    t->vals = kvs_xcalloc(n, sizeof(uint32_t));
    t->mask = n - 1;
    t->count = 0;
}

static uint64_t table_home(const table *t, uint64_t key)
{
    return (key * 0x9E3779B97F4A7C15ull) >> 20 & t->mask;
}

static int64_t table_find(const table *t, uint64_t key)
{
    for (uint64_t i = table_home(t, key);; i = (i + 1) & t->mask) {
        if (t->keys[i] == key)
            return (int64_t)i;
        if (t->keys[i] == 0)
            return -1;
    }
}

static void table_put(table *t, uint64_t key, uint32_t val);

static void table_grow(table *t)
{
    table old = *t;
    table_init(t, (old.mask + 1));
    for (uint64_t i = 0; i <= old.mask; i++)
        if (old.keys[i])
            table_put(t, old.keys[i], old.vals[i]);
    free(old.keys);
    free(old.vals);
}

static void table_put(table *t, uint64_t key, uint32_t val)
{
    if (2 * (t->count + 1) > t->mask + 1)
        table_grow(t);
    uint64_t i = table_home(t, key);
    while (t->keys[i])
        i = (i + 1) & t->mask;
    t->keys[i] = key;
    t->vals[i] = val;
    t->count++;
}

static void table_del(table *t, uint64_t i)
{
    uint64_t j = i;
    for (;;) {
        j = (j + 1) & t->mask;
        if (!t->keys[j])
            break;
        uint64_t k = table_home(t, t->keys[j]);
        if (i <= j ? (i < k && k <= j) : (i < k || k <= j))
            continue;
        t->keys[i] = t->keys[j];
        t->vals[i] = t->vals[j];
        i = j;
    }
    t->keys[i] = 0;
    t->count--;
}

static void table_free(table *t)
{
    free(t->keys);
    free(t->vals);
}

typedef struct result {
    uint64_t lookups, hits, bytes, hit_bytes, dropped;
    uint64_t cat_lookups[N_CAT], cat_hits[N_CAT];
    uint64_t unique_blocks, unique_bytes; /* unbounded replay only */
    kvs_policy_stats ps;
} result;

/* A tier: byte budget, blocks from a fixed pool, key index, eviction by policy. */
typedef struct cache {
    kvs_policy *p; /* NULL: unbounded, the index only */
    uint64_t capacity, used;
    blk *pool;
    uint32_t *free_list, n_free;
    table idx;
} cache;

static int cache_init(cache *c, const trace_params *tp, kvs_policy_kind kind,
                      const kvs_policy_opts *opts, uint64_t capacity)
{
    kvs_err err;
    memset(c, 0, sizeof *c);
    c->capacity = capacity;
    if (!capacity) {
        table_init(&c->idx, 1u << 20);
        return 0;
    }
    uint64_t min_bytes = tp->ns_bytes[0] < tp->ns_bytes[1] ? tp->ns_bytes[0] : tp->ns_bytes[1];
    uint64_t max_blocks = capacity / min_bytes + 2;
    if (max_blocks > UINT32_MAX / 2) {
        fprintf(stderr, "kvs-trace-bench: capacity %llu is too large\n",
                (unsigned long long)capacity);
        return -1;
    }
    if (kvs_policy_create(kind, capacity, opts, &c->p, &err)) {
        fprintf(stderr, "kvs-trace-bench: %s\n", err.msg);
        return -1;
    }
    c->pool = kvs_xcalloc(max_blocks, sizeof *c->pool);
    c->free_list = kvs_xcalloc(max_blocks, sizeof *c->free_list);
    for (uint64_t i = 0; i < max_blocks; i++)
        c->free_list[c->n_free++] = (uint32_t)(max_blocks - 1 - i);
    table_init(&c->idx, max_blocks);
    return 0;
}

static void cache_free(cache *c)
{
    table_free(&c->idx);
    free(c->pool);
    free(c->free_list);
    kvs_policy_destroy(c->p);
}

static blk *cache_find(const cache *c, uint64_t key)
{
    int64_t at = table_find(&c->idx, key);
    return at < 0 ? NULL : &c->pool[c->idx.vals[at] - 1];
}

/* Stores a missing block for request r: evicts idle blocks (those request r does not hold)
 * in the policy's order until it fits. 1 stored, 0 dropped (no room), -1 policy error. */
static int cache_store(cache *c, uint64_t key, uint64_t bytes, uint64_t r)
{
    kvs_err err;
    kvs_policy_cursor cur;
    kvs_policy_scan_begin(c->p, &cur);
    while (c->used + bytes > c->capacity || c->n_free == 0) {
        kvs_policy_node *v = kvs_policy_victim(c->p, &cur);
        if (!v)
            return 0;
        blk *b = BLK_OF(v);
        if (b->pin == r) /* busy: this request holds it */
            continue;
        kvs_policy_evicted(c->p, v);
        table_del(&c->idx, (uint64_t)table_find(&c->idx, b->key));
        c->used -= b->bytes;
        c->free_list[c->n_free++] = (uint32_t)(b - c->pool);
    }
    uint32_t s = c->free_list[--c->n_free];
    blk *b = &c->pool[s];
    b->key = key;
    b->bytes = (uint32_t)bytes;
    b->pin = r;
    if (kvs_policy_insert(c->p, &b->node, key, bytes, &err)) {
        fprintf(stderr, "kvs-trace-bench: %s\n", err.msg);
        return -1;
    }
    table_put(&c->idx, key, s + 1);
    c->used += bytes;
    return 1;
}

/* Replays the trace through a cache of capacity bytes under policy `kind` (opts), or
 * through an unbounded cache when capacity is 0. tail_first: the policy sees a request's
 * blocks last block first (hits and stores), so a prefix's first blocks are the most
 * recent; otherwise in prompt order. */
static int replay(const trace_params *tp, uint64_t seed, kvs_policy_kind kind,
                  const kvs_policy_opts *opts, uint64_t capacity, bool tail_first, result *res)
{
    memset(res, 0, sizeof *res);
    cache c;
    if (cache_init(&c, tp, kind, opts, capacity))
        return -1;
    gen g;
    gen_init(&g, tp, seed);
    bool *hit = kvs_xcalloc(g.cap_keys, sizeof *hit);
    request rq;
    int rc = 0;
    for (uint64_t r = 1; r <= tp->requests && rc == 0; r++) {
        gen_next(&g, &rq);
        uint64_t bytes = tp->ns_bytes[rq.ns];
        /* Lookups, in prompt order: a hit needs the whole prefix before it. */
        bool broken = false;
        for (uint32_t i = 0; i < rq.n; i++) {
            unsigned cat = i < rq.n_sys ? CAT_SYS : rq.cat;
            blk *b = NULL;
            bool found = c.p ? (b = cache_find(&c, rq.keys[i])) != NULL
                             : table_find(&c.idx, rq.keys[i]) >= 0;
            hit[i] = found && !broken;
            broken = !hit[i];
            res->lookups++;
            res->bytes += bytes;
            res->cat_lookups[cat]++;
            if (hit[i]) {
                res->hits++;
                res->hit_bytes += bytes;
                res->cat_hits[cat]++;
                if (b)
                    b->pin = r; /* read by this request: busy until it ends */
            }
        }
        /* Policy updates and stores of the missing blocks (a cached block past the first
         * miss is recomputed too, but its Put is a no-op). */
        for (uint32_t j = 0; j < rq.n && rc == 0; j++) {
            uint32_t i = tail_first ? rq.n - 1 - j : j;
            uint64_t key = rq.keys[i];
            if (!c.p) {
                if (!hit[i] && table_find(&c.idx, key) < 0) {
                    table_put(&c.idx, key, 1);
                    res->unique_blocks++;
                    res->unique_bytes += bytes;
                }
                continue;
            }
            blk *b = cache_find(&c, key);
            if (hit[i]) {
                kvs_policy_hit(c.p, &b->node);
            } else if (!b) {
                int stored = cache_store(&c, key, bytes, r);
                if (stored < 0)
                    rc = -1;
                else if (stored == 0)
                    res->dropped++;
            }
        }
    }
    if (c.p)
        kvs_policy_get_stats(c.p, &res->ps);
    free(hit);
    gen_free(&g);
    cache_free(&c);
    return rc;
}

/* ---------------------------------------------------------------- main */

static const trace_params trace_scan = {
    .name = "scan-heavy",
    .requests = 60000,
    .ns_bytes = {512u << 10, 128u << 10},
    .ns_share = {0.7, 0.3},
    .sys_prompts = 4,
    .sys_min = 8,
    .sys_max = 40,
    .sys_share = 0.85,
    .p_conv = 0.35,
    .p_doc = 0.40,
    .p_scan = 0.25,
    .turns_mean = 4,
    .turn_min = 1,
    .turn_max = 6,
    .gap_mean = 300,
    .docs = 10000,
    .doc_alpha = 0.9,
    .doc_min = 8,
    .doc_max = 64,
    .doc_whole = 0.7,
    .scan_min = 100,
    .scan_max = 400,
};

static trace_params lowscan_of(trace_params t)
{
    t.name = "low-scan";
    t.p_conv = 0.45;
    t.p_doc = 0.53;
    t.p_scan = 0.02;
    return t;
}

static void print_params(const trace_params *t, uint64_t seed)
{
    printf("- trace `%s`, seed %llu: %llu requests (one per tick); namespaces: %llu KiB blocks "
           "(%.0f%% of arrivals), %llu KiB blocks (%.0f%%)\n",
           t->name, (unsigned long long)seed, (unsigned long long)t->requests,
           (unsigned long long)(t->ns_bytes[0] >> 10), 100 * t->ns_share[0],
           (unsigned long long)(t->ns_bytes[1] >> 10), 100 * t->ns_share[1]);
    printf("  - arrivals: %.0f%% conversations, %.0f%% documents, %.0f%% scans; %.0f%% of "
           "requests start with a system prompt (%u per namespace, %u-%u blocks, Zipf 1.0)\n",
           100 * t->p_conv, 100 * t->p_doc, 100 * t->p_scan, 100 * t->sys_share, t->sys_prompts,
           t->sys_min, t->sys_max);
    printf("  - conversations: geometric turns (mean %.1f, at most %d), +%u-%u blocks per turn, "
           "exponential gap between turns (mean %.0f ticks)\n",
           t->turns_mean, MAX_TURNS, t->turn_min, t->turn_max, t->gap_mean);
    printf("  - documents: %u per namespace, %u-%u blocks, Zipf %.2f, read whole %.0f%% of the "
           "time (else a random prefix), then one one-off question block\n",
           t->docs, t->doc_min, t->doc_max, t->doc_alpha, 100 * t->doc_whole);
    printf("  - scans: %u-%u one-off blocks\n", t->scan_min, t->scan_max);
}

static int parse_caps(const char *s, double *caps, int *n)
{
    *n = 0;
    while (*s) {
        char *end;
        double v = strtod(s, &end);
        if (end == s || v <= 0 || v > 100 || *n == MAX_CAPS)
            return -1;
        caps[(*n)++] = v;
        s = *end == ',' ? end + 1 : end;
        if (*end && *end != ',')
            return -1;
    }
    return *n ? 0 : -1;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: kvs-trace-bench [--seed N] [--requests N] [--trace scan|lowscan|both]\n"
               "                       [--caps 1,2,5,10,20] [--gap TICKS] [--small-percent P]\n"
               "                       [--tail-first] [--breakdown] [--tiny]\n"
               "  --seed N       generator seed (default 1)\n"
               "  --requests N   requests per trace (default 60000)\n"
               "  --trace T      scan (the scan-heavy trace), lowscan or both (default both)\n"
               "  --caps LIST    capacities, percent of the trace's unique bytes\n"
               "  --gap TICKS    mean gap between two turns of a conversation (default 300)\n"
               "  --small-percent P  S of the s3fifo-sP column, percent of capacity (default 30)\n"
               "  --tail-first   the policy sees each request's blocks last block first\n"
               "  --breakdown    also print block hit ratios per kind of block\n"
               "  --tiny         a small workload (smoke test)\n");
}

typedef struct pol {
    const char *name;
    kvs_policy_kind kind;
    kvs_policy_opts opts;
} pol;

static int run_trace(const trace_params *tp, uint64_t seed, const double *caps, int n_caps,
                     bool breakdown, uint32_t small_percent, bool tail_first)
{
    char big_name[32];
    snprintf(big_name, sizeof big_name, "s3fifo-s%u", small_percent);
    const pol pols[] = {
        {"lru", KVS_POLICY_LRU, {0}},
        {"s3fifo", KVS_POLICY_S3FIFO, {0}},
        {"s3fifo-2", KVS_POLICY_S3FIFO, {.promote_threshold = 2}},
        {big_name, KVS_POLICY_S3FIFO, {.small_percent = small_percent}},
    };
    enum { N_POL = sizeof pols / sizeof pols[0] };
    result inf, res[MAX_CAPS][N_POL];
    if (replay(tp, seed, KVS_POLICY_LRU, NULL, 0, false, &inf))
        return -1;
    printf("\n### %s\n\n", tp->name);
    print_params(tp, seed);
    printf("- %llu block lookups, %llu unique blocks, %.1f GiB unique; unbounded cache (inf): "
           "%.4f of blocks, %.4f of bytes hit\n\n",
           (unsigned long long)inf.lookups, (unsigned long long)inf.unique_blocks,
           (double)inf.unique_bytes / (1u << 30), (double)inf.hits / (double)inf.lookups,
           (double)inf.hit_bytes / (double)inf.bytes);
    printf("| capacity | GiB |");
    for (int k = 0; k < N_POL; k++)
        printf(" %s blocks | %s bytes |", pols[k].name, pols[k].name);
    printf("\n|---|---|");
    for (int k = 0; k < N_POL; k++)
        printf("---|---|");
    printf("\n");
    for (int c = 0; c < n_caps; c++) {
        uint64_t cap = (uint64_t)((double)inf.unique_bytes * caps[c] / 100.0);
        if (cap == 0) /* 0 would mean unbounded */
            cap = 1;
        printf("| %g%% | %.2f |", caps[c], (double)cap / (1u << 30));
        for (int k = 0; k < N_POL; k++) {
            result *r = &res[c][k];
            if (replay(tp, seed, pols[k].kind, &pols[k].opts, cap, tail_first, r))
                return -1;
            printf(" %.4f | %.4f |", (double)r->hits / (double)r->lookups,
                   (double)r->hit_bytes / (double)r->bytes);
        }
        printf("\n");
        fflush(stdout);
    }
    if (!breakdown)
        return 0;
    printf("\nBlock hit ratio per kind of block (inf: unbounded cache); policy counters:\n\n"
           "| capacity | policy |");
    for (int k = 0; k < N_CAT; k++)
        printf(" %s |", cat_name[k]);
    printf(" dropped | promoted | reinserted | ghost hits | evicted S | evicted M |\n|---|---|");
    for (int k = 0; k < N_CAT + 6; k++)
        printf("---|");
    printf("\n| | inf |");
    for (int k = 0; k < N_CAT; k++)
        printf(" %.4f |",
               (double)inf.cat_hits[k] / (double)(inf.cat_lookups[k] + !inf.cat_lookups[k]));
    printf(" | | | | | |\n");
    for (int c = 0; c < n_caps; c++)
        for (int k = 0; k < N_POL; k++) {
            const result *r = &res[c][k];
            printf("| %g%% | %s |", caps[c], pols[k].name);
            for (int q = 0; q < N_CAT; q++)
                printf(" %.4f |",
                       (double)r->cat_hits[q] / (double)(r->cat_lookups[q] + !r->cat_lookups[q]));
            printf(" %llu | %llu | %llu | %llu | %llu | %llu |\n", (unsigned long long)r->dropped,
                   (unsigned long long)r->ps.promoted, (unsigned long long)r->ps.reinserted,
                   (unsigned long long)r->ps.ghost_hits,
                   (unsigned long long)r->ps.evicted[KVS_POLICY_Q_SMALL],
                   (unsigned long long)r->ps.evicted[KVS_POLICY_Q_MAIN]);
        }
    return 0;
}

int main(int argc, char **argv)
{
    uint64_t seed = 1, requests = 0;
    const char *which = "both";
    double caps[MAX_CAPS] = {1, 2, 5, 10, 20};
    int n_caps = 5;
    bool breakdown = false, tiny = false, tail_first = false;
    double gap = 0;
    uint32_t small_percent = 30;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        bool more = i + 1 < argc;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage(stdout);
            return 0;
        } else if (strcmp(a, "--seed") == 0 && more) {
            seed = strtoull(argv[++i], NULL, 0);
        } else if (strcmp(a, "--requests") == 0 && more) {
            char *end;
            requests = strtoull(argv[++i], &end, 0);
            if (*end || requests == 0) {
                usage(stderr);
                return 2;
            }
        } else if (strcmp(a, "--trace") == 0 && more) {
            which = argv[++i];
            if (strcmp(which, "scan") && strcmp(which, "lowscan") && strcmp(which, "both")) {
                usage(stderr);
                return 2;
            }
        } else if (strcmp(a, "--caps") == 0 && more) {
            if (parse_caps(argv[++i], caps, &n_caps)) {
                usage(stderr);
                return 2;
            }
        } else if (strcmp(a, "--gap") == 0 && more) {
            gap = strtod(argv[++i], NULL);
            if (gap <= 0) {
                usage(stderr);
                return 2;
            }
        } else if (strcmp(a, "--small-percent") == 0 && more) {
            small_percent = (uint32_t)strtoul(argv[++i], NULL, 10);
            if (small_percent < 1 || small_percent > 50) {
                usage(stderr);
                return 2;
            }
        } else if (strcmp(a, "--breakdown") == 0) {
            breakdown = true;
        } else if (strcmp(a, "--tail-first") == 0) {
            tail_first = true;
        } else if (strcmp(a, "--tiny") == 0) {
            tiny = true;
        } else {
            usage(stderr);
            return 2;
        }
    }
    trace_params scan = trace_scan;
    if (tiny) {
        scan.requests = 2000;
        scan.docs = 200;
        scan.scan_min = 20;
        scan.scan_max = 60;
        scan.gap_mean = 30;
    }
    if (requests)
        scan.requests = requests;
    if (gap > 0)
        scan.gap_mean = gap;
    trace_params low = lowscan_of(scan);
    printf("## kvs-trace-bench: block hit ratio per eviction policy\n\n"
           "Policies: lru; s3fifo (S3-FIFO, S = 10%% of capacity, S->M after 1 access); "
           "s3fifo-2 (the same, S->M after 2 accesses); s3fifo-s%u (S = %u%%, S->M after 1 "
           "access). Capacity = %% of the trace's unique bytes. Policy updates per request: "
           "%s.\n",
           small_percent, small_percent, tail_first ? "last block first" : "in prompt order");
    if (strcmp(which, "lowscan") != 0 &&
        run_trace(&scan, seed, caps, n_caps, breakdown, small_percent, tail_first))
        return 1;
    if (strcmp(which, "scan") != 0 &&
        run_trace(&low, seed, caps, n_caps, breakdown, small_percent, tail_first))
        return 1;
    return 0;
}
