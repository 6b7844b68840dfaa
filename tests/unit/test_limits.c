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
        assert_int_equal(kvs_limits_put_open(l, "ipv4:10.0.0.1:5000", &a[i], &err), 0);
    assert_int_equal(kvs_limits_put_open(l, "ipv4:10.0.0.1:5000", &x, &err), KVS_ENOSPC);
    assert_non_null(strstr(err.msg, "--max-puts-per-conn"));
    /* another connection of the same host is another peer */
    for (int i = 0; i < 2; i++)
        assert_int_equal(kvs_limits_put_open(l, "ipv4:10.0.0.1:5001", &b[i], &err), 0);
    assert_int_equal(kvs_limits_put_open(l, "unix:", &x, &err), KVS_ENOSPC);
    assert_non_null(strstr(err.msg, "--max-puts)"));
    kvs_limits_stats st;
    kvs_limits_get_stats(l, &st);
    assert_int_equal(st.puts_open, 5);
    assert_int_equal(st.puts_refused, 2);
    kvs_limits_put_close(l, a[0]);
    assert_int_equal(kvs_limits_put_open(l, "ipv4:10.0.0.1:5000", &a[0], &err), 0);
    for (int i = 0; i < 3; i++)
        kvs_limits_put_close(l, a[i]);
    for (int i = 0; i < 2; i++)
        kvs_limits_put_close(l, b[i]);
    kvs_limits_put_close(l, NULL);
    kvs_limits_get_stats(l, &st);
    assert_int_equal(st.puts_open, 0);
    /* NULL peer, and a peer that comes back after its entry went */
    assert_int_equal(kvs_limits_put_open(l, NULL, &x, &err), 0);
    kvs_limits_put_close(l, x);
    assert_int_equal(kvs_limits_put_open(l, "ipv4:10.0.0.1:5000", &x, &err), 0);
    kvs_limits_put_close(l, x);
    kvs_limits_destroy(l);
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
        cmocka_unit_test(test_recv_budget),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
