/* The disk tier: opening a data directory (disk.h, "Refusal, never wiping"; disk.c's
 * invariant 3): lock it, judge what is there without writing a byte, then open LMDB and
 * create or check the meta records.
 */
#include "storage/disk.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "gpu/base/mem.h"
#include "gpu/codec/format.h"
#include "storage/disk_int.h"

#define MAP_MAX ((uint64_t)64 << 40) /* 64 TiB: far inside x86-64's 128 TiB of user space */
#define MAP_SLACK (64 * MIB)         /* fixed part of kvs_disk_map_bytes */
#define FORMAT_NAME "kvstash-disk"

/* ---------------------------------------------------------------- open and close */

uint64_t kvs_disk_map_bytes(uint64_t budget)
{
    if (budget == 0 || budget > MAP_MAX)
        return 0;
    uint64_t m = budget + budget / 4 + MAP_SLACK;
    m = (m + MIB - 1) / MIB * MIB;
    return m > MAP_MAX ? 0 : m;
}

/* What claim_dir found of LMDB's two files. */
typedef struct dir_files {
    bool data, lock;     /* data.mdb, lock.mdb exist */
    uint64_t data_bytes; /* size of data.mdb */
    unsigned kept;       /* data.mdb.broken-* files left by an earlier reset */
} dir_files;

#define KEPT_PREFIX "data.mdb.broken-"

