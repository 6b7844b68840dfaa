/* libkvstash's sharded client (contract: include/kvstash.h "sharding"; README "Sharding"):
 * the handle, its daemons and their health, placement by rendezvous hashing, the refresh of
 * a dns: target, and kvs__fan_out, the one way every cluster call reaches the daemons (the
 * calls themselves are kvs__ops in cluster_ops.c).
 *
 * Invariants:
 * - A ring (the node set at one moment, sorted by id) is immutable once published:
 *   cl->ring changes only by replacing the pointer. A call holds a reference to the ring
 *   current at its start until it returns, so a refresh never moves a key within a call.
 *   Nodes are refcounted and shared by consecutive rings, so a daemon's health and
 *   connection survive a refresh that keeps it.
 * - A ring is never empty: a resolution that fails or finds no record keeps the last one (a
 *   DNS hiccup must not turn every key into a miss).
 * - A node marked down is contacted by no call before its retry time, and then by one at a
 *   time (its probe), so a daemon that hangs costs one call one deadline per backoff period,
 *   not every call.
 *
 * Threads: callers (any number) route their items and run their parts; the pool's workers
 * (client/pool.c) run parts too; with a dns: target one resolver thread re-resolves every
 * resolve_ms and publishes new rings. No lock is held across a network call.
 *
 * Locks, in this order: cl->mu (ring pointer, remembered specs, closing), then one node->mu
 * (that node's health). The pool's own lock is taken with neither held.
 */
#include "client/cluster_int.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <xxhash.h>

#include "client/pool.h"
#include "client/resolve.h"
#include "gpu/base/mem.h"

#define DEFAULT_RESOLVE_MS 10000
#define DEFAULT_BACKOFF_MIN_MS 100
#define DEFAULT_BACKOFF_MAX_MS 5000
#define DEFAULT_PARALLEL 8
#define MAX_PARALLEL 256
#define DEFAULT_TIMEOUT_MS 30000 /* as a kvs_client's */
#define NO_SLOT ((size_t)-1)

struct kvs__node {
    char id[KVS_NODE_ID_MAX];
    uint64_t seed; /* XXH64(id, seed 0): its rendezvous seed */
    kvs_client *client;
    bool local;
    atomic_uint refs;
    pthread_mutex_t mu; /* guards the health below */
    bool down;
    bool probing;        /* a call is trying it again */
    int64_t retry_at_ms; /* down: no call before this (CLOCK_MONOTONIC) */
    int64_t backoff_ms;  /* the wait after the next failed try */
    uint64_t failures;
    char why[160];
};

typedef struct ring {
    atomic_uint refs;
    size_t n;
    kvs__node **nodes;      /* n, sorted by id */
    kvs__node *local_owner; /* the member whose id is opts.local_id, or NULL */
} ring;

struct kvs_cluster {
    kvs_resolve *res;
    kvs_client_opts copts; /* every daemon's client; the strings below are its own */
    char *token, *tls_ca, *tls_cert, *tls_key, *tls_server_name;
    char *local_id;
    int64_t resolve_ms, backoff_min_ms, backoff_max_ms, timeout_ms;
    kvs__node *local; /* fixed after open */
    kvs_pool *pool;
    kvs_log_fn log;
    void *log_ctx;
    bool resolve_failing; /* the resolver thread's own */

    pthread_mutex_t mu;
    pthread_cond_t wake; /* closing (the resolver's sleep; CLOCK_MONOTONIC) */
    ring *ring;
    kvs_ns_spec *specs; /* remembered namespace specs */
    size_t n_specs, cap_specs;
    bool closing;
    bool resolver_started;
    pthread_t resolver;
};

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static char *dup_or_null(const char *s)
{
    return s ? kvs_xstrdup(s) : NULL;
}

/* An event for opts.log; never called with a lock held (the callback may call us). */
__attribute__((format(printf, 3, 4))) static void event(const kvs_cluster *cl, kvs_log_level lvl,
                                                        const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    kvs_vlogf(cl->log, cl->log_ctx, lvl, fmt, ap);
    va_end(ap);
}

/* ------------------------------------------------------------------ nodes */

const char *kvs__node_id(const kvs__node *n)
{
    return n->id;
}

kvs_client *kvs__node_client(const kvs__node *n)
{
    return n->client;
}

bool kvs__node_local(const kvs__node *n)
{
    return n->local;
}

