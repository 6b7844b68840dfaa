/* The disk tier over LMDB: see disk.h for the directory layout, the durability of each
 * mode and the threading rules.
 *
 * Invariants:
 *  1. Every value in `blocks` was a well-formed encoded block of the namespace in its key
 *     when it was written (put checks the header), so a value that is not, found later,
 *     is corruption: it is dropped and counted, never handed out.
 *  2. Writes happen only under d->wmu, held for exactly one write transaction (never
 *     across a callback, never while another lock is taken: a leaf lock).
 *  3. Nothing is written into a directory before it has been judged ours: the directory
 *     is locked (flock, which writes nothing), listed, and an existing data.mdb is read
 *     through a read-only LMDB handle without a lock file before the real open.
 *  4. A put never starts a transaction it expects to fail for room: it first checks its
 *     pages (estimated from above) plus HEADROOM against the map's free pages and the
 *     filesystem's free bytes plus the file's own free pages, and answers KVS_ENOSPC if
 *     they do not fit. The headroom (HEADROOM_MAX) is for deletions, which skip the check: on a
 * full disk the store can always evict, and deleting never fails for lack of room (unless something
 * else fills the filesystem, which no check here can prevent; then the failed transaction leaves
 * LMDB as it was and the caller retries).
 */
#include "storage/disk.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <lmdb.h>

#include "gpu/base/mem.h"
#include "gpu/codec/format.h"
#include "gpu/codec/spec.h"
#include "storage/disk_int.h"

#define SCAN_CHUNK 4096  /* records per read transaction of a scan */
#define DEL_CHUNK 4096   /* deletes per write transaction of ns_del */
#define LMDB_KEY_MAX 511 /* LMDB's compile-time key limit (mdb_env_get_maxkeysize) */
#define BKEY_MAX (4 + KVS_KEY_MAX)
#define NKEY_MAX (4 + KVS_DISK_NS_REC_MAX)
#define LOG_BAD_MAX 8 /* bad records logged one by one per scan */
/* Kept free in the map and on the filesystem by every put (invariant 4): LMDB copies on
 * write, so deleting records takes new pages too (the leaves and branches it changes, and
 * the free list that grows by the pages it frees). A few MiB cover a deletion of
 * thousands of records; a tiny map (tests) keeps a sixteenth. */
#define HEADROOM_MAX (4 * MIB)

void kvs__disk_log(kvs_disk *d, kvs_log_level lv, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    kvs_vlogf(d->log, d->log_ctx, lv, fmt, ap);
    va_end(ap);
}

static void put_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static uint32_t get_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* An LMDB key: namespace id (big-endian) then `len` bytes. */
static MDB_val make_key(uint8_t *buf, uint32_t ns_id, const void *bytes, size_t len)
{
    put_be32(buf, ns_id);
    if (len)
        memcpy(buf + 4, bytes, len);
    return (MDB_val){.mv_size = 4 + len, .mv_data = buf};
}

/* Up to 16 bytes of a key in hex for messages ("…" when cut); buf has 40 bytes. */
const char *kvs__disk_hex(const void *p, size_t n, char *buf)
{
    const uint8_t *b = p;
    size_t m = n > 16 ? 16 : n, o = 0;
    for (size_t i = 0; i < m; i++)
        o += (size_t)snprintf(buf + o, 40 - o, "%02x", b[i]);
    if (m < n)
        snprintf(buf + o, 40 - o, "...");
    return buf;
}

/* ---------------------------------------------------------------- errors */

static int write_fail(kvs_disk *d, int rc, const char *what, kvs_err *err)
{
    if (rc == MDB_MAP_FULL) {
        atomic_fetch_add(&d->map_full, 1);
        return kvs_err_set(err, KVS_ENOSPC, "disk tier %s: %s: LMDB map full: evict and retry",
                           d->path, what);
    }
    if (rc == MDB_TXN_FULL)
        return kvs_err_set(err, KVS_E2BIG,
                           "disk tier %s: %s: too many pages for one "
                           "transaction: split the batch",
                           d->path, what);
    atomic_fetch_add(&d->write_errors, 1);
    if (rc == ENOSPC || rc == EDQUOT) {
        kvs__disk_log(d, KVS_LOG_ERROR, "disk tier %s: %s: filesystem full", d->path, what);
        return kvs_err_set(err, KVS_ENOSPC, "disk tier %s: %s: filesystem full (%s)", d->path, what,
                           mdb_strerror(rc));
    }
    kvs__disk_log(d, KVS_LOG_ERROR, "disk tier %s: %s: %s", d->path, what, mdb_strerror(rc));
    return kvs_err_set(err, KVS_EIO, "disk tier %s: %s: %s", d->path, what, mdb_strerror(rc));
}

