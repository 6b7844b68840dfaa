/* The store's GPU tier (store.h: "Tiers", invariants 5 and 6): slots for blocks, the picks
 * and commits of demotion to the host tier (storage/tiering drives them), and promotion of
 * host blocks to it. Split from store.c; it shares store_int.h's structures and helpers.
 *
 * GPU quotas (store.h "Quotas"): a namespace's gpu_bytes never passes its gpu quota (a slot
 * that would take it over is refused, and the Put lands in the host tier, as when the tier
 * is full), and the quota has watermarks of the tier's own shares: above gpu_high_pct of it,
 * demotion rounds pick the namespace's own least recently used idle blocks, down to
 * gpu_low_pct of it, before (and regardless of) the tier's own watermarks. So a namespace at
 * its quota makes room among its own blocks, never another's, and through the same path
 * (kvs_store_gpu_pick, then the engine's fetch, then kvs_store_demote_commit) as the tier.
 *
 * Several devices: one tier per device (st->gpu[g]: slots, LRU, watermarks, picked bytes),
 * a block in one of them (blk->gpu). Every tier verb names its device; a namespace's quota
 * counts its blocks on every device, and a device over it demotes the namespace's blocks
 * it holds. Placement of bytes that are on no device yet (kvs_store_gpu_choose) takes the
 * device with the most free bytes, so Puts from host memory spread evenly.
 */
#include <pthread.h>
#include <stdlib.h>

#include "storage/store_int.h"

/* pct percent of a quota, without overflow for any quota. */
static uint64_t share(uint64_t quota, unsigned pct)
{
    return quota / 100 * pct + quota % 100 * pct / 100;
}

/* True while ns holds more of its gpu quota, less its blocks being demoted, than `pct`
 * percent of it (false without a quota). */
static bool ns_over_locked(kvs_ns *ns, unsigned pct)
{
    uint64_t quota = kvs_ns_spec_of(ns)->gpu_quota;
    const kvs_ns_usage *u = kvs_ns_usage_of(ns);
    return quota && u->gpu_bytes - u->gpu_picked > share(quota, pct);
}

/* True if some namespace is over its quota's high watermark. O(namespaces). */
static bool any_ns_over_locked(kvs_store *st)
{
    size_t n = kvs_ns_registry_count(st->reg);
    for (size_t i = 0; i < n; i++)
        if (ns_over_locked(kvs_ns_registry_at(st->reg, i), st->gpu_high_pct))
            return true;
    return false;
}

void kvs__store_gpu_pick_locked(kvs_store *st, kvs_block *b)
{
    kvs__block_set_state(b, KVS_BLOCK_DEMOTING);
    b->refs++;
    st->gpu[b->gpu].picked += b->slot_bytes;
    kvs_ns_usage_of(b->ns)->gpu_picked += b->slot_bytes;
}

void kvs__store_gpu_unpick_locked(kvs_store *st, kvs_block *b)
{
    st->gpu[b->gpu].picked -= b->slot_bytes;
    kvs_ns_usage_of(b->ns)->gpu_picked -= b->slot_bytes;
}

/* A namespace's slots of one encoding share a size class (storage/slots.h): a block
 * promoted with colder codecs (invariant 9) has a smaller slot than a Put's. */
static uint64_t slot_class(const kvs_ns *ns, unsigned enc)
{
    return (uint64_t)enc << 32 | kvs_ns_id(ns);
}

