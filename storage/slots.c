/* Slot allocator over a pre-allocated region: see slots.h. Bookkeeping only; the region's
 * bytes are never read or written here (it may be device memory). */
#include "storage/slots.h"

#include <stdlib.h>

#include "gpu/base/mem.h"

#define NONE UINT32_MAX

typedef struct slab {
    uint32_t cls;        /* index into s->classes, NONE while free */
    uint32_t nslots;     /* slots of the class's size that fit */
    uint32_t used;       /* slots allocated */
    uint32_t fresh;      /* slots [fresh, nslots) were never handed out since assignment */
    uint32_t nfree;      /* entries on the free stack */
    uint32_t *stack;     /* freed slot indices (nslots entries), allocated on assignment */
    uint32_t prev, next; /* class's list of slabs with room, or the free slab list (next) */
} slab;

typedef struct cls {
    uint64_t id;
    uint64_t slot_bytes;
    uint32_t partial; /* first slab with room, NONE if none */
    uint32_t slabs;   /* slabs assigned to this class */
} cls;

struct kvs_slots {
    uintptr_t base;
    uint64_t slab_bytes, used;
    uint32_t nslabs, free_head, free_count;
    slab *slabs;
    cls *classes;
    uint32_t nclasses, cap_classes;
};

int kvs_slots_create(uintptr_t base, uint64_t capacity, uint64_t slab_bytes, kvs_slots **out,
                     kvs_err *err)
{
    if (slab_bytes == 0 || capacity / slab_bytes == 0)
        return kvs_err_set(err, KVS_EINVAL,
                           "slots: capacity of %llu bytes holds no slab of "
                           "%llu bytes",
                           (unsigned long long)capacity, (unsigned long long)slab_bytes);
    if (capacity / slab_bytes >= NONE)
        return kvs_err_set(err, KVS_EINVAL, "slots: too many slabs");
    kvs_slots *s = kvs_xcalloc(1, sizeof *s);
    s->base = base;
    s->slab_bytes = slab_bytes;
    s->nslabs = (uint32_t)(capacity / slab_bytes);
    s->slabs = kvs_xcalloc(s->nslabs, sizeof *s->slabs);
    for (uint32_t i = 0; i < s->nslabs; i++) {
        s->slabs[i].cls = NONE;
        s->slabs[i].next = i + 1 < s->nslabs ? i + 1 : NONE;
    }
    s->free_head = 0;
    s->free_count = s->nslabs;
    *out = s;
    return 0;
}

void kvs_slots_destroy(kvs_slots *s)
{
    if (!s)
        return;
    for (uint32_t i = 0; i < s->nslabs; i++)
        free(s->slabs[i].stack);
    free(s->slabs);
    free(s->classes);
    free(s);
}

static cls *find_class(const kvs_slots *s, uint64_t id)
{
    for (uint32_t i = 0; i < s->nclasses; i++)
        if (s->classes[i].id == id)
            return &s->classes[i];
    return NULL;
}

static void partial_push(kvs_slots *s, cls *c, uint32_t i)
{
    slab *b = &s->slabs[i];
    b->prev = NONE;
    b->next = c->partial;
    if (c->partial != NONE)
        s->slabs[c->partial].prev = i;
    c->partial = i;
}

static void partial_remove(kvs_slots *s, cls *c, uint32_t i)
{
    slab *b = &s->slabs[i];
    if (b->prev != NONE)
        s->slabs[b->prev].next = b->next;
    else
        c->partial = b->next;
    if (b->next != NONE)
        s->slabs[b->next].prev = b->prev;
    b->prev = b->next = NONE;
}

bool kvs_slots_can_alloc(const kvs_slots *s, uint64_t id, uint64_t slot_bytes)
{
    if (slot_bytes == 0 || slot_bytes > s->slab_bytes)
        return false;
    const cls *c = find_class(s, id);
    if (c && c->slabs && c->slot_bytes != slot_bytes)
        return false;
    return (c && c->partial != NONE) || s->free_count > 0;
}

