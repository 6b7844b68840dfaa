/* CUDA kernels of `rotatekv-2/-3/-4` (codec_rotatekv.c is the reference and the
 * definition of correct; section layout and state format: gpu/codec/codec_rotatekv.h; kernel
 * sketch: quantizers-reference.md §3.9, §9.3). Batch contract: gpu/codec_cuda.h. The
 * sections vary in size (sink tokens): encode writes each length to len_out, decode reads
 * len.
 *
 * Every number is computed as the reference computes it, in the same order where it
 * rounds, so the bytes are identical (not merely close):
 *  - FWHT (gpu/hadamard.h kvs_fwht): a lane owns E consecutive coordinates of one vector
 *    of N = G*D (keys) or D (values) coordinates, E = max(8, N/32), so a vector takes
 *    LPV = N/E <= 32 lanes. Stages h < E run in registers, stages h >= E with
 *    __shfl_xor_sync(h/E) (polarquant's pattern); every stage computes the reference's
 *    butterflies (lower a + b, upper a - b, a the lower operand; the upper lane computes
 *    a + (-b), which IEEE defines as a - b) in its order h = 1, 2, 4, ..., then one
 *    multiply by kvs_fwht_scale(N).
 *  - Token norms (sink test, double): one lane per token sums (double)v*v sequentially in
 *    channel order, exactly the reference's loop; no reassociation, so a token whose norm
 *    sits on the threshold decides the same way. The lower median is found by ranking
 *    (value, token) pairs (a total order, like the reference's sort); the threshold is
 *    TAU*TAU*median, the same expression.
 *  - Min and max of a group: each lane scans its E channels in order with the reference's
 *    comparisons (`v < mn ? v : mn`), then lanes are combined lower channels first with
 *    `b < a ? b : a`. That is the sequential scan's result including which of -0 and +0
 *    comes out (the first of equal values), which the fp16 parameters can see.
 *  - Parameters, codes and decoded values come from gpu/codec/quant.h (kvs_minmax_params_zp,
 *    kvs_minmax_code_zp, kvs_minmax_decode: KVS_HD, IEEE division and rintf, built with
 *    --fmad=false like the CPU's -ffp-contract=off); codes are packed LSB first as
 *    gpu/codec/bitpack.h does (a lane's E codes are E*b/8 whole bytes of the record).
 *  - Sink vectors are the input elements, copied bit for bit (the reference's
 *    from_f32(to_f32(x)) is the identity on finite inputs). Decode writes them through
 *    the generic path's saturation (out_val(in_val(x)), as kvs_codec_decode does).
 *
 * Encode: one CTA per section, 32*W threads (W = 8 warps; fewer only when shared memory
 * is short). Phase 1, over chunks of the section's tokens staged in shared memory (raw
 * 16-bit rows, padded by 16 bytes so the norm lanes' row reads fall in distinct banks):
 * warp 0 computes the token norms (lane i: token i of the chunk), warps 1..W-1 take one
 * token each at a time: FWHT, range test (|y| > 32768) and NaN test by warp vote, then in
 * the resident path the whole record. Then the sink choice (range sinks first, then the
 * largest norms above the threshold, at most min(4, t), exactly select_sinks), made by
 * one thread after a block-wide rank for the median. Phase 2 writes the section: records
 * of the non-sink tokens at their final positions, the sink list, the sink vectors,
 * len_out.
 *  - Resident path (the whole section and its records fit RKV_RESIDENT_BUDGET bytes of
 *    shared memory; Llama-3-8B's C = 1024 at t = 16 takes 68-72 KiB, three CTAs per H100
 *    SM): the input is read once; records are staged in shared memory during phase 1
 *    (while warp 0 sums norms) and copied to their positions in phase 2.
 *  - Two-pass path (larger sections): phase 1 only classifies; phase 2 reads the chunks
 *    again and quantizes straight to global memory.
 *  Per token, the quantizing warp goes through a per-warp buffer of C floats: the FWHT
 *  output is stored there, then read back in the quantization basis (y[j] = r[p[j]],
 *  read through the layer's permutation copied to shared memory; identity without
 *  state) in steps of 32*E channels, lane = E consecutive channels: per-lane scan, group
 *  combine over the group's gs/E lanes (groups: 128 channels for keys, the last one
 *  shorter when 128 does not divide C; min(D, 128) for values), then lane g computes the
 *  parameters of group g (one lane per group, not one per lane), then codes.
 * Decode: one warp per (section, token), W = 8 per CTA (fewer for C > 1536 with a
 * permutation, whose per-warp scatter buffer of C floats lives in shared memory). The
 * warp reads len and the sink list (validated as the reference does), then either
 * copies its sink vector or decodes its record: lane = E consecutive channels, codes,
 * parameter word, kvs_minmax_decode, inverse permutation (scatter through shared memory),
 * FWHT, saturation to the namespace dtype, 16-byte stores.
 * Raw pointers must be 16-byte aligned; encoded sections may sit at any byte offset
 * (stride is arbitrary), so encoded bytes move with the widest access their address
 * allows.
 *
 * Supported layouts (kvs__rotatekv_cuda_supported): head_dim a power of two in 16..256,
 * C = kv_heads*head_dim <= 4096 (any kv_heads; the key head group is
 * kvs_rotatekv_head_group), block_tokens <= 1024, fp16 or bf16, and the two-pass plan
 * with 2 warps and 1-token chunks within 96 KiB of shared memory (every sm_80+ device
 * allows that much per block). Compile-time FWHT sizes N = 16..1024.
 *
 * `bad` (encode, atomicMin over flat indices n*t*H*D):
 *  - the smallest index of a NaN/Inf input, exactly;
 *  - in sections without NaN/Inf input: more than min(4, t) range tokens (the reference's
 *    KVS_EINVAL) at the first element of the token the reference names (the first range
 *    token beyond the cap); a layer index >= spec.layers at the section's first element;
 *    and a non-sink token whose rotated values hold a NaN (bf16 inputs so large that the
 *    FWHT overflows fp32) at the token's first element: the reference accepts it, but its
 *    bytes depend on x86 NaN propagation, which the GPU does not reproduce; the host
 *    re-encodes the batch on the CPU and gets the reference's bytes.
 *  Sections with a flagged element hold unspecified bytes (always inside their stride).
 * `bad` (decode): the index of a section whose length is impossible, whose sink list is
 * out of order or out of range, or whose layer is out of range; that section is decoded
 * as if it had no sinks (in bounds: t records fit every stride).
 *
 * Where the GPU may differ from the CPU: nowhere on inputs the reference accepts except
 * the NaN tokens above (flagged, so the host uses the CPU's bytes). Decode of bytes no
 * encoder writes (fp16 parameters that are Inf/NaN, so NaN outputs) into a bf16
 * namespace may differ in the NaN's sign and payload bits (x86 and CUDA propagate NaNs
 * differently); fp16 saturates NaN to 65504 on both sides.
 *
 * Throughput (H100, tests/bench/RESULTS.md): encode 0.18-0.20 of the copy floor, decode
 * 0.47-0.50. The encode is instruction-bound (FWHT shuffle stages, an IEEE division per
 * code, the group scans, all kept identical to the reference), and a lone block waits on
 * the norm lanes' sequential double adds (C of them per token).
 *
 * Codec state: the key permutation of every layer is uploaded by cuda_prepare to the
 * device that is current then, once per device (KVS__CUDA_TAB: each device's table);
 * a launch on a device where it was not prepared is refused (KVS_EINVAL). Values and
 * state version 0 need no table.
 */
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>

