/* libkvstash's sharded client, internals shared by cluster.c (the handle, nodes and their
 * health, placement, DNS refresh, and the one fan-out every call goes through) and
 * cluster_ops.c (the data-path and namespace calls, each a kvs__op). Not installed; kvs__
 * prefix (STYLE). Threads and locks: the top of cluster.c.
 */
#ifndef KVS_CLUSTER_INT_H
#define KVS_CLUSTER_INT_H

#include <grpc/support/time.h>
#include <stdbool.h>
#include <stddef.h>

#include "client/client_int.h"
#include "kvstash.h"

/* One daemon: a ring member (a target or DNS record) or the local daemon (opts.local). Its
 * client and id never change; its health does (cluster.c). Shared by the rings that list it
 * and by the calls that hold those rings: refcounted, freed with the last. */
typedef struct kvs__node kvs__node;

const char *kvs__node_id(const kvs__node *n);
kvs_client *kvs__node_client(const kvs__node *n);
bool kvs__node_local(const kvs__node *n); /* opts.local's */

/* The calls of one public call's fan-out go to: */
enum {
    KVS__OWNERS = 1, /* each item to its key's owner (over the local channel when the owner
                      * is opts.local_id) */
    KVS__LOCAL = 2,  /* every item to the local daemon: alone, its answer is the item's; with
                      * KVS__OWNERS, a copy (part.copy) beside the owner's */
    KVS__EVERY = 4,  /* one part per daemon, no items (namespace calls) */
};

/* One daemon's share of a call. */
typedef struct kvs__part {
    kvs__node *node;
    size_t *idx; /* the caller's items it serves, ascending (n of them) */
    size_t n;
    bool copy; /* the local copy of a put or delete: the items' results are the owners' */
    int rc;    /* the daemon's answer to the whole call */
    kvs_err err;
    /* The engine's (cluster.c). */
    const struct kvs__op *op;
    void *ctx;
    gpr_timespec deadline;
    bool probe;
} kvs__part;

/* A call kind: how one daemon's share runs, and what its items become when that daemon
 * cannot run it. */
typedef struct kvs__op {
    const char *name; /* "PutMany": prefixes messages */
    /* Key of item i, for placement (unused with KVS__EVERY). */
    const void *(*key)(void *ctx, size_t i, size_t *len);
    /* Runs p's share on its daemon with one call of the plain client
     * (kvs__node_client(p->node)) and writes its items' results into the caller's arrays.
     * Runs on a pool thread or the caller's, in parallel with the other parts; returns the
     * call's status. */
    int (*call)(void *ctx, kvs__part *p, kvs_err *err);
    /* p's share got no answer: rc KVS_EUNAVAIL (down, or unreachable now) or KVS_ETIMEDOUT,
     * or the call failed as a whole with rc; msg names the daemon and the reason. Sets its
     * items' outcome. On the caller's thread, once no call of this fan-out runs. */
    void (*fail)(void *ctx, const kvs__part *p, int rc, const char *msg);
} kvs__op;

/* The deadline of a call starting now: the cluster's timeout_ms from now. */
gpr_timespec kvs__cluster_deadline(const kvs_cluster *cl);

/* Whether the cluster has a local daemon. */
bool kvs__cluster_has_local(const kvs_cluster *cl);

/* Runs op over items [0, n) except those with skip[i] (skip may be NULL), sent `way`
 * (KVS__* flags), every share in parallel, all of them ending by `deadline`. A daemon
 * marked down is not contacted (op->fail, KVS_EUNAVAIL); one that does not answer is marked
 * down (op->fail); either way the call goes on. Returns 0, or the first status a daemon
 * answered the whole call with (in id order), err naming that daemon. */
int kvs__fan_out(kvs_cluster *cl, const kvs__op *op, void *ctx, size_t n, const bool *skip,
                 unsigned way, gpr_timespec deadline, kvs_err *err);

/* Namespace specs the cluster created or read (kvs_cluster_ns_create, _get), to create on a
 * daemon that lacks one: remember adds or replaces, forget removes. */
void kvs__cluster_ns_remember(kvs_cluster *cl, const kvs_ns_spec *spec);
void kvs__cluster_ns_forget(kvs_cluster *cl, const char *name);
/* Creates namespace `name` on node from the remembered spec (0 when it exists already);
 * KVS_ENOTFOUND when the cluster knows no such spec. */
int kvs__cluster_ns_ensure(kvs_cluster *cl, kvs__node *node, const char *name, kvs_err *err);

#endif
