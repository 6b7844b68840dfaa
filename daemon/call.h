/* Daemon-internal: the server's shared state and the per-call state machine base.
 *
 * One kvs_call per gRPC call (and per armed request slot). Completion-queue threads
 * drive it: every batch started on a call carries a tag (call, step); when the batch
 * completes, kvs_call_on_event runs the step's handler on whichever CQ thread got it.
 *
 *   armed ──ARRIVE──> admitted ──(method start)──> RECV/SEND steps ──> FINISH ──> freed
 *     │                  │                                               ▲
 *     │                  └─ rejected (draining, auth, bad request) ──────┘
 *     └─ ARRIVE !ok (server shutting down) ──> freed
 *   CLOSE (RECV_CLOSE_ON_SERVER) is posted at arrival and completes when the call ends
 *   or is cancelled; it is the only reliable cancellation signal.
 *
 * Invariants:
 *  1. At most one batch per kind is outstanding: besides CLOSE, a call has either one
 *     RECV, one SEND or one FINISH batch in flight, never two, so method handlers never
 *     run concurrently for one call. Only the `mu`-guarded fields are shared with CLOSE.
 *  2. `pending` counts batches started and not yet completed (the ARRIVE request counts
 *     as one). The call is freed when pending reaches 0 and `finished` is set; a handler
 *     starts its follow-up batch before the current event is retired, so pending never
 *     drops to 0 early.
 *  3. Every admitted call is counted in srv->inflight until freed; kvs_server_shutdown
 *     waits for srv->live (every call object, armed or not) to reach 0 before the
 *     completion queue is shut down.
 *  4. Every admitted Put and Get is in srv->streams from admission until call_free
 *     unlinks it, before its grpc_call is released: the sweep (kvs_server_sweep, under
 *     srv->mu) may cancel any call it finds there.
 *
 * Lock order: srv->mu, then call->mu; the store's lock is taken with neither held
 * (handlers call the store before taking any daemon lock).
 */
#ifndef KVS_DAEMON_CALL_H
#define KVS_DAEMON_CALL_H

#include <grpc/grpc.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include <protobuf-c/protobuf-c.h>

#include "daemon/config.h"
#include "gpu/codec/paged.h"
#include "storage/store.h"

typedef enum kvs_rpc {
    KVS_RPC_PUT,
    KVS_RPC_GET,
    KVS_RPC_LOOKUP,
    KVS_RPC_EXISTS,
    KVS_RPC_DELETE,
    KVS_RPC_NS_CREATE,
    KVS_RPC_NS_DROP,
    KVS_RPC_NS_LIST,
    KVS_RPC_STATS,
    KVS_RPC_HEALTH,
    KVS_RPC_ADD_QUERIES,
    KVS_RPC_VERIFY,
    KVS_RPC_FLUSH,
    KVS_RPC_EVICT,
    KVS_RPC_PUT_MANY,
    KVS_RPC_GET_MANY,
    KVS_RPC_DATA_PLANE,
    KVS_RPC_CODEC_STATE,
    KVS_RPC_NS_GET,
    KVS_RPC_COUNT,
    KVS_RPC_UNKNOWN = KVS_RPC_COUNT, /* the generic slot: answers UNIMPLEMENTED */
} kvs_rpc;

typedef struct kvs_server kvs_server;
typedef struct kvs_call kvs_call;

/* Per-RPC latency histogram (daemon/metrics.c exports it): upper bounds of its buckets in
 * nanoseconds, from 100 us to 10 s (a Lookup answers in tens of microseconds, a GetMany
 * of a few hundred MiB from disk in seconds); one more bucket, past the last bound, is
 * +Inf. Fixed, so that every scrape and every daemon has the same `le` labels. */
#define KVS_RPC_LAT_BUCKETS 16
extern const uint64_t kvs_rpc_lat_bounds_ns[KVS_RPC_LAT_BUCKETS];
/* gRPC status codes 0 (OK) .. 16 (UNAUTHENTICATED). */
#define KVS_GRPC_CODES 17

/* Unary handler: parses `req` (len bytes, borrowed), does the work, and either calls
 * kvs_call_reply() and returns 0, or returns a KVS_E* code with err filled (the caller
 * then answers with that status). */
typedef int (*kvs_unary_fn)(kvs_call *c, const uint8_t *req, size_t len, kvs_err *err);

/* One RPC: how the call base (call.c) arms, admits and drives it. Unary calls have a
 * handler; streaming calls (Put, Get) a state machine of their own, entered through these
 * hooks: call.c names no RPC. */