extern "C" {
#include "gpu/codec/codec_rotatekv.h" /* a C header without its own extern "C" block */
}
#include "gpu/base/cuda_try.h"
#include "gpu/codec/codec_int.h"
#include "gpu/codec/cuda_util.cuh"
#include "gpu/codec/hadamard.h"
#include "gpu/codec/half.h"
#include "gpu/codec/quant.h"

#define RKV_THREADS 256                  /* encode CTA (8 warps), decode CTA at most */
#define RKV_FULL 0xFFFFFFFFu             /* every lane takes part in every shuffle */
#define RKV_CHUNK_MAX 32                 /* tokens per chunk: one norm lane each */
#define RKV_CTRL 64                      /* bytes of rkv_ctrl at the start of shared memory */
#define RKV_RESIDENT_BUDGET (112u << 10) /* shared memory of the resident encode path */
#define RKV_STREAM_BUDGET (96u << 10)    /* of the two-pass path (and the support check) */
#define RKV_DECODE_SMEM (48u << 10)      /* decode scatter buffers: no opt-in needed */
#define RKV_MAX_TOKENS 1024              /* block_tokens: norms in shared memory, O(t^2) rank */
#define RKV_MAX_CHANNELS 4096            /* H*D */
#define RKV_MAX_ITEMS 0x7FFFFFFFu        /* blocks / warps of one launch */
#define RKV_DEVICES 64                   /* devices whose shared-memory opt-in is cached */

#define RKV_F_RANGE 1 /* a rotated value beyond KVS_ROTATEKV_RANGE_MAX */
#define RKV_F_NAN 2   /* a rotated value is NaN */
#define RKV_F_SINK 4

/* Coordinates per lane for an N-point FWHT (E), and lanes per vector N/E. */
static __host__ __device__ constexpr int rkv_lane_elems(int n)
{
    return n / 32 > 8 ? n / 32 : 8;
}

/* ---------------------------------------------------------------- arguments */

typedef struct rkv_args {
    const uint16_t *raw;   /* encode: this launch's first section */
    uint16_t *raw_out;     /* decode */
    const uint8_t *enc;    /* decode */
    uint8_t *enc_out;      /* encode */
    const uint32_t *layer; /* this launch's first section */
    const uint32_t *len;   /* decode */
    uint32_t *len_out;     /* encode */
    unsigned long long *bad;
    const uint16_t *perm; /* device [L][C] key permutation, NULL for the identity */
    size_t stride;
    unsigned long long sec0; /* batch index of this launch's first section */
    uint32_t n;              /* sections in this launch */
    uint32_t t, C, L;
    uint32_t gs_shift;             /* log2 of the group size (keys: 128, values: min(D, 128)) */
    uint32_t ngroups, cbytes, rec; /* groups per token, code bytes, record bytes */
    float clip, fscale;            /* KVS_ROTATEKV_CLIP(bits), kvs_fwht_scale(N) */
    int bf16;
    /* decode */
    uint32_t nwarps; /* n * t */
    kdiv dt;         /* by t */
    /* encode plan: shared-memory offsets (bytes, 16-aligned) and sizes */
    uint32_t tc, resident; /* tokens per chunk (t when resident) */
    uint32_t o_norm, o_flag, o_perm, o_raw, o_stage, o_area;
    uint32_t rs, rec16, area; /* raw row stride, staged record stride, per-warp area */
    kdiv drow;                /* by C/8: 16-byte units per raw row */
} rkv_args;

/* Start of the encode kernel's shared memory. */
typedef struct rkv_ctrl {
    double med;  /* lower median of the token norms */
    int has_nf;  /* the section holds a NaN/Inf input */
    uint32_t ns; /* sinks chosen */
    uint32_t list[KVS_ROTATEKV_MAX_SINKS];
} rkv_ctrl;
static_assert(sizeof(rkv_ctrl) <= RKV_CTRL, "rkv_ctrl fits its slot");

/* ---------------------------------------------------------------- helpers */

static __device__ __forceinline__ void flag_bad(unsigned long long *bad, unsigned long long i)
{
    if (bad)
        atomicMin(bad, i);
}

/* Code k of a lane's codes packed LSB first at B bits into / out of words. */
template <int B> static __device__ __forceinline__ void put_code(uint32_t *w, int k, uint32_t q)
{
    const int bit = k * B, wi = bit / 32, sh = bit % 32;
    w[wi] |= q << sh;
    if (sh + B > 32)
        w[wi + 1] |= q >> (32 - sh);
}

template <int B> static __device__ __forceinline__ uint32_t get_code(const uint32_t *w, int k)
{
    const int bit = k * B, wi = bit / 32, sh = bit % 32;
    uint32_t v = w[wi] >> sh;
    if (sh + B > 32)
        v |= w[wi + 1] << (32 - sh);
    return v & ((1u << B) - 1);
}

/* NB bytes at p, any alignment, into little-endian words (zero beyond NB). */
template <int NB>
static __device__ __forceinline__ void ld_n(const uint8_t *p, uint32_t (&w)[(NB + 3) / 4])
{
    const uintptr_t al = (uintptr_t)p;
#pragma unroll
    for (int i = 0; i < (NB + 3) / 4; i++)
        w[i] = 0;
    if (NB % 16 == 0 && (al & 15) == 0) {
#pragma unroll
        for (int i = 0; i < NB / 16; i++) {
            const uint4 x = ((const uint4 *)p)[i];
            w[4 * i] = x.x, w[4 * i + 1] = x.y, w[4 * i + 2] = x.z, w[4 * i + 3] = x.w;
        }
    } else if (NB % 8 == 0 && (al & 7) == 0) {
#pragma unroll
        for (int i = 0; i < NB / 8; i++) {
            const uint2 x = ((const uint2 *)p)[i];
            w[2 * i] = x.x, w[2 * i + 1] = x.y;
        }
    } else if (NB % 4 == 0 && (al & 3) == 0) {
#pragma unroll
        for (int i = 0; i < NB / 4; i++)
            w[i] = ((const uint32_t *)p)[i];
    } else if (NB % 2 == 0 && (al & 1) == 0) {
#pragma unroll
        for (int i = 0; i < NB / 2; i++)
            w[i / 2] |= (uint32_t)((const uint16_t *)p)[i] << (16 * (i % 2));
    } else {
#pragma unroll
        for (int i = 0; i < NB; i++)
            w[i / 4] |= (uint32_t)p[i] << (8 * (i % 4));
    }
}