static int node_create(kvs_cluster *cl, const char *id, bool local, kvs__node **out, kvs_err *err)
{
    kvs_client_opts o = cl->copts;
    o.target = id;
    kvs_client *c;
    int rc = kvs_client_connect(&o, &c, err);
    if (rc)
        return kvs_err_prefix(err, "%s '%s'", local ? "local" : "node", id);
    kvs__node *n = kvs_xcalloc(1, sizeof *n);
    snprintf(n->id, sizeof n->id, "%s", id);
    n->seed = XXH64(n->id, strlen(n->id), 0);
    n->client = c;
    n->local = local;
    atomic_init(&n->refs, 1);
    pthread_mutex_init(&n->mu, NULL);
    n->backoff_ms = cl->backoff_min_ms;
    *out = n;
    return 0;
}

static void node_release(kvs__node *n)
{
    if (!n || atomic_fetch_sub(&n->refs, 1) != 1)
        return;
    kvs_client_close(n->client);
    pthread_mutex_destroy(&n->mu);
    free(n);
}

typedef enum admit { ADMIT_UP, ADMIT_PROBE, ADMIT_DOWN } admit;

/* Whether a call may contact n now; a down node's first caller after its retry time probes
 * it. ADMIT_DOWN fills why with the failure and the wait left. */
static admit node_admit(kvs__node *n, char *why, size_t cap)
{
    admit a = ADMIT_UP;
    pthread_mutex_lock(&n->mu);
    if (n->down) {
        int64_t now = now_ms();
        if (!n->probing && now >= n->retry_at_ms) {
            n->probing = true;
            a = ADMIT_PROBE;
        } else {
            a = ADMIT_DOWN;
            int64_t left = n->retry_at_ms > now ? n->retry_at_ms - now : 0;
            snprintf(why, cap, "%.80s is down (retried in %lld ms): %.100s", n->id, (long long)left,
                     n->why);
        }
    }
    pthread_mutex_unlock(&n->mu);
    /* gRPC keeps its own reconnect backoff (up to two minutes): the probe should reach a
     * daemon that is back now, so ours decides when to try. */
    if (a == ADMIT_PROBE)
        for (unsigned i = 0; i < n->client->n_channels; i++)
            grpc_channel_reset_connect_backoff(n->client->channels[i]);
    return a;
}

/* What a call to n found: an answer (any status the daemon sent) or none. Logs the node
 * going down or coming back. */
static void node_outcome(kvs_cluster *cl, kvs__node *n, bool probe, bool answered, const char *why)
{
    bool went_down = false, came_up = false;
    int64_t retry = 0;
    pthread_mutex_lock(&n->mu);
    if (answered) {
        /* Only a probe marks a node up: an answer to a call that started before the node
         * was marked down says nothing about it now. */
        if (probe) {
            came_up = n->down;
            n->down = false;
            n->backoff_ms = cl->backoff_min_ms;
        }
    } else {
        n->failures++;
        if (!n->down || probe) {
            went_down = !n->down;
            if (!n->down)
                n->backoff_ms = cl->backoff_min_ms;
            n->down = true;
            retry = n->backoff_ms;
            n->retry_at_ms = now_ms() + n->backoff_ms;
            n->backoff_ms =
                n->backoff_ms * 2 < cl->backoff_max_ms ? n->backoff_ms * 2 : cl->backoff_max_ms;
            snprintf(n->why, sizeof n->why, "%.159s", why);
        }
    }
    if (probe)
        n->probing = false;
    pthread_mutex_unlock(&n->mu);
    if (went_down)
        event(cl, KVS_LOG_WARN,
              "cluster: %s marked down, its keys are misses (retried in %lld ms): %s", n->id,
              (long long)retry, why);
    if (came_up)
        event(cl, KVS_LOG_INFO, "cluster: %s is back up", n->id);
}

/* ------------------------------------------------------------------ rings */

static ring *ring_acquire(kvs_cluster *cl)
{
    pthread_mutex_lock(&cl->mu);
    ring *r = cl->ring;
    atomic_fetch_add(&r->refs, 1);
    pthread_mutex_unlock(&cl->mu);
    return r;
}

static void ring_release(ring *r)
{
    if (!r || atomic_fetch_sub(&r->refs, 1) != 1)
        return;
    for (size_t i = 0; i < r->n; i++)
        node_release(r->nodes[i]);
    free(r->nodes);
    free(r);
}

