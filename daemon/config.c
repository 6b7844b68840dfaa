/* kvstashd configuration: see config.h. */
#include "daemon/config.h"

#include <errno.h>
#include <getopt.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "daemon/log.h"

void kvs_config_defaults(kvs_config *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    snprintf(cfg->listen, sizeof cfg->listen, "127.0.0.1:50051");
    cfg->host_capacity = 2ull << 30;
    cfg->max_message = 64ull << 20;
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    cfg->threads = n < 2 ? 2 : (n > 64 ? 64 : (unsigned)n);
    cfg->codec_threads = cfg->threads;
    cfg->log_level = KVS_LOG_INFO;
    cfg->drain_timeout_s = 30;
    cfg->stats_interval_s = 60;
    cfg->max_keys = 4096;
    cfg->region_max_bytes = 64ull << 30;
    cfg->calib_tokens = 4096;
    cfg->gpu_capacity_pct = 25;
    cfg->gpu_high_pct = 90;
    cfg->gpu_low_pct = 80;
    cfg->host_high_pct = 90;
    cfg->host_pinned = 1;
    cfg->host_low_pct = 80;
    cfg->disk_capacity = 16ull << 30;
    cfg->promote = 1;
    cfg->flush_on_exit = 1;
    cfg->eviction = KVS_POLICY_LRU;
    cfg->max_puts = 1024;
    cfg->max_puts_per_conn = 256;
    cfg->stream_idle_s = 30;
}

int kvs_parse_size(const char *s, uint64_t *out)
{
    if (!s || !*s)
        return 0;
    errno = 0;
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || s[0] == '-')
        return 0;
    unsigned shift = 0;
    switch (*end) {
    case '\0':
        break;
    case 'k':
    case 'K':
        shift = 10;
        end++;
        break;
    case 'm':
    case 'M':
        shift = 20;
        end++;
        break;
    case 'g':
    case 'G':
        shift = 30;
        end++;
        break;
    case 't':
    case 'T':
        shift = 40;
        end++;
        break;
    default:
        return 0;
    }
    if (*end == 'i' || *end == 'B') /* accept 2GiB, 2GB, 2G as the same */
        end += (*end == 'i' && end[1] == 'B') ? 2 : 1;
    if (*end != '\0')
        return 0;
    if (shift && v > (UINT64_MAX >> shift))
        return 0;
    *out = (uint64_t)v << shift;
    return 1;
}

static int parse_uint(const char *s, unsigned lo, unsigned hi, unsigned *out)
{
    errno = 0;
    char *end;
    unsigned long v = strtoul(s, &end, 10);
    if (errno || end == s || *end || s[0] == '-' || v < lo || v > hi)
        return 0;
    *out = (unsigned)v;
    return 1;
}

/* "HIGH,LOW" percentages with 0 <= LOW < HIGH <= 100. */
static bool parse_watermarks(const char *s, unsigned *high, unsigned *low)
{
    unsigned hi, lo;
    char tail;
    if (sscanf(s, "%u,%u%c", &hi, &lo, &tail) != 2 || hi > 100 || hi == 0 || lo >= hi)
        return false;
    *high = hi;
    *low = lo;
    return true;
}

static int copy_str(char *dst, size_t cap, const char *src, const char *flag, kvs_err *err)
{
    if (strlen(src) >= cap)
        return kvs_err_set(err, KVS_EINVAL, "%s: longer than %zu characters", flag, cap - 1);
    memcpy(dst, src, strlen(src) + 1);
    return 0;
}

