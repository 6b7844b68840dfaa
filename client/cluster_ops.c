/* libkvstash's sharded client: its data-path and namespace calls (contract: include/kvstash.h
 * "sharding"). Each is a kvs__op that kvs__fan_out (cluster.c) runs on every daemon the call
 * involves; here is only what differs per call: one daemon's share as one call of the plain
 * client on a copy of its items, what the items become when their daemon does not answer,
 * and the merge. Shares write back only to their own items' places, so the merged result is
 * in key order by construction; a prefix is then cut at the first miss of that order.
 *
 * Threads: an op's `call` runs in parallel with the other shares of its call and writes only
 * its own items; the counters the shares have in common are atomics. `fail` and the merge
 * run on the caller's thread.
 */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client/cluster_int.h"
#include "gpu/base/mem.h"

/* The daemon got no chance to answer (cluster.c's no_answer). */
static bool unreached(int rc)
{
    return rc == KVS_EUNAVAIL || rc == KVS_ETIMEDOUT || rc == KVS_ECANCELED;
}

static void set_msg(char *dst, size_t cap, const char *msg)
{
    snprintf(dst, cap, "%s", msg);
}

/* Items that name a region go to the daemon it is registered with by region; to any other
 * their bytes travel over gRPC, read from or written into the region's memory. */
static int region_bytes(const kvs_region *g, const kvs_client *c, uint8_t **p, uint64_t offset,
                        const char *what, size_t i, kvs_err *err)
{
    if (kvs__region_client(g) == c)
        return 0;
    if (kvs_region_device(g))
        return kvs_err_set(err, KVS_ENOTSUP,
                           "%s: items[%zu]: a CUDA IPC region reaches only its own daemon, and "
                           "the key's owner is another",
                           what, i);
    *p = (uint8_t *)kvs_region_data(g) + offset;
    return 0;
}

/* ------------------------------------------------------------------ PutMany */

typedef struct put_ctx {
    kvs_cluster *cl;
    const char *ns;
    kvs_dtype dtype;
    kvs_put_item *items;
} put_ctx;

static const void *put_key(void *ctx, size_t i, size_t *len)
{
    const kvs_put_item *it = &((put_ctx *)ctx)->items[i];
    *len = it->key_len;
    return it->key;
}

static int put_call(void *ctx, kvs__part *p, kvs_err *err)
{
    put_ctx *x = ctx;
    kvs_client *c = kvs__node_client(p->node);
    kvs_put_item *sub = kvs_trymalloc(p->n * sizeof *sub);
    if (!sub)
        return kvs_err_set(err, KVS_ENOMEM, "PutMany: out of memory for %zu items", p->n);
    int rc = 0;
    for (size_t j = 0; j < p->n && rc == 0; j++) {
        kvs_put_item *it = &sub[j];
        *it = x->items[p->idx[j]];
        uint8_t *bytes = NULL;
        if (!it->data &&
            (rc = region_bytes(it->region, c, &bytes, it->offset, "PutMany", p->idx[j], err)) ==
                0 &&
            bytes) {
            it->data = bytes;
            it->region = NULL;
        }
    }
    if (rc == 0)
        rc = kvs_client_put_many(c, x->ns, x->dtype, sub, p->n, err);
    if (rc == KVS_ENOTFOUND) {
        /* A daemon without the namespace (it joined after the namespace was created, or
         * restarted empty): create it there from the spec the cluster knows, once. */
        kvs_err e;
        if (kvs__cluster_ns_ensure(x->cl, p->node, x->ns, &e) == 0)
            rc = kvs_client_put_many(c, x->ns, x->dtype, sub, p->n, err);
    }
    for (size_t j = 0; rc == 0 && !p->copy && j < p->n; j++) {
        kvs_put_item *it = &x->items[p->idx[j]];
        it->rc = sub[j].rc;
        memcpy(it->msg, sub[j].msg, sizeof it->msg);
        it->res = sub[j].res;
    }
    free(sub);
    return rc;
}

