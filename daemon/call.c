/* Call base: arming request slots, the event dispatcher, batch helpers, auth and the
 * unary path. The state machine, its invariants and the lock order are in call.h.
 * Runs on the completion-queue threads only. */
#include "daemon/call.h"
#include "daemon/wire.h"

#include <grpc/byte_buffer_reader.h>
#include <grpc/support/alloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "daemon/auth.h"
#include "daemon/config.h"
#include "daemon/limits.h"
#include "daemon/log.h"
#include "daemon/work.h"
#include "storage/xfer.h"
#include "gpu/base/mem.h"

const uint64_t kvs_rpc_lat_bounds_ns[KVS_RPC_LAT_BUCKETS] = {
    100000,   250000,    500000,    1000000,   2500000,    5000000,    10000000,   25000000,
    50000000, 100000000, 250000000, 500000000, 1000000000, 2500000000, 5000000000, 10000000000};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Counts the call's status and its time since arrival, once (the FINISH batch, or the
 * call's end when its client left before one). Relaxed atomics: each counter is read
 * alone by a scrape, which may see a call's code before its latency. */
static void observe(kvs_call *c, grpc_status_code status)
{
    if (c->observed || !c->arrived_ns || c->rpc >= KVS_RPC_COUNT)
        return;
    c->observed = true;
    kvs_server *srv = c->srv;
    uint64_t ns = now_ns() - c->arrived_ns;
    unsigned b = 0;
    while (b < KVS_RPC_LAT_BUCKETS && ns > kvs_rpc_lat_bounds_ns[b])
        b++;
    unsigned code = (unsigned)status < KVS_GRPC_CODES ? (unsigned)status : GRPC_STATUS_UNKNOWN;
    atomic_fetch_add_explicit(&srv->rpc_codes[c->rpc][code], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&srv->rpc_lat[c->rpc][b], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&srv->rpc_lat_sum_ns[c->rpc], ns, memory_order_relaxed);
}

uint64_t kvs_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

bool kvs_call_idle(uint64_t since, uint64_t now, uint64_t idle_ms)
{
    /* since > now: the call began waiting after the caller read its clock (the sweep reads
     * it once, then each call's time on CQ threads that go on): it has not waited. */
    return since && since <= now && now - since >= idle_ms;
}

static kvs_call *call_new(kvs_server *srv, kvs_rpc rpc)
{
    kvs_call *c = kvs_xcalloc(1, sizeof *c);
    c->srv = srv;
    c->rpc = rpc;
    c->id = atomic_fetch_add(&srv->next_call_id, 1) + 1;
    grpc_metadata_array_init(&c->md);
    grpc_call_details_init(&c->details);
    pthread_mutex_init(&c->mu, NULL);
    for (int i = 0; i < KVS_STEP_COUNT; i++) {
        c->tags[i].call = c;
        c->tags[i].step = (kvs_call_step)i;
    }
    c->pending = 1; /* the ARRIVE request */
    return c;
}

/* Links an admitted streaming call into srv->streams (call.h invariant 4). */
static void streams_link(kvs_server *srv, kvs_call *c)
{
    pthread_mutex_lock(&srv->mu);
    c->snext = srv->streams;
    c->sprev = NULL;
    if (srv->streams)
        srv->streams->sprev = c;
    srv->streams = c;
    c->streamed = true;
    pthread_mutex_unlock(&srv->mu);
}

static void streams_unlink(kvs_server *srv, kvs_call *c)
{
    pthread_mutex_lock(&srv->mu);
    if (c->sprev)
        c->sprev->snext = c->snext;
    else
        srv->streams = c->snext;
    if (c->snext)
        c->snext->sprev = c->sprev;
    c->streamed = false;
    pthread_mutex_unlock(&srv->mu);
}

