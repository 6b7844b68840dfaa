/* KV events for cache-aware routers: see events.h for the wire format and the threads.
 *
 * State (struct kvs_events):
 *  - fixed at create: the options, the topic prefix, the endpoint, the ZMQ context and
 *    socket. The socket is used by the publisher thread alone from pthread_create to
 *    pthread_join (both full barriers, which is how ZMQ lets a socket change threads).
 *  - under mu (a leaf lock: emitters hold the store lock when they take it):
 *    1. 0 <= count <= cap; the queued events are ring[(head + i) % cap] for i < count,
 *       oldest first, each holding copies of its key and namespace name.
 *    2. slot.lost = events dropped right after that slot because the ring was full (drops
 *       happen only then, so the dropped events are newer than every queued one); the
 *       publisher skips one sequence number after the message that ends with the slot.
 *    3. st.dropped = the sum of every slot's lost, ever; st.published and st.messages
 *       count what the publisher sent, st.send_errors the messages ZMQ refused; `sending`
 *       the events it took and has not counted yet. So every event emitted is queued,
 *       sending, published, dropped, in a message that failed, or a removal folded into
 *       the store of the same key that followed it (fold_moves).
 *    4. stopping only goes false -> true (destroy); the publisher then sends what is
 *       queued and exits.
 *  - the publisher's own: the next sequence number, the msgpack buffer, `batch` (the
 *    events it took, rewritten by fold_moves and sent with no lock held).
 */
#include "daemon/events.h"

#include <assert.h>
#include <errno.h>
#include <msgpack.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

#include "gpu/codec/spec.h"

#define DEF_QUEUE 16384
#define DEF_BATCH 256
#define DEF_FLUSH_MS 10
#define DEF_SNDHWM 1000
/* At destroy, how long ZMQ may keep sending what it holds to subscribers: the last events
 * reach a subscriber that reads, and a stuck one cannot hold up the shutdown. */
#define LINGER_MS 1000
#define TOPIC_MAX 255

typedef struct slot {
    uint8_t kind; /* kvs_store_event_kind */
    uint8_t tier; /* kvs_store_tier */
    uint8_t key_len;
    uint8_t ns_len;
    uint32_t block_tokens;
    uint32_t lost; /* invariant 2 */
    bool held;     /* a removal at the end of the queue, left there once (publisher) */
    uint8_t key[KVS_KEY_MAX];
    char ns[KVS_NAME_MAX];
} slot;

struct kvs_events {
    pthread_mutex_t mu;
    pthread_cond_t cond; /* the publisher waits here: first event, full batch, stopping */
    slot *ring;
    uint32_t cap, head, count;
    uint32_t sending; /* taken by the publisher, not yet counted as sent or failed */
    bool stopping;
    kvs_events_stats st; /* st.queued unused: count is the truth */

    uint32_t batch_max;
    unsigned flush_ms;
    char topic[TOPIC_MAX + 1];
    size_t topic_len;
    char endpoint[512];
    void *zctx, *sock;
    pthread_t thread;
    slot *batch; /* batch_max + 1 events */
    kvs_log_fn log;
    void *log_ctx;
};

