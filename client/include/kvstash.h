/* libkvstash: the C client of kvstashd.
 *
 * One kvs_client is one gRPC channel to one daemon. It is thread-safe: any number of
 * threads may issue calls on the same handle at once (each call gets its own completion
 * queue). Every call returns 0 or a negative KVS_E* code (gpu/base/err.h) and, when `err`
 * is not NULL, fills it with the code and a message; for errors that the server sent,
 * the message is the server's status text (which names the field at fault) and
 * kvs_err_grpc_status(err->code) gives back the gRPC status class.
 *
 * Errors map from gRPC status as kvs_err_from_grpc_status() says: INVALID_ARGUMENT ->
 * KVS_EINVAL, NOT_FOUND -> KVS_ENOTFOUND, ALREADY_EXISTS -> KVS_EEXIST,
 * RESOURCE_EXHAUSTED -> KVS_ENOSPC, UNAVAILABLE -> KVS_EUNAVAIL, DATA_LOSS ->
 * KVS_EDATALOSS, DEADLINE_EXCEEDED -> KVS_ETIMEDOUT, UNAUTHENTICATED -> KVS_EUNAUTH,
 * PERMISSION_DENIED -> KVS_EPERM, anything else -> KVS_EINTERNAL.
 *
 * Block keys: kvs_key_chain() derives the chained block key of DESIGN §1 so every
 * process and language computes the same bytes (test vectors in README.md).
 */
#ifndef KVSTASH_H
#define KVSTASH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "gpu/base/err.h"
#include "gpu/base/log.h"
#include "gpu/codec/spec.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KVS_API __attribute__((visibility("default")))

typedef struct kvs_client kvs_client;

typedef enum kvs_tier {
    KVS_TIER_NONE = 0, /* absent */
    KVS_TIER_GPU = 1,
    KVS_TIER_HOST = 2,
    KVS_TIER_DISK = 3,
} kvs_tier;

typedef enum kvs_format {
    KVS_FORMAT_RAW = 0,     /* decoded, namespace dtype, layout [L][2][t][H][D] */
    KVS_FORMAT_ENCODED = 1, /* encoded block bytes (DESIGN §5) */
} kvs_format;

KVS_API const char *kvs_tier_name(kvs_tier tier); /* "none", "gpu", "host", "disk" */

/* ------------------------------------------------------------------ connection */

typedef struct kvs_client_opts {
    const char *target; /* "127.0.0.1:50051", "unix:/run/kvstash.sock"; NULL = default */
    const char *token;  /* bearer token sent as "authorization: Bearer <token>"; NULL = none */
    int64_t timeout_ms; /* deadline of every call; 0 = 30000 */
    size_t max_message; /* max gRPC message size both ways; 0 = 64 MiB */
    size_t chunk_bytes; /* payload bytes per Put message; 0 = 1 MiB */
    /* TLS (README "TLS"); all NULL = plaintext. Paths of PEM files, read by connect
     * (errors name the option). Setting any of them turns TLS on. Added last: a
     * zero-initialized struct of an older caller keeps meaning plaintext. */
    const char *tls_ca;          /* CA certificates that sign the daemon's; NULL = gRPC's
                                  * default roots */
    const char *tls_cert;        /* mutual TLS: this client's certificate chain... */
    const char *tls_key;         /* ...and its private key (both or neither) */
    const char *tls_server_name; /* name checked in the daemon's certificate instead of the
                                  * target's host (e.g. "localhost"); NULL = the target's */
    /* TCP connections (gRPC channels) to the daemon; 0 = 1, at most KVS_CONNECTIONS_MAX.
     * Calls take them in turn, and a GetMany of KVS_SPLIT_MIN_BYTES or more (its items'
     * caps; not a paged one) is split into that many parts in key order, one per connection,
     * received at once by threads of the call: for a remote worker, whose one connection
     * carries 1-2 GB/s (README "Data plane"). Its answer is the unsplit call's (a prefix
     * GetMany still stops at the first miss). Same-host workers gain nothing (a shared-memory
     * region moves no bytes over the connection). */
    unsigned connections;
} kvs_client_opts;

#define KVS_CONNECTIONS_MAX 16
#define KVS_SPLIT_MIN_BYTES (8u << 20)

/* Creates a client for opts->target (borrowed; copied). Does not wait for the
 * connection: the first call does. On success *out is owned by the caller and freed
 * with kvs_client_close(). */
KVS_API int kvs_client_connect(const kvs_client_opts *opts, kvs_client **out, kvs_err *err);

/* Does not wait for in-flight calls of other threads: call it only
 * once no other thread uses the handle. NULL is allowed. */
KVS_API void kvs_client_close(kvs_client *c);

/* ------------------------------------------------------------------ data path */

