/* kvstashd configuration (DESIGN §11): embedded defaults, then a YAML config file
 * (--config PATH or $KVSTASHD_CONFIG; daemon/conffile.h), then the tokens from the
 * environment, then command-line flags: each later source wins. One table (config.c,
 * `keys`) describes every setting once: its flag (--host-capacity), its YAML key (the
 * flag's name with '_' for '-': host_capacity), how its value is parsed and checked, how
 * it is printed back, and whether a SIGHUP reload may change it while the daemon runs
 * (KVS_KEY_LIVE). A value from any source goes through the same check, and an error
 * names where it came from: "--host-capacity: ...", "FILE:LINE: host_capacity: ...",
 * "KVSTASH_TOKEN: ...". Each value's source is kept (cfg->src) for --print-config.
 *
 * Threading: a kvs_config is a plain value; whoever holds one decides who may read it
 * (main.c: the loop thread changes only KVS_KEY_LIVE fields that no other thread reads).
 */
#ifndef KVS_DAEMON_CONFIG_H
#define KVS_DAEMON_CONFIG_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "gpu/base/err.h"
#include "gpu/base/log.h"
#include "storage/policy.h"

/* --gpu: auto and on use --gpu-device; all every device the process sees; a list of
 * device numbers those (gpu_mask), in ascending order. */
enum { KVS_GPU_AUTO = 0, KVS_GPU_ON = 1, KVS_GPU_OFF = 2, KVS_GPU_ALL = 3, KVS_GPU_LIST = 4 };
#define KVS_GPU_LIST_MAX 32 /* device numbers 0..31 in a --gpu list */

/* Number of settings in the key table (config.c checks it). */
#define KVS_CONFIG_NKEYS 53

typedef enum kvs_config_src_kind {
    KVS_SRC_DEFAULT = 0,
    KVS_SRC_FILE = 1,
    KVS_SRC_ENV = 2,
    KVS_SRC_FLAG = 3,
} kvs_config_src_kind;

