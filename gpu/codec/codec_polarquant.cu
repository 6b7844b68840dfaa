/* CUDA kernels of `polarquant` (codec_polarquant.c is the reference; math, layout and
 * tables: gpu/codec/codec_polarquant.h; kernel sketch: quantizers-reference.md §9.3). Batch
 * contract: gpu/codec_cuda.h.
 *
 * Thread mapping: a lane owns E consecutive coordinates of one (token, head) vector (E = 4
 * for D = 64, E = 8 for D = 128 and 256: pq_lane_coords), so a vector takes LPV = D/E
 * lanes: one warp per vector at D = 256, two vectors per warp at D = 64 and 128.
 *  - FWHT: stages h < E in registers, stages h >= E with __shfl_xor_sync(h/E) inside the
 *    vector's lanes. Every stage computes exactly the reference's butterflies (lower
 *    index a + b, upper a - b, with a the lower operand), in the reference's stage order
 *    h = 1, 2, 4, ..., then one multiply by kvs_fwht_scale(D): the same roundings.
 *  - Polar tree of a 16-coordinate chunk: LPC = 16/E lanes (4 at E = 4). Levels whose
 *    nodes lie inside a lane are done in registers; the others exchange the lane's radius
 *    with __shfl_xor_sync(1), (2). Both lanes of a pair compute the parent from the same
 *    (left, right) operands, so the radii and codes are the reference's. Angle codes come
 *    from kvs_pq_sector / kvs_pq_code (the reference's comparisons, the same __constant__
 *    floats), radii from sqrtf (correctly rounded on both sides) of a*a + b*b (no FMA on
 *    either side), the stored radius from kvs_f32_to_fp16. There is therefore no tie case
 *    at all: every comparison sees bit-identical operands, and the encoded bytes are
 *    expected to equal the CPU's exactly (the test's 1e-4 allowance should stay unused).
 *  - Writes: each lane writes its own level-1 nibbles (E/4 bytes, contiguous across the
 *    vector's lanes), the chunk's first two lanes the radius bytes, and lane m of a vector
 *    byte m of its levels-2..4 bit string, assembled from the chunks' 14-bit words by two
 *    shuffles. Encoded bytes are written bytewise: sections sit at any byte offset
 *    (D = 64 vectors take 31 bytes).
 *  - Decode mirrors it: every lane reads its chunk's radius and 14-bit code word (2-3 bytes
 *    of the bit string, never past it) and its own nibbles, walks its path down the tree
 *    with the reference's multiplies (r * cos, r * sin of the centroid tables, copied to
 *    shared memory because the indices differ between lanes), then the FWHT, the sign
 *    flips and + 0.0f, then fp16 saturation to +-65504 and round-to-nearest-even
 *    conversion (hardware cvt.rn; equal to kvs_f32_to_fp16/bf16 for every non-NaN value,
 *    and a decoded value is never NaN: radii are finite and the tables are finite).
 * Raw elements move with 8-byte (E = 4) or 16-byte (E = 8) accesses when the raw pointer
 * allows, coalesced across the warp; elementwise otherwise.
 * Bytes per element: encode reads 2 and writes 62/128 = 0.484; decode the reverse.
 *
 * Signs: one D-bit word vector per codec, made in cuda_prepare by exactly the reference's
 * generator (pq_init: rng stream (seed, 0, 0, 0, KVS_PQ_RNG_PURPOSE), bit i % 64 of draw
 * i / 64) and kept in host memory (KVS__CUDA_TAB, one copy per device it is prepared on,
 * as every codec's tables); each launch passes the D/32 words by value as a kernel
 * parameter. Nothing is allocated on the device.
 *
 * `bad` (encode): the flat index over n*t*H*D of any NaN/Inf input (atomicMin). A chunk
 * whose norm does not fit the fp16 radius (reference: KVS_EINVAL "... beyond the fp16
 * radius of polarquant (65504)") is reported at the flat index of the chunk's first
 * element, vector base + 16 * chunk (chunks are in the rotated basis, so this names the
 * vector and chunk, not an input element). A vector with a NaN/Inf input never reports a
 * radius overflow (its radii are NaN), so a NaN/Inf index is never masked by its own
 * vector's radii. The caller tells the two apart by the element at the index (finite:
 * radius overflow) or by re-encoding the section on the CPU for the exact message.
 * Sections with a flagged element hold unspecified bytes.
 *
 * Decode of bytes the reference rejects (a radius with the sign bit set, Inf or NaN; the
 * encoders never write one): the kernels cannot report it and decode that chunk with
 * radius 0, so output stays finite.
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdlib.h>

#include "gpu/base/cuda_try.h"
#include "gpu/codec/codec_int.h"
#include "gpu/codec/codec_polarquant.h"
#include "gpu/codec/hadamard.h"
#include "gpu/codec/half.h"
#include "gpu/codec/rng.h"

#define PQ_THREADS 256      /* 8 warps per block */
#define PQ_SIGN_WORDS 8     /* 256 sign bits: the largest D with kernels */
#define PQ_FULL 0xFFFFFFFFu /* every lane takes part in every shuffle */

