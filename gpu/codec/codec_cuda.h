/* GPU encode/decode of codec sections (DESIGN §5-6; issue 4). The kernels produce and read
 * the same bytes as the CPU references (gpu/codec/codec_<name>.c): a block encoded on the GPU
 * decodes on the CPU and the other way round.
 *
 * A batch is n sections of one codec (the keys or the values of one namespace), all of t
 * tokens: raw sections [n][t][H][D] in the namespace dtype, encoded sections at a fixed
 * stride (>= kvs_codec_section_max(t)). All pointers are device pointers; launches go on
 * the caller's stream (never the default stream) and return at once: results are ready
 * when the stream reaches them.
 *
 * Section sizes: most codecs write exactly kvs_codec_section_max(t) bytes per section
 * (kvs_codec_cuda_fixed_size true). RotateKV's depends on its data (sink tokens): the
 * encode kernel writes each section's length to len_out, and decode reads each one from
 * len. Sections always sit at `stride` from each other whatever their length.
 *
 * Includable from C with or without CUDA; without it every function reports
 * KVS_ENOTSUP.
 */
#ifndef KVS_CODEC_CUDA_H
#define KVS_CODEC_CUDA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "gpu/codec/codec.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvs_cuda_sections {
    uint32_t n;              /* sections in the batch */
    uint32_t t;              /* tokens of every section */
    const uint32_t *layer;   /* device, n entries: each section's layer */
    const uint16_t *raw;     /* encode input: n * t*H*D elements */
    uint16_t *raw_out;       /* decode output: n * t*H*D elements */
    const uint8_t *enc;      /* decode input: n sections at `stride` */
    uint8_t *enc_out;        /* encode output: n sections at `stride` */
    size_t stride;           /* bytes from one encoded section to the next */
    unsigned long long *bad; /* encode: device word set to the smallest index (over
                              * n*t*H*D) of a NaN/Inf input (or of an input the codec
                              * refuses, e.g. too many RotateKV range sinks), untouched
                              * if none. Decode: set (atomicMin) to the index of a
                              * section whose bytes are malformed (never trusted: the
                              * kernel stays in bounds and writes something), untouched
                              * if none. The caller initializes it to ~0ull. May be
                              * NULL. The host redoes a flagged batch on the CPU, which
                              * reports the exact error. */
    uint32_t *len_out;       /* encode: device, n entries: each section's length.
                              * Required unless kvs_codec_cuda_fixed_size. */
    const uint32_t *len;     /* decode: device, n entries: each section's length, or
                              * NULL when kvs_codec_cuda_fixed_size (every section is
                              * kvs_codec_section_max(t) bytes). */
} kvs_cuda_sections;

/* True if this build has kernels for c (codec and layout, e.g. head_dim 64/128/256). */
bool kvs_codec_cuda_supported(const kvs_codec *c);

/* True if every section of t tokens encodes to exactly kvs_codec_section_max(t) bytes. */
bool kvs_codec_cuda_fixed_size(const kvs_codec *c);

/* Most CUDA device ordinals a codec keeps tables for (a node's GPUs, with room). */
#define KVS_CODEC_CUDA_DEVICES 64

/* Uploads the codec's tables to the current device (once per device, before the first
 * launch there; not thread-safe against launches of the same codec on that device).
 * Idempotent. A codec may be prepared on several devices (one engine each): each launch
 * reads the tables of the device current on its thread. */
int kvs_codec_cuda_prepare(kvs_codec *c, kvs_err *err);
/* True once c can be launched on CUDA device `device`: supported, and prepared there if
 * its kernels need tables. */
bool kvs_codec_cuda_ready(const kvs_codec *c, int device);

int kvs_codec_encode_cuda(const kvs_codec *c, const kvs_cuda_sections *s, void *stream,
                          kvs_err *err);
int kvs_codec_decode_cuda(const kvs_codec *c, const kvs_cuda_sections *s, void *stream,
                          kvs_err *err);

#ifdef __cplusplus
}
#endif

#endif
