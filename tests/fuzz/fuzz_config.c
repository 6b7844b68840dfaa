/* libFuzzer target: the daemon's config file and tenant-token file parsers (issue 14
 * item 6).
 *
 * Input: one selector byte, then the file's bytes. The bytes are written to an anonymous
 * file (memfd) and read through its /proc/self/fd path, as the daemon reads its files at
 * start and on SIGHUP: selector even = the YAML config (kvs_conffile_apply: libyaml's event
 * parser, then libcyaml, then each key's check), odd = the tenant token file
 * (kvs_tokens_load). Whatever the bytes, a refusal carries a message naming the file, and
 * nothing crashes or leaks (ASan's leak check runs at exit).
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "daemon/auth.h"
#include "daemon/conffile.h"
#include "daemon/config.h"
#include "daemon/tokens.h"

/* libFuzzer's entry point. */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1 || size > KVS_CONFFILE_MAX)
        return 0;
    int fd = memfd_create("kvs-fuzz", 0);
    if (fd < 0 || fchmod(fd, 0600) != 0) /* 0600: no "readable by others" warning per run */
        abort();
    size_t n = size - 1;
    if (n && write(fd, data + 1, n) != (ssize_t)n)
        abort();
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    kvs_config cfg;
    kvs_config_defaults(&cfg);
    kvs_err err = {0};
    int rc;
    if (data[0] % 2 == 0) {
        snprintf(cfg.file, sizeof cfg.file, "%s", path);
        rc = kvs_conffile_apply(&cfg, &err);
    } else {
        snprintf(cfg.tenant_tokens, sizeof cfg.tenant_tokens, "%s", path);
        struct kvs_auth *a = NULL;
        rc = kvs_tokens_load(&cfg, &a, &err);
        kvs_auth_destroy(a);
    }
    if (rc && strstr(err.msg, path) == NULL)
        abort(); /* a refusal names the file */
    close(fd);
    return 0;
}
