/* KvAdmin: CreateNamespace, DropNamespace, GetNamespace, ListNamespaces, Stats, Health
 * (DESIGN §4).
 * Unary calls on CQ threads; replies are built from store snapshots taken under the
 * store lock, so no daemon lock is held while the store is asked. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "daemon/call.h"
#include "daemon/events.h"
#include "daemon/region.h"
#include "daemon/limits.h"
#include "daemon/wire.h"
#include "gpu/base/host.h"
#include "gpu/base/mem.h"
#include "kvstash/v1/kvstash.pb-c.h"
#include "pbc.h"
#include "gpu/codec/learn.h"
#include "storage/xfer.h"

#ifndef KVS_VERSION
#define KVS_VERSION "dev"
#endif

int kvs_ns_create_handle(kvs_call *c, const uint8_t *req, size_t len, kvs_err *err)
{
    Kvstash__V1__CreateNamespaceRequest *r = (Kvstash__V1__CreateNamespaceRequest *)kvs_wire_unpack(
        &kvstash__v1__create_namespace_request__descriptor, req, len, err);
    if (!r)
        return err->code;
    kvs_ns_spec spec;
    kvs_ns *ns = NULL;
    int rc = kvs_wire_spec_from_proto(r->spec, &spec, err);
    kvstash__v1__create_namespace_request__free_unpacked(r, NULL);
    if (rc == 0 && spec.durable && !kvs_store_has_disk(c->srv->store))
        return kvs_err_set(err, KVS_EINVAL,
                           "durable: this daemon has no disk tier to make Puts "
                           "durable (start kvstashd with --data-dir)");
    if (rc == 0)
        rc = kvs_call_ns_create(c, &spec, &ns, err);
    if (rc)
        return rc;
    /* A new namespace has learned and measured nothing: state versions 0, no samples. */
    kvs_store_ns_info info = {.spec = *kvs_ns_spec_of(ns), .id = kvs_ns_id(ns)};
    kvs_ns_unref(ns);
    kvs_wire_ns w;
    kvs_wire_info_to_proto(&info, kvs_xfer_error_sample(c->srv->xfer, &info.spec), &w);
    kvs_call_reply(c, &w.info.base);
    return 0;
}

int kvs_ns_drop_handle(kvs_call *c, const uint8_t *req, size_t len, kvs_err *err)
{
    Kvstash__V1__NameRequest *r = (Kvstash__V1__NameRequest *)kvs_wire_unpack(
        &kvstash__v1__name_request__descriptor, req, len, err);
    if (!r)
        return err->code;
    uint64_t dropped = 0;
    int rc = kvs_call_ns_drop(c, r->name, &dropped, err);
    kvstash__v1__name_request__free_unpacked(r, NULL);
    if (rc)
        return rc;
    Kvstash__V1__DropNamespaceReply reply = KVSTASH__V1__DROP_NAMESPACE_REPLY__INIT;
    reply.blocks_dropped = dropped;
    kvs_call_reply(c, &reply.base);
    return 0;
}

/* Wire form of a namespace snapshot list; free with ns_protos_free. */
typedef struct ns_protos {
    kvs_store_ns_info *snap;
    kvs_wire_ns *w;
    Kvstash__V1__NamespaceInfo **ptrs;
    size_t n;
} ns_protos;

static int ns_protos_build(kvs_server *srv, ns_protos *p, kvs_err *err)
{
    memset(p, 0, sizeof *p);
    int rc = kvs_store_ns_list(srv->store, &p->snap, &p->n, err);
    if (rc)
        return rc;
    size_t n = p->n ? p->n : 1;
    p->w = kvs_xcalloc(n, sizeof *p->w);
    p->ptrs = kvs_xcalloc(n, sizeof *p->ptrs);
    for (size_t i = 0; i < p->n; i++) {
        kvs_wire_info_to_proto(&p->snap[i], kvs_xfer_error_sample(srv->xfer, &p->snap[i].spec),
                               &p->w[i]);
        p->ptrs[i] = &p->w[i].info;
    }
    return 0;
}

static void ns_protos_free(ns_protos *p)
{
    free(p->snap);
    free(p->w);
    free(p->ptrs);
}

