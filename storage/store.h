/* The store: namespaces, the block index and the tiers behind one facade.
 *
 * Tiers (DESIGN §7): gpu (optional: fixed-size slots in a device region the GPU engine
 * allocated, storage/slots.h; one such tier per device, opts.gpu, each with its own
 * capacity, watermarks and LRU, a block in exactly one of them: kvs_block_gpu), host (RAM, byte
 * capacity) and disk (optional: an LMDB environment, storage/disk.h, with a byte budget). Blocks
 * arrive here already encoded (gpu/codec/codec.h); each namespace owns its key and value codecs.
 * Each tier has its own LRU list. The host tier evicts idle blocks to make room, in the order of
 * its eviction policy (opts.eviction, storage/policy.h: LRU, or the scan-resistant S3-FIFO; its LRU
 * list then only enumerates its blocks); the gpu tier never evicts: above its high watermark the
 * daemon demotes its least recently used idle blocks to the host tier (kvs_store_gpu_pick, then
 * kvs_store_demote_commit once the engine fetched the bytes), so a Put that finds the gpu tier full
 * simply lands in the host tier. The store itself never touches device memory. With a disk tier,
 * the host tier's victims are not dropped but handed to the disk writer (storage/writer.h, its
 * hooks in storage/store_disk.c), which writes them off the request path and then turns their index
 * entries into disk entries (no payload); the same happens in the background (the writer asks,
 * kvs__store_host_demote) once the host tier passes its high watermark, down to its low one, so
 * that Puts rarely evict on their path; a Get of a disk block reads it back (verified) and, unless
 * opts.no_promote, moves it to the host tier, where it keeps its disk record. A block of a
 * `durable` namespace is committed with kvs_store_block_commit_durable: linked at once, written to
 * LMDB with a flush by the disk writer, and reported done only then (the daemon acknowledges the
 * Put at that point). Quotas (kvs_ns_spec host_quota, gpu_quota, disk_quota; 0 = none): a
 * namespace's share of a tier (kvs_ns_usage host_bytes, gpu_bytes, disk_bytes) never passes its
 * quota there, and a namespace at its quota makes room among its own blocks, never another's; only
 * a tier's own shortage (every namespace within its quota) takes blocks across namespaces. Host: a
 * Put evicts the namespace's own idle blocks in policy order (block_alloc), else KVS_ENOSPC naming
 * host_quota_bytes. GPU: a slot over the quota is refused (kvs_store_block_alloc_gpu), so the Put
 * lands in the host tier as when the tier is full, and demotion rounds move the namespace's own
 * least recently used idle blocks to the host tier once it is above the tier's high share of its
 * quota, down to the low share (store_gpu.c). Disk: the disk writer's room hook (store_disk.c)
 * deletes the namespace's own oldest records (disk entries, then records of host blocks) before a
 * write of its blocks that would pass the quota; when none of its own can go (durable, busy), the
 * write is refused with KVS_ENOSPC naming disk_quota_bytes: a durable Put is answered with it, a
 * spilled victim is dropped as when the disk budget is full.
 *
 * Precision demotion (gpu/codec/spec.h host_codec, disk_codec): a block's sides may be
 * encoded with a colder codec than the namespace's own, as its header says and
 * kvs_block_enc keeps (gpu/codec/codec.h kvs_enc). Blocks arrive here already re-encoded:
 * a Put into the host tier by the data path (storage/xfer.h), a GPU block by the
 * demoter, which hands kvs_store_demote_commit a host block of the host tier's codecs
 * (the GPU engine re-encodes it on the device, storage/tiering.h). Only the spill to disk
 * is re-encoded here: the disk writer encodes the block again with the disk tier's codecs
 * on its own thread, outside the lock, before writing it (store_disk.c), and a block whose
 * disk record is hotter than the disk tier's codecs (a flushed or durable copy) is written
 * again that way rather than become a disk entry of that record. Each changes the block's
 * stored size: the counters follow the bytes actually held (invariants 1, 7), and
 * host_recoded / disk_recoded count the re-encodes and the bytes they saved.
 * Persistence (storage/persist.c): a namespace's spec is recorded in the disk tier when
 * it is created, and each learned codec state version before it is published (so before
 * any block is encoded with it); its records go when it is dropped. kvs_store_create
 * recreates the recorded namespaces under their ids with every recorded state version,
 * and indexes every stored block of them (persist.c: what happens to blocks whose state
 * record is unreadable, and to blocks that can never be served).
 *
 * Block states (kvs_block_state in store_int.h; one at a time, changed only through
 * kvs__block_set_state, which asserts each transition below; independent of the state, a
 * block may have a record in the disk tier: the on_disk bit, invariant 7):
 *
 *   block_alloc(_gpu) ─> FILLING ─commit─> IDLE <──────────────────────────────────┐
 *        (reserved)        │ └─commit_durable─> WRITING ─written / copy failed──────┤
 *                          └─abort─> freed        ▲ kvs_store_flush, flush_sync ────┤IDLE
 *   IDLE ─host eviction, evict to disk──> SPILLING ─written: a disk entry replaces it┤
 *   IDLE ─promote_begin──> PROMOTING ─cancel──────────────────────────────────────>─┤
 *   IDLE ─gpu_pick, evict─> DEMOTING ─cancel, or the swap did not happen─────────>──┤
 *   IDLE ─writer's eviction (make_disk_room)─> UNRECORDING ─record gone, copy stays─┘
 *   any of IDLE, WRITING, SPILLING, PROMOTING, DEMOTING, UNRECORDING ─unlink (delete,
 *        replace, ns drop, eviction, a swap that replaced it)─> UNLINKED ─last unref─> freed
 *   a disk read for one reader (no room to promote) ─> TRANSIENT ─release─> freed
 *
 * A block is in the index in every state but FILLING, UNLINKED and TRANSIENT. An operation
 * in flight holds its own reference; when the block is unlinked meanwhile, the operation
 * finds UNLINKED at its end and leaves it so. Where a block's bytes are counted is its
 * `charge` (host, spill queue, gpu slot, none), returned with its last reference.
 *
 * Invariants:
 *  1. used_bytes = bytes of every block that is FILLING, linked, or UNLINKED but still
 *     referenced, plus KVS_STORE_BLOCK_META for each (its bookkeeping); a namespace's
 *     stored_bytes counts the bytes alone. used_bytes <= capacity at all times (reservation happens
 * before any payload byte is allocated, so concurrent Puts cannot overshoot). Each namespace's
 *     host_bytes is its blocks' share of host_used, and <= its host quota (reserved under
 *     the lock in the same step).
 *  2. A linked block is in the index and in its tier's LRU exactly once; a linked host
 *     block is also in the host policy, until it is evicted (SPILLING blocks are not).
 *  3. Eviction only takes IDLE blocks with no readers (refs == 1, the index's own);
 *     busy blocks are skipped, never waited for.
 *  4. Every host block is an encoded block whose own XXH3-64 (gpu/codec/format.h) is
 *     checked on every read; a mismatch unlinks the block, counts it, and answers
 *     KVS_EDATALOSS. GPU blocks have no checksum while on the device (the engine seals the
 *     bytes when it fetches them).
 *  5. gpu_used = slot bytes of every GPU block that is FILLING, linked, or UNLINKED but
 *     still referenced; a block's slot is returned with its last reference. Each
 *     namespace's gpu_bytes is its blocks' share (kvs__store_gpu_charge_locked), <= its gpu
 *     quota (checked under the lock with the slot's allocation).
 *  6. A DEMOTING block carries the demoter's reference and is picked only once; its slot
 *     counts in gpu_picked and in its namespace's gpu_picked until the demotion ends.
 *  7. disk_used = bytes of the linked blocks whose record is in the disk tier (on_disk:
 *     every disk entry, host blocks promoted from disk or written durably, and gpu blocks
 *     promoted from such host blocks or demoted back); disk
 *     entries and transient disk reads hold no host budget. Each namespace's disk_bytes is
 *     its blocks' share (kvs__store_disk_record_locked: every change of on_disk or of a
 *     linked on_disk block goes through it, so kvs_store_create's restore, which links the
 *     recorded blocks, recomputes it exactly). Records are added only on the disk writer's
 *     thread (its finish hook), after its room hook found room for them in the budget and
 *     in their namespace's disk quota, counting the run's blocks written but not yet
 *     finished: so disk_bytes <= the disk quota, as disk_used <= the budget, and
 *     disk_records (counted with disk_used) <= disk_max_records: each record is indexed
 *     in memory, which the byte budget alone does not bound.
 *  8. A SPILLING block holds the writer's reference, is never picked again, and its bytes
 *     count in spill_pending (bounded by spill_max; past it, victims are dropped as without
 *     a disk tier) instead of host_used. Removing a block that is on disk or being written
 *     (WRITING, SPILLING) queues the removal of its record after the write (one FIFO), so a
 *     record never outlives its block's removal by more than the writer's queue. Exception:
 *     a durable commit that replaces a block queues no removal; its own write replaces the
 *     record (or, failing, re-indexes it: README, durable contract).
 *  9. Every side of a block in the host or disk tier is encoded no larger
 *     (kvs_codec_section_max) than that tier's codec and the host tier's, where the spec
 *     names them (kvs_ns_colder: never re-encoded larger); a block in the GPU tier keeps
 *     what it had (a Put's own codecs, or a promoted block's colder ones). Exception: a disk
 *     record written while its block stayed in the host tier (flush, durable) is that
 *     block's bytes; when the block leaves the host tier the disk writer writes it again,
 *     re-encoded, and only where it cannot (its queue full, the write failed) does the old
 *     record become the disk entry as it is.
 *
 * Events (opts.on_event): every change of the index is reported, in the order it happens,
 * to one sink, so that a subscriber replaying them holds, for every key, the tier that
 * kvs_store_lookup reports (daemon/events.h publishes them for cache-aware routers).
 * kvs__store_link_locked reports STORED (the block's tier) and kvs__store_unlink_locked
 * REMOVED (the tier it left): commits, replacements, evictions, spills, demotions,
 * promotions, deletes, checksum failures and an operator's evict all go through those
 * two. A move between tiers is therefore REMOVED(old tier) then STORED(new tier), back to
 * back under one hold of the lock; a replace in the same tier is REMOVED then STORED of
 * the same tier. A disk record of a host or GPU block is no tier of its own (the block
 * reads HOST or GPU, as Lookup says). A namespace drop reports one CLEARED instead of
 * each of its blocks. Not reported: the blocks indexed from the disk tier by
 * kvs_store_create (no one can be listening yet) and those kvs_store_destroy lets go.
 *
 * Threading and locks: every function is thread-safe. One mutex (store->mu) guards the
 * index, the LRUs, the namespace registry and all counters. Lock order (the one place it
 * is written down): store->mu, then the disk writer's queue lock (writer.c), then the
 * disk module's writer lock (disk.c, only ever taken by the writer thread and by reads
 * with no store lock held) -- in practice store->mu is held only to queue, never across
 * an LMDB transaction or a CUDA call, and never while payload bytes are copied or
 * hashed. Block payloads are written only in FILLING (by the one caller that allocated
 * the block) and are read-only once committed.
 */
