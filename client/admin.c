/* libkvstash: the KvAdmin calls (namespaces, stats, health, verify, flush, evict) and the
 * conversions between kvs_ns_spec/kvs_ns_info and their protobuf messages, each in one place
 * (spec_to_pb, info_from_pb). Contract: include/kvstash.h; call machinery: client.c. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client/client_int.h"
#include "gpu/base/mem.h"
#include "kvstash/v1/kvstash.pb-c.h"
#include "pbc.h"

/* ------------------------------------------------------------------ admin */

/* The message borrows the strings of s and sample (which holds error_sample when it is
 * set); empty codec names become "none" (kvstash.h). */
static void spec_to_pb(const kvs_ns_spec *s, Kvstash__V1__NamespaceSpec *pb,
                       Kvstash__V1__ErrorSample *sample)
{
    *pb = (Kvstash__V1__NamespaceSpec)KVSTASH__V1__NAMESPACE_SPEC__INIT;
    pb->name = kvs_pb_str(s->name);
    pb->layers = s->layers;
    pb->kv_heads = s->kv_heads;
    pb->head_dim = s->head_dim;
    pb->block_tokens = s->block_tokens;
    pb->dtype = (Kvstash__V1__Dtype)s->dtype;
    pb->key_codec = kvs_pb_str(s->key_codec[0] ? s->key_codec : "none");
    pb->value_codec = kvs_pb_str(s->value_codec[0] ? s->value_codec : "none");
    pb->keys_pre_rope = s->keys_pre_rope;
    pb->seed = s->seed;
    pb->durable = s->durable;
    pb->host_quota_bytes = s->host_quota;
    pb->gpu_quota_bytes = s->gpu_quota;
    pb->disk_quota_bytes = s->disk_quota;
    pb->max_rel_error = s->max_rel_error;
    pb->fallback_codec = kvs_pb_str(s->fallback_codec);
    pb->host_codec = kvs_pb_str(s->host_codec);
    pb->disk_codec = kvs_pb_str(s->disk_codec);
    if (s->error_sample_set) {
        *sample = (Kvstash__V1__ErrorSample)KVSTASH__V1__ERROR_SAMPLE__INIT;
        sample->share = s->error_sample;
        pb->error_sample = sample;
    }
}

static kvs_error_stats error_from_pb(const Kvstash__V1__ErrorStats *e)
{
    if (!e || !e->count)
        return (kvs_error_stats){0};
    return (kvs_error_stats){e->count, e->sum / (double)e->count, e->max};
}

static void info_from_pb(const Kvstash__V1__NamespaceInfo *pb, kvs_ns_info *info)
{
    memset(info, 0, sizeof *info);
    const Kvstash__V1__NamespaceSpec *s = pb->spec;
    if (s) {
        snprintf(info->spec.name, sizeof info->spec.name, "%s", s->name);
        info->spec.layers = s->layers;
        info->spec.kv_heads = s->kv_heads;
        info->spec.head_dim = s->head_dim;
        info->spec.block_tokens = s->block_tokens;
        info->spec.dtype = kvs__dtype_from_pb(s->dtype);
        snprintf(info->spec.key_codec, sizeof info->spec.key_codec, "%s", s->key_codec);
        snprintf(info->spec.value_codec, sizeof info->spec.value_codec, "%s", s->value_codec);
        info->spec.keys_pre_rope = s->keys_pre_rope;
        info->spec.seed = s->seed;
        info->spec.durable = s->durable;
        info->spec.host_quota = s->host_quota_bytes;
        info->spec.gpu_quota = s->gpu_quota_bytes;
        info->spec.disk_quota = s->disk_quota_bytes;
        if (s->error_sample) {
            info->spec.error_sample_set = true;
            info->spec.error_sample = s->error_sample->share;
        }
        info->spec.max_rel_error = s->max_rel_error;
        snprintf(info->spec.fallback_codec, sizeof info->spec.fallback_codec, "%s",
                 s->fallback_codec ? s->fallback_codec : "");
        snprintf(info->spec.host_codec, sizeof info->spec.host_codec, "%s",
                 s->host_codec ? s->host_codec : "");
        snprintf(info->spec.disk_codec, sizeof info->spec.disk_codec, "%s",
                 s->disk_codec ? s->disk_codec : "");
    }
    const Kvstash__V1__FidelityStats *f = pb->fidelity; /* absent from older daemons */
    if (f)
        info->fidelity = (kvs_ns_fidelity){.error_sample = f->error_sample,
                                           .keys = error_from_pb(f->key_error),
                                           .values = error_from_pb(f->value_error),
                                           .logits = error_from_pb(f->logit_error),
                                           .checked = f->checked,
                                           .fallback_blocks = f->fallback_blocks,
                                           .fallback_keys = f->fallback_keys,
                                           .fallback_values = f->fallback_values};
    info->id = pb->id;
    info->blocks = pb->blocks;
    info->stored_bytes = pb->stored_bytes;
    info->raw_bytes = pb->raw_bytes;
    info->block_bytes = pb->block_bytes;
}

