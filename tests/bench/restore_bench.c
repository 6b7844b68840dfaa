/* kvs-bench-restore: how fast a worker gets a cached prompt prefix back from kvstashd, by
 * each path of the data plane (issue 12, README "Data plane"):
 *
 *   get        one Get per block, one after the other (the path before issue 12)
 *   getmany    one GetMany call for the whole prefix, bytes over gRPC
 *   shm        one GetMany whose blocks the daemon writes into a shared-memory region
 *   encoded    one GetMany of the encoded blocks, decoded on this CPU (kvs_decode_block):
 *              the remote path, fewer wire bytes
 *   gpudecode  the same, received into pinned host memory (a GPU worker's staging) and
 *              decoded on this machine's GPU into device memory (libkvstash_cuda): the
 *              remote path of a GPU worker; skipped without a GPU
 *   shmgpu     one GetMany of the encoded blocks into the shared-memory region (registered
 *              with CUDA here too, so pinned on both sides), decoded on this machine's GPU
 *              from there (libkvstash_cuda: whole blocks by DMA, sections gathered on the
 *              device): the co-located worker's path when CUDA IPC is not available
 *   shmgpu-pipe  shmgpu in GetMany calls of PIPE_BLOCKS blocks, each chunk decoded on
 *              this GPU by a second thread while the next one streams into the region
 *              (what a worker does to overlap the daemon's fetch with its own decode)
 *   shmenc     one GetMany of the encoded blocks into the shared-memory region, not decoded
 *              in the timing: the daemon's half of shmgpu, on any machine (decoded on the CPU
 *              afterwards for the byte check)
 *   ipc        one GetMany whose blocks the daemon's GPU engine decodes straight into this
 *              process's GPU memory (a CUDA IPC region, kvs_cuda_region_create): the
 *              co-located GPU worker's path; skipped without a GPU engine on the same GPU
 *
 * The prefix is `--tokens` tokens of a Llama-3-8B-shaped model by default (32 layers, 8 KV
 * heads of 128, fp16, 16-token blocks: 2 MiB a block, 1 GiB for 8k tokens), stored once
 * with PutMany (timed too: shm and bytes). Every path's bytes are compared with the first
 * path's outside the timed phase: byte for byte for codec `none`, and every lossy path
 * must equal the `get` path's decode, so a path that returned other bytes fails the run
 * (exit 1). The numbers are reported, never asserted: tests/bench/RESULTS.md.
 *
 *   kvs-bench-restore --target HOST:PORT [--codec none|polarquant|rotatekv-2|kivi-2|...]
 *                     [--tokens 8192] [--layers 32 --heads 8 --dim 128 --block 16]
 *                     [--reps 3] [--paths get,getmany,shm,encoded,gpudecode,shmgpu,shmgpu-pipe,ipc]
 *                     (shmenc: only when named)
 *                     [--token T] [--connections N] [--pipe-blocks 64]
 *
 * --connections N: the client's connections to the daemon (kvs_client_opts.connections):
 * the gRPC-bytes paths (getmany, encoded, gpudecode) split each GetMany over them.
 * --pipe-blocks N: shmgpu-pipe's blocks per GetMany; its last run's per-chunk trace (when
 * each GetMany returned, when each chunk's decode ran) goes to stderr.
 */
#include <getopt.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "gpu/codec/half.h"
#include "kvstash.h"
#include "kvstash_cuda.h"
#ifdef KVS_HAVE_CUDA
#include <cuda_runtime.h>
#endif

#define MAX_PATHS 9
#define PIPE_BLOCKS 64  /* shmgpu-pipe: blocks per GetMany (--pipe-blocks) */
#define PIPE_CHUNKS 256 /* ...chunks traced (the rest are not) */

typedef struct cfg {
    const char *target, *codec, *token;
    uint32_t tokens, layers, heads, dim, block;
    unsigned reps, connections, pipe_blocks;
    char paths[128];
} cfg;

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int die(const char *what, const kvs_err *e)
{
    fprintf(stderr, "kvs-bench-restore: %s: %s\n", what, e->msg);
    return 1;
}

