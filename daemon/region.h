/* Shared-memory regions (README "Data plane"): the region socket and the registry of the
 * regions co-located clients registered through it (wire format: proto/kvstash/v1/region.h).
 *
 * A region is a client's memfd, mapped here (MAP_SHARED) and pinned for the GPU engine
 * when there is one, so a Put's encode and a Get's decode move bytes by DMA straight
 * between the worker's memory and the GPU, and a CPU codec reads and writes it in place.
 * Or it is a worker's GPU memory, opened by its CUDA IPC handle on the engine's device
 * (kvs_region_device): then Put encodes from it and Get decodes into it on the GPU.
 *
 *   registered (listed: its id resolves) ──connection closed──> unlisted ──last ref──> unmapped
 *
 * Invariants:
 *  1. A region's id resolves (kvs_regions_acquire) only while it is listed; every acquire
 *     holds a reference, and the mapping (and its pin) goes only when the region is
 *     unlisted and the last reference is released. A call holds its reference from
 *     validation until its bytes are no longer touched, so a client that disconnects
 *     mid-call cannot unmap memory a codec is writing.
 *  2. Only files sealed against shrinking are mapped: a truncation could otherwise turn a
 *     later access into SIGBUS. Growing is harmless (the mapping has a fixed length).
 *  3. Every (offset, length) is checked against the mapping without overflow before a
 *     pointer is formed.
 *  4. Registered bytes are bounded (--region-max-bytes, all connections); each region is
 *     at most that too.
 *  5. Regions (shared memory and CUDA IPC) and socket connections are each bounded
 *     (--region-max-count, all clients): a region is a mapping (or an opened handle) and a
 *     connection a descriptor, so page-sized registrations over many connections cannot
 *     exhaust the daemon's mappings (vm.max_map_count) or descriptors.
 *  6. A shared-memory region's pages are allocated by its client before it registers (no
 *     hole in the range): mapping it allocates nothing in the daemon.
 *  7. One client process (the socket's peer pid) holds at most --region-max-per-client
 *     regions and as many connections, so that one client, buggy or hostile, cannot take
 *     every place of invariant 5 from the others. (A client that forks gets a share per
 *     process: the bound is against one process's leak or flood, not a sandbox; the
 *     socket's mode says who may connect at all.)
 *
 * Threads: the socket is served on the loop thread (libuv polls; requests are a few bytes,
 * the one slow step is the pin, once per region). acquire/release run on any thread. Lock:
 * `kvs_regions.mu`, a leaf (daemon/THREADS.md).
 */
#ifndef KVS_DAEMON_REGION_H
#define KVS_DAEMON_REGION_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "gpu/base/err.h"
#include "gpu/base/log.h"
#include "storage/store.h"

struct kvs_engine;

typedef struct kvs_regions kvs_regions;
typedef struct kvs_region kvs_region;

typedef struct kvs_regions_opts {
    const char *path;        /* the Unix socket to listen on (created; an old one replaced) */
    unsigned mode;           /* its permission bits, e.g. 0600 */
    uint64_t max_bytes;      /* registered bytes, all regions together (invariant 4) */
    unsigned max_count;      /* regions, and connections, all clients together (invariant 5) */
    unsigned max_per_client; /* regions, and connections, of one client process (inv. 7) */
    /* The GPU engines, one per device (borrowed): the leading non-NULL entries; none: no
     * engine. Shared memory is pinned for every device; a CUDA IPC region is opened by
     * the engine of the device its memory is on. */
    struct kvs_engine *engine[KVS_STORE_GPUS_MAX];
    kvs_log_fn log; /* may be NULL */
    void *log_ctx;
} kvs_regions_opts;

/* Listens on o->path on loop (loop thread). */
int kvs_regions_create(uv_loop_t *loop, const kvs_regions_opts *o, kvs_regions **out, kvs_err *err);
/* Loop thread: stops listening and closes every connection (their regions are unlisted). */
void kvs_regions_close(kvs_regions *r);
/* After the loop has run the close callbacks and no call holds a region. NULL is fine. */
void kvs_regions_destroy(kvs_regions *r);

const char *kvs_regions_path(const kvs_regions *r);
uint64_t kvs_regions_max_bytes(const kvs_regions *r);

/* Resolves [offset, offset + len) of region `id` (id_len bytes; `field` names the request
 * field in errors) to a pointer and takes a reference: KVS_ENOTFOUND for an id that is not
 * registered (or whose connection closed), KVS_EINVAL for a range outside the region.
 * Release with kvs_region_release. Any thread. */
int kvs_regions_acquire(kvs_regions *r, const uint8_t *id, size_t id_len, uint64_t offset,
                        uint64_t len, const char *field, kvs_region **out, uint8_t **ptr,
                        kvs_err *err);
/* The whole mapping of a region held (paged layouts check their own bounds against it). */
uint8_t *kvs_region_base(const kvs_region *g);
uint64_t kvs_region_len(const kvs_region *g);
/* True for a CUDA IPC region: its bytes are a worker's GPU memory (base and ptr are
 * device addresses: only the GPU engine may touch them). */
bool kvs_region_device(const kvs_region *g);
/* A CUDA IPC region's device: its index in opts.engine (0 for shared memory). */
unsigned kvs_region_gpu(const kvs_region *g);
/* Another reference to a region already held (a call that uses it for several blocks). */
void kvs_region_ref(kvs_region *g);
/* Drops a reference; NULL is fine. Any thread. */
void kvs_region_release(kvs_region *g);

/* Counters for Stats. */
typedef struct kvs_regions_stats {
    uint64_t regions, bytes, pinned_bytes, connections, refused;
    uint64_t device_bytes; /* of CUDA IPC regions (GPU memory of workers), not in bytes */
} kvs_regions_stats;
void kvs_regions_stats_get(kvs_regions *r, kvs_regions_stats *out);

#endif