/* Lanes' coordinates, per head_dim. E = 4 is the §9.3 sketch (one warp per D = 128
 * vector); E = 8 (two D = 128 vectors per warp) needs fewer shuffles per vector, 16 per
 * vector instead of 26 at D = 128 (the FWHT's cross-lane stages, the tree's cross-lane
 * levels and the code-word merge), which bound the encode at E = 4; 16 also compiles.
 * The roundings do not depend on E: every butterfly and tree node has the same operands. */
static constexpr int pq_lane_coords(int d)
{
    return d >= 128 ? 8 : 4;
}

template <int D, int E> struct pq_geom {
    static constexpr int LPV = D / E;            /* lanes per vector */
    static constexpr int VPW = 32 / LPV;         /* vectors per warp */
    static constexpr int LPC = KVS_PQ_CHUNK / E; /* lanes per 16-coordinate chunk */
    static constexpr int C = D / KVS_PQ_CHUNK;   /* chunks per vector */
    static constexpr int UB = (C * 14 + 7) / 8;  /* bytes of the levels-2..4 string */
    static constexpr int LOGE = E == 4 ? 2 : E == 8 ? 3 : 4;
    static_assert(E == 4 || E == 8 || E == 16, "a lane owns 4, 8 or 16 coordinates");
    static_assert(LPV >= 1 && LPV <= 32 && 32 % LPV == 0, "a vector fits a warp");
    static_assert(UB == (int)KVS_PQ_UPPER_BYTES(C), "layout of gpu/codec_polarquant.h");
};

/* Sign bits s_i = -1 of the codec, by value. */
typedef struct pq_signs {
    uint32_t w[PQ_SIGN_WORDS];
} pq_signs;

typedef struct pq_args {
    const uint16_t *raw;
    uint16_t *raw_out;
    const uint8_t *enc;
    uint8_t *enc_out;
    size_t stride;
    unsigned long long *bad;
    unsigned long long nvec; /* n * t * H vectors */
    uint32_t vps;            /* vectors per section: t * H */
    int bf16;
    int vec_io;  /* raw pointer aligned for E-element accesses */
    float scale; /* kvs_fwht_scale(D), computed on the host by the reference's function */
    pq_signs signs;
} pq_args;

/* Bit position in a chunk's 14-bit word of the level-l codes (l = 2, 3, 4). */
__device__ __forceinline__ constexpr int pq_off(int l)
{
    return l == 2 ? 0 : l == 3 ? 8 : 12;
}

/* This lane's E sign bits (bit i: coordinate lv*E + i), from the by-value words with
 * compile-time indices only (a run-time index into the parameter would spill it). */
