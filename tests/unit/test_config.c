/* daemon/config: sizes, flag validation messages name the flag, defaults. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "daemon/config.h"

static void test_sizes(void **state)
{
    uint64_t v;
    assert_true(kvs_parse_size("512", &v));
    assert_int_equal(v, 512);
    assert_true(kvs_parse_size("64K", &v));
    assert_int_equal(v, 64 << 10);
    assert_true(kvs_parse_size("2G", &v));
    assert_int_equal(v, 2ull << 30);
    assert_true(kvs_parse_size("2GiB", &v));
    assert_int_equal(v, 2ull << 30);
    assert_true(kvs_parse_size("1t", &v));
    assert_int_equal(v, 1ull << 40);
    assert_false(kvs_parse_size("", &v));
    assert_false(kvs_parse_size("-1", &v));
    assert_false(kvs_parse_size("12X", &v));
    assert_false(kvs_parse_size("G", &v));
    assert_false(kvs_parse_size("99999999999999T", &v)); /* overflows 64 bits */
}

static int parse(kvs_config *cfg, kvs_err *err, int argc, char **argv)
{
    kvs_config_defaults(cfg);
    return kvs_config_parse_args(cfg, argc, argv, err);
}

static void test_flags(void **state)
{
    kvs_config cfg;
    kvs_err err;
    char *ok[] = {"kvstashd", "--listen",    "127.0.0.1:0", "--host-capacity", "256M", "--threads",
                  "3",        "--log-level", "debug",       "--max-keys",      "10",   NULL};
    assert_int_equal(parse(&cfg, &err, 11, ok), 0);
    assert_string_equal(cfg.listen, "127.0.0.1:0");
    assert_int_equal(cfg.host_capacity, 256ull << 20);
    assert_int_equal(cfg.threads, 3);
    assert_int_equal(cfg.log_level, KVS_LOG_DEBUG);
    assert_int_equal(cfg.max_keys, 10);

    char *bad_cap[] = {"kvstashd", "--host-capacity", "lots", NULL};
    assert_int_equal(parse(&cfg, &err, 3, bad_cap), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "--host-capacity"));
    char *bad_lvl[] = {"kvstashd", "--log-level", "loud", NULL};
    assert_int_equal(parse(&cfg, &err, 3, bad_lvl), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "--log-level"));
    char *bad_msg[] = {"kvstashd", "--max-message", "1", NULL};
    assert_int_equal(parse(&cfg, &err, 3, bad_msg), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "--max-message"));
    char *unknown[] = {"kvstashd", "--frobnicate", NULL};
    assert_int_equal(parse(&cfg, &err, 2, unknown), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "--frobnicate"));
    char *missing[] = {"kvstashd", "--listen", NULL};
    assert_int_equal(parse(&cfg, &err, 2, missing), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "--listen"));
    char *ev[] = {"kvstashd", "--eviction", "s3fifo", NULL};
    assert_int_equal(parse(&cfg, &err, 3, ev), 0);
    assert_int_equal(cfg.eviction, KVS_POLICY_S3FIFO);
    char *bad_ev[] = {"kvstashd", "--eviction", "mru", NULL};
    assert_int_equal(parse(&cfg, &err, 3, bad_ev), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "--eviction"));
    char *wm[] = {"kvstashd", "--host-watermarks", "70,0", "--gpu-watermarks", "100,99", NULL};
    assert_int_equal(parse(&cfg, &err, 5, wm), 0);
    assert_int_equal(cfg.host_high_pct, 70);
    assert_int_equal(cfg.host_low_pct, 0);
    assert_int_equal(cfg.gpu_high_pct, 100);
    assert_int_equal(cfg.gpu_low_pct, 99);
    char *pin[] = {"kvstashd", "--host-pinned", "off", NULL};
    assert_int_equal(parse(&cfg, &err, 3, pin), 0);
    assert_int_equal(cfg.host_pinned, 0);
    char *bad_pin[] = {"kvstashd", "--host-pinned", "yes", NULL};
    assert_int_equal(parse(&cfg, &err, 3, bad_pin), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "--host-pinned"));
    char *sq[] = {"kvstashd", "--spill-queue", "64M", NULL};
    assert_int_equal(parse(&cfg, &err, 3, sq), 0);
    assert_int_equal(cfg.spill_queue, 64ull << 20);
    char *bad_sq[] = {"kvstashd", "--spill-queue", "0", NULL};
    assert_int_equal(parse(&cfg, &err, 3, bad_sq), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "--spill-queue"));
    char *bad_wm[] = {"80,80", "101,50", "0,0", "90", "90,80,70", "90,x"};
    for (size_t i = 0; i < sizeof bad_wm / sizeof *bad_wm; i++) {
        char *argv[] = {"kvstashd", "--host-watermarks", bad_wm[i], NULL};
        assert_int_equal(parse(&cfg, &err, 3, argv), KVS_EINVAL);
        assert_non_null(strstr(err.msg, "--host-watermarks"));
    }
}

