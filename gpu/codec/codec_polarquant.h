/* PolarQuant (quantizers.md `polarquant`; quantizers-reference.md §2, §9.2-9.3): encoded
 * section layout, analytic codebooks and the per-chunk polar transform, shared by the CPU
 * reference (gpu/codec/codec_polarquant.c) and the CUDA kernels (gpu/codec/codec_polarquant.cu).
 *
 * Encode one vector x (one token, one kv-head, D channels; D a power of two >= 16):
 *  1. y = R x, R = (1/sqrt(D)) H_D diag(s): flip the signs s_i = -1, then the normalized
 *     FWHT of gpu/codec/hadamard.h (§2.3 step 1; randomized Hadamard instead of the paper's dense
 *     random rotation: measured equivalent, reference §6).
 *  2. Each consecutive 16-coordinate chunk u of y (C = D/16 chunks) goes through the
 *     recursive polar transform with L = 4 levels (§2.3 step 2): level 1 pairs
 *     (u[2j], u[2j+1]), j = 0..7: angle atan2(u[2j+1], u[2j]) in [0, 2 pi), radius r1[j];
 *     level l = 2..4 pairs (r[2i], r[2i+1]) of level l-1: angle atan2(r[2i+1], r[2i]) in
 *     [0, pi/2]; the last radius r4 = |u|.
 *  3. Angles are coded with fixed codebooks (§2.3 step 4): level 1 in 16 sectors of pi/8
 *     (4 bits, centroid (k + 1/2) pi/8), levels 2..4 with 2-bit Lloyd-Max codebooks of the
 *     densities f_l ∝ sin^(2^(l-1)-1)(2 psi). Codes come from boundary comparisons, no
 *     atan: level l >= 2 code = #{k : psi > beta_k} with psi > beta <=> b cos beta >
 *     a sin beta for (a, b) = (left, right) radius; level 1 = 4 q + #{k : phi >= beta_k},
 *     q the quadrant (from signs, ties as atan2: psi in [q pi/2, (q+1) pi/2)), phi the
 *     angle after rotating (a, b) back by -q pi/2 (exact: swaps and negations), beta_k =
 *     pi/8, pi/4, 3pi/8. This equals floor((atan2(b, a) mod 2 pi) / (pi/8)) except for
 *     points within fp32 rounding of a boundary; an angle exactly on a level >= 2 boundary
 *     takes the lower code. (a, b) = (0, 0) codes 0. CPU and GPU run the same comparisons
 *     on the same float constants and radii from sqrtf (correctly rounded on both; nvcc's
 *     default -prec-sqrt=true), so they agree bit for bit with --fmad=false.
 *  4. The radius r4 is stored as fp16 (RNE). A chunk norm that does not round to a finite
 *     fp16 (>= 65520: possible with bf16 inputs, or fp16 inputs of huge norm; or Inf/NaN
 *     when bf16 inputs near 3e38 overflow the fp32 rotation) fails the encode with
 *     KVS_EINVAL naming the chunk; nothing is clamped. Norms below the fp16
 *     subnormal range (< 2^-25) store 0 and decode to a zero chunk.
 * Decode: radii top-down with the (cos, sin) tables of the centroids, level-1 coordinates
 * (r1 cos, r1 sin), then x = R^T y = diag(s) (H_D / sqrt(D)) y: FWHT, then sign flips.
 *
 * Random signs s: ONE sign vector per namespace, shared by keys and values, all layers
 * and all heads, as in the paper (§2.3 step 1: "shared across keys and values, all
 * layers and all heads"): rng stream (seed, layer 0, kv 0, head 0, purpose
 * KVS_PQ_RNG_PURPOSE) of gpu/codec/rng.h; 64-bit draw w = i / 64 gives s_i = -1 iff bit i % 64
 * of w is set.
 *
 * Section layout (one layer's K or V: t tokens, H heads, C = D/16 chunks; n = t*H
 * vectors, token-major [t][H], chunk c of vector v at index v*C + c). Three planes, byte
 * addressed, little-endian, no alignment promised, no header, no scale or zero point:
 *   radii:  n*C fp16 values (2 bytes each)                     at offset 0
 *   level1: n*C uint32, nibble j (bits 4j..4j+3) = level-1 code of pair j, at 2*n*C
 *   upper:  n bit strings of KVS_PQ_UPPER_BYTES(C) bytes each,    at 6*n*C
 *           each the gpu/codec/bitpack.h 2-bit packing (LSB first) of 7*C codes: chunk c's
 *           codes at positions 7c + (0..3 level 2, 4..5 level 3, 6 level 4), i.e. 14 bits
 *           per chunk (8 bits level 2, 4 bits level 3, 2 bits level 4); the string is
 *           padded with zero bits to a whole byte per vector.
 * Bytes per vector: 6*C + ceil(14*C/8) = 62*D/16 bits exactly when D is a multiple of
 * 64 (D = 64: 31 bytes, D = 128: 62 bytes, D = 256: 124 bytes: 3.875 bits/element);
 * D = 16 pads 2 bits (8 bytes), D = 32 pads 4 bits (16 bytes). Section bytes =
 * t*H*KVS_PQ_VEC_BYTES(D), nothing data dependent.
 *
 * Tables: generated in double by gpu/codec/gen/polar_codebooks.c (command in its header) and
 * rounded once to float; they agree with the quantizers-reference.md §2.3 table to 1e-6.
 * Under nvcc they live in constant memory (KVS_PQ_TABLE), so the chunk functions below
 * (KVS_PQ_FN) are then device functions.
 */
