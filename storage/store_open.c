/* Opening the store: kvs_store_create, which starts the disk writer with the store's hooks
 * (storage/store_disk.c) and restores what the disk tier recorded (storage/persist.c), and
 * kvs_store_ns_create, which records a new namespace there. The only file that ties the
 * store's core (storage/store.c, which knows the writer only through its queue) to its
 * disk plumbing, so that the core calls neither of them:
 *   store_open.c -> persist.c, store_disk.c -> store.c -> writer.c -> disk.c
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/base/mem.h"
#include "storage/store_int.h"
#include "storage/writer.h"

int kvs_store_create(const kvs_store_opts *opts, kvs_store **out, kvs_err *err)
{
    if (opts->host_capacity == 0)
        return kvs_err_set(err, KVS_EINVAL, "host_capacity: must be > 0");
    kvs_store *st = kvs_xcalloc(1, sizeof *st);
    int rc = pthread_mutex_init(&st->mu, NULL);
    if (rc != 0) {
        free(st);
        return kvs_err_set(err, -rc, "store: pthread_mutex_init: %s", strerror(rc));
    }
    st->reg = kvs_ns_registry_create();
    st->index = kvs_index_create();
    kvs_lru_init(&st->lru);
    kvs_lru_init(&st->disk_lru);
    unsigned hi = opts->gpu_high_pct ? opts->gpu_high_pct : 90;
    unsigned lo = opts->gpu_high_pct ? opts->gpu_low_pct : 80;
    st->gpu_high_pct = hi > 100 ? 100 : hi;
    st->gpu_low_pct = lo > hi ? st->gpu_high_pct : lo;
    /* One tier per device region, in the caller's order (a block's kvs_block_gpu). */
    for (unsigned g = 0; g < KVS_STORE_GPUS_MAX && opts->gpu[g].base && opts->gpu[g].capacity;
         g++) {
        kvs__gpu_tier *t = &st->gpu[g];
        uint64_t bytes = opts->gpu[g].capacity;
        uint64_t slab = opts->gpu_slab ? opts->gpu_slab : (uint64_t)64 << 20;
        if (!opts->gpu_slab && slab > bytes / 4)
            slab = bytes / 4;
        kvs_lru_init(&t->lru);
        if ((rc = kvs_slots_create(opts->gpu[g].base, bytes, slab, &t->slots, err))) {
            kvs_err_prefix(err, "gpu tier of device %u", g);
            kvs_store_destroy(st); /* destroys the tiers made so far (st->gpus of them) */
            return rc;
        }
        st->gpus = g + 1;
        uint64_t cap = kvs_slots_capacity(t->slots);
        t->high = cap / 100 * st->gpu_high_pct;
        t->low = cap / 100 * st->gpu_low_pct;
        t->s.capacity = cap;
    }
    kvs_policy_opts popts = {.small_percent = opts->eviction_small_pct};
    if ((rc = kvs_policy_create(opts->eviction ? opts->eviction : KVS_POLICY_LRU,
                                opts->host_capacity, &popts, &st->policy, err))) {
        kvs_store_destroy(st);
        kvs_err_prefix(err, "eviction: host tier policy");
        return rc;
    }
    st->stats.host_capacity = opts->host_capacity;
    st->eviction_small_pct = opts->eviction_small_pct;
    st->host_high_pct = opts->host_high_pct ? opts->host_high_pct : 90;
    st->host_low_pct = opts->host_high_pct ? opts->host_low_pct : 80;
    st->promote = !opts->no_promote;
    st->pool = opts->host_pool;
    st->calib_tokens = opts->calib_tokens ? opts->calib_tokens : 4096;
    st->max_namespaces = opts->max_namespaces;
    memcpy(st->engine, opts->engine, sizeof st->engine);
    st->log = opts->log;
    st->log_ctx = opts->log_ctx;
    if (opts->disk) {
        st->disk = opts->disk;
        st->stats.disk_capacity = opts->disk_capacity;
        st->stats.disk_max_records = opts->disk_max_records
                                         ? opts->disk_max_records
                                         : KVS_STORE_DISK_RECORDS_AUTO(opts->host_capacity);
        st->spill_max = opts->spill_max ? opts->spill_max : opts->host_capacity / 4;
        kvs__store_host_marks_locked(st); /* no other thread has the store yet */
        kvs_writer_hooks hooks;
        kvs__store_writer_hooks(st, &hooks);
        if ((rc = kvs_writer_create(st->disk, &hooks, &st->writer, err)) ||
            (rc = kvs__persist_restore(st, err))) {
            kvs_store_destroy(st);
            return rc;
        }
    }
    /* Armed only now: the blocks restored above were indexed before anyone could listen.
     * Under the lock, since the disk writer already runs. */
    pthread_mutex_lock(&st->mu);
    st->on_event = opts->on_event;
    st->event_ctx = opts->event_ctx;
    pthread_mutex_unlock(&st->mu);
    *out = st;
    return 0;
}

int kvs_store_ns_create(kvs_store *st, const kvs_ns_spec *spec, kvs_ns **out, kvs_err *err)
{
    if (spec->durable && !st->disk) /* nowhere to be durable: refuse rather than pretend */
        return kvs_err_set(err, KVS_EINVAL,
                           "durable: namespace '%.64s' asks for durable Puts, "
                           "but this store has no disk tier",
                           spec->name);
    kvs_ns *ns = NULL;
    int rc = kvs__store_ns_add(st, spec, 0, st->disk ? kvs__persist_state_put : NULL, &ns, err);
    if (rc == 0 && st->disk && (rc = kvs__persist_ns_put(st, ns, err))) {
        /* Not persisted: refuse rather than lose the namespace at the next restart. */
        kvs_ns_unref(ns);
        kvs_store_ns_drop(st, spec->name, NULL, NULL);
        return rc;
    }
    if (out)
        *out = ns;
    else if (ns)
        kvs_ns_unref(ns);
    return rc;
}
