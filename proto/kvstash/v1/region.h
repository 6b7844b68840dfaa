/* The region socket's wire format (README "Data plane", DESIGN §4): how a client on the
 * daemon's host hands it shared memory once, so that PutMany and GetMany can name offsets
 * in it instead of carrying bytes over gRPC.
 *
 * The client connects to the Unix socket that DataPlane names (kvstashd --region-socket)
 * and sends, per region, one request with the memory's file descriptor attached
 * (SCM_RIGHTS): a memfd sealed against shrinking (F_SEAL_SHRINK; the daemon refuses any
 * other, since a file the client could truncate would fault the daemon when it touches a
 * page that is gone), whose pages the client has allocated (posix_fallocate, or every page
 * written: the file's allocated blocks must cover the bytes asked; the daemon does not
 * allocate a client's memory). The daemon maps it, pins it for its GPU engine when it has one, and
 * answers with the region's id: 16 random bytes that PutHeader.region and
 * GetManyRequest.region carry. The region lives as long as the connection: once the client
 * closes it (or exits), the id is refused and the mapping goes when the last call using it
 * ends. Integers are in host byte order (both ends share the host).
 *
 * CUDA IPC (op KVS_REGION_OP_REGISTER_CUDA, kvs_region_cuda_req, no descriptor): the
 * region is device memory of the worker's on the GPU the daemon's engine runs on, named
 * by its cudaIpcMemHandle_t; the daemon opens it (cudaIpcOpenMemHandle) and Put/Get
 * encode from and decode into it on the GPU, with no host copy. The device's UUID is
 * checked against the engine's: memory of another GPU is refused (KVS_EINVAL). A daemon
 * without a GPU engine answers KVS_ENOTSUP. The reply is the same; pinned is 0.
 */
#ifndef KVS_PROTO_REGION_H
#define KVS_PROTO_REGION_H

#include <stdint.h>

#define KVS_REGION_MAGIC "KVR1"
#define KVS_REGION_ID_LEN 16
#define KVS_REGION_MSG_LEN 200

enum { KVS_REGION_OP_REGISTER = 1, KVS_REGION_OP_REGISTER_CUDA = 2 };
#define KVS_REGION_CUDA_HANDLE_LEN 64 /* sizeof(cudaIpcMemHandle_t) */
#define KVS_REGION_CUDA_UUID_LEN 16   /* sizeof(cudaUUID_t) */

typedef struct kvs_region_req {
    char magic[4];  /* KVS_REGION_MAGIC */
    uint32_t op;    /* KVS_REGION_OP_REGISTER */
    uint64_t bytes; /* bytes of the file to map, from offset 0 */
} kvs_region_req;

typedef struct kvs_region_cuda_req {
    char magic[4];   /* KVS_REGION_MAGIC */
    uint32_t op;     /* KVS_REGION_OP_REGISTER_CUDA */
    uint64_t bytes;  /* bytes of the region, from offset */
    uint64_t offset; /* where the region starts in the allocation the handle names */
    uint8_t handle[KVS_REGION_CUDA_HANDLE_LEN];
    uint8_t uuid[KVS_REGION_CUDA_UUID_LEN]; /* the device's (cudaDeviceProp.uuid) */
} kvs_region_cuda_req;

typedef struct kvs_region_rep {
    char magic[4];
    int32_t code;                  /* 0, or a KVS_E* code (gpu/base/err.h) */
    uint8_t id[KVS_REGION_ID_LEN]; /* the region's id when code is 0 */
    uint64_t bytes;                /* bytes mapped */
    uint32_t pinned;               /* 1: registered with the daemon's GPU engine */
    uint32_t reserved;             /* 0; keeps the layout free of padding */
    char msg[KVS_REGION_MSG_LEN];  /* NUL-terminated: why, when code is not 0 */
} kvs_region_rep;

/* Fixed layouts with no padding, so any language can read them ("=4sIQ", "=4sIQQ64s16s",
 * "=4si16sQII200s" in Python's struct). */
_Static_assert(sizeof(kvs_region_req) == 16, "region request layout");
_Static_assert(sizeof(kvs_region_cuda_req) == 104, "CUDA region request layout");
_Static_assert(sizeof(kvs_region_rep) == 240, "region reply layout");

#endif