static void put_fail(void *ctx, const kvs__part *p, int rc, const char *msg)
{
    put_ctx *x = ctx;
    if (p->copy)
        return; /* best effort: the item's outcome is its owner's */
    for (size_t j = 0; j < p->n; j++) {
        kvs_put_item *it = &x->items[p->idx[j]];
        /* Never re-placed elsewhere: the owner's keys fail until it is back. */
        it->rc = unreached(rc) ? KVS_EUNAVAIL : rc;
        set_msg(it->msg, sizeof it->msg, msg);
        memset(&it->res, 0, sizeof it->res);
    }
}

static const kvs__op put_op = {"PutMany", put_key, put_call, put_fail};

int kvs_cluster_put_many(kvs_cluster *cl, const char *ns, kvs_dtype dtype, kvs_put_item *items,
                         size_t n, kvs_err *err)
{
    kvs_err_clear(err);
    if (!cl || !ns || (!items && n))
        return kvs_err_set(err, KVS_EINVAL, "PutMany: NULL argument");
    /* Checked here as the plain client checks them, so that a bad item fails the call before
     * any daemon stored part of it (and before a region item becomes a pointer). */
    int rc = kvs__put_items_check(items, n, err);
    if (rc)
        return rc;
    for (size_t i = 0; i < n; i++)
        if (items[i].pages) /* a layout travels in one daemon's stream: not split by owner */
            return kvs_err_set(err, KVS_ENOTSUP,
                               "PutMany: items[%zu]: pages: paged memory is one daemon's "
                               "region (use kvs_cluster_local's client)",
                               i);
    put_ctx x = {.cl = cl, .ns = ns, .dtype = dtype, .items = items};
    return kvs__fan_out(cl, &put_op, &x, n, NULL, KVS__OWNERS | KVS__LOCAL,
                        kvs__cluster_deadline(cl), err);
}

int kvs_cluster_put(kvs_cluster *cl, const char *ns, const void *key, size_t key_len,
                    uint32_t tokens, kvs_dtype dtype, const void *data, size_t len,
                    kvs_put_result *res, kvs_err *err)
{
    if (!data && len) {
        kvs_err_clear(err);
        return kvs_err_set(err, KVS_EINVAL, "Put: NULL argument");
    }
    /* A one-item PutMany: one path for every put. A zero-length payload still needs a
     * non-NULL pointer to mean "bytes, not a region". */
    kvs_put_item it = {
        .key = key, .key_len = key_len, .tokens = tokens, .data = data ? data : "", .len = len};
    int rc = kvs_cluster_put_many(cl, ns, dtype, &it, 1, err);
    if (rc)
        return rc;
    if (it.rc)
        return kvs_err_set(err, it.rc, "Put: %s", it.msg[0] ? it.msg : kvs_strerror(it.rc));
    if (res)
        *res = it.res;
    return 0;
}

/* ------------------------------------------------------------------ GetMany */

typedef struct get_ctx {
    const char *ns;
    kvs_get_item *items;
    kvs_get_many_opts o;
    atomic_size_t answered;   /* shares a daemon answered */
    atomic_size_t ns_missing; /* of those, shares whose daemon lacks the namespace */
    size_t unreached;         /* shares no daemon answered (fail: caller's thread) */
} get_ctx;

static const void *get_key(void *ctx, size_t i, size_t *len)
{
    const kvs_get_item *it = &((get_ctx *)ctx)->items[i];
    *len = it->key_len;
    return it->key;
}

