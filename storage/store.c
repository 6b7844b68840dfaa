/* The store: see store.h for the block lifecycle, invariants and locking. */
#include "storage/store.h"

#include <assert.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/base/mem.h"
#include "gpu/codec/format.h"
#include "gpu/engine/engine.h"
#include "gpu/codec/learn.h"
#include "storage/writer.h"
#include "storage/store_int.h"

#define BLOCK_OF_NODE KVS__BLOCK_OF_NODE
#define BLOCK_OF_LRU KVS__BLOCK_OF_LRU
#define BLOCK_OF_POL KVS__BLOCK_OF_POL

void kvs__store_log(kvs_store *st, kvs_log_level lvl, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    kvs_vlogf(st->log, st->log_ctx, lvl, fmt, ap);
    va_end(ap);
}

/* The transitions of store.h's diagram: allowed[from][to]. */
static const bool allowed[KVS_BLOCK_STATES][KVS_BLOCK_STATES] = {
    [KVS_BLOCK_FILLING] = {[KVS_BLOCK_IDLE] = true, [KVS_BLOCK_WRITING] = true},
    [KVS_BLOCK_IDLE] = {[KVS_BLOCK_WRITING] = true,
                        [KVS_BLOCK_SPILLING] = true,
                        [KVS_BLOCK_PROMOTING] = true,
                        [KVS_BLOCK_DEMOTING] = true,
                        [KVS_BLOCK_UNRECORDING] = true,
                        [KVS_BLOCK_UNLINKED] = true},
    [KVS_BLOCK_WRITING] = {[KVS_BLOCK_IDLE] = true, [KVS_BLOCK_UNLINKED] = true},
    [KVS_BLOCK_SPILLING] = {[KVS_BLOCK_UNLINKED] = true},
    [KVS_BLOCK_PROMOTING] = {[KVS_BLOCK_IDLE] = true, [KVS_BLOCK_UNLINKED] = true},
    [KVS_BLOCK_DEMOTING] = {[KVS_BLOCK_IDLE] = true, [KVS_BLOCK_UNLINKED] = true},
    [KVS_BLOCK_UNRECORDING] = {[KVS_BLOCK_IDLE] = true, [KVS_BLOCK_UNLINKED] = true},
};

void kvs__block_set_state(kvs_block *b, kvs_block_state to)
{
    assert(allowed[b->state][to]);
    (void)allowed; /* without assertions (NDEBUG) the table is only documentation */
    b->state = to;
}

void kvs__block_free(kvs_block *blk)
{
    kvs_ns_unref(blk->ns);
    if (blk->pool)
        kvs_hostpool_free(blk->pool, blk->data);
    else
        free(blk->data);
    free(blk->dev.lens);
    free(blk);
}

static kvs_lru *lru_of(kvs_store *st, const kvs_block *blk)
{
    return blk->tier == KVS_STORE_TIER_GPU    ? &st->gpu[blk->gpu].lru
           : blk->tier == KVS_STORE_TIER_DISK ? &st->disk_lru
                                              : &st->lru;
}

kvs_block *kvs__disk_entry_new(const kvs_block *blk)
{
    kvs_block *d = kvs_xcalloc(1, sizeof *d);
    d->node = blk->node;
    d->ns = kvs_ns_ref(blk->ns);
    d->enc = blk->enc;
    d->tokens = blk->tokens;
    d->size = blk->size;
    d->raw_bytes = blk->raw_bytes;
    d->tier = KVS_STORE_TIER_DISK;
    d->on_disk = true;
    return d;
}

/* Reports a change of the index to the sink (store.h "Events"), under st->mu. A block of a
 * dropped namespace says nothing: kvs_store_ns_drop reports the namespace once instead. */
static void event_locked(kvs_store *st, kvs_store_event_kind kind, const kvs_block *blk)
{
    if (!st->on_event || kvs_ns_dropped(blk->ns))
        return;
    const kvs_ns_spec *sp = kvs_ns_spec_of(blk->ns);
    kvs_store_event ev = {.kind = kind,
                          .tier = blk->tier,
                          .ns = sp->name,
                          .block_tokens = sp->block_tokens,
                          .key = blk->node.key,
                          .key_len = blk->node.key_len};
    st->on_event(st->event_ctx, &ev);
}

/* Unlinks a block that leaves the store for good (delete, replace) and queues the
 * removal of its disk record, if it has one or one is being written (invariant 8). */
static bool forget_locked(kvs_store *st, kvs_block *blk)
{
    if (st->writer &&
        (blk->on_disk || blk->state == KVS_BLOCK_WRITING || blk->state == KVS_BLOCK_SPILLING))
        kvs_writer_del(st->writer, blk->node.ns_id, blk->node.key, blk->node.key_len);
    return kvs__store_unlink_locked(st, blk);
}

bool kvs__store_forget_locked(kvs_store *st, kvs_block *blk)
{
    return forget_locked(st, blk);
}

void kvs__store_host_charge_locked(kvs_store *st, kvs_ns *ns, int64_t delta)
{
    st->stats.host_used += (uint64_t)delta;
    kvs_ns_usage_of(ns)->host_bytes += (uint64_t)delta;
}

void kvs__store_gpu_charge_locked(kvs_store *st, unsigned g, kvs_ns *ns, int64_t delta)
{
    st->gpu[g].s.used = kvs_slots_used(st->gpu[g].slots);
    kvs_ns_usage_of(ns)->gpu_bytes += (uint64_t)delta;
}

