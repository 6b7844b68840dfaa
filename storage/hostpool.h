/* The pinned host pool (DESIGN §7): memory for the host tier's blocks when a GPU engine is
 * present, so the engine can move them to and from the device by DMA straight from the
 * block (promotion, demotion) instead of through its staging buffers.
 *
 * Pinning is slow (the driver locks and maps every page), so it is never done per block:
 * the pool reserves one range of address space up front (PROT_NONE, no memory behind it)
 * and commits it lazily in slabs of slab_bytes (64 MiB): a slab's pages are made writable,
 * touched, and handed to the pin callback (cudaHostRegister) once, the first time a block
 * lands in it; committed slabs stay committed and pinned until the pool is destroyed.
 * Blocks are carved from slabs by storage/slots (one slab serves one size class; classes
 * are eight per power of two from 4 KiB, so a block wastes at most 1/8 of its slot).
 *
 * A request the pool cannot serve (larger than a slab, every slab in use) returns NULL:
 * the caller falls back to malloc; a slab whose pin failed is used unpinned (counted). A
 * pinned pool is a speed-up, never a reason to refuse a block.
 *
 * Threading: thread-safe (one internal mutex, a leaf lock: no callback of another module
 * runs under it except pin, which must not call back into the pool).
 */
#ifndef KVS_STORAGE_HOSTPOOL_H
#define KVS_STORAGE_HOSTPOOL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "gpu/base/err.h"

typedef struct kvs_hostpool kvs_hostpool;

/* Pins [addr, addr + bytes) (e.g. cudaHostRegister); 0 or an error. */
typedef int (*kvs_hostpool_pin_fn)(void *ctx, void *addr, size_t bytes, kvs_err *err);
/* Undoes a successful pin, at destroy. */
typedef void (*kvs_hostpool_unpin_fn)(void *ctx, void *addr, size_t bytes);

typedef struct kvs_hostpool_opts {
    uint64_t max_bytes;          /* address space reserved (rounded up to whole slabs) */
    uint64_t slab_bytes;         /* 0: 64 MiB */
    kvs_hostpool_pin_fn pin;     /* may be NULL: slabs are committed but not pinned */
    kvs_hostpool_unpin_fn unpin; /* with pin */
    void *ctx;
} kvs_hostpool_opts;

/* Reserves the address space. KVS_EINVAL (sizes), KVS_ENOMEM (mmap refused). */
int kvs_hostpool_create(const kvs_hostpool_opts *opts, kvs_hostpool **out, kvs_err *err);
/* Unpins and unmaps everything. No block may still be in use. NULL is fine. */
void kvs_hostpool_destroy(kvs_hostpool *p);

/* A block of at least `bytes` (1..slab_bytes) in a committed (and pinned) slab, or NULL
 * (the caller uses malloc instead). */
void *kvs_hostpool_alloc(kvs_hostpool *p, size_t bytes);
/* Returns a block from kvs_hostpool_alloc. */
void kvs_hostpool_free(kvs_hostpool *p, void *ptr);
/* True if ptr lies in the pool's range (then it came from kvs_hostpool_alloc). */
bool kvs_hostpool_owns(const kvs_hostpool *p, const void *ptr);

typedef struct kvs_hostpool_stats {
    uint64_t reserved;  /* address space */
    uint64_t committed; /* bytes of committed slabs */
    uint64_t pinned;    /* of those, pinned */
    uint64_t used;      /* bytes of slots handed out */
    uint64_t pin_failures;
} kvs_hostpool_stats;

void kvs_hostpool_get_stats(kvs_hostpool *p, kvs_hostpool_stats *out);

#endif