typedef struct kvs_rpc_desc {
    const char *path; /* "/kvstash.v1.KvStash/Put" */
    const char *name; /* "Put" */
    bool admin;       /* KvAdmin service: admin token rules */
    /* A tenant token may call it: on the namespaces granted to it only, which
     * kvs_call_ns_find enforces (README "Tenants" has the table). KvStash calls: true
     * (they all name a namespace, or none: DataPlane). KvAdmin calls: true only for those
     * that address one namespace; false for any that reveals or affects every tenant. */
    bool tenant;
    bool client_streaming; /* the requests are a stream (Put): no request message at arrival */
    kvs_unary_fn unary;    /* unary calls; NULL for streaming ones */
    /* Streaming calls: start once admitted (req/len: the request message, NULL/0 for a
     * client stream); on_recv and on_send when a RECV or SEND batch completes; cleanup
     * when the call is freed (what the call state holds). */
    void (*start)(kvs_call *c, const uint8_t *req, size_t len);
    void (*on_recv)(kvs_call *c, bool ok);
    void (*on_send)(kvs_call *c, bool ok);
    void (*cleanup)(kvs_call *c);
} kvs_rpc_desc;

struct kvs_server {
    const kvs_config *cfg;       /* borrowed from main, outlives the server */
    kvs_store *store;            /* borrowed */
    struct kvs_work *work;       /* borrowed: codec work goes to the libuv pool (daemon/work.h) */
    struct kvs_tiering *tiering; /* borrowed, may be NULL: GPU tier demotion (Evict) */
    struct kvs_xfer *xfer;       /* owned: the data path of Put and Get (storage/xfer.h) */
    struct kvs_limits *limits;   /* owned: stream slots and receive memory (daemon/limits.h) */
    /* Token digests (daemon/auth.h), owned. Swapped by a SIGHUP reload
     * (kvs_server_set_auth) while CQ threads read it: a reader counts itself in
     * auth_readers before it loads the pointer and out once done with the object, all
     * seq_cst; an object swapped out waits in auth_retired (loop thread only) until
     * auth_readers is seen at 0 after the swap, when no reader can still hold it. */
    _Atomic(struct kvs_auth *) auth;
    atomic_uint auth_readers;
    struct kvs_auth *auth_retired[8];
    unsigned n_retired;
    struct kvs_regions *regions; /* borrowed, may be NULL: shared memory (daemon/region.h) */
    struct kvs_events *events;   /* borrowed, may be NULL: KV events (daemon/events.h) */
    grpc_server *server;
    grpc_completion_queue *cq;
    void *registered[KVS_RPC_COUNT]; /* grpc_server_register_method handles */
    /* The RPC table, KVS_RPC_COUNT entries (server.c's, which names every handler): the
     * call base and Stats reach it through here, so no call file depends on server.c. */
    const kvs_rpc_desc *rpcs;
    pthread_t *threads;
    unsigned nthreads;
    uint64_t start_ms; /* monotonic, for uptime */
    atomic_bool draining;
    atomic_uint_fast64_t next_call_id;
    atomic_uint_fast64_t rpc_calls[KVS_RPC_COUNT];
    atomic_uint_fast64_t rpc_errors[KVS_RPC_COUNT];
    /* Every call that arrived for a known method, once, when its status is sent (or
     * CANCELLED when its client left first): by status code, and its time from arrival in
     * the latency histogram (per-bucket counts, not cumulative; the sum in ns). */
    atomic_uint_fast64_t rpc_codes[KVS_RPC_COUNT][KVS_GRPC_CODES];
    atomic_uint_fast64_t rpc_lat[KVS_RPC_COUNT][KVS_RPC_LAT_BUCKETS + 1];
    atomic_uint_fast64_t rpc_lat_sum_ns[KVS_RPC_COUNT];
    /* Payload bytes by path (Stats' DataPlaneStats): shared memory or the gRPC stream. */
    atomic_uint_fast64_t put_region_bytes, put_wire_bytes, get_region_bytes, get_wire_bytes;
    /* CQ threads waiting in a Put for the receive budget their call's blocks hold
     * (call_put.c take_budget): at most half the threads, so Gets and the rest go on. */
    atomic_uint budget_waiters;

    pthread_mutex_t mu; /* guards the fields below */
    pthread_cond_t cond;
    bool shutting_down;      /* no more re-arming */
    bool shutdown_done;      /* the shutdown tag completed */
    unsigned live;           /* call objects alive (armed + admitted) */
    unsigned inflight;       /* admitted calls not yet freed (Health excluded) */
    kvs_call *streams;       /* admitted Put and Get calls, for the idle sweep (invariant 4) */
    uint64_t idle_cancelled; /* streams cut by kvs_server_sweep */
    int shutdown_tag;        /* address used as the shutdown notification tag */
};

