/* KvAdmin Verify, Flush, Evict (DESIGN §4, §10: kvctl verify, flush, evict): the long
 * admin calls. Each may read every stored block or wait for the disk writer, so the
 * handler (a CQ thread) only parses and checks the request; the work runs on the libuv
 * pool (kvs_call_run_work) in the store's admin verbs (storage/store.h, "admin"), and the
 * reply is sent from the loop thread. Between the two the call has no batch in flight but
 * CLOSE (call.h invariant 1), and its job (c->u.tiers.job, owned by the call until `done`
 * frees it) is touched by one thread at a time. Admin token rules as every KvAdmin call.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "daemon/call.h"
#include "daemon/log.h"
#include "daemon/wire.h"
#include "gpu/base/mem.h"
#include "kvstash/v1/kvstash.pb-c.h"
#include "storage/tiering.h"

typedef struct kvs_tiers_job {
    int rc;
    kvs_err err;
    /* Evict: the request (owned; keys point into it), its namespace and target. */
    Kvstash__V1__EvictRequest *req;
    kvs_ns *ns; /* reference, or NULL: every namespace */
    kvs_store_key *keys;
    size_t n;
    kvs_store_tier to;
    union {
        kvs_store_verify_info verify;
        kvs_store_flush_info flush;
        kvs_store_evict_info evict;
    } out;
} kvs_tiers_job;

static kvs_tiers_job *job_new(kvs_call *c)
{
    kvs_tiers_job *j = kvs_xcalloc(1, sizeof *j); /* small and fixed */
    kvs_err_clear(&j->err);
    c->u.tiers.job = j;
    return j;
}

static void job_free(kvs_tiers_job *j)
{
    if (j->req)
        kvstash__v1__evict_request__free_unpacked(j->req, NULL);
    if (j->ns)
        kvs_ns_unref(j->ns);
    free(j->keys);
    free(j);
}

/* Loop thread: sends the reply the job's result calls for, or its error, and frees it. */
static void finish_job(kvs_call *c, const ProtobufCMessage *reply)
{
    kvs_tiers_job *j = c->u.tiers.job;
    c->u.tiers.job = NULL;
    if (j->rc)
        kvs_call_fail(c, j->rc, j->err.msg);
    else
        kvs_call_reply(c, reply);
    job_free(j);
}

/* ---------------------------------------------------------------- Verify */

static void verify_work(void *arg)
{
    kvs_call *c = arg;
    kvs_tiers_job *j = c->u.tiers.job;
    j->rc = kvs_store_verify(c->srv->store, &j->out.verify, &j->err);
}

static void verify_done(void *arg)
{
    kvs_call *c = arg;
    kvs_tiers_job *j = c->u.tiers.job;
    const kvs_store_verify_info *v = &j->out.verify;
    kvs_store *st = c->srv->store;
    Kvstash__V1__TierVerify t[3], *tp[3];
    size_t n = 0;
    for (int i = 0; i < 3; i++)
        kvstash__v1__tier_verify__init(&t[i]);
    if (kvs_store_has_gpu(st)) {
        t[n].tier = KVSTASH__V1__TIER__TIER_GPU;
        t[n++].skipped = v->gpu_skipped;
    }
    t[n].tier = KVSTASH__V1__TIER__TIER_HOST;
    t[n].checked = v->host_checked;
    t[n++].bad = v->host_bad;
    if (kvs_store_has_disk(st)) {
        t[n].tier = KVSTASH__V1__TIER__TIER_DISK;
        t[n].checked = v->disk_checked;
        t[n++].bad = v->disk_bad;
    }
    for (size_t i = 0; i < n; i++)
        tp[i] = &t[i];
    Kvstash__V1__VerifyReply reply = KVSTASH__V1__VERIFY_REPLY__INIT;
    reply.n_tiers = n;
    reply.tiers = tp;
    if (j->rc == 0)
        kvs_log_call(v->host_bad || v->disk_bad ? KVS_LOG_WARN : KVS_LOG_INFO, c->id, "Verify",
                     "host %llu checked, %llu bad; disk %llu checked, %llu bad; "
                     "gpu %llu not checked",
                     (unsigned long long)v->host_checked, (unsigned long long)v->host_bad,
                     (unsigned long long)v->disk_checked, (unsigned long long)v->disk_bad,
                     (unsigned long long)v->gpu_skipped);
    finish_job(c, &reply.base);
}