static int read_fail(kvs_disk *d, int rc, const char *what, kvs_err *err)
{
    atomic_fetch_add(&d->read_errors, 1);
    return kvs_err_set(err, KVS_EIO, "disk tier %s: %s: %s", d->path, what, mdb_strerror(rc));
}

/* An LMDB failure while opening or inspecting the environment. */
int kvs__disk_open_fail(const char *path, int rc, const char *what, kvs_err *err)
{
    if (rc == MDB_INVALID)
        return kvs_err_set(err, KVS_EINVAL,
                           "disk tier %s: data.mdb is not an LMDB environment "
                           "(or its header pages are destroyed): not a kvstash data directory, "
                           "refusing to use it",
                           path);
    if (rc == MDB_VERSION_MISMATCH || rc == MDB_CORRUPTED || rc == MDB_PAGE_NOTFOUND ||
        rc == MDB_INCOMPATIBLE || rc == MDB_BAD_DBI)
        return kvs_err_set(err, KVS_EPROTO,
                           "disk tier %s: %s: %s: damaged or incompatible "
                           "environment, refusing to use it",
                           path, what, mdb_strerror(rc));
    return kvs_err_set(err, KVS_EIO, "disk tier %s: %s: %s", path, what, mdb_strerror(rc));
}

int kvs__disk_sys_fail(const char *path, const char *what, kvs_err *err)
{
    return kvs_err_set(err, KVS_EIO, "disk tier %s: %s: %s", path, what, strerror(errno));
}

/* ---------------------------------------------------------------- block checks */

/* The block's header names the namespace it is stored under. */
static int check_ns(const kvs_block_info *info, uint32_t ns_id, kvs_err *err)
{
    if (info->ns_id != ns_id)
        return kvs_err_set(err, KVS_EPROTO,
                           "encoded block: header names namespace %" PRIu32
                           ", stored under %" PRIu32,
                           info->ns_id, ns_id);
    return 0;
}

/* What the scan relies on and put guarantees (invariant 1): header readable, magic,
 * version, length and namespace. KVS_EPROTO with the reason. */
static int check_header(const uint8_t *b, size_t len, uint32_t ns_id, kvs_block_info *info,
                        kvs_err *err)
{
    int rc = kvs_format_peek(b, len, info, err);
    if (rc)
        return rc;
    if (memcmp(b, KVS_FORMAT_MAGIC, 4) != 0)
        return kvs_err_set(err, KVS_EPROTO, "encoded block: bad magic (not a KVS1 block)");
    if (info->version != KVS_FORMAT_VERSION)
        return kvs_err_set(err, KVS_EPROTO, "encoded block: format version %u unknown",
                           info->version);
    if (info->total_bytes != len)
        return kvs_err_set(err, KVS_EPROTO,
                           "encoded block: header says %" PRIu64 " bytes, value has %zu",
                           info->total_bytes, len);
    return check_ns(info, ns_id, err);
}

/* Everything: kvs_format_parse (checksum over all bytes) and the namespace. */
static int check_full(const uint8_t *b, size_t len, uint32_t ns_id, kvs_block_info *info,
                      kvs_err *err)
{
    int rc = kvs_format_parse(b, len, info, err);
    return rc ? rc : check_ns(info, ns_id, err);
}

static bool key_len_ok(size_t n)
{
    return n >= 1 && n <= KVS_KEY_MAX;
}

/* ---------------------------------------------------------------- transactions */

static int wbegin(kvs_disk *d, MDB_txn **txn, kvs_err *err)
{
    pthread_mutex_lock(&d->wmu);
    int rc = mdb_txn_begin(d->env, NULL, 0, txn);
    if (rc) {
        pthread_mutex_unlock(&d->wmu);
        return write_fail(d, rc, "mdb_txn_begin", err);
    }
    return 0;
}

static void wabort(kvs_disk *d, MDB_txn *txn)
{
    mdb_txn_abort(txn);
    pthread_mutex_unlock(&d->wmu);
}

/* Commits a write transaction (or fails it as injected); LMDB's code. `freed`: the
 * transaction deleted records (see freed_pending). */
static int commit_locked(kvs_disk *d, MDB_txn *txn, bool freed)
{
    int rc;
    if ((d->fail_nth && --d->fail_nth == 0) || (d->fail_left && d->fail_left--)) {
        rc = d->fail_rc;
        mdb_txn_abort(txn);
    } else {
        rc = mdb_txn_commit(txn);
    }
    if (rc == 0)
        d->freed_pending = freed;
    return rc;
}

/* Commits and releases the writer lock. */
static int wcommit(kvs_disk *d, MDB_txn *txn, bool freed, kvs_err *err)
{
    int rc = commit_locked(d, txn, freed);
    pthread_mutex_unlock(&d->wmu);
    return rc ? write_fail(d, rc, "commit", err) : 0;
}

