/* daemon/events: a real ZMQ subscriber on an ipc:// endpoint reads what the publisher
 * sends and decodes it with msgpack-c: the three-part messages, vLLM's EventBatch layout
 * (every field and its msgpack type), one message per namespace run with its topic,
 * consecutive removals merged, sequence numbers, the gap after events dropped by a full
 * queue, emit never waiting (no subscriber, or one that never reads), destroy sending
 * what is queued, and bind errors naming the endpoint. */
#define _GNU_SOURCE
#include <msgpack.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include <cmocka.h>

#include "daemon/events.h"
#include "tests/support/kvs_test.h"

/* ---------------------------------------------------------------- fixture */

typedef struct fx {
    char dir[64];
    char endpoint[128];
    kvs_events *ev;
    void *zctx, *sub;
    uint64_t next_seq; /* the sequence number the next message should carry */
} fx;

static void emit(kvs_events *ev, kvs_store_event_kind kind, kvs_store_tier tier, const char *ns,
                 const char *key)
{
    kvs_store_event e = {.kind = kind,
                         .tier = tier,
                         .ns = ns,
                         .block_tokens = 16,
                         .key = key,
                         .key_len = key ? strlen(key) : 0};
    kvs_events_emit(ev, &e);
}

/* One message: its three parts, or false after timeout_ms. */
typedef struct msg {
    char topic[512];
    uint64_t seq;
    uint8_t *payload;
    size_t len;
} msg;

static bool recv_msg(fx *f, msg *m, int timeout_ms)
{
    zmq_pollitem_t it = {.socket = f->sub, .events = ZMQ_POLLIN};
    if (zmq_poll(&it, 1, timeout_ms) <= 0)
        return false;
    zmq_msg_t part[3];
    int more = 1, n = 0;
    for (; more && n < 4; n++) {
        assert_true(n < 3); /* exactly three parts */
        zmq_msg_init(&part[n]);
        assert_true(zmq_msg_recv(&part[n], f->sub, 0) >= 0);
        more = zmq_msg_more(&part[n]);
    }
    assert_int_equal(n, 3);
    size_t tl = zmq_msg_size(&part[0]);
    assert_true(tl < sizeof m->topic);
    memcpy(m->topic, zmq_msg_data(&part[0]), tl);
    m->topic[tl] = 0;
    assert_int_equal(zmq_msg_size(&part[1]), 8);
    const uint8_t *be = zmq_msg_data(&part[1]);
    m->seq = 0;
    for (int i = 0; i < 8; i++)
        m->seq = m->seq << 8 | be[i];
    m->len = zmq_msg_size(&part[2]);
    m->payload = malloc(m->len);
    memcpy(m->payload, zmq_msg_data(&part[2]), m->len);
    for (int i = 0; i < 3; i++)
        zmq_msg_close(&part[i]);
    return true;
}

/* (Re)starts the publisher on f's endpoint and waits until the subscriber receives:
 * ZMQ delivers nothing to a subscription still in flight, so probe events go out until
 * one arrives. */
static void fx_publisher(fx *f, uint32_t queue, unsigned flush_ms)
{
    kvs_events_opts o = {
        .listen = f->endpoint, .topic = "kv@node1", .queue = queue, .flush_ms = flush_ms};
    kvs_err err;
    if (kvs_events_create(&o, &f->ev, &err))
        fail_msg("%s", err.msg);
    assert_string_equal(kvs_events_endpoint(f->ev), f->endpoint);
    msg m;
    bool got = false;
    for (int i = 0; i < 100 && !got; i++) {
        emit(f->ev, KVS_STORE_EV_STORED, KVS_STORE_TIER_HOST, "probe", "p");
        got = recv_msg(f, &m, 100 + (int)flush_ms);
    }
    assert_true(got);
    free(m.payload);
    while (recv_msg(f, &m, 300 + (int)flush_ms)) /* the other probes */
        free(m.payload);
    f->next_seq = m.seq + 1;
}