typedef struct kvs_put_result {
    kvs_tier tier;          /* tier the block landed in */
    uint64_t encoded_bytes; /* bytes the daemon stores for it */
    uint64_t raw_bytes;     /* payload bytes sent */
    bool replaced;          /* an older block with the same key was replaced */
    bool fallback;          /* its error passed the namespace's max_rel_error: keys, values or both
                             * are stored with its fallback_codec (README "Namespace options") */
} kvs_put_result;

/* Stores one block: `data` (borrowed, `len` bytes, layout [L][2][tokens][H][D] in
 * `dtype`) under `key` (1..64 bytes) in namespace `ns`, streamed in chunks of
 * opts.chunk_bytes. res may be NULL. */
KVS_API int kvs_client_put(kvs_client *c, const char *ns, const void *key, size_t key_len,
                           uint32_t tokens, kvs_dtype dtype, const void *data, size_t len,
                           kvs_put_result *res, kvs_err *err);

typedef struct kvs_get_result {
    uint32_t tokens;
    kvs_dtype dtype;
    uint32_t layer_begin, layer_end; /* layers returned: [begin, end) */
    uint64_t bytes;                  /* payload bytes returned */
    kvs_format format;
    kvs_tier tier; /* tier it was served from */
    bool fallback; /* stored with the namespace's fallback_codec (kvs_put_result): an
                    * ENCODED block's header names the codec of each side */
    /* The codecs its keys and values are stored with: the namespace's own, its fallback, or
     * a colder tier's (host_codec, disk_codec: README "Namespace options"); "" from a daemon
     * that does not say. */
    char key_codec[KVS_CODEC_NAME_MAX + 1];
    char value_codec[KVS_CODEC_NAME_MAX + 1];
} kvs_get_result;

/* Fetches a whole block, decoded, into buf (caller-owned, cap bytes). Fails with
 * KVS_E2BIG (buf untouched beyond cap) if the block does not fit. res may be NULL. */
KVS_API int kvs_client_get(kvs_client *c, const char *ns, const void *key, size_t key_len,
                           void *buf, size_t cap, kvs_get_result *res, kvs_err *err);

/* Called for each chunk of a streamed Get, in layout order: bytes [offset, offset+len)
 * of `layer` (K then V of that layer). `data` is borrowed until the callback returns.
 * The first call for a layer has offset 0; a layer is complete when offset + len equals
 * the layer's size. A non-zero return cancels the call and is returned by
 * kvs_client_get_layers(). `hdr` is filled before the first data callback. */
typedef int (*kvs_layer_cb)(void *ctx, const kvs_get_result *hdr, uint32_t layer, uint64_t offset,
                            const void *data, size_t len);

typedef struct kvs_get_opts {
    kvs_format format;    /* RAW (default) or ENCODED */
    uint32_t layer_begin; /* [layer_begin, layer_end); layer_end = 0 means all layers */
    uint32_t layer_end;
} kvs_get_opts;

/* Streams a block layer by layer through cb. opts may be NULL (all layers, RAW). */
KVS_API int kvs_client_get_layers(kvs_client *c, const char *ns, const void *key, size_t key_len,
                                  const kvs_get_opts *opts, kvs_layer_cb cb, void *ctx,
                                  kvs_get_result *res, kvs_err *err);

/* Decodes an encoded block (as Get with format ENCODED returns it) on this CPU into raw
 * (caller-owned, cap bytes; layout [L][2][t][H][D] in the namespace dtype), using the
 * namespace's spec (kvs_client_ns_get). The block's checksum is verified first
 * (KVS_EDATALOSS). Blocks encoded with learned codec state that their decode reads
 * (RotateKV keys with version > 0) need that state: KVS_ENOTSUP here, use
 * kvs_client_decode_block. A side stored with the namespace's fallback codec
 * (max_rel_error: the block's header names it) decodes with that codec, which spec names.
 * res (may be NULL) gets tokens, dtype, layers, bytes and fallback. */
KVS_API int kvs_decode_block(const kvs_ns_spec *spec, const void *enc, size_t len, void *raw,
                             size_t cap, kvs_get_result *res, kvs_err *err);

/* kvs_decode_block for any block: the learned codec states the block was encoded with
 * (RotateKV's channel order, SQuat's subspace) are fetched from the daemon by version
 * (GetCodecState) and cached in the client, so every codec decodes on the client. */
KVS_API int kvs_client_decode_block(kvs_client *c, const char *ns, const kvs_ns_spec *spec,
                                    const void *enc, size_t len, void *raw, size_t cap,
                                    kvs_get_result *res, kvs_err *err);

/* A namespace's learned codec state of one version (keys, or values), fetched once and
 * cached in the client: *data (len bytes) stays valid until kvs_client_close. For a
 * decoder of one's own (libkvstash_cuda). KVS_ENOTFOUND for an unknown version. */