static int cmp_node_id(const void *key, const void *elem)
{
    return strcmp(key, (*(kvs__node *const *)elem)->id);
}

/* A ring of ids (sorted, unique), reusing old's nodes where the id is the same. */
static int ring_build(kvs_cluster *cl, char **ids, size_t n, const ring *old, ring **out,
                      kvs_err *err)
{
    ring *r = kvs_xcalloc(1, sizeof *r);
    atomic_init(&r->refs, 1);
    r->nodes = kvs_xcalloc(n, sizeof *r->nodes);
    for (size_t i = 0; i < n; i++) {
        kvs__node **had =
            old ? bsearch(ids[i], old->nodes, old->n, sizeof *old->nodes, cmp_node_id) : NULL;
        if (had) {
            r->nodes[i] = *had;
            atomic_fetch_add(&(*had)->refs, 1);
        } else {
            int rc = node_create(cl, ids[i], false, &r->nodes[i], err);
            if (rc) {
                ring_release(r);
                return rc;
            }
        }
        r->n++;
        if (cl->local_id && strcmp(ids[i], cl->local_id) == 0)
            r->local_owner = r->nodes[i];
    }
    *out = r;
    return 0;
}

static bool ring_same(const ring *r, char **ids, size_t n)
{
    if (r->n != n)
        return false;
    for (size_t i = 0; i < n; i++)
        if (strcmp(r->nodes[i]->id, ids[i]) != 0)
            return false;
    return true;
}

/* Rendezvous hashing (highest random weight): the member with the highest score for the
 * key; members are sorted by id and a later one must score strictly higher, so a tie goes
 * to the smaller id. */
static size_t ring_owner(const ring *r, const void *key, size_t len)
{
    size_t best = 0;
    uint64_t top = XXH64(key, len, r->nodes[0]->seed);
    for (size_t i = 1; i < r->n; i++) {
        uint64_t s = XXH64(key, len, r->nodes[i]->seed);
        if (s > top) {
            top = s;
            best = i;
        }
    }
    return best;
}

/* "a:1 b:2": the ids of `a` that `b` lacks (both sorted), cut to cap; "none" if none. */
static void ids_missing(char *out, size_t cap, char *const *a, size_t na, char *const *b, size_t nb)
{
    size_t used = 0;
    out[0] = 0;
    for (size_t i = 0, j = 0; i < na && used < cap; i++) {
        while (j < nb && strcmp(b[j], a[i]) < 0)
            j++;
        if (j == nb || strcmp(b[j], a[i]) != 0) {
            int w = snprintf(out + used, cap - used, "%s%s", used ? " " : "", a[i]);
            used += w > 0 ? (size_t)w : 0;
        }
    }
    if (!out[0])
        snprintf(out, cap, "none");
}

/* Resolves the targets again and publishes a new ring if the node set changed. Resolver
 * thread. */
static void refresh(kvs_cluster *cl)
{
    char **ids;
    size_t n;
    kvs_err e;
    if (kvs_resolve_run(cl->res, &ids, &n, &e) != 0) {
        /* The last ring stays (invariants above); said once, not every period. */
        if (!cl->resolve_failing)
            event(cl, KVS_LOG_WARN, "cluster: %s; keeping the daemons known", e.msg);
        cl->resolve_failing = true;
        return;
    }
    if (cl->resolve_failing)
        event(cl, KVS_LOG_INFO, "cluster: resolving '%s' works again", kvs_resolve_name(cl->res));
    cl->resolve_failing = false;
    ring *old = ring_acquire(cl), *r = NULL;
    if (ring_same(old, ids, n)) {
        /* nothing changed */
    } else if (ring_build(cl, ids, n, old, &r, &e) != 0) {
        event(cl, KVS_LOG_WARN, "cluster: the new daemons are not taken: %s", e.msg);
    } else {
        char **had = kvs_xcalloc(old->n, sizeof *had);
        char added[200], removed[200];
        for (size_t i = 0; i < old->n; i++)
            had[i] = old->nodes[i]->id;
        ids_missing(added, sizeof added, ids, n, had, old->n);
        ids_missing(removed, sizeof removed, had, old->n, ids, n);
        free(had);
        pthread_mutex_lock(&cl->mu);
        ring *prev = cl->ring;
        cl->ring = r;
        pthread_mutex_unlock(&cl->mu);
        ring_release(prev);
        event(cl, KVS_LOG_INFO, "cluster: %zu daemons now (added: %s; removed: %s)", n, added,
              removed);
    }
    ring_release(old);
    kvs_resolve_ids_free(ids, n);
}