void kvs__store_disk_record_locked(kvs_store *st, const kvs_block *b, bool add)
{
    uint64_t delta = add ? b->size : (uint64_t)0 - b->size; /* modular: a subtraction */
    st->stats.disk_used += delta;
    st->stats.disk_records += add ? 1 : (uint64_t)-1;
    kvs_ns_usage_of(b->ns)->disk_bytes += delta;
}

/* Returns a block's capacity to its tier (its last reference is gone, or it was never
 * committed). */
void kvs__store_give_back_locked(kvs_store *st, kvs_block *blk)
{
    switch (blk->charge) {
    case KVS_CHARGE_GPU:
        kvs_slots_free(st->gpu[blk->gpu].slots, (uintptr_t)blk->dev.slot);
        kvs__store_gpu_charge_locked(st, blk->gpu, blk->ns, -(int64_t)blk->slot_bytes);
        break;
    case KVS_CHARGE_SPILL:
        st->stats.spill_pending -= blk->size;
        break;
    case KVS_CHARGE_HOST:
        kvs__store_host_charge_locked(st, blk->ns, -(int64_t)kvs__block_host_charge(blk));
        break;
    case KVS_CHARGE_NONE:
        break; /* disk entries and transient reads (invariant 7) */
    }
    blk->charge = KVS_CHARGE_NONE;
}

/* Drops one reference; on the last, gives the capacity back and returns true (the
 * caller frees the block outside the lock). */
bool kvs__store_unref_locked(kvs_store *st, kvs_block *blk)
{
    if (--blk->refs)
        return false;
    kvs__store_give_back_locked(st, blk);
    return true;
}

/* Unlinks a LINKED block from index and LRU, fixes the counters and drops the index's
 * reference; frees it if no reader holds it. Returns true if it was freed now. */
bool kvs__store_unlink_locked(kvs_store *st, kvs_block *blk)
{
    kvs_index_remove(st->index, &blk->node);
    kvs_lru_remove(lru_of(st, blk), &blk->lru);
    if (kvs_policy_node_linked(&blk->pol))
        kvs_policy_remove(st->policy, &blk->pol);
    kvs__block_set_state(blk, KVS_BLOCK_UNLINKED);
    event_locked(st, KVS_STORE_EV_REMOVED, blk);
    kvs_ns_usage *u = kvs_ns_usage_of(blk->ns);
    u->blocks--;
    u->stored_bytes -= blk->size;
    u->raw_bytes -= blk->raw_bytes;
    u->tokens -= blk->tokens;
    if (blk->tier == KVS_STORE_TIER_GPU)
        st->gpu[blk->gpu].s.blocks--;
    else if (blk->tier == KVS_STORE_TIER_DISK)
        st->stats.disk_blocks--;
    else
        st->stats.host_blocks--;
    if (blk->on_disk)
        kvs__store_disk_record_locked(st, blk, false);
    return kvs__store_unref_locked(st, blk);
}

void kvs_store_destroy(kvs_store *st)
{
    if (!st)
        return;
    /* Letting go of every block is no eviction: a subscriber learns of the shutdown from
     * the daemon, not from a REMOVED per block. */
    st->on_event = NULL;
    kvs_writer_destroy(st->writer); /* applies what is queued: drops its references */
    kvs_lru *lists[2 + KVS_STORE_GPUS_MAX] = {&st->lru, &st->disk_lru};
    for (unsigned g = 0; g < st->gpus; g++)
        lists[2 + g] = &st->gpu[g].lru;
    for (unsigned i = 0; i < 2 + st->gpus; i++) {
        kvs_lru_node *n;
        while ((n = kvs_lru_oldest(lists[i])) != NULL) {
            kvs_block *blk = BLOCK_OF_LRU(n);
            if (kvs__store_unlink_locked(st, blk))
                kvs__block_free(blk);
        }
    }
    kvs_policy_destroy(st->policy); /* after the unlinks above: they leave it */
    for (unsigned g = 0; g < st->gpus; g++)
        kvs_slots_destroy(st->gpu[g].slots);
    kvs_index_destroy(st->index);
    kvs_ns_registry_destroy(st->reg);
    pthread_mutex_destroy(&st->mu);
    free(st);
}

/* ---------------------------------------------------------------- namespaces */

void kvs__store_codec_prepare(kvs_store *st, kvs_codec *c)
{
    /* Each engine uploads its device's tables (KVS_ENOTSUP: the CPU codes it there). */
    for (unsigned g = 0; g < KVS_STORE_GPUS_MAX && st->engine[g]; g++)
        kvs_engine_prepare(st->engine[g], c, NULL);
}

/* The learners' hooks (gpu/codec/learn.h): a new codec state version of ns. */
static void prepare_codec(void *ctx, kvs_codec *c)
{
    kvs__store_codec_prepare(ctx, c);
}

static int publish_codec(void *ctx, void *owner, kvs_kv kv, kvs_codec *c, kvs_err *err)
{
    (void)ctx;
    return kvs_ns_codec_publish(owner, kv, c, err);
}

/* Bytes of the largest block of t tokens a namespace may store: a side may be stored with
 * the codec of any of its roles (codecs[role][kv], NULL: none; gpu/codec/codec.h kvs_enc). */
