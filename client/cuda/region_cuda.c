/* libkvstash_cuda: a CUDA IPC region from a device pointer (contract: kvstash_cuda.h;
 * the registration itself: kvs_region_create_ipc in client/region.c).
 *
 * cudaIpcGetMemHandle names the whole allocation that holds the pointer; the daemon opens
 * that allocation, so the region is told where in it the pointer lies. The allocation's
 * start comes from the driver (gpu/base/cuda_range.h: nothing here links libcuda).
 */
#include "kvstash_cuda.h"

#ifdef KVS_HAVE_CUDA
#include <stdint.h>
#include <string.h>

#include <cuda_runtime.h>

#include "gpu/base/cuda_range.h"

static int cuda_err(kvs_err *err, const char *what, cudaError_t ce)
{
    cudaGetLastError();
    return kvs_err_set(err, KVS_EINVAL, "region: %s: %s (%s)", what, cudaGetErrorString(ce),
                       cudaGetErrorName(ce));
}

int kvs_cuda_region_create(kvs_client *c, void *dptr, size_t bytes, kvs_region **out, kvs_err *err)
{
    kvs_err_clear(err);
    if (!c || !dptr || !out || bytes == 0)
        return kvs_err_set(err, KVS_EINVAL, "region: NULL argument or zero bytes");
    *out = NULL;
    struct cudaPointerAttributes a;
    cudaError_t ce = cudaPointerGetAttributes(&a, dptr);
    if (ce != cudaSuccess)
        return cuda_err(err, "cudaPointerGetAttributes", ce);
    if (a.type != cudaMemoryTypeDevice)
        return kvs_err_set(err, KVS_EINVAL, "region: %p is not device memory (cudaMalloc)", dptr);
    struct cudaDeviceProp prop;
    if ((ce = cudaGetDeviceProperties(&prop, a.device)) != cudaSuccess)
        return cuda_err(err, "cudaGetDeviceProperties", ce);
    uint64_t base = 0, size = 0;
    if (!kvs_cuda_alloc_range(dptr, &base, &size))
        return kvs_err_set(err, KVS_EINVAL, "region: the allocation holding %p is unknown", dptr);
    uint64_t offset = (uint64_t)(uintptr_t)dptr - base;
    if (bytes > size - offset)
        return kvs_err_set(err, KVS_EINVAL,
                           "region: %zu bytes from %p run past its allocation (%zu bytes left)",
                           bytes, dptr, (size_t)(size - offset));
    cudaIpcMemHandle_t h;
    if ((ce = cudaIpcGetMemHandle(&h, dptr)) != cudaSuccess)
        return cuda_err(err, "cudaIpcGetMemHandle", ce);
    _Static_assert(sizeof h == 64 && sizeof prop.uuid.bytes == 16, "IPC handle and UUID sizes");
    return kvs_region_create_ipc(c, &h, offset, bytes, prop.uuid.bytes, out, err);
}

#else /* no CUDA in this build */

int kvs_cuda_region_create(kvs_client *c, void *dptr, size_t bytes, kvs_region **out, kvs_err *err)
{
    (void)c, (void)dptr, (void)bytes;
    if (out)
        *out = NULL;
    return kvs_err_set(err, KVS_ENOTSUP, "region: this libkvstash_cuda was built without CUDA");
}

#endif