/* NB bytes of little-endian words to p, any alignment. */
template <int NB>
static __device__ __forceinline__ void st_n(uint8_t *p, const uint32_t (&w)[(NB + 3) / 4])
{
    const uintptr_t al = (uintptr_t)p;
    if (NB % 16 == 0 && (al & 15) == 0) {
#pragma unroll
        for (int i = 0; i < NB / 16; i++)
            ((uint4 *)p)[i] = make_uint4(w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]);
    } else if (NB % 8 == 0 && (al & 7) == 0) {
#pragma unroll
        for (int i = 0; i < NB / 8; i++)
            ((uint2 *)p)[i] = make_uint2(w[2 * i], w[2 * i + 1]);
    } else if (NB % 4 == 0 && (al & 3) == 0) {
#pragma unroll
        for (int i = 0; i < NB / 4; i++)
            ((uint32_t *)p)[i] = w[i];
    } else if (NB % 2 == 0 && (al & 1) == 0) {
#pragma unroll
        for (int i = 0; i < NB / 2; i++)
            ((uint16_t *)p)[i] = (uint16_t)(w[i / 2] >> (16 * (i % 2)));
    } else {
#pragma unroll
        for (int i = 0; i < NB; i++)
            p[i] = (uint8_t)(w[i / 4] >> (8 * (i % 4)));
    }
}

/* nb bytes from src (16-byte aligned; shared memory) to dst (global, any alignment), by
 * the 32 lanes of a warp. */
static __device__ void copy_out(uint8_t *dst, const uint8_t *src, uint32_t nb, unsigned lane)
{
    const uintptr_t al = (uintptr_t)dst;
    uint32_t done = 0;
    if ((al & 3) == 0) {
        const uint32_t nw = nb / 4;
        for (uint32_t i = lane; i < nw; i += 32)
            ((uint32_t *)dst)[i] = ((const uint32_t *)src)[i];
        done = 4 * nw;
    } else if ((al & 1) == 0) {
        const uint32_t nh = nb / 2;
        for (uint32_t i = lane; i < nh; i += 32)
            ((uint16_t *)dst)[i] = ((const uint16_t *)src)[i];
        done = 2 * nh;
    }
    for (uint32_t i = done + lane; i < nb; i += 32)
        dst[i] = src[i];
}

/* E raw elements at p (16-byte aligned) as floats, exact (the reference's to_f32);
 * zeros where !valid (p is then not read). */
template <int E>
static __device__ __forceinline__ void load_vals(const uint8_t *p, bool valid, int bf16,
                                                 float (&v)[E])
{
    uint32_t w[E / 2];
    if (valid) {
#pragma unroll
        for (int q = 0; q < E / 8; q++) {
            const uint4 x = ((const uint4 *)p)[q];
            w[4 * q] = x.x, w[4 * q + 1] = x.y, w[4 * q + 2] = x.z, w[4 * q + 3] = x.w;
        }
    } else {
#pragma unroll
        for (int i = 0; i < E / 2; i++)
            w[i] = 0;
    }
    if (bf16) {
#pragma unroll
        for (int i = 0; i < E; i++)
            v[i] = __uint_as_float(i % 2 ? w[i / 2] & 0xFFFF0000u : w[i / 2] << 16);
    } else {
#pragma unroll
        for (int i = 0; i < E; i++)
            v[i] = __half2float(__ushort_as_half((uint16_t)(w[i / 2] >> (16 * (i % 2)))));
    }
}

/* An input element through the reference's decode: to_f32, then kvs_codec_decode's
 * saturation and conversion (the identity on finite fp16/bf16; Inf/NaN fp16 -> +-65504). */
static __device__ __forceinline__ uint32_t resat(uint32_t u, int bf16)
{
    return bf16 ? out_val<true>(in_val<true>(u)) : out_val<false>(in_val<false>(u));
}

/* E floats to the namespace dtype at dst (16-byte aligned), saturated as kvs_codec_decode. */
template <int E>
static __device__ __forceinline__ void store_vals(uint16_t *dst, const float (&x)[E], int bf16)
{
    uint32_t o[E / 2];
    if (bf16) {
#pragma unroll
        for (int j = 0; j < E / 2; j++)
            o[j] = out_val<true>(x[2 * j]) | out_val<true>(x[2 * j + 1]) << 16;
    } else {
#pragma unroll
        for (int j = 0; j < E / 2; j++)
            o[j] = out_val<false>(x[2 * j]) | out_val<false>(x[2 * j + 1]) << 16;
    }
#pragma unroll
    for (int q = 0; q < E / 8; q++)
        ((uint4 *)dst)[q] = make_uint4(o[4 * q], o[4 * q + 1], o[4 * q + 2], o[4 * q + 3]);
}

/* kvs_fwht (gpu/codec/hadamard.h) over the N coordinates held by LPV = N/E lanes (lv: this
 * lane's index in its vector), same butterflies, same stage order, same scaling. */
template <int N, int E>
static __device__ __forceinline__ void rkv_fwht(float (&y)[E], unsigned lv, float scale)
{
    static_assert(E <= N && N / E <= 32 && 32 % (N / E) == 0, "a vector fits a warp");
#pragma unroll
    for (int h = 1; h < E; h *= 2)
#pragma unroll
        for (int i = 0; i < E; i++)
            if (!(i & h)) {
                const float p = y[i], q = y[i + h];
                y[i] = p + q;
                y[i + h] = p - q;
            }
#pragma unroll
    for (int h = E; h < N; h *= 2) {
        const int m = h / E;
        /* this lane holds x[j + h] (upper) or x[j]; the partner p the other. Lower:
         * y + p; upper: p - y, which IEEE defines as p + (-y): flip y's sign bit and
         * add (one add instead of two and a select; same bits, signed zeros included) */
        const uint32_t neg = (lv & m) ? 0x80000000u : 0u;
#pragma unroll
        for (int i = 0; i < E; i++) {
            const float p = __shfl_xor_sync(RKV_FULL, y[i], m);
            y[i] = __uint_as_float(__float_as_uint(y[i]) ^ neg) + p;
        }
    }
#pragma unroll
    for (int i = 0; i < E; i++)
        y[i] *= scale;
}

/* ---------------------------------------------------------------- encode */

/* The quantization-basis values y[ch..ch+E) of a token whose rotated vector r is in scr:
 * y[j] = r[perm[j]] (perm in shared memory), or r[j] without a permutation. */
template <int E>
static __device__ __forceinline__ void gather(const float *scr, const uint16_t *perm, uint32_t ch,
                                              float (&y)[E])
{
    if (perm) {
#pragma unroll
        for (int q = 0; q < E / 8; q++) {
            const uint4 pp = ((const uint4 *)(perm + ch))[q];
            const uint32_t w[4] = {pp.x, pp.y, pp.z, pp.w};
#pragma unroll
            for (int i = 0; i < 8; i++)
                y[8 * q + i] = scr[(w[i / 2] >> (16 * (i % 2))) & 0xFFFF];
        }
    } else {
#pragma unroll
        for (int q = 0; q < E / 4; q++) {
            const float4 f = ((const float4 *)(scr + ch))[q];
            y[4 * q] = f.x, y[4 * q + 1] = f.y, y[4 * q + 2] = f.z, y[4 * q + 3] = f.w;
        }
    }
}

/* One token, by one warp: FWHT of the raw row (shared memory), range and NaN flags into
 * *flag_out (if not NULL), and, when dst is not NULL, the token record at dst (shared or
 * global memory, any alignment): encode_token of the reference. area: this warp's
 * buffers (C floats, then ngroups (min, max) pairs, then ngroups (word, zero) pairs). */
