/* CUDA kernels of `kivi-2`, `kivi-3`, `kivi-4` (codec_kivi.c is the reference and documents
 * the section layout; quantizers-reference.md §9.3) and of SQuat's decode, whose bytes are
 * KIVI bytes. Batch contract: gpu/codec_cuda.h.
 *
 * Every kernel computes what the reference computes, in the same order where it rounds:
 * min and max of a group are scanned in token (keys) or channel (values) order by one
 * thread, exactly as quant_group does (this matters for -0 against +0: the first of equal
 * values wins), and the parameters, codes and decoded values come from the same KVS_HD
 * functions (gpu/quant.h, gpu/codec/half.h) with IEEE division and no contraction (--fmad=false).
 *
 * Thread mapping (one launch covers up to 2^31 work items; larger batches are split):
 *  - keys, encode and decode: one thread per (section, token group, head, channel pair).
 *    A warp covers 64 consecutive channels, so every token row is one coalesced 128-byte
 *    access (u32 per thread); the thread keeps its group's G <= 32 token pairs in
 *    registers, scans both channels, and writes each channel's k_grp code bytes and its
 *    (scale, lo) word. Decode mirrors it: two code rows and two parameter words in, G
 *    u32 stores out.
 *  - values, encode: one thread per 32-channel group (64 bytes of input, four 16-byte
 *    loads): the group's codes are exactly `bits` whole words, packed at compile-time bit
 *    positions, and one parameter word.
 *  - values, decode: one thread per 8 consecutive elements (one 16-byte store): `bits`
 *    code bytes and one parameter word in.
 * Encoded bytes are read and written with the widest access their address allows (the
 * caller's stride need not be a multiple of 4); raw pointers must be 16-byte aligned.
 *
 * `bad`: encode records (atomicMin) the flat index over n*t*H*D of any NaN/Inf input.
 * It also records a group of finite values whose fp16 parameters would overflow (possible
 * only with bf16 input beyond +-65504), at the group's first element: the reference
 * rejects such a section (KVS_EINVAL "range beyond the fp16 group parameters") and the
 * kernels must not accept what it rejects; re-encoding the flagged section on the CPU
 * gives the exact error. (A group holding NaN/Inf is reported at that element only.)
 */
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

extern "C" {
#include "gpu/codec/codec_kivi.h" /* a C header without its own extern "C" block */
}
#include "gpu/base/cuda_try.h"
#include "gpu/codec/cuda_util.cuh"
#include "gpu/codec/bitpack.h"
#include "gpu/codec/half.h"
#include "gpu/codec/quant.h"

#define KIVI_THREADS 256
#define KIVI_MAX_ITEMS 0x7FFFFFFFu /* work items of one launch: indices stay below 2^31 */

/* ---------------------------------------------------------------- helpers */

/* Element c (0: low half) of a pair of raw elements. */
template <bool BF16> static __device__ __forceinline__ float in_pair(uint32_t x, int c)
{
    return in_val<BF16>(c ? x >> 16 : x & 0xFFFF);
}

template <bool BF16> static __device__ __forceinline__ bool nonfinite_pair(uint32_t x)
{
    return nonfinite<BF16>(x & 0xFFFF) | nonfinite<BF16>(x >> 16);
}

/* Code k of a group packed LSB first at B bits (gpu/codec/bitpack.h) into / out of words. */
template <unsigned B>
static __device__ __forceinline__ void put_code(uint32_t *w, int k, uint32_t q)
{
    const int bit = k * (int)B, wi = bit / 32, sh = bit % 32;
    w[wi] |= q << sh;
    if (sh + (int)B > 32)
        w[wi + 1] |= q >> (32 - sh);
}

template <unsigned B> static __device__ __forceinline__ uint32_t get_code(const uint32_t *w, int k)
{
    const int bit = k * (int)B, wi = bit / 32, sh = bit % 32;
    uint32_t v = w[wi] >> sh;
    if (sh + (int)B > 32)
        v |= w[wi + 1] << (32 - sh);
    return v & ((1u << B) - 1);
}