static void usage(FILE *f)
{
    fprintf(
        f,
        "usage: kvstashd [options]\n"
        "\n"
        "KV-cache offload store for LLM inference. Runs on embedded defaults with no\n"
        "options; every option below overrides one default.\n"
        "\n"
        "  --listen ADDR          gRPC address, HOST:PORT or unix:PATH (default 127.0.0.1:50051;\n"
        "                         port 0 picks a free port)\n"
        "  --port-file PATH       write the bound port number to PATH once listening\n"
        "  --host-capacity SIZE   bytes of the host RAM tier, e.g. 512M, 2G (default 2G)\n"
        "  --max-message SIZE     largest gRPC message accepted or sent (default 64M)\n"
        "  --threads N            completion-queue threads (default: cores, at least 2)\n"
        "  --codec-threads N      thread-pool threads for CPU encode/decode (default: cores)\n"
        "  --gpu auto|on|off      GPU codec engine: auto uses one when present (default),\n"
        "                         on refuses to start without one; --no-gpu = --gpu off\n"
        "  --gpu-device N         CUDA device of the engine (default 0)\n"
        "  --gpu-capacity SIZE|N%% GPU tier: bytes of device memory, or a share of the free\n"
        "                         memory at start; 0 = no GPU tier (default 25%%)\n"
        "  --gpu-watermarks H,L   demote GPU blocks to the host tier above H%% of the GPU\n"
        "                         tier, down to L%% (default 90,80)\n"
        "  --host-pinned on|off   with a GPU engine: host blocks and payload buffers in pinned\n"
        "                         memory (64 MiB slabs), moved by DMA (default on)\n"
        "  --log-level LEVEL      error, warn, info or debug (default info)\n"
        "  --token TOKEN          require 'authorization: Bearer TOKEN' on KvStash calls\n"
        "  --admin-token TOKEN    require this token on KvAdmin calls (Health is open)\n"
        "  --drain-timeout SEC    on SIGTERM, wait this long for in-flight calls (default 30)\n"
        "  --stats-interval SEC   log a stats line every SEC seconds, 0 = never (default 60)\n"
        "  --max-keys N           keys per Lookup/Exists/Delete call (default 4096)\n"
        "  --calib-tokens N       rotatekv-*: key tokens that calibrate the channel order\n"
        "                         before it is frozen (default 4096)\n"
        "  --data-dir PATH        disk tier: an LMDB environment in PATH (created if missing\n"
        "                         or empty; a foreign directory is refused); default: none\n"
        "  --data-dir-reset       start a new, empty store where --data-dir holds an empty,\n"
        "                         truncated or damaged data.mdb (kept as data.mdb.broken-TIME,\n"
        "                         never deleted); without it such a directory is refused\n"
        "  --disk-capacity SIZE   byte budget of the disk tier (default 16G)\n"
        "  --host-watermarks H,L  with --data-dir: write idle host blocks to the disk tier in\n"
        "                         the background above H%% of the host tier, down to L%%\n"
        "                         (default 90,80)\n"
        "  --spill-queue SIZE     with --data-dir: most bytes of host blocks waiting for the\n"
        "                         disk writer; past it, host victims are dropped (default: a\n"
        "                         quarter of --host-capacity)\n"
        "  --promote on|off       a Get moves a disk block to the host tier, a host block to\n"
        "                         the GPU tier below its high watermark (default on)\n"
        "  --flush-on-exit on|off with --data-dir: write host blocks to disk at shutdown, so\n"
        "                         a restart finds them (default on)\n"
        "  --eviction lru|s3fifo  host tier eviction order: least recently used, or S3-FIFO\n"
        "                         (scan-resistant: one-off blocks leave before re-read\n"
        "                         ones; a 30%% small queue) (default lru)\n"
        "  --recv-budget SIZE     memory for Put payloads being received, all streams together;\n"
        "                         a Put past it gets RESOURCE_EXHAUSTED (default: a quarter\n"
        "                         of --host-capacity, at least 64M)\n"
        "  --max-puts N           Put streams open at once (default 1024)\n"
        "  --max-puts-per-conn N  ...from one client connection (default 256)\n"
        "  --stream-idle SEC      cancel a Put or Get stream that made no progress for SEC\n"
        "                         seconds, returning its memory (default 30)\n"
        "  --region-socket PATH   Unix socket where co-located clients register shared memory\n"
        "                         for PutMany/GetMany without payload copies (README \"Data\n"
        "                         plane\"); 'none' for none (default: <listen path>.region for\n"
        "                         a unix: listen address, else none)\n"
        "  --region-max-bytes SIZE  shared memory registered, all clients (default 64G)\n"
        "  -h, --help             this text\n"
        "  --version              print the version\n"
        "\n"
        "Tokens may also come from the environment (KVSTASH_TOKEN, KVSTASH_ADMIN_TOKEN),\n"
        "which keeps them out of the process list.\n");
}