template <int N, int B>
static __device__ __forceinline__ void enc_token(const rkv_args &a, const uint8_t *row,
                                                 uint8_t *area, const uint16_t *perm, uint8_t *dst,
                                                 uint8_t *flag_out, unsigned lane)
{
    constexpr int E = rkv_lane_elems(N), LPV = N / E, SW = 32 * E, NB = E * B / 8;
    float *scr = (float *)area;
    float2 *gmm = (float2 *)(area + 4 * (size_t)a.C);
    uint2 *gpar = (uint2 *)(area + 4 * (size_t)a.C + 8 * (size_t)a.ngroups);
    const unsigned lv = lane % LPV;

    /* forward(): the rotated vector r, tested as in_range() and for NaN */
    bool over = false, nan = false;
    for (uint32_t c0 = 0; c0 < a.C; c0 += SW) {
        const uint32_t ch = c0 + lane * E;
        const bool valid = ch < a.C; /* whole vectors: C is a multiple of N */
        float v[E];
        load_vals<E>(row + 2 * (size_t)ch, valid, a.bf16, v);
        rkv_fwht<N, E>(v, lv, a.fscale);
        if (valid) {
#pragma unroll
            for (int k = 0; k < E; k++) {
                over |= fabsf(v[k]) > KVS_ROTATEKV_RANGE_MAX;
                nan |= v[k] != v[k];
            }
            if (dst) {
#pragma unroll
                for (int q = 0; q < E / 4; q++)
                    ((float4 *)(scr + ch))[q] =
                        make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
            }
        }
    }
    over = __any_sync(RKV_FULL, over);
    nan = __any_sync(RKV_FULL, nan);
    if (flag_out && lane == 0)
        *flag_out = (uint8_t)((over ? RKV_F_RANGE : 0) | (nan ? RKV_F_NAN : 0));
    if (!dst)
        return;
    __syncwarp();

    /* min and max of every group (the reference's scan order), lanes lower first */
    const uint32_t gs = 1u << a.gs_shift, lpg = gs / E;
    for (uint32_t c0 = 0; c0 < a.C; c0 += SW) {
        const uint32_t ch = c0 + lane * E;
        const bool valid = ch < a.C;
        float mn = __int_as_float(0x7F800000), mx = __int_as_float(0xFF800000);
        if (valid) {
            float y[E];
            gather<E>(scr, perm, ch, y);
            mn = mx = y[0];
#pragma unroll
            for (int k = 1; k < E; k++) {
                mn = y[k] < mn ? y[k] : mn;
                mx = y[k] > mx ? y[k] : mx;
            }
        }
        /* lanes past C (the short last key group) hold +-Inf and are always the upper
         * part, so they never win */
        for (uint32_t m = 1; m < lpg; m *= 2) {
            const float omn = __shfl_xor_sync(RKV_FULL, mn, m);
            const float omx = __shfl_xor_sync(RKV_FULL, mx, m);
            const bool hi = lane & m;
            const float amn = hi ? omn : mn, bmn = hi ? mn : omn;
            const float amx = hi ? omx : mx, bmx = hi ? mx : omx;
            mn = bmn < amn ? bmn : amn;
            mx = bmx > amx ? bmx : amx;
        }
        if (valid && (ch & (gs - 1)) == 0)
            gmm[ch >> a.gs_shift] = make_float2(mn, mx);
    }
    __syncwarp();
    for (uint32_t g = lane; g < a.ngroups; g += 32) {
        const float2 m = gmm[g];
        float zero;
        const kvs_minmax p = kvs_minmax_params_zp(m.x, m.y, a.clip, B, &zero);
        gpar[g] = make_uint2((uint32_t)p.scale | (uint32_t)p.lo << 16, __float_as_uint(zero));
    }
    __syncwarp();
    for (uint32_t c0 = 0; c0 < a.C; c0 += SW) {
        const uint32_t ch = c0 + lane * E;
        if (ch >= a.C)
            continue;
        float y[E];
        gather<E>(scr, perm, ch, y);
        const uint32_t g = ch >> a.gs_shift;
        const uint2 gp = gpar[g];
        kvs_minmax p;
        p.scale = (uint16_t)gp.x;
        p.lo = (uint16_t)(gp.x >> 16);
        const float zero = __uint_as_float(gp.y);
        uint32_t w[(NB + 3) / 4];
#pragma unroll
        for (int i = 0; i < (NB + 3) / 4; i++)
            w[i] = 0;
#pragma unroll
        for (int k = 0; k < E; k++)
            put_code<B>(w, k, kvs_minmax_code_zp(p, zero, y[k], B));
        st_n<NB>(dst + (size_t)ch * B / 8, w);
        if ((ch & (gs - 1)) == 0)
            st_u32(dst + a.cbytes + 4 * (size_t)g, gp.x);
    }
    __syncwarp(); /* the buffers are this warp's next token's */
}

/* Token rows c0..c0+nt-1 of the section to shared memory (rows rs bytes apart); with
 * `check`, every NaN/Inf is reported (the thread's first; atomicMin keeps the smallest). */
static __device__ __forceinline__ void load_chunk(const rkv_args &a, const uint16_t *src,
                                                  uint32_t c0, uint32_t nt, uint8_t *raw_s,
                                                  bool check, rkv_ctrl *ctl,
                                                  unsigned long long elem0)
{
    const uint32_t upr = a.C / 8, units = nt * upr;
    const uint32_t mask = a.bf16 ? 0x7F80u : 0x7C00u;
    for (uint32_t u = threadIdx.x; u < units; u += blockDim.x) {
        const uint32_t row = kdiv_q(u, a.drow), col = u - row * upr;
        const uint4 x = ((const uint4 *)(src + (size_t)(c0 + row) * a.C))[col];
        *(uint4 *)(raw_s + (size_t)row * a.rs + 16 * (size_t)col) = x;
        if (check) {
            const uint32_t w[4] = {x.x, x.y, x.z, x.w};
            bool any = false;
#pragma unroll
            for (int i = 0; i < 4; i++)
                any |= ((w[i] & mask) == mask) | (((w[i] >> 16) & mask) == mask);
            if (any) {
                int first = 8;
#pragma unroll
                for (int e = 7; e >= 0; e--) /* ends on the first */
                    if (((w[e / 2] >> (16 * (e % 2))) & mask) == mask)
                        first = e;
                flag_bad(a.bad, elem0 + (unsigned long long)(c0 + row) * a.C + 8ull * col +
                                    (unsigned)first);
                atomicOr(&ctl->has_nf, 1);
            }
        }
    }
}

/* sum of (double)v*v over the C elements of a raw row, in channel order (select_sinks):
 * one add after the other, as the reference; 64 bytes are loaded ahead so that only the
 * adds' latency is on the chain. */
template <bool BF16> static __device__ double token_norm_t(const uint8_t *row, uint32_t C)
{
    const uint4 *r = (const uint4 *)row;
    const uint32_t units = C / 8;
    double s = 0;
    for (uint32_t u = 0; u < units; u += 4) {
        uint4 x[4];
#pragma unroll
        for (int q = 0; q < 4; q++)
            x[q] = u + q < units ? r[u + q] : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int q = 0; q < 4; q++) {
            if (u + q >= units)
                break;
            const uint32_t w[4] = {x[q].x, x[q].y, x[q].z, x[q].w};
#pragma unroll
            for (int e = 0; e < 8; e++) {
                const double v = in_val<BF16>((w[e / 2] >> (16 * (e % 2))) & 0xFFFF);
                s += v * v;
            }
        }
    }
    return s;
}

