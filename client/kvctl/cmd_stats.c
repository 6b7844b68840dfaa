/* kvctl status | stats: the daemon's health and counters (KvAdmin Health and Stats),
 * as a one-line summary, as tables, or as one JSON object. Single-threaded.
 */
#include <stdlib.h>

#include "kvctl.h"

static void json_tier(kvctl_json *j, const kvs_tier_stats *t)
{
    kvctl_json_open(j, NULL, '{');
    kvctl_json_str(j, "tier", kvs_tier_name(t->tier));
    kvctl_json_u64(j, "capacity_bytes", t->capacity_bytes);
    kvctl_json_u64(j, "used_bytes", t->used_bytes);
    kvctl_json_u64(j, "blocks", t->blocks);
    kvctl_json_u64(j, "hits", t->hits);
    kvctl_json_u64(j, "evictions", t->evictions);
    kvctl_json_u64(j, "recoded_blocks", t->recoded_blocks);
    kvctl_json_u64(j, "recode_saved_bytes", t->recode_saved_bytes);
    kvctl_json_u64(j, "block_meta_bytes", t->block_meta_bytes);
    kvctl_json_close(j, '}');
}

/* The member "tiers": an array of json_tier objects. */
static void json_tiers(kvctl_json *j, const kvs_stats *s)
{
    kvctl_json_open(j, "tiers", '[');
    for (size_t i = 0; i < s->n_tiers; i++)
        json_tier(j, &s->tiers[i]);
    kvctl_json_close(j, ']');
}

static double percent(uint64_t part, uint64_t whole)
{
    return whole ? 100.0 * (double)part / (double)whole : 0;
}

/* ------------------------------------------------------------------ status */

static int status(const kvctl_cmd *cmd, const kvctl_globals *g, int argc, char **argv)
{
    kvs_client *cl;
    int rc = kvctl_connect_no_args(cmd, g, argc, argv, &cl);
    if (rc != KVCTL_OK)
        return rc;
    kvs_health h;
    kvs_stats *st = NULL;
    kvs_err err;
    rc = kvs_client_health(cl, &h, &err);
    /* Health is the answer; Stats only adds usage, so its failure (a token that is not
     * the admin one, say) is reported but does not fail the command. */
    kvs_err serr;
    if (rc == 0 && kvs_client_stats(cl, &st, &serr) != 0)
        fprintf(stderr, "kvctl: status: no usage figures: %s\n", serr.msg);
    kvs_client_close(cl);
    if (rc != 0)
        return kvctl_fail(cmd, &err);

    if (g->json) {
        kvctl_json j;
        kvctl_json_begin(&j, stdout, '{');
        kvctl_json_str(&j, "target", g->target);
        kvctl_json_str(&j, "status", h.serving ? "serving" : "draining");
        kvctl_json_bool(&j, "serving", h.serving);
        kvctl_json_str(&j, "version", h.version);
        kvctl_json_u64(&j, "uptime_ms", h.uptime_ms);
        if (st) {
            kvctl_json_u64(&j, "namespaces", st->n_namespaces);
            json_tiers(&j, st);
        }
        kvctl_json_close(&j, '}');
    } else {
        char up[32];
        printf("%s: kvstashd %s at %s, up %s", h.serving ? "serving" : "draining", h.version,
               g->target, kvctl_fmt_duration_ms(h.uptime_ms, up, sizeof up));
        if (st) {
            printf(", %zu namespace%s", st->n_namespaces, st->n_namespaces == 1 ? "" : "s");
            for (size_t i = 0; i < st->n_tiers; i++) {
                const kvs_tier_stats *t = &st->tiers[i];
                char used[32], cap[32];
                printf(", %s %s / %s (%.1f%%, %llu blocks)", kvs_tier_name(t->tier),
                       kvctl_fmt_bytes(t->used_bytes, used, sizeof used),
                       kvctl_fmt_bytes(t->capacity_bytes, cap, sizeof cap),
                       percent(t->used_bytes, t->capacity_bytes), (unsigned long long)t->blocks);
            }
        }
        printf("\n");
    }
    kvs_stats_free(st);
    if (!h.serving)
        return kvctl_failf(cmd, "the daemon at %s is draining", g->target);
    return KVCTL_OK;
}

