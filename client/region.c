/* libkvstash: shared memory with a daemon on this host (contract: include/kvstash.h, "data
 * plane"; the socket's wire format: proto/kvstash/v1/region.h).
 *
 * A region is a memfd sealed against shrinking (the daemon maps only such files), mapped
 * here too, and registered over the daemon's region socket, whose connection the region
 * keeps open: closing it is how the daemon learns the region is gone.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "client/client_int.h"
#include "gpu/base/host.h"
#include "gpu/base/mem.h"
#include "kvstash.h"
#include "kvstash/v1/kvstash.pb-c.h"
#include "kvstash/v1/region.h"

_Static_assert(KVS__REGION_ID_LEN == KVS_REGION_ID_LEN, "region id length");

struct kvs_region {
    int fd;   /* the memfd */
    int sock; /* the registration's connection: open for the region's life */
    uint8_t *base;
    size_t size;
    bool pinned;
    bool device; /* CUDA IPC: no memfd and no mapping here (base NULL) */
    uint8_t id[KVS_REGION_ID_LEN];
    const kvs_client *client; /* registered with its daemon: identity only, never used */
};

const uint8_t *kvs__region_id(const kvs_region *g)
{
    return g->id;
}

const kvs_client *kvs__region_client(const kvs_region *g)
{
    return g->client;
}

void *kvs_region_data(const kvs_region *g)
{
    return g ? g->base : NULL;
}

size_t kvs_region_size(const kvs_region *g)
{
    return g ? g->size : 0;
}

bool kvs_region_pinned(const kvs_region *g)
{
    return g && g->pinned;
}

bool kvs_region_device(const kvs_region *g)
{
    return g && g->device;
}

void kvs_region_close(kvs_region *g)
{
    if (!g)
        return;
    if (g->sock >= 0)
        close(g->sock);
    if (g->base)
        munmap(g->base, g->size);
    if (g->fd >= 0)
        close(g->fd);
    free(g);
}

/* The daemon's region socket, if it runs on this host (same boot id) and has one. */
static int data_plane(kvs_client *c, char *path, size_t cap, kvs_err *err)
{
    Kvstash__V1__DataPlaneRequest q = KVSTASH__V1__DATA_PLANE_REQUEST__INIT;
    ProtobufCMessage *m = NULL;
    int rc = kvs__unary(c, STASH("DataPlane"), &q.base, &kvstash__v1__data_plane_reply__descriptor,
                        &m, err);
    if (rc)
        return rc;
    const Kvstash__V1__DataPlaneReply *rep = (const Kvstash__V1__DataPlaneReply *)m;
    char boot[64];
    kvs_host_boot_id(boot, sizeof boot);
    if (!rep->region_socket[0])
        rc = kvs_err_set(err, KVS_ENOTSUP,
                         "region: the daemon has no region socket (kvstashd --region-socket)");
    else if (!boot[0] || strcmp(boot, rep->boot_id) != 0)
        rc = kvs_err_set(err, KVS_ENOTSUP,
                         "region: the daemon runs on another host (boot id %s, here %s)",
                         rep->boot_id, boot[0] ? boot : "unknown");
    else if (strlen(rep->region_socket) >= cap)
        rc = kvs_err_set(err, KVS_EINVAL, "region: socket path too long");
    else
        snprintf(path, cap, "%s", rep->region_socket);
    protobuf_c_message_free_unpacked(m, NULL);
    return rc;
}

/* Connects g->sock to the region socket and sends one registration request (with fd
 * attached when fd >= 0); fills g's id and pinned flag from the reply. */
static int exchange(kvs_region *g, const struct sockaddr_un *sa, const void *req, size_t len,
                    int fd, kvs_err *err)
{
    g->sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (g->sock < 0 || connect(g->sock, (const struct sockaddr *)sa, sizeof *sa) != 0)
        return kvs_err_set(err, KVS_EUNAVAIL, "region: connect %s: %s", sa->sun_path,
                           strerror(errno));
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } cm;
    memset(&cm, 0, sizeof cm);
    struct iovec iov = {(void *)(uintptr_t)req, len};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
    if (fd >= 0) {
        mh.msg_control = cm.buf;
        mh.msg_controllen = sizeof cm.buf;
        struct cmsghdr *ch = CMSG_FIRSTHDR(&mh);
        ch->cmsg_level = SOL_SOCKET;
        ch->cmsg_type = SCM_RIGHTS;
        ch->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(ch), &fd, sizeof(int));
    }
    kvs_region_rep rep;
    errno = 0;
    if (sendmsg(g->sock, &mh, MSG_NOSIGNAL) != (ssize_t)len ||
        recv(g->sock, &rep, sizeof rep, 0) != (ssize_t)sizeof rep ||
        memcmp(rep.magic, KVS_REGION_MAGIC, 4) != 0)
        return kvs_err_set(err, KVS_EUNAVAIL, "region: registering with %s: %s", sa->sun_path,
                           errno ? strerror(errno) : "malformed reply");
    if (rep.code != 0) {
        rep.msg[sizeof rep.msg - 1] = 0;
        return kvs_err_set(err, rep.code < 0 ? rep.code : KVS_EINTERNAL, "region: %s", rep.msg);
    }
    memcpy(g->id, rep.id, sizeof g->id);
    g->pinned = rep.pinned != 0;
    return 0;
}

