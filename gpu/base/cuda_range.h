/* The allocation that holds a device pointer, from the driver (cuMemGetAddressRange),
 * reached through the runtime's entry-point query so that nothing links libcuda. A header
 * for CUDA users, like cuda_try.h: the engine bounds a CUDA IPC region by it (a client
 * cannot make it touch memory past the allocation by claiming a larger region) and
 * libkvstash_cuda uses it to say where in its allocation a worker's pointer lies. */
#ifndef KVS_BASE_CUDA_RANGE_H
#define KVS_BASE_CUDA_RANGE_H

#include <stdbool.h>
#include <stdint.h>

#include <cuda.h>
#include <cuda_runtime.h>

/* True, with the allocation's start and size, if the driver knows p; false otherwise
 * (the runtime's error state is left clear). */
static inline bool kvs_cuda_alloc_range(const void *p, uint64_t *base, uint64_t *size)
{
    typedef CUresult (*get_range_fn)(CUdeviceptr *, size_t *, CUdeviceptr);
    get_range_fn get_range = NULL;
    enum cudaDriverEntryPointQueryResult q;
    CUdeviceptr b = 0;
    size_t n = 0;
    cudaError_t ce = cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", (void **)&get_range,
                                                      12000, cudaEnableDefault, &q);
    if (ce != cudaSuccess) {
        cudaGetLastError();
        return false;
    }
    if (q != cudaDriverEntryPointSuccess || !get_range ||
        get_range(&b, &n, (CUdeviceptr)(uintptr_t)p) != CUDA_SUCCESS)
        return false;
    *base = (uint64_t)b;
    *size = (uint64_t)n;
    return true;
}

#endif
