/* The disk tier (DESIGN §7): encoded blocks, namespace records and a little metadata in
 * one LMDB environment, so that they survive a restart. This module only stores; it
 * never chooses what to evict (the store does, on KVS_ENOSPC or above its watermarks).
 *
 * Data directory: data.mdb and lock.mdb (LMDB's files) and nothing else (a lost+found
 * is tolerated, for a volume's root). Three named databases:
 *   meta    "format" = "kvstash-disk", "version" = u32 little-endian (KVS_DISK_VERSION),
 *           "identity" = the daemon identity string, "created" = u64 LE unix seconds,
 *           "gen" = a counter rewritten to let freed pages be reused (kvs_disk_put_batch)
 *   ns      key = namespace id (u32 big-endian) + a record name chosen by the caller
 *           (0..KVS_DISK_NS_REC_MAX bytes); value = opaque bytes the store serializes
 *           (the spec, each codec state version)
 *   blocks  key = namespace id (u32 big-endian) + the block key (1..KVS_KEY_MAX bytes);
 *           value = the encoded block (gpu/codec/format.h), byte for byte as in the host tier
 * Big-endian ids keep each namespace's records and blocks contiguous in LMDB's key
 * order, so a namespace is one key range.
 *
 * Refusal, never wiping: kvs_disk_open creates a missing or empty directory, and refuses
 * (without writing a byte there) a directory holding other files, an LMDB environment
 * without our meta, an unknown format version, an empty, missing (beside a lock.mdb),
 * truncated or corrupt data.mdb, or a directory another process (or another kvs_disk in
 * this one) has open. Only opts.reset_broken starts over where data.mdb is broken, and
 * it keeps the old file (data.mdb.broken-<time>, tolerated in the directory after).
 *
 * Integrity: every block handed to a reader has passed kvs_format_parse (its XXH3-64 over
 * all its bytes); a block that fails is deleted, counted and answered with
 * KVS_EDATALOSS. kvs_disk_scan reads only headers (magic, version, length, namespace)
 * unless asked to verify checksums too.
 *
 * Durability: LMDB is a copy-on-write B-tree whose commit is the write of one meta page
 * after every page it points to, so a kill -9 at any moment leaves the environment at
 * its last committed transaction: a batch is in whole or not at all.
 *  - synced commits (default): kvs_disk_put_batch returns after fdatasync; what it
 *    committed survives an OS crash or power loss too.
 *  - opts.nosync (MDB_NOSYNC): commits are written to the OS page cache (pwrite) but not
 *    flushed. A crash of the process (kill -9, abort) loses nothing that was committed:
 *    only the batch in flight, which never returned 0. An OS crash or power loss may
 *    lose every commit since the last flush (kvs_disk_sync, kvs_disk_put_durable, or the
 *    kernel's own writeback); LMDB keeps its integrity then only on filesystems that
 *    preserve write order (its documentation), and otherwise the next open may find a
 *    damaged environment, which it refuses (KVS_EPROTO) rather than wipes.
 *  - opts.nometasync (MDB_NOMETASYNC; what kvstashd uses): a commit flushes the pages
 *    it wrote (fdatasync) but not the meta page that makes it current; the next commit's
 *    flush (or kvs_disk_sync) carries it. An OS crash or power loss may undo the last
 *    commit, never damage the environment (LMDB's documentation): the price is one
 *    fdatasync per batch on the writer thread, off the request path.
 *  - kvs_disk_put_durable: commits and flushes (fdatasync) before returning, whatever
 *    the mode: for `durable` namespaces. Namespace records are always flushed.
 *
 * Threading: every function is thread-safe, except open/close (nothing else may run on
 * the handle then). The environment is opened with MDB_NOTLS, so read transactions are
 * not tied to a thread: reads run on any thread (libuv's pool), each in its own short
 * read transaction. LMDB allows one write transaction at a time: writers (put, del,
 * namespace records, dropping a corrupt block) are serialized by one mutex inside the
 * handle, a leaf lock held only for the transaction; callers run writes off the loop
 * thread. A handle must not be used in a child after fork() (LMDB's rule). Callbacks
 * run inside a read transaction: they must not call functions of this module that write
 * (put, del, ns_put, ns_del, sync), or the batch they are part of.
 */