KVS_API int kvs_client_codec_state(kvs_client *c, const char *ns, bool values, uint32_t version,
                                   const void **data, size_t *len, kvs_err *err);

/* Get with format ENCODED (a fraction of the wire bytes), then kvs_client_decode_block:
 * the same result as kvs_client_get, decoded on the client's CPU. */
KVS_API int kvs_client_get_local(kvs_client *c, const char *ns, const void *key, size_t key_len,
                                 void *buf, size_t cap, kvs_get_result *res, kvs_err *err);

/* A block key as a value (caller-allocatable). */
typedef struct kvs_key {
    uint8_t len; /* 1..KVS_KEY_MAX */
    uint8_t bytes[KVS_KEY_MAX];
} kvs_key;

/* How many leading keys of keys[0..n) are present (*prefix), and each one's tier
 * (tiers: caller array of n entries, KVS_TIER_NONE when absent; may be NULL). */
KVS_API int kvs_client_lookup(kvs_client *c, const char *ns, const kvs_key *keys, size_t n,
                              uint32_t *prefix, kvs_tier *tiers, kvs_err *err);
/* kvs_client_lookup that also says, per key, whether the block is stored with the
 * namespace's fallback codec (max_rel_error; fallback: caller array of n entries, false
 * for absent keys and namespaces without a bound; may be NULL). */
KVS_API int kvs_client_lookup_fallback(kvs_client *c, const char *ns, const kvs_key *keys, size_t n,
                                       uint32_t *prefix, kvs_tier *tiers, bool *fallback,
                                       kvs_err *err);

/* The codecs a block's keys and values are stored with (kvs_get_result's). */
typedef struct kvs_block_codecs {
    char key_codec[KVS_CODEC_NAME_MAX + 1];
    char value_codec[KVS_CODEC_NAME_MAX + 1];
} kvs_block_codecs;
/* kvs_client_lookup_fallback that also says, per key, which codecs the block is stored
 * with (codecs: caller array of n entries; may be NULL, as may fallback): the namespace's
 * own, its fallback, or a colder tier's (precision demotion). Both names are "" for an
 * absent key, and for every key of a namespace whose blocks all have its own codecs (no
 * bound, no tier codec), which the daemon then leaves out. */
KVS_API int kvs_client_lookup_codecs(kvs_client *c, const char *ns, const kvs_key *keys, size_t n,
                                     uint32_t *prefix, kvs_tier *tiers, bool *fallback,
                                     kvs_block_codecs *codecs, kvs_err *err);

/* present: caller array of n entries. */
KVS_API int kvs_client_exists(kvs_client *c, const char *ns, const kvs_key *keys, size_t n,
                              bool *present, kvs_err *err);

/* Deletes the keys that exist; *deleted (may be NULL) counts them. */
KVS_API int kvs_client_delete(kvs_client *c, const char *ns, const kvs_key *keys, size_t n,
                              uint32_t *deleted, kvs_err *err);

/* ------------------------------------------------------------------ data plane */

/* Shared memory with a daemon on this host (README "Data plane"): one region, created and
 * registered once (a memfd the daemon maps, and pins for its GPU engine), then named by
 * PutMany and GetMany items instead of carrying bytes over gRPC. KVS_ENOTSUP when the
 * daemon runs on another host (its boot id differs) or has no region socket: use the
 * bytes path then. The region lives until kvs_region_close (which the daemon sees as the
 * region's end); close it only once no call names it. Thread-safe to read and write from
 * any thread; the client must outlive no region (they are independent). */
typedef struct kvs_region kvs_region;
KVS_API int kvs_region_create(kvs_client *c, size_t bytes, kvs_region **out, kvs_err *err);
KVS_API void *kvs_region_data(const kvs_region *g);
KVS_API size_t kvs_region_size(const kvs_region *g);
/* Whether the daemon pinned it for its GPU engine (DMA straight to and from the GPU). */
KVS_API bool kvs_region_pinned(const kvs_region *g);
/* NULL is fine. */
KVS_API void kvs_region_close(kvs_region *g);

/* CUDA IPC with a daemon on this host whose GPU engine runs on the same GPU (README "Data
 * plane"): device memory of the worker's (its KV cache) registered once by its IPC handle,
 * then named by PutMany and GetMany items like a shared-memory region: Put encodes straight
 * from it, Get decodes straight into it, GPU to GPU, with no host copy. handle: the 64
 * bytes of a cudaIpcMemHandle_t of the allocation (cudaIpcGetMemHandle; torch's
 * storage._share_cuda_()); [offset, offset + bytes): the part of that allocation to share;
 * uuid: the 16 bytes of the device's UUID (cudaDeviceProp.uuid), which the daemon checks
 * against its engine's. KVS_ENOTSUP: a daemon on another host, without a region socket or
 * without a GPU engine (use a shared-memory region or bytes then); KVS_EINVAL: memory of
 * another GPU, or a handle the driver refuses (the message says which). The memory must
 * stay allocated until kvs_region_close. kvs_region_data is NULL for such a region:
 * libkvstash_cuda's kvs_cuda_region_create does all this for a cudaMalloc'd pointer. */