static void elog(kvs_events *ev, kvs_log_level lvl, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void elog(kvs_events *ev, kvs_log_level lvl, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    kvs_vlogf(ev->log, ev->log_ctx, lvl, fmt, ap);
    va_end(ap);
}

/* ---------------------------------------------------------------- the data path's side */

void kvs_events_emit(void *ctx, const kvs_store_event *e)
{
    kvs_events *ev = ctx;
    size_t ns_len = strlen(e->ns);
    /* The store validated both (names 1..64, keys 1..64 bytes): our own invariant. */
    assert(ns_len <= KVS_NAME_MAX && e->key_len <= KVS_KEY_MAX);
    if (ns_len > KVS_NAME_MAX)
        ns_len = KVS_NAME_MAX;
    size_t key_len = e->key_len <= KVS_KEY_MAX ? e->key_len : KVS_KEY_MAX;
    pthread_mutex_lock(&ev->mu);
    if (ev->count == ev->cap) { /* never wait: the data path must not (events.h) */
        ev->ring[(ev->head + ev->count - 1) % ev->cap].lost++;
        ev->st.dropped++;
        pthread_mutex_unlock(&ev->mu);
        return;
    }
    slot *s = &ev->ring[(ev->head + ev->count) % ev->cap];
    s->kind = (uint8_t)e->kind;
    s->tier = (uint8_t)e->tier;
    s->key_len = (uint8_t)key_len;
    s->ns_len = (uint8_t)ns_len;
    s->block_tokens = e->block_tokens;
    s->lost = 0;
    s->held = false;
    if (key_len)
        memcpy(s->key, e->key, key_len);
    memcpy(s->ns, e->ns, ns_len);
    ev->count++;
    /* The publisher sleeps until the first event, then until a batch is full (or its
     * flush time passes): only those two moments need a wake-up. */
    bool wake = ev->count == 1 || ev->count == ev->batch_max;
    pthread_mutex_unlock(&ev->mu);
    if (wake)
        pthread_cond_signal(&ev->cond);
}

/* ---------------------------------------------------------------- encoding */

static const char *medium(uint8_t tier)
{
    switch (tier) {
    case KVS_STORE_TIER_GPU:
        return "GPU";
    case KVS_STORE_TIER_DISK:
        return "DISK";
    default:
        return "CPU"; /* the host tier, in vLLM's word for offloaded blocks in RAM */
    }
}

static int pack_str(msgpack_packer *pk, const char *s)
{
    size_t n = strlen(s);
    return msgpack_pack_str(pk, n) || msgpack_pack_str_body(pk, s, n) ? -1 : 0;
}

static int pack_key(msgpack_packer *pk, const slot *s)
{
    return msgpack_pack_bin(pk, s->key_len) || msgpack_pack_bin_body(pk, s->key, s->key_len) ? -1
                                                                                             : 0;
}

/* One wire event starts at s[i]; returns the index after it: consecutive removals from one
 * tier share a BlockRemoved (a set of hashes), every other event stands alone. */
static size_t event_end(const slot *s, size_t n, size_t i)
{
    size_t j = i + 1;
    if (s[i].kind == KVS_STORE_EV_REMOVED)
        while (j < n && s[j].kind == KVS_STORE_EV_REMOVED && s[j].tier == s[i].tier)
            j++;
    return j;
}

/* The EventBatch of n events of one namespace (events.h); -1 when the buffer cannot grow. */
static int pack_batch(msgpack_packer *pk, const slot *s, size_t n, double ts)
{
    size_t nev = 0;
    for (size_t i = 0; i < n; i = event_end(s, n, i))
        nev++;
    if (msgpack_pack_array(pk, 3) || msgpack_pack_double(pk, ts) || msgpack_pack_array(pk, nev))
        return -1;
    for (size_t i = 0, j; i < n; i = j) {
        j = event_end(s, n, i);
        int bad = 0;
        switch (s[i].kind) {
        case KVS_STORE_EV_STORED:
            /* block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
             * lora_name: vLLM's field order, which array_like encoding makes the format. */
            bad = msgpack_pack_array(pk, 8) || pack_str(pk, "BlockStored") ||
                  msgpack_pack_array(pk, 1) || pack_key(pk, &s[i]) || msgpack_pack_nil(pk) ||
                  msgpack_pack_array(pk, 0) || msgpack_pack_uint32(pk, s[i].block_tokens) ||
                  msgpack_pack_nil(pk) || pack_str(pk, medium(s[i].tier)) || msgpack_pack_nil(pk);
            break;
        case KVS_STORE_EV_REMOVED:
            bad = msgpack_pack_array(pk, 3) || pack_str(pk, "BlockRemoved") ||
                  msgpack_pack_array(pk, j - i);
            for (size_t k = i; k < j && !bad; k++)
                bad = pack_key(pk, &s[k]);
            bad = bad || pack_str(pk, medium(s[i].tier));
            break;
        default:
            bad = msgpack_pack_array(pk, 1) || pack_str(pk, "AllBlocksCleared");
        }
        if (bad)
            return -1;
    }
    return msgpack_pack_int(pk, 0) ? -1 : 0; /* data_parallel_rank: one rank */
}

/* ---------------------------------------------------------------- the publisher */

typedef struct pub {
    kvs_events *ev;
    uint64_t seq;
    msgpack_sbuffer buf;
    bool failing; /* the last send failed: logged once until one succeeds */
    uint64_t published, messages, errors;
} pub;

/* zmq_send with a retry when a signal interrupted it (the daemon handles several). */
static int send_part(void *sock, const void *p, size_t n, int flags)
{
    int rc;
    while ((rc = zmq_send(sock, p, n, flags | ZMQ_DONTWAIT)) < 0 && zmq_errno() == EINTR)
        ;
    return rc < 0 ? zmq_errno() : 0;
}

/* Sends s[0..n) (one namespace) as one message under the next sequence number. */
static void send_message(pub *p, const slot *s, size_t n)
{
    kvs_events *ev = p->ev;
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    msgpack_sbuffer_clear(&p->buf);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &p->buf, msgpack_sbuffer_write);
    uint64_t seq = p->seq++;
    int zerr = 0;
    if (pack_batch(&pk, s, n, (double)now.tv_sec + (double)now.tv_nsec / 1e9)) {
        p->errors++;
        elog(ev, KVS_LOG_ERROR, "events: out of memory encoding %zu events: lost (seq %llu)", n,
             (unsigned long long)seq);
        return; /* the sequence number is spent: subscribers see the loss */
    }
    char topic[TOPIC_MAX + 1 + KVS_NAME_MAX];
    memcpy(topic, ev->topic, ev->topic_len);
    topic[ev->topic_len] = '@';
    memcpy(topic + ev->topic_len + 1, s[0].ns, s[0].ns_len);
    uint8_t be[8];
    for (int i = 0; i < 8; i++)
        be[i] = (uint8_t)(seq >> (56 - 8 * i));
    /* PUB never waits for a subscriber: past its high-water mark a message is dropped for
     * that subscriber alone. What fails here is the socket itself. */
    if ((zerr = send_part(ev->sock, topic, ev->topic_len + 1 + s[0].ns_len, ZMQ_SNDMORE)) ||
        (zerr = send_part(ev->sock, be, sizeof be, ZMQ_SNDMORE)) ||
        (zerr = send_part(ev->sock, p->buf.data, p->buf.size, 0))) {
        p->errors++;
        if (!p->failing)
            elog(ev, KVS_LOG_ERROR, "events: zmq_send on %s: %s: %zu events lost (seq %llu)",
                 ev->endpoint, zmq_strerror(zerr), n, (unsigned long long)seq);
        p->failing = true;
        return;
    }
    if (p->failing)
        elog(ev, KVS_LOG_INFO, "events: sending on %s again (seq %llu)", ev->endpoint,
             (unsigned long long)seq);
    p->failing = false;
    p->published += n;
    p->messages++;
}

