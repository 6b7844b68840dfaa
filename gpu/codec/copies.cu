/* Batched strided copies, CUDA side (contract: copies.h; copies.c's kvs_copies_run is the
 * reference).
 *
 * grid.y is the copy (one table entry per y, read by every thread of the CTA: a broadcast
 * load), grid.x strides over its units: 16 bytes when the copy's addresses, pitches and
 * width are all multiples of 16, else one byte. A thread walks its units by a fixed stride
 * of the whole x-grid, so the row and column of each step come from two divisions done
 * once, not one per unit. The x-grid is sized from the largest copy, about four units per
 * thread, at most 4096 CTAs: enough to fill an H100 for a batch of a few large copies, and a
 * batch of many small ones fills it through grid.y.
 */
#include <cuda_runtime.h>
#include <stdint.h>

#include "gpu/base/cuda_try.h"
#include "gpu/codec/copies.h"

#define COPIES_THREADS 256
#define COPIES_GRID_X 4096u
#define COPIES_GRID_Y 65535u

static __global__ void __launch_bounds__(COPIES_THREADS)
    copies_kernel(const kvs_copy2d *__restrict__ table, uint32_t first)
{
    const kvs_copy2d c = table[first + blockIdx.y];
    const bool wide = ((c.dst | c.src | c.dpitch | c.spitch | c.width) & 15) == 0;
    const uint64_t upr = wide ? c.width / 16 : c.width; /* units per row */
    const uint64_t units = upr * c.height;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (upr == 0 || i >= units)
        return;
    uint64_t row = i / upr, col = i - row * upr;
    const uint64_t qs = stride / upr, rs = stride - qs * upr;
    while (row < c.height) {
        if (wide) {
            *(uint4 *)(c.dst + row * c.dpitch + col * 16) =
                *(const uint4 *)(c.src + row * c.spitch + col * 16);
        } else {
            *(uint8_t *)(c.dst + row * c.dpitch + col) =
                *(const uint8_t *)(c.src + row * c.spitch + col);
        }
        row += qs;
        col += rs;
        if (col >= upr) {
            col -= upr;
            row++;
        }
    }
}

int kvs_copies_run_cuda(const kvs_copy2d *table_dev, uint32_t n, uint64_t max_bytes, void *stream,
                        kvs_err *err)
{
    if (!table_dev || n == 0)
        return kvs_err_set(err, KVS_EINVAL, "copies: %s", table_dev ? "n is 0" : "table: NULL");
    /* Units of the largest copy (16 bytes each where it is aligned; sized as if it were, a
     * byte-wise copy only loops more), four per thread. */
    uint64_t per = (uint64_t)COPIES_THREADS * 4 * 16;
    uint64_t gx = (max_bytes + per - 1) / per;
    gx = gx < 1 ? 1 : gx > COPIES_GRID_X ? COPIES_GRID_X : gx;
    cudaStream_t st = (cudaStream_t)stream;
    for (uint32_t first = 0; first < n; first += COPIES_GRID_Y) {
        uint32_t ny = n - first < COPIES_GRID_Y ? n - first : COPIES_GRID_Y;
        copies_kernel<<<dim3((unsigned)gx, ny), COPIES_THREADS, 0, st>>>(table_dev, first);
        KVS_CUDA_CHECK(cudaGetLastError(), err);
    }
    return 0;
}