static void call_free(kvs_call *c)
{
    kvs_server *srv = c->srv;
    if (c->streamed) /* before the grpc_call goes: the sweep may be about to cancel it */
        streams_unlink(srv, c);
    if (c->rpc < KVS_RPC_COUNT && c->srv->rpcs[c->rpc].cleanup)
        c->srv->rpcs[c->rpc].cleanup(c);
    observe(c, GRPC_STATUS_CANCELLED); /* ended without a status: its client left */
    if (c->call)
        grpc_call_unref(c->call);
    grpc_metadata_array_destroy(&c->md);
    grpc_call_details_destroy(&c->details);
    if (c->request)
        grpc_byte_buffer_destroy(c->request);
    if (c->recv)
        grpc_byte_buffer_destroy(c->recv);
    if (c->send)
        grpc_byte_buffer_destroy(c->send);
    if (c->status_details_set)
        grpc_slice_unref(c->status_details);
    pthread_mutex_destroy(&c->mu);
    bool admitted = c->admitted;
    free(c);

    pthread_mutex_lock(&srv->mu);
    srv->live--;
    if (admitted)
        srv->inflight--;
    pthread_cond_broadcast(&srv->cond);
    pthread_mutex_unlock(&srv->mu);
}

int kvs_call_arm(kvs_server *srv, kvs_rpc rpc)
{
    pthread_mutex_lock(&srv->mu);
    if (srv->shutting_down) {
        pthread_mutex_unlock(&srv->mu);
        return KVS_EUNAVAIL;
    }
    kvs_call *c = call_new(srv, rpc);
    srv->live++;
    grpc_call_error e;
    /* Requested under srv->mu so that shutdown cannot slip in between the check above
     * and the request (a request after the queue shut down aborts the process). */
    if (rpc == KVS_RPC_UNKNOWN) {
        e = grpc_server_request_call(srv->server, &c->call, &c->details, &c->md, srv->cq, srv->cq,
                                     &c->tags[KVS_STEP_ARRIVE]);
    } else {
        bool with_payload = !c->srv->rpcs[rpc].client_streaming;
        e = grpc_server_request_registered_call(
            srv->server, srv->registered[rpc], &c->call, &c->deadline, &c->md,
            with_payload ? &c->request : NULL, srv->cq, srv->cq, &c->tags[KVS_STEP_ARRIVE]);
    }
    pthread_mutex_unlock(&srv->mu);
    if (e != GRPC_CALL_OK) {
        kvs_log(KVS_LOG_ERROR, "arming a %s slot failed: grpc_call_error %d",
                rpc == KVS_RPC_UNKNOWN ? "generic" : c->srv->rpcs[rpc].name, (int)e);
        c->rpc = KVS_RPC_UNKNOWN; /* nothing method-specific to clean */
        call_free(c);
        return KVS_EINTERNAL;
    }
    return 0;
}

/* Starts a batch tagged with step; on a synchronous refusal the call is abandoned. */
static void start_batch(kvs_call *c, const grpc_op *ops, size_t n, kvs_call_step step)
{
    pthread_mutex_lock(&c->mu);
    c->pending++;
    pthread_mutex_unlock(&c->mu);
    grpc_call_error e = grpc_call_start_batch(c->call, ops, n, &c->tags[step], NULL);
    if (e != GRPC_CALL_OK) {
        kvs_log_call(KVS_LOG_ERROR, c->id, c->srv->rpcs[c->rpc < KVS_RPC_COUNT ? c->rpc : 0].name,
                     "grpc_call_start_batch (step %d) failed: %d", (int)step, (int)e);
        pthread_mutex_lock(&c->mu);
        c->pending--;
        c->finished = true;
        pthread_mutex_unlock(&c->mu);
    }
}

static size_t add_initial_md(kvs_call *c, grpc_op *op)
{
    if (c->md_sent)
        return 0;
    c->md_sent = true;
    memset(op, 0, sizeof *op);
    op->op = GRPC_OP_SEND_INITIAL_METADATA;
    return 1;
}

grpc_byte_buffer *kvs_call_pack(const ProtobufCMessage *msg)
{
    size_t n = protobuf_c_message_get_packed_size(msg);
    grpc_slice s = grpc_slice_malloc(n);
    protobuf_c_message_pack(msg, GRPC_SLICE_START_PTR(s));
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    return bb;
}

