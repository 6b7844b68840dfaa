/* kvstashd configuration: see config.h. The key table (`keys` below) is the one place a
 * setting is declared: its flag, YAML key, type, bounds, --help text and whether a reload
 * may change it live; the flag parser, the config file (daemon/conffile.c),
 * --print-config and main.c's SIGHUP reload all walk it. */
#include "daemon/config.h"

#include <errno.h>
#include <limits.h>
#include <getopt.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "daemon/conffile.h"
#include "daemon/log.h"
#include "gpu/base/mem.h"

/* Placeholder --print-config writes for a set token; refused as a token (config.h). */
#define SECRET_SET "<set>"

static unsigned default_threads(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 2 ? 2 : (n > 64 ? 64 : (unsigned)n);
}

void kvs_config_defaults(kvs_config *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    snprintf(cfg->listen, sizeof cfg->listen, "127.0.0.1:50051");
    cfg->host_capacity = 2ull << 30;
    cfg->max_message = 64ull << 20;
    cfg->threads = default_threads();
    cfg->codec_threads = cfg->threads;
    cfg->log_level = KVS_LOG_INFO;
    cfg->drain_timeout_s = 30;
    cfg->stats_interval_s = 60;
    cfg->max_keys = 4096;
    cfg->region_max_bytes = 64ull << 30;
    cfg->region_max_count = 1024;
    cfg->calib_tokens = 4096;
    cfg->max_namespaces = 1024;
    cfg->error_sample = 0.01;
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
    cfg->max_gets = 1024;
    cfg->max_gets_per_conn = 256;
    cfg->stream_idle_s = 30;
    cfg->events_queue = 16384;
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

/* "D[,D...]": CUDA device numbers in 0..KVS_GPU_LIST_MAX-1, each once, into a mask. */
static bool parse_gpu_list(const char *s, unsigned *mask)
{
    unsigned m = 0;
    char item[8];
    while (*s) {
        size_t n = strcspn(s, ",");
        unsigned dev;
        if (n == 0 || n >= sizeof item)
            return false;
        memcpy(item, s, n);
        item[n] = 0;
        if (!parse_uint(item, 0, KVS_GPU_LIST_MAX - 1, &dev) || (m >> dev & 1))
            return false;
        m |= 1u << dev;
        s += n;
        if (*s == ',' && !*++s)
            return false; /* a trailing comma */
    }
    *mask = m;
    return m != 0;
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

/* ---------------------------------------------------------------- the key table */

typedef enum vtype {
    T_STR,    /* a string field of `size` bytes */
    T_SIZE,   /* uint64_t bytes, kvs_parse_size, in lo..hi */
    T_UINT,   /* unsigned (or int) in lo..hi */
    T_ONOFF,  /* int: on = 1, off = 0 */
    T_LOG,    /* kvs_log_level */
    T_GPU,    /* int: auto, on, off, all, or a device list into the second field (mask) */
    T_GPUCAP, /* uint64_t bytes, or "N%" into the second field (unsigned) */
    T_WM,     /* "HIGH,LOW" into two unsigned fields */
    T_EVICT,  /* kvs_policy_kind */
    T_LOGFMT, /* kvs_log_format */
    T_SHARE,  /* double in 0..1 */
} vtype;

enum {
    O_AUTO = 1,     /* "auto" stands for the derived default (0 or "" in the field) */
    O_NONEMPTY = 2, /* T_STR: "" refused */
    O_NONE = 4,     /* T_STR: "none" stands for "" (nothing; "./none" names a file) */
    O_CORES = 8,    /* T_UINT with O_AUTO: "auto" is the core count (default_threads) */
};

typedef struct key_def {
    const char *key;  /* YAML key: the flag with '_' for '-' (test_config checks it) */
    const char *flag; /* long option, without the dashes */
    const char *arg;  /* --help's name for the value */
    vtype type;
    unsigned flags;   /* KVS_KEY_* */
    unsigned opt;     /* O_* */
    size_t off, size; /* the field in kvs_config */
    size_t off2;      /* T_GPUCAP, T_WM: the second field */
    uint64_t lo, hi;  /* T_SIZE, T_UINT bounds */
    const char *want; /* a bad value "is not <want>"; T_STR: what an empty value is told */
    const char *help; /* --help text; '\n' starts an indented continuation line */
} key_def;

#define FIELD(m) offsetof(kvs_config, m), sizeof(((kvs_config *)0)->m)
#define LIVE KVS_KEY_LIVE

/* Live keys are those main.c's reload applies (README "Config file" says why the others
 * need a restart); every other key keeps its value until the next start. */
static const key_def keys[] = {
    {"listen", "listen", "ADDR", T_STR, 0, O_NONEMPTY, FIELD(listen), 0, 0, 0, "empty address",
     "gRPC address, HOST:PORT or unix:PATH (default 127.0.0.1:50051;\nport 0 picks a free port)"},
    {"port_file", "port-file", "PATH", T_STR, 0, 0, FIELD(port_file), 0, 0, 0, NULL,
     "write the bound port number to PATH once listening"},
    {"host_capacity", "host-capacity", "SIZE", T_SIZE, LIVE, 0, FIELD(host_capacity), 0, 1,
     UINT64_MAX, "a size > 0", "bytes of the host RAM tier, e.g. 512M, 2G (default 2G)"},
    {"max_message", "max-message", "SIZE", T_SIZE, 0, 0, FIELD(max_message), 0, 4096,
     (1ull << 31) - 1, "a size in 4K..2G-1", "largest gRPC message accepted or sent (default 64M)"},
    {"threads", "threads", "N", T_UINT, 0, O_AUTO | O_CORES, FIELD(threads), 0, 1, 256, "in 1..256",
     "completion-queue threads (default auto: cores, at least 2)"},
    {"codec_threads", "codec-threads", "N", T_UINT, 0, O_AUTO | O_CORES, FIELD(codec_threads), 0, 1,
     1024, "in 1..1024", "thread-pool threads for CPU encode/decode (default auto: cores)"},
    {"gpu", "gpu", "auto|on|off|all|LIST", T_GPU, 0, 0, FIELD(gpu), offsetof(kvs_config, gpu_mask),
     0, 0, "auto, on, off, all or a list of devices such as 0,2",
     "GPU codec engine: auto uses one when present (default),\non refuses to start without one; "
     "all: one engine and GPU tier\nper device; LIST: on those devices (e.g. 0,1,3); --no-gpu = "
     "--gpu off"},
    {"gpu_device", "gpu-device", "N", T_UINT, 0, 0, FIELD(gpu_device), 0, 0, 255, "in 0..255",
     "CUDA device of the engine (default 0)"},
    {"gpu_capacity", "gpu-capacity", "SIZE|N%", T_GPUCAP, 0, 0, FIELD(gpu_capacity),
     offsetof(kvs_config, gpu_capacity_pct), 0, 0, NULL,
     "GPU tier, per device: bytes of device memory, or a share of\nits free memory at start; 0 = "
     "no GPU "
     "tier (default 25%)"},
    {"gpu_watermarks", "gpu-watermarks", "H,L", T_WM, 0, 0, FIELD(gpu_high_pct),
     offsetof(kvs_config, gpu_low_pct), 0, 0, NULL,
     "demote GPU blocks to the host tier above H% of the GPU\ntier, down to L% (default 90,80)"},
    {"host_pinned", "host-pinned", "on|off", T_ONOFF, 0, 0, FIELD(host_pinned), 0, 0, 0, NULL,
     "with a GPU engine: host blocks and payload buffers in pinned\nmemory (64 MiB slabs), "
     "moved by DMA (default on)"},
    {"log_level", "log-level", "LEVEL", T_LOG, LIVE, 0, FIELD(log_level), 0, 0, 0, NULL,
     "error, warn, info or debug (default info)"},
    {"log_format", "log-format", "text|json", T_LOGFMT, LIVE, 0, FIELD(log_format), 0, 0, 0, NULL,
     "log lines as text (default) or one JSON object per line\n(ts, level, component, msg, "
     "call_id, method)"},
    {"metrics_listen", "metrics-listen", "ADDR", T_STR, 0, 0, FIELD(metrics_listen), 0, 0, 0, NULL,
     "serve HTTP /metrics (Prometheus), /healthz and /readyz on\nHOST:PORT, e.g. "
     "127.0.0.1:9464 (default: off)"},
    {"events_listen", "events-listen", "ENDPOINT", T_STR, 0, 0, FIELD(events_listen), 0, 0, 0, NULL,
     "publish KV block events for cache-aware routers (vLLM's\nformat: ZMQ PUB, msgpack) on "
     "tcp://HOST:PORT or ipc://PATH,\ne.g. tcp://127.0.0.1:5557 (default: off)"},
    {"events_topic", "events-topic", "TOPIC", T_STR, 0, O_AUTO, FIELD(events_topic), 0, 0, 0, NULL,
     "topic prefix of the events: each message's topic is\nTOPIC@NAMESPACE (default auto: "
     "kv@<hostname>)"},
    {"events_queue", "events-queue", "N", T_UINT, 0, 0, FIELD(events_queue), 0, 1, 1u << 22,
     "in 1..4194304",
     "events held for the publisher; past it they are dropped\nand counted, never waited for "
     "(default 16384)"},
    {"token", "token", "TOKEN", T_STR, LIVE | KVS_KEY_SECRET, 0, FIELD(token), 0, 0, 0, NULL,
     "require 'authorization: Bearer TOKEN' on KvStash calls"},
    {"admin_token", "admin-token", "TOKEN", T_STR, LIVE | KVS_KEY_SECRET, 0, FIELD(admin_token), 0,
     0, 0, NULL, "require this token on KvAdmin calls (Health is open)"},
    {"token_file", "token-file", "PATH", T_STR, LIVE, 0, FIELD(token_file), 0, 0, 0, NULL,
     "read the KvStash token from PATH (the file's content, a\ntrailing newline dropped); "
     "not with --token"},
    {"admin_token_file", "admin-token-file", "PATH", T_STR, LIVE, 0, FIELD(admin_token_file), 0, 0,
     0, NULL, "read the KvAdmin token from PATH; not with --admin-token"},
    {"tenant_tokens", "tenant-tokens", "PATH", T_STR, LIVE, 0, FIELD(tenant_tokens), 0, 0, 0, NULL,
     "per-namespace tokens: lines \"NAMESPACE TOKEN\" (README\n\"Tenants\"); a tenant token "
     "reaches only its namespaces"},
    {"tenant_host_quota", "tenant-host-quota", "SIZE", T_SIZE, 0, O_AUTO, FIELD(tenant_host_quota),
     0, 1ull << 20, UINT64_MAX, "a size >= 1M",
     "the most host tier a tenant token may give a namespace it\ncreates (host_quota_bytes; "
     "asking none gets this), so a\ntenant cannot opt out of quotas (default auto: a quarter of "
     "the\nhost capacity)"},
    {"tenant_gpu_quota", "tenant-gpu-quota", "SIZE", T_SIZE, 0, O_AUTO, FIELD(tenant_gpu_quota), 0,
     1ull << 20, UINT64_MAX, "a size >= 1M",
     "the same for the GPU tier (gpu_quota_bytes) (default auto:\na quarter of the GPU tier; "
     "none without one)"},
    {"tenant_disk_quota", "tenant-disk-quota", "SIZE", T_SIZE, 0, O_AUTO, FIELD(tenant_disk_quota),
     0, 1ull << 20, UINT64_MAX, "a size >= 1M",
     "the same for the disk tier (disk_quota_bytes) (default auto:\na quarter of "
     "--disk-capacity; none without --data-dir)"},
    {"tls_cert", "tls-cert", "PATH", T_STR, 0, 0, FIELD(tls_cert), 0, 0, 0, NULL,
     "TLS on the TCP listener: the server's certificate chain,\nPEM, leaf first (README \"TLS\"); "
     "needs --tls-key; not with\na unix: listen address"},
    {"tls_key", "tls-key", "PATH", T_STR, 0, 0, FIELD(tls_key), 0, 0, 0, NULL,
     "the private key of --tls-cert, PEM, unencrypted (mode 0600)"},
    {"tls_client_ca", "tls-client-ca", "PATH", T_STR, 0, 0, FIELD(tls_client_ca), 0, 0, 0, NULL,
     "mutual TLS: clients must present a certificate signed by a\nCA in this PEM file "
     "(needs --tls-cert)"},
    {"drain_timeout", "drain-timeout", "SEC", T_UINT, LIVE, 0, FIELD(drain_timeout_s), 0, 0, 86400,
     "in 0..86400", "on SIGTERM, wait this long for in-flight calls (default 30)"},
    {"stats_interval", "stats-interval", "SEC", T_UINT, LIVE, 0, FIELD(stats_interval_s), 0, 0,
     86400, "in 0..86400", "log a stats line every SEC seconds, 0 = never (default 60)"},
    {"max_keys", "max-keys", "N", T_UINT, 0, 0, FIELD(max_keys), 0, 1, 1u << 20, "in 1..1048576",
     "keys per Lookup/Exists/Delete call (default 4096)"},
    {"calib_tokens", "calib-tokens", "N", T_UINT, 0, 0, FIELD(calib_tokens), 0, 1, 1u << 24,
     "in 1..16777216",
     "rotatekv-*: key tokens that calibrate the channel order\nbefore it is frozen (default 4096)"},
    {"error_sample", "error-sample", "SHARE", T_SHARE, LIVE, 0, FIELD(error_sample), 0, 0, 0,
     "a share of Puts in 0..1",
     "share of Puts whose encoded block is decoded again and\nmeasured against its input, where "
     "a namespace sets no\nerror_sample (README \"Namespace options\"); 0 = none\n(default "
     "0.01)"},
    {"data_dir", "data-dir", "PATH", T_STR, 0, O_NONEMPTY | O_NONE, FIELD(data_dir), 0, 0, 0,
     "empty path",
     "disk tier: an LMDB environment in PATH (created if missing\nor empty; a foreign directory "
     "is refused); default: none"},
    {"data_dir_reset", "data-dir-reset", NULL, T_ONOFF, KVS_KEY_SWITCH, 0, FIELD(data_dir_reset), 0,
     0, 0, NULL,
     "start a new, empty store where --data-dir holds an empty,\ntruncated or damaged data.mdb "
     "(kept as data.mdb.broken-TIME,\nnever deleted); without it such a directory is refused\n"
     "(in the file: data_dir_reset: on|off, default off)"},
    {"disk_capacity", "disk-capacity", "SIZE", T_SIZE, 0, 0, FIELD(disk_capacity), 0, 1ull << 20,
     UINT64_MAX, "a size >= 1M", "byte budget of the disk tier (default 16G)"},
    {"disk_max_blocks", "disk-max-blocks", "N", T_UINT, 0, O_AUTO, FIELD(disk_max_blocks), 0, 1024,
     UINT_MAX, "in 1024..4294967295",
     "records the disk tier holds at most: each is indexed in\nmemory (about 512 bytes), so "
     "this bounds the index; past it\nthe oldest non-durable records are evicted (default "
     "auto:\nthe host capacity / 4096, at least 1048576)"},
    {"host_watermarks", "host-watermarks", "H,L", T_WM, 0, 0, FIELD(host_high_pct),
     offsetof(kvs_config, host_low_pct), 0, 0, NULL,
     "with --data-dir: write idle host blocks to the disk tier in\nthe background above H% "
     "of "
     "the host tier, down to L%\n(default 90,80)"},
    {"spill_queue", "spill-queue", "SIZE", T_SIZE, 0, O_AUTO, FIELD(spill_queue), 0, 1, UINT64_MAX,
     "a size > 0",
     "with --data-dir: most bytes of host blocks waiting for the\ndisk writer; past it, host "
     "victims are dropped (default\nauto: a quarter of --host-capacity)"},
    {"promote", "promote", "on|off", T_ONOFF, 0, 0, FIELD(promote), 0, 0, 0, NULL,
     "a Get moves a disk block to the host tier, a host block to\nthe GPU tier below its high "
     "watermark (default on)"},
    {"flush_on_exit", "flush-on-exit", "on|off", T_ONOFF, 0, 0, FIELD(flush_on_exit), 0, 0, 0, NULL,
     "with --data-dir: write host blocks to disk at shutdown, so\na restart finds them "
     "(default on)"},
    {"eviction", "eviction", "lru|s3fifo", T_EVICT, LIVE, 0, FIELD(eviction), 0, 0, 0, NULL,
     "host tier eviction order: least recently used, or S3-FIFO\n(scan-resistant: one-off "
     "blocks leave before re-read\nones; a 30% small queue) (default lru)"},
    {"recv_budget", "recv-budget", "SIZE", T_SIZE, 0, O_AUTO, FIELD(recv_budget), 0, 1ull << 20,
     UINT64_MAX, "a size >= 1M",
     "memory for Put payloads being received, all streams together;\na Put past it gets "
     "RESOURCE_EXHAUSTED (default auto: a quarter\nof --host-capacity, at least 64M)"},
    {"max_puts", "max-puts", "N", T_UINT, 0, 0, FIELD(max_puts), 0, 1, 1u << 20, "in 1..1048576",
     "Put streams open at once (default 1024)"},
    {"max_puts_per_conn", "max-puts-per-conn", "N", T_UINT, 0, 0, FIELD(max_puts_per_conn), 0, 1,
     1u << 20, "in 1..1048576", "...from one client connection (default 256)"},
    {"max_namespaces", "max-namespaces", "N", T_UINT, 0, 0, FIELD(max_namespaces), 0, 1, 1u << 20,
     "in 1..1048576",
     "namespaces that may exist (each holds its codecs' state); a\ncreate past it gets "
     "RESOURCE_EXHAUSTED, restored ones always\nload (default 1024)"},
    {"max_gets", "max-gets", "N", T_UINT, 0, 0, FIELD(max_gets), 0, 1, 1u << 20, "in 1..1048576",
     "Get and GetMany streams open at once (default 1024)"},
    {"max_gets_per_conn", "max-gets-per-conn", "N", T_UINT, 0, 0, FIELD(max_gets_per_conn), 0, 1,
     1u << 20, "in 1..1048576", "...from one client connection (default 256)"},
    {"stream_idle", "stream-idle", "SEC", T_UINT, LIVE, 0, FIELD(stream_idle_s), 0, 1, 86400,
     "in 1..86400",
     "cancel a Put or Get stream that made no progress for SEC\nseconds, returning its memory "
     "(default 30)"},
    {"region_socket", "region-socket", "PATH", T_STR, 0, O_NONEMPTY | O_AUTO, FIELD(region_socket),
     0, 0, 0, "empty path ('none' for none)",
     "Unix socket where co-located clients register shared memory\nfor PutMany/GetMany without "
     "payload copies (README \"Data\nplane\"); 'none' for none (default auto: <listen "
     "path>.region"
     "\nfor a unix: listen address, else none)"},
    {"region_max_bytes", "region-max-bytes", "SIZE", T_SIZE, 0, 0, FIELD(region_max_bytes), 0,
     1ull << 20, UINT64_MAX, "a size >= 1M", "shared memory registered, all clients (default 64G)"},
    {"region_max_count", "region-max-count", "N", T_UINT, 0, 0, FIELD(region_max_count), 0, 1,
     1u << 16, "in 1..65536",
     "regions registered (shared memory and CUDA IPC), all clients, and\nconnections to the "
     "region socket at once (default 1024)"},
    {"region_max_per_client", "region-max-per-client", "N", T_UINT, 0, O_AUTO,
     FIELD(region_max_per_client), 0, 1, 1u << 16, "in 1..65536",
     "the same for one client process (the socket's peer), so that\none cannot take every "
     "place (default auto: a quarter of\nregion_max_count, at least 1)"},
};

_Static_assert(sizeof keys / sizeof keys[0] == KVS_CONFIG_NKEYS,
               "KVS_CONFIG_NKEYS (config.h) must count the key table");

int kvs_config_key_find(const char *key)
{
    for (int i = 0; i < KVS_CONFIG_NKEYS; i++)
        if (strcmp(keys[i].key, key) == 0)
            return i;
    return -1;
}

const char *kvs_config_key_name(int i)
{
    return keys[i].key;
}

const char *kvs_config_key_flag(int i)
{
    return keys[i].flag;
}

unsigned kvs_config_key_flags(int i)
{
    return keys[i].flags;
}

/* "--flag", "FILE:LINE: key" or "ENVVAR": how an error names a value's source. */
static void source_name(const kvs_config *cfg, const key_def *k, kvs_config_src_kind src,
                        uint32_t line, const char *env, char *buf, size_t cap)
{
    switch (src) {
    case KVS_SRC_FLAG:
        snprintf(buf, cap, "--%s", k->flag);
        break;
    case KVS_SRC_FILE:
        snprintf(buf, cap, "%s:%u: %s", cfg->file, line, k->key);
        break;
    case KVS_SRC_ENV:
        snprintf(buf, cap, "%s", env ? env : k->key);
        break;
    default:
        snprintf(buf, cap, "%s", k->key);
    }
}

static void *field(kvs_config *cfg, size_t off)
{
    return (char *)cfg + off;
}

static const void *cfield(const kvs_config *cfg, size_t off)
{
    return (const char *)cfg + off;
}

static void put_uint(kvs_config *cfg, size_t off, unsigned v)
{
    memcpy(field(cfg, off), &v, sizeof v); /* unsigned and int fields alike (4 bytes) */
}

static unsigned get_uint(const kvs_config *cfg, size_t off)
{
    unsigned v;
    memcpy(&v, cfield(cfg, off), sizeof v);
    return v;
}

int kvs_config_key_set(kvs_config *cfg, int i, const char *v, kvs_config_src_kind src,
                       uint32_t line, const char *env, kvs_err *err)
{
    const key_def *k = &keys[i];
    char w[600];
    source_name(cfg, k, src, line, env, w, sizeof w);
    bool is_auto = (k->opt & O_AUTO) && strcmp(v, "auto") == 0;
    uint64_t size;
    unsigned u, mask = 0;
    switch (k->type) {
    case T_STR: {
        size_t n = strlen(v);
        if (!n && (k->opt & O_NONEMPTY))
            return kvs_err_set(err, KVS_EINVAL, "%s: %s", w, k->want);
        if ((k->flags & KVS_KEY_SECRET) && strcmp(v, SECRET_SET) == 0)
            return kvs_err_set(err, KVS_EINVAL,
                               "%s: '" SECRET_SET "' is what --print-config shows for a set "
                               "token, not a token: write the token itself",
                               w);
        if (is_auto || ((k->opt & O_NONE) && strcmp(v, "none") == 0))
            n = 0, v = "";
        if (n >= k->size)
            return kvs_err_set(err, KVS_EINVAL, "%s: longer than %zu characters", w, k->size - 1);
        memcpy(field(cfg, k->off), v, n + 1);
        break;
    }
    case T_SIZE:
        if (is_auto)
            size = 0;
        else if (!kvs_parse_size(v, &size) || size < k->lo || size > k->hi)
            return kvs_err_set(err, KVS_EINVAL, "%s: '%.64s' is not %s%s", w, v, k->want,
                               (k->opt & O_AUTO) ? " (or auto)" : "");
        memcpy(field(cfg, k->off), &size, sizeof size);
        break;
    case T_UINT:
        if (is_auto)
            u = (k->opt & O_CORES) ? default_threads() : 0; /* 0: derived where it is used */
        else if (!parse_uint(v, (unsigned)k->lo, (unsigned)k->hi, &u))
            return kvs_err_set(err, KVS_EINVAL, "%s: '%.64s' is not %s%s", w, v, k->want,
                               (k->opt & O_AUTO) ? " (or auto)" : "");
        put_uint(cfg, k->off, u);
        break;
    case T_ONOFF:
        if (strcmp(v, "on") && strcmp(v, "off"))
            return kvs_err_set(err, KVS_EINVAL, "%s: '%.64s' is not on or off", w, v);
        put_uint(cfg, k->off, v[1] == 'n');
        break;
    case T_LOG: {
        int lvl = kvs_log_level_parse(v);
        if (lvl < 0)
            return kvs_err_set(err, KVS_EINVAL, "%s: '%.64s' is not error, warn, info or debug", w,
                               v);
        put_uint(cfg, k->off, (unsigned)lvl);
        break;
    }
    case T_GPU:
        if (strcmp(v, "auto") == 0)
            u = KVS_GPU_AUTO;
        else if (strcmp(v, "on") == 0)
            u = KVS_GPU_ON;
        else if (strcmp(v, "off") == 0)
            u = KVS_GPU_OFF;
        else if (strcmp(v, "all") == 0)
            u = KVS_GPU_ALL;
        else if (parse_gpu_list(v, &mask))
            u = KVS_GPU_LIST;
        else
            return kvs_err_set(err, KVS_EINVAL,
                               "%s: '%.64s' is not auto, on, off, all or a list of device "
                               "numbers in 0..%d (e.g. 0,2)",
                               w, v, KVS_GPU_LIST_MAX - 1);
        put_uint(cfg, k->off, u);
        put_uint(cfg, k->off2, u == KVS_GPU_LIST ? mask : 0);
        break;
    case T_GPUCAP: {
        size_t n = strlen(v);
        if (n > 1 && v[n - 1] == '%') {
            char pct[8];
            if (n > sizeof pct ||
                (memcpy(pct, v, n - 1), pct[n - 1] = 0, !parse_uint(pct, 1, 95, &u)))
                return kvs_err_set(err, KVS_EINVAL, "%s: '%.64s' is not a share in 1%%..95%%", w,
                                   v);
            size = 0;
        } else if (kvs_parse_size(v, &size)) {
            u = 0; /* 0 bytes and no share: no GPU tier */
        } else {
            return kvs_err_set(err, KVS_EINVAL,
                               "%s: '%.64s' is neither a size (e.g. 8G) nor a share (e.g. 25%%)", w,
                               v);
        }
        memcpy(field(cfg, k->off), &size, sizeof size);
        put_uint(cfg, k->off2, u);
        break;
    }
    case T_WM: {
        unsigned hi, lo;
        if (!parse_watermarks(v, &hi, &lo))
            return kvs_err_set(err, KVS_EINVAL,
                               "%s: '%.64s' is not HIGH,LOW with 0 <= LOW < HIGH <= 100", w, v);
        put_uint(cfg, k->off, hi);
        put_uint(cfg, k->off2, lo);
        break;
    }
    case T_LOGFMT: {
        int fmt = kvs_log_format_parse(v);
        if (fmt < 0)
            return kvs_err_set(err, KVS_EINVAL, "%s: '%.64s' is not text or json", w, v);
        put_uint(cfg, k->off, (unsigned)fmt);
        break;
    }
    case T_SHARE: {
        char *end;
        errno = 0;
        double d = strtod(v, &end);
        if (errno || end == v || *end || !(d >= 0 && d <= 1))
            return kvs_err_set(err, KVS_EINVAL, "%s: '%.64s' is not %s", w, v, k->want);
        memcpy(field(cfg, k->off), &d, sizeof d);
        break;
    }
    case T_EVICT: {
        kvs_policy_kind kind;
        if (kvs_policy_kind_parse(v, &kind, NULL))
            return kvs_err_set(err, KVS_EINVAL, "%s: '%.64s' is not lru or s3fifo", w, v);
        put_uint(cfg, k->off, (unsigned)kind);
        break;
    }
    }
    cfg->src[i].kind = (uint8_t)src;
    cfg->src[i].line = line;
    return 0;
}

/* 2G, 64M, 4K or bytes: the largest unit that divides the value. */
static void fmt_size(uint64_t v, char *buf, size_t cap)
{
    static const char units[] = "KMGT";
    int u = -1;
    while (u < 3 && v && v % 1024 == 0) {
        v /= 1024;
        u++;
    }
    if (u < 0)
        snprintf(buf, cap, "%llu", (unsigned long long)v);
    else
        snprintf(buf, cap, "%llu%c", (unsigned long long)v, units[u]);
}

void kvs_config_key_value(const kvs_config *cfg, int i, char *buf, size_t cap)
{
    static const char *levels[] = {"error", "warn", "info", "debug"};
    static const char *gpu[] = {"auto", "on", "off", "all"};
    const key_def *k = &keys[i];
    uint64_t size;
    unsigned u = k->type == T_STR || k->type == T_SHARE ? 0 : get_uint(cfg, k->off);
    double d;
    switch (k->type) {
    case T_STR: {
        const char *s = cfield(cfg, k->off);
        if (k->flags & KVS_KEY_SECRET)
            s = s[0] ? SECRET_SET : "";
        else if ((k->opt & O_AUTO) && !s[0])
            s = "auto";
        else if ((k->opt & O_NONE) && !s[0])
            s = "none";
        snprintf(buf, cap, "%s", s);
        break;
    }
    case T_SIZE:
        memcpy(&size, cfield(cfg, k->off), sizeof size);
        if ((k->opt & O_AUTO) && size == 0)
            snprintf(buf, cap, "auto");
        else
            fmt_size(size, buf, cap);
        break;
    case T_UINT:
        if ((k->opt & O_AUTO) && u == 0)
            snprintf(buf, cap, "auto");
        else
            snprintf(buf, cap, "%u", u);
        break;
    case T_ONOFF:
        snprintf(buf, cap, "%s", u ? "on" : "off");
        break;
    case T_LOG:
        snprintf(buf, cap, "%s", levels[u < 4 ? u : 2]);
        break;
    case T_GPU:
        if (u == KVS_GPU_LIST) {
            size_t at = 0;
            unsigned m = get_uint(cfg, k->off2);
            buf[0] = 0;
            for (int dev = 0; dev < KVS_GPU_LIST_MAX && at < cap; dev++)
                if (m >> dev & 1)
                    at += (size_t)snprintf(buf + at, cap - at, "%s%d", at ? "," : "", dev);
        } else {
            snprintf(buf, cap, "%s", gpu[u < 4 ? u : 0]);
        }
        break;
    case T_GPUCAP:
        memcpy(&size, cfield(cfg, k->off), sizeof size);
        if (get_uint(cfg, k->off2))
            snprintf(buf, cap, "%u%%", get_uint(cfg, k->off2));
        else
            fmt_size(size, buf, cap);
        break;
    case T_WM:
        snprintf(buf, cap, "%u,%u", u, get_uint(cfg, k->off2));
        break;
    case T_EVICT:
        snprintf(buf, cap, "%s", kvs_policy_name((kvs_policy_kind)u));
        break;
    case T_LOGFMT:
        snprintf(buf, cap, "%s", kvs_log_format_name((kvs_log_format)u));
        break;
    case T_SHARE: /* the shortest form that reads back to the same double */
        memcpy(&d, cfield(cfg, k->off), sizeof d);
        for (int prec = 6; prec <= 17; prec++) {
            snprintf(buf, cap, "%.*g", prec, d);
            if (strtod(buf, NULL) == d)
                break;
        }
        break;
    }
}

void kvs_config_key_source(const kvs_config *cfg, int i, char *buf, size_t cap)
{
    const struct kvs_config_src *s = &cfg->src[i];
    switch (s->kind) {
    case KVS_SRC_FILE:
        snprintf(buf, cap, "file %s:%u", cfg->file, s->line);
        break;
    case KVS_SRC_FLAG:
        snprintf(buf, cap, "flag --%s", keys[i].flag);
        break;
    case KVS_SRC_ENV:
        snprintf(buf, cap, "env %s",
                 strcmp(keys[i].key, "token") == 0 ? "KVSTASH_TOKEN" : "KVSTASH_ADMIN_TOKEN");
        break;
    default:
        snprintf(buf, cap, "default");
    }
}

/* Bytes of key i's second field (T_GPUCAP, T_WM), 0 for the others. */
static size_t size2(const key_def *k)
{
    return k->type == T_GPUCAP || k->type == T_WM || k->type == T_GPU ? sizeof(unsigned) : 0;
}

bool kvs_config_key_equal(const kvs_config *a, const kvs_config *b, int i)
{
    const key_def *k = &keys[i];
    if (k->type == T_STR) /* bytes past the NUL may differ */
        return strcmp(cfield(a, k->off), cfield(b, k->off)) == 0;
    return memcmp(cfield(a, k->off), cfield(b, k->off), k->size) == 0 &&
           memcmp(cfield(a, k->off2), cfield(b, k->off2), size2(k)) == 0;
}

void kvs_config_key_copy(kvs_config *dst, const kvs_config *src, int i)
{
    const key_def *k = &keys[i];
    memcpy(field(dst, k->off), cfield(src, k->off), k->size);
    memcpy(field(dst, k->off2), cfield(src, k->off2), size2(k));
    dst->src[i] = src->src[i];
}

uint64_t kvs_config_tenant_host_quota(const kvs_config *cfg)
{
    return cfg->tenant_host_quota ? cfg->tenant_host_quota : cfg->host_capacity / 4;
}

uint64_t kvs_config_tenant_gpu_quota(const kvs_config *cfg, uint64_t gpu_tier)
{
    return cfg->tenant_gpu_quota ? cfg->tenant_gpu_quota : gpu_tier / 4;
}

uint64_t kvs_config_tenant_disk_quota(const kvs_config *cfg)
{
    if (cfg->tenant_disk_quota)
        return cfg->tenant_disk_quota;
    return cfg->data_dir[0] ? cfg->disk_capacity / 4 : 0;
}

uint64_t kvs_config_recv_budget(const kvs_config *cfg)
{
    if (cfg->recv_budget)
        return cfg->recv_budget;
    /* A quarter of the host tier, but room for a few large blocks even with a tiny one. */
    return cfg->host_capacity / 4 > (64ull << 20) ? cfg->host_capacity / 4 : 64ull << 20;
}

int kvs_config_events_topic(const kvs_config *cfg, char *buf, size_t cap, kvs_err *err)
{
    if (cfg->events_topic[0]) {
        snprintf(buf, cap, "%s", cfg->events_topic);
        return 0;
    }
    /* llm-d reads a topic kv@<pod>@<model>: the host names the pod, the namespace the
     * model (events.h). */
    char host[256];
    if (gethostname(host, sizeof host) != 0)
        return kvs_err_set(err, KVS_EIO, "events_topic: auto: gethostname: %s", strerror(errno));
    host[sizeof host - 1] = 0;
    snprintf(buf, cap, "kv@%s", host);
    return 0;
}

const char *kvs_config_region_socket(const kvs_config *cfg, char *buf, size_t cap)
{
    buf[0] = 0;
    if (strcmp(cfg->region_socket, "none") == 0)
        return buf;
    if (cfg->region_socket[0])
        snprintf(buf, cap, "%s", cfg->region_socket);
    else if (strncmp(cfg->listen, "unix:", 5) == 0 &&
             strlen(cfg->listen + 5) + sizeof ".region" <= cap)
        snprintf(buf, cap, "%s.region", cfg->listen + 5);
    return buf;
}

/* A YAML double-quoted scalar. */
static void put_quoted(FILE *f, const char *s)
{
    fputc('"', f);
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            fprintf(f, "\\%c", ch);
        else if (ch < 0x20 || ch == 0x7f)
            fprintf(f, "\\x%02x", ch);
        else
            fputc(ch, f);
    }
    fputc('"', f);
}

void kvs_config_print(const kvs_config *cfg, FILE *f)
{
    fprintf(f,
            "# kvstashd %s: effective configuration (kvstashd --print-config).\n"
            "# Every key with its value and, in the comment, where it came from; kvstashd\n"
            "# accepts this file back with --config (tokens excepted: \"" SECRET_SET
            "\" stands for one).\n",
            KVS_VERSION);
    for (int i = 0; i < KVS_CONFIG_NKEYS; i++) {
        char v[600], src[700];
        kvs_config_key_value(cfg, i, v, sizeof v);
        kvs_config_key_source(cfg, i, src, sizeof src);
        fprintf(f, "%s: ", keys[i].key);
        if (keys[i].type == T_STR)
            put_quoted(f, v);
        else
            fputs(v, f);
        fprintf(f, "  # %s\n", src);
    }
}

/* ---------------------------------------------------------------- flags */

static void usage(FILE *f)
{
    fprintf(f, "usage: kvstashd [--config FILE] [options]\n"
               "\n"
               "KV-cache offload store for LLM inference. Runs on embedded defaults with no\n"
               "options. A YAML config file overrides the defaults, and every option below\n"
               "overrides both; every option is also a key of the file, its name with _ for -\n"
               "(--host-capacity 4G is host_capacity: 4G). deploy/kvstashd.yaml lists them all.\n"
               "\n"
               "  --config FILE          read settings from FILE (default: $KVSTASHD_CONFIG, if\n"
               "                         set); SIGHUP re-reads it and applies what can change\n"
               "                         live (log_level, log_format, host_capacity, eviction,\n"
               "                         token, admin_token, the token files (re-read),\n"
               "                         stats_interval, drain_timeout, stream_idle); the\n"
               "                         others need a restart\n"
               "  --print-config         print the effective settings as a config file, each\n"
               "                         with where its value came from, and exit\n");
    for (int i = 0; i < KVS_CONFIG_NKEYS; i++) {
        char head[64];
        snprintf(head, sizeof head, "--%s%s%s", keys[i].flag, keys[i].arg ? " " : "",
                 keys[i].arg ? keys[i].arg : "");
        fprintf(f, "  %-22s ", head);
        if (strlen(head) > 22)
            fprintf(f, "\n  %-22s ", "");
        for (const char *h = keys[i].help; *h; h++) {
            fputc(*h, f);
            if (*h == '\n')
                fprintf(f, "  %-22s ", "");
        }
        fputc('\n', f);
    }
    fprintf(f, "  --no-gpu               same as --gpu off\n"
               "  -h, --help             this text\n"
               "  --version              print the version\n"
               "\n"
               "Tokens may also come from the environment (KVSTASH_TOKEN, KVSTASH_ADMIN_TOKEN)\n"
               "or from files (--token-file, --admin-token-file, --tenant-tokens), which keeps\n"
               "them out of the process list; the environment overrides the config file, flags\n"
               "override it. SIGHUP re-reads the token files even without --config.\n");
}

enum { O_CONFIG = 1000, O_PRINT, O_NO_GPU, O_VERSION };

/* A token given both as a value and as a file: which one is meant is a guess, so
 * neither wins (the error names where each came from). */
static int check_token_files(const kvs_config *cfg, kvs_err *err)
{
    static const char *pairs[2][2] = {{"token", "token_file"}, {"admin_token", "admin_token_file"}};
    for (int p = 0; p < 2; p++) {
        int t = kvs_config_key_find(pairs[p][0]), f = kvs_config_key_find(pairs[p][1]);
        if (!((const char *)cfield(cfg, keys[t].off))[0] ||
            !((const char *)cfield(cfg, keys[f].off))[0])
            continue;
        char w[600], other[700];
        source_name(cfg, &keys[f], cfg->src[f].kind, cfg->src[f].line, NULL, w, sizeof w);
        kvs_config_key_source(cfg, t, other, sizeof other);
        return kvs_err_set(err, KVS_EINVAL, "%s: conflicts with %s (%s): give the token one way", w,
                           pairs[p][0], other);
    }
    return 0;
}

/* The events endpoint's transport: ZMQ offers more (inproc, pgm...), but only these two
 * reach a router in another process. The rest is checked by the bind at start. */
static int check_events(const kvs_config *cfg, kvs_err *err)
{
    const char *l = cfg->events_listen;
    if (!l[0] || strncmp(l, "tcp://", 6) == 0 || strncmp(l, "ipc://", 6) == 0)
        return 0;
    int i = kvs_config_key_find("events_listen");
    char w[600];
    source_name(cfg, &keys[i], cfg->src[i].kind, cfg->src[i].line, NULL, w, sizeof w);
    return kvs_err_set(err, KVS_EINVAL, "%s: '%.64s' is not tcp://HOST:PORT or ipc://PATH", w, l);
}

/* The TLS keys that only make sense together, and TLS on a Unix socket: that socket is
 * guarded by its mode and group (0660) and its bytes never leave the host, where TLS would
 * add a handshake and certificates to manage but no protection (README "TLS"). The files
 * themselves are read by daemon/tls.c at start. */
static int check_tls(const kvs_config *cfg, kvs_err *err)
{
    int cert = kvs_config_key_find("tls_cert"), key = kvs_config_key_find("tls_key"),
        ca = kvs_config_key_find("tls_client_ca");
    char w[600];
    int at = -1;
    const char *why = NULL;
    if (cfg->tls_key[0] && !cfg->tls_cert[0])
        at = key, why = "needs tls_cert (--tls-cert), the certificate it belongs to";
    else if (cfg->tls_cert[0] && !cfg->tls_key[0])
        at = cert, why = "needs tls_key (--tls-key), the certificate's private key";
    else if (cfg->tls_client_ca[0] && !cfg->tls_cert[0])
        at = ca, why = "mutual TLS needs tls_cert and tls_key (the server's own certificate)";
    else if (cfg->tls_cert[0] && strncmp(cfg->listen, "unix:", 5) == 0)
        at = cert, why = "TLS applies to a TCP listener; the unix: listen address is guarded by "
                         "its mode and group instead (README \"TLS\")";
    if (at < 0)
        return 0;
    source_name(cfg, &keys[at], cfg->src[at].kind, cfg->src[at].line, NULL, w, sizeof w);
    return kvs_err_set(err, KVS_EINVAL, "%s: %s", w, why);
}

static int apply_env(kvs_config *cfg, const char *key, const char *var, kvs_err *err)
{
    const char *v = getenv(var);
    return v ? kvs_config_key_set(cfg, kvs_config_key_find(key), v, KVS_SRC_ENV, 0, var, err) : 0;
}

int kvs_config_parse_args(kvs_config *cfg, int argc, char **argv, kvs_err *err)
{
    struct option opts[KVS_CONFIG_NKEYS + 6];
    for (int i = 0; i < KVS_CONFIG_NKEYS; i++)
        opts[i] = (struct option){keys[i].flag,
                                  keys[i].flags & KVS_KEY_SWITCH ? no_argument : required_argument,
                                  NULL, i};
    opts[KVS_CONFIG_NKEYS + 0] = (struct option){"config", required_argument, NULL, O_CONFIG};
    opts[KVS_CONFIG_NKEYS + 1] = (struct option){"print-config", no_argument, NULL, O_PRINT};
    opts[KVS_CONFIG_NKEYS + 2] = (struct option){"no-gpu", no_argument, NULL, O_NO_GPU};
    opts[KVS_CONFIG_NKEYS + 3] = (struct option){"help", no_argument, NULL, 'h'};
    opts[KVS_CONFIG_NKEYS + 4] = (struct option){"version", no_argument, NULL, O_VERSION};
    opts[KVS_CONFIG_NKEYS + 5] = (struct option){NULL, 0, NULL, 0};

    /* First the whole command line, keeping the settings for last: the file comes before
     * them whatever their order (flags win). */
    int *given = kvs_xcalloc((size_t)argc + 1, sizeof *given);
    const char **vals = kvs_xcalloc((size_t)argc + 1, sizeof *vals);
    int n = 0, c, rc = 0;
    bool print = false;
    const char *file = getenv("KVSTASHD_CONFIG");
    optind = 0; /* glibc: a full rescan, as a SIGHUP reload parses argv again */
    opterr = 0;
    while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
        if (c >= 0 && c < KVS_CONFIG_NKEYS) {
            given[n] = c;
            vals[n++] = keys[c].flags & KVS_KEY_SWITCH ? "on" : optarg;
            continue;
        }
        switch (c) {
        case O_CONFIG:
            file = optarg;
            if (!file[0])
                rc = kvs_err_set(err, KVS_EINVAL, "--config: empty path");
            break;
        case O_PRINT:
            print = true;
            break;
        case O_NO_GPU:
            given[n] = kvs_config_key_find("gpu");
            vals[n++] = "off";
            break;
        case 'h':
            usage(stdout);
            rc = KVS_CONFIG_EXIT;
            break;
        case O_VERSION:
            printf("kvstashd %s\n", KVS_VERSION);
            rc = KVS_CONFIG_EXIT;
            break;
        case ':':
            rc = kvs_err_set(err, KVS_EINVAL, "%s: needs a value (see --help)", argv[optind - 1]);
            break;
        default:
            rc = kvs_err_set(err, KVS_EINVAL, "%s: unknown option (see --help)", argv[optind - 1]);
        }
        if (rc)
            goto out;
    }
    if (optind < argc) {
        rc = kvs_err_set(err, KVS_EINVAL, "%s: unexpected argument (see --help)", argv[optind]);
        goto out;
    }
    if (file && file[0]) {
        if (strlen(file) >= sizeof cfg->file) {
            rc = kvs_err_set(err, KVS_EINVAL, "--config: longer than %zu characters",
                             sizeof cfg->file - 1);
            goto out;
        }
        snprintf(cfg->file, sizeof cfg->file, "%s", file);
        if ((rc = kvs_conffile_apply(cfg, err)))
            goto out;
    }
    if ((rc = apply_env(cfg, "token", "KVSTASH_TOKEN", err)) ||
        (rc = apply_env(cfg, "admin_token", "KVSTASH_ADMIN_TOKEN", err)))
        goto out;
    for (int i = 0; i < n; i++)
        if ((rc = kvs_config_key_set(cfg, given[i], vals[i], KVS_SRC_FLAG, 0, NULL, err)))
            goto out;
    if ((rc = check_token_files(cfg, err)))
        goto out;
    if ((rc = check_tls(cfg, err)) || (rc = check_events(cfg, err)))
        goto out;
    if (cfg->data_dir_reset && !cfg->data_dir[0]) {
        int i = kvs_config_key_find("data_dir_reset");
        char w[600];
        source_name(cfg, &keys[i], cfg->src[i].kind, cfg->src[i].line, NULL, w, sizeof w);
        rc = kvs_err_set(err, KVS_EINVAL, "%s: needs %s", w,
                         cfg->src[i].kind == KVS_SRC_FLAG ? "--data-dir" : "data_dir");
        goto out;
    }
    rc = print ? KVS_CONFIG_PRINT : KVS_CONFIG_RUN;
out:
    free(given);
    free(vals);
    return rc;
}
