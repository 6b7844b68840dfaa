/* kvstashd's log: see log.h. Each line is written with one fprintf, which stdio locks,
 * so lines from different threads never interleave. JSON lines are built with cJSON (its
 * escaping of the message is the reason to use it); if that fails for want of memory,
 * the line goes out as text rather than not at all. */
#include "daemon/log.h"

#include <cjson/cJSON.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static _Atomic int g_level = KVS_LOG_INFO;
static _Atomic int g_format = KVS_LOG_TEXT;

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

void kvs_log_set_format(kvs_log_format format)
{
    atomic_store_explicit(&g_format, (int)format, memory_order_relaxed);
}

int kvs_log_format_parse(const char *s)
{
    if (strcmp(s, "text") == 0)
        return KVS_LOG_TEXT;
    if (strcmp(s, "json") == 0)
        return KVS_LOG_JSON;
    return -1;
}

const char *kvs_log_format_name(kvs_log_format format)
{
    return format == KVS_LOG_JSON ? "json" : "text";
}

static bool enabled(kvs_log_level level)
{
    return (int)level <= atomic_load_explicit(&g_level, memory_order_relaxed);
}

/* call_id 0 and method NULL: a line about no call. */
static void emit(kvs_log_level level, const char *component, uint64_t call_id, const char *method,
                 const char *msg)
{
    static const char *tags[] = {"ERROR", "WARN", "INFO", "DEBUG"};
    static const char *names[] = {"error", "warn", "info", "debug"};
    struct timespec ts;
    struct tm tm;
    char when[48];
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    size_t n = strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(when + n, sizeof when - n, ".%03ldZ", ts.tv_nsec / 1000000);
    if (atomic_load_explicit(&g_format, memory_order_relaxed) == KVS_LOG_JSON) {
        cJSON *o = cJSON_CreateObject();
        char *line = NULL;
        if (o && cJSON_AddStringToObject(o, "ts", when) &&
            cJSON_AddStringToObject(o, "level", names[level]) &&
            cJSON_AddStringToObject(o, "component", component) &&
            (!method || (cJSON_AddNumberToObject(o, "call_id", (double)call_id) &&
                         cJSON_AddStringToObject(o, "method", method))) &&
            cJSON_AddStringToObject(o, "msg", msg))
            line = cJSON_PrintUnformatted(o);
        cJSON_Delete(o);
        if (line) {
            fprintf(stderr, "%s\n", line);
            cJSON_free(line);
            return;
        }
    }
    if (method)
        fprintf(stderr, "%s %s call#%llu %s: %s\n", when, tags[level], (unsigned long long)call_id,
                method, msg);
    else
        fprintf(stderr, "%s %s %s\n", when, tags[level], msg);
}

static void vlog(kvs_log_level level, const char *component, uint64_t call_id, const char *method,
                 const char *fmt, va_list ap)
{
    if (!enabled(level))
        return;
    char line[1024];
    vsnprintf(line, sizeof line, fmt, ap);
    emit(level, component, call_id, method, line);
}

void kvs_log(kvs_log_level level, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vlog(level, "daemon", 0, NULL, fmt, ap);
    va_end(ap);
}

void kvs_log_call(kvs_log_level level, uint64_t call_id, const char *method, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vlog(level, "call", call_id, method ? method : "unknown", fmt, ap);
    va_end(ap);
}

void kvs_log_sink(void *ctx, kvs_log_level level, const char *line)
{
    if (enabled(level))
        emit(level, ctx ? (const char *)ctx : "daemon", 0, NULL, line);
}
