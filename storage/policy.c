/* Eviction policies: see policy.h.
 *
 * Queues are kvs_lru lists used as FIFOs: push at the head, evict from the tail (the oldest);
 * LRU additionally moves a node to the head on a hit. Invariants: a linked node is in the list
 * p->q[node->queue] and nowhere else; st.bytes[q] and st.count[q] sum the nodes of list q.
 *
 * Ghost: a ring of (hash, bytes) entries in insertion order, numbered by a sequence number
 * (entry seq lives in ring[seq % ring_cap]), plus an open-addressing hash set (linear
 * probing, backward-shift deletion, load <= 1/2) mapping each remembered hash to the seq of
 * its ring entry. A hash that leaves the set early (a ghost hit) leaves a stale ring entry
 * behind; it is recognized when the ring drops it because the set no longer maps its hash to
 * its seq. Every operation is O(1) (expected, for the set).
 */
#include "storage/policy.h"

#include <assert.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/base/mem.h"

#define FREQ_MAX 3
#define GHOST_OBJ_BYTES_DEFAULT (64u << 10)
#define GHOST_MIN_ENTRIES 1024u
#define GHOST_MAX_ENTRIES (1ull << 40)

enum { QS = 0, QM = 1 };                               /* cursor slots */
enum { CUR_IDLE = 0, CUR_SCANNING = 1, CUR_DONE = 2 }; /* cursor state per queue */

#define NODE_OF(l) ((kvs_policy_node *)((char *)(l)-offsetof(kvs_policy_node, link)))

typedef struct ghost_entry {
    uint64_t hash, bytes;
} ghost_entry;

typedef struct ghost_slot {
    uint64_t hash;
    uint64_t seq1; /* seq of the ring entry + 1; 0 = empty slot */
} ghost_slot;

typedef struct ghost {
    ghost_entry *ring;
    uint64_t ring_cap;
    uint64_t head, tail; /* ring entries tail..head-1 (live or stale) */
    ghost_slot *set;
    uint64_t set_mask;
    unsigned set_bits;
    uint64_t count, bytes; /* live entries and their bytes */
    uint64_t max_bytes;
} ghost;

struct kvs_policy {
    kvs_policy_kind kind;
    uint64_t capacity;
    uint64_t small_target; /* S3-FIFO: S's share in bytes */
    uint32_t promote_threshold;
    kvs_lru q[3]; /* by kvs_policy_queue; q[0] unused */
    kvs_policy_stats st;
    uint64_t gen;                       /* bumped by every change a cursor cannot follow */
    const kvs_policy_node *last_victim; /* compared, never dereferenced */
    ghost g;
};

/* ---------------------------------------------------------------- ghost */

static uint64_t ghost_home(const ghost *g, uint64_t hash)
{
    /* Fibonacci hashing: callers' hashes may be weak (tests use small integers). */
    return (hash * 0x9E3779B97F4A7C15ull) >> (64 - g->set_bits);
}

/* Set slot holding hash, or -1. */
static int64_t ghost_find(const ghost *g, uint64_t hash)
{
    for (uint64_t i = ghost_home(g, hash);; i = (i + 1) & g->set_mask) {
        if (g->set[i].seq1 == 0)
            return -1;
        if (g->set[i].hash == hash)
            return (int64_t)i;
    }
}

static void ghost_set_delete(ghost *g, uint64_t i)
{
    /* Backward shift: pull later members of the probe run into the hole unless their home
     * lies cyclically in (hole, j], where they must stay. */
    uint64_t j = i;
    for (;;) {
        j = (j + 1) & g->set_mask;
        if (g->set[j].seq1 == 0)
            break;
        uint64_t k = ghost_home(g, g->set[j].hash);
        bool stays = i <= j ? (i < k && k <= j) : (i < k || k <= j);
        if (stays)
            continue;
        g->set[i] = g->set[j];
        i = j;
    }
    g->set[i].seq1 = 0;
}

static void ghost_set_put(ghost *g, uint64_t hash, uint64_t seq)
{
    uint64_t i = ghost_home(g, hash);
    while (g->set[i].seq1 != 0)
        i = (i + 1) & g->set_mask;
    g->set[i].hash = hash;
    g->set[i].seq1 = seq + 1;
}

/* Forgets the live entry in set slot i. */
static void ghost_forget(ghost *g, uint64_t i)
{
    uint64_t seq = g->set[i].seq1 - 1;
    g->count--;
    g->bytes -= g->ring[seq % g->ring_cap].bytes;
    ghost_set_delete(g, i);
}