static __device__ double token_norm(const uint8_t *row, uint32_t C, int bf16)
{
    return bf16 ? token_norm_t<true>(row, C) : token_norm_t<false>(row, C);
}

template <int N, int B>
static __global__ void __launch_bounds__(RKV_THREADS) rkv_encode_kernel(const rkv_args a)
{
    extern __shared__ uint4 rkv_smem[];
    uint8_t *sm = (uint8_t *)rkv_smem;
    rkv_ctrl *ctl = (rkv_ctrl *)sm;
    double *norm = (double *)(sm + a.o_norm);
    uint8_t *flag = sm + a.o_flag;
    const uint16_t *perm = a.perm ? (const uint16_t *)(sm + a.o_perm) : NULL;
    uint8_t *raw_s = sm + a.o_raw;
    uint8_t *stage = sm + a.o_stage;
    const unsigned tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = blockDim.x >> 5;
    const uint32_t sec = blockIdx.x, t = a.t, C = a.C, rec = a.rec;
    const unsigned long long elem0 = (a.sec0 + sec) * t * C; /* flat index of element 0 */
    const uint16_t *src = a.raw + (size_t)sec * t * C;
    uint8_t *out = a.enc_out + (size_t)sec * a.stride;

    uint32_t lyr = a.layer[sec];
    if (tid == 0) {
        ctl->med = 0.0;
        ctl->has_nf = 0;
        ctl->ns = 0;
        if (lyr >= a.L) /* the reference refuses the layer */
            flag_bad(a.bad, elem0);
    }
    if (lyr >= a.L)
        lyr = 0;
    if (a.perm) {
        const uint4 *p = (const uint4 *)(a.perm + (size_t)lyr * C);
        for (uint32_t u = tid; u < C / 8; u += blockDim.x)
            ((uint4 *)(sm + a.o_perm))[u] = p[u];
    }

    /* phase 1: norms (warp 0), flags and, resident, the records (warps 1..nw-1) */
    for (uint32_t c0 = 0; c0 < t; c0 += a.tc) {
        const uint32_t nt = min(a.tc, t - c0);
        __syncthreads(); /* the previous chunk is done with */
        load_chunk(a, src, c0, nt, raw_s, true, ctl, elem0);
        __syncthreads();
        if (warp == 0) {
            for (uint32_t i = lane; i < nt; i += 32)
                norm[c0 + i] = token_norm(raw_s + (size_t)i * a.rs, C, a.bf16);
        } else {
            uint8_t *area = sm + a.o_area + (size_t)(a.resident ? warp - 1 : warp) * a.area;
            for (uint32_t i = warp - 1; i < nt; i += nw - 1)
                enc_token<N, B>(a, raw_s + (size_t)i * a.rs, area, perm,
                                a.resident ? stage + (size_t)(c0 + i) * a.rec16 : NULL,
                                flag + c0 + i, lane);
        }
    }
    __syncthreads();

    /* select_sinks: the lower median (element (t-1)/2 of the sorted norms) by rank */
    const uint32_t want = (t - 1) / 2;
    for (uint32_t i = tid; i < t; i += blockDim.x) {
        const double ni = norm[i];
        uint32_t r = 0;
        for (uint32_t j = 0; j < t; j++) {
            const double nj = norm[j];
            r += (nj < ni) | ((nj == ni) & (j < i));
        }
        if (r == want)
            ctl->med = ni;
    }
    __syncthreads();
    if (tid == 0) {
        const uint32_t cap = min(t, (uint32_t)KVS_ROTATEKV_MAX_SINKS);
        uint32_t ns = 0, over = t;
        for (uint32_t i = 0; i < t; i++)
            if (flag[i] & RKV_F_RANGE) {
                if (ns == cap) { /* the reference's KVS_EINVAL names token i */
                    over = i;
                    break;
                }
                flag[i] |= RKV_F_SINK;
                ns++;
            }
        const double thresh = KVS_ROTATEKV_TAU * KVS_ROTATEKV_TAU * ctl->med;
        while (ns < cap) { /* largest norm first, ties: lower token */
            uint32_t best = t;
            double bn = 0;
            for (uint32_t i = 0; i < t; i++) {
                const double ni = norm[i];
                if (!(flag[i] & RKV_F_SINK) && ni > thresh && (best == t || ni > bn)) {
                    best = i;
                    bn = ni;
                }
            }
            if (best == t)
                break;
            flag[best] |= RKV_F_SINK;
            ns++;
        }
        uint32_t k = 0;
        for (uint32_t i = 0; i < t && k < ns; i++)
            if (flag[i] & RKV_F_SINK)
                ctl->list[k++] = i;
        ctl->ns = k;
        if (!ctl->has_nf) {
            if (over < t) {
                flag_bad(a.bad, elem0 + (unsigned long long)over * C);
            } else {
                for (uint32_t i = 0; i < t; i++)
                    if ((flag[i] & (RKV_F_SINK | RKV_F_NAN)) == RKV_F_NAN) {
                        flag_bad(a.bad, elem0 + (unsigned long long)i * C);
                        break;
                    }
            }
        }
    }
    __syncthreads();

    /* phase 2: the section */
    const uint32_t ns = ctl->ns;
    uint32_t list[KVS_ROTATEKV_MAX_SINKS];
#pragma unroll
    for (int k = 0; k < KVS_ROTATEKV_MAX_SINKS; k++)
        list[k] = (uint32_t)k < ns ? ctl->list[k] : t;
    uint8_t *sinks = out + (size_t)(t - ns) * rec; /* index list, then vectors */
    uint8_t *vecs = sinks + 2 * (size_t)ns;
    if (a.resident) {
        for (uint32_t i = warp; i < t; i += nw) {
            uint32_t before = 0;
            bool sink = false;
#pragma unroll
            for (int k = 0; k < KVS_ROTATEKV_MAX_SINKS; k++) {
                before += list[k] < i;
                sink |= list[k] == i;
            }
            if (!sink)
                copy_out(out + (size_t)(i - before) * rec, stage + (size_t)i * a.rec16, rec, lane);
        }
        for (uint32_t k = warp; k < ns; k += nw)
            copy_out(vecs + (size_t)k * 2 * C, raw_s + (size_t)ctl->list[k] * a.rs, 2 * C, lane);
    } else {
        const bool reload = a.tc < t;
        for (uint32_t c0 = 0; c0 < t; c0 += a.tc) {
            const uint32_t nt = min(a.tc, t - c0);
            if (reload) {
                __syncthreads();
                load_chunk(a, src, c0, nt, raw_s, false, ctl, elem0);
                __syncthreads();
            }
            uint8_t *area = sm + a.o_area + (size_t)warp * a.area;
            for (uint32_t i = warp; i < nt; i += nw) {
                const uint32_t tok = c0 + i;
                uint32_t before = 0;
                int sk = -1;
#pragma unroll
                for (int k = 0; k < KVS_ROTATEKV_MAX_SINKS; k++) {
                    before += list[k] < tok;
                    sk = list[k] == tok ? k : sk;
                }
                if (sk >= 0)
                    copy_out(vecs + (size_t)sk * 2 * C, raw_s + (size_t)i * a.rs, 2 * C, lane);
                else
                    enc_token<N, B>(a, raw_s + (size_t)i * a.rs, area, perm,
                                    out + (size_t)(tok - before) * rec, NULL, lane);
            }
        }
    }
    if (tid == 0) {
        for (uint32_t k = 0; k < ns; k++) {
            sinks[2 * k] = (uint8_t)ctl->list[k];
            sinks[2 * k + 1] = (uint8_t)(ctl->list[k] >> 8);
        }
        a.len_out[sec] = (t - ns) * rec + ns * (2 + 2 * C);
    }
}