static uint64_t block_max(kvs_codec *codecs[KVS_ENC_ROLES][2], uint32_t t)
{
    uint64_t sec[2] = {0, 0};
    for (int r = 0; r < KVS_ENC_ROLES; r++)
        for (int kv = 0; kv < 2; kv++)
            if (codecs[r][kv] && kvs_codec_section_max(codecs[r][kv], t) > sec[kv])
                sec[kv] = kvs_codec_section_max(codecs[r][kv], t);
    const kvs_ns_spec *s = kvs_codec_spec(codecs[KVS_ENC_OWN][0]);
    return kvs_format_prefix_bytes(s->layers) + (uint64_t)s->layers * (sec[0] + sec[1]);
}

static void codecs_destroy(kvs_codec *c[KVS_ENC_ROLES][2])
{
    for (int r = 0; r < KVS_ENC_ROLES; r++)
        for (int kv = 0; kv < 2; kv++)
            kvs_codec_destroy(c[r][kv]);
}

/* Whether a new namespace may be created (--max-namespaces). Each holds codec state (and
 * GPU tables): the bound keeps a create loop from running the daemon out of memory. A taken
 * name is left to the add (EEXIST); restores always load, so no data is lost. Locked. */
static int ns_room_locked(kvs_store *st, const kvs_ns_spec *spec, kvs_err *err)
{
    size_t count = kvs_ns_registry_count(st->reg);
    if (!st->max_namespaces || count < st->max_namespaces ||
        kvs_ns_registry_find(st->reg, spec->name))
        return 0;
    return kvs_err_set(err, KVS_ENOSPC,
                       "namespace '%.64s': %zu namespaces exist, the most (--max-namespaces "
                       "%u): drop one first",
                       spec->name, count, st->max_namespaces);
}

int kvs__store_ns_add(kvs_store *st, const kvs_ns_spec *spec, uint32_t id,
                      kvs__state_persist_fn persist, kvs_ns **out, kvs_err *err)
{
    int rc = kvs_spec_validate(spec, err);
    if (rc)
        return rc;
    if (!id) { /* refused before its codecs are built and their GPU tables uploaded */
        pthread_mutex_lock(&st->mu);
        rc = ns_room_locked(st, spec, err);
        pthread_mutex_unlock(&st->mu);
        if (rc)
            return rc;
    }
    /* c[role][kv]: the own codecs, and those of every other role the spec names (a
     * fallback with a bound, the host and disk tiers' for precision demotion). */
    kvs_codec *c[KVS_ENC_ROLES][2] = {{NULL}};
    for (int r = 0; r < KVS_ENC_ROLES && rc == 0; r++)
        for (int kv = 0; kv < 2 && rc == 0; kv++)
            if (kvs_spec_enc_codec(spec, (kvs_kv)kv, (kvs_enc)r)[0])
                rc = kvs_codec_create_enc(spec, (kvs_kv)kv, (kvs_enc)r, NULL, &c[r][kv], err);
    if (rc) {
        codecs_destroy(c);
        return rc;
    }
    for (int r = 0; r < KVS_ENC_ROLES; r++)
        for (int kv = 0; kv < 2; kv++)
            if (c[r][kv])
                kvs__store_codec_prepare(st, c[r][kv]);
    uint64_t full = block_max(c, spec->block_tokens);
    if (full > st->stats.host_capacity) {
        codecs_destroy(c);
        return kvs_err_set(err, KVS_ENOSPC,
                           "block_tokens: a full encoded block of %llu bytes%s exceeds the host "
                           "tier capacity of %llu bytes",
                           (unsigned long long)full,
                           c[KVS_ENC_FALLBACK][0] ? " (with its fallback codec)" : "",
                           (unsigned long long)st->stats.host_capacity);
    }
    kvs_learn *learn = NULL;
    kvs_learn_hooks hooks = {
        .prepare = prepare_codec, .persist = persist, .publish = publish_codec, .ctx = st};
    if ((rc = kvs_learn_create(spec, st->calib_tokens, &hooks, &learn, err))) {
        codecs_destroy(c);
        return rc;
    }
    pthread_mutex_lock(&st->mu);
    if (id && kvs_ns_registry_find_id(st->reg, id))
        rc = kvs_err_set(err, KVS_EEXIST, "namespace id %u: already in use", id);
    else if (id)
        kvs_ns_registry_set_next_id(st->reg, id);
    else /* again with the add: concurrent creates cannot both pass */
        rc = ns_room_locked(st, spec, err);
    if (rc == 0)
        rc = kvs_ns_registry_add(st->reg, spec, c, learn, out, err);
    pthread_mutex_unlock(&st->mu);
    if (rc) {
        codecs_destroy(c);
        kvs_learn_destroy(learn);
    }
    if (rc == 0 && spec->max_rel_error > 0)
        kvs__store_log(st, KVS_LOG_INFO,
                       "namespace '%s' created (L=%u H=%u D=%u T=%u %s, codecs %s/%s, "
                       "max_rel_error %g, fallback %s)",
                       spec->name, spec->layers, spec->kv_heads, spec->head_dim, spec->block_tokens,
                       kvs_dtype_name(spec->dtype), spec->key_codec, spec->value_codec,
                       spec->max_rel_error, spec->fallback_codec);
    else if (rc == 0 && (spec->host_codec[0] || spec->disk_codec[0]))
        kvs__store_log(st, KVS_LOG_INFO,
                       "namespace '%s' created (L=%u H=%u D=%u T=%u %s, codecs %s/%s, "
                       "host tier %s, disk tier %s)",
                       spec->name, spec->layers, spec->kv_heads, spec->head_dim, spec->block_tokens,
                       kvs_dtype_name(spec->dtype), spec->key_codec, spec->value_codec,
                       spec->host_codec[0] ? spec->host_codec : "as it comes",
                       spec->disk_codec[0] ? spec->disk_codec : "as it comes");
    else if (rc == 0)
        kvs__store_log(st, KVS_LOG_INFO,
                       "namespace '%s' created (L=%u H=%u D=%u T=%u %s, codecs %s/%s)", spec->name,
                       spec->layers, spec->kv_heads, spec->head_dim, spec->block_tokens,
                       kvs_dtype_name(spec->dtype), spec->key_codec, spec->value_codec);
    return rc;
}