static bool same_block(const slot *a, const slot *b)
{
    return a->key_len == b->key_len && a->ns_len == b->ns_len &&
           memcmp(a->key, b->key, a->key_len) == 0 && memcmp(a->ns, b->ns, a->ns_len) == 0;
}

/* A removal that a store of the same key follows at once (nothing between, no loss) is a
 * move or a replace: the store reports the removal first (store.h), but a router should
 * never see the block absent meanwhile. So the pair is published as the store, then the
 * removal from the old tier, or as the store alone in the same tier. Whatever the pair
 * was, the end state is the same: a delete then a Put of one key reads as that Put. The
 * rewrite is in place (out <= i); returns the new count. */
static size_t fold_moves(slot *s, size_t n)
{
    size_t out = 0;
    for (size_t i = 0; i < n; i++) {
        if (i + 1 < n && s[i].kind == KVS_STORE_EV_REMOVED && !s[i].lost &&
            s[i + 1].kind == KVS_STORE_EV_STORED && same_block(&s[i], &s[i + 1])) {
            slot removed = s[i], stored = s[i + 1];
            i++;
            if (removed.tier != stored.tier) {
                removed.lost = stored.lost; /* a loss after the pair stays after it */
                stored.lost = 0;
                s[out++] = stored;
                s[out++] = removed;
            } else {
                s[out++] = stored;
            }
            continue;
        }
        s[out++] = s[i];
    }
    return out;
}

/* Sends the n events taken: one message per run of one namespace; a run also ends at a
 * slot after which events were dropped, and the next sequence number is skipped there. */
static void send_batch(pub *p, slot *s, size_t n)
{
    n = fold_moves(s, n);
    for (size_t i = 0, j; i < n; i = j) {
        j = i + 1;
        while (j < n && !s[j - 1].lost && s[j].ns_len == s[i].ns_len &&
               memcmp(s[j].ns, s[i].ns, s[i].ns_len) == 0)
            j++;
        send_message(p, s + i, j - i);
        if (s[j - 1].lost)
            p->seq++; /* the gap that tells subscribers events were lost here */
    }
}

static void deadline_after(struct timespec *t, unsigned ms)
{
    clock_gettime(CLOCK_MONOTONIC, t);
    t->tv_sec += ms / 1000;
    t->tv_nsec += (long)(ms % 1000) * 1000000L;
    if (t->tv_nsec >= 1000000000L) {
        t->tv_sec++;
        t->tv_nsec -= 1000000000L;
    }
}

