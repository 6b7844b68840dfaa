/* daemon/call: when the idle sweep (kvs_server_sweep) takes a stream for stalled. */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "daemon/call.h"

static void test_waits_measured(void **state)
{
    (void)state;
    assert_false(kvs_call_idle(0, 100000, 30000)); /* not waiting */
    assert_false(kvs_call_idle(1000, 1000, 30000));
    assert_false(kvs_call_idle(1000, 30999, 30000));
    assert_true(kvs_call_idle(1000, 31000, 30000));
    assert_true(kvs_call_idle(1, 900000, 30000));
}

/* The sweep reads the clock once and then each call's start of waiting: a call that starts
 * waiting on a CQ thread in between has `since` after `now`. It has not waited at all; an
 * unsigned now - since wrapped around and cancelled busy streams as stalled (seen on the
 * GPU machine: three Puts of `kvctl bench` cut 0.1 s after the daemon started). */
static void test_wait_begun_after_the_clock_was_read(void **state)
{
    (void)state;
    assert_false(kvs_call_idle(5001, 5000, 30000));
    assert_false(kvs_call_idle(UINT64_MAX, 5000, 30000));
    assert_false(kvs_call_idle(5001, 5000, 0));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_waits_measured),
        cmocka_unit_test(test_wait_begun_after_the_clock_was_read),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
