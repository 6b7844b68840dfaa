/* kvctl: private interface between the command table (main.c), the commands
 * (cmd_*.c) and the helpers they share (util.c).
 *
 * Every command is a kvctl_cmd: its name, argument synopsis, help text and a run
 * function that returns the process exit code (KVCTL_OK, KVCTL_FAIL when the call
 * failed, KVCTL_USAGE for bad arguments). Output goes to stdout, diagnostics to stderr
 * as "kvctl: <command>: <message>". kvctl is single-threaded except `bench`, whose
 * worker threads share only the (thread-safe) kvs_client and their own slots.
 */
#ifndef KVCTL_H
#define KVCTL_H

#include <getopt.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "kvstash.h"
#include "progress.h"

enum { KVCTL_OK = 0, KVCTL_FAIL = 1, KVCTL_USAGE = 2 };

/* Options given before the command (and --json anywhere); parsed once in main.c. */
typedef struct kvctl_globals {
    const char *target;
    const char *token;
    /* TLS (kvs_client_opts' tls_*): PEM file paths and the name override; NULL = unset. */
    const char *tls_ca, *tls_cert, *tls_key, *tls_server_name;
    int64_t timeout_ms;
    uint64_t chunk_bytes;
    bool json;
    kvctl_progress_mode progress; /* --progress / --no-progress (verify, flush, bench) */
} kvctl_globals;

typedef struct kvctl_cmd kvctl_cmd;
struct kvctl_cmd {
    const char *name;    /* "ns create" */
    const char *args;    /* synopsis after the name */
    const char *summary; /* one line for `kvctl help` */
    const char *help;    /* the rest of `kvctl help CMD` */
    /* argv[0] is the command's last word; options are parsed with kvctl_getopt. */
    int (*run)(const kvctl_cmd *cmd, const kvctl_globals *g, int argc, char **argv);
};

/* The commands (one definition each, in cmd_*.c). */
extern const kvctl_cmd kvctl_cmd_status, kvctl_cmd_ns_create, kvctl_cmd_ns_list, kvctl_cmd_ns_drop,
    kvctl_cmd_put, kvctl_cmd_get, kvctl_cmd_lookup, kvctl_cmd_exists, kvctl_cmd_delete,
    kvctl_cmd_key, kvctl_cmd_stats, kvctl_cmd_bench, kvctl_cmd_verify, kvctl_cmd_flush,
    kvctl_cmd_evict;

/* ------------------------------------------------------------------ diagnostics */

/* Prints "kvctl: <cmd>: <message>", the synopsis and a pointer to --help to stderr;
 * returns KVCTL_USAGE. */
