/* The store's disk side (store.h; DESIGN §7): what the disk writer (storage/writer.h)
 * asks of the store through its hooks — the bytes of queued blocks, room in the disk
 * budget, and the index after each write — and the store's disk verbs: reads of disk
 * blocks (verified, promoted), waits for the writer, durable barriers, flushes.
 *
 * The writer's hooks run on the writer thread and take store->mu for their bookkeeping,
 * never across an LMDB transaction (the writer does those with no store lock held).
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/base/mem.h"
#include "gpu/codec/format.h"
#include "storage/store_int.h"
#include "storage/writer.h"

/* ---------------------------------------------------------------- the writer's hooks */

/* Precision demotion of a spill (store.h, invariant 9): b's bytes re-encoded with the disk
 * tier's codecs where those are colder, into b->spill_*, for the writer to write instead.
 * Nothing when they are not; when the re-encode fails the block is written as it is
 * (logged: it stays a correct block, only not a colder one). The checksum is verified
 * first, so that the new seal never covers bytes that went bad in RAM. Writer thread, no
 * lock held: b is SPILLING, and its bytes and identity are read-only. */
static void spill_recode(kvs_store *st, kvs_block *b)
{
    unsigned to = kvs_ns_colder(b->ns, b->enc, KVS_ENC_DISK, b->tokens);
    if (to == b->enc)
        return;
    kvs_block_info info;
    const kvs_codec *k, *v, *k2 = NULL, *v2 = NULL;
    kvs_err err;
    int rc = kvs_format_parse(b->data, b->size, &info, &err);
    if (rc == 0)
        rc = kvs_ns_block_codecs(b->ns, &info, &k, &v, NULL, &err);
    if (rc == 0)
        rc = kvs_ns_codecs_enc(b->ns, to, info.k_state, info.v_state, &k2, &v2, &err);
    size_t cap = rc ? 0 : kvs_block_encoded_max(k2, v2, b->tokens), len = 0;
    uint8_t *out = cap ? kvs_trymalloc(cap) : NULL;
    if (rc == 0 && !out)
        rc = kvs_err_set(&err, KVS_ENOMEM, "cannot allocate %zu bytes", cap);
    if (rc == 0)
        rc = kvs_block_transcode(k, v, k2, v2, b->data, b->size, out, cap, &len, &err);
    if (rc) {
        free(out);
        kvs__store_log(st, KVS_LOG_WARN,
                       "namespace '%s': a block spilled to disk as it is, not re-encoded with "
                       "disk_codec %s: %s",
                       kvs_ns_spec_of(b->ns)->name, kvs_ns_spec_of(b->ns)->disk_codec, err.msg);
        return;
    }
    b->spill_data = out;
    b->spill_size = len;
    b->spill_enc = (uint8_t)to;
}

/* The run's blocks to write now. Identity and payload are immutable once linked, and the
 * writer's reference keeps them. A put or copy of a block removed meanwhile is skipped
 * (whoever removed it queued the record's deletion after this). A durable block is written
 * even then, unless its namespace is gone: its Put is acknowledged after this write
 * whatever happened to it meanwhile, and what replaced or deleted it is queued after it,
 * so at any instant of a crash an acknowledged block is on disk or superseded by a later
 * operation. */
static size_t gather(void *ctx, kvs_writer_kind kind, void *const *blocks, size_t n,
                     kvs_disk_item *items, size_t *at, bool *gone)
{
    kvs_store *st = ctx;
    size_t m = 0;
    pthread_mutex_lock(&st->mu);
    for (size_t i = 0; i < n; i++) {
        kvs_block *b = blocks[i];
        gone[i] = kvs_ns_dropped(b->ns);
        if (!gone[i] && (kind == KVS_WRITER_DURABLE || kvs__block_linked(b))) {
            at[m] = i;
            items[m++] =
                (kvs_disk_item){b->node.ns_id, b->node.key, b->node.key_len, b->data, b->size};
        }
    }
    pthread_mutex_unlock(&st->mu);
    /* A spill leaves RAM: it goes down re-encoded (copies and durable writes keep the host
     * block's bytes, which stay in RAM beside their record: invariant 9). */
    for (size_t j = 0; kind == KVS_WRITER_PUT && j < m; j++) {
        kvs_block *b = blocks[at[j]];
        spill_recode(st, b);
        if (b->spill_data) {
            items[j].bytes = b->spill_data;
            items[j].len = b->spill_size;
        }
    }
    return m;
}