/* The call now waits for its client (what the idle sweep measures). */
static void wait_client(kvs_call *c)
{
    uint64_t now = kvs_now_ms();
    atomic_store(&c->waiting_ms, now ? now : 1);
}

void kvs_call_progress(kvs_call *c)
{
    c->idle_since_ms = 0;
}

void kvs_call_recv(kvs_call *c)
{
    /* The wait is measured from the last progress that counted (kvs_call_progress), not
     * from this message: a client trickling tiny messages is idle all the same. */
    if (!c->idle_since_ms) {
        uint64_t now = kvs_now_ms();
        c->idle_since_ms = now ? now : 1;
    }
    atomic_store(&c->waiting_ms, c->idle_since_ms);
    grpc_op ops[2];
    size_t n = add_initial_md(c, &ops[0]);
    memset(&ops[n], 0, sizeof ops[n]);
    ops[n].op = GRPC_OP_RECV_MESSAGE;
    ops[n].data.recv_message.recv_message = &c->recv;
    start_batch(c, ops, n + 1, KVS_STEP_RECV);
}

void kvs_call_send(kvs_call *c, const ProtobufCMessage *msg)
{
    kvs_call_send_buffer(c, kvs_call_pack(msg));
}

void kvs_call_send_buffer(kvs_call *c, grpc_byte_buffer *bb)
{
    wait_client(c);
    grpc_op ops[2];
    size_t n = add_initial_md(c, &ops[0]);
    c->send = bb;
    memset(&ops[n], 0, sizeof ops[n]);
    ops[n].op = GRPC_OP_SEND_MESSAGE;
    ops[n].data.send_message.send_message = c->send;
    start_batch(c, ops, n + 1, KVS_STEP_SEND);
}

/* The call's last batch: bb (owned from here; NULL: status only) and the status. */
static void finish(kvs_call *c, grpc_byte_buffer *bb, grpc_status_code status, const char *details)
{
    grpc_op ops[3];
    observe(c, status);
    size_t n = add_initial_md(c, &ops[0]);
    if (bb) {
        /* A stream's last message may wait for its client like any other (flow control):
         * the idle sweep measures it as it does a SEND. */
        wait_client(c);
        c->send = bb;
        memset(&ops[n], 0, sizeof ops[n]);
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n].data.send_message.send_message = c->send;
        n++;
    }
    memset(&ops[n], 0, sizeof ops[n]);
    ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[n].data.send_status_from_server.status = status;
    if (details) {
        c->status_details = grpc_slice_from_copied_string(details);
        c->status_details_set = true;
        ops[n].data.send_status_from_server.status_details = &c->status_details;
    }
    start_batch(c, ops, n + 1, KVS_STEP_FINISH);
}

void kvs_call_reply(kvs_call *c, const ProtobufCMessage *msg)
{
    finish(c, msg ? kvs_call_pack(msg) : NULL, GRPC_STATUS_OK, NULL);
}

void kvs_call_reply_buffer(kvs_call *c, grpc_byte_buffer *bb)
{
    finish(c, bb, GRPC_STATUS_OK, NULL);
}

void kvs_call_fail(kvs_call *c, int code, const char *msg)
{
    const char *name = c->rpc < KVS_RPC_COUNT ? c->srv->rpcs[c->rpc].name : "unknown";
    if (c->rpc < KVS_RPC_COUNT)
        atomic_fetch_add(&c->srv->rpc_errors[c->rpc], 1);
    /* Client mistakes are routine for a server: log them at debug, our own at error. */
    int status = kvs_err_grpc_status(code);
    kvs_log_call(status == GRPC_STATUS_INTERNAL || status == GRPC_STATUS_DATA_LOSS ? KVS_LOG_ERROR
                                                                                   : KVS_LOG_DEBUG,
                 c->id, name, "%s: %s", kvs_err_name(code), msg);
    finish(c, NULL, (grpc_status_code)status, msg);
}