static void *resolver_main(void *arg)
{
    kvs_cluster *cl = arg;
    pthread_mutex_lock(&cl->mu);
    while (!cl->closing) {
        struct timespec until;
        clock_gettime(CLOCK_MONOTONIC, &until);
        int64_t ns = until.tv_nsec + (cl->resolve_ms % 1000) * 1000000;
        until.tv_sec += cl->resolve_ms / 1000 + ns / 1000000000;
        until.tv_nsec = ns % 1000000000;
        while (!cl->closing && pthread_cond_timedwait(&cl->wake, &cl->mu, &until) == 0)
            ; /* woken for closing, or spuriously: sleep on until `until` */
        if (cl->closing)
            break;
        pthread_mutex_unlock(&cl->mu);
        refresh(cl);
        pthread_mutex_lock(&cl->mu);
    }
    pthread_mutex_unlock(&cl->mu);
    return NULL;
}

/* ------------------------------------------------------------------ open, close */

int kvs_cluster_open(const kvs_cluster_opts *opts, kvs_cluster **out, kvs_err *err)
{
    kvs_err_clear(err);
    if (!out)
        return kvs_err_set(err, KVS_EINVAL, "cluster: out is NULL");
    *out = NULL;
    if (!opts)
        return kvs_err_set(err, KVS_EINVAL, "cluster: opts is NULL (targets are required)");
    if (opts->resolve_ms < 0 || opts->backoff_min_ms < 0 || opts->backoff_max_ms < 0)
        return kvs_err_set(err, KVS_EINVAL,
                           "resolve_ms, backoff_min_ms, backoff_max_ms: "
                           "negative");
    if (opts->parallel > MAX_PARALLEL)
        return kvs_err_set(err, KVS_EINVAL, "parallel: %u is over %d", opts->parallel,
                           MAX_PARALLEL);
    if (opts->local && !opts->local[0])
        return kvs_err_set(err, KVS_EINVAL, "local: empty");
    if (opts->local && strlen(opts->local) >= KVS_NODE_ID_MAX)
        return kvs_err_set(err, KVS_EINVAL, "local: longer than %d bytes", KVS_NODE_ID_MAX - 1);
    if (opts->local_id && !opts->local)
        return kvs_err_set(err, KVS_EINVAL,
                           "local_id: names the ring id of `local`, which is "
                           "not set");

    kvs_cluster *cl = kvs_xcalloc(1, sizeof *cl);
    pthread_mutex_init(&cl->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&cl->wake, &ca);
    pthread_condattr_destroy(&ca);
    cl->resolve_ms = opts->resolve_ms ? opts->resolve_ms : DEFAULT_RESOLVE_MS;
    cl->backoff_min_ms = opts->backoff_min_ms ? opts->backoff_min_ms : DEFAULT_BACKOFF_MIN_MS;
    cl->backoff_max_ms = opts->backoff_max_ms ? opts->backoff_max_ms : DEFAULT_BACKOFF_MAX_MS;
    if (cl->backoff_max_ms < cl->backoff_min_ms)
        cl->backoff_max_ms = cl->backoff_min_ms;
    cl->timeout_ms = opts->client.timeout_ms ? opts->client.timeout_ms : DEFAULT_TIMEOUT_MS;
    cl->log = opts->log;
    cl->log_ctx = opts->log_ctx;
    /* A local daemon named by its ring address is that member without being told. */
    cl->local_id = dup_or_null(opts->local_id ? opts->local_id : opts->local);
    cl->copts = opts->client;
    cl->copts.timeout_ms = cl->timeout_ms;
    cl->copts.token = cl->token = dup_or_null(opts->client.token);
    cl->copts.tls_ca = cl->tls_ca = dup_or_null(opts->client.tls_ca);
    cl->copts.tls_cert = cl->tls_cert = dup_or_null(opts->client.tls_cert);
    cl->copts.tls_key = cl->tls_key = dup_or_null(opts->client.tls_key);
    cl->copts.tls_server_name = cl->tls_server_name = dup_or_null(opts->client.tls_server_name);

    char **ids = NULL;
    size_t n = 0;
    int rc = kvs_resolve_parse(opts->targets, &cl->res, err);
    if (rc == 0) {
        /* Records carry addresses: with TLS, check the certificate against the name that
         * led to them, not against an address it is unlikely to list. */
        const char *name = kvs_resolve_name(cl->res);
        bool tls = cl->tls_ca || cl->tls_cert || cl->tls_key;
        if (tls && name && !cl->tls_server_name)
            cl->copts.tls_server_name = cl->tls_server_name = kvs_xstrdup(name);
        rc = kvs_resolve_run(cl->res, &ids, &n, err);
    }
    if (rc == 0)
        rc = kvs_pool_create(opts->parallel ? opts->parallel : DEFAULT_PARALLEL, &cl->pool, err);
    if (rc == 0)
        rc = ring_build(cl, ids, n, NULL, &cl->ring, err);
    kvs_resolve_ids_free(ids, n);
    if (rc == 0 && opts->local)
        rc = node_create(cl, opts->local, true, &cl->local, err);
    if (rc == 0 && kvs_resolve_name(cl->res)) {
        int e = pthread_create(&cl->resolver, NULL, resolver_main, cl);
        if (e != 0)
            rc = kvs_err_set(err, KVS_ENOMEM, "cluster: cannot start the resolver thread: %s",
                             strerror(e));
        cl->resolver_started = e == 0;
    }
    if (rc) {
        kvs_cluster_close(cl);
        return rc;
    }
    *out = cl;
    return 0;
}