/* Creates the directory if missing, locks it, and checks it holds only our files. */
static int claim_dir(kvs_disk *d, dir_files *f, kvs_err *err)
{
    const char *p = d->path;
    struct stat st;
    memset(f, 0, sizeof *f);
    if (stat(p, &st) != 0) {
        if (errno != ENOENT)
            return kvs__disk_sys_fail(p, "stat", err);
        if (mkdir(p, 0700) != 0 && errno != EEXIST) {
            if (errno == ENOENT)
                return kvs_err_set(err, KVS_EINVAL,
                                   "disk tier %s: its parent directory does "
                                   "not exist",
                                   p);
            return kvs__disk_sys_fail(p, "mkdir", err);
        }
        kvs__disk_log(d, KVS_LOG_INFO, "disk tier %s: created the directory", p);
    } else if (!S_ISDIR(st.st_mode)) {
        return kvs_err_set(err, KVS_EINVAL, "disk tier %s: not a directory", p);
    }
    d->dirfd = open(p, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (d->dirfd < 0)
        return kvs__disk_sys_fail(p, "open", err);
    /* flock on the directory itself: two daemons (or two handles in one process, which
     * LMDB forbids) on one environment would each trust an index the other changes. */
    if (flock(d->dirfd, LOCK_EX | LOCK_NB) != 0) {
        if (errno == EWOULDBLOCK)
            return kvs_err_set(err, KVS_EINVAL,
                               "disk tier %s: in use by another process (or "
                               "already open in this one)",
                               p);
        return kvs__disk_sys_fail(p, "flock", err);
    }
    DIR *dir = opendir(p);
    if (!dir)
        return kvs__disk_sys_fail(p, "opendir", err);
    int rc = 0;
    for (;;) {
        errno = 0;
        struct dirent *e = readdir(dir);
        if (!e) {
            if (errno)
                rc = kvs__disk_sys_fail(p, "readdir", err);
            break;
        }
        const char *n = e->d_name;
        if (!strcmp(n, ".") || !strcmp(n, "..") || !strcmp(n, "lost+found"))
            continue;
        if (!strncmp(n, KEPT_PREFIX, strlen(KEPT_PREFIX))) { /* a reset's leftover */
            f->kept++;
            continue;
        }
        if (strcmp(n, "data.mdb") != 0 && strcmp(n, "lock.mdb") != 0) {
            rc = kvs_err_set(err, KVS_EINVAL,
                             "disk tier %s: holds '%.64s', which is not a "
                             "kvstash file: refusing to use (or wipe) a directory with other "
                             "data; empty it or choose another data directory",
                             p, n);
            break;
        }
        if (fstatat(d->dirfd, n, &st, AT_SYMLINK_NOFOLLOW) != 0) {
            rc = kvs__disk_sys_fail(p, n, err);
            break;
        }
        if (!S_ISREG(st.st_mode)) {
            rc = kvs_err_set(err, KVS_EINVAL, "disk tier %s: %s is not a regular file", p, n);
            break;
        }
        if (!strcmp(n, "data.mdb")) {
            f->data = true;
            f->data_bytes = (uint64_t)st.st_size;
        } else {
            f->lock = true;
        }
    }
    closedir(dir);
    return rc;
}

/* Reads value `name` of the meta database; KVS_ENOTFOUND if absent. */
static int meta_get(MDB_txn *txn, MDB_dbi meta, const char *name, MDB_val *v)
{
    MDB_val k = kvs__mdb_val(name, strlen(name));
    int rc = mdb_get(txn, meta, &k, v);
    return rc == MDB_NOTFOUND ? KVS_ENOTFOUND : rc;
}

/* Judges an existing, non-empty data.mdb without writing a byte: a read-only handle
 * with no lock file (we hold the directory's flock). Copies the recorded identity. */
static int inspect_locked(kvs_disk *d, const kvs_disk_opts *o, uint64_t data_bytes, kvs_err *err)
{
    const char *p = d->path;
    MDB_env *env;
    MDB_txn *txn = NULL;
    MDB_cursor *cur = NULL;
    MDB_dbi main;
    int rc = mdb_env_create(&env);
    if (rc)
        return kvs__disk_open_fail(p, rc, "mdb_env_create", err);
    mdb_env_set_maxdbs(env, 4);
    rc = mdb_env_open(env, p, MDB_RDONLY | MDB_NOLOCK | MDB_NOTLS, 0600);
    if (rc) {
        /* Damage (our file names, unreadable LMDB pages) rather than a permission error */
        d->broken = rc == MDB_INVALID || rc == MDB_CORRUPTED || rc == MDB_PAGE_NOTFOUND;
        rc = kvs__disk_open_fail(p, rc, "mdb_env_open (read-only)", err);
        goto out;
    }
    MDB_envinfo ei;
    MDB_stat es;
    mdb_env_info(env, &ei);
    mdb_env_stat(env, &es);
    /* A file shorter than its committed pages would fault (SIGBUS) when read. */
    uint64_t need = ((uint64_t)ei.me_last_pgno + 1) * es.ms_psize;
    if (data_bytes < need) {
        d->broken = true;
        rc = kvs_err_set(err, KVS_EPROTO,
                         "disk tier %s: data.mdb is truncated: %" PRIu64
                         " bytes, its last committed page ends at %" PRIu64 "; refusing to "
                         "use it",
                         p, data_bytes, need);
        goto out;
    }
    if ((rc = mdb_txn_begin(env, NULL, MDB_RDONLY, &txn)) ||
        (rc = mdb_dbi_open(txn, NULL, 0, &main))) {
        d->broken = rc == MDB_CORRUPTED || rc == MDB_PAGE_NOTFOUND;
        rc = kvs__disk_open_fail(p, rc, "reading the main database", err);
        goto out;
    }
    /* The main database names the named databases: ours are meta, ns and blocks. An
     * empty one is an environment created by an open that died before its first commit. */
    if ((rc = mdb_cursor_open(txn, main, &cur))) {
        rc = kvs__disk_open_fail(p, rc, "mdb_cursor_open", err);
        goto out;
    }
    MDB_val k, v;
    bool empty = true;
    for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
         rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
        empty = false;
        static const char *ours[] = {"meta", "ns", "blocks"};
        bool known = false;
        for (size_t i = 0; i < 3; i++)
            known |= k.mv_size == strlen(ours[i]) && !memcmp(k.mv_data, ours[i], k.mv_size);
        if (!known) {
            char h[40];
            rc = kvs_err_set(err, KVS_EINVAL,
                             "disk tier %s: an LMDB environment holding key "
                             "%s that kvstash does not use: not a kvstash data directory, "
                             "refusing to use it",
                             p, kvs__disk_hex(k.mv_data, k.mv_size, h));
            goto out;
        }
    }
    if (rc != MDB_NOTFOUND) {
        rc = kvs__disk_open_fail(p, rc, "reading the main database", err);
        goto out;
    }
    rc = 0;
    if (empty)
        goto out;
    MDB_dbi meta;
    rc = mdb_dbi_open(txn, "meta", 0, &meta);
    if (rc == MDB_NOTFOUND || rc == MDB_INCOMPATIBLE) {
        rc = kvs_err_set(err, KVS_EINVAL,
                         "disk tier %s: an LMDB environment without kvstash's "
                         "meta database: not a kvstash data directory, refusing to use it",
                         p);
        goto out;
    }
    if (rc) {
        rc = kvs__disk_open_fail(p, rc, "opening the meta database", err);
        goto out;
    }
    rc = meta_get(txn, meta, "format", &v);
    if (rc || v.mv_size != strlen(FORMAT_NAME) || memcmp(v.mv_data, FORMAT_NAME, v.mv_size)) {
        rc = rc && rc != KVS_ENOTFOUND
                 ? kvs__disk_open_fail(p, rc, "reading meta", err)
                 : kvs_err_set(err, KVS_EINVAL,
                               "disk tier %s: meta database without the "
                               "'%s' format mark: not a kvstash data directory, refusing to "
                               "use it",
                               p, FORMAT_NAME);
        goto out;
    }
    rc = meta_get(txn, meta, "version", &v);
    if (rc || v.mv_size != 4) {
        rc = rc && rc != KVS_ENOTFOUND ? kvs__disk_open_fail(p, rc, "reading meta", err)
                                       : kvs_err_set(err, KVS_EPROTO,
                                                     "disk tier %s: meta 'version' missing or "
                                                     "malformed: damaged, refusing to use it",
                                                     p);
        goto out;
    }
    const uint8_t *vb = v.mv_data;
    uint32_t ver =
        (uint32_t)vb[0] | (uint32_t)vb[1] << 8 | (uint32_t)vb[2] << 16 | (uint32_t)vb[3] << 24;
    if (ver != KVS_DISK_VERSION) {
        rc = kvs_err_set(err, KVS_EPROTO,
                         "disk tier %s: format version %" PRIu32 " is not "
                         "one this build reads (%d): refusing to use it",
                         p, ver, KVS_DISK_VERSION);
        goto out;
    }
    rc = meta_get(txn, meta, "identity", &v);
    if (rc == 0) {
        size_t n = v.mv_size > KVS_DISK_IDENTITY_MAX ? KVS_DISK_IDENTITY_MAX : v.mv_size;
        memcpy(d->identity, v.mv_data, n);
        d->identity[n] = 0;
        if (o->identity && d->identity[0] && strcmp(o->identity, d->identity) != 0) {
            rc = kvs_err_set(err, KVS_EINVAL,
                             "disk tier %s: belongs to daemon '%.64s', not "
                             "'%.64s': refusing to use it",
                             p, d->identity, o->identity);
            goto out;
        }
    } else if (rc != KVS_ENOTFOUND) {
        rc = kvs__disk_open_fail(p, rc, "reading meta", err);
        goto out;
    }
    rc = 0;
    MDB_dbi other;
    static const char *named[] = {"ns", "blocks"};
    for (size_t i = 0; i < 2 && rc == 0; i++) {
        int r = mdb_dbi_open(txn, named[i], 0, &other);
        if (r && r != MDB_NOTFOUND)
            rc = kvs__disk_open_fail(p, r, named[i], err);
    }
out:
    if (cur)
        mdb_cursor_close(cur);
    if (txn)
        mdb_txn_abort(txn);
    mdb_env_close(env);
    return rc;
}

