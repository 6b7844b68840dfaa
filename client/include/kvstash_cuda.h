/* libkvstash_cuda: decode encoded blocks on the worker's own GPU (README "Data plane").
 *
 * The remote restore path: a worker that cannot share memory with the daemon (another
 * node, a runtime that refuses CUDA IPC) fetches the encoded blocks (GetMany with format
 * ENCODED: 4-7x fewer bytes on the wire than fp16 with a quantizing codec) and decodes them
 * here, with the same kernels as the daemon's engine and the same bytes as the CPU
 * reference (kvs_decode_block). A separate library so that CPU-only clients of libkvstash
 * never load the CUDA runtime; in a build without CUDA every call answers KVS_ENOTSUP.
 *
 * A decoder serves one namespace on the device current when it is created. It keeps the
 * namespace's codecs (their tables uploaded once) per learned-state version, fetching the
 * states a block needs through the client (GetCodecState), and its fallback codec
 * (max_rel_error) for the sides a block's header says were stored with it. Not
 * thread-safe: one decoder per thread (or a lock around it). A batch of 8 MiB of encoded
 * bytes or more starts up to 8 threads of its own for the checksums and joins them before
 * it returns; nothing runs between calls.
 */
#ifndef KVSTASH_CUDA_H
#define KVSTASH_CUDA_H

#include "kvstash.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvs_cuda_decoder kvs_cuda_decoder;

/* c may be NULL: blocks that need a learned state then fail with KVS_ENOTSUP. spec is the
 * namespace's (kvs_client_ns_get), copied; c (borrowed) must outlive the decoder. */
KVS_API int kvs_cuda_decoder_create(kvs_client *c, const char *ns, const kvs_ns_spec *spec,
                                    kvs_cuda_decoder **out, kvs_err *err);
KVS_API void kvs_cuda_decoder_destroy(kvs_cuda_decoder *d);

/* Decodes one encoded block (host memory, len bytes; its checksum is verified here first:
 * KVS_EDATALOSS) into raw_dev (device memory of cap bytes, layout [L][2][t][H][D] in the
 * namespace dtype), on stream (a cudaStream_t; NULL: the decoder's own). Returns once the
 * block is decoded (the stream is synchronized: the decoder's staging is reused by the
 * next call). res (may be NULL) as kvs_decode_block fills it. */
KVS_API int kvs_decode_block_cuda(kvs_cuda_decoder *d, const void *enc, size_t len, void *raw_dev,
                                  size_t cap, void *stream, kvs_get_result *res, kvs_err *err);

/* One block of a batch: what kvs_decode_block_cuda takes, and its own result. */
typedef struct kvs_cuda_block {
    const void *enc; /* in: the encoded block, host memory (pinned or not: pinned is faster) */
    size_t len;
    void *raw_dev; /* in: its destination, cap bytes of device memory */
    size_t cap;
    int rc;             /* out: 0, or this block's error (KVS_EDATALOSS, KVS_E2BIG, ...) */
    char msg[160];      /* out: the error's message */
    kvs_get_result res; /* out, when rc is 0 */
} kvs_cuda_block;

/* Decodes n blocks: as kvs_decode_block_cuda each, but blocks that share their codecs and
 * token count (a prefix's do) are decoded together, two kernel launches per up to 64 MiB of
 * output instead of 2L per block, which is what a remote restore of hundreds of blocks
 * needs. A block that fails its checks gets its rc and msg and the others go on. Returns
 * once every block is in place (the stream is synchronized); non-zero only for a failure
 * of the call itself (a CUDA error, out of memory), after which the blocks' contents are
 * undefined. */
KVS_API int kvs_decode_blocks_cuda(kvs_cuda_decoder *d, kvs_cuda_block *blocks, size_t n,
                                   void *stream, kvs_err *err);

/* Where a decoder's work went, since its creation: how many blocks it decoded, how many of
 * them were copied whole from pinned host memory and gathered on the device (the fast path
 * for a shared-memory region registered with CUDA: cudaHostRegister over the whole region;
 * a region left pageable is gathered on the host, which is what blocks_pinned shows), and
 * how many had their checksum verified by the decoder's threads (batches of 8 MiB and more)
 * rather than inline; pinned_copies counts the host-to-device copies that moved the pinned
 * blocks (consecutive blocks, as in a region's slots, share one). */
typedef struct kvs_cuda_decoder_stats {
    uint64_t blocks, blocks_pinned, blocks_hashed_threads, pinned_copies;
} kvs_cuda_decoder_stats;
KVS_API void kvs_cuda_decoder_stats_get(const kvs_cuda_decoder *d, kvs_cuda_decoder_stats *out);

/* CUDA IPC (kvstash.h, kvs_region_create_ipc): registers bytes of device memory at dptr
 * (inside a cudaMalloc allocation; torch's caching allocator's tensors are) with a daemon
 * on this host whose GPU engine runs on that GPU; PutMany and GetMany items naming the
 * region then move blocks GPU to GPU. The memory must stay allocated until
 * kvs_region_close. KVS_ENOTSUP as kvs_region_create_ipc (remote daemon, no GPU engine),
 * KVS_EINVAL for host memory, a range past the allocation, or another GPU. */
KVS_API int kvs_cuda_region_create(kvs_client *c, void *dptr, size_t bytes, kvs_region **out,
                                   kvs_err *err);

#ifdef __cplusplus
}
#endif
#endif
