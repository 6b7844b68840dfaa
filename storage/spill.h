/* The store's disk-tier plumbing (DESIGN §7): one writer thread that owns every write
 * to the LMDB disk tier (storage/disk.h), and the read path of disk blocks.
 *
 * The writer takes operations from a FIFO queue and applies them in order, grouping
 * consecutive ones into LMDB transactions:
 *   put      a host block evicted to disk (spill): written with kvs_disk_put_batch; once
 *            committed, its index entry becomes a disk entry (no payload) and the host
 *            copy is freed when its last reader lets go. Until then it stays readable.
 *   durable  a block of a durable namespace (kvs_store_block_commit_durable): written
 *            with kvs_disk_put_durable (consecutive ones share a transaction and one
 *            flush), then its callback; the block stays in the host tier, now on_disk.
 *            On failure the block is unlinked and its key's record deleted (a del op).
 *   del      a block's record (delete, replace: queued under the store lock, so a later
 *            put of the same key is applied after it)
 *   ns_del   every record of a dropped namespace
 *   mark     a callback once everything queued before it is applied (flush, tests)
 * Background demotion: after each batch, and when kicked (a host block was linked above
 * the host tier's high watermark), the writer asks the store to hand it idle host blocks
 * down to the low watermark (kvs__store_host_demote); they come back as put ops.
 * Disk budget: before a batch, the writer evicts the oldest idle disk entries until the
 * batch fits the budget; when LMDB still reports its map full (KVS_ENOSPC), it evicts
 * more and retries a few times, then gives up: a spilled block is dropped (a lost cache
 * entry, counted), a durable put is answered KVS_ENOSPC. Write errors are counted and
 * logged and spilled blocks leave the host tier as if never written (copies stay);
 * durable ones are answered with the error and leave.
 *
 * Threading and locks: the queue has its own mutex (sp->mu), taken after store->mu
 * when the store queues under its lock (store.h: lock order); the writer never holds
 * sp->mu while it takes store->mu, and holds no lock across an LMDB transaction.
 */
#ifndef KVS_STORAGE_SPILL_H
#define KVS_STORAGE_SPILL_H

#include <stddef.h>
#include <stdint.h>

#include "gpu/base/err.h"
#include "storage/store_int.h"

typedef void (*kvs_spill_done_fn)(void *arg, int rc, const kvs_err *err);

/* Starts the writer for st (borrowed, with st->disk set). */
int kvs_spill_create(kvs_store *st, kvs_spill **out, kvs_err *err);
/* Applies everything queued, stops the writer and frees it. NULL is fine. */
void kvs_spill_destroy(kvs_spill *sp);

/* Queue operations (any thread; store->mu may be held). put and durable take over one
 * reference on blk, which the writer drops when done; the caller has set its state (WRITING
 * or SPILLING). */
void kvs_spill_put(kvs_spill *sp, kvs_block *blk);
void kvs_spill_durable(kvs_spill *sp, kvs_block *blk, kvs_spill_done_fn done, void *arg);
/* A copy (kvs_store_flush, kvs_store_flush_sync): written like a put, but the block stays
 * in the host tier, on_disk once committed; a failed write leaves it as it was. */
void kvs_spill_copy(kvs_spill *sp, kvs_block *blk);
void kvs_spill_del(kvs_spill *sp, uint32_t ns_id, const void *key, size_t key_len);
void kvs_spill_ns_del(kvs_spill *sp, uint32_t ns_id);
/* Wakes the writer to run the host tier's background demotion (kvs__store_host_demote),
 * which it also runs after every batch it applied. */
void kvs_spill_kick(kvs_spill *sp);
/* done(arg, 0, NULL) runs on the writer thread once everything queued before is applied. */
void kvs_spill_mark(kvs_spill *sp, kvs_spill_done_fn done, void *arg);

/* Reads disk entry d (the caller holds a reference, which this call drops) into host
 * memory, verified by the disk module; with st->promote, the copy replaces d in the index
 * as a host block (the disk record stays: the block is on_disk). *out gets a reader
 * reference. KVS_ENOTFOUND (record gone), KVS_EDATALOSS (checksum: entry dropped),
 * KVS_ENOMEM, KVS_EIO. Takes store->mu itself; none may be held. */
int kvs_spill_read(kvs_store *st, kvs_block *d, kvs_block **out, kvs_err *err);

/* Hands disk entry d's verified bytes to fn inside one LMDB read transaction (zero-copy;
 * see kvs_store_view). The caller's reference on d stays. */
int kvs_spill_view(kvs_store *st, kvs_block *d, kvs_disk_read_fn fn, void *arg, kvs_err *err);

#endif
