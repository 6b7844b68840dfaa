/* The disk writer and the disk read path: see spill.h. The writer thread owns every
 * LMDB write the store makes (LMDB's rule: one writer, batched transactions); request
 * threads only read (kvs_spill_read), in short read transactions of their own.
 */
#include "storage/spill.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/base/mem.h"

#define BATCH_ITEMS 64            /* blocks per write transaction */
#define BATCH_BYTES (64ull << 20) /* ...and their bytes */
#define RUN_MAX 1024              /* deletes per transaction */
#define ENOSPC_TRIES 4            /* evict-and-retry rounds on a full map */

typedef enum op_kind { OP_PUT, OP_COPY, OP_DURABLE, OP_DEL, OP_NS_DEL, OP_MARK } op_kind;

typedef struct op {
    struct op *next;
    op_kind kind;
    kvs_block *blk; /* put, durable: the writer's reference */
    kvs_spill_done_fn done;
    void *arg;
    uint32_t ns_id; /* del, ns_del */
    uint8_t key_len;
    uint8_t key[KVS_KEY_MAX];
} op;

/* A disk record named for deletion; key_len 0 names a whole namespace (ns_del). */
typedef struct victim {
    uint32_t ns_id;
    uint8_t key_len;
    uint8_t key[KVS_KEY_MAX];
} victim;

struct kvs_spill {
    kvs_store *st; /* borrowed */
    pthread_t thread;
    pthread_mutex_t mu; /* guards head, tail, stop */
    pthread_cond_t cv;
    op *head, **tail;
    bool stop;
    bool kick; /* kvs_spill_kick: run the host tier's background demotion */
    /* Writer thread only: deletions that failed, retried before each batch (add_pending) */
    victim *pend;
    size_t npend, cap_pend;
};

static void push(kvs_spill *sp, op *o)
{
    pthread_mutex_lock(&sp->mu);
    *sp->tail = o;
    sp->tail = &o->next;
    pthread_cond_signal(&sp->cv);
    pthread_mutex_unlock(&sp->mu);
}

static op *op_new(op_kind kind)
{
    op *o = kvs_xcalloc(1, sizeof *o); /* small and fixed (STYLE: may abort) */
    o->kind = kind;
    return o;
}

void kvs_spill_put(kvs_spill *sp, kvs_block *blk)
{
    op *o = op_new(OP_PUT);
    o->blk = blk;
    push(sp, o);
}

void kvs_spill_copy(kvs_spill *sp, kvs_block *blk)
{
    op *o = op_new(OP_COPY);
    o->blk = blk;
    push(sp, o);
}

void kvs_spill_durable(kvs_spill *sp, kvs_block *blk, kvs_spill_done_fn done, void *arg)
{
    op *o = op_new(OP_DURABLE);
    o->blk = blk;
    o->done = done;
    o->arg = arg;
    push(sp, o);
}

void kvs_spill_del(kvs_spill *sp, uint32_t ns_id, const void *key, size_t key_len)
{
    op *o = op_new(OP_DEL);
    o->ns_id = ns_id;
    o->key_len = (uint8_t)key_len;
    memcpy(o->key, key, key_len);
    push(sp, o);
}

void kvs_spill_ns_del(kvs_spill *sp, uint32_t ns_id)
{
    op *o = op_new(OP_NS_DEL);
    o->ns_id = ns_id;
    push(sp, o);
}

void kvs_spill_kick(kvs_spill *sp)
{
    pthread_mutex_lock(&sp->mu);
    sp->kick = true;
    pthread_cond_signal(&sp->cv);
    pthread_mutex_unlock(&sp->mu);
}

void kvs_spill_mark(kvs_spill *sp, kvs_spill_done_fn done, void *arg)
{
    op *o = op_new(OP_MARK);
    o->done = done;
    o->arg = arg;
    push(sp, o);
}

/* ---------------------------------------------------------------- writer */

static void count_write_error(kvs_store *st, uint64_t n)
{
    pthread_mutex_lock(&st->mu);
    st->stats.disk_write_errors += n;
    pthread_mutex_unlock(&st->mu);
}

/* Deletes the named records in transactions of RUN_MAX; 0, or the first failure (logged
 * and counted; the runs before it are committed, it and the ones after are not). */
