/* The store's operator verbs (store.h, "admin"): verify every block, flush the host tier
 * to disk with a report, evict a selection of blocks down a tier or out, and change the
 * host tier's capacity and eviction policy at run time (kvs_store_set_host).
 *
 * They run on a caller's thread that may block for long (the daemon's libuv pool): the
 * store lock is taken in short holds, never across hashing a block, an LMDB transaction
 * (the disk scan and reads run with no lock held) or the wait for the disk writer. Blocks
 * they work on are pinned by a reference of their own while the lock is released, which
 * makes them busy (unevictable) for that time only; removals go through the same paths as
 * kvs_store_delete and eviction, so store.h's invariants hold unchanged.
 */
#include <assert.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/base/mem.h"
#include "gpu/codec/format.h"
#include "storage/writer.h"
#include "storage/store_int.h"

#define BLOCK_OF_NODE KVS__BLOCK_OF_NODE
#define BLOCK_OF_LRU KVS__BLOCK_OF_LRU
#define DEMOTE_ROUND 64  /* GPU blocks per demotion batch (storage/tiering's round) */
#define VERIFY_BATCH 256 /* host blocks pinned at a time by verify */

/* The first bytes of a key in hex, for log lines. */
static const char *key_hex(const kvs_index_node *n, char *buf, size_t len)
{
    size_t k = n->key_len < 16 ? n->key_len : 16, at = 0;
    for (size_t i = 0; i < k && at + 3 <= len; i++)
        at += (size_t)snprintf(buf + at, len - at, "%02x", n->key[i]);
    if (k < n->key_len && at + 3 < len)
        snprintf(buf + at, len - at, "..");
    return buf;
}

/* ---------------------------------------------------------------- verify */

/* Host blocks are checked in batches, each pinned (a reference of ours) only while it is
 * hashed, so the host tier keeps evicting meanwhile. The walk follows the host LRU list
 * across the lock releases; blocks the pass has checked carry its number and are skipped
 * when a Get moved them ahead or the walk restarts (its place was unlinked meanwhile). */
static int verify_host(kvs_store *st, kvs_store_verify_info *out, kvs_err *err)
{
    (void)err;
    kvs_block *v[VERIFY_BATCH];
    bool ok[VERIFY_BATCH];
    kvs_block *to_free = NULL;
    pthread_mutex_lock(&st->mu);
    uint32_t pass = ++st->verify_pass;
    out->gpu_skipped = kvs__store_gpu_blocks_locked(st);
    kvs_lru_node *it = kvs_lru_oldest(&st->lru);
    for (;;) {
        size_t m = 0;
        for (; it && m < VERIFY_BATCH; it = kvs_lru_newer(&st->lru, it)) {
            kvs_block *b = BLOCK_OF_LRU(it);
            if (b->verified == pass)
                continue;
            b->verified = pass;
            b->refs++; /* ours: its bytes stay while we hash them */
            v[m++] = b;
        }
        pthread_mutex_unlock(&st->mu);
        kvs__block_free_chain(to_free);
        to_free = NULL;
        if (m == 0)
            break;
        /* Payloads are read-only once linked (store.h), so no lock while hashing. */
        for (size_t i = 0; i < m; i++) {
            kvs_block_info info; /* the encoded block's own checksum (invariant 4) */
            ok[i] = kvs_format_parse(v[i]->data, v[i]->size, &info, NULL) == 0;
            if (!ok[i]) {
                char h[40];
                kvs__store_log(st, KVS_LOG_ERROR,
                               "verify: namespace '%s': host block %s failed its checksum and "
                               "was dropped",
                               kvs_ns_spec_of(v[i]->ns)->name, key_hex(&v[i]->node, h, sizeof h));
            }
        }
        out->host_checked += m;
        atomic_fetch_add_explicit(&st->verify_checked, m, memory_order_relaxed);
        pthread_mutex_lock(&st->mu);
        for (size_t i = 0; i < m; i++) {
            if (!ok[i]) {
                st->stats.checksum_failures++;
                out->host_bad++;
                if (kvs__block_linked(v[i]))
                    kvs__store_forget_locked(st, v[i]); /* ours still: not freed here */
            }
        }
        /* Go on after the batch's last block if it is still in the list, else from the
         * start (what this pass checked is skipped). */
        kvs_block *last = v[m - 1];
        it = kvs__block_linked(last) ? kvs_lru_newer(&st->lru, &last->lru)
                                     : kvs_lru_oldest(&st->lru);
        for (size_t i = 0; i < m; i++) {
            if (kvs__store_unref_locked(st, v[i])) {
                v[i]->node.next = (kvs_index_node *)to_free;
                to_free = v[i];
            }
        }
    }
    return 0;
}

