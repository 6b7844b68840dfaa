/* Log levels and the callback type libraries report through. Libraries never print:
 * gpu/, storage/ and libkvstash take an optional kvs_log_fn and leave printing to
 * kvstashd and kvctl. */
#ifndef KVS_BASE_LOG_H
#define KVS_BASE_LOG_H

#include <stdarg.h>

typedef enum kvs_log_level {
    KVS_LOG_ERROR = 0,
    KVS_LOG_WARN = 1,
    KVS_LOG_INFO = 2,
    KVS_LOG_DEBUG = 3,
} kvs_log_level;

/* Called with one complete line (no trailing newline); must be thread-safe. */
typedef void (*kvs_log_fn)(void *ctx, kvs_log_level level, const char *line);

/* Formats one line (up to 511 bytes; longer is cut) and hands it to fn, if fn is set: the
 * body of each library's own printf-like log function. */
void kvs_vlogf(kvs_log_fn fn, void *ctx, kvs_log_level level, const char *fmt, va_list ap)
    __attribute__((format(printf, 4, 0)));

#endif
