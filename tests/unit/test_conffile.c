/* daemon/conffile and config.h's key table: deploy/kvstashd.yaml is exactly the embedded
 * defaults and names every key; every key has its flag (the key with - for _) and every
 * flag in --help is a key or one of the command flags; a file's unknown keys, bad values,
 * duplicates and lists are refused naming FILE:LINE and the key; flags win over the file;
 * --print-config's output loads back to the same values. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "daemon/conffile.h"
#include "daemon/config.h"

static char tmpdir[] = "/tmp/kvs-conffile-XXXXXX";

static const char *write_file(const char *name, const char *text)
{
    static char path[256];
    snprintf(path, sizeof path, "%s/%s", tmpdir, name);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    assert_int_equal(fclose(f), 0);
    return path;
}

/* Defaults, then `file` (may be NULL) and flags, as kvstashd does. */
static int load(kvs_config *cfg, kvs_err *err, const char *file, char **flags)
{
    static char path[256];
    char *argv[16] = {"kvstashd"};
    int argc = 1;
    if (file) {
        snprintf(path, sizeof path, "%s", file);
        argv[argc++] = "--config";
        argv[argc++] = path;
    }
    for (; flags && *flags; flags++)
        argv[argc++] = *flags;
    argv[argc] = NULL;
    kvs_config_defaults(cfg);
    kvs_err_clear(err);
    return kvs_config_parse_args(cfg, argc, argv, err);
}

static void test_table(void **state)
{
    (void)state;
    for (int i = 0; i < KVS_CONFIG_NKEYS; i++) {
        const char *key = kvs_config_key_name(i), *flag = kvs_config_key_flag(i);
        assert_int_equal(strlen(key), strlen(flag));
        for (size_t j = 0; key[j]; j++)
            assert_int_equal(key[j], flag[j] == '-' ? '_' : flag[j]);
        assert_int_equal(kvs_config_key_find(key), i);
    }
    assert_int_equal(kvs_config_key_find("host-capacity"), -1); /* keys use _ */
}

/* Every key of the table is in the file, and the file is the defaults. */
static void test_deploy_file_is_defaults(void **state)
{
    (void)state;
    kvs_config def, cfg;
    kvs_err err;
    kvs_config_defaults(&def);
    assert_int_equal(load(&cfg, &err, KVS_SOURCE_DIR "/deploy/kvstashd.yaml", NULL), 0);
    for (int i = 0; i < KVS_CONFIG_NKEYS; i++) {
        if (cfg.src[i].kind != KVS_SRC_FILE)
            fail_msg("deploy/kvstashd.yaml lacks key %s", kvs_config_key_name(i));
        if (!kvs_config_key_equal(&def, &cfg, i)) {
            char a[128], b[128];
            kvs_config_key_value(&def, i, a, sizeof a);
            kvs_config_key_value(&cfg, i, b, sizeof b);
            fail_msg("deploy/kvstashd.yaml: %s is %s, the default is %s", kvs_config_key_name(i), b,
                     a);
        }
    }
}

/* Each key's flag sets it (so every key has a flag), and every --flag that --help shows is
 * a key's flag or a command flag (so every flag has a key). */
static void test_flags_and_keys(void **state)
{
    (void)state;
    kvs_config def, cfg;
    kvs_err err;
    kvs_config_defaults(&def);
    for (int i = 0; i < KVS_CONFIG_NKEYS; i++) {
        char flag[64], val[128];
        snprintf(flag, sizeof flag, "--%s", kvs_config_key_flag(i));
        kvs_config_key_value(&def, i, val, sizeof val);
        if (!strcmp(kvs_config_key_name(i), "data_dir")) /* needed by data_dir_reset */
            snprintf(val, sizeof val, "%s/d", tmpdir);
        char *a[] = {flag, val, NULL}, *sw[] = {flag, "--data-dir", "/x", NULL};
        bool is_switch = kvs_config_key_flags(i) & KVS_KEY_SWITCH;
        if ((kvs_config_key_flags(i) & KVS_KEY_SECRET))
            snprintf(val, sizeof val, "secret");
        int rc = load(&cfg, &err, NULL, is_switch ? sw : a);
        if (rc)
            fail_msg("%s %s: %s", flag, val, err.msg);
        assert_int_equal(cfg.src[i].kind, KVS_SRC_FLAG);
    }
    /* --help's flags: capture stdout. */
    char path[256];
    snprintf(path, sizeof path, "%s/help", tmpdir);
    fflush(stdout);
    int saved = dup(1);
    FILE *f = fopen(path, "w+");
    assert_non_null(f);
    dup2(fileno(f), 1);
    char *h[] = {"--help", NULL};
    int rc = load(&cfg, &err, NULL, h);
    fflush(stdout);
    dup2(saved, 1);
    close(saved);
    assert_int_equal(rc, KVS_CONFIG_EXIT);
    rewind(f);
    char line[256];
    int seen = 0;
    while (fgets(line, sizeof line, f)) {
        char name[64];
        if (sscanf(line, " --%63[a-z-]", name) != 1)
            continue;
        static const char *commands[] = {"config", "print-config", "no-gpu", "help", "version"};
        bool ok = false;
        for (size_t j = 0; j < sizeof commands / sizeof *commands; j++)
            ok |= !strcmp(name, commands[j]);
        for (int i = 0; i < KVS_CONFIG_NKEYS; i++)
            if (!strcmp(name, kvs_config_key_flag(i)))
                ok = true, seen++;
        if (!ok)
            fail_msg("--help shows --%s, which is no key", name);
    }
    fclose(f);
    assert_int_equal(seen, KVS_CONFIG_NKEYS);
}