/* KV-like values: gaussian with a few outlier channels (as real keys have), finite fp16. */
static void fill(uint16_t *p, size_t n, uint64_t seed, uint32_t dim)
{
    uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
    for (size_t i = 0; i < n; i += 2) {
        double u[2];
        for (int k = 0; k < 2; k++) {
            s ^= s << 13, s ^= s >> 7, s ^= s << 17;
            u[k] = ((s >> 11) + 0.5) / 9007199254740992.0;
        }
        double r = sqrt(-2 * log(u[0])), a = 6.283185307179586 * u[1];
        double v[2] = {r * cos(a), r * sin(a)};
        for (int k = 0; k < 2 && i + k < n; k++) {
            double scale = ((i + k) % dim) % 37 == 0 ? 8.0 : 1.0;
            p[i + k] = kvs_f32_to_fp16((float)(v[k] * scale));
        }
    }
}

/* The GPU kernels decode within one fp16 ulp of the CPU reference (test_codecs_gpu.c). */
static unsigned max_ulp(const uint8_t *a8, const uint8_t *b8, size_t n)
{
    const uint16_t *a = (const uint16_t *)a8, *b = (const uint16_t *)b8;
    unsigned worst = 0;
    for (size_t i = 0; i < n; i++) {
        int x = a[i] & 0x8000 ? -(int)(a[i] & 0x7fff) : (int)a[i];
        int y = b[i] & 0x8000 ? -(int)(b[i] & 0x7fff) : (int)b[i];
        unsigned d = (unsigned)(x > y ? x - y : y - x);
        worst = d > worst ? d : worst;
    }
    return worst;
}

/* shmgpu-pipe: the main thread's GetMany calls hand chunks of the region to a decoder
 * thread (`fetched` blocks are in the region; the decoder has done `decoded`). */
typedef struct pipe_ctx {
    kvs_cuda_decoder *dec;
    kvs_cuda_block *cb;
    const kvs_get_item *gi;
    const uint8_t *base;
    uint8_t *dev;
    size_t nb, enc_cap, bb;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    size_t fetched, chunk; /* chunk: blocks per GetMany */
    bool stop;             /* no more chunks come (all fetched, or the fetch failed) */
    /* The trace of the last run (ms since t0): chunk c's GetMany returned at fetched_at[c];
     * the decoder took it (chunks fetched meanwhile join it) at dec_from[c], done at
     * dec_to[c] (0: decoded with an earlier one). Where the time goes: the daemon (the
     * gaps between fetches) or this side's copy and decode. */
    double t0, fetched_at[PIPE_CHUNKS], dec_from[PIPE_CHUNKS], dec_to[PIPE_CHUNKS];
    int rc;
    kvs_err e;
} pipe_ctx;

static void *pipe_decoder(void *arg)
{
    pipe_ctx *p = arg;
    for (size_t at = 0; at < p->nb;) {
        pthread_mutex_lock(&p->mu);
        while (p->fetched == at && !p->stop)
            pthread_cond_wait(&p->cv, &p->mu);
        size_t upto = p->fetched;
        pthread_mutex_unlock(&p->mu);
        if (upto == at)
            break; /* stopped */
        for (size_t i = at; i < upto; i++)
            p->cb[i] = (kvs_cuda_block){.enc = p->base + i * p->enc_cap,
                                        .len = p->gi[i].res.bytes,
                                        .raw_dev = p->dev + i * p->bb,
                                        .cap = p->bb};
        size_t c = at / p->chunk;
        if (c < PIPE_CHUNKS)
            p->dec_from[c] = now_ms() - p->t0;
        int rc = kvs_decode_blocks_cuda(p->dec, p->cb + at, upto - at, NULL, &p->e);
        if (c < PIPE_CHUNKS)
            p->dec_to[c] = now_ms() - p->t0;
        for (size_t i = at; i < upto && !rc; i++)
            if (p->cb[i].rc)
                rc = kvs_err_set(&p->e, p->cb[i].rc, "block %zu: %s", i, p->cb[i].msg);
        if (rc) {
            p->rc = rc;
            return NULL;
        }
        at = upto;
    }
    return NULL;
}

/* shmgpu-pipe: GetMany of PIPE_BLOCKS blocks at a time into the region, each chunk decoded
 * on the GPU by pipe_decoder while the next one streams in. */