#ifndef KVS_CODEC_POLARQUANT_H
#define KVS_CODEC_POLARQUANT_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "gpu/base/hd.h"

#define KVS_PQ_CHUNK 16      /* coordinates per polar tree (L = 4 levels) */
#define KVS_PQ_CODES2 7      /* 2-bit codes per chunk: 4 level 2, 2 level 3, 1 level 4 */
#define KVS_PQ_RNG_PURPOSE 1 /* gpu/codec/rng.h purpose of the sign vector s */
#define KVS_PQ_MIN_D 16
#define KVS_PQ_MAX_D 1024

/* Bytes of one vector's levels-2..4 bit string, of C chunks (14 bits each). */
#define KVS_PQ_UPPER_BYTES(C) (((size_t)(C)*14 + 7) / 8)
/* Bytes of one encoded vector of D channels. */
#define KVS_PQ_VEC_BYTES(D) (6 * ((size_t)(D) / 16) + KVS_PQ_UPPER_BYTES((size_t)(D) / 16))

/* Under nvcc the tables live in constant memory, which host code cannot read: the chunk
 * functions below are then device functions (KVS_PQ_FN); in C they are plain inline. */
#ifdef __CUDACC__
#define KVS_PQ_TABLE static __constant__ const
#define KVS_PQ_FN static inline __device__
#else
#define KVS_PQ_TABLE static const
#define KVS_PQ_FN static inline
#endif

/* clang-format off */
/* Generated by gpu/codec/gen/polar_codebooks.c (Lloyd-Max, double, 2000000-point grid). */
/* Angle MSE (rad^2): level 1 1.2851e-02, level 2 9.9092e-03,
 * level 3 6.1618e-03, level 4 3.3934e-03 */
/* level 1: centroid k = (k + 1/2) pi/8; cos, sin */
KVS_PQ_TABLE float kvs_pq_l1_cs[2][16] = {
    /* cos      */ {0.980785251f, 0.831469595f, 0.555570245f, 0.195090324f,
                   -0.195090324f, -0.555570245f, -0.831469595f, -0.980785251f,
                   -0.980785251f, -0.831469595f, -0.555570245f, -0.195090324f,
                   0.195090324f, 0.555570245f, 0.831469595f, 0.980785251f},
    /* sin      */ {0.195090324f, 0.555570245f, 0.831469595f, 0.980785251f,
                   0.980785251f, 0.831469595f, 0.555570245f, 0.195090324f,
                   -0.195090324f, -0.555570245f, -0.831469595f, -0.980785251f,
                   -0.980785251f, -0.831469595f, -0.555570245f, -0.195090324f},
};
/* level 1, within a quadrant: boundaries pi/8, pi/4, 3pi/8; cos, sin */
KVS_PQ_TABLE float kvs_pq_l1_bcs[2][3] = {
    /* cos      */ {0.923879504f, 0.707106769f, 0.382683426f},
    /* sin      */ {0.382683426f, 0.707106769f, 0.923879504f},
};
/* levels 2..4 (index level - 2): centroids and their cos, sin */
KVS_PQ_TABLE float kvs_pq_cb[3][3][4] = {
  { /* level 2 */
    /* centroid */ {0.30975613f, 0.633980215f, 0.936816096f, 1.26104021f},
    /* cos      */ {0.952407956f, 0.805676162f, 0.592356205f, 0.304826379f},
    /* sin      */ {0.304826379f, 0.592356205f, 0.805676162f, 0.952407956f},
  },
  { /* level 3 */
    /* centroid */ {0.426249683f, 0.674385011f, 0.8964113f, 1.14454663f},
    /* cos      */ {0.910522759f, 0.781091094f, 0.624417067f, 0.413458973f},
    /* sin      */ {0.413458973f, 0.624417067f, 0.781091094f, 0.910522759f},
  },
  { /* level 4 */
    /* centroid */ {0.524214089f, 0.705909431f, 0.86488694f, 1.04658222f},
    /* cos      */ {0.86571759f, 0.761021912f, 0.648726165f, 0.500532806f},
    /* sin      */ {0.500532806f, 0.648726165f, 0.761021912f, 0.86571759f},
  },
};
/* levels 2..4: decision boundaries and their cos, sin */
KVS_PQ_TABLE float kvs_pq_bd[3][3][3] = {
  { /* level 2 */
    /* bound    */ {0.471868187f, 0.785398185f, 1.09892809f},
    /* bcos     */ {0.890720665f, 0.707106769f, 0.454551101f},
    /* bsin     */ {0.454551101f, 0.707106769f, 0.890720665f},
  },
  { /* level 3 */
    /* bound    */ {0.550317347f, 0.785398185f, 1.02047896f},
    /* bcos     */ {0.85235858f, 0.707106769f, 0.522957742f},
    /* bsin     */ {0.522957742f, 0.707106769f, 0.85235858f},
  },
  { /* level 4 */
    /* bound    */ {0.61506176f, 0.785398185f, 0.955734551f},
    /* bcos     */ {0.816737831f, 0.707106769f, 0.577008963f},
    /* bsin     */ {0.577008963f, 0.707106769f, 0.816737831f},
  },
};
/* clang-format on */

