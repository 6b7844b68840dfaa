/* kvctl verify | flush | evict: the tiers' maintenance commands (KvAdmin Verify, Flush,
 * Evict; DESIGN §10). They may take long on a large store, so unless --timeout-ms is
 * given their calls get LONG_TIMEOUT_MS instead of the client's default. Single-threaded.
 */
#include <stdlib.h>
#include <string.h>

#include "kvctl.h"

#define LONG_TIMEOUT_MS (10 * 60 * 1000)

/* The global options, with the long default deadline unless --timeout-ms was given. */
static kvctl_globals long_globals(const kvctl_globals *g)
{
    kvctl_globals lg = *g;
    if (lg.timeout_ms == 0)
        lg.timeout_ms = LONG_TIMEOUT_MS;
    return lg;
}

/* kvctl_connect with the long default deadline. */
static int connect_long(const kvctl_cmd *cmd, const kvctl_globals *g, kvs_client **out)
{
    kvctl_globals lg = long_globals(g);
    return kvctl_connect(cmd, &lg, out);
}

/* kvctl_connect_no_args with the long default deadline. */
static int connect_no_args(const kvctl_cmd *cmd, const kvctl_globals *g, int argc, char **argv,
                           kvs_client **out)
{
    kvctl_globals lg = long_globals(g);
    return kvctl_connect_no_args(cmd, &lg, argc, argv, out);
}

/* ------------------------------------------------------------------ verify */

static int verify(const kvctl_cmd *cmd, const kvctl_globals *g, int argc, char **argv)
{
    kvs_client *cl;
    int st = connect_no_args(cmd, g, argc, argv, &cl);
    if (st != KVCTL_OK)
        return st;
    kvs_verify_result r;
    kvs_err err;
    int rc = kvs_client_verify(cl, &r, &err);
    kvs_client_close(cl);
    if (rc != 0)
        return kvctl_fail(cmd, &err);
    uint64_t checked = 0, bad = 0, skipped = 0;
    for (size_t i = 0; i < r.n_tiers; i++) {
        checked += r.tiers[i].checked;
        bad += r.tiers[i].bad;
        skipped += r.tiers[i].skipped;
    }
    if (g->json) {
        kvctl_json j;
        kvctl_json_begin(&j, stdout, '{');
        kvctl_json_u64(&j, "checked", checked);
        kvctl_json_u64(&j, "bad", bad);
        kvctl_json_u64(&j, "skipped", skipped);
        kvctl_json_open(&j, "tiers", '[');
        for (size_t i = 0; i < r.n_tiers; i++) {
            kvctl_json_open(&j, NULL, '{');
            kvctl_json_str(&j, "tier", kvs_tier_name(r.tiers[i].tier));
            kvctl_json_u64(&j, "checked", r.tiers[i].checked);
            kvctl_json_u64(&j, "bad", r.tiers[i].bad);
            kvctl_json_u64(&j, "skipped", r.tiers[i].skipped);
            kvctl_json_close(&j, '}');
        }
        kvctl_json_close(&j, ']');
        kvctl_json_close(&j, '}');
    } else {
        kvctl_table t;
        kvctl_table_init(&t, 4, "TIER", "CHECKED", "BAD", "SKIPPED");
        for (size_t i = 0; i < r.n_tiers; i++) {
            kvctl_table_cell(&t, "%s", kvs_tier_name(r.tiers[i].tier));
            kvctl_table_cell(&t, "%llu", (unsigned long long)r.tiers[i].checked);
            kvctl_table_cell(&t, "%llu", (unsigned long long)r.tiers[i].bad);
            kvctl_table_cell(&t, "%llu", (unsigned long long)r.tiers[i].skipped);
        }
        kvctl_table_print(&t, stdout);
        kvctl_table_free(&t);
        printf("%llu blocks checked, %llu bad (dropped)%s\n", (unsigned long long)checked,
               (unsigned long long)bad, skipped ? ", GPU blocks not checked" : "");
    }
    if (bad)
        return kvctl_failf(cmd, "%llu bad blocks found and dropped", (unsigned long long)bad);
    return KVCTL_OK;
}

const kvctl_cmd kvctl_cmd_verify = {
    .name = "verify",
    .args = "[--json]",
    .summary = "check the checksum of every stored block; bad ones are dropped",
    .help = "Host blocks are checked against the XXH3-64 kept with them, disk records are\n"
            "read whole (the encoded block's checksum over every byte). A block that fails is\n"
            "dropped (its disk record too) and counted, as a Get would drop it. GPU blocks\n"
            "carry no checksum while on the device: they are counted as skipped.\n"
            "Exit status 1 when bad blocks were found. Default deadline 10 minutes.\n",
    .run = verify,
};

/* ------------------------------------------------------------------ flush */

static int flush(const kvctl_cmd *cmd, const kvctl_globals *g, int argc, char **argv)
{
    kvs_client *cl;
    int st = connect_no_args(cmd, g, argc, argv, &cl);
    if (st != KVCTL_OK)
        return st;
    kvs_flush_result r;
    kvs_err err;
    int rc = kvs_client_flush(cl, &r, &err);
    kvs_client_close(cl);
    if (rc != 0)
        return kvctl_fail(cmd, &err);
    if (g->json) {
        kvctl_json j;
        kvctl_json_begin(&j, stdout, '{');
        kvctl_json_u64(&j, "written", r.written);
        kvctl_json_u64(&j, "failed", r.failed);
        kvctl_json_u64(&j, "already", r.already);
        kvctl_json_u64(&j, "gpu_skipped", r.gpu_skipped);
        kvctl_json_close(&j, '}');
    } else {
        printf("flushed: %llu host blocks written, %llu failed, %llu already on disk",
               (unsigned long long)r.written, (unsigned long long)r.failed,
               (unsigned long long)r.already);
        if (r.gpu_skipped)
            printf(", %llu GPU blocks not written", (unsigned long long)r.gpu_skipped);
        printf("\n");
    }
    if (r.failed)
        return kvctl_failf(cmd, "%llu host blocks could not be written (see the daemon's log)",
                           (unsigned long long)r.failed);
    return KVCTL_OK;
}

