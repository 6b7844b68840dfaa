/* Private to the store (storage/store.c, its GPU tier in storage/store_gpu.c), its
 * disk-tier plumbing (storage/store_disk.c: the writer's hooks and disk reads;
 * storage/persist.c: records and restore; storage/store_open.c: create) and admin verbs
 * (storage/store_admin.c): the block and store structures and the helpers these files
 * use. Nothing outside storage/ includes this.
 * Every *_locked function expects store->mu held (store.h: lock order).
 */
#ifndef KVS_STORAGE_STORE_INT_H
#define KVS_STORAGE_STORE_INT_H

#include <pthread.h>
#include <stdatomic.h>

#include "storage/disk.h"
#include "storage/hostpool.h"
#include "storage/index.h"
#include "storage/lru.h"
#include "storage/policy.h"
#include "storage/slots.h"
#include "storage/store.h"

#include "storage/writer.h"

/* What a block is doing: one state at a time (the diagram in store.h), changed only by
 * kvs__block_set_state, which asserts the transition. */
typedef enum kvs_block_state {
    KVS_BLOCK_FILLING,     /* allocated, its payload being written; not in the index */
    KVS_BLOCK_IDLE,        /* in the index, nothing in flight (readers may hold it) */
    KVS_BLOCK_WRITING,     /* host block whose durable or copy write is queued (inv. 8) */
    KVS_BLOCK_SPILLING,    /* host victim queued for the disk writer (invariant 8) */
    KVS_BLOCK_PROMOTING,   /* host block being copied to the gpu tier */
    KVS_BLOCK_DEMOTING,    /* gpu block being moved to the host tier (invariant 6) */
    KVS_BLOCK_UNRECORDING, /* its disk record being deleted by the writer's eviction: not
                            * promoted meanwhile, so no copy claims a record that goes */
    KVS_BLOCK_UNLINKED,    /* out of the index; freed with its last reference */
    KVS_BLOCK_TRANSIENT,   /* a disk block read for one reader: never in the index */
    KVS_BLOCK_STATES
} kvs_block_state;

/* Which budget the block's bytes are counted in; returned with its last reference. */
typedef enum kvs_block_charge {
    KVS_CHARGE_NONE,  /* disk entries, transient reads */
    KVS_CHARGE_HOST,  /* host_used */
    KVS_CHARGE_SPILL, /* spill_pending: a host victim handed to the disk writer */
    KVS_CHARGE_GPU,   /* a gpu tier slot */
} kvs_block_charge;

struct kvs_block {
    kvs_index_node node; /* identity (ns id, key); in st->index while linked */
    kvs_lru_node lru;    /* in its tier's LRU while linked */
    kvs_policy_node pol; /* host tier: in st->policy while linked, until evicted */
    kvs_ns *ns;          /* reference held by the block */
    unsigned refs;       /* 1 for the index while linked + 1 per reader; under st->mu */
    kvs_block_state state;
    kvs_block_charge charge;
    bool on_disk; /* its encoded bytes are a record of the disk tier (invariant 7): apart
                   * from the state, a block may have a record in any state */
    uint8_t enc;  /* its sides' codec roles, packed (gpu/codec/codec.h kvs_enc): the
                   * header's, kept here so Lookup need not read it (store.h) */
    uint32_t tokens;
    uint64_t size;       /* stored (encoded) bytes; the reservation while FILLING */
    uint64_t raw_bytes;  /* payload bytes the block represents */
    uint64_t shrink;     /* reserved bytes to give back at commit (kvs_block_set_size) */
    unsigned char *data; /* host tier, and a transient disk read; NULL for a disk entry */
    kvs_hostpool *pool;  /* data came from this pinned pool (else malloc) */
    kvs_store_tier tier;
    /* A durable commit that replaced a block with a disk record (or one being written)
     * keeps that record's size here: if its own write fails, the old record, which is
     * still in LMDB, is indexed again, so the acknowledged block stays (README: durable). */
    bool prev_rec;
    uint8_t prev_enc;
    uint32_t prev_tokens;
    uint64_t prev_size, prev_raw;
    /* A spill the disk writer re-encodes with the disk tier's codecs (precision demotion,
     * store_disk.c): the bytes it writes instead of data, their size and roles. Writer
     * thread only, from its gather to its finish, while the writer's reference holds b. */
    uint8_t *spill_data;
    uint64_t spill_size;
    uint8_t spill_enc;
    uint32_t verified;   /* the kvs_store_verify pass that checked it (st->verify_pass) */
    uint8_t gpu;         /* gpu tier: which device's (st->gpu[gpu]) */
    uint64_t slot_bytes; /* gpu tier */
    kvs_block_dev dev;   /* gpu tier */
};

/* One device's GPU tier (store.h "Tiers": one per device, each with its own capacity,
 * watermarks and LRU; the host and disk tiers are shared). Under store->mu. */