#ifndef KVS_STORAGE_DISK_H
#define KVS_STORAGE_DISK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "gpu/base/err.h"
#include "gpu/base/log.h"

#define KVS_DISK_VERSION 1        /* format version of the data directory */
#define KVS_DISK_NS_REC_MAX 64    /* bytes of a namespace record name */
#define KVS_DISK_IDENTITY_MAX 255 /* bytes of a daemon identity */

typedef struct kvs_disk kvs_disk;

typedef struct kvs_disk_opts {
    bool nosync;          /* MDB_NOSYNC: see Durability above */
    bool nometasync;      /* MDB_NOMETASYNC (ignored with nosync): see Durability above */
    uint64_t map_bytes;   /* LMDB map size; 0 = kvs_disk_map_bytes(budget) */
    const char *identity; /* this daemon's identity (borrowed; copied), or NULL: an
                           * existing directory recorded under another identity is
                           * refused; NULL skips the check */
    unsigned max_readers; /* concurrent read transactions; 0 = 512 */
    bool reset_broken;    /* a directory of ours whose data.mdb is empty, missing beside a
                           * lock.mdb, truncated or damaged (what is otherwise refused with
                           * KVS_EPROTO, or as "not an LMDB environment") gets a new, empty
                           * environment: data.mdb is renamed data.mdb.broken-<unix time>,
                           * never deleted; an operator's explicit choice (kvstashd
                           * --data-dir-reset), never a default */
    kvs_log_fn log;       /* may be NULL */
    void *log_ctx;
} kvs_disk_opts;

/* Map size for a budget of `budget_bytes` of encoded blocks:
 *     budget + budget / 4 + 64 MiB, rounded up to a MiB.
 * The 25% covers what LMDB needs beyond the values: B-tree pages for the keys (~40 bytes
 * per block), each value rounded up to whole pages (one 16-byte header, then at most one
 * page lost per block: under 4% for blocks of 100 KiB and more), pages a writer cannot
 * reuse yet because a reader still sees them, and the free list. The 64 MiB carry the
 * meta and namespace records and small budgets. Blocks of a few KiB lose up to half
 * their pages to rounding, so with them the map fills before the budget: KVS_ENOSPC
 * says so. Returns 0 if the budget is 0 or the map would exceed 64 TiB. */
uint64_t kvs_disk_map_bytes(uint64_t budget_bytes);

/* Opens (creating it if missing or empty) the data directory `dir` (its parent must
 * exist). opts may be NULL (defaults). KVS_EINVAL: bad argument, a path that is not a
 * directory, a directory that is not ours, one in use, an identity mismatch; KVS_EPROTO:
 * an unknown format version or a truncated/corrupt environment; KVS_EIO: system or LMDB
 * errors. Every message names the path and what is wrong. Close with kvs_disk_close. */
int kvs_disk_open(const char *dir, uint64_t budget_bytes, const kvs_disk_opts *opts, kvs_disk **out,
                  kvs_err *err);
/* Closes the environment. No call may be in progress on the handle. */
void kvs_disk_close(kvs_disk *d);

const char *kvs_disk_path(const kvs_disk *d);     /* borrowed, valid until close */
const char *kvs_disk_identity(const kvs_disk *d); /* recorded identity ("" if none) */

/* ---------------------------------------------------------------- blocks */

/* One block to store; every pointer is borrowed for the duration of the call. */
typedef struct kvs_disk_item {
    uint32_t ns_id;
    const void *key; /* 1..KVS_KEY_MAX bytes */
    size_t key_len;
    const void *bytes; /* a complete encoded block of namespace ns_id */
    size_t len;
} kvs_disk_item;

/* A block's name; borrowed for the duration of the call. */
typedef struct kvs_disk_key {
    uint32_t ns_id;
    const void *key;
    size_t key_len;
} kvs_disk_key;