/* A publisher and a subscriber of every topic, connected. */
static void fx_open(fx *f, uint32_t queue, unsigned flush_ms)
{
    memset(f, 0, sizeof *f);
    snprintf(f->dir, sizeof f->dir, "/tmp/kvs-test-events-XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    snprintf(f->endpoint, sizeof f->endpoint, "ipc://%s/ev.sock", f->dir);
    f->zctx = zmq_ctx_new();
    f->sub = zmq_socket(f->zctx, ZMQ_SUB);
    assert_int_equal(zmq_setsockopt(f->sub, ZMQ_SUBSCRIBE, "", 0), 0);
    assert_int_equal(zmq_connect(f->sub, f->endpoint), 0);
    fx_publisher(f, queue, flush_ms);
}

static void fx_close(fx *f)
{
    kvs_events_destroy(f->ev);
    zmq_close(f->sub);
    zmq_ctx_term(f->zctx);
    kvs_test_rmtree(f->dir);
}

/* ---------------------------------------------------------------- decoding */

/* The payload as text: arrays [a, b], strings "s", bins h'0a1b', nil, unsigned integers,
 * and a float64 as F (its value is checked apart). Any other msgpack type fails. */
static void render(const msgpack_object *o, char *buf, size_t cap, size_t *at)
{
#define OUT(...) (*at += (size_t)snprintf(buf + *at, *at < cap ? cap - *at : 0, __VA_ARGS__))
    switch (o->type) {
    case MSGPACK_OBJECT_ARRAY:
        OUT("[");
        for (uint32_t i = 0; i < o->via.array.size; i++) {
            if (i)
                OUT(", ");
            render(&o->via.array.ptr[i], buf, cap, at);
        }
        OUT("]");
        break;
    case MSGPACK_OBJECT_STR:
        OUT("\"%.*s\"", (int)o->via.str.size, o->via.str.ptr);
        break;
    case MSGPACK_OBJECT_BIN:
        OUT("h'");
        for (uint32_t i = 0; i < o->via.bin.size; i++)
            OUT("%02x", (unsigned char)o->via.bin.ptr[i]);
        OUT("'");
        break;
    case MSGPACK_OBJECT_NIL:
        OUT("nil");
        break;
    case MSGPACK_OBJECT_POSITIVE_INTEGER:
        OUT("%llu", (unsigned long long)o->via.u64);
        break;
    case MSGPACK_OBJECT_FLOAT64:
        OUT("F");
        break;
    default:
        fail_msg("unexpected msgpack type %d", o->type);
    }
#undef OUT
}

/* Decodes a payload (one object, nothing after it) into text; checks its timestamp. */
static const char *decode(const msg *m)
{
    static char buf[8192];
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    size_t off = 0;
    assert_int_equal(msgpack_unpack_next(&u, (const char *)m->payload, m->len, &off),
                     MSGPACK_UNPACK_SUCCESS);
    assert_int_equal(off, m->len);
    const msgpack_object *o = &u.data;
    assert_int_equal(o->type, MSGPACK_OBJECT_ARRAY);
    assert_int_equal(o->via.array.size, 3);
    assert_int_equal(o->via.array.ptr[0].type, MSGPACK_OBJECT_FLOAT64);
    double ts = o->via.array.ptr[0].via.f64, now = (double)time(NULL);
    assert_true(ts > now - 60 && ts < now + 60);
    size_t at = 0;
    render(o, buf, sizeof buf, &at);
    assert_true(at < sizeof buf);
    msgpack_unpacked_destroy(&u);
    return buf;
}

static void expect_msg(fx *f, const char *topic, const char *payload)
{
    msg m;
    assert_true(recv_msg(f, &m, 3000));
    assert_string_equal(m.topic, topic);
    assert_int_equal(m.seq, f->next_seq);
    f->next_seq++;
    assert_string_equal(decode(&m), payload);
    free(m.payload);
}

/* The counters once the publisher is idle (a subscriber may hold a message before the
 * publisher has counted it; queued includes the events being sent). */
static void settled_stats(kvs_events *ev, kvs_events_stats *st)
{
    for (int i = 0; i < 200; i++) {
        kvs_events_get_stats(ev, st);
        if (st->queued == 0)
            return;
        usleep(10 * 1000);
    }
    fail_msg("the publisher still holds %llu events", (unsigned long long)st->queued);
}

/* ---------------------------------------------------------------- tests */

static void test_wire_format(void **state)
{
    fx f;
    fx_open(&f, 0, 100);
    const char k16[] = "\x4e\x7b\x4f\x6b\x8c\xad\xfb\x2a\x1b\x1a\x20\xc2\x45\x74\x94\xc4";
    emit(f.ev, KVS_STORE_EV_STORED, KVS_STORE_TIER_HOST, "llama", k16);
    emit(f.ev, KVS_STORE_EV_REMOVED, KVS_STORE_TIER_HOST, "llama", "a");
    emit(f.ev, KVS_STORE_EV_REMOVED, KVS_STORE_TIER_HOST, "llama", "b");
    emit(f.ev, KVS_STORE_EV_STORED, KVS_STORE_TIER_DISK, "llama", "a");
    emit(f.ev, KVS_STORE_EV_REMOVED, KVS_STORE_TIER_DISK, "llama", "a");
    emit(f.ev, KVS_STORE_EV_REMOVED, KVS_STORE_TIER_GPU, "llama", "c");
    emit(f.ev, KVS_STORE_EV_STORED, KVS_STORE_TIER_GPU, "qwen", "x");
    emit(f.ev, KVS_STORE_EV_CLEARED, KVS_STORE_TIER_NONE, "llama", NULL);
    /* One message per run of a namespace, in order; removals from one tier merged. */
    expect_msg(&f, "kv@node1@llama",
               "[F, [[\"BlockStored\", [h'4e7b4f6b8cadfb2a1b1a20c2457494c4'], nil, [], 16, nil, "
               "\"CPU\", nil], "
               "[\"BlockRemoved\", [h'61', h'62'], \"CPU\"], "
               "[\"BlockStored\", [h'61'], nil, [], 16, nil, \"DISK\", nil], "
               "[\"BlockRemoved\", [h'61'], \"DISK\"], "
               "[\"BlockRemoved\", [h'63'], \"GPU\"]], 0]");
    expect_msg(&f, "kv@node1@qwen",
               "[F, [[\"BlockStored\", [h'78'], nil, [], 16, nil, \"GPU\", nil]], 0]");
    expect_msg(&f, "kv@node1@llama", "[F, [[\"AllBlocksCleared\"]], 0]");
    msg m;
    assert_false(recv_msg(&f, &m, 300));

    /* The store reports a move as removed-then-stored and a replace likewise; subscribers
     * get the block where it is now first (it is never absent in between), and a replace
     * in one tier as a store alone. A removal after a store stays as it is. */
    emit(f.ev, KVS_STORE_EV_REMOVED, KVS_STORE_TIER_HOST, "llama", "a"); /* spilled */
    emit(f.ev, KVS_STORE_EV_STORED, KVS_STORE_TIER_DISK, "llama", "a");
    emit(f.ev, KVS_STORE_EV_REMOVED, KVS_STORE_TIER_HOST, "llama", "b"); /* replaced */
    emit(f.ev, KVS_STORE_EV_STORED, KVS_STORE_TIER_HOST, "llama", "b");
    emit(f.ev, KVS_STORE_EV_REMOVED, KVS_STORE_TIER_HOST, "llama", "c"); /* evicted */
    emit(f.ev, KVS_STORE_EV_STORED, KVS_STORE_TIER_HOST, "llama", "d");  /* another key */
    emit(f.ev, KVS_STORE_EV_REMOVED, KVS_STORE_TIER_HOST, "llama", "d");
    expect_msg(&f, "kv@node1@llama",
               "[F, [[\"BlockStored\", [h'61'], nil, [], 16, nil, \"DISK\", nil], "
               "[\"BlockRemoved\", [h'61'], \"CPU\"], "
               "[\"BlockStored\", [h'62'], nil, [], 16, nil, \"CPU\", nil], "
               "[\"BlockRemoved\", [h'63'], \"CPU\"], "
               "[\"BlockStored\", [h'64'], nil, [], 16, nil, \"CPU\", nil]], 0]");
    /* The removal last in the queue waited a round for a store that did not come. */
    expect_msg(&f, "kv@node1@llama", "[F, [[\"BlockRemoved\", [h'64'], \"CPU\"]], 0]");
    /* A removal last in the queue waits one round for the store of its move (the
     * publisher takes every 300 ms here; the store comes 450 ms after the removal). */
    kvs_events_destroy(f.ev);
    fx_publisher(&f, 0, 300); /* the subscriber reconnects; seq starts afresh */
    emit(f.ev, KVS_STORE_EV_REMOVED, KVS_STORE_TIER_GPU, "llama", "z");
    usleep(450 * 1000);
    emit(f.ev, KVS_STORE_EV_STORED, KVS_STORE_TIER_HOST, "llama", "z");
    expect_msg(&f, "kv@node1@llama",
               "[F, [[\"BlockStored\", [h'7a'], nil, [], 16, nil, \"CPU\", nil], "
               "[\"BlockRemoved\", [h'7a'], \"GPU\"]], 0]");

    kvs_events_stats st;
    settled_stats(f.ev, &st);
    assert_int_equal(st.dropped, 0);
    assert_int_equal(st.send_errors, 0);
    assert_int_equal(st.messages, f.next_seq); /* probes included (this publisher's) */
    fx_close(&f);
}

/* A full queue drops the newest events, counts them, and the publisher skips a sequence
 * number right after the last event sent before them. */
static void test_drops_leave_a_gap(void **state)
{
    fx f;
    fx_open(&f, 4, 400); /* 4 events; batches never fill (256): the publisher waits 400 ms */
    kvs_events_stats st0, st;
    kvs_events_get_stats(f.ev, &st0);
    char key[8];
    for (int i = 0; i < 10; i++) {
        snprintf(key, sizeof key, "k%d", i);
        emit(f.ev, KVS_STORE_EV_STORED, KVS_STORE_TIER_HOST, "m", key);
    }
    kvs_events_get_stats(f.ev, &st);
    assert_int_equal(st.dropped - st0.dropped, 6);
    assert_int_equal(st.queued, 4);
    expect_msg(&f, "kv@node1@m",
               "[F, [[\"BlockStored\", [h'6b30'], nil, [], 16, nil, \"CPU\", nil], "
               "[\"BlockStored\", [h'6b31'], nil, [], 16, nil, \"CPU\", nil], "
               "[\"BlockStored\", [h'6b32'], nil, [], 16, nil, \"CPU\", nil], "
               "[\"BlockStored\", [h'6b33'], nil, [], 16, nil, \"CPU\", nil]], 0]");
    emit(f.ev, KVS_STORE_EV_REMOVED, KVS_STORE_TIER_HOST, "m", "k0");
    f.next_seq++; /* the gap: k4..k9 were lost */
    expect_msg(&f, "kv@node1@m", "[F, [[\"BlockRemoved\", [h'6b30'], \"CPU\"]], 0]");
    settled_stats(f.ev, &st);
    assert_int_equal(st.published - st0.published, 5);
    assert_int_equal(st.messages - st0.messages, 2);
    fx_close(&f);
}

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* Emitting never waits: with a subscriber that never reads (ZMQ drops what passes its
 * high-water mark for it), a million events take well under a second of the emitting
 * thread, and every event is either sent, still queued, or counted as dropped. */
static void test_emit_never_waits(void **state)
{
    fx f;
    fx_open(&f, 1024, 5);
    kvs_events_stats st0, st;
    kvs_events_get_stats(f.ev, &st0);
    enum { N = 1000000 };
    char key[16];
    double t0 = now_s();
    for (int i = 0; i < N; i++) {
        snprintf(key, sizeof key, "key-%d", i);
        emit(f.ev, KVS_STORE_EV_STORED, KVS_STORE_TIER_HOST, "m", key);
    }
    double took = now_s() - t0;
    kvs_events_get_stats(f.ev, &st);
    print_message("%d events emitted in %.3f s; %llu sent, %llu dropped, %llu queued\n", N, took,
                  (unsigned long long)(st.published - st0.published),
                  (unsigned long long)(st.dropped - st0.dropped), (unsigned long long)st.queued);
    assert_true(took < 5.0); /* ~0.2 s here; generous for a loaded or sanitized build */
    assert_int_equal(st.published - st0.published + st.dropped - st0.dropped + st.queued, N);
    assert_int_equal(st.send_errors, 0);
    fx_close(&f); /* does not hang on the stuck subscriber (linger) */
}

/* Destroy sends what is still queued before it closes. */
static void test_destroy_flushes(void **state)
{
    fx f;
    fx_open(&f, 0, 100);
    kvs_events *ev = f.ev;
    emit(ev, KVS_STORE_EV_STORED, KVS_STORE_TIER_HOST, "m", "last");
    f.ev = NULL;
    kvs_events_destroy(ev);
    expect_msg(&f, "kv@node1@m",
               "[F, [[\"BlockStored\", [h'6c617374'], nil, [], 16, nil, \"CPU\", nil]], 0]");
    fx_close(&f);
}

static void test_bind_errors(void **state)
{
    kvs_events *ev, *ev2;
    kvs_err err;
    kvs_events_opts o = {.listen = "bogus://x", .topic = "kv@n"};
    assert_int_equal(kvs_events_create(&o, &ev, &err), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "bogus://x"));
    o.listen = "tcp://127.0.0.1:*";
    assert_int_equal(kvs_events_create(&o, &ev, &err), 0);
    const char *bound = kvs_events_endpoint(ev);
    assert_true(strncmp(bound, "tcp://127.0.0.1:", 16) == 0 && atoi(bound + 16) > 0);
    o.listen = bound; /* taken */
    assert_int_equal(kvs_events_create(&o, &ev2, &err), KVS_EIO);
    assert_non_null(strstr(err.msg, bound));
    kvs_events_destroy(ev);
    o.listen = "ipc:///nonexistent-dir-kvs/ev.sock";
    assert_int_equal(kvs_events_create(&o, &ev, &err), KVS_EIO);
    assert_non_null(strstr(err.msg, "nonexistent-dir-kvs"));
    o = (kvs_events_opts){.listen = "tcp://127.0.0.1:*", .topic = ""};
    assert_int_equal(kvs_events_create(&o, &ev, &err), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "topic"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_wire_format),      cmocka_unit_test(test_drops_leave_a_gap),
        cmocka_unit_test(test_emit_never_waits), cmocka_unit_test(test_destroy_flushes),
        cmocka_unit_test(test_bind_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