/* Drops the oldest ring entry (forgetting its hash if it is still live). */
static void ghost_drop_tail(ghost *g)
{
    uint64_t seq = g->tail++;
    const ghost_entry *e = &g->ring[seq % g->ring_cap];
    int64_t i = ghost_find(g, e->hash);
    if (i >= 0 && g->set[i].seq1 == seq + 1)
        ghost_forget(g, (uint64_t)i);
}

/* True if hash was remembered; it is forgotten (the object is coming back). */
static bool ghost_take(ghost *g, uint64_t hash)
{
    if (!g->set)
        return false;
    int64_t i = ghost_find(g, hash);
    if (i < 0)
        return false;
    ghost_forget(g, (uint64_t)i);
    return true;
}

static void ghost_add(ghost *g, uint64_t hash, uint64_t bytes)
{
    if (!g->set)
        return;
    int64_t i = ghost_find(g, hash);
    if (i >= 0) /* a hash collision or a key evicted twice: keep the newer record */
        ghost_forget(g, (uint64_t)i);
    if (g->head - g->tail == g->ring_cap)
        ghost_drop_tail(g);
    uint64_t seq = g->head++;
    g->ring[seq % g->ring_cap] = (ghost_entry){hash, bytes};
    ghost_set_put(g, hash, seq);
    g->count++;
    g->bytes += bytes;
    while (g->bytes > g->max_bytes)
        ghost_drop_tail(g);
}

static int ghost_init(ghost *g, uint64_t entries, uint64_t max_bytes, kvs_err *err)
{
    unsigned bits = 1;
    while ((1ull << bits) < 2 * entries)
        bits++;
    uint64_t ring_bytes, set_bytes;
    if (!kvs_mul_size(entries, sizeof(ghost_entry), &ring_bytes) ||
        !kvs_mul_size(1ull << bits, sizeof(ghost_slot), &set_bytes) || ring_bytes > SIZE_MAX ||
        set_bytes > SIZE_MAX)
        return kvs_err_set(err, KVS_EINVAL, "ghost_entries: %llu is too many",
                           (unsigned long long)entries);
    g->ring = kvs_trymalloc((size_t)ring_bytes);
    g->set = kvs_trymalloc((size_t)set_bytes);
    if (!g->ring || !g->set) {
        free(g->ring);
        free(g->set);
        g->ring = NULL;
        g->set = NULL;
        return kvs_err_set(err, KVS_ENOMEM, "policy: cannot allocate a ghost of %llu entries",
                           (unsigned long long)entries);
    }
    memset(g->set, 0, (size_t)set_bytes);
    g->ring_cap = entries;
    g->set_bits = bits;
    g->set_mask = (1ull << bits) - 1;
    g->max_bytes = max_bytes;
    return 0;
}

/* ---------------------------------------------------------------- queues */

static void link_head(kvs_policy *p, kvs_policy_node *n, kvs_policy_queue q)
{
    kvs_lru_push(&p->q[q], &n->link);
    n->queue = (uint8_t)q;
    p->st.bytes[q] += n->bytes;
    p->st.count[q]++;
}

static void unlink_node(kvs_policy *p, kvs_policy_node *n)
{
    kvs_policy_queue q = (kvs_policy_queue)n->queue;
    kvs_lru_remove(&p->q[q], &n->link);
    p->st.bytes[q] -= n->bytes;
    p->st.count[q]--;
    n->queue = KVS_POLICY_Q_NONE;
    n->freq = 0;
}

/* ---------------------------------------------------------------- API */

int kvs_policy_kind_parse(const char *name, kvs_policy_kind *out, kvs_err *err)
{
    if (name && strcmp(name, "lru") == 0) {
        *out = KVS_POLICY_LRU;
        return 0;
    }
    if (name && (strcmp(name, "s3fifo") == 0 || strcmp(name, "s3-fifo") == 0)) {
        *out = KVS_POLICY_S3FIFO;
        return 0;
    }
    return kvs_err_set(err, KVS_EINVAL, "eviction policy: '%.64s' is not one of lru, s3fifo",
                       name ? name : "(null)");
}

const char *kvs_policy_name(kvs_policy_kind kind)
{
    switch (kind) {
    case KVS_POLICY_LRU:
        return "lru";
    case KVS_POLICY_S3FIFO:
        return "s3fifo";
    }
    return "?";
}