/* Commits a change to one small meta record ("gen", a counter), so that the pages the
 * last commit freed become reusable by the next transaction (freed_pending). */
static int bump_locked(kvs_disk *d)
{
    MDB_txn *txn;
    int rc = mdb_txn_begin(d->env, NULL, 0, &txn);
    if (rc)
        return rc;
    MDB_val k = {.mv_size = 3, .mv_data = "gen"}, v;
    uint64_t gen = 0;
    rc = mdb_get(txn, d->meta, &k, &v);
    if (rc == 0 && v.mv_size == sizeof gen)
        memcpy(&gen, v.mv_data, sizeof gen);
    gen++;
    v = (MDB_val){.mv_size = sizeof gen, .mv_data = &gen};
    if ((rc = mdb_put(txn, d->meta, &k, &v, 0))) {
        mdb_txn_abort(txn);
        return rc;
    }
    return commit_locked(d, txn, false);
}

static int rbegin(kvs_disk *d, MDB_txn **txn, kvs_err *err)
{
    int rc = mdb_txn_begin(d->env, NULL, MDB_RDONLY, txn);
    return rc ? read_fail(d, rc, "mdb_txn_begin (read)", err) : 0;
}

static int do_sync(kvs_disk *d, kvs_err *err)
{
    atomic_fetch_add(&d->syncs, 1);
    int rc = mdb_env_sync(d->env, 1);
    return rc ? write_fail(d, rc, "mdb_env_sync", err) : 0;
}

/* ---------------------------------------------------------------- blocks */

/* One write transaction storing items; LMDB's code. Replacing a block frees pages too,
 * but is not counted as freeing: the worst case is one KVS_ENOSPC more. */
static int put_locked(kvs_disk *d, const kvs_disk_item *items, size_t n)
{
    MDB_txn *txn;
    int rc = mdb_txn_begin(d->env, NULL, 0, &txn);
    if (rc)
        return rc;
    for (size_t i = 0; i < n; i++) {
        uint8_t kb[BKEY_MAX];
        MDB_val k = make_key(kb, items[i].ns_id, items[i].key, items[i].key_len);
        MDB_val v = kvs__mdb_val(items[i].bytes, items[i].len);
        if ((rc = mdb_put(txn, d->blocks, &k, &v, 0))) {
            mdb_txn_abort(txn);
            return rc;
        }
    }
    return commit_locked(d, txn, false);
}

/* Bytes of pages a put of these items may take, from above: each value over a page's
 * worth goes to overflow pages of its own (16-byte header), and every item adds a leaf
 * node; plus pages for B-tree splits, the branches above and the free list. */
static uint64_t put_need(const kvs_disk_item *items, size_t n, uint64_t psize)
{
    uint64_t need = 16 * psize;
    for (size_t i = 0; i < n; i++)
        need += (items[i].len + 16 + psize - 1) / psize * psize + 4 + items[i].key_len + 64;
    return need;
}

/* Invariant 4: KVS_ENOSPC unless `need` bytes plus HEADROOM fit both the map and the
 * filesystem. Under wmu (no other writer changes the numbers meanwhile). */
static int room_locked(kvs_disk *d, uint64_t need, kvs_err *err)
{
    MDB_txn *txn;
    int rc = mdb_txn_begin(d->env, NULL, MDB_RDONLY, &txn);
    if (rc)
        return read_fail(d, rc, "mdb_txn_begin (room check)", err);
    MDB_dbi dbis[5] = {0, d->main, d->meta, d->ns, d->blocks};
    uint64_t pages = 2, psize = 4096;
    for (size_t i = 0; i < 5 && rc == 0; i++) {
        MDB_stat s;
        if ((rc = mdb_stat(txn, dbis[i], &s)) == 0) {
            pages += s.ms_branch_pages + s.ms_leaf_pages + s.ms_overflow_pages;
            psize = s.ms_psize;
        }
    }
    mdb_txn_abort(txn);
    if (rc)
        return read_fail(d, rc, "mdb_stat (room check)", err);
    MDB_envinfo ei;
    mdb_env_info(d->env, &ei);
    uint64_t used = pages * psize, file = ((uint64_t)ei.me_last_pgno + 1) * psize;
    uint64_t fs;
    if (d->test_fs_limit) { /* a filesystem that holds test_fs_limit bytes of data.mdb */
        struct stat fst;
        if (fstatat(d->dirfd, "data.mdb", &fst, 0) != 0)
            return kvs__disk_sys_fail(d->path, "stat data.mdb", err);
        fs =
            d->test_fs_limit > (uint64_t)fst.st_size ? d->test_fs_limit - (uint64_t)fst.st_size : 0;
    } else {
        struct statvfs sv;
        if (fstatvfs(d->dirfd, &sv) != 0)
            return kvs__disk_sys_fail(d->path, "fstatvfs", err);
        fs = (uint64_t)sv.f_bavail * sv.f_frsize;
    }
    /* Free pages inside the file are reused before the file grows. */
    uint64_t map_room = ei.me_mapsize > used ? ei.me_mapsize - used : 0;
    uint64_t fs_room = fs + (file > used ? file - used : 0);
    uint64_t room = map_room < fs_room ? map_room : fs_room;
    uint64_t headroom = ei.me_mapsize / 16 < HEADROOM_MAX ? ei.me_mapsize / 16 : HEADROOM_MAX;
    if (need + headroom <= room)
        return 0;
    atomic_fetch_add(&d->no_room, 1);
    return kvs_err_set(err, KVS_ENOSPC,
                       "disk tier %s: no room for %" PRIu64 " bytes (%s full: %" PRIu64
                       " bytes free, %" PRIu64 " KiB kept for deletions)",
                       d->path, need, map_room <= fs_room ? "LMDB map" : "filesystem", room,
                       headroom >> 10);
}

