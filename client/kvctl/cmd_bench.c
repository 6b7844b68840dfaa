/* kvctl bench: load a namespace with synthetic blocks, read every one back, verify
 * every byte, and report throughput and latency per operation.
 *
 * Threads: P worker pthreads share the one kvs_client (which is thread-safe) and the
 * read-only bench_cfg; each writes only the op_result slots of its own blocks (block i
 * belongs to worker i % P) and its own worker struct. The main thread reads them after
 * pthread_join. Payloads come from a seeded xorshift per block, so they are distinct,
 * reproducible and regenerated for the comparison instead of kept in memory. Each worker
 * also counts its finished operations in the phase's one atomic counter, which the
 * progress bar's helper thread reads (progress.h) while the main thread joins.
 */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "gpu/base/mem.h"
#include "gpu/codec/half.h"
#include "kvctl.h"

#define MAX_THREADS 256
#define DELETE_BATCH 64

typedef struct bench_cfg {
    kvs_client *cl;
    const char *ns;
    kvs_dtype dtype;
    uint32_t tokens;
    size_t block_bytes;
    uint64_t seed;
    size_t blocks;
    unsigned threads;
    bool exact;         /* both codecs `none`: bytes must come back identical */
    atomic_size_t *ops; /* operations of the running phase finished (progress bar) */
} bench_cfg;

typedef struct op_result {
    double ms;
    bool ok, verified;
    double rel_err; /* lossy codecs: relative L2 error of the block read back */
} op_result;

typedef enum { OP_PUT, OP_GET } bench_op;

typedef struct worker {
    pthread_t tid;
    const bench_cfg *cfg;
    bench_op op;
    unsigned index;
    bool running;       /* started as a thread (else run inline) */
    op_result *results; /* cfg->blocks slots; this worker writes i % threads == index */
    size_t failures;
    char first_error[KVS_ERR_MSG_LEN + 64];
    /* The client's own work (making payloads, checking what came back) is kept out of
     * the numbers: latencies time the call alone, and the phase's time is the longest
     * worker time minus that worker's own client work. */
    double client_ms, end_ms;
} worker;

static double now_ms(void)
{
    struct timespec ts;
    /* CLOCK_MONOTONIC cannot fail with a valid pointer on Linux. */
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static void bench_key(const bench_cfg *cfg, size_t i, kvs_key *key)
{
    int n = snprintf((char *)key->bytes, sizeof key->bytes, "bench-%llu-%zu",
                     (unsigned long long)cfg->seed, i);
    key->len = (uint8_t)(n < (int)sizeof key->bytes ? n : (int)sizeof key->bytes - 1);
}

/* Block i's payload: xorshift64* seeded by (seed, i) through splitmix64. Every 16-bit
 * element has bit 14 cleared, so its exponent is never all ones: finite in fp16 and in
 * bf16 (the daemon rejects NaN and Inf). */
static void fill_block(const bench_cfg *cfg, size_t i, uint8_t *buf)
{
    uint64_t z = cfg->seed + 0x9e3779b97f4a7c15ull * (i + 1);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    uint64_t x = (z ^ (z >> 31)) | 1;
    size_t n = cfg->block_bytes, off = 0;
    for (; off + 8 <= n; off += 8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        uint64_t v = (x * 0x2545f4914f6cdd1dull) & 0xbfffbfffbfffbfffull;
        /* Little-endian on every host, so a seed names the same bytes everywhere. */
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        v = __builtin_bswap64(v);
#endif
        memcpy(buf + off, &v, 8);
    }
    memset(buf + off, 0, n - off); /* blocks are whole 8-byte words; kept for safety */
}

/* A lossy codec passes when the block comes back finite and within this relative L2
 * error: far above every codec's error class (2-bit codecs: ~0.4 on random data), far
 * below what a wrong block or layout gives (~1.4 for unrelated data). */
#define LOSSY_MAX_REL_ERR 0.7

static double rel_error(kvs_dtype dt, const uint8_t *want, const uint8_t *got, size_t n)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        uint16_t a = (uint16_t)(want[2 * i] | want[2 * i + 1] << 8);
        uint16_t b = (uint16_t)(got[2 * i] | got[2 * i + 1] << 8);
        double x = dt == KVS_DTYPE_BF16 ? kvs_bf16_to_f32(a) : kvs_fp16_to_f32(a);
        double y = dt == KVS_DTYPE_BF16 ? kvs_bf16_to_f32(b) : kvs_fp16_to_f32(b);
        num += (x - y) * (x - y);
        den += x * x;
    }
    double e = den > 0 ? sqrt(num / den) : sqrt(num);
    return isfinite(e) ? e : INFINITY;
}