template <int D, int E>
__device__ __forceinline__ uint32_t pq_sign_bits(const pq_signs &s, unsigned lv)
{
    const unsigned bit = lv * E, word = bit / 32;
    uint32_t w = s.w[0];
#pragma unroll
    for (int k = 1; k < D / 32; k++)
        w = word == (unsigned)k ? s.w[k] : w;
    return E == 32 ? w : (w >> (bit % 32)) & ((1u << E) - 1);
}

/* Vector v's section and index in it. */
__device__ __forceinline__ void pq_locate(const pq_args &a, unsigned long long v,
                                          unsigned long long *sec, uint32_t *vl)
{
    if (a.nvec <= 0xFFFFFFFFull) {
        uint32_t v32 = (uint32_t)v;
        *sec = v32 / a.vps;
        *vl = v32 - (uint32_t)*sec * a.vps;
    } else {
        *sec = v / a.vps;
        *vl = (uint32_t)(v - *sec * a.vps);
    }
}

/* The normalized FWHT of gpu/codec/hadamard.h over the D coordinates held by LPV lanes. */
template <int D, int E>
__device__ __forceinline__ void pq_fwht(float (&y)[E], unsigned lv, float scale)
{
#pragma unroll
    for (int h = 1; h < E; h *= 2)
#pragma unroll
        for (int i = 0; i < E; i++)
            if (!(i & h)) {
                float p = y[i], q = y[i + h];
                y[i] = p + q;
                y[i + h] = p - q;
            }
#pragma unroll
    for (int h = E; h < D; h *= 2) {
        const int m = h / E;
        const bool upper = lv & m; /* this lane holds x[j + h], the partner x[j] */
#pragma unroll
        for (int i = 0; i < E; i++) {
            float p = __shfl_xor_sync(PQ_FULL, y[i], m);
            y[i] = upper ? p - y[i] : y[i] + p;
        }
    }
#pragma unroll
    for (int i = 0; i < E; i++)
        y[i] *= scale;
}

/* ---------------------------------------------------------------- encode */

