/* The operator's HTTP endpoint: see metrics.h.
 *
 * Threads: MHD's one polling thread runs answer() and everything below it; the loop
 * thread creates and destroys the endpoint and flips `ready`. State: `ready` (atomic) and
 * the borrowed sources in `o`, which outlive the endpoint (main.c destroys it before the
 * server and the store). Locks: none of our own; a render takes the store's, the server's,
 * the limits', the regions' and the events' locks one at a time through their snapshot functions
 * (daemon/THREADS.md) and holds none while the page is written or sent.
 *
 * Names follow Prometheus' conventions: a `kvstash_` prefix, the unit in the name
 * (`_bytes`, `_seconds`), counters end in `_total`; every family has HELP and TYPE lines
 * and its samples follow them together (promtool check metrics, in the integration test).
 */
#include "daemon/metrics.h"

#include <microhttpd.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "daemon/call.h"
#include "daemon/events.h"
#include "daemon/limits.h"
#include "daemon/log.h"
#include "daemon/region.h"
#include "daemon/server.h"
#include "gpu/base/mem.h"
#include "gpu/engine/engine.h"
#include "storage/store.h"
#include "storage/xfer.h"

/* A scrape is a few KB plus a few hundred bytes per namespace; these bound what scrapers
 * can hold: connections at once (and from one address), and seconds a connection may
 * stay idle. */
#define MAX_CONNECTIONS 32
#define MAX_PER_IP 8
#define IDLE_TIMEOUT_S 10

struct kvs_metrics {
    kvs_metrics_opts o;
    struct MHD_Daemon *mhd;
    atomic_bool ready;
};

static const char *grpc_code_names[KVS_GRPC_CODES] = {
    "OK",        "CANCELLED",      "UNKNOWN",           "INVALID_ARGUMENT",   "DEADLINE_EXCEEDED",
    "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED",   "OUT_OF_RANGE",   "UNIMPLEMENTED",     "INTERNAL",           "UNAVAILABLE",
    "DATA_LOSS", "UNAUTHENTICATED"};

/* ---------------------------------------------------------------- rendering */