static int get_call(void *ctx, kvs__part *p, kvs_err *err)
{
    get_ctx *x = ctx;
    kvs_client *c = kvs__node_client(p->node);
    kvs_get_item *sub = kvs_trymalloc(p->n * sizeof *sub);
    if (!sub)
        return kvs_err_set(err, KVS_ENOMEM, "GetMany: out of memory for %zu items", p->n);
    int rc = 0;
    for (size_t j = 0; j < p->n && rc == 0; j++) {
        kvs_get_item *it = &sub[j];
        *it = x->items[p->idx[j]];
        uint8_t *bytes = NULL;
        if (!it->buf &&
            (rc = region_bytes(it->region, c, &bytes, it->offset, "GetMany", p->idx[j], err)) ==
                0 &&
            bytes) {
            it->buf = bytes;
            it->region = NULL;
        }
    }
    if (rc == 0)
        rc = kvs_client_get_many(c, x->ns, sub, p->n, &x->o, NULL, err);
    if (rc == 0 || rc == KVS_ENOTFOUND)
        atomic_fetch_add(&x->answered, 1);
    if (rc == KVS_ENOTFOUND) {
        /* The daemon lacks the namespace, so it holds none of these keys: misses (as the
         * items are), unless no daemon has it (the merge). */
        atomic_fetch_add(&x->ns_missing, 1);
        rc = 0;
    } else {
        for (size_t j = 0; rc == 0 && j < p->n; j++) {
            kvs_get_item *it = &x->items[p->idx[j]];
            it->rc = sub[j].rc;
            memcpy(it->msg, sub[j].msg, sizeof it->msg);
            it->answered = sub[j].answered;
            it->res = sub[j].res;
        }
    }
    free(sub);
    return rc;
}

static void get_fail(void *ctx, const kvs__part *p, int rc, const char *msg)
{
    get_ctx *x = ctx;
    x->unreached += unreached(rc);
    for (size_t j = 0; j < p->n; j++) {
        kvs_get_item *it = &x->items[p->idx[j]];
        /* Blocks received before the daemon failed may be partial: none count. */
        it->answered = false;
        it->rc = unreached(rc) ? KVS_ENOTFOUND : rc;
        set_msg(it->msg, sizeof it->msg, msg);
    }
}

static const kvs__op get_op = {"GetMany", get_key, get_call, get_fail};

int kvs_cluster_get_many(kvs_cluster *cl, const char *ns, kvs_get_item *items, size_t n,
                         const kvs_get_many_opts *opts, size_t *served, kvs_err *err)
{
    kvs_err_clear(err);
    if (served)
        *served = 0;
    if (!cl || !ns || !items || n == 0)
        return kvs_err_set(err, KVS_EINVAL, "GetMany: NULL argument or no items");
    if (opts && opts->layout) /* its pages are indexed by the item's place in one call */
        return kvs_err_set(err, KVS_ENOTSUP,
                           "GetMany: layout: paged memory is one daemon's region (use "
                           "kvs_cluster_local's client)");
    for (size_t i = 0; i < n; i++) {
        kvs_get_item *it = &items[i];
        if (!it->key || kvs_key_validate(it->key_len, err) != 0)
            return kvs_err_prefix(err, "GetMany: items[%zu]: key", i);
        if (!it->buf && !it->region)
            return kvs_err_set(err, KVS_EINVAL, "GetMany: items[%zu]: neither buf nor region", i);
        if (!it->buf && kvs__region_item_check(it->region, it->offset, it->cap, i, "GetMany", err))
            return err ? err->code : KVS_EINVAL;
        it->answered = false;
        it->rc = KVS_ENOTFOUND;
        it->msg[0] = 0;
    }
    get_ctx x = {.ns = ns, .items = items, .o = opts ? *opts : (kvs_get_many_opts){0}};
    gpr_timespec deadline = kvs__cluster_deadline(cl);
    bool *skip = NULL;
    if (kvs__cluster_has_local(cl) && x.o.route != KVS_ROUTE_OWNER) {
        /* Local first; its errors are not the call's: the owners answer what it did not. */
        kvs_err e;
        (void)kvs__fan_out(cl, &get_op, &x, n, NULL, KVS__LOCAL, deadline, &e);
        skip = kvs_trymalloc(n * sizeof *skip);
        if (!skip)
            return kvs_err_set(err, KVS_ENOMEM, "GetMany: out of memory for %zu items", n);
        for (size_t i = 0; i < n; i++)
            skip[i] = items[i].answered && items[i].rc == 0;
    }
    int rc = kvs__fan_out(cl, &get_op, &x, n, skip, KVS__OWNERS, deadline, err);
    free(skip);
    if (rc)
        return rc;
    size_t got = 0;
    if (x.o.prefix) {
        /* Each daemon stopped at its own first miss; the call's prefix stops at the first
         * miss of the merged order, and what came after it is dropped. */
        while (got < n && items[got].answered && items[got].rc == 0)
            got++;
        for (size_t i = got + 1; i < n; i++) {
            items[i].answered = false;
            items[i].rc = KVS_ENOTFOUND;
            items[i].msg[0] = 0;
        }
    } else {
        for (size_t i = 0; i < n; i++)
            got += items[i].answered && items[i].rc == 0;
    }
    if (served)
        *served = got;
    if (x.ns_missing > 0 && x.ns_missing == x.answered && x.unreached == 0)
        return kvs_err_set(err, KVS_ENOTFOUND, "GetMany: namespace '%s' not found on any daemon",
                           ns);
    return 0;
}