#ifndef KVS_STORAGE_STORE_H
#define KVS_STORAGE_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "gpu/base/err.h"
#include "gpu/base/log.h"
#include "gpu/codec/spec.h"
#include "storage/disk.h"
#include "storage/hostpool.h"
#include "storage/ns.h"
#include "storage/policy.h"

typedef struct kvs_store kvs_store;
typedef struct kvs_block kvs_block;

/* Most devices one store keeps gpu tiers on (a node's GPUs: 8 today, 16 leaves room). */
#define KVS_STORE_GPUS_MAX 16

typedef enum kvs_store_tier {
    KVS_STORE_TIER_NONE = 0,
    KVS_STORE_TIER_GPU = 1,
    KVS_STORE_TIER_HOST = 2,
    KVS_STORE_TIER_DISK = 3,
} kvs_store_tier;

/* One change of the index (store.h, "Events"). Every pointer is borrowed for the call. */
typedef enum kvs_store_event_kind {
    KVS_STORE_EV_STORED = 1,  /* key now readable in `tier` */
    KVS_STORE_EV_REMOVED = 2, /* key no longer in `tier` (gone, or moving: a STORED follows) */
    KVS_STORE_EV_CLEARED = 3, /* namespace dropped with every block (key NULL, tier NONE) */
} kvs_store_event_kind;

