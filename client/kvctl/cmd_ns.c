/* kvctl ns create | list | drop: namespace administration through KvAdmin, plus the
 * JSON form of a namespace that `stats` shares. Single-threaded.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "kvctl.h"

uint64_t kvctl_token_bytes(const kvs_ns_spec *spec)
{
    return kvs_spec_layer_bytes(spec, 1) * spec->layers; /* < 2^31 by the spec limits */
}

void kvctl_ns_usage(const kvs_ns_info *ns, uint64_t *tokens, double *bytes_per_token, double *ratio)
{
    uint64_t per = kvctl_token_bytes(&ns->spec);
    *tokens = per ? ns->raw_bytes / per : 0;
    *bytes_per_token = *tokens ? (double)ns->stored_bytes / (double)*tokens : 0;
    *ratio = ns->stored_bytes ? (double)ns->raw_bytes / (double)ns->stored_bytes : 0;
}

void kvctl_json_ns(kvctl_json *j, const char *key, const kvs_ns_info *ns)
{
    kvctl_json_open(j, key, '{');
    kvctl_json_str(j, "name", ns->spec.name);
    kvctl_json_u64(j, "id", ns->id);
    kvctl_json_u64(j, "layers", ns->spec.layers);
    kvctl_json_u64(j, "kv_heads", ns->spec.kv_heads);
    kvctl_json_u64(j, "head_dim", ns->spec.head_dim);
    kvctl_json_u64(j, "block_tokens", ns->spec.block_tokens);
    kvctl_json_str(j, "dtype", kvs_dtype_name(ns->spec.dtype));
    kvctl_json_str(j, "key_codec", ns->spec.key_codec);
    kvctl_json_str(j, "value_codec", ns->spec.value_codec);
    kvctl_json_bool(j, "keys_pre_rope", ns->spec.keys_pre_rope);
    kvctl_json_bool(j, "durable", ns->spec.durable);
    kvctl_json_u64(j, "seed", ns->spec.seed);
    kvctl_json_u64(j, "host_quota_bytes", ns->spec.host_quota);
    kvctl_json_u64(j, "gpu_quota_bytes", ns->spec.gpu_quota);
    kvctl_json_u64(j, "disk_quota_bytes", ns->spec.disk_quota);
    if (ns->spec.error_sample_set) /* else the daemon's --error-sample (fidelity below) */
        kvctl_json_num(j, "error_sample", ns->spec.error_sample);
    kvctl_json_num(j, "max_rel_error", ns->spec.max_rel_error);
    kvctl_json_str(j, "fallback_codec", ns->spec.fallback_codec);
    kvctl_json_str(j, "host_codec", ns->spec.host_codec);
    kvctl_json_str(j, "disk_codec", ns->spec.disk_codec);
    kvctl_json_u64(j, "blocks", ns->blocks);
    kvctl_json_u64(j, "stored_bytes", ns->stored_bytes);
    kvctl_json_u64(j, "raw_bytes", ns->raw_bytes);
    kvctl_json_u64(j, "block_bytes", ns->block_bytes);
    uint64_t tokens;
    double per_token, ratio;
    kvctl_ns_usage(ns, &tokens, &per_token, &ratio);
    kvctl_json_u64(j, "tokens", tokens);
    kvctl_json_num(j, "bytes_per_token", per_token);
    kvctl_json_num(j, "compression_ratio", ratio);
    const kvs_ns_fidelity *f = &ns->fidelity;
    kvctl_json_open(j, "fidelity", '{');
    kvctl_json_num(j, "error_sample", f->error_sample);
    const struct {
        const char *name;
        const kvs_error_stats *e;
    } errs[3] = {{"key_error", &f->keys}, {"value_error", &f->values}, {"logit_error", &f->logits}};
    for (int i = 0; i < 3; i++) {
        kvctl_json_open(j, errs[i].name, '{');
        kvctl_json_u64(j, "count", errs[i].e->count);
        kvctl_json_num(j, "mean", errs[i].e->mean);
        kvctl_json_num(j, "max", errs[i].e->max);
        kvctl_json_close(j, '}');
    }
    kvctl_json_u64(j, "checked", f->checked);
    kvctl_json_u64(j, "fallback_blocks", f->fallback_blocks);
    kvctl_json_u64(j, "fallback_keys", f->fallback_keys);
    kvctl_json_u64(j, "fallback_values", f->fallback_values);
    kvctl_json_close(j, '}');
    kvctl_json_close(j, '}');
}