int kvs_ns_get_handle(kvs_call *c, const uint8_t *req, size_t len, kvs_err *err)
{
    Kvstash__V1__NameRequest *r = (Kvstash__V1__NameRequest *)kvs_wire_unpack(
        &kvstash__v1__name_request__descriptor, req, len, err);
    if (!r)
        return err->code;
    /* Resolved first (the tenant check, NOT_FOUND), then read from the same snapshot
     * ListNamespaces answers with: usage counts live there. */
    kvs_ns *ns = NULL;
    int rc = kvs_call_ns_find(c, r->name, &ns, err);
    if (rc) {
        kvstash__v1__name_request__free_unpacked(r, NULL);
        return rc;
    }
    kvs_ns_unref(ns);
    ns_protos p;
    rc = ns_protos_build(c->srv, &p, err);
    Kvstash__V1__NamespaceInfo *found = NULL;
    for (size_t i = 0; rc == 0 && i < p.n && !found; i++)
        if (strcmp(p.snap[i].spec.name, r->name) == 0)
            found = p.ptrs[i];
    if (rc == 0 && !found) /* dropped meanwhile */
        rc = kvs_err_set(err, KVS_ENOTFOUND, "namespace: '%.64s' not found", r->name);
    if (rc == 0)
        kvs_call_reply(c, &found->base);
    kvstash__v1__name_request__free_unpacked(r, NULL);
    ns_protos_free(&p); /* build zeroes p first: safe after a failed build too */
    return rc;
}

int kvs_ns_list_handle(kvs_call *c, const uint8_t *req, size_t len, kvs_err *err)
{
    ns_protos p;
    int rc = ns_protos_build(c->srv, &p, err);
    if (rc)
        return rc;
    Kvstash__V1__ListNamespacesReply reply = KVSTASH__V1__LIST_NAMESPACES_REPLY__INIT;
    reply.n_namespaces = p.n;
    reply.namespaces = p.ptrs;
    kvs_call_reply(c, &reply.base);
    ns_protos_free(&p);
    return 0;
}

static Kvstash__V1__TierStats tier_stats(Kvstash__V1__Tier tier, uint64_t capacity, uint64_t used,
                                         uint64_t blocks, uint64_t hits, uint64_t evictions)
{
    Kvstash__V1__TierStats t = KVSTASH__V1__TIER_STATS__INIT;
    t.tier = tier;
    t.capacity_bytes = capacity;
    t.used_bytes = used;
    t.blocks = blocks;
    t.hits = hits;
    t.evictions = evictions;
    return t;
}