int kvs_verify_handle(kvs_call *c, const uint8_t *req, size_t len, kvs_err *err)
{
    Kvstash__V1__VerifyRequest *r = (Kvstash__V1__VerifyRequest *)kvs_wire_unpack(
        &kvstash__v1__verify_request__descriptor, req, len, err);
    if (!r)
        return err->code;
    kvstash__v1__verify_request__free_unpacked(r, NULL);
    job_new(c);
    kvs_call_run_work(c, verify_work, verify_done);
    return 0;
}

/* ---------------------------------------------------------------- Flush */

static void flush_work(void *arg)
{
    kvs_call *c = arg;
    kvs_tiers_job *j = c->u.tiers.job;
    j->rc = kvs_store_flush_sync(c->srv->store, &j->out.flush, &j->err);
}

static void flush_done(void *arg)
{
    kvs_call *c = arg;
    kvs_tiers_job *j = c->u.tiers.job;
    const kvs_store_flush_info *f = &j->out.flush;
    Kvstash__V1__FlushReply reply = KVSTASH__V1__FLUSH_REPLY__INIT;
    reply.written = f->written;
    reply.failed = f->failed;
    reply.already = f->already;
    reply.gpu_skipped = f->gpu_skipped;
    kvs_log_call(f->failed ? KVS_LOG_WARN : KVS_LOG_INFO, c->id, "Flush",
                 "%llu host blocks written, %llu failed, %llu already on disk",
                 (unsigned long long)f->written, (unsigned long long)f->failed,
                 (unsigned long long)f->already);
    finish_job(c, &reply.base);
}

int kvs_flush_handle(kvs_call *c, const uint8_t *req, size_t len, kvs_err *err)
{
    Kvstash__V1__FlushRequest *r = (Kvstash__V1__FlushRequest *)kvs_wire_unpack(
        &kvstash__v1__flush_request__descriptor, req, len, err);
    if (!r)
        return err->code;
    kvstash__v1__flush_request__free_unpacked(r, NULL);
    if (!kvs_store_has_disk(c->srv->store))
        return kvs_err_set(err, KVS_EINVAL,
                           "Flush: this daemon has no disk tier (start "
                           "kvstashd with --data-dir)");
    job_new(c);
    kvs_call_run_work(c, flush_work, flush_done);
    return 0;
}

/* ---------------------------------------------------------------- Evict */

static void evict_work(void *arg)
{
    kvs_call *c = arg;
    kvs_tiers_job *j = c->u.tiers.job;
    kvs_store_sel sel = {.ns = j->ns, .keys = j->n ? j->keys : NULL, .n = j->n};
    kvs_tiering *t = c->srv->tiering;
    j->rc = kvs_store_evict(c->srv->store, &sel, j->to, t ? kvs_tiering_demote : NULL, t,
                            &j->out.evict, &j->err);
}

static void evict_done(void *arg)
{
    kvs_call *c = arg;
    kvs_tiers_job *j = c->u.tiers.job;
    const kvs_store_evict_info *e = &j->out.evict;
    Kvstash__V1__EvictReply reply = KVSTASH__V1__EVICT_REPLY__INIT;
    reply.moved = e->moved;
    reply.dropped = e->dropped;
    reply.unchanged = e->unchanged;
    reply.busy = e->busy;
    reply.failed = e->failed;
    reply.absent = e->absent;
    if (j->rc == 0)
        kvs_log_call(KVS_LOG_INFO, c->id, "Evict",
                     "%s, to %s: %llu moved, %llu dropped, %llu unchanged, "
                     "%llu busy, %llu failed, %llu absent",
                     j->ns ? kvs_ns_spec_of(j->ns)->name : "all namespaces",
                     j->to == KVS_STORE_TIER_HOST   ? "host"
                     : j->to == KVS_STORE_TIER_DISK ? "disk"
                                                    : "out",
                     (unsigned long long)e->moved, (unsigned long long)e->dropped,
                     (unsigned long long)e->unchanged, (unsigned long long)e->busy,
                     (unsigned long long)e->failed, (unsigned long long)e->absent);
    finish_job(c, &reply.base);
}