int kvs_store_block_alloc_gpu(kvs_store *st, unsigned gpu, kvs_ns *ns, uint32_t tokens,
                              unsigned enc, uint64_t slot_bytes, kvs_block **out, kvs_err *err)
{
    if (gpu >= st->gpus)
        return kvs_err_set(err, KVS_ENOSPC, "gpu tier: none on device %u (%u configured)", gpu,
                           st->gpus);
    uint32_t L = kvs_ns_spec_of(ns)->layers;
    kvs_block *blk = calloc(1, sizeof *blk);
    uint32_t *lens = blk ? calloc(2 * (size_t)L, sizeof *lens) : NULL;
    if (!lens) {
        free(blk);
        return kvs_err_set(err, KVS_ENOMEM, "gpu tier: out of memory");
    }
    uintptr_t addr = 0;
    uint64_t quota = kvs_ns_spec_of(ns)->gpu_quota;
    int rc = 0;
    pthread_mutex_lock(&st->mu);
    uint64_t held = kvs_ns_usage_of(ns)->gpu_bytes;
    if (quota && held + slot_bytes > quota) /* the caller goes to the host tier instead */
        rc = kvs_err_set(err, KVS_ENOSPC,
                         "gpu_quota_bytes: namespace '%s' holds %llu bytes of its gpu quota of "
                         "%llu, no room for a slot of %llu more (its own blocks are demoted)",
                         kvs_ns_spec_of(ns)->name, (unsigned long long)held,
                         (unsigned long long)quota, (unsigned long long)slot_bytes);
    else if ((rc = kvs_slots_alloc(st->gpu[gpu].slots, slot_class(ns, enc), slot_bytes, &addr,
                                   err)) == 0)
        kvs__store_gpu_charge_locked(st, gpu, ns, (int64_t)slot_bytes);
    pthread_mutex_unlock(&st->mu);
    if (rc) {
        free(lens);
        free(blk);
        return rc;
    }
    blk->ns = kvs_ns_ref(ns);
    blk->tokens = tokens;
    blk->enc = (uint8_t)enc;
    blk->tier = KVS_STORE_TIER_GPU;
    blk->gpu = (uint8_t)gpu;
    blk->charge = KVS_CHARGE_GPU;
    blk->slot_bytes = slot_bytes;
    blk->size = blk->raw_bytes = slot_bytes;
    blk->dev = (kvs_block_dev){.slot = (void *)addr, .lens = lens};
    *out = blk;
    return 0;
}

kvs_block_dev *kvs_block_device(kvs_block *blk)
{
    return blk->tier == KVS_STORE_TIER_GPU ? &blk->dev : NULL;
}

unsigned kvs_block_gpu(const kvs_block *blk)
{
    return blk->tier == KVS_STORE_TIER_GPU ? blk->gpu : 0;
}

int kvs_store_gpu_choose(kvs_store *st, const kvs_ns *ns, uint64_t slot_bytes)
{
    int best = -1;
    uint64_t best_room = 0;
    pthread_mutex_lock(&st->mu);
    /* Room up to the tier's capacity, as a Put on one device has (it fills the tier and
     * kicks demotion when it finds it full): the watermarks are demotion's business. */
    for (unsigned g = 0; g < st->gpus; g++) {
        const kvs__gpu_tier *t = &st->gpu[g];
        uint64_t room = t->s.capacity > t->s.used ? t->s.capacity - t->s.used : 0;
        if (room >= slot_bytes && room > best_room &&
            kvs_slots_can_alloc(t->slots, slot_class(ns, 0), slot_bytes)) {
            best = (int)g;
            best_room = room;
        }
    }
    pthread_mutex_unlock(&st->mu);
    return best;
}

/* ---------------------------------------------------------------- gpu tier demotion */

bool kvs_store_gpu_over_high(kvs_store *st, unsigned gpu)
{
    if (gpu >= st->gpus)
        return false;
    const kvs__gpu_tier *t = &st->gpu[gpu];
    pthread_mutex_lock(&st->mu);
    bool over = t->s.used - t->picked > t->high || any_ns_over_locked(st);
    pthread_mutex_unlock(&st->mu);
    return over;
}

/* Picks ns's own idle blocks (every namespace's with ns NULL) of tier t, least recently
 * used first, into out[*n..max) while `more` says so. */
static void pick_locked(kvs_store *st, kvs__gpu_tier *t, kvs_ns *ns, kvs_block **out, size_t *n,
                        size_t max, bool (*more)(kvs_store *st, kvs__gpu_tier *t, kvs_ns *ns))
{
    for (kvs_lru_node *it = kvs_lru_oldest(&t->lru); it && *n < max && more(st, t, ns);
         it = kvs_lru_newer(&t->lru, it)) {
        kvs_block *blk = KVS__BLOCK_OF_LRU(it);
        if (blk->refs != 1 || blk->state != KVS_BLOCK_IDLE) /* busy (inv. 3) or picked */
            continue;
        if (ns && blk->ns != ns)
            continue;
        kvs__store_gpu_pick_locked(st, blk);
        out[(*n)++] = blk;
    }
}