static int put_meta(MDB_txn *txn, MDB_dbi meta, const char *name, const void *val, size_t len)
{
    MDB_val k = kvs__mdb_val(name, strlen(name));
    MDB_val v = kvs__mdb_val(val, len);
    return mdb_put(txn, meta, &k, &v, 0);
}

/* The real open, once the directory is judged ours: creates the databases and the meta
 * records of a new environment. */
static int open_env(kvs_disk *d, const kvs_disk_opts *o, uint64_t map, kvs_err *err)
{
    const char *p = d->path;
    int rc = mdb_env_create(&d->env);
    if (rc)
        return kvs__disk_open_fail(p, rc, "mdb_env_create", err);
    if ((rc = mdb_env_set_mapsize(d->env, map)) || (rc = mdb_env_set_maxdbs(d->env, 4)) ||
        (rc = mdb_env_set_maxreaders(d->env, o->max_readers ? o->max_readers : 512)))
        return kvs__disk_open_fail(p, rc, "configuring the environment", err);
    unsigned flags = MDB_NOTLS | (o->nosync ? MDB_NOSYNC : o->nometasync ? MDB_NOMETASYNC : 0);
    if ((rc = mdb_env_open(d->env, p, flags, 0600))) {
        mdb_env_close(d->env); /* LMDB: close even when open fails */
        d->env = NULL;
        return kvs__disk_open_fail(p, rc, "mdb_env_open", err);
    }
    int dead = 0;
    mdb_reader_check(d->env, &dead); /* slots of crashed readers (other processes) */

    MDB_txn *txn;
    if ((rc = mdb_txn_begin(d->env, NULL, 0, &txn)))
        return kvs__disk_open_fail(p, rc, "mdb_txn_begin", err);
    bool fresh = false;
    MDB_val v;
    if ((rc = mdb_dbi_open(txn, NULL, 0, &d->main)) ||
        (rc = mdb_dbi_open(txn, "meta", MDB_CREATE, &d->meta)) ||
        (rc = mdb_dbi_open(txn, "ns", MDB_CREATE, &d->ns)) ||
        (rc = mdb_dbi_open(txn, "blocks", MDB_CREATE, &d->blocks)))
        goto fail;
    rc = meta_get(txn, d->meta, "format", &v);
    if (rc == KVS_ENOTFOUND) {
        fresh = true;
        uint8_t ver[4] = {KVS_DISK_VERSION & 0xff, 0, 0, 0};
        uint64_t now = (uint64_t)time(NULL);
        uint8_t created[8];
        for (int i = 0; i < 8; i++)
            created[i] = (uint8_t)(now >> (8 * i));
        if ((rc = put_meta(txn, d->meta, "format", FORMAT_NAME, strlen(FORMAT_NAME))) ||
            (rc = put_meta(txn, d->meta, "version", ver, 4)) ||
            (rc = put_meta(txn, d->meta, "created", created, 8)))
            goto fail;
    } else if (rc) {
        goto fail;
    }
    if (o->identity && !d->identity[0]) {
        if ((rc = put_meta(txn, d->meta, "identity", o->identity, strlen(o->identity))))
            goto fail;
        snprintf(d->identity, sizeof d->identity, "%s", o->identity);
    }
    if ((rc = mdb_txn_commit(txn)))
        return kvs__disk_open_fail(p, rc, "committing the meta records", err);
    if (fresh && (rc = mdb_env_sync(d->env, 1)))
        return kvs__disk_open_fail(p, rc, "mdb_env_sync", err);
    MDB_envinfo ei;
    mdb_env_info(d->env, &ei);
    kvs__disk_log(d, KVS_LOG_INFO, "disk tier %s: %s, map %" PRIu64 " MiB, %s commits", p,
                  fresh ? "new environment" : "opened", (uint64_t)ei.me_mapsize / MIB,
                  o->nosync       ? "unsynced"
                  : o->nometasync ? "data-synced"
                                  : "synced");
    return 0;
fail:
    mdb_txn_abort(txn);
    return kvs__disk_open_fail(p, rc, "initializing the databases", err);
}

