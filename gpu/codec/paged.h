/* Paged KV layouts: moving a block between an inference engine's paged KV memory and
 * kvstash's contiguous block layout [L][2][t][H][D] (gpu/codec/spec.h).
 *
 * One descriptor covers every engine layout by strides: a per-layer byte offset of K and
 * of V (element [page 0][token 0][head 0][dim 0] of that layer's plane) plus one page,
 * token and head stride shared by all planes; dims are contiguous. Offsets are relative
 * to one base pointer (a region of host or device memory holding all the engine's KV), so
 * that a single bounds check covers every access. Examples, with e = elem_bytes and
 * R = H*D*e (one token's heads, packed):
 *   vLLM, one tensor [2][nb][bs][H][D] per layer at offset off[l]:
 *     k_base[l] = off[l], v_base[l] = off[l] + nb*bs*R,
 *     page_stride = bs*R, token_stride = R, head_stride = D*e;
 *   vLLM, separate K and V tensors [nb][bs][H][D]: k_base[l] / v_base[l] = each tensor's
 *     offset, strides as above;
 *   vLLM/FlashInfer HND [nb][H][bs][D]: token_stride = D*e, head_stride = bs*D*e;
 *   SGLang page-first host pool [np][L][2][ps][H][D]:
 *     k_base[l] = (2l)*ps*R, v_base[l] = (2l+1)*ps*R, page_stride = L*2*ps*R,
 *     token_stride = R, head_stride = D*e;
 *   SGLang layer-first [2][L][n][H][D] (a token pool: page_tokens = 1, or pages of ps):
 *     k_base[l] = l*n*R, v_base[l] = (L+l)*n*R, page_stride = ps*R, token_stride = R.
 *
 * A block of t tokens lives in the pages of a page list: token i is token i % page_tokens
 * of page pages[i / page_tokens], so exactly ceil(t / page_tokens) pages, the first one
 * starting at token 0 (engines use T == page_tokens: one page per block).
 *
 * Trust: every field of a layout and every page id may come from a client.
 * kvs_paged_check (and kvs_paged_check_layers for a layer range) must accept the layout,
 * page list and token count before gather or scatter runs: those two do no checking
 * beyond assertions of these preconditions, and then touch only bytes inside
 * [0, region_bytes) of base. The check proves bounds, not disjointness: a layout whose
 * rows overlap (duplicate page ids, strides smaller than a row) is accepted; gather then
 * reads the same bytes twice, and scatter leaves which write lands unspecified.
 *
 * Thread-safety: no state; concurrent calls on disjoint outputs are safe. Includable from
 * C with or without CUDA; in a build without CUDA the _cuda functions answer KVS_ENOTSUP.
 */
#ifndef KVS_CODEC_PAGED_H
#define KVS_CODEC_PAGED_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "gpu/base/err.h"
#include "gpu/codec/spec.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvs_paged_layout {
    uint32_t layers;      /* L: must equal the namespace's */
    uint32_t kv_heads;    /* H: must equal the namespace's */
    uint32_t head_dim;    /* D: must equal the namespace's */
    uint32_t elem_bytes;  /* must equal the namespace dtype's size (2) */
    uint32_t page_tokens; /* tokens per engine page (vLLM block_size, SGLang page_size) */
    /* Byte offsets from base of element [page 0][token 0][head 0][dim 0] of layer l's K
     * and V planes. Borrowed, `layers` entries each: read during each call only. */
    const uint64_t *k_base, *v_base;
    uint64_t page_stride;  /* bytes from page p to page p + 1 */
    uint64_t token_stride; /* bytes from token i to i + 1 within a page */
    uint64_t head_stride;  /* bytes from head h to h + 1; dim stride is elem_bytes */
} kvs_paged_layout;

/* Pages a block of `tokens` tokens lies in: ceil(tokens / page_tokens) (page_tokens >= 1). */
static inline uint32_t kvs_paged_pages(const kvs_paged_layout *lay, uint32_t tokens)
{
    return (uint32_t)(((uint64_t)tokens + lay->page_tokens - 1) / lay->page_tokens);
}

/* Validates lay against the namespace (layers, kv_heads, head_dim, elem_bytes) and proves
 * that every byte gather or scatter of these `tokens` tokens in these pages touches, over
 * all layers, K and V, lies in [0, region_bytes): overflow-safe, whatever the fields.
 * Also: page_tokens >= 1, tokens in 1..spec->block_tokens, n_pages == ceil(tokens /
 * page_tokens), offsets and strides multiples of elem_bytes. KVS_EINVAL with a message
 * naming the field at fault ("pages[3]: page 4000000 ends at byte ... past the region's
 * ... bytes"). spec is trusted (kvs_spec_validate'd); pages is borrowed. */
