/* The disk writer: see writer.h. The thread owns every LMDB write the store makes;
 * request threads only read, in short read transactions of their own.
 *
 * Invariants:
 *  1. Operations are applied in the order they were queued; a run of writes of one kind
 *     shares a transaction, and a deletion queued after a write of its key is applied after
 *     it (one FIFO).
 *  2. A pending deletion (pend) is older than every operation still queued: retries run
 *     before the next batch is taken, and a write of its key removes it (the write
 *     replaced the record the deletion was meant for).
 *  3. Hooks run on the writer thread with mu released.
 */
#include "storage/writer.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/base/mem.h"

#define BATCH_ITEMS KVS_WRITER_RUN_MAX /* blocks per write transaction */
#define BATCH_BYTES (64ull << 20)      /* ...and their bytes */
#define RUN_MAX 1024                   /* deletes per transaction */
#define ENOSPC_TRIES 4                 /* evict-and-retry rounds on a full map or filesystem */

typedef enum op_kind { OP_PUT, OP_COPY, OP_DURABLE, OP_DEL, OP_NS_DEL, OP_MARK } op_kind;

typedef struct op {
    struct op *next;
    op_kind kind;
    void *blk;      /* put, copy, durable: the owner's block, with its reference */
    uint64_t bytes; /* ...and its size, to bound a transaction */
    kvs_writer_done_fn done;
    void *arg;
    kvs_writer_rec rec; /* del, ns_del */
} op;

struct kvs_writer {
    kvs_disk *disk; /* borrowed */
    kvs_writer_hooks h;
    pthread_t thread;
    pthread_mutex_t mu; /* guards head, tail, stop, kick */
    pthread_cond_t cv;
    op *head, **tail;
    bool stop;
    bool kick;
    /* Writer thread only: deletions that failed, retried before each batch (invariant 2) */
    kvs_writer_rec *pend;
    size_t npend, cap_pend;
};

