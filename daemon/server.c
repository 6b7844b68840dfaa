/* kvstashd's gRPC server: see server.h; the call state machine is in call.h/call.c.
 * Threads: `nthreads` completion-queue threads run every call's handlers; the loop
 * thread only calls create/drain/inflight/shutdown/destroy. */
#include "daemon/server.h"

#include <grpc/grpc.h>
#include <errno.h>
#include <sched.h>
#include <grpc/grpc_security.h>
#include <sys/stat.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "daemon/auth.h"
#include "daemon/call.h"
#include "daemon/events.h"
#include "daemon/limits.h"
#include "daemon/log.h"
#include "daemon/region.h"
#include "daemon/tls.h"
#include "storage/xfer.h"
#include "gpu/base/mem.h"

/* Request slots kept armed per method: enough that a burst of calls never waits for a
 * CQ thread to re-arm. */
#define SLOTS_PER_METHOD 16

/* Columns: path, name, admin (KvAdmin rules), tenant (a tenant token may call it, on its
 * granted namespaces: call.h, README "Tenants"), client streaming, then the handlers.
 * Tenant tokens: every KvStash call; of KvAdmin, the calls that address one namespace
 * (CreateNamespace, DropNamespace, GetNamespace, AddQueries, and Evict of a named
 * namespace: call_tiers.c refuses `all`); Health is open to all. */
static const kvs_rpc_desc rpc_table[KVS_RPC_COUNT] = {
    [KVS_RPC_PUT] = {"/kvstash.v1.KvStash/Put", "Put", false, true, true, NULL, kvs_put_start,
                     kvs_put_on_recv, NULL, kvs_put_cleanup},
    [KVS_RPC_GET] = {"/kvstash.v1.KvStash/Get", "Get", false, true, false, NULL, kvs_get_start,
                     NULL, kvs_get_on_send, kvs_get_cleanup},
    [KVS_RPC_LOOKUP] = {"/kvstash.v1.KvStash/Lookup", "Lookup", false, true, false,
                        kvs_lookup_handle},
    [KVS_RPC_EXISTS] = {"/kvstash.v1.KvStash/Exists", "Exists", false, true, false,
                        kvs_exists_handle},
    [KVS_RPC_DELETE] = {"/kvstash.v1.KvStash/Delete", "Delete", false, true, false,
                        kvs_delete_handle},
    [KVS_RPC_NS_CREATE] = {"/kvstash.v1.KvAdmin/CreateNamespace", "CreateNamespace", true, true,
                           false, kvs_ns_create_handle},
    [KVS_RPC_NS_DROP] = {"/kvstash.v1.KvAdmin/DropNamespace", "DropNamespace", true, true, false,
                         kvs_ns_drop_handle},
    [KVS_RPC_NS_LIST] = {"/kvstash.v1.KvAdmin/ListNamespaces", "ListNamespaces", true, false, false,
                         kvs_ns_list_handle},
    [KVS_RPC_STATS] = {"/kvstash.v1.KvAdmin/Stats", "Stats", true, false, false, kvs_stats_handle},
    [KVS_RPC_HEALTH] = {"/kvstash.v1.KvAdmin/Health", "Health", true, false, false,
                        kvs_health_handle},
    [KVS_RPC_ADD_QUERIES] = {"/kvstash.v1.KvAdmin/AddQueries", "AddQueries", true, true, false,
                             kvs_add_queries_handle},
    [KVS_RPC_VERIFY] = {"/kvstash.v1.KvAdmin/Verify", "Verify", true, false, false,
                        kvs_verify_handle},
    [KVS_RPC_FLUSH] = {"/kvstash.v1.KvAdmin/Flush", "Flush", true, false, false, kvs_flush_handle},
    [KVS_RPC_EVICT] = {"/kvstash.v1.KvAdmin/Evict", "Evict", true, true, false, kvs_evict_handle},
    /* Batched and shared-memory calls: the same machines as Put and Get. */
    [KVS_RPC_PUT_MANY] = {"/kvstash.v1.KvStash/PutMany", "PutMany", false, true, true, NULL,
                          kvs_put_start, kvs_put_on_recv, NULL, kvs_put_cleanup},
    [KVS_RPC_GET_MANY] = {"/kvstash.v1.KvStash/GetMany", "GetMany", false, true, false, NULL,
                          kvs_get_start, NULL, kvs_get_on_send, kvs_get_cleanup},
    [KVS_RPC_CODEC_STATE] = {"/kvstash.v1.KvStash/GetCodecState", "GetCodecState", false, true,
                             false, kvs_codec_state_handle},
    [KVS_RPC_NS_GET] = {"/kvstash.v1.KvAdmin/GetNamespace", "GetNamespace", true, true, false,
                        kvs_ns_get_handle},
    [KVS_RPC_DATA_PLANE] = {"/kvstash.v1.KvStash/DataPlane", "DataPlane", false, true, false,
                            kvs_data_plane_handle},
};

