/* Batched strided copies on the device: many 2D copies (rows of `width` bytes at a pitch)
 * in one kernel launch, for the GPU engine's per-block moves between its staging, the GPU
 * tier's slots and a worker's device memory (CUDA IPC). One cudaMemcpy2DAsync per block
 * and side costs a few microseconds of driver time each: four per block made restoring
 * 512 blocks by CUDA IPC take 11-12 ms (H100, 2026-12-07) where the bytes move in about
 * one. A launch takes the table of copies from device memory (the caller uploads it, once
 * per batch), so the cost is one upload and one launch whatever the count.
 *
 * kvs_copies_run is the CPU reference (the same moves on host memory, in table order);
 * the kernel gives the same bytes wherever no copy's destination overlaps another copy's
 * source or destination (it runs the copies in any order and in parallel). The engine's
 * copies never overlap: each block has its own slot, staging range and destination.
 *
 * Thread-safety: no state. Includable from C with or without CUDA; in a build without
 * CUDA kvs_copies_run_cuda answers KVS_ENOTSUP.
 */
#ifndef KVS_CODEC_COPIES_H
#define KVS_CODEC_COPIES_H

#include <stddef.h>
#include <stdint.h>

#include "gpu/base/err.h"

#ifdef __cplusplus
extern "C" {
#endif

/* One 2D copy: `height` rows of `width` bytes, row r from src + r*spitch to dst + r*dpitch.
 * Addresses are ones the device reaches (device memory, memory opened by CUDA IPC); for the
 * CPU reference, host memory. 16-byte moves where dst, src, both pitches and width are
 * multiples of 16, else byte moves (correct at any alignment, slower). */
typedef struct kvs_copy2d {
    uint64_t dst, src;
    uint64_t dpitch, spitch;
    uint64_t width, height;
} kvs_copy2d;

/* Appends a copy to table[*n] (table has room: the caller sizes it). */
static inline void kvs_copies_add(kvs_copy2d *table, uint32_t *n, void *dst, uint64_t dpitch,
                                  const void *src, uint64_t spitch, uint64_t width, uint64_t height)
{
    table[(*n)++] = (kvs_copy2d){.dst = (uint64_t)(uintptr_t)dst,
                                 .src = (uint64_t)(uintptr_t)src,
                                 .dpitch = dpitch,
                                 .spitch = spitch,
                                 .width = width,
                                 .height = height};
}

/* The CPU reference: the n copies of `table` on host memory, in order. */
void kvs_copies_run(const kvs_copy2d *table, uint32_t n);

/* Runs the n copies of `table_dev` (device memory holding n descriptors, as uploaded on
 * `stream` or before it) on `stream` (a cudaStream_t) in one launch per 65535 copies.
 * `max_bytes` is the largest width*height among them (it sizes the grid; a smaller value
 * is still correct, only slower). Returns 0 or KVS_EINVAL (n 0, NULL table) /
 * KVS_EINTERNAL (the launch failed) with err set; the copies' own faults show on the
 * stream. */
int kvs_copies_run_cuda(const kvs_copy2d *table_dev, uint32_t n, uint64_t max_bytes, void *stream,
                        kvs_err *err);

#ifdef __cplusplus
}
#endif

#endif
