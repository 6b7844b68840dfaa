/* libkvstash: the C client of kvstashd over the gRPC C core (contract: include/kvstash.h).
 *
 * A kvs_client owns one grpc_channel and options that never change after connect. Every
 * API call is one `rpc` on the caller's stack: its own pluck completion queue and
 * grpc_call, batches run one at a time and waited for, everything freed before the call
 * returns. The handle therefore holds no per-call state and any number of threads may
 * use it at once (a grpc_channel is thread-safe). Messages are protobuf-c; one generic
 * unary helper (kvs__unary) serves every unary RPC. This file holds the connection, the
 * call machinery and the data path; admin.c holds the KvAdmin calls.
 */
#include "kvstash.h"

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/base/mem.h"
#include "client/client_int.h"
#include "kvstash/v1/kvstash.pb-c.h"
#include "pbc.h"

#define DEFAULT_TARGET "127.0.0.1:50051"
#define DEFAULT_TIMEOUT_MS 30000
#define DEFAULT_MAX_MESSAGE ((size_t)64 << 20)
#define DEFAULT_CHUNK_BYTES ((size_t)1 << 20)
/* Bytes a data PutChunk adds around its payload: one tag byte and a varint length. */
#define CHUNK_OVERHEAD 16
/* The call deadline makes every op complete; the pluck waits this much longer before it
 * cancels the call itself, so a stuck transport cannot hang the caller. */
#define PLUCK_GRACE_MS 5000

const char *kvs_tier_name(kvs_tier tier)
{
    switch (tier) {
    case KVS_TIER_GPU:
        return "gpu";
    case KVS_TIER_HOST:
        return "host";
    case KVS_TIER_DISK:
        return "disk";
    default:
        return "none";
    }
}

/* ------------------------------------------------------------------ connection */

int kvs_client_connect(const kvs_client_opts *opts, kvs_client **out, kvs_err *err)
{
    kvs_err_clear(err);
    if (!out)
        return kvs_err_set(err, KVS_EINVAL, "connect: out is NULL");
    *out = NULL;
    kvs_client_opts o = opts ? *opts : (kvs_client_opts){0};
    if (!o.target)
        o.target = DEFAULT_TARGET;
    if (o.timeout_ms == 0)
        o.timeout_ms = DEFAULT_TIMEOUT_MS;
    if (o.max_message == 0)
        o.max_message = DEFAULT_MAX_MESSAGE;
    if (o.chunk_bytes == 0)
        o.chunk_bytes = DEFAULT_CHUNK_BYTES;

    if (o.target[0] == '\0')
        return kvs_err_set(err, KVS_EINVAL, "target: empty");
    if (o.timeout_ms < 0)
        return kvs_err_set(err, KVS_EINVAL, "timeout_ms: %lld is negative",
                           (long long)o.timeout_ms);
    /* Channel args are ints. */
    if (o.max_message > INT_MAX)
        return kvs_err_set(err, KVS_EINVAL, "max_message: %zu over the gRPC limit of %d",
                           o.max_message, INT_MAX);
    if (o.connections > KVS_CONNECTIONS_MAX)
        return kvs_err_set(err, KVS_EINVAL, "connections: %u over the limit of %d", o.connections,
                           KVS_CONNECTIONS_MAX);
    if (o.connections == 0)
        o.connections = 1;
    if (o.chunk_bytes > o.max_message - CHUNK_OVERHEAD)
        return kvs_err_set(err, KVS_EINVAL, "chunk_bytes: %zu does not fit in max_message %zu",
                           o.chunk_bytes, o.max_message);
    if (o.token) {
        /* Metadata values must be printable ASCII; catch a pasted newline here rather
         * than as an opaque failure of the first call. */
        for (const char *p = o.token; *p; p++)
            if (*p < 0x20 || *p > 0x7e)
                return kvs_err_set(err, KVS_EINVAL, "token: contains a non-printable character");
    }

    kvs_client *c = kvs_xcalloc(1, sizeof *c);
    c->target = kvs_xstrdup(o.target);
    c->timeout_ms = o.timeout_ms;
    c->chunk_bytes = o.chunk_bytes;
    c->channels = kvs_xcalloc(o.connections, sizeof *c->channels);
    c->next_channel = kvs_xcalloc(1, sizeof *c->next_channel);
    atomic_init(c->next_channel, 0);
    pthread_mutex_init(&c->states_mu, NULL);
    if (o.token && o.token[0]) {
        size_t n = strlen(o.token) + sizeof "Bearer ";
        c->auth = kvs_xmalloc(n);
        snprintf(c->auth, n, "Bearer %s", o.token);
    }

    grpc_init();
    grpc_arg args[5] = {
        {.type = GRPC_ARG_INTEGER,
         .key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH,
         .value.integer = (int)o.max_message},
        {.type = GRPC_ARG_INTEGER,
         .key = GRPC_ARG_MAX_SEND_MESSAGE_LENGTH,
         .value.integer = (int)o.max_message},
        /* No call is ever retried (a Put stream is not replayable), and without retries
         * gRPC need not keep a copy of the messages sent. */
        {.type = GRPC_ARG_INTEGER, .key = GRPC_ARG_ENABLE_RETRIES, .value.integer = 0},
        /* One connection per channel: gRPC otherwise shares one TCP connection among every
         * channel of the process with the same settings, so eight clients of eight threads
         * queued on one socket (Gets at 64 clients 30-50% slower, tests/bench/RESULTS.md,
         * head-to-head with Redis), and a client's several connections would be one. */
        {.type = GRPC_ARG_INTEGER, .key = GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, .value.integer = 1},
        {0}, /* GRPC_SSL_TARGET_NAME_OVERRIDE_ARG with tls_server_name */
    };
    grpc_channel_args cargs = {.num_args = 4, .args = args};
    /* gRPC's arg wants a mutable string; it copies it into the channel. */
    char *server_name = o.tls_server_name ? kvs_xstrdup(o.tls_server_name) : NULL;
    if (server_name) {
        /* The name checked against the server's certificate instead of the target's host
         * (a test certificate for "localhost" reached at 127.0.0.1); also the :authority. */
        args[4] = (grpc_arg){.type = GRPC_ARG_STRING,
                             .key = GRPC_SSL_TARGET_NAME_OVERRIDE_ARG,
                             .value.string = server_name};
        cargs.num_args++;
    }
    grpc_channel_credentials *creds;
    int rc = kvs__tls_credentials(&o, &creds, err);
    if (rc) {
        free(server_name);
        kvs_client_close(c);
        return rc;
    }
    for (unsigned i = 0; i < o.connections; i++) {
        c->channels[i] = grpc_channel_create(c->target, creds, &cargs);
        if (!c->channels[i])
            break;
        c->n_channels++;
    }
    grpc_channel_credentials_release(creds);
    free(server_name);
    if (c->n_channels != o.connections) {
        kvs_client_close(c);
        return kvs_err_set(err, KVS_EINTERNAL, "connect: cannot create a channel to %s", o.target);
    }
    *out = c;
    return 0;
}