/* A record the disk scan found bad (KVS_DISK_SCAN_BAD). */
typedef struct bad_rec {
    uint32_t ns_id;
    uint8_t key_len;
    uint8_t key[KVS_KEY_MAX];
} bad_rec;

typedef struct scan_ctx {
    kvs_store *st;
    bad_rec *bad;
    size_t n, cap;
    uint64_t nbad;
} scan_ctx;

/* Inside the scan's read transaction: only remembers (no store lock, no disk write). */
static int on_record(const kvs_disk_entry *e, void *arg)
{
    scan_ctx *c = arg;
    atomic_fetch_add_explicit(&c->st->verify_checked, 1, memory_order_relaxed); /* lock-free */
    if (!e->bad)
        return 0;
    c->nbad++;
    if (e->key_len < 1 || e->key_len > KVS_KEY_MAX)
        return 0; /* no index entry can have that key */
    if (c->n == c->cap) {
        size_t ncap = c->cap ? 2 * c->cap : 64;
        bad_rec *nb = realloc(c->bad, ncap * sizeof *nb);
        if (!nb)
            return 0; /* its index entry stays; a Get finds the record gone and forgets it */
        c->bad = nb;
        c->cap = ncap;
    }
    bad_rec *r = &c->bad[c->n++];
    r->ns_id = e->ns_id;
    r->key_len = (uint8_t)e->key_len;
    memcpy(r->key, e->key, e->key_len);
    return 0;
}

static int read_nothing(const void *bytes, size_t len, void *arg)
{
    (void)bytes;
    (void)len;
    (void)arg;
    return 0;
}

static int verify_disk(kvs_store *st, kvs_store_verify_info *out, kvs_err *err)
{
    scan_ctx c = {.st = st};
    kvs_disk_scan_info si;
    int rc =
        kvs_disk_scan(st->disk, KVS_DISK_SCAN_VERIFY | KVS_DISK_SCAN_BAD, on_record, &c, &si, err);
    out->disk_checked = si.blocks + c.nbad;
    out->disk_bad = c.nbad;
    /* The scan dropped the bad records after it ended, unless one was rewritten meanwhile:
     * a read (verified, no lock held) tells which are gone, and only their index entries
     * are forgotten. */
    for (size_t i = 0; i < c.n; i++) {
        bad_rec *r = &c.bad[i];
        int grc = kvs_disk_get(st->disk, r->ns_id, r->key, r->key_len, read_nothing, NULL, NULL);
        if (grc != KVS_ENOTFOUND && grc != KVS_EDATALOSS)
            continue; /* good now, or unreadable (the next Get decides) */
        bool free_now = false;
        kvs_block *b = NULL;
        pthread_mutex_lock(&st->mu);
        kvs_index_node *node = kvs_index_find(st->index, r->ns_id, r->key, r->key_len);
        if (node) {
            b = BLOCK_OF_NODE(node);
            if (b->tier == KVS_STORE_TIER_DISK) {
                free_now = kvs__store_unlink_locked(st, b);
            } else if (b->on_disk && b->state != KVS_BLOCK_WRITING &&
                       b->state != KVS_BLOCK_SPILLING) { /* its host copy is whole: keep it */
                b->on_disk = false;
                kvs__store_disk_record_locked(st, b, false);
            }
        }
        pthread_mutex_unlock(&st->mu);
        if (free_now)
            kvs__block_free(b);
    }
    pthread_mutex_lock(&st->mu);
    st->stats.checksum_failures += c.nbad;
    pthread_mutex_unlock(&st->mu);
    free(c.bad);
    if (c.nbad)
        kvs__store_log(st, KVS_LOG_ERROR,
                       "verify: disk tier %s: %llu of %llu records were bad "
                       "and were dropped",
                       kvs_disk_path(st->disk), (unsigned long long)c.nbad,
                       (unsigned long long)out->disk_checked);
    if (rc)
        kvs_err_prefix(err, "verify: disk tier %s", kvs_disk_path(st->disk));
    return rc;
}