KVS_API int kvs_region_create_ipc(kvs_client *c, const void *handle, uint64_t offset,
                                  uint64_t bytes, const void *uuid, kvs_region **out, kvs_err *err);
/* True for a CUDA IPC region (its bytes are on the GPU). */
KVS_API bool kvs_region_device(const kvs_region *g);

/* An inference engine's paged KV memory inside a region (shared memory or CUDA IPC): the
 * byte offsets from the region's start of element [page 0][token 0][head 0][dim 0] of each
 * layer's K and V planes, and the strides all planes share (dims are contiguous). vLLM's
 * per-layer [2][blocks][block_size][H][D] (R = H*D*2): k_base[l] = off[l], v_base[l] =
 * off[l] + blocks*block_size*R, page_stride = block_size*R, token_stride = R, head_stride
 * = D*2; its HND order: token_stride = D*2, head_stride = block_size*D*2; SGLang's
 * page-first host pool [pages][L][2][ps][H][D]: k_base[l] = 2l*ps*R, v_base[l] =
 * (2l+1)*ps*R, page_stride = L*2*ps*R. A block of t tokens lies in ceil(t / page_tokens)
 * pages, listed in order. The daemon checks every byte's bounds against the region
 * before it touches any (README "Paged layouts"). */
typedef struct kvs_page_layout {
    uint32_t page_tokens;
    uint32_t layers;                 /* entries of k_base and v_base: the namespace's layers */
    const uint64_t *k_base, *v_base; /* borrowed for the call */
    uint64_t page_stride, token_stride, head_stride;
} kvs_page_layout;

/* One block of a PutMany: its payload in `data` (len bytes, borrowed for the call) or, with
 * data NULL, at `offset` in `region`, or (kvs_client_put_many_paged) gathered from the
 * n_pages `pages` of the region's paged memory (offset and len unused). rc, msg and res
 * are filled by the call: rc 0 and res, or the block's own error (KVS_EINVAL for a NaN a
 * lossy codec refuses, KVS_ENOSPC, ...). */
typedef struct kvs_put_item {
    const void *key;
    size_t key_len;
    uint32_t tokens;
    const void *data;
    size_t len;
    const kvs_region *region;
    uint64_t offset;
    int rc;
    char msg[160];
    kvs_put_result res;
    const uint32_t *pages; /* paged (kvs_client_put_many_paged): borrowed for the call */
    size_t n_pages;
} kvs_put_item;

/* Stores n blocks of namespace ns in one call (one round trip; the daemon encodes each as
 * soon as its bytes are in). Returns 0 when the call went through, each block's outcome in
 * its item; an error fails the whole call (a bad namespace, more than the daemon's
 * --max-keys blocks, a region id it does not know). */
KVS_API int kvs_client_put_many(kvs_client *c, const char *ns, kvs_dtype dtype, kvs_put_item *items,
                                size_t n, kvs_err *err);
/* The same, where items with pages are gathered by the daemon from the region's paged
 * memory of this layout (the engine's KV, on the GPU for a CUDA IPC region): no payload
 * crosses the socket and the worker copies nothing. Items without pages are as in
 * kvs_client_put_many. KVS_EINVAL (naming the item) for pages without a region or a
 * layout, or a layout with no bases; the daemon refuses a page past the region naming it. */
KVS_API int kvs_client_put_many_paged(kvs_client *c, const char *ns, kvs_dtype dtype,
                                      const kvs_page_layout *layout, kvs_put_item *items, size_t n,
                                      kvs_err *err);

/* One block of a GetMany: written into buf (cap bytes) or, with buf NULL, at `offset` in
 * `region` (a slot of cap bytes; the items of one call all use the same region and cap).
 * rc is 0 and res says what came, KVS_ENOTFOUND for an absent key, KVS_ENOSPC when the
 * block does not fit cap, or the block's error; `answered` says which items were. */
typedef struct kvs_get_item {
    const void *key;
    size_t key_len;
    void *buf;
    size_t cap;
    const kvs_region *region;
    uint64_t offset;
    int rc;
    char msg[160];
    bool answered;
    kvs_get_result res;
} kvs_get_item;