void kvs_client_close(kvs_client *c)
{
    if (!c)
        return;
    for (unsigned i = 0; i < c->n_channels; i++)
        grpc_channel_destroy(c->channels[i]);
    free(c->channels);
    free(c->next_channel);
    /* grpc_init was called in connect whatever happened after it. */
    grpc_shutdown();
    for (size_t i = 0; i < c->n_states; i++)
        free(c->states[i].data);
    free(c->states);
    pthread_mutex_destroy(&c->states_mu);
    free(c->auth);
    free(c->target);
    free(c);
}

/* ------------------------------------------------------------------ one call */

_Thread_local gpr_timespec kvs__call_deadline;
_Thread_local unsigned kvs__call_channel;

int kvs__rpc_start(kvs__rpc *r, const kvs_client *c, const char *method, kvs_err *err)
{
    memset(r, 0, sizeof *r);
    r->c = c;
    r->name = strrchr(method, '/') + 1;
    r->details = grpc_empty_slice();
    grpc_metadata_array_init(&r->initial_md);
    grpc_metadata_array_init(&r->trailing_md);
    r->deadline = gpr_time_add(gpr_now(GPR_CLOCK_REALTIME),
                               gpr_time_from_millis(c->timeout_ms, GPR_TIMESPAN));
    if (kvs__call_deadline.tv_sec != 0 && gpr_time_cmp(kvs__call_deadline, r->deadline) < 0)
        r->deadline = kvs__call_deadline;
    r->cq = grpc_completion_queue_create_for_pluck(NULL);
    if (!r->cq)
        return kvs_err_set(err, KVS_EINTERNAL, "%s: cannot create a completion queue", r->name);
    unsigned ch = kvs__call_channel ? kvs__call_channel - 1
                  : c->n_channels > 1
                      ? atomic_fetch_add_explicit(c->next_channel, 1, memory_order_relaxed)
                      : 0;
    r->call = grpc_channel_create_call(
        c->channels[ch % c->n_channels], NULL, GRPC_PROPAGATE_DEFAULTS, r->cq,
        grpc_slice_from_static_string(method), NULL, r->deadline, NULL);
    if (!r->call)
        return kvs_err_set(err, KVS_EINTERNAL, "%s: cannot create a call", r->name);
    if (c->auth) {
        r->auth.key = grpc_slice_from_static_string("authorization");
        /* The client outlives its calls, so its string can back a static slice. */
        r->auth.value = grpc_slice_from_static_string(c->auth);
    }
    return 0;
}

/* Runs one batch and waits for it; returns whether all its ops succeeded. A batch with
 * RECV_STATUS_ON_CLIENT always completes, so the status is known afterwards. */