/* Checks an EvictRequest and fills the job from it (the job owns r from here). */
static int evict_open(kvs_call *c, kvs_tiers_job *j, Kvstash__V1__EvictRequest *r, kvs_err *err)
{
    j->req = r;
    switch (r->to) {
    case KVSTASH__V1__EVICT_REQUEST__TARGET__TARGET_HOST:
        j->to = KVS_STORE_TIER_HOST;
        break;
    case KVSTASH__V1__EVICT_REQUEST__TARGET__TARGET_DISK:
        j->to = KVS_STORE_TIER_DISK;
        break;
    case KVSTASH__V1__EVICT_REQUEST__TARGET__TARGET_OUT:
        j->to = KVS_STORE_TIER_NONE;
        break;
    default:
        return kvs_err_set(err, KVS_EINVAL,
                           "to: %d is not TARGET_HOST, TARGET_DISK or "
                           "TARGET_OUT",
                           (int)r->to);
    }
    if (j->to == KVS_STORE_TIER_DISK && !kvs_store_has_disk(c->srv->store))
        return kvs_err_set(err, KVS_EINVAL,
                           "to: TARGET_DISK, but this daemon has no disk tier "
                           "(start kvstashd with --data-dir)");
    bool named = r->namespace_ && r->namespace_[0];
    if (r->all && (named || r->n_keys))
        return kvs_err_set(err, KVS_EINVAL,
                           "all: evicts every block of every namespace; leave "
                           "namespace and keys empty with it");
    if (!named && r->n_keys)
        return kvs_err_set(err, KVS_EINVAL, "keys: given without a namespace");
    if (!named && !r->all)
        return kvs_err_set(err, KVS_EINVAL,
                           "namespace: empty; name one, or set all to evict "
                           "every namespace");
    if (r->all && c->tenant) /* every tenant's blocks: not one tenant's call (README "Tenants") */
        return kvs_err_set(err, KVS_EPERM,
                           "all: a tenant token may evict only its own namespaces; name one");
    if (!named)
        return 0;
    int rc = kvs_call_ns_find(c, r->namespace_, &j->ns, err);
    if (rc || r->n_keys == 0)
        return rc;
    unsigned max = c->srv->cfg->max_keys;
    if (r->n_keys > max) /* before anything is sized from the count */
        return kvs_wire_check_keys(r->keys, r->n_keys, max, NULL, err);
    if (!(j->keys = kvs_trymalloc(r->n_keys * sizeof *j->keys)))
        return kvs_err_set(err, KVS_ENOMEM, "keys: out of memory for %zu keys", r->n_keys);
    j->n = r->n_keys;
    return kvs_wire_check_keys(r->keys, r->n_keys, max, j->keys, err);
}

int kvs_evict_handle(kvs_call *c, const uint8_t *req, size_t len, kvs_err *err)
{
    Kvstash__V1__EvictRequest *r = (Kvstash__V1__EvictRequest *)kvs_wire_unpack(
        &kvstash__v1__evict_request__descriptor, req, len, err);
    if (!r)
        return err->code;
    kvs_tiers_job *j = job_new(c);
    int rc = evict_open(c, j, r, err);
    if (rc) {
        c->u.tiers.job = NULL;
        job_free(j);
        return rc;
    }
    kvs_call_run_work(c, evict_work, evict_done);
    return 0;
}