static void family(FILE *f, const char *name, const char *type, const char *help)
{
    fprintf(f, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void sample(FILE *f, const char *name, uint64_t v)
{
    fprintf(f, "%s %llu\n", name, (unsigned long long)v);
}

/* A label value, escaped as the format wants (backslash, quote, newline). Namespace names
 * are checked at create, but a scrape must stay well-formed whatever a name holds. */
static void label_value(FILE *f, const char *value)
{
    for (const char *p = value; *p; p++) {
        if (*p == '\\' || *p == '"')
            fprintf(f, "\\%c", *p);
        else if (*p == '\n')
            fputs("\\n", f);
        else
            fputc(*p, f);
    }
}

/* name{label="value"} v */
static void sample1(FILE *f, const char *name, const char *label, const char *value, uint64_t v)
{
    fprintf(f, "%s{%s=\"", name, label);
    label_value(f, value);
    fprintf(f, "\"} %llu\n", (unsigned long long)v);
}

static void render_tiers(FILE *f, const kvs_store_stats *s, bool gpu, bool disk)
{
    struct {
        const char *name;
        bool on;
        uint64_t cap, used, blocks, hits;
    } t[3] = {{"gpu", gpu, s->gpu_capacity, s->gpu_used, s->gpu_blocks, s->gpu_hits},
              {"host", true, s->host_capacity, s->host_used, s->host_blocks, s->host_hits},
              {"disk", disk, s->disk_capacity, s->disk_used, s->disk_blocks, s->disk_hits}};
    family(f, "kvstash_tier_capacity_bytes", "gauge", "Bytes a tier may hold.");
    for (int i = 0; i < 3; i++)
        if (t[i].on)
            sample1(f, "kvstash_tier_capacity_bytes", "tier", t[i].name, t[i].cap);
    family(f, "kvstash_tier_used_bytes", "gauge", "Bytes of blocks a tier holds.");
    for (int i = 0; i < 3; i++)
        if (t[i].on)
            sample1(f, "kvstash_tier_used_bytes", "tier", t[i].name, t[i].used);
    family(f, "kvstash_tier_blocks", "gauge", "Blocks a tier holds.");
    for (int i = 0; i < 3; i++)
        if (t[i].on)
            sample1(f, "kvstash_tier_blocks", "tier", t[i].name, t[i].blocks);
    family(f, "kvstash_tier_hits_total", "counter", "Block reads a tier answered.");
    for (int i = 0; i < 3; i++)
        if (t[i].on)
            sample1(f, "kvstash_tier_hits_total", "tier", t[i].name, t[i].hits);
    family(f, "kvstash_misses_total", "counter", "Block reads of a key no tier holds.");
    sample(f, "kvstash_misses_total", s->misses);

    family(f, "kvstash_evictions_total", "counter",
           "Blocks that left a tier to make room (host: to disk or dropped; disk: dropped).");
    sample1(f, "kvstash_evictions_total", "tier", "host", s->host_evictions);
    if (disk)
        sample1(f, "kvstash_evictions_total", "tier", "disk", s->disk_evictions);
    family(f, "kvstash_demotions_total", "counter",
           "Blocks moved one tier down, by the tier they left (gpu: to host; host: to disk).");
    if (gpu)
        sample1(f, "kvstash_demotions_total", "from", "gpu", s->gpu_demotions);
    if (disk)
        sample1(f, "kvstash_demotions_total", "from", "host", s->disk_spills);
    family(f, "kvstash_promotions_total", "counter",
           "Blocks a Get moved one tier up, by the tier they left (host: to gpu; disk: to host).");
    if (gpu)
        sample1(f, "kvstash_promotions_total", "from", "host", s->gpu_promotions);
    if (disk)
        sample1(f, "kvstash_promotions_total", "from", "disk", s->disk_promotions);
    family(f, "kvstash_recoded_blocks_total", "counter",
           "Blocks re-encoded with a colder codec as they moved into a tier (precision "
           "demotion: host_codec, disk_codec), by that tier.");
    if (gpu)
        sample1(f, "kvstash_recoded_blocks_total", "tier", "host", s->host_recoded);
    if (disk)
        sample1(f, "kvstash_recoded_blocks_total", "tier", "disk", s->disk_recoded);
    family(f, "kvstash_recode_saved_bytes_total", "counter",
           "Stored bytes those re-encodes saved (size before less after), by tier.");
    if (gpu)
        sample1(f, "kvstash_recode_saved_bytes_total", "tier", "host", s->host_recode_saved);
    if (disk)
        sample1(f, "kvstash_recode_saved_bytes_total", "tier", "disk", s->disk_recode_saved);
    family(f, "kvstash_checksum_failures_total", "counter",
           "Stored blocks that failed their checksum on a read and were dropped.");
    sample(f, "kvstash_checksum_failures_total", s->checksum_failures);
    if (!disk)
        return;
    family(f, "kvstash_disk_writer_queue_bytes", "gauge",
           "Bytes of host blocks waiting for the disk writer.");
    sample(f, "kvstash_disk_writer_queue_bytes", s->spill_pending);
    family(f, "kvstash_disk_writer_dropped_total", "counter",
           "Host victims dropped instead of written: the writer was behind or the write failed.");
    sample(f, "kvstash_disk_writer_dropped_total", s->spill_dropped);
    family(f, "kvstash_disk_write_errors_total", "counter",
           "Disk writes that failed (their blocks were dropped).");
    sample(f, "kvstash_disk_write_errors_total", s->disk_write_errors);
    family(f, "kvstash_durable_puts_refused_total", "counter",
           "Durable Puts refused for want of room on the disk tier.");
    sample(f, "kvstash_durable_puts_refused_total", s->disk_refused);
    family(f, "kvstash_disk_records", "gauge",
           "Records of the disk tier, each indexed in memory (entries and blocks with one).");
    sample(f, "kvstash_disk_records", s->disk_records);
    family(f, "kvstash_disk_max_records", "gauge",
           "Records the disk tier may hold (--disk-max-blocks).");
    sample(f, "kvstash_disk_max_records", s->disk_max_records);
}

/* One family over every namespace: off picks the value (a uint64_t in the info). */
static void render_ns_family(FILE *f, const kvs_store_ns_info *v, size_t n, const char *name,
                             const char *type, const char *help, size_t off)
{
    family(f, name, type, help);
    for (size_t i = 0; i < n; i++) {
        uint64_t x;
        memcpy(&x, (const char *)&v[i] + off, sizeof x);
        sample1(f, name, "namespace", v[i].spec.name, x);
    }
}

#define NS_OFF(m) offsetof(kvs_store_ns_info, usage.m)

static void render_namespaces(FILE *f, const kvs_store_ns_info *v, size_t n)
{
    family(f, "kvstash_namespace_hits_total", "counter",
           "Block reads of a namespace, by the tier that answered (hit ratio: hits / (hits + "
           "misses)).");
    static const struct {
        const char *tier;
        size_t off;
    } hits[3] = {
        {"gpu", NS_OFF(gpu_hits)}, {"host", NS_OFF(host_hits)}, {"disk", NS_OFF(disk_hits)}};
    for (size_t i = 0; i < n; i++)
        for (int t = 0; t < 3; t++) {
            uint64_t x;
            memcpy(&x, (const char *)&v[i] + hits[t].off, sizeof x);
            fputs("kvstash_namespace_hits_total{namespace=\"", f);
            label_value(f, v[i].spec.name);
            fprintf(f, "\",tier=\"%s\"} %llu\n", hits[t].tier, (unsigned long long)x);
        }
    render_ns_family(f, v, n, "kvstash_namespace_misses_total", "counter",
                     "Block reads of a key the namespace does not hold.", NS_OFF(misses));
    render_ns_family(f, v, n, "kvstash_namespace_blocks", "gauge", "Blocks of a namespace.",
                     NS_OFF(blocks));
    render_ns_family(f, v, n, "kvstash_namespace_stored_bytes", "gauge",
                     "Encoded bytes of a namespace's blocks, all tiers.", NS_OFF(stored_bytes));
    render_ns_family(f, v, n, "kvstash_namespace_raw_bytes", "gauge",
                     "Payload bytes a namespace's blocks represent (before encoding).",
                     NS_OFF(raw_bytes));
    render_ns_family(f, v, n, "kvstash_namespace_host_bytes", "gauge",
                     "Bytes a namespace is charged in the host tier (its quota's measure).",
                     NS_OFF(host_bytes));
    render_ns_family(f, v, n, "kvstash_namespace_gpu_bytes", "gauge",
                     "Slot bytes a namespace holds in the GPU tier (its gpu quota's measure).",
                     NS_OFF(gpu_bytes));
    render_ns_family(f, v, n, "kvstash_namespace_disk_bytes", "gauge",
                     "Bytes of a namespace's records in the disk tier (its disk quota's measure).",
                     NS_OFF(disk_bytes));
    family(f, "kvstash_namespace_compression_ratio", "gauge",
           "Raw bytes over stored bytes of a namespace's blocks (absent while it has none).");
    for (size_t i = 0; i < n; i++) {
        if (!v[i].usage.stored_bytes)
            continue;
        fputs("kvstash_namespace_compression_ratio{namespace=\"", f);
        label_value(f, v[i].spec.name);
        fprintf(f, "\"} %.6g\n", (double)v[i].usage.raw_bytes / (double)v[i].usage.stored_bytes);
    }
}

/* name_bucket/_sum/_count of one fidelity histogram, labelled namespace (and kv). */
static void render_hist(FILE *f, const char *name, const char *ns, const char *kv,
                        const kvs_fidelity_hist *h)
{
    for (int b = 0; b <= KVS_FIDELITY_NBOUNDS; b++) {
        fprintf(f, "%s_bucket{namespace=\"", name);
        label_value(f, ns);
        if (kv)
            fprintf(f, "\",kv=\"%s", kv);
        if (b < KVS_FIDELITY_NBOUNDS)
            fprintf(f, "\",le=\"%g\"} %llu\n", kvs_fidelity_bounds[b],
                    (unsigned long long)h->buckets[b]);
        else
            fprintf(f, "\",le=\"+Inf\"} %llu\n", (unsigned long long)h->buckets[b]);
    }
    const char *suffix[2] = {"sum", "count"};
    for (int i = 0; i < 2; i++) {
        fprintf(f, "%s_%s{namespace=\"", name, suffix[i]);
        label_value(f, ns);
        if (kv)
            fprintf(f, "\",kv=\"%s", kv);
        if (i == 0)
            fprintf(f, "\"} %.9g\n", h->sum);
        else
            fprintf(f, "\"} %llu\n", (unsigned long long)h->count);
    }
}

/* Measured error per namespace (README "Namespace options"). Series only for namespaces
 * that measured something (or have a bound, for the fallback counter): 2 x 13 + 2 per
 * namespace that samples, 13 more for a squat one with query samples. */
static void render_fidelity(FILE *f, const kvs_store_ns_info *v, size_t n)
{
    static const char *kv[2] = {"keys", "values"};
    family(f, "kvstash_namespace_rel_error_ratio", "histogram",
           "Relative error ||x^ - x|| / ||x|| of a namespace's measured blocks as stored, keys "
           "and values (kv), over each block's layers, tokens and heads.");
    for (size_t i = 0; i < n; i++)
        for (int w = 0; w < 2; w++)
            if (v[i].fidelity.h[w].count)
                render_hist(f, "kvstash_namespace_rel_error_ratio", v[i].spec.name, kv[w],
                            &v[i].fidelity.h[w]);
    family(f, "kvstash_namespace_rel_error_max_ratio", "gauge",
           "Largest relative error of a namespace's measured blocks since the start.");
    for (size_t i = 0; i < n; i++)
        for (int w = 0; w < 2; w++) {
            if (!v[i].fidelity.h[w].count)
                continue;
            fputs("kvstash_namespace_rel_error_max_ratio{namespace=\"", f);
            label_value(f, v[i].spec.name);
            fprintf(f, "\",kv=\"%s\"} %.9g\n", kv[w], v[i].fidelity.h[w].max);
        }
    family(f, "kvstash_namespace_logit_rel_error_ratio", "histogram",
           "Attention-logit error ||Q(K^-K)^T|| / ||QK^T|| of a squat namespace's measured "
           "blocks, over the query samples it learned.");
    for (size_t i = 0; i < n; i++)
        if (v[i].fidelity.h[KVS_FIDELITY_LOGITS].count)
            render_hist(f, "kvstash_namespace_logit_rel_error_ratio", v[i].spec.name, NULL,
                        &v[i].fidelity.h[KVS_FIDELITY_LOGITS]);
    family(f, "kvstash_namespace_fallback_blocks_total", "counter",
           "Blocks of a namespace with max_rel_error stored with its fallback codec.");
    for (size_t i = 0; i < n; i++)
        if (v[i].spec.max_rel_error > 0)
            sample1(f, "kvstash_namespace_fallback_blocks_total", "namespace", v[i].spec.name,
                    v[i].fidelity.fallback);
}

/* name{method="M"...}: one family per method-labelled counter array. */
static void render_rpc_counter(FILE *f, kvs_server *srv, const char *name, const char *help,
                               atomic_uint_fast64_t *arr)
{
    family(f, name, "counter", help);
    for (int r = 0; r < KVS_RPC_COUNT; r++)
        sample1(f, name, "method", srv->rpcs[r].name, atomic_load(&arr[r]));
}

static void render_rpcs(FILE *f, kvs_server *srv)
{
    render_rpc_counter(f, srv, "kvstash_rpc_calls_total", "Calls that arrived, by method.",
                       srv->rpc_calls);
    render_rpc_counter(f, srv, "kvstash_rpc_errors_total",
                       "Calls answered with an error status, by method.", srv->rpc_errors);
    /* OK always (a series that exists from the start), other codes once seen. */
    family(f, "kvstash_rpc_responses_total", "counter",
           "Calls ended, by method and gRPC status code (CANCELLED: the client left first).");
    for (int r = 0; r < KVS_RPC_COUNT; r++)
        for (int c = 0; c < KVS_GRPC_CODES; c++) {
            uint64_t v = atomic_load_explicit(&srv->rpc_codes[r][c], memory_order_relaxed);
            if (v || c == 0)
                fprintf(f, "kvstash_rpc_responses_total{method=\"%s\",code=\"%s\"} %llu\n",
                        srv->rpcs[r].name, grpc_code_names[c], (unsigned long long)v);
        }
    family(f, "kvstash_rpc_duration_seconds", "histogram",
           "Time from a call's arrival to its status, by method.");
    for (int r = 0; r < KVS_RPC_COUNT; r++) {
        const char *m = srv->rpcs[r].name;
        uint64_t cum = 0;
        for (int b = 0; b <= KVS_RPC_LAT_BUCKETS; b++) {
            cum += atomic_load_explicit(&srv->rpc_lat[r][b], memory_order_relaxed);
            if (b < KVS_RPC_LAT_BUCKETS)
                fprintf(f, "kvstash_rpc_duration_seconds_bucket{method=\"%s\",le=\"%g\"} %llu\n", m,
                        (double)kvs_rpc_lat_bounds_ns[b] / 1e9, (unsigned long long)cum);
            else
                fprintf(f, "kvstash_rpc_duration_seconds_bucket{method=\"%s\",le=\"+Inf\"} %llu\n",
                        m, (unsigned long long)cum);
        }
        uint64_t sum = atomic_load_explicit(&srv->rpc_lat_sum_ns[r], memory_order_relaxed);
        fprintf(f, "kvstash_rpc_duration_seconds_sum{method=\"%s\"} %.9f\n", m, (double)sum / 1e9);
        fprintf(f, "kvstash_rpc_duration_seconds_count{method=\"%s\"} %llu\n", m,
                (unsigned long long)cum);
    }
    family(f, "kvstash_rpc_inflight", "gauge", "Admitted calls not yet finished (Health aside).");
    sample(f, "kvstash_rpc_inflight", kvs_server_inflight(srv));

    family(f, "kvstash_payload_bytes_total", "counter",
           "Block payload bytes received (in: Put) and sent (out: Get), by path (wire: the "
           "gRPC stream; region: shared memory).");
    static const char *lines[4][2] = {
        {"in", "wire"}, {"in", "region"}, {"out", "wire"}, {"out", "region"}};
    uint64_t vals[4] = {atomic_load(&srv->put_wire_bytes), atomic_load(&srv->put_region_bytes),
                        atomic_load(&srv->get_wire_bytes), atomic_load(&srv->get_region_bytes)};
    for (int i = 0; i < 4; i++)
        fprintf(f, "kvstash_payload_bytes_total{direction=\"%s\",path=\"%s\"} %llu\n", lines[i][0],
                lines[i][1], (unsigned long long)vals[i]);
}

static void render_streams(FILE *f, kvs_server *srv, struct kvs_regions *regions)
{
    kvs_limits_stats ls;
    uint64_t idle;
    kvs_server_stream_stats(srv, &ls, &idle);
    family(f, "kvstash_put_streams_open", "gauge", "Put streams holding a slot.");
    sample(f, "kvstash_put_streams_open", ls.puts_open);
    family(f, "kvstash_get_streams_open", "gauge", "Get and GetMany streams holding a slot.");
    sample(f, "kvstash_get_streams_open", ls.gets_open);
    family(f, "kvstash_get_streams_refused_total", "counter",
           "Get and GetMany streams refused a slot (--max-gets, --max-gets-per-conn).");
    sample(f, "kvstash_get_streams_refused_total", ls.gets_refused);
    family(f, "kvstash_recv_budget_bytes", "gauge",
           "Memory for Put payloads being received (--recv-budget).");
    sample(f, "kvstash_recv_budget_bytes", ls.recv_budget);
    family(f, "kvstash_recv_used_bytes", "gauge", "Of it, bytes in use.");
    sample(f, "kvstash_recv_used_bytes", ls.recv_used);
    family(f, "kvstash_refused_total", "counter",
           "Puts refused RESOURCE_EXHAUSTED, by reason (slots: --max-puts; memory: the "
           "receive budget).");
    sample1(f, "kvstash_refused_total", "reason", "slots", ls.puts_refused);
    sample1(f, "kvstash_refused_total", "reason", "memory", ls.recv_refused);
    family(f, "kvstash_streams_idle_cancelled_total", "counter",
           "Put and Get streams cancelled for making no progress (--stream-idle).");
    sample(f, "kvstash_streams_idle_cancelled_total", idle);
    if (!regions)
        return;
    kvs_regions_stats rs;
    kvs_regions_stats_get(regions, &rs);
    family(f, "kvstash_regions", "gauge", "Shared-memory regions registered.");
    sample(f, "kvstash_regions", rs.regions);
    family(f, "kvstash_region_bytes", "gauge", "Bytes of shared memory registered.");
    sample(f, "kvstash_region_bytes", rs.bytes);
    family(f, "kvstash_region_refused_total", "counter", "Region registrations refused.");
    sample(f, "kvstash_region_refused_total", rs.refused);
}

/* KV events (--events-listen, daemon/events.h): only when they are on. */
static void render_events(FILE *f, struct kvs_events *ev)
{
    if (!ev)
        return;
    kvs_events_stats es;
    kvs_events_get_stats(ev, &es);
    family(f, "kvstash_events_published_total", "counter",
           "KV block events sent to subscribers (--events-listen).");
    sample(f, "kvstash_events_published_total", es.published);
    family(f, "kvstash_events_messages_total", "counter", "Messages (event batches) sent.");
    sample(f, "kvstash_events_messages_total", es.messages);
    family(f, "kvstash_events_dropped_total", "counter",
           "Events dropped because the publisher's queue was full (--events-queue).");
    sample(f, "kvstash_events_dropped_total", es.dropped);
    family(f, "kvstash_events_send_errors_total", "counter",
           "Event messages the socket refused (their events are lost).");
    sample(f, "kvstash_events_send_errors_total", es.send_errors);
    family(f, "kvstash_events_queued", "gauge", "Events waiting for the publisher.");
    sample(f, "kvstash_events_queued", es.queued);
}

/* Each device's gpu tier (the tier="gpu" samples above are their sums), labelled by the
 * device's place in the daemon's --gpu list. */
static void render_gpu_devices(FILE *f, const kvs_store_stats *s)
{
    static const struct {
        const char *name, *type, *help;
    } fams[6] = {
        {"kvstash_gpu_tier_capacity_bytes", "gauge", "Bytes one device's gpu tier may hold."},
        {"kvstash_gpu_tier_used_bytes", "gauge", "Bytes of blocks one device's gpu tier holds."},
        {"kvstash_gpu_tier_blocks", "gauge", "Blocks one device's gpu tier holds."},
        {"kvstash_gpu_tier_hits_total", "counter", "Block reads one device's gpu tier answered."},
        {"kvstash_gpu_tier_demotions_total", "counter", "Blocks one device demoted to host."},
        {"kvstash_gpu_tier_promotions_total", "counter", "Host blocks a Get moved to one device."}};
    for (int i = 0; i < 6; i++) {
        family(f, fams[i].name, fams[i].type, fams[i].help);
        for (unsigned g = 0; g < s->gpu_devices; g++) {
            const kvs_store_gpu_stats *d = &s->gpu_dev[g];
            uint64_t v[6] = {d->capacity, d->used, d->blocks, d->hits, d->demotions, d->promotions};
            fprintf(f, "%s{device=\"%u\"} %llu\n", fams[i].name, g, (unsigned long long)v[i]);
        }
    }
}

/* Codec work by op and by where it ran (storage/xfer.h), and the engine's batch sizes. */
static void render_codecs(FILE *f, kvs_server *srv, struct kvs_engine *const *engines)
{
    bool gpu = engines[0] != NULL; /* the leading entries are the engines */
    static const char *ops[3] = {"encode", "decode", "measure"}, *wheres[2] = {"cpu", "gpu"};
    kvs_xfer_stats xs;
    kvs_xfer_get_stats(srv->xfer, &xs);
    static const struct {
        const char *name, *help;
    } fams[4] = {{"kvstash_codec_ops_total",
                  "Blocks encoded (Put), decoded (raw Get) or measured (a Put's error), by where."},
                 {"kvstash_codec_seconds_total",
                  "Time spent on them (gpu: submission to completion, queue wait included)."},
                 {"kvstash_codec_raw_bytes_total",
                  "Payload bytes encoded, or decoded (the layers asked for)."},
                 {"kvstash_codec_encoded_bytes_total", "Encoded bytes written or read by them."}};
    for (int i = 0; i < 4; i++) {
        family(f, fams[i].name, "counter", fams[i].help);
        for (int op = 0; op < 3; op++)
            for (int w = 0; w < 2; w++) {
                if (w == 1 && !gpu)
                    continue;
                fprintf(f, "%s{op=\"%s\",engine=\"%s\"} ", fams[i].name, ops[op], wheres[w]);
                if (i == 1)
                    fprintf(f, "%.9f\n", (double)xs.ns[op][w] / 1e9);
                else
                    fprintf(f, "%llu\n",
                            (unsigned long long)(i == 0   ? xs.ops[op][w]
                                                 : i == 2 ? xs.raw_bytes[op][w]
                                                          : xs.encoded_bytes[op][w]));
            }
    }
    if (!gpu)
        return;
    kvs_engine_stats es = {0}; /* every device's batches in one histogram */
    for (int g = 0; g < KVS_STORE_GPUS_MAX && engines[g]; g++) {
        kvs_engine_stats one;
        kvs_engine_get_stats(engines[g], &one);
        es.requests += one.requests;
        for (int b = 0; b <= KVS_ENGINE_BATCH_BUCKETS; b++)
            es.batches[b] += one.batches[b];
    }
    family(f, "kvstash_gpu_engine_batch_size", "histogram",
           "Requests per batch the GPU engine ran (encode, decode, moves).");
    uint64_t cum = 0;
    for (int b = 0; b <= KVS_ENGINE_BATCH_BUCKETS; b++) {
        cum += es.batches[b];
        if (b < KVS_ENGINE_BATCH_BUCKETS)
            fprintf(f, "kvstash_gpu_engine_batch_size_bucket{le=\"%u\"} %llu\n",
                    kvs_engine_batch_bounds[b], (unsigned long long)cum);
        else
            fprintf(f, "kvstash_gpu_engine_batch_size_bucket{le=\"+Inf\"} %llu\n",
                    (unsigned long long)cum);
    }
    sample(f, "kvstash_gpu_engine_batch_size_sum", es.requests);
    sample(f, "kvstash_gpu_engine_batch_size_count", cum);
}

int kvs_metrics_render(const kvs_metrics_opts *o, char **out, size_t *len, kvs_err *err)
{
    /* Snapshots first: the store's lock is taken twice (stats, then namespaces), and
     * nothing is held while the page is written. */
    kvs_store_stats st;
    kvs_store_get_stats(o->store, &st);
    kvs_store_ns_info *ns = NULL;
    size_t n_ns = 0;
    int rc = kvs_store_ns_list(o->store, &ns, &n_ns, err);
    if (rc)
        return rc;
    char *buf = NULL;
    size_t size = 0;
    FILE *f = open_memstream(&buf, &size);
    if (!f) {
        free(ns);
        return kvs_err_set(err, KVS_ENOMEM, "/metrics: open_memstream: out of memory");
    }
    family(f, "kvstash_build_info", "gauge", "Always 1; the daemon's version as a label.");
    sample1(f, "kvstash_build_info", "version", KVS_VERSION, 1);
    family(f, "kvstash_uptime_seconds", "gauge", "Seconds since the server started.");
    fprintf(f, "kvstash_uptime_seconds %.3f\n",
            (double)(kvs_now_ms() - o->server->start_ms) / 1000.0);
    render_tiers(f, &st, kvs_store_has_gpu(o->store), kvs_store_has_disk(o->store));
    if (st.gpu_devices)
        render_gpu_devices(f, &st);
    kvs_hostpool *pool = kvs_store_host_pool(o->store);
    if (pool) {
        kvs_hostpool_stats ps;
        kvs_hostpool_get_stats(pool, &ps);
        family(f, "kvstash_host_pinned_bytes", "gauge",
               "Bytes of pinned host memory committed for host blocks and payloads.");
        sample(f, "kvstash_host_pinned_bytes", ps.committed);
    }
    render_namespaces(f, ns, n_ns);
    render_fidelity(f, ns, n_ns);
    free(ns);
    render_rpcs(f, o->server);
    render_streams(f, o->server, o->regions);
    render_codecs(f, o->server, o->engine);
    render_events(f, o->events);
    /* open_memstream's stream fails only for want of memory; fclose reports it. */
    bool bad = ferror(f) != 0;
    if (fclose(f) != 0 || bad) {
        free(buf);
        return kvs_err_set(err, KVS_ENOMEM, "/metrics: rendering the page: out of memory");
    }
    *out = buf;
    *len = size;
    return 0;
}

/* ---------------------------------------------------------------- HTTP */

static enum MHD_Result reply(struct MHD_Connection *conn, unsigned status, const char *type,
                             char *body, size_t len, bool owned)
{
    struct MHD_Response *r =
        owned ? MHD_create_response_from_buffer_with_free_callback(len, body, free)
              : MHD_create_response_from_buffer(len, body, MHD_RESPMEM_PERSISTENT);
    if (!r) {
        if (owned)
            free(body);
        return MHD_NO; /* MHD closes the connection */
    }
    enum MHD_Result ok = MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    if (ok == MHD_YES)
        ok = MHD_queue_response(conn, status, r);
    MHD_destroy_response(r);
    return ok;
}

static enum MHD_Result reply_text(struct MHD_Connection *conn, unsigned status, const char *text)
{
    return reply(conn, status, "text/plain; charset=utf-8", (char *)(uintptr_t)text, strlen(text),
                 false); /* MHD_RESPMEM_PERSISTENT: only read */
}

static enum MHD_Result answer(void *cls, struct MHD_Connection *conn, const char *url,
                              const char *method, const char *version, const char *upload,
                              size_t *upload_size, void **con_cls)
{
    kvs_metrics *m = cls;
    (void)version, (void)upload, (void)upload_size, (void)con_cls;
    if (strcmp(method, MHD_HTTP_METHOD_GET) != 0 && strcmp(method, MHD_HTTP_METHOD_HEAD) != 0)
        return reply_text(conn, MHD_HTTP_METHOD_NOT_ALLOWED, "GET or HEAD only\n");
    if (strcmp(url, "/healthz") == 0)
        return reply_text(conn, MHD_HTTP_OK, "ok\n");
    if (strcmp(url, "/readyz") == 0)
        return atomic_load(&m->ready)
                   ? reply_text(conn, MHD_HTTP_OK, "ready\n")
                   : reply_text(conn, MHD_HTTP_SERVICE_UNAVAILABLE, "not ready\n");
    if (strcmp(url, "/metrics") != 0)
        return reply_text(conn, MHD_HTTP_NOT_FOUND, "not found: /metrics, /healthz, /readyz\n");
    char *body;
    size_t len;
    kvs_err err;
    kvs_err_clear(&err);
    if (kvs_metrics_render(&m->o, &body, &len, &err)) {
        kvs_log(KVS_LOG_WARN, "metrics: %s", err.msg);
        return reply_text(conn, MHD_HTTP_INTERNAL_SERVER_ERROR, "rendering failed\n");
    }
    return reply(conn, MHD_HTTP_OK, "text/plain; version=0.0.4; charset=utf-8", body, len, true);
}

static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    (void)cls;
    char line[512];
    vsnprintf(line, sizeof line, fmt, ap);
    size_t n = strlen(line);
    while (n && line[n - 1] == '\n')
        line[--n] = 0;
    kvs_log(KVS_LOG_WARN, "metrics: %s", line);
}

/* "HOST:PORT" or "[V6]:PORT" into host and port strings. */
static bool split_addr(const char *s, char *host, size_t hcap, char *port, size_t pcap)
{
    const char *colon;
    if (s[0] == '[') {
        const char *end = strchr(s, ']');
        if (!end || end[1] != ':' || (size_t)(end - s - 1) >= hcap)
            return false;
        memcpy(host, s + 1, (size_t)(end - s - 1));
        host[end - s - 1] = 0;
        colon = end + 1;
    } else {
        colon = strrchr(s, ':');
        if (!colon || colon == s || (size_t)(colon - s) >= hcap ||
            memchr(s, ':', (size_t)(colon - s)))
            return false;
        memcpy(host, s, (size_t)(colon - s));
        host[colon - s] = 0;
    }
    if (!colon[1] || strlen(colon + 1) >= pcap ||
        strspn(colon + 1, "0123456789") != strlen(colon + 1))
        return false;
    snprintf(port, pcap, "%s", colon + 1);
    return true;
}

int kvs_metrics_create(const kvs_metrics_opts *o, kvs_metrics **out, int *bound_port, kvs_err *err)
{
    char host[256], port[16];
    if (!split_addr(o->listen, host, sizeof host, port, sizeof port))
        return kvs_err_set(err, KVS_EINVAL,
                           "--metrics-listen: '%.200s' is not HOST:PORT or [IPV6]:PORT", o->listen);
    struct addrinfo hints = {.ai_family = AF_UNSPEC,
                             .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
    struct addrinfo *ai = NULL;
    int gai = getaddrinfo(host, port, &hints, &ai);
    if (gai)
        return kvs_err_set(err, KVS_EINVAL, "--metrics-listen: '%.200s': %s", o->listen,
                           gai_strerror(gai));
    kvs_metrics *m = kvs_xcalloc(1, sizeof *m);
    m->o = *o;
    atomic_init(&m->ready, false);
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_AUTO | MHD_USE_ERROR_LOG;
    if (ai->ai_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    /* The port argument is ignored with MHD_OPTION_SOCK_ADDR, which carries it; the
     * logger goes first, as MHD wants, so that it sees the other options' complaints. */
    m->mhd = MHD_start_daemon(flags, 0, NULL, NULL, answer, m, MHD_OPTION_EXTERNAL_LOGGER, mhd_log,
                              NULL, MHD_OPTION_SOCK_ADDR, ai->ai_addr, MHD_OPTION_CONNECTION_LIMIT,
                              (unsigned)MAX_CONNECTIONS, MHD_OPTION_PER_IP_CONNECTION_LIMIT,
                              (unsigned)MAX_PER_IP, MHD_OPTION_CONNECTION_TIMEOUT,
                              (unsigned)IDLE_TIMEOUT_S, MHD_OPTION_END);
    freeaddrinfo(ai);
    if (!m->mhd) {
        free(m);
        return kvs_err_set(err, KVS_EIO,
                           "--metrics-listen: cannot listen on '%.200s' (in use, or not an "
                           "address of this host)",
                           o->listen);
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(m->mhd, MHD_DAEMON_INFO_BIND_PORT);
    *bound_port = info ? info->port : 0;
    *out = m;
    return 0;
}

void kvs_metrics_set_ready(kvs_metrics *m, bool ready)
{
    if (m)
        atomic_store(&m->ready, ready);
}

void kvs_metrics_destroy(kvs_metrics *m)
{
    if (!m)
        return;
    MHD_stop_daemon(m->mhd);
    free(m);
}