/* ---------------------------------------------------------------- decode */

template <int N, int B>
static __global__ void __launch_bounds__(RKV_THREADS) rkv_decode_kernel(const rkv_args a)
{
    constexpr int E = rkv_lane_elems(N), LPV = N / E, SW = 32 * E, NB = E * B / 8;
    extern __shared__ uint4 rkv_smem[];
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const uint32_t w = blockIdx.x * (blockDim.x >> 5) + warp;
    if (w >= a.nwarps) /* whole warps */
        return;
    const uint32_t sec = kdiv_q(w, a.dt), tok = w - sec * a.t;
    const uint32_t t = a.t, C = a.C, rec = a.rec;
    const uint8_t *base = a.enc + (size_t)sec * a.stride;
    uint16_t *dst = a.raw_out + ((size_t)sec * t + tok) * C;

    /* rkv_decode's checks: length, sink list, layer; a failing section has no sinks */
    const uint32_t cap = min(t, (uint32_t)KVS_ROTATEKV_MAX_SINKS);
    const size_t full = (size_t)t * rec, per = 2 + 2 * (size_t)C - rec;
    const size_t len = a.len[sec];
    bool ok = len >= full && (len - full) % per == 0 && (len - full) / per <= cap;
    uint32_t ns = ok ? (uint32_t)((len - full) / per) : 0;
    const uint8_t *list = base + (size_t)(t - ns) * rec;
    uint32_t idx[KVS_ROTATEKV_MAX_SINKS];
#pragma unroll
    for (int k = 0; k < KVS_ROTATEKV_MAX_SINKS; k++) {
        idx[k] = t;
        if ((uint32_t)k < ns) {
            idx[k] = (uint32_t)list[2 * k] | (uint32_t)list[2 * k + 1] << 8;
            if (idx[k] >= t || (k > 0 && idx[k] <= idx[k - 1]))
                ok = false;
        }
    }
    uint32_t lyr = a.layer[sec];
    if (lyr >= a.L) {
        ok = false;
        lyr = 0;
    }
    if (!ok) {
        if (tok == 0 && lane == 0)
            flag_bad(a.bad, a.sec0 + sec);
        ns = 0;
#pragma unroll
        for (int k = 0; k < KVS_ROTATEKV_MAX_SINKS; k++)
            idx[k] = t;
    }
    uint32_t before = 0;
    int sk = -1;
#pragma unroll
    for (int k = 0; k < KVS_ROTATEKV_MAX_SINKS; k++) {
        before += idx[k] < tok;
        sk = idx[k] == tok ? k : sk;
    }

    if (sk >= 0) { /* the input elements, through the generic path's saturation */
        const uint8_t *v = list + 2 * (size_t)ns + (size_t)sk * 2 * C;
        for (uint32_t ch = lane * 8; ch < C; ch += 256) {
            uint32_t x[4];
            ld_n<16>(v + 2 * (size_t)ch, x);
            uint32_t o[4];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const uint32_t lo = x[i] & 0xFFFF, hi = x[i] >> 16;
                o[i] = resat(lo, a.bf16) | resat(hi, a.bf16) << 16;
            }
            *(uint4 *)(dst + ch) = make_uint4(o[0], o[1], o[2], o[3]);
        }
        return;
    }

    const uint8_t *rp = base + (size_t)(tok - before) * rec; /* decode_token */
    const unsigned lv = lane % LPV;
    if (a.perm) {
        /* inverse(): x[p[j]] = y[j] into this warp's buffer, then the FWHT */
        float *scr = (float *)((uint8_t *)rkv_smem + (size_t)warp * a.area);
        const uint16_t *p = a.perm + (size_t)lyr * C;
        for (uint32_t c0 = 0; c0 < C; c0 += SW) {
            const uint32_t ch = c0 + lane * E;
            if (ch >= C)
                continue;
            uint32_t cw[(NB + 3) / 4];
            ld_n<NB>(rp + (size_t)ch * B / 8, cw);
            const uint32_t pw = ld_u32(rp + a.cbytes + 4 * (size_t)(ch >> a.gs_shift));
            kvs_minmax par;
            par.scale = (uint16_t)pw;
            par.lo = (uint16_t)(pw >> 16);
#pragma unroll
            for (int q = 0; q < E / 8; q++) {
                const uint4 pp = __ldg((const uint4 *)(p + ch) + q);
                const uint32_t pv[4] = {pp.x, pp.y, pp.z, pp.w};
#pragma unroll
                for (int i = 0; i < 8; i++)
                    scr[(pv[i / 2] >> (16 * (i % 2))) & 0xFFFF] =
                        kvs_minmax_decode(par, get_code<B>(cw, 8 * q + i));
            }
        }
        __syncwarp();
        for (uint32_t c0 = 0; c0 < C; c0 += SW) {
            const uint32_t ch = c0 + lane * E;
            const bool valid = ch < C;
            float x[E];
#pragma unroll
            for (int q = 0; q < E / 4; q++) {
                const float4 f = valid ? ((const float4 *)(scr + ch))[q] : make_float4(0, 0, 0, 0);
                x[4 * q] = f.x, x[4 * q + 1] = f.y, x[4 * q + 2] = f.z, x[4 * q + 3] = f.w;
            }
            rkv_fwht<N, E>(x, lv, a.fscale);
            if (valid)
                store_vals<E>(dst + ch, x, a.bf16);
        }
    } else {
        for (uint32_t c0 = 0; c0 < C; c0 += SW) {
            const uint32_t ch = c0 + lane * E;
            const bool valid = ch < C;
            float x[E];
            if (valid) {
                uint32_t cw[(NB + 3) / 4];
                ld_n<NB>(rp + (size_t)ch * B / 8, cw);
                const uint32_t pw = ld_u32(rp + a.cbytes + 4 * (size_t)(ch >> a.gs_shift));
                kvs_minmax par;
                par.scale = (uint16_t)pw;
                par.lo = (uint16_t)(pw >> 16);
#pragma unroll
                for (int k = 0; k < E; k++)
                    x[k] = kvs_minmax_decode(par, get_code<B>(cw, k));
            } else {
#pragma unroll
                for (int k = 0; k < E; k++)
                    x[k] = 0.0f;
            }
            rkv_fwht<N, E>(x, lv, a.fscale);
            if (valid)
                store_vals<E>(dst + ch, x, a.bf16);
        }
    }
}

/* ---------------------------------------------------------------- host: geometry, plans */

/* Per-device table of a prepared codec (KVS__CUDA_TAB(c), host memory). */
typedef struct rkv_cuda {
    int device;     /* current device at cuda_prepare: the one that holds perm */
    uint16_t *perm; /* device [L][C] p of the codec state, NULL for the identity */
} rkv_cuda;