/* LMDB reports a short write as EIO ("which error code?" in its source), and that is what
 * a filesystem that fills under it (the room check counts free pages of the file that
 * LMDB may not reuse yet, and other programs write there too) gives: when the
 * filesystem now has less than `need` bytes free, the EIO was a full disk. */
static bool fs_short(kvs_disk *d, uint64_t need)
{
    if (d->test_fs_limit)
        return false;
    struct statvfs sv;
    return fstatvfs(d->dirfd, &sv) == 0 && (uint64_t)sv.f_bavail * sv.f_frsize < need;
}

static int put_batch(kvs_disk *d, const kvs_disk_item *items, size_t n, bool durable, kvs_err *err)
{
    if (!d || (n && !items))
        return kvs_err_set(err, KVS_EINVAL, "disk put: NULL argument");
    for (size_t i = 0; i < n; i++) {
        const kvs_disk_item *it = &items[i];
        if (!it->key || !key_len_ok(it->key_len))
            return kvs_err_set(err, KVS_EINVAL, "disk put: item %zu: key: %zu bytes (1..%d)", i,
                               it->key_len, KVS_KEY_MAX);
        kvs_block_info info;
        kvs_err why;
        if (!it->bytes || check_header(it->bytes, it->len, it->ns_id, &info, &why)) {
            char h[40];
            return kvs_err_set(err, KVS_EINVAL,
                               "disk put: item %zu (namespace %" PRIu32 ", key %s): %s", i,
                               it->ns_id, kvs__disk_hex(it->key, it->key_len, h),
                               it->bytes ? why.msg : "no bytes");
        }
    }
    if (n == 0)
        return durable && d->lazy ? do_sync(d, err) : 0;
    pthread_mutex_lock(&d->wmu);
    long pg = sysconf(_SC_PAGESIZE); /* LMDB's page size is the OS page size */
    int rc = room_locked(d, put_need(items, n, pg > 0 ? (uint64_t)pg : 4096), err);
    if (rc) {
        pthread_mutex_unlock(&d->wmu);
        return rc;
    }
    uint64_t need = put_need(items, n, pg > 0 ? (uint64_t)pg : 4096);
    rc = put_locked(d, items, n);
    if (rc == EIO && fs_short(d, need))
        rc = ENOSPC;
    if ((rc == MDB_MAP_FULL || rc == ENOSPC) && d->freed_pending && bump_locked(d) == 0) {
        rc = put_locked(d, items, n);
        if (rc == EIO && fs_short(d, need))
            rc = ENOSPC;
    }
    pthread_mutex_unlock(&d->wmu);
    if (rc)
        return write_fail(d, rc, "storing blocks", err);
    /* In synced mode the commit has flushed already. */
    return durable && d->lazy ? do_sync(d, err) : 0;
}

int kvs_disk_put_batch(kvs_disk *d, const kvs_disk_item *items, size_t n, kvs_err *err)
{
    return put_batch(d, items, n, false, err);
}

int kvs_disk_put_durable(kvs_disk *d, const kvs_disk_item *items, size_t n, kvs_err *err)
{
    return put_batch(d, items, n, true, err);
}