#define RESET_HINT "--data-dir-reset starts a new store, keeping the old file"

/* Judges what claim_dir found: an empty data.mdb, or a lock.mdb without one, is what is
 * left of a store (a failed copy, a full disk at the wrong moment), never a new
 * directory: refused as broken. A non-empty data.mdb is inspected. */
static int judge_files(kvs_disk *d, const kvs_disk_opts *o, const dir_files *f, kvs_err *err)
{
    if (f->kept)
        kvs__disk_log(d, KVS_LOG_WARN,
                      "disk tier %s: holds %u " KEPT_PREFIX "* file%s from "
                      "an earlier --data-dir-reset (not read; remove once no longer needed)",
                      d->path, f->kept, f->kept > 1 ? "s" : "");
    if (f->data && f->data_bytes == 0) {
        d->broken = true;
        return kvs_err_set(err, KVS_EPROTO,
                           "disk tier %s: data.mdb is empty: its store is lost; refused (%s)",
                           d->path, RESET_HINT);
    }
    if (!f->data && f->lock) {
        d->broken = true;
        return kvs_err_set(err, KVS_EPROTO,
                           "disk tier %s: lock.mdb but no data.mdb: its store is gone; "
                           "refused (%s)",
                           d->path, RESET_HINT);
    }
    int rc = f->data_bytes > 0 ? inspect_locked(d, o, f->data_bytes, err) : 0;
    if (rc && d->broken && err) {
        size_t n = strlen(err->msg);
        snprintf(err->msg + n, sizeof err->msg - n, " (%s)", RESET_HINT);
    }
    return rc;
}