void kvs_cluster_close(kvs_cluster *cl)
{
    if (!cl)
        return;
    pthread_mutex_lock(&cl->mu);
    cl->closing = true;
    pthread_cond_broadcast(&cl->wake);
    pthread_mutex_unlock(&cl->mu);
    if (cl->resolver_started)
        pthread_join(cl->resolver, NULL);
    kvs_pool_destroy(cl->pool);
    ring_release(cl->ring);
    node_release(cl->local);
    kvs_resolve_free(cl->res);
    free(cl->specs);
    free(cl->local_id);
    free(cl->token);
    free(cl->tls_ca);
    free(cl->tls_cert);
    free(cl->tls_key);
    free(cl->tls_server_name);
    pthread_cond_destroy(&cl->wake);
    pthread_mutex_destroy(&cl->mu);
    free(cl);
}

kvs_client *kvs_cluster_local(kvs_cluster *cl)
{
    return cl && cl->local ? cl->local->client : NULL;
}

bool kvs__cluster_has_local(const kvs_cluster *cl)
{
    return cl->local != NULL;
}

gpr_timespec kvs__cluster_deadline(const kvs_cluster *cl)
{
    return gpr_time_add(gpr_now(GPR_CLOCK_REALTIME),
                        gpr_time_from_millis(cl->timeout_ms, GPR_TIMESPAN));
}

/* ------------------------------------------------------------------ introspection */

int kvs_cluster_owner(kvs_cluster *cl, const void *key, size_t key_len, char id[KVS_NODE_ID_MAX],
                      kvs_err *err)
{
    kvs_err_clear(err);
    if (!cl || !id || (!key && key_len))
        return kvs_err_set(err, KVS_EINVAL, "owner: NULL argument");
    if (kvs_key_validate(key_len, err) != 0)
        return kvs_err_prefix(err, "owner");
    ring *r = ring_acquire(cl);
    snprintf(id, KVS_NODE_ID_MAX, "%s", r->nodes[ring_owner(r, key, key_len)]->id);
    ring_release(r);
    return 0;
}

static void node_info(kvs__node *n, kvs_cluster_node *out)
{
    memset(out, 0, sizeof *out);
    snprintf(out->id, sizeof out->id, "%s", n->id);
    out->local = n->local;
    pthread_mutex_lock(&n->mu);
    out->up = !n->down;
    if (n->down) {
        int64_t left = n->retry_at_ms - now_ms();
        out->retry_in_ms = left > 0 ? left : 0;
        snprintf(out->why, sizeof out->why, "%s", n->why);
    }
    out->failures = n->failures;
    pthread_mutex_unlock(&n->mu);
}

int kvs_cluster_nodes(kvs_cluster *cl, kvs_cluster_node *out, size_t cap, size_t *n, kvs_err *err)
{
    kvs_err_clear(err);
    if (!cl || !n || (!out && cap))
        return kvs_err_set(err, KVS_EINVAL, "nodes: NULL argument");
    ring *r = ring_acquire(cl);
    *n = r->n + (cl->local != NULL);
    for (size_t i = 0; i < r->n && i < cap; i++)
        node_info(r->nodes[i], &out[i]);
    if (cl->local && r->n < cap)
        node_info(cl->local, &out[r->n]);
    ring_release(r);
    return 0;
}