/* What a verify will check: every host block and every disk record, as of now (the
 * record count is LMDB's, read outside the store lock; failing that, the disk entries). */
static void verify_plan(kvs_store *st)
{
    kvs_disk_stats ds;
    bool counted = st->disk && kvs_disk_get_stats(st->disk, &ds, NULL) == 0;
    pthread_mutex_lock(&st->mu);
    st->stats.verify_planned += st->lru.count + (counted ? ds.blocks : st->disk_lru.count);
    pthread_mutex_unlock(&st->mu);
}

int kvs_store_verify(kvs_store *st, kvs_store_verify_info *info, kvs_err *err)
{
    memset(info, 0, sizeof *info);
    verify_plan(st);
    int rc = verify_host(st, info, err);
    if (rc == 0 && st->disk) {
        if (info->host_bad) /* their records' removal first: the scan then skips them */
            kvs_store_disk_wait(st);
        rc = verify_disk(st, info, err);
    }
    return rc;
}

/* ---------------------------------------------------------------- flush */

int kvs_store_flush_sync(kvs_store *st, kvs_store_flush_info *info, kvs_err *err)
{
    memset(info, 0, sizeof *info);
    if (!st->writer)
        return kvs_err_set(err, KVS_EINVAL, "flush: this store has no disk tier");
    pthread_mutex_lock(&st->mu);
    size_t n = st->lru.count;
    kvs_block **v = kvs_trymalloc((n ? n : 1) * sizeof *v);
    if (!v) {
        pthread_mutex_unlock(&st->mu);
        return kvs_err_set(err, KVS_ENOMEM, "flush: cannot allocate the list of %zu host blocks",
                           n);
    }
    size_t m = 0;
    for (kvs_lru_node *it = kvs_lru_oldest(&st->lru); it && m < n;
         it = kvs_lru_newer(&st->lru, it)) {
        kvs_block *b = BLOCK_OF_LRU(it);
        if (b->on_disk || b->state == KVS_BLOCK_WRITING || b->state == KVS_BLOCK_SPILLING) {
            info->already++;
            continue;
        }
        if (b->state != KVS_BLOCK_IDLE) { /* being promoted or its record deleted */
            info->failed++;
            continue;
        }
        kvs__block_set_state(b, KVS_BLOCK_WRITING);
        b->refs += 2; /* the writer's (invariant 8), and ours to read the outcome */
        v[m++] = b;
        kvs_writer_copy(st->writer, b, b->size);
    }
    st->stats.flush_queued += m;
    info->gpu_skipped = kvs__store_gpu_blocks_locked(st);
    pthread_mutex_unlock(&st->mu);

    kvs_store_disk_wait(st);
    kvs_block *to_free = NULL;
    pthread_mutex_lock(&st->mu);
    for (size_t i = 0; i < m; i++) {
        kvs_block *b = v[i];
        if (b->on_disk)
            info->written++;
        else
            info->failed++;
        if (kvs__store_unref_locked(st, b)) {
            b->node.next = (kvs_index_node *)to_free;
            to_free = b;
        }
    }
    pthread_mutex_unlock(&st->mu);
    kvs__block_free_chain(to_free);
    free(v);
    int rc = kvs_disk_sync(st->disk, err);
    if (rc)
        kvs_err_prefix(err, "flush: disk tier %s", kvs_disk_path(st->disk));
    return rc;
}

/* ---------------------------------------------------------------- evict */

static bool in_sel(const kvs_store_sel *sel, const kvs_block *b)
{
    return !sel->ns || b->ns == sel->ns;
}

