/* Block index: see index.h.
 * Invariants: (1) bucket count is a power of two; (2) each linked node sits in bucket
 * hash & (nbuckets - 1); (3) count equals the number of linked nodes. */
#include "storage/index.h"

#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#include "gpu/base/mem.h"

struct kvs_index {
    kvs_index_node **ix_buckets;
    size_t ix_nbuckets;
    size_t ix_count;
};

#define INITIAL_BUCKETS 1024

kvs_index *kvs_index_create(void)
{
    kvs_index *ix = kvs_xcalloc(1, sizeof *ix);
    ix->ix_nbuckets = INITIAL_BUCKETS;
    ix->ix_buckets = kvs_xcalloc(ix->ix_nbuckets, sizeof *ix->ix_buckets);
    return ix;
}

void kvs_index_destroy(kvs_index *ix)
{
    if (!ix)
        return;
    free(ix->ix_buckets);
    free(ix);
}

static uint64_t hash_of(uint32_t ns_id, const void *key, size_t key_len)
{
    /* Seeding with the namespace id separates equal keys of different namespaces. */
    return XXH3_64bits_withSeed(key, key_len, ns_id);
}

void kvs_index_node_init(kvs_index_node *node, uint32_t ns_id, const void *key, size_t key_len)
{
    node->next = NULL;
    node->ns_id = ns_id;
    node->key_len = (uint8_t)key_len;
    memcpy(node->key, key, key_len);
    node->hash = hash_of(ns_id, key, key_len);
}

static int same(const kvs_index_node *n, uint64_t hash, uint32_t ns_id, const void *key,
                size_t key_len)
{
    return n->hash == hash && n->ns_id == ns_id && n->key_len == key_len &&
           memcmp(n->key, key, key_len) == 0;
}

kvs_index_node *kvs_index_find(const kvs_index *ix, uint32_t ns_id, const void *key, size_t key_len)
{
    uint64_t h = hash_of(ns_id, key, key_len);
    for (kvs_index_node *n = ix->ix_buckets[h & (ix->ix_nbuckets - 1)]; n; n = n->next)
        if (same(n, h, ns_id, key, key_len))
            return n;
    return NULL;
}

static void grow(kvs_index *ix)
{
    size_t nb = ix->ix_nbuckets * 2;
    kvs_index_node **b = calloc(nb, sizeof *b);
    if (!b)
        return; /* keep the old table: longer chains, still correct */
    for (size_t i = 0; i < ix->ix_nbuckets; i++) {
        kvs_index_node *n = ix->ix_buckets[i];
        while (n) {
            kvs_index_node *next = n->next;
            size_t j = n->hash & (nb - 1);
            n->next = b[j];
            b[j] = n;
            n = next;
        }
    }
    free(ix->ix_buckets);
    ix->ix_buckets = b;
    ix->ix_nbuckets = nb;
}

kvs_index_node *kvs_index_insert(kvs_index *ix, kvs_index_node *node)
{
    kvs_index_node *old = kvs_index_find(ix, node->ns_id, node->key, node->key_len);
    if (old)
        kvs_index_remove(ix, old);
    if (ix->ix_count >= ix->ix_nbuckets)
        grow(ix);
    size_t j = node->hash & (ix->ix_nbuckets - 1);
    node->next = ix->ix_buckets[j];
    ix->ix_buckets[j] = node;
    ix->ix_count++;
    return old;
}

void kvs_index_remove(kvs_index *ix, kvs_index_node *node)
{
    kvs_index_node **p = &ix->ix_buckets[node->hash & (ix->ix_nbuckets - 1)];
    while (*p && *p != node)
        p = &(*p)->next;
    if (*p) {
        *p = node->next;
        node->next = NULL;
        ix->ix_count--;
    }
}

size_t kvs_index_count(const kvs_index *ix)
{
    return ix->ix_count;
}
