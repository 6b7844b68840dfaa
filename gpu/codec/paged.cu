/* Paged KV layouts, CUDA side: gather and scatter kernels (contract: paged.h; paged.c's
 * kvs_paged_gather/scatter are the reference, byte for byte).
 *
 * One thread per copy unit of the block: 16 bytes when every address involved is
 * 16-byte aligned (base, block, every layer's offset, the three strides, and a row of D
 * elements), else one 2-byte element. Consecutive threads take consecutive units of a
 * row, then the next head, then the next token: the block side is one contiguous stream
 * and the paged side contiguous within each row, so both coalesce. grid.y is the
 * (layer, K/V) plane.
 *
 * Nothing is uploaded: a launch carries, by value in its parameters, the offsets of up to
 * PAGED_LAYERS layers and up to PAGED_PAGES page ids (2.1 KiB, inside the classic 4 KiB
 * parameter limit), and a block that needs more goes out in several launches on the same
 * stream. A launch also covers fewer than 2^31 units, which keeps the index math 32-bit
 * (kdiv, gpu/codec/cuda_util.cuh: exact below 2^31).
 */
#include <cuda_runtime.h>
#include <stdint.h>

#include "gpu/base/cuda_try.h"
#include "gpu/codec/cuda_util.cuh"
#include "gpu/codec/paged.h"

#define PAGED_THREADS 256
#define PAGED_LAYERS 64 /* layers per launch */
#define PAGED_PAGES 256 /* page ids per launch */
#define PAGED_GRID_X 65536u

typedef struct paged_args {
    uint8_t *paged;                            /* the engine's region (device) */
    uint8_t *block;                            /* the launch's first plane in the block */
    unsigned long long base[2 * PAGED_LAYERS]; /* [layer in launch][K, V] offsets */
    uint32_t pages[PAGED_PAGES];               /* page slots slot0.. of the page list */
    unsigned long long page_stride, token_stride, head_stride;
    unsigned long long block_plane; /* bytes of one (layer, K/V) plane of the block */
    uint32_t row;                   /* D * elem_bytes */
    uint32_t t0;                    /* first token of the launch */
    uint32_t slot0;                 /* its page slot: t0 / page_tokens */
    uint32_t units;                 /* copy units per plane in the launch, < 2^31 */
    kdiv vpr, heads, pt;            /* units per row, H, page_tokens (<= tokens) */
} paged_args;

template <bool SCATTER, bool WIDE>
static __global__ void __launch_bounds__(PAGED_THREADS)
    paged_kernel(const __grid_constant__ paged_args a)
{
    const unsigned VEC = WIDE ? 16 : 2;
    const unsigned long long pbase = a.base[blockIdx.y];
    uint8_t *blk = a.block + blockIdx.y * a.block_plane;
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < a.units;
         i += gridDim.x * blockDim.x) {
        const uint32_t r = kdiv_q(i, a.vpr), v = i - r * a.vpr.d;
        const uint32_t tk = kdiv_q(r, a.heads), h = r - tk * a.heads.d;
        const uint32_t g = a.t0 + tk;
        const uint32_t slot = kdiv_q(g, a.pt), j = g - slot * a.pt.d;
        uint8_t *p = a.paged + pbase + a.pages[slot - a.slot0] * a.page_stride +
                     j * a.token_stride + h * a.head_stride + v * VEC;
        uint8_t *b = blk + ((unsigned long long)g * a.heads.d + h) * a.row + v * VEC;
        if (WIDE) {
            if (SCATTER)
                *(uint4 *)p = *(const uint4 *)b;
            else
                *(uint4 *)b = *(const uint4 *)p;
        } else {
            if (SCATTER)
                *(uint16_t *)p = *(const uint16_t *)b;
            else
                *(uint16_t *)b = *(const uint16_t *)p;
        }
    }
}