/* NW words to p with the widest stores its alignment allows. */
template <int NW> static __device__ __forceinline__ void st_words(uint8_t *p, const uint32_t *w)
{
    uintptr_t a = (uintptr_t)p;
    if (NW % 4 == 0 && (a & 15) == 0) {
#pragma unroll
        for (int i = 0; i < NW; i += 4)
            *(uint4 *)(p + 4 * i) = make_uint4(w[i], w[i + 1], w[i + 2], w[i + 3]);
    } else if (NW % 2 == 0 && (a & 7) == 0) {
#pragma unroll
        for (int i = 0; i < NW; i += 2)
            *(uint2 *)(p + 4 * i) = make_uint2(w[i], w[i + 1]);
    } else if ((a & 3) == 0) {
#pragma unroll
        for (int i = 0; i < NW; i++)
            *(uint32_t *)(p + 4 * i) = w[i];
    } else {
#pragma unroll
        for (int i = 0; i < 4 * NW; i++)
            p[i] = (uint8_t)(w[i / 4] >> (8 * (i % 4)));
    }
}

/* Parameter word as put_params writes it: fp16 scale in the low half, fp16 lo above. */
static __device__ __forceinline__ uint32_t par_word(kvs_minmax p)
{
    return (uint32_t)p.scale | (uint32_t)p.lo << 16;
}

static __device__ __forceinline__ kvs_minmax par_of(uint32_t w)
{
    kvs_minmax p;
    p.scale = (uint16_t)w;
    p.lo = (uint16_t)(w >> 16);
    return p;
}

/* ---------------------------------------------------------------- kernels */

typedef struct kivi_args {
    const uint16_t *raw; /* this launch's first section */
    uint16_t *raw_out;
    const uint8_t *enc;
    uint8_t *enc_out;
    size_t stride;
    unsigned long long *bad;
    unsigned long long sec0; /* batch index of this launch's first section (for `bad`) */
    uint32_t t, H;
    uint32_t per_sec, total; /* work items per section and in this launch */
    kdiv dsec;               /* by per_sec */
    kdiv dgrp;               /* keys: by H*D/2, the items of one token group */
    uint32_t gk, nk, k_grp;  /* keys geometry (kvs__kivi_geom) */
    size_t k_row, k_codes, v_codes;
} kivi_args;

/* Keys, one thread per (section, token group, head, channel pair). G >= gk bounds the
 * group's tokens at compile time (16 when gk <= 16: half the registers, more warps in
 * flight; the operations on the n tokens are the same). */
template <int D, unsigned B, bool BF16, int G>
static __global__ void __launch_bounds__(KIVI_THREADS) kivi_encode_keys_kernel(kivi_args a)
{
    uint32_t i = blockIdx.x * KIVI_THREADS + threadIdx.x;
    if (i >= a.total)
        return;
    uint32_t sec = kdiv_q(i, a.dsec), r = i - sec * a.per_sec;
    uint32_t gi = kdiv_q(r, a.dgrp), hp = r - gi * a.dgrp.d; /* hp: pair over [H][D/2] */
    uint32_t h = hp / (D / 2), j = 2 * (hp % (D / 2));
    uint32_t tok0 = gi * a.gk, n = min(a.gk, a.t - tok0), row32 = a.H * (D / 2);
    const uint32_t *src = (const uint32_t *)(a.raw + ((size_t)sec * a.t + tok0) * a.H * D) + hp;
    uint32_t x[G];
#pragma unroll
    for (int k = 0; k < G; k++)
        x[k] = (uint32_t)k < n ? src[(size_t)k * row32] : 0;

    unsigned long long first = ((a.sec0 + sec) * a.t + tok0) * a.H * D + (size_t)h * D + j;
    bool nf = false;
#pragma unroll
    for (int k = 0; k < G; k++)
        nf |= (uint32_t)k < n && nonfinite_pair<BF16>(x[k]);
    if (nf) { /* the smallest index of this thread: token order, then channel */
        for (int k = 0; k < G; k++) {
            if ((uint32_t)k >= n || !nonfinite_pair<BF16>(x[k]))
                continue;
            unsigned c = nonfinite<BF16>(x[k] & 0xFFFF) ? 0 : 1;
            flag(a.bad, first + (unsigned long long)k * a.H * D + c);
            break;
        }
    }

    uint8_t *base = a.enc_out + (size_t)sec * a.stride;
    unsigned nbytes = (unsigned)kvs_bitpack_bytes(n, B);
#pragma unroll
    for (int c = 0; c < 2; c++) {
        float mn = in_pair<BF16>(x[0], c), mx = mn;
#pragma unroll
        for (int k = 1; k < G; k++) {
            if ((uint32_t)k < n) {
                float v = in_pair<BF16>(x[k], c);
                mn = v < mn ? v : mn;
                mx = v > mx ? v : mx;
            }
        }
        kvs_minmax p = kvs_minmax_params(mn, mx, B);
        if (!nf && (fp16_inf(p.scale) || fp16_inf(p.lo))) /* finite input out of range */
            flag(a.bad, first + c);
        uint32_t w[4] = {0, 0, 0, 0};
#pragma unroll
        for (int k = 0; k < G; k++)
            if ((uint32_t)k < n)
                put_code<B>(w, k, kvs_minmax_code(p, in_pair<BF16>(x[k], c), B));
        size_t row = (size_t)h * D + j + c;
        st_bytes(base + row * a.k_row + (size_t)gi * a.k_grp, nbytes, w);
        st_u32(base + a.k_codes + (row * a.nk + gi) * 4, par_word(p));
    }
}