const kvctl_cmd kvctl_cmd_flush = {
    .name = "flush",
    .args = "[--json]",
    .summary = "write host blocks to the disk tier and wait until they are on disk",
    .help = "Every host block that has no disk record yet is written to the disk tier (it\n"
            "stays in the host tier too); returns once LMDB has committed and flushed them,\n"
            "so a restart (or a crash) finds them. Needs a daemon with --data-dir. GPU blocks\n"
            "are not written (evict them to disk first). Exit status 1 when some could not be\n"
            "written. Default deadline 10 minutes.\n",
    .run = flush,
};

/* ------------------------------------------------------------------ evict */

static int evict(const kvctl_cmd *cmd, const kvctl_globals *g, int argc, char **argv)
{
    static const struct option opts[] = {
        {"ns", required_argument, NULL, 'n'},
        {"to", required_argument, NULL, 't'},
        {"all", no_argument, NULL, 'a'},
        {0, 0, 0, 0},
    };
    const char *ns = NULL, *to_name = "disk";
    bool all = false;
    int c;
    while ((c = kvctl_getopt(cmd, argc, argv, opts)) != -1) {
        if (c == '?')
            return KVCTL_USAGE;
        if (c == 'n')
            ns = optarg;
        else if (c == 't')
            to_name = optarg;
        else if (c == 'a')
            all = true;
    }
    kvs_evict_to to;
    if (strcmp(to_name, "host") == 0)
        to = KVS_EVICT_HOST;
    else if (strcmp(to_name, "disk") == 0)
        to = KVS_EVICT_DISK;
    else if (strcmp(to_name, "none") == 0 || strcmp(to_name, "out") == 0)
        to = KVS_EVICT_OUT;
    else
        return kvctl_usage(cmd, "--to: '%s' is not host, disk or none", to_name);
    int nkeys = argc - optind;
    if (ns && all)
        return kvctl_usage(cmd, "--all evicts every namespace: give it without --ns");
    if (!ns && nkeys > 0)
        return kvctl_usage(cmd, "KEY given without --ns NS");
    if (!ns && !all)
        return kvctl_usage(cmd, "give --ns NS (and KEYs), or --all for every namespace");
    if (ns && strlen(ns) > KVS_NAME_MAX)
        return kvctl_usage(cmd, "--ns: longer than %d characters", KVS_NAME_MAX);
    kvs_key *keys = NULL;
    if (nkeys > 0 && kvctl_parse_keys(cmd, nkeys, argv + optind, &keys) != KVCTL_OK)
        return KVCTL_USAGE;

    kvs_client *cl;
    kvs_evict_result r;
    kvs_err err;
    int rc = connect_long(cmd, g, &cl);
    if (rc == KVCTL_OK) {
        if (kvs_client_evict(cl, ns, keys, (size_t)nkeys, to, &r, &err) != 0)
            rc = kvctl_fail(cmd, &err);
        kvs_client_close(cl);
    }
    free(keys);
    if (rc != KVCTL_OK)
        return rc;
    const char *target = to == KVS_EVICT_HOST ? "host" : to == KVS_EVICT_DISK ? "disk" : "none";
    if (g->json) {
        kvctl_json j;
        kvctl_json_begin(&j, stdout, '{');
        kvctl_json_str(&j, "to", target);
        kvctl_json_u64(&j, "moved", r.moved);
        kvctl_json_u64(&j, "dropped", r.dropped);
        kvctl_json_u64(&j, "unchanged", r.unchanged);
        kvctl_json_u64(&j, "busy", r.busy);
        kvctl_json_u64(&j, "failed", r.failed);
        kvctl_json_u64(&j, "absent", r.absent);
        kvctl_json_close(&j, '}');
    } else if (to == KVS_EVICT_OUT) {
        printf("evicted out of the store: %llu dropped, %llu absent\n",
               (unsigned long long)r.dropped, (unsigned long long)r.absent);
    } else {
        printf("evicted to %s: %llu moved, %llu already there or colder, %llu busy (skipped), "
               "%llu failed, %llu absent\n",
               target, (unsigned long long)r.moved, (unsigned long long)r.unchanged,
               (unsigned long long)r.busy, (unsigned long long)r.failed,
               (unsigned long long)r.absent);
    }
    if (r.failed)
        return kvctl_failf(cmd, "%llu blocks could not be written to disk and are lost",
                           (unsigned long long)r.failed);
    return KVCTL_OK;
}

const kvctl_cmd kvctl_cmd_evict = {
    .name = "evict",
    .args = "[--ns NS] [--to host|disk|none] [--all] [KEY...]",
    .summary = "move blocks down to the host or disk tier, or out of the store",
    .help = "Selects the given KEYs of namespace NS, every block of NS (no KEY), or every\n"
            "block of every namespace (--all, without --ns), and moves them down:\n"
            "\n"
            "  --to host   GPU blocks to the host tier\n"
            "  --to disk   GPU and host blocks to the disk tier (default; needs --data-dir)\n"
            "  --to none   out of the store, disk records included\n"
            "\n"
            "Blocks never move up; blocks being read or written are skipped and counted as\n"
            "busy. Returns once done (disk writes committed). Exit status 1 when blocks could\n"
            "not be written to disk. Default deadline 10 minutes.\n",
    .run = evict,
};