/* ------------------------------------------------------------------ ns create */

/* A finite double in [lo, hi]. */
static bool parse_double(const char *s, double lo, double hi, double *out)
{
    char *end;
    errno = 0;
    double d = strtod(s, &end);
    if (errno || end == s || *end || !(d >= lo && d <= hi))
        return false;
    *out = d;
    return true;
}

static bool set_codec(char *dst, const char *src)
{
    if (strlen(src) > KVS_CODEC_NAME_MAX)
        return false;
    snprintf(dst, KVS_CODEC_NAME_MAX + 1, "%s", src);
    return true;
}

static int ns_create(const kvctl_cmd *cmd, const kvctl_globals *g, int argc, char **argv)
{
    static const struct option opts[] = {
        {"layers", required_argument, NULL, 'L'},
        {"kv-heads", required_argument, NULL, 'H'},
        {"head-dim", required_argument, NULL, 'D'},
        {"block-tokens", required_argument, NULL, 'T'},
        {"dtype", required_argument, NULL, 'd'},
        {"key-codec", required_argument, NULL, 'k'},
        {"value-codec", required_argument, NULL, 'v'},
        {"codec", required_argument, NULL, 'c'},
        {"seed", required_argument, NULL, 's'},
        {"keys-pre-rope", no_argument, NULL, 'r'},
        {"durable", no_argument, NULL, 'u'},
        {"host-quota", required_argument, NULL, 'q'},
        {"gpu-quota", required_argument, NULL, 'G'},
        {"disk-quota", required_argument, NULL, 'K'},
        {"error-sample", required_argument, NULL, 'e'},
        {"max-rel-error", required_argument, NULL, 'm'},
        {"fallback-codec", required_argument, NULL, 'f'},
        {"host-codec", required_argument, NULL, 'o'},
        {"disk-codec", required_argument, NULL, 'i'},
        {0, 0, 0, 0},
    };
    kvs_ns_spec spec = {.dtype = KVS_DTYPE_FP16};
    uint32_t *dims[] = {&spec.layers, &spec.kv_heads, &spec.head_dim, &spec.block_tokens};
    const char *dim_opts = "LHDT";
    int c;
    while ((c = kvctl_getopt(cmd, argc, argv, opts)) != -1) {
        uint64_t v;
        const char *dim = strchr(dim_opts, c);
        if (c == '?')
            return KVCTL_USAGE;
        if (dim && c) {
            if (!kvctl_parse_u64(optarg, 1, UINT32_MAX, &v))
                return kvctl_usage(cmd, "--%s: '%s' is not a positive integer",
                                   opts[dim - dim_opts].name, optarg);
            *dims[dim - dim_opts] = (uint32_t)v;
        } else if (c == 'd') {
            spec.dtype = kvs_dtype_parse(optarg);
            if (spec.dtype == KVS_DTYPE_UNSPECIFIED)
                return kvctl_usage(cmd, "--dtype: '%s' is not fp16 or bf16", optarg);
        } else if (c == 'k' || c == 'v' || c == 'c') {
            if ((c != 'v' && !set_codec(spec.key_codec, optarg)) ||
                (c != 'k' && !set_codec(spec.value_codec, optarg)))
                return kvctl_usage(cmd, "codec name '%s' is longer than %d characters", optarg,
                                   KVS_CODEC_NAME_MAX);
        } else if (c == 's') {
            if (!kvctl_parse_u64(optarg, 0, UINT64_MAX, &v))
                return kvctl_usage(cmd, "--seed: '%s' is not an unsigned integer", optarg);
            spec.seed = v;
        } else if (c == 'r') {
            spec.keys_pre_rope = true;
        } else if (c == 'u') {
            spec.durable = true;
        } else if (c == 'q' || c == 'G' || c == 'K') {
            static const char *const flags[3] = {"--host-quota", "--gpu-quota", "--disk-quota"};
            uint64_t *quotas[3] = {&spec.host_quota, &spec.gpu_quota, &spec.disk_quota};
            int i = c == 'q' ? 0 : c == 'G' ? 1 : 2;
            if (!kvctl_parse_size(optarg, &v))
                return kvctl_usage(cmd, "%s: '%s' is not a size (512M, 2G, ...)", flags[i], optarg);
            *quotas[i] = v;
        } else if (c == 'e') {
            if (!parse_double(optarg, 0, 1, &spec.error_sample))
                return kvctl_usage(cmd, "--error-sample: '%s' is not a share in 0..1", optarg);
            spec.error_sample_set = true;
        } else if (c == 'm') {
            if (!parse_double(optarg, 0, 1e300, &spec.max_rel_error))
                return kvctl_usage(cmd, "--max-rel-error: '%s' is not a number >= 0", optarg);
        } else if (c == 'f' || c == 'o' || c == 'i') {
            char *to = c == 'f'   ? spec.fallback_codec
                       : c == 'o' ? spec.host_codec
                                  : spec.disk_codec;
            if (!set_codec(to, optarg))
                return kvctl_usage(cmd, "--%s: '%s' is longer than %d characters",
                                   c == 'f'   ? "fallback-codec"
                                   : c == 'o' ? "host-codec"
                                              : "disk-codec",
                                   optarg, KVS_CODEC_NAME_MAX);
        }
    }
    if (argc - optind != 1)
        return kvctl_usage(cmd, "expected one NAME, got %d arguments", argc - optind);
    const char *name = argv[optind];
    if (strlen(name) > KVS_NAME_MAX)
        return kvctl_usage(cmd, "NAME: longer than %d characters", KVS_NAME_MAX);
    snprintf(spec.name, sizeof spec.name, "%s", name);
    static const char *const dim_names[] = {"--layers", "--kv-heads", "--head-dim",
                                            "--block-tokens"};
    for (size_t i = 0; i < 4; i++)
        if (*dims[i] == 0)
            return kvctl_usage(cmd, "%s is required", dim_names[i]);

    kvs_client *cl;
    if (kvctl_connect(cmd, g, &cl) != KVCTL_OK)
        return KVCTL_FAIL;
    kvs_ns_info info;
    kvs_err err;
    int rc = kvs_client_ns_create(cl, &spec, &info, &err);
    kvs_client_close(cl);
    if (rc != 0)
        return kvctl_fail(cmd, &err);
    if (g->json) {
        kvctl_json j;
        kvctl_json_init(&j, stdout);
        kvctl_json_ns(&j, NULL, &info);
        return KVCTL_OK;
    }
    char b[32];
    printf("created namespace %s (id %u): L=%u H=%u D=%u T=%u %s, codecs %s/%s%s%s, "
           "%s per block\n",
           info.spec.name, info.id, info.spec.layers, info.spec.kv_heads, info.spec.head_dim,
           info.spec.block_tokens, kvs_dtype_name(info.spec.dtype), info.spec.key_codec,
           info.spec.value_codec, info.spec.keys_pre_rope ? ", keys pre-RoPE" : "",
           info.spec.durable ? ", durable" : "", kvctl_fmt_bytes(info.block_bytes, b, sizeof b));
    if (info.spec.max_rel_error > 0)
        printf("  every Put checked: a side whose relative error passes %g is stored with %s\n",
               info.spec.max_rel_error, info.spec.fallback_codec);
    else
        printf("  error measured on %g%% of Puts%s\n", 100 * info.fidelity.error_sample,
               info.spec.error_sample_set ? "" : " (the daemon's --error-sample)");
    if (info.spec.host_codec[0] || info.spec.disk_codec[0])
        printf("  colder tiers: host %s, disk %s (a side is re-encoded where that is smaller)\n",
               info.spec.host_codec[0] ? info.spec.host_codec : "as it comes",
               info.spec.disk_codec[0] ? info.spec.disk_codec : "as it comes");
    return KVCTL_OK;
}

