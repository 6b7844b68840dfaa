/* GPU encode/decode of codec sections (DESIGN §5-6; issue 4). The kernels produce and read
 * the same bytes as the CPU references (gpu/codec_<name>.c): a block encoded on the GPU
 * decodes on the CPU and the other way round.
 *
 * A batch is n sections of one codec (the keys or the values of one namespace), all of t
 * tokens: raw sections [n][t][H][D] in the namespace dtype, encoded sections at a fixed
 * stride (>= kvs_codec_section_max(t)). All pointers are device pointers; launches go on
 * the caller's stream (never the default stream) and return at once: results are ready
 * when the stream reaches them. Encoded sizes of the codecs with kernels are exact
 * functions of t (kvs_codec_section_max), so each section's length is known on the host.
 *
 * Includable from C with or without CUDA; without it every function reports
 * KVS_ENOTSUP.
 */
#ifndef KVS_CODEC_CUDA_H
#define KVS_CODEC_CUDA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "gpu/codec.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvs_cuda_sections {
    uint32_t n;                 /* sections in the batch */
    uint32_t t;                 /* tokens of every section */
    const uint32_t *layer;      /* device, n entries: each section's layer */
    const uint16_t *raw;        /* encode input: n * t*H*D elements */
    uint16_t *raw_out;          /* decode output: n * t*H*D elements */
    const uint8_t *enc;         /* decode input: n sections at `stride` */
    uint8_t *enc_out;           /* encode output: n sections at `stride` */
    size_t stride;              /* bytes from one encoded section to the next */
    unsigned long long *bad;    /* encode: device word set to the smallest index (over
                                 * n*t*H*D) of a NaN/Inf input, untouched if none; the
                                 * caller initializes it to ~0ull. May be NULL. */
} kvs_cuda_sections;

/* True if this build has kernels for c (codec and layout, e.g. head_dim 64/128/256). */
bool kvs_codec_cuda_supported(const kvs_codec *c);

/* Uploads the codec's tables to the current device (once, before the first launch; not
 * thread-safe against launches of the same codec). Idempotent. */
int kvs_codec_cuda_prepare(kvs_codec *c, kvs_err *err);

int kvs_codec_encode_cuda(const kvs_codec *c, const kvs_cuda_sections *s, void *stream,
                          kvs_err *err);
int kvs_codec_decode_cuda(const kvs_codec *c, const kvs_cuda_sections *s, void *stream,
                          kvs_err *err);

#ifdef __cplusplus
}
#endif

#endif