typedef struct kvs_store_event {
    kvs_store_event_kind kind;
    kvs_store_tier tier;
    const char *ns;        /* namespace name */
    uint32_t block_tokens; /* the namespace's tokens per full block (T) */
    const void *key;       /* 1..KVS_KEY_MAX bytes; NULL for CLEARED */
    size_t key_len;
} kvs_store_event;

/* The event sink. Runs with the store lock held, on whichever thread changed the index
 * (request, loop, pool, disk writer, an admin verb): it must not block, must not call into
 * the store, and may take only a leaf lock (daemon/THREADS.md). */
typedef void (*kvs_store_event_fn)(void *ctx, const kvs_store_event *ev);

/* Host bytes a block is charged beyond its stored bytes: its kvs_block, index entry, policy
 * node and the allocator's share (the daemon's RSS grew by about 510 bytes a block for
 * 200k one-token blocks). With it, host_capacity bounds the memory the host tier's blocks
 * take whatever their size: without it, blocks of a few hundred bytes held about three
 * times the capacity in bookkeeping. */
#define KVS_STORE_BLOCK_META 512u

/* kvs_store_opts.disk_max_records when 0: the disk tier's index may take an eighth of the
 * host tier's capacity in memory beside it (a deployment sizes --host-capacity to most of
 * its RAM), and at least 512 MiB (a million records). */
#define KVS_STORE_DISK_RECORDS_AUTO(host_capacity)                                                 \
    ((host_capacity) / KVS_STORE_BLOCK_META / 8 > (1u << 20)                                       \
         ? (host_capacity) / KVS_STORE_BLOCK_META / 8                                              \
         : (uint64_t)(1u << 20))

