/* kvstashd: start order, the libuv main loop, and shutdown order. This file holds the
 * daemon's only process-global state (the `daemon` struct below, reached through the
 * loop's data pointer).
 *
 * Start: parse the config (defaults < --config file < env tokens < flags; daemon/config.h)
 * -> read the token files (daemon/tokens.h) -> grpc_init -> loop (signals, stats timer) -> codec
 * work mailbox (daemon/work.h) -> KV events (--events-listen: bind, publisher thread) -> store
 * (its event sink armed) -> server (bind, arm, CQ threads) -> port file -> run. Stop
 * (SIGTERM/SIGINT): drain (new calls get UNAVAILABLE) -> poll until in-flight calls finish or
 * --drain-timeout passes -> close loop handles (queued codec work still finishes) -> server
 * shutdown -> work mailbox -> store -> KV events (what is queued is sent) -> grpc_shutdown ->
 * exit 0. A second signal during the drain
 * skips the wait. SIGHUP: re-read the config file and the token files and apply what may
 * change live (on_sighup).
 *
 * Operators (README "Observability"): with --metrics-listen, an HTTP endpoint
 * (daemon/metrics.h) starts once the gRPC server is up and is ready (/readyz 200) from then
 * until the drain; it stops after the loop, before the server. Under systemd
 * (NOTIFY_SOCKET set; sd_notify is a no-op otherwise) the daemon says READY=1 once its
 * listeners are up, STOPPING=1 when it starts draining, and WATCHDOG=1 from a loop timer
 * at half the unit's WatchdogSec (WATCHDOG_USEC), so a wedged loop is restarted.
 *
 * Threads: the loop runs on the main thread; gRPC's completion-queue threads run every
 * call (daemon/server.c) and touch libuv only through the work mailbox; CPU codec work runs
 * on libuv's thread pool (--codec-threads).
 */
#include <grpc/grpc.h>
#include <malloc.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>
#include <uv.h>

#include "daemon/auth.h"
#include "daemon/tokens.h"
#include "daemon/call.h"
#include "daemon/config.h"
#include "daemon/events.h"
#include "daemon/limits.h"
#include "daemon/log.h"
#include "daemon/metrics.h"
#include "daemon/region.h"
#include "daemon/tls.h"
#include "daemon/server.h"
#include "daemon/work.h"
#include "gpu/engine/engine.h"
#include "storage/store.h"
#include "storage/xfer.h"

#define DRAIN_POLL_MS 50

typedef struct daemon_state {
    kvs_config cfg;
    kvs_store *store;
    kvs_disk *disk; /* disk tier (--data-dir), closed after the store */
    kvs_work *work;
    /* The GPU engines, one per device of --gpu (engine[g] runs the store's gpu tier g), the
     * leading non-NULL entries; none: CPU codecs. */
    kvs_engine *engine[KVS_STORE_GPUS_MAX];
    unsigned engines;
    kvs_tiering *tiering;
    kvs_hostpool *host_pool;            /* pinned memory of host blocks (with an engine), or NULL */
    void *gpu_tier[KVS_STORE_GPUS_MAX]; /* device region of each GPU tier (owned by its engine) */
    uint64_t gpu_bytes;                 /* their sizes together, 0 without a GPU tier */
    kvs_server *server;
    kvs_tls *tls; /* the listener's certificate (its fetcher reads it): until grpc_shutdown */
    kvs_regions *regions; /* the region socket (--region-socket), or NULL */
    kvs_metrics *metrics; /* the HTTP endpoint (--metrics-listen), or NULL */
    kvs_events *events;   /* KV events for routers (--events-listen), or NULL; after the store */
    uv_loop_t loop;
    uv_signal_t sigterm, sigint, sighup;
    uv_timer_t stats_timer, drain_timer, sweep_timer, watchdog_timer;
    unsigned sweeps;
    uint64_t drain_deadline_ms;
    int signals_seen;
    int argc; /* the command line, parsed again at each reload (flags win over the file) */
    char **argv;
} daemon_state;

/* The region socket (daemon/region.h), after the engine: regions are pinned for it. */
static int start_regions(daemon_state *d, kvs_err *err)
{
    char path[sizeof d->cfg.region_socket];
    if (!kvs_config_region_socket(&d->cfg, path, sizeof path)[0])
        return 0;
    kvs_regions_opts o = {.path = path,
                          .mode = 0660, /* as the gRPC Unix socket: the daemon's group */
                          .max_bytes = d->cfg.region_max_bytes,
                          .max_count = d->cfg.region_max_count,
                          .max_per_client = d->cfg.region_max_per_client
                                                ? d->cfg.region_max_per_client
                                                : (d->cfg.region_max_count + 3) / 4,
                          .log = kvs_log_sink,
                          .log_ctx = "region"};
    memcpy(o.engine, d->engine, sizeof o.engine);
    int rc = kvs_regions_create(&d->loop, &o, &d->regions, err);
    if (rc == 0)
        kvs_log(KVS_LOG_INFO, "region socket %s (shared memory up to %llu bytes)", path,
                (unsigned long long)d->cfg.region_max_bytes);
    return rc;
}