/* Which daemons a sharded client's get asks (kvs_cluster_opts.local). */
typedef enum kvs_route {
    KVS_ROUTE_DEFAULT = 0,     /* local first when the cluster has a local daemon */
    KVS_ROUTE_OWNER = 1,       /* only each key's owner */
    KVS_ROUTE_LOCAL_FIRST = 2, /* the local daemon, then the owners for what it lacks */
} kvs_route;

typedef struct kvs_get_many_opts {
    kvs_format format;    /* RAW (default) or ENCODED */
    uint32_t layer_begin; /* RAW: [layer_begin, layer_end); layer_end 0 = all layers */
    uint32_t layer_end;
    /* Prefix Get: stop at the first absent (or unreadable) block; *served counts the
     * leading blocks answered, and the items after them are left unanswered. */
    bool prefix;
    /* kvs_cluster_get_many only (kvs_client_get_many ignores it): whether this call asks
     * the cluster's local daemon first. Added last: zero keeps the cluster's choice. */
    kvs_route route;
    /* Paged (RAW only): each block is scattered into its pages of the items' region (every
     * item names the same region; offset and cap unused), block i into pages[i * ppb ...],
     * ppb = ceil(block_tokens / page_tokens) (a partial last block uses the first pages of
     * its share). NULL: slots or buffers as above. */
    const kvs_page_layout *layout;
    const uint32_t *pages;
    size_t n_pages;
} kvs_get_many_opts;

/* Fetches n blocks of ns in one call, decoded (or encoded), streamed in key order while
 * the daemon decodes the next ones. opts may be NULL. *served (may be NULL): items
 * answered with data. */
KVS_API int kvs_client_get_many(kvs_client *c, const char *ns, kvs_get_item *items, size_t n,
                                const kvs_get_many_opts *opts, size_t *served, kvs_err *err);

/* ------------------------------------------------------------------ admin */

/* One measured relative error of a namespace's blocks (KvAdmin ErrorStats). */
typedef struct kvs_error_stats {
    uint64_t count; /* blocks measured */
    double mean, max;
} kvs_error_stats;

/* What a namespace's codecs cost in fidelity, since the daemon started (README "Namespace
 * options"; KvAdmin FidelityStats): the blocks measured, as stored. */
typedef struct kvs_ns_fidelity {
    double error_sample;  /* share of Puts measured now (1 with max_rel_error) */
    kvs_error_stats keys; /* ||K^ - K|| / ||K|| */
    kvs_error_stats values;
    kvs_error_stats logits; /* squat with query samples: attention-logit error; else count 0 */
    uint64_t checked;       /* Puts checked against max_rel_error */
    uint64_t fallback_blocks, fallback_keys, fallback_values;
} kvs_ns_fidelity;

typedef struct kvs_ns_info {
    kvs_ns_spec spec;
    uint32_t id;
    uint64_t blocks;
    uint64_t stored_bytes; /* encoded bytes held */
    uint64_t raw_bytes;    /* payload bytes they represent */
    uint64_t block_bytes;  /* raw bytes of one full block */
    kvs_ns_fidelity fidelity;
} kvs_ns_info;

/* Creates a namespace. Empty codec names mean "none". info may be NULL. */
KVS_API int kvs_client_ns_create(kvs_client *c, const kvs_ns_spec *spec, kvs_ns_info *info,
                                 kvs_err *err);
KVS_API int kvs_client_ns_drop(kvs_client *c, const char *name, uint64_t *blocks_dropped,
                               kvs_err *err);
/* *out (owned by the caller, freed with free()) holds *n entries. */
KVS_API int kvs_client_ns_list(kvs_client *c, kvs_ns_info **out, size_t *n, kvs_err *err);
/* One namespace by name (KvAdmin.GetNamespace, which a tenant token may call for its own;
 * ListNamespaces with a daemon that predates it); KVS_ENOTFOUND if absent. */
KVS_API int kvs_client_ns_get(kvs_client *c, const char *name, kvs_ns_info *info, kvs_err *err);

typedef struct kvs_tier_stats {
    kvs_tier tier;
    uint64_t capacity_bytes, used_bytes, blocks, hits, evictions;
    /* Host and disk tiers: blocks re-encoded with the tier's colder codec as they moved
     * into it (host_codec, disk_codec: README "Namespace options"), and the stored bytes
     * that saved. */
    uint64_t recoded_blocks, recode_saved_bytes;
    /* Host tier: what each block is charged in used_bytes beyond its stored bytes (its
     * index entry and bookkeeping: README --host-capacity); 0 from a daemon that predates
     * it and for the other tiers. */
    uint64_t block_meta_bytes;
} kvs_tier_stats;

typedef struct kvs_rpc_stats {
    char method[32];
    uint64_t calls, errors;
} kvs_rpc_stats;