/* KV events (daemon/events.h): off by default; a tcp:// or ipc:// endpoint; the topic
 * auto is kv@<hostname>; the queue bounded. */
static void test_events_keys(void **state)
{
    kvs_config cfg;
    kvs_err err;
    char buf[300];
    kvs_config_defaults(&cfg);
    assert_string_equal(cfg.events_listen, "");
    assert_int_equal(cfg.events_queue, 16384);
    char host[256];
    assert_int_equal(gethostname(host, sizeof host), 0);
    assert_int_equal(kvs_config_events_topic(&cfg, buf, sizeof buf, &err), 0);
    assert_true(strncmp(buf, "kv@", 3) == 0 && strcmp(buf + 3, host) == 0);

    char *ok[] = {"kvstashd",
                  "--events-listen",
                  "tcp://127.0.0.1:5557",
                  "--events-topic",
                  "kv@pod-7",
                  "--events-queue",
                  "64",
                  NULL};
    assert_int_equal(parse(&cfg, &err, 7, ok), 0);
    assert_string_equal(cfg.events_listen, "tcp://127.0.0.1:5557");
    assert_int_equal(cfg.events_queue, 64);
    assert_int_equal(kvs_config_events_topic(&cfg, buf, sizeof buf, &err), 0);
    assert_string_equal(buf, "kv@pod-7");
    char *ipc[] = {"kvstashd", "--events-listen", "ipc:///run/kvstash/events", NULL};
    assert_int_equal(parse(&cfg, &err, 3, ipc), 0);
    char *bad[] = {"kvstashd", "--events-listen", "127.0.0.1:5557", NULL};
    assert_int_equal(parse(&cfg, &err, 3, bad), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "--events-listen: '127.0.0.1:5557' is not tcp://"));
    char *inproc[] = {"kvstashd", "--events-listen", "inproc://x", NULL};
    assert_int_equal(parse(&cfg, &err, 3, inproc), KVS_EINVAL);
    char *q0[] = {"kvstashd", "--events-queue", "0", NULL};
    assert_int_equal(parse(&cfg, &err, 3, q0), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "--events-queue"));
    char *auto_topic[] = {"kvstashd", "--events-topic", "auto", NULL};
    assert_int_equal(parse(&cfg, &err, 3, auto_topic), 0);
    assert_string_equal(cfg.events_topic, "");
}