int kvs_config_parse_args(kvs_config *cfg, int argc, char **argv, kvs_err *err)
{
    enum {
        O_LISTEN = 256,
        O_PORT_FILE,
        O_HOST_CAP,
        O_MAX_MSG,
        O_THREADS,
        O_LOG,
        O_TOKEN,
        O_ADMIN_TOKEN,
        O_DRAIN,
        O_STATS,
        O_MAX_KEYS,
        O_CALIB,
        O_CODEC_THREADS,
        O_GPU,
        O_NO_GPU,
        O_GPU_DEVICE,
        O_GPU_CAP,
        O_GPU_WM,
        O_DATA_DIR,
        O_DISK_CAP,
        O_PROMOTE,
        O_FLUSH_EXIT,
        O_EVICTION,
        O_HOST_WM,
        O_SPILL_Q,
        O_HOST_PIN,
        O_VERSION,
        O_DATA_RESET,
        O_RECV_BUDGET,
        O_MAX_PUTS,
        O_MAX_PUTS_CONN,
        O_STREAM_IDLE,
        O_REGION_SOCKET,
        O_REGION_MAX
    };
    static const struct option opts[] = {
        {"listen", required_argument, NULL, O_LISTEN},
        {"port-file", required_argument, NULL, O_PORT_FILE},
        {"host-capacity", required_argument, NULL, O_HOST_CAP},
        {"max-message", required_argument, NULL, O_MAX_MSG},
        {"threads", required_argument, NULL, O_THREADS},
        {"log-level", required_argument, NULL, O_LOG},
        {"token", required_argument, NULL, O_TOKEN},
        {"admin-token", required_argument, NULL, O_ADMIN_TOKEN},
        {"drain-timeout", required_argument, NULL, O_DRAIN},
        {"stats-interval", required_argument, NULL, O_STATS},
        {"max-keys", required_argument, NULL, O_MAX_KEYS},
        {"calib-tokens", required_argument, NULL, O_CALIB},
        {"codec-threads", required_argument, NULL, O_CODEC_THREADS},
        {"gpu", required_argument, NULL, O_GPU},
        {"no-gpu", no_argument, NULL, O_NO_GPU},
        {"gpu-device", required_argument, NULL, O_GPU_DEVICE},
        {"gpu-capacity", required_argument, NULL, O_GPU_CAP},
        {"gpu-watermarks", required_argument, NULL, O_GPU_WM},
        {"host-watermarks", required_argument, NULL, O_HOST_WM},
        {"spill-queue", required_argument, NULL, O_SPILL_Q},
        {"host-pinned", required_argument, NULL, O_HOST_PIN},
        {"data-dir", required_argument, NULL, O_DATA_DIR},
        {"disk-capacity", required_argument, NULL, O_DISK_CAP},
        {"promote", required_argument, NULL, O_PROMOTE},
        {"flush-on-exit", required_argument, NULL, O_FLUSH_EXIT},
        {"eviction", required_argument, NULL, O_EVICTION},
        {"data-dir-reset", no_argument, NULL, O_DATA_RESET},
        {"recv-budget", required_argument, NULL, O_RECV_BUDGET},
        {"max-puts", required_argument, NULL, O_MAX_PUTS},
        {"max-puts-per-conn", required_argument, NULL, O_MAX_PUTS_CONN},
        {"stream-idle", required_argument, NULL, O_STREAM_IDLE},
        {"region-socket", required_argument, NULL, O_REGION_SOCKET},
        {"region-max-bytes", required_argument, NULL, O_REGION_MAX},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, O_VERSION},
        {NULL, 0, NULL, 0},
    };
    const char *env;
    bool region_given = false;
    if ((env = getenv("KVSTASH_TOKEN")) &&
        copy_str(cfg->token, sizeof cfg->token, env, "KVSTASH_TOKEN", err))
        return err ? err->code : KVS_EINVAL;
    if ((env = getenv("KVSTASH_ADMIN_TOKEN")) &&
        copy_str(cfg->admin_token, sizeof cfg->admin_token, env, "KVSTASH_ADMIN_TOKEN", err))
        return err ? err->code : KVS_EINVAL;

    optind = 1;
    opterr = 0;
    int c, rc = 0;
    uint64_t size;
    while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
        switch (c) {
        case O_LISTEN:
            rc = copy_str(cfg->listen, sizeof cfg->listen, optarg, "--listen", err);
            break;
        case O_PORT_FILE:
            rc = copy_str(cfg->port_file, sizeof cfg->port_file, optarg, "--port-file", err);
            break;
        case O_HOST_CAP:
            if (!kvs_parse_size(optarg, &size) || size == 0)
                return kvs_err_set(err, KVS_EINVAL, "--host-capacity: '%s' is not a size > 0",
                                   optarg);
            cfg->host_capacity = size;
            break;
        case O_MAX_MSG:
            if (!kvs_parse_size(optarg, &size) || size < 4096 || size > (1ull << 31) - 1)
                return kvs_err_set(err, KVS_EINVAL, "--max-message: '%s' is not a size in 4K..2G-1",
                                   optarg);
            cfg->max_message = size;
            break;
        case O_THREADS:
            if (!parse_uint(optarg, 1, 256, &cfg->threads))
                return kvs_err_set(err, KVS_EINVAL, "--threads: '%s' is not in 1..256", optarg);
            break;
        case O_LOG: {
            int lvl = kvs_log_level_parse(optarg);
            if (lvl < 0)
                return kvs_err_set(err, KVS_EINVAL,
                                   "--log-level: '%s' is not error, warn, info or debug", optarg);
            cfg->log_level = (kvs_log_level)lvl;
            break;
        }
        case O_TOKEN:
            rc = copy_str(cfg->token, sizeof cfg->token, optarg, "--token", err);
            break;
        case O_ADMIN_TOKEN:
            rc = copy_str(cfg->admin_token, sizeof cfg->admin_token, optarg, "--admin-token", err);
            break;
        case O_DRAIN:
            if (!parse_uint(optarg, 0, 86400, &cfg->drain_timeout_s))
                return kvs_err_set(err, KVS_EINVAL, "--drain-timeout: '%s' is not in 0..86400",
                                   optarg);
            break;
        case O_STATS:
            if (!parse_uint(optarg, 0, 86400, &cfg->stats_interval_s))
                return kvs_err_set(err, KVS_EINVAL, "--stats-interval: '%s' is not in 0..86400",
                                   optarg);
            break;
        case O_MAX_KEYS:
            if (!parse_uint(optarg, 1, 1u << 20, &cfg->max_keys))
                return kvs_err_set(err, KVS_EINVAL, "--max-keys: '%s' is not in 1..1048576",
                                   optarg);
            break;
        case O_GPU:
            if (strcmp(optarg, "auto") == 0)
                cfg->gpu = KVS_GPU_AUTO;
            else if (strcmp(optarg, "on") == 0)
                cfg->gpu = KVS_GPU_ON;
            else if (strcmp(optarg, "off") == 0)
                cfg->gpu = KVS_GPU_OFF;
            else
                return kvs_err_set(err, KVS_EINVAL, "--gpu: '%s' is not auto, on or off", optarg);
            break;
        case O_NO_GPU:
            cfg->gpu = KVS_GPU_OFF;
            break;
        case O_GPU_DEVICE: {
            unsigned dev;
            if (!parse_uint(optarg, 0, 255, &dev))
                return kvs_err_set(err, KVS_EINVAL, "--gpu-device: '%s' is not in 0..255", optarg);
            cfg->gpu_device = (int)dev;
            break;
        }
        case O_GPU_CAP: {
            size_t n = strlen(optarg);
            if (n > 1 && optarg[n - 1] == '%') {
                char pct[8];
                unsigned v;
                if (n > sizeof pct ||
                    (memcpy(pct, optarg, n - 1), pct[n - 1] = 0, !parse_uint(pct, 1, 95, &v)))
                    return kvs_err_set(err, KVS_EINVAL,
                                       "--gpu-capacity: '%s' is not a share in "
                                       "1%%..95%%",
                                       optarg);
                cfg->gpu_capacity = 0;
                cfg->gpu_capacity_pct = v;
            } else if (kvs_parse_size(optarg, &size)) {
                cfg->gpu_capacity = size;
                cfg->gpu_capacity_pct = 0; /* 0 bytes and no share: no GPU tier */
            } else {
                return kvs_err_set(err, KVS_EINVAL,
                                   "--gpu-capacity: '%s' is neither a size "
                                   "(e.g. 8G) nor a share (e.g. 25%%)",
                                   optarg);
            }
            break;
        }
        case O_GPU_WM:
            if (!parse_watermarks(optarg, &cfg->gpu_high_pct, &cfg->gpu_low_pct))
                return kvs_err_set(err, KVS_EINVAL,
                                   "--gpu-watermarks: '%s' is not HIGH,LOW "
                                   "with 0 <= LOW < HIGH <= 100",
                                   optarg);
            break;
        case O_HOST_WM:
            if (!parse_watermarks(optarg, &cfg->host_high_pct, &cfg->host_low_pct))
                return kvs_err_set(err, KVS_EINVAL,
                                   "--host-watermarks: '%s' is not HIGH,LOW "
                                   "with 0 <= LOW < HIGH <= 100",
                                   optarg);
            break;
        case O_CODEC_THREADS:
            if (!parse_uint(optarg, 1, 1024, &cfg->codec_threads))
                return kvs_err_set(err, KVS_EINVAL, "--codec-threads: '%s' is not in 1..1024",
                                   optarg);
            break;
        case O_CALIB:
            if (!parse_uint(optarg, 1, 1u << 24, &cfg->calib_tokens))
                return kvs_err_set(err, KVS_EINVAL, "--calib-tokens: '%s' is not in 1..16777216",
                                   optarg);
            break;
        case O_DATA_DIR:
            if (!optarg[0])
                return kvs_err_set(err, KVS_EINVAL, "--data-dir: empty path");
            rc = copy_str(cfg->data_dir, sizeof cfg->data_dir, optarg, "--data-dir", err);
            break;
        case O_DISK_CAP:
            if (!kvs_parse_size(optarg, &size) || size < (1ull << 20))
                return kvs_err_set(err, KVS_EINVAL, "--disk-capacity: '%s' is not a size >= 1M",
                                   optarg);
            cfg->disk_capacity = size;
            break;
        case O_HOST_PIN:
            if (strcmp(optarg, "on") && strcmp(optarg, "off"))
                return kvs_err_set(err, KVS_EINVAL, "--host-pinned: '%s' is not on or off", optarg);
            cfg->host_pinned = optarg[1] == 'n';
            break;
        case O_SPILL_Q:
            if (!kvs_parse_size(optarg, &size) || size == 0)
                return kvs_err_set(err, KVS_EINVAL, "--spill-queue: '%s' is not a size > 0",
                                   optarg);
            cfg->spill_queue = size;
            break;
        case O_PROMOTE:
            if (strcmp(optarg, "on") == 0)
                cfg->promote = 1;
            else if (strcmp(optarg, "off") == 0)
                cfg->promote = 0;
            else
                return kvs_err_set(err, KVS_EINVAL, "--promote: '%s' is not on or off", optarg);
            break;
        case O_FLUSH_EXIT:
            if (strcmp(optarg, "on") == 0 || strcmp(optarg, "off") == 0)
                cfg->flush_on_exit = optarg[1] == 'n';
            else
                return kvs_err_set(err, KVS_EINVAL, "--flush-on-exit: '%s' is not on or off",
                                   optarg);
            break;
        case O_EVICTION:
            if (kvs_policy_kind_parse(optarg, &cfg->eviction, err))
                return kvs_err_set(err, KVS_EINVAL, "--eviction: '%.64s' is not lru or s3fifo",
                                   optarg);
            break;
        case O_DATA_RESET:
            cfg->data_dir_reset = 1;
            break;
        case O_RECV_BUDGET:
            if (!kvs_parse_size(optarg, &size) || size < (1ull << 20))
                return kvs_err_set(err, KVS_EINVAL, "--recv-budget: '%s' is not a size >= 1M",
                                   optarg);
            cfg->recv_budget = size;
            break;
        case O_MAX_PUTS:
            if (!parse_uint(optarg, 1, 1u << 20, &cfg->max_puts))
                return kvs_err_set(err, KVS_EINVAL, "--max-puts: '%s' is not in 1..1048576",
                                   optarg);
            break;
        case O_MAX_PUTS_CONN:
            if (!parse_uint(optarg, 1, 1u << 20, &cfg->max_puts_per_conn))
                return kvs_err_set(err, KVS_EINVAL,
                                   "--max-puts-per-conn: '%s' is not in 1..1048576", optarg);
            break;
        case O_STREAM_IDLE:
            if (!parse_uint(optarg, 1, 86400, &cfg->stream_idle_s))
                return kvs_err_set(err, KVS_EINVAL, "--stream-idle: '%s' is not in 1..86400",
                                   optarg);
            break;
        case O_REGION_SOCKET:
            if (!optarg[0])
                return kvs_err_set(err, KVS_EINVAL,
                                   "--region-socket: empty path ('none' for none)");
            rc = copy_str(cfg->region_socket, sizeof cfg->region_socket, optarg, "--region-socket",
                          err);
            region_given = true;
            break;
        case O_REGION_MAX:
            if (!kvs_parse_size(optarg, &size) || size < (1ull << 20))
                return kvs_err_set(err, KVS_EINVAL, "--region-max-bytes: '%s' is not a size >= 1M",
                                   optarg);
            cfg->region_max_bytes = size;
            break;
        case 'h':
            usage(stdout);
            return 1;
        case O_VERSION:
            printf("kvstashd %s\n", KVS_VERSION);
            return 1;
        case ':':
            return kvs_err_set(err, KVS_EINVAL, "%s: needs a value (see --help)", argv[optind - 1]);
        default:
            return kvs_err_set(err, KVS_EINVAL, "%s: unknown option (see --help)",
                               argv[optind - 1]);
        }
        if (rc)
            return rc;
    }
    if (optind < argc)
        return kvs_err_set(err, KVS_EINVAL, "%s: unexpected argument (see --help)", argv[optind]);
    if (!region_given && strncmp(cfg->listen, "unix:", 5) == 0 &&
        strlen(cfg->listen + 5) + sizeof ".region" <= sizeof cfg->region_socket)
        snprintf(cfg->region_socket, sizeof cfg->region_socket, "%s.region", cfg->listen + 5);
    if (strcmp(cfg->region_socket, "none") == 0)
        cfg->region_socket[0] = 0;
    if (cfg->data_dir_reset && !cfg->data_dir[0])
        return kvs_err_set(err, KVS_EINVAL, "--data-dir-reset: needs --data-dir");
    /* A quarter of the host tier, but room for a few large blocks even with a tiny one. */
    if (!cfg->recv_budget)
        cfg->recv_budget =
            cfg->host_capacity / 4 > (64ull << 20) ? cfg->host_capacity / 4 : 64ull << 20;
    return 0;
}