int kvs_policy_create(kvs_policy_kind kind, uint64_t capacity_bytes, const kvs_policy_opts *opts,
                      kvs_policy **out, kvs_err *err)
{
    kvs_policy_opts o = opts ? *opts : (kvs_policy_opts){0};
    if (kind != KVS_POLICY_LRU && kind != KVS_POLICY_S3FIFO)
        return kvs_err_set(err, KVS_EINVAL, "kind: %d is not an eviction policy", (int)kind);
    if (capacity_bytes == 0)
        return kvs_err_set(err, KVS_EINVAL, "capacity_bytes: must be > 0");
    if (o.small_percent == 0)
        o.small_percent = 10;
    if (o.promote_threshold == 0)
        o.promote_threshold = 1;
    if (o.small_percent > 50)
        return kvs_err_set(err, KVS_EINVAL, "small_percent: %u is not in 1..50", o.small_percent);
    if (o.promote_threshold > FREQ_MAX)
        return kvs_err_set(err, KVS_EINVAL, "promote_threshold: %u is not in 1..%d",
                           o.promote_threshold, FREQ_MAX);
    if (o.ghost_entries > GHOST_MAX_ENTRIES)
        return kvs_err_set(err, KVS_EINVAL, "ghost_entries: %llu is over %llu",
                           (unsigned long long)o.ghost_entries,
                           (unsigned long long)GHOST_MAX_ENTRIES);

    kvs_policy *p = kvs_xcalloc(1, sizeof *p);
    p->kind = kind;
    p->capacity = capacity_bytes;
    /* capacity * percent / 100 without overflowing near 2^64 */
    p->small_target =
        capacity_bytes / 100 * o.small_percent + capacity_bytes % 100 * o.small_percent / 100;
    p->promote_threshold = o.promote_threshold;
    for (int q = 0; q < 3; q++)
        kvs_lru_init(&p->q[q]);
    if (kind == KVS_POLICY_S3FIFO) {
        uint64_t main_target = capacity_bytes - p->small_target;
        uint64_t entries = o.ghost_entries;
        if (entries == 0) {
            entries = main_target / GHOST_OBJ_BYTES_DEFAULT;
            if (entries < GHOST_MIN_ENTRIES)
                entries = GHOST_MIN_ENTRIES;
            if (entries > GHOST_MAX_ENTRIES)
                entries = GHOST_MAX_ENTRIES;
        }
        int rc = ghost_init(&p->g, entries, main_target, err);
        if (rc) {
            free(p);
            return rc;
        }
    }
    *out = p;
    return 0;
}

void kvs_policy_destroy(kvs_policy *p)
{
    if (!p)
        return;
    free(p->g.ring);
    free(p->g.set);
    free(p);
}

int kvs_policy_insert(kvs_policy *p, kvs_policy_node *node, uint64_t key_hash, uint64_t bytes,
                      kvs_err *err)
{
    if (kvs_policy_node_linked(node))
        return kvs_err_set(err, KVS_EINVAL, "policy insert: node is already linked");
    if (bytes == 0)
        return kvs_err_set(err, KVS_EINVAL, "policy insert: bytes must be > 0");
    node->key_hash = key_hash;
    node->bytes = bytes;
    node->freq = 0;
    kvs_policy_queue q = KVS_POLICY_Q_MAIN;
    if (p->kind == KVS_POLICY_S3FIFO) {
        if (ghost_take(&p->g, key_hash))
            p->st.ghost_hits++;
        else
            q = KVS_POLICY_Q_SMALL;
    }
    link_head(p, node, q);
    p->st.inserted++;
    p->gen++;
    return 0;
}

void kvs_policy_hit(kvs_policy *p, kvs_policy_node *node)
{
    assert(kvs_policy_node_linked(node));
    if (p->kind == KVS_POLICY_LRU)
        kvs_lru_touch(&p->q[KVS_POLICY_Q_MAIN], &node->link);
    else if (node->freq < FREQ_MAX)
        node->freq++;
    p->gen++;
}

void kvs_policy_remove(kvs_policy *p, kvs_policy_node *node)
{
    assert(kvs_policy_node_linked(node));
    unlink_node(p, node);
    p->gen++;
}