typedef enum kvs_call_step {
    KVS_STEP_ARRIVE,
    KVS_STEP_CLOSE,
    KVS_STEP_RECV,
    KVS_STEP_SEND,
    KVS_STEP_FINISH,
    KVS_STEP_COUNT,
} kvs_call_step;

typedef struct kvs_call_tag {
    kvs_call *call;
    kvs_call_step step;
} kvs_call_tag;

/* Per-RPC state of the streaming calls. Put and PutMany share one machine (call_put.c):
 * a Put is a PutMany of exactly one block that answers with that block's outcome. */
struct kvs_put_block;
struct kvs_put_result;
typedef struct kvs_put_state {
    struct kvs_limits_slot *slot; /* the stream's admission slot (daemon/limits.h) */
    bool many;                    /* PutMany: per-block results, blocks stored as they arrive */
    struct kvs_put_block *cur;    /* the block whose header came and payload is arriving */
    uint32_t blocks;              /* headers accepted */
    uint64_t idle_bytes;          /* message bytes since the last progress that counted */
    pthread_mutex_t mu;           /* guards the fields below (a leaf: call_put.c) */
    bool mu_init;
    struct kvs_put_result *results; /* one per accepted header, in stream order */
    uint32_t results_cap;
    uint32_t outstanding; /* blocks handed to the data path and not yet done */
    uint32_t budget_held; /* blocks holding receive budget (call_put.c, take_budget) */
    uint64_t budget_gen;  /* bumped, and budget_cv signalled, each time one gives it back */
    pthread_cond_t budget_cv;
    bool ended;     /* no more receives: end of stream, an error or a cancel */
    bool abandoned; /* the client went away */
    bool finishing; /* the answer has been started (once) */
    int fail_rc;    /* a protocol error that fails the whole call */
    char fail_msg[256];
    /* Paged blocks: the stream's current layout (PutHeader.layout, reused by the headers
     * after it); its offsets live in layout_bases (owned, allocated at the first). */
    kvs_paged_layout layout;
    uint64_t *layout_bases;
    bool have_layout;
} kvs_put_state;

/* Get and GetMany share one machine (call_get.c): a Get is a GetMany of one key that
 * answers with that block or the error. */
struct kvs_get_item;
typedef struct kvs_get_state {
    kvs_ns *ns;
    bool many, prefix, encoded;
    bool pack; /* whole layers may share a data chunk (GetRequest.pack_layers, GetMany) */
    uint32_t layer_begin, layer_end;
    struct kvs_get_item *items; /* one per key */
    uint32_t n;                 /* keys */
    uint32_t next_open;         /* the next item to open and run (a window ahead of send) */
    uint32_t send;              /* the item being sent */
    struct kvs_region *region;  /* GetMany into paged shared memory: a reference, else NULL */
    uint64_t slot_bytes;
    bool slots;     /* GetMany into region slots (region_offsets): no buffers, a wide window */
    bool dev_paged; /* paged into GPU memory (CUDA IPC): the engine scatters; as slots */
    /* Paged: blocks are scattered into the engine's pages in the region (owned arrays). */
    bool paged;
    kvs_paged_layout layout;
    uint64_t *layout_bases;
    uint32_t *pages; /* n * pages_per_block */
    uint32_t pages_per_block;
    pthread_mutex_t mu; /* guards items' ready flags, waiting and the end fields (a leaf) */
    struct kvs_limits_slot *slot; /* the stream's admission slot (daemon/limits.h) */
    bool mu_init;
    bool waiting;    /* the sender stopped for items[send] to be ready */
    bool header_out; /* items[send]'s header is sent: its data chunks follow */
    uint32_t layer;  /* the chunk position within items[send] */
    uint64_t offset, layer_bytes, chunk;
    const uint8_t *bytes;
    uint32_t layer_stop;
    /* How the call ends once no item is in flight (call_get.c; under mu). */
    int end_kind; /* END_NONE until reply, fail or abandon is decided */
    int end_rc;
    char end_msg[256];
    uint32_t inflight; /* items in the data path (run started, ready not yet) */
    uint32_t wait_for; /* the item the sender waits for, while waiting */
} kvs_get_state;

/* Verify, Flush, Evict (call_tiers.c): the job that runs on the pool; owned by the call
 * from the handler until the reply (freed then). */
typedef struct kvs_tiers_state {
    struct kvs_tiers_job *job;
} kvs_tiers_state;

