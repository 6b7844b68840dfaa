/* kvstashd's log: see log.h. Each line is written with one fprintf, which stdio locks,
 * so lines from different threads never interleave. */
#include "daemon/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

static kvs_log_level g_level = KVS_LOG_INFO;

void kvs_log_set_level(kvs_log_level level)
{
    g_level = level;
}
kvs_log_level kvs_log_get_level(void)
{
    return g_level;
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
    if (level > g_level)
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
    if (level <= g_level)
        emit(level, line);
}