typedef struct kvs_store_opts {
    uint64_t host_capacity; /* bytes of the host tier */
    /* GPU tiers, one per device, in the order the caller numbers its devices (a block's
     * kvs_block_gpu): the leading entries with a base and a capacity; none: no GPU tier.
     * Each region is a device address range (borrowed) the store never touches. */
    struct {
        uintptr_t base;
        uint64_t capacity;
    } gpu[KVS_STORE_GPUS_MAX];
    uint64_t gpu_slab;       /* slab size (0: 64 MiB, at most capacity/4) */
    unsigned gpu_high_pct;   /* demote above this share of each gpu tier (0: 90) */
    unsigned gpu_low_pct;    /* ...down to this share (0: 80) */
    uint32_t calib_tokens;   /* RotateKV calibration tokens N_cal (0 = 4096) */
    unsigned max_namespaces; /* namespaces kvs_store_ns_create may bring to exist (0: no
                              * bound); those restored from the disk tier always load */
    kvs_disk *disk;          /* disk tier (borrowed: opened and closed by the caller, and
                              * must outlive the store), or NULL: no disk tier */
    uint64_t disk_capacity;  /* byte budget of the disk tier */
    /* Records the disk tier holds at most (0: auto, KVS_STORE_DISK_RECORDS_AUTO). Each is
     * indexed in memory (KVS_STORE_BLOCK_META bytes, about), so the byte budget alone let
     * blocks of a few hundred bytes fill RAM with the index: this bounds it. */
    uint64_t disk_max_records;
    uint64_t spill_max;      /* most bytes queued for the disk writer (0: host/4) */
    unsigned host_high_pct;  /* with a disk tier: demote host blocks to disk in the
                              * background above this share of the host tier (0: 90)... */
    unsigned host_low_pct;   /* ...down to this share (0 with host_high_pct 0: 80) */
    kvs_hostpool *host_pool; /* host blocks come from this pool (borrowed; outlives the
                              * store), malloc when it has no room; NULL: malloc */
    bool no_promote;         /* a Get leaves disk blocks on disk and host blocks in the
                              * host tier (default: promote them one tier up) */
    /* The GPU codec engines, one per gpu tier's device (borrowed; outlive the store): the
     * leading non-NULL entries; every codec the store adds to a namespace is prepared
     * for each first (kvs_engine_prepare). None: CPU codecs only. */
    struct kvs_engine *engine[KVS_STORE_GPUS_MAX];
    kvs_policy_kind eviction;    /* host tier eviction policy (0: KVS_POLICY_LRU) */
    uint32_t eviction_small_pct; /* S3-FIFO: the small queue's share of the host tier, 1..50
                                  * (0: the policy's default, 10) */
    kvs_store_event_fn on_event; /* index changes (store.h "Events"), or NULL: none */
    void *event_ctx;             /* its first argument (borrowed; outlives the store) */
    kvs_log_fn log;              /* may be NULL */
    void *log_ctx;
} kvs_store_opts;

int kvs_store_create(const kvs_store_opts *opts, kvs_store **out, kvs_err *err);
/* Frees everything. No block may still be referenced. */
void kvs_store_destroy(kvs_store *st);

/* ---------------------------------------------------------------- namespaces */

/* Validates spec and registers it; *out (may be NULL) gets a new reference. Fails with
 * KVS_EINVAL (field named; `durable` without a disk tier), KVS_EEXIST, or KVS_ENOSPC
 * when one full block would not fit in the host tier. */
int kvs_store_ns_create(kvs_store *st, const kvs_ns_spec *spec, kvs_ns **out, kvs_err *err);
/* Looks a namespace up; *out gets a new reference (release with kvs_ns_unref).
 * KVS_ENOTFOUND names the namespace. */
int kvs_store_ns_find(kvs_store *st, const char *name, kvs_ns **out, kvs_err *err);
/* Drops a namespace and all its blocks (readers in progress finish first, on their own
 * references). *blocks_dropped may be NULL. */
int kvs_store_ns_drop(kvs_store *st, const char *name, uint64_t *blocks_dropped, kvs_err *err);

typedef struct kvs_store_ns_info {
    kvs_ns_spec spec;
    uint32_t id;
    kvs_ns_usage usage;
    uint32_t key_state, value_state; /* current codec state versions */
    kvs_fidelity_stats fidelity;     /* measured error since start (storage/xfer.h) */
} kvs_store_ns_info;

/* Snapshot of every namespace; *out is malloc'ed (free with free()), *n entries. */
int kvs_store_ns_list(kvs_store *st, kvs_store_ns_info **out, size_t *n, kvs_err *err);

/* ---------------------------------------------------------------- blocks */

/* Reserves `bytes` in the host tier (evicting idle blocks in policy order as needed)
 * and allocates a block of that size for namespace ns (a reference is taken) holding
 * `tokens` tokens. The caller fills kvs_block_data() and then commits or aborts.
 * KVS_ENOSPC if nothing more can be evicted, KVS_ENOMEM if the allocation fails. */
int kvs_store_block_alloc(kvs_store *st, kvs_ns *ns, uint32_t tokens, uint64_t bytes,
                          kvs_block **out, kvs_err *err);
/* kvs_store_block_alloc that never drops a victim to make room: with a disk tier, victims
 * the disk writer has no room for stay and the call fails with KVS_ENOSPC instead (a
 * demotion then waits for the writer rather than losing a block to make room for one). */
int kvs_store_block_alloc_nodrop(kvs_store *st, kvs_ns *ns, uint32_t tokens, uint64_t bytes,
                                 kvs_block **out, kvs_err *err);
/* Sets the final stored size of a FILLING block (<= the size it was allocated with; the
 * difference is given back at commit) and the raw payload bytes it represents. Without
 * this call both equal the allocated size. */
void kvs_block_set_size(kvs_block *blk, uint64_t size, uint64_t raw_bytes);
/* The codec roles of a block's sides, packed (gpu/codec/codec.h kvs_enc: own, fallback,
 * host or disk codec; its header says the same): whoever fills a FILLING block with
 * bytes of other roles than own sets them before it commits it (the data path, the
 * demoter); they move with the block between tiers, change when the disk writer
 * re-encodes it, and a disk record's are read back from its header at start, so Lookup
 * can say so without reading the block. */