/* A caller-owned array of n infos (never NULL on success, even for n = 0). */
static int infos_from_pb(const char *name, Kvstash__V1__NamespaceInfo *const *pb, size_t n,
                         kvs_ns_info **out, kvs_err *err)
{
    uint64_t bytes;
    if (!kvs_mul_size(n ? n : 1, sizeof(kvs_ns_info), &bytes) || bytes > SIZE_MAX ||
        !(*out = kvs_trymalloc((size_t)bytes)))
        return kvs_err_set(err, KVS_ENOMEM, "%s: out of memory for %zu namespaces", name, n);
    for (size_t i = 0; i < n; i++)
        info_from_pb(pb[i], &(*out)[i]);
    return 0;
}

int kvs_client_ns_create(kvs_client *c, const kvs_ns_spec *spec, kvs_ns_info *info, kvs_err *err)
{
    if (!spec) {
        kvs_err_clear(err);
        return kvs_err_set(err, KVS_EINVAL, "CreateNamespace: spec is NULL");
    }
    Kvstash__V1__NamespaceSpec pb;
    Kvstash__V1__ErrorSample sample;
    spec_to_pb(spec, &pb, &sample);
    Kvstash__V1__CreateNamespaceRequest q = KVSTASH__V1__CREATE_NAMESPACE_REQUEST__INIT;
    q.spec = &pb;
    ProtobufCMessage *m;
    int rc = kvs__unary(c, ADMIN("CreateNamespace"), &q.base,
                        &kvstash__v1__namespace_info__descriptor, &m, err);
    if (rc != 0)
        return rc;
    if (info)
        info_from_pb((const Kvstash__V1__NamespaceInfo *)m, info);
    protobuf_c_message_free_unpacked(m, NULL);
    return 0;
}

int kvs_client_ns_drop(kvs_client *c, const char *name, uint64_t *blocks_dropped, kvs_err *err)
{
    if (!name) {
        kvs_err_clear(err);
        return kvs_err_set(err, KVS_EINVAL, "DropNamespace: name is NULL");
    }
    Kvstash__V1__NameRequest q = KVSTASH__V1__NAME_REQUEST__INIT;
    q.name = kvs_pb_str(name);
    ProtobufCMessage *m;
    int rc = kvs__unary(c, ADMIN("DropNamespace"), &q.base,
                        &kvstash__v1__drop_namespace_reply__descriptor, &m, err);
    if (rc != 0)
        return rc;
    if (blocks_dropped)
        *blocks_dropped = ((const Kvstash__V1__DropNamespaceReply *)m)->blocks_dropped;
    protobuf_c_message_free_unpacked(m, NULL);
    return 0;
}