int kvs_disk_del(kvs_disk *d, const kvs_disk_key *keys, size_t n, uint64_t *deleted, kvs_err *err)
{
    if (deleted)
        *deleted = 0;
    if (!d || (n && !keys))
        return kvs_err_set(err, KVS_EINVAL, "disk delete: NULL argument");
    for (size_t i = 0; i < n; i++)
        if (!keys[i].key || !key_len_ok(keys[i].key_len))
            return kvs_err_set(err, KVS_EINVAL, "disk delete: key %zu: %zu bytes (1..%d)", i,
                               keys[i].key_len, KVS_KEY_MAX);
    if (n == 0)
        return 0;
    MDB_txn *txn;
    int rc = wbegin(d, &txn, err);
    if (rc)
        return rc;
    uint64_t count = 0;
    for (size_t i = 0; i < n; i++) {
        uint8_t kb[BKEY_MAX];
        MDB_val k = make_key(kb, keys[i].ns_id, keys[i].key, keys[i].key_len);
        rc = mdb_del(txn, d->blocks, &k, NULL);
        if (rc == 0)
            count++;
        else if (rc != MDB_NOTFOUND) {
            wabort(d, txn);
            return write_fail(d, rc, "mdb_del", err);
        }
    }
    if ((rc = wcommit(d, txn, count > 0, err)))
        return rc;
    if (deleted)
        *deleted = count;
    return 0;
}

/* A bad record's LMDB key, kept to drop it once the read transaction is over. */
typedef struct bad_key {
    size_t len;
    uint8_t k[LMDB_KEY_MAX];
} bad_key;

/* Deletes the records among `bad` that still fail verification (another writer may have
 * replaced one since it was read), in transactions of DEL_CHUNK. Returns how many went.
 * A failure here is counted and logged only: the record is found again next time. */
static uint64_t drop_bad(kvs_disk *d, const bad_key *bad, size_t n)
{
    uint64_t dropped = 0;
    for (size_t at = 0; at < n; at += DEL_CHUNK) {
        size_t end = n - at > DEL_CHUNK ? at + DEL_CHUNK : n;
        MDB_txn *txn;
        kvs_err err;
        if (wbegin(d, &txn, &err))
            goto failed;
        uint64_t here = 0;
        for (size_t i = at; i < end; i++) {
            MDB_val k = kvs__mdb_val(bad[i].k, bad[i].len), v;
            int rc = mdb_get(txn, d->blocks, &k, &v);
            if (rc == MDB_NOTFOUND)
                continue;
            kvs_block_info info;
            if (rc == 0 && k.mv_size > 4 &&
                check_full(v.mv_data, v.mv_size, get_be32(bad[i].k), &info, NULL) == 0)
                continue;
            if (rc == 0)
                rc = mdb_del(txn, d->blocks, &k, NULL);
            if (rc) {
                wabort(d, txn);
                write_fail(d, rc, "dropping a bad block", &err);
                goto failed;
            }
            here++;
        }
        if (wcommit(d, txn, here > 0, &err))
            goto failed;
        dropped += here;
        continue;
    failed:
        kvs__disk_log(d, KVS_LOG_ERROR, "disk tier %s: could not drop bad blocks: %s", d->path,
                      err.msg);
        break;
    }
    return dropped;
}

int kvs_disk_get(kvs_disk *d, uint32_t ns_id, const void *key, size_t key_len, kvs_disk_read_fn fn,
                 void *arg, kvs_err *err)
{
    if (!d || !fn || !key || !key_len_ok(key_len))
        return kvs_err_set(err, KVS_EINVAL, "disk get: key: %zu bytes (1..%d)", key_len,
                           KVS_KEY_MAX);
    bad_key bk;
    MDB_val k = make_key(bk.k, ns_id, key, key_len), v;
    bk.len = k.mv_size;
    MDB_txn *txn;
    int rc = rbegin(d, &txn, err);
    if (rc)
        return rc;
    char h[40];
    kvs__disk_hex(key, key_len, h);
    rc = mdb_get(txn, d->blocks, &k, &v);
    if (rc) {
        mdb_txn_abort(txn);
        if (rc == MDB_NOTFOUND)
            return kvs_err_set(err, KVS_ENOTFOUND,
                               "disk tier: key %s of namespace %" PRIu32 " not found", h, ns_id);
        return read_fail(d, rc, "mdb_get", err);
    }
    kvs_block_info info;
    kvs_err why;
    if (check_full(v.mv_data, v.mv_size, ns_id, &info, &why)) {
        mdb_txn_abort(txn);
        atomic_fetch_add(&d->checksum_failures, 1);
        kvs__disk_log(d, KVS_LOG_WARN,
                      "disk tier %s: block %s of namespace %" PRIu32 " is bad (%s): "
                      "dropped",
                      d->path, h, ns_id, why.msg);
        drop_bad(d, &bk, 1);
        return kvs_err_set(err, KVS_EDATALOSS,
                           "disk tier: block %s of namespace %" PRIu32 ": %s: dropped", h, ns_id,
                           why.msg);
    }
    rc = fn(v.mv_data, v.mv_size, arg);
    mdb_txn_abort(txn);
    return rc;
}

