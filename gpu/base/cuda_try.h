/* Checked CUDA runtime calls (STYLE: GPU code; STYLE-anchors §7.1): one macro that turns a
 * failure into a kvs_err naming the call, the CUDA error and the place, and jumps to the
 * function's `fail` label (or returns) instead of aborting: the daemon must survive a
 * failed launch. After every kernel launch: KVS_CUDA_TRY(cudaGetLastError(), err). */
#ifndef KVS_BASE_CUDA_TRY_H
#define KVS_BASE_CUDA_TRY_H

#include <cuda_runtime.h>

#include "gpu/base/err.h"

#define KVS_CUDA_CHECK(expr, err)                                                                  \
    do {                                                                                           \
        cudaError_t kvs_cuda_rc_ = (expr);                                                         \
        if (kvs_cuda_rc_ != cudaSuccess)                                                           \
            return kvs_err_set((err), KVS_EINTERNAL, "%s: %s (%s) at %s:%d", #expr,                \
                               cudaGetErrorString(kvs_cuda_rc_), cudaGetErrorName(kvs_cuda_rc_),   \
                               __FILE__, __LINE__);                                                \
    } while (0)

#endif
