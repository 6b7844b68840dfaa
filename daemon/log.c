/* kvstashd's log: see log.h. Each line is written with one fprintf, which stdio locks,
 * so lines from different threads never interleave. */
#include "daemon/log.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

static _Atomic int g_level = KVS_LOG_INFO;

void kvs_log_set_level(kvs_log_level level)
{
    atomic_store_explicit(&g_level, (int)level, memory_order_relaxed);
}
kvs_log_level kvs_log_get_level(void)
{
    return (kvs_log_level)atomic_load_explicit(&g_level, memory_order_relaxed);
}

int kvs_log_level_parse(const char *s)
{
    static const char *names[] = {"error", "warn", "info", "debug"};
    for (int i = 0; i < 4; i++)
        if (strcmp(s, names[i]) == 0)
            return i;
    return -1;
}

static void emit(kvs_log_level level, const char *msg)
{
    static const char *tags[] = {"ERROR", "WARN", "INFO", "DEBUG"};
    struct timespec ts;
    struct tm tm;
    char when[32];
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%S", &tm);
    fprintf(stderr, "%s.%03ldZ %s %s\n", when, ts.tv_nsec / 1000000, tags[level], msg);
}

void kvs_log(kvs_log_level level, const char *fmt, ...)
{
    if ((int)level > atomic_load_explicit(&g_level, memory_order_relaxed))
        return;
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    emit(level, line);
}

void kvs_log_sink(void *ctx, kvs_log_level level, const char *line)
{
    if ((int)level <= atomic_load_explicit(&g_level, memory_order_relaxed))
        emit(level, line);
}