int kvs_store_ns_find(kvs_store *st, const char *name, kvs_ns **out, kvs_err *err)
{
    pthread_mutex_lock(&st->mu);
    kvs_ns *ns = kvs_ns_registry_find(st->reg, name);
    if (ns)
        kvs_ns_ref(ns);
    pthread_mutex_unlock(&st->mu);
    if (!ns)
        return kvs_err_set(err, KVS_ENOTFOUND, "namespace: '%.64s' not found", name);
    *out = ns;
    return 0;
}

int kvs_store_ns_drop(kvs_store *st, const char *name, uint64_t *blocks_dropped, kvs_err *err)
{
    uint64_t dropped = 0;
    kvs_block *to_free = NULL; /* chained through node.next once unlinked */
    pthread_mutex_lock(&st->mu);
    kvs_ns *ns = kvs_ns_registry_remove(st->reg, name);
    kvs_lru *lists[2 + KVS_STORE_GPUS_MAX] = {&st->lru, &st->disk_lru};
    for (unsigned g = 0; g < st->gpus; g++)
        lists[2 + g] = &st->gpu[g].lru;
    for (unsigned i = 0; i < 2 + st->gpus && ns; i++) {
        kvs_lru_node *n = kvs_lru_oldest(lists[i]);
        while (n) {
            kvs_lru_node *newer = kvs_lru_newer(lists[i], n);
            kvs_block *blk = BLOCK_OF_LRU(n);
            if (blk->ns == ns) {
                dropped++;
                if (kvs__store_unlink_locked(st, blk)) {
                    blk->node.next = (kvs_index_node *)to_free;
                    to_free = blk;
                }
            }
            n = newer;
        }
    }
    if (ns && st->writer) /* after any queued write of its blocks (FIFO) */
        kvs_writer_ns_del(st->writer, kvs_ns_id(ns));
    if (ns && st->on_event) { /* its blocks said nothing (dropped: event_locked) */
        kvs_store_event ev = {.kind = KVS_STORE_EV_CLEARED,
                              .tier = KVS_STORE_TIER_NONE,
                              .ns = kvs_ns_spec_of(ns)->name,
                              .block_tokens = kvs_ns_spec_of(ns)->block_tokens};
        st->on_event(st->event_ctx, &ev);
    }
    pthread_mutex_unlock(&st->mu);
    if (!ns)
        return kvs_err_set(err, KVS_ENOTFOUND, "name: namespace '%.64s' not found", name);
    while (to_free) {
        kvs_block *next = (kvs_block *)to_free->node.next;
        kvs__block_free(to_free);
        to_free = next;
    }
    kvs_ns_unref(ns);
    kvs__store_log(st, KVS_LOG_INFO, "namespace '%s' dropped with %llu blocks", name,
                   (unsigned long long)dropped);
    if (blocks_dropped)
        *blocks_dropped = dropped;
    return 0;
}

int kvs_store_ns_list(kvs_store *st, kvs_store_ns_info **out, size_t *n, kvs_err *err)
{
    pthread_mutex_lock(&st->mu);
    size_t count = kvs_ns_registry_count(st->reg);
    kvs_store_ns_info *v = calloc(count ? count : 1, sizeof *v);
    if (!v) {
        pthread_mutex_unlock(&st->mu);
        return kvs_err_set(err, KVS_ENOMEM, "namespace list: out of memory");
    }
    for (size_t i = 0; i < count; i++) {
        kvs_ns *ns = kvs_ns_registry_at(st->reg, i);
        v[i].spec = *kvs_ns_spec_of(ns);
        v[i].id = kvs_ns_id(ns);
        v[i].usage = *kvs_ns_usage_of(ns);
        v[i].key_state = kvs_codec_state_version(kvs_ns_codec(ns, KVS_KEYS));
        v[i].value_state = kvs_codec_state_version(kvs_ns_codec(ns, KVS_VALUES));
        kvs_fidelity_acc_read(kvs_ns_fidelity(ns), &v[i].fidelity); /* atomics: no lock needed */
    }
    pthread_mutex_unlock(&st->mu);
    *out = v;
    *n = count;
    return 0;
}

/* ---------------------------------------------------------------- blocks */