template <int D, int E>
__global__ void __launch_bounds__(PQ_THREADS) polarquant_encode_kernel(const pq_args a)
{
    typedef pq_geom<D, E> G;
    const unsigned lane = threadIdx.x & 31, grp = lane / G::LPV, lv = lane % G::LPV;
    const unsigned k = lv % G::LPC, c = lv / G::LPC; /* lane in chunk, chunk */
    const unsigned long long warp =
        ((unsigned long long)blockIdx.x * PQ_THREADS + threadIdx.x) / 32;
    const unsigned long long v = warp * G::VPW + grp;
    const bool valid = v < a.nvec;
    const unsigned long long e0 = v * D + lv * E; /* flat index of this lane's first element */

    uint16_t h[E];
    if (valid) {
        const uint16_t *p = a.raw + e0;
        if (a.vec_io) {
#pragma unroll
            for (int q = 0; q < (E * 2 + 15) / 16; q++) {
                uint32_t w[4];
                if (E == 4) {
                    uint2 x = __ldcs((const uint2 *)p);
                    w[0] = x.x, w[1] = x.y, w[2] = w[3] = 0;
                } else {
                    uint4 x = __ldcs((const uint4 *)p + q);
                    w[0] = x.x, w[1] = x.y, w[2] = x.z, w[3] = x.w;
                }
#pragma unroll
                for (int i = 0; i < 8 && 8 * q + i < E; i++)
                    h[8 * q + i] = (uint16_t)(w[i / 2] >> (16 * (i % 2)));
            }
        } else {
#pragma unroll
            for (int i = 0; i < E; i++)
                h[i] = p[i];
        }
    } else {
#pragma unroll
        for (int i = 0; i < E; i++)
            h[i] = 0;
    }

    /* NaN/Inf: the all-ones exponent of fp16 and bf16, as kvs__check_finite. */
    const uint16_t mask = a.bf16 ? 0x7F80 : 0x7C00;
    int first = -1;
#pragma unroll
    for (int i = E - 1; i >= 0; i--)
        if ((h[i] & mask) == mask)
            first = i;
    if (first >= 0 && a.bad)
        atomicMin(a.bad, e0 + (unsigned)first);
    const unsigned nonfinite = __ballot_sync(PQ_FULL, first >= 0);
    const bool vec_bad =
        G::LPV == 32 ? nonfinite != 0 : ((nonfinite >> (grp * G::LPV)) & ((1u << G::LPV) - 1)) != 0;

    /* §2.3 step 1: y = (1/sqrt(D)) H diag(s) x */
    const uint32_t sb = pq_sign_bits<D, E>(a.signs, lv);
    float y[E];
#pragma unroll
    for (int i = 0; i < E; i++) {
        float x =
            a.bf16 ? __uint_as_float((uint32_t)h[i] << 16) : __half2float(__ushort_as_half(h[i]));
        y[i] = x * ((sb >> i) & 1 ? -1.0f : 1.0f);
    }
    pq_fwht<D, E>(y, lv, a.scale);

    /* §2.3 steps 2, 3, 5 (kvs_pq_encode_chunk, distributed): level 1 in registers */
    float r[E / 2];
    uint32_t nib = 0;
#pragma unroll
    for (int j = 0; j < E / 2; j++) {
        float p = y[2 * j], q = y[2 * j + 1];
        r[j] = sqrtf(p * p + q * q);
        nib |= kvs_pq_sector(p, q) << (4 * j);
    }
    /* levels 2..LOGE: nodes inside this lane (k * nn + i in the chunk); in place */
    uint32_t w = 0; /* this lane's bits of the chunk's 14-bit code word */
#pragma unroll
    for (int l = 2; l <= G::LOGE; l++) {
        const int nn = E >> l;
#pragma unroll
        for (int i = 0; i < nn; i++) {
            float p = r[2 * i], q = r[2 * i + 1];
            w |= kvs_pq_code(l, p, q) << (pq_off(l) + 2 * (k * nn + i));
            r[i] = sqrtf(p * p + q * q);
        }
    }
    /* levels LOGE+1..4: nodes across lanes; the lower lane holds the left radius */
    float rr = r[0];
#pragma unroll
    for (int l = G::LOGE + 1; l <= 4; l++) {
        const int m = 1 << (l - G::LOGE - 1);
        float o = __shfl_xor_sync(PQ_FULL, rr, m);
        const bool right = k & m;
        float p = right ? o : rr, q = right ? rr : o;
        w |= kvs_pq_code(l, p, q) << (pq_off(l) + 2 * (k >> (l - G::LOGE)));
        rr = sqrtf(p * p + q * q);
    }
#pragma unroll
    for (int m = 1; m < G::LPC; m *= 2)
        w |= __shfl_xor_sync(PQ_FULL, w, m);

    /* §2.3 step 7: fp16 radius; a norm beyond it fails the section (reference: EINVAL) */
    const uint16_t hr = kvs_f32_to_fp16(rr);
    if (valid && (hr & 0x7C00) == 0x7C00 && !vec_bad && k == 0 && a.bad)
        atomicMin(a.bad, v * D + (unsigned long long)c * KVS_PQ_CHUNK);

    unsigned long long sec = 0;
    uint32_t vl = 0;
    if (valid)
        pq_locate(a, v, &sec, &vl);
    const size_t nvc = (size_t)a.vps * G::C; /* chunks of a section */
    uint8_t *base = a.enc_out + sec * a.stride;
    if (valid) {
        uint8_t *rad = base + 2 * ((size_t)vl * G::C + c);
        if (G::LPC >= 2) {
            if (k < 2)
                rad[k] = (uint8_t)(hr >> (8 * k));
        } else {
            rad[0] = (uint8_t)hr;
            rad[1] = (uint8_t)(hr >> 8);
        }
        uint8_t *l1 = base + 2 * nvc + 4 * (size_t)vl * G::C + (E / 4) * lv;
#pragma unroll
        for (int b = 0; b < E / 4; b++)
            l1[b] = (uint8_t)(nib >> (8 * b));
    }
    /* byte m of the vector's bit string: bits 8m..8m+7 = chunk c0's word from bit sh on,
     * then chunk c0+1's */
    uint8_t *up = base + 6 * nvc + (size_t)vl * G::UB;
#pragma unroll
    for (int it = 0; it < (G::UB + G::LPV - 1) / G::LPV; it++) {
        const unsigned m = lv + it * G::LPV;
        const unsigned c0 = min(8 * m / 14, (unsigned)G::C - 1),
                       c1 = min(c0 + 1, (unsigned)G::C - 1);
        const uint32_t w0 = __shfl_sync(PQ_FULL, w, grp * G::LPV + c0 * G::LPC);
        const uint32_t w1 = __shfl_sync(PQ_FULL, w, grp * G::LPV + c1 * G::LPC);
        if (valid && m < (unsigned)G::UB) {
            const unsigned sh = 8 * m - 14 * c0; /* 0..13 */
            uint32_t byte = w0 >> sh;
            if (c0 + 1 < (unsigned)G::C)
                byte |= w1 << (14 - sh);
            up[m] = (uint8_t)byte;
        }
    }
}