int kvs_client_ns_list(kvs_client *c, kvs_ns_info **out, size_t *n, kvs_err *err)
{
    if (!out || !n) {
        kvs_err_clear(err);
        return kvs_err_set(err, KVS_EINVAL, "ListNamespaces: NULL argument");
    }
    *out = NULL;
    *n = 0;
    Kvstash__V1__ListNamespacesRequest q = KVSTASH__V1__LIST_NAMESPACES_REQUEST__INIT;
    ProtobufCMessage *m;
    int rc = kvs__unary(c, ADMIN("ListNamespaces"), &q.base,
                        &kvstash__v1__list_namespaces_reply__descriptor, &m, err);
    if (rc != 0)
        return rc;
    const Kvstash__V1__ListNamespacesReply *rep = (const Kvstash__V1__ListNamespacesReply *)m;
    rc = infos_from_pb("ListNamespaces", rep->namespaces, rep->n_namespaces, out, err);
    if (rc == 0)
        *n = rep->n_namespaces;
    protobuf_c_message_free_unpacked(m, NULL);
    return rc;
}

/* Through ListNamespaces: daemons older than GetNamespace. */
static int ns_get_by_list(kvs_client *c, const char *name, kvs_ns_info *info, kvs_err *err)
{
    kvs_ns_info *all;
    size_t n;
    int rc = kvs_client_ns_list(c, &all, &n, err);
    if (rc != 0)
        return rc;
    rc = kvs_err_set(err, KVS_ENOTFOUND, "namespace: '%s' not found", name);
    for (size_t i = 0; i < n; i++) {
        if (strcmp(all[i].spec.name, name) == 0) {
            *info = all[i];
            kvs_err_clear(err);
            rc = 0;
            break;
        }
    }
    free(all);
    return rc;
}

int kvs_client_ns_get(kvs_client *c, const char *name, kvs_ns_info *info, kvs_err *err)
{
    if (!name || !info) {
        kvs_err_clear(err);
        return kvs_err_set(err, KVS_EINVAL, "GetNamespace: NULL argument");
    }
    /* GetNamespace reads one namespace, which a tenant token may (README "Tenants");
     * ListNamespaces is refused to it. A daemon without GetNamespace answers UNIMPLEMENTED. */
    Kvstash__V1__NameRequest q = KVSTASH__V1__NAME_REQUEST__INIT;
    q.name = (char *)(uintptr_t)name; /* protobuf-c fields are not const; only read */
    ProtobufCMessage *m;
    int rc = kvs__unary(c, ADMIN("GetNamespace"), &q.base, &kvstash__v1__namespace_info__descriptor,
                        &m, err);
    if (rc == KVS_ENOTSUP) {
        kvs_err_clear(err);
        return ns_get_by_list(c, name, info, err);
    }
    if (rc != 0)
        return rc;
    info_from_pb((const Kvstash__V1__NamespaceInfo *)m, info);
    protobuf_c_message_free_unpacked(m, NULL);
    return 0;
}

