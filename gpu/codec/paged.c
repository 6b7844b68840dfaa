/* Paged KV layouts, CPU side: the bounds check and the reference gather/scatter (paged.h).
 *
 * The check is the whole of the safety argument, since gather and scatter trust it: with
 * all strides and offsets unsigned, the last byte a plane's page p of n tokens touches is
 * base + p*page_stride + span(n) - 1, span(n) = (n-1)*token_stride + (H-1)*head_stride +
 * D*elem_bytes, and the first is base + p*page_stride >= 0. The largest end over all
 * layers and both planes uses the largest base, so one proof per page (max base + page
 * offset + span <= region_bytes) and one per base cover every byte, in O(L + pages) and
 * with every sum and product checked for 64-bit overflow.
 *
 * Copies go by the longest contiguous run the layout allows: a whole page (n tokens of
 * packed heads), else one token's heads, else one head's row of D elements.
 *
 * The _cuda entry points live in paged.cu (library kvs_codec_cuda); a build without CUDA
 * compiles their KVS_ENOTSUP stubs here instead (KVS_PAGED_CUDA_STUBS, set by
 * gpu/codec/CMakeLists.txt), so every build defines them exactly once.
 */
#include "gpu/codec/paged.h"

#include "gpu/codec/copies.h"

#include <assert.h>
#include <stdbool.h>
#include <string.h>

/* Offsets are uint64_t and index host memory directly. */
_Static_assert(sizeof(size_t) >= sizeof(uint64_t), "paged offsets need a 64-bit size_t");

static const char *plane_name(int kv)
{
    return kv ? "v_base" : "k_base";
}

/* span(n) above, for a page holding n >= 1 tokens; lay's dims already checked. */
static int page_span(const kvs_paged_layout *lay, uint32_t n, uint64_t *out, kvs_err *err)
{
    uint64_t tok, head, s;
    if (__builtin_mul_overflow((uint64_t)(n - 1), lay->token_stride, &tok))
        return kvs_err_set(err, KVS_EINVAL,
                           "token_stride: %llu bytes x %u further tokens in a page overflows "
                           "64 bits",
                           (unsigned long long)lay->token_stride, n - 1);
    if (__builtin_mul_overflow((uint64_t)(lay->kv_heads - 1), lay->head_stride, &head))
        return kvs_err_set(err, KVS_EINVAL,
                           "head_stride: %llu bytes x %u further heads overflows 64 bits",
                           (unsigned long long)lay->head_stride, lay->kv_heads - 1);
    if (__builtin_add_overflow(tok, head, &s) ||
        __builtin_add_overflow(s, (uint64_t)lay->head_dim * lay->elem_bytes, &s))
        return kvs_err_set(err, KVS_EINVAL,
                           "token_stride, head_stride: %llu, %llu: a page's span overflows 64 "
                           "bits",
                           (unsigned long long)lay->token_stride,
                           (unsigned long long)lay->head_stride);
    *out = s;
    return 0;
}

static int check_dims(const kvs_paged_layout *lay, const kvs_ns_spec *spec, kvs_err *err)
{
    /* Bounds first, so that a spec the caller failed to validate still cannot make the
     * products below overflow. */
    if (lay->layers == 0 || lay->layers > KVS_MAX_LAYERS)
        return kvs_err_set(err, KVS_EINVAL, "layers: %u not in 1..%d", lay->layers, KVS_MAX_LAYERS);
    if (lay->kv_heads == 0 || lay->kv_heads > KVS_MAX_KV_HEADS)
        return kvs_err_set(err, KVS_EINVAL, "kv_heads: %u not in 1..%d", lay->kv_heads,
                           KVS_MAX_KV_HEADS);
    if (lay->head_dim == 0 || lay->head_dim > KVS_MAX_HEAD_DIM)
        return kvs_err_set(err, KVS_EINVAL, "head_dim: %u not in 1..%d", lay->head_dim,
                           KVS_MAX_HEAD_DIM);
    if (lay->layers != spec->layers)
        return kvs_err_set(err, KVS_EINVAL, "layers: %u in the layout, %u in namespace '%s'",
                           lay->layers, spec->layers, spec->name);
    if (lay->kv_heads != spec->kv_heads)
        return kvs_err_set(err, KVS_EINVAL, "kv_heads: %u in the layout, %u in namespace '%s'",
                           lay->kv_heads, spec->kv_heads, spec->name);
    if (lay->head_dim != spec->head_dim)
        return kvs_err_set(err, KVS_EINVAL, "head_dim: %u in the layout, %u in namespace '%s'",
                           lay->head_dim, spec->head_dim, spec->name);
    size_t es = kvs_dtype_size(spec->dtype);
    if (es == 0 || lay->elem_bytes != es)
        return kvs_err_set(err, KVS_EINVAL,
                           "elem_bytes: %u in the layout, but namespace '%s' stores %s (%zu "
                           "bytes)",
                           lay->elem_bytes, spec->name, kvs_dtype_name(spec->dtype), es);
    if (lay->page_tokens == 0)
        return kvs_err_set(err, KVS_EINVAL, "page_tokens: 0 (must be at least 1)");
    if (!lay->k_base)
        return kvs_err_set(err, KVS_EINVAL, "k_base: NULL");
    if (!lay->v_base)
        return kvs_err_set(err, KVS_EINVAL, "v_base: NULL");
    /* Element alignment: the GPU copies move whole elements; also keeps every element of
     * a 2-byte-aligned region 2-byte aligned for the engines' own kernels. */
    static const char *const stride_names[] = {"page_stride", "token_stride", "head_stride"};
    const uint64_t strides[] = {lay->page_stride, lay->token_stride, lay->head_stride};
    for (int i = 0; i < 3; i++)
        if (strides[i] % lay->elem_bytes)
            return kvs_err_set(err, KVS_EINVAL, "%s: %llu is not a multiple of elem_bytes %u",
                               stride_names[i], (unsigned long long)strides[i], lay->elem_bytes);
    return 0;
}