void kvs_block_set_enc(kvs_block *blk, unsigned enc);
unsigned kvs_block_enc(const kvs_block *blk);
/* Writable payload of a FILLING block; read-only view of a committed one. */
void *kvs_block_data(kvs_block *blk);
uint64_t kvs_block_size(const kvs_block *blk);
uint32_t kvs_block_tokens(const kvs_block *blk);
kvs_store_tier kvs_block_tier(const kvs_block *blk);
kvs_ns *kvs_block_ns(const kvs_block *blk); /* borrowed: the block holds a reference */

/* The GPU side of a GPU-tier block (gpu/engine/engine.h slot layout). */
typedef struct kvs_block_dev {
    void *slot;                /* device address of the slot */
    uint32_t *lens;            /* 2L section lengths: keys of each layer, then values */
    uint32_t k_state, v_state; /* codec state versions the sections were encoded with */
} kvs_block_dev;

/* Reserves a slot of slot_bytes in device gpu's tier (no eviction: KVS_ENOSPC when the tier
 * is full or absent, or naming gpu_quota_bytes when the slot would take ns over its gpu quota: the
 * caller puts the block in the host tier and kicks demotion) and allocates a GPU block for it
 * whose sides have codec roles enc (packed; 0: the namespace's own; slots are sized per
 * namespace and encodings: slot_bytes must be kvs_engine_slot_bytes of those codecs for a
 * full block). The caller fills the slot (engine), the lens and states (kvs_block_device),
 * sets the size with kvs_block_set_size (the block's encoded size as a framed block), then
 * commits or aborts like a host block. */
int kvs_store_block_alloc_gpu(kvs_store *st, unsigned gpu, kvs_ns *ns, uint32_t tokens,
                              unsigned enc, uint64_t slot_bytes, kvs_block **out, kvs_err *err);
/* The GPU side of a GPU-tier block; NULL for other tiers. */
kvs_block_dev *kvs_block_device(kvs_block *blk);
/* The device (index into opts.gpu) whose tier holds a GPU-tier block; 0 for other tiers. */
unsigned kvs_block_gpu(const kvs_block *blk);
bool kvs_store_has_gpu(const kvs_store *st);
/* How many gpu tiers (devices) the store has. */
unsigned kvs_store_gpus(const kvs_store *st);
/* The device whose tier has the most free bytes, among those with room for a slot of
 * slot_bytes for ns (placement of a Put or promotion from the host, whose bytes are on no
 * device yet), or -1 when none has (the block goes to the host tier, and the caller kicks
 * demotion). Room counts up to the tier's capacity, as for a Put on one device; a
 * promotion then checks the chosen tier's high watermark (kvs_store_promote_begin). */
int kvs_store_gpu_choose(kvs_store *st, const kvs_ns *ns, uint64_t slot_bytes);
bool kvs_store_has_disk(const kvs_store *st);
/* The pinned host pool the store was given (opts.host_pool), or NULL: request buffers that
 * the engine reads or writes may come from it too. */
kvs_hostpool *kvs_store_host_pool(const kvs_store *st);
/* True unless opts.no_promote. */
bool kvs_store_promotes(const kvs_store *st);
/* Waits until the disk writer has applied everything queued so far (tests, flush). A
 * no-op without a disk tier. */
void kvs_store_disk_wait(kvs_store *st);
/* Writes every host block that has no disk record yet to the disk tier (they stay in the
 * host tier) and waits for it; returns how many were queued. GPU blocks are not written.
 * For a clean shutdown (--flush-on-exit) and kvctl flush. */
uint64_t kvs_store_flush(kvs_store *st);

/* True while device gpu's tier is above its high watermark, or a namespace above its gpu
 * quota's high share (kvs_store_gpu_pick). */
bool kvs_store_gpu_over_high(kvs_store *st, unsigned gpu);
/* Picks up to max idle blocks of device gpu's tier, least recently used first: of each
 * namespace above its gpu quota's high share (gpu_high_pct of the quota, which counts its
 * blocks on every device), its own, down to the low share; then, while that tier itself is
 * above its high watermark, anyone's, while the tier minus the picks stays above its low
 * watermark. Each comes back with a reference held by the demoter (invariant 6). Returns
 * the count. */
size_t kvs_store_gpu_pick(kvs_store *st, unsigned gpu, kvs_block **out, size_t max);
/* Ends the demotion of a picked GPU block `old`: nb is a host block (kvs_store_block_alloc)
 * filled with old's bytes as an encoded block, re-encoded with the host tier's codecs
 * where they are colder (invariant 9; nb's kvs_block_set_enc says so, and the re-encode
 * is counted in host_recoded with the bytes it saved). If old is still linked, nb takes
 * its place in the index (host tier, newest) and old is unlinked; otherwise nb is aborted.
 * Either way the demoter's reference on old is dropped and nb is owned by the store. */
void kvs_store_demote_commit(kvs_store *st, kvs_block *old, kvs_block *nb);
/* Gives up the demotion of a picked block (it stays in the gpu tier). */
void kvs_store_demote_cancel(kvs_store *st, kvs_block *old);

