/* Shared-memory regions: see region.h (state diagram and invariants there).
 *
 * The socket is SOCK_SEQPACKET, so each request arrives whole with its descriptor or not
 * at all: no partial reads to reassemble on the loop thread.
 */
#define _GNU_SOURCE
#include "daemon/region.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "gpu/base/mem.h"
#include "gpu/engine/engine.h"
#include "kvstash/v1/region.h"

/* Regions one connection may hold: a worker registers its KV pool once, maybe a few. */
#define REGIONS_PER_CONN 64
/* How long the listener pauses after accept failed for want of descriptors or memory. */
#define ACCEPT_RETRY_MS 100

struct kvs_region {
    uint8_t id[KVS_REGION_ID_LEN];
    uint8_t *base;
    uint64_t len;
    bool pinned;
    void *ipc_base;   /* CUDA IPC: the allocation as opened (base is inside it), else NULL */
    unsigned gpu;     /* CUDA IPC: the engine (opts.engine index) that opened it */
    bool listed;      /* under kvs_regions.mu */
    atomic_uint refs; /* the registry's while listed, plus one per acquire */
    kvs_regions *owner;
    kvs_region *next; /* kvs_regions.list, under mu */
};

typedef struct conn {
    uv_poll_t poll;
    int fd;
    pid_t pid; /* the client process (SO_PEERCRED; 0: unknown), for invariant 7's share */
    kvs_regions *owner;
    kvs_region *regions[REGIONS_PER_CONN];
    unsigned n;
    struct conn *next, *prev; /* kvs_regions.conns (loop thread only) */
} conn;

struct kvs_regions {
    kvs_regions_opts o;
    char path[108];
    uv_loop_t *loop;
    int lfd;
    uv_poll_t lpoll;
    uv_timer_t retry; /* restarts lpoll after an accept failed for want of descriptors */
    bool closed;
    /* Loop thread only: */
    conn *conns;
    unsigned n_conns;                      /* open connections (invariant 5) */
    uint64_t accept_pauses, conns_refused; /* for the log's powers of two */

    pthread_mutex_t mu; /* leaf: guards list, bytes, the regions' listed flags, counters */
    kvs_region *list;
    uint64_t bytes, pinned_bytes, connections, refused;
    unsigned count;        /* listed regions and registrations under way (invariant 5) */
    uint64_t device_bytes; /* CUDA IPC regions' (the worker's GPU memory: not in bytes) */
};

