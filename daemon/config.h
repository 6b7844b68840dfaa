/* kvstashd configuration: embedded defaults overridden by command-line flags
 * (DESIGN §11; the YAML file comes later). Every value is validated here, and error
 * messages name the flag. */
#ifndef KVS_DAEMON_CONFIG_H
#define KVS_DAEMON_CONFIG_H

#include <stdint.h>

#include "gpu/base/err.h"
#include "gpu/base/log.h"
#include "storage/policy.h"

enum { KVS_GPU_AUTO = 0, KVS_GPU_ON = 1, KVS_GPU_OFF = 2 };

typedef struct kvs_config {
    char listen[256];          /* gRPC address, host:port or unix:/path */
    char port_file[512];       /* if set, the bound port is written there once listening */
    uint64_t host_capacity;    /* bytes of the host tier */
    uint64_t max_message;      /* largest gRPC message accepted or sent */
    unsigned threads;          /* completion-queue threads */
    unsigned codec_threads;    /* libuv pool threads for CPU codec work */
    int gpu;                   /* KVS_GPU_AUTO, KVS_GPU_ON (fail without one), KVS_GPU_OFF */
    int gpu_device;            /* CUDA device of the codec engine */
    uint64_t gpu_capacity;     /* bytes of the GPU tier; 0 = gpu_capacity_pct of free memory */
    unsigned gpu_capacity_pct; /* share of free device memory when gpu_capacity is 0 */
    unsigned gpu_high_pct, gpu_low_pct;   /* GPU tier demotion watermarks */
    unsigned host_high_pct, host_low_pct; /* host tier demotion (to disk) watermarks */
    kvs_log_level log_level;
    char token[256];       /* data-path bearer token ("" = open) */
    char admin_token[256]; /* KvAdmin bearer token ("" = same rules as token) */
    unsigned drain_timeout_s;
    unsigned stats_interval_s;  /* 0 = no periodic stats line */
    unsigned max_keys;          /* keys per Lookup/Exists/Delete */
    unsigned calib_tokens;      /* RotateKV: tokens of keys that calibrate the channel order */
    char data_dir[512];         /* disk tier directory ("" = no disk tier) */
    uint64_t disk_capacity;     /* byte budget of the disk tier */
    int host_pinned;            /* with a GPU engine: host blocks in pinned memory (default 1) */
    uint64_t spill_queue;       /* bytes of host blocks waiting for the disk writer; 0: host/4 */
    int promote;                /* 1: a Get of a disk block moves it to the host tier */
    int flush_on_exit;          /* 1: write host blocks to the disk tier at shutdown */
    kvs_policy_kind eviction;   /* host tier eviction policy (--eviction) */
    int data_dir_reset;         /* 1: a broken data.mdb is kept aside and a new store started */
    uint64_t recv_budget;       /* bytes of Put payloads being received, all calls; 0: host/4 */
    unsigned max_puts;          /* Put streams open at once, all connections */
    unsigned max_puts_per_conn; /* ...and from one connection (one peer address) */
    unsigned stream_idle_s;     /* a Put or Get stream without progress this long is cancelled */
    char region_socket[108];    /* shared-memory region socket ("" = none; "none" given) */
    uint64_t region_max_bytes;  /* bytes of shared memory registered, all clients together */
} kvs_config;

void kvs_config_defaults(kvs_config *cfg);

/* Parses argv into cfg. Returns 0 to run, 1 if --help/--version was printed (exit 0),
 * or KVS_EINVAL with a message naming the flag. */
int kvs_config_parse_args(kvs_config *cfg, int argc, char **argv, kvs_err *err);

/* Parses "512", "64K", "256M", "2G", "1T" (powers of 1024). Returns false on garbage or
 * overflow. */
int kvs_parse_size(const char *s, uint64_t *out);

#endif
