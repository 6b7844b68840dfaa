/* The data path (DESIGN §2): the one module between a caller that speaks a protocol (the
 * daemon's gRPC calls today; shared memory, CUDA IPC and a Python package next) and the
 * tiers. It owns every decision about a block's bytes on their way in and out:
 *   - placement: a GPU tier when an engine can encode into a slot there (and no
 *     RotateKV calibration wants the raw keys on the host): the source's own device for
 *     GPU memory, the device with the most free bytes for host bytes (several devices:
 *     opts.engine); else the host tier (which may evict to make room); durable namespaces
 *     always go through the host tier to disk;
 *   - the codecs: the namespace's own in the GPU tier; in the host tier, for each side,
 *     the host tier's codec where the namespace names a colder one (precision demotion,
 *     storage/store.h invariant 9: the block is encoded so from its input, not re-encoded);
 *   - the coder: the GPU engine when it has kernels for the codecs, else the CPU codecs
 *     on the caller's pool (opts.run);
 *   - the codec state versions: a block is decoded with the codecs it was encoded with
 *     (kvs_ns_block_codecs), which may predate the namespace's current ones, or be its
 *     fallback codec or a colder tier's;
 *   - fidelity (issue 16): which Puts are measured and what a bound does (below);
 *   - promotion on Get (disk -> host in the store, host -> GPU through the tiering, to
 *     the reader's device when the destination is GPU memory).
 * Callers parse and validate their requests, hand a source or a destination to the data
 * path, and answer when it calls back.
 *
 * Sources and destinations are a tagged buffer (kvs_xfer_buf): a host buffer (pinned or
 * not: the engine moves pinned ones by DMA without its staging), or GPU memory (CUDA IPC:
 * the engine moves it with device copies; the CPU steps bounce it through the host, here
 * and nowhere else). A new transport adds a kind, not a path.
 *
 *   Put:  kvs_xfer_put ──> [measured?] ──> reserve a tier ──> [learn] ──> encode (engine |
 *         pool) ──> [measure (pool): decode, error; over the bound: the side again with the
 *         fallback codec] ──> consumed(arg) ──> commit (durable: the disk writer commits and
 *         flushes first) ──> done(arg, rc)
 *   Get:  kvs_xfer_get_open (find) ──> kvs_xfer_get_run: [read from disk (pool)] ──>
 *         [promote] ──> decode into dst (engine | pool) or make the encoded bytes ready ──>
 *         done(arg, rc) ──> kvs_xfer_get_close
 *
 * Fidelity: a Put is measured when its namespace has a bound (max_rel_error: every Put),
 * else with probability error_sample (the namespace's, else opts.error_sample). A measured
 * block skips the GPU tier (it lands in the host tier; a Get may promote it later): it is
 * encoded as usual, then decoded, compared with the input (gpu/codec/fidelity.h) and
 * counted in the namespace's accumulator. The GPU engine measures what it encodes in the
 * same batch (engine.h "Measured encode": a decode and a reduction on the device, the sums
 * back with the encoded block); the CPU measures on the pool what the CPU encoded, what the
 * engine could not measure, and the logit error of a squat namespace with query samples
 * (it holds the Gram). The input is held until then (consumed runs after). With a bound, a
 * side whose relative error passes it is encoded again on the CPU with the namespace's
 * fallback codec (a new host block if it does not fit the reservation) and measured again
 * there; the block's header says so, and a Get's promotion to the GPU tier keeps those
 * codecs (storage/tiering.c). A GPU source of a measured Put is copied to the host first.
 * kvs_xfer_stats counts the measurements by where they ran (MEASURE: ops[2]).
 *
 * Threading: every function may be called from any thread. Callbacks run exactly once,
 * on the caller's completion thread (opts.run), on the disk writer's for a durable Put,
 * or inside the call that started it; never on the engine thread (consumed may: it only
 * frees a buffer). They must not block.
 */
#ifndef KVS_STORAGE_XFER_H
#define KVS_STORAGE_XFER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "gpu/base/err.h"
#include "gpu/base/log.h"
#include "gpu/codec/paged.h"
#include "storage/store.h"

struct kvs_engine;
struct kvs_tiering;

typedef struct kvs_xfer kvs_xfer;

/* Where payload bytes are. */
typedef enum kvs_xfer_mem {
    KVS_XFER_HOST = 1,   /* host memory of this process (pinned or not) */
    KVS_XFER_DEVICE = 2, /* GPU memory the engine reaches (a worker's, by CUDA IPC): the
                          * engine reads and writes it; a step on the CPU (a codec without
                          * kernels, RotateKV's calibration) copies it through the host */
} kvs_xfer_mem;

/* A source or destination of raw payload bytes, layout [L][2][t][H][D] (a Get's
 * destination: the requested layers only). Borrowed by the data path for the time its
 * call documents. */
