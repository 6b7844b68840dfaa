/* Facts about the host this process runs on. */
#ifndef KVS_BASE_HOST_H
#define KVS_BASE_HOST_H

#include <stddef.h>

/* The kernel's boot id (/proc/sys/kernel/random/boot_id, without the newline) into buf:
 * two processes read the same one only on the same host since the same boot, which is
 * what sharing memory needs (the daemon's DataPlane answer, the client's region check).
 * "" when it cannot be read. Returns buf. */
char *kvs_host_boot_id(char *buf, size_t cap);

#endif