int kvs_cluster_get(kvs_cluster *cl, const char *ns, const void *key, size_t key_len, void *buf,
                    size_t cap, kvs_get_result *res, kvs_err *err)
{
    if (!buf) {
        kvs_err_clear(err);
        return kvs_err_set(err, KVS_EINVAL, "Get: buf is NULL");
    }
    kvs_get_item it = {.key = key, .key_len = key_len, .buf = buf, .cap = cap};
    int rc = kvs_cluster_get_many(cl, ns, &it, 1, NULL, NULL, err);
    if (rc)
        return rc;
    if (it.rc)
        return kvs_err_set(err, it.rc, "Get: %s", it.msg[0] ? it.msg : kvs_strerror(it.rc));
    if (res)
        *res = it.res;
    return 0;
}

/* ------------------------------------------------------------------ Lookup, Exists, Delete */

typedef enum keys_kind { KEYS_LOOKUP, KEYS_EXISTS, KEYS_DELETE } keys_kind;

typedef struct keys_ctx {
    keys_kind kind;
    const char *ns;
    const kvs_key *keys;
    kvs_tier *tiers; /* LOOKUP: one per key, NONE while absent */
    bool *present;   /* EXISTS: one per key */
    atomic_uint_fast64_t deleted;
    atomic_size_t answered, ns_missing;
    size_t unreached; /* fail: caller's thread */
    char unreached_msg[KVS_ERR_MSG_LEN];
} keys_ctx;

static const void *keys_key(void *ctx, size_t i, size_t *len)
{
    const kvs_key *k = &((keys_ctx *)ctx)->keys[i];
    *len = k->len;
    return k->bytes;
}

static int keys_call(void *ctx, kvs__part *p, kvs_err *err)
{
    keys_ctx *x = ctx;
    kvs_client *c = kvs__node_client(p->node);
    kvs_key *sub = kvs_trymalloc(p->n * sizeof *sub);
    /* One answer per key: a tier, or a bool in the same room. */
    kvs_tier *tiers = kvs_trymalloc(p->n * sizeof *tiers);
    bool *present = (bool *)tiers;
    if (!sub || !tiers) {
        free(sub);
        free(tiers);
        return kvs_err_set(err, KVS_ENOMEM, "out of memory for %zu keys", p->n);
    }
    for (size_t j = 0; j < p->n; j++)
        sub[j] = x->keys[p->idx[j]];
    uint32_t deleted = 0;
    int rc = x->kind == KEYS_LOOKUP   ? kvs_client_lookup(c, x->ns, sub, p->n, NULL, tiers, err)
             : x->kind == KEYS_EXISTS ? kvs_client_exists(c, x->ns, sub, p->n, present, err)
                                      : kvs_client_delete(c, x->ns, sub, p->n, &deleted, err);
    if (rc == 0 || rc == KVS_ENOTFOUND)
        atomic_fetch_add(&x->answered, 1);
    if (rc == KVS_ENOTFOUND) { /* no namespace there: none of its keys either */
        atomic_fetch_add(&x->ns_missing, 1);
        rc = 0;
    } else if (rc == 0) {
        for (size_t j = 0; j < p->n; j++) {
            if (x->kind == KEYS_LOOKUP)
                x->tiers[p->idx[j]] = tiers[j];
            else if (x->kind == KEYS_EXISTS)
                x->present[p->idx[j]] = present[j];
        }
        if (!p->copy)
            atomic_fetch_add(&x->deleted, deleted);
    }
    free(tiers);
    free(sub);
    return rc;
}