/* How payload bytes moved (README "Data plane"): shared memory or gRPC bytes. */
typedef struct kvs_data_plane_stats {
    uint64_t regions, region_bytes, region_pinned_bytes, region_refused;
    uint64_t put_region_bytes, put_wire_bytes, get_region_bytes, get_wire_bytes;
} kvs_data_plane_stats;

/* Progress of the long admin calls, counters since the daemon started (KvAdmin
 * AdminProgress): a client polling Stats during its own Verify or Flush sees them grow. All
 * 0 from a daemon that predates them. */
typedef struct kvs_admin_progress {
    uint64_t verify_planned, verify_checked; /* blocks Verify calls expected / checked */
    uint64_t flush_queued, flush_done;       /* host blocks Flush calls queued / finished */
} kvs_admin_progress;

typedef struct kvs_stats {
    kvs_tier_stats tiers[3];
    size_t n_tiers;
    kvs_ns_info *namespaces;
    size_t n_namespaces; /* owned by the kvs_stats */
    kvs_rpc_stats *rpcs;
    size_t n_rpcs; /* owned by the kvs_stats */
    uint64_t misses;
    uint64_t uptime_ms;
    char version[32];
    kvs_data_plane_stats data_plane;
    kvs_admin_progress admin;
    /* Each device's GPU tier (a daemon with --gpu all or a list): gpus[0..n_gpus), in the
     * daemon's order; the GPU entry of tiers is their sum. Last: the library allocates
     * kvs_stats, so it may grow. */
    struct kvs_gpu_device_stats {
        uint32_t device;
        uint64_t capacity_bytes, used_bytes, blocks, hits, demotions, promotions;
    } gpus[16];
    size_t n_gpus;
} kvs_stats;

/* *out is owned by the caller and freed with kvs_stats_free(). */
KVS_API int kvs_client_stats(kvs_client *c, kvs_stats **out, kvs_err *err);
KVS_API void kvs_stats_free(kvs_stats *s);

typedef struct kvs_health {
    bool serving; /* false while draining */
    char version[32];
    uint64_t uptime_ms;
} kvs_health;

KVS_API int kvs_client_health(kvs_client *c, kvs_health *out, kvs_err *err);

/* Verify, Flush and Evict read every block or wait for disk writes: give the client a
 * timeout_ms that fits the data (kvctl uses 10 minutes for them). */

typedef struct kvs_verify_tier {
    kvs_tier tier;
    uint64_t checked; /* blocks read and checked */
    uint64_t bad;     /* of those, failed their checksum and were dropped */
    uint64_t skipped; /* not checked (GPU blocks carry no checksum on the device) */
} kvs_verify_tier;

typedef struct kvs_verify_result {
    kvs_verify_tier tiers[3]; /* one per tier the daemon has */
    size_t n_tiers;
} kvs_verify_result;

/* Checks every stored block's checksum; bad ones are dropped (and counted) by the daemon. */
KVS_API int kvs_client_verify(kvs_client *c, kvs_verify_result *out, kvs_err *err);

typedef struct kvs_flush_result {
    uint64_t written;     /* host blocks written to the disk tier */
    uint64_t failed;      /* not written (write error, disk full, removed meanwhile) */
    uint64_t already;     /* host blocks that had a disk record already */
    uint64_t gpu_skipped; /* GPU blocks, not written (flush is host -> disk) */
} kvs_flush_result;

/* Writes every host block without a disk record to the disk tier and waits until it is
 * committed and flushed. KVS_EINVAL when the daemon has no disk tier. out may be NULL. */
KVS_API int kvs_client_flush(kvs_client *c, kvs_flush_result *out, kvs_err *err);

typedef enum kvs_evict_to {
    KVS_EVICT_HOST = 1, /* GPU blocks move to the host tier */
    KVS_EVICT_DISK = 2, /* GPU and host blocks move to the disk tier */
    KVS_EVICT_OUT = 3,  /* blocks leave the store (disk records too) */
} kvs_evict_to;

typedef struct kvs_evict_result {
    uint64_t moved;     /* now in the target tier */
    uint64_t dropped;   /* removed (KVS_EVICT_OUT) */
    uint64_t unchanged; /* already in the target tier or a colder one */
    uint64_t busy;      /* skipped: being read, written or demoted */
    uint64_t failed;    /* could not be written to disk: no longer stored */
    uint64_t absent;    /* keys not found */
} kvs_evict_result;

/* Moves blocks down to `to` or out, and returns once done. ns NULL: every block of every
 * namespace (keys must then be NULL); keys NULL (n = 0): every block of ns. out may be
 * NULL. */
KVS_API int kvs_client_evict(kvs_client *c, const char *ns, const kvs_key *keys, size_t n,
                             kvs_evict_to to, kvs_evict_result *out, kvs_err *err);

/* ------------------------------------------------------------------ sharding */