int kvs_stats_handle(kvs_call *c, const uint8_t *req, size_t len, kvs_err *err)
{
    kvs_server *srv = c->srv;
    ns_protos p;
    int rc = ns_protos_build(srv, &p, err);
    if (rc)
        return rc;
    kvs_store_stats st;
    kvs_store_get_stats(srv->store, &st);

    /* The GPU tier's "evictions" are its demotions to the host tier; the disk tier's
     * leave the store (host evictions became disk blocks). */
    Kvstash__V1__TierStats host =
        tier_stats(KVSTASH__V1__TIER__TIER_HOST, st.host_capacity, st.host_used, st.host_blocks,
                   st.host_hits, st.host_evictions);
    Kvstash__V1__TierStats gpu =
        tier_stats(KVSTASH__V1__TIER__TIER_GPU, st.gpu_capacity, st.gpu_used, st.gpu_blocks,
                   st.gpu_hits, st.gpu_demotions);
    Kvstash__V1__TierStats disk =
        tier_stats(KVSTASH__V1__TIER__TIER_DISK, st.disk_capacity, st.disk_used, st.disk_blocks,
                   st.disk_hits, st.disk_evictions);
    kvs_hostpool *pool = kvs_store_host_pool(srv->store);
    if (pool) {
        kvs_hostpool_stats ps;
        kvs_hostpool_get_stats(pool, &ps);
        host.pinned_bytes = ps.committed;
    }
    host.block_meta_bytes = KVS_STORE_BLOCK_META;
    host.recoded_blocks = st.host_recoded;
    host.recode_saved_bytes = st.host_recode_saved;
    disk.records = st.disk_records;
    disk.max_records = st.disk_max_records;
    disk.recoded_blocks = st.disk_recoded;
    disk.recode_saved_bytes = st.disk_recode_saved;
    Kvstash__V1__TierStats *tiers[3] = {&host, NULL, NULL};
    size_t n_tiers = 1;
    if (kvs_store_has_gpu(srv->store))
        tiers[n_tiers++] = &gpu;
    if (kvs_store_has_disk(srv->store))
        tiers[n_tiers++] = &disk;

    Kvstash__V1__RpcStats rpcs[KVS_RPC_COUNT];
    Kvstash__V1__RpcStats *rpc_ptrs[KVS_RPC_COUNT];
    for (int i = 0; i < KVS_RPC_COUNT; i++) {
        kvstash__v1__rpc_stats__init(&rpcs[i]);
        rpcs[i].method = kvs_pb_str(srv->rpcs[i].name);
        rpcs[i].calls = atomic_load(&srv->rpc_calls[i]);
        rpcs[i].errors = atomic_load(&srv->rpc_errors[i]);
        rpc_ptrs[i] = &rpcs[i];
    }

    Kvstash__V1__StatsReply reply = KVSTASH__V1__STATS_REPLY__INIT;
    reply.n_tiers = n_tiers;
    reply.tiers = tiers;
    reply.n_namespaces = p.n;
    reply.namespaces = p.ptrs;
    reply.n_rpcs = KVS_RPC_COUNT;
    reply.rpcs = rpc_ptrs;
    reply.misses = st.misses;
    reply.uptime_ms = kvs_now_ms() - srv->start_ms;
    reply.version = kvs_pb_str(KVS_VERSION);
    kvs_limits_stats ls;
    kvs_limits_get_stats(srv->limits, &ls);
    Kvstash__V1__StreamStats streams = KVSTASH__V1__STREAM_STATS__INIT;
    streams.recv_budget_bytes = ls.recv_budget;
    streams.recv_used_bytes = ls.recv_used;
    streams.puts_open = ls.puts_open;
    streams.puts_refused = ls.puts_refused;
    streams.recv_refused = ls.recv_refused;
    streams.gets_open = ls.gets_open;
    streams.gets_refused = ls.gets_refused;
    pthread_mutex_lock(&srv->mu);
    streams.idle_cancelled = srv->idle_cancelled;
    pthread_mutex_unlock(&srv->mu);
    reply.streams = &streams;
    Kvstash__V1__DataPlaneStats dp = KVSTASH__V1__DATA_PLANE_STATS__INIT;
    kvs_regions_stats rs;
    kvs_regions_stats_get(srv->regions, &rs);
    dp.regions = rs.regions;
    dp.region_bytes = rs.bytes;
    dp.region_pinned_bytes = rs.pinned_bytes;
    dp.region_refused = rs.refused;
    dp.put_region_bytes = atomic_load(&srv->put_region_bytes);
    dp.put_wire_bytes = atomic_load(&srv->put_wire_bytes);
    dp.get_region_bytes = atomic_load(&srv->get_region_bytes);
    dp.get_wire_bytes = atomic_load(&srv->get_wire_bytes);
    reply.data_plane = &dp;
    Kvstash__V1__AdminProgress admin = KVSTASH__V1__ADMIN_PROGRESS__INIT;
    admin.verify_planned = st.verify_planned;
    admin.verify_checked = st.verify_checked;
    admin.flush_queued = st.flush_queued;
    admin.flush_done = st.flush_done;
    reply.admin = &admin;
    Kvstash__V1__GpuDeviceStats devs[KVS_STORE_GPUS_MAX], *dev_ptrs[KVS_STORE_GPUS_MAX];
    for (unsigned g = 0; g < st.gpu_devices; g++) {
        const kvs_store_gpu_stats *s = &st.gpu_dev[g];
        kvstash__v1__gpu_device_stats__init(&devs[g]);
        devs[g].device = g;
        devs[g].capacity_bytes = s->capacity;
        devs[g].used_bytes = s->used;
        devs[g].blocks = s->blocks;
        devs[g].hits = s->hits;
        devs[g].demotions = s->demotions;
        devs[g].promotions = s->promotions;
        dev_ptrs[g] = &devs[g];
    }
    reply.n_gpu_devices = st.gpu_devices;
    reply.gpu_devices = dev_ptrs;
    Kvstash__V1__EventStats evs = KVSTASH__V1__EVENT_STATS__INIT;
    if (srv->events) {
        kvs_events_stats es;
        kvs_events_get_stats(srv->events, &es);
        evs.endpoint = kvs_pb_str(kvs_events_endpoint(srv->events));
        evs.published = es.published;
        evs.messages = es.messages;
        evs.dropped = es.dropped;
        evs.send_errors = es.send_errors;
        evs.queued = es.queued;
        reply.events = &evs;
    }
    kvs_call_reply(c, &reply.base);
    ns_protos_free(&p);
    return 0;
}

int kvs_health_handle(kvs_call *c, const uint8_t *req, size_t len, kvs_err *err)
{
    Kvstash__V1__HealthReply reply = KVSTASH__V1__HEALTH_REPLY__INIT;
    reply.status = atomic_load(&c->srv->draining) ? KVSTASH__V1__HEALTH_REPLY__STATUS__DRAINING
                                                  : KVSTASH__V1__HEALTH_REPLY__STATUS__SERVING;
    reply.version = kvs_pb_str(KVS_VERSION);
    reply.uptime_ms = kvs_now_ms() - c->srv->start_ms;
    kvs_call_reply(c, &reply.base);
    return 0;
}