int kvs_paged_check(const kvs_paged_layout *lay, const kvs_ns_spec *spec, uint64_t region_bytes,
                    const uint32_t *pages, size_t n_pages, uint32_t tokens, kvs_err *err);

/* Checks a layer range for gather/scatter: layer_begin < layer_end <= lay->layers.
 * KVS_EINVAL naming "layer_begin" or "layer_end". */
int kvs_paged_check_layers(const kvs_paged_layout *lay, uint32_t layer_begin, uint32_t layer_end,
                           kvs_err *err);

/* Bytes of a block of `tokens` tokens of layers [layer_begin, layer_end):
 * (layer_end - layer_begin) * 2 * tokens * H * D * elem_bytes. No overflow for a layout
 * that kvs_paged_check accepted. */
uint64_t kvs_paged_block_bytes(const kvs_paged_layout *lay, uint32_t tokens, uint32_t layer_begin,
                               uint32_t layer_end);

/* Copies layers [layer_begin, layer_end) of the block in `pages` out of the paged memory
 * at base into block, contiguous [layer_end - layer_begin][2][tokens][H][D]
 * (kvs_paged_block_bytes). Preconditions: kvs_paged_check accepted (lay, pages, tokens)
 * for a region of at least the bytes at base, and kvs_paged_check_layers the range. */
void kvs_paged_gather(const kvs_paged_layout *lay, const uint8_t *base, const uint32_t *pages,
                      uint32_t tokens, uint32_t layer_begin, uint32_t layer_end, uint8_t *block);

/* The reverse: writes block ([layer_end - layer_begin][2][tokens][H][D]) into the pages
 * of layers [layer_begin, layer_end); no other byte of base changes. Same
 * preconditions. */
void kvs_paged_scatter(const kvs_paged_layout *lay, uint8_t *base, const uint32_t *pages,
                       uint32_t tokens, uint32_t layer_begin, uint32_t layer_end,
                       const uint8_t *block);

/* The same moves as a table of 2D copies (gpu/codec/copies.h), for a caller that batches
 * many blocks' moves into one kvs_copies_run_cuda launch instead of one gather or scatter
 * launch per block. The block side is given per layer and side: layer l's K section
 * ([tokens][H][D], contiguous) at k_sec + (l - layer_begin) * layer_pitch, its V section at
 * v_sec + the same (the contiguous block: k_sec = block, v_sec = block + tokens*H*D*e,
 * layer_pitch = 2*tokens*H*D*e; the GPU engine's staging has other pitches). to_pages:
 * scatter (block side to pages), else gather. Appends at most kvs_paged_copies_max entries
 * to table at *n (the caller sizes it). Same preconditions as kvs_paged_gather. */
uint32_t kvs_paged_copies_max(const kvs_paged_layout *lay, uint32_t tokens, uint32_t layer_begin,
                              uint32_t layer_end);
struct kvs_copy2d;
void kvs_paged_copies(const kvs_paged_layout *lay, uint8_t *base, const uint32_t *pages,
                      uint32_t tokens, uint32_t layer_begin, uint32_t layer_end, uint8_t *k_sec,
                      uint8_t *v_sec, uint64_t layer_pitch, bool to_pages, struct kvs_copy2d *table,
                      uint32_t *n);

/* GPU versions: base and block are device pointers; lay (with its k_base/v_base arrays)
 * and pages are host memory, read during the call only (their values travel in the
 * launches' parameters: nothing is uploaded or allocated). stream is the caller's
 * cudaStream_t; the copy runs on it and this returns at once. Same preconditions as the
 * CPU functions; the bytes written equal theirs. 16-byte copies when base, block, every
 * offset and stride and a row (D * elem_bytes) are multiples of 16, element copies
 * otherwise. KVS_EINVAL (naming the argument) for a NULL pointer, a base or block not
 * aligned to elem_bytes, tokens 0 or a bad layer range; KVS_EINTERNAL for a failed
 * launch; KVS_ENOTSUP in a build without CUDA. */
int kvs_paged_gather_cuda(const kvs_paged_layout *lay, const void *base, const uint32_t *pages,
                          uint32_t tokens, uint32_t layer_begin, uint32_t layer_end, void *block,
                          void *stream, kvs_err *err);
int kvs_paged_scatter_cuda(const kvs_paged_layout *lay, void *base, const uint32_t *pages,
                           uint32_t tokens, uint32_t layer_begin, uint32_t layer_end,
                           const void *block, void *stream, kvs_err *err);

#ifdef __cplusplus
}
#endif

#endif