typedef struct kvs_config {
    char listen[256];          /* gRPC address, host:port or unix:/path */
    char port_file[512];       /* if set, the bound port is written there once listening */
    uint64_t host_capacity;    /* bytes of the host tier */
    uint64_t max_message;      /* largest gRPC message accepted or sent */
    unsigned threads;          /* completion-queue threads (auto: cores, 2..64) */
    unsigned codec_threads;    /* libuv pool threads for CPU codec work (auto: as threads) */
    int gpu;                   /* KVS_GPU_AUTO, KVS_GPU_ON (fail without one), KVS_GPU_OFF,
                                * KVS_GPU_ALL, KVS_GPU_LIST (gpu_mask; fail without any) */
    unsigned gpu_mask;         /* KVS_GPU_LIST: bit d set for CUDA device d */
    int gpu_device;            /* CUDA device of the codec engine */
    uint64_t gpu_capacity;     /* bytes of the GPU tier; 0 = gpu_capacity_pct of free memory */
    unsigned gpu_capacity_pct; /* share of free device memory when gpu_capacity is 0 */
    unsigned gpu_high_pct, gpu_low_pct;   /* GPU tier demotion watermarks */
    unsigned host_high_pct, host_low_pct; /* host tier demotion (to disk) watermarks */
    kvs_log_level log_level;
    int log_format;           /* kvs_log_format (daemon/log.h): text or json lines */
    char metrics_listen[256]; /* HTTP /metrics, /healthz, /readyz: HOST:PORT, "" = off */
    /* KV events for routers (daemon/events.h, README "KV events"): the ZMQ endpoint to
     * bind ("" = off), the topic prefix ("" = auto: kv@<hostname>, kvs_config_events_topic)
     * and the events held for the publisher. */
    char events_listen[256];
    char events_topic[256];
    unsigned events_queue;
    char token[256];       /* data-path bearer token ("" = open) */
    char admin_token[256]; /* KvAdmin bearer token ("" = same rules as token) */
    /* Files the tokens are read from instead (daemon/tokens.h; "" = none; a file and its
     * token value both set is refused), and the tenant file (README "Tenants"). Paths
     * only: the files are read when the auth object is built, at start and each SIGHUP. */
    char token_file[512];
    char admin_token_file[512];
    char tenant_tokens[512];
    uint64_t tenant_host_quota; /* most host_quota_bytes a tenant token may give a namespace it
                                 * creates (and what it gets when it asks none); 0: auto */
    uint64_t tenant_gpu_quota;  /* the same for gpu_quota_bytes and disk_quota_bytes; 0: auto */
    uint64_t tenant_disk_quota;
    /* TLS of the gRPC listener (daemon/tls.h, README "TLS"): PEM files of the server's
     * certificate chain and key, and of the CA that signs client certificates (mutual
     * TLS); "" = plaintext / no client certificates. Read once at start. */
    char tls_cert[512];
    char tls_key[512];
    char tls_client_ca[512];
    unsigned drain_timeout_s;
    unsigned stats_interval_s;  /* 0 = no periodic stats line */
    unsigned max_keys;          /* keys per Lookup/Exists/Delete */
    unsigned calib_tokens;      /* RotateKV: tokens of keys that calibrate the channel order */
    unsigned max_namespaces;    /* namespaces that may exist (restored ones always load) */
    double error_sample;        /* share of Puts measured where a namespace sets none (0..1) */
    char data_dir[512];         /* disk tier directory ("" = no disk tier) */
    uint64_t disk_capacity;     /* byte budget of the disk tier */
    unsigned disk_max_blocks;   /* records of the disk tier at most; 0 = auto (storage/store.h
                                 * KVS_STORE_DISK_RECORDS_AUTO of the host capacity) */
    int host_pinned;            /* with a GPU engine: host blocks in pinned memory (default 1) */
    uint64_t spill_queue;       /* bytes of host blocks waiting for the disk writer; 0 = auto
                                 * (the store's host/4) */
    int promote;                /* 1: a Get of a disk block moves it to the host tier */
    int flush_on_exit;          /* 1: write host blocks to the disk tier at shutdown */
    kvs_policy_kind eviction;   /* host tier eviction policy (--eviction) */
    int data_dir_reset;         /* 1: a broken data.mdb is kept aside and a new store started */
    uint64_t recv_budget;       /* bytes of Put payloads being received; 0 = auto
                                 * (kvs_config_recv_budget) */
    unsigned max_puts;          /* Put streams open at once, all connections */
    unsigned max_puts_per_conn; /* ...and from one connection (one peer address) */
    unsigned max_gets;          /* Get and GetMany streams open at once, all connections */
    unsigned max_gets_per_conn; /* ...and from one connection */
    unsigned stream_idle_s;     /* a Put or Get stream without progress this long is cancelled */
    char region_socket[108];    /* shared-memory region socket: "" = auto, "none" = none
                                 * (kvs_config_region_socket) */
    uint64_t region_max_bytes;  /* bytes of shared memory registered, all clients together */
    unsigned region_max_count;  /* regions registered, and region-socket connections at once */
    unsigned region_max_per_client; /* ...of one client process; 0 = auto (a quarter) */
    char file[512];                 /* the config file read ("" = none), re-read on SIGHUP */
    struct kvs_config_src {
        uint8_t kind;        /* kvs_config_src_kind */
        uint32_t line;       /* KVS_SRC_FILE: 1-based line of the key */
    } src[KVS_CONFIG_NKEYS]; /* where each key's value came from (key index) */
} kvs_config;

/* Embedded defaults; every source KVS_SRC_DEFAULT, no file. */
void kvs_config_defaults(kvs_config *cfg);

enum { KVS_CONFIG_RUN = 0, KVS_CONFIG_EXIT = 1, KVS_CONFIG_PRINT = 2 };