static void record_error(worker *w, size_t i, const char *what)
{
    if (w->failures++ == 0)
        snprintf(w->first_error, sizeof w->first_error, "%s bench-%llu-%zu: %s",
                 w->op == OP_PUT ? "put" : "get", (unsigned long long)w->cfg->seed, i, what);
}

static void *worker_main(void *arg)
{
    worker *w = arg;
    const bench_cfg *cfg = w->cfg;
    uint8_t *expect = kvs_trymalloc(cfg->block_bytes);
    uint8_t *got = w->op == OP_GET ? kvs_trymalloc(cfg->block_bytes) : NULL;
    for (size_t i = w->index; i < cfg->blocks; i += cfg->threads) {
        op_result *r = &w->results[i];
        if (!expect || (w->op == OP_GET && !got)) {
            record_error(w, i, "out of memory for the block buffers");
            continue;
        }
        kvs_key key;
        double c0 = now_ms();
        bench_key(cfg, i, &key);
        fill_block(cfg, i, expect);
        kvs_err err;
        int rc;
        double t0 = now_ms();
        w->client_ms += t0 - c0;
        if (w->op == OP_PUT) {
            rc = kvs_client_put(cfg->cl, cfg->ns, key.bytes, key.len, cfg->tokens, cfg->dtype,
                                expect, cfg->block_bytes, NULL, &err);
            r->ms = now_ms() - t0;
        } else {
            kvs_get_result res;
            rc = kvs_client_get(cfg->cl, cfg->ns, key.bytes, key.len, got, cfg->block_bytes, &res,
                                &err);
            double t1 = now_ms();
            r->ms = t1 - t0;
            if (rc == 0 && cfg->exact) {
                r->verified =
                    res.bytes == cfg->block_bytes && memcmp(got, expect, cfg->block_bytes) == 0;
                if (!r->verified)
                    record_error(w, i, "bytes read back differ from the bytes put");
            } else if (rc == 0) {
                r->rel_err = res.bytes == cfg->block_bytes
                                 ? rel_error(cfg->dtype, expect, got, cfg->block_bytes / 2)
                                 : INFINITY;
                r->verified = r->rel_err < LOSSY_MAX_REL_ERR;
                if (!r->verified)
                    record_error(w, i,
                                 "block read back is not finite or too far from the one "
                                 "put for any codec");
            }
            w->client_ms += now_ms() - t1;
        }
        r->ok = rc == 0;
        if (rc != 0)
            record_error(w, i, err.msg);
        atomic_fetch_add_explicit(cfg->ops, 1, memory_order_relaxed);
    }
    free(expect);
    free(got);
    w->end_ms = now_ms();
    return NULL;
}

typedef struct phase {
    const bench_cfg *cfg;
    worker *ws;
} phase;

static int join_workers(void *arg)
{
    phase *ph = arg;
    for (unsigned t = 0; t < ph->cfg->threads; t++)
        if (ph->ws[t].running && pthread_join(ph->ws[t].tid, NULL) != 0)
            fprintf(stderr, "kvctl: bench: pthread_join failed\n");
    return 0;
}

/* The progress bar's poll (its helper thread): the operations finished so far. */
static void poll_ops(void *arg, uint64_t *done, uint64_t *total)
{
    phase *ph = arg;
    *done = atomic_load_explicit(ph->cfg->ops, memory_order_relaxed);
    *total = ph->cfg->blocks;
}

/* Runs one phase on cfg->threads workers, with a progress bar when bar; returns its wall
 * time in ms. */
