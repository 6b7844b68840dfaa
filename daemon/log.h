/* kvstashd's log: one line per event on stderr, which journald collects as is. Two
 * formats (--log-format): text, "<UTC time> <LEVEL> <message>", and json, one object per
 * line: {"ts", "level", "component", "msg"} and, for a line about one call, "call_id"
 * and "method" (the text line starts "call#<id> <method>: " instead). Components are
 * coarse: "daemon" (kvs_log), "call" (kvs_log_call), and for the libraries' lines
 * (kvs_log_sink) the name their owner passed as the sink's ctx ("store", "disk",
 * "region", "xfer").
 *
 * The level and the format are process-wide: set by main.c at start and again by a
 * SIGHUP reload while other threads log; each is an atomic read with relaxed order, since
 * a line logged the old way just before a change is harmless. */
#ifndef KVS_DAEMON_LOG_H
#define KVS_DAEMON_LOG_H

#include <stdint.h>

#include "gpu/base/log.h"

typedef enum kvs_log_format {
    KVS_LOG_TEXT = 0,
    KVS_LOG_JSON = 1,
} kvs_log_format;

void kvs_log_set_level(kvs_log_level level);
kvs_log_level kvs_log_get_level(void);
/* Parses "error", "warn", "info", "debug"; returns -1 otherwise. */
int kvs_log_level_parse(const char *s);
void kvs_log_set_format(kvs_log_format format);
/* Parses "text", "json"; returns -1 otherwise. */
int kvs_log_format_parse(const char *s);
const char *kvs_log_format_name(kvs_log_format format);

/* A line of component "daemon". */
void kvs_log(kvs_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* A line about one call (component "call"): its id and method (borrowed) go into the
 * line as request context. */
void kvs_log_call(kvs_log_level level, uint64_t call_id, const char *method, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* A kvs_log_fn for the libraries; ctx: the component's name (a string literal) or NULL
 * ("daemon"). */
void kvs_log_sink(void *ctx, kvs_log_level level, const char *line);

#endif
