/* Intrusive LRU list: the eviction order of a tier (DESIGN §7, LRU policy).
 *
 * Entries embed a kvs_lru_node. The head is the most recently used entry, the tail the
 * least recently used, which eviction visits first. All operations are O(1).
 * Threading: not thread-safe; the owner serializes calls under its lock.
 */
#ifndef KVS_STORAGE_LRU_H
#define KVS_STORAGE_LRU_H

#include <stdbool.h>
#include <stddef.h>

typedef struct kvs_lru_node {
    struct kvs_lru_node *prev, *next; /* private */
} kvs_lru_node;

typedef struct kvs_lru {
    kvs_lru_node head; /* private: sentinel; head.next = newest, head.prev = oldest */
    size_t count;
} kvs_lru;

void kvs_lru_init(kvs_lru *lru);
/* Links node as the most recently used entry. node must not be linked. */
void kvs_lru_push(kvs_lru *lru, kvs_lru_node *node);
/* Marks a linked node as the most recently used. */
void kvs_lru_touch(kvs_lru *lru, kvs_lru_node *node);
/* Unlinks a linked node. */
void kvs_lru_remove(kvs_lru *lru, kvs_lru_node *node);
/* Least recently used node, or NULL if empty. */
kvs_lru_node *kvs_lru_oldest(const kvs_lru *lru);
/* The next more recently used node after node, or NULL at the head. */
kvs_lru_node *kvs_lru_newer(const kvs_lru *lru, const kvs_lru_node *node);
bool kvs_lru_linked(const kvs_lru_node *node);

#endif