static void keys_fail(void *ctx, const kvs__part *p, int rc, const char *msg)
{
    /* The items keep their "absent" answers; a delete remembers what it could not reach. */
    keys_ctx *x = ctx;
    if (unreached(rc) && x->unreached++ == 0)
        set_msg(x->unreached_msg, sizeof x->unreached_msg, msg);
}

static const kvs__op lookup_op = {"Lookup", keys_key, keys_call, keys_fail};
static const kvs__op exists_op = {"Exists", keys_key, keys_call, keys_fail};
static const kvs__op delete_op = {"Delete", keys_key, keys_call, keys_fail};

/* Lookup and Exists: the local daemon first when there is one, the owners for the rest. */
static int keys_read(kvs_cluster *cl, const kvs__op *op, keys_ctx *x, size_t n, kvs_err *err)
{
    gpr_timespec deadline = kvs__cluster_deadline(cl);
    bool *skip = NULL;
    if (kvs__cluster_has_local(cl)) {
        kvs_err e;
        (void)kvs__fan_out(cl, op, x, n, NULL, KVS__LOCAL, deadline, &e);
        skip = kvs_trymalloc(n ? n : 1);
        if (!skip)
            return kvs_err_set(err, KVS_ENOMEM, "%s: out of memory for %zu keys", op->name, n);
        for (size_t i = 0; i < n; i++)
            skip[i] = x->kind == KEYS_LOOKUP ? x->tiers[i] != KVS_TIER_NONE : x->present[i];
    }
    int rc = kvs__fan_out(cl, op, x, n, skip, KVS__OWNERS, deadline, err);
    free(skip);
    if (rc == 0 && x->ns_missing > 0 && x->ns_missing == x->answered && x->unreached == 0)
        rc = kvs_err_set(err, KVS_ENOTFOUND, "%s: namespace '%s' not found on any daemon", op->name,
                         x->ns);
    return rc;
}

static int keys_check(const char *name, kvs_cluster *cl, const char *ns, const kvs_key *keys,
                      size_t n, kvs_err *err)
{
    kvs_err_clear(err);
    if (!cl || !ns || (!keys && n))
        return kvs_err_set(err, KVS_EINVAL, "%s: NULL argument", name);
    for (size_t i = 0; i < n; i++)
        if (kvs_key_validate(keys[i].len, err) != 0)
            return kvs_err_prefix(err, "%s: keys[%zu]", name, i);
    return 0;
}

int kvs_cluster_lookup(kvs_cluster *cl, const char *ns, const kvs_key *keys, size_t n,
                       uint32_t *prefix, kvs_tier *tiers, kvs_err *err)
{
    int rc = keys_check("Lookup", cl, ns, keys, n, err);
    if (rc)
        return rc;
    kvs_tier *t = tiers ? tiers : kvs_trymalloc((n ? n : 1) * sizeof *t);
    if (!t)
        return kvs_err_set(err, KVS_ENOMEM, "Lookup: out of memory for %zu keys", n);
    for (size_t i = 0; i < n; i++)
        t[i] = KVS_TIER_NONE;
    keys_ctx x = {.kind = KEYS_LOOKUP, .ns = ns, .keys = keys, .tiers = t};
    rc = keys_read(cl, &lookup_op, &x, n, err);
    uint32_t lead = 0;
    while (rc == 0 && lead < n && t[lead] != KVS_TIER_NONE)
        lead++;
    if (rc == 0 && prefix)
        *prefix = lead;
    if (t != tiers)
        free(t);
    return rc;
}

int kvs_cluster_exists(kvs_cluster *cl, const char *ns, const kvs_key *keys, size_t n,
                       bool *present, kvs_err *err)
{
    int rc = keys_check("Exists", cl, ns, keys, n, err);
    if (rc)
        return rc;
    bool *p = present ? present : kvs_trymalloc(n ? n : 1);
    if (!p)
        return kvs_err_set(err, KVS_ENOMEM, "Exists: out of memory for %zu keys", n);
    memset(p, 0, n * sizeof *p);
    keys_ctx x = {.kind = KEYS_EXISTS, .ns = ns, .keys = keys, .present = p};
    rc = keys_read(cl, &exists_op, &x, n, err);
    if (p != present)
        free(p);
    return rc;
}