typedef struct kvs_xfer_buf {
    kvs_xfer_mem kind;
    uint8_t *ptr;
    size_t len;
    /* A Get's DEVICE destination may be paged (gpu/codec/paged.h): ptr and len are then
     * the worker's paged KV memory and the layers are scattered into the block's pages,
     * which the caller checked (kvs_paged_check) against len. Borrowed like ptr. Only the
     * GPU engine writes such a destination (KVS_EUNAVAIL without it). */
    const kvs_paged_layout *lay;
    const uint32_t *pages;
    uint8_t gpu; /* DEVICE: the device it is on (an index into opts.engine) */
} kvs_xfer_buf;

typedef struct kvs_xfer_opts {
    kvs_store *store; /* borrowed; outlives the data path */
    /* The GPU engines, one per device, numbered as the store's gpu tiers (engine[g] runs
     * device g's tier; store.h opts.gpu): the leading non-NULL entries. Borrowed; none:
     * CPU codecs only. A block in a gpu tier is coded by its device's engine; a DEVICE
     * buffer by its own device's (kvs_xfer_buf.gpu); host bytes by the engines in turn.
     * A block read into another device's memory is decoded by the destination's engine:
     * straight from the block's slot where it has peer access to that device (the encoded
     * bytes cross the link), else from the block fetched to the host as encoded bytes (they
     * cross the bus twice); never the raw ones. */
    struct kvs_engine *engine[KVS_STORE_GPUS_MAX];
    /* Cross-device Gets always go through the host, even where the destination's engine
     * could read the block's device by peer access (tests of that path; default: peer
     * where kvs_engine_peer_enable allows it, found at create). */
    bool no_peer;
    struct kvs_tiering *tiering; /* borrowed, may be NULL: no GPU tier moves */
    /* Runs fn(arg) off the calling thread (a pool), then done(arg) on the caller's
     * completion thread; fn NULL: done alone, there. The GPU engine's completions come
     * back through it (fn NULL), so commits, evictions and answers never run on the engine
     * thread, which only drives the GPU. NULL runs both inline. The daemon's: its libuv
     * pool, completions on the loop thread. */
    void (*run)(void *ctx, void (*fn)(void *), void (*done)(void *), void *arg);
    void *run_ctx;
    kvs_log_fn log; /* may be NULL */
    void *log_ctx;
    double error_sample; /* share of Puts measured where a namespace sets none (0..1) */
} kvs_xfer_opts;

/* Small fixed allocation: aborts when out of memory. */
kvs_xfer *kvs_xfer_create(const kvs_xfer_opts *o);
/* Changes opts.error_sample (a config reload); Puts that start later use it. */
void kvs_xfer_set_error_sample(kvs_xfer *x, double share);
/* The share of a namespace's Puts that are measured now: 1 with a bound, else its own
 * error_sample, else opts.error_sample. */
double kvs_xfer_error_sample(kvs_xfer *x, const kvs_ns_spec *spec);
/* No operation may be in progress. NULL is fine. */
void kvs_xfer_destroy(kvs_xfer *x);

/* Codec work the data path did, for operators (daemon/metrics.c), indexed [op][where]:
 * op 0 encode (a Put), 1 decode (a Get in raw format), 2 measure (a Put's error, above);
 * where 0 the CPU (the pool), 1 the GPU engine. Successful operations only. CPU time is the
 * codec call's own; GPU time runs from the submission to the engine's completion, so it
 * includes the wait in the engine's queue (what a request pays); a GPU measurement's time
 * is inside its encode's (0 here). raw: payload bytes (a decode: the layers asked
 * for); encoded: the encoded block's bytes. Relaxed atomics, read one by one. */
typedef struct kvs_xfer_stats {
    uint64_t ops[3][2];
    uint64_t ns[3][2];
    uint64_t raw_bytes[3][2];
    uint64_t encoded_bytes[3][2];
} kvs_xfer_stats;
void kvs_xfer_get_stats(kvs_xfer *x, kvs_xfer_stats *out);

/* A host buffer of n bytes for a payload the engine will read or write: from the pinned
 * host pool when there is one with room, so the engine moves it by DMA; else malloc.
 * NULL when out of memory. Free with kvs_xfer_host_free (NULL is fine). */
uint8_t *kvs_xfer_host_alloc(kvs_xfer *x, size_t n);
void kvs_xfer_host_free(kvs_xfer *x, uint8_t *p);

/* A Put's paged source (gpu/codec/paged.h): src holds an engine's pages (src->lay and
 * src->pages set, checked by kvs_paged_check against src->len for `tokens` tokens) and
 * the block is gathered into a contiguous buffer of its own, *out, layout [L][2][t][H][D]:
 * host memory (kvs_xfer_host_alloc) gathered by the CPU for a HOST source, device memory
 * gathered by the GPU engine for a DEVICE one (KVS_EUNAVAIL without an engine). *out is
 * then a Put's source like any other; give it back with kvs_xfer_buf_release once the
 * Put consumed it. KVS_ENOMEM when there is no room. Any thread; synchronous. */
