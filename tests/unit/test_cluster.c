/* The sharded client (include/kvstash.h "sharding") without daemons: target parsing, the
 * placement (rendezvous hashing) against vectors computed independently with Python's
 * xxhash, the spread and the movement of 10,000 chained keys, and daemons that are down
 * (a closed port) or hang (a socket that never answers): misses and per-item failures
 * within the deadline, never a hang, and the retry backoff. Calls against real daemons:
 * tests/integration/test_sharding.py.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "kvstash.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static kvs_cluster *open_on(const char *targets, int64_t timeout_ms)
{
    kvs_cluster_opts o = {.targets = targets, .backoff_min_ms = 50, .backoff_max_ms = 200};
    o.client.timeout_ms = timeout_ms;
    kvs_cluster *cl = NULL;
    kvs_err err;
    int rc = kvs_cluster_open(&o, &cl, &err);
    if (rc)
        fail_msg("open '%s': %s", targets, err.msg);
    return cl;
}

static void expect_open_error(const kvs_cluster_opts *o, const char *words)
{
    kvs_cluster *cl = NULL;
    kvs_err err;
    int rc = kvs_cluster_open(o, &cl, &err);
    if (rc != KVS_EINVAL || cl != NULL || !strstr(err.msg, words))
        fail_msg("targets '%s': rc %d '%s', expected KVS_EINVAL naming '%s'",
                 o->targets ? o->targets : "(null)", rc, err.msg, words);
}

static void test_open_refuses_bad_targets(void **state)
{
    static const struct {
        const char *targets, *words;
    } bad[] = {
        {"", "targets: empty"},
        {"a:1,,b:2", "entry 2"},
        {"a:1, a:1", "given twice"},
        {"a:1,dns:///b:2", "stands alone"},
        {"dns:///", "DNS name"},
        {"dns:///name:0", "port '0'"},
        {"dns:///name:70000", "port '70000'"},
        {"dns:///name:x1", "port 'x1'"},
        {"dns://localhost/name:1", "not an IPv4 address"},
        {"dns://127.0.0.1:99999/name:1", "port '99999'"},
        {"dns:name/x:1", "without '/'"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        expect_open_error(&(kvs_cluster_opts){.targets = bad[i].targets}, bad[i].words);
    expect_open_error(&(kvs_cluster_opts){.targets = NULL}, "targets: empty");
    expect_open_error(&(kvs_cluster_opts){.targets = "a:1", .local_id = "a:1"}, "local_id");
    expect_open_error(&(kvs_cluster_opts){.targets = "a:1", .local = ""}, "local: empty");
    expect_open_error(&(kvs_cluster_opts){.targets = "a:1", .parallel = 100000}, "parallel");
}

static void owner_is(kvs_cluster *cl, const char *key_hex, const char *want)
{
    uint8_t key[KVS_KEY_MAX];
    size_t len = strlen(key_hex) / 2;
    for (size_t i = 0; i < len; i++) {
        unsigned v;
        assert_int_equal(sscanf(key_hex + 2 * i, "%2x", &v), 1);
        key[i] = (uint8_t)v;
    }
    char id[KVS_NODE_ID_MAX];
    kvs_err err;
    assert_int_equal(kvs_cluster_owner(cl, key, len, id, &err), 0);
    if (strcmp(id, want) != 0)
        fail_msg("owner of %s: %s, want %s", key_hex, id, want);
}

/* owner = argmax over ids of XXH64(key, seed = XXH64(id)); the vectors come from Python:
 *   xxhash.xxh64(key, seed=xxhash.xxh64(id.encode()).intdigest()).intdigest() */
