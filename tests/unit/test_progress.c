/* client/kvctl/progress: the line a progress bar shows for a state (kvctl_progress_render,
 * a pure function): bar, count, percentage, rate and ETA with a total; a spinner count
 * without one; the last line's time taken; counts past the total, a tiny buffer; and the
 * bar's on/off choice and its output when forced onto a file that is not a terminal. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "client/kvctl/progress.h"

static const char *render(kvctl_progress_view v)
{
    static char buf[256];
    if (!v.label)
        v.label = "verify";
    if (!v.unit)
        v.unit = "blocks";
    return kvctl_progress_render(&v, buf, sizeof buf);
}

static void test_with_a_total(void **state)
{
    assert_string_equal(render((kvctl_progress_view){.total = 1200}),
                        "verify [........................]  0/1200 blocks  0%");
    assert_string_equal(render((kvctl_progress_view){.done = 450, .total = 1200, .elapsed_s = 3}),
                        "verify [#########...............]  450/1200 blocks  37%  150 blocks/s"
                        "  ETA 5.0s");
    /* A slow rate keeps a decimal; a long ETA reads in minutes. */
    assert_string_equal(render((kvctl_progress_view){.done = 3, .total = 1000, .elapsed_s = 2}),
                        "verify [........................]  3/1000 blocks  0%  1.5 blocks/s"
                        "  ETA 11m04s");
    /* Another client's call may push the counters past the total: shown as the total. */
    assert_string_equal(render((kvctl_progress_view){.done = 1300, .total = 1200, .elapsed_s = 4}),
                        "verify [########################]  1200/1200 blocks  100%"
                        "  300 blocks/s");
    /* The last line says how long it took. */
    assert_string_equal(
        render((kvctl_progress_view){
            .label = "bench put", .done = 64, .total = 64, .elapsed_s = 0.5, .finished = true}),
        "bench put [########################]  64/64 blocks  100%"
        "  128 blocks/s  0.5s");
}

static void test_without_a_total(void **state)
{
    /* A spinner that turns with the frame, the count, the rate and the time so far. */
    assert_string_equal(render((kvctl_progress_view){.label = "flush"}), "flush | 0 blocks  0.0s");
    assert_string_equal(render((kvctl_progress_view){.label = "flush", .frame = 1}),
                        "flush / 0 blocks  0.0s");
    assert_string_equal(
        render((kvctl_progress_view){.label = "flush", .done = 90, .elapsed_s = 3, .frame = 6}),
        "flush - 90 blocks  30 blocks/s  3.0s");
    assert_string_equal(render((kvctl_progress_view){
                            .label = "flush", .done = 90, .elapsed_s = 75, .finished = true}),
                        "flush   90 blocks  1.2 blocks/s  1m15s");
}

static void test_small_buffer(void **state)
{
    char buf[12];
    kvctl_progress_view v = {.label = "verify", .unit = "blocks", .done = 1, .total = 2};
    assert_string_equal(kvctl_progress_render(&v, buf, sizeof buf), "verify [###"); /* cut */
    char one[1];
    assert_string_equal(kvctl_progress_render(&v, one, sizeof one), "");
}

static void test_on_off_and_lines(void **state)
{
    FILE *f = tmpfile();
    assert_non_null(f);
    assert_false(kvctl_progress_wanted(KVCTL_PROGRESS_AUTO, f)); /* not a terminal */
    assert_true(kvctl_progress_wanted(KVCTL_PROGRESS_ON, f));
    assert_false(kvctl_progress_wanted(KVCTL_PROGRESS_OFF, f));

    /* Off: nothing is written. */
    kvctl_progress p;
    kvctl_progress_start(&p, f, false, "verify", "blocks", 10);
    kvctl_progress_set(&p, 5, 0);
    kvctl_progress_finish(&p, 10, 10);
    assert_int_equal(ftell(f), 0);

    /* Forced onto a file: whole lines, no control characters; the first at once, the next
     * not before a second went by (so this set draws nothing), and the last. */
    kvctl_progress_start(&p, f, true, "verify", "blocks", 10);
    kvctl_progress_set(&p, 5, 0);
    kvctl_progress_finish(&p, 10, 10);
    rewind(f);
    char out[512] = {0};
    size_t n = fread(out, 1, sizeof out - 1, f);
    assert_true(n > 0);
    assert_null(strchr(out, '\r'));
    assert_null(strchr(out, '\033'));
    char *second = strchr(out, '\n');
    assert_non_null(second);
    assert_memory_equal(out, "verify [........................]  0/10 blocks  0%\n",
                        (size_t)(second - out) + 1);
    assert_non_null(strstr(second + 1, "verify [########################]  10/10 blocks  100%"));
    assert_string_equal(out + n - 1, "\n");
    assert_int_equal(strchr(second + 1, '\n') - out, (long)n - 1); /* two lines */
    fclose(f);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_with_a_total),
        cmocka_unit_test(test_without_a_total),
        cmocka_unit_test(test_small_buffer),
        cmocka_unit_test(test_on_off_and_lines),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
