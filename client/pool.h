/* A bounded pool of worker threads that run the tasks of a call in parallel: the sharded
 * client (client/cluster.c) runs one task per daemon of a batched call here.
 *
 * kvs_pool_run hands a caller's tasks to the workers and runs them itself as well, so a call
 * always progresses: with every worker busy on other callers' tasks, the caller runs its own
 * tasks one after another, and with none busy at most `threads` + 1 of them run at once.
 * Tasks of one call never wait for each other, so no call can deadlock on the pool.
 *
 * Thread-safety: any number of threads may call kvs_pool_run on one pool at once.
 */
#ifndef KVS_CLIENT_POOL_H
#define KVS_CLIENT_POOL_H

#include <stddef.h>

#include "gpu/base/err.h"

typedef struct kvs_pool kvs_pool;

/* One task: called once with its argument, on a worker or on the caller's thread. */
typedef void (*kvs_pool_fn)(void *arg);

/* Starts `threads` workers (0: none; every task then runs on its caller). *out is freed
 * with kvs_pool_destroy. */
int kvs_pool_create(unsigned threads, kvs_pool **out, kvs_err *err);

/* Stops the workers once their current task returns: call it only when no kvs_pool_run is
 * in progress. NULL is allowed. */
void kvs_pool_destroy(kvs_pool *p);

/* Runs fn(args[i]) for every i in [0, n) and returns once all have returned. args is
 * borrowed until then. */
void kvs_pool_run(kvs_pool *p, kvs_pool_fn fn, void *const *args, size_t n);

#endif