/* Promotion of a host block to device gpu's tier (a Get of it, unless opts.no_promote):
 * begin checks that blk (a block the caller holds a reference on) is a linked host block that is
 * not being written to disk nor already promoted, and that a slot of slot_bytes fits the
 * gpu tier below its high watermark (a promotion never triggers a demotion); it then takes
 * the promoter's reference on blk and allocates the gpu block *out (FILLING) for the
 * caller to fill (engine upload: slot, lens, states), with blk's encodings (a promotion
 * keeps a colder encoding: slot_bytes is the slot of its codecs), and returns true; false when
 * there is no promotion to do (no gpu tier, promotion off, not such a block, no room). Commit swaps
 * the gpu block in if blk is still linked (it keeps blk's disk record, if any), else drops it;
 * cancel (upload failed; g may be NULL) leaves blk where it was. Both drop the promoter's
 * reference. */
bool kvs_store_promote_begin(kvs_store *st, unsigned gpu, kvs_block *blk, uint64_t slot_bytes,
                             kvs_block **out);
void kvs_store_promote_commit(kvs_store *st, kvs_block *old, kvs_block *g);
void kvs_store_promote_cancel(kvs_store *st, kvs_block *old, kvs_block *g);

typedef struct kvs_store_put_info {
    kvs_store_tier tier;
    uint64_t stored_bytes;
    bool replaced;
    unsigned enc; /* kvs_block_enc of the block */
} kvs_store_put_info;

/* Links a filled block under key (1..KVS_KEY_MAX bytes), replacing an older block with
 * the same key. Ownership of blk passes to the store in every case (on failure it is
 * freed). KVS_ENOTFOUND if its namespace was dropped meanwhile. info may be NULL. */
int kvs_store_block_commit(kvs_store *st, kvs_block *blk, const void *key, size_t key_len,
                           kvs_store_put_info *info, kvs_err *err);
/* The end of a durable commit: runs once, on the disk writer thread, with no store lock
 * held. rc 0: the block is committed to LMDB and flushed (kvs_disk_put_durable), or it
 * was deleted or replaced by a later operation before its turn (whose own writes come
 * after it). Otherwise the write failed and the block was unlinked (if it still was
 * linked) and its key's record queued for deletion, so nothing of it is left to serve:
 * KVS_ENOSPC (the disk budget and the map are full of blocks that cannot be evicted),
 * KVS_E2BIG (one block over an LMDB transaction), KVS_EIO (a write or flush failed;
 * counted in disk_write_errors), KVS_ENOTFOUND (the namespace was dropped meanwhile).
 * err (borrowed, valid during the call) says why; NULL when rc is 0. */
typedef void (*kvs_store_durable_fn)(void *arg, int rc, const kvs_err *err);

/* kvs_store_block_commit for a block of a `durable` namespace: links it in its tier as
 * usual (Gets see it at once), then queues its durable write to the disk tier; done(arg,
 * ...) reports the outcome later (the caller acknowledges the Put only then). The block
 * stays in the host tier, unevictable until the write is done, and then has a disk
 * record (on_disk). Replacing a block writes over its record in the same transaction
 * instead of deleting it first, so a crash never loses both versions. Needs a disk tier
 * and a host block (KVS_EINVAL otherwise). On a non-zero return (as
 * kvs_store_block_commit's; blk freed) done is never called. */
int kvs_store_block_commit_durable(kvs_store *st, kvs_block *blk, const void *key, size_t key_len,
                                   kvs_store_put_info *info, kvs_store_durable_fn done, void *arg,
                                   kvs_err *err);
/* Runs done(arg, rc, err) on the disk writer thread once everything queued for it so far
 * is committed, and flushed to stable storage (kvs_disk_sync: rc is its error); inline
 * with rc 0 without a disk tier. A durable namespace's Delete answers then, so that a
 * deleted block cannot come back after a crash. */
void kvs_store_disk_barrier(kvs_store *st, kvs_store_durable_fn done, void *arg);
/* Frees a FILLING block and returns its reservation. */
void kvs_store_block_abort(kvs_store *st, kvs_block *blk);

/* Finds a block, verifies its checksum and returns it with a reader reference
 * (release with kvs_store_block_release). KVS_ENOTFOUND on a miss, KVS_EDATALOSS (block
 * dropped) on a checksum mismatch. Counts hits and misses and marks the block used.
 * A disk block is read from LMDB in the calling thread (no lock held): the block handed
 * out is a host block (promoted) or a transient copy whose tier reads DISK; KVS_EIO or
 * KVS_ENOMEM when that read fails. */
int kvs_store_get(kvs_store *st, kvs_ns *ns, const void *key, size_t key_len, kvs_block **out,
                  kvs_err *err);
/* kvs_store_get without the blocking part, for an event thread: a disk block comes back
 * unread (kvs_block_unread: a referenced index entry without bytes; kvs_block_tokens and
 * kvs_block_size are valid) for the caller to finish with kvs_store_read elsewhere (a
 * worker thread). Other blocks come back as kvs_store_get hands them out. */
int kvs_store_find(kvs_store *st, kvs_ns *ns, const void *key, size_t key_len, kvs_block **out,
                   kvs_err *err);