typedef struct rkv_geom {
    uint32_t N; /* FWHT size: G*D (keys), D (values) */
    uint32_t C, gs_shift, ngroups, cbytes, rec;
    bool perm; /* keys with a learned permutation */
} rkv_geom;

static uint32_t ilog2(uint32_t x)
{
    uint32_t l = 0;
    while ((1u << (l + 1)) <= x)
        l++;
    return l;
}

/* The reference's rkv_init geometry (gpu/codec/codec_rotatekv.h). */
static void geom_init(const kvs_codec *c, rkv_geom *g)
{
    const kvs_ns_spec *s = &c->spec;
    const bool keys = c->kv == KVS_KEYS;
    const uint32_t D = s->head_dim, gs = keys || D >= KVS_ROTATEKV_GROUP ? KVS_ROTATEKV_GROUP : D;
    g->C = s->kv_heads * D;
    g->N = keys ? kvs_rotatekv_head_group(s->kv_heads) * D : D;
    g->gs_shift = ilog2(gs);
    g->ngroups = keys ? (g->C + KVS_ROTATEKV_GROUP - 1) / KVS_ROTATEKV_GROUP : g->C / gs;
    g->cbytes = g->C * c->bits / 8;
    g->rec = g->cbytes + 4 * g->ngroups;
    g->perm = keys && c->state.version != 0;
}

static uint32_t align16(size_t x)
{
    return (uint32_t)((x + 15) & ~(size_t)15);
}

/* Encode shared memory for t tokens with nw warps: resident (the whole section, staged
 * records) or two-pass with chunks of tc tokens. Fills the plan fields of a. */
static size_t plan_size(const rkv_geom *g, uint32_t t, uint32_t nw, uint32_t tc, bool resident,
                        rkv_args *a)
{
    size_t off = RKV_CTRL;
    a->o_norm = (uint32_t)off;
    off += align16(8 * (size_t)t);
    a->o_flag = (uint32_t)off;
    off += align16(t);
    a->o_perm = (uint32_t)off;
    off += g->perm ? 2 * (size_t)g->C : 0; /* C is a multiple of 16 */
    a->rs = 2 * g->C + 16;
    a->tc = resident ? t : tc;
    a->o_raw = (uint32_t)off;
    off += (size_t)a->tc * a->rs;
    a->rec16 = align16(g->rec);
    a->o_stage = (uint32_t)off;
    off += resident ? (size_t)t * a->rec16 : 0;
    a->area = align16(4 * (size_t)g->C + 16 * (size_t)g->ngroups);
    a->o_area = (uint32_t)off;
    off += (size_t)(resident ? nw - 1 : nw) * a->area;
    a->resident = resident;
    return off;
}

/* Chooses the encode plan within the device's limit lim; 0 or KVS_ENOTSUP. */
static int plan_encode(const rkv_geom *g, uint32_t t, size_t lim, rkv_args *a, uint32_t *nw,
                       size_t *smem, kvs_err *err)
{
    const uint32_t wmax = RKV_THREADS / 32;
    size_t cap = lim < RKV_RESIDENT_BUDGET ? lim : RKV_RESIDENT_BUDGET;
    if ((*smem = plan_size(g, t, wmax, t, true, a)) <= cap) {
        *nw = wmax;
        return 0;
    }
    cap = lim < RKV_STREAM_BUDGET ? lim : RKV_STREAM_BUDGET;
    for (uint32_t w = wmax; w >= 2; w--)
        for (uint32_t tc = t < RKV_CHUNK_MAX ? t : RKV_CHUNK_MAX; tc >= 1; tc--)
            if ((*smem = plan_size(g, t, w, tc, false, a)) <= cap) {
                *nw = w;
                return 0;
            }
    return kvs_err_set(err, KVS_ENOTSUP,
                       "rotatekv: a section of %u tokens x %u channels "
                       "needs more shared memory than this device has (%zu bytes)",
                       t, g->C, lim);
}

extern "C" bool kvs__rotatekv_cuda_supported(const kvs_codec *c)
{
    const kvs_ns_spec *s = &c->spec;
    const uint32_t D = s->head_dim;
    if (!kvs_is_pow2(D) || D < 16 || D > 256 || c->bits < 2 || c->bits > 4 ||
        (s->dtype != KVS_DTYPE_FP16 && s->dtype != KVS_DTYPE_BF16) || s->block_tokens == 0 ||
        s->block_tokens > RKV_MAX_TOKENS || (uint64_t)s->kv_heads * D > RKV_MAX_CHANNELS)
        return false;
    /* The smallest plan (2 warps, 1-token chunks) fits every sm_80+ device. */
    rkv_geom g;
    geom_init(c, &g);
    rkv_args a;
    return plan_size(&g, s->block_tokens, 2, 1, false, &a) <= RKV_STREAM_BUDGET;
}

/* Uploads the key permutation of every layer (state validated by rkv_init: each layer a
 * permutation of 0..C-1) to the current device, through a private stream. */
extern "C" int kvs__rotatekv_cuda_prepare(kvs_codec *c, kvs_err *err)
{
    rkv_cuda *p = (rkv_cuda *)calloc(1, sizeof *p);
    if (!p)
        return kvs_err_set(err, KVS_ENOMEM, "rotatekv: out of memory");
    int rc = 0;
    cudaError_t ce = cudaGetDevice(&p->device);
    rkv_geom g;
    geom_init(c, &g);
    if (ce == cudaSuccess && g.perm) {
        const size_t n = (size_t)c->spec.layers * g.C;
        const uint8_t *d = (const uint8_t *)c->state.data + KVS_ROTATEKV_STATE_HEADER;
        uint16_t *h = (uint16_t *)malloc(n * sizeof *h);
        if (!h) {
            free(p);
            return kvs_err_set(err, KVS_ENOMEM, "rotatekv: out of memory");
        }
        for (size_t i = 0; i < n; i++)
            h[i] = (uint16_t)(d[2 * i] | d[2 * i + 1] << 8);
        cudaStream_t st = NULL;
        ce = cudaMalloc((void **)&p->perm, n * sizeof *h);
        if (ce == cudaSuccess)
            ce = cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking);
        if (ce == cudaSuccess)
            ce = cudaMemcpyAsync(p->perm, h, n * sizeof *h, cudaMemcpyHostToDevice, st);
        if (ce == cudaSuccess)
            ce = cudaStreamSynchronize(st);
        if (st)
            cudaStreamDestroy(st);
        free(h);
    }
    if (ce != cudaSuccess) {
        rc = kvs_err_set(err, KVS_EINTERNAL, "rotatekv: uploading the permutation: %s (%s)",
                         cudaGetErrorString(ce), cudaGetErrorName(ce));
        if (p->perm)
            cudaFree(p->perm);
        free(p);
        return rc;
    }
    KVS__CUDA_TAB(c) = p;
    return 0;
}

extern "C" void kvs__rotatekv_cuda_release(kvs_codec *c)
{
    rkv_cuda *p = (rkv_cuda *)KVS__CUDA_TAB(c);
    if (p && p->perm) {
        int cur = -1;
        bool other = cudaGetDevice(&cur) == cudaSuccess && cur != p->device;
        if (other)
            cudaSetDevice(p->device);
        cudaFree(p->perm);
        if (other)
            cudaSetDevice(cur);
    }
    free(p);
    KVS__CUDA_TAB(c) = NULL;
}