typedef struct kvs__gpu_tier {
    kvs_slots *slots;      /* the device region's slots */
    kvs_lru lru;           /* its linked blocks, least recently used first */
    uint64_t high, low;    /* watermarks in bytes */
    uint64_t picked;       /* slot bytes of its blocks being demoted */
    kvs_store_gpu_stats s; /* its share of the stats (store.h; the totals sum them) */
} kvs__gpu_tier;

/* Changes a block's state, asserting the transition (store.h diagram). Under store->mu. */
void kvs__block_set_state(kvs_block *b, kvs_block_state to);
/* In the index: IDLE, or an operation in flight on a linked block. */
static inline bool kvs__block_linked(const kvs_block *b)
{
    return b->state != KVS_BLOCK_FILLING && b->state != KVS_BLOCK_UNLINKED &&
           b->state != KVS_BLOCK_TRANSIENT;
}

struct kvs_store {
    pthread_mutex_t mu;
    kvs_ns_registry *reg;
    kvs_index *index;
    kvs_lru lru;        /* host tier: every linked host block (for walks; recency order) */
    kvs_policy *policy; /* host tier eviction order (opts.eviction; invariant 2) */
    kvs_hostpool *pool; /* borrowed; NULL: host blocks are malloc'ed */
    kvs_lru disk_lru;   /* disk tier (index entries without payload) */
    kvs__gpu_tier gpu[KVS_STORE_GPUS_MAX]; /* gpu tiers, one per device: gpu[0..gpus) */
    unsigned gpus;                         /* 0: no gpu tier */
    unsigned gpu_high_pct, gpu_low_pct;    /* what each tier's marks are computed from; a
                                            * namespace's gpu quota (over every device) has
                                            * marks of the same shares (store_gpu.c) */
    kvs_disk *disk;                        /* borrowed; NULL without a disk tier */
    kvs_writer *writer;                    /* the disk writer; NULL without a disk tier */
    uint64_t spill_max;                    /* most bytes handed to the writer at once */
    uint64_t host_high, host_low;          /* host tier watermarks in bytes (with a disk tier) */
    bool host_demoting;                    /* between crossing host_high and reaching host_low */
    unsigned host_high_pct, host_low_pct;  /* what host_high/low are computed from */
    uint32_t eviction_small_pct;           /* opts.eviction_small_pct, for a new policy */
    bool promote;                          /* Get of a disk block moves it to the host tier */
    uint32_t verify_pass;                  /* kvs_store_verify passes started (store_admin.c) */
    /* stats.verify_checked, kept apart so that the disk scan's callback, inside an LMDB
     * read transaction, counts without the store lock (kvs_store_get_stats copies it) */
    _Atomic uint64_t verify_checked;
    kvs_store_stats stats; /* its gpu_* fields stay 0: the devices' counters (gpu[g].s) are
                            * summed when read (kvs_store_get_stats) */
    uint32_t calib_tokens;
    unsigned max_namespaces;                       /* opts.max_namespaces */
    struct kvs_engine *engine[KVS_STORE_GPUS_MAX]; /* borrowed (opts.engine) */
    kvs_store_event_fn on_event; /* opts.on_event, armed once the disk tier is indexed */
    void *event_ctx;
    kvs_log_fn log;
    void *log_ctx;
};

#define KVS__BLOCK_OF_NODE(n) ((kvs_block *)((char *)(n)-offsetof(kvs_block, node)))
#define KVS__BLOCK_OF_LRU(n) ((kvs_block *)((char *)(n)-offsetof(kvs_block, lru)))
#define KVS__BLOCK_OF_POL(n) ((kvs_block *)((char *)(n)-offsetof(kvs_block, pol)))