/* Level-1 sector 0..15 of the pair (a, b): floor((atan2(b, a) mod 2 pi) / (pi/8)) by
 * comparisons (see the header comment for ties). */
KVS_PQ_FN unsigned kvs_pq_sector(float a, float b)
{
    unsigned q;
    float x, y;
    if (a > 0 && b >= 0) {
        q = 0, x = a, y = b;
    } else if (a <= 0 && b > 0) {
        q = 1, x = b, y = -a;
    } else if (a < 0 && b <= 0) {
        q = 2, x = -a, y = -b;
    } else if (a >= 0 && b < 0) {
        q = 3, x = -b, y = a;
    } else {
        return 0; /* a = b = 0: atan2(0, 0) = 0 */
    }
    unsigned j = 0;
    for (int k = 0; k < 3; k++)
        j += y * kvs_pq_l1_bcs[0][k] >= x * kvs_pq_l1_bcs[1][k];
    return 4 * q + j;
}

/* 2-bit code of the level-(lev) angle atan2(b, a) of non-negative radii (a, b). */
KVS_PQ_FN unsigned kvs_pq_code(int lev, float a, float b)
{
    unsigned j = 0;
    for (int k = 0; k < 3; k++)
        j += b * kvs_pq_bd[lev - 2][1][k] > a * kvs_pq_bd[lev - 2][2][k];
    return j;
}

/* Polar transform and quantization of one chunk u[16] (§2.3 steps 2, 3, 5). Writes the
 * level-1 nibbles to *l1 and the 7 two-bit codes to c2; returns the chunk norm r4 in
 * fp32 (Inf if the squares overflow). */
KVS_PQ_FN float kvs_pq_encode_chunk(const float *u, uint32_t *l1, uint8_t *c2)
{
    float r1[8], r2[4], r3[2];
    uint32_t w = 0;
    for (int j = 0; j < 8; j++) {
        float a = u[2 * j], b = u[2 * j + 1];
        r1[j] = sqrtf(a * a + b * b);
        w |= (uint32_t)kvs_pq_sector(a, b) << (4 * j);
    }
    *l1 = w;
    for (int i = 0; i < 4; i++) {
        float a = r1[2 * i], b = r1[2 * i + 1];
        r2[i] = sqrtf(a * a + b * b);
        c2[i] = (uint8_t)kvs_pq_code(2, a, b);
    }
    for (int i = 0; i < 2; i++) {
        float a = r2[2 * i], b = r2[2 * i + 1];
        r3[i] = sqrtf(a * a + b * b);
        c2[4 + i] = (uint8_t)kvs_pq_code(3, a, b);
    }
    c2[6] = (uint8_t)kvs_pq_code(4, r3[0], r3[1]);
    return sqrtf(r3[0] * r3[0] + r3[1] * r3[1]);
}

/* Inverse of kvs_pq_encode_chunk with centroids (§2.3 step 6): u[16] from the radius,
 * the level-1 nibbles and the 7 two-bit codes. */
KVS_PQ_FN void kvs_pq_decode_chunk(float r4, uint32_t l1, const uint8_t *c2, float *u)
{
    float r3[2], r2[4], r1[8];
    r3[0] = r4 * kvs_pq_cb[2][1][c2[6]];
    r3[1] = r4 * kvs_pq_cb[2][2][c2[6]];
    for (int i = 0; i < 2; i++) {
        r2[2 * i] = r3[i] * kvs_pq_cb[1][1][c2[4 + i]];
        r2[2 * i + 1] = r3[i] * kvs_pq_cb[1][2][c2[4 + i]];
    }
    for (int i = 0; i < 4; i++) {
        r1[2 * i] = r2[i] * kvs_pq_cb[0][1][c2[i]];
        r1[2 * i + 1] = r2[i] * kvs_pq_cb[0][2][c2[i]];
    }
    for (int j = 0; j < 8; j++) {
        unsigned k = (l1 >> (4 * j)) & 15;
        u[2 * j] = r1[j] * kvs_pq_l1_cs[0][k];
        u[2 * j + 1] = r1[j] * kvs_pq_l1_cs[1][k];
    }
}

#endif