static void wlog(kvs_writer *w, kvs_log_level lvl, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void wlog(kvs_writer *w, kvs_log_level lvl, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    kvs_vlogf(w->h.log, w->h.log_ctx, lvl, fmt, ap);
    va_end(ap);
}

/* ---------------------------------------------------------------- the queue */

static void push(kvs_writer *w, op *o)
{
    pthread_mutex_lock(&w->mu);
    *w->tail = o;
    w->tail = &o->next;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

static op *op_new(op_kind kind)
{
    op *o = kvs_xcalloc(1, sizeof *o); /* small and fixed (STYLE: may abort) */
    o->kind = kind;
    return o;
}

void kvs_writer_put(kvs_writer *w, void *blk, uint64_t bytes)
{
    op *o = op_new(OP_PUT);
    o->blk = blk;
    o->bytes = bytes;
    push(w, o);
}

void kvs_writer_copy(kvs_writer *w, void *blk, uint64_t bytes)
{
    op *o = op_new(OP_COPY);
    o->blk = blk;
    o->bytes = bytes;
    push(w, o);
}

void kvs_writer_durable(kvs_writer *w, void *blk, uint64_t bytes, kvs_writer_done_fn done,
                        void *arg)
{
    op *o = op_new(OP_DURABLE);
    o->blk = blk;
    o->bytes = bytes;
    o->done = done;
    o->arg = arg;
    push(w, o);
}

void kvs_writer_del(kvs_writer *w, uint32_t ns_id, const void *key, size_t key_len)
{
    op *o = op_new(OP_DEL);
    o->rec.ns_id = ns_id;
    o->rec.key_len = (uint8_t)key_len;
    memcpy(o->rec.key, key, key_len);
    push(w, o);
}

void kvs_writer_ns_del(kvs_writer *w, uint32_t ns_id)
{
    op *o = op_new(OP_NS_DEL);
    o->rec.ns_id = ns_id;
    push(w, o);
}

void kvs_writer_kick(kvs_writer *w)
{
    pthread_mutex_lock(&w->mu);
    w->kick = true;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

void kvs_writer_mark(kvs_writer *w, kvs_writer_done_fn done, void *arg)
{
    op *o = op_new(OP_MARK);
    o->done = done;
    o->arg = arg;
    push(w, o);
}

/* ---------------------------------------------------------------- deletions */

int kvs_writer_delete_now(kvs_writer *w, const kvs_writer_rec *r, size_t n, const char *why,
                          size_t *done)
{
    kvs_disk_key keys[RUN_MAX];
    size_t i = 0;
    int rc = 0;
    while (i < n && rc == 0) {
        size_t m = 0;
        for (size_t j = i; j < n && m < RUN_MAX; j++, m++)
            keys[m] = (kvs_disk_key){r[j].ns_id, r[j].key, r[j].key_len};
        kvs_err err;
        if ((rc = kvs_disk_del(w->disk, keys, m, NULL, &err))) {
            w->h.write_errors(w->h.ctx, 1);
            wlog(w, KVS_LOG_ERROR, "disk tier: deleting %zu records (%s): %s", m, why, err.msg);
        } else {
            i += m;
        }
    }
    if (done)
        *done = i;
    return rc;
}

/* Deletions that failed (a write error) wait in pend and are retried before every batch,
 * so that the owner's index, which forgot those blocks already, and LMDB agree again as
 * soon as the disk lets them (invariant 2). */
static void add_pending(kvs_writer *w, const kvs_writer_rec *r, size_t n)
{
    if (w->npend + n > w->cap_pend) {
        size_t cap = w->cap_pend ? w->cap_pend : 64;
        while (cap < w->npend + n)
            cap *= 2;
        kvs_writer_rec *nr = realloc(w->pend, cap * sizeof *nr);
        if (!nr) { /* the records stay until a restart finds and indexes them again */
            wlog(w, KVS_LOG_ERROR,
                 "disk tier: out of memory keeping %zu failed deletions for a retry", n);
            return;
        }
        w->pend = nr;
        w->cap_pend = cap;
    }
    memcpy(w->pend + w->npend, r, n * sizeof *r);
    w->npend += n;
}

/* A write of this key replaced the record a pending deletion was meant for. */
static void forget_pending(kvs_writer *w, uint32_t ns_id, const void *key, size_t key_len)
{
    for (size_t i = 0; i < w->npend;)
        if (w->pend[i].ns_id == ns_id && w->pend[i].key_len == key_len &&
            !memcmp(w->pend[i].key, key, key_len))
            w->pend[i] = w->pend[--w->npend];
        else
            i++;
}

/* Namespace drops first (a record of a dropped namespace would come back at restart),
 * then the records; what still fails stays for the next turn. */
static void retry_pending(kvs_writer *w)
{
    size_t keep = 0;
    for (size_t i = 0; i < w->npend; i++) {
        kvs_err err;
        if (w->pend[i].key_len || kvs_disk_ns_del(w->disk, w->pend[i].ns_id, NULL, &err))
            w->pend[keep++] = w->pend[i];
    }
    w->npend = keep;
    size_t nk = 0; /* records: move them to the front, delete them in runs */
    for (size_t i = 0; i < w->npend; i++)
        if (w->pend[i].key_len) {
            kvs_writer_rec t = w->pend[nk];
            w->pend[nk++] = w->pend[i];
            w->pend[i] = t;
        }
    size_t done = 0;
    if (nk && kvs_writer_delete_now(w, w->pend, nk, "retried", &done) == 0)
        wlog(w, KVS_LOG_INFO, "disk tier: %zu deletions that had failed are done", nk);
    memmove(w->pend, w->pend + done, (w->npend - done) * sizeof *w->pend);
    w->npend -= done;
}

/* ---------------------------------------------------------------- writes */

/* Writes items: room first (the owner evicts; held: the run's items written before these,
 * not yet reported to finish), then LMDB, which refuses a batch without room on its map
 * or filesystem before starting it (disk.h); on KVS_ENOSPC the owner frees more and the
 * write is tried again, a few times. */
static int write_items(kvs_writer *w, const kvs_disk_item *items, size_t m,
                       const kvs_disk_item *held, size_t nheld, bool durable, kvs_err *err)
{
    int rc = w->h.room(w->h.ctx, items, m, held, nheld, false, err);
    if (rc)
        return rc;
    for (int tries = 0;; tries++) {
        rc = durable ? kvs_disk_put_durable(w->disk, items, m, err)
                     : kvs_disk_put_batch(w->disk, items, m, err);
        if (rc != KVS_ENOSPC || tries == ENOSPC_TRIES)
            return rc;
        kvs_err e2;
        if (w->h.room(w->h.ctx, items, m, held, nheld, true, &e2))
            return rc; /* nothing left to free */
    }
}

static const char *kind_name(op_kind k)
{
    return k == OP_PUT ? "spilled" : k == OP_COPY ? "copied" : "durable";
}

/* A run of puts, copies or durable writes (at most BATCH_ITEMS) in one transaction; when
 * the whole run does not fit, one block at a time, so that as many as there is room for
 * are written: victims (puts) newest first, so that those left out are the run's oldest,
 * as a cache would choose (they were queued in eviction order); durable writes and copies
 * in their order (a durable run may hold two writes of one key: the later must win). */
static void apply_writes(kvs_writer *w, op **run, size_t n, op_kind kind)
{
    bool durable = kind == OP_DURABLE;
    kvs_writer_kind wk = kind == OP_PUT    ? KVS_WRITER_PUT
                         : kind == OP_COPY ? KVS_WRITER_COPY
                                           : KVS_WRITER_DURABLE;
    void *blocks[BATCH_ITEMS];
    kvs_disk_item items[BATCH_ITEMS];
    size_t at[BATCH_ITEMS];
    bool gone[BATCH_ITEMS] = {0}, written[BATCH_ITEMS] = {0};
    int rcs[BATCH_ITEMS] = {0};
    kvs_err errs[BATCH_ITEMS];
    for (size_t i = 0; i < n; i++)
        blocks[i] = run[i]->blk;
    size_t m = w->h.gather(w->h.ctx, wk, blocks, n, items, at, gone);

    int rc = m ? write_items(w, items, m, NULL, 0, durable, &errs[0]) : 0;
    if (rc == KVS_ENOSPC && m > 1) {
        /* Each one's room counts those written before it (held), which finish reports only
         * after the run: else every block would find the room the first one took. */
        kvs_disk_item held[BATCH_ITEMS];
        size_t nheld = 0;
        for (size_t o = 0; o < m; o++) {
            size_t j = kind == OP_PUT ? m - 1 - o : o;
            if ((rcs[at[j]] = write_items(w, &items[j], 1, held, nheld, durable, &errs[at[j]])))
                rc = rcs[at[j]];
            else
                held[nheld++] = items[j];
        }
    } else {
        for (size_t j = 0; j < m; j++) {
            rcs[at[j]] = rc;
            if (rc)
                errs[at[j]] = errs[0];
        }
    }
    size_t nfailed = 0, first_failed = 0;
    for (size_t j = 0; j < m; j++) {
        size_t i = at[j];
        if (rcs[i]) {
            if (!nfailed++)
                first_failed = i;
            continue;
        }
        written[i] = true;
        forget_pending(w, items[j].ns_id, items[j].key, items[j].key_len); /* invariant 2 */
    }
    w->h.finish(w->h.ctx, wk, blocks, n, gone, written, rcs);
    if (nfailed)
        wlog(w, rc == KVS_ENOSPC ? KVS_LOG_WARN : KVS_LOG_ERROR,
             "disk tier: %zu of %zu %s blocks not written%s: %s", nfailed, m, kind_name(kind),
             durable ? " (their Puts answered with the error)" : "", errs[first_failed].msg);
    for (size_t i = 0; durable && i < n; i++) {
        if (gone[i]) {
            kvs_err e2;
            kvs_err_set(&e2, KVS_ENOTFOUND, "namespace: dropped before the block reached disk");
            run[i]->done(run[i]->arg, KVS_ENOTFOUND, &e2);
        } else {
            run[i]->done(run[i]->arg, rcs[i], rcs[i] ? &errs[i] : NULL);
        }
    }
}

static void apply_dels(kvs_writer *w, op **run, size_t n)
{
    kvs_writer_rec r[RUN_MAX];
    for (size_t i = 0; i < n; i++)
        r[i] = run[i]->rec;
    size_t done = 0;
    if (kvs_writer_delete_now(w, r, n, "removed blocks", &done))
        add_pending(w, r + done, n - done);
}

static void apply_one(kvs_writer *w, op *o)
{
    kvs_err err;
    if (o->kind == OP_MARK) {
        o->done(o->arg, 0, NULL);
    } else if (o->kind == OP_NS_DEL && kvs_disk_ns_del(w->disk, o->rec.ns_id, NULL, &err)) {
        wlog(w, KVS_LOG_ERROR,
             "disk tier: dropping namespace id %u: %s (retried before the next batch)",
             o->rec.ns_id, err.msg);
        add_pending(w, &o->rec, 1);
    }
}

/* Applies a list in order, grouping consecutive ops of one kind into a transaction. */
static void apply(kvs_writer *w, op *list)
{
    op *run[RUN_MAX];
    while (list) {
        op_kind k = list->kind;
        bool write = k == OP_PUT || k == OP_COPY || k == OP_DURABLE;
        size_t n = 0, lim = write ? BATCH_ITEMS : k == OP_DEL ? RUN_MAX : 1;
        uint64_t bytes = 0;
        while (list && list->kind == k && n < lim && bytes < BATCH_BYTES) {
            bytes += list->bytes;
            run[n++] = list;
            list = list->next;
        }
        if (write)
            apply_writes(w, run, n, k);
        else if (k == OP_DEL)
            apply_dels(w, run, n);
        else
            apply_one(w, run[0]);
        for (size_t i = 0; i < n; i++)
            free(run[i]);
    }
}

static void *writer_main(void *arg)
{
    kvs_writer *w = arg;
    pthread_mutex_lock(&w->mu);
    for (;;) {
        while (!w->head && !w->stop && !w->kick)
            pthread_cond_wait(&w->cv, &w->mu);
        if (!w->head && w->stop)
            break; /* stopping, and everything queued is applied */
        op *list = w->head;
        w->head = NULL;
        w->tail = &w->head;
        w->kick = false;
        bool stopping = w->stop;
        pthread_mutex_unlock(&w->mu);
        if (w->npend) /* older than anything in list (invariant 2): first */
            retry_pending(w);
        apply(w, list);
        /* After each batch, so a demotion that filled the queue goes on as it drains; the
         * blocks it hands over are queued, and so applied by the next turn of this loop. */
        if (!stopping)
            w->h.idle(w->h.ctx);
        pthread_mutex_lock(&w->mu);
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

int kvs_writer_create(kvs_disk *disk, const kvs_writer_hooks *hooks, kvs_writer **out, kvs_err *err)
{
    kvs_writer *w = kvs_xcalloc(1, sizeof *w);
    w->disk = disk;
    w->h = *hooks;
    w->tail = &w->head;
    int rc = pthread_mutex_init(&w->mu, NULL);
    if (rc == 0 && (rc = pthread_cond_init(&w->cv, NULL)) != 0)
        pthread_mutex_destroy(&w->mu);
    if (rc == 0 && (rc = pthread_create(&w->thread, NULL, writer_main, w)) != 0) {
        pthread_cond_destroy(&w->cv);
        pthread_mutex_destroy(&w->mu);
    }
    if (rc) {
        free(w);
        return kvs_err_set(err, -rc, "disk writer: cannot start: %s", strerror(rc));
    }
    *out = w;
    return 0;
}

void kvs_writer_destroy(kvs_writer *w)
{
    if (!w)
        return;
    pthread_mutex_lock(&w->mu);
    w->stop = true;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
    pthread_join(w->thread, NULL);
    if (w->npend)
        wlog(w, KVS_LOG_WARN,
             "disk tier: %zu record deletions still failed at shutdown: those blocks come "
             "back at the next start",
             w->npend);
    free(w->pend);
    pthread_cond_destroy(&w->cv);
    pthread_mutex_destroy(&w->mu);
    free(w);
}
