/* CUDA kernels of `fp8` (codec_fp8.c is the reference and documents the section layout:
 * H fp32 scales, then the e4m3fn codes in the input order [t][H][D]). Batch contract:
 * gpu/codec_cuda.h.
 *
 * Encode: one CTA per (section, head). Pass 1 reads the head's t*D values (16-byte loads
 * of 8 channels, a warp covering whole rows) for max|x| (a max is exact in any order) and
 * NaN/Inf; a warp-shuffle and shared-memory reduction gives the CTA's amax and scale =
 * amax / 448, as the reference. Pass 2 writes kvs_f32_to_fp8(x / scale), 8 codes per
 * store, from the values kept in registers (a thread's first FP8_KEEP chunks; the head's
 * whole tile at t*D <= 4096) or read again (from L1/L2) beyond them; a zero head gets
 * scale 0 and codes 0.
 * Decode: one thread per 8 consecutive elements: 8 code bytes and the head's scale in, one
 * 16-byte store out, fp8_value(code) * scale (one multiply), saturated as
 * kvs_codec_decode does.
 * Nothing depends on head_dim beyond D being a multiple of 8 (the namespace spec makes it
 * a multiple of 16), so every layout is supported and D is a run-time value.
 *
 * Encoded bytes are read and written with the widest access their address allows (4H and
 * the caller's stride need not be multiples of 8); raw pointers must be 16-byte aligned.
 * `bad`: encode records (atomicMin) the flat index over n*t*H*D of any NaN/Inf input.
 */
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "gpu/base/cuda_try.h"
#include "gpu/codec/cuda_util.cuh"
#include "gpu/codec/codec_int.h"
#include "gpu/codec/half.h"

#define FP8_THREADS 256
#define FP8_MAX_ITEMS 0x7FFFFFFFu /* work items (or CTAs) of one launch: below 2^31 */

/* ---------------------------------------------------------------- helpers */

/* Element k (0..7) of 8 raw elements held as 4 words. */
static __device__ __forceinline__ uint32_t elem(const uint32_t *x, int k)
{
    return k & 1 ? x[k / 2] >> 16 : x[k / 2] & 0xFFFF;
}

static __device__ __forceinline__ uint2 ld8(const uint8_t *p)
{
    if (((uintptr_t)p & 7) == 0)
        return *(const uint2 *)p;
    return make_uint2(ld_u32(p), ld_u32(p + 4));
}

static __device__ __forceinline__ void st8(uint8_t *p, uint2 v)
{
    if (((uintptr_t)p & 7) == 0) {
        *(uint2 *)p = v;
    } else {
        st_u32(p, v.x);
        st_u32(p + 4, v.y);
    }
}

/* ---------------------------------------------------------------- kernels */

typedef struct fp8_args {
    const uint16_t *raw; /* this launch's first section */
    uint16_t *raw_out;
    const uint8_t *enc;
    uint8_t *enc_out;
    size_t stride;
    unsigned long long *bad;
    unsigned long long sec0; /* batch index of this launch's first section (for `bad`) */
    uint32_t t, H, D;
    uint32_t per_sec, total; /* decode: 8-element items per section and in this launch */
    kdiv dsec;               /* by per_sec */
    kdiv drow;               /* by D/8: 8-element chunk -> (token, head) row */
    kdiv dH;                 /* by H */
} fp8_args;

/* Pass 1 on one chunk of 8 values: max|x| (exact in any order) and NaN/Inf. */
template <bool BF16> static __device__ __forceinline__ void fp8_scan(uint4 v, float *amax, bool *nf)
{
    uint32_t x[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 8; k++) {
        uint32_t u = elem(x, k);
        *amax = fmaxf(*amax, fabsf(in_val<BF16>(u)));
        *nf |= nonfinite<BF16>(u);
    }
}

/* Pass 2 on one chunk: 8 codes, one 8-byte store. */
template <bool BF16>
static __device__ __forceinline__ void fp8_codes(uint4 v, float scale, uint8_t *dst)
{
    uint32_t x[4] = {v.x, v.y, v.z, v.w};
    uint32_t q[2] = {0, 0};
#pragma unroll
    for (int k = 0; k < 8; k++) {
        uint32_t b = scale == 0.0f ? 0 : kvs_f32_to_fp8(in_val<BF16>(elem(x, k)) / scale);
        q[k / 4] |= b << (8 * (k % 4));
    }
    st8(dst, make_uint2(q[0], q[1]));
}

