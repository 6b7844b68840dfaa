/* The error sums of a batch's sections on the device (contract: fidelity.h,
 * kvs_fidelity_section_sums_cuda; fidelity.c's kvs_fidelity_section_sums is the reference).
 *
 * One CTA per section: each thread sums its strided elements in double (the reference's
 * arithmetic: widened to float by the dtype, then to double), then the CTA reduces its
 * threads' sums in a fixed tree, so a section's result does not depend on scheduling; it
 * differs from the reference's sequential sum only by the order of the additions. A
 * section is t*H*D elements (16k for a Llama-3-8B-shaped 16-token block): a few loads per
 * thread, so the launch is bound by reading both buffers once.
 */
#include <cuda_runtime.h>
#include <stdint.h>

#include "gpu/base/cuda_try.h"
#include "gpu/codec/fidelity.h"
#include "gpu/codec/half.h"

#define SUMS_THREADS 256

static __device__ double widen(uint16_t h, bool bf16)
{
    return (double)(bf16 ? kvs_bf16_to_f32(h) : kvs_fp16_to_f32(h));
}

static __global__ void __launch_bounds__(SUMS_THREADS)
    sums_kernel(const uint16_t *__restrict__ ref, const uint16_t *__restrict__ dec, uint64_t sec,
                bool bf16, double *__restrict__ out)
{
    __shared__ double d2s[SUMS_THREADS], r2s[SUMS_THREADS];
    const uint16_t *r = ref + blockIdx.x * sec, *d = dec + blockIdx.x * sec;
    double d2 = 0, r2 = 0;
    for (uint64_t i = threadIdx.x; i < sec; i += SUMS_THREADS) {
        double rv = widen(r[i], bf16), dv = widen(d[i], bf16) - rv;
        d2 += dv * dv;
        r2 += rv * rv;
    }
    d2s[threadIdx.x] = d2;
    r2s[threadIdx.x] = r2;
    __syncthreads();
    for (unsigned w = SUMS_THREADS / 2; w > 0; w /= 2) {
        if (threadIdx.x < w) {
            d2s[threadIdx.x] += d2s[threadIdx.x + w];
            r2s[threadIdx.x] += r2s[threadIdx.x + w];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        out[2 * (uint64_t)blockIdx.x] = d2s[0];
        out[2 * (uint64_t)blockIdx.x + 1] = r2s[0];
    }
}

int kvs_fidelity_section_sums_cuda(const uint16_t *ref, const uint16_t *dec, uint32_t nsec,
                                   size_t sec, kvs_dtype dt, double *out, void *stream,
                                   kvs_err *err)
{
    if (nsec == 0)
        return 0;
    if (!ref || !dec || !out)
        return kvs_err_set(err, KVS_EINVAL, "fidelity sums: NULL buffer");
    sums_kernel<<<nsec, SUMS_THREADS, 0, (cudaStream_t)stream>>>(ref, dec, sec,
                                                                 dt == KVS_DTYPE_BF16, out);
    KVS_CUDA_CHECK(cudaGetLastError(), err);
    return 0;
}