const kvctl_cmd kvctl_cmd_status = {
    .name = "status",
    .args = "",
    .summary = "is the daemon serving? one line with version, uptime and usage",
    .help = "Calls Health, then Stats for the namespace count and tier usage (Stats needs\n"
            "the admin token; without it only the health part is printed).\n"
            "Exit status 1 when the daemon is draining or unreachable.\n",
    .run = status,
};

/* ------------------------------------------------------------------ stats */

static void stats_json(const kvs_stats *s)
{
    kvctl_json j;
    kvctl_json_begin(&j, stdout, '{');
    kvctl_json_str(&j, "version", s->version);
    kvctl_json_u64(&j, "uptime_ms", s->uptime_ms);
    kvctl_json_u64(&j, "misses", s->misses);
    json_tiers(&j, s);
    kvctl_json_open(&j, "gpu_devices", '[');
    for (size_t i = 0; i < s->n_gpus; i++) {
        const struct kvs_gpu_device_stats *d = &s->gpus[i];
        kvctl_json_open(&j, NULL, '{');
        kvctl_json_u64(&j, "device", d->device);
        kvctl_json_u64(&j, "capacity_bytes", d->capacity_bytes);
        kvctl_json_u64(&j, "used_bytes", d->used_bytes);
        kvctl_json_u64(&j, "blocks", d->blocks);
        kvctl_json_u64(&j, "hits", d->hits);
        kvctl_json_u64(&j, "demotions", d->demotions);
        kvctl_json_u64(&j, "promotions", d->promotions);
        kvctl_json_close(&j, '}');
    }
    kvctl_json_close(&j, ']');
    kvctl_json_open(&j, "namespaces", '[');
    for (size_t i = 0; i < s->n_namespaces; i++)
        kvctl_json_ns(&j, NULL, &s->namespaces[i]);
    kvctl_json_close(&j, ']');
    kvctl_json_open(&j, "rpcs", '[');
    for (size_t i = 0; i < s->n_rpcs; i++) {
        kvctl_json_open(&j, NULL, '{');
        kvctl_json_str(&j, "method", s->rpcs[i].method);
        kvctl_json_u64(&j, "calls", s->rpcs[i].calls);
        kvctl_json_u64(&j, "errors", s->rpcs[i].errors);
        kvctl_json_close(&j, '}');
    }
    kvctl_json_close(&j, ']');
    const kvs_data_plane_stats *dp = &s->data_plane;
    kvctl_json_open(&j, "data_plane", '{');
    kvctl_json_u64(&j, "regions", dp->regions);
    kvctl_json_u64(&j, "region_bytes", dp->region_bytes);
    kvctl_json_u64(&j, "region_pinned_bytes", dp->region_pinned_bytes);
    kvctl_json_u64(&j, "region_refused", dp->region_refused);
    kvctl_json_u64(&j, "put_region_bytes", dp->put_region_bytes);
    kvctl_json_u64(&j, "put_wire_bytes", dp->put_wire_bytes);
    kvctl_json_u64(&j, "get_region_bytes", dp->get_region_bytes);
    kvctl_json_u64(&j, "get_wire_bytes", dp->get_wire_bytes);
    kvctl_json_close(&j, '}');
    kvctl_json_close(&j, '}');
}

/* "0.123 / 0.456" (mean / max) or "-" before any measurement. */
static void error_cell(kvctl_table *t, const kvs_error_stats *e)
{
    if (e->count)
        kvctl_table_cell(t, "%.4f / %.4f", e->mean, e->max);
    else
        kvctl_table_cell(t, "-");
}

/* Measured error per namespace (README "Namespace options"): those that measured something
 * or have a bound. */