int kvs_slots_alloc(kvs_slots *s, uint64_t id, uint64_t slot_bytes, uintptr_t *addr, kvs_err *err)
{
    if (slot_bytes == 0 || slot_bytes > s->slab_bytes)
        return kvs_err_set(err, KVS_EINVAL,
                           "slots: a slot of %llu bytes does not fit a slab "
                           "of %llu",
                           (unsigned long long)slot_bytes, (unsigned long long)s->slab_bytes);
    cls *c = find_class(s, id);
    if (c && c->slabs && c->slot_bytes != slot_bytes)
        return kvs_err_set(err, KVS_EINVAL,
                           "slots: class %llu holds slots of %llu bytes, not "
                           "%llu",
                           (unsigned long long)id, (unsigned long long)c->slot_bytes,
                           (unsigned long long)slot_bytes);
    if (!c) {
        if (s->nclasses == s->cap_classes) {
            uint32_t cap = s->cap_classes ? 2 * s->cap_classes : 8;
            cls *grown = realloc(s->classes, cap * sizeof *grown);
            if (!grown)
                return kvs_err_set(err, KVS_ENOMEM, "slots: out of memory");
            s->classes = grown;
            s->cap_classes = cap;
        }
        c = &s->classes[s->nclasses++];
        *c = (cls){.id = id, .partial = NONE};
    }
    c->slot_bytes = slot_bytes;
    uint32_t i = c->partial;
    if (i == NONE) {
        if (s->free_head == NONE)
            return kvs_err_set(err, KVS_ENOSPC, "slots: all %u slabs of %llu bytes are in use",
                               s->nslabs, (unsigned long long)s->slab_bytes);
        i = s->free_head;
        slab *b = &s->slabs[i];
        uint32_t n = (uint32_t)(s->slab_bytes / slot_bytes);
        uint32_t *stack = kvs_trymalloc((size_t)n * sizeof *stack);
        if (!stack)
            return kvs_err_set(err, KVS_ENOMEM, "slots: out of memory");
        s->free_head = b->next;
        s->free_count--;
        *b = (slab){.cls = (uint32_t)(c - s->classes), .nslots = n, .stack = stack};
        c->slabs++;
        partial_push(s, c, i);
    }
    slab *b = &s->slabs[i];
    uint32_t k = b->nfree ? b->stack[--b->nfree] : b->fresh++;
    b->used++;
    if (b->used == b->nslots)
        partial_remove(s, c, i);
    s->used += slot_bytes;
    *addr = s->base + (uintptr_t)i * s->slab_bytes + (uintptr_t)k * slot_bytes;
    return 0;
}

void kvs_slots_free(kvs_slots *s, uintptr_t addr)
{
    uint64_t off = addr - s->base;
    uint32_t i = (uint32_t)(off / s->slab_bytes);
    slab *b = &s->slabs[i];
    cls *c = &s->classes[b->cls];
    uint32_t k = (uint32_t)((off - (uint64_t)i * s->slab_bytes) / c->slot_bytes);
    if (b->used == b->nslots)
        partial_push(s, c, i);
    b->stack[b->nfree++] = k;
    b->used--;
    s->used -= c->slot_bytes;
    if (b->used == 0) { /* the slab goes back to everyone */
        partial_remove(s, c, i);
        free(b->stack);
        *b = (slab){.cls = NONE, .prev = NONE, .next = s->free_head};
        s->free_head = i;
        s->free_count++;
        c->slabs--;
    }
}

uint64_t kvs_slots_capacity(const kvs_slots *s)
{
    return (uint64_t)s->nslabs * s->slab_bytes;
}
uint64_t kvs_slots_used(const kvs_slots *s)
{
    return s->used;
}
uint64_t kvs_slots_slab_bytes(const kvs_slots *s)
{
    return s->slab_bytes;
}
uint32_t kvs_slots_free_slabs(const kvs_slots *s)
{
    return s->free_count;
}