/* The selected block of key i (keys mode), or NULL. */
static kvs_block *sel_key_locked(kvs_store *st, const kvs_store_sel *sel, size_t i)
{
    kvs_index_node *node =
        kvs_index_find(st->index, kvs_ns_id(sel->ns), sel->keys[i].data, sel->keys[i].len);
    return node ? BLOCK_OF_NODE(node) : NULL;
}

typedef struct tier_counts {
    uint64_t gpu, host, disk;
} tier_counts;

static void count_tier(tier_counts *c, kvs_store_tier t)
{
    if (t == KVS_STORE_TIER_GPU)
        c->gpu++;
    else if (t == KVS_STORE_TIER_DISK)
        c->disk++;
    else
        c->host++;
}

static uint64_t count_list(const kvs_lru *l, const kvs_store_sel *sel)
{
    if (!sel->ns)
        return l->count;
    uint64_t n = 0;
    for (kvs_lru_node *it = kvs_lru_oldest(l); it; it = kvs_lru_newer(l, it))
        n += in_sel(sel, BLOCK_OF_LRU(it));
    return n;
}

/* How many selected blocks each tier holds, and the keys not found. */
static void classify(kvs_store *st, const kvs_store_sel *sel, tier_counts *c,
                     kvs_store_evict_info *out)
{
    pthread_mutex_lock(&st->mu);
    if (sel->keys) {
        for (size_t i = 0; i < sel->n; i++) {
            kvs_block *b = sel_key_locked(st, sel, i);
            if (b)
                count_tier(c, b->tier);
            else
                out->absent++;
        }
    } else {
        for (unsigned g = 0; g < st->gpus; g++)
            c->gpu += count_list(&st->gpu[g].lru, sel);
        c->host = count_list(&st->lru, sel);
        c->disk = count_list(&st->disk_lru, sel);
    }
    pthread_mutex_unlock(&st->mu);
}

/* Removes one selected block (target NONE), counting it. */
static void drop_locked(kvs_store *st, kvs_block *b, kvs_block **to_free, kvs_store_evict_info *out)
{
    if (kvs_policy_node_linked(&b->pol)) /* an eviction, for the policy too (its ghost) */
        kvs_policy_evicted(st->policy, &b->pol);
    if (b->tier == KVS_STORE_TIER_HOST)
        st->stats.host_evictions++;
    else if (b->tier == KVS_STORE_TIER_DISK)
        st->stats.disk_evictions++;
    out->dropped++;
    if (kvs__store_forget_locked(st, b)) {
        b->node.next = (kvs_index_node *)*to_free;
        *to_free = b;
    }
}

static void drop_sel(kvs_store *st, const kvs_store_sel *sel, kvs_store_evict_info *out)
{
    kvs_block *to_free = NULL;
    pthread_mutex_lock(&st->mu);
    if (sel->keys) {
        for (size_t i = 0; i < sel->n; i++) {
            kvs_block *b = sel_key_locked(st, sel, i);
            if (b)
                drop_locked(st, b, &to_free, out);
        }
    } else {
        kvs_lru *lists[2 + KVS_STORE_GPUS_MAX] = {&st->lru, &st->disk_lru};
        for (unsigned g = 0; g < st->gpus; g++)
            lists[2 + g] = &st->gpu[g].lru;
        for (unsigned l = 0; l < 2 + st->gpus; l++) {
            kvs_lru_node *it = kvs_lru_oldest(lists[l]);
            while (it) {
                kvs_lru_node *newer = kvs_lru_newer(lists[l], it);
                kvs_block *b = BLOCK_OF_LRU(it);
                if (in_sel(sel, b))
                    drop_locked(st, b, &to_free, out);
                it = newer;
            }
        }
    }
    pthread_mutex_unlock(&st->mu);
    kvs__block_free_chain(to_free);
}

static void pick_locked(kvs_store *st, kvs_block *b, kvs_block **out, size_t *got)
{
    kvs__store_gpu_pick_locked(st, b); /* invariant 6, as kvs_store_gpu_pick */
    out[(*got)++] = b;
}

