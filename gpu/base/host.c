/* Host facts: see host.h. */
#include "gpu/base/host.h"

#include <stdio.h>
#include <string.h>

char *kvs_host_boot_id(char *buf, size_t cap)
{
    if (cap == 0)
        return buf;
    buf[0] = 0;
    FILE *f = fopen("/proc/sys/kernel/random/boot_id", "r");
    if (f) {
        if (!fgets(buf, (int)cap, f))
            buf[0] = 0;
        fclose(f);
        buf[strcspn(buf, "\n")] = 0;
    }
    return buf;
}
