/* kvctl put | get | lookup | exists | delete | key: the data path, for debugging and
 * tests. Blocks move between files and the daemon unchanged (raw layout
 * [L][2][t][H][D]); keys are "hex:..." bytes or literal strings (kvctl_parse_key).
 * Single-threaded.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gpu/base/mem.h"
#include "kvctl.h"

/* Reads a whole file ("-" = stdin) into a new buffer (free()). */
static int read_file(const kvctl_cmd *cmd, const char *path, uint8_t **out, size_t *len)
{
    FILE *f = strcmp(path, "-") == 0 ? stdin : fopen(path, "rb");
    if (!f)
        return kvctl_failf(cmd, "%s: %s", path, strerror(errno));
    size_t cap = 1 << 20, n = 0;
    uint8_t *buf = kvs_trymalloc(cap);
    while (buf) {
        n += fread(buf + n, 1, cap - n, f);
        if (n < cap)
            break;
        uint8_t *bigger = cap <= SIZE_MAX / 2 ? realloc(buf, cap * 2) : NULL;
        if (!bigger) {
            free(buf);
            buf = NULL;
            break;
        }
        buf = bigger;
        cap *= 2;
    }
    int failed = ferror(f);
    if (f != stdin && fclose(f) != 0)
        failed = 1;
    if (!buf)
        return kvctl_failf(cmd, "%s: out of memory", path);
    if (failed) {
        free(buf);
        return kvctl_failf(cmd, "%s: read error", path);
    }
    *out = buf;
    *len = n;
    return KVCTL_OK;
}

/* Tokens of a payload of len bytes in namespace ns, or a usage error naming the sizes. */
static int derive_tokens(const kvctl_cmd *cmd, const kvs_ns_info *ns, const char *path, size_t len,
                         uint32_t *tokens)
{
    uint64_t per = kvctl_token_bytes(&ns->spec);
    if (per == 0 || len % per != 0 || len / per == 0 || len / per > ns->spec.block_tokens)
        return kvctl_usage(cmd,
                           "%s: %zu bytes is not a block of '%s' (L*2*t*H*D*2 = %llu*t bytes "
                           "for t in 1..%u); give --tokens to send it anyway",
                           path, len, ns->spec.name, (unsigned long long)per,
                           ns->spec.block_tokens);
    *tokens = (uint32_t)(len / per);
    return KVCTL_OK;
}

