/* KV events for cache-aware routers (issue 15, README "KV events"): with --events-listen,
 * kvstashd publishes which blocks it holds, and in which tier, as they come and go, so that
 * a router (llm-d's KV cache manager, Dynamo's router: subscribers of vLLM's KV events)
 * can send a request to the node that holds its prefix.
 *
 * Source: the store's one event sink (storage/store.h "Events", kvs_store_opts.on_event =
 * kvs_events_emit): every change of its index, in order. Replaying the events of a
 * namespace gives, for every key, the tier Lookup reports (unless some were lost: below).
 *
 * Wire format: vLLM's (vllm/distributed/kv_events.py, ZmqEventPublisher), which llm-d
 * decodes. A ZMQ PUB socket bound to --events-listen sends multipart messages
 *     [topic, seq, payload]
 *   topic    "<--events-topic>@<namespace>" (default topic "kv@<hostname>", so llm-d's
 *            "kv@<pod>@<model>" convention reads pod = host, model = namespace); a
 *            subscriber filters by prefix ("kv@" or "" for all, the full topic for one
 *            namespace)
 *   seq      8 bytes, big-endian: the message's number, 0, 1, 2... over every topic of
 *            this daemon. A number skipped means events were lost at that point (see
 *            "Never blocking" below); a subscriber of every topic sees consecutive numbers
 *            otherwise (one filtering one namespace also sees the others' numbers go by)
 *   payload  msgpack, vLLM's EventBatch as an array: [ts, events, data_parallel_rank]
 *            ts: float64, UNIX seconds at sending; data_parallel_rank: 0
 *            events, each an array led by its tag (msgspec's array_like tagged union):
 *              ["BlockStored", [key], nil, [], block_size, nil, medium, nil]
 *                  block_hashes, parent_block_hash, token_ids, block_size, lora_id,
 *                  medium, lora_name: one key per event (kvstash knows no chain of
 *                  blocks, so no parent is implied); block_size = the namespace's
 *                  tokens per block; no token ids (the store never sees tokens)
 *              ["BlockRemoved", [key, ...], medium]
 *                  consecutive removals from one tier share one event
 *              ["AllBlocksCleared"]
 *                  the topic's namespace was dropped with every block
 *            key: the block key's bytes as msgpack bin, whatever its length. Engines use
 *            their block hashes as keys; llm-d reads a bin hash as its last 8 bytes,
 *            big-endian, the value vLLM's integer hashes had, so an 8-byte key is the same
 *            hash either way. medium: "GPU", "CPU" (the host tier) or "DISK".
 *            A move between tiers (demotion, spill, promotion, a replace by a block in
 *            another tier) is BlockStored(new tier) then BlockRemoved(old tier), so a
 *            router never sees the block absent meanwhile (it holds it in two media for a
 *            moment); a replace in the same tier is a BlockStored alone.
 *
 * Never blocking the data path: kvs_events_emit copies an event into a bounded ring
 * (opts.queue events; a slot holds the key and the namespace name) under a leaf lock and
 * returns; when the ring is full the event is dropped and counted, and the event before it
 * is marked so that the publisher skips a sequence number right after it. One publisher
 * thread drains the ring: it waits up to opts.flush_ms for a batch to fill (opts.batch_max
 * events), encodes each run of one namespace as a message and sends it without waiting
 * (ZMQ_DONTWAIT). ZMQ keeps up to opts.sndhwm messages per subscriber and drops the rest
 * for that subscriber alone (PUB semantics): a subscriber that stops reading costs the
 * others nothing and sees the gap in seq itself; the daemon cannot count those drops
 * (libzmq does not report them). No replay socket: a subscriber that missed events (a gap,
 * or connecting late: events before a subscription are not kept) asks Lookup, or treats
 * the node's entries as stale.
 *
 * Threads and locks: kvs_events_emit runs on whichever thread changes the store's index,
 * under the store lock; it takes kvs_events.mu, a leaf (daemon/THREADS.md). The publisher
 * thread owns the ZMQ socket from create's return to destroy; it holds mu only to take
 * events and to add to the counters, never while encoding or sending.
 */
#ifndef KVS_DAEMON_EVENTS_H
#define KVS_DAEMON_EVENTS_H

#include <stdint.h>

#include "gpu/base/err.h"
#include "gpu/base/log.h"
#include "storage/store.h"

typedef struct kvs_events kvs_events;

typedef struct kvs_events_opts {
    const char *listen; /* ZMQ endpoint to bind: tcp://HOST:PORT (port * or 0: a free one,
                         * IPv6 as tcp://[::1]:PORT) or ipc://PATH; borrowed */
    const char *topic;  /* topic prefix (non-empty, < 256 bytes); borrowed */
    uint32_t queue;     /* events held for the publisher (0: 16384) */
    uint32_t batch_max; /* events per message at most (0: 256) */
    unsigned flush_ms;  /* how long a message waits for more events (0: 10 ms) */
    int sndhwm;         /* messages ZMQ holds for each subscriber (0: 1000) */
    kvs_log_fn log;     /* may be NULL */
    void *log_ctx;
} kvs_events_opts;

typedef struct kvs_events_stats {
    uint64_t queued;      /* events waiting for the publisher, or being sent, now */
    uint64_t published;   /* events sent (keys of BlockStored and BlockRemoved, and
                           * AllBlocksCleared), as subscribers count them */
    uint64_t messages;    /* messages (event batches) sent */
    uint64_t dropped;     /* events dropped because the ring was full */
    uint64_t send_errors; /* messages ZMQ refused (their events are lost too) */
} kvs_events_stats;

/* Binds the socket and starts the publisher. KVS_EINVAL (an endpoint or topic ZMQ or we
 * refuse) or KVS_EIO (bind failed: address in use, no such directory) naming the
 * endpoint; KVS_ENOMEM; KVS_EINTERNAL (ZMQ or thread creation). Free with
 * kvs_events_destroy. */
int kvs_events_create(const kvs_events_opts *o, kvs_events **out, kvs_err *err);
/* The endpoint bound, as ZMQ reports it (a port picked for * or 0 shown); valid until
 * destroy. */
const char *kvs_events_endpoint(const kvs_events *ev);
/* The store's event sink (kvs_store_event_fn; ctx: the kvs_events). Thread-safe, never
 * blocks: a bounded copy under a leaf lock. */
void kvs_events_emit(void *ctx, const kvs_store_event *e);
/* Thread-safe snapshot of the counters. */
void kvs_events_get_stats(kvs_events *ev, kvs_events_stats *out);
/* Sends what is queued, stops the publisher, closes the socket (waiting at most 1 s for
 * subscribers to take what ZMQ still holds) and frees everything; NULL is fine. Nothing
 * may emit any more (the store is destroyed first). */
void kvs_events_destroy(kvs_events *ev);

#endif