/* A learned codec state by version, for a client that decodes blocks itself. */
int kvs_codec_state_handle(kvs_call *c, const uint8_t *req, size_t len, kvs_err *err)
{
    Kvstash__V1__CodecStateRequest *r = (Kvstash__V1__CodecStateRequest *)kvs_wire_unpack(
        &kvstash__v1__codec_state_request__descriptor, req, len, err);
    if (!r)
        return err->code;
    kvs_ns *ns = NULL;
    int rc = kvs_call_ns_find(c, r->namespace_, &ns, err);
    if (rc == 0) {
        kvs_kv kv = r->values ? KVS_VALUES : KVS_KEYS;
        const kvs_codec *codec = r->version ? kvs_ns_codec_version(ns, kv, r->version) : NULL;
        if (!codec) {
            rc = kvs_err_set(err, KVS_ENOTFOUND,
                             "version: namespace '%s' has no %s codec state version %u (it "
                             "is at %u)",
                             r->namespace_, r->values ? "value" : "key", r->version,
                             kvs_codec_state_version(kvs_ns_codec(ns, kv)));
        } else {
            kvs_codec_state st = kvs_codec_state_of(codec);
            Kvstash__V1__CodecStateReply reply = KVSTASH__V1__CODEC_STATE_REPLY__INIT;
            reply.version = st.version;
            reply.state.data = (uint8_t *)(uintptr_t)st.data; /* only packed (read) */
            reply.state.len = st.len;
            kvs_call_reply(c, &reply.base);
        }
    }
    if (ns)
        kvs_ns_unref(ns);
    kvstash__v1__codec_state_request__free_unpacked(r, NULL);
    return rc;
}

/* Where a co-located client shares memory (README "Data plane"). The boot id lets a
 * client tell that it runs on this host: only then can it pass a descriptor here. */
int kvs_data_plane_handle(kvs_call *c, const uint8_t *req, size_t len, kvs_err *err)
{
    (void)req;
    (void)len;
    (void)err;
    char boot[64];
    kvs_host_boot_id(boot, sizeof boot);
    Kvstash__V1__DataPlaneReply reply = KVSTASH__V1__DATA_PLANE_REPLY__INIT;
    reply.region_socket = kvs_pb_str(kvs_regions_path(c->srv->regions));
    reply.boot_id = boot;
    reply.max_region_bytes = kvs_regions_max_bytes(c->srv->regions);
    kvs_call_reply(c, &reply.base);
    return 0;
}

int kvs_add_queries_handle(kvs_call *c, const uint8_t *req, size_t len, kvs_err *err)
{
    Kvstash__V1__AddQueriesRequest *r = (Kvstash__V1__AddQueriesRequest *)kvs_wire_unpack(
        &kvstash__v1__add_queries_request__descriptor, req, len, err);
    if (!r)
        return err->code;
    kvs_ns *ns = NULL;
    int rc = kvs_call_ns_find(c, r->namespace_, &ns, err);
    if (rc == 0) {
        /* Every size is checked against the namespace before the bytes are read. */
        const kvs_ns_spec *s = kvs_ns_spec_of(ns);
        uint64_t want = 0;
        bool ok = r->tokens > 0 && r->query_heads > 0 && r->query_heads <= 64 * s->kv_heads &&
                  kvs_mul_size((uint64_t)s->layers * r->tokens,
                               (uint64_t)r->query_heads * s->head_dim * 2, &want);
        if (!ok)
            rc = kvs_err_set(err, KVS_EINVAL,
                             "tokens, query_heads: must be > 0 (query_heads at "
                             "most 64 x kv_heads)");
        else if (r->queries.len != want)
            rc = kvs_err_set(err, KVS_EINVAL,
                             "queries: %zu bytes, but %u layers x %u tokens x %u "
                             "heads x %u channels take %llu",
                             r->queries.len, s->layers, r->tokens, r->query_heads, s->head_dim,
                             (unsigned long long)want);
        else if (((uintptr_t)r->queries.data & 1) != 0)
            rc = kvs_err_set(err, KVS_EINTERNAL, "queries: misaligned buffer");
        else
            rc = kvs_learn_queries(kvs_ns_learner(ns), ns, r->query_heads, r->tokens,
                                   (const uint16_t *)r->queries.data, NULL, err);
    }
    kvstash__v1__add_queries_request__free_unpacked(r, NULL);
    if (rc == 0) {
        kvs_store_ns_info info = {.spec = *kvs_ns_spec_of(ns),
                                  .id = kvs_ns_id(ns),
                                  .key_state = kvs_codec_state_version(kvs_ns_codec(ns, KVS_KEYS)),
                                  .value_state =
                                      kvs_codec_state_version(kvs_ns_codec(ns, KVS_VALUES))};
        kvs_fidelity_acc_read(kvs_ns_fidelity(ns), &info.fidelity);
        kvs_wire_ns w;
        kvs_wire_info_to_proto(&info, kvs_xfer_error_sample(c->srv->xfer, &info.spec), &w);
        kvs_call_reply(c, &w.info.base);
    }
    if (ns)
        kvs_ns_unref(ns);
    return rc;
}