/* ---------------------------------------------------------------- scan */

int kvs_disk_scan(kvs_disk *d, unsigned flags, kvs_disk_scan_fn fn, void *arg,
                  kvs_disk_scan_info *info, kvs_err *err)
{
    if (info)
        memset(info, 0, sizeof *info);
    if (!d || !fn)
        return kvs_err_set(err, KVS_EINVAL, "disk scan: NULL argument");
    kvs_disk_scan_info si = {0};
    bad_key *bad = NULL;
    size_t nbad = 0, cap = 0;
    uint8_t last[LMDB_KEY_MAX];
    size_t last_len = 0;
    int rc = 0, stop = 0;
    /* Read transactions of SCAN_CHUNK records, each resuming after the last key seen. */
    while (!stop) {
        MDB_txn *txn;
        MDB_cursor *cur;
        if ((rc = rbegin(d, &txn, err)))
            break;
        if ((rc = mdb_cursor_open(txn, d->blocks, &cur))) {
            mdb_txn_abort(txn);
            rc = read_fail(d, rc, "mdb_cursor_open", err);
            break;
        }
        MDB_val k, v;
        if (!last_len) {
            rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST);
        } else {
            k = (MDB_val){.mv_size = last_len, .mv_data = last};
            rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
            if (rc == 0 && k.mv_size == last_len && !memcmp(k.mv_data, last, last_len))
                rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT);
        }
        for (size_t seen = 0; rc == 0 && seen < SCAN_CHUNK; seen++) {
            last_len = k.mv_size <= LMDB_KEY_MAX ? k.mv_size : LMDB_KEY_MAX;
            memcpy(last, k.mv_data, last_len);
            kvs_block_info bi;
            kvs_err why;
            int bad_rc;
            uint32_t ns = 0;
            bool key_ok = k.mv_size >= 5 && k.mv_size <= BKEY_MAX;
            if (!key_ok) {
                bad_rc = kvs_err_set(&why, KVS_EPROTO, "key of %zu bytes", k.mv_size);
            } else {
                ns = get_be32(k.mv_data);
                bad_rc = flags & KVS_DISK_SCAN_VERIFY
                             ? check_full(v.mv_data, v.mv_size, ns, &bi, &why)
                             : check_header(v.mv_data, v.mv_size, ns, &bi, &why);
            }
            if (bad_rc) {
                uint64_t nfail = atomic_fetch_add(&d->checksum_failures, 1);
                char h[40];
                if (nfail < LOG_BAD_MAX)
                    kvs__disk_log(d, KVS_LOG_WARN,
                                  "disk tier %s: scan: record %s is bad (%s): dropping", d->path,
                                  kvs__disk_hex(k.mv_data, k.mv_size, h), why.msg);
                if (nbad == cap) {
                    size_t ncap = cap ? 2 * cap : 64;
                    bad_key *nb = realloc(bad, ncap * sizeof *nb);
                    if (nb) {
                        bad = nb;
                        cap = ncap;
                    }
                }
                if (nbad < cap) { /* else: found again, and dropped, next time */
                    bad[nbad].len = last_len;
                    memcpy(bad[nbad].k, last, last_len);
                    nbad++;
                }
                if ((flags & KVS_DISK_SCAN_BAD) && key_ok) {
                    kvs_disk_entry e = {.ns_id = ns,
                                        .key = (const uint8_t *)k.mv_data + 4,
                                        .key_len = k.mv_size - 4,
                                        .bad = true};
                    if ((stop = fn(&e, arg)))
                        break;
                }
            } else {
                kvs_disk_entry e = {
                    .ns_id = ns,
                    .key = (const uint8_t *)k.mv_data + 4,
                    .key_len = k.mv_size - 4,
                    .bytes = v.mv_size,
                    .tokens = bi.tokens,
                    .k_state = bi.k_state,
                    .v_state = bi.v_state,
                    .k_codec = bi.k_codec,
                    .k_bits = bi.k_bits,
                    .v_codec = bi.v_codec,
                    .v_bits = bi.v_bits,
                };
                si.blocks++;
                si.bytes += v.mv_size;
                if ((stop = fn(&e, arg)))
                    break;
            }
            rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT);
        }
        mdb_cursor_close(cur);
        mdb_txn_abort(txn);
        if (rc == MDB_NOTFOUND) {
            rc = 0;
            break;
        }
        if (rc) {
            rc = read_fail(d, rc, "scan", err);
            break;
        }
    }
    if (nbad) {
        si.dropped = drop_bad(d, bad, nbad);
        kvs__disk_log(d, KVS_LOG_WARN, "disk tier %s: scan dropped %" PRIu64 " bad records",
                      d->path, si.dropped);
    }
    free(bad);
    if (info)
        *info = si;
    return stop ? stop : rc;
}