static int put(const kvctl_cmd *cmd, const kvctl_globals *g, int argc, char **argv)
{
    static const struct option opts[] = {{"tokens", required_argument, NULL, 't'},
                                         {"dtype", required_argument, NULL, 'd'},
                                         {0, 0, 0, 0}};
    uint64_t tokens = 0;
    kvs_dtype dtype = KVS_DTYPE_UNSPECIFIED;
    int c;
    while ((c = kvctl_getopt(cmd, argc, argv, opts)) != -1) {
        if (c == '?')
            return KVCTL_USAGE;
        if (c == 't' && !kvctl_parse_u64(optarg, 1, UINT32_MAX, &tokens))
            return kvctl_usage(cmd, "--tokens: '%s' is not a positive integer", optarg);
        if (c == 'd' && (dtype = kvs_dtype_parse(optarg)) == KVS_DTYPE_UNSPECIFIED)
            return kvctl_usage(cmd, "--dtype: '%s' is not fp16 or bf16", optarg);
    }
    if (argc - optind != 3)
        return kvctl_usage(cmd, "expected NS KEY FILE, got %d arguments", argc - optind);
    const char *ns = argv[optind], *key_arg = argv[optind + 1], *path = argv[optind + 2];
    kvs_key key;
    char why[160];
    if (!kvctl_parse_key(key_arg, &key, why, sizeof why))
        return kvctl_usage(cmd, "%s", why);
    uint8_t *data = NULL;
    size_t len = 0;
    if (read_file(cmd, path, &data, &len) != KVCTL_OK)
        return KVCTL_FAIL;

    kvs_client *cl = NULL;
    int rc = kvctl_connect(cmd, g, &cl);
    kvs_err err;
    if (rc == KVCTL_OK && (tokens == 0 || dtype == KVS_DTYPE_UNSPECIFIED)) {
        /* The layout comes from the namespace (ListNamespaces, an admin call). */
        kvs_ns_info info;
        uint32_t t = (uint32_t)tokens;
        if (kvs_client_ns_get(cl, ns, &info, &err) != 0) {
            rc = kvctl_fail(cmd, &err);
        } else {
            if (tokens == 0)
                rc = derive_tokens(cmd, &info, path, len, &t);
            tokens = t;
            if (dtype == KVS_DTYPE_UNSPECIFIED)
                dtype = info.spec.dtype;
        }
    }
    kvs_put_result res;
    if (rc == KVCTL_OK && kvs_client_put(cl, ns, key.bytes, key.len, (uint32_t)tokens, dtype, data,
                                         len, &res, &err) != 0)
        rc = kvctl_fail(cmd, &err);
    kvs_client_close(cl);
    free(data);
    if (rc != KVCTL_OK)
        return rc;
    if (g->json) {
        kvctl_json j;
        kvctl_json_begin(&j, stdout, '{');
        kvctl_json_str(&j, "namespace", ns);
        kvctl_json_str(&j, "key", key_arg);
        kvctl_json_u64(&j, "tokens", tokens);
        kvctl_json_str(&j, "tier", kvs_tier_name(res.tier));
        kvctl_json_u64(&j, "raw_bytes", res.raw_bytes);
        kvctl_json_u64(&j, "encoded_bytes", res.encoded_bytes);
        kvctl_json_bool(&j, "replaced", res.replaced);
        kvctl_json_bool(&j, "fallback", res.fallback);
        kvctl_json_close(&j, '}');
    } else {
        char r[32], e[32];
        printf("put %s %s: %llu tokens, %s -> %s tier, %s stored%s%s\n", ns, key_arg,
               (unsigned long long)tokens, kvctl_fmt_bytes(res.raw_bytes, r, sizeof r),
               kvs_tier_name(res.tier), kvctl_fmt_bytes(res.encoded_bytes, e, sizeof e),
               res.fallback ? " with the fallback codec (max_rel_error)" : "",
               res.replaced ? " (replaced an older block)" : "");
    }
    return KVCTL_OK;
}

const kvctl_cmd kvctl_cmd_put = {
    .name = "put",
    .args = "NS KEY FILE [--tokens T] [--dtype fp16|bf16]",
    .summary = "store FILE (a raw block) under KEY",
    .help = "FILE ('-' = stdin) holds one block in the namespace's raw layout [L][2][t][H][D].\n"
            "Without --tokens, t is derived from the file size and the namespace's layout;\n"
            "without --dtype, the namespace's dtype is used. Both look the namespace up\n"
            "with ListNamespaces (an admin call).\n"
            "KEY: 'hex:0a1b...' for raw bytes, anything else is the literal string.\n",
    .run = put,
};

/* ------------------------------------------------------------------ get */

typedef struct sink {
    FILE *f;
    int error; /* errno of a failed write */
} sink;

static int write_layer(void *ctx, const kvs_get_result *hdr, uint32_t layer, uint64_t offset,
                       const void *data, size_t len)
{
    sink *s = ctx;
    if (fwrite(data, 1, len, s->f) != len) {
        s->error = errno ? errno : EIO;
        return KVS_EIO;
    }
    return 0;
}

/* "A:B" (B exclusive) or "A:" (to the end) into [*begin, *end); *end = 0 means all. */
static bool parse_layers(const char *s, uint32_t *begin, uint32_t *end)
{
    const char *colon = strchr(s, ':');
    if (!colon || colon == s)
        return false;
    char a[16];
    size_t n = (size_t)(colon - s);
    if (n >= sizeof a)
        return false;
    memcpy(a, s, n);
    a[n] = '\0';
    uint64_t b = 0, e = 0;
    if (!kvctl_parse_u64(a, 0, KVS_MAX_LAYERS, &b))
        return false;
    if (colon[1] && !kvctl_parse_u64(colon + 1, b + 1, KVS_MAX_LAYERS, &e))
        return false;
    *begin = (uint32_t)b;
    *end = (uint32_t)e;
    return true;
}