static void fidelity_text(const kvs_stats *s)
{
    size_t shown = 0;
    for (size_t i = 0; i < s->n_namespaces; i++)
        shown += s->namespaces[i].fidelity.keys.count || s->namespaces[i].spec.max_rel_error > 0;
    if (!shown)
        return;
    printf("\n");
    kvctl_table t;
    kvctl_table_init(&t, 8, "NAMESPACE", "SAMPLE", "MEASURED", "K ERR MEAN/MAX", "V ERR MEAN/MAX",
                     "LOGIT ERR MEAN/MAX", "BOUND", "FALLBACK K/V");
    for (size_t i = 0; i < s->n_namespaces; i++) {
        const kvs_ns_info *ns = &s->namespaces[i];
        const kvs_ns_fidelity *f = &ns->fidelity;
        if (!f->keys.count && ns->spec.max_rel_error <= 0)
            continue;
        kvctl_table_cell(&t, "%s", ns->spec.name);
        kvctl_table_cell(&t, "%g", f->error_sample);
        kvctl_table_cell(&t, "%llu", (unsigned long long)f->keys.count);
        error_cell(&t, &f->keys);
        error_cell(&t, &f->values);
        error_cell(&t, &f->logits);
        if (ns->spec.max_rel_error > 0) {
            kvctl_table_cell(&t, "%g -> %s", ns->spec.max_rel_error, ns->spec.fallback_codec);
            kvctl_table_cell(&t, "%llu (%llu/%llu)", (unsigned long long)f->fallback_blocks,
                             (unsigned long long)f->fallback_keys,
                             (unsigned long long)f->fallback_values);
        } else {
            kvctl_table_cell(&t, "-");
            kvctl_table_cell(&t, "-");
        }
    }
    kvctl_table_print(&t, stdout);
    kvctl_table_free(&t);
}

static void stats_text(const kvs_stats *s)
{
    char up[32], a[32], b[32];
    printf("kvstashd %s, up %s, %llu misses\n\n", s->version,
           kvctl_fmt_duration_ms(s->uptime_ms, up, sizeof up), (unsigned long long)s->misses);

    kvctl_table t;
    kvctl_table_init(&t, 8, "TIER", "CAPACITY", "USED", "USE%", "BLOCKS", "HITS", "EVICTIONS",
                     "RECODED");
    for (size_t i = 0; i < s->n_tiers; i++) {
        const kvs_tier_stats *ts = &s->tiers[i];
        kvctl_table_cell(&t, "%s", kvs_tier_name(ts->tier));
        kvctl_table_cell(&t, "%s", kvctl_fmt_bytes(ts->capacity_bytes, a, sizeof a));
        kvctl_table_cell(&t, "%s", kvctl_fmt_bytes(ts->used_bytes, b, sizeof b));
        kvctl_table_cell(&t, "%.1f%%", percent(ts->used_bytes, ts->capacity_bytes));
        kvctl_table_cell(&t, "%llu", (unsigned long long)ts->blocks);
        kvctl_table_cell(&t, "%llu", (unsigned long long)ts->hits);
        kvctl_table_cell(&t, "%llu", (unsigned long long)ts->evictions);
        if (ts->recoded_blocks)
            kvctl_table_cell(&t, "%llu (-%s)", (unsigned long long)ts->recoded_blocks,
                             kvctl_fmt_bytes(ts->recode_saved_bytes, a, sizeof a));
        else
            kvctl_table_cell(&t, "-");
    }
    /* Each device's GPU tier under the sum (a daemon with several: --gpu all or a list);
     * EVICTIONS is its demotions to the host tier, as for the GPU row. */
    for (size_t i = 0; s->n_gpus > 1 && i < s->n_gpus; i++) {
        const struct kvs_gpu_device_stats *d = &s->gpus[i];
        kvctl_table_cell(&t, "  gpu%u", d->device);
        kvctl_table_cell(&t, "%s", kvctl_fmt_bytes(d->capacity_bytes, a, sizeof a));
        kvctl_table_cell(&t, "%s", kvctl_fmt_bytes(d->used_bytes, b, sizeof b));
        kvctl_table_cell(&t, "%.1f%%", percent(d->used_bytes, d->capacity_bytes));
        kvctl_table_cell(&t, "%llu", (unsigned long long)d->blocks);
        kvctl_table_cell(&t, "%llu", (unsigned long long)d->hits);
        kvctl_table_cell(&t, "%llu", (unsigned long long)d->demotions);
        kvctl_table_cell(&t, "-");
    }
    kvctl_table_print(&t, stdout);
    kvctl_table_free(&t);

    printf("\n");
    if (s->n_namespaces == 0) {
        printf("no namespaces\n");
    } else {
        kvctl_table_init(&t, 7, "NAMESPACE", "BLOCKS", "TOKENS", "STORED", "RAW", "BYTES/TOKEN",
                         "RATIO");
        for (size_t i = 0; i < s->n_namespaces; i++) {
            const kvs_ns_info *ns = &s->namespaces[i];
            uint64_t tokens;
            double per_token, ratio;
            kvctl_ns_usage(ns, &tokens, &per_token, &ratio);
            kvctl_table_cell(&t, "%s", ns->spec.name);
            kvctl_table_cell(&t, "%llu", (unsigned long long)ns->blocks);
            kvctl_table_cell(&t, "%llu", (unsigned long long)tokens);
            kvctl_table_cell(&t, "%s", kvctl_fmt_bytes(ns->stored_bytes, a, sizeof a));
            kvctl_table_cell(&t, "%s", kvctl_fmt_bytes(ns->raw_bytes, b, sizeof b));
            if (tokens)
                kvctl_table_cell(&t, "%.1f", per_token);
            else
                kvctl_table_cell(&t, "-");
            if (ns->stored_bytes)
                kvctl_table_cell(&t, "%.2fx", ratio);
            else
                kvctl_table_cell(&t, "-");
        }
        kvctl_table_print(&t, stdout);
        kvctl_table_free(&t);
    }

    fidelity_text(s);

    const kvs_data_plane_stats *dp = &s->data_plane;
    char c[32], d[32], e[32], f[32];
    printf("\ndata plane: %llu shared-memory regions (%s, %s pinned); Put %s from shared "
           "memory, %s over gRPC; Get %s into shared memory, %s over gRPC\n",
           (unsigned long long)dp->regions, kvctl_fmt_bytes(dp->region_bytes, a, sizeof a),
           kvctl_fmt_bytes(dp->region_pinned_bytes, b, sizeof b),
           kvctl_fmt_bytes(dp->put_region_bytes, c, sizeof c),
           kvctl_fmt_bytes(dp->put_wire_bytes, d, sizeof d),
           kvctl_fmt_bytes(dp->get_region_bytes, e, sizeof e),
           kvctl_fmt_bytes(dp->get_wire_bytes, f, sizeof f));
    if (s->n_rpcs > 0) {
        printf("\n");
        kvctl_table_init(&t, 3, "RPC", "CALLS", "ERRORS");
        for (size_t i = 0; i < s->n_rpcs; i++) {
            kvctl_table_cell(&t, "%s", s->rpcs[i].method);
            kvctl_table_cell(&t, "%llu", (unsigned long long)s->rpcs[i].calls);
            kvctl_table_cell(&t, "%llu", (unsigned long long)s->rpcs[i].errors);
        }
        kvctl_table_print(&t, stdout);
        kvctl_table_free(&t);
    }
}

