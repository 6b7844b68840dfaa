/* Allocation helpers with an explicit out-of-memory policy (STYLE: Ownership and memory).
 *
 * - kvs_xmalloc/kvs_xcalloc: small, fixed-size allocations whose failure we cannot recover
 *   from; they log the size to stderr and abort.
 * - kvs_trymalloc: any size derived from the wire or the disk; returns NULL and the caller
 *   answers KVS_ENOMEM (RESOURCE_EXHAUSTED).
 * - kvs_mul_size: overflow-checked products for sizes computed from request fields.
 * Everything allocated here is released with free().
 */
#ifndef KVS_BASE_MEM_H
#define KVS_BASE_MEM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

void *kvs_xmalloc(size_t n);
void *kvs_xcalloc(size_t count, size_t size);
/* Grows a small table (bounded by a limit the caller checks); aborts when out of memory. */
void *kvs_xrealloc(void *p, size_t n);
char *kvs_xstrdup(const char *s);
void *kvs_trymalloc(size_t n);

/* *out = a * b; returns false (and leaves *out untouched) on overflow. */
static inline bool kvs_mul_size(uint64_t a, uint64_t b, uint64_t *out)
{
    uint64_t r;
    if (__builtin_mul_overflow(a, b, &r))
        return false;
    *out = r;
    return true;
}

#ifdef __cplusplus
}
#endif

#endif