void kvs_policy_evicted(kvs_policy *p, kvs_policy_node *node)
{
    assert(kvs_policy_node_linked(node));
    kvs_policy_queue q = (kvs_policy_queue)node->queue;
    if (node == p->last_victim)
        p->last_victim = NULL; /* the scan's cursor is past it: the scan goes on */
    else
        p->gen++;
    unlink_node(p, node);
    p->st.evicted[q]++;
    if (p->kind == KVS_POLICY_S3FIFO && q == KVS_POLICY_Q_SMALL)
        ghost_add(&p->g, node->key_hash, node->bytes);
}

void kvs_policy_scan_begin(const kvs_policy *p, kvs_policy_cursor *cur)
{
    memset(cur, 0, sizeof *cur);
    cur->gen = p->gen;
}

static kvs_policy_queue queue_of_slot(int slot)
{
    return slot == QS ? KVS_POLICY_Q_SMALL : KVS_POLICY_Q_MAIN;
}

/* The cursor slot to take the next candidate from, or -1 when both are done. S3-FIFO's
 * EVICT (Algorithm 1): from S if S holds at least its target, else from M. */
static int pick_slot(const kvs_policy *p, const kvs_policy_cursor *cur)
{
    if (p->kind == KVS_POLICY_LRU)
        return cur->state[QM] == CUR_DONE ? -1 : QM;
    int want = p->st.bytes[KVS_POLICY_Q_SMALL] >= p->small_target ? QS : QM;
    if (cur->state[want] != CUR_DONE)
        return want;
    return cur->state[1 - want] != CUR_DONE ? 1 - want : -1;
}

static void advance(kvs_policy_cursor *cur, int slot, kvs_lru_node *next)
{
    cur->next[slot] = next;
    if (!next)
        cur->state[slot] = CUR_DONE;
}

kvs_policy_node *kvs_policy_victim(kvs_policy *p, kvs_policy_cursor *cur)
{
    if (cur->gen != p->gen) /* the policy changed under the scan: start over */
        kvs_policy_scan_begin(p, cur);
    p->last_victim = NULL;
    for (;;) {
        int slot = pick_slot(p, cur);
        if (slot < 0)
            return NULL;
        kvs_lru *list = &p->q[queue_of_slot(slot)];
        if (cur->state[slot] == CUR_IDLE) {
            cur->state[slot] = CUR_SCANNING;
            advance(cur, slot, kvs_lru_oldest(list));
            continue;
        }
        kvs_lru_node *l = cur->next[slot];
        kvs_policy_node *n = NODE_OF(l);
        kvs_lru_node *newer = kvs_lru_newer(list, l);
        if (p->kind == KVS_POLICY_S3FIFO && slot == QS && n->freq >= p->promote_threshold) {
            /* Accessed while in S: to the head of M with a fresh counter. */
            advance(cur, QS, newer);
            unlink_node(p, n);
            link_head(p, n, KVS_POLICY_Q_MAIN);
            p->st.promoted++;
            if (cur->state[QM] == CUR_DONE) { /* M's scan had ended: n is all it has left */
                cur->state[QM] = CUR_SCANNING;
                cur->next[QM] = l;
            }
            continue;
        }
        if (p->kind == KVS_POLICY_S3FIFO && slot == QM && n->freq > 0) {
            /* Lazy promotion: reinsert at the head, one access fewer. If n already was the
             * head it stays there, and is looked at again with the lower counter. */
            n->freq--;
            kvs_lru_touch(list, l);
            p->st.reinserted++;
            cur->next[QM] = newer ? newer : l;
            continue;
        }
        advance(cur, slot, newer);
        p->last_victim = n;
        return n;
    }
}

kvs_policy_kind kvs_policy_kind_of(const kvs_policy *p)
{
    return p->kind;
}

uint64_t kvs_policy_capacity(const kvs_policy *p)
{
    return p->capacity;
}

uint64_t kvs_policy_bytes(const kvs_policy *p)
{
    return p->st.bytes[KVS_POLICY_Q_SMALL] + p->st.bytes[KVS_POLICY_Q_MAIN];
}

uint64_t kvs_policy_count(const kvs_policy *p)
{
    return p->st.count[KVS_POLICY_Q_SMALL] + p->st.count[KVS_POLICY_Q_MAIN];
}

void kvs_policy_get_stats(const kvs_policy *p, kvs_policy_stats *out)
{
    *out = p->st;
    out->ghost_count = p->g.count;
    out->ghost_bytes = p->g.bytes;
}

kvs_policy_queue kvs_policy_node_queue(const kvs_policy_node *node)
{
    return (kvs_policy_queue)node->queue;
}
