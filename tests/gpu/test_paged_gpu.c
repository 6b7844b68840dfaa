/* GPU paged gather/scatter (gpu/codec/paged.cu) vs the CPU ones (paged.c, themselves
 * checked against an element-wise reference in tests/unit/test_paged.c), byte for byte.
 *
 * Layouts: vLLM per-layer [2][nb][bs][H][D], separate K/V tensors, HND, SGLang page-first
 * and layer-first (a token pool: page size 1, a block over 300 pages, more than one
 * launch carries), padded heads (2-byte copies), a base pointer off 16-byte alignment,
 * 70 layers (more than one launch carries); full, partial and multi-page blocks in random
 * pages; layer ranges. Gather is compared on a poisoned block; scatter over the whole
 * region (a stray write shows). Also the launchers' own refusals, a throughput line for a
 * vLLM-like block, and the batched copy kernel (gpu/codec/copies.cu) against its CPU
 * reference. Exits 77 (skipped) where the build has no CUDA or the machine no
 * GPU; KVS_TEST_SEED repeats a run.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "gpu/codec/copies.h"
#include "gpu/codec/paged.h"

#ifndef KVS_HAVE_CUDA
int main(void)
{
    printf("test_paged_gpu: this build has no CUDA: skipped\n");
    return 77;
}
#else
#include "tests/support/kvs_gpu_test.h"

#define MAXL 80
#define E 2

static int failures;
static uint64_t rng_state;
static cudaStream_t stream;

static uint64_t next(void)
{
    return kvs_gpu_test_next(&rng_state);
}

static void fill_random(uint8_t *p, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t v = next();
        memcpy(p + i, &v, 8);
    }
    for (; i < n; i++)
        p[i] = (uint8_t)next();
}

typedef enum { VLLM_LAYER, VLLM_KV, VLLM_HND, SGL_PAGE_FIRST, SGL_LAYER_FIRST, PADDED } kind;

typedef struct eng {
    const char *name;
    uint32_t L, H, D, pt, np;
    kvs_paged_layout lay;
    uint64_t kb[MAXL], vb[MAXL];
    uint64_t region;
} eng;

/* The descriptor of each engine layout (the same shapes as tests/unit/test_paged.c; pad
 * is the bytes after each head's row of the padded layout, whose tokens are padded by 16
 * bytes when pad is a multiple of 16, else by 10). */
static void describe(eng *e, const char *name, kind k, uint32_t L, uint32_t H, uint32_t D,
                     uint32_t pt, uint32_t np, uint32_t pad)
{
    const uint64_t row = (uint64_t)D * E, R = H * row, gap = 96;
    memset(e, 0, sizeof *e);
    *e = (eng){.name = name, .L = L, .H = H, .D = D, .pt = pt, .np = np};
    e->lay = (kvs_paged_layout){.layers = L,
                                .kv_heads = H,
                                .head_dim = D,
                                .elem_bytes = E,
                                .page_tokens = pt,
                                .k_base = e->kb,
                                .v_base = e->vb,
                                .page_stride = pt * R,
                                .token_stride = R,
                                .head_stride = row};
    uint64_t plane = np * pt * R; /* bytes of one K or V plane of one layer */
    for (uint64_t l = 0; l < L; l++) {
        switch (k) {
        case VLLM_LAYER:
            e->kb[l] = l * (2 * plane + gap);
            e->vb[l] = e->kb[l] + plane;
            break;
        case VLLM_KV:
            e->kb[l] = l * (plane + gap);
            e->vb[l] = (2 * L - 1 - l) * (plane + gap);
            break;
        case VLLM_HND:
            e->kb[l] = l * 2 * plane;
            e->vb[l] = e->kb[l] + plane;
            e->lay.token_stride = row;
            e->lay.head_stride = pt * row;
            break;
        case SGL_PAGE_FIRST:
            e->kb[l] = 2 * l * pt * R;
            e->vb[l] = (2 * l + 1) * pt * R;
            e->lay.page_stride = 2 * L * pt * R;
            break;
        case SGL_LAYER_FIRST:
            e->kb[l] = l * plane;
            e->vb[l] = (L + l) * plane;
            break;
        case PADDED: {
            uint64_t head = row + pad, tok = H * head + (pad % 16 ? 10 : 16);
            plane = np * pt * tok;
            e->kb[l] = 2 * l * plane;
            e->vb[l] = e->kb[l] + plane;
            e->lay.page_stride = pt * tok;
            e->lay.token_stride = tok;
            e->lay.head_stride = head;
            break;
        }
        }
    }
    /* The region ends with the furthest last element of any plane. */
    const kvs_paged_layout *y = &e->lay;
    uint64_t span = (pt - 1) * y->token_stride + (H - 1) * y->head_stride + row;
    for (uint32_t l = 0; l < L; l++) {
        uint64_t end =
            (e->kb[l] > e->vb[l] ? e->kb[l] : e->vb[l]) + (np - 1) * y->page_stride + span;
        e->region = end > e->region ? end : e->region;
    }
}