/* get --local: the block travels encoded and is decoded by libkvstash on this CPU. */
static int get_local(const kvctl_cmd *cmd, kvs_client *cl, const char *ns, const kvs_key *key,
                     sink *s, kvs_get_result *res)
{
    kvs_err err;
    kvs_ns_info info;
    uint64_t cap;
    if (kvs_client_ns_get(cl, ns, &info, &err) != 0)
        return kvctl_fail(cmd, &err);
    if (kvs_spec_block_bytes(&info.spec, info.spec.block_tokens, &cap, &err) != 0)
        return kvctl_fail(cmd, &err);
    void *buf = malloc(cap);
    if (!buf)
        return kvctl_failf(cmd, "out of memory for %llu bytes", (unsigned long long)cap);
    int rc = KVCTL_OK;
    if (kvs_client_get_local(cl, ns, key->bytes, key->len, buf, cap, res, &err) != 0)
        rc = kvctl_fail(cmd, &err);
    else if (fwrite(buf, 1, res->bytes, s->f) != res->bytes)
        rc = kvctl_failf(cmd, "write: %s", strerror(errno));
    free(buf);
    return rc;
}

static int get(const kvctl_cmd *cmd, const kvctl_globals *g, int argc, char **argv)
{
    static const struct option opts[] = {{"layers", required_argument, NULL, 'l'},
                                         {"encoded", no_argument, NULL, 'e'},
                                         {"local", no_argument, NULL, 'L'},
                                         {0, 0, 0, 0}};
    kvs_get_opts go = {.format = KVS_FORMAT_RAW};
    bool local = false;
    int c;
    while ((c = kvctl_getopt(cmd, argc, argv, opts)) != -1) {
        if (c == '?')
            return KVCTL_USAGE;
        if (c == 'l' && !parse_layers(optarg, &go.layer_begin, &go.layer_end))
            return kvctl_usage(cmd, "--layers: '%s' is not A:B (B > A) or A:", optarg);
        if (c == 'e')
            go.format = KVS_FORMAT_ENCODED;
        if (c == 'L')
            local = true;
    }
    if (local && (go.format == KVS_FORMAT_ENCODED || go.layer_end))
        return kvctl_usage(cmd, "--local fetches the whole block encoded and decodes it here: "
                                "it excludes --encoded and --layers");
    if (argc - optind != 3)
        return kvctl_usage(cmd, "expected NS KEY FILE, got %d arguments", argc - optind);
    const char *ns = argv[optind], *key_arg = argv[optind + 1], *path = argv[optind + 2];
    kvs_key key;
    char why[160];
    if (!kvctl_parse_key(key_arg, &key, why, sizeof why))
        return kvctl_usage(cmd, "%s", why);
    bool to_stdout = strcmp(path, "-") == 0;

    kvs_client *cl;
    if (kvctl_connect(cmd, g, &cl) != KVCTL_OK)
        return KVCTL_FAIL;
    sink s = {.f = to_stdout ? stdout : fopen(path, "wb")};
    if (!s.f) {
        kvs_client_close(cl);
        return kvctl_failf(cmd, "%s: %s", path, strerror(errno));
    }
    kvs_get_result res;
    kvs_err err;
    int rc = KVCTL_OK;
    if (local) {
        rc = get_local(cmd, cl, ns, &key, &s, &res);
    } else if (kvs_client_get_layers(cl, ns, key.bytes, key.len, &go, write_layer, &s, &res,
                                     &err) != 0) {
        rc = s.error ? kvctl_failf(cmd, "%s: %s", path, strerror(s.error)) : kvctl_fail(cmd, &err);
    }
    kvs_client_close(cl);
    if ((to_stdout ? fflush(s.f) : fclose(s.f)) != 0 && rc == KVCTL_OK)
        rc = kvctl_failf(cmd, "%s: %s", path, strerror(errno));
    if (rc != KVCTL_OK) {
        /* Leave no partial block behind for a later put to pick up. */
        if (!to_stdout && unlink(path) != 0 && errno != ENOENT)
            fprintf(stderr, "kvctl: get: cannot remove %s: %s\n", path, strerror(errno));
        return rc;
    }
    if (g->json) {
        kvctl_json j;
        kvctl_json_begin(&j, to_stdout ? stderr : stdout, '{');
        kvctl_json_str(&j, "namespace", ns);
        kvctl_json_str(&j, "key", key_arg);
        kvctl_json_u64(&j, "tokens", res.tokens);
        kvctl_json_str(&j, "dtype", kvs_dtype_name(res.dtype));
        kvctl_json_u64(&j, "layer_begin", res.layer_begin);
        kvctl_json_u64(&j, "layer_end", res.layer_end);
        kvctl_json_u64(&j, "bytes", res.bytes);
        kvctl_json_str(&j, "format", res.format == KVS_FORMAT_ENCODED ? "encoded" : "raw");
        kvctl_json_str(&j, "tier", kvs_tier_name(res.tier));
        kvctl_json_bool(&j, "fallback", res.fallback);
        if (res.key_codec[0]) {
            kvctl_json_str(&j, "key_codec", res.key_codec);
            kvctl_json_str(&j, "value_codec", res.value_codec);
        }
        kvctl_json_close(&j, '}');
    } else {
        char b[32];
        fprintf(stderr, "get %s %s: %u tokens %s, layers %u:%u, %s %s from %s tier%s\n", ns,
                key_arg, res.tokens, kvs_dtype_name(res.dtype), res.layer_begin, res.layer_end,
                kvctl_fmt_bytes(res.bytes, b, sizeof b),
                res.format == KVS_FORMAT_ENCODED ? "encoded" : "raw", kvs_tier_name(res.tier),
                res.fallback ? ", stored with the fallback codec" : "");
    }
    return KVCTL_OK;
}