static void close_all(daemon_state *d)
{
    if (d->work)
        kvs_work_close(d->work);
    kvs_regions_close(d->regions);
    uv_close((uv_handle_t *)&d->sigterm, NULL);
    uv_close((uv_handle_t *)&d->sigint, NULL);
    uv_close((uv_handle_t *)&d->sighup, NULL);
    uv_close((uv_handle_t *)&d->stats_timer, NULL);
    uv_close((uv_handle_t *)&d->drain_timer, NULL);
    uv_close((uv_handle_t *)&d->sweep_timer, NULL);
    uv_close((uv_handle_t *)&d->watchdog_timer, NULL);
}

static void on_drain_poll(uv_timer_t *t)
{
    daemon_state *d = t->data;
    unsigned n = kvs_server_inflight(d->server);
    if (n == 0) {
        kvs_log(KVS_LOG_INFO, "drained: no calls in flight");
    } else if (uv_now(&d->loop) >= d->drain_deadline_ms || d->signals_seen > 1) {
        kvs_log(KVS_LOG_WARN, "drain %s with %u calls in flight: cancelling them",
                d->signals_seen > 1 ? "cut short by a second signal" : "timed out", n);
    } else {
        return;
    }
    close_all(d);
}

/* sd_notify(3) with a formatted state; a no-op unless NOTIFY_SOCKET is set. A failure to
 * reach systemd is logged and otherwise ignored: serving matters more than telling. */