static void *publisher(void *arg)
{
    kvs_events *ev = arg;
    pub p = {.ev = ev};
    msgpack_sbuffer_init(&p.buf);
    pthread_mutex_lock(&ev->mu);
    for (;;) {
        while (!ev->stopping && ev->count == 0)
            pthread_cond_wait(&ev->cond, &ev->mu);
        if (ev->count == 0)
            break; /* stopping, and everything is sent (invariant 4) */
        /* Let a batch fill, so that a burst of Puts is a few messages, not one each. */
        if (!ev->stopping && ev->count < ev->batch_max) {
            struct timespec until;
            deadline_after(&until, ev->flush_ms);
            while (!ev->stopping && ev->count < ev->batch_max)
                if (pthread_cond_timedwait(&ev->cond, &ev->mu, &until) == ETIMEDOUT)
                    break;
        }
        uint32_t n = ev->count < ev->batch_max ? ev->count : ev->batch_max;
        /* A removal and the store that may follow it go out together (fold_moves): the
         * next event too when it is queued (`batch` has room for one more); removals that
         * end the queue wait for one more round instead, since the store of a move comes
         * microseconds after its removal (both under one hold of the store lock). Each
         * event waits so once at most: a plain delete is late by one flush period. */
        if (n == ev->count && !ev->stopping) {
            uint32_t keep = n;
            for (; keep > 0; keep--) {
                slot *t = &ev->ring[(ev->head + keep - 1) % ev->cap];
                if (t->kind != KVS_STORE_EV_REMOVED || t->held || t->lost)
                    break;
                t->held = true;
            }
            if ((n = keep) == 0)
                continue;
        } else if (n < ev->count) {
            const slot *last = &ev->ring[(ev->head + n - 1) % ev->cap];
            if (last->kind == KVS_STORE_EV_REMOVED && !last->lost &&
                ev->ring[(ev->head + n) % ev->cap].kind == KVS_STORE_EV_STORED)
                n++;
        }
        for (uint32_t i = 0; i < n; i++)
            ev->batch[i] = ev->ring[(ev->head + i) % ev->cap];
        ev->head = (ev->head + n) % ev->cap;
        ev->count -= n;
        ev->sending = n;
        pthread_mutex_unlock(&ev->mu);
        p.published = p.messages = p.errors = 0;
        send_batch(&p, ev->batch, n);
        pthread_mutex_lock(&ev->mu);
        ev->st.published += p.published;
        ev->st.messages += p.messages;
        ev->st.send_errors += p.errors;
        ev->sending = 0;
    }
    pthread_mutex_unlock(&ev->mu);
    msgpack_sbuffer_destroy(&p.buf);
    return NULL;
}

/* ---------------------------------------------------------------- lifecycle */

static void close_zmq(kvs_events *ev)
{
    if (ev->sock)
        zmq_close(ev->sock);
    if (ev->zctx)
        while (zmq_ctx_term(ev->zctx) != 0 && zmq_errno() == EINTR)
            ;
    ev->sock = ev->zctx = NULL;
}

static void free_events(kvs_events *ev)
{
    close_zmq(ev);
    free(ev->ring);
    free(ev->batch);
    free(ev);
}

/* A ZMQ call that failed, as an error naming it and the endpoint. */
static int zmq_fail(kvs_err *err, const char *call, const char *endpoint)
{
    int e = zmq_errno();
    int code = e == EINVAL || e == EPROTONOSUPPORT || e == ENOCOMPATPROTO ? KVS_EINVAL
               : e == EADDRINUSE || e == EADDRNOTAVAIL || e == ENOENT || e == EACCES
                   ? KVS_EIO
                   : KVS_EINTERNAL;
    return kvs_err_set(err, code, "%s '%s': %s", call, endpoint, zmq_strerror(e));
}

static int set_int(void *sock, int opt, int v)
{
    return zmq_setsockopt(sock, opt, &v, sizeof v);
}

