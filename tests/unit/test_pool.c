/* client/pool.c, the sharded client's worker pool: every task runs once, up to threads + 1 of
 * a call's tasks run at once (the caller helps), never more, and calls from several threads
 * at once on a small pool all finish (the caller runs its own tasks when the workers are
 * busy elsewhere).
 */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "client/pool.h"

typedef struct gauge {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int running, peak, started, target;
} gauge;

typedef struct task {
    gauge *g;
    atomic_int runs;
} task;

/* Counts itself running, then waits (at most 1 s) until `target` tasks have started: with
 * fewer running at once than target, each returns after the timeout and the peak shows it. */
static void meet(void *arg)
{
    task *t = arg;
    gauge *g = t->g;
    atomic_fetch_add(&t->runs, 1);
    pthread_mutex_lock(&g->mu);
    g->started++;
    if (++g->running > g->peak)
        g->peak = g->running;
    pthread_cond_broadcast(&g->cv);
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += 1;
    while (g->started < g->target && pthread_cond_timedwait(&g->cv, &g->mu, &until) == 0)
        ;
    g->running--;
    pthread_mutex_unlock(&g->mu);
}

static void run_tasks(kvs_pool *p, int n, int target, int *peak)
{
    gauge g = {.target = target};
    pthread_mutex_init(&g.mu, NULL);
    pthread_cond_init(&g.cv, NULL);
    task *t = calloc((size_t)n, sizeof *t);
    void **args = calloc((size_t)n, sizeof *args);
    assert_non_null(t);
    assert_non_null(args);
    for (int i = 0; i < n; i++) {
        t[i].g = &g;
        args[i] = &t[i];
    }
    kvs_pool_run(p, meet, args, (size_t)n);
    for (int i = 0; i < n; i++)
        assert_int_equal(atomic_load(&t[i].runs), 1);
    *peak = g.peak;
    free(args);
    free(t);
    pthread_cond_destroy(&g.cv);
    pthread_mutex_destroy(&g.mu);
}

static void test_all_run_in_parallel(void **state)
{
    kvs_pool *p;
    kvs_err err;
    assert_int_equal(kvs_pool_create(3, &p, &err), 0);
    int peak;
    run_tasks(p, 4, 4, &peak); /* three workers and the caller: all four meet */
    assert_int_equal(peak, 4);
    run_tasks(p, 9, 5, &peak); /* never more than four at once: the fifth waits */
    assert_int_equal(peak, 4);
    run_tasks(p, 1, 1, &peak);
    assert_int_equal(peak, 1);
    kvs_pool_destroy(p);
}

static void test_no_workers(void **state)
{
    kvs_pool *p;
    kvs_err err;
    assert_int_equal(kvs_pool_create(0, &p, &err), 0);
    int peak;
    run_tasks(p, 3, 1, &peak);
    assert_int_equal(peak, 1);
    kvs_pool_destroy(p);
}

typedef struct caller {
    kvs_pool *p;
    int peak;
} caller;

static void *call_many(void *arg)
{
    caller *c = arg;
    for (int i = 0; i < 20; i++)
        run_tasks(c->p, 6, 1, &c->peak);
    return NULL;
}

/* Eight callers on two workers: every call completes (callers run their own tasks). */
static void test_many_callers(void **state)
{
    kvs_pool *p;
    kvs_err err;
    assert_int_equal(kvs_pool_create(2, &p, &err), 0);
    pthread_t th[8];
    caller c[8];
    for (int i = 0; i < 8; i++) {
        c[i] = (caller){.p = p};
        assert_int_equal(pthread_create(&th[i], NULL, call_many, &c[i]), 0);
    }
    for (int i = 0; i < 8; i++)
        assert_int_equal(pthread_join(th[i], NULL), 0);
    kvs_pool_destroy(p);
    kvs_pool_destroy(NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_all_run_in_parallel),
        cmocka_unit_test(test_no_workers),
        cmocka_unit_test(test_many_callers),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