static int stats(const kvctl_cmd *cmd, const kvctl_globals *g, int argc, char **argv)
{
    kvs_client *cl;
    int rc = kvctl_connect_no_args(cmd, g, argc, argv, &cl);
    if (rc != KVCTL_OK)
        return rc;
    kvs_stats *s;
    kvs_err err;
    rc = kvs_client_stats(cl, &s, &err);
    kvs_client_close(cl);
    if (rc != 0)
        return kvctl_fail(cmd, &err);
    if (g->json)
        stats_json(s);
    else
        stats_text(s);
    kvs_stats_free(s);
    return KVCTL_OK;
}

const kvctl_cmd kvctl_cmd_stats = {
    .name = "stats",
    .args = "[--json]",
    .summary = "tier usage, namespaces, compression and per-RPC counters",
    .help = "Tiers: capacity, bytes used, blocks, hits, evictions, blocks re-encoded with the\n"
            "tier's colder codec as they moved in (and the bytes that saved); misses. Namespaces:\n"
            "blocks, tokens held, encoded (stored) and raw bytes, encoded bytes per token,\n"
            "compression ratio (raw / stored). Measured error of the namespaces that measure\n"
            "it: the share of Puts sampled, blocks measured, relative error of keys and values\n"
            "(and the attention-logit error of a squat namespace with query samples), mean and\n"
            "max, the bound and the blocks stored with the fallback codec (keys/values).\n"
            "RPCs: calls and errors per method.\n"
            "--json prints one JSON object with the same figures.\n",
    .run = stats,
};