int kvctl_usage(const kvctl_cmd *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Prints "kvctl: <cmd>: <err->msg>" to stderr; returns KVCTL_FAIL. */
int kvctl_fail(const kvctl_cmd *cmd, const kvs_err *err);
/* Prints "kvctl: <cmd>: <message>" to stderr; returns KVCTL_FAIL. */
int kvctl_failf(const kvctl_cmd *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* getopt_long over the command's long options (no short ones): returns the option's
 * val, -1 after the last option (positional arguments are argv[optind..argc)), or
 * '?' after printing a usage error for an unknown option or a missing value. Call it
 * with optind = 0 before the first call (GNU: restart the scan). */
int kvctl_getopt(const kvctl_cmd *cmd, int argc, char **argv, const struct option *opts);

/* Connects with the global options; prints the error itself. */
int kvctl_connect(const kvctl_cmd *cmd, const kvctl_globals *g, kvs_client **out);
/* kvctl_getopt for a command without options: KVCTL_OK, or KVCTL_USAGE after the usage
 * error. Positional arguments are then argv[optind..argc). */
int kvctl_no_options(const kvctl_cmd *cmd, int argc, char **argv);
/* For a command that takes neither options nor arguments: checks both, then connects.
 * KVCTL_OK with *out to close, or KVCTL_USAGE / KVCTL_FAIL with the error printed. */
int kvctl_connect_no_args(const kvctl_cmd *cmd, const kvctl_globals *g, int argc, char **argv,
                          kvs_client **out);

/* ------------------------------------------------------------------ parsing */

/* Unsigned decimal (or 0x hex) in [min, max]; false on anything else. */
bool kvctl_parse_u64(const char *s, uint64_t min, uint64_t max, uint64_t *out);
/* Byte size with an optional binary suffix: 512, 64K, 2M, 1G (also KiB/MiB/GiB). */
bool kvctl_parse_size(const char *s, uint64_t *out);
/* Block key: "hex:0a1b..." is raw bytes, anything else is the literal string. Fails
 * (message in why) on bad hex or a length outside 1..KVS_KEY_MAX. */
bool kvctl_parse_key(const char *s, kvs_key *out, char *why, size_t why_len);
/* Parses keys argv[0..n) into a new array (free()); prints a usage error on failure. */
int kvctl_parse_keys(const kvctl_cmd *cmd, int n, char **argv, kvs_key **out);

/* ------------------------------------------------------------------ output */

/* "2.00 MiB", "512 B": binary units. buf of at least 32 bytes. */
const char *kvctl_fmt_bytes(uint64_t v, char *buf, size_t len);
/* "1h02m03s", "4.2s". */
const char *kvctl_fmt_duration_ms(uint64_t ms, char *buf, size_t len);
/* Lowercase hex of n bytes into buf (2n+1 bytes). */
const char *kvctl_fmt_hex(const uint8_t *p, size_t n, char *buf, size_t len);

/* A text table: cells are added row-major, widths computed at print time; a column
 * whose body cells are all numbers (or "-") is right-aligned. */
typedef struct kvctl_table {
    size_t ncols, ncells, cap;
    char **cells;
} kvctl_table;

void kvctl_table_init(kvctl_table *t, size_t ncols, ...); /* ncols header strings */
void kvctl_table_cell(kvctl_table *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void kvctl_table_print(const kvctl_table *t, FILE *f);
void kvctl_table_free(kvctl_table *t);

/* A JSON writer that keeps the commas: open/close objects and arrays, add members
 * (key) or array elements (key NULL). Nesting up to 16 levels. */
typedef struct kvctl_json {
    FILE *f;
    int depth;
    bool first[16];
} kvctl_json;

void kvctl_json_init(kvctl_json *j, FILE *f);
/* kvctl_json_init, then the top-level object or array ('{' or '[') is opened. */
void kvctl_json_begin(kvctl_json *j, FILE *f, char bracket);
void kvctl_json_open(kvctl_json *j, const char *key, char bracket); /* '{' or '[' */
void kvctl_json_close(kvctl_json *j, char bracket);                 /* '}' or ']'; newline at 0 */
void kvctl_json_str(kvctl_json *j, const char *key, const char *v);
void kvctl_json_u64(kvctl_json *j, const char *key, uint64_t v);
void kvctl_json_num(kvctl_json *j, const char *key, double v);
void kvctl_json_bool(kvctl_json *j, const char *key, bool v);
/* Writes s as a JSON string literal (quotes and escapes). */
void kvctl_json_escape(FILE *f, const char *s);

/* cmd_ns.c: a namespace as a JSON object (member `key`, or an array element if NULL). */
void kvctl_json_ns(kvctl_json *j, const char *key, const kvs_ns_info *ns);
/* Raw payload bytes of one token of a namespace's blocks (L * 2 * H * D * dtype size). */
uint64_t kvctl_token_bytes(const kvs_ns_spec *spec);
/* Tokens held by a namespace (raw_bytes / token bytes), encoded bytes per token and
 * compression ratio (raw / stored); 0 where nothing is stored. */
void kvctl_ns_usage(const kvs_ns_info *ns, uint64_t *tokens, double *bytes_per_token,
                    double *ratio);

#endif