int kvs_events_create(const kvs_events_opts *o, kvs_events **out, kvs_err *err)
{
    if (!o->listen || !o->listen[0])
        return kvs_err_set(err, KVS_EINVAL, "events: no endpoint to bind");
    size_t tl = o->topic ? strlen(o->topic) : 0;
    if (tl == 0 || tl > TOPIC_MAX)
        return kvs_err_set(err, KVS_EINVAL, "events topic: %s (1..%d bytes)",
                           tl ? "too long" : "empty", TOPIC_MAX);
    kvs_events *ev = calloc(1, sizeof *ev);
    if (!ev)
        return kvs_err_set(err, KVS_ENOMEM, "events: out of memory");
    ev->cap = o->queue ? o->queue : DEF_QUEUE;
    ev->batch_max = o->batch_max ? o->batch_max : DEF_BATCH;
    ev->flush_ms = o->flush_ms ? o->flush_ms : DEF_FLUSH_MS;
    ev->log = o->log;
    ev->log_ctx = o->log_ctx;
    memcpy(ev->topic, o->topic, tl);
    ev->topic_len = tl;
    /* Sized from the config: fail softly (STYLE: allocations sized from outside). */
    ev->ring = calloc(ev->cap, sizeof *ev->ring);
    ev->batch = calloc((size_t)ev->batch_max + 1, sizeof *ev->batch); /* + 1: a pair's end */
    if (!ev->ring || !ev->batch) {
        size_t bytes = (size_t)ev->cap * sizeof *ev->ring;
        free_events(ev);
        return kvs_err_set(err, KVS_ENOMEM, "events queue: cannot allocate %zu bytes", bytes);
    }
    /* The flush wait is measured on the monotonic clock: a clock step cannot stall it. */
    pthread_condattr_t ca;
    int rc = pthread_condattr_init(&ca);
    if (rc == 0) {
        if ((rc = pthread_condattr_setclock(&ca, CLOCK_MONOTONIC)) == 0 &&
            (rc = pthread_cond_init(&ev->cond, &ca)) == 0 &&
            (rc = pthread_mutex_init(&ev->mu, NULL)) != 0)
            pthread_cond_destroy(&ev->cond);
        pthread_condattr_destroy(&ca);
    }
    if (rc) {
        free_events(ev);
        return kvs_err_set(err, KVS_EINTERNAL, "events: pthread init: %s", strerror(rc));
    }
    int hwm = o->sndhwm ? o->sndhwm : DEF_SNDHWM;
    size_t elen = sizeof ev->endpoint;
    if (!(ev->zctx = zmq_ctx_new())) {
        rc = kvs_err_set(err, KVS_EINTERNAL, "zmq_ctx_new: %s", zmq_strerror(zmq_errno()));
    } else if (!(ev->sock = zmq_socket(ev->zctx, ZMQ_PUB))) {
        rc = zmq_fail(err, "zmq_socket(PUB) for", o->listen);
    } else if (set_int(ev->sock, ZMQ_SNDHWM, hwm) || set_int(ev->sock, ZMQ_LINGER, LINGER_MS) ||
               /* tcp://[::1]:5557 needs IPv6 on; IPv4 addresses still work with it */
               (strchr(o->listen, '[') && set_int(ev->sock, ZMQ_IPV6, 1))) {
        rc = zmq_fail(err, "zmq_setsockopt on", o->listen);
    } else if (zmq_bind(ev->sock, o->listen)) {
        rc = zmq_fail(err, "cannot bind", o->listen);
    } else if (zmq_getsockopt(ev->sock, ZMQ_LAST_ENDPOINT, ev->endpoint, &elen)) {
        rc = zmq_fail(err, "zmq_getsockopt(LAST_ENDPOINT) on", o->listen);
    } else if ((rc = pthread_create(&ev->thread, NULL, publisher, ev))) {
        rc = kvs_err_set(err, KVS_EINTERNAL, "events: pthread_create: %s", strerror(rc));
    }
    if (rc) {
        pthread_mutex_destroy(&ev->mu);
        pthread_cond_destroy(&ev->cond);
        free_events(ev);
        return rc;
    }
    *out = ev;
    return 0;
}

const char *kvs_events_endpoint(const kvs_events *ev)
{
    return ev->endpoint;
}

void kvs_events_get_stats(kvs_events *ev, kvs_events_stats *out)
{
    pthread_mutex_lock(&ev->mu);
    *out = ev->st;
    out->queued = ev->count + ev->sending;
    pthread_mutex_unlock(&ev->mu);
}

void kvs_events_destroy(kvs_events *ev)
{
    if (!ev)
        return;
    pthread_mutex_lock(&ev->mu);
    ev->stopping = true;
    pthread_mutex_unlock(&ev->mu);
    pthread_cond_signal(&ev->cond);
    pthread_join(ev->thread, NULL); /* it sent what was queued */
    kvs_events_stats st;
    kvs_events_get_stats(ev, &st);
    elog(ev, KVS_LOG_INFO,
         "events: %llu published in %llu messages, %llu dropped, %llu send errors",
         (unsigned long long)st.published, (unsigned long long)st.messages,
         (unsigned long long)st.dropped, (unsigned long long)st.send_errors);
    pthread_mutex_destroy(&ev->mu);
    pthread_cond_destroy(&ev->cond);
    free_events(ev); /* zmq_ctx_term waits up to LINGER_MS for what ZMQ still holds */
}