int kvs_cluster_delete(kvs_cluster *cl, const char *ns, const kvs_key *keys, size_t n,
                       uint32_t *deleted, kvs_err *err)
{
    int rc = keys_check("Delete", cl, ns, keys, n, err);
    if (rc)
        return rc;
    keys_ctx x = {.kind = KEYS_DELETE, .ns = ns, .keys = keys};
    rc = kvs__fan_out(cl, &delete_op, &x, n, NULL, KVS__OWNERS | KVS__LOCAL,
                      kvs__cluster_deadline(cl), err);
    if (deleted)
        *deleted = (uint32_t)x.deleted;
    if (rc == 0 && x.unreached)
        rc = kvs_err_set(err, KVS_EUNAVAIL,
                         "Delete: %llu deleted, but keys on %zu daemon(s) were not: %s",
                         (unsigned long long)x.deleted, x.unreached, x.unreached_msg);
    return rc;
}

/* ------------------------------------------------------------------ namespaces */

typedef enum ns_kind { NS_CREATE, NS_GET, NS_DROP } ns_kind;

typedef struct ns_ctx {
    ns_kind kind;
    const kvs_ns_spec *spec; /* CREATE */
    const char *name;
    pthread_mutex_t mu; /* guards info and from */
    kvs_ns_info info;
    const kvs__node *from; /* whose info: the local daemon, else the smallest id */
    atomic_uint_fast64_t dropped;
    atomic_size_t ok, absent;
    size_t unreached; /* fail: caller's thread */
} ns_ctx;

static const char *codec_name(const char *s)
{
    return s[0] ? s : "none";
}

/* The fields that decide how blocks are laid out and encoded; quotas and durability are a
 * daemon's own business. */
static bool same_shape(const kvs_ns_spec *a, const kvs_ns_spec *b)
{
    return a->layers == b->layers && a->kv_heads == b->kv_heads && a->head_dim == b->head_dim &&
           a->block_tokens == b->block_tokens && a->dtype == b->dtype &&
           strcmp(codec_name(a->key_codec), codec_name(b->key_codec)) == 0 &&
           strcmp(codec_name(a->value_codec), codec_name(b->value_codec)) == 0 &&
           a->keys_pre_rope == b->keys_pre_rope && a->seed == b->seed;
}

static void ns_keep(ns_ctx *x, const kvs__part *p, const kvs_ns_info *info)
{
    pthread_mutex_lock(&x->mu);
    bool better =
        !x->from ||
        (!kvs__node_local(x->from) &&
         (kvs__node_local(p->node) || strcmp(kvs__node_id(p->node), kvs__node_id(x->from)) < 0));
    if (better) {
        x->info = *info;
        x->from = p->node;
    }
    pthread_mutex_unlock(&x->mu);
}

static int ns_call(void *ctx, kvs__part *p, kvs_err *err)
{
    ns_ctx *x = ctx;
    kvs_client *c = kvs__node_client(p->node);
    kvs_ns_info info;
    uint64_t dropped = 0;
    int rc;
    switch (x->kind) {
    case NS_CREATE:
        rc = kvs_client_ns_create(c, x->spec, &info, err);
        if (rc == KVS_EEXIST) {
            rc = kvs_client_ns_get(c, x->spec->name, &info, err);
            if (rc == 0 && !same_shape(&info.spec, x->spec))
                rc = kvs_err_set(err, KVS_EEXIST,
                                 "namespace '%s' exists there with another shape or codec",
                                 x->spec->name);
        }
        break;
    case NS_GET:
        rc = kvs_client_ns_get(c, x->name, &info, err);
        break;
    default:
        rc = kvs_client_ns_drop(c, x->name, &dropped, err);
        break;
    }
    if (rc == KVS_ENOTFOUND && x->kind != NS_CREATE) {
        atomic_fetch_add(&x->absent, 1);
        return 0;
    }
    if (rc == 0) {
        atomic_fetch_add(&x->ok, 1);
        atomic_fetch_add(&x->dropped, dropped);
        if (x->kind != NS_DROP)
            ns_keep(x, p, &info);
    }
    return rc;
}

