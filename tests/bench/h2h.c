/* kvs-bench-h2h: kvstash against Redis, head to head, from one load generator (issue 12).
 *
 * Both stores get the same keys, the same payloads, the same number of client threads
 * (each with its own connection: one kvs_client or one redisContext per thread) and the
 * same phases: Put/SET for --seconds, then Get/GET of keys that were put, for --seconds.
 * Payloads are Llama-3-8B-shaped KV blocks ([L][2][t][H][D], L 32, H 8, D 128, fp16),
 * generated before anything is timed: a pool of POOL_SIZE distinct payloads, key i holds
 * pool[i % POOL_SIZE]. The timed loops do nothing but the calls and a clock read; what
 * came back is checked on a sample of keys afterwards, outside the timed phases.
 *
 * Threads: the main thread owns the bench, the targets, the control connections (INFO,
 * deletes, verification) and the result rows. For a phase it starts one pthread per
 * client; a worker owns its connection, its Get buffer and its latency array, and shares
 * only the read-only bench, the phase's atomic key counter and its start barrier. The
 * main thread reads the workers' fields after pthread_join.
 */
#include <errno.h>
#include <getopt.h>
#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "gpu/base/mem.h"
#include "gpu/codec/half.h"
#include "kvstash.h"

/* Llama-3-8B's KV layout: the payload shape every namespace under test must have. */
#define LAYERS 32
#define KV_HEADS 8
#define HEAD_DIM 128
#define POOL_SIZE 64
#define MAX_CLIENTS 256
#define MAX_TARGETS 16
#define DELETE_BATCH 512
#define KEY_LEN 24
#define GIB ((double)(1ull << 30))
#define DEFAULT_MAX_MESSAGE ((size_t)64 << 20) /* kvs_client_opts' default */

typedef enum { STORE_REDIS, STORE_KVSTASH } store_kind;
typedef enum { OP_PUT, OP_GET } op_kind;

/* One store under test: Redis, or one kvstash namespace. */
typedef struct target {
    store_kind kind;
    const char *ns; /* kvstash: borrowed from argv */
    char codec[2 * KVS_CODEC_NAME_MAX + 2];
    bool exact; /* bytes come back identical (Redis, codec none) */
} target;

/* Read-only once the runs start. */
typedef struct bench {
    char redis_host[256];
    int redis_port;
    const char *kvs_target;
    target targets[MAX_TARGETS];
    size_t n_targets;
    unsigned clients[16];
    size_t n_clients;
    kvs_ns_spec spec; /* the payloads' layout */
    uint32_t tokens;
    size_t block_bytes;
    size_t blocks; /* key space: keys 0..blocks-1 */
    size_t warmup; /* blocks put (and deleted) once per target before its first run */
    size_t verify; /* keys read back and checked after each run */
    double seconds;
    uint64_t seed;
    bool json;
    bool shared_conn; /* kvstash clients share one gRPC connection (the library default) */
    uint8_t *pool[POOL_SIZE];
    char *keys; /* blocks x KEY_LEN, NUL-terminated names (make_keys) */
    size_t key_len;
    /* Control connections (main thread only). */
    redisContext *redis;
    kvs_client *kvs;
} bench;

typedef struct phase {
    const bench *b;
    const target *t;
    op_kind op;
    atomic_size_t next; /* put: the next key index to claim (all claimed ones are put) */
    size_t n_put;       /* get: keys 0..n_put-1 hold a block */
    pthread_barrier_t start;
} phase;

typedef struct worker {
    pthread_t tid;
    phase *ph;
    kvs_client *kc;
    redisContext *rc;
    uint8_t *buf; /* Get destination, block_bytes */
    uint64_t rng;
    double *lat_us; /* one entry per successful op */
    size_t n_lat, cap_lat;
    size_t errors;
    char first_error[KVS_ERR_MSG_LEN + 64];
    double t_start, t_end;
} worker;

typedef struct row {
    const target *t;
    unsigned clients;
    op_kind op;
    size_t ops, errors;
    double wall_s, ops_s, gb_s, p50_us, p99_us;
} row;

typedef struct mem_row {
    const target *t;
    size_t keys;
    double bytes_per_block;
} mem_row;