static void random_pages(const eng *e, uint32_t *pages, uint32_t n)
{
    uint32_t *pool = malloc(e->np * sizeof *pool);
    if (!pool)
        exit(1);
    for (uint32_t i = 0; i < e->np; i++)
        pool[i] = i;
    for (uint32_t i = e->np - 1; i > 0; i--) {
        uint32_t j = (uint32_t)(next() % (i + 1)), x = pool[i];
        pool[i] = pool[j];
        pool[j] = x;
    }
    memcpy(pages, pool, n * sizeof *pages);
    free(pool);
}

/* One block (t tokens, layers [lb, le)) through both directions; `shift` moves the
 * device base pointer off 16-byte alignment. */
static void run_case(const eng *e, uint32_t t, uint32_t lb, uint32_t le, uint32_t shift)
{
    kvs_err err;
    kvs_ns_spec s;
    memset(&s, 0, sizeof s);
    strcpy(s.name, "gpu");
    s.layers = e->L;
    s.kv_heads = e->H;
    s.head_dim = e->D;
    s.block_tokens = 4096;
    s.dtype = KVS_DTYPE_BF16;
    uint32_t n = (t + e->pt - 1) / e->pt;
    uint32_t *pages = malloc(n * sizeof *pages);
    if (!pages)
        exit(1);
    random_pages(e, pages, n);
    if (kvs_paged_check(&e->lay, &s, e->region, pages, n, t, &err) != 0 ||
        kvs_paged_check_layers(&e->lay, lb, le, &err) != 0) {
        printf("FAIL %s t=%u: check refused: %s\n", e->name, t, err.msg);
        failures++;
        free(pages);
        return;
    }
    const size_t bytes = kvs_paged_block_bytes(&e->lay, t, lb, le);
    uint8_t *mem = malloc(e->region), *got = malloc(e->region), *want = malloc(bytes),
            *blk = malloc(bytes), *dmem_alloc, *dblk;
    if (!mem || !got || !want || !blk)
        exit(1);
    CHECK_CUDA(cudaMalloc((void **)&dmem_alloc, e->region + 16));
    CHECK_CUDA(cudaMalloc((void **)&dblk, bytes));
    uint8_t *dmem = dmem_alloc + shift;
    fill_random(mem, e->region);
    /* Every copy on the launches' stream: a cudaMemcpy from pageable memory returns once the
     * bytes are staged, its DMA still in flight on the legacy stream, which a non-blocking
     * stream does not wait for (the second GPU run failed on it: the far planes of the region,
     * copied last, gathered stale). */
    CHECK_CUDA(cudaMemcpyAsync(dmem, mem, e->region, cudaMemcpyHostToDevice, stream));

    /* Gather. */
    kvs_paged_gather(&e->lay, mem, pages, t, lb, le, want);
    /* On the launches' stream: a cudaMemset goes on the legacy stream, which a non-blocking
     * stream does not wait for (the first GPU run failed at random on exactly that). */
    CHECK_CUDA(cudaMemsetAsync(dblk, 0xA5, bytes, stream));
    int rc = kvs_paged_gather_cuda(&e->lay, dmem, pages, t, lb, le, dblk, stream, &err);
    CHECK_CUDA(cudaStreamSynchronize(stream));
    if (rc) {
        printf("FAIL %s t=%u: gather: %s\n", e->name, t, err.msg);
        failures++;
    } else {
        CHECK_CUDA(cudaMemcpy(blk, dblk, bytes, cudaMemcpyDeviceToHost));
        if (memcmp(blk, want, bytes)) {
            size_t i = 0;
            while (blk[i] == want[i])
                i++;
            printf("FAIL %s t=%u layers [%u,%u) shift %u: gather differs from byte %zu\n", e->name,
                   t, lb, le, shift, i);
            failures++;
        }
    }

    /* Scatter, compared over the whole region. */
    fill_random(blk, bytes);
    CHECK_CUDA(cudaMemcpyAsync(dblk, blk, bytes, cudaMemcpyHostToDevice, stream));
    kvs_paged_scatter(&e->lay, mem, pages, t, lb, le, blk);
    rc = kvs_paged_scatter_cuda(&e->lay, dmem, pages, t, lb, le, dblk, stream, &err);
    CHECK_CUDA(cudaStreamSynchronize(stream));
    if (rc) {
        printf("FAIL %s t=%u: scatter: %s\n", e->name, t, err.msg);
        failures++;
    } else {
        CHECK_CUDA(cudaMemcpy(got, dmem, e->region, cudaMemcpyDeviceToHost));
        if (memcmp(got, mem, e->region)) {
            size_t i = 0;
            while (got[i] == mem[i])
                i++;
            printf("FAIL %s t=%u layers [%u,%u) shift %u: scatter differs from region byte %zu\n",
                   e->name, t, lb, le, shift, i);
            failures++;
        }
    }
    CHECK_CUDA(cudaFree(dmem_alloc));
    CHECK_CUDA(cudaFree(dblk));
    free(mem);
    free(got);
    free(want);
    free(blk);
    free(pages);
}