static void test_placement_vectors(void **state)
{
    /* Order and blanks in the list do not matter: ids are sorted. */
    kvs_cluster *cl = open_on(" 10.0.0.3:50051,10.0.0.1:50051 ,10.0.0.2:50051", 1000);
    owner_is(cl, "4e7b4f6b8cadfb2a1b1a20c2457494c4", "10.0.0.2:50051");
    owner_is(cl, "e5189a9599e3f86205ea23ef06e28b2d", "10.0.0.3:50051");
    owner_is(cl, "61", "10.0.0.1:50051");
    owner_is(cl, "68656c6c6f", "10.0.0.1:50051");
    owner_is(cl,
             "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
             "202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f",
             "10.0.0.3:50051");
    kvs_cluster_close(cl);
    cl = open_on("10.0.0.1:50051,10.0.0.2:50051,10.0.0.3:50051,10.0.0.4:50051", 1000);
    owner_is(cl, "4e7b4f6b8cadfb2a1b1a20c2457494c4", "10.0.0.4:50051");
    owner_is(cl, "e5189a9599e3f86205ea23ef06e28b2d", "10.0.0.3:50051");

    char id[KVS_NODE_ID_MAX];
    kvs_err err;
    assert_int_equal(kvs_cluster_owner(cl, "k", 0, id, &err), KVS_EINVAL);
    kvs_cluster_close(cl);
}

#define N_KEYS 10000

/* Owner index (into ids) of each of the chained keys of tokens 0..N_KEYS-1, one per block. */
static void owners(const char *targets, const char *const *ids, size_t n_ids, const kvs_key *keys,
                   int *out)
{
    kvs_cluster *cl = open_on(targets, 1000);
    for (size_t k = 0; k < N_KEYS; k++) {
        char id[KVS_NODE_ID_MAX];
        kvs_err err;
        assert_int_equal(kvs_cluster_owner(cl, keys[k].bytes, keys[k].len, id, &err), 0);
        out[k] = -1;
        for (size_t i = 0; i < n_ids; i++)
            if (strcmp(id, ids[i]) == 0)
                out[k] = (int)i;
        assert_true(out[k] >= 0);
    }
    kvs_cluster_close(cl);
}

/* 10,000 chained keys over three nodes, then a fourth added, then one removed; the counts
 * are Python's for the same keys and ids (README "Sharding" quotes them). */
static void test_spread_and_movement(void **state)
{
    static const char *const ids[] = {"10.0.0.1:50051", "10.0.0.2:50051", "10.0.0.3:50051",
                                      "10.0.0.4:50051"};
    uint32_t *tokens = malloc(N_KEYS * sizeof *tokens);
    kvs_key *keys = malloc(N_KEYS * sizeof *keys);
    int *three = malloc(N_KEYS * sizeof *three), *four = malloc(N_KEYS * sizeof *four);
    int *two = malloc(N_KEYS * sizeof *two);
    assert_non_null(tokens && keys && three && four && two);
    for (uint32_t i = 0; i < N_KEYS; i++)
        tokens[i] = i;
    assert_int_equal(kvs_key_chain_seq(tokens, N_KEYS, 1, keys, N_KEYS), N_KEYS);

    owners("10.0.0.1:50051,10.0.0.2:50051,10.0.0.3:50051", ids, 3, keys, three);
    size_t count[4] = {0};
    for (size_t k = 0; k < N_KEYS; k++)
        count[three[k]]++;
    print_message("3 nodes: %zu %zu %zu of %d keys\n", count[0], count[1], count[2], N_KEYS);
    assert_int_equal(count[0], 3338);
    assert_int_equal(count[1], 3371);
    assert_int_equal(count[2], 3291);
    for (size_t i = 0; i < 3; i++) /* within 2% of an even third */
        assert_true(count[i] * 3 > N_KEYS * 98 / 100 && count[i] * 3 < N_KEYS * 102 / 100);

    /* A node joins: it takes about a quarter, and only keys it now owns move. */
    owners("10.0.0.1:50051,10.0.0.2:50051,10.0.0.3:50051,10.0.0.4:50051", ids, 4, keys, four);
    size_t moved = 0;
    for (size_t k = 0; k < N_KEYS; k++) {
        if (four[k] != three[k]) {
            moved++;
            assert_int_equal(four[k], 3);
        }
    }
    print_message("4th node: %zu of %d keys moved, all to it\n", moved, N_KEYS);
    assert_int_equal(moved, 2505);

    /* A node leaves: its keys, and only those, move. */
    owners("10.0.0.1:50051,10.0.0.3:50051", ids, 4, keys, two);
    moved = 0;
    for (size_t k = 0; k < N_KEYS; k++) {
        moved += two[k] != three[k];
        assert_true(two[k] == three[k] || three[k] == 1);
    }
    assert_int_equal(moved, count[1]);
    free(tokens);
    free(keys);
    free(three);
    free(four);
    free(two);
}