/* ---------------------------------------------------------------- namespace records */

static bool rec_ok(const void *rec, size_t rec_len)
{
    return rec_len <= KVS_DISK_NS_REC_MAX && (rec || rec_len == 0);
}

int kvs_disk_ns_put(kvs_disk *d, uint32_t ns_id, const void *rec, size_t rec_len, const void *val,
                    size_t val_len, kvs_err *err)
{
    if (!d || !rec_ok(rec, rec_len) || (!val && val_len))
        return kvs_err_set(err, KVS_EINVAL,
                           "disk namespace record: name of %zu bytes (0..%d) "
                           "or NULL value",
                           rec_len, KVS_DISK_NS_REC_MAX);
    uint8_t kb[NKEY_MAX];
    MDB_val k = make_key(kb, ns_id, rec, rec_len);
    MDB_val v = kvs__mdb_val(val_len ? val : "", val_len);
    MDB_txn *txn;
    int rc = wbegin(d, &txn, err);
    if (rc)
        return rc;
    if ((rc = mdb_put(txn, d->ns, &k, &v, 0))) {
        wabort(d, txn);
        return write_fail(d, rc, "mdb_put (namespace record)", err);
    }
    if ((rc = wcommit(d, txn, false, err)))
        return rc;
    return d->lazy ? do_sync(d, err) : 0;
}

int kvs_disk_ns_get(kvs_disk *d, uint32_t ns_id, const void *rec, size_t rec_len,
                    kvs_disk_read_fn fn, void *arg, kvs_err *err)
{
    if (!d || !fn || !rec_ok(rec, rec_len))
        return kvs_err_set(err, KVS_EINVAL, "disk namespace record: name of %zu bytes (0..%d)",
                           rec_len, KVS_DISK_NS_REC_MAX);
    uint8_t kb[NKEY_MAX];
    MDB_val k = make_key(kb, ns_id, rec, rec_len), v;
    MDB_txn *txn;
    int rc = rbegin(d, &txn, err);
    if (rc)
        return rc;
    rc = mdb_get(txn, d->ns, &k, &v);
    if (rc) {
        mdb_txn_abort(txn);
        char h[40];
        if (rc == MDB_NOTFOUND)
            return kvs_err_set(err, KVS_ENOTFOUND,
                               "disk tier: namespace %" PRIu32 " has no "
                               "record '%s' (hex)",
                               ns_id, kvs__disk_hex(rec, rec_len, h));
        return read_fail(d, rc, "mdb_get (namespace record)", err);
    }
    rc = fn(v.mv_data, v.mv_size, arg);
    mdb_txn_abort(txn);
    return rc;
}

int kvs_disk_ns_list(kvs_disk *d, kvs_disk_ns_fn fn, void *arg, kvs_err *err)
{
    if (!d || !fn)
        return kvs_err_set(err, KVS_EINVAL, "disk namespace list: NULL argument");
    MDB_txn *txn;
    MDB_cursor *cur;
    int rc = rbegin(d, &txn, err);
    if (rc)
        return rc;
    if ((rc = mdb_cursor_open(txn, d->ns, &cur))) {
        mdb_txn_abort(txn);
        return read_fail(d, rc, "mdb_cursor_open", err);
    }
    MDB_val k, v;
    int stop = 0;
    for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0 && !stop;
         rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
        if (k.mv_size < 4 || k.mv_size > NKEY_MAX) {
            char h[40];
            kvs__disk_log(d, KVS_LOG_WARN,
                          "disk tier %s: namespace record with a malformed key %s: "
                          "skipped",
                          d->path, kvs__disk_hex(k.mv_data, k.mv_size, h));
            continue;
        }
        const uint8_t *kb = k.mv_data;
        stop = fn(get_be32(kb), kb + 4, k.mv_size - 4, v.mv_data, v.mv_size, arg);
    }
    mdb_cursor_close(cur);
    mdb_txn_abort(txn);
    if (stop)
        return stop;
    return rc == MDB_NOTFOUND ? 0 : read_fail(d, rc, "listing namespace records", err);
}

/* Deletes up to `max` records of `dbi` whose key starts with the 4 bytes of pfx, in one
 * write transaction; *n = how many. */