static void logf_(kvs_regions *r, kvs_log_level lvl, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void logf_(kvs_regions *r, kvs_log_level lvl, const char *fmt, ...)
{
    if (!r->o.log)
        return;
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    r->o.log(r->o.log_ctx, lvl, buf);
}

/* The mapping goes with the last reference of an unlisted region (invariant 1). */
static void region_free(kvs_region *g)
{
    if (g->ipc_base) {
        kvs_engine_ipc_close(g->owner->o.engine[g->gpu], g->ipc_base);
        free(g);
        return;
    }
    if (g->pinned) /* pinned through engine 0, for every device (portable) */
        kvs_engine_host_unregister(g->owner->o.engine[0], g->base, g->len);
    munmap(g->base, g->len);
    free(g);
}

uint8_t *kvs_region_base(const kvs_region *g)
{
    return g->base;
}

uint64_t kvs_region_len(const kvs_region *g)
{
    return g->len;
}

bool kvs_region_device(const kvs_region *g)
{
    return g->ipc_base != NULL;
}

unsigned kvs_region_gpu(const kvs_region *g)
{
    return g->gpu;
}

void kvs_region_ref(kvs_region *g)
{
    atomic_fetch_add(&g->refs, 1);
}

void kvs_region_release(kvs_region *g)
{
    if (g && atomic_fetch_sub(&g->refs, 1) == 1)
        region_free(g);
}

/* Compares ids without branching on their bytes: an id is a capability, and a compare
 * that stops early would let a client time its way to one. */
static bool id_equal(const uint8_t *a, const uint8_t *b)
{
    uint8_t d = 0;
    for (size_t i = 0; i < KVS_REGION_ID_LEN; i++)
        d |= a[i] ^ b[i];
    return d == 0;
}

int kvs_regions_acquire(kvs_regions *r, const uint8_t *id, size_t id_len, uint64_t offset,
                        uint64_t len, const char *field, kvs_region **out, uint8_t **ptr,
                        kvs_err *err)
{
    *out = NULL;
    *ptr = NULL;
    if (!r)
        return kvs_err_set(err, KVS_EINVAL,
                           "%s: this daemon has no region socket (start it with "
                           "--region-socket)",
                           field);
    if (id_len != KVS_REGION_ID_LEN)
        return kvs_err_set(err, KVS_EINVAL, "%s: a region id has %d bytes, not %zu", field,
                           KVS_REGION_ID_LEN, id_len);
    kvs_region *found = NULL;
    pthread_mutex_lock(&r->mu);
    for (kvs_region *g = r->list; g; g = g->next)
        if (id_equal(g->id, id))
            found = g;
    if (found)
        atomic_fetch_add(&found->refs, 1);
    pthread_mutex_unlock(&r->mu);
    if (!found)
        return kvs_err_set(err, KVS_ENOTFOUND,
                           "%s: no such region (never registered, or the connection that "
                           "registered it closed)",
                           field);
    if (offset > found->len || len > found->len - offset) { /* no overflow: invariant 3 */
        uint64_t flen = found->len;
        kvs_region_release(found);
        return kvs_err_set(
            err, KVS_EINVAL, "%s: bytes [%llu, +%llu) lie outside the region's %llu bytes", field,
            (unsigned long long)offset, (unsigned long long)len, (unsigned long long)flen);
    }
    *out = found;
    *ptr = found->base + offset;
    return 0;
}

/* ---------------------------------------------------------------- the socket */

static void unlist(kvs_regions *r, kvs_region *g)
{
    pthread_mutex_lock(&r->mu);
    for (kvs_region **pp = &r->list; *pp; pp = &(*pp)->next)
        if (*pp == g) {
            *pp = g->next;
            break;
        }
    g->listed = false;
    r->count--;
    if (g->ipc_base)
        r->device_bytes -= g->len;
    else
        r->bytes -= g->len;
    if (g->pinned)
        r->pinned_bytes -= g->len;
    pthread_mutex_unlock(&r->mu);
    kvs_region_release(g); /* the registry's reference */
}

static void conn_closed(uv_handle_t *h)
{
    conn *k = h->data;
    close(k->fd);
    free(k);
}

static void conn_close(conn *k)
{
    kvs_regions *r = k->owner;
    for (unsigned i = 0; i < k->n; i++)
        unlist(r, k->regions[i]);
    k->n = 0;
    r->n_conns--;
    if (k->prev)
        k->prev->next = k->next;
    else
        r->conns = k->next;
    if (k->next)
        k->next->prev = k->prev;
    uv_poll_stop(&k->poll);
    uv_close((uv_handle_t *)&k->poll, conn_closed);
}

/* Invariant 7: one client process's share of the regions and connections. Loop thread
 * (connections are only touched there): a walk of at most --region-max-count entries. */
static void client_holds(const kvs_regions *r, pid_t pid, unsigned *conns, unsigned *regions)
{
    *conns = *regions = 0;
    for (const conn *c = r->conns; c && pid; c = c->next)
        if (c->pid == pid) {
            (*conns)++;
            *regions += c->n;
        }
}

static int client_room(const kvs_regions *r, const conn *k, kvs_err *err)
{
    unsigned conns, regions;
    client_holds(r, k->pid, &conns, &regions);
    if (k->pid && regions >= r->o.max_per_client)
        return kvs_err_set(err, KVS_ENOSPC,
                           "regions: this client (pid %ld) holds %u, the most one client may "
                           "(--region-max-per-client)",
                           (long)k->pid, regions);
    return 0;
}

/* A registration's reservation, taken before anything is mapped or opened so that two
 * registrations cannot both pass: its place among the regions (invariant 5) and its bytes
 * (invariant 4; 0 for CUDA IPC, the worker's GPU memory). Given back by unreserve if the
 * registration fails; unlist gives back a listed region's. */
static int reserve(kvs_regions *r, uint64_t bytes, kvs_err *err)
{
    pthread_mutex_lock(&r->mu);
    bool place = r->count < r->o.max_count;
    bool room = bytes <= r->o.max_bytes && r->bytes <= r->o.max_bytes - bytes;
    if (place && room) {
        r->count++;
        r->bytes += bytes;
    }
    unsigned count = r->count;
    uint64_t used = r->bytes;
    pthread_mutex_unlock(&r->mu);
    if (!place)
        return kvs_err_set(err, KVS_ENOSPC,
                           "regions: %u registered by all clients, the most (--region-max-count)",
                           count);
    if (!room)
        return kvs_err_set(err, KVS_ENOSPC,
                           "bytes: %llu more would exceed --region-max-bytes %llu (%llu "
                           "registered)",
                           (unsigned long long)bytes, (unsigned long long)r->o.max_bytes,
                           (unsigned long long)used);
    return 0;
}

static void unreserve(kvs_regions *r, uint64_t bytes)
{
    pthread_mutex_lock(&r->mu);
    r->count--;
    r->bytes -= bytes;
    pthread_mutex_unlock(&r->mu);
}

/* Maps one registered file: checks its seals and size first (invariant 2). */
static int region_map(kvs_regions *r, conn *k, int fd, uint64_t bytes, kvs_region **out,
                      kvs_err *err)
{
    if (k->n == REGIONS_PER_CONN)
        return kvs_err_set(err, KVS_ENOSPC, "regions: this connection holds %d already (the most)",
                           REGIONS_PER_CONN);
    if (bytes == 0)
        return kvs_err_set(err, KVS_EINVAL, "bytes: a region needs at least one byte");
    int seals = fcntl(fd, F_GET_SEALS);
    if (seals < 0 || !(seals & F_SEAL_SHRINK))
        return kvs_err_set(err, KVS_EINVAL,
                           "fd: not a memfd sealed with F_SEAL_SHRINK (memfd_create with "
                           "MFD_ALLOW_SEALING, then fcntl F_ADD_SEALS): a file that can shrink "
                           "cannot be mapped safely");
    int rc = reserve(r, bytes, err); /* the bound of all clients first: it names the flag */
    if (rc == 0 && (rc = client_room(r, k, err)))
        unreserve(r, bytes);
    if (rc)
        return rc;
    struct stat st;
    if (fstat(fd, &st) != 0) {
        unreserve(r, bytes);
        return kvs_err_set(err, KVS_EIO, "fd: fstat: %s", strerror(errno));
    }
    if ((uint64_t)st.st_size < bytes) {
        unreserve(r, bytes);
        return kvs_err_set(err, KVS_EINVAL, "bytes: %llu asked, the file holds %llu",
                           (unsigned long long)bytes, (unsigned long long)st.st_size);
    }
    /* Invariant 6: the memory is the client's. Pages not allocated yet would be allocated
     * here by MAP_POPULATE below, charged to the daemon and on its loop thread (a sparse
     * 2 GiB memfd: 2 GB of RSS and 3.4 s). The file's allocated blocks must cover the
     * range. (Not SEEK_HOLE: tmpfs reports fallocated pages as holes until written.) A
     * client that allocates elsewhere in a larger file makes the daemon allocate at most
     * what it allocated itself. */
    uint64_t allocated = (uint64_t)st.st_blocks * 512;
    if (allocated < bytes) {
        unreserve(r, bytes);
        return kvs_err_set(err, KVS_EINVAL,
                           "fd: %llu of the %llu bytes are allocated: allocate the region's "
                           "memory before registering it (posix_fallocate, or write every "
                           "page); the daemon does not allocate a client's memory",
                           (unsigned long long)allocated, (unsigned long long)bytes);
    }
    /* Populated now, once: else the first Put or Get through each 4 KiB page takes a fault
     * on the data path (a 1 GiB region: 262,144 faults, measured 1.6 s against 1.0 s for
     * the same PutMany over gRPC on the dev machine). */
    void *base = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
    if (base == MAP_FAILED) {
        int e = errno;
        unreserve(r, bytes);
        return kvs_err_set(err, KVS_ENOMEM, "mmap of %llu bytes: %s", (unsigned long long)bytes,
                           strerror(e));
    }
    kvs_region *g = kvs_xcalloc(1, sizeof *g);
    g->base = base;
    g->len = bytes;
    g->owner = r;
    atomic_init(&g->refs, 1);
    if (getrandom(g->id, sizeof g->id, 0) != (ssize_t)sizeof g->id) {
        int e = errno;
        munmap(base, bytes);
        free(g);
        unreserve(r, bytes);
        return kvs_err_set(err, KVS_EINTERNAL, "getrandom: %s", strerror(e));
    }
    if (r->o.engine[0]) {
        kvs_err perr;
        kvs_err_clear(&perr);
        if (kvs_engine_host_register(r->o.engine[0], base, bytes, &perr) == 0)
            g->pinned = true;
        else /* still usable: the engine then stages its copies */
            logf_(r, KVS_LOG_WARN, "region of %llu bytes not pinned: %s", (unsigned long long)bytes,
                  perr.msg);
    }
    pthread_mutex_lock(&r->mu);
    g->listed = true;
    g->next = r->list;
    r->list = g;
    if (g->pinned)
        r->pinned_bytes += bytes;
    pthread_mutex_unlock(&r->mu);
    k->regions[k->n++] = g;
    *out = g;
    return 0;
}

/* Opens a worker's GPU memory by its CUDA IPC handle (region.h, "CUDA IPC"): the range
 * asked for must lie within the allocation as the driver knows it (invariant 3 then holds
 * for every later acquire: they check against len). Not counted in --region-max-bytes,
 * which bounds this daemon's host memory; REGIONS_PER_CONN bounds how many. */
static int region_open_cuda(kvs_regions *r, conn *k, const kvs_region_cuda_req *q, kvs_region **out,
                            kvs_err *err)
{
    if (!r->o.engine[0])
        return kvs_err_set(err, KVS_ENOTSUP,
                           "op: CUDA IPC needs kvstashd's GPU engine (--gpu on); this daemon "
                           "codes on the CPU: register a shared-memory region instead");
    if (k->n == REGIONS_PER_CONN)
        return kvs_err_set(err, KVS_ENOSPC, "regions: this connection holds %d already (the most)",
                           REGIONS_PER_CONN);
    if (q->bytes == 0)
        return kvs_err_set(err, KVS_EINVAL, "bytes: a region needs at least one byte");
    int prc = reserve(r, 0, err);
    if (prc == 0 && (prc = client_room(r, k, err)))
        unreserve(r, 0);
    if (prc)
        return prc;
    /* The engine of the memory's device; none: engine 0 says which device it is not. */
    unsigned dev = 0;
    for (unsigned i = 0; i < KVS_STORE_GPUS_MAX && r->o.engine[i]; i++)
        if (kvs_engine_has_uuid(r->o.engine[i], q->uuid)) {
            dev = i;
            break;
        }
    kvs_engine *eng = r->o.engine[dev];
    void *base;
    uint64_t avail;
    int rc = kvs_engine_ipc_open(eng, q->handle, q->uuid, &base, &avail, err);
    if (rc) {
        unreserve(r, 0);
        return rc;
    }
    if (q->offset > avail || q->bytes > avail - q->offset) {
        kvs_engine_ipc_close(eng, base);
        unreserve(r, 0);
        return kvs_err_set(
            err, KVS_EINVAL, "bytes: [%llu, +%llu) lie outside the allocation's %llu bytes",
            (unsigned long long)q->offset, (unsigned long long)q->bytes, (unsigned long long)avail);
    }
    kvs_region *g = kvs_xcalloc(1, sizeof *g);
    g->ipc_base = base;
    g->gpu = dev;
    g->base = (uint8_t *)base + q->offset;
    g->len = q->bytes;
    g->owner = r;
    atomic_init(&g->refs, 1);
    if (getrandom(g->id, sizeof g->id, 0) != (ssize_t)sizeof g->id) {
        int e = errno;
        kvs_engine_ipc_close(eng, base);
        free(g);
        unreserve(r, 0);
        return kvs_err_set(err, KVS_EINTERNAL, "getrandom: %s", strerror(e));
    }
    pthread_mutex_lock(&r->mu);
    g->listed = true;
    g->next = r->list;
    r->list = g;
    r->device_bytes += g->len;
    pthread_mutex_unlock(&r->mu);
    k->regions[k->n++] = g;
    *out = g;
    return 0;
}

static void conn_reply(conn *k, const kvs_region_rep *rep)
{
    ssize_t n = send(k->fd, rep, sizeof *rep, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n != (ssize_t)sizeof *rep) /* a client that does not read its answers: drop it */
        conn_close(k);
}

static void on_conn(uv_poll_t *p, int status, int events)
{
    conn *k = p->data;
    kvs_regions *r = k->owner;
    if (status < 0 || !(events & UV_READABLE)) {
        conn_close(k);
        return;
    }
    union {
        kvs_region_req plain;
        kvs_region_cuda_req cuda;
    } u;
    const kvs_region_req *req = &u.plain; /* the header both share */
    union {
        char buf[CMSG_SPACE(sizeof(int) * 4)];
        struct cmsghdr align;
    } cm;
    struct iovec iov = {&u, sizeof u};
    struct msghdr mh = {
        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.buf, .msg_controllen = sizeof cm.buf};
    ssize_t n = recvmsg(k->fd, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    int fds[4], nfds = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            size_t cnt = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            for (size_t i = 0; i < cnt && nfds < 4; i++)
                memcpy(&fds[nfds++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
        }
    if (n <= 0) { /* end of stream (or an error): the client is gone */
        for (int i = 0; i < nfds; i++)
            close(fds[i]);
        conn_close(k);
        return;
    }
    kvs_region_rep rep;
    memset(&rep, 0, sizeof rep);
    memcpy(rep.magic, KVS_REGION_MAGIC, 4);
    kvs_err err;
    kvs_err_clear(&err);
    int rc;
    kvs_region *g = NULL;
    if (n < (ssize_t)sizeof *req || memcmp(req->magic, KVS_REGION_MAGIC, 4) != 0)
        rc = kvs_err_set(&err, KVS_EINVAL, "request: %zd bytes without the %s header (want %zu)", n,
                         KVS_REGION_MAGIC, sizeof *req);
    else if (req->op != KVS_REGION_OP_REGISTER && req->op != KVS_REGION_OP_REGISTER_CUDA)
        rc = kvs_err_set(&err, KVS_EINVAL, "op: unknown value %u", req->op);
    else if (req->op == KVS_REGION_OP_REGISTER_CUDA && n != (ssize_t)sizeof u.cuda)
        rc = kvs_err_set(&err, KVS_EINVAL, "request: %zd bytes for a CUDA region (want %zu)", n,
                         sizeof u.cuda);
    else if (req->op == KVS_REGION_OP_REGISTER_CUDA && nfds != 0)
        rc = kvs_err_set(&err, KVS_EINVAL, "fd: a CUDA region takes no descriptor (%d attached)",
                         nfds);
    else if (req->op == KVS_REGION_OP_REGISTER_CUDA)
        rc = region_open_cuda(r, k, &u.cuda, &g, &err);
    else if (n != (ssize_t)sizeof *req)
        rc = kvs_err_set(&err, KVS_EINVAL, "request: %zd bytes (want %zu)", n, sizeof *req);
    else if (mh.msg_flags & MSG_CTRUNC)
        rc = kvs_err_set(&err, KVS_EINVAL, "fd: too many descriptors (send exactly one)");
    else if (nfds != 1)
        rc = kvs_err_set(&err, KVS_EINVAL, "fd: %d descriptors attached (send exactly one)", nfds);
    else
        rc = region_map(r, k, fds[0], req->bytes, &g, &err);
    if (rc == 0) {
        memcpy(rep.id, g->id, sizeof rep.id);
        rep.bytes = g->len;
        rep.pinned = g->pinned;
        logf_(r, KVS_LOG_INFO, "region of %llu bytes registered (%s)", (unsigned long long)g->len,
              g->ipc_base ? "GPU memory, CUDA IPC"
              : g->pinned ? "pinned"
                          : "not pinned");
    }
    for (int i = 0; i < nfds; i++) /* the mapping keeps what it needs */
        close(fds[i]);
    if (rc) {
        pthread_mutex_lock(&r->mu);
        r->refused++;
        pthread_mutex_unlock(&r->mu);
        logf_(r, KVS_LOG_WARN, "region socket: refused: %s", err.msg);
    }
    rep.code = rc;
    if (rc) /* cut to the reply's field */
        memcpy(rep.msg, err.msg, strnlen(err.msg, sizeof rep.msg - 1));
    conn_reply(k, &rep);
}

static void on_listen(uv_poll_t *p, int status, int events);

static void on_retry(uv_timer_t *t)
{
    kvs_regions *r = t->data;
    if (!r->closed)
        uv_poll_start(&r->lpoll, UV_READABLE, on_listen);
}

static void on_listen(uv_poll_t *p, int status, int events)
{
    kvs_regions *r = p->data;
    if (status < 0 || !(events & UV_READABLE))
        return;
    int fd = accept4(r->lfd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0 && (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM)) {
        /* The connection stays queued, so the socket stays readable: polling it again at
         * once would spin the loop thread for as long as descriptors are short. Pause. */
        int e = errno;
        uv_poll_stop(&r->lpoll);
        uv_timer_start(&r->retry, on_retry, ACCEPT_RETRY_MS, 0);
        uint64_t n = ++r->accept_pauses;
        if ((n & (n - 1)) == 0)
            logf_(r, KVS_LOG_WARN,
                  "region socket: accept: %s: not accepting for %d ms (%llu times so far)",
                  strerror(e), ACCEPT_RETRY_MS, (unsigned long long)n);
        return;
    }
    if (fd < 0)
        return; /* EAGAIN, or a client that went away: nothing to do */
    struct ucred cred = {0};
    socklen_t cl = sizeof cred;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &cl) != 0)
        cred.pid = 0; /* unknown: the global bound alone */
    unsigned mine, regions;
    client_holds(r, cred.pid, &mine, &regions);
    /* Invariants 5 and 7: a connection past either bound is closed at once; its client sees
     * EOF. */
    bool all = r->n_conns >= r->o.max_count, own = cred.pid && mine >= r->o.max_per_client;
    if (all || own) {
        close(fd);
        uint64_t n = ++r->conns_refused;
        if ((n & (n - 1)) == 0) /* the 1st, 2nd, 4th, ...: a flood does not flood the log */
            logf_(r, KVS_LOG_WARN,
                  all ? "region socket: connection closed: %u open, the most "
                        "(--region-max-count); %llu closed so far"
                      : "region socket: connection closed: its client holds %u, the most one "
                        "may (--region-max-per-client); %llu closed so far",
                  all ? r->n_conns : mine, (unsigned long long)n);
        return;
    }
    conn *k = kvs_xcalloc(1, sizeof *k);
    k->fd = fd;
    k->pid = cred.pid;
    k->owner = r;
    int rc = uv_poll_init(r->loop, &k->poll, fd);
    if (rc) {
        logf_(r, KVS_LOG_WARN, "region socket: uv_poll_init: %s", uv_strerror(rc));
        close(fd);
        free(k);
        return;
    }
    k->poll.data = k;
    k->next = r->conns;
    if (r->conns)
        r->conns->prev = k;
    r->conns = k;
    r->n_conns++;
    pthread_mutex_lock(&r->mu);
    r->connections++;
    pthread_mutex_unlock(&r->mu);
    uv_poll_start(&k->poll, UV_READABLE | UV_DISCONNECT, on_conn);
}

int kvs_regions_create(uv_loop_t *loop, const kvs_regions_opts *o, kvs_regions **out, kvs_err *err)
{
    *out = NULL;
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (!o->path || !o->path[0] || strlen(o->path) >= sizeof sa.sun_path)
        return kvs_err_set(err, KVS_EINVAL, "--region-socket: a path of 1..%zu bytes",
                           sizeof sa.sun_path - 1);
    kvs_regions *r = kvs_xcalloc(1, sizeof *r);
    r->o = *o;
    r->loop = loop;
    snprintf(r->path, sizeof r->path, "%s", o->path);
    r->o.path = r->path;
    pthread_mutex_init(&r->mu, NULL);
    memcpy(sa.sun_path, r->path, strlen(r->path));
    r->lfd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (r->lfd < 0) {
        int e = errno;
        free(r);
        return kvs_err_set(err, KVS_EIO, "--region-socket: socket: %s", strerror(e));
    }
    unlink(r->path); /* a socket left by an earlier run */
    /* Created with no permissions at all, then set: no window in which another user could
     * connect before the mode is right. */
    mode_t old = umask(0777);
    int brc = bind(r->lfd, (struct sockaddr *)&sa, sizeof sa);
    int be = errno;
    umask(old);
    if (brc != 0 || chmod(r->path, o->mode) != 0 || listen(r->lfd, 64) != 0) {
        int e = brc ? be : errno;
        close(r->lfd);
        free(r);
        return kvs_err_set(err, KVS_EIO, "--region-socket %s: %s", o->path, strerror(e));
    }
    int rc = uv_poll_init(loop, &r->lpoll, r->lfd);
    if (rc) {
        close(r->lfd);
        unlink(r->path);
        free(r);
        return kvs_err_set(err, KVS_EINTERNAL, "--region-socket: uv_poll_init: %s",
                           uv_strerror(rc));
    }
    r->lpoll.data = r;
    uv_timer_init(loop, &r->retry);
    r->retry.data = r;
    uv_poll_start(&r->lpoll, UV_READABLE, on_listen);
    *out = r;
    return 0;
}

void kvs_regions_close(kvs_regions *r)
{
    if (!r || r->closed)
        return;
    r->closed = true;
    while (r->conns)
        conn_close(r->conns);
    uv_poll_stop(&r->lpoll);
    uv_close((uv_handle_t *)&r->lpoll, NULL);
    uv_timer_stop(&r->retry);
    uv_close((uv_handle_t *)&r->retry, NULL);
    unlink(r->path);
}

void kvs_regions_destroy(kvs_regions *r)
{
    if (!r)
        return;
    close(r->lfd);
    /* Every connection's regions were unlisted at close; calls released theirs. */
    pthread_mutex_destroy(&r->mu);
    free(r);
}

const char *kvs_regions_path(const kvs_regions *r)
{
    return r ? r->path : "";
}

uint64_t kvs_regions_max_bytes(const kvs_regions *r)
{
    return r ? r->o.max_bytes : 0;
}

void kvs_regions_stats_get(kvs_regions *r, kvs_regions_stats *out)
{
    memset(out, 0, sizeof *out);
    if (!r)
        return;
    pthread_mutex_lock(&r->mu);
    for (kvs_region *g = r->list; g; g = g->next)
        out->regions++;
    out->bytes = r->bytes;
    out->pinned_bytes = r->pinned_bytes;
    out->device_bytes = r->device_bytes;
    out->connections = r->connections;
    out->refused = r->refused;
    pthread_mutex_unlock(&r->mu);
}