struct kvs_call {
    kvs_server *srv;
    kvs_rpc rpc;
    uint64_t id;         /* for log lines: "call#812" */
    uint64_t arrived_ns; /* monotonic, set at arrival (0: never arrived): latency */
    bool observed;       /* its status and latency are counted (rpc_codes, rpc_lat) */
    grpc_call *call;
    gpr_timespec deadline;
    grpc_call_details details; /* generic slot only */
    grpc_metadata_array md;    /* request metadata */
    grpc_byte_buffer *request; /* the request message of unary calls and Get */
    grpc_byte_buffer *recv;    /* RECV step target */
    grpc_byte_buffer *send;    /* message of the SEND/FINISH batch in flight */
    grpc_slice status_details;
    bool status_details_set;
    bool md_sent;
    bool admitted;
    /* Admitted on a tenant token alone (no client or admin token): every namespace the
     * call names must be granted to token_digest, checked by kvs_call_ns_find against the
     * auth object current at that moment (a SIGHUP may have revoked it since arrival). The
     * digest, not a pointer into the auth object, which a reload frees. */
    bool tenant;
    uint8_t token_digest[32]; /* KVS_AUTH_DIGEST_LEN (daemon/auth.h) */
    kvs_call_tag tags[KVS_STEP_COUNT];

    /* Since when the call waits for its client (a SEND or the last batch in flight; for a
     * RECV, since its last progress that counted, idle_since_ms; monotonic ms), 0 while it
     * does not: what kvs_server_sweep measures idleness by. */
    atomic_uint_fast64_t waiting_ms;
    /* Since when the client has made no progress that counts (kvs_call_progress), 0 after
     * some: a RECV waits from here. Touched by the call's receive steps only, one at a
     * time. */
    uint64_t idle_since_ms;
    kvs_call *snext, *sprev; /* srv->streams links, under srv->mu (invariant 4) */
    bool streamed;           /* linked in srv->streams */
    bool idle_cut;           /* cancelled by the sweep (under srv->mu) */

    pthread_mutex_t mu; /* guards pending, finished, cancelled */
    int pending;
    bool finished;
    int cancelled; /* written by grpc when CLOSE completes */

    union {
        kvs_put_state put;
        kvs_get_state get;
        kvs_tiers_state tiers;
        uint32_t deleted; /* Delete of a durable namespace: answered once on disk */
    } u;
};

/* Arms a request slot for rpc (KVS_RPC_UNKNOWN: the generic slot). Returns 0, or an
 * error if the server is shutting down or grpc refused. Caller must not hold srv->mu. */
int kvs_call_arm(kvs_server *srv, kvs_rpc rpc);

/* Runs the handler of the completed batch. */
void kvs_call_on_event(kvs_call_tag *tag, bool ok);

/* msg in protobuf wire form, as a byte buffer (the caller owns it). */
grpc_byte_buffer *kvs_call_pack(const ProtobufCMessage *msg);

/* Step helpers for handlers (each starts one batch). */
void kvs_call_recv(kvs_call *c);
/* The client made progress that counts (the handler decides: a Put's header, 64 KiB of
 * payload, a block complete, the end of its stream): the idle sweep measures the next RECV
 * from its start instead of from the last progress. */
void kvs_call_progress(kvs_call *c);
/* Packs msg (borrowed, as above) and sends it as the next stream message (SEND step). */
void kvs_call_send(kvs_call *c, const ProtobufCMessage *msg);
/* Sends bb (owned by the call from here) as the next stream message (SEND step): for a
 * message built from slices that reference payload memory instead of copying it. */
void kvs_call_send_buffer(kvs_call *c, grpc_byte_buffer *bb);
/* Packs msg (borrowed; may be freed once this returns; NULL for status only) and sends
 * it with status OK (FINISH step). */
void kvs_call_reply(kvs_call *c, const ProtobufCMessage *msg);
/* Sends bb (owned by the call from here) as the stream's last message, with status OK in
 * the same batch (FINISH step): the trailers leave in the same write as the last data,
 * which saves a send completion and a write per call. */
void kvs_call_reply_buffer(kvs_call *c, grpc_byte_buffer *bb);
/* Sends an error status: code (KVS_E*) mapped to gRPC, msg as details (FINISH step). */
void kvs_call_fail(kvs_call *c, int code, const char *msg);
/* Ends the call without sending anything more (after a failed op or a cancel). Callable
 * from any thread; frees the call at once when no batch is in flight. */
void kvs_call_abandon(kvs_call *c);

/* Runs fn(c) on the libuv pool and then done(c) on the loop thread (daemon/work.h), or
 * both right here when there is no pool or it is closed (shutdown). Between the two the
 * call must have no batch in flight but CLOSE. */