/* A sharded client (README "Sharding"): the data-path calls of kvs_client over several
 * independent daemons (no daemon knows of another), each key on one of them.
 *
 * Placement, rendezvous hashing: a key's owner is the node with the highest
 * XXH64(key, seed = XXH64(node id, seed 0)), the smaller id on a tie. A node's id is its
 * target text ("10.0.0.7:50051"; a DNS record's is "ADDR:PORT" or "[ADDR6]:PORT"). A node
 * that joins takes about 1/n of the keys from the others and moves no other key; one that
 * leaves gives only its own keys away.
 *
 * Daemons that do not answer: a call that gets UNAVAILABLE from a daemon, or no answer by its
 * deadline, marks it down. For backoff_min_ms no call contacts it; then the next call that
 * needs it tries it (one call at a time), and each failed try doubles the wait up to
 * backoff_max_ms; an answer marks it up. While a daemon is down or unreachable its keys are
 * misses for gets, lookups and exists (KVS_ENOTFOUND items, the message naming the daemon),
 * and puts fail item by item with KVS_EUNAVAIL: a key is never re-placed on another daemon
 * because its owner is down (only a change of the node set moves keys). No call takes longer
 * than opts.client.timeout_ms in all.
 *
 * Local daemon (opts.local, the node's own kvstashd, e.g. over a Unix socket): a node-local
 * cache in front of the owners. Puts go to the owner and a copy to the local daemon; gets,
 * lookups and exists ask the local daemon first and the owners only for what it lacks
 * (kvs_get_many_opts.route chooses per get). With opts.local_id (the local daemon's id in
 * the ring) the keys it owns travel over the local channel and get no second copy.
 *
 * Namespaces live in each daemon: kvs_cluster_ns_create creates one on every daemon, and the
 * cluster remembers the specs it created or read (kvs_cluster_ns_get) to create them on a
 * daemon that lacks one when a put reaches it (one that joined later, or restarted empty).
 *
 * Thread-safe like kvs_client. A batched call asks its daemons in parallel (opts.parallel
 * worker threads shared by every call, plus the caller's thread) and merges in key order.
 * Items naming a shared-memory region go by region to the daemon it is registered with
 * (create it on kvs_cluster_local's client) and as bytes from or into the region's memory
 * to any other; a CUDA IPC region reaches its own daemon only (KVS_ENOTSUP elsewhere). */
typedef struct kvs_cluster kvs_cluster;

/* Bytes of a node id, its terminating zero included. */
#define KVS_NODE_ID_MAX 264

typedef struct kvs_cluster_opts {
    /* The daemons: "HOST:PORT,HOST:PORT,..." (kvs_client targets; unix:PATH too), or
     * "dns:///NAME:PORT" (every A and AAAA record of NAME through getaddrinfo, as for a
     * Kubernetes headless Service), or "dns://SERVER[:SPORT]/NAME:PORT" (asking the DNS
     * server at the IPv4 address SERVER). PORT defaults to 50051. Required. */
    const char *targets;
    const char *local;    /* the node's own daemon ("unix:/run/kvstash/kvstash.sock"), or NULL */
    const char *local_id; /* local's id in the ring ("10.0.0.7:50051"); NULL: local's text */
    int64_t resolve_ms;   /* dns: re-resolve this often (a background thread); 0 = 10000. A
                           * failed or empty answer keeps the daemons known */
    int64_t backoff_min_ms, backoff_max_ms; /* retry of a down daemon; 0 = 100, 5000 */
    unsigned parallel;                      /* worker threads; 0 = 8 */
    /* Every daemon's client: token, timeout_ms (the deadline of a whole cluster call),
     * message and chunk sizes, TLS (target ignored). With TLS and a dns: target,
     * tls_server_name defaults to the DNS name. */
    kvs_client_opts client;
    /* Events, one line each, from the calling, worker or resolver thread, never under a lock
     * of the cluster's: the node set changing (WARN when a resolution fails and the daemons
     * known are kept, INFO when it works again), a daemon marked down (WARN) or back up
     * (INFO). NULL: none. */
    kvs_log_fn log;
    void *log_ctx;
} kvs_cluster_opts;

/* Resolves the targets (a dns: name must have records now) and creates a client per daemon
 * without waiting for connections. *out is freed with kvs_cluster_close. */
KVS_API int kvs_cluster_open(const kvs_cluster_opts *opts, kvs_cluster **out, kvs_err *err);
/* Once no other thread uses it (as kvs_client_close). NULL is allowed. */
KVS_API void kvs_cluster_close(kvs_cluster *cl);

/* The calls of kvs_client, over the cluster (see above for daemons that are down). */
KVS_API int kvs_cluster_put(kvs_cluster *cl, const char *ns, const void *key, size_t key_len,
                            uint32_t tokens, kvs_dtype dtype, const void *data, size_t len,
                            kvs_put_result *res, kvs_err *err);