static int restore_pipelined(kvs_client *cl, const char *ns, kvs_get_item *gi, pipe_ctx *p,
                             kvs_err *e)
{
    pthread_t th;
    p->fetched = 0;
    p->stop = false;
    p->t0 = now_ms();
    memset(p->dec_from, 0, sizeof p->dec_from);
    memset(p->dec_to, 0, sizeof p->dec_to);
    p->rc = 0;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    if (pthread_create(&th, NULL, pipe_decoder, p) != 0)
        return kvs_err_set(e, KVS_EINTERNAL, "pthread_create failed");
    int rc = 0;
    kvs_get_many_opts go = {.format = KVS_FORMAT_ENCODED, .prefix = true};
    for (size_t at = 0; at < p->nb && !rc;) {
        size_t n = p->nb - at < p->chunk ? p->nb - at : p->chunk, served = 0;
        rc = kvs_client_get_many(cl, ns, gi + at, n, &go, &served, e);
        if (at / p->chunk < PIPE_CHUNKS)
            p->fetched_at[at / p->chunk] = now_ms() - p->t0;
        if (!rc && served != n)
            rc = kvs_err_set(e, KVS_ENOTFOUND, "%zu of %zu blocks served", served, n);
        pthread_mutex_lock(&p->mu);
        if (!rc)
            p->fetched = at += n;
        p->stop = rc || at == p->nb;
        pthread_cond_signal(&p->cv);
        pthread_mutex_unlock(&p->mu);
    }
    pthread_join(th, NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    if (!rc && p->rc) {
        *e = p->e;
        rc = p->rc;
    }
    return rc;
}

static bool want(const cfg *c, const char *path)
{
    char buf[128];
    snprintf(buf, sizeof buf, "%s", c->paths);
    for (char *t = strtok(buf, ","); t; t = strtok(NULL, ","))
        if (strcmp(t, path) == 0)
            return true;
    return false;
}

int main(int argc, char **argv)
{
    cfg c = {.target = "127.0.0.1:50051",
             .codec = "none",
             .tokens = 8192,
             .layers = 32,
             .heads = 8,
             .dim = 128,
             .block = 16,
             .reps = 3};
    snprintf(c.paths, sizeof c.paths, "get,getmany,shm,encoded,gpudecode,shmgpu,shmgpu-pipe,ipc");
    c.pipe_blocks = PIPE_BLOCKS;
    static const struct option opts[] = {
        {"target", 1, 0, 't'}, {"codec", 1, 0, 'c'},       {"tokens", 1, 0, 'n'},
        {"layers", 1, 0, 'L'}, {"heads", 1, 0, 'H'},       {"dim", 1, 0, 'D'},
        {"block", 1, 0, 'T'},  {"reps", 1, 0, 'r'},        {"paths", 1, 0, 'p'},
        {"token", 1, 0, 'k'},  {"connections", 1, 0, 'C'}, {"pipe-blocks", 1, 0, 'B'},
        {0, 0, 0, 0}};
    for (int o; (o = getopt_long(argc, argv, "", opts, NULL)) != -1;) {
        switch (o) {
        case 't':
            c.target = optarg;
            break;
        case 'c':
            c.codec = optarg;
            break;
        case 'n':
            c.tokens = (uint32_t)strtoul(optarg, NULL, 10);
            break;
        case 'L':
            c.layers = (uint32_t)strtoul(optarg, NULL, 10);
            break;
        case 'H':
            c.heads = (uint32_t)strtoul(optarg, NULL, 10);
            break;
        case 'D':
            c.dim = (uint32_t)strtoul(optarg, NULL, 10);
            break;
        case 'T':
            c.block = (uint32_t)strtoul(optarg, NULL, 10);
            break;
        case 'r':
            c.reps = (unsigned)strtoul(optarg, NULL, 10);
            break;
        case 'p':
            snprintf(c.paths, sizeof c.paths, "%s", optarg);
            break;
        case 'k':
            c.token = optarg;
            break;
        case 'C':
            c.connections = (unsigned)strtoul(optarg, NULL, 10);
            break;
        case 'B':
            c.pipe_blocks = (unsigned)strtoul(optarg, NULL, 10);
            break;
        default:
            fprintf(stderr, "usage: see the comment at the top of restore_bench.c\n");
            return 2;
        }
    }
    if (!c.tokens || !c.block || !c.reps || c.tokens % c.block || !c.pipe_blocks) {
        fprintf(stderr, "kvs-bench-restore: --tokens must be a positive multiple of --block\n");
        return 2;
    }
    kvs_err e;
    kvs_client *cl;
    kvs_client_opts co = {
        .target = c.target, .token = c.token, .timeout_ms = 600000, .connections = c.connections};
    if (kvs_client_connect(&co, &cl, &e))
        return die("connect", &e);
    kvs_ns_spec spec = {.layers = c.layers,
                        .kv_heads = c.heads,
                        .head_dim = c.dim,
                        .block_tokens = c.block,
                        .dtype = KVS_DTYPE_FP16,
                        .seed = 1};
    snprintf(spec.name, sizeof spec.name, "restore-%s-%ld", c.codec, (long)getpid());
    snprintf(spec.key_codec, sizeof spec.key_codec, "%s", c.codec);
    snprintf(spec.value_codec, sizeof spec.value_codec, "%s", c.codec);
    kvs_ns_info info;
    if (kvs_client_ns_create(cl, &spec, &info, &e))
        return die("CreateNamespace", &e);
    size_t nb = c.tokens / c.block, bb = info.block_bytes, total = nb * bb;
    uint16_t *src = malloc(total);
    uint8_t *out[MAX_PATHS] = {0};
    kvs_put_item *pi = calloc(nb, sizeof *pi);
    kvs_get_item *gi = calloc(nb, sizeof *gi);
    kvs_cuda_block *cb = calloc(nb, sizeof *cb);
    uint64_t *keys = calloc(nb, sizeof *keys);
    if (!src || !pi || !gi || !cb || !keys) {
        fprintf(stderr, "kvs-bench-restore: out of memory for %zu bytes\n", total);
        return 1;
    }
    fill(src, total / 2, 42, c.dim);
    for (size_t i = 0; i < nb; i++)
        keys[i] = 0x6b76730000000000ull + i;

    /* Store the prefix: PutMany from the bytes (and from shared memory when there is one).
     * The region has a slot of enc_cap bytes per block for the encoded path (shmgpu; an
     * encoded block is at most a bit over raw), the raw paths use its first total bytes. */
    size_t enc_cap = bb + (bb >> 2) + 65536;
    kvs_region *reg = NULL;
    int rrc = kvs_region_create(cl, nb * enc_cap, &reg, &e);
    if (rrc && rrc != KVS_ENOTSUP)
        return die("region", &e);
    if (rrc)
        printf("shared memory: not available (%s)\n", e.msg);
    for (size_t i = 0; i < nb; i++)
        pi[i] = (kvs_put_item){.key = &keys[i],
                               .key_len = 8,
                               .tokens = c.block,
                               .data = (const uint8_t *)src + i * bb,
                               .len = bb};
    double t0 = now_ms();
    if (kvs_client_put_many(cl, spec.name, KVS_DTYPE_FP16, pi, nb, &e))
        return die("PutMany", &e);
    double put_ms = now_ms() - t0;
    for (size_t i = 0; i < nb; i++)
        if (pi[i].rc)
            return fprintf(stderr, "PutMany: block %zu: %s\n", i, pi[i].msg), 1;
    uint64_t enc_bytes = 0;
    for (size_t i = 0; i < nb; i++)
        enc_bytes += pi[i].res.encoded_bytes;
    printf("prefix: %u tokens, %zu blocks of %zu bytes (%.1f MiB raw, %.1f MiB stored, "
           "codec %s)\n",
           c.tokens, nb, bb, total / 1048576.0, enc_bytes / 1048576.0, c.codec);
    printf("| path | restore ms (best of %u) | GB/s (raw bytes) |\n|---|---|---|\n", c.reps);
    printf("| PutMany (bytes) | %.1f | %.2f |\n", put_ms, total / put_ms / 1e6);
    if (reg) {
        memcpy(kvs_region_data(reg), src, total);
        for (size_t i = 0; i < nb; i++)
            pi[i] = (kvs_put_item){.key = &keys[i],
                                   .key_len = 8,
                                   .tokens = c.block,
                                   .region = reg,
                                   .offset = i * bb,
                                   .len = bb};
        t0 = now_ms();
        if (kvs_client_put_many(cl, spec.name, KVS_DTYPE_FP16, pi, nb, &e))
            return die("PutMany (shm)", &e);
        put_ms = now_ms() - t0;
        printf("| PutMany (shm%s) | %.1f | %.2f |\n", kvs_region_pinned(reg) ? ", pinned" : "",
               put_ms, total / put_ms / 1e6);
    }

    /* CUDA IPC: device memory of this process's, registered with the daemon; PutMany from
     * it is timed like the shm one. */
    kvs_region *ireg = NULL;
#ifdef KVS_HAVE_CUDA
    uint8_t *ipc_dev = NULL;
    if (want(&c, "ipc")) {
        kvs_err ie;
        if (cudaMalloc((void **)&ipc_dev, total) != cudaSuccess) {
            printf("ipc: cannot allocate %zu bytes of device memory\n", total);
            ipc_dev = NULL;
        } else if (kvs_cuda_region_create(cl, ipc_dev, total, &ireg, &ie)) {
            printf("ipc: not available (%s)\n", ie.msg);
            ireg = NULL;
        } else {
            /* Synchronized: the daemon reads it through IPC, and a pageable copy returns
             * before its DMA lands. */
            if (cudaMemcpy(ipc_dev, src, total, cudaMemcpyHostToDevice) != cudaSuccess ||
                cudaDeviceSynchronize() != cudaSuccess) {
                printf("ipc: cannot fill the source\n");
                return 1;
            }
            for (size_t i = 0; i < nb; i++)
                pi[i] = (kvs_put_item){.key = &keys[i],
                                       .key_len = 8,
                                       .tokens = c.block,
                                       .region = ireg,
                                       .offset = i * bb,
                                       .len = bb};
            t0 = now_ms();
            if (kvs_client_put_many(cl, spec.name, KVS_DTYPE_FP16, pi, nb, &e))
                return die("PutMany (ipc)", &e);
            put_ms = now_ms() - t0;
            for (size_t i = 0; i < nb; i++)
                if (pi[i].rc)
                    return fprintf(stderr, "PutMany (ipc): block %zu: %s\n", i, pi[i].msg), 1;
            printf("| PutMany (ipc) | %.1f | %.2f |\n", put_ms, total / put_ms / 1e6);
            cudaMemset(ipc_dev, 0, total); /* what Get writes is then all Get's */
        }
    }
#endif
    const char *names[MAX_PATHS] = {"get", "getmany", "shm",         "encoded", "gpudecode",
                                    "ipc", "shmgpu",  "shmgpu-pipe", "shmenc"};
    kvs_cuda_decoder *dec = NULL;
    uint8_t *dev = NULL;
    bool shmgpu = want(&c, "shmgpu") || want(&c, "shmgpu-pipe");
    if (want(&c, "gpudecode") || shmgpu) {
        kvs_err de;
        if (kvs_cuda_decoder_create(cl, spec.name, &spec, &dec, &de)) {
            printf("gpudecode: not available (%s)\n", de.msg);
            dec = NULL;
        }
#ifdef KVS_HAVE_CUDA
        if (dec && cudaMalloc((void **)&dev, total) != cudaSuccess) {
            printf("gpudecode: cannot allocate %zu bytes of device memory\n", total);
            kvs_cuda_decoder_destroy(dec);
            dec = NULL;
        }
#endif
    }
    bool reg_pinned_here = false; /* shmgpu: the region registered with CUDA in this process */
#ifdef KVS_HAVE_CUDA
    if (dec && reg && shmgpu) {
        if (cudaHostRegister(kvs_region_data(reg), kvs_region_size(reg), cudaHostRegisterDefault) ==
            cudaSuccess)
            reg_pinned_here = true;
        else
            printf("shmgpu: cudaHostRegister of the region failed: %s\n",
                   cudaGetErrorString(cudaGetLastError()));
    }
#endif
    int failed = 0, ref = -1;
    uint8_t *encbuf = NULL;
#ifdef KVS_HAVE_CUDA
    bool encbuf_pinned = false; /* gpudecode's receive buffer registered with CUDA */
#endif
    /* In time order: the ipc path before shmgpu, whose decode reuses gpudecode's memory. */
    const int order[MAX_PATHS] = {0, 1, 2, 3, 4, 8, 6, 7, 5};
    for (int oi = 0; oi < MAX_PATHS; oi++) {
        int p = order[oi];
        if (!want(&c, names[p]) || ((p == 2 || p == 8) && !reg) || (p == 4 && !dec) ||
            (p == 5 && !ireg) || ((p == 6 || p == 7) && (!dec || !reg_pinned_here)))
            continue;
        out[p] = malloc(total);
        if ((p == 3 || p == 4) && !encbuf)
            encbuf = malloc(nb * enc_cap);
        if (!out[p] || ((p == 3 || p == 4) && !encbuf))
            return fprintf(stderr, "out of memory\n"), 1;
#ifdef KVS_HAVE_CUDA
        /* gpudecode: the encoded bytes arrive in pinned memory, as in a GPU worker's
         * staging, so its decode copies them by DMA (registered once, outside the timing). */
        if (p == 4 && !encbuf_pinned) {
            encbuf_pinned =
                cudaHostRegister(encbuf, nb * enc_cap, cudaHostRegisterPortable) == cudaSuccess;
            if (!encbuf_pinned)
                printf("gpudecode: cudaHostRegister of the receive buffer failed: %s\n",
                       cudaGetErrorString(cudaGetLastError()));
        }
#endif
        double best = 1e30;
        for (unsigned rep = 0; rep < c.reps; rep++) {
            size_t served = 0;
            t0 = now_ms();
            int rc = 0;
            if (p == 0) {
                for (size_t i = 0; i < nb && !rc; i++)
                    rc = kvs_client_get(cl, spec.name, &keys[i], 8, out[p] + i * bb, bb, NULL, &e);
            } else {
                for (size_t i = 0; i < nb; i++)
                    gi[i] = (kvs_get_item){.key = &keys[i], .key_len = 8};
                for (size_t i = 0; i < nb; i++) {
                    if (p == 3 || p == 4)
                        gi[i].buf = encbuf + i * enc_cap, gi[i].cap = enc_cap;
                    else if (p == 1)
                        gi[i].buf = out[p] + i * bb, gi[i].cap = bb;
                    else if (p == 2)
                        gi[i].region = reg, gi[i].offset = i * bb, gi[i].cap = bb;
                    else if (p == 5)
                        gi[i].region = ireg, gi[i].offset = i * bb, gi[i].cap = bb;
                    else if (p == 6 || p == 7 || p == 8)
                        gi[i].region = reg, gi[i].offset = i * enc_cap, gi[i].cap = enc_cap;
                }
                bool enc = p == 3 || p == 4 || p == 6 || p == 8;
                kvs_get_many_opts go = {.format = enc ? KVS_FORMAT_ENCODED : KVS_FORMAT_RAW,
                                        .prefix = true};
                if (p == 7) {           /* chunks, each decoded while the next one streams */
                    static pipe_ctx pc; /* its trace is large: off the stack */
                    pc = (pipe_ctx){.dec = dec,
                                    .chunk = c.pipe_blocks,
                                    .cb = cb,
                                    .gi = gi,
                                    .base = kvs_region_data(reg),
                                    .dev = dev,
                                    .nb = nb,
                                    .enc_cap = enc_cap,
                                    .bb = bb};
                    rc = restore_pipelined(cl, spec.name, gi, &pc, &e);
                    if (!rc && rep + 1 == c.reps) /* the last run's trace, on stderr */
                        for (size_t k = 0; k * c.pipe_blocks < nb && k < PIPE_CHUNKS; k++)
                            fprintf(stderr,
                                    "shmgpu-pipe chunk %zu: fetched at %.2f ms; decoded %.2f-%.2f "
                                    "ms\n",
                                    k, pc.fetched_at[k], pc.dec_from[k], pc.dec_to[k]);
                } else {
                    rc = kvs_client_get_many(cl, spec.name, gi, nb, &go, &served, &e);
                    if (!rc && served != nb)
                        rc = kvs_err_set(&e, KVS_ENOTFOUND, "%zu of %zu blocks served", served, nb);
                }
                for (size_t i = 0; i < nb && !rc && p == 3; i++)
                    rc = kvs_client_decode_block(cl, spec.name, &spec, encbuf + i * enc_cap,
                                                 gi[i].res.bytes, out[p] + i * bb, bb, NULL, &e);
                if (!rc && (p == 4 || p == 6)) { /* one batch: two launches per 64 MiB */
                    const uint8_t *from = p == 4 ? encbuf : kvs_region_data(reg);
                    for (size_t i = 0; i < nb; i++)
                        cb[i] = (kvs_cuda_block){.enc = from + i * enc_cap,
                                                 .len = gi[i].res.bytes,
                                                 .raw_dev = dev + i * bb,
                                                 .cap = bb};
                    rc = kvs_decode_blocks_cuda(dec, cb, nb, NULL, &e);
                    for (size_t i = 0; i < nb && !rc; i++)
                        if (cb[i].rc)
                            rc = kvs_err_set(&e, cb[i].rc, "block %zu: %s", i, cb[i].msg);
                }
            }
            double ms = now_ms() - t0;
            if (rc)
                return die(names[p], &e);
            if (ms < best)
                best = ms;
        }
        if (p == 2)
            memcpy(out[p], kvs_region_data(reg), total);
        for (size_t i = 0; i < nb && p == 8; i++) /* checked outside the timing */
            if (kvs_client_decode_block(cl, spec.name, &spec,
                                        (const uint8_t *)kvs_region_data(reg) + i * enc_cap,
                                        gi[i].res.bytes, out[p] + i * bb, bb, NULL, &e))
                return die("shmenc: decode", &e);
#ifdef KVS_HAVE_CUDA
        if (p == 4 || p == 6 || p == 7)
            cudaMemcpy(out[p], dev, total, cudaMemcpyDeviceToHost);
        if (p == 5)
            cudaMemcpy(out[p], ipc_dev, total, cudaMemcpyDeviceToHost);
#endif
        printf("| %s | %.1f | %.2f |\n", names[p], best, total / best / 1e6);
        if (ref < 0)
            ref = p;
        else if ((p == 4 || p == 6 || p == 7 || p == 8) && strcmp(c.codec, "none") != 0
                     ? max_ulp(out[p], out[ref], total / 2) > 1
                     : memcmp(out[p], out[ref], total) != 0) {
            fprintf(stderr, "kvs-bench-restore: path %s returned other bytes than %s\n", names[p],
                    names[ref]);
            failed = 1;
        }
        if (strcmp(c.codec, "none") == 0 && memcmp(out[p], src, total) != 0) {
            fprintf(stderr,
                    "kvs-bench-restore: path %s: codec none did not return the bytes "
                    "put\n",
                    names[p]);
            failed = 1;
        }
    }
    if (dec) {
        kvs_cuda_decoder_stats ds;
        kvs_cuda_decoder_stats_get(dec, &ds);
        printf("client GPU decode: %llu blocks, %llu from pinned memory, %llu checksums on "
               "threads\n",
               (unsigned long long)ds.blocks, (unsigned long long)ds.blocks_pinned,
               (unsigned long long)ds.blocks_hashed_threads);
    }
    kvs_cuda_decoder_destroy(dec);
#ifdef KVS_HAVE_CUDA
    if (reg_pinned_here)
        cudaHostUnregister(kvs_region_data(reg));
#endif
    kvs_region_close(ireg); /* before the memory goes: the daemon closes its handle */
#ifdef KVS_HAVE_CUDA
    cudaFree(dev);
    if (ireg)
        usleep(100000); /* the daemon closes its mapping when it sees the connection end */
    cudaFree(ipc_dev);
#endif
    kvs_client_ns_drop(cl, spec.name, NULL, &e);
    kvs_region_close(reg);
    kvs_client_close(cl);
    for (int p = 0; p < MAX_PATHS; p++)
        free(out[p]);
#ifdef KVS_HAVE_CUDA
    if (encbuf_pinned)
        cudaHostUnregister(encbuf);
#endif
    free(encbuf);
    free(src);
    free(pi);
    free(gi);
    free(cb);
    free(keys);
    return failed;
}