int kvs_client_stats(kvs_client *c, kvs_stats **out, kvs_err *err)
{
    if (!out) {
        kvs_err_clear(err);
        return kvs_err_set(err, KVS_EINVAL, "Stats: out is NULL");
    }
    *out = NULL;
    Kvstash__V1__StatsRequest q = KVSTASH__V1__STATS_REQUEST__INIT;
    ProtobufCMessage *m;
    int rc = kvs__unary(c, ADMIN("Stats"), &q.base, &kvstash__v1__stats_reply__descriptor, &m, err);
    if (rc != 0)
        return rc;
    const Kvstash__V1__StatsReply *rep = (const Kvstash__V1__StatsReply *)m;
    kvs_stats *s = kvs_xcalloc(1, sizeof *s);
    for (size_t i = 0; i < rep->n_tiers && s->n_tiers < 3; i++) {
        const Kvstash__V1__TierStats *t = rep->tiers[i];
        s->tiers[s->n_tiers++] = (kvs_tier_stats){.tier = kvs__tier_from_pb(t->tier),
                                                  .capacity_bytes = t->capacity_bytes,
                                                  .used_bytes = t->used_bytes,
                                                  .blocks = t->blocks,
                                                  .hits = t->hits,
                                                  .evictions = t->evictions,
                                                  .recoded_blocks = t->recoded_blocks,
                                                  .recode_saved_bytes = t->recode_saved_bytes,
                                                  .block_meta_bytes = t->block_meta_bytes};
    }
    rc = infos_from_pb("Stats", rep->namespaces, rep->n_namespaces, &s->namespaces, err);
    if (rc == 0) {
        s->n_namespaces = rep->n_namespaces;
        uint64_t bytes;
        if (!kvs_mul_size(rep->n_rpcs ? rep->n_rpcs : 1, sizeof(kvs_rpc_stats), &bytes) ||
            bytes > SIZE_MAX || !(s->rpcs = kvs_trymalloc((size_t)bytes)))
            rc = kvs_err_set(err, KVS_ENOMEM, "Stats: out of memory for %zu rpcs", rep->n_rpcs);
    }
    for (size_t i = 0; rc == 0 && i < rep->n_rpcs; i++) {
        kvs_rpc_stats *r = &s->rpcs[s->n_rpcs++];
        snprintf(r->method, sizeof r->method, "%s", rep->rpcs[i]->method);
        r->calls = rep->rpcs[i]->calls;
        r->errors = rep->rpcs[i]->errors;
    }
    s->misses = rep->misses;
    s->uptime_ms = rep->uptime_ms;
    if (rep->data_plane) {
        const Kvstash__V1__DataPlaneStats *dp = rep->data_plane;
        s->data_plane = (kvs_data_plane_stats){.regions = dp->regions,
                                               .region_bytes = dp->region_bytes,
                                               .region_pinned_bytes = dp->region_pinned_bytes,
                                               .region_refused = dp->region_refused,
                                               .put_region_bytes = dp->put_region_bytes,
                                               .put_wire_bytes = dp->put_wire_bytes,
                                               .get_region_bytes = dp->get_region_bytes,
                                               .get_wire_bytes = dp->get_wire_bytes};
    }
    if (rep->admin)
        s->admin = (kvs_admin_progress){.verify_planned = rep->admin->verify_planned,
                                        .verify_checked = rep->admin->verify_checked,
                                        .flush_queued = rep->admin->flush_queued,
                                        .flush_done = rep->admin->flush_done};
    for (size_t i = 0; i < rep->n_gpu_devices && s->n_gpus < 16; i++) {
        const Kvstash__V1__GpuDeviceStats *d = rep->gpu_devices[i];
        s->gpus[s->n_gpus++] = (struct kvs_gpu_device_stats){.device = d->device,
                                                             .capacity_bytes = d->capacity_bytes,
                                                             .used_bytes = d->used_bytes,
                                                             .blocks = d->blocks,
                                                             .hits = d->hits,
                                                             .demotions = d->demotions,
                                                             .promotions = d->promotions};
    }
    snprintf(s->version, sizeof s->version, "%s", rep->version);
    protobuf_c_message_free_unpacked(m, NULL);
    if (rc != 0) {
        kvs_stats_free(s);
        return rc;
    }
    *out = s;
    return 0;
}

void kvs_stats_free(kvs_stats *s)
{
    if (!s)
        return;
    free(s->namespaces);
    free(s->rpcs);
    free(s);
}

int kvs_client_health(kvs_client *c, kvs_health *out, kvs_err *err)
{
    if (!out) {
        kvs_err_clear(err);
        return kvs_err_set(err, KVS_EINVAL, "Health: out is NULL");
    }
    Kvstash__V1__HealthRequest q = KVSTASH__V1__HEALTH_REQUEST__INIT;
    ProtobufCMessage *m;
    int rc =
        kvs__unary(c, ADMIN("Health"), &q.base, &kvstash__v1__health_reply__descriptor, &m, err);
    if (rc != 0)
        return rc;
    const Kvstash__V1__HealthReply *rep = (const Kvstash__V1__HealthReply *)m;
    memset(out, 0, sizeof *out);
    out->serving = rep->status == KVSTASH__V1__HEALTH_REPLY__STATUS__SERVING;
    snprintf(out->version, sizeof out->version, "%s", rep->version);
    out->uptime_ms = rep->uptime_ms;
    protobuf_c_message_free_unpacked(m, NULL);
    return 0;
}