template <int D, unsigned B, bool BF16>
static __global__ void __launch_bounds__(KIVI_THREADS) kivi_decode_keys_kernel(kivi_args a)
{
    uint32_t i = blockIdx.x * KIVI_THREADS + threadIdx.x;
    if (i >= a.total)
        return;
    uint32_t sec = kdiv_q(i, a.dsec), r = i - sec * a.per_sec;
    uint32_t gi = kdiv_q(r, a.dgrp), hp = r - gi * a.dgrp.d;
    uint32_t h = hp / (D / 2), j = 2 * (hp % (D / 2));
    uint32_t tok0 = gi * a.gk, n = min(a.gk, a.t - tok0), row32 = a.H * (D / 2);
    const uint8_t *base = a.enc + (size_t)sec * a.stride;
    unsigned nbytes = (unsigned)kvs_bitpack_bytes(n, B);
    size_t row = (size_t)h * D + j;
    uint32_t w0[4], w1[4];
    ld_bytes(base + row * a.k_row + (size_t)gi * a.k_grp, nbytes, w0);
    ld_bytes(base + (row + 1) * a.k_row + (size_t)gi * a.k_grp, nbytes, w1);
    kvs_minmax p0 = par_of(ld_u32(base + a.k_codes + (row * a.nk + gi) * 4));
    kvs_minmax p1 = par_of(ld_u32(base + a.k_codes + ((row + 1) * a.nk + gi) * 4));
    uint32_t *dst = (uint32_t *)(a.raw_out + ((size_t)sec * a.t + tok0) * a.H * D) + hp;
#pragma unroll
    for (int k = 0; k < 32; k++) {
        if ((uint32_t)k < n) {
            uint32_t lo = out_val<BF16>(kvs_minmax_decode(p0, get_code<B>(w0, k)));
            uint32_t hi = out_val<BF16>(kvs_minmax_decode(p1, get_code<B>(w1, k)));
            dst[(size_t)k * row32] = lo | hi << 16;
        }
    }
}

/* Values, encode: one thread per 32-channel group = 32 consecutive raw elements (D is a
 * multiple of 32 here, so group g of the launch starts at element 32g). */
