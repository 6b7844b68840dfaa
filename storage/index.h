/* Block index: a chained hash table from (namespace id, key) to an intrusive node.
 *
 * The index does not allocate nodes: callers embed a kvs_index_node in their own entry
 * (storage/store.c's block) and recover the entry with container_of-style arithmetic.
 * The bucket array doubles when the load passes 1, so lookups stay O(1).
 *
 * Threading: not thread-safe; the owner (kvs_store) serializes all calls under its lock.
 */
#ifndef KVS_STORAGE_INDEX_H
#define KVS_STORAGE_INDEX_H

#include <stddef.h>
#include <stdint.h>

#include "gpu/codec/spec.h"

typedef struct kvs_index_node {
    struct kvs_index_node *next; /* private: bucket chain */
    uint64_t hash;               /* private: cached hash of (ns_id, key) */
    uint32_t ns_id;
    uint8_t key_len; /* 1..KVS_KEY_MAX */
    uint8_t key[KVS_KEY_MAX];
} kvs_index_node;

typedef struct kvs_index kvs_index;

/* Creates an empty index; free with kvs_index_destroy (which does not touch nodes). */
kvs_index *kvs_index_create(void);
void kvs_index_destroy(kvs_index *ix);

/* Fills a node's identity (ns_id, key) and hash; key_len must be 1..KVS_KEY_MAX. */
void kvs_index_node_init(kvs_index_node *node, uint32_t ns_id, const void *key, size_t key_len);

/* The node with (ns_id, key), or NULL. */
kvs_index_node *kvs_index_find(const kvs_index *ix, uint32_t ns_id, const void *key,
                               size_t key_len);

/* Links node (initialized with kvs_index_node_init, not linked). If a node with the same
 * identity is linked, it is unlinked and returned (the caller owns it again); otherwise
 * returns NULL. */
kvs_index_node *kvs_index_insert(kvs_index *ix, kvs_index_node *node);

/* Unlinks a linked node. */
void kvs_index_remove(kvs_index *ix, kvs_index_node *node);

size_t kvs_index_count(const kvs_index *ix);

#endif