int kvs_paged_check(const kvs_paged_layout *lay, const kvs_ns_spec *spec, uint64_t region_bytes,
                    const uint32_t *pages, size_t n_pages, uint32_t tokens, kvs_err *err)
{
    if (!lay)
        return kvs_err_set(err, KVS_EINVAL, "layout: NULL");
    if (!spec)
        return kvs_err_set(err, KVS_EINVAL, "spec: NULL");
    int rc = check_dims(lay, spec, err);
    if (rc)
        return rc;
    if (tokens == 0 || tokens > spec->block_tokens)
        return kvs_err_set(err, KVS_EINVAL, "tokens: %u not in 1..%u (block_tokens of '%s')",
                           tokens, spec->block_tokens, spec->name);
    if (!pages)
        return kvs_err_set(err, KVS_EINVAL, "pages: NULL");
    const uint32_t pt = lay->page_tokens;
    const uint64_t need = kvs_paged_pages(lay, tokens);
    if (n_pages < need)
        return kvs_err_set(err, KVS_EINVAL,
                           "tokens: %u tokens need %llu pages of page_tokens %u, but pages has "
                           "%zu",
                           tokens, (unsigned long long)need, pt, n_pages);
    if (n_pages > need)
        return kvs_err_set(err, KVS_EINVAL,
                           "pages: %zu pages for %u tokens of page_tokens %u; exactly %llu "
                           "expected (the first page starts at token 0)",
                           n_pages, tokens, pt, (unsigned long long)need);

    /* Every page but the last is full; the last holds the remainder (span_last <=
     * span_full since span grows with n). */
    const uint32_t n_last = tokens - (uint32_t)(need - 1) * pt;
    uint64_t span_last, span_full;
    rc = page_span(lay, n_last, &span_last, err);
    if (rc)
        return rc;
    span_full = span_last;
    if (need > 1 && (rc = page_span(lay, pt, &span_full, err)) != 0)
        return rc;
    if (span_full > region_bytes)
        return kvs_err_set(err, KVS_EINVAL,
                           "token_stride: a page of %u tokens x %u heads (token_stride %llu, "
                           "head_stride %llu) spans %llu bytes, more than the region's %llu",
                           need > 1 ? pt : n_last, lay->kv_heads,
                           (unsigned long long)lay->token_stride,
                           (unsigned long long)lay->head_stride, (unsigned long long)span_full,
                           (unsigned long long)region_bytes);

    /* Each base must hold at least the smallest page footprint at page offset 0; the
     * largest base then bounds every plane in the page loop. */
    uint64_t max_base = 0;
    uint32_t max_l = 0;
    int max_kv = 0;
    for (uint32_t l = 0; l < lay->layers; l++)
        for (int kv = 0; kv < 2; kv++) {
            uint64_t b = kv ? lay->v_base[l] : lay->k_base[l];
            if (b % lay->elem_bytes)
                return kvs_err_set(err, KVS_EINVAL,
                                   "%s[%u]: offset %llu is not a multiple of elem_bytes %u",
                                   plane_name(kv), l, (unsigned long long)b, lay->elem_bytes);
            if (b > region_bytes - span_last)
                return kvs_err_set(err, KVS_EINVAL,
                                   "%s[%u]: offset %llu plus a page's %llu bytes lies past the "
                                   "region's %llu bytes",
                                   plane_name(kv), l, (unsigned long long)b,
                                   (unsigned long long)span_last, (unsigned long long)region_bytes);
            if (b >= max_base) {
                max_base = b;
                max_l = l;
                max_kv = kv;
            }
        }

    for (size_t i = 0; i < need; i++) {
        const uint64_t span = i + 1 == need ? span_last : span_full;
        uint64_t off, end;
        if (__builtin_mul_overflow((uint64_t)pages[i], lay->page_stride, &off))
            return kvs_err_set(err, KVS_EINVAL,
                               "pages[%zu]: page %u x page_stride %llu overflows 64 bits", i,
                               pages[i], (unsigned long long)lay->page_stride);
        if (__builtin_add_overflow(max_base, off, &end) || __builtin_add_overflow(end, span, &end))
            return kvs_err_set(err, KVS_EINVAL,
                               "pages[%zu]: page %u (page_stride %llu) of %s[%u] ends past byte "
                               "2^64, outside the region's %llu bytes",
                               i, pages[i], (unsigned long long)lay->page_stride,
                               plane_name(max_kv), max_l, (unsigned long long)region_bytes);
        if (end > region_bytes)
            return kvs_err_set(err, KVS_EINVAL,
                               "pages[%zu]: page %u ends at byte %llu (%s[%u]) past the region's "
                               "%llu bytes",
                               i, pages[i], (unsigned long long)end, plane_name(max_kv), max_l,
                               (unsigned long long)region_bytes);
    }
    return 0;
}