/* ------------------------------------------------------------------ namespaces */

void kvs__cluster_ns_remember(kvs_cluster *cl, const kvs_ns_spec *spec)
{
    pthread_mutex_lock(&cl->mu);
    size_t i = 0;
    while (i < cl->n_specs && strcmp(cl->specs[i].name, spec->name) != 0)
        i++;
    if (i == cl->n_specs) {
        if (cl->n_specs == cl->cap_specs) {
            cl->cap_specs = cl->cap_specs ? 2 * cl->cap_specs : 4;
            cl->specs = kvs_xrealloc(cl->specs, cl->cap_specs * sizeof *cl->specs);
        }
        cl->n_specs++;
    }
    cl->specs[i] = *spec;
    pthread_mutex_unlock(&cl->mu);
}

void kvs__cluster_ns_forget(kvs_cluster *cl, const char *name)
{
    pthread_mutex_lock(&cl->mu);
    for (size_t i = 0; i < cl->n_specs; i++) {
        if (strcmp(cl->specs[i].name, name) == 0) {
            cl->specs[i] = cl->specs[--cl->n_specs];
            break;
        }
    }
    pthread_mutex_unlock(&cl->mu);
}

int kvs__cluster_ns_ensure(kvs_cluster *cl, kvs__node *node, const char *name, kvs_err *err)
{
    kvs_ns_spec spec;
    bool known = false;
    pthread_mutex_lock(&cl->mu);
    for (size_t i = 0; i < cl->n_specs && !known; i++) {
        if (strcmp(cl->specs[i].name, name) == 0) {
            spec = cl->specs[i];
            known = true;
        }
    }
    pthread_mutex_unlock(&cl->mu);
    if (!known)
        return kvs_err_set(err, KVS_ENOTFOUND, "namespace '%s': not on %s, and no spec known", name,
                           node->id);
    int rc = kvs_client_ns_create(node->client, &spec, NULL, err);
    return rc == KVS_EEXIST ? 0 : rc; /* another client created it meanwhile */
}

/* ------------------------------------------------------------------ fan-out */

static bool no_answer(int rc)
{
    /* The daemon sent nothing (or "unavailable", which a draining one sends): the node is
     * down for the calls that follow. ECANCELED: the pluck's own timeout cancelled it. */
    return rc == KVS_EUNAVAIL || rc == KVS_ETIMEDOUT || rc == KVS_ECANCELED;
}

/* A message for op->fail and the call's error: the daemon's, prefixed with its id unless
 * it names it already (the client's unavailable and deadline messages do). */
static void part_msg(const kvs__part *p, char *msg, size_t cap)
{
    if (strstr(p->err.msg, p->node->id))
        snprintf(msg, cap, "%s", p->err.msg);
    else
        snprintf(msg, cap, "%.80s: %.170s", p->node->id, p->err.msg);
}

/* One part on this thread (a pool task). */
static void run_part(void *arg)
{
    kvs__part *p = arg;
    gpr_timespec saved = kvs__call_deadline;
    kvs__call_deadline = p->deadline;
    kvs_err_clear(&p->err);
    int rc = p->op->call(p->ctx, p, &p->err);
    kvs__call_deadline = saved;
    if (rc && !p->err.msg[0])
        kvs_err_set(&p->err, rc, "%s: %s", p->op->name, kvs_strerror(rc));
    p->rc = rc;
}