/* Picks up to max idle selected GPU blocks for demotion, oldest first. */
static size_t pick_sel(kvs_store *st, const kvs_store_sel *sel, kvs_block **out, size_t max)
{
    size_t got = 0;
    pthread_mutex_lock(&st->mu);
    if (sel->keys) {
        for (size_t i = 0; i < sel->n && got < max; i++) {
            kvs_block *b = sel_key_locked(st, sel, i);
            if (b && b->tier == KVS_STORE_TIER_GPU && b->refs == 1 && b->state == KVS_BLOCK_IDLE)
                pick_locked(st, b, out, &got);
        }
    } else {
        for (unsigned g = 0; g < st->gpus; g++)
            for (kvs_lru_node *it = kvs_lru_oldest(&st->gpu[g].lru); it && got < max;
                 it = kvs_lru_newer(&st->gpu[g].lru, it)) {
                kvs_block *b = BLOCK_OF_LRU(it);
                if (in_sel(sel, b) && b->refs == 1 && b->state == KVS_BLOCK_IDLE)
                    pick_locked(st, b, out, &got);
            }
    }
    pthread_mutex_unlock(&st->mu);
    return got;
}

/* Demotes the selected GPU blocks in rounds until a round moves none; returns how many
 * moved. On the way to disk (settle), a round that could not place every block waits for
 * the disk writer, which moves the host tier's victims down meanwhile, and gives up only
 * after three rounds in a row placed nothing. */
static uint64_t gpu_to_host(kvs_store *st, const kvs_store_sel *sel, kvs_store_demote_fn demote,
                            void *arg, bool settle)
{
    uint64_t moved = 0;
    kvs_block *picked[DEMOTE_ROUND];
    size_t n;
    int idle = 0; /* consecutive rounds that moved nothing */
    while (demote && (n = pick_sel(st, sel, picked, DEMOTE_ROUND)) > 0) {
        size_t m = demote(arg, picked, n);
        moved += m;
        /* Demotion never drops a host block to make room (kvs_store_block_alloc_nodrop):
         * blocks it could not place wait for the writer to move host blocks down. */
        if (m < n && settle)
            kvs_store_disk_wait(st);
        idle = m ? 0 : idle + 1;
        if (idle == (settle ? 3 : 1))
            break; /* the host tier is full of busy blocks, or the engine refuses */
    }
    return moved;
}

/* One round of host -> disk: where the round stands. */
typedef struct round {
    kvs_block **mine; /* handed to the writer this round, with our reference */
    size_t m, cap;
    uint64_t room; /* spill budget left this round */
    bool progress;
    kvs_block *to_free;
} round;

/* Moves idle host block b to the disk tier, or queues it; false when this round has no
 * room left for it (it stays for the next round). */
static bool to_disk_locked(kvs_store *st, kvs_block *b, round *r, kvs_store_evict_info *out)
{
    /* Its record is there already: no write (as make_room does), unless the disk tier's
     * codecs would re-encode it (invariant 9): then it is written again below, colder, or,
     * when this round has no room left for it, becomes a disk entry as it is. */
    bool room = r->m < r->cap && (r->m == 0 || b->size <= r->room);
    if (b->on_disk && (!room || kvs__store_record_fits_locked(b))) {
        kvs_policy_evicted(st->policy, &b->pol);
        kvs_block *d = kvs__disk_entry_new(b);
        if (kvs__store_unlink_locked(st, b)) {
            b->node.next = (kvs_index_node *)r->to_free;
            r->to_free = b;
        }
        kvs__store_link_locked(st, d);
        st->stats.disk_spills++;
        st->stats.host_evictions++;
        out->moved++;
        r->progress = true;
        return true;
    }
    /* A lone block over the budget still goes: the round would never start otherwise. */
    if (!room)
        return false;
    kvs_policy_evicted(st->policy, &b->pol); /* linked still, but no candidate (inv. 2) */
    /* Off the host budget, readable until committed (invariant 8). */
    kvs__block_set_state(b, KVS_BLOCK_SPILLING);
    b->charge = KVS_CHARGE_SPILL;
    b->refs += 2; /* the writer's, and ours to read the outcome */
    kvs__store_host_charge_locked(st, b->ns, -(int64_t)kvs__block_host_charge(b));
    st->stats.spill_pending += b->size;
    st->stats.host_evictions++;
    r->room -= b->size < r->room ? b->size : r->room;
    r->mine[r->m++] = b;
    r->progress = true;
    kvs_writer_put(st->writer, b, b->size);
    return true;
}