/* Token counts (one page, 1, partial, multi-page) and layer ranges (all, inner, last). */
static void sweep(const eng *e, uint32_t shift)
{
    const int before = failures;
    const uint32_t pt = e->pt;
    const uint32_t ts[] = {pt, 1, pt > 3 ? pt - 3 : 1, pt + 3, 3 * pt - 1};
    int cases = 0;
    for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++) {
        if ((ts[i] + pt - 1) / pt > e->np)
            continue;
        run_case(e, ts[i], 0, e->L, shift);
        if (e->L >= 3)
            run_case(e, ts[i], 1, e->L - 1, shift);
        run_case(e, ts[i], e->L - 1, e->L, shift);
        cases += e->L >= 3 ? 3 : 2;
    }
    printf("%-24s shift %2u: %3d cases %s\n", e->name, shift, cases,
           failures == before ? "GPU matches CPU" : "MISMATCH");
}

static void expect_refusal(int rc, const kvs_err *err, const char *prefix)
{
    if (rc != KVS_EINVAL || strncmp(err->msg, prefix, strlen(prefix))) {
        printf("FAIL refusal: rc %d, message '%s', expected '%s...'\n", rc, err->msg, prefix);
        failures++;
    }
}

static void refusals(void)
{
    kvs_err err;
    eng e;
    int before = failures;
    describe(&e, "refusals", VLLM_LAYER, 2, 2, 64, 16, 4, 0);
    uint8_t *d;
    CHECK_CUDA(cudaMalloc((void **)&d, e.region + 16));
    const uint32_t pages[] = {1};
    expect_refusal(kvs_paged_gather_cuda(&e.lay, d + 1, pages, 16, 0, 2, d, stream, &err), &err,
                   "base: ");
    expect_refusal(kvs_paged_gather_cuda(&e.lay, d, pages, 16, 0, 2, d + 3, stream, &err), &err,
                   "block: ");
    expect_refusal(kvs_paged_gather_cuda(&e.lay, d, pages, 16, 0, 3, d, stream, &err), &err,
                   "layer_end: ");
    expect_refusal(kvs_paged_scatter_cuda(&e.lay, d, pages, 0, 0, 2, d, stream, &err), &err,
                   "tokens: ");
    expect_refusal(kvs_paged_scatter_cuda(&e.lay, d, NULL, 16, 0, 2, d, stream, &err), &err,
                   "pages: NULL");
    CHECK_CUDA(cudaStreamSynchronize(stream));
    CHECK_CUDA(cudaFree(d));
    printf("%-24s %s\n", "launcher refusals", failures == before ? "as expected" : "MISMATCH");
}

/* Batched copies (gpu/codec/copies.cu) against the CPU reference: n copies with random
 * widths, heights, pitches and offsets (aligned to 16 or not, so both unit sizes run,
 * mixed in one launch) from a source arena into disjoint places of a poisoned destination
 * arena, compared over the whole arena (a stray or missing byte shows). `big` adds one
 * large contiguous copy (many CTAs per copy); n above 65535 takes several launches. */