/* Evicts idle LINKED host blocks in the order the host policy offers them until host_used
 * is at most `target`; a busy candidate is skipped and stays where it is (policy.h's
 * busy-skip contract). With a disk tier a victim goes to disk: a block whose record is
 * there already becomes a disk entry at once, another is handed to the disk writer while
 * the writer's queue has room (spill_max); past that, `drop` says whether victims are
 * dropped (a Put needs the room now) or the eviction stops (background demotion: the
 * writer calls again once it caught up). Evicted blocks are chained on *to_free for the
 * caller to free outside the lock.
 *
 * With `only` (a namespace over its host quota), only that namespace's blocks are evicted,
 * until its own share is at most `target`: the scan walks past other namespaces' blocks
 * (O(host blocks) at worst) and leaves them in place, though a policy's victim scan may age
 * them as it passes (S3-FIFO's promotion and CLOCK step), as any scan does. */
void kvs__store_evict_until_locked(kvs_store *st, kvs_ns *only, uint64_t target, bool drop,
                                   kvs_block **to_free)
{
    kvs_policy_cursor cur;
    kvs_policy_node *pn;
    const uint64_t *used = only ? &kvs_ns_usage_of(only)->host_bytes : &st->stats.host_used;
    kvs_policy_scan_begin(st->policy, &cur);
    while (*used > target && (pn = kvs_policy_victim(st->policy, &cur)) != NULL) {
        kvs_block *blk = BLOCK_OF_POL(pn);
        if (blk->refs != 1) /* busy, or with the disk writer (invariants 3, 8) */
            continue;
        if (only && blk->ns != only)
            continue;
        /* Background demotion (drop false) keeps half of the writer's queue for victims
         * of Puts. A lone block over the limit still goes, or it could never leave. */
        uint64_t qmax = drop ? st->spill_max : st->spill_max / 2;
        bool writable = st->writer && (st->stats.spill_pending == 0 ||
                                       st->stats.spill_pending + blk->size <= qmax);
        if (st->writer && !blk->on_disk && !writable && !drop)
            break;
        /* Out of the policy now, whatever follows (S3-FIFO remembers it in its ghost if it
         * leaves from S); the unlinks below then leave the policy alone, so the scan goes
         * on. A spilled block stays linked but is no candidate any more (invariant 2). */
        kvs_policy_evicted(st->policy, pn);
        st->stats.host_evictions++;
        /* A record the disk tier's codecs would re-encode is written again, colder, while
         * the writer has room (invariant 9); else it stands for the block as it is. */
        bool record = st->writer && blk->on_disk;
        if (record && (!writable || kvs__store_record_fits_locked(blk))) {
            /* its record is there already: no write */
            kvs_block *d = kvs__disk_entry_new(blk);
            kvs__store_unlink_locked(st, blk); /* refs was 1: free */
            kvs__store_link_locked(st, d);
            st->stats.disk_spills++;
        } else if (writable) {
            /* Off the budget now, readable until the writer commits it (invariant 8). */
            kvs__block_set_state(blk, KVS_BLOCK_SPILLING);
            blk->charge = KVS_CHARGE_SPILL;
            blk->refs++;
            kvs__store_host_charge_locked(st, blk->ns, -(int64_t)kvs__block_host_charge(blk));
            st->stats.spill_pending += blk->size;
            kvs_writer_put(st->writer, blk, blk->size);
            continue;
        } else {
            if (st->writer)
                st->stats.spill_dropped++; /* the writer is behind: a lost cache entry */
            kvs__store_unlink_locked(st, blk);
        }
        blk->node.next = (kvs_index_node *)*to_free;
        *to_free = blk;
    }
}

bool kvs__store_record_fits_locked(const kvs_block *blk)
{
    return blk->on_disk && kvs_ns_colder(blk->ns, blk->enc, KVS_ENC_DISK, blk->tokens) == blk->enc;
}

/* Makes room for `need` more bytes in the host tier (kvs__store_evict_until_locked; drop: also
 * dropping victims the disk writer cannot take); true if they fit now. */
static bool make_room_locked(kvs_store *st, uint64_t need, bool drop, kvs_block **to_free)
{
    if (need > st->stats.host_capacity)
        return false;
    kvs__store_evict_until_locked(st, NULL, st->stats.host_capacity - need, drop, to_free);
    return st->stats.host_used + need <= st->stats.host_capacity;
}

void kvs__store_host_demote(kvs_store *st)
{
    kvs_block *to_free = NULL;
    pthread_mutex_lock(&st->mu);
    if (st->stats.host_used > st->host_high)
        st->host_demoting = true;
    if (st->host_demoting) {
        kvs__store_evict_until_locked(st, NULL, st->host_low, false, &to_free);
        st->host_demoting = st->stats.host_used > st->host_low;
    }
    pthread_mutex_unlock(&st->mu);
    kvs__block_free_chain(to_free);
}

void kvs__block_free_chain(kvs_block *b)
{
    while (b) {
        kvs_block *next = (kvs_block *)b->node.next;
        kvs__block_free(b);
        b = next;
    }
}