template <bool SCATTER>
static int launch(const kvs_paged_layout *lay, uint8_t *paged, uint8_t *block,
                  const uint32_t *pages, uint32_t tokens, uint32_t layer_begin, uint32_t layer_end,
                  void *stream, kvs_err *err)
{
    if (!lay)
        return kvs_err_set(err, KVS_EINVAL, "layout: NULL");
    int rc = kvs_paged_check_layers(lay, layer_begin, layer_end, err);
    if (rc)
        return rc;
    if (!paged)
        return kvs_err_set(err, KVS_EINVAL, "base: NULL");
    if (!block)
        return kvs_err_set(err, KVS_EINVAL, "block: NULL");
    if (!pages)
        return kvs_err_set(err, KVS_EINVAL, "pages: NULL");
    if (!lay->k_base || !lay->v_base)
        return kvs_err_set(err, KVS_EINVAL, "%s: NULL", lay->k_base ? "v_base" : "k_base");
    /* The rest of the layout is kvs_paged_check's; these keep the index math in range
     * even when a caller skipped it. */
    if (tokens == 0 || tokens > KVS_MAX_BLOCK_TOKENS)
        return kvs_err_set(err, KVS_EINVAL, "tokens: %u not in 1..%d", tokens,
                           KVS_MAX_BLOCK_TOKENS);
    if (lay->page_tokens == 0)
        return kvs_err_set(err, KVS_EINVAL, "page_tokens: 0 (must be at least 1)");
    if (lay->elem_bytes != 2)
        return kvs_err_set(err, KVS_EINVAL, "elem_bytes: %u; the kernels move 2-byte elements",
                           lay->elem_bytes);
    if (lay->kv_heads == 0 || lay->kv_heads > KVS_MAX_KV_HEADS || lay->head_dim == 0 ||
        lay->head_dim > KVS_MAX_HEAD_DIM)
        return kvs_err_set(err, KVS_EINVAL, "kv_heads: %u, head_dim %u out of range", lay->kv_heads,
                           lay->head_dim);
    if ((uintptr_t)paged % 2)
        return kvs_err_set(err, KVS_EINVAL, "base: %p not aligned to elem_bytes 2", (void *)paged);
    if ((uintptr_t)block % 2)
        return kvs_err_set(err, KVS_EINVAL, "block: %p not aligned to elem_bytes 2", (void *)block);

    const uint32_t row = lay->head_dim * 2;
    /* 16-byte units only where every address a thread forms is a multiple of 16. */
    uint64_t any = (uintptr_t)paged | (uintptr_t)block | row | lay->page_stride |
                   lay->token_stride | lay->head_stride;
    for (uint32_t l = layer_begin; l < layer_end; l++)
        any |= lay->k_base[l] | lay->v_base[l];
    const bool wide = any % 16 == 0;
    const uint32_t vpr = wide ? row / 16 : lay->head_dim;
    const uint32_t per_tok = vpr * lay->kv_heads; /* <= 2^20 */
    const uint32_t max_tok = 0x7FFFFFFFu / per_tok;
    /* With one page (tokens <= page_tokens) every token is in slot 0; dividing by tokens
     * instead keeps kdiv's divisor small. */
    const uint32_t pt = lay->page_tokens > tokens ? tokens : lay->page_tokens;
    const unsigned long long plane_bytes = (unsigned long long)tokens * lay->kv_heads * row;

    paged_args a = {}; /* unused slots too: no uninitialized bytes in a launch */
    a.paged = paged;
    a.page_stride = lay->page_stride;
    a.token_stride = lay->token_stride;
    a.head_stride = lay->head_stride;
    a.block_plane = plane_bytes;
    a.row = row;
    a.vpr = kdiv_make(vpr);
    a.heads = kdiv_make(lay->kv_heads);
    a.pt = kdiv_make(pt);
    cudaStream_t st = (cudaStream_t)stream;

    for (uint32_t l0 = layer_begin; l0 < layer_end; l0 += PAGED_LAYERS) {
        const uint32_t nl = layer_end - l0 < PAGED_LAYERS ? layer_end - l0 : PAGED_LAYERS;
        for (uint32_t l = 0; l < nl; l++) {
            a.base[2 * l] = lay->k_base[l0 + l];
            a.base[2 * l + 1] = lay->v_base[l0 + l];
        }
        a.block = block + (unsigned long long)(l0 - layer_begin) * 2 * plane_bytes;
        uint32_t nt;
        for (uint32_t t0 = 0; t0 < tokens; t0 += nt) {
            const uint32_t slot0 = t0 / pt;
            /* Tokens up to the end of the launch's last page slot, the unit limit, the
             * block's end; all below 2^32 as tokens <= KVS_MAX_BLOCK_TOKENS. */
            uint64_t lim = (uint64_t)(slot0 + PAGED_PAGES) * pt - t0;
            if (lim > max_tok)
                lim = max_tok;
            if (lim > tokens - t0)
                lim = tokens - t0;
            nt = (uint32_t)lim;
            const uint32_t slot_end = (t0 + nt - 1) / pt + 1;
            for (uint32_t s = slot0; s < slot_end; s++)
                a.pages[s - slot0] = pages[s];
            a.t0 = t0;
            a.slot0 = slot0;
            a.units = nt * per_tok;
            uint32_t gx = (a.units + PAGED_THREADS - 1) / PAGED_THREADS;
            dim3 grid(gx < PAGED_GRID_X ? gx : PAGED_GRID_X, 2 * nl);
            if (wide)
                paged_kernel<SCATTER, true><<<grid, PAGED_THREADS, 0, st>>>(a);
            else
                paged_kernel<SCATTER, false><<<grid, PAGED_THREADS, 0, st>>>(a);
            KVS_CUDA_CHECK(cudaGetLastError(), err);
        }
    }
    return 0;
}

int kvs_paged_gather_cuda(const kvs_paged_layout *lay, const void *base, const uint32_t *pages,
                          uint32_t tokens, uint32_t layer_begin, uint32_t layer_end, void *block,
                          void *stream, kvs_err *err)
{
    /* The kernel template only reads through `paged` when gathering. */
    return launch<false>(lay, (uint8_t *)const_cast<void *>(base), (uint8_t *)block, pages, tokens,
                         layer_begin, layer_end, stream, err);
}

int kvs_paged_scatter_cuda(const kvs_paged_layout *lay, void *base, const uint32_t *pages,
                           uint32_t tokens, uint32_t layer_begin, uint32_t layer_end,
                           const void *block, void *stream, kvs_err *err)
{
    /* Likewise, only reads through `block` when scattering. */
    return launch<true>(lay, (uint8_t *)base, (uint8_t *)const_cast<void *>(block), pages, tokens,
                        layer_begin, layer_end, stream, err);
}