/* Applies the config file, the environment's tokens and the flags in argv to cfg (which
 * holds the defaults) in that order, then checks the settings that depend on each other.
 * Returns KVS_CONFIG_RUN, KVS_CONFIG_EXIT (--help or --version printed: exit 0),
 * KVS_CONFIG_PRINT (--print-config: cfg is complete and checked, print it and exit 0), or
 * KVS_EINVAL / KVS_EIO with a message naming the flag, or the file, line and key. */
int kvs_config_parse_args(kvs_config *cfg, int argc, char **argv, kvs_err *err);

/* Writes cfg as YAML that kvstashd accepts back as a config file: every key, each with a
 * comment saying where its value came from; tokens as "<set>" (a value refused as a
 * token, so the printout never passes for one). */
void kvs_config_print(const kvs_config *cfg, FILE *f);

/* ---------------------------------------------------------------- the key table */

enum {
    KVS_KEY_LIVE = 1,   /* a SIGHUP reload applies a new value (main.c) */
    KVS_KEY_SECRET = 2, /* printed as "<set>", never logged */
    KVS_KEY_SWITCH = 4, /* its flag takes no value (--data-dir-reset means on) */
};

/* Index of a YAML key ("host_capacity") in the table, or -1. */
int kvs_config_key_find(const char *key);
const char *kvs_config_key_name(int i); /* "host_capacity" */
const char *kvs_config_key_flag(int i); /* "host-capacity" (without the dashes) */
unsigned kvs_config_key_flags(int i);   /* KVS_KEY_* bits */
/* Parses and checks value for key i and stores it in cfg with its source (line: for
 * KVS_SRC_FILE, cfg->file's line). Errors name the source: "--flag: ...",
 * "FILE:LINE: key: ...", "ENVVAR: ..." (env: the variable's name). */
int kvs_config_key_set(kvs_config *cfg, int i, const char *value, kvs_config_src_kind src,
                       uint32_t line, const char *env, kvs_err *err);
/* The value of key i as the config file would spell it ("2G", "90,80", "lru"); secrets
 * as "<set>" or "". */
void kvs_config_key_value(const kvs_config *cfg, int i, char *buf, size_t cap);
/* Where key i's value came from, in words: "default", "file kvstashd.yaml:3",
 * "flag --host-capacity", "env KVSTASH_TOKEN". */
void kvs_config_key_source(const kvs_config *cfg, int i, char *buf, size_t cap);
/* True if key i has the same value in a and b (secrets compared too). */
bool kvs_config_key_equal(const kvs_config *a, const kvs_config *b, int i);
/* Copies key i's value and source from src to dst. */
void kvs_config_key_copy(kvs_config *dst, const kvs_config *src, int i);

/* Effective values of the keys whose default is "auto" (derived from other keys). */
uint64_t kvs_config_recv_budget(const kvs_config *cfg);       /* auto: host/4, at least 64M */
uint64_t kvs_config_tenant_host_quota(const kvs_config *cfg); /* auto: host/4 */
/* auto: a quarter of the GPU tier the daemon runs (gpu_tier: its bytes, 0 without one) */
uint64_t kvs_config_tenant_gpu_quota(const kvs_config *cfg, uint64_t gpu_tier);
/* auto: disk_capacity/4 with a disk tier (data_dir), 0 without one */
uint64_t kvs_config_tenant_disk_quota(const kvs_config *cfg);
/* The events' topic prefix: events_topic, or "kv@<hostname>" for auto. KVS_EIO when the
 * host name cannot be read. */
int kvs_config_events_topic(const kvs_config *cfg, char *buf, size_t cap, kvs_err *err);
/* The region socket path, "" for none (auto: <listen path>.region for unix: listen). */
const char *kvs_config_region_socket(const kvs_config *cfg, char *buf, size_t cap);

/* Parses "512", "64K", "256M", "2G", "1T" (powers of 1024). Returns false on garbage or
 * overflow. */
int kvs_parse_size(const char *s, uint64_t *out);

#endif
