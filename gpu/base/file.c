/* Small text files read whole: see file.h. */
#include "gpu/base/file.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int kvs_file_read_text(const char *what, const char *path, size_t max, char **out, size_t *len,
                       kvs_err *err)
{
    *out = NULL;
    *len = 0;
    char name[640]; /* how the messages name the file: "what: 'path'" or "path" */
    if (what)
        snprintf(name, sizeof name, "%s: '%s'", what, path);
    else
        snprintf(name, sizeof name, "%s", path);
    FILE *f = fopen(path, "rb");
    if (!f)
        return kvs_err_set(err, KVS_EIO, "%s: cannot read: %s", name, strerror(errno));
    char *buf = malloc(max + 1);
    if (!buf) {
        fclose(f);
        return kvs_err_set(err, KVS_ENOMEM, "%s: no memory to read %zu bytes", name, max);
    }
    size_t n = fread(buf, 1, max + 1, f);
    int bad = ferror(f);
    fclose(f);
    int rc = 0;
    if (bad)
        rc = kvs_err_set(err, KVS_EIO, "%s: cannot read: read error", name);
    else if (n > max)
        rc = kvs_err_set(err, KVS_EINVAL, "%s: larger than %zu bytes", name, max);
    else if (memchr(buf, 0, n)) /* a C string (gRPC's PEM text, our parsers) cannot carry it */
        rc = kvs_err_set(err, KVS_EINVAL, "%s: holds a NUL byte, not text", name);
    if (rc) {
        kvs_file_free_secret(buf, n);
        return rc;
    }
    buf[n] = 0;
    *out = buf;
    *len = n;
    return 0;
}

void kvs_file_free_secret(char *buf, size_t len)
{
    if (!buf)
        return;
    volatile char *v = buf; /* volatile: the stores are not optimized away before free */
    while (len--)
        *v++ = 0;
    free(buf);
}