/* ---------------------------------------------------------------- decode */

template <int D, int E>
__global__ void __launch_bounds__(PQ_THREADS) polarquant_decode_kernel(const pq_args a)
{
    typedef pq_geom<D, E> G;
    /* (cos, sin) of the centroids: level 1 [0..31], levels 2..4 [32..55] as [l-2][cos|sin][k] */
    __shared__ float tab[32 + 24];
    if (threadIdx.x < 32)
        tab[threadIdx.x] = kvs_pq_l1_cs[threadIdx.x / 16][threadIdx.x % 16];
    else if (threadIdx.x < 56) {
        const unsigned i = threadIdx.x - 32;
        tab[threadIdx.x] = kvs_pq_cb[i / 8][1 + i % 8 / 4][i % 4];
    }
    __syncthreads();

    const unsigned lane = threadIdx.x & 31, grp = lane / G::LPV, lv = lane % G::LPV;
    const unsigned k = lv % G::LPC, c = lv / G::LPC;
    const unsigned long long warp =
        ((unsigned long long)blockIdx.x * PQ_THREADS + threadIdx.x) / 32;
    const unsigned long long v = warp * G::VPW + grp;
    const bool valid = v < a.nvec;

    uint16_t hr = 0;
    uint32_t nib = 0, w = 0;
    if (valid) {
        unsigned long long sec;
        uint32_t vl;
        pq_locate(a, v, &sec, &vl);
        const size_t nvc = (size_t)a.vps * G::C;
        const uint8_t *base = a.enc + sec * a.stride;
        const uint8_t *rad = base + 2 * ((size_t)vl * G::C + c);
        hr = (uint16_t)(rad[0] | rad[1] << 8);
        const uint8_t *l1 = base + 2 * nvc + 4 * (size_t)vl * G::C + (E / 4) * lv;
#pragma unroll
        for (int b = 0; b < E / 4; b++)
            nib |= (uint32_t)l1[b] << (8 * b);
        /* the chunk's 14 bits, from the 2 or 3 bytes that hold them */
        const uint8_t *up = base + 6 * nvc + (size_t)vl * G::UB;
        const unsigned bit = 14 * c, o = bit / 8, sh = bit % 8;
        uint32_t x = up[o] | (uint32_t)up[o + 1] << 8;
        if (sh > 2)
            x |= (uint32_t)up[o + 2] << 16;
        w = (x >> sh) & 0x3FFF;
    }
    /* a radius the reference rejects (sign, Inf, NaN) decodes as 0 */
    const float r4 =
        (hr & 0x8000) || (hr & 0x7C00) == 0x7C00 ? 0.0f : __half2float(__ushort_as_half(hr));

    /* §2.3 step 6, top down along this lane's path: levels 4..LOGE+1 across lanes */
    float rr = r4;
#pragma unroll
    for (int l = 4; l > G::LOGE; l--) {
        const unsigned node = k >> (l - G::LOGE), right = (k >> (l - G::LOGE - 1)) & 1;
        const unsigned code = (w >> (pq_off(l) + 2 * node)) & 3;
        rr = rr * tab[32 + (l - 2) * 8 + right * 4 + code];
    }
    /* levels LOGE..2 inside the lane, in place from the top */
    float r[E / 2];
    r[0] = rr;
#pragma unroll
    for (int l = G::LOGE; l >= 2; l--) {
        const int nn = E >> l;
#pragma unroll
        for (int i = nn - 1; i >= 0; i--) {
            const unsigned code = (w >> (pq_off(l) + 2 * (k * nn + i))) & 3;
            const float x = r[i];
            r[2 * i] = x * tab[32 + (l - 2) * 8 + code];
            r[2 * i + 1] = x * tab[32 + (l - 2) * 8 + 4 + code];
        }
    }
    float y[E];
#pragma unroll
    for (int j = 0; j < E / 2; j++) {
        const unsigned q = (nib >> (4 * j)) & 15;
        y[2 * j] = r[j] * tab[q];
        y[2 * j + 1] = r[j] * tab[16 + q];
    }

    /* x = diag(s) (1/sqrt(D)) H y; + 0.0f turns -0 into +0, as the reference */
    pq_fwht<D, E>(y, lv, a.scale);
    const uint32_t sb = pq_sign_bits<D, E>(a.signs, lv);
    uint32_t out[E / 2];
#pragma unroll
    for (int j = 0; j < E / 2; j++) {
        float p = y[2 * j] * ((sb >> (2 * j)) & 1 ? -1.0f : 1.0f) + 0.0f;
        float q = y[2 * j + 1] * ((sb >> (2 * j + 1)) & 1 ? -1.0f : 1.0f) + 0.0f;
        if (a.bf16) {
            __nv_bfloat162 b2 = __floats2bfloat162_rn(p, q);
            out[j] = *(const uint32_t *)&b2;
        } else {
            /* kvs_codec_decode: |x| >= 65504 saturates (x is never NaN here) */
            p = fminf(fmaxf(p, -65504.0f), 65504.0f);
            q = fminf(fmaxf(q, -65504.0f), 65504.0f);
            __half2 h2 = __floats2half2_rn(p, q);
            out[j] = *(const uint32_t *)&h2;
        }
    }
    if (valid) {
        uint16_t *dst = a.raw_out + v * D + lv * E;
        if (a.vec_io) {
            if (E == 4)
                __stcs((uint2 *)dst, make_uint2(out[0], out[1]));
            else
#pragma unroll
                for (int q = 0; q < E / 8; q++)
                    __stcs((uint4 *)dst + q,
                           make_uint4(out[4 * q], out[4 * q + 1], out[4 * q + 2], out[4 * q + 3]));
        } else {
#pragma unroll
            for (int i = 0; i < E; i++)
                dst[i] = (uint16_t)(out[i / 2] >> (16 * (i % 2)));
        }
    }
}