static int del_records(kvs_store *st, const victim *v, size_t n, const char *why, size_t *done)
{
    kvs_disk_key keys[RUN_MAX];
    size_t i = 0;
    int rc = 0;
    while (i < n && rc == 0) {
        size_t m = 0;
        for (size_t j = i; j < n && m < RUN_MAX; j++, m++)
            keys[m] = (kvs_disk_key){v[j].ns_id, v[j].key, v[j].key_len};
        kvs_err err;
        if ((rc = kvs_disk_del(st->disk, keys, m, NULL, &err))) {
            count_write_error(st, 1);
            kvs__store_log(st, KVS_LOG_ERROR, "disk tier: deleting %zu records (%s): %s", m, why,
                           err.msg);
        } else {
            i += m;
        }
    }
    if (done)
        *done = i;
    return rc;
}

/* Deletions that failed (a write error) wait in sp->pend and are retried before every
 * batch, so that the index, which forgot those blocks already, and LMDB agree again as
 * soon as the disk lets them. A later write of the same key supersedes a pending deletion
 * (forget_pending): retrying it then would delete the new record. */
static void add_pending(kvs_spill *sp, const victim *v, size_t n)
{
    if (sp->npend + n > sp->cap_pend) {
        size_t cap = sp->cap_pend ? sp->cap_pend : 64;
        while (cap < sp->npend + n)
            cap *= 2;
        victim *nv = realloc(sp->pend, cap * sizeof *nv);
        if (!nv) { /* the records stay until a restart finds and indexes them again */
            kvs__store_log(sp->st, KVS_LOG_ERROR,
                           "disk tier: out of memory keeping %zu "
                           "failed deletions for a retry",
                           n);
            return;
        }
        sp->pend = nv;
        sp->cap_pend = cap;
    }
    memcpy(sp->pend + sp->npend, v, n * sizeof *v);
    sp->npend += n;
}

static void forget_pending(kvs_spill *sp, uint32_t ns_id, const void *key, size_t key_len)
{
    for (size_t i = 0; i < sp->npend;)
        if (sp->pend[i].ns_id == ns_id && sp->pend[i].key_len == key_len &&
            !memcmp(sp->pend[i].key, key, key_len))
            sp->pend[i] = sp->pend[--sp->npend];
        else
            i++;
}

/* Namespace drops first (a record of a dropped namespace would come back at restart),
 * then the records; what still fails stays for the next turn. */
static void retry_pending(kvs_spill *sp)
{
    kvs_store *st = sp->st;
    size_t keep = 0;
    for (size_t i = 0; i < sp->npend; i++) {
        kvs_err err;
        if (sp->pend[i].key_len == 0 && kvs_disk_ns_del(st->disk, sp->pend[i].ns_id, NULL, &err))
            sp->pend[keep++] = sp->pend[i];
        else if (sp->pend[i].key_len)
            sp->pend[keep++] = sp->pend[i];
    }
    sp->npend = keep;
    size_t nk = 0; /* records: move them to the front, delete them in runs */
    for (size_t i = 0; i < sp->npend; i++)
        if (sp->pend[i].key_len) {
            victim t = sp->pend[nk];
            sp->pend[nk++] = sp->pend[i];
            sp->pend[i] = t;
        }
    size_t done = 0;
    if (nk && del_records(st, sp->pend, nk, "retried", &done) == 0)
        kvs__store_log(st, KVS_LOG_INFO, "disk tier: %zu deletions that had failed are done", nk);
    memmove(sp->pend, sp->pend + done, (sp->npend - done) * sizeof *sp->pend);
    sp->npend -= done;
}

/* Makes room in the disk budget: deletes records of non-durable blocks, oldest first,
 * until `need` more bytes fit and at least `extra` bytes went. First disk entries (the
 * block leaves the store), then the records of idle host blocks (the block stays in the
 * host tier, without a record). The records are deleted before the index changes, and
 * the index changes only if the deletion committed: after an error both still agree.
 * Records of durable namespaces are never taken (README: the durable contract), nor those
 * of blocks being read or written. Returns the bytes freed. */