int kvs_client_verify(kvs_client *c, kvs_verify_result *out, kvs_err *err)
{
    if (!out) {
        kvs_err_clear(err);
        return kvs_err_set(err, KVS_EINVAL, "Verify: out is NULL");
    }
    memset(out, 0, sizeof *out);
    Kvstash__V1__VerifyRequest q = KVSTASH__V1__VERIFY_REQUEST__INIT;
    ProtobufCMessage *m;
    int rc =
        kvs__unary(c, ADMIN("Verify"), &q.base, &kvstash__v1__verify_reply__descriptor, &m, err);
    if (rc != 0)
        return rc;
    const Kvstash__V1__VerifyReply *rep = (const Kvstash__V1__VerifyReply *)m;
    for (size_t i = 0; i < rep->n_tiers && out->n_tiers < 3; i++) {
        const Kvstash__V1__TierVerify *t = rep->tiers[i];
        out->tiers[out->n_tiers++] = (kvs_verify_tier){.tier = kvs__tier_from_pb(t->tier),
                                                       .checked = t->checked,
                                                       .bad = t->bad,
                                                       .skipped = t->skipped};
    }
    protobuf_c_message_free_unpacked(m, NULL);
    return 0;
}

int kvs_client_flush(kvs_client *c, kvs_flush_result *out, kvs_err *err)
{
    Kvstash__V1__FlushRequest q = KVSTASH__V1__FLUSH_REQUEST__INIT;
    ProtobufCMessage *m;
    int rc = kvs__unary(c, ADMIN("Flush"), &q.base, &kvstash__v1__flush_reply__descriptor, &m, err);
    if (rc != 0)
        return rc;
    const Kvstash__V1__FlushReply *rep = (const Kvstash__V1__FlushReply *)m;
    if (out)
        *out = (kvs_flush_result){.written = rep->written,
                                  .failed = rep->failed,
                                  .already = rep->already,
                                  .gpu_skipped = rep->gpu_skipped};
    protobuf_c_message_free_unpacked(m, NULL);
    return 0;
}

int kvs_client_evict(kvs_client *c, const char *ns, const kvs_key *keys, size_t n, kvs_evict_to to,
                     kvs_evict_result *out, kvs_err *err)
{
    kvs_err_clear(err);
    if ((n && !keys) || (!ns && n))
        return kvs_err_set(err, KVS_EINVAL, "Evict: keys %s",
                           n && !keys ? "is NULL" : "given without a namespace");
    if (to != KVS_EVICT_HOST && to != KVS_EVICT_DISK && to != KVS_EVICT_OUT)
        return kvs_err_set(err, KVS_EINVAL, "Evict: to: %d is not a kvs_evict_to", (int)to);
    ProtobufCBinaryData *bins = NULL;
    if (n && !(bins = kvs_trymalloc(n * sizeof *bins)))
        return kvs_err_set(err, KVS_ENOMEM, "Evict: out of memory for %zu keys", n);
    for (size_t i = 0; i < n; i++)
        bins[i] = kvs_pb_bin(keys[i].bytes, keys[i].len);
    Kvstash__V1__EvictRequest q = KVSTASH__V1__EVICT_REQUEST__INIT;
    q.namespace_ = kvs_pb_str(ns ? ns : "");
    q.all = ns == NULL;
    q.n_keys = n;
    q.keys = bins;
    /* kvs_evict_to and the wire Target share their values by construction. */
    q.to = (Kvstash__V1__EvictRequest__Target)to;
    ProtobufCMessage *m;
    int rc = kvs__unary(c, ADMIN("Evict"), &q.base, &kvstash__v1__evict_reply__descriptor, &m, err);
    free(bins);
    if (rc != 0)
        return rc;
    const Kvstash__V1__EvictReply *rep = (const Kvstash__V1__EvictReply *)m;
    if (out)
        *out = (kvs_evict_result){.moved = rep->moved,
                                  .dropped = rep->dropped,
                                  .unchanged = rep->unchanged,
                                  .busy = rep->busy,
                                  .failed = rep->failed,
                                  .absent = rep->absent};
    protobuf_c_message_free_unpacked(m, NULL);
    return 0;
}