static void ns_fail(void *ctx, const kvs__part *p, int rc, const char *msg)
{
    ns_ctx *x = ctx;
    x->unreached += unreached(rc);
}

static const kvs__op ns_create_op = {"CreateNamespace", NULL, ns_call, ns_fail};
static const kvs__op ns_get_op = {"GetNamespace", NULL, ns_call, ns_fail};
static const kvs__op ns_drop_op = {"DropNamespace", NULL, ns_call, ns_fail};

static int ns_run(kvs_cluster *cl, const kvs__op *op, ns_ctx *x, kvs_err *err)
{
    pthread_mutex_init(&x->mu, NULL);
    int rc = kvs__fan_out(cl, op, x, 0, NULL, KVS__EVERY, kvs__cluster_deadline(cl), err);
    pthread_mutex_destroy(&x->mu);
    if (rc == 0 && x->ok == 0 && x->absent == 0)
        rc = kvs_err_set(err, KVS_EUNAVAIL, "%s: no daemon answered", op->name);
    return rc;
}

int kvs_cluster_ns_create(kvs_cluster *cl, const kvs_ns_spec *spec, kvs_ns_info *info, kvs_err *err)
{
    kvs_err_clear(err);
    if (!cl || !spec)
        return kvs_err_set(err, KVS_EINVAL, "CreateNamespace: NULL argument");
    ns_ctx x = {.kind = NS_CREATE, .spec = spec, .name = spec->name};
    int rc = ns_run(cl, &ns_create_op, &x, err);
    /* Remembered only once a daemon took it (a bad spec is refused by all): daemons that
     * were down get it when a put reaches them. */
    if (x.ok > 0)
        kvs__cluster_ns_remember(cl, spec);
    if (rc == 0 && info)
        *info = x.info;
    return rc;
}

int kvs_cluster_ns_get(kvs_cluster *cl, const char *name, kvs_ns_info *info, kvs_err *err)
{
    kvs_err_clear(err);
    if (!cl || !name)
        return kvs_err_set(err, KVS_EINVAL, "GetNamespace: NULL argument");
    ns_ctx x = {.kind = NS_GET, .name = name};
    int rc = ns_run(cl, &ns_get_op, &x, err);
    if (rc == 0 && x.ok == 0)
        rc = kvs_err_set(err, KVS_ENOTFOUND,
                         "GetNamespace: namespace '%s' not found on any "
                         "daemon that answered",
                         name);
    if (rc == 0) {
        kvs__cluster_ns_remember(cl, &x.info.spec);
        if (info)
            *info = x.info;
    }
    return rc;
}

int kvs_cluster_ns_drop(kvs_cluster *cl, const char *name, uint64_t *blocks_dropped, kvs_err *err)
{
    kvs_err_clear(err);
    if (!cl || !name)
        return kvs_err_set(err, KVS_EINVAL, "DropNamespace: NULL argument");
    /* Forgotten first, so that no put recreates it on a daemon meanwhile. */
    kvs__cluster_ns_forget(cl, name);
    ns_ctx x = {.kind = NS_DROP, .name = name};
    int rc = ns_run(cl, &ns_drop_op, &x, err);
    if (blocks_dropped)
        *blocks_dropped = x.dropped;
    if (rc == 0 && x.ok == 0 && x.unreached == 0)
        rc = kvs_err_set(err, KVS_ENOTFOUND, "DropNamespace: namespace '%s' not found", name);
    else if (rc == 0 && x.unreached)
        rc = kvs_err_set(err, KVS_EUNAVAIL,
                         "DropNamespace: dropped on %zu daemon(s), %zu did not answer and keep it",
                         (size_t)x.ok, x.unreached);
    return rc;
}
