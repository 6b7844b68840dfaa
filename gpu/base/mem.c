/* Allocation helpers: see mem.h. */
#include "gpu/base/mem.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void oom(size_t n)
{
    fprintf(stderr, "kvstash: out of memory allocating %zu bytes\n", n);
    abort();
}

void *kvs_xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        oom(n);
    return p;
}

void *kvs_xcalloc(size_t count, size_t size)
{
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p)
        oom(count * size);
    return p;
}

void *kvs_xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (!q)
        oom(n);
    return q;
}

char *kvs_xstrdup(const char *s)
{
    size_t n = strlen(s) + 1;
    char *p = kvs_xmalloc(n);
    memcpy(p, s, n);
    return p;
}

void *kvs_trymalloc(size_t n)
{
    return malloc(n ? n : 1);
}