/* KVS_ENOTFOUND when absent, or when its owner (and the local daemon) did not answer. */
KVS_API int kvs_cluster_get(kvs_cluster *cl, const char *ns, const void *key, size_t key_len,
                            void *buf, size_t cap, kvs_get_result *res, kvs_err *err);
KVS_API int kvs_cluster_put_many(kvs_cluster *cl, const char *ns, kvs_dtype dtype,
                                 kvs_put_item *items, size_t n, kvs_err *err);
/* Prefix: the leading present blocks in key order across every daemon (it stops at the
 * first miss of the merged order, a down daemon's key included). */
KVS_API int kvs_cluster_get_many(kvs_cluster *cl, const char *ns, kvs_get_item *items, size_t n,
                                 const kvs_get_many_opts *opts, size_t *served, kvs_err *err);
KVS_API int kvs_cluster_lookup(kvs_cluster *cl, const char *ns, const kvs_key *keys, size_t n,
                               uint32_t *prefix, kvs_tier *tiers, kvs_err *err);
KVS_API int kvs_cluster_exists(kvs_cluster *cl, const char *ns, const kvs_key *keys, size_t n,
                               bool *present, kvs_err *err);
/* From the owners and the local daemon; *deleted counts the owners' deletions. KVS_EUNAVAIL
 * (after deleting the rest) when a daemon that may hold some of the keys did not answer. */
KVS_API int kvs_cluster_delete(kvs_cluster *cl, const char *ns, const kvs_key *keys, size_t n,
                               uint32_t *deleted, kvs_err *err);

/* On every daemon up now (one that has it with the same shape counts as created); info (may
 * be NULL) is one daemon's. KVS_EUNAVAIL when none answered. */
KVS_API int kvs_cluster_ns_create(kvs_cluster *cl, const kvs_ns_spec *spec, kvs_ns_info *info,
                                  kvs_err *err);
/* From every daemon up now; *blocks_dropped (may be NULL) sums them. */
KVS_API int kvs_cluster_ns_drop(kvs_cluster *cl, const char *name, uint64_t *blocks_dropped,
                                kvs_err *err);
/* The namespace as one daemon has it (the local one, else the first by id); KVS_ENOTFOUND
 * when no daemon that answered has it. */
KVS_API int kvs_cluster_ns_get(kvs_cluster *cl, const char *name, kvs_ns_info *info, kvs_err *err);

/* The local daemon's client (borrowed until kvs_cluster_close), or NULL: for its regions and
 * its admin calls. */
KVS_API kvs_client *kvs_cluster_local(kvs_cluster *cl);

/* The id of the key's owner in the current node set. */
KVS_API int kvs_cluster_owner(kvs_cluster *cl, const void *key, size_t key_len,
                              char id[KVS_NODE_ID_MAX], kvs_err *err);

typedef struct kvs_cluster_node {
    char id[KVS_NODE_ID_MAX]; /* the local daemon: its target */
    bool local;               /* opts.local (not a ring member) */
    bool up;                  /* false while marked down */
    int64_t retry_in_ms;      /* down: until a call may try it again (0: the next may) */
    uint64_t failures;        /* calls it did not answer, since it joined */
    char why[160];            /* down: the failure that marked it */
} kvs_cluster_node;

/* The daemons now: the ring's in id order, then the local one. *n is set to their count
 * and the first min(count, cap) are written to out (NULL with cap 0: count only). */
KVS_API int kvs_cluster_nodes(kvs_cluster *cl, kvs_cluster_node *out, size_t cap, size_t *n,
                              kvs_err *err);

/* ------------------------------------------------------------------ block keys */

#define KVS_CHAIN_KEY_LEN 16

/* Chained block key (DESIGN §1): out = XXH3-128 (seed 0) over prev (16 bytes; NULL means
 * 16 zero bytes, the key before block 0) followed by tokens[0..n) as little-endian
 * uint32, written in XXH128's canonical (big-endian) form. */
KVS_API void kvs_key_chain(const uint8_t prev[KVS_CHAIN_KEY_LEN], const uint32_t *tokens, size_t n,
                           uint8_t out[KVS_CHAIN_KEY_LEN]);

/* Keys of a whole sequence cut into blocks of block_tokens: keys[i] covers tokens
 * [i*block_tokens, min((i+1)*block_tokens, n_tokens)), the last block may be partial.
 * Writes min(needed, max_keys) keys and returns how many keys the sequence needs. */
KVS_API size_t kvs_key_chain_seq(const uint32_t *tokens, size_t n_tokens, uint32_t block_tokens,
                                 kvs_key *keys, size_t max_keys);

#ifdef __cplusplus
}
#endif
#endif
