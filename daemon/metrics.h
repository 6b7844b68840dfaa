/* kvstashd's HTTP endpoint for operators (--metrics-listen): GET /metrics in the Prometheus
 * text exposition format (version 0.0.4), GET /healthz (200 while the process serves) and
 * GET /readyz (200 once kvs_metrics_set_ready(true): main.c's listeners are up and the
 * disk tier is open; 503 before that and while draining). Anything else: 404, and 405 for
 * a method other than GET or HEAD. README "Observability" lists the metric families.
 *
 * HTTP is libmicrohttpd's, on one thread of its own (MHD's internal polling thread), with
 * a connection limit and an idle timeout so that a slow or hostile scraper cannot hold the
 * daemon's memory. A scrape takes snapshots one source at a time (the store's lock, the
 * server's lock, the limits', the regions' and the events' locks, each alone and never nested; the
 * RPC counters are atomics), renders them into a buffer with no lock held, and only then queues the
 * response.
 */
#ifndef KVS_DAEMON_METRICS_H
#define KVS_DAEMON_METRICS_H

#include <stdbool.h>
#include <stddef.h>

#include "gpu/base/err.h"
#include "storage/store.h"

typedef struct kvs_metrics kvs_metrics;
struct kvs_server;
struct kvs_store;
struct kvs_regions;
struct kvs_engine;
struct kvs_events;

typedef struct kvs_metrics_opts {
    const char *listen;          /* HOST:PORT or [V6]:PORT (port 0: a free one); borrowed */
    struct kvs_store *store;     /* borrowed; outlives the endpoint */
    struct kvs_server *server;   /* borrowed; outlives the endpoint */
    struct kvs_regions *regions; /* borrowed, may be NULL */
    /* The GPU engines, one per device (borrowed): the leading non-NULL entries; none: no
     * GPU engine. KVS_STORE_GPUS_MAX (storage/store.h) of them. */
    struct kvs_engine *engine[KVS_STORE_GPUS_MAX];
    struct kvs_events *events; /* borrowed, may be NULL: no KV events */
} kvs_metrics_opts;

/* Binds and starts serving (not ready yet). KVS_EINVAL for an address that does not
 * parse or resolve, KVS_EIO when it cannot be bound (both name --metrics-listen's value).
 * *bound_port gets the TCP port bound. Free with kvs_metrics_destroy. */
int kvs_metrics_create(const kvs_metrics_opts *o, kvs_metrics **out, int *bound_port, kvs_err *err);
/* What /readyz answers from now on. Thread-safe. */
void kvs_metrics_set_ready(kvs_metrics *m, bool ready);
/* Renders the /metrics page into *out (malloc'ed, free with free(); *len bytes, not
 * NUL-terminated). KVS_ENOMEM. Thread-safe. */
int kvs_metrics_render(const kvs_metrics_opts *o, char **out, size_t *len, kvs_err *err);
/* Stops the listener (waits for its thread) and frees it; NULL is fine. */
void kvs_metrics_destroy(kvs_metrics *m);

#endif
