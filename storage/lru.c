/* Intrusive LRU list: see lru.h. Invariant: the sentinel closes a circular list. */
#include "storage/lru.h"

void kvs_lru_init(kvs_lru *lru)
{
    lru->head.prev = lru->head.next = &lru->head;
    lru->count = 0;
}

void kvs_lru_push(kvs_lru *lru, kvs_lru_node *node)
{
    node->prev = &lru->head;
    node->next = lru->head.next;
    lru->head.next->prev = node;
    lru->head.next = node;
    lru->count++;
}

void kvs_lru_remove(kvs_lru *lru, kvs_lru_node *node)
{
    node->prev->next = node->next;
    node->next->prev = node->prev;
    node->prev = node->next = NULL;
    lru->count--;
}

void kvs_lru_touch(kvs_lru *lru, kvs_lru_node *node)
{
    kvs_lru_remove(lru, node);
    kvs_lru_push(lru, node);
}

kvs_lru_node *kvs_lru_oldest(const kvs_lru *lru)
{
    return lru->head.prev == &lru->head ? NULL : lru->head.prev;
}

kvs_lru_node *kvs_lru_newer(const kvs_lru *lru, const kvs_lru_node *node)
{
    return node->prev == &lru->head ? NULL : node->prev;
}

bool kvs_lru_linked(const kvs_lru_node *node)
{
    return node->next != NULL;
}
