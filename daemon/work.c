/* Blocking work mailbox: see work.h. The queue is a singly linked FIFO guarded by mu;
 * items are small fixed allocations (one per submission). */
#include "daemon/work.h"

#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>

#include "daemon/log.h"
#include "gpu/base/mem.h"

typedef struct item {
    uv_work_t req; /* first: the uv_work_t pointer is the item */
    kvs_work_fn fn, done;
    void *arg;
    struct item *next;
} item;

struct kvs_work {
    uv_async_t async;
    uv_loop_t *loop;
    pthread_mutex_t mu;
    item *head, *tail; /* guarded by mu */
    bool closed;       /* guarded by mu */
};

static void run_fn(uv_work_t *req)
{
    item *it = (item *)req;
    it->fn(it->arg);
}

static void run_done(uv_work_t *req, int status)
{
    item *it = (item *)req;
    it->done(it->arg); /* status is UV_ECANCELED only after uv_cancel, which we never call */
    free(it);
}

static void start(kvs_work *w, item *it)
{
    if (!it->fn) { /* a post: done runs here, on the loop thread */
        it->done(it->arg);
        free(it);
        return;
    }
    int rc = uv_queue_work(w->loop, &it->req, run_fn, run_done);
    if (rc) { /* cannot happen on a live loop; never lose the call: run it here */
        kvs_log(KVS_LOG_ERROR, "uv_queue_work: %s: running inline", uv_strerror(rc));
        it->fn(it->arg);
        it->done(it->arg);
        free(it);
    }
}

static void on_async(uv_async_t *a)
{
    kvs_work *w = a->data;
    pthread_mutex_lock(&w->mu);
    item *it = w->head;
    w->head = w->tail = NULL;
    pthread_mutex_unlock(&w->mu);
    while (it) {
        item *next = it->next;
        start(w, it);
        it = next;
    }
}

int kvs_work_create(uv_loop_t *loop, kvs_work **out, kvs_err *err)
{
    kvs_work *w = kvs_xcalloc(1, sizeof *w);
    w->loop = loop;
    pthread_mutex_init(&w->mu, NULL);
    int rc = uv_async_init(loop, &w->async, on_async);
    if (rc) {
        pthread_mutex_destroy(&w->mu);
        free(w);
        return kvs_err_set(err, KVS_EINTERNAL, "uv_async_init: %s", uv_strerror(rc));
    }
    w->async.data = w;
    *out = w;
    return 0;
}

int kvs_work_submit(kvs_work *w, kvs_work_fn fn, kvs_work_fn done, void *arg)
{
    item *it = kvs_xmalloc(sizeof *it);
    it->fn = fn;
    it->done = done;
    it->arg = arg;
    it->next = NULL;
    pthread_mutex_lock(&w->mu);
    if (w->closed) {
        pthread_mutex_unlock(&w->mu);
        free(it);
        return KVS_EUNAVAIL;
    }
    if (w->tail)
        w->tail->next = it;
    else
        w->head = it;
    w->tail = it;
    /* Sent under mu so that close cannot slip between the check and the send. */
    uv_async_send(&w->async);
    pthread_mutex_unlock(&w->mu);
    return 0;
}

void kvs_work_run(void *w, kvs_work_fn fn, kvs_work_fn done, void *arg)
{
    if (!w || kvs_work_submit(w, fn, done, arg) != 0) {
        if (fn)
            fn(arg);
        done(arg);
    }
}

void kvs_work_close(kvs_work *w)
{
    pthread_mutex_lock(&w->mu);
    w->closed = true;
    pthread_mutex_unlock(&w->mu);
    on_async(&w->async); /* what was queued before the close still runs */
    uv_close((uv_handle_t *)&w->async, NULL);
}

void kvs_work_destroy(kvs_work *w)
{
    if (!w)
        return;
    pthread_mutex_destroy(&w->mu);
    free(w);
}