static int block_alloc(kvs_store *st, kvs_ns *ns, uint32_t tokens, uint64_t bytes, bool drop,
                       kvs_block **out, kvs_err *err)
{
    kvs_block *to_free = NULL;
    const uint64_t charge = bytes + KVS_STORE_BLOCK_META; /* what the block holds */
    uint64_t quota = kvs_ns_spec_of(ns)->host_quota;
    pthread_mutex_lock(&st->mu);
    const uint64_t *mine = &kvs_ns_usage_of(ns)->host_bytes;
    /* Over its quota, a namespace makes room among its own blocks first, so that only
     * the tier's own shortage (every namespace within its quota) evicts across tenants. */
    bool within = true;
    if (quota) {
        if (*mine + charge > quota && charge <= quota)
            kvs__store_evict_until_locked(st, ns, quota - charge, drop, &to_free);
        within = *mine + charge <= quota;
    }
    bool ok = within && make_room_locked(st, charge, drop, &to_free);
    if (ok)
        kvs__store_host_charge_locked(st, ns, (int64_t)charge);
    uint64_t used = st->stats.host_used, cap = st->stats.host_capacity, held = *mine;
    pthread_mutex_unlock(&st->mu);
    kvs__block_free_chain(to_free);
    if (!within)
        return kvs_err_set(err, KVS_ENOSPC,
                           "host_quota_bytes: namespace '%s' holds %llu bytes of its host quota "
                           "of %llu and no idle block of its own is left to evict for %llu more "
                           "(the block's %llu and %u of bookkeeping)",
                           kvs_ns_spec_of(ns)->name, (unsigned long long)held,
                           (unsigned long long)quota, (unsigned long long)charge,
                           (unsigned long long)bytes, KVS_STORE_BLOCK_META);
    if (!ok)
        return kvs_err_set(err, KVS_ENOSPC,
                           "host tier: no room for %llu bytes (the block's %llu and %u of "
                           "bookkeeping; %llu of %llu used, the rest is busy)",
                           (unsigned long long)charge, (unsigned long long)bytes,
                           KVS_STORE_BLOCK_META, (unsigned long long)used, (unsigned long long)cap);
    kvs_block *blk = calloc(1, sizeof *blk);
    unsigned char *data = NULL;
    if (blk && st->pool && (data = kvs_hostpool_alloc(st->pool, bytes)))
        blk->pool = st->pool; /* pinned: the engine copies it by DMA */
    else if (blk)
        data = kvs_trymalloc(bytes);
    if (!data) {
        free(blk);
        pthread_mutex_lock(&st->mu);
        kvs__store_host_charge_locked(st, ns, -(int64_t)charge);
        pthread_mutex_unlock(&st->mu);
        return kvs_err_set(err, KVS_ENOMEM, "host tier: cannot allocate %llu bytes",
                           (unsigned long long)bytes);
    }
    blk->ns = kvs_ns_ref(ns);
    blk->tokens = tokens;
    blk->size = bytes;
    blk->raw_bytes = bytes;
    blk->data = data;
    blk->tier = KVS_STORE_TIER_HOST;
    blk->charge = KVS_CHARGE_HOST;
    *out = blk;
    return 0;
}

int kvs_store_block_alloc(kvs_store *st, kvs_ns *ns, uint32_t tokens, uint64_t bytes,
                          kvs_block **out, kvs_err *err)
{
    return block_alloc(st, ns, tokens, bytes, true, out, err);
}

int kvs_store_block_alloc_nodrop(kvs_store *st, kvs_ns *ns, uint32_t tokens, uint64_t bytes,
                                 kvs_block **out, kvs_err *err)
{
    return block_alloc(st, ns, tokens, bytes, false, out, err);
}

bool kvs_store_has_gpu(const kvs_store *st)
{
    return st->gpus > 0;
}

unsigned kvs_store_gpus(const kvs_store *st)
{
    return st->gpus;
}

bool kvs_store_has_disk(const kvs_store *st)
{
    return st->disk != NULL;
}

kvs_hostpool *kvs_store_host_pool(const kvs_store *st)
{
    return st->pool;
}

bool kvs_store_promotes(const kvs_store *st)
{
    return st->promote;
}

void kvs_block_set_size(kvs_block *blk, uint64_t size, uint64_t raw_bytes)
{
    if (blk->tier != KVS_STORE_TIER_GPU) /* a slot is a slot: nothing to give back */
        blk->shrink += blk->size - size;
    blk->size = size;
    blk->raw_bytes = raw_bytes;
}

void kvs_block_set_enc(kvs_block *blk, unsigned enc)
{
    assert(blk->state == KVS_BLOCK_FILLING);
    blk->enc = (uint8_t)enc;
}

unsigned kvs_block_enc(const kvs_block *blk)
{
    return blk->enc;
}

void *kvs_block_data(kvs_block *blk)
{
    return blk->data;
}
uint64_t kvs_block_size(const kvs_block *blk)
{
    return blk->size;
}
uint32_t kvs_block_tokens(const kvs_block *blk)
{
    return blk->tokens;
}
kvs_store_tier kvs_block_tier(const kvs_block *blk)
{
    return blk->tier;
}
kvs_ns *kvs_block_ns(const kvs_block *blk)
{
    return blk->ns;
}

void kvs_store_block_abort(kvs_store *st, kvs_block *blk)
{
    pthread_mutex_lock(&st->mu);
    kvs__store_give_back_locked(st, blk);
    pthread_mutex_unlock(&st->mu);
    kvs__block_free(blk);
}