/* A loopback port nothing listens on (bound, then closed). */
static int closed_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    assert_true(fd >= 0);
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    close(fd);
    return ntohs(a.sin_port);
}

/* A loopback port that accepts connections (the kernel's backlog) and never answers: a
 * daemon that hangs. *fd stays open until the caller closes it. */
static int silent_port(int *fd)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    *fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(*fd >= 0);
    assert_int_equal(bind(*fd, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(listen(*fd, 16), 0);
    assert_int_equal(getsockname(*fd, (struct sockaddr *)&a, &len), 0);
    return ntohs(a.sin_port);
}

static kvs_cluster_node node0(kvs_cluster *cl)
{
    kvs_cluster_node nodes[2];
    size_t n = 0;
    kvs_err err;
    assert_int_equal(kvs_cluster_nodes(cl, nodes, 2, &n, &err), 0);
    assert_int_equal(n, 1);
    return nodes[0];
}

/* One get of 3 keys and one put of 3 blocks against the cluster's only node: the call
 * itself succeeds, its items are misses / KVS_EUNAVAIL naming why; returns the seconds the
 * get took. */
static double get_and_put(kvs_cluster *cl, const char *why)
{
    static const char *const keys[] = {"k0", "k1", "k2"};
    uint8_t bufs[3][64], payload[64] = {0};
    kvs_get_item gets[3];
    kvs_put_item puts[3];
    for (size_t i = 0; i < 3; i++) {
        gets[i] = (kvs_get_item){.key = keys[i], .key_len = 2, .buf = bufs[i], .cap = 64};
        puts[i] = (kvs_put_item){
            .key = keys[i], .key_len = 2, .tokens = 1, .data = payload, .len = sizeof payload};
    }
    kvs_err err;
    size_t served = 99;
    double t0 = now_s();
    assert_int_equal(kvs_cluster_get_many(cl, "ns", gets, 3, NULL, &served, &err), 0);
    double took = now_s() - t0;
    assert_int_equal(served, 0);
    for (size_t i = 0; i < 3; i++) {
        assert_false(gets[i].answered);
        assert_int_equal(gets[i].rc, KVS_ENOTFOUND);
        if (!strstr(gets[i].msg, why))
            fail_msg("get item %zu: '%s' does not say '%s'", i, gets[i].msg, why);
    }
    assert_int_equal(kvs_cluster_put_many(cl, "ns", KVS_DTYPE_FP16, puts, 3, &err), 0);
    for (size_t i = 0; i < 3; i++)
        assert_int_equal(puts[i].rc, KVS_EUNAVAIL);
    return took;
}

typedef struct events {
    pthread_mutex_t mu;
    int warns;
    char last[512];
} events;

static void on_event(void *ctx, kvs_log_level level, const char *line)
{
    events *e = ctx;
    pthread_mutex_lock(&e->mu);
    e->warns += level == KVS_LOG_WARN;
    snprintf(e->last, sizeof e->last, "%s", line);
    pthread_mutex_unlock(&e->mu);
}

/* A daemon that is not there: misses at once, marked down (said once in the log), tried
 * again after a backoff that doubles (50, 100, 200 ms here) and stops at its maximum. */
static void test_down_daemon_backoff(void **state)
{
    char targets[64];
    snprintf(targets, sizeof targets, "127.0.0.1:%d", closed_port());
    events ev = {.mu = PTHREAD_MUTEX_INITIALIZER};
    kvs_cluster_opts o = {.targets = targets,
                          .backoff_min_ms = 50,
                          .backoff_max_ms = 200,
                          .log = on_event,
                          .log_ctx = &ev};
    o.client.timeout_ms = 2000;
    kvs_cluster *cl = NULL;
    kvs_err err;
    assert_int_equal(kvs_cluster_open(&o, &cl, &err), 0);
    assert_true(node0(cl).up);

    assert_true(get_and_put(cl, "unavailable") < 1.0); /* refused: no deadline to wait */
    kvs_cluster_node n = node0(cl);
    assert_false(n.up);
    assert_true(n.failures >= 1 && n.retry_in_ms <= 50);
    assert_non_null(strstr(n.why, targets));
    /* Within the backoff no call reaches it. */
    get_and_put(cl, "is down (retried in");
    assert_int_equal(node0(cl).failures, n.failures);

    int64_t last = 50;
    for (int i = 0; i < 4; i++) {
        usleep((useconds_t)(node0(cl).retry_in_ms + 5) * 1000);
        get_and_put(cl, "unavailable"); /* the probe, then the put within the new backoff */
        n = node0(cl);
        int64_t want = last * 2 < 200 ? last * 2 : 200;
        if (n.retry_in_ms > want || n.retry_in_ms < want - 40)
            fail_msg("after retry %d: retry in %lld ms, want about %lld", i + 1,
                     (long long)n.retry_in_ms, (long long)want);
        last = want;
    }
    assert_int_equal(ev.warns, 1); /* the probes that failed again are not news */
    if (!strstr(ev.last, "marked down") || !strstr(ev.last, targets))
        fail_msg("event '%s'", ev.last);
    kvs_cluster_close(cl);
}

/* A daemon that accepts and never answers: the first call returns by its deadline with the
 * keys as misses; the next ones do not wait at all while it is marked down. */
static void test_hung_daemon_within_deadline(void **state)
{
    int fd;
    char targets[64];
    snprintf(targets, sizeof targets, "127.0.0.1:%d", silent_port(&fd));
    kvs_cluster *cl = open_on(targets, 300);
    double first = get_and_put(cl, "");
    print_message("hung daemon: first get %.0f ms (deadline 300 ms)\n", first * 1e3);
    assert_true(first >= 0.25 && first < 1.5);
    assert_false(node0(cl).up);
    double next = get_and_put(cl, "is down");
    assert_true(next < 0.05);
    kvs_cluster_close(cl);
    close(fd);
}

static void test_namespace_calls_with_no_daemon(void **state)
{
    char targets[64];
    snprintf(targets, sizeof targets, "127.0.0.1:%d", closed_port());
    kvs_cluster *cl = open_on(targets, 2000);
    kvs_ns_info info;
    kvs_err err;
    assert_int_equal(kvs_cluster_ns_get(cl, "ns", &info, &err), KVS_EUNAVAIL);
    kvs_key k = {.len = 1, .bytes = {'k'}};
    uint32_t prefix = 9, deleted = 9;
    kvs_tier tier = KVS_TIER_HOST;
    assert_int_equal(kvs_cluster_lookup(cl, "ns", &k, 1, &prefix, &tier, &err), 0);
    assert_int_equal(prefix, 0);
    assert_int_equal(tier, KVS_TIER_NONE);
    assert_int_equal(kvs_cluster_delete(cl, "ns", &k, 1, &deleted, &err), KVS_EUNAVAIL);
    assert_int_equal(deleted, 0);
    kvs_cluster_close(cl);
}

/* The local daemon is listed after the ring; its key routing needs the local channel. */
static void test_nodes_and_local(void **state)
{
    kvs_cluster_opts o = {.targets = "10.0.0.1:50051,10.0.0.2:50051",
                          .local = "unix:/nonexistent/kvs.sock",
                          .local_id = "10.0.0.2:50051"};
    kvs_cluster *cl = NULL;
    kvs_err err;
    assert_int_equal(kvs_cluster_open(&o, &cl, &err), 0);
    assert_non_null(kvs_cluster_local(cl));
    size_t n = 0;
    assert_int_equal(kvs_cluster_nodes(cl, NULL, 0, &n, &err), 0);
    assert_int_equal(n, 3);
    kvs_cluster_node nodes[3];
    assert_int_equal(kvs_cluster_nodes(cl, nodes, 3, &n, &err), 0);
    assert_string_equal(nodes[0].id, "10.0.0.1:50051");
    assert_string_equal(nodes[2].id, "unix:/nonexistent/kvs.sock");
    assert_true(nodes[2].local && !nodes[0].local && nodes[0].up);
    kvs_cluster_close(cl);
}

/* The system resolver: localhost has at least 127.0.0.1. */
static void test_dns_system_resolver(void **state)
{
    kvs_cluster *cl = open_on("dns:///localhost:5999", 1000);
    kvs_cluster_node nodes[4];
    size_t n = 0;
    kvs_err err;
    assert_int_equal(kvs_cluster_nodes(cl, nodes, 4, &n, &err), 0);
    bool v4 = false;
    for (size_t i = 0; i < n && i < 4; i++)
        v4 |= strcmp(nodes[i].id, "127.0.0.1:5999") == 0;
    assert_true(v4);
    kvs_cluster_close(cl);

    kvs_cluster_opts o = {.targets = "dns:///no-such-name.invalid:1"};
    assert_int_equal(kvs_cluster_open(&o, &cl, &err), KVS_ENOTFOUND);
    assert_non_null(strstr(err.msg, "no-such-name.invalid"));
}

typedef struct hammer {
    kvs_cluster *cl;
    int calls;
} hammer;

static void *hammer_main(void *arg)
{
    hammer *h = arg;
    uint8_t bufs[16][64], payload[64] = {0};
    kvs_key keys[16];
    kvs_get_item gets[16];
    kvs_put_item puts[16];
    for (uint32_t i = 0; i < 16; i++) {
        kvs_key_chain(NULL, &i, 1, keys[i].bytes);
        keys[i].len = KVS_CHAIN_KEY_LEN;
        gets[i] = (kvs_get_item){.key = keys[i].bytes, .key_len = 16, .buf = bufs[i], .cap = 64};
        puts[i] = (kvs_put_item){
            .key = keys[i].bytes, .key_len = 16, .tokens = 1, .data = payload, .len = 64};
    }
    for (int n = 0; n < 40; n++) {
        kvs_err err;
        size_t served;
        uint32_t prefix;
        kvs_cluster_node nodes[4];
        size_t nn;
        assert_int_equal(kvs_cluster_get_many(h->cl, "ns", gets, 16, NULL, &served, &err), 0);
        assert_int_equal(served, 0);
        assert_int_equal(kvs_cluster_put_many(h->cl, "ns", KVS_DTYPE_FP16, puts, 16, &err), 0);
        for (size_t i = 0; i < 16; i++)
            assert_int_equal(puts[i].rc, KVS_EUNAVAIL);
        assert_int_equal(kvs_cluster_lookup(h->cl, "ns", keys, 16, &prefix, NULL, &err), 0);
        assert_int_equal(kvs_cluster_nodes(h->cl, nodes, 4, &nn, &err), 0);
        h->calls += 4;
    }
    return NULL;
}

/* Threads calling at once while the nodes go down and are probed every few milliseconds,
 * and the resolver thread re-resolves every millisecond: for the sanitizers (TSan: ctest in
 * a tsan build), every call still returns its misses. */
static void test_concurrent_calls(void **state)
{
    char targets[128];
    snprintf(targets, sizeof targets, "127.0.0.1:%d,127.0.0.1:%d,127.0.0.1:%d", closed_port(),
             closed_port(), closed_port());
    kvs_cluster_opts o = {.targets = targets,
                          .backoff_min_ms = 1,
                          .backoff_max_ms = 4,
                          .parallel = 2,
                          .local = "unix:/nonexistent/kvs.sock"};
    o.client.timeout_ms = 2000;
    kvs_cluster *cl = NULL, *dns = NULL;
    kvs_err err;
    assert_int_equal(kvs_cluster_open(&o, &cl, &err), 0);
    kvs_cluster_opts d = {.targets = "dns:///localhost:1", .resolve_ms = 1, .backoff_min_ms = 1};
    assert_int_equal(kvs_cluster_open(&d, &dns, &err), 0);
    pthread_t th[6];
    hammer h[6];
    for (int i = 0; i < 6; i++) {
        h[i] = (hammer){.cl = i % 3 == 2 ? dns : cl};
        assert_int_equal(pthread_create(&th[i], NULL, hammer_main, &h[i]), 0);
    }
    for (int i = 0; i < 6; i++) {
        assert_int_equal(pthread_join(th[i], NULL), 0);
        assert_int_equal(h[i].calls, 160);
    }
    kvs_cluster_close(dns);
    kvs_cluster_close(cl);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_open_refuses_bad_targets),
        cmocka_unit_test(test_placement_vectors),
        cmocka_unit_test(test_spread_and_movement),
        cmocka_unit_test(test_down_daemon_backoff),
        cmocka_unit_test(test_hung_daemon_within_deadline),
        cmocka_unit_test(test_namespace_calls_with_no_daemon),
        cmocka_unit_test(test_nodes_and_local),
        cmocka_unit_test(test_dns_system_resolver),
        cmocka_unit_test(test_concurrent_calls),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