/* Host -> disk in rounds bounded by the spill budget: each round queues what fits, waits
 * for the writer, and counts what became a disk entry. `limit` bounds the blocks an
 * all-blocks selection moves (those selected at the start, so a steady stream of Puts
 * cannot keep it going). */
static int host_to_disk(kvs_store *st, const kvs_store_sel *sel, uint64_t limit,
                        kvs_store_evict_info *out, kvs_err *err)
{
    round r = {.cap = sel->keys ? sel->n : (size_t)limit};
    if (r.cap == 0)
        return 0;
    r.mine = kvs_trymalloc(r.cap * sizeof *r.mine);
    if (!r.mine)
        return kvs_err_set(err, KVS_ENOMEM, "evict: cannot allocate the list of %zu blocks", r.cap);
    size_t pos = 0;    /* keys: the next one */
    uint64_t done = 0; /* all blocks: how many were taken */
    for (;;) {
        r.m = 0;
        r.progress = false;
        r.to_free = NULL;
        pthread_mutex_lock(&st->mu);
        r.room =
            st->spill_max > st->stats.spill_pending ? st->spill_max - st->stats.spill_pending : 0;
        if (sel->keys) {
            for (; pos < sel->n; pos++) {
                kvs_block *b = sel_key_locked(st, sel, pos);
                if (!b || b->tier != KVS_STORE_TIER_HOST)
                    continue; /* counted by classify */
                if (b->refs != 1) {
                    out->busy++;
                    continue;
                }
                if (!to_disk_locked(st, b, &r, out))
                    break;
            }
        } else {
            kvs_lru_node *it = kvs_lru_oldest(&st->lru);
            while (it && done < limit) {
                kvs_lru_node *newer = kvs_lru_newer(&st->lru, it);
                kvs_block *b = BLOCK_OF_LRU(it);
                it = newer;
                if (!in_sel(sel, b) || b->refs != 1)
                    continue;
                if (!to_disk_locked(st, b, &r, out))
                    break;
                done++;
            }
        }
        pthread_mutex_unlock(&st->mu);
        kvs__block_free_chain(r.to_free);
        r.to_free = NULL;
        if (r.m) {
            kvs_store_disk_wait(st);
            pthread_mutex_lock(&st->mu);
            for (size_t i = 0; i < r.m; i++) {
                kvs_block *b = r.mine[i];
                kvs_index_node *node =
                    kvs_index_find(st->index, b->node.ns_id, b->node.key, b->node.key_len);
                if (!kvs__block_linked(b) && node &&
                    BLOCK_OF_NODE(node)->tier == KVS_STORE_TIER_DISK)
                    out->moved++;
                else
                    out->failed++;
                if (kvs__store_unref_locked(st, b)) {
                    b->node.next = (kvs_index_node *)r.to_free;
                    r.to_free = b;
                }
            }
            pthread_mutex_unlock(&st->mu);
            kvs__block_free_chain(r.to_free);
        }
        if (!r.progress || (sel->keys && pos >= sel->n))
            break;
    }
    if (!sel->keys) { /* what is left of the selection in the host tier was busy */
        pthread_mutex_lock(&st->mu);
        for (kvs_lru_node *it = kvs_lru_oldest(&st->lru); it; it = kvs_lru_newer(&st->lru, it)) {
            kvs_block *b = BLOCK_OF_LRU(it);
            out->busy += in_sel(sel, b) && b->refs != 1;
        }
        pthread_mutex_unlock(&st->mu);
    }
    free(r.mine);
    return 0;
}