static void copies_case(uint32_t n, int aligned, size_t big, uint32_t shrink, const char *what)
{
    const size_t src_bytes = (8u << 20) + big + big / 64,
                 dst_bytes = (size_t)n * 4096 + 2 * big + 4096;
    uint8_t *src = malloc(src_bytes), *want = malloc(dst_bytes), *got = malloc(dst_bytes);
    kvs_copy2d *t = malloc((size_t)n * sizeof *t);
    uint8_t *dsrc, *ddst;
    kvs_copy2d *dt;
    if (!src || !want || !got || !t)
        exit(1);
    CHECK_CUDA(cudaMalloc((void **)&dsrc, src_bytes));
    CHECK_CUDA(cudaMalloc((void **)&ddst, dst_bytes));
    CHECK_CUDA(cudaMalloc((void **)&dt, (size_t)n * sizeof *dt));
    fill_random(src, src_bytes);
    memset(want, 0xA5, dst_bytes);
    size_t at = 0; /* the next free destination byte: copies never overlap */
    uint64_t max_bytes = 0;
    uint32_t nt = 0, nh = 0;
    kvs_copy2d *h = malloc((size_t)n * sizeof *h); /* the same copies on host addresses */
    if (!h)
        exit(1);
    for (uint32_t i = 0; i < n; i++) {
        uint64_t width, height, spitch, dpitch, so, doff;
        if (big && i == n / 2) { /* rows whose units do not divide a thread's stride */
            width = aligned ? 4800 : 4801, height = big / width;
            spitch = width + (aligned ? 16 : 3);
            dpitch = width + (aligned ? 32 : 5);
        } else {
            width = 1 + next() % 256, height = next() % 9; /* height 0: a no-op copy */
            if (aligned)
                width = (width + 15) & ~15ull;
            spitch = width + (aligned ? 16 * (next() % 3) : next() % 40);
            dpitch = width + (aligned ? 16 * (next() % 3) : next() % 40);
        }
        uint64_t sspan = height ? (height - 1) * spitch + width : 0;
        so = next() % (src_bytes - sspan + 1);
        doff = at + (aligned ? 0 : next() % 16);
        if (aligned)
            so &= ~15ull;
        uint64_t dspan = height ? (height - 1) * dpitch + width : 0;
        at = (doff + dspan + 15) & ~15ull;
        if (at > dst_bytes) {
            printf("FAIL copies %s: test arena too small\n", what);
            failures++;
            return;
        }
        kvs_copies_add(t, &nt, ddst + doff, dpitch, dsrc + so, spitch, width, height);
        kvs_copies_add(h, &nh, want + doff, dpitch, src + so, spitch, width, height);
        max_bytes = width * height > max_bytes ? width * height : max_bytes;
    }
    kvs_copies_run(h, n);
    CHECK_CUDA(cudaMemcpyAsync(dsrc, src, src_bytes, cudaMemcpyHostToDevice, stream));
    CHECK_CUDA(cudaMemsetAsync(ddst, 0xA5, dst_bytes, stream));
    CHECK_CUDA(cudaMemcpyAsync(dt, t, (size_t)n * sizeof *t, cudaMemcpyHostToDevice, stream));
    kvs_err err;
    /* shrink: a max_bytes below the largest copy's (a smaller grid, more steps a thread). */
    int rc = kvs_copies_run_cuda(dt, n, max_bytes / shrink, stream, &err);
    CHECK_CUDA(cudaStreamSynchronize(stream));
    CHECK_CUDA(cudaMemcpy(got, ddst, dst_bytes, cudaMemcpyDeviceToHost));
    if (rc) {
        printf("FAIL copies %s: %s\n", what, err.msg);
        failures++;
    } else if (memcmp(got, want, dst_bytes)) {
        size_t i = 0;
        while (got[i] == want[i])
            i++;
        printf("FAIL copies %s: differs from destination byte %zu\n", what, i);
        failures++;
    } else {
        printf("%-24s %s: %u copies, GPU matches CPU\n", "batched copies", what, n);
    }
    if (kvs_copies_run_cuda(dt, 0, 0, stream, &err) != KVS_EINVAL) {
        printf("FAIL copies: n 0 accepted\n");
        failures++;
    }
    CHECK_CUDA(cudaFree(dsrc));
    CHECK_CUDA(cudaFree(ddst));
    CHECK_CUDA(cudaFree(dt));
    free(src);
    free(want);
    free(got);
    free(t);
    free(h);
}

/* Gather throughput of a vLLM-like block (32 layers, 8 heads of 128, 256 tokens in 16
 * pages of 16): block bytes per second, for a sense of scale only. */