/* One CTA per (section, head): blockIdx.x = section * H + head. A thread's first
 * FP8_KEEP chunks stay in registers between the passes (all of them when t*D <=
 * FP8_KEEP * 8 * blockDim.x, e.g. t = 16, D = 128: one chunk per thread); later chunks
 * are read again (from L1/L2). Each thread visits its chunks in the same order in both
 * passes either way. */
#define FP8_KEEP 2
template <bool BF16>
static __global__ void __launch_bounds__(FP8_THREADS) fp8_encode_kernel(fp8_args a)
{
    __shared__ float warp_max[FP8_THREADS / 32];
    uint32_t sec = blockIdx.x / a.H, h = blockIdx.x - sec * a.H;
    uint32_t d8 = a.D / 8, chunks = a.t * d8;
    size_t hd = (size_t)a.H * a.D;
    const uint16_t *src = a.raw + (size_t)sec * a.t * hd + (size_t)h * a.D;

    uint4 keep[FP8_KEEP];
#pragma unroll
    for (int r = 0; r < FP8_KEEP; r++) {
        uint32_t c = threadIdx.x + r * blockDim.x;
        keep[r] = make_uint4(0, 0, 0, 0);
        if (c < chunks) {
            uint32_t tok = kdiv_q(c, a.drow), j8 = c - tok * d8;
            keep[r] = *(const uint4 *)(src + tok * hd + j8 * 8);
        }
    }
    float amax = 0.0f;
    bool nf = false;
#pragma unroll
    for (int r = 0; r < FP8_KEEP; r++)
        if (threadIdx.x + r * blockDim.x < chunks)
            fp8_scan<BF16>(keep[r], &amax, &nf);
    for (uint32_t c = threadIdx.x + FP8_KEEP * blockDim.x; c < chunks; c += blockDim.x) {
        uint32_t tok = kdiv_q(c, a.drow), j8 = c - tok * d8;
        fp8_scan<BF16>(*(const uint4 *)(src + tok * hd + j8 * 8), &amax, &nf);
    }
    if (nf && a.bad) { /* this thread's first NaN/Inf: its chunks come in index order */
        for (uint32_t c = threadIdx.x; c < chunks; c += blockDim.x) {
            uint32_t tok = kdiv_q(c, a.drow), j8 = c - tok * d8;
            uint4 v = *(const uint4 *)(src + tok * hd + j8 * 8);
            uint32_t x[4] = {v.x, v.y, v.z, v.w};
            int k = 0;
            while (k < 8 && !nonfinite<BF16>(elem(x, k)))
                k++;
            if (k < 8) {
                atomicMin(a.bad, ((a.sec0 + sec) * a.t + tok) * hd + (size_t)h * a.D + j8 * 8 + k);
                break;
            }
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, o));
    if ((threadIdx.x & 31) == 0)
        warp_max[threadIdx.x / 32] = amax;
    __syncthreads();
    amax = warp_max[0];
    for (unsigned w = 1; w < blockDim.x / 32; w++)
        amax = fmaxf(amax, warp_max[w]);
    float scale = amax / 448.0f;

    uint8_t *base = a.enc_out + (size_t)sec * a.stride;
    if (threadIdx.x == 0)
        st_u32(base + 4 * (size_t)h, __float_as_uint(scale));
    uint8_t *codes = base + 4 * (size_t)a.H + (size_t)h * a.D;
#pragma unroll
    for (int r = 0; r < FP8_KEEP; r++) {
        uint32_t c = threadIdx.x + r * blockDim.x;
        if (c < chunks) {
            uint32_t tok = kdiv_q(c, a.drow), j8 = c - tok * d8;
            fp8_codes<BF16>(keep[r], scale, codes + tok * hd + j8 * 8);
        }
    }
    for (uint32_t c = threadIdx.x + FP8_KEEP * blockDim.x; c < chunks; c += blockDim.x) {
        uint32_t tok = kdiv_q(c, a.drow), j8 = c - tok * d8;
        fp8_codes<BF16>(*(const uint4 *)(src + tok * hd + j8 * 8), scale,
                        codes + tok * hd + j8 * 8);
    }
}