static double now_s(void)
{
    struct timespec ts;
    /* CLOCK_MONOTONIC cannot fail with a valid pointer on Linux. */
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Uniform in (0, 1]: never 0, so logf below is finite. */
static float unit_float(uint64_t *s)
{
    return (float)((splitmix64(s) >> 40) + 1) * (1.0f / 16777216.0f);
}

static float gaussian(uint64_t *s)
{
    /* Box-Muller; one of the pair is thrown away, generation is not timed. */
    float u = unit_float(s), v = unit_float(s);
    return sqrtf(-2.0f * logf(u)) * cosf(6.28318531f * v);
}

static const char *key_of(const bench *b, size_t i)
{
    return b->keys + i * KEY_LEN;
}

/* Key i is "h2h-T<tokens>-<i, 8 digits>": every key of a run has the same length. Made
 * before timing, so the timed loops format nothing. */
static int make_keys(bench *b, kvs_err *err)
{
    uint64_t bytes;
    if (!kvs_mul_size(b->blocks, KEY_LEN, &bytes) || !(b->keys = kvs_trymalloc(bytes)))
        return kvs_err_set(err, KVS_ENOMEM, "key table: %zu keys", b->blocks);
    for (size_t i = 0; i < b->blocks; i++) {
        int n = snprintf(b->keys + i * KEY_LEN, KEY_LEN, "h2h-T%u-%08zu", b->tokens, i);
        if (n < 0 || n >= KEY_LEN)
            return kvs_err_set(err, KVS_EINVAL, "key %zu: does not fit in %d bytes", i, KEY_LEN);
        b->key_len = (size_t)n;
    }
    return 0;
}

/* ------------------------------------------------------------------ payloads */

/* Payload p of the pool. Real K caches have a few outlier channels per head with a large
 * magnitude and a stable sign (KIVI's observation, the reason it quantizes keys per
 * channel); values are closer to plain Gaussian. The outlier channels and per-head scales
 * are a property of the "model" (same for every payload); the noise differs per payload.
 * Magnitudes stay below 200, far inside fp16's 65504: every element is finite. */
static void make_payload(const bench *b, unsigned p, uint8_t *out)
{
    uint64_t noise = b->seed * 1000003u + p + 1;
    size_t t_n = b->tokens, i = 0;
    for (unsigned l = 0; l < LAYERS; l++)
        for (unsigned kv = 0; kv < 2; kv++)
            for (size_t t = 0; t < t_n; t++)
                for (unsigned h = 0; h < KV_HEADS; h++) {
                    uint64_t model = b->seed ^ ((uint64_t)(l * 2 + kv) << 32 | h);
                    float scale = 0.5f + 1.5f * unit_float(&model);
                    unsigned out_ch[4];
                    float out_mean[4];
                    for (unsigned k = 0; k < 4; k++) {
                        out_ch[k] = (unsigned)(splitmix64(&model) % HEAD_DIM);
                        out_mean[k] = (unit_float(&model) < 0.5f ? -1.0f : 1.0f) *
                                      (8.0f + 12.0f * unit_float(&model));
                    }
                    for (unsigned d = 0; d < HEAD_DIM; d++, i++) {
                        float x = scale * gaussian(&noise);
                        for (unsigned k = 0; kv == 0 && k < 4; k++)
                            if (out_ch[k] == d)
                                x = out_mean[k] + 2.0f * x;
                        uint16_t hbits = kvs_f32_to_fp16(x);
                        out[2 * i] = (uint8_t)hbits;
                        out[2 * i + 1] = (uint8_t)(hbits >> 8);
                    }
                }
}

static int make_pool(bench *b, kvs_err *err)
{
    for (unsigned p = 0; p < POOL_SIZE; p++) {
        b->pool[p] = kvs_trymalloc(b->block_bytes);
        if (!b->pool[p])
            return kvs_err_set(err, KVS_ENOMEM, "payload pool: %u x %zu bytes", POOL_SIZE,
                               b->block_bytes);
        make_payload(b, p, b->pool[p]);
        /* The daemon refuses NaN/Inf; catch a generator bug here, not as Put errors. */
        if (kvs_payload_check_finite(&b->spec, b->tokens, b->pool[p], err) != 0)
            return kvs_err_prefix(err, "payload %u", p);
    }
    return 0;
}

/* ------------------------------------------------------------------ Redis */

/* Turns a failed hiredis call (reply NULL: connection error) or an error reply into err;
 * frees reply. */
static int redis_fail(redisContext *rc, redisReply *reply, kvs_err *err, const char *what)
{
    int code;
    if (!reply)
        code = kvs_err_set(err, KVS_EIO, "redis %s: %s", what,
                           rc->errstr[0] ? rc->errstr : "connection error");
    else if (reply->type == REDIS_REPLY_ERROR)
        code = kvs_err_set(err, KVS_EIO, "redis %s: %s", what, reply->str);
    else
        code =
            kvs_err_set(err, KVS_EPROTO, "redis %s: unexpected reply type %d", what, reply->type);
    freeReplyObject(reply);
    return code;
}

static int redis_connect(const bench *b, redisContext **out, kvs_err *err)
{
    struct timeval tv = {.tv_sec = 10};
    redisContext *rc = redisConnectWithTimeout(b->redis_host, b->redis_port, tv);
    if (!rc)
        return kvs_err_set(err, KVS_ENOMEM, "redis connect %s:%d: cannot allocate a context",
                           b->redis_host, b->redis_port);
    if (rc->err) {
        kvs_err_set(err, KVS_EUNAVAIL, "redis connect %s:%d: %s", b->redis_host, b->redis_port,
                    rc->errstr);
        redisFree(rc);
        return err ? err->code : KVS_EUNAVAIL;
    }
    /* The connect timeout would otherwise apply to every command: 2 MiB replies under
     * 64 clients on 2 cores can take longer than a connect should. */
    struct timeval cmd_tv = {.tv_sec = 60};
    if (redisSetTimeout(rc, cmd_tv) != REDIS_OK) {
        kvs_err_set(err, KVS_EIO, "redis set timeout: %s", rc->errstr);
        redisFree(rc);
        return err ? err->code : KVS_EIO;
    }
    redisReply *r = redisCommand(rc, "PING");
    if (!r || r->type != REDIS_REPLY_STATUS) {
        int code = redis_fail(rc, r, err, "PING");
        redisFree(rc);
        return code;
    }
    freeReplyObject(r);
    *out = rc;
    return 0;
}

static int redis_set(redisContext *rc, const char *key, size_t klen, const uint8_t *val, size_t len,
                     kvs_err *err)
{
    const char *argv[3] = {"SET", key, (const char *)val};
    size_t argl[3] = {3, klen, len};
    redisReply *r = redisCommandArgv(rc, 3, argv, argl);
    if (!r || r->type != REDIS_REPLY_STATUS)
        return redis_fail(rc, r, err, "SET");
    freeReplyObject(r);
    return 0;
}

/* GET into the caller's buffer, like kvs_client_get: the copy out of hiredis's reply is
 * part of the call, as it is for a real consumer that owns the destination memory. */
static int redis_get(redisContext *rc, const char *key, size_t klen, uint8_t *buf, size_t cap,
                     size_t *got, kvs_err *err)
{
    const char *argv[2] = {"GET", key};
    size_t argl[2] = {3, klen};
    redisReply *r = redisCommandArgv(rc, 2, argv, argl);
    if (!r || r->type != REDIS_REPLY_STRING)
        return redis_fail(rc, r, err, r && r->type == REDIS_REPLY_NIL ? "GET (nil)" : "GET");
    if (r->len > cap) {
        size_t len = r->len;
        freeReplyObject(r);
        return kvs_err_set(err, KVS_E2BIG, "redis GET %.*s: %zu bytes > %zu", (int)klen, key, len,
                           cap);
    }
    memcpy(buf, r->str, r->len);
    *got = r->len;
    freeReplyObject(r);
    return 0;
}

/* used_memory minus the client buffers (mem_clients_normal): 64 connections that just
 * sent 2 MiB each can hold that much in query buffers, which is not data. */
static int redis_data_memory(redisContext *rc, uint64_t *out, kvs_err *err)
{
    redisReply *r = redisCommand(rc, "INFO memory");
    if (!r || r->type != REDIS_REPLY_STRING)
        return redis_fail(rc, r, err, "INFO memory");
    const char *um = strstr(r->str, "\nused_memory:");
    const char *cl = strstr(r->str, "\nmem_clients_normal:");
    unsigned long long used = 0, clients = 0;
    int ok = um && cl && sscanf(um, "\nused_memory:%llu", &used) == 1 &&
             sscanf(cl, "\nmem_clients_normal:%llu", &clients) == 1;
    freeReplyObject(r);
    if (!ok)
        return kvs_err_set(err, KVS_EPROTO,
                           "redis INFO memory: no used_memory or mem_clients_normal field");
    *out = used - clients;
    return 0;
}

/* ------------------------------------------------------------------ both stores */

static int store_put(const bench *b, const target *t, redisContext *rc, kvs_client *kc, size_t i,
                     kvs_err *err)
{
    const char *key = key_of(b, i);
    const uint8_t *val = b->pool[i % POOL_SIZE];
    if (t->kind == STORE_REDIS)
        return redis_set(rc, key, b->key_len, val, b->block_bytes, err);
    return kvs_client_put(kc, t->ns, key, b->key_len, b->tokens, KVS_DTYPE_FP16, val,
                          b->block_bytes, NULL, err);
}

static int store_get(const bench *b, const target *t, redisContext *rc, kvs_client *kc, size_t i,
                     uint8_t *buf, size_t *got, kvs_err *err)
{
    const char *key = key_of(b, i);
    if (t->kind == STORE_REDIS)
        return redis_get(rc, key, b->key_len, buf, b->block_bytes, got, err);
    kvs_get_result res;
    int rc2 = kvs_client_get(kc, t->ns, key, b->key_len, buf, b->block_bytes, &res, err);
    *got = rc2 == 0 ? (size_t)res.bytes : 0;
    return rc2;
}

/* Deletes keys 0..blocks-1 (present or not) through the control connection. */
static int store_clear(const bench *b, const target *t, kvs_err *err)
{
    const char *argv[DELETE_BATCH + 1];
    size_t argl[DELETE_BATCH + 1];
    kvs_key keys[DELETE_BATCH];
    for (size_t i = 0; i < b->blocks; i += DELETE_BATCH) {
        size_t n = b->blocks - i < DELETE_BATCH ? b->blocks - i : DELETE_BATCH;
        for (size_t k = 0; k < n; k++) {
            argv[k + 1] = key_of(b, i + k);
            argl[k + 1] = b->key_len;
            keys[k].len = (uint8_t)b->key_len;
            memcpy(keys[k].bytes, key_of(b, i + k), b->key_len);
        }
        if (t->kind == STORE_REDIS) {
            argv[0] = "DEL";
            argl[0] = 3;
            redisReply *r = redisCommandArgv(b->redis, (int)n + 1, argv, argl);
            if (!r || r->type != REDIS_REPLY_INTEGER)
                return redis_fail(b->redis, r, err, "DEL");
            freeReplyObject(r);
        } else if (kvs_client_delete(b->kvs, t->ns, keys, n, NULL, err) != 0) {
            return kvs_err_prefix(err, "delete in %s", t->ns);
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ timed phases */

static void record_error(worker *w, size_t i, const kvs_err *err)
{
    if (w->errors++ == 0)
        snprintf(w->first_error, sizeof w->first_error, "%s key %zu: %s",
                 w->ph->op == OP_PUT ? "put" : "get", i, err->msg);
}

static void *worker_main(void *arg)
{
    worker *w = arg;
    phase *ph = w->ph;
    const bench *b = ph->b;
    int brc = pthread_barrier_wait(&ph->start);
    if (brc != 0 && brc != PTHREAD_BARRIER_SERIAL_THREAD) {
        kvs_err err;
        kvs_err_set(&err, -brc, "pthread_barrier_wait: %s", strerror(brc));
        record_error(w, 0, &err);
        return NULL;
    }
    w->t_start = now_s();
    double deadline = w->t_start + b->seconds, t0 = w->t_start;
    while (t0 < deadline) {
        size_t i, got = 0;
        if (ph->op == OP_PUT)
            i = atomic_fetch_add_explicit(&ph->next, 1, memory_order_relaxed) % b->blocks;
        else
            i = (size_t)(splitmix64(&w->rng) % ph->n_put);
        kvs_err err;
        int rc = ph->op == OP_PUT ? store_put(b, ph->t, w->rc, w->kc, i, &err)
                                  : store_get(b, ph->t, w->rc, w->kc, i, w->buf, &got, &err);
        double t1 = now_s();
        if (rc != 0) {
            record_error(w, i, &err);
            if (w->errors > 100)
                break; /* the store is down or full: more of the same says nothing */
        } else {
            if (w->n_lat == w->cap_lat) {
                /* Doubling: a handful of reallocs per phase, against thousands of calls. */
                size_t cap = w->cap_lat ? 2 * w->cap_lat : 4096;
                double *p = realloc(w->lat_us, cap * sizeof *p);
                if (!p) {
                    kvs_err_set(&err, KVS_ENOMEM, "latency array of %zu entries", cap);
                    record_error(w, i, &err);
                    break;
                }
                w->lat_us = p;
                w->cap_lat = cap;
            }
            w->lat_us[w->n_lat++] = (t1 - t0) * 1e6;
        }
        t0 = t1;
    }
    w->t_end = t0;
    return NULL;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Runs one op on ws[0..n) (connections open); fills r. Returns non-zero only if threads
 * could not be started; failed calls are counted in r->errors and reported. */
static int run_phase(const bench *b, const target *t, op_kind op, size_t n_put, worker *ws,
                     unsigned n, row *r, kvs_err *err)
{
    phase ph = {.b = b, .t = t, .op = op, .n_put = n_put};
    atomic_init(&ph.next, 0);
    int prc = pthread_barrier_init(&ph.start, NULL, n);
    if (prc != 0)
        return kvs_err_set(err, -prc, "pthread_barrier_init: %s", strerror(prc));
    unsigned started = 0;
    for (; started < n; started++) {
        worker *w = &ws[started];
        w->ph = &ph;
        w->n_lat = w->errors = 0;
        w->first_error[0] = '\0';
        prc = pthread_create(&w->tid, NULL, worker_main, w);
        if (prc != 0)
            break;
    }
    if (started < n) {
        /* The barrier waits for n threads: without them the others would hang. Exit is the
         * only way out, and a bench that cannot start its threads has nothing to report. */
        fprintf(stderr, "kvs-bench-h2h: pthread_create (thread %u of %u): %s\n", started + 1, n,
                strerror(prc));
        exit(1);
    }
    for (unsigned k = 0; k < n; k++)
        if ((prc = pthread_join(ws[k].tid, NULL)) != 0)
            return kvs_err_set(err, -prc, "pthread_join: %s", strerror(prc));
    pthread_barrier_destroy(&ph.start);

    *r = (row){.t = t, .clients = n, .op = op};
    double start = ws[0].t_start, end = ws[0].t_end;
    const worker *first_bad = NULL;
    unsigned n_bad = 0;
    for (unsigned k = 0; k < n; k++) {
        r->ops += ws[k].n_lat;
        r->errors += ws[k].errors;
        start = ws[k].t_start < start ? ws[k].t_start : start;
        end = ws[k].t_end > end ? ws[k].t_end : end;
        if (ws[k].errors && n_bad++ == 0)
            first_bad = &ws[k];
    }
    /* One line per phase: 64 clients failing alike (a daemon gone) would say it 64 times. */
    if (first_bad)
        fprintf(stderr, "kvs-bench-h2h: %s %s, %u clients: %zu errors in %u clients, first: %s\n",
                t->kind == STORE_REDIS ? "redis" : t->ns, op == OP_PUT ? "put" : "get", n,
                r->errors, n_bad, first_bad->first_error);
    double *all = kvs_trymalloc((r->ops ? r->ops : 1) * sizeof *all);
    if (!all)
        return kvs_err_set(err, KVS_ENOMEM, "merging %zu latencies", r->ops);
    size_t m = 0;
    for (unsigned k = 0; k < n; k++) {
        memcpy(all + m, ws[k].lat_us, ws[k].n_lat * sizeof *all);
        m += ws[k].n_lat;
    }
    qsort(all, m, sizeof *all, cmp_double);
    if (m) {
        /* Nearest-rank percentiles. */
        r->p50_us = all[(size_t)ceil(0.50 * (double)m) - 1];
        r->p99_us = all[(size_t)ceil(0.99 * (double)m) - 1];
    }
    free(all);
    r->wall_s = end - start;
    if (r->wall_s > 0) {
        r->ops_s = (double)r->ops / r->wall_s;
        r->gb_s = (double)r->ops * (double)b->block_bytes / 1e9 / r->wall_s;
    }
    return 0;
}

/* ------------------------------------------------------------------ one run */

static int connect_workers(const bench *b, const target *t, worker *ws, unsigned n, kvs_err *err)
{
    for (unsigned k = 0; k < n; k++) {
        worker *w = &ws[k];
        *w = (worker){.rng = b->seed * 7919u + k + 1};
        if (!(w->buf = kvs_trymalloc(b->block_bytes)))
            return kvs_err_set(err, KVS_ENOMEM, "Get buffer of client %u", k);
        if (t->kind == STORE_REDIS) {
            if (redis_connect(b, &w->rc, err) != 0)
                return kvs_err_prefix(err, "client %u", k);
            continue;
        }
        /* gRPC core shares one TCP connection among channels with equal arguments (its
         * global subchannel pool), so 64 kvs_clients would otherwise be one HTTP/2
         * connection against Redis's 64 sockets. A max_message a few bytes apart per
         * client makes each channel's arguments unique, hence its own connection; no
         * message comes near the limit. --shared-conn keeps the library's behaviour. */
        kvs_client_opts o = {.target = b->kvs_target,
                             .max_message = b->shared_conn ? 0 : DEFAULT_MAX_MESSAGE + k};
        if (kvs_client_connect(&o, &w->kc, err) != 0)
            return kvs_err_prefix(err, "client %u", k);
        /* kvs_client_connect is lazy: a first call opens the channel so no timed call
         * pays for TCP and HTTP/2 setup (Redis's connect above is synchronous). */
        kvs_key probe = {.len = 1, .bytes = {'-'}};
        bool present;
        if (kvs_client_exists(w->kc, t->ns, &probe, 1, &present, err) != 0)
            return kvs_err_prefix(err, "client %u: first call", k);
    }
    return 0;
}

static void close_workers(worker *ws, unsigned n)
{
    for (unsigned k = 0; k < n; k++) {
        if (ws[k].rc)
            redisFree(ws[k].rc);
        kvs_client_close(ws[k].kc);
        free(ws[k].buf);
        free(ws[k].lat_us);
        ws[k] = (worker){0};
    }
}

/* Bytes per block the store holds right now for this run's keys: Redis's used_memory
 * growth (values, keys and its per-key structures); kvstash's encoded bytes and the
 * bookkeeping its host tier charges each block (TierStats.block_meta_bytes), its
 * counterpart of Redis's per-key structures. */
static int measure_memory(const bench *b, const target *t, uint64_t redis_before, size_t keys,
                          double *out, kvs_err *err)
{
    if (t->kind == STORE_REDIS) {
        uint64_t after;
        if (redis_data_memory(b->redis, &after, err) != 0)
            return -1;
        /* A shrink (a rehash, freed client state) would wrap around: report 0, not 2^64. */
        *out = keys && after > redis_before ? (double)(after - redis_before) / (double)keys : 0;
        return 0;
    }
    kvs_ns_info info;
    if (kvs_client_ns_get(b->kvs, t->ns, &info, err) != 0)
        return kvs_err_prefix(err, "namespace %s", t->ns);
    if (info.blocks != keys)
        fprintf(stderr, "kvs-bench-h2h: %s holds %" PRIu64 " blocks, expected %zu\n", t->ns,
                info.blocks, keys);
    kvs_stats *s;
    if (kvs_client_stats(b->kvs, &s, err) != 0)
        return kvs_err_prefix(err, "stats");
    uint64_t meta = 0;
    for (size_t i = 0; i < s->n_tiers; i++)
        if (s->tiers[i].tier == KVS_TIER_HOST)
            meta = s->tiers[i].block_meta_bytes;
    kvs_stats_free(s);
    *out = info.blocks ? (double)info.stored_bytes / (double)info.blocks + (double)meta : 0;
    return 0;
}

/* Reads back b->verify keys spread over 0..n_put-1 and compares them with what was put:
 * every byte where the store is exact, the size (and finiteness) for lossy codecs. */
static int verify_sample(const bench *b, const target *t, size_t n_put, uint8_t *buf, kvs_err *err)
{
    size_t n = b->verify < n_put ? b->verify : n_put;
    for (size_t s = 0; s < n; s++) {
        size_t i = s * n_put / n, got = 0;
        if (store_get(b, t, b->redis, b->kvs, i, buf, &got, err) != 0)
            return kvs_err_prefix(err, "verify key %zu", i);
        if (got != b->block_bytes)
            return kvs_err_set(err, KVS_EDATALOSS, "verify key %zu: %zu bytes, put %zu", i, got,
                               b->block_bytes);
        if (t->exact && memcmp(buf, b->pool[i % POOL_SIZE], got) != 0)
            return kvs_err_set(err, KVS_EDATALOSS, "verify key %zu: bytes differ from the put", i);
        if (!t->exact && kvs_payload_check_finite(&b->spec, b->tokens, buf, err) != 0)
            return kvs_err_prefix(err, "verify key %zu", i);
    }
    return 0;
}

/* Warm-up, once per target: the first Puts of a namespace pay one-time costs that are not
 * the steady state (rotatekv-* calibrates its channel order on the first 4096 key tokens,
 * kvstashd's --calib-tokens; both stores' allocators grow their arenas). */
static int warm_up(const bench *b, const target *t, kvs_err *err)
{
    for (size_t i = 0; i < b->warmup; i++)
        if (store_put(b, t, b->redis, b->kvs, i, err) != 0)
            return kvs_err_prefix(err, "warm-up");
    return store_clear(b, t, err);
}

/* One (target, clients) run: clear, Put phase, memory, Get phase, verify, clear. */
static int run_one(const bench *b, const target *t, unsigned n, row rows[2], mem_row *mem,
                   kvs_err *err)
{
    uint64_t redis_before = 0;
    if (store_clear(b, t, err) != 0)
        return -1;
    if (t->kind == STORE_REDIS && redis_data_memory(b->redis, &redis_before, err) != 0)
        return -1;
    worker *ws = kvs_xcalloc(n, sizeof *ws);
    uint8_t *vbuf = NULL;
    int rc = connect_workers(b, t, ws, n, err);
    if (rc == 0)
        rc = run_phase(b, t, OP_PUT, 0, ws, n, &rows[0], err);
    size_t n_put =
        rows[0].ops + rows[0].errors < b->blocks ? rows[0].ops + rows[0].errors : b->blocks;
    if (rc == 0 && rows[0].errors)
        rc = kvs_err_set(err, KVS_EIO, "put phase had %zu errors", rows[0].errors);
    double bpb = 0;
    if (rc == 0 && n_put == 0)
        rc = kvs_err_set(err, KVS_EINVAL, "no key was put in %.1f s", b->seconds);
    if (rc == 0 && (rc = measure_memory(b, t, redis_before, n_put, &bpb, err)) == 0 &&
        n_put > mem->keys)
        *mem = (mem_row){.t = t, .keys = n_put, .bytes_per_block = bpb};
    if (rc == 0)
        rc = run_phase(b, t, OP_GET, n_put, ws, n, &rows[1], err);
    if (rc == 0 && rows[1].errors)
        rc = kvs_err_set(err, KVS_EIO, "get phase had %zu errors", rows[1].errors);
    close_workers(ws, n);
    free(ws);
    if (rc == 0 && !(vbuf = kvs_trymalloc(b->block_bytes)))
        rc = kvs_err_set(err, KVS_ENOMEM, "verify buffer");
    if (rc == 0)
        rc = verify_sample(b, t, n_put, vbuf, err);
    free(vbuf);
    if (rc == 0)
        rc = store_clear(b, t, err);
    if (rc != 0)
        kvs_err_prefix(err, "%s, %u clients", t->kind == STORE_REDIS ? "redis" : t->ns, n);
    return rc;
}

/* ------------------------------------------------------------------ output */

static const char *store_name(const target *t)
{
    return t->kind == STORE_REDIS ? "redis" : "kvstash";
}

/* The Redis row of the same (clients, op) from this run, or NULL. */
static const row *redis_row(const row *rows, size_t n, const row *r)
{
    for (size_t k = 0; k < n; k++)
        if (rows[k].t->kind == STORE_REDIS && rows[k].clients == r->clients && rows[k].op == r->op)
            return &rows[k];
    return NULL;
}

static const mem_row *redis_mem(const mem_row *mem, size_t n)
{
    for (size_t k = 0; k < n; k++)
        if (mem[k].t->kind == STORE_REDIS && mem[k].keys)
            return &mem[k];
    return NULL;
}

static void print_markdown(const bench *b, const row *rows, size_t n_rows, const mem_row *mem,
                           size_t n_mem)
{
    printf("\nT = %u tokens (%zu bytes per block), %.1f s per phase, key space %zu blocks\n\n",
           b->tokens, b->block_bytes, b->seconds, b->blocks);
    printf("| store | codec | T | clients | op | ops/s | GB/s | p50 µs | p99 µs | GB/s vs Redis "
           "| p50 vs Redis |\n");
    printf("|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (size_t c = 0; c < b->n_clients; c++)
        for (int op = OP_PUT; op <= OP_GET; op++)
            for (size_t k = 0; k < n_rows; k++) {
                const row *r = &rows[k];
                if (r->clients != b->clients[c] || (int)r->op != op)
                    continue;
                printf("| %s | %s | %u | %u | %s | %.0f | %.3f | %.0f | %.0f |", store_name(r->t),
                       r->t->codec, b->tokens, r->clients, op == OP_PUT ? "put" : "get", r->ops_s,
                       r->gb_s, r->p50_us, r->p99_us);
                const row *base = redis_row(rows, n_rows, r);
                if (r->t->kind == STORE_KVSTASH && base && base->gb_s > 0 && base->p50_us > 0)
                    printf(" %.2fx | %.2fx |\n", r->gb_s / base->gb_s, r->p50_us / base->p50_us);
                else
                    printf(" — | — |\n");
            }
    const mem_row *base = redis_mem(mem, n_mem);
    printf("\n| store | codec | T | bytes per block | blocks per GiB | vs Redis |\n");
    printf("|---|---|---|---|---|---|\n");
    for (size_t k = 0; k < n_mem; k++) {
        const mem_row *m = &mem[k];
        if (!m->keys || m->bytes_per_block <= 0)
            continue;
        printf("| %s | %s | %u | %.0f | %.0f |", store_name(m->t), m->t->codec, b->tokens,
               m->bytes_per_block, GIB / m->bytes_per_block);
        if (m->t->kind == STORE_KVSTASH && base && base->bytes_per_block > 0)
            printf(" %.2fx |\n", base->bytes_per_block / m->bytes_per_block);
        else
            printf(" — |\n");
    }
}

static void print_json(const bench *b, const row *rows, size_t n_rows, const mem_row *mem,
                       size_t n_mem)
{
    printf("{\"block_tokens\": %u, \"block_bytes\": %zu, \"seconds\": %.3f, \"blocks\": %zu,\n",
           b->tokens, b->block_bytes, b->seconds, b->blocks);
    printf(" \"rows\": [\n");
    for (size_t k = 0; k < n_rows; k++) {
        const row *r = &rows[k];
        const row *base = redis_row(rows, n_rows, r);
        double ratio =
            r->t->kind == STORE_KVSTASH && base && base->gb_s > 0 ? r->gb_s / base->gb_s : NAN;
        printf("  {\"store\": \"%s\", \"ns\": \"%s\", \"codec\": \"%s\", \"clients\": %u, "
               "\"op\": \"%s\", \"ops\": %zu, \"errors\": %zu, \"wall_s\": %.4f, "
               "\"ops_per_s\": %.2f, \"gb_per_s\": %.4f, \"p50_us\": %.1f, \"p99_us\": %.1f",
               store_name(r->t), r->t->ns ? r->t->ns : "", r->t->codec, r->clients,
               r->op == OP_PUT ? "put" : "get", r->ops, r->errors, r->wall_s, r->ops_s, r->gb_s,
               r->p50_us, r->p99_us);
        if (isfinite(ratio))
            printf(", \"gb_per_s_vs_redis\": %.4f", ratio);
        printf("}%s\n", k + 1 < n_rows ? "," : "");
    }
    printf(" ],\n \"memory\": [\n");
    const mem_row *base = redis_mem(mem, n_mem);
    for (size_t k = 0; k < n_mem; k++) {
        const mem_row *m = &mem[k];
        printf("  {\"store\": \"%s\", \"ns\": \"%s\", \"codec\": \"%s\", \"keys\": %zu, "
               "\"bytes_per_block\": %.1f, \"blocks_per_gib\": %.1f",
               store_name(m->t), m->t->ns ? m->t->ns : "", m->t->codec, m->keys, m->bytes_per_block,
               m->bytes_per_block > 0 ? GIB / m->bytes_per_block : 0.0);
        if (m->t->kind == STORE_KVSTASH && base && m->bytes_per_block > 0)
            printf(", \"vs_redis\": %.4f", base->bytes_per_block / m->bytes_per_block);
        printf("}%s\n", k + 1 < n_mem ? "," : "");
    }
    printf(" ]}\n");
}

/* ------------------------------------------------------------------ setup */

static void usage(FILE *f)
{
    fprintf(f,
            "usage: kvs-bench-h2h [--redis HOST:PORT] [--kvstash HOST:PORT --ns NAME[,NAME...]]\n"
            "                     [--block-tokens T] [--clients N[,N...]] [--seconds S]\n"
            "                     [--blocks N] [--warmup N] [--verify N] [--seed N] [--json]\n"
            "                     [--shared-conn]\n"
            "\n"
            "Puts then gets Llama-3-8B-shaped KV blocks (32 layers, 8 kv-heads, head_dim 128,\n"
            "fp16, T tokens) in Redis and in each kvstash namespace, with the same keys,\n"
            "payloads and client threads (one connection each). One Markdown row per store,\n"
            "clients and op; the kvstash/Redis ratios pair rows of the same run.\n"
            "\n"
            "  --block-tokens T  tokens per block (default 16: 2 MiB; 1: 128 KiB)\n"
            "  --clients LIST    client thread counts, one run each (default 1,8,64)\n"
            "  --seconds S       length of each Put and Get phase (default 3)\n"
            "  --blocks N        key space: Puts cycle over N keys (default: 1 GiB of blocks)\n"
            "  --warmup N        untimed Puts per store before its first run (default: 4096\n"
            "                    tokens' worth, capped at --blocks)\n"
            "  --verify N        keys read back and checked after each run (default 32)\n"
            "  --json            JSON instead of Markdown\n"
            "  --shared-conn     kvstash clients share one connection, as separate kvs_clients\n"
            "                    of one process do by default (gRPC's subchannel pool)\n");
}

static int parse_u64(const char *s, uint64_t lo, uint64_t hi, uint64_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end || s[0] == '-' || v < lo || v > hi)
        return -1;
    *out = v;
    return 0;
}

static int parse_args(bench *b, int argc, char **argv, kvs_err *err)
{
    static const struct option opts[] = {
        {"redis", required_argument, NULL, 'r'},   {"kvstash", required_argument, NULL, 'k'},
        {"ns", required_argument, NULL, 'n'},      {"block-tokens", required_argument, NULL, 't'},
        {"clients", required_argument, NULL, 'c'}, {"seconds", required_argument, NULL, 's'},
        {"blocks", required_argument, NULL, 'b'},  {"warmup", required_argument, NULL, 'w'},
        {"verify", required_argument, NULL, 'v'},  {"seed", required_argument, NULL, 'S'},
        {"json", no_argument, NULL, 'j'},          {"help", no_argument, NULL, 'h'},
        {"shared-conn", no_argument, NULL, 'C'},   {0, 0, 0, 0}};
    const char *redis = NULL, *clients = "1,8,64";
    char *ns_list = NULL;
    uint64_t v, warmup = UINT64_MAX;
    b->tokens = 16;
    b->seconds = 3;
    b->verify = 32;
    b->seed = 1;
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'r':
            redis = optarg;
            break;
        case 'k':
            b->kvs_target = optarg;
            break;
        case 'n':
            ns_list = optarg;
            break;
        case 't':
            if (parse_u64(optarg, 1, KVS_MAX_BLOCK_TOKENS, &v))
                return kvs_err_set(err, KVS_EINVAL, "--block-tokens: '%s'", optarg);
            b->tokens = (uint32_t)v;
            break;
        case 'c':
            clients = optarg;
            break;
        case 's': {
            char *end;
            b->seconds = strtod(optarg, &end);
            if (end == optarg || *end || !(b->seconds > 0 && b->seconds <= 3600))
                return kvs_err_set(err, KVS_EINVAL, "--seconds: '%s' not in (0, 3600]", optarg);
            break;
        }
        case 'b':
            if (parse_u64(optarg, 1, 100000000, &v))
                return kvs_err_set(err, KVS_EINVAL, "--blocks: '%s' not in 1..1e8", optarg);
            b->blocks = (size_t)v;
            break;
        case 'w':
            if (parse_u64(optarg, 0, 100000000, &warmup))
                return kvs_err_set(err, KVS_EINVAL, "--warmup: '%s' not in 0..1e8", optarg);
            break;
        case 'v':
            if (parse_u64(optarg, 0, 1000000, &v))
                return kvs_err_set(err, KVS_EINVAL, "--verify: '%s'", optarg);
            b->verify = (size_t)v;
            break;
        case 'S':
            if (parse_u64(optarg, 0, UINT64_MAX, &b->seed))
                return kvs_err_set(err, KVS_EINVAL, "--seed: '%s'", optarg);
            break;
        case 'j':
            b->json = true;
            break;
        case 'C':
            b->shared_conn = true;
            break;
        case 'h':
            usage(stdout);
            exit(0);
        default:
            usage(stderr);
            exit(2);
        }
    }
    if (optind != argc)
        return kvs_err_set(err, KVS_EINVAL, "unexpected argument '%s'", argv[optind]);
    if (!redis && !b->kvs_target)
        return kvs_err_set(err, KVS_EINVAL, "give --redis, --kvstash or both");
    if (b->kvs_target && !ns_list)
        return kvs_err_set(err, KVS_EINVAL, "--kvstash needs --ns");

    /* Clients, then the targets: Redis first, so each run's Redis row exists for the
     * ratios of the kvstash rows printed after it. */
    char cbuf[256];
    snprintf(cbuf, sizeof cbuf, "%s", clients);
    char *save = NULL;
    for (char *tok = strtok_r(cbuf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        if (b->n_clients == sizeof b->clients / sizeof b->clients[0] ||
            parse_u64(tok, 1, MAX_CLIENTS, &v))
            return kvs_err_set(err, KVS_EINVAL, "--clients: '%s' (at most 16 counts, each 1..%d)",
                               tok, MAX_CLIENTS);
        b->clients[b->n_clients++] = (unsigned)v;
    }
    if (redis) {
        const char *colon = strrchr(redis, ':');
        if (!colon || colon == redis || (size_t)(colon - redis) >= sizeof b->redis_host ||
            parse_u64(colon + 1, 1, 65535, &v))
            return kvs_err_set(err, KVS_EINVAL, "--redis: '%s' is not HOST:PORT", redis);
        memcpy(b->redis_host, redis, (size_t)(colon - redis));
        b->redis_port = (int)v;
        b->targets[b->n_targets++] = (target){.kind = STORE_REDIS, .codec = "raw", .exact = true};
    }
    save = NULL;
    for (char *tok = ns_list ? strtok_r(ns_list, ",", &save) : NULL; tok;
         tok = strtok_r(NULL, ",", &save)) {
        if (b->n_targets == MAX_TARGETS)
            return kvs_err_set(err, KVS_EINVAL, "--ns: more than %d namespaces", MAX_TARGETS - 1);
        b->targets[b->n_targets++] = (target){.kind = STORE_KVSTASH, .ns = tok};
    }

    b->spec = (kvs_ns_spec){.layers = LAYERS,
                            .kv_heads = KV_HEADS,
                            .head_dim = HEAD_DIM,
                            .block_tokens = b->tokens,
                            .dtype = KVS_DTYPE_FP16};
    uint64_t bytes;
    if (kvs_spec_block_bytes(&b->spec, b->tokens, &bytes, err) != 0)
        return kvs_err_prefix(err, "--block-tokens");
    b->block_bytes = (size_t)bytes;
    if (!b->blocks)
        b->blocks = (size_t)(GIB / (double)bytes) ? (size_t)(GIB / (double)bytes) : 1;
    if (warmup == UINT64_MAX)
        warmup = (4096 + b->tokens - 1) / b->tokens;
    b->warmup = warmup < b->blocks ? (size_t)warmup : b->blocks;
    return 0;
}

/* Fills each kvstash target's codec and checks its layout can hold our payloads. */
static int check_namespaces(bench *b, kvs_err *err)
{
    for (size_t k = 0; k < b->n_targets; k++) {
        target *t = &b->targets[k];
        if (t->kind != STORE_KVSTASH)
            continue;
        kvs_ns_info info;
        if (kvs_client_ns_get(b->kvs, t->ns, &info, err) != 0)
            return kvs_err_prefix(err, "--ns %s", t->ns);
        const kvs_ns_spec *s = &info.spec;
        if (s->layers != LAYERS || s->kv_heads != KV_HEADS || s->head_dim != HEAD_DIM ||
            s->dtype != KVS_DTYPE_FP16 || s->block_tokens < b->tokens)
            return kvs_err_set(err, KVS_EINVAL,
                               "--ns %s: layout %u layers, %u kv-heads, head_dim %u, %s, "
                               "%u block tokens; need %d, %d, %d, fp16, >= %u",
                               t->ns, s->layers, s->kv_heads, s->head_dim, kvs_dtype_name(s->dtype),
                               s->block_tokens, LAYERS, KV_HEADS, HEAD_DIM, b->tokens);
        if (strcmp(s->key_codec, s->value_codec) == 0)
            snprintf(t->codec, sizeof t->codec, "%s", s->key_codec);
        else
            snprintf(t->codec, sizeof t->codec, "%s/%s", s->key_codec, s->value_codec);
        t->exact = strcmp(s->key_codec, "none") == 0 && strcmp(s->value_codec, "none") == 0;
    }
    return 0;
}

int main(int argc, char **argv)
{
    static bench b;
    kvs_err err;
    kvs_err_clear(&err);
    int rc = parse_args(&b, argc, argv, &err);
    if (rc != 0) {
        fprintf(stderr, "kvs-bench-h2h: %s\n", err.msg);
        usage(stderr);
        return 2;
    }
    kvs_client_opts o = {.target = b.kvs_target};
    if (b.redis_port && redis_connect(&b, &b.redis, &err) != 0)
        rc = -1;
    if (rc == 0 && b.kvs_target && kvs_client_connect(&o, &b.kvs, &err) != 0)
        rc = -1;
    if (rc == 0)
        rc = check_namespaces(&b, &err);
    double g0 = now_s();
    if (rc == 0)
        rc = make_keys(&b, &err);
    if (rc == 0)
        rc = make_pool(&b, &err);
    if (rc == 0)
        fprintf(stderr, "kvs-bench-h2h: %d payloads of %zu bytes generated in %.1f s\n", POOL_SIZE,
                b.block_bytes, now_s() - g0);

    size_t n_rows = 0, max_rows = 2 * b.n_targets * b.n_clients;
    row *rows = kvs_xcalloc(max_rows ? max_rows : 1, sizeof *rows);
    mem_row mem[MAX_TARGETS] = {{0}};
    for (size_t k = 0; rc == 0 && k < b.n_targets; k++) {
        mem[k].t = &b.targets[k];
        rc = warm_up(&b, &b.targets[k], &err);
    }
    /* Clients outer, stores inner: drift on this shared machine (other work, heap growth)
     * hits every store of a client count alike, so the pairwise ratios stay fair. */
    for (size_t c = 0; rc == 0 && c < b.n_clients; c++)
        for (size_t k = 0; rc == 0 && k < b.n_targets; k++) {
            fprintf(stderr, "kvs-bench-h2h: %s %s, T=%u, %u clients\n", store_name(&b.targets[k]),
                    b.targets[k].codec, b.tokens, b.clients[c]);
            rc = run_one(&b, &b.targets[k], b.clients[c], &rows[n_rows], &mem[k], &err);
            if (rc == 0)
                n_rows += 2;
        }
    if (rc != 0)
        fprintf(stderr, "kvs-bench-h2h: %s\n", err.msg);
    if (n_rows) {
        if (b.json)
            print_json(&b, rows, n_rows, mem, b.n_targets);
        else
            print_markdown(&b, rows, n_rows, mem, b.n_targets);
    }
    free(rows);
    for (unsigned p = 0; p < POOL_SIZE; p++)
        free(b.pool[p]);
    free(b.keys);
    if (b.redis)
        redisFree(b.redis);
    kvs_client_close(b.kvs);
    return rc == 0 ? 0 : 1;
}