/* What both kinds of region start with: the daemon's region socket (sa), and g. */
static int region_new(kvs_client *c, size_t bytes, struct sockaddr_un *sa, kvs_region **g,
                      kvs_err *err)
{
    *sa = (struct sockaddr_un){.sun_family = AF_UNIX};
    int rc = data_plane(c, sa->sun_path, sizeof sa->sun_path, err);
    if (rc)
        return rc;
    *g = kvs_xcalloc(1, sizeof **g);
    (*g)->client = c;
    (*g)->sock = (*g)->fd = -1;
    (*g)->size = bytes;
    return 0;
}

int kvs_region_create(kvs_client *c, size_t bytes, kvs_region **out, kvs_err *err)
{
    kvs_err_clear(err);
    if (!c || !out || bytes == 0)
        return kvs_err_set(err, KVS_EINVAL, "region: NULL argument or zero bytes");
    *out = NULL;
    struct sockaddr_un sa;
    kvs_region *g;
    int rc = region_new(c, bytes, &sa, &g, err);
    if (rc)
        return rc;
    g->fd = memfd_create("kvstash-region", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (g->fd < 0) {
        rc = kvs_err_set(err, KVS_ENOTSUP, "region: memfd_create: %s", strerror(errno));
        goto fail;
    }
    /* Sized first, then sealed: the daemon refuses a file that could shrink. */
    if (ftruncate(g->fd, (off_t)bytes) != 0 ||
        fcntl(g->fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_SEAL) != 0) {
        rc = kvs_err_set(err, KVS_ENOMEM, "region: sizing %zu bytes: %s", bytes, strerror(errno));
        goto fail;
    }
    /* Allocated here, by the process that owns the memory: the daemon refuses a region
     * with holes rather than allocate a client's memory itself. */
    int fe = posix_fallocate(g->fd, 0, (off_t)bytes);
    if (fe != 0) {
        rc = kvs_err_set(err, KVS_ENOMEM, "region: allocating %zu bytes: %s", bytes, strerror(fe));
        goto fail;
    }
    void *base = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, g->fd, 0);
    if (base == MAP_FAILED) {
        rc = kvs_err_set(err, KVS_ENOMEM, "region: mmap of %zu bytes: %s", bytes, strerror(errno));
        goto fail;
    }
    g->base = base;
    kvs_region_req req = {.op = KVS_REGION_OP_REGISTER, .bytes = bytes};
    memcpy(req.magic, KVS_REGION_MAGIC, 4);
    if ((rc = exchange(g, &sa, &req, sizeof req, g->fd, err)))
        goto fail;
    *out = g;
    return 0;
fail:
    kvs_region_close(g);
    return rc;
}

int kvs_region_create_ipc(kvs_client *c, const void *handle, uint64_t offset, uint64_t bytes,
                          const void *uuid, kvs_region **out, kvs_err *err)
{
    kvs_err_clear(err);
    if (!c || !out || !handle || !uuid || bytes == 0)
        return kvs_err_set(err, KVS_EINVAL, "region: NULL argument or zero bytes");
    *out = NULL;
    struct sockaddr_un sa;
    kvs_region *g;
    int rc = region_new(c, bytes, &sa, &g, err);
    if (rc)
        return rc;
    g->device = true;
    kvs_region_cuda_req req = {.op = KVS_REGION_OP_REGISTER_CUDA, .bytes = bytes, .offset = offset};
    memcpy(req.magic, KVS_REGION_MAGIC, 4);
    memcpy(req.handle, handle, sizeof req.handle);
    memcpy(req.uuid, uuid, sizeof req.uuid);
    if ((rc = exchange(g, &sa, &req, sizeof req, -1, err))) {
        kvs_region_close(g);
        return rc;
    }
    *out = g;
    return 0;
}