static void throughput(void)
{
    eng e;
    describe(&e, "bench", VLLM_LAYER, 32, 8, 128, 16, 64, 0);
    uint32_t pages[16];
    random_pages(&e, pages, 16);
    const size_t bytes = kvs_paged_block_bytes(&e.lay, 256, 0, 32);
    uint8_t *dmem, *dblk;
    CHECK_CUDA(cudaMalloc((void **)&dmem, e.region));
    CHECK_CUDA(cudaMalloc((void **)&dblk, bytes));
    CHECK_CUDA(cudaMemset(dmem, 1, e.region));
    cudaEvent_t a, b;
    CHECK_CUDA(cudaEventCreate(&a));
    CHECK_CUDA(cudaEventCreate(&b));
    kvs_err err;
    const int reps = 50;
    for (int dir = 0; dir < 2; dir++) {
        for (int i = 0; i < reps + 1; i++) {
            if (i == 1)
                CHECK_CUDA(cudaEventRecord(a, stream));
            int rc =
                dir ? kvs_paged_scatter_cuda(&e.lay, dmem, pages, 256, 0, 32, dblk, stream, &err)
                    : kvs_paged_gather_cuda(&e.lay, dmem, pages, 256, 0, 32, dblk, stream, &err);
            if (rc) {
                printf("FAIL bench: %s\n", err.msg);
                failures++;
                return;
            }
        }
        CHECK_CUDA(cudaEventRecord(b, stream));
        CHECK_CUDA(cudaEventSynchronize(b));
        float ms;
        CHECK_CUDA(cudaEventElapsedTime(&ms, a, b));
        printf("%-24s %.1f MiB block: %.1f us, %.0f GB/s (read + write %.0f GB/s)\n",
               dir ? "scatter throughput" : "gather throughput", bytes / 1048576.0,
               1000.0 * ms / reps, bytes * reps / (ms * 1e6), 2.0 * bytes * reps / (ms * 1e6));
    }
    CHECK_CUDA(cudaEventDestroy(a));
    CHECK_CUDA(cudaEventDestroy(b));
    CHECK_CUDA(cudaFree(dmem));
    CHECK_CUDA(cudaFree(dblk));
}

int main(void)
{
    int skip = kvs_gpu_test_start("test_paged_gpu", &rng_state);
    if (skip)
        return skip;
    CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

    static eng e; /* MAXL offsets each: keep off the stack */
    describe(&e, "vllm-layer", VLLM_LAYER, 4, 8, 128, 16, 24, 0);
    sweep(&e, 0);
    sweep(&e, 2); /* base off 16-byte alignment: element copies */
    describe(&e, "vllm-layer-h1", VLLM_LAYER, 3, 1, 64, 16, 8, 0);
    sweep(&e, 0);
    describe(&e, "vllm-kv", VLLM_KV, 4, 4, 64, 16, 12, 0);
    sweep(&e, 0);
    describe(&e, "vllm-hnd", VLLM_HND, 3, 4, 128, 16, 8, 0);
    sweep(&e, 0);
    describe(&e, "sgl-page-first", SGL_PAGE_FIRST, 6, 2, 128, 64, 5, 0);
    sweep(&e, 0);
    describe(&e, "sgl-layer-first", SGL_LAYER_FIRST, 3, 2, 64, 32, 6, 0);
    sweep(&e, 0);
    describe(&e, "padded-2", PADDED, 3, 3, 64, 8, 6, 2); /* rows 2 bytes apart: narrow */
    sweep(&e, 0);
    describe(&e, "padded-32", PADDED, 3, 3, 64, 8, 6, 32); /* padded, 16-aligned: wide */
    sweep(&e, 0);
    describe(&e, "vllm-70-layers", VLLM_LAYER, 70, 2, 16, 16, 4, 0);
    sweep(&e, 0);
    sweep(&e, 2);
    {
        /* A token pool (page size 1): a block of 300 tokens is 300 pages. */
        int before = failures;
        describe(&e, "sgl-token-pool", SGL_LAYER_FIRST, 3, 2, 64, 1, 400, 0);
        run_case(&e, 300, 0, 3, 0);
        run_case(&e, 300, 1, 2, 2);
        run_case(&e, 257, 0, 3, 0);
        printf("%-24s shift  0: %3d cases %s\n", e.name, 3,
               failures == before ? "GPU matches CPU" : "MISMATCH");
    }
    copies_case(300, 1, 0, 1, "aligned");
    copies_case(300, 0, 0, 1, "unaligned");
    copies_case(40, 1, (size_t)48 << 20, 1, "a 48 MiB 2D copy among 40");
    copies_case(40, 0, (size_t)16 << 20, 64, "unaligned 16 MiB, small grid");
    copies_case(70000, 0, 0, 1, "two launches");
    refusals();
    throughput();
    CHECK_CUDA(cudaStreamDestroy(stream));
    printf("test_paged_gpu: %s (%d failures)\n", failures ? "FAILED" : "passed", failures);
    return failures ? 1 : 0;
}
#endif