void kvs_call_abandon(kvs_call *c)
{
    pthread_mutex_lock(&c->mu);
    c->finished = true;
    /* Inside an event handler pending counts that event, so the handler's return frees the
     * call; a call abandoned from elsewhere (the data path's callback, once its client has
     * gone and CLOSE has completed) may have nothing in flight left to do it. */
    bool now = c->pending == 0;
    pthread_mutex_unlock(&c->mu);
    if (now)
        call_free(c);
}

void kvs_call_run_work(kvs_call *c, void (*fn)(void *), void (*done)(void *))
{
    kvs_work_run(c->srv->work, fn, done, c);
}

_Static_assert(sizeof(((kvs_call *)0)->token_digest) == KVS_AUTH_DIGEST_LEN,
               "kvs_call.token_digest holds one auth digest");

/* The name check and, for a tenant call, the grant check (call.h): inside the auth
 * reader count, against the object current now; only the call's digest is kept. */
static int ns_check(kvs_call *c, const char *name, const char *field, kvs_err *err)
{
    int rc = kvs_wire_check_name(name, field, err);
    if (rc || !c->tenant)
        return rc;
    kvs_server *srv = c->srv;
    atomic_fetch_add(&srv->auth_readers, 1);
    bool granted = kvs_auth_grants(atomic_load(&srv->auth), c->token_digest, name);
    atomic_fetch_sub(&srv->auth_readers, 1);
    if (!granted) /* one message, whether the namespace exists or not */
        return kvs_err_set(err, KVS_EPERM, "namespace '%s': not granted to this token", name);
    return 0;
}

int kvs_call_ns_find(kvs_call *c, const char *name, kvs_ns **out, kvs_err *err)
{
    int rc = ns_check(c, name, "namespace", err);
    return rc ? rc : kvs_store_ns_find(c->srv->store, name, out, err);
}

/* A tenant's quota in one tier: at most cap (--tenant-TIER-quota), cap when it asks none;
 * cap 0: the daemon has no such tier, the value is kept as asked (it has nothing to share). */
static int tenant_quota(uint64_t *quota, uint64_t cap, const char *field, const char *tier,
                        kvs_err *err)
{
    if (!cap)
        return 0;
    if (*quota > cap)
        return kvs_err_set(err, KVS_EPERM,
                           "%s: %llu; a tenant token may give its namespace at most %llu bytes of "
                           "the %s tier (--tenant-%s-quota)",
                           field, (unsigned long long)*quota, (unsigned long long)cap, tier, tier);
    if (*quota == 0)
        *quota = cap;
    return 0;
}

int kvs_call_ns_create(kvs_call *c, const kvs_ns_spec *spec, kvs_ns **out, kvs_err *err)
{
    int rc = ns_check(c, spec->name, "spec.name", err);
    if (rc || !c->tenant)
        return rc ? rc : kvs_store_ns_create(c->srv->store, spec, out, err);
    /* A tenant's namespace always has a quota in each tier the daemon has, at most the
     * operator's cap: without one, its Puts could take every other tenant's blocks from that
     * tier (host: evicted, storage/store.c block_alloc; disk: evicted from the budget,
     * store_disk.c; gpu: demoted, store_gpu.c). */
    kvs_ns_spec s = *spec;
    kvs_store_stats st;
    kvs_store_get_stats(c->srv->store, &st);
    const kvs_config *cfg = c->srv->cfg;
    if ((rc = tenant_quota(&s.host_quota, kvs_config_tenant_host_quota(cfg), "host_quota_bytes",
                           "host", err)) ||
        (rc = tenant_quota(&s.gpu_quota, kvs_config_tenant_gpu_quota(cfg, st.gpu_capacity),
                           "gpu_quota_bytes", "gpu", err)) ||
        (rc = tenant_quota(&s.disk_quota, kvs_config_tenant_disk_quota(cfg), "disk_quota_bytes",
                           "disk", err)))
        return rc;
    return kvs_store_ns_create(c->srv->store, &s, out, err);
}

int kvs_call_ns_drop(kvs_call *c, const char *name, uint64_t *blocks_dropped, kvs_err *err)
{
    int rc = ns_check(c, name, "name", err);
    return rc ? rc : kvs_store_ns_drop(c->srv->store, name, blocks_dropped, err);
}

