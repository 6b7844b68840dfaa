/* Device helpers shared by the codec kernels (gpu/codec/codec_<name>.cu): fast division by
 * a run-time constant for index math, reading and writing the namespace dtype exactly as
 * the CPU side does (gpu/half.h, gpu/codec.c's decode saturation), and 32-bit loads and
 * stores at any byte alignment (encoded sections may start anywhere), and the `bad` word
 * update of the NaN/Inf contract (gpu/codec/codec_cuda.h), and the one loop that splits a
 * batch into launches (kvs_cuda_each_launch). CUDA C++ only. */
#ifndef KVS_CUDA_UTIL_CUH
#define KVS_CUDA_UTIL_CUH

#include <cuda_fp16.h>
#include <stdint.h>

#include "gpu/codec/codec_cuda.h"
#include "gpu/codec/half.h"

/* Division by a run-time constant with a multiply and a shift, exact for x < 2^31
 * (CUTLASS's FastDivmod: m = ceil(2^(31+l) / d), l = ceil(log2 d)). */
typedef struct kdiv {
    uint32_t d, mul, shr;
} kdiv;

static inline kdiv kdiv_make(uint32_t d)
{
    kdiv k = {d, 0, 0};
    if (d != 1) {
        unsigned l = 0;
        while ((1ull << l) < d)
            l++;
        k.mul = (uint32_t)(((1ull << (31 + l)) + d - 1) / d);
        k.shr = l - 1;
    }
    return k;
}

static __device__ __forceinline__ uint32_t kdiv_q(uint32_t x, kdiv k)
{
    return k.d == 1 ? x : __umulhi(x, k.mul) >> k.shr;
}

template <bool BF16> static __device__ __forceinline__ float in_val(uint32_t u16)
{
    return BF16 ? __uint_as_float(u16 << 16) : __half2float(__ushort_as_half((uint16_t)u16));
}

template <bool BF16> static __device__ __forceinline__ bool nonfinite(uint32_t u16)
{
    const uint32_t mask = BF16 ? 0x7F80 : 0x7C00;
    return (u16 & mask) == mask;
}

/* The namespace dtype from the fp32 decode, saturated as kvs_codec_decode does (|x| >=
 * 65504 becomes +-65504 for fp16, NaN included). The saturated value is finite, where
 * cvt.rn.f16.f32 and kvs_f32_to_fp16 agree bit for bit; bf16 keeps kvs_f32_to_bf16 for
 * its NaN bits. */
template <bool BF16> static __device__ __forceinline__ uint32_t out_val(float x)
{
    if (BF16)
        return kvs_f32_to_bf16(x);
    float v = fabsf(x) < 65504.0f ? x : (x < 0 ? -65504.0f : 65504.0f);
    return __half_as_ushort(__float2half_rn(v));
}

static __device__ __forceinline__ uint32_t ld_u32(const uint8_t *p)
{
    if (((uintptr_t)p & 3) == 0)
        return *(const uint32_t *)p;
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static __device__ __forceinline__ void st_u32(uint8_t *p, uint32_t v)
{
    if (((uintptr_t)p & 3) == 0) {
        *(uint32_t *)p = v;
    } else {
        p[0] = (uint8_t)v;
        p[1] = (uint8_t)(v >> 8);
        p[2] = (uint8_t)(v >> 16);
        p[3] = (uint8_t)(v >> 24);
    }
}

static __device__ __forceinline__ bool fp16_inf(uint16_t h)
{
    return (h & 0x7FFF) == 0x7C00;
}

/* n <= 16 bytes at p, any alignment, to/from little-endian words (zero beyond n). */
static __device__ __forceinline__ void ld_bytes(const uint8_t *p, unsigned n, uint32_t w[4])
{
    bool al = ((uintptr_t)p & 3) == 0;
#pragma unroll
    for (unsigned i = 0; i < 4; i++) {
        w[i] = 0;
        if (al && 4 * i + 4 <= n) {
            w[i] = *(const uint32_t *)(p + 4 * i);
        } else {
#pragma unroll
            for (unsigned k = 0; k < 4; k++)
                if (4 * i + k < n)
                    w[i] |= (uint32_t)p[4 * i + k] << (8 * k);
        }
    }
}

static __device__ __forceinline__ void st_bytes(uint8_t *p, unsigned n, const uint32_t w[4])
{
    bool al = ((uintptr_t)p & 3) == 0;
#pragma unroll
    for (unsigned i = 0; i < 4; i++) {
        if (al && 4 * i + 4 <= n) {
            *(uint32_t *)(p + 4 * i) = w[i];
        } else {
#pragma unroll
            for (unsigned k = 0; k < 4; k++)
                if (4 * i + k < n)
                    p[4 * i + k] = (uint8_t)(w[i] >> (8 * k));
        }
    }
}

static __device__ __forceinline__ void flag(unsigned long long *bad, unsigned long long i)
{
    if (bad)
        atomicMin(bad, i);
}

/* The launchers' one chunked-launch loop: a batch of s->n sections goes out in launches of
 * at most per_launch sections (so that a launch's work-item indices and grid stay below
 * 2^31), launch(part, s0) for each: part is s with n the launch's count and every
 * per-section pointer (raw, raw_out: sec_elems elements a section; enc, enc_out: stride
 * bytes; layer, len, len_out: one entry) advanced to section s0, the batch index of the
 * launch's first section (`bad` stays an index over the whole batch: kernels add s0).
 * Returns launch's first failure, else 0. */
template <typename F>
static int kvs_cuda_each_launch(const kvs_cuda_sections *s, uint32_t per_launch, size_t sec_elems,
                                F launch)
{
    if (per_launch == 0)
        per_launch = 1;
    for (uint32_t s0 = 0; s0 < s->n; s0 += per_launch) {
        kvs_cuda_sections part = *s;
        part.n = s->n - s0 < per_launch ? s->n - s0 : per_launch;
        part.raw = s->raw ? s->raw + s0 * sec_elems : NULL;
        part.raw_out = s->raw_out ? s->raw_out + s0 * sec_elems : NULL;
        part.enc = s->enc ? s->enc + s0 * s->stride : NULL;
        part.enc_out = s->enc_out ? s->enc_out + s0 * s->stride : NULL;
        part.layer = s->layer ? s->layer + s0 : NULL;
        part.len = s->len ? s->len + s0 : NULL;
        part.len_out = s->len_out ? s->len_out + s0 : NULL;
        int rc = launch(part, s0);
        if (rc)
            return rc;
    }
    return 0;
}

#endif