static void *cq_thread(void *arg)
{
    kvs_server *srv = arg;
    for (;;) {
        grpc_event ev =
            grpc_completion_queue_next(srv->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN)
            break;
        if (ev.type != GRPC_OP_COMPLETE)
            continue;
        if (ev.tag == &srv->shutdown_tag) {
            pthread_mutex_lock(&srv->mu);
            srv->shutdown_done = true;
            pthread_cond_broadcast(&srv->cond);
            pthread_mutex_unlock(&srv->mu);
            continue;
        }
        kvs_call_on_event(ev.tag, ev.success != 0);
    }
    return NULL;
}

int kvs_server_create(const kvs_config *cfg, kvs_auth *auth, kvs_tls *tls, kvs_store *store,
                      kvs_work *work, kvs_engine *const *engines, kvs_tiering *tiering,
                      kvs_regions *regions, kvs_events *events, kvs_server **out, int *bound_port,
                      kvs_err *err)
{
    kvs_server *srv = kvs_xcalloc(1, sizeof *srv);
    srv->regions = regions;
    srv->events = events;
    srv->rpcs = rpc_table;
    srv->cfg = cfg;
    srv->store = store;
    srv->work = work;
    srv->tiering = tiering;
    kvs_xfer_opts xo = {.store = store,
                        .tiering = tiering,
                        .run = kvs_work_run,
                        .run_ctx = work,
                        .log = kvs_log_sink,
                        .log_ctx = "xfer",
                        .error_sample = cfg->error_sample};
    memcpy(xo.engine, engines, sizeof xo.engine);
    srv->xfer = kvs_xfer_create(&xo);
    srv->start_ms = kvs_now_ms();
    kvs_limits_opts lo = {.max_puts = cfg->max_puts,
                          .max_puts_per_conn = cfg->max_puts_per_conn,
                          .max_gets = cfg->max_gets,
                          .max_gets_per_conn = cfg->max_gets_per_conn,
                          .recv_budget = kvs_config_recv_budget(cfg)};
    srv->limits = kvs_limits_create(&lo);
    atomic_init(&srv->auth, auth);
    atomic_init(&srv->auth_readers, 0);
    pthread_mutex_init(&srv->mu, NULL);
    pthread_cond_init(&srv->cond, NULL);

    grpc_arg args[2];
    args[0].type = args[1].type = GRPC_ARG_INTEGER;
    args[0].key = (char *)GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[1].key = (char *)GRPC_ARG_MAX_SEND_MESSAGE_LENGTH;
    args[0].value.integer = args[1].value.integer = (int)cfg->max_message;
    grpc_channel_args chargs = {2, args};

    srv->cq = grpc_completion_queue_create_for_next(NULL);
    srv->server = grpc_server_create(&chargs, NULL);
    grpc_server_register_completion_queue(srv->server, srv->cq, NULL);
    for (int i = 0; i < KVS_RPC_COUNT; i++) {
        srv->registered[i] = grpc_server_register_method(
            srv->server, srv->rpcs[i].path, NULL,
            srv->rpcs[i].client_streaming ? GRPC_SRM_PAYLOAD_NONE
                                          : GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER,
            0);
        if (!srv->registered[i]) {
            kvs_err_set(err, KVS_EINTERNAL, "grpc_server_register_method %s failed",
                        srv->rpcs[i].path);
            goto fail;
        }
    }
    grpc_server_credentials *creds = kvs_tls_server_credentials(tls);
    if (!creds) {
        kvs_err_set(err, KVS_EINTERNAL, "%s: gRPC could not build the listener's credentials",
                    tls ? "tls_cert" : "listen");
        goto fail;
    }
    /* DESIGN §9: co-located workers in the daemon's group may connect, others not. A Unix
     * socket gets its mode when gRPC binds it, here: under umask 0117 it is created 0660,
     * never wider, with no window before a chmod. The umask is the process's, but no
     * other thread of ours creates files while the server starts. */
    bool unix_sock = strncmp(cfg->listen, "unix:", 5) == 0;
    mode_t old_mask = unix_sock ? umask(0117) : 0;
    int port = grpc_server_add_http2_port(srv->server, cfg->listen, creds);
    if (unix_sock)
        umask(old_mask);
    grpc_server_credentials_release(creds);
    if (port == 0) {
        /* The PEM files were checked by kvs_tls_load, so with TLS this is still most
         * likely the address; say both. */
        kvs_err_set(err, KVS_EINVAL,
                    "--listen: cannot listen on '%s' (address in use or invalid%s)", cfg->listen,
                    tls ? ", or gRPC refused the TLS certificate or key" : "");
        goto fail;
    }
    if (unix_sock)
        port = 0;
    grpc_server_start(srv->server);

    for (int i = 0; i <= KVS_RPC_COUNT; i++) {
        int slots = i == KVS_RPC_UNKNOWN ? 2 : SLOTS_PER_METHOD;
        for (int s = 0; s < slots; s++)
            if (kvs_call_arm(srv, (kvs_rpc)i)) {
                kvs_err_set(err, KVS_EINTERNAL, "arming request slots failed");
                goto fail_started;
            }
    }
    srv->nthreads = cfg->threads;
    srv->threads = kvs_xcalloc(srv->nthreads, sizeof *srv->threads);
    for (unsigned i = 0; i < srv->nthreads; i++) {
        int rc = pthread_create(&srv->threads[i], NULL, cq_thread, srv);
        if (rc) {
            srv->nthreads = i;
            kvs_err_set(err, -rc, "pthread_create (completion-queue thread %u): %s", i,
                        strerror(rc));
            goto fail_started;
        }
    }
    *bound_port = port;
    *out = srv;
    return 0;

fail_started:
    /* Threads (if any) drain the queue; shutdown waits for every armed slot. */
    if (srv->nthreads == 0) {
        srv->nthreads = 1;
        srv->threads = srv->threads ? srv->threads : kvs_xcalloc(1, sizeof *srv->threads);
        pthread_create(&srv->threads[0], NULL, cq_thread, srv);
    }
    kvs_server_shutdown(srv);
    kvs_server_destroy(srv);
    return err ? err->code : KVS_EINTERNAL;
fail:
    grpc_server_destroy(srv->server);
    grpc_completion_queue_shutdown(srv->cq);
    while (grpc_completion_queue_next(srv->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
           GRPC_QUEUE_SHUTDOWN) {
    }
    grpc_completion_queue_destroy(srv->cq);
    srv->server = NULL;
    srv->cq = NULL;
    kvs_server_destroy(srv);
    return err ? err->code : KVS_EINTERNAL;
}

void kvs_server_drain(kvs_server *srv)
{
    atomic_store(&srv->draining, true);
}

unsigned kvs_server_inflight(kvs_server *srv)
{
    pthread_mutex_lock(&srv->mu);
    unsigned n = srv->inflight;
    pthread_mutex_unlock(&srv->mu);
    return n;
}

/* Frees the swapped-out auth objects once auth_readers reads 0: every reader that
 * loaded one of them counted itself in before the swap (seq_cst), so this load sees its
 * count, and 0 means it also counted itself out (call.h, kvs_server.auth). */
static void reclaim_auth(kvs_server *srv)
{
    if (srv->n_retired == 0 || atomic_load(&srv->auth_readers) != 0)
        return;
    for (unsigned i = 0; i < srv->n_retired; i++)
        kvs_auth_destroy(srv->auth_retired[i]);
    srv->n_retired = 0;
}

void kvs_server_set_auth(kvs_server *srv, kvs_auth *auth)
{
    /* Full: wait for a moment with no reader (checks take microseconds). Only a burst of
     * reloads faster than the sweep gets here. */
    while (srv->n_retired == sizeof srv->auth_retired / sizeof srv->auth_retired[0]) {
        reclaim_auth(srv);
        if (srv->n_retired)
            sched_yield();
    }
    srv->auth_retired[srv->n_retired++] = atomic_exchange(&srv->auth, auth);
    reclaim_auth(srv);
}

unsigned kvs_server_sweep(kvs_server *srv, uint64_t idle_ms)
{
    reclaim_auth(srv);
    uint64_t now = kvs_now_ms();
    unsigned cut = 0;
    pthread_mutex_lock(&srv->mu);
    for (kvs_call *c = srv->streams; c; c = c->snext) {
        uint64_t since = atomic_load(&c->waiting_ms);
        if (c->idle_cut || !kvs_call_idle(since, now, idle_ms))
            continue;
        /* Thread-safe in gRPC; the call's pending RECV or SEND then completes with a
         * failure on a CQ thread, which abandons the call and frees what it holds. */
        char msg[128];
        snprintf(msg, sizeof msg,
                 "%s: no progress from the client for %llu s: cancelled "
                 "(--stream-idle)",
                 srv->rpcs[c->rpc].name, (unsigned long long)(idle_ms / 1000));
        grpc_call_cancel_with_status(c->call, GRPC_STATUS_DEADLINE_EXCEEDED, msg, NULL);
        c->idle_cut = true;
        cut++;
    }
    srv->idle_cancelled += cut;
    pthread_mutex_unlock(&srv->mu);
    if (cut)
        kvs_log(KVS_LOG_WARN,
                "cancelled %u stalled stream%s (no progress for %llu s, "
                "--stream-idle)",
                cut, cut > 1 ? "s" : "", (unsigned long long)(idle_ms / 1000));
    return cut;
}

void kvs_server_stream_stats(kvs_server *srv, kvs_limits_stats *out, uint64_t *idle)
{
    kvs_limits_get_stats(srv->limits, out);
    pthread_mutex_lock(&srv->mu);
    *idle = srv->idle_cancelled;
    pthread_mutex_unlock(&srv->mu);
}

void kvs_server_shutdown(kvs_server *srv)
{
    atomic_store(&srv->draining, true);
    pthread_mutex_lock(&srv->mu);
    srv->shutting_down = true;
    pthread_mutex_unlock(&srv->mu);
    grpc_server_shutdown_and_notify(srv->server, srv->cq, &srv->shutdown_tag);
    /* The drain phase is over: whatever is still running is cut short. */
    grpc_server_cancel_all_calls(srv->server);
    pthread_mutex_lock(&srv->mu);
    while (!srv->shutdown_done || srv->live > 0)
        pthread_cond_wait(&srv->cond, &srv->mu);
    pthread_mutex_unlock(&srv->mu);
    grpc_completion_queue_shutdown(srv->cq);
    for (unsigned i = 0; i < srv->nthreads; i++)
        pthread_join(srv->threads[i], NULL);
    grpc_server_destroy(srv->server);
    grpc_completion_queue_destroy(srv->cq);
    srv->server = NULL;
    srv->cq = NULL;
}

void kvs_server_destroy(kvs_server *srv)
{
    if (!srv)
        return;
    free(srv->threads);
    kvs_limits_destroy(srv->limits);
    kvs_xfer_destroy(srv->xfer);
    kvs_auth_destroy(atomic_load(&srv->auth)); /* no CQ thread is left */
    for (unsigned i = 0; i < srv->n_retired; i++)
        kvs_auth_destroy(srv->auth_retired[i]);
    pthread_cond_destroy(&srv->cond);
    pthread_mutex_destroy(&srv->mu);
    free(srv);
}
