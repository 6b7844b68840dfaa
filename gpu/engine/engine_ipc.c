/* The GPU engine's side of CUDA IPC (engine.h, "worker memory"): device memory another
 * process on this host exported with cudaIpcGetMemHandle, opened on the engine's device so
 * that its jobs encode from it and decode into it (move_raw's direct copies, engine.c);
 * and the data path's synchronous steps on such memory: a copy, a paged block's gather
 * into a device buffer of its own (on the side stream, aux_mu held).
 *
 * A handle names a whole allocation; the caller (daemon/region.c) shares a part of it.
 * The allocation's real size comes from the driver (gpu/base/cuda_range.h): a client cannot
 * make the engine touch memory past its allocation by claiming a larger region.
 */
#include <stdio.h>
#include <string.h>

#include <cuda.h>
#include <cuda_runtime.h>

#include "gpu/base/cuda_range.h"
#include "gpu/codec/paged.h"
#include "gpu/engine/engine_int.h"

static int cuda_fail(kvs_err *err, int code, const char *what, cudaError_t ce)
{
    cudaGetLastError(); /* not sticky (these are argument errors): clear it */
    return kvs_err_set(err, code, "%s: %s (%s)", what, cudaGetErrorString(ce),
                       cudaGetErrorName(ce));
}

int kvs_engine_ipc_open(kvs_engine *e, const uint8_t handle[KVS_ENGINE_IPC_HANDLE_LEN],
                        const uint8_t uuid[KVS_ENGINE_UUID_LEN], void **base, uint64_t *bytes,
                        kvs_err *err)
{
    *base = NULL;
    *bytes = 0;
    cudaError_t ce = cudaSetDevice(e->o.device);
    if (ce != cudaSuccess)
        return cuda_fail(err, KVS_EINTERNAL, "GPU engine: cudaSetDevice", ce);
    _Static_assert(sizeof e->uuid == KVS_ENGINE_UUID_LEN, "device UUID length");
    if (!kvs_engine_has_uuid(e, uuid)) { /* the device's UUID, read at create */
        char want[40], got[40];
        for (int i = 0; i < 16; i++) {
            snprintf(want + 2 * i, 3, "%02x", e->uuid[i]);
            snprintf(got + 2 * i, 3, "%02x", uuid[i]);
        }
        return kvs_err_set(err, KVS_EINVAL,
                           "uuid: the memory is on GPU %s; kvstashd's engine runs on %s (%s): "
                           "share memory of that GPU, or use a shared-memory region",
                           got, e->name, want);
    }
    cudaIpcMemHandle_t h;
    _Static_assert(sizeof h == KVS_ENGINE_IPC_HANDLE_LEN, "IPC handle length");
    memcpy(&h, handle, sizeof h);
    void *p = NULL;
    if ((ce = cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess)) != cudaSuccess)
        return cuda_fail(err, KVS_EINVAL,
                         "handle: cudaIpcOpenMemHandle refused it (freed, of another host, or "
                         "made in this process?)",
                         ce);
    uint64_t b = 0, n = 0;
    if (!kvs_cuda_alloc_range(p, &b, &n)) {
        cudaIpcCloseMemHandle(p);
        return kvs_err_set(err, KVS_EINTERNAL,
                           "GPU engine: the size of an IPC allocation is unknown "
                           "(cuMemGetAddressRange)");
    }
    /* The handle opens at the allocation's start (b == p); counted from p either way. */
    *base = p;
    *bytes = n - ((uint64_t)(uintptr_t)p - b);
    return 0;
}

void kvs_engine_ipc_close(kvs_engine *e, void *base)
{
    if (!base)
        return;
    cudaSetDevice(e->o.device);
    cudaIpcCloseMemHandle(base);
}

int kvs_engine_copy(kvs_engine *e, void *dst, const void *src, size_t n, kvs_err *err)
{
    cudaError_t ce = cudaSetDevice(e->o.device);
    if (ce == cudaSuccess)
        ce = cudaMemcpy(dst, src, n, cudaMemcpyDefault);
    /* From pageable host memory cudaMemcpy returns once the bytes are staged, its DMA still
     * in flight, and the caller answers the worker whose kernels read dst next: wait for
     * the copy to land. */
    if (ce == cudaSuccess)
        ce = cudaStreamSynchronize(0);
    if (ce != cudaSuccess)
        return kvs_err_set(err, KVS_EINTERNAL, "GPU engine: copy of %zu bytes: %s (%s)", n,
                           cudaGetErrorString(ce), cudaGetErrorName(ce));
    return 0;
}

int kvs_engine_gather_dev(kvs_engine *e, const kvs_paged_layout *lay, const void *base,
                          const uint32_t *pages, uint32_t t, void **out, kvs_err *err)
{
    *out = NULL;
    size_t bytes = kvs_paged_block_bytes(lay, t, 0, lay->layers);
    void *p = NULL;
    int rc = 0;
    pthread_mutex_lock(&e->aux_mu);
    cudaError_t ce = cudaSetDevice(e->o.device);
    /* Stream-ordered: the pool hands back what earlier blocks freed without a device-wide
     * synchronization (cudaMalloc/cudaFree would stall the batch stream). */
    if (ce == cudaSuccess)
        ce = cudaMallocAsync(&p, bytes, e->aux);
    if (ce == cudaErrorMemoryAllocation) {
        cudaGetLastError();
        rc = kvs_err_set(err, KVS_ENOMEM,
                         "layout: no room on the GPU for a %zu-byte block gathered from its "
                         "pages",
                         bytes);
    } else if (ce != cudaSuccess) {
        rc = cuda_fail(err, KVS_EINTERNAL, "GPU engine: gather buffer", ce);
    } else if ((rc = kvs_paged_gather_cuda(lay, base, pages, t, 0, lay->layers, p, e->aux, err)) ==
                   0 &&
               (ce = cudaStreamSynchronize(e->aux)) != cudaSuccess) {
        rc = cuda_fail(err, KVS_EINTERNAL, "GPU engine: gather of a paged block", ce);
    }
    if (rc && p)
        cudaFreeAsync(p, e->aux);
    pthread_mutex_unlock(&e->aux_mu);
    if (rc == 0)
        *out = p;
    return rc;
}

void kvs_engine_dev_free(kvs_engine *e, void *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&e->aux_mu);
    cudaSetDevice(e->o.device);
    cudaFreeAsync(p, e->aux);
    pthread_mutex_unlock(&e->aux_mu);
}
