/* kvstashd's gRPC server: binds the listener, owns the completion queue and its
 * threads, keeps request slots armed for every method, and drains on request.
 *
 * Lifecycle (driven by main.c on the loop thread):
 *   kvs_server_create (bind, arm, start CQ threads) -> serving
 *   kvs_server_drain  -> new calls answer UNAVAILABLE, Health says DRAINING
 *   (main waits until kvs_server_inflight() == 0 or the drain timeout)
 *   kvs_server_shutdown (stop listening, cancel leftovers, wait for every call object,
 *                        shut the queue, join threads) -> kvs_server_destroy
 */
#ifndef KVS_DAEMON_SERVER_H
#define KVS_DAEMON_SERVER_H

#include "daemon/config.h"
#include "daemon/work.h"
#include "gpu/engine/engine.h"
#include "gpu/base/err.h"
#include "storage/store.h"
#include "storage/tiering.h"

typedef struct kvs_server kvs_server;
struct kvs_regions;

/* auth (daemon/auth.h, daemon/tokens.h: kvs_tokens_load) is owned by the server from the
 * call on, even when it fails. tls (daemon/tls.h; NULL = plaintext) is borrowed for the
 * call only: gRPC copies the PEM text into the listener. cfg, store, work, engines, tiering,
 * regions and events are borrowed and must outlive the server (work may be NULL: codec work
 * then runs on the CQ threads; engines: KVS_STORE_GPUS_MAX entries, one per GPU tier's
 * device, the leading non-NULL ones, none and tiering NULL: no GPU; regions may be NULL:
 * no shared memory; events may be NULL: no KV events, daemon/events.h, for Stats).
 * *bound_port receives the TCP port actually bound (0 for a unix socket). */
struct kvs_auth;
struct kvs_tls;
struct kvs_events;
int kvs_server_create(const kvs_config *cfg, struct kvs_auth *auth, struct kvs_tls *tls,
                      kvs_store *store, kvs_work *work, kvs_engine *const *engines,
                      kvs_tiering *tiering, struct kvs_regions *regions, struct kvs_events *events,
                      kvs_server **out, int *bound_port, kvs_err *err);
void kvs_server_drain(kvs_server *srv);
/* Admitted calls that have not finished (Health excluded). Thread-safe. */
unsigned kvs_server_inflight(kvs_server *srv);
/* Cancels every admitted Put or Get that has waited for its client (progress that counts
 * on a Put, kvs_call_progress; room to send on a Get) for idle_ms or more: a stalled or
 * trickling client cannot hold a stream slot,
 * receive memory or a block reference for longer (--stream-idle). Returns how many it
 * cancelled. Thread-safe; called by the loop's sweep timer. */
unsigned kvs_server_sweep(kvs_server *srv, uint64_t idle_ms);
/* Stream counters for the stats line: limits (daemon/limits.h) and idle cancellations. */
struct kvs_limits_stats;
void kvs_server_stream_stats(kvs_server *srv, struct kvs_limits_stats *out, uint64_t *idle);
/* Replaces the token digests (a SIGHUP reload; auth is owned by the server from now on):
 * calls checked after this returns see the new tokens; the old object is freed once no
 * CQ thread can hold it (call.h, kvs_server.auth), here or at a later sweep. Loop thread
 * only. */
struct kvs_auth;
void kvs_server_set_auth(kvs_server *srv, struct kvs_auth *auth);
/* Blocking; see the lifecycle above. */
void kvs_server_shutdown(kvs_server *srv);
void kvs_server_destroy(kvs_server *srv);

#endif