grpc_slice kvs_call_flatten(grpc_byte_buffer *bb)
{
    grpc_byte_buffer_reader rd;
    if (!grpc_byte_buffer_reader_init(&rd, bb))
        return grpc_empty_slice();
    grpc_slice s = grpc_byte_buffer_reader_readall(&rd);
    grpc_byte_buffer_reader_destroy(&rd);
    return s;
}

/* Auth rules (DESIGN §9, README "Tokens", "Tenants"): with --token set, KvStash calls
 * need the client or admin token; with --admin-token set, KvAdmin calls need the admin
 * token (a valid client token gets PERMISSION_DENIED); with only --token set, it also
 * opens KvAdmin. With tenant tokens configured, no call but Health goes without a token,
 * and a call presenting only a tenant token is admitted to the RPCs whose table row says
 * `tenant` (server.c), marked c->tenant so that every namespace it names is checked
 * (kvs_call_ns_find); any other KvAdmin call gets PERMISSION_DENIED. Health is always
 * open so that probes work without secrets. Tokens are compared as digests in constant
 * time (daemon/auth.h); the branches below are on the outcome, never on token bytes. */
static int check_auth_with(kvs_call *c, const kvs_auth *auth, kvs_err *err)
{
    if (c->rpc == KVS_RPC_HEALTH)
        return 0;
    const kvs_rpc_desc *d = &c->srv->rpcs[c->rpc];
    bool admin_rpc = d->admin;
    bool need_admin = kvs_auth_has_admin(auth), need_client = kvs_auth_has_client(auth);
    bool tenants = kvs_auth_has_tenants(auth);
    if (admin_rpc ? !(need_admin || need_client || tenants) : !(need_client || tenants))
        return 0;
    unsigned roles = 0;
    for (size_t i = 0; i < c->md.count; i++) {
        if (!grpc_slice_str_cmp(c->md.metadata[i].key, "authorization")) {
            grpc_slice v = c->md.metadata[i].value;
            uint8_t dig[KVS_AUTH_DIGEST_LEN];
            kvs_auth_digest(GRPC_SLICE_START_PTR(v), GRPC_SLICE_LENGTH(v), dig);
            unsigned r = kvs_auth_roles_digest(auth, dig);
            if ((r & KVS_AUTH_TENANT) && !(roles & KVS_AUTH_TENANT)) /* the first one counts */
                memcpy(c->token_digest, dig, sizeof dig);
            roles |= r;
        }
    }
    bool is_admin = roles & KVS_AUTH_ADMIN, is_client = roles & KVS_AUTH_CLIENT;
    bool is_tenant = (roles & KVS_AUTH_TENANT) && !is_admin && !is_client;
    if (is_tenant) {
        if (!d->tenant)
            return kvs_err_set(err, KVS_EPERM,
                               "authorization: a tenant token may not call KvAdmin.%s (it "
                               "concerns every namespace)",
                               d->name);
        c->tenant = true;
        return 0;
    }
    if (admin_rpc) {
        if (need_admin ? is_admin : is_client)
            return 0;
        if (need_admin && is_client)
            return kvs_err_set(err, KVS_EPERM,
                               "authorization: the client token may not call KvAdmin.%s", d->name);
        return kvs_err_set(err, KVS_EUNAUTH, "authorization: missing or unknown bearer token");
    }
    if (is_client || is_admin)
        return 0;
    return kvs_err_set(err, KVS_EUNAUTH, "authorization: missing or unknown bearer token");
}

/* The reader's side of the auth swap (call.h, kvs_server.auth): counted in before the
 * pointer is loaded, out after the last use of the object. */
static int check_auth(kvs_call *c, kvs_err *err)
{
    kvs_server *srv = c->srv;
    atomic_fetch_add(&srv->auth_readers, 1);
    int rc = check_auth_with(c, atomic_load(&srv->auth), err);
    atomic_fetch_sub(&srv->auth_readers, 1);
    return rc;
}