/* Inserts a block (node initialized) into the index and its tier's LRU as the newest. */
void kvs__store_link_locked(kvs_store *st, kvs_block *blk)
{
    kvs_index_insert(st->index, &blk->node);
    kvs_lru_push(lru_of(st, blk), &blk->lru);
    if (blk->tier == KVS_STORE_TIER_HOST) {
        /* Fails only for a linked node or 0 bytes, neither possible here (invariant 2). */
        int prc = kvs_policy_insert(st->policy, &blk->pol, blk->node.hash,
                                    blk->size ? blk->size : 1, NULL);
        assert(prc == 0);
        (void)prc;
        if (st->writer && st->stats.host_used > st->host_high)
            kvs_writer_kick(st->writer); /* background demotion to the disk tier */
    }
    kvs__block_set_state(blk, KVS_BLOCK_IDLE);
    blk->refs = 1;
    kvs_ns_usage *u = kvs_ns_usage_of(blk->ns);
    u->blocks++;
    u->stored_bytes += blk->size;
    u->raw_bytes += blk->raw_bytes;
    u->tokens += blk->tokens;
    if (blk->tier == KVS_STORE_TIER_GPU)
        st->gpu[blk->gpu].s.blocks++;
    else if (blk->tier == KVS_STORE_TIER_DISK)
        st->stats.disk_blocks++;
    else
        st->stats.host_blocks++;
    if (blk->on_disk)
        kvs__store_disk_record_locked(st, blk, true);
    event_locked(st, KVS_STORE_EV_STORED, blk);
}

/* Commit, plus the durable write when done is set (kvs_store_block_commit_durable). */
static int commit(kvs_store *st, kvs_block *blk, const void *key, size_t key_len,
                  kvs_store_put_info *info, kvs_store_durable_fn done, void *arg, kvs_err *err)
{
    int rc = kvs_key_validate(key_len, err);
    if (rc == 0 && done && (!st->writer || blk->tier != KVS_STORE_TIER_HOST))
        rc = kvs_err_set(err, KVS_EINVAL, "durable: namespace '%s': a durable write needs %s",
                         kvs_ns_spec_of(blk->ns)->name,
                         st->writer ? "a host tier block" : "a disk tier");
    if (rc) {
        kvs_store_block_abort(st, blk);
        return rc;
    }
    /* Give back what the encoder did not use (the block is still private to this
     * caller). Its integrity is the encoded block's own checksum (invariant 4). */
    if (blk->shrink && !blk->pool) { /* a pool block keeps its slot */
        unsigned char *smaller = realloc(blk->data, blk->size ? blk->size : 1);
        if (smaller)
            blk->data = smaller;
    }
    kvs_index_node_init(&blk->node, kvs_ns_id(blk->ns), key, key_len);

    kvs_block *old = NULL;
    bool free_old = false;
    pthread_mutex_lock(&st->mu);
    if (kvs_ns_dropped(blk->ns)) {
        pthread_mutex_unlock(&st->mu);
        rc = kvs_err_set(err, KVS_ENOTFOUND, "namespace: '%s' was dropped during the put",
                         kvs_ns_spec_of(blk->ns)->name);
        kvs_store_block_abort(st, blk);
        return rc;
    }
    kvs__store_host_charge_locked(st, blk->ns, -(int64_t)blk->shrink);
    blk->shrink = 0;
    kvs_index_node *prev = kvs_index_find(st->index, blk->node.ns_id, key, key_len);
    if (prev) {
        old = BLOCK_OF_NODE(prev);
        /* A durable write replaces the old record in one transaction: deleting it first
         * would let a crash between the two lose an acknowledged block. */
        if (done &&
            (old->on_disk || old->state == KVS_BLOCK_WRITING || old->state == KVS_BLOCK_SPILLING)) {
            blk->prev_rec = true;
            blk->prev_enc = old->enc;
            blk->prev_tokens = old->tokens;
            blk->prev_size = old->size;
            blk->prev_raw = old->raw_bytes;
        }
        free_old = done ? kvs__store_unlink_locked(st, old) : forget_locked(st, old);
    }
    kvs__store_link_locked(st, blk);
    /* Before the durable write is queued: done may run before we return. */
    if (info) {
        info->tier = blk->tier;
        info->stored_bytes = blk->size;
        info->replaced = old != NULL;
        info->enc = blk->enc;
    }
    if (done) { /* the writer's reference keeps it from eviction (invariant 8) */
        kvs__block_set_state(blk, KVS_BLOCK_WRITING);
        blk->refs++;
        kvs_writer_durable(st->writer, blk, blk->size, done, arg);
    }
    pthread_mutex_unlock(&st->mu);
    if (free_old)
        kvs__block_free(old);
    return 0;
}

int kvs_store_block_commit(kvs_store *st, kvs_block *blk, const void *key, size_t key_len,
                           kvs_store_put_info *info, kvs_err *err)
{
    return commit(st, blk, key, key_len, info, NULL, NULL, err);
}

int kvs_store_block_commit_durable(kvs_store *st, kvs_block *blk, const void *key, size_t key_len,
                                   kvs_store_put_info *info, kvs_store_durable_fn done, void *arg,
                                   kvs_err *err)
{
    if (!done) {
        kvs_store_block_abort(st, blk);
        return kvs_err_set(err, KVS_EINVAL, "durable: no completion callback");
    }
    return commit(st, blk, key, key_len, info, done, arg, err);
}

bool kvs_block_unread(const kvs_block *blk)
{
    return blk->tier == KVS_STORE_TIER_DISK && !blk->data; /* transient reads have bytes */
}