template <int D, unsigned B, bool BF16>
static __global__ void __launch_bounds__(KIVI_THREADS) kivi_encode_values_kernel(kivi_args a)
{
    uint32_t i = blockIdx.x * KIVI_THREADS + threadIdx.x;
    if (i >= a.total)
        return;
    uint32_t sec = kdiv_q(i, a.dsec), g = i - sec * a.per_sec; /* g = vec * nv + gi */
    const uint4 *src = (const uint4 *)(a.raw + (size_t)i * 32);
    uint32_t x[16];
#pragma unroll
    for (int k = 0; k < 4; k++) {
        uint4 v = src[k];
        x[4 * k] = v.x;
        x[4 * k + 1] = v.y;
        x[4 * k + 2] = v.z;
        x[4 * k + 3] = v.w;
    }
    unsigned long long first = a.sec0 * a.per_sec * 32ull + (unsigned long long)i * 32;
    bool nf = false;
#pragma unroll
    for (int k = 0; k < 16; k++)
        nf |= nonfinite_pair<BF16>(x[k]);
    if (nf) {
        for (int k = 0; k < 32; k++)
            if (nonfinite<BF16>(k & 1 ? x[k / 2] >> 16 : x[k / 2] & 0xFFFF)) {
                flag(a.bad, first + k);
                break;
            }
    }
    float mn = in_pair<BF16>(x[0], 0), mx = mn;
#pragma unroll
    for (int k = 1; k < 32; k++) {
        float v = in_pair<BF16>(x[k / 2], k & 1);
        mn = v < mn ? v : mn;
        mx = v > mx ? v : mx;
    }
    kvs_minmax p = kvs_minmax_params(mn, mx, B);
    if (!nf && (fp16_inf(p.scale) || fp16_inf(p.lo))) /* finite input out of range */
        flag(a.bad, first);
    uint32_t w[B];
#pragma unroll
    for (int k = 0; k < (int)B; k++)
        w[k] = 0;
#pragma unroll
    for (int k = 0; k < 32; k++)
        put_code<B>(w, k, kvs_minmax_code(p, in_pair<BF16>(x[k / 2], k & 1), B));
    uint8_t *base = a.enc_out + (size_t)sec * a.stride;
    st_words<B>(base + (size_t)g * (4 * B), w); /* vec * v_row + gi * 4B */
    st_u32(base + a.v_codes + (size_t)g * 4, par_word(p));
}

/* Values, decode: one thread per 8 consecutive elements (B code bytes, one 16-byte store). */
template <int D, unsigned B, bool BF16>
static __global__ void __launch_bounds__(KIVI_THREADS) kivi_decode_values_kernel(kivi_args a)
{
    uint32_t i = blockIdx.x * KIVI_THREADS + threadIdx.x;
    if (i >= a.total)
        return;
    uint32_t sec = kdiv_q(i, a.dsec), w8 = i - sec * a.per_sec;
    uint32_t vec = w8 / (D / 8), c8 = w8 % (D / 8);
    const uint8_t *base = a.enc + (size_t)sec * a.stride;
    const uint8_t *cp = base + (size_t)vec * (D * B / 8) + c8 * B;
    uint32_t bits;
    if (B == 4 && ((uintptr_t)cp & 3) == 0)
        bits = *(const uint32_t *)cp;
    else if (B == 2 && ((uintptr_t)cp & 1) == 0)
        bits = *(const uint16_t *)cp;
    else {
        bits = 0;
#pragma unroll
        for (unsigned k = 0; k < B; k++)
            bits |= (uint32_t)cp[k] << (8 * k);
    }
    kvs_minmax p = par_of(ld_u32(base + a.v_codes + ((size_t)vec * (D / 32) + c8 / 4) * 4));
    uint32_t o[8];
#pragma unroll
    for (int k = 0; k < 8; k++)
        o[k] = out_val<BF16>(kvs_minmax_decode(p, (bits >> (k * B)) & ((1u << B) - 1)));
    *(uint4 *)(a.raw_out + (size_t)i * 8) =
        make_uint4(o[0] | o[1] << 16, o[2] | o[3] << 16, o[4] | o[5] << 16, o[6] | o[7] << 16);
}

/* ---------------------------------------------------------------- launchers */