/* Stores n blocks in one write transaction (replacing blocks of the same name; within a
 * batch, the last item of a name wins): all of them or none. Each item is checked first
 * (key length; the block's header: magic, version, length = len, namespace = ns_id;
 * the checksum is the caller's business: host blocks are verified when read):
 * KVS_EINVAL names the item. KVS_ENOSPC: the map or the filesystem has no room for
 * the batch with a few MiB to spare for deletions (checked before the transaction starts:
 * disk.c invariant 4), or LMDB found it full anyway; nothing was written: evict and retry
 * (deletions skip the check and use the spare room, so they succeed on a full disk). KVS_E2BIG: too
 * many pages for one transaction: split the batch. KVS_EIO: any other failure, with LMDB's text,
 * counted in write_errors. Blocks: it waits for the writer lock and, in synced mode,
 * for fdatasync.
 * Evict-then-retry works: LMDB reuses the pages freed by a transaction only from the
 * second transaction after it, so a put that finds the map full right after a commit
 * that deleted blocks first commits a one-record change ("gen") and tries once more. */
int kvs_disk_put_batch(kvs_disk *d, const kvs_disk_item *items, size_t n, kvs_err *err);
/* kvs_disk_put_batch, then flushes the environment to stable storage (fdatasync) before
 * returning, in either mode: when it returns 0 the blocks survive a power loss. */
int kvs_disk_put_durable(kvs_disk *d, const kvs_disk_item *items, size_t n, kvs_err *err);

/* Deletes the named blocks that exist, in one write transaction; *deleted (may be NULL)
 * = how many existed. Keys of a bad length are KVS_EINVAL (nothing deleted). */
int kvs_disk_del(kvs_disk *d, const kvs_disk_key *keys, size_t n, uint64_t *deleted, kvs_err *err);

/* Receives a stored value, zero-copy: `bytes` points into LMDB's read-only map and is
 * valid only until the callback returns (decode from it or copy it; never write to it).
 * Small values are only 2-byte aligned; values over ~2 KiB start 16 bytes into a page.
 * A non-zero return is passed back to the caller of the function that called it. */
typedef int (*kvs_disk_read_fn)(const void *bytes, size_t len, void *arg);

/* Looks up a block and verifies it (kvs_format_parse: checksum over every byte, and the
 * namespace in its header) inside a short read transaction, then calls fn on it.
 * KVS_ENOTFOUND on a miss. A block that fails verification is deleted and counted
 * (checksum_failures; logged) and the call answers KVS_EDATALOSS without calling fn. */
int kvs_disk_get(kvs_disk *d, uint32_t ns_id, const void *key, size_t key_len, kvs_disk_read_fn fn,
                 void *arg, kvs_err *err);

/* ---------------------------------------------------------------- startup scan */

/* One stored block, as the scan reports it (pointers valid during the callback). */
typedef struct kvs_disk_entry {
    uint32_t ns_id;
    const uint8_t *key; /* the block key, without the namespace id */
    size_t key_len;
    uint64_t bytes;            /* stored (encoded) size */
    uint32_t tokens;           /* from the block header */
    uint32_t k_state, v_state; /* codec state versions it was encoded with */
    uint8_t k_codec, k_bits;   /* the codec of each side (a fallback codec's, if so) */
    uint8_t v_codec, v_bits;
    bool bad; /* KVS_DISK_SCAN_BAD: the record failed its checks (only
               * ns_id and key are meaningful then) */
} kvs_disk_entry;

/* Non-zero stops the scan; kvs_disk_scan returns that value. */
typedef int (*kvs_disk_scan_fn)(const kvs_disk_entry *e, void *arg);

enum {
    KVS_DISK_SCAN_VERIFY = 1, /* verify every checksum too (reads every byte: kvctl verify) */
    KVS_DISK_SCAN_BAD = 2,    /* report the records that fail too (e->bad set), so the caller
                               * can forget them; they are dropped after the scan as usual */
};

typedef struct kvs_disk_scan_info {
    uint64_t blocks;  /* entries reported */
    uint64_t bytes;   /* their stored bytes */
    uint64_t dropped; /* records found bad, deleted and counted in checksum_failures */
} kvs_disk_scan_info;

/* Calls fn once for every stored block, in key order (namespace id, then key). Without
 * KVS_DISK_SCAN_VERIFY each record costs one read of its header (kvs_format_peek plus
 * magic, version, length and namespace checks). Records that fail those checks are
 * not reported (unless KVS_DISK_SCAN_BAD: then with e->bad set, when their key has a
 * valid length): they are deleted once the scan is done and counted. The scan reads in
 * read transactions of a few thousand records, so it does not hold one snapshot for
 * long; a block present for the whole scan is reported exactly once. info may be NULL. */