/* ---------------------------------------------------------------- launchers */

extern "C" bool kvs__polarquant_cuda_supported(const kvs_codec *c)
{
    const uint32_t d = c->spec.head_dim;
    return (d == 64 || d == 128 || d == 256) &&
           (c->spec.dtype == KVS_DTYPE_FP16 || c->spec.dtype == KVS_DTYPE_BF16);
}

/* The sign bits of pq_init (gpu/codec/codec_polarquant.c), bit i of the D-bit vector set iff
 * s_i = -1. Host memory: kernels get them by value. */
extern "C" int kvs__polarquant_cuda_prepare(kvs_codec *c, kvs_err *err)
{
    const uint32_t d = c->spec.head_dim;
    if (d > 32 * PQ_SIGN_WORDS)
        return kvs_err_set(err, KVS_ENOTSUP, "polarquant: no CUDA kernels for head_dim %u", d);
    pq_signs *s = (pq_signs *)calloc(1, sizeof *s);
    if (!s)
        return kvs_err_set(err, KVS_ENOMEM, "polarquant: out of memory");
    kvs_rng rng;
    kvs_rng_init(&rng, c->spec.seed, 0, 0, 0, KVS_PQ_RNG_PURPOSE);
    uint64_t w = 0;
    for (uint32_t i = 0; i < d; i++) {
        if (i % 64 == 0)
            w = kvs_rng_next(&rng);
        if ((w >> (i % 64)) & 1)
            s->w[i / 32] |= 1u << (i % 32);
    }
    KVS__CUDA_TAB(c) = s;
    return 0;
}

