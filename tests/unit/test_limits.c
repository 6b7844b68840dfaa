/* daemon/limits: stream slots per peer and in total, the receive budget all or nothing. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "daemon/limits.h"

static void test_slots(void **state)
{
    (void)state;
    kvs_limits_opts o = {.max_puts = 5, .max_puts_per_conn = 3, .recv_budget = 100};
    kvs_limits *l = kvs_limits_create(&o);
    kvs_limits_slot *a[3], *b[2], *x;
    kvs_err err;
    for (int i = 0; i < 3; i++)
        assert_int_equal(kvs_limits_open(l, KVS_LIMITS_PUT, "ipv4:10.0.0.1:5000", &a[i], &err), 0);
    assert_int_equal(kvs_limits_open(l, KVS_LIMITS_PUT, "ipv4:10.0.0.1:5000", &x, &err),
                     KVS_ENOSPC);
    assert_non_null(strstr(err.msg, "--max-puts-per-conn"));
    /* another connection of the same host is another peer */
    for (int i = 0; i < 2; i++)
        assert_int_equal(kvs_limits_open(l, KVS_LIMITS_PUT, "ipv4:10.0.0.1:5001", &b[i], &err), 0);
    assert_int_equal(kvs_limits_open(l, KVS_LIMITS_PUT, "unix:", &x, &err), KVS_ENOSPC);
    assert_non_null(strstr(err.msg, "--max-puts)"));
    kvs_limits_stats st;
    kvs_limits_get_stats(l, &st);
    assert_int_equal(st.puts_open, 5);
    assert_int_equal(st.puts_refused, 2);
    kvs_limits_close(l, KVS_LIMITS_PUT, a[0]);
    assert_int_equal(kvs_limits_open(l, KVS_LIMITS_PUT, "ipv4:10.0.0.1:5000", &a[0], &err), 0);
    for (int i = 0; i < 3; i++)
        kvs_limits_close(l, KVS_LIMITS_PUT, a[i]);
    for (int i = 0; i < 2; i++)
        kvs_limits_close(l, KVS_LIMITS_PUT, b[i]);
    kvs_limits_close(l, KVS_LIMITS_PUT, NULL);
    kvs_limits_get_stats(l, &st);
    assert_int_equal(st.puts_open, 0);
    /* NULL peer, and a peer that comes back after its entry went */
    assert_int_equal(kvs_limits_open(l, KVS_LIMITS_PUT, NULL, &x, &err), 0);
    kvs_limits_close(l, KVS_LIMITS_PUT, x);
    assert_int_equal(kvs_limits_open(l, KVS_LIMITS_PUT, "ipv4:10.0.0.1:5000", &x, &err), 0);
    kvs_limits_close(l, KVS_LIMITS_PUT, x);
    kvs_limits_destroy(l);
}

/* Gets are counted apart from Puts, with their own limits; a peer entry holding both kinds
 * lives until both are closed. */
static void test_get_slots(void **state)
{
    (void)state;
    kvs_limits_opts o = {.max_puts = 2,
                         .max_puts_per_conn = 2,
                         .max_gets = 3,
                         .max_gets_per_conn = 2,
                         .recv_budget = 100};
    kvs_limits *l = kvs_limits_create(&o);
    kvs_limits_slot *p[2], *g[3], *x;
    kvs_err err;
    for (int i = 0; i < 2; i++) /* the Put slots do not use up the Get ones */
        assert_int_equal(kvs_limits_open(l, KVS_LIMITS_PUT, "peer-a", &p[i], &err), 0);
    for (int i = 0; i < 2; i++)
        assert_int_equal(kvs_limits_open(l, KVS_LIMITS_GET, "peer-a", &g[i], &err), 0);
    assert_int_equal(kvs_limits_open(l, KVS_LIMITS_GET, "peer-a", &x, &err), KVS_ENOSPC);
    assert_non_null(strstr(err.msg, "--max-gets-per-conn"));
    assert_int_equal(kvs_limits_open(l, KVS_LIMITS_GET, "peer-b", &g[2], &err), 0);
    assert_int_equal(kvs_limits_open(l, KVS_LIMITS_GET, "peer-c", &x, &err), KVS_ENOSPC);
    assert_non_null(strstr(err.msg, "Get streams are open, the daemon's limit (--max-gets)"));
    kvs_limits_stats st;
    kvs_limits_get_stats(l, &st);
    assert_int_equal(st.gets_open, 3);
    assert_int_equal(st.gets_refused, 2);
    assert_int_equal(st.puts_open, 2);
    assert_int_equal(st.puts_refused, 0);
    for (int i = 0; i < 2; i++) /* peer-a's entry stays: its Gets are open */
        kvs_limits_close(l, KVS_LIMITS_PUT, p[i]);
    assert_int_equal(kvs_limits_open(l, KVS_LIMITS_GET, "peer-a", &x, &err), KVS_ENOSPC);
    for (int i = 0; i < 3; i++)
        kvs_limits_close(l, KVS_LIMITS_GET, g[i]);
    kvs_limits_get_stats(l, &st);
    assert_int_equal(st.gets_open, 0);
    assert_int_equal(st.puts_open, 0);
    kvs_limits_destroy(l); /* no entry left (invariant 2), or destroy frees one: ASan/valgrind */
}

static void test_recv_budget(void **state)
{
    (void)state;
    kvs_limits_opts o = {.max_puts = 5, .max_puts_per_conn = 3, .recv_budget = 100};
    kvs_limits *l = kvs_limits_create(&o);
    kvs_err err;
    assert_int_equal(kvs_limits_recv_take(l, 60, &err), 0);
    assert_int_equal(kvs_limits_recv_take(l, 41, &err), KVS_ENOSPC); /* all or nothing */
    assert_non_null(strstr(err.msg, "60 of 100"));
    assert_non_null(strstr(err.msg, "--recv-budget"));
    assert_int_equal(kvs_limits_recv_take(l, 40, &err), 0);
    assert_int_equal(kvs_limits_recv_take(l, 101, &err), KVS_ENOSPC);
    assert_non_null(strstr(err.msg, "whole receive budget"));
    kvs_limits_stats st;
    kvs_limits_get_stats(l, &st);
    assert_int_equal(st.recv_used, 100);
    assert_int_equal(st.recv_refused, 2);
    kvs_limits_recv_give(l, 60);
    kvs_limits_recv_give(l, 40);
    kvs_limits_get_stats(l, &st);
    assert_int_equal(st.recv_used, 0);
    assert_int_equal(st.recv_budget, 100);
    kvs_limits_destroy(l);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_slots),
        cmocka_unit_test(test_get_slots),
        cmocka_unit_test(test_recv_budget),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