const kvctl_cmd kvctl_cmd_ns_create = {
    .name = "ns create",
    .args = "NAME --layers L --kv-heads H --head-dim D --block-tokens T [--dtype fp16|bf16]\n"
            "       [--codec C | --key-codec C --value-codec C] [--seed N] [--keys-pre-rope]\n"
            "       [--durable] [--host-quota SIZE] [--gpu-quota SIZE] [--disk-quota SIZE]\n"
            "       [--error-sample SHARE]\n"
            "       [--max-rel-error E [--fallback-codec C]] [--host-codec C] [--disk-codec C]",
    .summary = "create a namespace (one model's KV layout and codecs)",
    .help = "A namespace is immutable once created. A block of t tokens is the layout\n"
            "[L][2][t][H][D] in the namespace's dtype, t <= T.\n"
            "\n"
            "  --layers L          transformer layers\n"
            "  --kv-heads H        KV heads per layer\n"
            "  --head-dim D        head dimension, a multiple of 16\n"
            "  --block-tokens T    tokens per full block\n"
            "  --dtype fp16|bf16   payload dtype (default fp16)\n"
            "  --key-codec C       codec of the keys (default none)\n"
            "  --value-codec C     codec of the values (default none)\n"
            "  --codec C           the same codec for keys and values\n"
            "  --seed N            seed of every random choice a codec makes (default 0)\n"
            "  --keys-pre-rope     keys are stored before RoPE\n"
            "  --durable           acknowledge a Put only once it is on disk\n"
            "  --host-quota SIZE   bytes of the host tier it may hold (512M, 2G); over it a\n"
            "                      Put evicts this namespace's own blocks, never another's\n"
            "  --gpu-quota SIZE    the same for the GPU tier: over it, Puts land in the host\n"
            "                      tier while this namespace's own GPU blocks are demoted\n"
            "  --disk-quota SIZE   the same for the disk tier: over it, this namespace's own\n"
            "                      oldest disk blocks are evicted (a durable namespace's Put\n"
            "                      is refused instead)\n"
            "  --error-sample S    share of Puts (0..1) whose encoded block the daemon decodes\n"
            "                      again and measures (kvctl stats); default: the daemon's\n"
            "                      --error-sample\n"
            "  --max-rel-error E   check every Put: keys or values whose relative error\n"
            "                      ||x^-x||/||x|| passes E are stored with the fallback codec\n"
            "  --fallback-codec C  that codec: none (default: as they came), fp8, kivi-2,\n"
            "                      kivi-3, kivi-4 or polarquant\n"
            "  --host-codec C      precision demotion: a block that moves down to the host tier\n"
            "                      (or is Put straight into it) has keys and values re-encoded\n"
            "                      with C where C is smaller than what they have (the GPU\n"
            "                      tier's codec is the namespace's own); not with\n"
            "                      --max-rel-error\n"
            "  --disk-codec C      the same for the disk tier (default for both: none, a block\n"
            "                      keeps its encoding)\n",
    .run = ns_create,
};