const kvctl_cmd kvctl_cmd_get = {
    .name = "get",
    .args = "NS KEY FILE [--layers A:B] [--encoded | --local]",
    .summary = "fetch a block into FILE ('-' = stdout)",
    .help = "Writes the block, decoded, in the raw layout [L][2][t][H][D], and prints a\n"
            "summary (tokens, bytes, tier) to stderr (--json: to stdout unless FILE is '-').\n"
            "On failure FILE is removed.\n"
            "\n"
            "  --layers A:B   only layers A (inclusive) to B (exclusive); 'A:' to the end\n"
            "  --encoded      the encoded block bytes instead of the decoded payload\n"
            "  --local        fetch the block encoded (fewer wire bytes) and decode it here\n",
    .run = get,
};

/* ------------------------------------------------------------------ key batches */

/* Parses "NS KEY..." for lookup, exists and delete. */
static int ns_and_keys(const kvctl_cmd *cmd, int argc, char **argv, kvs_key **keys, size_t *n)
{
    if (kvctl_no_options(cmd, argc, argv) != KVCTL_OK)
        return KVCTL_USAGE;
    if (argc - optind < 2)
        return kvctl_usage(cmd, "expected NS and at least one KEY");
    *n = (size_t)(argc - optind - 1);
    return kvctl_parse_keys(cmd, argc - optind - 1, argv + optind + 1, keys);
}

/* Prints a two-column table: KEY (the keys as given) and `head`, cell(vals, i) per key. */
static void key_table(const char *head, char **names, size_t n,
                      const char *(*cell)(const void *vals, size_t i), const void *vals)
{
    kvctl_table t;
    kvctl_table_init(&t, 2, "KEY", head);
    for (size_t i = 0; i < n; i++) {
        kvctl_table_cell(&t, "%s", names[i]);
        kvctl_table_cell(&t, "%s", cell(vals, i));
    }
    kvctl_table_print(&t, stdout);
    kvctl_table_free(&t);
}

/* A key's tier, and "(fallback)" for a block stored with its namespace's fallback codec,
 * else the codecs of its keys and values where the daemon names them (a namespace with a
 * bound or tier codecs: README "Namespace options"). */
typedef struct where {
    kvs_tier *tiers;
    bool *fallback;
    kvs_block_codecs *codecs;
    char cell[96];
} where;

static const char *where_cell(const void *w, size_t i)
{
    where *x = (where *)(uintptr_t)w; /* its own scratch cell */
    const kvs_block_codecs *c = &x->codecs[i];
    if (x->fallback[i] || !c->key_codec[0])
        snprintf(x->cell, sizeof x->cell, "%s%s", kvs_tier_name(x->tiers[i]),
                 x->fallback[i] ? " (fallback)" : "");
    else
        snprintf(x->cell, sizeof x->cell, "%s (%s/%s)", kvs_tier_name(x->tiers[i]), c->key_codec,
                 c->value_codec);
    return x->cell;
}