template <int N, int B>
static int launch(const kvs_codec *c, const kvs_cuda_sections *s, cudaStream_t st, bool encode,
                  const rkv_geom *g, rkv_args a, kvs_err *err)
{
    const uint32_t t = s->t;
    if (encode) {
        int dev = 0, lim = 0;
        KVS_CUDA_CHECK(cudaGetDevice(&dev), err);
        KVS_CUDA_CHECK(cudaDeviceGetAttribute(&lim, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
                       err);
        uint32_t nw;
        size_t smem;
        int rc = plan_encode(g, t, (size_t)lim, &a, &nw, &smem, err);
        if (rc)
            return rc;
        a.drow = kdiv_make(g->C / 8);
        /* the opt-in is per device and only grows: set it when this launch needs more */
        static std::atomic<int> opted[RKV_DEVICES];
        if (smem > (48u << 10) && (dev < 0 || dev >= RKV_DEVICES || opted[dev] < (int)smem)) {
            KVS_CUDA_CHECK(cudaFuncSetAttribute(rkv_encode_kernel<N, B>,
                                                cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                (int)smem),
                           err);
            if (dev >= 0 && dev < RKV_DEVICES && opted[dev] < (int)smem)
                opted[dev] = (int)smem;
        }
        const size_t sec_elems = (size_t)t * g->C;
        return kvs_cuda_each_launch(s, RKV_MAX_ITEMS, sec_elems,
                                    [&](const kvs_cuda_sections &p, uint32_t s0) {
                                        rkv_args b = a;
                                        b.raw = p.raw;
                                        b.enc_out = p.enc_out;
                                        b.layer = p.layer;
                                        b.len_out = p.len_out;
                                        b.sec0 = s0;
                                        b.n = p.n;
                                        rkv_encode_kernel<N, B><<<p.n, nw * 32, smem, st>>>(b);
                                        KVS_CUDA_CHECK(cudaGetLastError(), err);
                                        return 0;
                                    });
    }
    uint32_t wpb = RKV_THREADS / 32;
    size_t smem = 0;
    if (g->perm) { /* one scatter buffer of C floats per warp */
        const uint32_t fit = RKV_DECODE_SMEM / (4 * g->C);
        wpb = fit < wpb ? fit : wpb;
        a.area = 4 * g->C;
        smem = (size_t)wpb * a.area;
    }
    a.dt = kdiv_make(t);
    const uint32_t chunk = RKV_MAX_ITEMS / t; /* sections per launch: warps < 2^31 */
    const size_t sec_elems = (size_t)t * g->C;
    return kvs_cuda_each_launch(s, chunk, sec_elems, [&](const kvs_cuda_sections &p, uint32_t s0) {
        rkv_args b = a;
        b.raw_out = p.raw_out;
        b.enc = p.enc;
        b.layer = p.layer;
        b.len = p.len;
        b.sec0 = s0;
        b.n = p.n;
        b.nwarps = p.n * t;
        const uint32_t blocks = (b.nwarps + wpb - 1) / wpb;
        rkv_decode_kernel<N, B><<<blocks, wpb * 32, smem, st>>>(b);
        KVS_CUDA_CHECK(cudaGetLastError(), err);
        return 0;
    });
}

template <int N>
static int dispatch_bits(const kvs_codec *c, const kvs_cuda_sections *s, cudaStream_t st,
                         bool encode, const rkv_geom *g, const rkv_args &a, kvs_err *err)
{
    switch (c->bits) {
    case 2:
        return launch<N, 2>(c, s, st, encode, g, a, err);
    case 3:
        return launch<N, 3>(c, s, st, encode, g, a, err);
    case 4:
        return launch<N, 4>(c, s, st, encode, g, a, err);
    default:
        break;
    }
    return kvs_err_set(err, KVS_ENOTSUP, "rotatekv: no CUDA kernels for %u bits", c->bits);
}

static int run(const kvs_codec *c, const kvs_cuda_sections *s, void *stream, bool encode,
               kvs_err *err)
{
    const rkv_cuda *pc = (const rkv_cuda *)KVS__CUDA_TAB(c);
    const void *raw = encode ? (const void *)s->raw : (const void *)s->raw_out;
    if (((uintptr_t)raw & 15) != 0)
        return kvs_err_set(err, KVS_EINVAL, "rotatekv: raw device pointer %p not 16-byte aligned",
                           raw);
    rkv_geom g;
    geom_init(c, &g);
    /* The kernels' record geometry must be the reference's (section_max = its formula). */
    const uint32_t cap = s->t < KVS_ROTATEKV_MAX_SINKS ? s->t : KVS_ROTATEKV_MAX_SINKS;
    const size_t smax = (size_t)(s->t - cap) * g.rec + (size_t)cap * (2 + 2 * (size_t)g.C);
    if (smax != kvs_codec_section_max(c, s->t))
        return kvs_err_set(err, KVS_EINTERNAL,
                           "rotatekv: kernel geometry (%zu bytes for %u "
                           "tokens) disagrees with the reference (%zu)",
                           smax, s->t, kvs_codec_section_max(c, s->t));
    if (g.perm) {
        int dev = -1;
        KVS_CUDA_CHECK(cudaGetDevice(&dev), err);
        if (dev != pc->device)
            return kvs_err_set(err, KVS_EINVAL,
                               "rotatekv: codec prepared on device %d, "
                               "launched on device %d",
                               pc->device, dev);
    }
    rkv_args a;
    memset(&a, 0, sizeof a);
    a.bad = s->bad;
    a.perm = g.perm ? pc->perm : NULL;
    a.stride = s->stride;
    a.t = s->t;
    a.C = g.C;
    a.L = c->spec.layers;
    a.gs_shift = g.gs_shift;
    a.ngroups = g.ngroups;
    a.cbytes = g.cbytes;
    a.rec = g.rec;
    a.clip = KVS_ROTATEKV_CLIP(c->bits);
    a.fscale = kvs_fwht_scale(g.N);
    a.bf16 = c->spec.dtype == KVS_DTYPE_BF16;
    cudaStream_t st = (cudaStream_t)stream;
    switch (g.N) {
    case 16:
        return dispatch_bits<16>(c, s, st, encode, &g, a, err);
    case 32:
        return dispatch_bits<32>(c, s, st, encode, &g, a, err);
    case 64:
        return dispatch_bits<64>(c, s, st, encode, &g, a, err);
    case 128:
        return dispatch_bits<128>(c, s, st, encode, &g, a, err);
    case 256:
        return dispatch_bits<256>(c, s, st, encode, &g, a, err);
    case 512:
        return dispatch_bits<512>(c, s, st, encode, &g, a, err);
    case 1024:
        return dispatch_bits<1024>(c, s, st, encode, &g, a, err);
    default:
        break;
    }
    return kvs_err_set(err, KVS_ENOTSUP, "rotatekv: no CUDA kernels for a %u-point rotation", g.N);
}

extern "C" int kvs__rotatekv_encode_cuda(const kvs_codec *c, const kvs_cuda_sections *s,
                                         void *stream, kvs_err *err)
{
    return run(c, s, stream, true, err);
}

extern "C" int kvs__rotatekv_decode_cuda(const kvs_codec *c, const kvs_cuda_sections *s,
                                         void *stream, kvs_err *err)
{
    return run(c, s, stream, false, err);
}
