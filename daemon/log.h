/* kvstashd's log: one line per event on stderr, "<UTC time> <LEVEL> <message>", which
 * journald collects as is. The level is process-wide: set by main.c at start and again
 * by a SIGHUP reload (log_level) while other threads log; it is an atomic read with
 * relaxed order, since a line logged at the old level just before a change is harmless. */
#ifndef KVS_DAEMON_LOG_H
#define KVS_DAEMON_LOG_H

#include "gpu/base/log.h"

void kvs_log_set_level(kvs_log_level level);
kvs_log_level kvs_log_get_level(void);
/* Parses "error", "warn", "info", "debug"; returns -1 otherwise. */
int kvs_log_level_parse(const char *s);

void kvs_log(kvs_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* A kvs_log_fn for the libraries (ctx unused). */
void kvs_log_sink(void *ctx, kvs_log_level level, const char *line);

#endif