template <int D, unsigned B, bool BF16>
static int launch(const kvs_codec *c, const kvs_cuda_sections *s, cudaStream_t st, bool encode,
                  kvs_err *err)
{
    kvs__kivi_geom g;
    kvs__kivi_geom_init(&g, s->t, c->spec.kv_heads, D, B);
    bool keys = c->kv == KVS_KEYS;
    uint32_t per_sec = keys ? g.nk * g.heads * (D / 2)
                            : (encode ? s->t * g.heads * (D / 32) : s->t * g.heads * (D / 8));
    uint32_t chunk = KIVI_MAX_ITEMS / per_sec; /* sections per launch */
    size_t sec_elems = (size_t)s->t * g.heads * D;
    return kvs_cuda_each_launch(s, chunk, sec_elems, [&](const kvs_cuda_sections &p, uint32_t s0) {
        kivi_args a;
        a.raw = p.raw;
        a.raw_out = p.raw_out;
        a.enc = p.enc;
        a.enc_out = p.enc_out;
        a.stride = s->stride;
        a.bad = s->bad;
        a.sec0 = s0;
        a.t = s->t;
        a.H = g.heads;
        a.per_sec = per_sec;
        a.total = p.n * per_sec;
        a.dsec = kdiv_make(per_sec);
        a.dgrp = kdiv_make(g.heads * (D / 2));
        a.gk = g.gk;
        a.nk = g.nk;
        a.k_grp = (uint32_t)g.k_grp;
        a.k_row = g.k_row;
        a.k_codes = g.k_codes;
        a.v_codes = g.v_codes;
        unsigned blocks = (a.total + KIVI_THREADS - 1) / KIVI_THREADS;
        if (keys && encode && g.gk <= 16)
            kivi_encode_keys_kernel<D, B, BF16, 16><<<blocks, KIVI_THREADS, 0, st>>>(a);
        else if (keys && encode)
            kivi_encode_keys_kernel<D, B, BF16, 32><<<blocks, KIVI_THREADS, 0, st>>>(a);
        else if (keys)
            kivi_decode_keys_kernel<D, B, BF16><<<blocks, KIVI_THREADS, 0, st>>>(a);
        else if (encode)
            kivi_encode_values_kernel<D, B, BF16><<<blocks, KIVI_THREADS, 0, st>>>(a);
        else
            kivi_decode_values_kernel<D, B, BF16><<<blocks, KIVI_THREADS, 0, st>>>(a);
        KVS_CUDA_CHECK(cudaGetLastError(), err);
        return 0;
    });
}

template <int D>
static int dispatch_bits(const kvs_codec *c, const kvs_cuda_sections *s, cudaStream_t st,
                         bool encode, kvs_err *err)
{
    bool bf16 = c->spec.dtype == KVS_DTYPE_BF16;
    switch (c->bits) {
    case 2:
        return bf16 ? launch<D, 2, true>(c, s, st, encode, err)
                    : launch<D, 2, false>(c, s, st, encode, err);
    case 3:
        return bf16 ? launch<D, 3, true>(c, s, st, encode, err)
                    : launch<D, 3, false>(c, s, st, encode, err);
    case 4:
        return bf16 ? launch<D, 4, true>(c, s, st, encode, err)
                    : launch<D, 4, false>(c, s, st, encode, err);
    default:
        break;
    }
    return kvs_err_set(err, KVS_ENOTSUP, "kivi: no CUDA kernels for %u bits", c->bits);
}

static int run(const kvs_codec *c, const kvs_cuda_sections *s, void *stream, bool encode,
               kvs_err *err)
{
    const void *raw = encode ? (const void *)s->raw : (const void *)s->raw_out;
    if (((uintptr_t)raw & 15) != 0)
        return kvs_err_set(err, KVS_EINVAL, "kivi: raw device pointer %p not 16-byte aligned", raw);
    cudaStream_t st = (cudaStream_t)stream;
    switch (c->spec.head_dim) {
    case 64:
        return dispatch_bits<64>(c, s, st, encode, err);
    case 128:
        return dispatch_bits<128>(c, s, st, encode, err);
    case 256:
        return dispatch_bits<256>(c, s, st, encode, err);
    default:
        break;
    }
    return kvs_err_set(err, KVS_ENOTSUP, "kivi: no CUDA kernels for head_dim %u", c->spec.head_dim);
}

extern "C" bool kvs__kivi_cuda_supported(const kvs_codec *c)
{
    uint32_t D = c->spec.head_dim;
    /* Work items of one section (at most t*H*D/8) must stay below 2^31. */
    return (D == 64 || D == 128 || D == 256) && c->bits >= 2 && c->bits <= 4 &&
           (uint64_t)c->spec.block_tokens * c->spec.kv_heads * D / 8 < KIVI_MAX_ITEMS;
}

extern "C" int kvs__kivi_encode_cuda(const kvs_codec *c, const kvs_cuda_sections *s, void *stream,
                                     kvs_err *err)
{
    return run(c, s, stream, true, err);
}

extern "C" int kvs__kivi_decode_cuda(const kvs_codec *c, const kvs_cuda_sections *s, void *stream,
                                     kvs_err *err)
{
    return run(c, s, stream, false, err);
}