static int del_prefix(kvs_disk *d, MDB_dbi dbi, const uint8_t *pfx, size_t max, uint64_t *n,
                      kvs_err *err)
{
    MDB_txn *txn;
    MDB_cursor *cur;
    *n = 0;
    int rc = wbegin(d, &txn, err);
    if (rc)
        return rc;
    if ((rc = mdb_cursor_open(txn, dbi, &cur))) {
        wabort(d, txn);
        return write_fail(d, rc, "mdb_cursor_open", err);
    }
    MDB_val k = kvs__mdb_val(pfx, 4), v;
    uint64_t count = 0;
    rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
    while (rc == 0 && count < max && k.mv_size >= 4 && !memcmp(k.mv_data, pfx, 4)) {
        if ((rc = mdb_cursor_del(cur, 0)))
            break;
        count++;
        /* After a delete the cursor already stands on the next record: MDB_NEXT
         * returns that one (LMDB's C_DEL rule). */
        rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT);
    }
    mdb_cursor_close(cur);
    if (rc && rc != MDB_NOTFOUND) {
        wabort(d, txn);
        return write_fail(d, rc, "deleting a namespace", err);
    }
    if ((rc = wcommit(d, txn, count > 0, err)))
        return rc;
    *n = count;
    return 0;
}

int kvs_disk_ns_del(kvs_disk *d, uint32_t ns_id, uint64_t *blocks_deleted, kvs_err *err)
{
    if (blocks_deleted)
        *blocks_deleted = 0;
    if (!d)
        return kvs_err_set(err, KVS_EINVAL, "disk namespace delete: NULL handle");
    uint8_t pfx[4];
    put_be32(pfx, ns_id);
    uint64_t n, total = 0;
    int rc;
    do {
        if ((rc = del_prefix(d, d->blocks, pfx, DEL_CHUNK, &n, err)))
            return rc;
        total += n;
        if (blocks_deleted)
            *blocks_deleted = total;
    } while (n == DEL_CHUNK);
    /* Records last: a crash before this point leaves a namespace with fewer blocks. */
    if ((rc = del_prefix(d, d->ns, pfx, SIZE_MAX, &n, err)))
        return rc;
    return d->lazy ? do_sync(d, err) : 0;
}

/* ---------------------------------------------------------------- stats, sync, tests */

int kvs_disk_get_stats(kvs_disk *d, kvs_disk_stats *out, kvs_err *err)
{
    memset(out, 0, sizeof *out);
    if (!d)
        return kvs_err_set(err, KVS_EINVAL, "disk stats: NULL handle");
    out->write_errors = atomic_load(&d->write_errors);
    out->read_errors = atomic_load(&d->read_errors);
    out->checksum_failures = atomic_load(&d->checksum_failures);
    out->map_full = atomic_load(&d->map_full);
    out->syncs = atomic_load(&d->syncs);
    out->no_room = atomic_load(&d->no_room);
    MDB_txn *txn;
    int rc = rbegin(d, &txn, err);
    if (rc)
        return rc;
    MDB_envinfo ei;
    mdb_env_info(d->env, &ei);
    /* dbi 0 is LMDB's free-page database (as mdb_stat -f reads it); its own pages are
     * in use, the pages it lists are not. */
    MDB_dbi dbis[5] = {0, d->main, d->meta, d->ns, d->blocks};
    MDB_stat st[5];
    uint64_t pages = 2; /* the two meta pages */
    for (size_t i = 0; i < 5; i++) {
        if ((rc = mdb_stat(txn, dbis[i], &st[i]))) {
            mdb_txn_abort(txn);
            return read_fail(d, rc, "mdb_stat", err);
        }
        pages += st[i].ms_branch_pages + st[i].ms_leaf_pages + st[i].ms_overflow_pages;
    }
    mdb_txn_abort(txn);
    out->page_size = st[4].ms_psize;
    out->map_bytes = ei.me_mapsize;
    out->file_bytes = ((uint64_t)ei.me_last_pgno + 1) * out->page_size;
    out->used_bytes = pages * out->page_size;
    out->blocks = st[4].ms_entries;
    out->ns_records = st[3].ms_entries;
    return 0;
}

int kvs_disk_sync(kvs_disk *d, kvs_err *err)
{
    if (!d)
        return kvs_err_set(err, KVS_EINVAL, "disk sync: NULL handle");
    return do_sync(d, err);
}

void kvs_disk_test_fs_limit(kvs_disk *d, uint64_t bytes)
{
    pthread_mutex_lock(&d->wmu);
    d->test_fs_limit = bytes;
    pthread_mutex_unlock(&d->wmu);
}

void kvs_disk_test_fail_writes(kvs_disk *d, unsigned n, int mdb_rc)
{
    pthread_mutex_lock(&d->wmu);
    d->fail_nth = 0;
    d->fail_left = n;
    d->fail_rc = mdb_rc;
    pthread_mutex_unlock(&d->wmu);
}

void kvs_disk_test_fail_write(kvs_disk *d, unsigned nth, int mdb_rc)
{
    pthread_mutex_lock(&d->wmu);
    d->fail_nth = nth;
    d->fail_left = 0;
    d->fail_rc = mdb_rc;
    pthread_mutex_unlock(&d->wmu);
}
