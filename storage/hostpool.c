/* The pinned host pool: see hostpool.h. storage/slots does the bookkeeping over the
 * reserved range; this file commits and pins slabs the first time slots hands out an
 * address in them. */
#include "storage/hostpool.h"

#include <pthread.h>
#include <stdlib.h>
#include <sys/mman.h>

#include "gpu/base/mem.h"
#include "storage/slots.h"

#define MIN_SLOT 4096u

struct kvs_hostpool {
    kvs_hostpool_opts o;
    pthread_mutex_t mu;
    uint8_t *base;
    uint64_t bytes; /* reserved: whole slabs */
    uint32_t nslabs;
    uint8_t *state; /* per slab: 0 reserved, 1 committed, 2 committed and pinned */
    kvs_slots *slots;
    kvs_hostpool_stats stats;
};

/* The slot size for a request: eight classes per power of two (a block wastes at most an
 * eighth of its slot), at least MIN_SLOT. The size is also the class id. */
static uint64_t class_of(uint64_t bytes)
{
    if (bytes <= MIN_SLOT)
        return MIN_SLOT;
    uint64_t pow = 1;
    while (pow < bytes)
        pow <<= 1;
    uint64_t step = pow / 16; /* classes in (pow/2, pow] */
    return (bytes + step - 1) / step * step;
}

int kvs_hostpool_create(const kvs_hostpool_opts *opts, kvs_hostpool **out, kvs_err *err)
{
    uint64_t slab = opts->slab_bytes ? opts->slab_bytes : (uint64_t)64 << 20;
    if (slab < MIN_SLOT || slab % 4096 || slab > UINT32_MAX)
        return kvs_err_set(err, KVS_EINVAL,
                           "host pool: slab of %llu bytes (4 KiB multiples "
                           "up to 4 GiB)",
                           (unsigned long long)slab);
    uint64_t n = (opts->max_bytes + slab - 1) / slab;
    if (n == 0 || n > (1u << 24))
        return kvs_err_set(err, KVS_EINVAL, "host pool: %llu bytes is not 1..%llu slabs of %llu",
                           (unsigned long long)opts->max_bytes, 1ull << 24,
                           (unsigned long long)slab);
    void *base =
        mmap(NULL, n * slab, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED)
        return kvs_err_set(err, KVS_ENOMEM,
                           "host pool: reserving %llu bytes of address space "
                           "failed",
                           (unsigned long long)(n * slab));
    kvs_hostpool *p = kvs_xcalloc(1, sizeof *p);
    p->o = *opts;
    p->o.slab_bytes = slab;
    p->base = base;
    p->bytes = n * slab;
    p->nslabs = (uint32_t)n;
    p->state = kvs_xcalloc(n, 1);
    int rc = kvs_slots_create((uintptr_t)base, p->bytes, slab, &p->slots, err);
    if (rc) {
        munmap(base, p->bytes);
        free(p->state);
        free(p);
        return rc;
    }
    pthread_mutex_init(&p->mu, NULL);
    p->stats.reserved = p->bytes;
    *out = p;
    return 0;
}

void kvs_hostpool_destroy(kvs_hostpool *p)
{
    if (!p)
        return;
    for (uint32_t i = 0; i < p->nslabs; i++)
        if (p->state[i] == 2 && p->o.unpin)
            p->o.unpin(p->o.ctx, p->base + (uint64_t)i * p->o.slab_bytes, p->o.slab_bytes);
    munmap(p->base, p->bytes);
    kvs_slots_destroy(p->slots);
    pthread_mutex_destroy(&p->mu);
    free(p->state);
    free(p);
}

/* Makes slab i writable and pins it (under p->mu); false if it cannot be used. */
static bool commit_locked(kvs_hostpool *p, uint32_t i)
{
    uint8_t *a = p->base + (uint64_t)i * p->o.slab_bytes;
    if (mprotect(a, p->o.slab_bytes, PROT_READ | PROT_WRITE) != 0)
        return false;
    p->state[i] = 1;
    p->stats.committed += p->o.slab_bytes;
    /* The pin faults the pages in (and locks them); without one they fault on first use. */
    if (p->o.pin) {
        kvs_err err;
        if (p->o.pin(p->o.ctx, a, p->o.slab_bytes, &err) == 0) {
            p->state[i] = 2;
            p->stats.pinned += p->o.slab_bytes;
        } else {
            p->stats.pin_failures++; /* usable, only not pinned: the engine copies then */
        }
    }
    return true;
}

void *kvs_hostpool_alloc(kvs_hostpool *p, size_t bytes)
{
    uint64_t slot = class_of(bytes ? bytes : 1);
    if (slot > p->o.slab_bytes)
        return NULL;
    uintptr_t addr = 0;
    void *out = NULL;
    pthread_mutex_lock(&p->mu);
    if (kvs_slots_alloc(p->slots, (uint32_t)slot, slot, &addr, NULL) == 0) {
        uint32_t i = (uint32_t)((addr - (uintptr_t)p->base) / p->o.slab_bytes);
        if (p->state[i] || commit_locked(p, i)) {
            out = (void *)addr;
            p->stats.used = kvs_slots_used(p->slots);
        } else {
            kvs_slots_free(p->slots, addr);
        }
    }
    pthread_mutex_unlock(&p->mu);
    return out;
}

void kvs_hostpool_free(kvs_hostpool *p, void *ptr)
{
    pthread_mutex_lock(&p->mu);
    kvs_slots_free(p->slots, (uintptr_t)ptr);
    p->stats.used = kvs_slots_used(p->slots);
    pthread_mutex_unlock(&p->mu);
}

bool kvs_hostpool_owns(const kvs_hostpool *p, const void *ptr)
{
    return p && (const uint8_t *)ptr >= p->base && (const uint8_t *)ptr < p->base + p->bytes;
}

void kvs_hostpool_get_stats(kvs_hostpool *p, kvs_hostpool_stats *out)
{
    pthread_mutex_lock(&p->mu);
    *out = p->stats;
    pthread_mutex_unlock(&p->mu);
}
