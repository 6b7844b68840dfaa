/* The store's GPU tier (store.h: "Tiers", invariants 5 and 6): slots for blocks, the picks
 * and commits of demotion to the host tier (storage/tiering drives them), and promotion of
 * host blocks to it. Split from store.c; it shares store_int.h's structures and helpers.
 */
#include <pthread.h>
#include <stdlib.h>

#include "storage/store_int.h"

/* A namespace's slots of one encoding share a size class (storage/slots.h): a block
 * promoted with colder codecs (invariant 9) has a smaller slot than a Put's. */
static uint64_t slot_class(const kvs_ns *ns, unsigned enc)
{
    return (uint64_t)enc << 32 | kvs_ns_id(ns);
}

int kvs_store_block_alloc_gpu(kvs_store *st, kvs_ns *ns, uint32_t tokens, unsigned enc,
                              uint64_t slot_bytes, kvs_block **out, kvs_err *err)
{
    if (!st->gpu)
        return kvs_err_set(err, KVS_ENOSPC, "gpu tier: not configured");
    uint32_t L = kvs_ns_spec_of(ns)->layers;
    kvs_block *blk = calloc(1, sizeof *blk);
    uint32_t *lens = blk ? calloc(2 * (size_t)L, sizeof *lens) : NULL;
    if (!lens) {
        free(blk);
        return kvs_err_set(err, KVS_ENOMEM, "gpu tier: out of memory");
    }
    uintptr_t addr = 0;
    pthread_mutex_lock(&st->mu);
    int rc = kvs_slots_alloc(st->gpu, slot_class(ns, enc), slot_bytes, &addr, err);
    if (rc == 0)
        st->stats.gpu_used = kvs_slots_used(st->gpu);
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

/* ---------------------------------------------------------------- gpu tier demotion */

bool kvs_store_gpu_over_high(kvs_store *st)
{
    if (!st->gpu)
        return false;
    pthread_mutex_lock(&st->mu);
    bool over = st->stats.gpu_used - st->gpu_picked > st->gpu_high;
    pthread_mutex_unlock(&st->mu);
    return over;
}

size_t kvs_store_gpu_pick(kvs_store *st, kvs_block **out, size_t max)
{
    size_t n = 0;
    if (!st->gpu)
        return 0;
    pthread_mutex_lock(&st->mu);
    uint64_t left = st->stats.gpu_used - st->gpu_picked; /* demotions in flight count as done */
    for (kvs_lru_node *it = kvs_lru_oldest(&st->gpu_lru); it && n < max && left > st->gpu_low;
         it = kvs_lru_newer(&st->gpu_lru, it)) {
        kvs_block *blk = KVS__BLOCK_OF_LRU(it);
        if (blk->refs != 1 || blk->state != KVS_BLOCK_IDLE) /* busy (inv. 3) or picked */
            continue;
        kvs__block_set_state(blk, KVS_BLOCK_DEMOTING);
        blk->refs++;
        left -= blk->slot_bytes;
        st->gpu_picked += blk->slot_bytes;
        out[n++] = blk;
    }
    pthread_mutex_unlock(&st->mu);
    return n;
}

void kvs_store_demote_cancel(kvs_store *st, kvs_block *old)
{
    pthread_mutex_lock(&st->mu);
    if (old->state == KVS_BLOCK_DEMOTING) /* else removed meanwhile */
        kvs__block_set_state(old, KVS_BLOCK_IDLE);
    st->gpu_picked -= old->slot_bytes;
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
                old->on_disk = false;
                st->stats.disk_used -= old->size;
                kvs_writer_del(st->writer, old->node.ns_id, old->node.key, old->node.key_len);
            }
            nb->on_disk = false;
        }
        free_old = kvs__store_unlink_locked(st, old);
        kvs__store_host_charge_locked(st, nb->ns, -(int64_t)nb->shrink);
        nb->shrink = 0;
        kvs__store_link_locked(st, nb);
        st->stats.gpu_demotions++;
    } else { /* deleted, replaced or dropped meanwhile: the copy is not needed */
        kvs__store_give_back_locked(st, nb);
        free_nb = true;
    }
    if (old->state == KVS_BLOCK_DEMOTING) /* not swapped: it stays where it is */
        kvs__block_set_state(old, KVS_BLOCK_IDLE);
    st->gpu_picked -= old->slot_bytes;
    if (!free_old)
        free_old = kvs__store_unref_locked(st, old);
    pthread_mutex_unlock(&st->mu);
    if (free_old)
        kvs__block_free(old);
    if (free_nb)
        kvs__block_free(nb);
}

/* ---------------------------------------------------------------- promotion to the gpu tier */

bool kvs_store_promote_begin(kvs_store *st, kvs_block *blk, uint64_t slot_bytes, kvs_block **out)
{
    if (!st->gpu || !st->promote || blk->tier != KVS_STORE_TIER_HOST)
        return false;
    pthread_mutex_lock(&st->mu);
    bool ok = blk->state == KVS_BLOCK_IDLE && st->stats.gpu_used + slot_bytes <= st->gpu_high &&
              kvs_slots_can_alloc(st->gpu, slot_class(blk->ns, blk->enc), slot_bytes);
    if (ok) {
        kvs__block_set_state(blk, KVS_BLOCK_PROMOTING);
        blk->refs++;
    }
    pthread_mutex_unlock(&st->mu);
    if (!ok)
        return false;
    kvs_block *g;
    if (kvs_store_block_alloc_gpu(st, blk->ns, blk->tokens, blk->enc, slot_bytes, &g, NULL)) {
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
        st->stats.gpu_promotions++;
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