/* True for a disk block from kvs_store_find that kvs_store_read has not read yet. */
bool kvs_block_unread(const kvs_block *blk);
/* Reads an unread disk block (blocking: one LMDB read transaction and a copy; no lock
 * held across it), exactly as kvs_store_get would have: the caller's reference on blk is
 * dropped in every case, and on success *out gets a reader reference on a readable block
 * (promoted or transient). Errors as kvs_store_get's for a disk block. A block that is
 * not unread is handed back as it is. */
int kvs_store_read(kvs_store *st, kvs_block *blk, kvs_block **out, kvs_err *err);
/* Zero-copy read of an unread disk block (kvs_store_find), for a reader that decodes it
 * at once and with promotion off (with promotion on, the copy kvs_store_read makes is the
 * promoted block): fn(bytes, len, arg) runs on the block's bytes in LMDB's map, verified
 * (checksum), inside one short read transaction (blocking; no lock held); the bytes are
 * valid only during the call. fn's non-zero return is passed back. The block stays unread
 * and the caller keeps its reference. KVS_ENOTFOUND (record gone) and KVS_EDATALOSS
 * (checksum: record dropped) forget the entry and count as kvs_store_read does; KVS_EIO;
 * KVS_EINVAL when blk is not unread or promotion is on. */
int kvs_store_view(kvs_store *st, kvs_block *blk, kvs_disk_read_fn fn, void *arg, kvs_err *err);
void kvs_store_block_release(kvs_store *st, kvs_block *blk);

/* A key as a (pointer, length) pair; borrowed for the duration of the call. */
typedef struct kvs_store_key {
    const void *data;
    size_t len;
} kvs_store_key;

/* For each key, its tier (KVS_STORE_TIER_NONE when absent) into tiers[i]; *prefix (may
 * be NULL) = number of leading keys present; enc (may be NULL): each block's codec roles
 * (kvs_block_enc; 0 when absent) into enc[i]. Keys must have been validated. */
void kvs_store_lookup(kvs_store *st, kvs_ns *ns, const kvs_store_key *keys, size_t n,
                      kvs_store_tier *tiers, uint32_t *prefix, uint8_t *enc);
/* Deletes the keys that exist; returns how many were deleted. */
uint32_t kvs_store_delete(kvs_store *st, kvs_ns *ns, const kvs_store_key *keys, size_t n);

/* One device's gpu tier (kvs_store_stats.gpu_dev). */
typedef struct kvs_store_gpu_stats {
    uint64_t capacity, used, blocks, hits, demotions, promotions;
} kvs_store_gpu_stats;

typedef struct kvs_store_stats {
    uint64_t host_capacity, host_used, host_blocks, host_hits, host_evictions;
    /* The gpu tiers' sums over every device; each device's in gpu_dev[0..gpu_devices). */
    uint64_t gpu_capacity, gpu_used, gpu_blocks, gpu_hits, gpu_demotions;
    uint64_t gpu_promotions; /* host blocks moved to the gpu tier by a Get */
    unsigned gpu_devices;
    kvs_store_gpu_stats gpu_dev[KVS_STORE_GPUS_MAX];
    uint64_t disk_capacity, disk_used, disk_blocks, disk_hits, disk_evictions;
    /* Records in the disk tier (its entries and the host and GPU blocks with one) and the
     * most it may hold (opts.disk_max_records): past it, the oldest non-durable records
     * are evicted as past the byte budget. */
    uint64_t disk_records, disk_max_records;
    uint64_t disk_spills;       /* host blocks that became disk entries */
    uint64_t disk_promotions;   /* disk blocks moved to the host tier by a Get */
    uint64_t disk_write_errors; /* failed disk writes (their blocks were dropped) */
    uint64_t disk_refused;      /* durable Puts refused: no room for them on the disk tier */
    uint64_t spill_pending;     /* bytes queued for the disk writer */
    uint64_t spill_dropped;     /* host victims dropped: writer behind or write failed */
    uint64_t misses, checksum_failures;
    /* The admin verbs' progress, as counters since start (a client draws its progress bar
     * from their growth during its call: kvctl verify, flush): blocks kvs_store_verify
     * expects to check when it starts (host blocks and disk records) and those it checked,
     * host blocks kvs_store_flush(_sync) handed to the disk writer and those it finished
     * (written or not). */
    uint64_t verify_planned, verify_checked;
    uint64_t flush_queued, flush_done;
    /* Precision demotion (store.h): blocks re-encoded with a colder codec as they moved
     * into the host tier (from the GPU tier) and into the disk tier, and the stored bytes
     * that saved (their size before, less after). */
    uint64_t host_recoded, host_recode_saved;
    uint64_t disk_recoded, disk_recode_saved;
} kvs_store_stats;

void kvs_store_get_stats(kvs_store *st, kvs_store_stats *out);

/* Changes the host tier at run time (a config reload): its byte capacity (> 0; the
 * watermarks keep their percentages) and its eviction policy. A new policy is built
 * first (outside the lock; KVS_EINVAL or KVS_ENOMEM and nothing changed if that fails),
 * then, under store->mu, every host block in it moves to the new one in recency order
 * (S3-FIFO's access counters and ghost start afresh), the capacity changes and, when it
 * shrank below what is used, idle blocks are evicted as a Put would evict them (busy ones
 * stay: host_used may exceed the capacity until they are released, and Puts get
 * KVS_ENOSPC meanwhile). O(host blocks) under the lock. What stays as at create:
 * spill_max (opts.spill_max, or a quarter of the capacity at create) and namespaces
 * whose full block no longer fits (their Puts get KVS_ENOSPC). *evicted (may be NULL):
 * blocks evicted. */
