/* The disk writer (DESIGN §7): one thread that owns every write to the LMDB disk tier
 * (storage/disk.h), as LMDB asks (one writer, batched transactions). It knows the disk
 * tier and its own queue, nothing of the store: what to write for a queued block, how to
 * make room, and what a write means for the index are the owner's, through its hooks
 * (the store's are in storage/store_disk.c).
 *
 * The writer takes operations from a FIFO queue and applies them in order, grouping
 * consecutive ones of a kind into LMDB transactions:
 *   put      a host block evicted to disk (spill)
 *   copy     a host block written while it stays (flush)
 *   durable  a block of a durable namespace: written with kvs_disk_put_durable (one flush
 *            for consecutive ones), then its done callback (the Put is answered then)
 *   del      a block's record (delete, replace), queued after any write of it
 *   ns_del   every record of a dropped namespace
 *   mark     a callback once everything queued before it is applied
 * Puts, copies and durable writes of a run go through the hooks: gather (the items to
 * write: the owner skips blocks removed meanwhile), room (the budget: the owner evicts),
 * then one transaction (retried after more eviction while LMDB or the filesystem is full,
 * then block by block so that as many as fit are written, victims newest first), then
 * finish (the owner updates its index with each block's outcome). Record deletions that
 * fail are kept and retried before every later batch, until they go through or a later
 * write of the same key supersedes them, so an owner that forgot a block never sees it
 * come back. After each batch, and when kicked, the idle hook runs (the store's background
 * host demotion).
 *
 * Threading and locks: the queue functions are thread-safe and may be called with the
 * owner's lock held (the queue's mutex is taken after it: daemon/THREADS.md); hooks run on
 * the writer thread with no writer lock held. kvs_writer_delete_now is for hooks only.
 */
#ifndef KVS_STORAGE_WRITER_H
#define KVS_STORAGE_WRITER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "gpu/base/err.h"
#include "gpu/base/log.h"
#include "gpu/codec/spec.h" /* KVS_KEY_MAX */
#include "storage/disk.h"

typedef struct kvs_writer kvs_writer;

#define KVS_WRITER_RUN_MAX 64 /* writes per transaction at most: the n of gather and finish */

typedef enum kvs_writer_kind {
    KVS_WRITER_PUT,     /* a victim: it leaves RAM once written */
    KVS_WRITER_COPY,    /* written, it stays in RAM */
    KVS_WRITER_DURABLE, /* written and flushed before its done callback */
} kvs_writer_kind;

typedef void (*kvs_writer_done_fn)(void *arg, int rc, const kvs_err *err);

typedef struct kvs_writer_hooks {
    void *ctx; /* borrowed; outlives the writer */
    /* The items of a run of n writes of one kind (the blocks queued with them, in order):
     * fills items[m] for each block to write now and at[m] = its index in the run, and sets
     * gone[i] for a block whose namespace is gone (a durable one is answered KVS_ENOTFOUND);
     * returns m. The items' pointers stay valid until finish. The owner may write other
     * bytes than the block's (the store re-encodes a spill colder: store_disk.c), produced
     * here on the writer thread with no writer lock held. */
    size_t (*gather)(void *ctx, kvs_writer_kind kind, void *const *blocks, size_t n,
                     kvs_disk_item *items, size_t *at, bool *gone);
    /* Room for writing items[0..m): evicts what the owner's budgets ask (with
     * kvs_writer_delete_now) and returns 0 when the write may go on, else KVS_ENOSPC with
     * err saying why. held[0..nheld) are items of the same run written already (the run
     * went on block by block) that finish has not reported yet, so that the owner's
     * accounts do not hold them: the owner counts them as written. retry: LMDB or the
     * filesystem was full after all: free a good share more, and KVS_ENOSPC when nothing
     * more could be freed. */
    int (*room)(void *ctx, const kvs_disk_item *items, size_t m, const kvs_disk_item *held,
                size_t nheld, bool retry, kvs_err *err);
    /* The outcome of the run: rcs[i] 0 when block i was written, else its error (errs[i]);
     * blocks not gathered have rcs[i] == 0 and written[i] false. */
    void (*finish)(void *ctx, kvs_writer_kind kind, void *const *blocks, size_t n, const bool *gone,
                   const bool *written, const int *rcs);
    /* After each batch and when kicked. May queue more. */
    void (*idle)(void *ctx);
    /* Counts failed writes (of any kind). */
    void (*write_errors)(void *ctx, uint64_t n);
    kvs_log_fn log; /* may be NULL */
    void *log_ctx;
} kvs_writer_hooks;

/* Starts the writer on disk (borrowed, outlives it); hooks are copied. */
int kvs_writer_create(kvs_disk *disk, const kvs_writer_hooks *hooks, kvs_writer **out,
                      kvs_err *err);
/* Applies everything queued, stops the thread and frees the writer. NULL is fine. */
void kvs_writer_destroy(kvs_writer *w);

/* Queue operations (any thread; the owner's lock may be held). A write takes over one
 * reference the owner holds on blk (the owner's business; the writer passes blk back to
 * its hooks, which drop it in finish); bytes is its size (transactions are bounded by it). */
void kvs_writer_put(kvs_writer *w, void *blk, uint64_t bytes);
void kvs_writer_copy(kvs_writer *w, void *blk, uint64_t bytes);
void kvs_writer_durable(kvs_writer *w, void *blk, uint64_t bytes, kvs_writer_done_fn done,
                        void *arg);
void kvs_writer_del(kvs_writer *w, uint32_t ns_id, const void *key, size_t key_len);
void kvs_writer_ns_del(kvs_writer *w, uint32_t ns_id);
/* Wakes the writer to run the idle hook, which it also runs after every batch. */
void kvs_writer_kick(kvs_writer *w);
/* done(arg, 0, NULL) runs on the writer thread once everything queued before is applied. */
void kvs_writer_mark(kvs_writer *w, kvs_writer_done_fn done, void *arg);

/* A record to delete now (the room hook's victims). */
typedef struct kvs_writer_rec {
    uint32_t ns_id;
    uint8_t key_len; /* 0 names a whole namespace (retries only) */
    uint8_t key[KVS_KEY_MAX];
} kvs_writer_rec;

/* Writer thread (hooks) only: deletes the records now, in transactions of up to 1024;
 * returns 0 or the first failure (logged and counted); *done = how many went (the first
 * ones: the runs before the failure are committed). */
int kvs_writer_delete_now(kvs_writer *w, const kvs_writer_rec *r, size_t n, const char *why,
                          size_t *done);

#endif