static const char *present_cell(const void *present, size_t i)
{
    return ((const bool *)present)[i] ? "yes" : "no";
}

static int lookup(const kvctl_cmd *cmd, const kvctl_globals *g, int argc, char **argv)
{
    kvs_key *keys;
    size_t n;
    int rc = ns_and_keys(cmd, argc, argv, &keys, &n);
    if (rc != KVCTL_OK)
        return rc;
    char **names = argv + optind + 1;
    kvs_tier *tiers = kvs_xcalloc(n, sizeof *tiers);
    bool *fallback = kvs_xcalloc(n, sizeof *fallback);
    kvs_block_codecs *codecs = kvs_xcalloc(n, sizeof *codecs);
    uint32_t prefix = 0;
    kvs_client *cl;
    kvs_err err;
    rc = kvctl_connect(cmd, g, &cl);
    if (rc == KVCTL_OK) {
        if (kvs_client_lookup_codecs(cl, argv[optind], keys, n, &prefix, tiers, fallback, codecs,
                                     &err) != 0)
            rc = kvctl_fail(cmd, &err);
        kvs_client_close(cl);
    }
    if (rc == KVCTL_OK && g->json) {
        kvctl_json j;
        kvctl_json_begin(&j, stdout, '{');
        kvctl_json_u64(&j, "prefix", prefix);
        kvctl_json_open(&j, "keys", '[');
        for (size_t i = 0; i < n; i++) {
            kvctl_json_open(&j, NULL, '{');
            kvctl_json_str(&j, "key", names[i]);
            kvctl_json_str(&j, "tier", kvs_tier_name(tiers[i]));
            kvctl_json_bool(&j, "fallback", fallback[i]);
            if (codecs[i].key_codec[0]) {
                kvctl_json_str(&j, "key_codec", codecs[i].key_codec);
                kvctl_json_str(&j, "value_codec", codecs[i].value_codec);
            }
            kvctl_json_close(&j, '}');
        }
        kvctl_json_close(&j, ']');
        kvctl_json_close(&j, '}');
    } else if (rc == KVCTL_OK) {
        printf("prefix %u of %zu blocks\n", prefix, n);
        where w = {.tiers = tiers, .fallback = fallback, .codecs = codecs};
        key_table("TIER", names, n, where_cell, &w);
    }
    free(tiers);
    free(fallback);
    free(codecs);
    free(keys);
    return rc;
}

const kvctl_cmd kvctl_cmd_lookup = {
    .name = "lookup",
    .args = "NS KEY...",
    .summary = "how many leading keys are stored, and each key's tier",
    .help = "Give a sequence's chained block keys in order (see 'kvctl key'): the prefix is\n"
            "the number of leading blocks a worker can reuse. A block stored with its\n"
            "namespace's fallback codec (its error passed max_rel_error) says (fallback);\n"
            "in a namespace with a bound or a host or disk codec, the others say the codecs\n"
            "of their keys and values (KEY/VALUE), colder ones once a block moved down.\n",
    .run = lookup,
};

static int exists(const kvctl_cmd *cmd, const kvctl_globals *g, int argc, char **argv)
{
    kvs_key *keys;
    size_t n;
    int rc = ns_and_keys(cmd, argc, argv, &keys, &n);
    if (rc != KVCTL_OK)
        return rc;
    char **names = argv + optind + 1;
    bool *present = kvs_xcalloc(n, sizeof *present);
    kvs_client *cl;
    kvs_err err;
    rc = kvctl_connect(cmd, g, &cl);
    if (rc == KVCTL_OK) {
        if (kvs_client_exists(cl, argv[optind], keys, n, present, &err) != 0)
            rc = kvctl_fail(cmd, &err);
        kvs_client_close(cl);
    }
    if (rc == KVCTL_OK && g->json) {
        kvctl_json j;
        kvctl_json_begin(&j, stdout, '{');
        for (size_t i = 0; i < n; i++)
            kvctl_json_bool(&j, names[i], present[i]);
        kvctl_json_close(&j, '}');
    } else if (rc == KVCTL_OK) {
        key_table("PRESENT", names, n, present_cell, present);
    }
    free(present);
    free(keys);
    return rc;
}