bool kvs__rpc_run(kvs__rpc *r, const grpc_op *ops, size_t n)
{
    grpc_call_error ce = grpc_call_start_batch(r->call, ops, n, r, NULL);
    if (ce != GRPC_CALL_OK) {
        if (r->call_error == GRPC_CALL_OK)
            r->call_error = ce;
        return false;
    }
    gpr_timespec until =
        gpr_time_add(r->deadline, gpr_time_from_millis(PLUCK_GRACE_MS, GPR_TIMESPAN));
    grpc_event ev = grpc_completion_queue_pluck(r->cq, r, until, NULL);
    if (ev.type == GRPC_QUEUE_TIMEOUT) {
        /* Cancelling completes every pending op; the batch must still be collected
         * before the queue can be destroyed. */
        grpc_call_cancel(r->call, NULL);
        ev = grpc_completion_queue_pluck(r->cq, r, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    }
    for (size_t i = 0; i < n; i++)
        if (ops[i].op == GRPC_OP_RECV_STATUS_ON_CLIENT)
            r->have_status = true;
    return ev.type == GRPC_OP_COMPLETE && ev.success;
}

/* Op builders: each fills one grpc_op of a batch. */
grpc_op kvs__op_send_md(kvs__rpc *r)
{
    grpc_op op = {.op = GRPC_OP_SEND_INITIAL_METADATA};
    if (r->c->auth) {
        op.data.send_initial_metadata.count = 1;
        op.data.send_initial_metadata.metadata = &r->auth;
    }
    return op;
}

grpc_op kvs__op_send_msg(grpc_byte_buffer *bb)
{
    return (grpc_op){.op = GRPC_OP_SEND_MESSAGE, .data.send_message.send_message = bb};
}

grpc_op kvs__op_close(void)
{
    return (grpc_op){.op = GRPC_OP_SEND_CLOSE_FROM_CLIENT};
}

grpc_op kvs__op_recv_md(kvs__rpc *r)
{
    return (grpc_op){.op = GRPC_OP_RECV_INITIAL_METADATA,
                     .data.recv_initial_metadata.recv_initial_metadata = &r->initial_md};
}

grpc_op kvs__op_recv_msg(grpc_byte_buffer **bb)
{
    return (grpc_op){.op = GRPC_OP_RECV_MESSAGE, .data.recv_message.recv_message = bb};
}

grpc_op kvs__op_recv_status(kvs__rpc *r)
{
    grpc_op op = {.op = GRPC_OP_RECV_STATUS_ON_CLIENT};
    op.data.recv_status_on_client.trailing_metadata = &r->trailing_md;
    op.data.recv_status_on_client.status = &r->status;
    op.data.recv_status_on_client.status_details = &r->details;
    return op;
}

/* Turns a non-OK status into a kvs code with the server's text prefixed by the RPC name. */
static int status_error(const kvs__rpc *r, kvs_err *err)
{
    int code = kvs_err_from_grpc_status(r->status);
    int n = (int)GRPC_SLICE_LENGTH(r->details);
    const char *d = (const char *)GRPC_SLICE_START_PTR(r->details);
    if (n == 0) {
        d = kvs_strerror(code);
        n = (int)strlen(d);
    }
    if (r->status == GRPC_STATUS_UNAVAILABLE)
        return kvs_err_set(err, code, "%s: %s unavailable: %.*s", r->name, r->c->target, n, d);
    if (r->status == GRPC_STATUS_DEADLINE_EXCEEDED)
        return kvs_err_set(err, code, "%s: no answer from %s within %lld ms (%.*s)", r->name,
                           r->c->target, (long long)r->c->timeout_ms, n, d);
    return kvs_err_set(err, code, "%s: %.*s", r->name, n, d);
}

/* Ends the call and frees it. rc != 0 is a local failure (already in err) that cancels
 * the call and is returned as is; otherwise the result is the call's status. */
int kvs__rpc_finish(kvs__rpc *r, int rc, kvs_err *err)
{
    if (r->call) {
        if (!r->have_status) {
            if (rc != 0)
                grpc_call_cancel(r->call, NULL);
            grpc_op op = kvs__op_recv_status(r);
            (void)kvs__rpc_run(r, &op, 1); /* the status says how it went */
        }
        /* A server error explains more than a refused batch, so it wins. */
        if (rc == 0 && r->have_status && r->status != GRPC_STATUS_OK)
            rc = status_error(r, err);
        else if (rc == 0 && (!r->have_status || r->call_error != GRPC_CALL_OK))
            rc = kvs_err_set(err, KVS_EINTERNAL, "%s: grpc_call_start_batch failed (%d)", r->name,
                             (int)r->call_error);
        grpc_call_unref(r->call);
    }
    if (r->cq) {
        grpc_completion_queue_shutdown(r->cq);
        /* Every batch was collected above, so this returns SHUTDOWN at once. */
        while (grpc_completion_queue_pluck(r->cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL)
                   .type != GRPC_QUEUE_SHUTDOWN) {
        }
        grpc_completion_queue_destroy(r->cq);
    }
    grpc_metadata_array_destroy(&r->initial_md);
    grpc_metadata_array_destroy(&r->trailing_md);
    grpc_slice_unref(r->details);
    return rc;
}

/* ------------------------------------------------------------------ messages */

/* Packs m into a new byte buffer (freed with grpc_byte_buffer_destroy); NULL if out of
 * memory. */
grpc_byte_buffer *kvs__pack_msg(const ProtobufCMessage *m)
{
    size_t n = protobuf_c_message_get_packed_size(m);
    grpc_slice s;
    if (n == 0) {
        s = grpc_empty_slice();
    } else {
        uint8_t *buf = kvs_trymalloc(n);
        if (!buf)
            return NULL;
        protobuf_c_message_pack(m, buf);
        s = grpc_slice_new(buf, n, free);
    }
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    return bb;
}

/* Parses a received message; *out is freed with protobuf_c_message_free_unpacked. */
int kvs__unpack_msg(const char *name, grpc_byte_buffer *bb, const ProtobufCMessageDescriptor *d,
                    ProtobufCMessage **out, kvs_err *err)
{
    *out = NULL;
    if (!bb)
        return kvs_err_set(err, KVS_EPROTO, "%s: the server sent no %s", name, d->short_name);
    grpc_byte_buffer_reader rd;
    if (!grpc_byte_buffer_reader_init(&rd, bb))
        return kvs_err_set(err, KVS_EPROTO, "%s: cannot read the %s", name, d->short_name);
    grpc_slice s = grpc_byte_buffer_reader_readall(&rd);
    grpc_byte_buffer_reader_destroy(&rd);
    *out = protobuf_c_message_unpack(d, NULL, GRPC_SLICE_LENGTH(s), GRPC_SLICE_START_PTR(s));
    grpc_slice_unref(s);
    if (!*out)
        return kvs_err_set(err, KVS_EPROTO, "%s: malformed %s", name, d->short_name);
    return 0;
}

/* One request, one reply: the whole call is a single batch. On success *reply belongs
 * to the caller (protobuf_c_message_free_unpacked). */
int kvs__unary(const kvs_client *c, const char *method, const ProtobufCMessage *req,
               const ProtobufCMessageDescriptor *reply_desc, ProtobufCMessage **reply, kvs_err *err)
{
    kvs_err_clear(err);
    *reply = NULL;
    if (!c)
        return kvs_err_set(err, KVS_EINVAL, "%s: client is NULL", strrchr(method, '/') + 1);
    kvs__rpc r;
    int rc = kvs__rpc_start(&r, c, method, err);
    if (rc != 0)
        return kvs__rpc_finish(&r, rc, err);
    grpc_byte_buffer *out = kvs__pack_msg(req), *in = NULL;
    if (!out)
        return kvs__rpc_finish(&r, kvs_err_set(err, KVS_ENOMEM, "%s: out of memory", r.name), err);
    grpc_op ops[] = {kvs__op_send_md(&r), kvs__op_send_msg(out), kvs__op_close(),
                     kvs__op_recv_md(&r), kvs__op_recv_msg(&in), kvs__op_recv_status(&r)};
    (void)kvs__rpc_run(&r, ops, sizeof ops / sizeof ops[0]); /* the status says how it went */
    grpc_byte_buffer_destroy(out);
    rc = kvs__rpc_finish(&r, 0, err);
    if (rc == 0)
        rc = kvs__unpack_msg(r.name, in, reply_desc, reply, err);
    if (in)
        grpc_byte_buffer_destroy(in);
    return rc;
}

kvs_tier kvs__tier_from_pb(int t)
{
    return (t >= KVS_TIER_GPU && t <= KVS_TIER_DISK) ? (kvs_tier)t : KVS_TIER_NONE;
}

kvs_get_result kvs__get_result_from_pb(const Kvstash__V1__GetHeader *h)
{
    kvs_get_result r = {.tokens = h->tokens,
                        .dtype = kvs__dtype_from_pb(h->dtype),
                        .layer_begin = h->layer_begin,
                        .layer_end = h->layer_end,
                        .bytes = h->total_bytes,
                        .format = h->format == KVSTASH__V1__FORMAT__FORMAT_ENCODED
                                      ? KVS_FORMAT_ENCODED
                                      : KVS_FORMAT_RAW,
                        .tier = kvs__tier_from_pb(h->tier),
                        .fallback = h->fallback};
    snprintf(r.key_codec, sizeof r.key_codec, "%s", h->key_codec ? h->key_codec : "");
    snprintf(r.value_codec, sizeof r.value_codec, "%s", h->value_codec ? h->value_codec : "");
    return r;
}

kvs_dtype kvs__dtype_from_pb(int d)
{
    return (d == KVS_DTYPE_FP16 || d == KVS_DTYPE_BF16) ? (kvs_dtype)d : KVS_DTYPE_UNSPECIFIED;
}

/* ------------------------------------------------------------------ Put */

static void keep_caller_buffer(void *p)
{
    (void)p; /* the payload belongs to the caller of kvs_client_put */
}

/* A data PutChunk around borrowed payload bytes, without copying them: the message is
 * the field's tag and varint length (protobuf wire format) followed by the bytes, so
 * the payload slice can point into the caller's buffer. kvs_client_put waits for the
 * whole call to end before it returns, so the buffer outlives every use of the slice. */
grpc_byte_buffer *kvs__data_chunk(const uint8_t *p, size_t n)
{
    uint8_t head[CHUNK_OVERHEAD];
    size_t h = 0;
    head[h++] =
        (uint8_t)((KVSTASH__V1__PUT_CHUNK__KIND_DATA << 3) | PROTOBUF_C_WIRE_TYPE_LENGTH_PREFIXED);
    uint64_t v = n;
    do {
        head[h++] = (uint8_t)((v & 0x7f) | (v > 0x7f ? 0x80 : 0));
        v >>= 7;
    } while (v);
    /* The slice references the caller's bytes (no copy); gRPC only reads a slice it
     * sends, but grpc_slice_new takes a non-const pointer. */
    grpc_slice s[2] = {grpc_slice_from_copied_buffer((const char *)head, h),
                       grpc_slice_new((void *)(uintptr_t)p, n, keep_caller_buffer)};
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(s, 2);
    grpc_slice_unref(s[0]);
    grpc_slice_unref(s[1]);
    return bb;
}

size_t kvs__send_payload(kvs__rpc *r, const void *data, size_t len)
{
    /* One message in flight at a time; a failed send means the server has already
     * answered (usually with an error naming the field): the caller goes and reads it. */
    size_t off = 0;
    while (off < len) {
        size_t n = len - off < r->c->chunk_bytes ? len - off : r->c->chunk_bytes;
        grpc_byte_buffer *bb = kvs__data_chunk((const uint8_t *)data + off, n);
        grpc_op op = kvs__op_send_msg(bb);
        bool ok = kvs__rpc_run(r, &op, 1);
        grpc_byte_buffer_destroy(bb);
        if (!ok)
            break;
        off += n;
    }
    return off;
}

void kvs__end_stream(kvs__rpc *r, grpc_byte_buffer **in)
{
    grpc_op tail[] = {kvs__op_close(), kvs__op_recv_md(r), kvs__op_recv_msg(in),
                      kvs__op_recv_status(r)};
    (void)kvs__rpc_run(r, tail, 4); /* the status says how it went */
}

int kvs_client_put(kvs_client *c, const char *ns, const void *key, size_t key_len, uint32_t tokens,
                   kvs_dtype dtype, const void *data, size_t len, kvs_put_result *res, kvs_err *err)
{
    kvs_err_clear(err);
    if (!c || !ns || (!key && key_len) || (!data && len))
        return kvs_err_set(err, KVS_EINVAL, "Put: NULL argument");
    if (kvs_key_validate(key_len, err) != 0)
        return kvs_err_prefix(err, "Put");

    Kvstash__V1__PutHeader hdr = KVSTASH__V1__PUT_HEADER__INIT;
    hdr.namespace_ = kvs_pb_str(ns);
    hdr.key = kvs_pb_bin(key, key_len);
    hdr.tokens = tokens;
    hdr.dtype = (Kvstash__V1__Dtype)dtype;
    hdr.payload_bytes = len;
    Kvstash__V1__PutChunk first = KVSTASH__V1__PUT_CHUNK__INIT;
    first.kind_case = KVSTASH__V1__PUT_CHUNK__KIND_HEADER;
    first.header = &hdr;

    kvs__rpc r;
    int rc = kvs__rpc_start(&r, c, STASH("Put"), err);
    if (rc != 0)
        return kvs__rpc_finish(&r, rc, err);
    grpc_byte_buffer *bb = kvs__pack_msg(&first.base);
    if (!bb)
        return kvs__rpc_finish(&r, kvs_err_set(err, KVS_ENOMEM, "Put: out of memory"), err);
    grpc_op head_ops[] = {kvs__op_send_md(&r), kvs__op_send_msg(bb)};
    bool ok = kvs__rpc_run(&r, head_ops, 2);
    grpc_byte_buffer_destroy(bb);

    size_t off = ok ? kvs__send_payload(&r, data, len) : 0;
    grpc_byte_buffer *in = NULL;
    if (off == len)
        kvs__end_stream(&r, &in);
    rc = kvs__rpc_finish(&r, 0, err);
    if (rc == 0 && off < len)
        rc = kvs_err_set(err, KVS_EPROTO, "Put: the server ended the call after %zu of %zu bytes",
                         off, len);
    ProtobufCMessage *m = NULL;
    if (rc == 0)
        rc = kvs__unpack_msg(r.name, in, &kvstash__v1__put_reply__descriptor, &m, err);
    if (in)
        grpc_byte_buffer_destroy(in);
    if (rc != 0)
        return rc;
    const Kvstash__V1__PutReply *rep = (const Kvstash__V1__PutReply *)m;
    if (res)
        *res = (kvs_put_result){.tier = kvs__tier_from_pb(rep->tier),
                                .encoded_bytes = rep->encoded_bytes,
                                .raw_bytes = rep->raw_bytes,
                                .replaced = rep->replaced,
                                .fallback = rep->fallback};
    protobuf_c_message_free_unpacked(m, NULL);
    return 0;
}

/* ------------------------------------------------------------------ Get */

/* Where the stream of a Get stands: chunks must arrive contiguous and in layout order. */
typedef struct get_state {
    kvs_get_result hdr;
    bool have_hdr;
    uint64_t total, got;
    uint64_t layer_size; /* RAW: total / layers; ENCODED: 0 (sections differ in size) */
    uint32_t layer;      /* layer of the last data chunk */
    uint64_t layer_off;  /* bytes of `layer` received */
    uint8_t *dst;        /* kvs_client_get: the bytes go here, at `got`, instead of to a
                          * callback (data chunks by kvs__chunk_data_fast) */
    size_t dst_cap;
} get_state;

static int layer_piece(get_state *st, uint32_t layer, uint64_t offset, const uint8_t *data,
                       size_t n, kvs_layer_cb cb, void *ctx, kvs_err *err);

static int get_chunk(get_state *st, const Kvstash__V1__GetChunk *ch, kvs_layer_cb cb, void *ctx,
                     kvs_err *err)
{
    if (ch->header) {
        const Kvstash__V1__GetHeader *h = ch->header;
        if (st->have_hdr)
            return kvs_err_set(err, KVS_EPROTO, "Get: a second header in the stream");
        if (h->layer_end <= h->layer_begin)
            return kvs_err_set(err, KVS_EPROTO, "Get: header: empty layer range [%u, %u)",
                               h->layer_begin, h->layer_end);
        st->have_hdr = true;
        st->total = h->total_bytes;
        if (st->dst && st->total > st->dst_cap)
            return kvs_err_set(err, KVS_E2BIG,
                               "Get: block of %llu bytes does not fit in a buffer of %zu",
                               (unsigned long long)st->total, st->dst_cap);
        st->hdr = kvs__get_result_from_pb(h);
        uint32_t layers = h->layer_end - h->layer_begin;
        if (st->hdr.format == KVS_FORMAT_RAW) {
            if (st->total % layers != 0)
                return kvs_err_set(err, KVS_EPROTO,
                                   "Get: header: total_bytes %llu is not a multiple of %u layers",
                                   (unsigned long long)st->total, layers);
            st->layer_size = st->total / layers;
        }
        st->layer = h->layer_begin;
    } else if (!st->have_hdr) {
        return kvs_err_set(err, KVS_EPROTO, "Get: data before the header");
    }
    size_t n = ch->data.len;
    if (n == 0)
        return 0;
    if (st->layer_size && ch->offset == 0 && n > st->layer_size) {
        /* Whole layers packed in one message (GetRequest.pack_layers): handed to the
         * callback one layer at a time, each checked as if it had come alone. */
        if (n % st->layer_size)
            return kvs_err_set(err, KVS_EPROTO,
                               "Get: a packed chunk of %zu bytes is not whole layers of %llu", n,
                               (unsigned long long)st->layer_size);
        for (size_t i = 0; i < n / st->layer_size; i++) {
            int rc = layer_piece(st, ch->layer + (uint32_t)i, 0, ch->data.data + i * st->layer_size,
                                 st->layer_size, cb, ctx, err);
            if (rc)
                return rc;
        }
        return 0;
    }
    return layer_piece(st, ch->layer, ch->offset, ch->data.data, n, cb, ctx, err);
}

/* One piece of one layer: bytes [offset, offset + n) of `layer`, in order. */
static int layer_piece(get_state *st, uint32_t layer, uint64_t offset, const uint8_t *data,
                       size_t n, kvs_layer_cb cb, void *ctx, kvs_err *err)
{
    bool same = layer == st->layer && offset == st->layer_off;
    bool next = layer == st->layer + 1 && offset == 0 && st->layer_off > 0 &&
                (st->layer_size == 0 || st->layer_off == st->layer_size);
    if ((!same && !next) || layer >= st->hdr.layer_end ||
        (st->layer_size && offset + n > st->layer_size) || n > st->total - st->got)
        return kvs_err_set(err, KVS_EPROTO,
                           "Get: chunk of layer %u at offset %llu (%zu bytes) out of order "
                           "after %llu of %llu bytes",
                           layer, (unsigned long long)offset, n, (unsigned long long)st->got,
                           (unsigned long long)st->total);
    if (next) {
        st->layer = layer;
        st->layer_off = 0;
    }
    int rc = st->dst ? (memcpy(st->dst + st->got, data, n), 0)
                     : cb(ctx, &st->hdr, layer, offset, data, n);
    if (rc != 0)
        return kvs_err_set(err, rc, "Get: stopped by the layer callback: %s (%d)", kvs_strerror(rc),
                           rc);
    st->layer_off += n;
    st->got += n;
    return 0;
}

/* A Get stream into the callback, or (st->dst set) into one buffer. */
static int get_stream(kvs_client *c, const char *ns, const void *key, size_t key_len,
                      const kvs_get_opts *opts, kvs_layer_cb cb, void *ctx, get_state *st,
                      kvs_get_result *res, kvs_err *err)
{
    kvs_err_clear(err);
    if (!c || !ns || (!key && key_len) || (!cb && !st->dst))
        return kvs_err_set(err, KVS_EINVAL, "Get: NULL argument");
    if (kvs_key_validate(key_len, err) != 0)
        return kvs_err_prefix(err, "Get");
    kvs_get_opts o = opts ? *opts : (kvs_get_opts){0};
    Kvstash__V1__GetRequest q = KVSTASH__V1__GET_REQUEST__INIT;
    q.namespace_ = kvs_pb_str(ns);
    q.key = kvs_pb_bin(key, key_len);
    q.format = o.format == KVS_FORMAT_ENCODED ? KVSTASH__V1__FORMAT__FORMAT_ENCODED
                                              : KVSTASH__V1__FORMAT__FORMAT_RAW;
    q.layer_begin = o.layer_begin;
    q.layer_end = o.layer_end;
    q.pack_layers = true; /* get_chunk splits packed layers for the callback */

    kvs__rpc r;
    int rc = kvs__rpc_start(&r, c, STASH("Get"), err);
    if (rc != 0)
        return kvs__rpc_finish(&r, rc, err);
    grpc_byte_buffer *bb = kvs__pack_msg(&q.base);
    if (!bb)
        return kvs__rpc_finish(&r, kvs_err_set(err, KVS_ENOMEM, "Get: out of memory"), err);
    grpc_op ops[] = {kvs__op_send_md(&r), kvs__op_send_msg(bb), kvs__op_close(),
                     kvs__op_recv_md(&r)};
    bool ok = kvs__rpc_run(&r, ops, 4);
    grpc_byte_buffer_destroy(bb);

    while (ok && rc == 0) {
        grpc_byte_buffer *in = NULL;
        grpc_op op = kvs__op_recv_msg(&in);
        ok = kvs__rpc_run(&r, &op, 1);
        if (!ok || !in) /* end of stream: the status follows */
            break;
        if (st->dst && st->have_hdr) { /* straight from gRPC's slices: no copies */
            uint64_t got = 0;
            int fast =
                kvs__chunk_data_fast(in, st->dst + st->got, st->total - st->got, &got, r.name, err);
            if (fast) {
                grpc_byte_buffer_destroy(in);
                if (fast < 0)
                    rc = fast;
                st->got += got;
                continue;
            }
        }
        ProtobufCMessage *m = NULL;
        rc = kvs__unpack_msg(r.name, in, &kvstash__v1__get_chunk__descriptor, &m, err);
        grpc_byte_buffer_destroy(in);
        if (rc == 0)
            rc = get_chunk(st, (const Kvstash__V1__GetChunk *)m, cb, ctx, err);
        if (m)
            protobuf_c_message_free_unpacked(m, NULL);
    }
    rc = kvs__rpc_finish(&r, rc, err);
    if (rc == 0 && !st->have_hdr)
        rc = kvs_err_set(err, KVS_EPROTO, "Get: the stream ended without a header");
    if (rc == 0 && st->got != st->total)
        rc = kvs_err_set(err, KVS_EPROTO, "Get: the stream ended after %llu of %llu bytes",
                         (unsigned long long)st->got, (unsigned long long)st->total);
    if (rc == 0 && res) {
        *res = st->hdr;
        res->bytes = st->got;
    }
    return rc;
}

int kvs_client_get_layers(kvs_client *c, const char *ns, const void *key, size_t key_len,
                          const kvs_get_opts *opts, kvs_layer_cb cb, void *ctx, kvs_get_result *res,
                          kvs_err *err)
{
    get_state st = {0};
    if (!cb) {
        kvs_err_clear(err);
        return kvs_err_set(err, KVS_EINVAL, "Get: NULL argument");
    }
    return get_stream(c, ns, key, key_len, opts, cb, ctx, &st, res, err);
}

int kvs_client_get(kvs_client *c, const char *ns, const void *key, size_t key_len, void *buf,
                   size_t cap, kvs_get_result *res, kvs_err *err)
{
    if (!buf && cap) {
        kvs_err_clear(err);
        return kvs_err_set(err, KVS_EINVAL, "Get: buf is NULL");
    }
    /* buf NULL with cap 0 asks for the size: every block is E2BIG, with its size. */
    uint8_t none;
    get_state st = {.dst = buf ? buf : &none, .dst_cap = cap};
    return get_stream(c, ns, key, key_len, NULL, NULL, NULL, &st, res, err);
}

/* ------------------------------------------------------------------ keys */

/* One KeysRequest RPC (Lookup, Exists, Delete). The request borrows the caller's keys. */
static int keys_call(kvs_client *c, const char *method, const char *ns, const kvs_key *keys,
                     size_t n, const ProtobufCMessageDescriptor *reply_desc,
                     ProtobufCMessage **reply, kvs_err *err)
{
    const char *name = strrchr(method, '/') + 1;
    kvs_err_clear(err);
    *reply = NULL;
    if (!ns || (!keys && n))
        return kvs_err_set(err, KVS_EINVAL, "%s: NULL argument", name);
    uint64_t bytes;
    if (!kvs_mul_size(n ? n : 1, sizeof(ProtobufCBinaryData), &bytes) || bytes > SIZE_MAX)
        return kvs_err_set(err, KVS_EINVAL, "%s: %zu keys is too many", name, n);
    ProtobufCBinaryData *bin = kvs_trymalloc((size_t)bytes);
    if (!bin)
        return kvs_err_set(err, KVS_ENOMEM, "%s: out of memory for %zu keys", name, n);
    for (size_t i = 0; i < n; i++) {
        if (kvs_key_validate(keys[i].len, err) != 0) {
            free(bin);
            return kvs_err_prefix(err, "%s: keys[%zu]", name, i);
        }
        bin[i] = kvs_pb_bin(keys[i].bytes, keys[i].len);
    }
    Kvstash__V1__KeysRequest q = KVSTASH__V1__KEYS_REQUEST__INIT;
    q.namespace_ = kvs_pb_str(ns);
    q.n_keys = n;
    q.keys = bin;
    int rc = kvs__unary(c, method, &q.base, reply_desc, reply, err);
    free(bin);
    return rc;
}

int kvs_client_lookup(kvs_client *c, const char *ns, const kvs_key *keys, size_t n,
                      uint32_t *prefix, kvs_tier *tiers, kvs_err *err)
{
    return kvs_client_lookup_fallback(c, ns, keys, n, prefix, tiers, NULL, err);
}

/* Lookup with what its reply may carry besides the tiers (each output may be NULL). */
static int lookup(kvs_client *c, const char *ns, const kvs_key *keys, size_t n, uint32_t *prefix,
                  kvs_tier *tiers, bool *fallback, kvs_block_codecs *codecs, kvs_err *err)
{
    ProtobufCMessage *m;
    int rc =
        keys_call(c, STASH("Lookup"), ns, keys, n, &kvstash__v1__lookup_reply__descriptor, &m, err);
    if (rc != 0)
        return rc;
    const Kvstash__V1__LookupReply *rep = (const Kvstash__V1__LookupReply *)m;
    /* fallback and codecs: n entries, or none (a namespace without a bound or tier codecs,
     * an older daemon). */
    if (rep->n_tiers != n || rep->prefix_blocks > n || (rep->n_fallback && rep->n_fallback != n) ||
        rep->n_key_codecs != rep->n_value_codecs || (rep->n_key_codecs && rep->n_key_codecs != n)) {
        rc = kvs_err_set(err, KVS_EPROTO,
                         "Lookup: %zu tiers, %zu fallback flags, %zu/%zu codecs and prefix %u for "
                         "%zu keys",
                         rep->n_tiers, rep->n_fallback, rep->n_key_codecs, rep->n_value_codecs,
                         rep->prefix_blocks, n);
    } else {
        if (prefix)
            *prefix = rep->prefix_blocks;
        for (size_t i = 0; tiers && i < n; i++)
            tiers[i] = kvs__tier_from_pb(rep->tiers[i]);
        for (size_t i = 0; fallback && i < n; i++)
            fallback[i] = rep->n_fallback && rep->fallback[i];
        for (size_t i = 0; codecs && i < n; i++) {
            bool has = rep->n_key_codecs != 0;
            snprintf(codecs[i].key_codec, sizeof codecs[i].key_codec, "%s",
                     has && rep->key_codecs[i] ? rep->key_codecs[i] : "");
            snprintf(codecs[i].value_codec, sizeof codecs[i].value_codec, "%s",
                     has && rep->value_codecs[i] ? rep->value_codecs[i] : "");
        }
    }
    protobuf_c_message_free_unpacked(m, NULL);
    return rc;
}

int kvs_client_lookup_fallback(kvs_client *c, const char *ns, const kvs_key *keys, size_t n,
                               uint32_t *prefix, kvs_tier *tiers, bool *fallback, kvs_err *err)
{
    return lookup(c, ns, keys, n, prefix, tiers, fallback, NULL, err);
}

int kvs_client_lookup_codecs(kvs_client *c, const char *ns, const kvs_key *keys, size_t n,
                             uint32_t *prefix, kvs_tier *tiers, bool *fallback,
                             kvs_block_codecs *codecs, kvs_err *err)
{
    return lookup(c, ns, keys, n, prefix, tiers, fallback, codecs, err);
}

int kvs_client_exists(kvs_client *c, const char *ns, const kvs_key *keys, size_t n, bool *present,
                      kvs_err *err)
{
    ProtobufCMessage *m;
    int rc =
        keys_call(c, STASH("Exists"), ns, keys, n, &kvstash__v1__exists_reply__descriptor, &m, err);
    if (rc != 0)
        return rc;
    const Kvstash__V1__ExistsReply *rep = (const Kvstash__V1__ExistsReply *)m;
    if (rep->n_present != n)
        rc = kvs_err_set(err, KVS_EPROTO, "Exists: %zu answers for %zu keys", rep->n_present, n);
    for (size_t i = 0; rc == 0 && present && i < n; i++)
        present[i] = rep->present[i];
    protobuf_c_message_free_unpacked(m, NULL);
    return rc;
}

int kvs_client_delete(kvs_client *c, const char *ns, const kvs_key *keys, size_t n,
                      uint32_t *deleted, kvs_err *err)
{
    ProtobufCMessage *m;
    int rc =
        keys_call(c, STASH("Delete"), ns, keys, n, &kvstash__v1__delete_reply__descriptor, &m, err);
    if (rc != 0)
        return rc;
    if (deleted)
        *deleted = ((const Kvstash__V1__DeleteReply *)m)->deleted;
    protobuf_c_message_free_unpacked(m, NULL);
    return 0;
}