extern "C" void kvs__polarquant_cuda_release(kvs_codec *c)
{
    free(KVS__CUDA_TAB(c));
    KVS__CUDA_TAB(c) = NULL;
}

template <int D>
static int pq_launch(const kvs_codec *c, const kvs_cuda_sections *s, void *stream, bool encode,
                     kvs_err *err)
{
    constexpr int E = pq_lane_coords(D);
    typedef pq_geom<D, E> G;
    pq_args a;
    a.raw = s->raw;
    a.raw_out = s->raw_out;
    a.enc = s->enc;
    a.enc_out = s->enc_out;
    a.stride = s->stride;
    a.bad = s->bad;
    a.vps = s->t * c->spec.kv_heads;
    a.nvec = (unsigned long long)s->n * a.vps;
    a.bf16 = c->spec.dtype == KVS_DTYPE_BF16;
    const uintptr_t io = encode ? (uintptr_t)s->raw : (uintptr_t)s->raw_out;
    a.vec_io = io % (E * 2 < 16 ? E * 2 : 16) == 0;
    a.scale = kvs_fwht_scale(D);
    a.signs = *(const pq_signs *)KVS__CUDA_TAB(c);
    const unsigned long long warps = (a.nvec + G::VPW - 1) / G::VPW;
    const unsigned long long blocks = (warps + PQ_THREADS / 32 - 1) / (PQ_THREADS / 32);
    if (blocks > 0x7FFFFFFFull)
        return kvs_err_set(err, KVS_EINVAL,
                           "polarquant: batch of %llu vectors is too large for "
                           "one launch",
                           a.nvec);
    cudaStream_t st = (cudaStream_t)stream;
    if (encode)
        polarquant_encode_kernel<D, E><<<(unsigned)blocks, PQ_THREADS, 0, st>>>(a);
    else
        polarquant_decode_kernel<D, E><<<(unsigned)blocks, PQ_THREADS, 0, st>>>(a);
    KVS_CUDA_CHECK(cudaGetLastError(), err);
    return 0;
}

static int pq_dispatch(const kvs_codec *c, const kvs_cuda_sections *s, void *stream, bool encode,
                       kvs_err *err)
{
    switch (c->spec.head_dim) {
    case 64:
        return pq_launch<64>(c, s, stream, encode, err);
    case 128:
        return pq_launch<128>(c, s, stream, encode, err);
    case 256:
        return pq_launch<256>(c, s, stream, encode, err);
    default:
        return kvs_err_set(err, KVS_ENOTSUP, "polarquant: no CUDA kernels for head_dim %u",
                           c->spec.head_dim);
    }
}

extern "C" int kvs__polarquant_encode_cuda(const kvs_codec *c, const kvs_cuda_sections *s,
                                           void *stream, kvs_err *err)
{
    return pq_dispatch(c, s, stream, true, err);
}

extern "C" int kvs__polarquant_decode_cuda(const kvs_codec *c, const kvs_cuda_sections *s,
                                           void *stream, kvs_err *err)
{
    return pq_dispatch(c, s, stream, false, err);
}
