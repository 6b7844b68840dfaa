/* gpu/base/file: small text files read whole (the config file, PEM files): bounded, refused
 * with the file named when missing, too large or not text, NUL-terminated when read. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "gpu/base/file.h"

static const char *tmp_file(const char *name, const void *data, size_t len)
{
    static char path[256];
    snprintf(path, sizeof path, "/tmp/kvs-test-file-%d-%s", (int)getpid(), name);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, len, f), len);
    fclose(f);
    return path;
}

static void test_reads_text_whole(void **state)
{
    (void)state;
    const char *p = tmp_file("ok", "abc\ndef\n", 8);
    char *buf;
    size_t len;
    kvs_err err;
    assert_int_equal(kvs_file_read_text("tls_cert", p, 8, &buf, &len, &err), 0);
    assert_int_equal(len, 8);
    assert_string_equal(buf, "abc\ndef\n"); /* NUL-terminated */
    kvs_file_free_secret(buf, len);
    unlink(p);
    p = tmp_file("empty", "", 0); /* (the same static path buffer) */
    assert_int_equal(kvs_file_read_text(NULL, p, 8, &buf, &len, &err), 0);
    assert_int_equal(len, 0);
    assert_string_equal(buf, "");
    free(buf);
    unlink(p);
}

static void test_refusals_name_the_file(void **state)
{
    (void)state;
    char *buf = (char *)1;
    size_t len = 7;
    kvs_err err;
    assert_int_equal(kvs_file_read_text("tls_key", "/nonexistent/k.pem", 64, &buf, &len, &err),
                     KVS_EIO);
    assert_null(buf);
    assert_non_null(strstr(err.msg, "tls_key: '/nonexistent/k.pem': cannot read"));

    const char *big = tmp_file("big", "123456789", 9); /* one byte over the limit */
    assert_int_equal(kvs_file_read_text(NULL, big, 8, &buf, &len, &err), KVS_EINVAL);
    assert_null(buf);
    assert_non_null(strstr(err.msg, big));
    assert_non_null(strstr(err.msg, "larger than 8 bytes"));
    unlink(big);

    const char *bin = tmp_file("bin", "ab\0cd", 5);
    assert_int_equal(kvs_file_read_text("x", bin, 64, &buf, &len, &err), KVS_EINVAL);
    assert_null(buf);
    assert_non_null(strstr(err.msg, "NUL byte"));
    unlink(bin);
    kvs_file_free_secret(NULL, 10); /* NULL is fine */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reads_text_whole),
        cmocka_unit_test(test_refusals_name_the_file),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