static void expect_error(const char *text, const char *want1, const char *want2)
{
    kvs_config cfg;
    kvs_err err;
    const char *path = write_file("bad.yaml", text);
    assert_true(load(&cfg, &err, path, NULL) < 0);
    char where[300];
    snprintf(where, sizeof where, "%s:%s", path, want1);
    if (!strstr(err.msg, where) || !strstr(err.msg, want2))
        fail_msg("error '%s' lacks '%s' or '%s'", err.msg, where, want2);
}

static void test_file_errors(void **state)
{
    (void)state;
    expect_error("host_capacity: 1G\n\nfrobnicate: 3\n", "3: frobnicate", "unknown key");
    expect_error("# c\nhost_capacity: 0\n", "2: host_capacity", "is not a size > 0");
    expect_error("log_level: loud\n", "1: log_level", "is not error, warn, info or debug");
    expect_error("eviction: lru\nhost_watermarks: 50,60\n", "2: host_watermarks", "HIGH,LOW");
    expect_error("threads: 4\nthreads: 5\n", "2: threads", "given twice (first at line 1)");
    expect_error("listen:\n  - a\n", "2: listen", "not a list"); /* the list's line */
    expect_error("token:\n", "1: token", "no value");
    expect_error("token: \"<set>\"\n", "1: token", "--print-config");
    expect_error("- a\n", "1:", "mapping");
    expect_error("host_capacity: \"1G\n", "", "not YAML");
    expect_error("data_dir_reset: on\n", "1: data_dir_reset", "needs data_dir");
}

static void test_precedence(void **state)
{
    (void)state;
    kvs_config cfg;
    kvs_err err;
    const char *path =
        write_file("p.yaml", "host_capacity: 512M\neviction: s3fifo\nlog_level: debug\n");
    char *flags[] = {"--host-capacity", "1G", NULL};
    assert_int_equal(load(&cfg, &err, path, flags), 0);
    assert_int_equal(cfg.host_capacity, 1ull << 30); /* the flag wins */
    assert_int_equal(cfg.src[kvs_config_key_find("host_capacity")].kind, KVS_SRC_FLAG);
    assert_int_equal(cfg.eviction, KVS_POLICY_S3FIFO);
    assert_int_equal(cfg.src[kvs_config_key_find("eviction")].kind, KVS_SRC_FILE);
    assert_int_equal(cfg.src[kvs_config_key_find("eviction")].line, 2);
    assert_int_equal(cfg.log_level, KVS_LOG_DEBUG);
    assert_int_equal(cfg.max_keys, 4096); /* not in the file: the default */
    assert_int_equal(cfg.src[kvs_config_key_find("max_keys")].kind, KVS_SRC_DEFAULT);
    /* An empty file, and one of comments, set nothing. */
    assert_int_equal(load(&cfg, &err, write_file("e.yaml", ""), NULL), 0);
    assert_int_equal(load(&cfg, &err, write_file("c.yaml", "# nothing\n"), NULL), 0);
    assert_int_equal(cfg.host_capacity, 2ull << 30);
}

/* --print-config's text, with every key set from somewhere, loads back to the same. */
static void test_print_roundtrip(void **state)
{
    (void)state;
    kvs_config a, b;
    kvs_err err;
    const char *path =
        write_file("r.yaml", "host_capacity: 768M\ngpu_capacity: 3G\nhost_watermarks: 70,20\n"
                             "listen: \"unix:/tmp/a \\\"b\\\".sock\"\nrecv_budget: 100M\n");
    char *flags[] = {"--eviction", "s3fifo", "--log-level", "warn", "--no-gpu", NULL};
    assert_int_equal(load(&a, &err, path, flags), KVS_CONFIG_RUN);
    char out[256];
    snprintf(out, sizeof out, "%s/printed.yaml", tmpdir);
    FILE *f = fopen(out, "w");
    assert_non_null(f);
    kvs_config_print(&a, f);
    assert_int_equal(fclose(f), 0);
    if (load(&b, &err, out, NULL))
        fail_msg("printed config refused: %s", err.msg);
    for (int i = 0; i < KVS_CONFIG_NKEYS; i++) {
        assert_int_equal(b.src[i].kind, KVS_SRC_FILE);
        if (!kvs_config_key_equal(&a, &b, i))
            fail_msg("%s differs after the round trip", kvs_config_key_name(i));
    }
    assert_string_equal(b.listen, "unix:/tmp/a \"b\".sock");
}

static int setup(void **state)
{
    (void)state;
    return mkdtemp(tmpdir) ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    return system(cmd) == 0 ? 0 : -1;
}

int main(void)
{
    unsetenv("KVSTASHD_CONFIG");
    unsetenv("KVSTASH_TOKEN");
    unsetenv("KVSTASH_ADMIN_TOKEN");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_table),          cmocka_unit_test(test_deploy_file_is_defaults),
        cmocka_unit_test(test_flags_and_keys), cmocka_unit_test(test_file_errors),
        cmocka_unit_test(test_precedence),     cmocka_unit_test(test_print_roundtrip),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
