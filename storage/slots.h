/* Fixed-size slots carved out of one pre-allocated region (DESIGN §7): the GPU tier's
 * device memory (and later the pinned host pool). The module only does bookkeeping on
 * addresses; it never touches the memory, so it works the same on a device region, a
 * host region or (in tests) a fake base address.
 *
 * The region is cut into slabs of slab_bytes. A slab belongs to one size class (one
 * namespace's slot size) while it holds a slot and goes back to the free slab list when
 * its last slot is freed, so namespaces of different block sizes share the region without
 * fragmenting it: alloc and free are O(1) (a class is found by a short list walk; there
 * are as few classes as namespaces). A slot never crosses a slab, so slot_bytes must be
 * <= slab_bytes; used bytes count whole slots.
 *
 * Threading: not thread-safe; the owner (the store) serializes calls under its lock.
 */
#ifndef KVS_STORAGE_SLOTS_H
#define KVS_STORAGE_SLOTS_H

#include <stdbool.h>
#include <stdint.h>

#include "gpu/base/err.h"

typedef struct kvs_slots kvs_slots;

/* Manages [base, base + capacity): capacity is rounded down to whole slabs. base is
 * borrowed (the caller allocates and frees the region). KVS_EINVAL if no slab fits. */
int kvs_slots_create(uintptr_t base, uint64_t capacity, uint64_t slab_bytes, kvs_slots **out,
                     kvs_err *err);
/* Frees the bookkeeping (not the region). Slots still allocated are forgotten. */
void kvs_slots_destroy(kvs_slots *s);

/* A slot of slot_bytes (1..slab_bytes) for size class `cls` (the store's: a namespace id
 * and the block's encodings, storage/store_gpu.c; slots of one class share slabs). *addr = its
 * start. KVS_ENOSPC when no slab has room and no free slab is left; KVS_EINVAL when slot_bytes does
 * not fit a slab or changes for a class. */
int kvs_slots_alloc(kvs_slots *s, uint64_t cls, uint64_t slot_bytes, uintptr_t *addr, kvs_err *err);
/* Returns a slot given by kvs_slots_alloc. */
void kvs_slots_free(kvs_slots *s, uintptr_t addr);
/* True if a slot of slot_bytes for cls could be allocated now. */
bool kvs_slots_can_alloc(const kvs_slots *s, uint64_t cls, uint64_t slot_bytes);

uint64_t kvs_slots_capacity(const kvs_slots *s); /* usable bytes (whole slabs) */
uint64_t kvs_slots_used(const kvs_slots *s);     /* bytes of allocated slots */
uint64_t kvs_slots_slab_bytes(const kvs_slots *s);
uint32_t kvs_slots_free_slabs(const kvs_slots *s);

#endif