static void notify(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void notify(const char *fmt, ...)
{
    char state[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(state, sizeof state, fmt, ap);
    va_end(ap);
    int rc = sd_notify(0, state);
    if (rc < 0)
        kvs_log(KVS_LOG_WARN, "sd_notify: %s", strerror(-rc));
}

static void on_watchdog(uv_timer_t *t)
{
    (void)t;
    notify("WATCHDOG=1");
}

/* WATCHDOG=1 at half the interval systemd expects (sd_watchdog_enabled: WATCHDOG_USEC, for
 * this pid when WATCHDOG_PID is set), from the loop thread: if the loop stops turning,
 * the pings stop and systemd restarts the daemon. */
static void start_watchdog(daemon_state *d)
{
    uint64_t usec = 0;
    int rc = sd_watchdog_enabled(0, &usec);
    if (rc < 0)
        kvs_log(KVS_LOG_WARN, "sd_watchdog_enabled: %s: no watchdog pings", strerror(-rc));
    if (rc <= 0 || usec == 0)
        return;
    uint64_t ms = usec / 2000 ? usec / 2000 : 1;
    uv_timer_start(&d->watchdog_timer, on_watchdog, ms, ms);
    kvs_log(KVS_LOG_INFO, "systemd watchdog: pinging every %llu ms", (unsigned long long)ms);
}

static void on_signal(uv_signal_t *s, int signum)
{
    daemon_state *d = s->data;
    if (++d->signals_seen > 1)
        return; /* the drain timer sees it on its next tick */
    kvs_log(KVS_LOG_INFO, "%s: draining (%u calls in flight, up to %us)", strsignal(signum),
            kvs_server_inflight(d->server), d->cfg.drain_timeout_s);
    kvs_server_drain(d->server);
    kvs_metrics_set_ready(d->metrics, false);
    notify("STOPPING=1\nSTATUS=draining (%u calls in flight)", kvs_server_inflight(d->server));
    uv_timer_stop(&d->stats_timer);
    d->drain_deadline_ms = uv_now(&d->loop) + (uint64_t)d->cfg.drain_timeout_s * 1000;
    uv_timer_start(&d->drain_timer, on_drain_poll, 0, DRAIN_POLL_MS);
}

#define SWEEP_MS 500         /* stalled-stream sweep period */
#define TRIM_EVERY 20        /* sweeps between heap checks (10 s) */
#define TRIM_FREE (16 << 20) /* free heap bytes that make a trim worth its page faults */

/* Cancels streams stalled past --stream-idle (daemon/server.h) and now and then gives free
 * heap memory back to the OS: payload buffers are kept in the heap for speed (main's
 * mallopt), so after a burst of large Puts, or a cancelled one, glibc would otherwise
 * hold hundreds of MiB it no longer uses. */
static void on_sweep(uv_timer_t *t)
{
    daemon_state *d = t->data;
    if (d->server)
        kvs_server_sweep(d->server, (uint64_t)d->cfg.stream_idle_s * 1000);
    if (++d->sweeps % TRIM_EVERY == 0 && mallinfo2().fordblks > TRIM_FREE)
        malloc_trim(0);
}

static void on_stats(uv_timer_t *t)
{
    daemon_state *d = t->data;
    kvs_store_stats st;
    kvs_store_get_stats(d->store, &st);
    kvs_limits_stats ls;
    uint64_t idle;
    kvs_server_stream_stats(d->server, &ls, &idle);
    kvs_log(KVS_LOG_INFO,
            "stats: gpu %llu/%llu bytes in %llu blocks, hits %llu, demotions %llu, "
            "promotions %llu; "
            "host %llu/%llu bytes in %llu blocks, hits %llu, misses %llu, evictions %llu, "
            "checksum failures %llu; spills %llu, spill queue %llu bytes, dropped %llu; "
            "disk %llu/%llu bytes in %llu blocks, hits %llu, promotions %llu, "
            "evictions %llu, write errors %llu, durable Puts refused %llu; in flight %u; "
            "Puts open %llu, receiving %llu/%llu bytes, refused %llu, idle-cancelled %llu",
            (unsigned long long)st.gpu_used, (unsigned long long)st.gpu_capacity,
            (unsigned long long)st.gpu_blocks, (unsigned long long)st.gpu_hits,
            (unsigned long long)st.gpu_demotions, (unsigned long long)st.gpu_promotions,
            (unsigned long long)st.host_used, (unsigned long long)st.host_capacity,
            (unsigned long long)st.host_blocks, (unsigned long long)st.host_hits,
            (unsigned long long)st.misses, (unsigned long long)st.host_evictions,
            (unsigned long long)st.checksum_failures, (unsigned long long)st.disk_spills,
            (unsigned long long)st.spill_pending, (unsigned long long)st.spill_dropped,
            (unsigned long long)st.disk_used, (unsigned long long)st.disk_capacity,
            (unsigned long long)st.disk_blocks, (unsigned long long)st.disk_hits,
            (unsigned long long)st.disk_promotions, (unsigned long long)st.disk_evictions,
            (unsigned long long)st.disk_write_errors, (unsigned long long)st.disk_refused,
            kvs_server_inflight(d->server), (unsigned long long)ls.puts_open,
            (unsigned long long)ls.recv_used, (unsigned long long)ls.recv_budget,
            (unsigned long long)(ls.puts_refused + ls.recv_refused), (unsigned long long)idle);
}

/* Applies one live key's new value (config.h KVS_KEY_LIVE). Only the loop thread reads
 * the cfg fields changed here, or they are read once at start (tokens): the CQ threads
 * never see a field change under them. */
static int apply_live(daemon_state *d, const kvs_config *next, const char *key, kvs_err *err)
{
    if (!strcmp(key, "log_level")) {
        kvs_log_set_level(next->log_level);
    } else if (!strcmp(key, "log_format")) {
        kvs_log_set_format((kvs_log_format)next->log_format);
    } else if (!strcmp(key, "host_capacity") || !strcmp(key, "eviction")) {
        uint64_t evicted = 0;
        int rc = kvs_store_set_host(d->store, next->host_capacity, next->eviction, &evicted, err);
        if (rc)
            return rc;
        if (evicted)
            kvs_log(KVS_LOG_INFO, "SIGHUP: host tier: %llu blocks evicted to fit",
                    (unsigned long long)evicted);
    } else if (!strcmp(key, "error_sample")) {
        /* The data path keeps its own copy (an atomic the CQ threads read), not cfg's. */
        kvs_xfer_set_error_sample(d->server->xfer, next->error_sample);
    } else if (!strcmp(key, "stats_interval")) {
        uv_timer_stop(&d->stats_timer);
        uint64_t ms = (uint64_t)next->stats_interval_s * 1000;
        if (ms)
            uv_timer_start(&d->stats_timer, on_stats, ms, ms);
    }
    /* drain_timeout, stream_idle: read from d->cfg by the loop when needed. The token
     * keys: on_sighup swapped the auth object before the keys were compared. */
    return 0;
}

/* SIGHUP: reads the config again as at start (defaults, the same file, the environment's
 * tokens, the same flags, so flags still win) into a new kvs_config; a file that fails
 * is refused whole and the running config stays. Then key by key: a live key's new value
 * is applied and logged; another changed key is logged as needing a restart and keeps
 * its running value, so d->cfg always says what runs. */
static void on_sighup(uv_signal_t *s, int signum)
{
    daemon_state *d = s->data;
    (void)signum;
    if (d->signals_seen) /* draining: the daemon is on its way out */
        return;
    kvs_err err;
    kvs_err_clear(&err);
    /* The TLS files at the running paths (a renewed certificate keeps its file names). */
    if (d->tls) {
        kvs_tls *next = NULL;
        if (kvs_tls_load(&d->cfg, &next, &err) || kvs_tls_reload(d->tls, next, &err))
            kvs_log(KVS_LOG_ERROR, "SIGHUP: TLS files refused, the running certificate stays: %s",
                    err.msg);
        else
            kvs_log(KVS_LOG_INFO,
                    "SIGHUP: TLS certificate and key reloaded from %s (new "
                    "connections use them)",
                    d->cfg.tls_cert);
    }
    if (!d->cfg.file[0] && !kvs_tokens_from_files(&d->cfg)) {
        if (!d->tls)
            kvs_log(KVS_LOG_INFO, "SIGHUP: no config file (--config, KVSTASHD_CONFIG), no token "
                                  "file and no TLS: nothing to reload");
        return;
    }
    static kvs_config next; /* large; the loop thread is the only user */
    kvs_config_defaults(&next);
    int rc = kvs_config_parse_args(&next, d->argc, d->argv, &err);
    /* The token files are re-read at every reload, changed path or not (a rotated token
     * keeps its file name); a bad one refuses the reload like a bad config file. */
    struct kvs_auth *auth = NULL;
    if (rc >= 0)
        rc = kvs_tokens_load(&next, &auth, &err);
    if (rc < 0) {
        kvs_log(KVS_LOG_ERROR, "SIGHUP: config refused, nothing changed: %s", err.msg);
        return;
    }
    kvs_log(KVS_LOG_INFO, "SIGHUP: tokens reloaded (client %s, admin %s, %zu tenant grants)",
            kvs_auth_has_client(auth) ? "set" : "none", kvs_auth_has_admin(auth) ? "set" : "none",
            kvs_auth_tenant_grants(auth));
    kvs_server_set_auth(d->server, auth);
    /* host_capacity and eviction change together (one new policy), once. log_level goes
     * last, so that every line of this reload is logged at the level it found. */
    bool host_done = false;
    unsigned changed = 0, restart = 0;
    int log_key = kvs_config_key_find("log_level");
    for (int n = 0; n < KVS_CONFIG_NKEYS; n++) {
        int i = n == KVS_CONFIG_NKEYS - 1 ? log_key : n < log_key ? n : n + 1;
        if (kvs_config_key_equal(&d->cfg, &next, i)) {
            d->cfg.src[i] = next.src[i]; /* same value, maybe from elsewhere now */
            continue;
        }
        const char *key = kvs_config_key_name(i);
        char was[600], now[600], src[700];
        kvs_config_key_value(&d->cfg, i, was, sizeof was);
        kvs_config_key_value(&next, i, now, sizeof now);
        kvs_config_key_source(&next, i, src, sizeof src);
        if (!(kvs_config_key_flags(i) & KVS_KEY_LIVE)) {
            kvs_log(KVS_LOG_WARN, "SIGHUP: %s: %s -> %s (%s) needs a restart; keeping %s", key, was,
                    now, src, was);
            restart++;
            continue;
        }
        bool host = !strcmp(key, "host_capacity") || !strcmp(key, "eviction");
        if (i != log_key && !(host && host_done) && (rc = apply_live(d, &next, key, &err))) {
            kvs_log(KVS_LOG_ERROR, "SIGHUP: %s: %s -> %s: %s; keeping %s", key, was, now, err.msg,
                    was);
            continue;
        }
        host_done |= host;
        kvs_config_key_copy(&d->cfg, &next, i);
        /* Tokens print as "<set>" or "": their values never reach the log. */
        kvs_log(KVS_LOG_INFO, "SIGHUP: %s: %s -> %s (%s)", key, was, now, src);
        if (i == log_key)
            kvs_log_set_level(next.log_level);
        changed++;
    }
    kvs_log(KVS_LOG_INFO, "SIGHUP: reloaded %s: %u settings changed, %u need a restart",
            d->cfg.file[0] ? d->cfg.file : "(no config file)", changed, restart);
}

/* The server, handed the auth object: *auth is NULL afterwards (the server owns it, even
 * when create fails). */
static int start_server(daemon_state *d, struct kvs_auth **auth, kvs_tls *tls, int *port,
                        kvs_err *err)
{
    struct kvs_auth *a = *auth;
    *auth = NULL;
    return kvs_server_create(&d->cfg, a, tls, d->store, d->work, d->engine, d->tiering, d->regions,
                             d->events, &d->server, port, err);
}

/* The HTTP endpoint, once the server is up (it reads the server's counters). */
static int start_metrics(daemon_state *d, kvs_err *err)
{
    if (!d->cfg.metrics_listen[0])
        return 0;
    kvs_metrics_opts o = {.listen = d->cfg.metrics_listen,
                          .store = d->store,
                          .server = d->server,
                          .regions = d->regions,
                          .events = d->events};
    memcpy(o.engine, d->engine, sizeof o.engine);
    int port = 0;
    int rc = kvs_metrics_create(&o, &d->metrics, &port, err);
    if (rc == 0)
        kvs_log(KVS_LOG_INFO, "metrics on http://%s/metrics (port %d), /healthz, /readyz",
                d->cfg.metrics_listen, port);
    return rc;
}

static int write_port_file(const char *path, int port)
{
    char tmp[600];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f)
        return -1;
    int ok = fprintf(f, "%d\n", port) > 0;
    ok &= fclose(f) == 0;
    /* rename makes the file appear whole: a reader never sees a partial number. */
    return ok && rename(tmp, path) == 0 ? 0 : -1;
}

static int start_loop(daemon_state *d, kvs_err *err)
{
    int rc = uv_loop_init(&d->loop);
    if (rc)
        return kvs_err_set(err, KVS_EINTERNAL, "uv_loop_init: %s", uv_strerror(rc));
    uv_signal_init(&d->loop, &d->sigterm);
    uv_signal_init(&d->loop, &d->sigint);
    uv_signal_init(&d->loop, &d->sighup);
    uv_timer_init(&d->loop, &d->stats_timer);
    uv_timer_init(&d->loop, &d->drain_timer);
    uv_timer_init(&d->loop, &d->sweep_timer);
    uv_timer_init(&d->loop, &d->watchdog_timer);
    d->sigterm.data = d->sigint.data = d->sighup.data = d;
    d->stats_timer.data = d->drain_timer.data = d->sweep_timer.data = d;
    d->watchdog_timer.data = d;
    if ((rc = uv_signal_start(&d->sigterm, on_signal, SIGTERM)) ||
        (rc = uv_signal_start(&d->sigint, on_signal, SIGINT)) ||
        (rc = uv_signal_start(&d->sighup, on_sighup, SIGHUP)))
        return kvs_err_set(err, KVS_EINTERNAL, "uv_signal_start: %s", uv_strerror(rc));
    uv_timer_start(&d->sweep_timer, on_sweep, SWEEP_MS, SWEEP_MS);
    if (d->cfg.stats_interval_s) {
        uint64_t ms = (uint64_t)d->cfg.stats_interval_s * 1000;
        uv_timer_start(&d->stats_timer, on_stats, ms, ms);
    }
    return 0;
}

/* The GPU codec engines: one on --gpu-device when there is one (--gpu auto), required
 * with --gpu on; one per device with --gpu all or a list (each required); none with
 * --gpu off. Without one codecs run on the CPU pool. */
static int start_engine(daemon_state *d, kvs_err *err)
{
    if (d->cfg.gpu == KVS_GPU_OFF) {
        kvs_log(KVS_LOG_INFO, "GPU engine off (--gpu off): CPU codecs on %u pool threads",
                d->cfg.codec_threads);
        return 0;
    }
    int devs[KVS_STORE_GPUS_MAX], n = 0, rc;
    if (d->cfg.gpu == KVS_GPU_ALL) {
        int count;
        if ((rc = kvs_engine_device_count(&count, err)))
            return kvs_err_prefix(err, "--gpu all");
        if (count == 0)
            return kvs_err_set(err, KVS_EUNAVAIL, "--gpu all: no CUDA device is visible");
        if (count > KVS_STORE_GPUS_MAX)
            kvs_log(KVS_LOG_WARN, "--gpu all: %d devices, engines on the first %d", count,
                    KVS_STORE_GPUS_MAX);
        for (; n < count && n < KVS_STORE_GPUS_MAX; n++)
            devs[n] = n;
    } else if (d->cfg.gpu == KVS_GPU_LIST) {
        for (int dev = 0; dev < KVS_GPU_LIST_MAX; dev++)
            if (d->cfg.gpu_mask >> dev & 1) {
                if (n == KVS_STORE_GPUS_MAX)
                    return kvs_err_set(err, KVS_EINVAL, "--gpu: at most %d devices",
                                       KVS_STORE_GPUS_MAX);
                devs[n++] = dev;
            }
    } else {
        devs[n++] = d->cfg.gpu_device;
    }
    for (int i = 0; i < n; i++) {
        kvs_engine_opts o = {.device = devs[i]};
        kvs_err e2;
        if ((rc = kvs_engine_create(&o, &d->engine[i], &e2)) == 0) {
            d->engines = (unsigned)i + 1;
            /* "GPU engine on " is what tools look for in the log (tests/integration/kvs.py). */
            kvs_log(KVS_LOG_INFO, "GPU engine on %s, GPU %d of this daemon",
                    kvs_engine_device_name(d->engine[i]), i);
            continue;
        }
        if (d->cfg.gpu == KVS_GPU_AUTO) {
            kvs_log(KVS_LOG_INFO, "no GPU engine (%s): CPU codecs on %u pool threads", e2.msg,
                    d->cfg.codec_threads);
            return 0;
        }
        return kvs_err_set(err, rc, "--gpu: device %d: %s", devs[i], e2.msg);
    }
    return 0;
}

/* Every engine, in reverse order of creation. */
static void destroy_engines(daemon_state *d)
{
    while (d->engines > 0) {
        d->engines--;
        kvs_engine_destroy(d->engine[d->engines]);
        d->engine[d->engines] = NULL;
    }
}

static int pin_slab(void *ctx, void *addr, size_t bytes, kvs_err *err)
{
    return kvs_engine_host_register(ctx, addr, bytes, err);
}

static void unpin_slab(void *ctx, void *addr, size_t bytes)
{
    kvs_engine_host_unregister(ctx, addr, bytes);
}

/* With a GPU engine, host blocks live in pinned memory (storage/hostpool.h), so promotion
 * and demotion copy them by DMA, and so do the Put and Get payload buffers the engine
 * encodes from and decodes into (daemon/call.h kvs_call_buf_alloc). Address space for the
 * host tier, the blocks queued for the disk writer, the pool's rounding (at most an eighth
 * per block) and 1 GiB of payloads in flight; pinned in 64 MiB slabs as they are used. */
static int start_host_pool(daemon_state *d, kvs_store_opts *sopts, kvs_err *err)
{
    uint64_t spill =
        sopts->disk ? (sopts->spill_max ? sopts->spill_max : sopts->host_capacity / 4) : 0;
    uint64_t need = sopts->host_capacity + spill;
    kvs_hostpool_opts po = {.max_bytes = need + need / 8 + ((uint64_t)1 << 30),
                            .pin = pin_slab,
                            .unpin = unpin_slab,
                            .ctx = d->engine[0]}; /* pinned for every device */
    int rc = kvs_hostpool_create(&po, &d->host_pool, err);
    if (rc)
        return kvs_err_prefix(err, "--host-pinned");
    sopts->host_pool = d->host_pool;
    kvs_log(KVS_LOG_INFO,
            "host tier in pinned memory: %llu bytes of address space reserved, "
            "pinned in 64 MiB slabs as blocks arrive (--host-pinned off: plain malloc)",
            (unsigned long long)po.max_bytes);
    return 0;
}

/* KV events (--events-listen): bound before the store is created, whose event sink it is
 * (sopts->on_event), so a bad endpoint stops the start before the disk tier is opened. */
static int start_events(daemon_state *d, kvs_store_opts *sopts, kvs_err *err)
{
    if (!d->cfg.events_listen[0])
        return 0;
    char topic[300];
    int rc = kvs_config_events_topic(&d->cfg, topic, sizeof topic, err);
    if (rc)
        return rc;
    kvs_events_opts o = {.listen = d->cfg.events_listen,
                         .topic = topic,
                         .queue = d->cfg.events_queue,
                         .log = kvs_log_sink,
                         .log_ctx = "events"};
    if ((rc = kvs_events_create(&o, &d->events, err)))
        return kvs_err_prefix(err, "--events-listen");
    sopts->on_event = kvs_events_emit;
    sopts->event_ctx = d->events;
    kvs_log(KVS_LOG_INFO,
            "KV events on %s, topic %s@<namespace> (vLLM's format; queue of %u events)",
            kvs_events_endpoint(d->events), topic, d->cfg.events_queue);
    return 0;
}

/* The GPU tier's device region (in bytes, or a share of the free memory now), then the
 * store over it, then the demotion driver. Without an engine or with --gpu-capacity 0
 * the store has the host tier only. */
static int start_gpu_tier_and_store(daemon_state *d, kvs_store_opts *sopts, kvs_err *err)
{
    int rc;
    /* One tier per engine, each --gpu-capacity bytes, or that share of its device's free
     * memory now. */
    for (unsigned g = 0; g < d->engines; g++) {
        uint64_t bytes = d->cfg.gpu_capacity;
        if (!bytes && d->cfg.gpu_capacity_pct) {
            uint64_t free_b, total_b;
            if ((rc = kvs_engine_mem_info(d->engine[g], &free_b, &total_b, err)))
                return kvs_err_prefix(err, "--gpu-capacity: %s",
                                      kvs_engine_device_name(d->engine[g]));
            bytes = free_b / 100 * d->cfg.gpu_capacity_pct;
        }
        if (!bytes)
            break;
        if ((rc = kvs_engine_tier_alloc(d->engine[g], bytes, &d->gpu_tier[g], err)))
            return kvs_err_prefix(err, "--gpu-capacity: %s", kvs_engine_device_name(d->engine[g]));
        d->gpu_bytes += bytes;
        sopts->gpu[g].base = (uintptr_t)d->gpu_tier[g];
        sopts->gpu[g].capacity = bytes;
        kvs_log(KVS_LOG_INFO,
                "GPU tier %u: %llu bytes on %s; demotion to the host tier above %u%%, down to "
                "%u%%",
                g, (unsigned long long)bytes, kvs_engine_device_name(d->engine[g]),
                d->cfg.gpu_high_pct, d->cfg.gpu_low_pct);
    }
    if (d->cfg.data_dir[0]) {
        /* Data pages flushed at each commit, the meta page lazily: a power loss may undo
         * the last batch but never leaves an environment the next start must refuse
         * (MDB_NOSYNC could, on filesystems that reorder writes). */
        kvs_disk_opts dopts = {.nometasync = true,
                               .reset_broken = d->cfg.data_dir_reset,
                               .log = kvs_log_sink,
                               .log_ctx = "disk"};
        if ((rc = kvs_disk_open(d->cfg.data_dir, d->cfg.disk_capacity, &dopts, &d->disk, err)))
            return kvs_err_prefix(err, "--data-dir");
        sopts->disk = d->disk;
        sopts->disk_capacity = d->cfg.disk_capacity;
        sopts->disk_max_records = d->cfg.disk_max_blocks;
        sopts->spill_max = d->cfg.spill_queue;
        kvs_log(KVS_LOG_INFO,
                "disk tier: %s, budget %llu bytes and %llu records, promotion %s; host blocks "
                "written there in the background above %u%% of the host tier, down to %u%%",
                d->cfg.data_dir, (unsigned long long)d->cfg.disk_capacity,
                (unsigned long long)(d->cfg.disk_max_blocks
                                         ? d->cfg.disk_max_blocks
                                         : KVS_STORE_DISK_RECORDS_AUTO(d->cfg.host_capacity)),
                d->cfg.promote ? "on" : "off", d->cfg.host_high_pct, d->cfg.host_low_pct);
    }
    sopts->no_promote = !d->cfg.promote;
    /* Codecs are prepared for every engine as namespaces get them. */
    memcpy(sopts->engine, d->engine, sizeof sopts->engine);
    if (d->engines && d->cfg.host_pinned && (rc = start_host_pool(d, sopts, err)))
        return rc;
    if ((rc = kvs_store_create(sopts, &d->store, err)))
        return rc;
    if (d->gpu_bytes)
        d->tiering = kvs_tiering_create(d->store, d->engine, kvs_store_gpus(d->store), kvs_work_run,
                                        d->work);
    return 0;
}

/* --flush-on-exit with a GPU tier: its blocks go to the disk tier (through the host tier,
 * while the engine still runs), so a restart finds them; the host blocks go with them. */
static void flush_gpu_tier(daemon_state *d)
{
    uint64_t t0 = uv_hrtime();
    kvs_store_sel all = {0};
    kvs_store_evict_info ei;
    kvs_err err;
    if (kvs_store_evict(d->store, &all, KVS_STORE_TIER_DISK, kvs_tiering_demote, d->tiering, &ei,
                        &err)) {
        kvs_log(KVS_LOG_ERROR, "flush at exit: GPU and host tiers to disk: %s", err.msg);
        return;
    }
    kvs_log(ei.failed || ei.busy ? KVS_LOG_WARN : KVS_LOG_INFO,
            "flush at exit: %llu GPU and host blocks moved to the disk tier in %.1f ms "
            "(%llu failed, %llu busy, %llu there already)",
            (unsigned long long)ei.moved, (double)(uv_hrtime() - t0) / 1e6,
            (unsigned long long)ei.failed, (unsigned long long)ei.busy,
            (unsigned long long)ei.unchanged);
}

int main(int argc, char **argv)
{
    static daemon_state d; /* the daemon's one global: large, zeroed, lives until exit */
    kvs_err err;
    kvs_err_clear(&err);
    kvs_config_defaults(&d.cfg);
    int rc = kvs_config_parse_args(&d.cfg, argc, argv, &err);
    if (rc == KVS_CONFIG_EXIT)
        return 0;
    if (rc == KVS_CONFIG_PRINT) {
        kvs_config_print(&d.cfg, stdout);
        return fflush(stdout) == 0 ? 0 : 1;
    }
    if (rc) {
        fprintf(stderr, "kvstashd: %s\n", err.msg);
        return 2;
    }
    d.argc = argc;
    d.argv = argv;
    kvs_log_set_level(d.cfg.log_level);
    kvs_log_set_format((kvs_log_format)d.cfg.log_format);
    /* Token files are read now: an unreadable or empty one stops the start like a bad
     * flag. The server owns the object from kvs_server_create on. */
    struct kvs_auth *auth = NULL;
    if ((rc = kvs_tokens_load(&d.cfg, &auth, &err))) {
        fprintf(stderr, "kvstashd: %s\n", err.msg);
        return 2;
    }
    /* The TLS files too, before the engine and the store take their time to start. The
     * listener takes gRPC's copy; ours (the key) is wiped once it is up. */
    kvs_tls *tls = NULL;
    if ((rc = kvs_tls_load(&d.cfg, &tls, &err))) {
        kvs_auth_destroy(auth);
        fprintf(stderr, "kvstashd: %s\n", err.msg);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    signal(SIGHUP, SIG_IGN); /* until the loop handles it (on_sighup) */
    /* Keep MiB-sized payload buffers in the heap instead of a fresh mmap per block
     * (GRPC-C-CORE.md: 1.5-2x Put throughput measured). */
    mallopt(M_MMAP_THRESHOLD, 64 << 20);
    mallopt(M_TRIM_THRESHOLD, 256 << 20);
    /* glibc's default of 8 arenas per core keeps freed memory in each thread's arena,
     * where a trim cannot return what partly used heaps pin: after a 64-client burst and a
     * namespace drop the daemon held 43-78 MB instead of 15-19 MB with 4 arenas, at the
     * same Put/Get throughput (tests/bench/RESULTS.md, heap after load). */
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    mallopt(M_ARENA_MAX, cores > 4 ? (int)cores : 4);

    /* CPU codec work runs on libuv's pool: size it before the loop first uses it. */
    char pool[16];
    snprintf(pool, sizeof pool, "%u", d.cfg.codec_threads);
    setenv("UV_THREADPOOL_SIZE", pool, 1);
    grpc_init();
    int port = 0;
    /* The store is created once the GPU tier's region exists; tiering needs the store. */
    kvs_store_opts sopts = {.host_capacity = d.cfg.host_capacity,
                            .eviction = d.cfg.eviction,
                            /* S3-FIFO's small queue at 30% of the tier, not the paper's 10%:
                             * a conversation's blocks are read again at its next turn, after
                             * the user's think time; with 10% they leave first and the turn
                             * misses (tests/bench/RESULTS.md, eviction policies). */
                            .eviction_small_pct = 30,
                            .calib_tokens = d.cfg.calib_tokens,
                            .max_namespaces = d.cfg.max_namespaces,
                            .gpu_high_pct = d.cfg.gpu_high_pct,
                            .gpu_low_pct = d.cfg.gpu_low_pct,
                            .host_high_pct = d.cfg.host_high_pct,
                            .host_low_pct = d.cfg.host_low_pct,
                            .log = kvs_log_sink,
                            .log_ctx = "store"};
    if ((rc = start_loop(&d, &err)) || (rc = kvs_work_create(&d.loop, &d.work, &err)) ||
        (rc = start_engine(&d, &err)) || (rc = start_events(&d, &sopts, &err)) ||
        (rc = start_gpu_tier_and_store(&d, &sopts, &err)) || (rc = start_regions(&d, &err)) ||
        (rc = start_server(&d, &auth, tls, &port, &err))) {
        kvs_auth_destroy(auth); /* NULL once the server took it */
        kvs_tls_destroy(tls);
        kvs_log(KVS_LOG_ERROR, "startup failed: %s", err.msg);
        close_all(&d);
        uv_run(&d.loop, UV_RUN_DEFAULT);
        uv_loop_close(&d.loop);
        kvs_tiering_destroy(d.tiering);
        kvs_work_destroy(d.work);
        kvs_regions_destroy(d.regions);
        kvs_store_destroy(d.store);
        kvs_events_destroy(d.events);      /* the store, its one emitter, is gone */
        kvs_hostpool_destroy(d.host_pool); /* unpins through the engine */
        destroy_engines(&d);
        kvs_disk_close(d.disk);
        grpc_shutdown();
        return 1;
    }
    bool mutual = kvs_tls_mutual(tls);
    d.tls = tls; /* SIGHUP reloads it; freed after grpc_shutdown */
    rc = start_metrics(&d, &err);
    if (rc == 0 && d.cfg.port_file[0] && write_port_file(d.cfg.port_file, port) != 0)
        rc = kvs_err_set(&err, KVS_EIO, "--port-file: cannot write '%s'", d.cfg.port_file);
    int exit_code = 0;
    if (rc) {
        kvs_log(KVS_LOG_ERROR, "startup failed: %s", err.msg);
        close_all(&d);
        exit_code = 1;
    } else {
        kvs_log(KVS_LOG_INFO,
                "kvstashd %s listening on %s (port %d), host tier %llu bytes (eviction %s), "
                "%u threads, max message %llu bytes%s%s",
                KVS_VERSION, d.cfg.listen, port, (unsigned long long)d.cfg.host_capacity,
                kvs_policy_name(d.cfg.eviction), d.cfg.threads,
                (unsigned long long)d.cfg.max_message,
                d.cfg.token[0] || d.cfg.token_file[0] ? ", token auth on" : "",
                mutual              ? ", mutual TLS (client certificates required)"
                : d.cfg.tls_cert[0] ? ", TLS"
                                    : "");
        if (d.cfg.tenant_tokens[0])
            kvs_log(KVS_LOG_INFO, "tenant tokens from %s (README \"Tenants\")",
                    d.cfg.tenant_tokens);
        if (d.cfg.file[0])
            kvs_log(KVS_LOG_INFO, "config file %s (SIGHUP reloads it)", d.cfg.file);
        /* Ready: the gRPC listener and the metrics endpoint are up, the disk tier (if
         * any) was opened and indexed before the store was created. */
        kvs_metrics_set_ready(d.metrics, true);
        notify("READY=1\nSTATUS=serving on %s (port %d)", d.cfg.listen, port);
        start_watchdog(&d);
    }
    uv_run(&d.loop, UV_RUN_DEFAULT);
    /* Closing the loop's SIGHUP handle restored the default action (exit): a SIGHUP
     * during the flush below must not cut it short. */
    signal(SIGHUP, SIG_IGN);
    kvs_metrics_destroy(d.metrics); /* before the server and the store it reads */
    kvs_server_shutdown(d.server);
    kvs_server_destroy(d.server);
    if (d.disk && d.cfg.flush_on_exit && d.tiering)
        flush_gpu_tier(&d);
    kvs_tiering_destroy(d.tiering); /* demotions in flight finish on the engine */
    kvs_work_destroy(d.work);       /* no CQ thread is left to submit */
    kvs_regions_destroy(d.regions); /* no call holds a region any more; unpins */
    if (d.disk && d.cfg.flush_on_exit) {
        uint64_t t0 = uv_hrtime();
        uint64_t n = kvs_store_flush(d.store);
        kvs_log(KVS_LOG_INFO, "flushed %llu host blocks to the disk tier in %.1f ms",
                (unsigned long long)n, (double)(uv_hrtime() - t0) / 1e6);
    }
    kvs_store_destroy(d.store);        /* applies the disk writer's queue */
    kvs_events_destroy(d.events);      /* sends what the store reported, the flush included */
    kvs_hostpool_destroy(d.host_pool); /* no block is left; unpins through the engine */
    destroy_engines(&d);               /* after the server and the store: nothing uses them */
    kvs_disk_close(d.disk);
    rc = uv_loop_close(&d.loop);
    if (rc)
        kvs_log(KVS_LOG_WARN, "uv_loop_close: %s", uv_strerror(rc));
    grpc_shutdown();
    kvs_tls_destroy(d.tls); /* gRPC's fetcher is gone with its last credentials */
    kvs_log(KVS_LOG_INFO, "kvstashd stopped");
    return exit_code;
}
