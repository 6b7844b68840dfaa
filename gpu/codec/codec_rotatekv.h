/* `rotatekv-2/-3/-4` (quantizers.md "rotatekv-2"; quantizers-reference.md §3, §9.1-9.2):
 * encoded-section layout, codec-state format and the helpers a namespace uses to learn
 * the key channel permutation (the codec state).
 *
 * Section layout (one layer's K or V of one block; t tokens, H kv-heads, D channels,
 * C = H*D channels per token, b bits, all integers little-endian, no padding):
 *
 *   [ (t - n) token records, token order, sink tokens omitted ]
 *   [ n x uint16 sink token index, strictly increasing, < t     ]
 *   [ n x C x uint16 sink vectors: the input elements in the namespace dtype (fp16 or
 *     bf16), [H][D] order, bit-exact; token order of the index list ]
 *
 *   token record (rec bytes):
 *     codes: C codes of b bits of the transformed token vector, packed LSB first
 *            (gpu/codec/bitpack.h) over the whole vector: C*b/8 bytes. Every group holds a
 *            multiple of 16 channels, so each group starts on a byte boundary and this
 *            is also "packed within each group, groups padded to bytes".
 *     params: per group g in order, fp16 scale then fp16 lo (4 bytes per group);
 *            element value = lo + q*scale (gpu/quant.h kvs_minmax_decode).
 *
 *   Keys:   groups of KVS_ROTATEKV_GROUP = 128 consecutive channels of the permuted
 *           C-vector, the last one shorter when 128 does not divide C (D < 128 with an
 *           odd number of 128-channel halves; §3.10's choice for D = 64).
 *           rec = C*b/8 + 4*ceil(C/128).
 *   Values: groups of min(D, 128) channels inside each head. rec = C*b/8 + 4*C/min(D,128).
 *
 * The number of sinks n (0..min(KVS_ROTATEKV_MAX_SINKS, t)) is not stored: it follows
 * from the section length, len = t*rec + n*(2 + 2*C - rec), and 2 + 2*C > rec for every
 * b <= 4, so a section without sinks is exactly t*rec bytes: 2.25 bits/element for
 * rotatekv-2 K at D = 128, V 2.25 at D = 128 and 2.5 at D = 64 (quantizers-reference.md
 * §1). The decoder rejects any other length, a non-increasing or out-of-range index list
 * and more than min(S, t) sinks with KVS_EPROTO.
 *
 * Codec state (keys only; the value codec ignores its state): version 0 = identity
 * permutation (nothing learned yet); any other version carries
 *
 *   uint32 layers (= spec.layers), uint32 channels (= H*D <= 65536),
 *   layers x channels x uint16 p: y[j] = r[p[j]] where r is the grouped-Hadamard-rotated
 *   key vector of the token and y the vector that is quantized (quantizers-reference.md
 *   §3.2 step 3). Each layer's p must be a permutation of 0..channels-1.
 *
 * kvs_codec_create rejects a malformed state with KVS_EINVAL.
 */
#ifndef KVS_CODEC_ROTATEKV_H
#define KVS_CODEC_ROTATEKV_H

#include <stddef.h>
#include <stdint.h>

#include "gpu/base/err.h"
#include "gpu/codec/spec.h"

#define KVS_ROTATEKV_GROUP 128      /* key group (channels of the permuted vector) */
#define KVS_ROTATEKV_HEAD_GROUP 4   /* kv-heads per key rotation (head_group_num) */
#define KVS_ROTATEKV_MAX_SINKS 4    /* S: fp16 sink tokens per section at most */
#define KVS_ROTATEKV_TAU 8.0        /* sink if token norm > tau * median token norm */
#define KVS_ROTATEKV_STATE_HEADER 8 /* bytes before the permutations */
/* A token whose rotated values exceed this in magnitude, or are NaN/Inf (an fp32
 * overflow in the rotation), cannot be stored with fp16 group parameters (lo, scale or
 * the decoded value would overflow): it is kept as a sink. */
#define KVS_ROTATEKV_RANGE_MAX 32768.0f
/* Clip ratio of the quantizer (§3.7 defaults): 0.8 at 2 bits, 1.0 at 3 and 4. */
#define KVS_ROTATEKV_CLIP(bits) ((bits) == 2 ? 0.8f : 1.0f)

/* Number of consecutive kv-heads rotated together for keys: 4, or the largest power of
 * two <= 4 that divides kv_heads (quantizers-reference.md §3.10). */
unsigned kvs_rotatekv_head_group(uint32_t kv_heads);

/* In place on one token's key vector x[kv_heads*head_dim] ([H][D] order): the normalized
 * FWHT of size G*D on each group of G = kvs_rotatekv_head_group(kv_heads) consecutive
 * heads. Self-inverse. head_dim must be a power of two. */
void kvs_rotatekv_rotate_keys(uint32_t kv_heads, uint32_t head_dim, float *x);

/* Online calibration (quantizers-reference.md §3.4, §3.8): sums has spec->layers *
 * H*D doubles, zeroed by the caller before the first call; keys holds n tokens of every
 * layer, [L][n][H][D] in the namespace dtype (pre-RoPE keys when spec->keys_pre_rope).
 * Adds each layer's signed channel sums of the rotated keys. KVS_EINVAL if the layout
 * cannot be rotated (head_dim not a power of two). */
int kvs_rotatekv_calib_accumulate(const kvs_ns_spec *spec, double *sums, const uint16_t *keys,
                                  uint32_t n, kvs_err *err);

/* Freezes sums into a codec state: per layer p = argsort(sums) ascending (ties: lower
 * channel first). *state is allocated (free() it) and *len set to its byte size; the
 * caller stamps it with a version != 0. KVS_EINVAL if H*D > 65536. */
int kvs_rotatekv_calib_freeze(const kvs_ns_spec *spec, const double *sums, void **state,
                              size_t *len, kvs_err *err);

/* Both steps over n calibration tokens of every layer ([L][n][H][D], namespace dtype). */
int kvs_rotatekv_calibrate(const kvs_ns_spec *spec, const uint16_t *keys, uint32_t n, void **state,
                           size_t *len, kvs_err *err);

#endif