/* Frees room in the disk budget: deletes records of non-durable blocks, oldest first,
 * until `need` more bytes and `need_records` more records (disk_max_records) fit and at
 * least `extra` bytes went. First disk entries (the
 * block leaves the store), then the records of idle host blocks (the block stays in the
 * host tier, without a record). The records are deleted before the index changes, and
 * the index changes only if the deletion committed: after an error both still agree.
 * Records of durable namespaces are never taken (README: the durable contract), nor those
 * of blocks being read or written. With `only` (a namespace over its disk quota), only
 * that namespace's records, until `need` more fit its quota: the walk passes other
 * namespaces' records by (O(disk entries + host blocks) at worst). Returns the bytes
 * freed. */
static uint64_t free_records(kvs_store *st, kvs_ns *only, uint64_t need, uint64_t extra,
                             uint64_t need_records)
{
    size_t n = 0, cap = 0;
    kvs_block **picked = NULL;
    uint64_t freed = 0;
    pthread_mutex_lock(&st->mu);
    const uint64_t *used = only ? &kvs_ns_usage_of(only)->disk_bytes : &st->stats.disk_used;
    uint64_t budget = only ? kvs_ns_spec_of(only)->disk_quota : st->stats.disk_capacity;
    const uint64_t records = st->stats.disk_records, max_records = st->stats.disk_max_records;
    for (int pass = 0; pass < 2; pass++) {
        kvs_lru *list = pass ? &st->lru : &st->disk_lru;
        for (kvs_lru_node *it = kvs_lru_oldest(list);
             it && (*used - freed + need > budget || freed < extra ||
                    (!only && records - n + need_records > max_records));
             it = kvs_lru_newer(list, it)) {
            kvs_block *b = KVS__BLOCK_OF_LRU(it);
            if (b->refs != 1 || !b->on_disk || b->state != KVS_BLOCK_IDLE ||
                kvs_ns_spec_of(b->ns)->durable || (only && b->ns != only))
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
    kvs_writer_rec *r = malloc(n * sizeof *r);
    size_t done = 0;
    for (size_t i = 0; r && i < n; i++) { /* identity is immutable: no lock needed */
        r[i].ns_id = picked[i]->node.ns_id;
        r[i].key_len = picked[i]->node.key_len;
        memcpy(r[i].key, picked[i]->node.key, picked[i]->node.key_len);
    }
    if (r) /* a failure is logged and counted by the writer; what went is `done` */
        kvs_writer_delete_now(st->writer, r, n, "evicted", &done);
    free(r);
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
                kvs__store_disk_record_locked(st, b, false);
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
    return done == n ? freed : 0;
}

/* A namespace's disk quota (store.h "Quotas"): `need` more bytes of namespace id fit it
 * once its own oldest records went, or KVS_ENOSPC naming disk_quota_bytes. Exact although
 * the writer is asynchronous: only the writer thread adds records (finish, after this), and
 * the run's blocks written but not yet finished are in `need` (the room hook's held). */
static int quota_room(kvs_store *st, uint32_t id, uint64_t need, kvs_err *err)
{
    pthread_mutex_lock(&st->mu);
    kvs_ns *ns = kvs_ns_registry_find_id(st->reg, id); /* NULL: dropped since gather */
    uint64_t quota = ns ? kvs_ns_spec_of(ns)->disk_quota : 0;
    if (quota)
        kvs_ns_ref(ns);
    pthread_mutex_unlock(&st->mu);
    if (!quota)
        return 0;
    free_records(st, ns, need, 0, 0);
    pthread_mutex_lock(&st->mu);
    uint64_t held = kvs_ns_usage_of(ns)->disk_bytes;
    pthread_mutex_unlock(&st->mu);
    int rc = 0;
    if (held + need > quota)
        rc = kvs_err_set(err, KVS_ENOSPC,
                         "disk_quota_bytes: namespace '%s' holds %llu bytes of its disk quota of "
                         "%llu and no record of its own can be evicted for %llu more%s",
                         kvs_ns_spec_of(ns)->name, (unsigned long long)held,
                         (unsigned long long)quota, (unsigned long long)need,
                         kvs_ns_spec_of(ns)->durable
                             ? " (a durable namespace's blocks stay until deleted)"
                             : "");
    kvs_ns_unref(ns);
    return rc;
}

/* The budget is strict: a write that does not fit once every evictable record went is
 * refused (durable Puts answer RESOURCE_EXHAUSTED naming the disk tier, or
 * disk_quota_bytes; spills are dropped). A namespace over its disk quota evicts its own
 * records first, so that only the tier's own shortage evicts across namespaces. After
 * LMDB or the filesystem said full, an eighth of the tier (at least the write) more goes. */
static int room(void *ctx, const kvs_disk_item *items, size_t m, const kvs_disk_item *held,
                size_t nheld, bool retry, kvs_err *err)
{
    kvs_store *st = ctx;
    /* The bytes of the write, all and per namespace (a run has few namespaces). */
    struct {
        uint32_t id;
        uint64_t bytes;
    } per[2 * KVS_WRITER_RUN_MAX];
    size_t nper = 0;
    uint64_t need = 0;
    for (size_t i = 0; i < m + nheld && i < 2 * KVS_WRITER_RUN_MAX; i++) {
        const kvs_disk_item *it = i < m ? &items[i] : &held[i - m];
        size_t j = 0;
        while (j < nper && per[j].id != it->ns_id)
            j++;
        if (j == nper) {
            per[j].id = it->ns_id;
            per[j].bytes = 0;
            nper++;
        }
        per[j].bytes += it->len;
        need += it->len;
    }
    if (retry) {
        pthread_mutex_lock(&st->mu);
        uint64_t extra = st->stats.disk_used / 8;
        pthread_mutex_unlock(&st->mu);
        if (free_records(st, NULL, need, extra > need ? extra : need, m + nheld))
            return 0;
        return kvs_err_set(err, KVS_ENOSPC, "disk tier: nothing left to evict");
    }
    for (size_t j = 0; j < nper; j++) {
        int rc = quota_room(st, per[j].id, per[j].bytes, err);
        if (rc)
            return rc;
    }
    free_records(st, NULL, need, 0, m + nheld);
    pthread_mutex_lock(&st->mu);
    uint64_t used = st->stats.disk_used, cap = st->stats.disk_capacity;
    uint64_t records = st->stats.disk_records, max_records = st->stats.disk_max_records;
    pthread_mutex_unlock(&st->mu);
    if (records + m + nheld > max_records)
        return kvs_err_set(err, KVS_ENOSPC,
                           "disk tier: no room for %zu more records among its %llu at most "
                           "(--disk-max-blocks): %llu are durable blocks or in use",
                           m + nheld, (unsigned long long)max_records, (unsigned long long)records);
    if (used + need <= cap)
        return 0;
    return kvs_err_set(err, KVS_ENOSPC,
                       "disk tier: no room for %llu bytes in its budget of %llu bytes "
                       "(--disk-capacity): %llu bytes are durable blocks or in use",
                       (unsigned long long)need, (unsigned long long)cap, (unsigned long long)used);
}

/* The index after a run: a written put becomes a disk entry (the host copy leaves; its
 * readers keep it until they let go) of the bytes written (re-encoded by gather: its size
 * and codecs, counted in disk_recoded); a written copy or durable block stays, now with its
 * record. A durable write that failed leaves its key as it was before the Put: the block is
 * unlinked and the record it replaced, if any (still in LMDB: nothing was written), indexed
 * again. A put that failed is dropped as without a disk tier, unless the block had a
 * record already (a rewrite, colder): that record, still in LMDB, becomes its disk entry;
 * a copy that failed stays. */
static void finish(void *ctx, kvs_writer_kind kind, void *const *blocks, size_t n, const bool *gone,
                   const bool *written, const int *rcs)
{
    kvs_store *st = ctx;
    bool durable = kind == KVS_WRITER_DURABLE, keep = kind != KVS_WRITER_PUT;
    kvs_block *fresh[KVS_WRITER_RUN_MAX] = {0};
    bool recoded[KVS_WRITER_RUN_MAX] = {0};
    for (size_t i = 0; i < n; i++) { /* allocations outside the lock */
        kvs_block *b = blocks[i];
        /* on_disk of a spill cannot change meanwhile: the record's eviction takes IDLE blocks
         * only (free_records). */
        if (!keep && (written[i] || b->on_disk))
            fresh[i] = kvs__disk_entry_new(b);
        if (fresh[i] && written[i] && b->spill_data) {
            fresh[i]->size = b->spill_size;
            fresh[i]->enc = b->spill_enc;
            recoded[i] = true;
        }
        /* Written (or not): the re-encoded bytes were the writer's alone. */
        free(b->spill_data);
        b->spill_data = NULL;
    }
    kvs_block *to_free = NULL;
    pthread_mutex_lock(&st->mu);
    for (size_t i = 0; i < n; i++) {
        kvs_block *b = blocks[i];
        bool live = kvs__block_linked(b) && !kvs_ns_dropped(b->ns);
        if (!gone[i] && rcs[i] && rcs[i] != KVS_ENOSPC)
            st->stats.disk_write_errors++;
        else if (!gone[i] && rcs[i] && durable)
            st->stats.disk_refused++;
        if (written[i] && live) {
            if (keep) {
                b->on_disk = true;
                kvs__store_disk_record_locked(st, b, true);
            } else {
                if (recoded[i]) {
                    st->stats.disk_recoded++;
                    st->stats.disk_recode_saved += b->size - fresh[i]->size;
                }
                kvs__store_unlink_locked(st, b);
                kvs__store_link_locked(st, fresh[i]);
                fresh[i] = NULL;
                st->stats.disk_spills++;
            }
        } else if (rcs[i] && live && durable) {
            kvs__store_unlink_locked(st, b);
            if (b->prev_rec &&
                !kvs_index_find(st->index, b->node.ns_id, b->node.key, b->node.key_len)) {
                kvs_block *d = kvs__disk_entry_new(b);
                d->tokens = b->prev_tokens;
                d->enc = b->prev_enc;
                d->size = b->prev_size;
                d->raw_bytes = b->prev_raw;
                kvs__store_link_locked(st, d);
            }
        } else if (rcs[i] && live && !keep && b->on_disk) { /* its old record stays */
            kvs__store_unlink_locked(st, b);
            kvs__store_link_locked(st, fresh[i]);
            fresh[i] = NULL;
            st->stats.disk_spills++;
        } else if (rcs[i] && live && !keep) {
            kvs__store_unlink_locked(st, b);
            st->stats.spill_dropped++;
        }
        if (b->state == KVS_BLOCK_WRITING) /* a copy or a durable block that stays */
            kvs__block_set_state(b, KVS_BLOCK_IDLE);
        st->stats.flush_done += kind == KVS_WRITER_COPY; /* copies are flushes' only */
        if (kvs__store_unref_locked(st, b)) {            /* the writer's reference */
            b->node.next = (kvs_index_node *)to_free;
            to_free = b;
        }
    }
    pthread_mutex_unlock(&st->mu);
    for (size_t i = 0; i < n; i++)
        if (fresh[i])
            kvs__block_free(fresh[i]);
    kvs__block_free_chain(to_free);
}

static void idle(void *ctx)
{
    kvs__store_host_demote(ctx);
}

static void write_errors(void *ctx, uint64_t n)
{
    kvs_store *st = ctx;
    pthread_mutex_lock(&st->mu);
    st->stats.disk_write_errors += n;
    pthread_mutex_unlock(&st->mu);
}

void kvs__store_writer_hooks(kvs_store *st, kvs_writer_hooks *h)
{
    *h = (kvs_writer_hooks){.ctx = st,
                            .gather = gather,
                            .room = room,
                            .finish = finish,
                            .idle = idle,
                            .write_errors = write_errors,
                            .log = st->log,
                            .log_ctx = st->log_ctx};
}

/* ---------------------------------------------------------------- waits and barriers */

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
    if (!st->writer)
        return;
    waiter w = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};
    kvs_writer_mark(st->writer, wake, &w);
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
    if (!st->writer) {
        done(arg, 0, NULL);
        return;
    }
    barrier *b = kvs_xcalloc(1, sizeof *b); /* small and fixed (STYLE: may abort) */
    *b = (barrier){st, done, arg};
    kvs_writer_mark(st->writer, barrier_done, b);
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

/* d's verified bytes to fn inside one LMDB read transaction; a lost record (gone, or
 * dropped by the disk module for its checksum) forgets the entry and is counted. The
 * caller's reference on d stays. */
static int disk_view(kvs_store *st, kvs_block *d, kvs_disk_read_fn fn, void *arg, kvs_err *err)
{
    view v = {.len = d->size, .fn = fn, .arg = arg};
    int rc = kvs_disk_get(st->disk, d->node.ns_id, d->node.key, d->node.key_len, view_cb, &v, err);
    bool lost = !v.called && (rc == KVS_ENOTFOUND || rc == KVS_EDATALOSS);
    if (lost && rc == KVS_ENOTFOUND)
        rc = kvs_err_set(err, KVS_ENOTFOUND,
                         "key: not found in namespace '%s' (its disk record is gone)",
                         kvs_ns_spec_of(d->ns)->name);
    pthread_mutex_lock(&st->mu);
    if (v.called) {
        st->stats.disk_hits++;
        kvs_ns_usage_of(d->ns)->disk_hits++;
    } else if (lost) { /* the disk module already deleted a record that failed its checksum */
        if (rc == KVS_EDATALOSS) {
            st->stats.checksum_failures++;
        } else {
            st->stats.misses++;
            kvs_ns_usage_of(d->ns)->misses++;
        }
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

/* Reads disk entry d (the caller's reference is dropped) into host memory; with promotion,
 * the copy replaces d in the index as a host block that keeps the record. */
static int disk_read(kvs_store *st, kvs_block *d, kvs_block **out, kvs_err *err)
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
                             "disk tier: cannot allocate %llu bytes to read a block",
                             (unsigned long long)d->size);
        } else {
            *h = (kvs_block){.data = data,
                             .ns = kvs_ns_ref(ns),
                             .enc = d->enc,
                             .tokens = d->tokens,
                             .size = d->size,
                             .tier = KVS_STORE_TIER_DISK,
                             .state = KVS_BLOCK_TRANSIENT};
        }
    }
    if (rc == 0) {
        h->raw_bytes = d->raw_bytes;
        h->enc = d->enc;
        /* Verified, counted, and a lost record's entry forgotten, by the view. */
        rc = disk_view(st, d, copy_cb, h->data, err);
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

int kvs_store_read(kvs_store *st, kvs_block *blk, kvs_block **out, kvs_err *err)
{
    if (!kvs_block_unread(blk)) {
        *out = blk;
        return 0;
    }
    return disk_read(st, blk, out, err); /* verified by the disk module as it is read */
}

int kvs_store_view(kvs_store *st, kvs_block *blk, kvs_disk_read_fn fn, void *arg, kvs_err *err)
{
    if (!kvs_block_unread(blk) || st->promote)
        return kvs_err_set(err, KVS_EINVAL, "view: only an unread disk block, with promotion off");
    return disk_view(st, blk, fn, arg, err);
}

int kvs_store_get(kvs_store *st, kvs_ns *ns, const void *key, size_t key_len, kvs_block **out,
                  kvs_err *err)
{
    kvs_block *blk;
    int rc = kvs_store_find(st, ns, key, key_len, &blk, err);
    return rc ? rc : kvs_store_read(st, blk, out, err);
}

/* ---------------------------------------------------------------- flush */

uint64_t kvs_store_flush(kvs_store *st)
{
    uint64_t n = 0;
    if (!st->writer)
        return 0;
    pthread_mutex_lock(&st->mu);
    for (kvs_lru_node *it = kvs_lru_oldest(&st->lru); it; it = kvs_lru_newer(&st->lru, it)) {
        kvs_block *b = KVS__BLOCK_OF_LRU(it);
        if (b->on_disk || b->state != KVS_BLOCK_IDLE)
            continue; /* has a record, or one is being written, or busy elsewhere */
        kvs__block_set_state(b, KVS_BLOCK_WRITING);
        b->refs++;
        kvs_writer_copy(st->writer, b, b->size);
        n++;
    }
    st->stats.flush_queued += n;
    pthread_mutex_unlock(&st->mu);
    kvs_store_disk_wait(st);
    return n;
}
