/* Private to the disk tier's two files: disk_open.c (opening, judging and creating a data
 * directory) and disk.c (everything else). The handle's structure and the helpers both
 * use. Nothing else includes this.
 */
#ifndef KVS_STORAGE_DISK_INT_H
#define KVS_STORAGE_DISK_INT_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>

#include <lmdb.h>

#include "storage/disk.h"

#define MIB ((uint64_t)1024 * 1024)

struct kvs_disk {
    MDB_env *env;
    MDB_dbi main, meta, ns, blocks;
    int dirfd;  /* holds the flock that makes the directory ours while open */
    char *path; /* owned */
    char identity[KVS_DISK_IDENTITY_MAX + 1];
    bool broken; /* kvs_disk_open: the refusal is a broken data.mdb (opts.reset_broken) */
    bool lazy;   /* commits are not flushed whole (nosync, nometasync): sync explicitly */
    bool mu_init;
    pthread_mutex_t wmu; /* the one writer (invariant 2) */
    unsigned fail_nth;   /* fault injection countdown, under wmu */
    unsigned fail_left;  /* ...or this many next transactions fail */
    int fail_rc;
    /* Under wmu: the last commit deleted records. LMDB reuses the pages freed by
     * transaction T only from transaction T+2 on (the meta page of T-1 may still be the
     * one a crash falls back to), so a put that finds the map full right after an
     * eviction commits a tiny change first and tries again (put_batch). */
    bool freed_pending;
    atomic_uint_fast64_t write_errors, read_errors, checksum_failures, map_full, syncs;
    atomic_uint_fast64_t no_room; /* puts refused before starting (put_batch's room check) */
    uint64_t test_fs_limit;       /* tests: a filesystem holding this many bytes of data.mdb
                                   * (0: the real one, statvfs), under wmu */
    kvs_log_fn log;
    void *log_ctx;
};

/* An MDB_val over n bytes at p. LMDB's MDB_val is not const, but the keys and values we
 * hand it are only read (mdb_put copies them): the one place that drops const for it. */
static inline MDB_val kvs__mdb_val(const void *p, size_t n)
{
    return (MDB_val){.mv_size = n, .mv_data = (void *)(uintptr_t)p};
}

/* A line to the handle's log sink, if any. */
void kvs__disk_log(kvs_disk *d, kvs_log_level lv, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Up to 16 bytes of a key in hex for messages ("..." when cut); buf has 40 bytes. */
const char *kvs__disk_hex(const void *p, size_t n, char *buf);
/* An LMDB failure while opening or inspecting the environment. */
int kvs__disk_open_fail(const char *path, int rc, const char *what, kvs_err *err);
/* A system call failure (errno) on the directory. */
int kvs__disk_sys_fail(const char *path, const char *what, kvs_err *err);

#endif