static uint64_t make_disk_room(kvs_spill *sp, uint64_t need, uint64_t extra)
{
    kvs_store *st = sp->st;
    size_t n = 0, cap = 0;
    kvs_block **picked = NULL;
    uint64_t freed = 0;
    pthread_mutex_lock(&st->mu);
    for (int pass = 0; pass < 2; pass++) {
        kvs_lru *list = pass ? &st->lru : &st->disk_lru;
        for (kvs_lru_node *it = kvs_lru_oldest(list);
             it && (st->stats.disk_used - freed + need > st->stats.disk_capacity || freed < extra);
             it = kvs_lru_newer(list, it)) {
            kvs_block *b = KVS__BLOCK_OF_LRU(it);
            if (b->refs != 1 || !b->on_disk || b->state != KVS_BLOCK_IDLE ||
                kvs_ns_spec_of(b->ns)->durable)
                continue;
            if (n == cap) {
                kvs_block **np = realloc(picked, (cap ? 2 * cap : 64) * sizeof *np);
                if (!np)
                    break; /* evict fewer this round */
                picked = np;
                cap = cap ? 2 * cap : 64;
            }
            picked[n++] = b;
            b->refs++; /* busy for everyone else while its record goes (invariant 3) */
            kvs__block_set_state(b, KVS_BLOCK_UNRECORDING);
            freed += b->size;
        }
    }
    pthread_mutex_unlock(&st->mu);
    if (!n) {
        free(picked);
        return 0;
    }
    victim *v = malloc(n * sizeof *v);
    int rc = v ? 0 : KVS_ENOMEM;
    for (size_t i = 0; v && i < n; i++) { /* identity is immutable: no lock needed */
        v[i].ns_id = picked[i]->node.ns_id;
        v[i].key_len = picked[i]->node.key_len;
        memcpy(v[i].key, picked[i]->node.key, picked[i]->node.key_len);
    }
    size_t done = 0;
    if (v)
        rc = del_records(st, v, n, "evicted", &done);
    free(v);
    kvs_block *to_free = NULL;
    pthread_mutex_lock(&st->mu);
    for (size_t i = 0; i < n; i++) {
        kvs_block *b = picked[i];
        bool still = b->state == KVS_BLOCK_UNRECORDING; /* else removed meanwhile */
        if (still && i < done && b->on_disk) {
            st->stats.disk_evictions++;
            if (b->tier == KVS_STORE_TIER_DISK) {
                kvs__store_unlink_locked(st, b); /* our reference keeps it to below */
                still = false;
            } else { /* a host copy without its record now */
                b->on_disk = false;
                st->stats.disk_used -= b->size;
            }
        }
        if (still)
            kvs__block_set_state(b, KVS_BLOCK_IDLE);
        if (kvs__store_unref_locked(st, b)) {
            b->node.next = (kvs_index_node *)to_free;
            to_free = b;
        }
    }
    pthread_mutex_unlock(&st->mu);
    kvs__block_free_chain(to_free);
    free(picked);
    (void)rc; /* logged and counted by del_records; what went is `done` */
    return done == n ? freed : 0;
}

/* Writes items: room in the budget first (make_disk_room), then LMDB, which refuses a
 * batch without room on its map or filesystem before starting it (disk.h); on KVS_ENOSPC
 * more non-durable records go and the write is tried again, a few times. KVS_ENOSPC
 * when nothing evictable is left: the budget or the disk is full of durable blocks (or of
 * blocks in use). */
static int write_items(kvs_spill *sp, const kvs_disk_item *items, size_t m, uint64_t bytes,
                       bool durable, kvs_err *err)
{
    kvs_store *st = sp->st;
    make_disk_room(sp, bytes, 0);
    pthread_mutex_lock(&st->mu);
    uint64_t used = st->stats.disk_used, cap = st->stats.disk_capacity;
    pthread_mutex_unlock(&st->mu);
    if (used + bytes > cap)
        return kvs_err_set(err, KVS_ENOSPC,
                           "disk tier: no room for %llu bytes in its budget of %llu bytes "
                           "(--disk-capacity): %llu bytes are durable blocks or in use",
                           (unsigned long long)bytes, (unsigned long long)cap,
                           (unsigned long long)used);
    for (int tries = 0;; tries++) {
        int rc = durable ? kvs_disk_put_durable(st->disk, items, m, err)
                         : kvs_disk_put_batch(st->disk, items, m, err);
        if (rc != KVS_ENOSPC || tries == ENOSPC_TRIES)
            return rc;
        pthread_mutex_lock(&st->mu);
        uint64_t extra = st->stats.disk_used / 8;
        pthread_mutex_unlock(&st->mu);
        if (!make_disk_room(sp, bytes, extra > bytes ? extra : bytes))
            return rc; /* nothing left to evict */
    }
}

