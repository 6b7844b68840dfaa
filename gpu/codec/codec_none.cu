/* CUDA kernels of `none` (codec_none.c is the reference: a section is its t*H*D input
 * elements, unchanged). Batch contract: gpu/codec_cuda.h.
 *
 * One thread per 8 elements (16 bytes) of the launch: a 16-byte load and store when the
 * section start and the stride allow it (the engine's staging and the GPU tier's slots
 * do), 4-byte pieces otherwise (a caller's stride need not be a multiple of 16). Encode
 * also checks its 8 elements for NaN/Inf and records the smallest flat index with
 * atomicMin, as the other kernels do; the output is written either way (the host redoes
 * a flagged batch on the CPU). Nothing depends on the layout beyond D being a multiple
 * of 8, so every layout is supported; the dtype does not matter except for the check.
 */
#include <cuda_runtime.h>
#include <stdint.h>

#include "gpu/base/cuda_try.h"
#include "gpu/codec/codec_int.h"
#include "gpu/codec/cuda_util.cuh"

#define NONE_THREADS 256

typedef struct none_args {
    const uint8_t *src; /* encode: raw; decode: enc */
    uint8_t *dst;
    size_t src_stride, dst_stride; /* bytes between sections */
    size_t sec_bytes;              /* t*H*D*2 */
    uint32_t per_sec;              /* 16-byte items per section */
    unsigned long long total;      /* items in the launch */
    unsigned long long *bad;       /* encode only */
    uint16_t mask;                 /* exponent mask of the dtype (encode) */
    bool wide;                     /* 16-byte accesses are aligned everywhere */
} none_args;

static __global__ void __launch_bounds__(NONE_THREADS) none_kernel(none_args a)
{
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
         i < a.total; i += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned long long sec = i / a.per_sec;
        size_t off = (size_t)(i - sec * a.per_sec) * 16;
        const uint8_t *s = a.src + sec * a.src_stride + off;
        uint8_t *d = a.dst + sec * a.dst_stride + off;
        uint32_t w[4];
        if (a.wide) {
            uint4 v = *(const uint4 *)s;
            *(uint4 *)d = v;
            w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
        } else {
#pragma unroll
            for (int k = 0; k < 4; k++) {
                w[k] = ld_u32(s + 4 * k);
                st_u32(d + 4 * k, w[k]);
            }
        }
        if (a.bad) {
#pragma unroll
            for (int k = 0; k < 8; k++) {
                uint32_t u = k & 1 ? w[k / 2] >> 16 : w[k / 2] & 0xFFFF;
                if ((u & a.mask) == a.mask) {
                    /* Flat element index over the launch's n*t*H*D inputs. */
                    atomicMin(a.bad, (unsigned long long)(sec * (a.sec_bytes / 2) + off / 2 + k));
                    break;
                }
            }
        }
    }
}

static int launch(const kvs_codec *c, const kvs_cuda_sections *s, bool encode, void *stream,
                  kvs_err *err)
{
    const kvs_ns_spec *sp = kvs_codec_spec(c);
    size_t sec_bytes = (size_t)s->t * sp->kv_heads * sp->head_dim * 2;
    none_args a;
    a.src = encode ? (const uint8_t *)s->raw : s->enc;
    a.dst = encode ? s->enc_out : (uint8_t *)s->raw_out;
    a.src_stride = encode ? sec_bytes : s->stride;
    a.dst_stride = encode ? s->stride : sec_bytes;
    a.sec_bytes = sec_bytes;
    a.per_sec = (uint32_t)(sec_bytes / 16);
    a.total = (unsigned long long)s->n * a.per_sec;
    a.bad = encode ? s->bad : NULL;
    a.mask = sp->dtype == KVS_DTYPE_BF16 ? 0x7F80 : 0x7C00;
    a.wide = ((uintptr_t)a.src % 16 == 0) && ((uintptr_t)a.dst % 16 == 0) && s->stride % 16 == 0;
    unsigned long long blocks = (a.total + NONE_THREADS - 1) / NONE_THREADS;
    unsigned grid = blocks > 65535ull * 32 ? 65535u * 32 : (unsigned)blocks;
    none_kernel<<<grid, NONE_THREADS, 0, (cudaStream_t)stream>>>(a);
    KVS_CUDA_CHECK(cudaGetLastError(), err);
    return 0;
}

int kvs__none_encode_cuda(const kvs_codec *c, const kvs_cuda_sections *s, void *stream,
                          kvs_err *err)
{
    return launch(c, s, true, stream, err);
}

int kvs__none_decode_cuda(const kvs_codec *c, const kvs_cuda_sections *s, void *stream,
                          kvs_err *err)
{
    return launch(c, s, false, stream, err);
}
