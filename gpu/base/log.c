/* Formatting a log line for a library's callback: see log.h. */
#include "gpu/base/log.h"

#include <stdio.h>

void kvs_vlogf(kvs_log_fn fn, void *ctx, kvs_log_level level, const char *fmt, va_list ap)
{
    if (!fn)
        return;
    char line[512];
    vsnprintf(line, sizeof line, fmt, ap);
    fn(ctx, level, line);
}