int kvs_disk_scan(kvs_disk *d, unsigned flags, kvs_disk_scan_fn fn, void *arg,
                  kvs_disk_scan_info *info, kvs_err *err);

/* ---------------------------------------------------------------- namespace records */

/* Stores (replaces) record `rec` (0..KVS_DISK_NS_REC_MAX bytes, e.g. "" for the spec,
 * "K" + a state version for a codec state) of namespace ns_id; the value is opaque.
 * Committed and flushed before returning. Errors as kvs_disk_put_batch. */
int kvs_disk_ns_put(kvs_disk *d, uint32_t ns_id, const void *rec, size_t rec_len, const void *val,
                    size_t val_len, kvs_err *err);
/* Reads one record (zero-copy, as kvs_disk_get). KVS_ENOTFOUND if absent. */
int kvs_disk_ns_get(kvs_disk *d, uint32_t ns_id, const void *rec, size_t rec_len,
                    kvs_disk_read_fn fn, void *arg, kvs_err *err);

/* Called for each namespace record; pointers valid during the call. */
typedef int (*kvs_disk_ns_fn)(uint32_t ns_id, const void *rec, size_t rec_len, const void *val,
                              size_t val_len, void *arg);
/* Every namespace record in (namespace id, record name) order, in one read transaction.
 * A non-zero return from fn stops the listing and is returned. */
int kvs_disk_ns_list(kvs_disk *d, kvs_disk_ns_fn fn, void *arg, kvs_err *err);
/* Drops namespace ns_id: first its blocks (in transactions of a few thousand), then its
 * records, then flushes; a crash midway leaves the namespace with fewer blocks, never
 * blocks without a namespace. *blocks_deleted may be NULL. Dropping an absent namespace
 * is not an error. */
int kvs_disk_ns_del(kvs_disk *d, uint32_t ns_id, uint64_t *blocks_deleted, kvs_err *err);

/* ---------------------------------------------------------------- stats, sync */

typedef struct kvs_disk_stats {
    uint64_t map_bytes;  /* LMDB map size: the most data.mdb can grow to */
    uint64_t file_bytes; /* high-water mark of data.mdb: (last page + 1) * page size */
    uint64_t used_bytes; /* pages of every B-tree (values included) and the 2 meta pages;
                          * the rest of file_bytes is free pages, reused by later writes
                          * (some only once older readers are done) */
    uint64_t page_size;
    uint64_t blocks;     /* stored blocks */
    uint64_t ns_records; /* stored namespace records */
    /* since open: */
    uint64_t write_errors;      /* failed writes (map full excluded) */
    uint64_t read_errors;       /* LMDB failures while reading */
    uint64_t checksum_failures; /* blocks found bad (get or scan), deleted */
    uint64_t map_full;          /* writes refused with KVS_ENOSPC by a full map */
    uint64_t syncs;             /* explicit flushes (put_durable, ns records, sync) */
    uint64_t no_room;           /* puts refused before they started: no room (KVS_ENOSPC) */
} kvs_disk_stats;

/* Fills *out from mdb_env_info / mdb_stat (one short read transaction) and the
 * counters. */
int kvs_disk_get_stats(kvs_disk *d, kvs_disk_stats *out, kvs_err *err);

/* Flushes every committed transaction to stable storage (fdatasync). Useful in nosync
 * mode, on a timer or at shutdown, to bound what an OS crash can take. */
int kvs_disk_sync(kvs_disk *d, kvs_err *err);

/* ---------------------------------------------------------------- testing */

/* Tests: pretend data.mdb sits on a filesystem with room for `bytes` of it (free space =
 * bytes - its size; 0: the real filesystem again), to exercise the room check of put
 * without filling a real one. */
void kvs_disk_test_fs_limit(kvs_disk *d, uint64_t bytes);

/* Fault injection (STYLE: tests): the `nth` write transaction from now (1 = the next)
 * fails as if LMDB had returned mdb_rc (e.g. EIO, MDB_MAP_FULL) and is aborted; 0
 * disarms. */
void kvs_disk_test_fail_write(kvs_disk *d, unsigned nth, int mdb_rc);
/* The next n write transactions fail as if LMDB had returned mdb_rc; 0 disarms. */
void kvs_disk_test_fail_writes(kvs_disk *d, unsigned n, int mdb_rc);

#endif