static double run_phase(const bench_cfg *cfg, bench_op op, op_result *results, worker *ws, bool bar)
{
    memset(results, 0, cfg->blocks * sizeof *results);
    atomic_store(cfg->ops, 0);
    kvctl_progress p;
    kvctl_progress_start(&p, stderr, bar, op == OP_PUT ? "bench put" : "bench get", "blocks",
                         cfg->blocks);
    double t0 = now_ms();
    for (unsigned t = 0; t < cfg->threads; t++) {
        ws[t] = (worker){.cfg = cfg, .op = op, .index = t, .results = results};
        ws[t].running = pthread_create(&ws[t].tid, NULL, worker_main, &ws[t]) == 0;
        if (!ws[t].running)
            worker_main(&ws[t]); /* run this share here rather than lose it */
    }
    phase ph = {cfg, ws};
    kvctl_progress_during(&p, join_workers, poll_ops, &ph);
    kvctl_progress_finish(&p, atomic_load(cfg->ops), cfg->blocks);
    double wall = 0;
    for (unsigned t = 0; t < cfg->threads; t++) {
        double busy = ws[t].end_ms - t0 - ws[t].client_ms;
        wall = busy > wall ? busy : wall;
    }
    return wall;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

typedef struct phase_stats {
    const char *op;
    size_t count, ok, verified;
    double wall_ms, ops_s, mb_s, p50, p99;
} phase_stats;

static phase_stats summarize(const char *op, const bench_cfg *cfg, const op_result *r,
                             double wall_ms)
{
    phase_stats s = {.op = op, .count = cfg->blocks, .wall_ms = wall_ms};
    double *lat = kvs_xcalloc(cfg->blocks ? cfg->blocks : 1, sizeof *lat);
    for (size_t i = 0; i < cfg->blocks; i++) {
        if (r[i].ok)
            lat[s.ok++] = r[i].ms;
        s.verified += r[i].verified;
    }
    qsort(lat, s.ok, sizeof *lat, cmp_double);
    if (s.ok) {
        /* Nearest-rank percentiles. */
        s.p50 = lat[(size_t)ceil(0.50 * (double)s.ok) - 1];
        s.p99 = lat[(size_t)ceil(0.99 * (double)s.ok) - 1];
    }
    double secs = wall_ms / 1e3;
    if (secs > 0) {
        s.ops_s = (double)s.ok / secs;
        s.mb_s = (double)s.ok * (double)cfg->block_bytes / 1e6 / secs;
    }
    free(lat);
    return s;
}

static void report_errors(const worker *ws, unsigned n)
{
    size_t total = 0;
    for (unsigned t = 0; t < n; t++) {
        if (ws[t].failures)
            fprintf(stderr, "kvctl: bench: %s\n", ws[t].first_error);
        total += ws[t].failures;
    }
    if (total)
        fprintf(stderr, "kvctl: bench: %zu failed operations (first error of each thread above)\n",
                total);
}

/* Deletes the bench's blocks; returns how many were deleted, or -1 after printing. */
static long long delete_blocks(const bench_cfg *cfg)
{
    long long deleted = 0;
    kvs_key keys[DELETE_BATCH];
    for (size_t i = 0; i < cfg->blocks; i += DELETE_BATCH) {
        size_t n = cfg->blocks - i < DELETE_BATCH ? cfg->blocks - i : DELETE_BATCH;
        for (size_t k = 0; k < n; k++)
            bench_key(cfg, i + k, &keys[k]);
        uint32_t d = 0;
        kvs_err err;
        if (kvs_client_delete(cfg->cl, cfg->ns, keys, n, &d, &err) != 0) {
            fprintf(stderr, "kvctl: bench: cleanup: %s\n", err.msg);
            return -1;
        }
        deleted += d;
    }
    return deleted;
}

static void print_report(const bench_cfg *cfg, const phase_stats *ph, size_t nph,
                         const op_result *results_get, bool json, long long deleted)
{
    size_t verified = ph[nph - 1].verified;
    if (json) {
        kvctl_json j;
        kvctl_json_init(&j, stdout);
        kvctl_json_open(&j, NULL, '{');
        kvctl_json_str(&j, "namespace", cfg->ns);
        kvctl_json_u64(&j, "blocks", cfg->blocks);
        kvctl_json_u64(&j, "threads", cfg->threads);
        kvctl_json_u64(&j, "tokens", cfg->tokens);
        kvctl_json_u64(&j, "block_bytes", cfg->block_bytes);
        kvctl_json_u64(&j, "seed", cfg->seed);
        kvctl_json_open(&j, "ops", '[');
        for (size_t i = 0; i < nph; i++) {
            kvctl_json_open(&j, NULL, '{');
            kvctl_json_str(&j, "op", ph[i].op);
            kvctl_json_u64(&j, "count", ph[i].count);
            kvctl_json_u64(&j, "ok", ph[i].ok);
            kvctl_json_u64(&j, "verified", ph[i].verified);
            kvctl_json_num(&j, "wall_ms", ph[i].wall_ms);
            kvctl_json_num(&j, "ops_per_s", ph[i].ops_s);
            kvctl_json_num(&j, "mb_per_s", ph[i].mb_s);
            kvctl_json_num(&j, "p50_ms", ph[i].p50);
            kvctl_json_num(&j, "p99_ms", ph[i].p99);
            kvctl_json_close(&j, '}');
        }
        kvctl_json_close(&j, ']');
        kvctl_json_u64(&j, "verified", verified);
        kvctl_json_bool(&j, "ok", verified == cfg->blocks);
        if (deleted >= 0)
            kvctl_json_u64(&j, "deleted", (uint64_t)deleted);
        kvctl_json_close(&j, '}');
        return;
    }
    char b[32];
    printf("bench %s: %zu blocks of %u tokens (%s), %u threads, seed %llu\n\n", cfg->ns,
           cfg->blocks, cfg->tokens, kvctl_fmt_bytes(cfg->block_bytes, b, sizeof b), cfg->threads,
           (unsigned long long)cfg->seed);
    kvctl_table t;
    kvctl_table_init(&t, 8, "OP", "COUNT", "OK", "VERIFIED", "OPS/S", "MB/S", "P50 MS", "P99 MS");
    for (size_t i = 0; i < nph; i++) {
        kvctl_table_cell(&t, "%s", ph[i].op);
        kvctl_table_cell(&t, "%zu", ph[i].count);
        kvctl_table_cell(&t, "%zu", ph[i].ok);
        if (strcmp(ph[i].op, "get") == 0)
            kvctl_table_cell(&t, "%zu", ph[i].verified);
        else
            kvctl_table_cell(&t, "-");
        kvctl_table_cell(&t, "%.1f", ph[i].ops_s);
        kvctl_table_cell(&t, "%.1f", ph[i].mb_s);
        kvctl_table_cell(&t, "%.2f", ph[i].p50);
        kvctl_table_cell(&t, "%.2f", ph[i].p99);
    }
    kvctl_table_print(&t, stdout);
    kvctl_table_free(&t);
    if (cfg->exact) {
        printf("\nverified %zu/%zu blocks\n", verified, cfg->blocks);
    } else {
        double sum = 0;
        size_t n = 0;
        for (size_t i = 0; i < cfg->blocks; i++)
            if (results_get[i].ok && isfinite(results_get[i].rel_err)) {
                sum += results_get[i].rel_err;
                n++;
            }
        printf("\nverified %zu/%zu blocks (lossy codecs: finite, relative L2 error < %.1f; "
               "mean %.4f)\n",
               verified, cfg->blocks, LOSSY_MAX_REL_ERR, n ? sum / n : 0.0);
    }
    if (deleted >= 0)
        printf("deleted %lld blocks\n", deleted);
}

static int bench(const kvctl_cmd *cmd, const kvctl_globals *g, int argc, char **argv)
{
    static const struct option opts[] = {
        {"blocks", required_argument, NULL, 'n'}, {"threads", required_argument, NULL, 'p'},
        {"tokens", required_argument, NULL, 't'}, {"seed", required_argument, NULL, 's'},
        {"keep", no_argument, NULL, 'k'},         {0, 0, 0, 0}};
    uint64_t blocks = 64, threads = 4, tokens = 0, seed = 1;
    bool keep = false;
    int c;
    while ((c = kvctl_getopt(cmd, argc, argv, opts)) != -1) {
        if (c == '?')
            return KVCTL_USAGE;
        if (c == 'n' && !kvctl_parse_u64(optarg, 1, 100000000, &blocks))
            return kvctl_usage(cmd, "--blocks: '%s' is not in 1..100000000", optarg);
        if (c == 'p' && !kvctl_parse_u64(optarg, 1, MAX_THREADS, &threads))
            return kvctl_usage(cmd, "--threads: '%s' is not in 1..%d", optarg, MAX_THREADS);
        if (c == 't' && !kvctl_parse_u64(optarg, 1, KVS_MAX_BLOCK_TOKENS, &tokens))
            return kvctl_usage(cmd, "--tokens: '%s' is not in 1..%d", optarg, KVS_MAX_BLOCK_TOKENS);
        if (c == 's' && !kvctl_parse_u64(optarg, 0, UINT64_MAX, &seed))
            return kvctl_usage(cmd, "--seed: '%s' is not an unsigned integer", optarg);
        if (c == 'k')
            keep = true;
    }
    if (argc - optind != 1)
        return kvctl_usage(cmd, "expected one NS, got %d arguments", argc - optind);
    atomic_size_t ops;
    atomic_init(&ops, 0);
    bench_cfg cfg = {.ns = argv[optind],
                     .seed = seed,
                     .blocks = blocks,
                     .threads = (unsigned)(threads < blocks ? threads : blocks),
                     .ops = &ops};

    if (kvctl_connect(cmd, g, &cfg.cl) != KVCTL_OK)
        return KVCTL_FAIL;
    kvs_ns_info info;
    kvs_err err;
    uint64_t bytes;
    if (kvs_client_ns_get(cfg.cl, cfg.ns, &info, &err) != 0) {
        kvs_client_close(cfg.cl);
        return kvctl_fail(cmd, &err);
    }
    cfg.tokens = tokens ? (uint32_t)tokens : info.spec.block_tokens;
    cfg.dtype = info.spec.dtype;
    cfg.exact =
        strcmp(info.spec.key_codec, "none") == 0 && strcmp(info.spec.value_codec, "none") == 0;
    if (kvs_spec_block_bytes(&info.spec, cfg.tokens, &bytes, &err) != 0 || bytes > SIZE_MAX) {
        kvs_client_close(cfg.cl);
        return kvctl_usage(cmd, "--tokens: %s", err.msg);
    }
    cfg.block_bytes = (size_t)bytes;

    op_result *results = kvs_xcalloc(cfg.blocks, sizeof *results);
    worker *ws = kvs_xcalloc(cfg.threads, sizeof *ws);
    phase_stats ph[2];
    bool bar = kvctl_progress_wanted(g->progress, stderr);
    double wall = run_phase(&cfg, OP_PUT, results, ws, bar);
    report_errors(ws, cfg.threads);
    ph[0] = summarize("put", &cfg, results, wall);
    wall = run_phase(&cfg, OP_GET, results, ws, bar);
    report_errors(ws, cfg.threads);
    ph[1] = summarize("get", &cfg, results, wall);
    long long deleted = keep ? -1 : delete_blocks(&cfg);
    print_report(&cfg, ph, 2, results, g->json, deleted);
    free(ws);
    free(results);
    kvs_client_close(cfg.cl);
    if (ph[1].verified != cfg.blocks)
        return kvctl_failf(cmd, "%zu of %zu blocks failed or did not verify",
                           cfg.blocks - ph[1].verified, cfg.blocks);
    if (!keep && deleted < 0)
        return KVCTL_FAIL;
    return KVCTL_OK;
}

const kvctl_cmd kvctl_cmd_bench = {
    .name = "bench",
    .args = "NS [--blocks N] [--threads P] [--tokens T] [--seed S] [--keep]\n"
            "       [--progress | --no-progress]",
    .summary = "put, get and verify synthetic blocks; throughput and latency",
    .help = "P threads share one client; each puts its share of the N blocks (keys\n"
            "bench-<seed>-<i>, payload from a seeded generator, distinct per block), then\n"
            "the blocks are read back and every byte is compared with the bytes put.\n"
            "Prints per operation: count, ok, verified, ops/s, MB/s (1 MB = 1e6 bytes),\n"
            "p50 and p99 latency, then 'verified N/N blocks'. Times cover the calls alone:\n"
            "making payloads and checking what came back are left out of them.\n"
            "Exit status 1 if any block\n"
            "failed or differs: byte for byte with codec none; with a lossy codec every\n"
            "block must come back finite within relative L2 error 0.7 (the mean is printed).\n"
            "The blocks are deleted at the end unless --keep.\n"
            "\n"
            "  --blocks N    blocks in all (default 64)\n"
            "  --threads P   worker threads (default 4)\n"
            "  --tokens T    tokens per block (default: the namespace's block_tokens)\n"
            "  --seed S      payload and key seed (default 1)\n"
            "  --keep        leave the blocks in the daemon\n"
            "  --progress    a progress bar per phase on stderr (blocks done, rate, ETA) even\n"
            "                when stderr is not a terminal; --no-progress: none (default: on\n"
            "                a terminal only)\n",
    .run = bench,
};