int kvs_paged_check_layers(const kvs_paged_layout *lay, uint32_t layer_begin, uint32_t layer_end,
                           kvs_err *err)
{
    if (!lay)
        return kvs_err_set(err, KVS_EINVAL, "layout: NULL");
    if (layer_end > lay->layers)
        return kvs_err_set(err, KVS_EINVAL, "layer_end: %u past the layout's %u layers", layer_end,
                           lay->layers);
    if (layer_begin >= layer_end)
        return kvs_err_set(err, KVS_EINVAL, "layer_begin: %u not below layer_end %u", layer_begin,
                           layer_end);
    return 0;
}

uint64_t kvs_paged_block_bytes(const kvs_paged_layout *lay, uint32_t tokens, uint32_t layer_begin,
                               uint32_t layer_end)
{
    return (uint64_t)(layer_end - layer_begin) * 2 * tokens * lay->kv_heads * lay->head_dim *
           lay->elem_bytes;
}

/* The one walk of gather and scatter: visits the block's runs in block order and copies
 * each between paged offset `poff` and the running block offset. `gather` selects the
 * direction (src is then base, dst the block; the other way round for scatter); it is a
 * constant at both call sites, so the branch folds away. */
static inline void walk(const kvs_paged_layout *lay, const uint32_t *pages, uint32_t tokens,
                        uint32_t layer_begin, uint32_t layer_end, const uint8_t *src, uint8_t *dst,
                        bool gather)
{
    assert(lay->page_tokens >= 1 && tokens >= 1);
    assert(layer_begin < layer_end && layer_end <= lay->layers);
    const size_t row = (size_t)lay->head_dim * lay->elem_bytes;
    const size_t tok_bytes = row * lay->kv_heads;
    const bool heads_packed = lay->kv_heads == 1 || lay->head_stride == row;
    const bool tokens_packed = heads_packed && lay->token_stride == tok_bytes;
    size_t boff = 0;

#define RUN(poff, len)                                                                             \
    do {                                                                                           \
        if (gather)                                                                                \
            memcpy(dst + boff, src + (poff), (len));                                               \
        else                                                                                       \
            memcpy(dst + (poff), src + boff, (len));                                               \
        boff += (len);                                                                             \
    } while (0)

    for (uint32_t l = layer_begin; l < layer_end; l++)
        for (int kv = 0; kv < 2; kv++) {
            const uint64_t plane = kv ? lay->v_base[l] : lay->k_base[l];
            uint32_t n;
            for (uint32_t t0 = 0, i = 0; t0 < tokens; t0 += n, i++) {
                n = tokens - t0 < lay->page_tokens ? tokens - t0 : lay->page_tokens;
                const uint64_t page = plane + (uint64_t)pages[i] * lay->page_stride;
                if (tokens_packed) {
                    RUN(page, n * tok_bytes);
                    continue;
                }
                for (uint32_t j = 0; j < n; j++) {
                    const uint64_t tok = page + j * lay->token_stride;
                    if (heads_packed) {
                        RUN(tok, tok_bytes);
                        continue;
                    }
                    for (uint32_t h = 0; h < lay->kv_heads; h++)
                        RUN(tok + h * lay->head_stride, row);
                }
            }
        }
#undef RUN
}