static bool ns_above_low(kvs_store *st, kvs__gpu_tier *t, kvs_ns *ns)
{
    (void)t;
    return ns_over_locked(ns, st->gpu_low_pct);
}

static bool tier_above_low(kvs_store *st, kvs__gpu_tier *t, kvs_ns *ns)
{
    (void)st;
    (void)ns;
    return t->s.used - t->picked > t->low; /* in flight counts as done */
}

size_t kvs_store_gpu_pick(kvs_store *st, unsigned gpu, kvs_block **out, size_t max)
{
    size_t n = 0;
    if (gpu >= st->gpus)
        return 0;
    kvs__gpu_tier *t = &st->gpu[gpu];
    pthread_mutex_lock(&st->mu);
    /* A namespace over its quota's high mark demotes its own blocks, down to its low mark
     * (O(gpu blocks) per such namespace); then, only when the tier itself is over its high
     * mark, its least recently used blocks go, whoever's, down to gpu_low (the tier's own
     * shortage, the one case where a namespace's blocks leave for another's). */
    size_t nns = kvs_ns_registry_count(st->reg);
    for (size_t i = 0; i < nns && n < max; i++) {
        kvs_ns *ns = kvs_ns_registry_at(st->reg, i);
        if (ns_over_locked(ns, st->gpu_high_pct))
            pick_locked(st, t, ns, out, &n, max, ns_above_low);
    }
    if (t->s.used - t->picked > t->high)
        pick_locked(st, t, NULL, out, &n, max, tier_above_low);
    pthread_mutex_unlock(&st->mu);
    return n;
}

void kvs_store_demote_cancel(kvs_store *st, kvs_block *old)
{
    pthread_mutex_lock(&st->mu);
    if (old->state == KVS_BLOCK_DEMOTING) /* else removed meanwhile */
        kvs__block_set_state(old, KVS_BLOCK_IDLE);
    kvs__store_gpu_unpick_locked(st, old);
    bool free_old = kvs__store_unref_locked(st, old);
    pthread_mutex_unlock(&st->mu);
    if (free_old)
        kvs__block_free(old);
}

void kvs_store_demote_commit(kvs_store *st, kvs_block *old, kvs_block *nb)
{
    if (nb->shrink && !nb->pool) {
        unsigned char *smaller = realloc(nb->data, nb->size ? nb->size : 1);
        if (smaller)
            nb->data = smaller;
    }
    nb->node = old->node; /* same identity; index links are rewritten by the insert */
    pthread_mutex_lock(&st->mu);
    bool swap = old->state == KVS_BLOCK_DEMOTING && !kvs_ns_dropped(old->ns);
    bool free_old = false, free_nb = false;
    if (swap) {
        nb->on_disk = old->on_disk; /* a promoted block kept its disk record (invariant 7) */
        if (nb->enc != old->enc) {  /* re-encoded colder on the way (invariant 9) */
            st->stats.host_recoded++;
            st->stats.host_recode_saved += old->size > nb->size ? old->size - nb->size : 0;
            /* A block with a record came from the host or disk tier, so is no hotter than
             * the host tier's codecs already; should one be re-encoded all the same, its
             * record no longer holds its bytes: it goes (invariant 7 counts nb's size). */
            if (nb->on_disk && st->writer) {
                old->on_disk = false; /* its record's bytes leave the tier and its namespace */
                kvs__store_disk_record_locked(st, old, false);
                kvs_writer_del(st->writer, old->node.ns_id, old->node.key, old->node.key_len);
            }
            nb->on_disk = false;
        }
        free_old = kvs__store_unlink_locked(st, old);
        kvs__store_host_charge_locked(st, nb->ns, -(int64_t)nb->shrink);
        nb->shrink = 0;
        kvs__store_link_locked(st, nb);
        st->gpu[old->gpu].s.demotions++;
    } else { /* deleted, replaced or dropped meanwhile: the copy is not needed */
        kvs__store_give_back_locked(st, nb);
        free_nb = true;
    }
    if (old->state == KVS_BLOCK_DEMOTING) /* not swapped: it stays where it is */
        kvs__block_set_state(old, KVS_BLOCK_IDLE);
    kvs__store_gpu_unpick_locked(st, old);
    if (!free_old)
        free_old = kvs__store_unref_locked(st, old);
    pthread_mutex_unlock(&st->mu);
    if (free_old)
        kvs__block_free(old);
    if (free_nb)
        kvs__block_free(nb);
}