void kvs_call_run_work(kvs_call *c, void (*fn)(void *), void (*done)(void *));
/* A payload buffer of n bytes (a Put's raw block, a Get's decoded layers): the data
 * path's host buffer (kvs_xfer_host_alloc: pinned when it can be). NULL when out of
 * memory. Free with kvs_call_buf_free (NULL is fine). */
uint8_t *kvs_call_buf_alloc(kvs_call *c, size_t n);
void kvs_call_buf_free(kvs_call *c, uint8_t *p);

/* Namespaces by name: the ONLY way a call reaches a namespace. Handlers never call
 * kvs_store_ns_find/create/drop themselves (tests/style/check-ns-access.sh fails the
 * build's tests if a daemon file other than call.c does), so a new RPC that names a
 * namespace gets the tenant check below without asking for it.
 *
 * Each checks the name (the message names the field), then, for a tenant call
 * (c->tenant), that the namespace is granted to the call's token under the auth object
 * current now: if not, KVS_EPERM "namespace 'x': not granted to this token", before the
 * store is asked, so the answer and its timing are the same whether x exists or not.
 *
 * find: *out is a reference the caller drops (kvs_ns_unref); KVS_ENOTFOUND if absent.
 * create: spec checked by the caller (kvs_wire_spec_from_proto); *out as find.
 * drop: *blocks_dropped as kvs_store_ns_drop. */
int kvs_call_ns_find(kvs_call *c, const char *name, kvs_ns **out, kvs_err *err);
int kvs_call_ns_create(kvs_call *c, const kvs_ns_spec *spec, kvs_ns **out, kvs_err *err);
int kvs_call_ns_drop(kvs_call *c, const char *name, uint64_t *blocks_dropped, kvs_err *err);

/* Copies a received byte buffer into one contiguous slice. The caller reads
 * GRPC_SLICE_START_PTR/LENGTH and unrefs the slice. */
grpc_slice kvs_call_flatten(grpc_byte_buffer *bb);

/* Streaming handlers (call_put.c, call_get.c). */
void kvs_put_start(kvs_call *c, const uint8_t *req, size_t len);
void kvs_put_on_recv(kvs_call *c, bool ok);
void kvs_put_cleanup(kvs_call *c);
void kvs_get_start(kvs_call *c, const uint8_t *req, size_t len);
void kvs_get_on_send(kvs_call *c, bool ok);
void kvs_get_cleanup(kvs_call *c);

/* Unary handlers (call_keys.c, call_admin.c, call_tiers.c). */
int kvs_lookup_handle(kvs_call *c, const uint8_t *req, size_t len, kvs_err *err);
int kvs_exists_handle(kvs_call *c, const uint8_t *req, size_t len, kvs_err *err);
int kvs_delete_handle(kvs_call *c, const uint8_t *req, size_t len, kvs_err *err);
int kvs_ns_create_handle(kvs_call *c, const uint8_t *req, size_t len, kvs_err *err);
int kvs_ns_drop_handle(kvs_call *c, const uint8_t *req, size_t len, kvs_err *err);
int kvs_ns_list_handle(kvs_call *c, const uint8_t *req, size_t len, kvs_err *err);
int kvs_ns_get_handle(kvs_call *c, const uint8_t *req, size_t len, kvs_err *err);
int kvs_stats_handle(kvs_call *c, const uint8_t *req, size_t len, kvs_err *err);
int kvs_health_handle(kvs_call *c, const uint8_t *req, size_t len, kvs_err *err);
int kvs_codec_state_handle(kvs_call *c, const uint8_t *req, size_t len, kvs_err *err);
int kvs_data_plane_handle(kvs_call *c, const uint8_t *req, size_t len, kvs_err *err);
int kvs_add_queries_handle(kvs_call *c, const uint8_t *req, size_t len, kvs_err *err);
/* Long admin calls (call_tiers.c): they answer later, from the loop thread. */
int kvs_verify_handle(kvs_call *c, const uint8_t *req, size_t len, kvs_err *err);
int kvs_flush_handle(kvs_call *c, const uint8_t *req, size_t len, kvs_err *err);
int kvs_evict_handle(kvs_call *c, const uint8_t *req, size_t len, kvs_err *err);

uint64_t kvs_now_ms(void);
/* Whether a stream waiting for its client since `since` (a kvs_now_ms time; 0: not
 * waiting) has waited idle_ms or more at `now`; a `since` after `now` has not waited. */
bool kvs_call_idle(uint64_t since, uint64_t now, uint64_t idle_ms);

#endif