/* ------------------------------------------------------------------ ns list */

static int ns_list(const kvctl_cmd *cmd, const kvctl_globals *g, int argc, char **argv)
{
    kvs_client *cl;
    int rc = kvctl_connect_no_args(cmd, g, argc, argv, &cl);
    if (rc != KVCTL_OK)
        return rc;
    kvs_ns_info *all;
    size_t n;
    kvs_err err;
    rc = kvs_client_ns_list(cl, &all, &n, &err);
    kvs_client_close(cl);
    if (rc != 0)
        return kvctl_fail(cmd, &err);
    if (g->json) {
        kvctl_json j;
        kvctl_json_begin(&j, stdout, '[');
        for (size_t i = 0; i < n; i++)
            kvctl_json_ns(&j, NULL, &all[i]);
        kvctl_json_close(&j, ']');
    } else if (n == 0) {
        printf("no namespaces\n");
    } else {
        kvctl_table t;
        kvctl_table_init(&t, 11, "NAME", "ID", "L", "H", "D", "T", "DTYPE", "CODECS", "BLOCKS",
                         "STORED", "BLOCK");
        for (size_t i = 0; i < n; i++) {
            const kvs_ns_info *ns = &all[i];
            char b[32];
            kvctl_table_cell(&t, "%s", ns->spec.name);
            kvctl_table_cell(&t, "%u", ns->id);
            kvctl_table_cell(&t, "%u", ns->spec.layers);
            kvctl_table_cell(&t, "%u", ns->spec.kv_heads);
            kvctl_table_cell(&t, "%u", ns->spec.head_dim);
            kvctl_table_cell(&t, "%u", ns->spec.block_tokens);
            kvctl_table_cell(&t, "%s", kvs_dtype_name(ns->spec.dtype));
            kvctl_table_cell(&t, "%s/%s", ns->spec.key_codec, ns->spec.value_codec);
            kvctl_table_cell(&t, "%llu", (unsigned long long)ns->blocks);
            kvctl_table_cell(&t, "%s", kvctl_fmt_bytes(ns->stored_bytes, b, sizeof b));
            kvctl_table_cell(&t, "%s", kvctl_fmt_bytes(ns->block_bytes, b, sizeof b));
        }
        kvctl_table_print(&t, stdout);
        kvctl_table_free(&t);
    }
    free(all);
    return KVCTL_OK;
}