/* --error-sample (error_sample): a share in 0..1, printed back as it reads, live. */
static void test_error_sample(void **state)
{
    (void)state;
    kvs_config cfg;
    kvs_err err;
    char buf[64];
    kvs_config_defaults(&cfg);
    assert_true(cfg.error_sample == 0.01);
    int i = kvs_config_key_find("error_sample");
    assert_true(i >= 0);
    assert_true(kvs_config_key_flags(i) & KVS_KEY_LIVE);
    kvs_config_key_value(&cfg, i, buf, sizeof buf);
    assert_string_equal(buf, "0.01");
    char *ok[] = {"kvstashd", "--error-sample", "0.25", NULL};
    assert_int_equal(parse(&cfg, &err, 3, ok), 0);
    assert_true(cfg.error_sample == 0.25);
    char *zero[] = {"kvstashd", "--error-sample", "0", NULL};
    assert_int_equal(parse(&cfg, &err, 3, zero), 0);
    assert_true(cfg.error_sample == 0);
    kvs_config_key_value(&cfg, i, buf, sizeof buf);
    assert_string_equal(buf, "0");
    assert_int_equal(kvs_config_key_set(&cfg, i, "0.1234567890123", KVS_SRC_FLAG, 0, NULL, &err),
                     0);
    kvs_config_key_value(&cfg, i, buf, sizeof buf);
    assert_string_equal(buf, "0.1234567890123");
    const char *bad[] = {"1.5", "-0.1", "nan", "x", "", "0.5x"};
    for (size_t b = 0; b < sizeof bad / sizeof *bad; b++) {
        assert_int_equal(kvs_config_key_set(&cfg, i, bad[b], KVS_SRC_FLAG, 0, NULL, &err),
                         KVS_EINVAL);
        assert_non_null(strstr(err.msg, "--error-sample"));
    }
}

/* --gpu (issue 17): auto, on, off, all, or a list of devices (a mask); errors name the
 * flag; a list prints back as given, sorted. */
static void test_gpu_devices(void **state)
{
    kvs_config cfg;
    kvs_err err;
    char *all[] = {"kvstashd", "--gpu", "all", NULL};
    assert_int_equal(parse(&cfg, &err, 3, all), 0);
    assert_int_equal(cfg.gpu, KVS_GPU_ALL);
    char *list[] = {"kvstashd", "--gpu", "3,0,1", NULL};
    assert_int_equal(parse(&cfg, &err, 3, list), 0);
    assert_int_equal(cfg.gpu, KVS_GPU_LIST);
    assert_int_equal(cfg.gpu_mask, 0xBu);
    char buf[64];
    kvs_config_key_value(&cfg, kvs_config_key_find("gpu"), buf, sizeof buf);
    assert_string_equal(buf, "0,1,3");
    char *one[] = {"kvstashd", "--gpu", "31", NULL};
    assert_int_equal(parse(&cfg, &err, 3, one), 0);
    assert_int_equal(cfg.gpu_mask, 1u << 31);
    char *on[] = {"kvstashd", "--gpu", "on", NULL};
    assert_int_equal(parse(&cfg, &err, 3, on), 0);
    assert_int_equal(cfg.gpu, KVS_GPU_ON);
    assert_int_equal(cfg.gpu_mask, 0);
    static char bad[][8] = {"0,,1", "0,", ",0", "1,1", "32", "-1", "0x1", "gpu0", ""};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        char *argv[] = {"kvstashd", "--gpu", bad[i], NULL};
        assert_int_equal(parse(&cfg, &err, 3, argv), KVS_EINVAL);
        assert_non_null(strstr(err.msg, "--gpu"));
        assert_non_null(strstr(err.msg, "list of device"));
    }
    (void)state;
}

static void test_defaults(void **state)
{
    kvs_config cfg;
    kvs_config_defaults(&cfg);
    assert_string_equal(cfg.listen, "127.0.0.1:50051"); /* loopback by default (DESIGN §9) */
    assert_int_equal(cfg.host_capacity, 2ull << 30);
    assert_true(cfg.threads >= 2);
    assert_string_equal(cfg.token, "");
    assert_int_equal(cfg.eviction, KVS_POLICY_LRU);
    assert_int_equal(cfg.host_high_pct, 90);
    assert_int_equal(cfg.host_low_pct, 80);
    assert_int_equal(cfg.host_pinned, 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sizes),       cmocka_unit_test(test_flags),
        cmocka_unit_test(test_events_keys), cmocka_unit_test(test_error_sample),
        cmocka_unit_test(test_defaults),    cmocka_unit_test(test_gpu_devices),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