static void on_arrive(kvs_call *c, bool ok)
{
    kvs_server *srv = c->srv;
    if (!ok) { /* the server is shutting down: this slot never got a call */
        kvs_call_abandon(c);
        return;
    }
    /* Keep the slot count constant: re-arm before the work on this call starts. */
    kvs_call_arm(srv, c->rpc);

    grpc_op close_op;
    memset(&close_op, 0, sizeof close_op);
    close_op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    close_op.data.recv_close_on_server.cancelled = &c->cancelled;
    start_batch(c, &close_op, 1, KVS_STEP_CLOSE);

    if (c->rpc == KVS_RPC_UNKNOWN) {
        char *method = grpc_slice_to_c_string(c->details.method);
        char msg[300];
        snprintf(msg, sizeof msg, "method %.200s is not implemented by kvstashd", method);
        gpr_free(method);
        kvs_call_fail(c, KVS_ENOTSUP, msg);
        return;
    }
    atomic_fetch_add(&srv->rpc_calls[c->rpc], 1);
    c->arrived_ns = now_ns();
    if (c->rpc != KVS_RPC_HEALTH && atomic_load(&srv->draining)) {
        kvs_call_fail(c, KVS_EUNAVAIL, "server is draining: retry on another instance");
        return;
    }
    kvs_err err;
    kvs_err_clear(&err);
    if (check_auth(c, &err)) {
        kvs_call_fail(c, err.code, err.msg);
        return;
    }
    if (c->rpc != KVS_RPC_HEALTH) {
        pthread_mutex_lock(&srv->mu);
        c->admitted = true;
        srv->inflight++;
        pthread_mutex_unlock(&srv->mu);
    }
    const kvs_rpc_desc *d = &c->srv->rpcs[c->rpc];
    if (d->start)
        streams_link(srv, c);
    if (d->client_streaming) {
        d->start(c, NULL, 0);
        return;
    }
    if (!c->request) {
        kvs_call_fail(c, KVS_EINVAL, "request: the client sent no request message");
        return;
    }
    grpc_slice req = kvs_call_flatten(c->request);
    const uint8_t *p = GRPC_SLICE_START_PTR(req);
    size_t len = GRPC_SLICE_LENGTH(req);
    if (d->start) {
        d->start(c, p, len);
    } else {
        int rc = d->unary(c, p, len, &err);
        if (rc)
            kvs_call_fail(c, rc, err.msg);
    }
    grpc_slice_unref(req);
}

void kvs_call_on_event(kvs_call_tag *tag, bool ok)
{
    kvs_call *c = tag->call;
    switch (tag->step) {
    case KVS_STEP_ARRIVE:
        on_arrive(c, ok);
        break;
    case KVS_STEP_CLOSE:
        break; /* c->cancelled is set; the send/recv paths see failures */
    case KVS_STEP_RECV:
        atomic_store(&c->waiting_ms, 0);
        c->srv->rpcs[c->rpc].on_recv(c, ok);
        break;
    case KVS_STEP_SEND:
        atomic_store(&c->waiting_ms, 0);
        grpc_byte_buffer_destroy(c->send);
        c->send = NULL;
        c->srv->rpcs[c->rpc].on_send(c, ok);
        break;
    case KVS_STEP_FINISH:
        atomic_store(&c->waiting_ms, 0);
        if (c->send) {
            grpc_byte_buffer_destroy(c->send);
            c->send = NULL;
        }
        kvs_call_abandon(c); /* nothing more to send: finished */
        break;
    default:
        break;
    }
    pthread_mutex_lock(&c->mu);
    bool done = --c->pending == 0 && c->finished;
    pthread_mutex_unlock(&c->mu);
    if (done)
        call_free(c);
}

uint8_t *kvs_call_buf_alloc(kvs_call *c, size_t n)
{
    return kvs_xfer_host_alloc(c->srv->xfer, n);
}

void kvs_call_buf_free(kvs_call *c, uint8_t *p)
{
    kvs_xfer_host_free(c->srv->xfer, p);
}