int kvs_store_set_host(kvs_store *st, uint64_t capacity, kvs_policy_kind eviction,
                       uint64_t *evicted, kvs_err *err);

/* ---------------------------------------------------------------- admin (store_admin.c)
 * The operator's verbs behind KvAdmin Verify, Flush and Evict. Each may take long (it
 * reads every block, or waits for the disk writer): call it off the request threads. */

typedef struct kvs_store_verify_info {
    uint64_t host_checked, host_bad; /* host blocks hashed; of those, failed and dropped */
    uint64_t disk_checked, disk_bad; /* disk records read whole; failed and dropped */
    uint64_t gpu_skipped; /* GPU blocks: not checked (no checksum on the device, inv. 4) */
} kvs_store_verify_info;

/* Checks every stored block: each host block against its XXH3-64 (outside the lock; the
 * host blocks are held, so unevictable, only until their own check is done), then every
 * record of the disk tier whole (kvs_disk_scan with KVS_DISK_SCAN_VERIFY, no store lock
 * held during the scan). A bad block is dropped as a Get would drop it (invariant 4,
 * counted in checksum_failures, logged); a bad disk record is dropped by the disk module
 * and its index entry forgotten (a host copy of it stays, without its record). GPU blocks
 * are counted, not checked. KVS_ENOMEM (nothing checked) or a disk scan error (the host
 * part is done; *info holds its counts). */
int kvs_store_verify(kvs_store *st, kvs_store_verify_info *info, kvs_err *err);

typedef struct kvs_store_flush_info {
    uint64_t written;     /* host blocks written to the disk tier by this call */
    uint64_t failed;      /* handed to the writer but not written (write error, map full after
                           * eviction, or removed meanwhile); they stay in the host tier */
    uint64_t already;     /* host blocks that had a disk record, or were being written */
    uint64_t gpu_skipped; /* GPU blocks: not written (flush is host -> disk) */
} kvs_store_flush_info;

/* kvs_store_flush that reports: writes every host block without a disk record to the disk
 * tier (they stay in the host tier), waits for the writer, then flushes the environment to
 * stable storage (kvs_disk_sync). KVS_EINVAL without a disk tier, KVS_ENOMEM, or the sync's
 * error (*info is filled either way once the writes were queued). */
int kvs_store_flush_sync(kvs_store *st, kvs_store_flush_info *info, kvs_err *err);

/* Which blocks an evict applies to; every pointer borrowed for the call. */
typedef struct kvs_store_sel {
    kvs_ns *ns;                /* NULL: every namespace (keys must be NULL then) */
    const kvs_store_key *keys; /* validated keys of ns, or NULL: every block of ns */
    size_t n;
} kvs_store_sel;

typedef struct kvs_store_evict_info {
    uint64_t moved;     /* blocks moved to the target tier */
    uint64_t dropped;   /* blocks removed from the store, disk records too (target NONE) */
    uint64_t unchanged; /* already in the target tier or a colder one */
    uint64_t busy;      /* left where they were: being read, written or demoted (invariant 3) */
    uint64_t failed;    /* handed to the disk writer but not written (write error, map full):
                         * dropped, as a host victim that cannot be written is */
    uint64_t absent;    /* keys not found */
} kvs_store_evict_info;

/* Moves picked GPU blocks (each holding the demoter's reference, invariant 6) to the host
 * tier and ends each demotion (kvs_store_demote_commit or _cancel) before it returns; the
 * result is how many moved. storage/tiering's kvs_tiering_demote. */
typedef size_t (*kvs_store_demote_fn)(void *arg, kvs_block **picked, size_t n);

/* Moves the selected blocks down to tier `to` or out of the store, and waits until it is
 * done (the disk writer included):
 *   KVS_STORE_TIER_HOST  GPU blocks go to the host tier through demote(demote_arg, ...),
 *                        in rounds of up to 64 (without demote they count as busy);
 *   KVS_STORE_TIER_DISK  the same, then host blocks go to the disk tier: a block with a
 *                        disk record becomes a disk entry at once, the others are handed
 *                        to the disk writer (in rounds bounded by opts.spill_max) and are
 *                        disk entries once it committed them;
 *   KVS_STORE_TIER_NONE  every selected block is removed, as kvs_store_delete does (its
 *                        readers keep their bytes until they let go; its disk record is
 *                        deleted after any queued write of it).
 * Idle blocks only move (invariant 3: busy ones are skipped and counted); blocks never
 * move up. Counts host and disk blocks that leave as evictions. KVS_EINVAL: `to` is the GPU
 * tier or out of range, DISK without a disk tier, keys without a namespace; KVS_ENOMEM. */
int kvs_store_evict(kvs_store *st, const kvs_store_sel *sel, kvs_store_tier to,
                    kvs_store_demote_fn demote, void *demote_arg, kvs_store_evict_info *info,
                    kvs_err *err);

#endif
