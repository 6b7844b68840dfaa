/* Batched strided copies: the CPU reference (contract: copies.h), and the CUDA entry
 * point's KVS_ENOTSUP stub in a build without CUDA (KVS_COPIES_CUDA_STUBS). */
#include "gpu/codec/copies.h"

#include <string.h>

void kvs_copies_run(const kvs_copy2d *table, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++) {
        const kvs_copy2d *c = &table[i];
        for (uint64_t r = 0; r < c->height; r++)
            memmove((uint8_t *)(uintptr_t)c->dst + r * c->dpitch,
                    (const uint8_t *)(uintptr_t)c->src + r * c->spitch, c->width);
    }
}

#ifdef KVS_COPIES_CUDA_STUBS
int kvs_copies_run_cuda(const kvs_copy2d *table_dev, uint32_t n, uint64_t max_bytes, void *stream,
                        kvs_err *err)
{
    (void)table_dev;
    (void)n;
    (void)max_bytes;
    (void)stream;
    return kvs_err_set(err, KVS_ENOTSUP, "copies: this build has no CUDA kernels");
}
#endif
