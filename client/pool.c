/* The sharded client's worker pool (contract: client/pool.h).
 *
 * A call's tasks form a `batch` on the caller's stack, queued until every task is claimed.
 * Workers and the caller claim tasks under the pool's one mutex (p->mu; nothing else is
 * locked with it), run them unlocked, and count them done under it again; the caller
 * returns when its batch's count reaches zero. A worker touches a batch only between
 * claiming a task and counting it done, and the caller cannot return before that count, so a
 * batch on the stack outlives every use of it.
 *
 * Threads: `threads` workers, started by kvs_pool_create and joined by kvs_pool_destroy, run
 * only claimed tasks; callers of kvs_pool_run run their own.
 */
#include "client/pool.h"

#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/base/mem.h"

typedef struct batch {
    kvs_pool_fn fn;
    void *const *args;
    size_t n;
    size_t next;      /* first unclaimed task */
    size_t remaining; /* tasks not yet done */
    pthread_cond_t done;
    struct batch *q_next; /* the queue of batches with unclaimed tasks */
} batch;

struct kvs_pool {
    pthread_mutex_t mu;
    pthread_cond_t work; /* a batch was queued, or stopping */
    batch *head, *tail;  /* batches with unclaimed tasks, oldest first */
    bool stopping;
    pthread_t *threads;
    unsigned n_threads;
};

/* Claims the next task of b (which is queued); unqueues b once none is left. Locked. */
static size_t claim_locked(kvs_pool *p, batch *b)
{
    size_t i = b->next++;
    if (b->next == b->n) {
        /* b is not necessarily the head: its caller may claim its own tasks. */
        batch **pp = &p->head, *prev = NULL;
        while (*pp != b) {
            prev = *pp;
            pp = &(*pp)->q_next;
        }
        *pp = b->q_next;
        if (p->tail == b)
            p->tail = prev;
    }
    return i;
}

static void finish_locked(batch *b)
{
    if (--b->remaining == 0)
        pthread_cond_signal(&b->done);
}

static void *worker(void *arg)
{
    kvs_pool *p = arg;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->head && !p->stopping)
            pthread_cond_wait(&p->work, &p->mu);
        if (p->stopping)
            break;
        batch *b = p->head;
        size_t i = claim_locked(p, b);
        pthread_mutex_unlock(&p->mu);
        b->fn(b->args[i]);
        pthread_mutex_lock(&p->mu);
        finish_locked(b);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

int kvs_pool_create(unsigned threads, kvs_pool **out, kvs_err *err)
{
    kvs_pool *p = kvs_xcalloc(1, sizeof *p);
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->work, NULL);
    p->threads = kvs_xcalloc(threads ? threads : 1, sizeof *p->threads);
    for (unsigned i = 0; i < threads; i++) {
        int rc = pthread_create(&p->threads[i], NULL, worker, p);
        if (rc != 0) {
            kvs_pool_destroy(p);
            return kvs_err_set(err, KVS_ENOMEM, "pool: cannot start worker %u of %u: %s", i + 1,
                               threads, strerror(rc));
        }
        p->n_threads++;
    }
    *out = p;
    return 0;
}

void kvs_pool_destroy(kvs_pool *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&p->mu);
    p->stopping = true;
    pthread_cond_broadcast(&p->work);
    pthread_mutex_unlock(&p->mu);
    for (unsigned i = 0; i < p->n_threads; i++)
        pthread_join(p->threads[i], NULL);
    free(p->threads);
    pthread_cond_destroy(&p->work);
    pthread_mutex_destroy(&p->mu);
    free(p);
}

void kvs_pool_run(kvs_pool *p, kvs_pool_fn fn, void *const *args, size_t n)
{
    if (n == 0)
        return;
    if (n == 1 || p->n_threads == 0) {
        /* Nothing to overlap: no handoff, no locking. */
        for (size_t i = 0; i < n; i++)
            fn(args[i]);
        return;
    }
    batch b = {.fn = fn, .args = args, .n = n, .remaining = n};
    pthread_cond_init(&b.done, NULL);
    pthread_mutex_lock(&p->mu);
    if (p->tail)
        p->tail->q_next = &b;
    else
        p->head = &b;
    p->tail = &b;
    /* The caller takes one task itself, so n - 1 workers are enough. */
    if (n - 1 >= p->n_threads)
        pthread_cond_broadcast(&p->work);
    else
        for (size_t i = 0; i < n - 1; i++)
            pthread_cond_signal(&p->work);
    while (b.next < b.n) {
        size_t i = claim_locked(p, &b);
        pthread_mutex_unlock(&p->mu);
        fn(args[i]);
        pthread_mutex_lock(&p->mu);
        finish_locked(&b);
    }
    while (b.remaining > 0)
        pthread_cond_wait(&b.done, &p->mu);
    pthread_mutex_unlock(&p->mu);
    pthread_cond_destroy(&b.done);
}