const kvctl_cmd kvctl_cmd_ns_list = {
    .name = "ns list",
    .args = "",
    .summary = "list namespaces with their layout and usage",
    .help = "Columns: name, id, layers, KV heads, head dim, tokens per block, dtype,\n"
            "key/value codecs, blocks held, encoded bytes held, raw bytes of a full block.\n",
    .run = ns_list,
};

/* ------------------------------------------------------------------ ns drop */

static int ns_drop(const kvctl_cmd *cmd, const kvctl_globals *g, int argc, char **argv)
{
    if (kvctl_no_options(cmd, argc, argv) != KVCTL_OK)
        return KVCTL_USAGE;
    if (argc - optind != 1)
        return kvctl_usage(cmd, "expected one NAME, got %d arguments", argc - optind);
    kvs_client *cl;
    if (kvctl_connect(cmd, g, &cl) != KVCTL_OK)
        return KVCTL_FAIL;
    uint64_t dropped = 0;
    kvs_err err;
    int rc = kvs_client_ns_drop(cl, argv[optind], &dropped, &err);
    kvs_client_close(cl);
    if (rc != 0)
        return kvctl_fail(cmd, &err);
    if (g->json) {
        kvctl_json j;
        kvctl_json_begin(&j, stdout, '{');
        kvctl_json_str(&j, "name", argv[optind]);
        kvctl_json_u64(&j, "blocks_dropped", dropped);
        kvctl_json_close(&j, '}');
    } else {
        printf("dropped namespace %s (%llu blocks)\n", argv[optind], (unsigned long long)dropped);
    }
    return KVCTL_OK;
}

const kvctl_cmd kvctl_cmd_ns_drop = {
    .name = "ns drop",
    .args = "NAME",
    .summary = "drop a namespace and every block in it",
    .help = "Prints how many blocks were dropped.\n",
    .run = ns_drop,
};