/* A run of put, copy or durable ops (at most BATCH_ITEMS) in one transaction; when the
 * whole run does not fit, one block at a time, so that as many as there is room for are
 * written. A put moves the block to disk; copy and durable leave it in the host tier, now
 * on_disk. A put or copy of a block removed meanwhile is skipped (whoever removed it
 * queued the record's deletion after us). A durable block is written even then, unless
 * its namespace is gone: its Put is acknowledged after this write whatever happened to
 * it meanwhile, and what replaced or deleted it is queued after us, so at any instant of
 * a crash an acknowledged block is on disk or superseded by a later operation. A durable
 * write that fails leaves its key as it was before the Put: the block is unlinked and the
 * record it replaced, if any (still in LMDB: nothing was written), indexed again. */
static void apply_puts(kvs_spill *sp, op **run, size_t n, op_kind kind)
{
    bool durable = kind == OP_DURABLE, keep = kind != OP_PUT;
    kvs_store *st = sp->st;
    kvs_disk_item items[BATCH_ITEMS];
    size_t at[BATCH_ITEMS]; /* items[j] is run[at[j]] */
    int rcs[BATCH_ITEMS];
    kvs_err errs[BATCH_ITEMS];
    bool gone[BATCH_ITEMS];
    kvs_block *fresh[BATCH_ITEMS] = {0};
    size_t m = 0;
    uint64_t bytes = 0;
    pthread_mutex_lock(&st->mu);
    for (size_t i = 0; i < n; i++) {
        kvs_block *b = run[i]->blk;
        rcs[i] = 0;
        /* Identity and payload are immutable once linked, and our reference keeps them. */
        gone[i] = kvs_ns_dropped(b->ns);
        if (!gone[i] && (durable || kvs__block_linked(b))) {
            at[m] = i;
            items[m++] =
                (kvs_disk_item){b->node.ns_id, b->node.key, b->node.key_len, b->data, b->size};
            bytes += b->size;
        }
    }
    pthread_mutex_unlock(&st->mu);

    bool written[BATCH_ITEMS] = {0};
    int rc = m ? write_items(sp, items, m, bytes, durable, &errs[0]) : 0;
    if (rc == KVS_ENOSPC && m > 1) {
        for (size_t j = 0; j < m; j++)
            if ((rcs[at[j]] = write_items(sp, &items[j], 1, items[j].len, durable, &errs[at[j]])))
                rc = rcs[at[j]];
    } else {
        for (size_t j = 0; j < m; j++) {
            rcs[at[j]] = rc;
            if (rc)
                errs[at[j]] = errs[0];
        }
    }
    size_t nfailed = 0;
    for (size_t j = 0; j < m; j++) {
        size_t i = at[j];
        if (rcs[i]) {
            nfailed++;
            continue;
        }
        written[i] = true;
        forget_pending(sp, items[j].ns_id, items[j].key, items[j].key_len);
        if (!keep)
            fresh[i] = kvs__disk_entry_new(run[i]->blk);
    }

    kvs_block *to_free = NULL;
    size_t dropped = 0, io_errors = 0;
    pthread_mutex_lock(&st->mu);
    for (size_t i = 0; i < n; i++) {
        kvs_block *b = run[i]->blk;
        bool live = kvs__block_linked(b) && !kvs_ns_dropped(b->ns);
        bool in = !gone[i] && (durable || written[i] || rcs[i]);
        if (in && rcs[i] && rcs[i] != KVS_ENOSPC)
            io_errors++;
        if (written[i] && live) {
            if (keep) {
                b->on_disk = true;
                st->stats.disk_used += b->size;
            } else { /* the host copy leaves; readers keep it until they let go */
                kvs__store_unlink_locked(st, b);
                kvs__store_link_locked(st, fresh[i]);
                fresh[i] = NULL;
                st->stats.disk_spills++;
            }
        } else if (rcs[i] && live && durable) {
            /* Not durable, so not acknowledged: nothing of it may stay; the key goes back
             * to what it was, with the record it replaced if it had one. */
            kvs__store_unlink_locked(st, b);
            if (b->prev_rec &&
                !kvs_index_find(st->index, b->node.ns_id, b->node.key, b->node.key_len)) {
                kvs_block *d = kvs__disk_entry_new(b);
                d->tokens = b->prev_tokens;
                d->size = b->prev_size;
                d->raw_bytes = b->prev_raw;
                kvs__store_link_locked(st, d);
            }
        } else if (rcs[i] && live && !keep) { /* not written: dropped as if no disk */
            kvs__store_unlink_locked(st, b);
            st->stats.spill_dropped++;
            dropped++;
        }
        if (b->state == KVS_BLOCK_WRITING) /* a copy or a durable block that stays */
            kvs__block_set_state(b, KVS_BLOCK_IDLE);
        if (kvs__store_unref_locked(st, b)) {
            b->node.next = (kvs_index_node *)to_free;
            to_free = b;
        }
    }
    st->stats.disk_write_errors += io_errors;
    if (durable)
        st->stats.disk_refused += nfailed - io_errors;
    pthread_mutex_unlock(&st->mu);
    for (size_t i = 0; i < n; i++)
        if (fresh[i])
            kvs__block_free(fresh[i]);
    kvs__block_free_chain(to_free);
    if (nfailed)
        kvs__store_log(st, rc == KVS_ENOSPC ? KVS_LOG_WARN : KVS_LOG_ERROR,
                       "disk tier: %zu of %zu blocks not written%s: %s", nfailed, m,
                       durable   ? " (durable puts answered with the error)"
                       : dropped ? ", dropped from the host tier"
                                 : "",
                       errs[at[0]].msg[0] ? errs[at[0]].msg : kvs_strerror(rc));
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

static void apply_dels(kvs_spill *sp, op **run, size_t n)
{
    victim v[RUN_MAX];
    for (size_t i = 0; i < n; i++) {
        v[i].ns_id = run[i]->ns_id;
        v[i].key_len = run[i]->key_len;
        memcpy(v[i].key, run[i]->key, run[i]->key_len);
    }
    size_t done = 0;
    if (del_records(sp->st, v, n, "removed blocks", &done))
        add_pending(sp, v + done, n - done);
}

static void apply_one(kvs_spill *sp, op *o)
{
    kvs_err err;
    if (o->kind == OP_MARK) {
        o->done(o->arg, 0, NULL);
    } else if (o->kind == OP_NS_DEL && kvs_disk_ns_del(sp->st->disk, o->ns_id, NULL, &err)) {
        kvs__store_log(sp->st, KVS_LOG_ERROR,
                       "disk tier: dropping namespace id %u: %s "
                       "(retried before the next batch)",
                       o->ns_id, err.msg);
        victim v = {.ns_id = o->ns_id, .key_len = 0};
        add_pending(sp, &v, 1);
    }
}

/* Applies a list in order, grouping consecutive ops of one kind into a transaction. */
static void apply(kvs_spill *sp, op *list)
{
    op *run[RUN_MAX];
    while (list) {
        op_kind k = list->kind;
        bool put = k == OP_PUT || k == OP_COPY || k == OP_DURABLE;
        size_t n = 0, lim = put ? BATCH_ITEMS : k == OP_DEL ? RUN_MAX : 1;
        uint64_t bytes = 0;
        while (list && list->kind == k && n < lim && bytes < BATCH_BYTES) {
            if (list->blk)
                bytes += list->blk->size;
            run[n++] = list;
            list = list->next;
        }
        if (put)
            apply_puts(sp, run, n, k);
        else if (k == OP_DEL)
            apply_dels(sp, run, n);
        else
            apply_one(sp, run[0]);
        for (size_t i = 0; i < n; i++)
            free(run[i]);
    }
}

static void *writer_main(void *arg)
{
    kvs_spill *sp = arg;
    pthread_mutex_lock(&sp->mu);
    for (;;) {
        while (!sp->head && !sp->stop && !sp->kick)
            pthread_cond_wait(&sp->cv, &sp->mu);
        if (!sp->head && sp->stop)
            break; /* stopping, and everything queued is applied */
        op *list = sp->head;
        sp->head = NULL;
        sp->tail = &sp->head;
        sp->kick = false;
        bool stopping = sp->stop;
        pthread_mutex_unlock(&sp->mu);
        if (sp->npend) /* older than anything in list: first */
            retry_pending(sp);
        apply(sp, list);
        /* After each batch, so a demotion that filled the queue goes on as it drains; the
         * blocks it hands over are queued, and so applied by the next turn of this loop. */
        if (!stopping)
            kvs__store_host_demote(sp->st);
        pthread_mutex_lock(&sp->mu);
    }
    pthread_mutex_unlock(&sp->mu);
    return NULL;
}

int kvs_spill_create(kvs_store *st, kvs_spill **out, kvs_err *err)
{
    kvs_spill *sp = kvs_xcalloc(1, sizeof *sp);
    sp->st = st;
    sp->tail = &sp->head;
    int rc = pthread_mutex_init(&sp->mu, NULL);
    if (rc == 0 && (rc = pthread_cond_init(&sp->cv, NULL)) != 0)
        pthread_mutex_destroy(&sp->mu);
    if (rc == 0 && (rc = pthread_create(&sp->thread, NULL, writer_main, sp)) != 0) {
        pthread_cond_destroy(&sp->cv);
        pthread_mutex_destroy(&sp->mu);
    }
    if (rc) {
        free(sp);
        return kvs_err_set(err, -rc, "disk writer: cannot start: %s", strerror(rc));
    }
    *out = sp;
    return 0;
}

void kvs_spill_destroy(kvs_spill *sp)
{
    if (!sp)
        return;
    pthread_mutex_lock(&sp->mu);
    sp->stop = true;
    pthread_cond_signal(&sp->cv);
    pthread_mutex_unlock(&sp->mu);
    pthread_join(sp->thread, NULL);
    if (sp->npend)
        kvs__store_log(sp->st, KVS_LOG_WARN,
                       "disk tier: %zu record deletions still failed at "
                       "shutdown: those blocks come back at the next start",
                       sp->npend);
    free(sp->pend);
    pthread_cond_destroy(&sp->cv);
    pthread_mutex_destroy(&sp->mu);
    free(sp);
}

typedef struct waiter {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool done;
} waiter;

static void wake(void *arg, int rc, const kvs_err *err)
{
    (void)rc;
    (void)err;
    waiter *w = arg;
    pthread_mutex_lock(&w->mu);
    w->done = true;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

void kvs_store_disk_wait(kvs_store *st)
{
    if (!st->spill)
        return;
    waiter w = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};
    kvs_spill_mark(st->spill, wake, &w);
    pthread_mutex_lock(&w.mu);
    while (!w.done)
        pthread_cond_wait(&w.cv, &w.mu);
    pthread_mutex_unlock(&w.mu);
}

typedef struct barrier {
    kvs_store *st;
    kvs_store_durable_fn done;
    void *arg;
} barrier;

static void barrier_done(void *arg, int rc, const kvs_err *e)
{
    (void)rc;
    (void)e;
    barrier b = *(barrier *)arg;
    free(arg);
    kvs_err err;
    int src = kvs_disk_sync(b.st->disk, &err);
    b.done(b.arg, src, src ? &err : NULL);
}

void kvs_store_disk_barrier(kvs_store *st, kvs_store_durable_fn done, void *arg)
{
    if (!st->spill) {
        done(arg, 0, NULL);
        return;
    }
    barrier *b = kvs_xcalloc(1, sizeof *b); /* small and fixed (STYLE: may abort) */
    *b = (barrier){st, done, arg};
    kvs_spill_mark(st->spill, barrier_done, b);
}

/* ---------------------------------------------------------------- reads */

typedef struct view {
    uint64_t len;
    kvs_disk_read_fn fn;
    void *arg;
    bool called;
} view;

static int view_cb(const void *bytes, size_t len, void *arg)
{
    view *v = arg;
    if (len != v->len) /* rewritten under another size since: not this block any more */
        return KVS_ENOTFOUND;
    v->called = true;
    return v->fn(bytes, len, v->arg);
}

int kvs_spill_view(kvs_store *st, kvs_block *d, kvs_disk_read_fn fn, void *arg, kvs_err *err)
{
    view v = {.len = d->size, .fn = fn, .arg = arg};
    int rc = kvs_disk_get(st->disk, d->node.ns_id, d->node.key, d->node.key_len, view_cb, &v, err);
    bool lost = !v.called && (rc == KVS_ENOTFOUND || rc == KVS_EDATALOSS);
    if (lost && rc == KVS_ENOTFOUND)
        rc = kvs_err_set(err, KVS_ENOTFOUND,
                         "key: not found in namespace '%s' (its disk "
                         "record is gone)",
                         kvs_ns_spec_of(d->ns)->name);
    pthread_mutex_lock(&st->mu);
    if (v.called) {
        st->stats.disk_hits++;
    } else if (lost) { /* the disk module already deleted a record that failed its checksum */
        if (rc == KVS_EDATALOSS)
            st->stats.checksum_failures++;
        else
            st->stats.misses++;
        if (kvs__block_linked(d) && d->tier == KVS_STORE_TIER_DISK && !d->data)
            kvs__store_unlink_locked(st, d); /* the caller's reference keeps it */
    }
    pthread_mutex_unlock(&st->mu);
    return rc;
}

static int copy_cb(const void *bytes, size_t len, void *dst)
{
    memcpy(dst, bytes, len); /* len checked by view_cb */
    return 0;
}

int kvs_spill_read(kvs_store *st, kvs_block *d, kvs_block **out, kvs_err *err)
{
    kvs_ns *ns = d->ns;
    kvs_block *h = NULL;
    int rc = 0;
    if (st->promote && kvs_store_block_alloc(st, ns, d->tokens, d->size, &h, NULL) != 0)
        h = NULL; /* no room in the host tier: serve a transient copy */
    if (!h) {
        h = calloc(1, sizeof *h);
        unsigned char *data = h ? kvs_trymalloc(d->size ? d->size : 1) : NULL;
        if (!data) {
            free(h);
            h = NULL;
            rc = kvs_err_set(err, KVS_ENOMEM,
                             "disk tier: cannot allocate %llu bytes to read a "
                             "block",
                             (unsigned long long)d->size);
        } else {
            *h = (kvs_block){.data = data,
                             .ns = kvs_ns_ref(ns),
                             .tokens = d->tokens,
                             .size = d->size,
                             .tier = KVS_STORE_TIER_DISK,
                             .state = KVS_BLOCK_TRANSIENT};
        }
    }
    if (rc == 0) {
        h->raw_bytes = d->raw_bytes;
        /* Verified, counted, and a lost record's entry forgotten, by the view. */
        rc = kvs_spill_view(st, d, copy_cb, h->data, err);
    }
    pthread_mutex_lock(&st->mu);
    if (rc == 0) {
        if (h->state != KVS_BLOCK_TRANSIENT && d->state == KVS_BLOCK_IDLE && !kvs_ns_dropped(ns)) {
            h->node = d->node;
            h->on_disk = true; /* the record stays: evicting h again costs no write */
            kvs__store_unlink_locked(st, d);
            kvs__store_link_locked(st, h);
            st->stats.disk_promotions++;
        }
        h->refs = kvs__block_linked(h) ? 2 : 1; /* + the reader's */
    }
    bool free_d = kvs__store_unref_locked(st, d);
    pthread_mutex_unlock(&st->mu);
    if (free_d)
        kvs__block_free(d);
    if (rc && h) {
        if (h->state == KVS_BLOCK_TRANSIENT)
            kvs__block_free(h);
        else
            kvs_store_block_abort(st, h);
    }
    if (rc == 0)
        *out = h;
    return rc;
}

/* ---------------------------------------------------------------- flush */

uint64_t kvs_store_flush(kvs_store *st)
{
    uint64_t n = 0;
    if (!st->spill)
        return 0;
    pthread_mutex_lock(&st->mu);
    for (kvs_lru_node *it = kvs_lru_oldest(&st->lru); it; it = kvs_lru_newer(&st->lru, it)) {
        kvs_block *b = KVS__BLOCK_OF_LRU(it);
        if (b->on_disk || b->state != KVS_BLOCK_IDLE)
            continue; /* has a record, or one is being written, or busy elsewhere */
        kvs__block_set_state(b, KVS_BLOCK_WRITING);
        b->refs++;
        op *o = op_new(OP_COPY);
        o->blk = b;
        push(st->spill, o);
        n++;
    }
    pthread_mutex_unlock(&st->mu);
    kvs_store_disk_wait(st);
    return n;
}
