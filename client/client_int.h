/* libkvstash internals shared by client.c (connection, calls, data path) and admin.c
 * (KvAdmin calls and their conversions). Not installed; kvs__ prefix (STYLE). */
#ifndef KVS_CLIENT_INT_H
#define KVS_CLIENT_INT_H

#include <grpc/grpc.h>
#include <protobuf-c/protobuf-c.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>

#include "kvstash.h"

#define STASH(m) "/kvstash.v1.KvStash/" m
#define ADMIN(m) "/kvstash.v1.KvAdmin/" m

/* Learned codec states fetched for client-side decode (decode.c): immutable once
 * published, so cached by (namespace, K/V, version) until the client closes. */
typedef struct kvs__state {
    char ns[KVS_NAME_MAX + 1];
    bool values;
    uint32_t version;
    void *data;
    size_t len;
} kvs__state;

/* The handle: fixed after connect (client.c), but for the state cache. */
struct kvs_client {
    grpc_channel **channels; /* n_channels (opts.connections), each its own connection */
    unsigned n_channels;
    atomic_uint *next_channel; /* calls take channels in turn (a pointer: calls see the
                                * client const) */
    char *target;
    char *auth; /* "Bearer <token>", or NULL */
    int64_t timeout_ms;
    size_t chunk_bytes;
    pthread_mutex_t states_mu; /* guards the cache below */
    kvs__state *states;
    size_t n_states, cap_states;
};

/* One call on the caller's stack (client.c): its own pluck completion queue, batches run
 * one at a time and waited for; kvs__rpc_finish frees everything. */
typedef struct kvs__rpc {
    const kvs_client *c;
    const char *name; /* "Put": prefixes every message */
    grpc_completion_queue *cq;
    grpc_call *call;
    gpr_timespec deadline;
    grpc_metadata auth;
    grpc_metadata_array initial_md, trailing_md;
    grpc_status_code status;
    grpc_slice details;
    bool have_status;
    grpc_call_error call_error; /* first grpc_call_start_batch failure */
} kvs__rpc;

/* The channel's credentials for opts' tls_* options (tls.c): insecure ones when none is
 * set. *out is released by the caller (grpc_channel_credentials_release). After
 * grpc_init. Errors name the option and the path. */
int kvs__tls_credentials(const kvs_client_opts *opts, grpc_channel_credentials **out, kvs_err *err);

/* A deadline the calls this thread starts must end by, earlier than their client's
 * timeout_ms would: the sharded client (cluster.c) sets it around each daemon's share of a
 * cluster call, so that all its phases and retries fit the caller's one deadline. tv_sec 0
 * (the initial value): none. */
extern _Thread_local gpr_timespec kvs__call_deadline;
/* 1 + the channel the calls this thread starts use (a split GetMany's part, batch.c); 0
 * (the initial value): the client's next in turn. */
extern _Thread_local unsigned kvs__call_channel;

int kvs__rpc_start(kvs__rpc *r, const kvs_client *c, const char *method, kvs_err *err);
/* Runs one batch and waits for it; whether all its ops succeeded. */
bool kvs__rpc_run(kvs__rpc *r, const grpc_op *ops, size_t n);
/* Ends the call: rc != 0 (a local failure, in err) cancels it; else the call's status. */
int kvs__rpc_finish(kvs__rpc *r, int rc, kvs_err *err);
grpc_op kvs__op_send_md(kvs__rpc *r);
grpc_op kvs__op_send_msg(grpc_byte_buffer *bb);
grpc_op kvs__op_close(void);
grpc_op kvs__op_recv_md(kvs__rpc *r);
grpc_op kvs__op_recv_msg(grpc_byte_buffer **bb);
grpc_op kvs__op_recv_status(kvs__rpc *r);
/* A client stream's payload as data chunks of the client's chunk size (no copies); returns
 * the bytes sent: fewer when the server ended the call (its status says why). */
size_t kvs__send_payload(kvs__rpc *r, const void *data, size_t len);
/* A client stream's end: half-close, then the reply message (*in, may stay NULL) and the
 * status, which kvs__rpc_finish reports. */
void kvs__end_stream(kvs__rpc *r, grpc_byte_buffer **in);
/* A packed message (NULL when out of memory); a data PutChunk around borrowed bytes. */
grpc_byte_buffer *kvs__pack_msg(const ProtobufCMessage *m);
grpc_byte_buffer *kvs__data_chunk(const uint8_t *p, size_t n);
int kvs__unpack_msg(const char *name, grpc_byte_buffer *bb, const ProtobufCMessageDescriptor *d,
                    ProtobufCMessage **out, kvs_err *err);
/* Fast path for a data chunk of a Get stream (GetChunk{data, layer, offset}: 0x12, varint
 * length, the bytes, then optional varint fields 3 and 4): copies the bytes straight from
 * gRPC's slices to dst (at most cap) and sets *n, sparing the flatten and protobuf-c copies
 * of a payload that the restore path would otherwise touch three times. 1 when done, 0 when
 * the message has another shape (a header: the caller unpacks it), KVS_EPROTO (named after
 * the call `name`) when it is malformed or larger than cap. The chunk's layer and offset
 * are not read: the caller relies on the daemon streaming a block's bytes in order. */
int kvs__chunk_data_fast(grpc_byte_buffer *bb, uint8_t *dst, uint64_t cap, uint64_t *n,
                         const char *name, kvs_err *err);

/* The id a registered region carries in requests (client/region.c). */
#define KVS__REGION_ID_LEN 16
const uint8_t *kvs__region_id(const kvs_region *g);
/* KVS_EINVAL unless [offset, offset + len) lies in region g (what: "PutMany"; i: the item). */
int kvs__region_item_check(const kvs_region *g, uint64_t offset, uint64_t len, size_t i,
                           const char *what, kvs_err *err);
/* A PutMany's items, checked as one daemon and a cluster check them before anything is
 * sent (keys, a payload or a region range each); each item's rc set to KVS_EPROTO until an
 * answer says otherwise. KVS_EINVAL naming the item. */
int kvs__put_items_check(kvs_put_item *items, size_t n, kvs_err *err);
/* The client whose daemon the region is registered with (the sharded client sends its items
 * there by region, elsewhere as bytes). Compared, never dereferenced: it may be closed. */
const kvs_client *kvs__region_client(const kvs_region *g);

/* One request, one reply: the whole call is a single batch. On success *reply belongs
 * to the caller (protobuf_c_message_free_unpacked). */
int kvs__unary(const kvs_client *c, const char *method, const ProtobufCMessage *req,
               const ProtobufCMessageDescriptor *reply_desc, ProtobufCMessage **reply,
               kvs_err *err);
/* Wire enum values to ours; unknown values become NONE / UNSPECIFIED. */
kvs_tier kvs__tier_from_pb(int t);
kvs_dtype kvs__dtype_from_pb(int d);
/* A Get/GetMany block header as the API reports it. */
struct Kvstash__V1__GetHeader;
kvs_get_result kvs__get_result_from_pb(const struct Kvstash__V1__GetHeader *h);

#endif
