/* Admission limits of streaming calls: see limits.h.
 *
 * Invariants (under l->mu):
 *  1. Per kind, the open count (puts_open, gets_open) = the sum of that kind's counts of
 *     every peer entry = slots of that kind handed out and not closed.
 *  2. A peer entry exists exactly while one of its counts is > 0 (the table holds no dead
 *     peers, so its size is bounded by the open slots).
 *  3. recv_used <= recv_budget.
 */
#include "daemon/limits.h"

#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#include "gpu/base/mem.h"

#define BUCKETS 256 /* peers hash into these; chains stay short at any sane peer count */

struct kvs_limits_slot {
    kvs_limits_slot *next; /* bucket chain */
    uint64_t hash;
    unsigned count[2]; /* this peer's open streams, by kvs_limits_kind */
    char peer[];
};

struct kvs_limits {
    pthread_mutex_t mu;
    kvs_limits_opts o;
    kvs_limits_slot *bucket[BUCKETS];
    kvs_limits_stats st;
};

kvs_limits *kvs_limits_create(const kvs_limits_opts *o)
{
    kvs_limits *l = kvs_xcalloc(1, sizeof *l);
    pthread_mutex_init(&l->mu, NULL);
    l->o = *o;
    l->st.recv_budget = o->recv_budget;
    return l;
}

void kvs_limits_destroy(kvs_limits *l)
{
    if (!l)
        return;
    for (size_t i = 0; i < BUCKETS; i++)
        while (l->bucket[i]) { /* none left if every slot was closed (invariant 2) */
            kvs_limits_slot *n = l->bucket[i]->next;
            free(l->bucket[i]);
            l->bucket[i] = n;
        }
    pthread_mutex_destroy(&l->mu);
    free(l);
}

int kvs_limits_open(kvs_limits *l, kvs_limits_kind kind, const char *peer, kvs_limits_slot **out,
                    kvs_err *err)
{
    static const char *const what[2] = {"Put", "Get"}, *const flag[2] = {"puts", "gets"};
    if (!peer)
        peer = "";
    size_t n = strlen(peer);
    uint64_t h = XXH3_64bits(peer, n);
    kvs_limits_slot **b = &l->bucket[h % BUCKETS];
    unsigned max = kind == KVS_LIMITS_GET ? l->o.max_gets : l->o.max_puts;
    unsigned per_conn = kind == KVS_LIMITS_GET ? l->o.max_gets_per_conn : l->o.max_puts_per_conn;
    uint64_t *open = kind == KVS_LIMITS_GET ? &l->st.gets_open : &l->st.puts_open;
    pthread_mutex_lock(&l->mu);
    kvs_limits_slot *s = *b;
    while (s && (s->hash != h || strcmp(s->peer, peer) != 0))
        s = s->next;
    int rc = 0;
    if (*open >= max)
        rc = kvs_err_set(err, KVS_ENOSPC,
                         "%s: %u %s streams are open, the daemon's limit (--max-%s): retry later",
                         what[kind], max, what[kind], flag[kind]);
    else if (s && s->count[kind] >= per_conn)
        rc = kvs_err_set(err, KVS_ENOSPC,
                         "%s: %u %s streams are open on this connection, its limit "
                         "(--max-%s-per-conn): retry later",
                         what[kind], per_conn, what[kind], flag[kind]);
    if (rc) {
        (*(kind == KVS_LIMITS_GET ? &l->st.gets_refused : &l->st.puts_refused))++;
        pthread_mutex_unlock(&l->mu);
        return rc;
    }
    if (!s) {
        s = kvs_xcalloc(1, sizeof *s + n + 1); /* small (STYLE: may abort) */
        memcpy(s->peer, peer, n + 1);
        s->hash = h;
        s->next = *b;
        *b = s;
    }
    s->count[kind]++;
    (*open)++;
    pthread_mutex_unlock(&l->mu);
    *out = s;
    return 0;
}

void kvs_limits_close(kvs_limits *l, kvs_limits_kind kind, kvs_limits_slot *s)
{
    if (!s)
        return;
    kvs_limits_slot *dead = NULL;
    pthread_mutex_lock(&l->mu);
    (*(kind == KVS_LIMITS_GET ? &l->st.gets_open : &l->st.puts_open))--;
    if (--s->count[kind] == 0 && s->count[!kind] == 0) { /* invariant 2 */
        kvs_limits_slot **p = &l->bucket[s->hash % BUCKETS];
        while (*p != s)
            p = &(*p)->next;
        *p = s->next;
        dead = s;
    }
    pthread_mutex_unlock(&l->mu);
    free(dead);
}

int kvs_limits_recv_take(kvs_limits *l, uint64_t bytes, kvs_err *err)
{
    pthread_mutex_lock(&l->mu);
    uint64_t used = l->st.recv_used, budget = l->st.recv_budget;
    bool ok = bytes <= budget && used <= budget - bytes;
    if (ok)
        l->st.recv_used += bytes;
    else
        l->st.recv_refused++;
    pthread_mutex_unlock(&l->mu);
    if (ok)
        return 0;
    if (bytes > budget)
        return kvs_err_set(err, KVS_ENOSPC,
                           "payload: %llu bytes exceed the whole receive budget of %llu bytes "
                           "(--recv-budget)",
                           (unsigned long long)bytes, (unsigned long long)budget);
    return kvs_err_set(err, KVS_ENOSPC,
                       "payload: the receive budget is in use (%llu of %llu bytes held by Puts "
                       "being received, --recv-budget): retry later",
                       (unsigned long long)used, (unsigned long long)budget);
}

void kvs_limits_recv_give(kvs_limits *l, uint64_t bytes)
{
    pthread_mutex_lock(&l->mu);
    l->st.recv_used -= bytes;
    pthread_mutex_unlock(&l->mu);
}

void kvs_limits_get_stats(kvs_limits *l, kvs_limits_stats *out)
{
    pthread_mutex_lock(&l->mu);
    *out = l->st;
    pthread_mutex_unlock(&l->mu);
}