int kvs_store_evict(kvs_store *st, const kvs_store_sel *sel, kvs_store_tier to,
                    kvs_store_demote_fn demote, void *demote_arg, kvs_store_evict_info *info,
                    kvs_err *err)
{
    memset(info, 0, sizeof *info);
    if (to != KVS_STORE_TIER_NONE && to != KVS_STORE_TIER_HOST && to != KVS_STORE_TIER_DISK)
        return kvs_err_set(err, KVS_EINVAL,
                           "to: blocks move down to the host or disk tier, or "
                           "out (tier %d given)",
                           (int)to);
    if (to == KVS_STORE_TIER_DISK && !st->writer)
        return kvs_err_set(err, KVS_EINVAL, "to: this store has no disk tier");
    if (sel->keys && !sel->ns)
        return kvs_err_set(err, KVS_EINVAL, "keys: given without a namespace");
    tier_counts c = {0};
    classify(st, sel, &c, info);
    if (to == KVS_STORE_TIER_NONE) {
        drop_sel(st, sel, info);
        return 0;
    }
    uint64_t gpu_moved =
        c.gpu ? gpu_to_host(st, sel, demote, demote_arg, to == KVS_STORE_TIER_DISK) : 0;
    info->busy = c.gpu > gpu_moved ? c.gpu - gpu_moved : 0; /* left on the GPU */
    if (to == KVS_STORE_TIER_HOST) {
        info->moved = gpu_moved;
        info->unchanged = c.host + c.disk;
        return 0;
    }
    info->unchanged = c.disk;
    return host_to_disk(st, sel, c.host + gpu_moved, info, err);
}

/* ---------------------------------------------------------------- host tier at run time */

void kvs__store_host_marks_locked(kvs_store *st)
{
    uint64_t cap = st->stats.host_capacity;
    unsigned hi = st->host_high_pct > 100 ? 100 : st->host_high_pct;
    unsigned lo = st->host_low_pct > hi ? hi : st->host_low_pct;
    st->host_high = cap / 100 * hi;
    st->host_low = cap / 100 * lo;
}

int kvs_store_set_host(kvs_store *st, uint64_t capacity, kvs_policy_kind eviction,
                       uint64_t *evicted, kvs_err *err)
{
    if (capacity == 0)
        return kvs_err_set(err, KVS_EINVAL, "host_capacity: must be > 0");
    /* Built before the lock: its ghost table is sized from the capacity (policy.h). */
    kvs_policy_opts popts = {.small_percent = st->eviction_small_pct};
    kvs_policy *np = NULL;
    int rc = kvs_policy_create(eviction, capacity, &popts, &np, err);
    if (rc)
        return kvs_err_prefix(err, "eviction: host tier policy");
    kvs_block *to_free = NULL;
    pthread_mutex_lock(&st->mu);
    uint64_t before = st->stats.host_evictions;
    /* Oldest first, so the new policy's queues start in the tier's recency order. Blocks
     * that are not in the old policy (SPILLING, invariant 2) stay out of the new one. */
    for (kvs_lru_node *it = kvs_lru_oldest(&st->lru); it; it = kvs_lru_newer(&st->lru, it)) {
        kvs_block *b = KVS__BLOCK_OF_LRU(it);
        if (!kvs_policy_node_linked(&b->pol))
            continue;
        kvs_policy_remove(st->policy, &b->pol);
        /* Fails only for a linked node or 0 bytes: neither here (as kvs__store_link_locked). */
        int prc = kvs_policy_insert(np, &b->pol, b->node.hash, b->size ? b->size : 1, NULL);
        assert(prc == 0);
        (void)prc;
    }
    kvs_policy *old = st->policy;
    st->policy = np;
    st->stats.host_capacity = capacity;
    kvs__store_host_marks_locked(st);
    if (st->stats.host_used > capacity)
        kvs__store_evict_until_locked(st, NULL, capacity, true, &to_free);
    uint64_t n = st->stats.host_evictions - before;
    pthread_mutex_unlock(&st->mu);
    kvs__block_free_chain(to_free);
    kvs_policy_destroy(old); /* no node is linked in it any more */
    if (st->writer)
        kvs_writer_kick(st->writer); /* the new high watermark may be passed already */
    if (evicted)
        *evicted = n;
    return 0;
}
