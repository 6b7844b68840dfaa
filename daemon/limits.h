/* Admission limits of streaming calls (DESIGN §9: limits on concurrent calls and receive
 * memory). A Put holds two things a client controls the duration of: a stream slot (from
 * the header until the call ends) and the memory its payload is received into (from its
 * first data chunk until the payload is encoded or the call ends). Both are bounded here,
 * apart from every tier: a Put that has not sent its data never takes room in a tier,
 * so it can never evict another client's committed blocks.
 *
 *   --max-puts N            Put streams open at once, all connections together
 *   --max-gets N            Get and GetMany streams likewise (their read-ahead buffers)
 *   --max-puts-per-conn N   ...from one connection, named by its peer address (gRPC's
 *                           "ipv4:127.0.0.1:5555"; Unix-socket clients share one name,
 *                           so for them this is a second total); --max-gets-per-conn N
 *                           the same for Gets
 *   --recv-budget SIZE      bytes of payload buffers held by Puts being received
 * A refusal is KVS_ENOSPC (RESOURCE_EXHAUSTED) naming the limit and its flag.
 *
 * Threading: every function is thread-safe (one leaf mutex, never held while calling out).
 */
#ifndef KVS_DAEMON_LIMITS_H
#define KVS_DAEMON_LIMITS_H

#include <stdint.h>

#include "gpu/base/err.h"

typedef struct kvs_limits kvs_limits;
typedef struct kvs_limits_slot kvs_limits_slot; /* one open Put stream */

/* The streams counted: a Put holds receive memory, a Get its read-ahead buffers (up to
 * four decoded blocks or eight encoded ones, call_get.c), both for as long as its client keeps the
 * stream open. */
typedef enum kvs_limits_kind { KVS_LIMITS_PUT = 0, KVS_LIMITS_GET = 1 } kvs_limits_kind;

typedef struct kvs_limits_opts {
    unsigned max_puts;          /* >= 1 */
    unsigned max_puts_per_conn; /* >= 1 */
    unsigned max_gets;          /* >= 1: Get and GetMany streams open at once */
    unsigned max_gets_per_conn; /* >= 1 */
    uint64_t recv_budget;       /* bytes, >= 1 */
} kvs_limits_opts;

typedef struct kvs_limits_stats {
    uint64_t recv_budget, recv_used; /* bytes */
    uint64_t puts_open;
    uint64_t puts_refused; /* streams refused a slot */
    uint64_t gets_open;
    uint64_t gets_refused;
    uint64_t recv_refused; /* Puts refused receive memory */
} kvs_limits_stats;

/* Never fails (small fixed allocation; aborts when out of memory). */
kvs_limits *kvs_limits_create(const kvs_limits_opts *o);
/* Every slot must be closed and every byte given back. */
void kvs_limits_destroy(kvs_limits *l);

/* A stream slot of `kind` from `peer` (borrowed; copied). *out is owned by the caller
 * until kvs_limits_close with the same kind. KVS_ENOSPC naming the limit and its flag when
 * either the total or the connection's is reached. */
int kvs_limits_open(kvs_limits *l, kvs_limits_kind kind, const char *peer, kvs_limits_slot **out,
                    kvs_err *err);
/* Gives a slot back; NULL is fine. */
void kvs_limits_close(kvs_limits *l, kvs_limits_kind kind, kvs_limits_slot *s);

/* Takes `bytes` of the receive budget, all or nothing: KVS_ENOSPC (with the budget and its
 * use) when they do not fit. A request larger than the whole budget is KVS_ENOSPC too. */
int kvs_limits_recv_take(kvs_limits *l, uint64_t bytes, kvs_err *err);
/* Gives back bytes taken earlier (exactly what was taken). */
void kvs_limits_recv_give(kvs_limits *l, uint64_t bytes);

void kvs_limits_get_stats(kvs_limits *l, kvs_limits_stats *out);

#endif