/* opts.reset_broken on a broken directory: data.mdb is renamed aside (never deleted)
 * and lock.mdb, which holds no data, removed; the directory is then empty for open_env. */
static int keep_aside(kvs_disk *d, const dir_files *f, kvs_err *err)
{
    char kept[64];
    if (f->data) {
        long long now = (long long)time(NULL);
        int n = 0;
        struct stat st;
        do /* a second reset within the same second gets a suffix */
            snprintf(kept, sizeof kept, KEPT_PREFIX "%lld%s%.0d", now, n ? "-" : "", n);
        while (fstatat(d->dirfd, kept, &st, AT_SYMLINK_NOFOLLOW) == 0 && ++n < 100);
        if (renameat(d->dirfd, "data.mdb", d->dirfd, kept) != 0)
            return kvs__disk_sys_fail(d->path, "renaming data.mdb aside", err);
    }
    if (f->lock && unlinkat(d->dirfd, "lock.mdb", 0) != 0 && errno != ENOENT)
        return kvs__disk_sys_fail(d->path, "removing lock.mdb", err);
    if (fsync(d->dirfd) != 0)
        return kvs__disk_sys_fail(d->path, "fsync of the directory", err);
    kvs__disk_log(d, KVS_LOG_WARN, "disk tier %s: reset: %s%s; starting a new, empty store",
                  d->path, f->data ? "the broken data.mdb is kept as " : "no data.mdb",
                  f->data ? kept : "");
    kvs_err_clear(err);
    return 0;
}

int kvs_disk_open(const char *dir, uint64_t budget_bytes, const kvs_disk_opts *opts, kvs_disk **out,
                  kvs_err *err)
{
    kvs_disk_opts o = opts ? *opts : (kvs_disk_opts){0};
    if (!out)
        return kvs_err_set(err, KVS_EINVAL, "disk tier: out is NULL");
    *out = NULL;
    if (!dir || !*dir)
        return kvs_err_set(err, KVS_EINVAL, "disk tier: data directory: empty path");
    uint64_t map = o.map_bytes;
    if (map) {
        long pg = sysconf(_SC_PAGESIZE);
        uint64_t ps = pg > 0 ? (uint64_t)pg : 4096;
        if (map > MAP_MAX)
            return kvs_err_set(err, KVS_EINVAL,
                               "disk tier %s: map_bytes %" PRIu64 " over "
                               "64 TiB",
                               dir, map);
        map = (map + ps - 1) / ps * ps;
    } else if (!(map = kvs_disk_map_bytes(budget_bytes))) {
        return kvs_err_set(err, KVS_EINVAL,
                           "disk tier %s: budget %" PRIu64 " bytes: must be "
                           "1 byte to 51 TiB",
                           dir, budget_bytes);
    }
    if (o.identity && strlen(o.identity) > KVS_DISK_IDENTITY_MAX)
        return kvs_err_set(err, KVS_EINVAL, "disk tier %s: identity: over %d bytes", dir,
                           KVS_DISK_IDENTITY_MAX);

    kvs_disk *d = kvs_xcalloc(1, sizeof *d);
    d->dirfd = -1;
    d->path = kvs_xstrdup(dir);
    d->lazy = o.nosync || o.nometasync;
    d->log = o.log;
    d->log_ctx = o.log_ctx;
    pthread_mutex_init(&d->wmu, NULL);
    d->mu_init = true;
    dir_files f;
    int rc = claim_dir(d, &f, err);
    if (!rc)
        rc = judge_files(d, &o, &f, err);
    if (rc && d->broken && o.reset_broken)
        rc = keep_aside(d, &f, err);
    if (!rc)
        rc = open_env(d, &o, map, err);
    if (rc) {
        kvs_disk_close(d);
        return rc;
    }
    *out = d;
    return 0;
}

void kvs_disk_close(kvs_disk *d)
{
    if (!d)
        return;
    if (d->env)
        mdb_env_close(d->env);
    if (d->dirfd >= 0)
        close(d->dirfd); /* releases the flock */
    if (d->mu_init)
        pthread_mutex_destroy(&d->wmu);
    free(d->path);
    free(d);
}

const char *kvs_disk_path(const kvs_disk *d)
{
    return d->path;
}

const char *kvs_disk_identity(const kvs_disk *d)
{
    return d->identity;
}
