/* SQuat codec state: the query subspace per (layer, kv-head) that squat-2/squat-4 encode
 * keys with (quantizers.md `squat-2`; quantizers-reference.md §4). The encoded bytes are
 * KIVI bytes and decode needs no state; only the key encoder reads it.
 *
 * State bytes (kvs_codec_state.data, little-endian), for a namespace of L layers, H
 * kv-heads and head_dim D:
 *     offset 0   4  magic "SQG1"
 *            4   4  L          8  4  H          12  4  D
 *           16      L*H records in order (layer, kv-head), each 8 + 4*D*D bytes:
 *                   u64 N (query rows accumulated; 0 = no queries for this head)
 *                   D*D fp32 Gram matrix G = sum over rows q of q q^T, row-major
 * Total 16 + L*H*(8 + 4*D*D) bytes. The Gram is additive: states of two sets of rows
 * add (N and G) to the state of their union. The version (kvs_codec_state.version) is
 * the caller's: any value >= 1 with these bytes; version 0 means "no queries", and then
 * squat-b encodes exactly like kivi-b (bit for bit), whatever the bytes.
 */
#ifndef KVS_CODEC_SQUAT_H
#define KVS_CODEC_SQUAT_H

#include <stddef.h>
#include <stdint.h>

#include "gpu/base/err.h"
#include "gpu/codec/codec.h"
#include "gpu/codec/spec.h"

#define KVS_SQUAT_RANK 20      /* r: top-r eigen-part of the Gram (reference: 5, 20, 60) */
#define KVS_SQUAT_LAMBDA 1e-3  /* lambda of A = I + lambda_eff * Q^T Q (§4.3, §4.9) */
#define KVS_SQUAT_N_REF 1024.0 /* rows of the reference Gram (§4.7) */
#define KVS_SQUAT_E_REF 202.0  /* and its mean query energy trace(G) / N (codec_squat.c) */

/* Bytes of the state of a namespace (16 + L*H*(8 + 4*D*D)). */
size_t kvs_squat_state_bytes(const kvs_ns_spec *spec);

/* Builds state bytes from Gram matrices: gram holds L*H matrices of D*D fp32 (order
 * [L][H][D][D], borrowed), rows the L*H row counts. *state is allocated (free() it),
 * *len its size. KVS_ENOMEM if it cannot be allocated. */
int kvs_squat_state_from_grams(const kvs_ns_spec *spec, const float *gram, const uint64_t *rows,
                               void **state, size_t *len, kvs_err *err);

/* Builds state bytes from post-RoPE query rows: q holds L*n*q_heads*D elements of the
 * namespace dtype (fp16 or bf16), layout [L][n][q_heads][D] (borrowed). Query head h
 * feeds kv-head h / (q_heads / H), as repeat_kv does; so each (layer, kv-head) Gram sums
 * n * q_heads / H rows, accumulated in double and stored as fp32. q_heads must be a
 * non-zero multiple of H and n >= 1 (KVS_EINVAL "q_heads"/"queries"); NaN or Inf in q is
 * KVS_EINVAL naming layer, token, head, channel. Free *state with free(). */
int kvs_squat_state_from_queries(const kvs_ns_spec *spec, uint32_t q_heads, const uint16_t *q,
                                 uint32_t n, void **state, size_t *len, kvs_err *err);

/* (layer, kv-head) pairs of a squat key codec that have a query subspace; 0 means the
 * codec encodes exactly like KIVI (for stats). 0 for value codecs. */
uint32_t kvs_squat_subspace_heads(const kvs_codec *c);

/* The query Gram G = sum of q q^T over the query rows of (layer, kv-head) that a squat key
 * codec was made with: D*D fp32, row-major, borrowed from the codec (its state bytes);
 * *rows (may be NULL) gets their count. NULL when there is none: not a squat key codec,
 * state version 0, an index out of range, or no rows for that head. What the attention
 * logit error of stored keys is measured with (gpu/codec/fidelity.h). */
const float *kvs_squat_gram(const kvs_codec *c, uint32_t layer, uint32_t head, uint64_t *rows);

/* Channel blocks of a squat codec for head_dim D: block size g (64 for D >= 128, D/2
 * below) and count ceil(D/g). */
void kvs_squat_blocks(uint32_t head_dim, uint32_t *g, uint32_t *count);

/* The compensation matrix the codec applies after quantizing channel block b of
 * (layer, head): C_b = -(A_RR)^-1 A_{R,B_b}, R = the channels after block b, as fp32
 * row-major rows x cols (rows = |R|, cols = |B_b|). *C is borrowed from the codec (NULL
 * if the head has no subspace). For tests and tools. KVS_EINVAL for an index out of range
 * or b = the last block. */
int kvs_squat_compensation(const kvs_codec *c, uint32_t layer, uint32_t head, uint32_t b,
                           const float **C, uint32_t *rows, uint32_t *cols, kvs_err *err);

#endif