void kvs__store_log(kvs_store *st, kvs_log_level lvl, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Frees a block that is neither linked nor referenced (outside the lock). */
void kvs__block_free(kvs_block *blk);
/* Frees a chain of blocks linked through node.next. */
void kvs__block_free_chain(kvs_block *b);
/* Inserts an initialized block into the index and its tier's LRU (refs = 1). */
void kvs__store_link_locked(kvs_store *st, kvs_block *blk);
/* Unlinks a LINKED block and drops the index's reference; true if it is now free (the
 * caller frees it outside the lock). Queues nothing for the disk tier. */
bool kvs__store_unlink_locked(kvs_store *st, kvs_block *blk);
/* Unlinks a LINKED block that leaves the store for good (delete, replace, a failed
 * checksum, an operator's evict) and queues the removal of its disk record, if it has one
 * or one is being written (invariant 8). True if it is now free (caller frees it). */
bool kvs__store_forget_locked(kvs_store *st, kvs_block *blk);
/* Gives a block's capacity back to its tier (slot, host bytes, spill queue). */
void kvs__store_give_back_locked(kvs_store *st, kvs_block *blk);
/* Every change of the host tier's used bytes goes through here (delta signed), so each
 * namespace's share, which its host quota is measured by, stays exact. */
void kvs__store_host_charge_locked(kvs_store *st, kvs_ns *ns, int64_t delta);
/* The same for a gpu slot of ns on device tier g (after kvs_slots_alloc or _free: its
 * used bytes are re-read from the slots) and for a record of ns in the disk tier (disk_used;
 * invariant 7). */
void kvs__store_gpu_charge_locked(kvs_store *st, unsigned g, kvs_ns *ns, int64_t delta);
/* What a host-charged block holds of the host tier (invariant 1): its bytes, the part of
 * its reservation not yet given back, and its bookkeeping. */
static inline uint64_t kvs__block_host_charge(const kvs_block *b)
{
    return b->size + b->shrink + KVS_STORE_BLOCK_META;
}

/* A record of the disk tier gained (add) or lost by linked block b, of b->size bytes: the
 * tier's disk_used and disk_records and b's namespace's disk_bytes (invariant 7). */
void kvs__store_disk_record_locked(kvs_store *st, const kvs_block *b, bool add);
/* Marks an idle GPU block picked for demotion (invariant 6: DEMOTING, the demoter's
 * reference, its slot counted in its tier's picked bytes and its namespace's), and the reverse once
 * the demotion ended (committed or not; the demoter's reference is the caller's to drop). */
void kvs__store_gpu_pick_locked(kvs_store *st, kvs_block *b);
void kvs__store_gpu_unpick_locked(kvs_store *st, kvs_block *b);
/* GPU blocks on every device (their tiers' counters; stats.gpu_* stays 0: the totals are
 * summed where they are read, kvs_store_get_stats). */
uint64_t kvs__store_gpu_blocks_locked(const kvs_store *st);
/* Drops one reference; true on the last (capacity given back; caller frees). */
bool kvs__store_unref_locked(kvs_store *st, kvs_block *blk);
/* A disk-tier index entry standing for blk's record (same identity, no payload); not
 * linked. Small fixed allocation (aborts on failure). */
kvs_block *kvs__disk_entry_new(const kvs_block *blk);

/* Evicts idle host blocks in policy order until host_used <= target (store.c: busy ones
 * are skipped; with a disk tier victims go to the disk writer; `drop`: also drop victims
 * the writer has no room for). With `only` non-NULL, only that namespace's blocks, until
 * its own host share is <= target (its quota). Victims are chained on *to_free for the
 * caller to free outside the lock. */
void kvs__store_evict_until_locked(kvs_store *st, kvs_ns *only, uint64_t target, bool drop,
                                   kvs_block **to_free);

/* True when blk's disk record may stand for it in the disk tier as it is: it has one and the
 * disk tier's codecs would not re-encode it (kvs_ns_colder); else a move to disk rewrites
 * the record through the disk writer, re-encoded (store_disk.c). */
bool kvs__store_record_fits_locked(const kvs_block *blk);

/* Computes host_high and host_low from the host capacity and host_*_pct. */
void kvs__store_host_marks_locked(kvs_store *st);

/* Background demotion of the host tier to the disk tier (the disk writer calls it after
 * each batch and when kicked): once host_used passed host_high, hands idle host blocks to
 * the disk writer in policy order, without dropping any, until host_used is at most
 * host_low (over several calls when the writer's queue is full). Takes store->mu. */
void kvs__store_host_demote(kvs_store *st);

/* Prepares codec c for the GPU engine, if there is one, before anyone can see it (a codec
 * without kernels is simply coded on the CPU). */
void kvs__store_codec_prepare(kvs_store *st, kvs_codec *c);

/* A learner's persist hook (gpu/codec/learn.h): kvs__persist_state_put, or NULL. */
typedef int (*kvs__state_persist_fn)(void *ctx, void *owner, kvs_kv kv,
                                     const kvs_codec_state *state, kvs_err *err);
/* Validates spec and registers it (kvs_store_ns_create without recording its spec); id 0
 * = a fresh id, else that id (restoring from the disk tier); persist records its learned
 * codec states (NULL: not recorded). *out gets a reference. */
int kvs__store_ns_add(kvs_store *st, const kvs_ns_spec *spec, uint32_t id,
                      kvs__state_persist_fn persist, kvs_ns **out, kvs_err *err);

/* storage/store_disk.c: the disk writer's hooks for st (kvs_writer_create). */
void kvs__store_writer_hooks(kvs_store *st, kvs_writer_hooks *h);
/* storage/persist.c: */
/* Writes ns's spec record to the disk tier (flushed). */
int kvs__persist_ns_put(kvs_store *st, kvs_ns *ns, kvs_err *err);
/* The learners' persist hook (gpu/codec/learn.h; ctx = the store, owner = the kvs_ns):
 * writes a codec state record (flushed); 0 without a disk tier. */
int kvs__persist_state_put(void *ctx, void *owner, kvs_kv kv, const kvs_codec_state *state,
                           kvs_err *err);
/* Recreates the namespaces recorded in the disk tier with every recorded codec state,
 * and the index of its blocks (at create, before any other thread uses the store). */
int kvs__persist_restore(kvs_store *st, kvs_err *err);

#endif