/* One thread per 8 consecutive elements of the launch. */
template <bool BF16>
static __global__ void __launch_bounds__(FP8_THREADS) fp8_decode_kernel(fp8_args a)
{
    uint32_t i = blockIdx.x * FP8_THREADS + threadIdx.x;
    if (i >= a.total)
        return;
    uint32_t sec = kdiv_q(i, a.dsec), w8 = i - sec * a.per_sec;
    uint32_t row = kdiv_q(w8, a.drow), h = row - kdiv_q(row, a.dH) * a.H;
    const uint8_t *base = a.enc + (size_t)sec * a.stride;
    float scale = __uint_as_float(ld_u32(base + 4 * (size_t)h));
    uint2 c = ld8(base + 4 * (size_t)a.H + (size_t)w8 * 8);
    uint32_t o[8];
#pragma unroll
    for (int k = 0; k < 8; k++)
        o[k] =
            out_val<BF16>(kvs_fp8_to_f32((uint8_t)((k < 4 ? c.x : c.y) >> (8 * (k % 4)))) * scale);
    *(uint4 *)(a.raw_out + (size_t)i * 8) =
        make_uint4(o[0] | o[1] << 16, o[2] | o[3] << 16, o[4] | o[5] << 16, o[6] | o[7] << 16);
}

/* ---------------------------------------------------------------- launchers */

static int run(const kvs_codec *c, const kvs_cuda_sections *s, void *stream, bool encode,
               kvs_err *err)
{
    cudaStream_t st = (cudaStream_t)stream;
    bool bf16 = c->spec.dtype == KVS_DTYPE_BF16;
    uint32_t H = c->spec.kv_heads, D = c->spec.head_dim;
    const void *raw = encode ? (const void *)s->raw : (const void *)s->raw_out;
    if (((uintptr_t)raw & 15) != 0)
        return kvs_err_set(err, KVS_EINVAL, "fp8: raw device pointer %p not 16-byte aligned", raw);
    if (D % 8 != 0 || (uint64_t)s->t * H * D / 8 >= FP8_MAX_ITEMS)
        return kvs_err_set(err, KVS_ENOTSUP, "fp8: no CUDA kernels for %u x %u x %u sections", s->t,
                           H, D);
    uint32_t per_sec = encode ? H : s->t * H * (D / 8);
    uint32_t chunk = FP8_MAX_ITEMS / per_sec; /* sections per launch */
    size_t sec_elems = (size_t)s->t * H * D;
    /* Encode CTAs: enough warps for one head's chunks, at most FP8_THREADS. */
    uint32_t chunks = s->t * (D / 8), threads = (chunks + 31) / 32 * 32;
    threads = threads > FP8_THREADS ? FP8_THREADS : threads;
    return kvs_cuda_each_launch(s, chunk, sec_elems, [&](const kvs_cuda_sections &p, uint32_t s0) {
        fp8_args a;
        a.raw = p.raw;
        a.raw_out = p.raw_out;
        a.enc = p.enc;
        a.enc_out = p.enc_out;
        a.stride = s->stride;
        a.bad = s->bad;
        a.sec0 = s0;
        a.t = s->t;
        a.H = H;
        a.D = D;
        a.per_sec = per_sec;
        a.total = p.n * per_sec;
        a.dsec = kdiv_make(per_sec);
        a.drow = kdiv_make(D / 8);
        a.dH = kdiv_make(H);
        if (encode) {
            if (bf16)
                fp8_encode_kernel<true><<<a.total, threads, 0, st>>>(a);
            else
                fp8_encode_kernel<false><<<a.total, threads, 0, st>>>(a);
        } else {
            unsigned blocks = (a.total + FP8_THREADS - 1) / FP8_THREADS;
            if (bf16)
                fp8_decode_kernel<true><<<blocks, FP8_THREADS, 0, st>>>(a);
            else
                fp8_decode_kernel<false><<<blocks, FP8_THREADS, 0, st>>>(a);
        }
        KVS_CUDA_CHECK(cudaGetLastError(), err);
        return 0;
    });
}

extern "C" int kvs__fp8_encode_cuda(const kvs_codec *c, const kvs_cuda_sections *s, void *stream,
                                    kvs_err *err)
{
    return run(c, s, stream, true, err);
}

extern "C" int kvs__fp8_decode_cuda(const kvs_codec *c, const kvs_cuda_sections *s, void *stream,
                                    kvs_err *err)
{
    return run(c, s, stream, false, err);
}