int kvs_xfer_gather(kvs_xfer *x, const kvs_xfer_buf *src, uint32_t tokens, kvs_xfer_buf *out,
                    kvs_err *err);
void kvs_xfer_buf_release(kvs_xfer *x, kvs_xfer_buf *b);

/* ---------------------------------------------------------------- Put */

typedef struct kvs_xfer_put_req {
    kvs_ns *ns;      /* borrowed; a reference held by the caller until done */
    const void *key; /* 1..KVS_KEY_MAX bytes, copied */
    size_t key_len;
    uint32_t tokens;  /* 1..block_tokens */
    kvs_xfer_buf src; /* exactly kvs_spec_block_bytes(tokens) bytes, borrowed until consumed */
    /* The payload has been read: src may be freed. Runs before done (may be NULL). */
    void (*consumed)(void *arg);
    /* The end: rc 0 and info (borrowed for the call) when stored, else rc and err naming
     * the cause (KVS_ENOSPC: no room in any tier, or a durable Put with no room on disk;
     * KVS_EINVAL: NaN/Inf or values a codec cannot store, naming the element; KVS_ENOTFOUND:
     * the namespace was dropped; KVS_EINTERNAL: an encoder failure; KVS_EUNAVAIL: a
     * durable write that failed). */
    void (*done)(void *arg, int rc, const kvs_err *err, const kvs_store_put_info *info);
    void *arg;
} kvs_xfer_put_req;

/* Stores a block: see the diagram above. 0: done (and consumed) will run; otherwise
 * neither runs and err says why (the request is malformed or nothing could be reserved). */
int kvs_xfer_put(kvs_xfer *x, const kvs_xfer_put_req *r, kvs_err *err);

/* ---------------------------------------------------------------- Get */

typedef struct kvs_xfer_get kvs_xfer_get;

typedef struct kvs_xfer_get_req {
    kvs_ns *ns;      /* borrowed; the caller holds a reference until close */
    const void *key; /* validated by the caller; borrowed for the call */
    size_t key_len;
    bool encoded;                    /* the stored block as it is (kvs_xfer_get_encoded) */
    uint32_t layer_begin, layer_end; /* raw: the layers to decode, validated */
} kvs_xfer_get_req;

/* Finds the block (KVS_ENOTFOUND; KVS_EDATALOSS when a host block fails its checksum) and
 * holds it (neither eviction nor delete frees it) until kvs_xfer_get_close. */
int kvs_xfer_get_open(kvs_xfer *x, const kvs_xfer_get_req *r, kvs_xfer_get **out, kvs_err *err);
uint32_t kvs_xfer_get_tokens(const kvs_xfer_get *g);
/* The tier the bytes come from (valid after run's done: a disk block read into the host
 * tier by the read says HOST, one read for this Get alone says DISK). */
kvs_store_tier kvs_xfer_get_tier(const kvs_xfer_get *g);
/* The codec roles of the block's sides, packed (gpu/codec/codec.h kvs_enc: own, fallback,
 * host or disk codec; kvs_enc_fallback gives its fallback sides). */
unsigned kvs_xfer_get_enc(const kvs_xfer_get *g);
/* Raw: bytes of the requested layers, what dst must hold. */
uint64_t kvs_xfer_get_raw_bytes(const kvs_xfer_get *g);
/* Raw: decodes the requested layers into dst (borrowed until done). Encoded: makes the
 * stored bytes ready (kvs_xfer_get_encoded): where they are (dst NULL), or copied into dst,
 * host memory (a shared-memory region's slot: a GPU block is fetched straight into it by
 * DMA when dst.len holds the codecs' largest block; KVS_ENOSPC in done when the block does
 * not fit dst.len). done(arg, rc, err) once: rc
 * KVS_EDATALOSS for stored bytes that cannot be read (dropped), KVS_ENOTFOUND (a disk
 * record gone meanwhile), KVS_EIO, KVS_ENOMEM, KVS_EINTERNAL. Nonzero return: done never
 * runs. Once per open. */
int kvs_xfer_get_run(kvs_xfer_get *g, const kvs_xfer_buf *dst,
                     void (*done)(void *arg, int rc, const kvs_err *err), void *arg, kvs_err *err);
/* Encoded: the stored block (borrowed until close), after run's done with rc 0. */
const uint8_t *kvs_xfer_get_encoded(const kvs_xfer_get *g, size_t *len);
/* Releases the block and what the Get holds. NULL is fine. */
void kvs_xfer_get_close(kvs_xfer_get *g);

#endif