/* ---------------------------------------------------------------- promotion to the gpu tier */

bool kvs_store_promote_begin(kvs_store *st, unsigned gpu, kvs_block *blk, uint64_t slot_bytes,
                             kvs_block **out)
{
    if (gpu >= st->gpus || !st->promote || blk->tier != KVS_STORE_TIER_HOST)
        return false;
    const kvs__gpu_tier *t = &st->gpu[gpu];
    /* Below the high marks, the tier's and the namespace's quota's: a promotion never
     * causes a demotion. */
    uint64_t quota = kvs_ns_spec_of(blk->ns)->gpu_quota;
    pthread_mutex_lock(&st->mu);
    bool ok = blk->state == KVS_BLOCK_IDLE && t->s.used + slot_bytes <= t->high &&
              (!quota || kvs_ns_usage_of(blk->ns)->gpu_bytes + slot_bytes <=
                             share(quota, st->gpu_high_pct)) &&
              kvs_slots_can_alloc(t->slots, slot_class(blk->ns, blk->enc), slot_bytes);
    if (ok) {
        kvs__block_set_state(blk, KVS_BLOCK_PROMOTING);
        blk->refs++;
    }
    pthread_mutex_unlock(&st->mu);
    if (!ok)
        return false;
    kvs_block *g;
    if (kvs_store_block_alloc_gpu(st, gpu, blk->ns, blk->tokens, blk->enc, slot_bytes, &g, NULL)) {
        kvs_store_promote_cancel(st, blk, NULL); /* taken meanwhile */
        return false;
    }
    g->size = blk->size; /* the framed size, as a Put into the gpu tier records it */
    g->raw_bytes = blk->raw_bytes;
    *out = g;
    return true;
}

void kvs_store_promote_commit(kvs_store *st, kvs_block *old, kvs_block *g)
{
    g->node = old->node; /* same identity; index links are rewritten by the insert */
    pthread_mutex_lock(&st->mu);
    bool swap = old->state == KVS_BLOCK_PROMOTING && !kvs_ns_dropped(old->ns);
    bool free_old = false, free_g = false;
    if (swap) {
        /* The disk record, if any, stays with the block (invariant 7). */
        g->on_disk = old->on_disk;
        free_old = kvs__store_unlink_locked(st, old);
        kvs__store_link_locked(st, g);
        st->gpu[g->gpu].s.promotions++;
    } else { /* deleted, replaced, dropped or spilled meanwhile: the copy is not needed */
        kvs__store_give_back_locked(st, g);
        free_g = true;
    }
    if (old->state == KVS_BLOCK_PROMOTING)
        kvs__block_set_state(old, KVS_BLOCK_IDLE);
    if (!free_old)
        free_old = kvs__store_unref_locked(st, old);
    pthread_mutex_unlock(&st->mu);
    if (free_old)
        kvs__block_free(old);
    if (free_g)
        kvs__block_free(g);
}

void kvs_store_promote_cancel(kvs_store *st, kvs_block *old, kvs_block *g)
{
    if (g)
        kvs_store_block_abort(st, g);
    pthread_mutex_lock(&st->mu);
    if (old->state == KVS_BLOCK_PROMOTING) /* else removed meanwhile */
        kvs__block_set_state(old, KVS_BLOCK_IDLE);
    bool free_old = kvs__store_unref_locked(st, old);
    pthread_mutex_unlock(&st->mu);
    if (free_old)
        kvs__block_free(old);
}