int kvs__fan_out(kvs_cluster *cl, const kvs__op *op, void *ctx, size_t n, const bool *skip,
                 unsigned way, gpr_timespec deadline, kvs_err *err)
{
    if (!(way & KVS__EVERY) && n == 0)
        return 0;
    ring *r = ring_acquire(cl);
    kvs__node *local = cl->local;
    if (!local)
        way &= ~(unsigned)KVS__LOCAL;
    /* Slots: the ring's members, then the local channel, then the local copies. */
    size_t L = r->n, C = r->n + 1, slots = r->n + 2;
    size_t *count = kvs_xcalloc(slots, sizeof *count);
    size_t *part_of = kvs_xcalloc(slots, sizeof *part_of);
    size_t *slot = NULL, *idx = NULL;
    kvs__part *parts = kvs_xcalloc(slots, sizeof *parts);
    kvs__part **run = kvs_xcalloc(slots, sizeof *run);
    size_t n_parts = 0, n_run = 0;
    int rc = 0;

    if (way & KVS__EVERY) {
        for (size_t s = 0; s < r->n; s++)
            if (!local || r->nodes[s] != r->local_owner) /* the local channel reaches it */
                parts[n_parts++].node = r->nodes[s];
        if (local)
            parts[n_parts++].node = local;
    } else {
        /* Each item's slot, counted; copies counted apart (an item has at most one). */
        bool fits = n <= SIZE_MAX / (2 * sizeof *idx);
        slot = fits ? kvs_trymalloc(n * sizeof *slot) : NULL;
        idx = fits ? kvs_trymalloc(2 * n * sizeof *idx) : NULL;
        if (!slot || !idx) {
            rc = kvs_err_set(err, KVS_ENOMEM, "%s: out of memory routing %zu items", op->name, n);
            goto out;
        }
        for (size_t i = 0; i < n; i++) {
            slot[i] = NO_SLOT;
            if (skip && skip[i])
                continue;
            if (way & KVS__OWNERS) {
                size_t len;
                const void *key = op->key(ctx, i, &len);
                size_t o = ring_owner(r, key, len);
                slot[i] = local && r->nodes[o] == r->local_owner ? L : o;
            } else {
                slot[i] = L;
            }
            count[slot[i]]++;
            if ((way & KVS__OWNERS) && (way & KVS__LOCAL) && slot[i] != L)
                count[C]++;
        }
        /* Parts in slot order, each a slice of idx filled in item order (ascending). */
        size_t off = 0;
        for (size_t s = 0; s < slots; s++) {
            if (count[s] == 0)
                continue;
            part_of[s] = n_parts;
            kvs__part *p = &parts[n_parts++];
            p->node = s < L ? r->nodes[s] : local;
            p->copy = s == C;
            p->idx = idx + off;
            off += count[s];
        }
        for (size_t i = 0; i < n; i++) {
            if (slot[i] == NO_SLOT)
                continue;
            kvs__part *p = &parts[part_of[slot[i]]];
            p->idx[p->n++] = i;
            if ((way & KVS__OWNERS) && (way & KVS__LOCAL) && slot[i] != L) {
                kvs__part *c = &parts[part_of[C]];
                c->idx[c->n++] = i;
            }
        }
    }

    /* Down nodes and spent deadlines answer at once; the others run in parallel. */
    for (size_t i = 0; i < n_parts; i++) {
        kvs__part *p = &parts[i];
        char why[KVS_ERR_MSG_LEN];
        p->op = op;
        p->ctx = ctx;
        p->deadline = deadline;
        if (gpr_time_cmp(gpr_now(GPR_CLOCK_REALTIME), deadline) >= 0) {
            /* An earlier phase used the time up: not the daemon's fault, so it stays up. */
            snprintf(why, sizeof why, "%.80s: not asked, the call's deadline has passed",
                     p->node->id);
            op->fail(ctx, p, KVS_ETIMEDOUT, why);
            continue;
        }
        admit a = node_admit(p->node, why, sizeof why);
        if (a == ADMIT_DOWN) {
            op->fail(ctx, p, KVS_EUNAVAIL, why);
            continue;
        }
        p->probe = a == ADMIT_PROBE;
        run[n_run++] = p;
    }
    kvs_pool_run(cl->pool, run_part, (void *const *)run, n_run);

    for (size_t i = 0; i < n_run; i++) {
        kvs__part *p = run[i];
        char msg[KVS_ERR_MSG_LEN];
        bool answered = !no_answer(p->rc);
        if (p->rc)
            part_msg(p, msg, sizeof msg);
        node_outcome(cl, p->node, p->probe, answered, p->rc ? msg : "");
        if (p->rc)
            op->fail(ctx, p, p->rc, msg);
        /* A copy's failure is not the call's: the owners' answers are the items'. */
        if (p->rc && answered && !p->copy && rc == 0)
            rc = kvs_err_set(err, p->rc, "%s", msg);
    }
out:
    free(run);
    free(parts);
    free(idx);
    free(slot);
    free(part_of);
    free(count);
    ring_release(r);
    return rc;
}