int kvs_store_find(kvs_store *st, kvs_ns *ns, const void *key, size_t key_len, kvs_block **out,
                   kvs_err *err)
{
    pthread_mutex_lock(&st->mu);
    kvs_index_node *n = kvs_index_find(st->index, kvs_ns_id(ns), key, key_len);
    if (!n) {
        st->stats.misses++;
        kvs_ns_usage_of(ns)->misses++;
        pthread_mutex_unlock(&st->mu);
        return kvs_err_set(err, KVS_ENOTFOUND, "key: not found in namespace '%s'",
                           kvs_ns_spec_of(ns)->name);
    }
    kvs_block *blk = BLOCK_OF_NODE(n);
    blk->refs++;
    kvs_lru_touch(lru_of(st, blk), &blk->lru);
    if (kvs_policy_node_linked(&blk->pol)) /* host blocks not yet evicted */
        kvs_policy_hit(st->policy, &blk->pol);
    if (blk->tier == KVS_STORE_TIER_GPU) { /* invariant 4: no host bytes to verify */
        st->gpu[blk->gpu].s.hits++;
        kvs_ns_usage_of(ns)->gpu_hits++;
        pthread_mutex_unlock(&st->mu);
        *out = blk;
        return 0;
    }
    pthread_mutex_unlock(&st->mu);
    if (blk->tier == KVS_STORE_TIER_DISK) { /* read by kvs_store_read */
        *out = blk;
        return 0;
    }

    /* Invariant 4: verify outside the lock (the block's own checksum, over every byte);
     * the payload is read-only once linked. */
    kvs_block_info info;
    if (kvs_format_parse(blk->data, blk->size, &info, NULL) != 0) {
        bool free_now = false;
        pthread_mutex_lock(&st->mu);
        st->stats.checksum_failures++;
        if (kvs__block_linked(blk))
            forget_locked(st, blk);
        free_now = kvs__store_unref_locked(st, blk);
        pthread_mutex_unlock(&st->mu);
        kvs__store_log(st, KVS_LOG_ERROR,
                       "namespace '%s': block failed its checksum and was dropped",
                       kvs_ns_spec_of(ns)->name);
        if (free_now)
            kvs__block_free(blk);
        return kvs_err_set(err, KVS_EDATALOSS,
                           "key: stored block failed its checksum and was dropped");
    }
    pthread_mutex_lock(&st->mu);
    st->stats.host_hits++;
    kvs_ns_usage_of(ns)->host_hits++;
    pthread_mutex_unlock(&st->mu);
    *out = blk;
    return 0;
}

void kvs_store_block_release(kvs_store *st, kvs_block *blk)
{
    pthread_mutex_lock(&st->mu);
    bool free_now = kvs__store_unref_locked(st, blk);
    pthread_mutex_unlock(&st->mu);
    if (free_now)
        kvs__block_free(blk);
}

void kvs_store_lookup(kvs_store *st, kvs_ns *ns, const kvs_store_key *keys, size_t n,
                      kvs_store_tier *tiers, uint32_t *prefix, uint8_t *enc)
{
    uint32_t p = 0;
    bool in_prefix = true;
    pthread_mutex_lock(&st->mu);
    for (size_t i = 0; i < n; i++) {
        kvs_index_node *node = kvs_index_find(st->index, kvs_ns_id(ns), keys[i].data, keys[i].len);
        bool hit = node != NULL;
        tiers[i] = hit ? BLOCK_OF_NODE(node)->tier : KVS_STORE_TIER_NONE;
        if (enc)
            enc[i] = hit ? BLOCK_OF_NODE(node)->enc : 0;
        in_prefix = in_prefix && hit;
        p += in_prefix;
    }
    pthread_mutex_unlock(&st->mu);
    if (prefix)
        *prefix = p;
}

uint32_t kvs_store_delete(kvs_store *st, kvs_ns *ns, const kvs_store_key *keys, size_t n)
{
    uint32_t deleted = 0;
    kvs_block *to_free = NULL;
    pthread_mutex_lock(&st->mu);
    for (size_t i = 0; i < n; i++) {
        kvs_index_node *node = kvs_index_find(st->index, kvs_ns_id(ns), keys[i].data, keys[i].len);
        if (!node)
            continue;
        kvs_block *blk = BLOCK_OF_NODE(node);
        deleted++;
        if (forget_locked(st, blk)) {
            blk->node.next = (kvs_index_node *)to_free;
            to_free = blk;
        }
    }
    pthread_mutex_unlock(&st->mu);
    kvs__block_free_chain(to_free);
    return deleted;
}

uint64_t kvs__store_gpu_blocks_locked(const kvs_store *st)
{
    uint64_t n = 0;
    for (unsigned g = 0; g < st->gpus; g++)
        n += st->gpu[g].s.blocks;
    return n;
}

void kvs_store_get_stats(kvs_store *st, kvs_store_stats *out)
{
    pthread_mutex_lock(&st->mu);
    *out = st->stats;
    /* The gpu totals are the devices' sums: each device's counters are the only ones kept. */
    out->gpu_devices = st->gpus;
    for (unsigned g = 0; g < st->gpus; g++) {
        const kvs_store_gpu_stats *d = &st->gpu[g].s;
        out->gpu_dev[g] = *d;
        out->gpu_capacity += d->capacity;
        out->gpu_used += d->used;
        out->gpu_blocks += d->blocks;
        out->gpu_hits += d->hits;
        out->gpu_demotions += d->demotions;
        out->gpu_promotions += d->promotions;
    }
    pthread_mutex_unlock(&st->mu);
    out->verify_checked = atomic_load_explicit(&st->verify_checked, memory_order_relaxed);
}
