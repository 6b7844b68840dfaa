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

/* ------------------------------------------------------------------ progress
 * Verify and Flush are one call each, answered at the end; their progress bar (progress.h)
 * is drawn from the daemon's AdminProgress counters, read with Stats on the same client
 * (thread-safe) every 100 ms while the call runs: how much they grew since just before it. A
 * daemon without them (all 0) gets a spinner and the count at the end. */

typedef struct admin_call {
    kvs_client *cl;
    bool flush;              /* else verify */
    bool based;              /* base was read */
    kvs_admin_progress base; /* the counters just before the call */
    kvs_verify_result vr;
    kvs_flush_result fr;
    kvs_err err;
} admin_call;

static bool read_progress(kvs_client *cl, kvs_admin_progress *out)
{
    kvs_stats *s;
    if (kvs_client_stats(cl, &s, NULL) != 0)
        return false; /* the bar stands still; the call itself says what is wrong */
    *out = s->admin;
    kvs_stats_free(s);
    return true;
}

/* kvctl_progress_during's poll, on its helper thread: reads only the client and base. */
static void poll_admin(void *arg, uint64_t *done, uint64_t *total)
{
    admin_call *a = arg;
    kvs_admin_progress now;
    if (!a->based || !read_progress(a->cl, &now))
        return;
    *done = a->flush ? now.flush_done - a->base.flush_done
                     : now.verify_checked - a->base.verify_checked;
    *total = a->flush ? now.flush_queued - a->base.flush_queued
                      : now.verify_planned - a->base.verify_planned;
}

static int run_admin(void *arg)
{
    admin_call *a = arg;
    return a->flush ? kvs_client_flush(a->cl, &a->fr, &a->err)
                    : kvs_client_verify(a->cl, &a->vr, &a->err);
}

/* Runs the call (a->cl, a->flush set) with its bar when g asks for one; returns its rc. */
static int admin_with_progress(const kvctl_globals *g, admin_call *a)
{
    kvctl_progress p;
    kvctl_progress_start(&p, stderr, kvctl_progress_wanted(g->progress, stderr),
                         a->flush ? "flush" : "verify", "blocks", 0);
    if (p.on)
        a->based = read_progress(a->cl, &a->base);
    int rc = kvctl_progress_during(&p, run_admin, poll_admin, a);
    if (rc != 0) {
        kvctl_progress_stop(&p);
        return rc;
    }
    uint64_t n = 0;
    if (a->flush) {
        n = a->fr.written + a->fr.failed;
    } else {
        for (size_t i = 0; i < a->vr.n_tiers; i++)
            n += a->vr.tiers[i].checked;
    }
    kvctl_progress_finish(&p, n, n);
    return 0;
}

/* ------------------------------------------------------------------ verify */

static int verify(const kvctl_cmd *cmd, const kvctl_globals *g, int argc, char **argv)
{
    admin_call a = {.flush = false};
    int st = connect_no_args(cmd, g, argc, argv, &a.cl);
    if (st != KVCTL_OK)
        return st;
    int rc = admin_with_progress(g, &a);
    kvs_client_close(a.cl);
    if (rc != 0)
        return kvctl_fail(cmd, &a.err);
    const kvs_verify_result r = a.vr;
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
    .args = "[--json] [--progress | --no-progress]",
    .summary = "check the checksum of every stored block; bad ones are dropped",
    .help = "Host blocks are checked against the XXH3-64 kept with them, disk records are\n"
            "read whole (the encoded block's checksum over every byte). A block that fails is\n"
            "dropped (its disk record too) and counted, as a Get would drop it. GPU blocks\n"
            "carry no checksum while on the device: they are counted as skipped.\n"
            "Exit status 1 when bad blocks were found. Default deadline 10 minutes.\n"
            "\n"
            "  --progress      a progress bar on stderr (blocks checked of those the daemon\n"
            "                  planned, rate, ETA) even when stderr is not a terminal\n"
            "  --no-progress   none, even on a terminal (default: on a terminal only)\n",
    .run = verify,
};

/* ------------------------------------------------------------------ flush */

static int flush(const kvctl_cmd *cmd, const kvctl_globals *g, int argc, char **argv)
{
    admin_call a = {.flush = true};
    int st = connect_no_args(cmd, g, argc, argv, &a.cl);
    if (st != KVCTL_OK)
        return st;
    int rc = admin_with_progress(g, &a);
    kvs_client_close(a.cl);
    if (rc != 0)
        return kvctl_fail(cmd, &a.err);
    const kvs_flush_result r = a.fr;
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
    .args = "[--json] [--progress | --no-progress]",
    .summary = "write host blocks to the disk tier and wait until they are on disk",
    .help = "Every host block that has no disk record yet is written to the disk tier (it\n"
            "stays in the host tier too); returns once LMDB has committed and flushed them,\n"
            "so a restart (or a crash) finds them. Needs a daemon with --data-dir. GPU blocks\n"
            "are not written (evict them to disk first). Exit status 1 when some could not be\n"
            "written. Default deadline 10 minutes.\n"
            "\n"
            "  --progress      a progress bar on stderr (blocks written of those queued,\n"
            "                  rate, ETA) even when stderr is not a terminal\n"
            "  --no-progress   none, even on a terminal (default: on a terminal only)\n",
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