const kvctl_cmd kvctl_cmd_exists = {
    .name = "exists",
    .args = "NS KEY...",
    .summary = "whether each key is stored",
    .help = "Prints yes or no per key (--json: an object of key -> true/false).\n",
    .run = exists,
};

static int delete_keys(const kvctl_cmd *cmd, const kvctl_globals *g, int argc, char **argv)
{
    kvs_key *keys;
    size_t n;
    int rc = ns_and_keys(cmd, argc, argv, &keys, &n);
    if (rc != KVCTL_OK)
        return rc;
    uint32_t deleted = 0;
    kvs_client *cl;
    kvs_err err;
    rc = kvctl_connect(cmd, g, &cl);
    if (rc == KVCTL_OK) {
        if (kvs_client_delete(cl, argv[optind], keys, n, &deleted, &err) != 0)
            rc = kvctl_fail(cmd, &err);
        kvs_client_close(cl);
    }
    free(keys);
    if (rc != KVCTL_OK)
        return rc;
    if (g->json)
        printf("{\"deleted\":%u,\"requested\":%zu}\n", deleted, n);
    else
        printf("deleted %u of %zu keys\n", deleted, n);
    return KVCTL_OK;
}

const kvctl_cmd kvctl_cmd_delete = {
    .name = "delete",
    .args = "NS KEY...",
    .summary = "delete blocks",
    .help = "Deletes the keys that exist and prints how many there were.\n",
    .run = delete_keys,
};

/* ------------------------------------------------------------------ key */

static int key_chain(const kvctl_cmd *cmd, const kvctl_globals *g, int argc, char **argv)
{
    static const struct option opts[] = {{"block-tokens", required_argument, NULL, 'T'},
                                         {0, 0, 0, 0}};
    uint64_t block_tokens = 0;
    int c;
    while ((c = kvctl_getopt(cmd, argc, argv, opts)) != -1) {
        if (c == '?')
            return KVCTL_USAGE;
        if (c == 'T' && !kvctl_parse_u64(optarg, 1, KVS_MAX_BLOCK_TOKENS, &block_tokens))
            return kvctl_usage(cmd, "--block-tokens: '%s' is not in 1..%d", optarg,
                               KVS_MAX_BLOCK_TOKENS);
    }
    if (block_tokens == 0)
        return kvctl_usage(cmd, "--block-tokens is required");
    size_t n = (size_t)(argc - optind);
    if (n == 0)
        return kvctl_usage(cmd, "expected at least one TOKEN");
    uint32_t *tokens = kvs_xcalloc(n, sizeof *tokens);
    for (size_t i = 0; i < n; i++) {
        uint64_t v;
        if (!kvctl_parse_u64(argv[optind + (int)i], 0, UINT32_MAX, &v)) {
            free(tokens);
            return kvctl_usage(cmd, "TOKEN '%s' is not an integer in 0..4294967295",
                               argv[optind + (int)i]);
        }
        tokens[i] = (uint32_t)v;
    }
    size_t nkeys = kvs_key_chain_seq(tokens, n, (uint32_t)block_tokens, NULL, 0);
    kvs_key *keys = kvs_xcalloc(nkeys, sizeof *keys);
    nkeys = kvs_key_chain_seq(tokens, n, (uint32_t)block_tokens, keys, nkeys);
    kvctl_json j;
    kvctl_json_init(&j, stdout);
    if (g->json)
        kvctl_json_open(&j, NULL, '[');
    for (size_t i = 0; i < nkeys; i++) {
        char hex[2 * KVS_KEY_MAX + 1];
        kvctl_fmt_hex(keys[i].bytes, keys[i].len, hex, sizeof hex);
        if (g->json)
            kvctl_json_str(&j, NULL, hex);
        else
            printf("%s\n", hex);
    }
    if (g->json)
        kvctl_json_close(&j, ']');
    free(keys);
    free(tokens);
    return KVCTL_OK;
}

const kvctl_cmd kvctl_cmd_key = {
    .name = "key",
    .args = "--block-tokens T TOKEN...",
    .summary = "print the chained block keys of a token sequence",
    .help = "Cuts the token ids into blocks of T (the last may be partial) and prints each\n"
            "block's chained key (DESIGN section 1), one lowercase hex string per line: the\n"
            "keys to give put, get and lookup as hex:KEY. No daemon is contacted.\n",
    .run = key_chain,
};
