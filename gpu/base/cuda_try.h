/* Checked CUDA runtime calls (STYLE: GPU code; STYLE-anchors §7.1): the one macro for
 * them, in the codecs' launchers and in the engine alike. A failure returns KVS_EINTERNAL
 * from the function with a kvs_err naming the call, the CUDA error and the place, instead
 * of aborting: the daemon must survive a failed launch. After every kernel launch:
 * KVS_CUDA_CHECK(cudaGetLastError(), err). Whether the device is lost for good is not the
 * call site's business: the engine thread asks the stream once after a failed batch
 * (gpu/engine/engine.c), where sticky errors show again. */
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