void kvs_paged_gather(const kvs_paged_layout *lay, const uint8_t *base, const uint32_t *pages,
                      uint32_t tokens, uint32_t layer_begin, uint32_t layer_end, uint8_t *block)
{
    walk(lay, pages, tokens, layer_begin, layer_end, base, block, true);
}

void kvs_paged_scatter(const kvs_paged_layout *lay, uint8_t *base, const uint32_t *pages,
                       uint32_t tokens, uint32_t layer_begin, uint32_t layer_end,
                       const uint8_t *block)
{
    walk(lay, pages, tokens, layer_begin, layer_end, block, base, false);
}

/* Whether a layout's heads of one token are one run of bytes (then a page's tokens are one
 * 2D copy, else one per head). */
static bool heads_packed(const kvs_paged_layout *lay)
{
    return lay->kv_heads == 1 || lay->head_stride == (uint64_t)lay->head_dim * lay->elem_bytes;
}

uint32_t kvs_paged_copies_max(const kvs_paged_layout *lay, uint32_t tokens, uint32_t layer_begin,
                              uint32_t layer_end)
{
    return (layer_end - layer_begin) * 2 * kvs_paged_pages(lay, tokens) *
           (heads_packed(lay) ? 1 : lay->kv_heads);
}

void kvs_paged_copies(const kvs_paged_layout *lay, uint8_t *base, const uint32_t *pages,
                      uint32_t tokens, uint32_t layer_begin, uint32_t layer_end, uint8_t *k_sec,
                      uint8_t *v_sec, uint64_t layer_pitch, bool to_pages, kvs_copy2d *table,
                      uint32_t *n)
{
    assert(layer_begin < layer_end && layer_end <= lay->layers && tokens > 0);
    const uint64_t row = (uint64_t)lay->head_dim * lay->elem_bytes;
    const uint64_t tok_bytes = row * lay->kv_heads;
    const bool packed = heads_packed(lay);
    for (uint32_t l = layer_begin; l < layer_end; l++)
        for (int kv = 0; kv < 2; kv++) {
            uint8_t *plane = base + (kv ? lay->v_base[l] : lay->k_base[l]);
            uint8_t *sec = (kv ? v_sec : k_sec) + (l - layer_begin) * layer_pitch;
            uint32_t m;
            for (uint32_t t0 = 0, i = 0; t0 < tokens; t0 += m, i++) {
                m = tokens - t0 < lay->page_tokens ? tokens - t0 : lay->page_tokens;
                uint8_t *page = plane + (uint64_t)pages[i] * lay->page_stride;
                for (uint32_t h = 0; h < (packed ? 1 : lay->kv_heads); h++) {
                    uint8_t *paged = page + h * lay->head_stride,
                            *blk = sec + t0 * tok_bytes + h * row;
                    uint64_t width = packed ? tok_bytes : row;
                    if (to_pages)
                        kvs_copies_add(table, n, paged, lay->token_stride, blk, tok_bytes, width,
                                       m);
                    else
                        kvs_copies_add(table, n, blk, tok_bytes, paged, lay->token_stride, width,
                                       m);
                }
            }
        }
}

#ifdef KVS_PAGED_CUDA_STUBS
static int no_cuda(kvs_err *err)
{
    return kvs_err_set(err, KVS_ENOTSUP, "paged: this build has no CUDA kernels");
}

int kvs_paged_gather_cuda(const kvs_paged_layout *lay, const void *base, const uint32_t *pages,
                          uint32_t tokens, uint32_t layer_begin, uint32_t layer_end, void *block,
                          void *stream, kvs_err *err)
{
    return no_cuda(err);
}

int kvs_paged_scatter_cuda(const kvs_paged_layout *lay, void *base, const uint32_t *pages,
                           uint32_t tokens, uint32_t layer_begin, uint32_t layer_end,
                           const void *block, void *stream, kvs_err *err)
{
    return no_cuda(err);
}
#endif
