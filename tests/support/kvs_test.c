/* Helpers shared by the codec unit tests; contracts in tests/support/kvs_test.h. The
 * Gaussian generator and the error measures are the definitions the tests' thresholds
 * were set against (quantizers-reference.md §6): change them and the thresholds move. */
#define _GNU_SOURCE /* nftw */
#include "tests/support/kvs_test.h"

#include <ftw.h>
#include <setjmp.h>
#include <stdarg.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "gpu/codec/half.h"

#define SAMPLE_HEADER 4096
#define SAMPLE_MAGIC "KVSAMPLE1\n"

kvs_ns_spec kvs_test_spec(uint32_t L, uint32_t H, uint32_t D, uint32_t T, kvs_dtype dt,
                          const char *kc, const char *vc, uint64_t seed)
{
    kvs_ns_spec s;
    memset(&s, 0, sizeof s);
    strcpy(s.name, "t");
    s.layers = L;
    s.kv_heads = H;
    s.head_dim = D;
    s.block_tokens = T;
    s.dtype = dt;
    s.seed = seed;
    snprintf(s.key_codec, sizeof s.key_codec, "%s", kc);
    snprintf(s.value_codec, sizeof s.value_codec, "%s", vc);
    return s;
}

kvs_codec *kvs_test_codec(const kvs_ns_spec *s, kvs_kv kv, const kvs_codec_state *st)
{
    kvs_codec *c = NULL;
    kvs_err err;
    int rc = kvs_codec_create(s, kv, st, &c, &err);
    if (rc)
        fail_msg("kvs_codec_create: %s", err.msg);
    return c;
}

double kvs_test_gauss(kvs_rng *r)
{
    double u1 = ((kvs_rng_next(r) >> 11) + 1) * 0x1.0p-53, u2 = (kvs_rng_next(r) >> 11) * 0x1.0p-53;
    return sqrt(-2 * log(u1)) * cos(2 * M_PI * u2);
}

uint16_t *kvs_test_gauss_data(size_t n, uint64_t seed, double sigma, kvs_dtype dt)
{
    kvs_rng r;
    kvs_rng_init(&r, seed, 0, 0, 0, 0);
    uint16_t *x = malloc(n * sizeof *x);
    assert_non_null(x);
    for (size_t i = 0; i < n; i++) {
        float f = (float)(sigma * kvs_test_gauss(&r));
        x[i] = dt == KVS_DTYPE_BF16 ? kvs_f32_to_bf16(f) : kvs_f32_to_fp16(f);
    }
    return x;
}

float kvs_test_to_f32(uint16_t h, kvs_dtype dt)
{
    return dt == KVS_DTYPE_BF16 ? kvs_bf16_to_f32(h) : kvs_fp16_to_f32(h);
}

double kvs_test_rel_err(const uint16_t *a, const uint16_t *b, size_t n, kvs_dtype dt)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double x = kvs_test_to_f32(a[i], dt), y = kvs_test_to_f32(b[i], dt);
        num += (x - y) * (x - y);
        den += x * x;
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

double kvs_test_logit_err(const uint16_t *q, const float *k, const float *kh, uint32_t n,
                          uint32_t qh, uint32_t kvh, uint32_t D)
{
    uint32_t group = qh / kvh;
    double num = 0, den = 0;
    for (uint32_t i = 0; i < n; i++)
        for (uint32_t h = 0; h < qh; h++) {
            const uint16_t *qv = q + ((size_t)i * qh + h) * D;
            for (uint32_t j = 0; j <= i; j++) {
                const float *kr = k + ((size_t)j * kvh + h / group) * D;
                const float *khr = kh + ((size_t)j * kvh + h / group) * D;
                double a = 0, b = 0;
                for (uint32_t c = 0; c < D; c++) {
                    double qc = kvs_fp16_to_f32(qv[c]);
                    a += qc * kr[c];
                    b += qc * khr[c];
                }
                num += (a - b) * (a - b);
                den += a * a;
            }
        }
    return sqrt(num / den);
}

bool kvs_test_sample_load(kvs_test_sample *s)
{
    const char *dir = getenv("KVS_TEST_DATA");
    char path[1024];
    snprintf(path, sizeof path, "%s/realkv-a-64.kvs", dir ? dir : KVS_SOURCE_DIR "/tests/data");
    memset(s, 0, sizeof *s);
    FILE *f = fopen(path, "rb");
    if (!f)
        return false;
    assert_int_equal(fseek(f, 0, SEEK_END), 0);
    long n = ftell(f);
    assert_true(n >= SAMPLE_HEADER);
    assert_int_equal(fseek(f, 0, SEEK_SET), 0);
    s->size = (size_t)n;
    s->bytes = malloc(s->size + 1);
    assert_non_null(s->bytes);
    assert_int_equal(fread(s->bytes, 1, s->size, f), s->size);
    fclose(f);
    s->bytes[s->size] = 0;
    assert_memory_equal(s->bytes, SAMPLE_MAGIC, strlen(SAMPLE_MAGIC));
    return true;
}

void kvs_test_sample_free(kvs_test_sample *s)
{
    free(s->bytes);
    s->bytes = NULL;
    s->size = 0;
}

const uint16_t *kvs_test_sample_array(const kvs_test_sample *s, const char *name, const char *shape)
{
    /* search the header only: the arrays after it are binary */
    char hdr[SAMPLE_HEADER + 1], key[128];
    memcpy(hdr, s->bytes, SAMPLE_HEADER);
    hdr[SAMPLE_HEADER] = 0;
    snprintf(key, sizeof key, "{\"name\": \"%s\", \"shape\": %s", name, shape);
    const char *p = strstr(hdr, key);
    if (!p)
        fail_msg("realkv-a-64.kvs: no array %s with shape %s", name, shape);
    p = strstr(p, "\"offset\":");
    assert_non_null(p);
    size_t off = strtoul(p + 9, NULL, 10);
    size_t elts = 1;
    for (const char *d = shape; *d; d++)
        if (*d >= '0' && *d <= '9') {
            char *end;
            elts *= strtoul(d, &end, 10);
            d = end - 1;
        }
    assert_true(off % 2 == 0 && off >= SAMPLE_HEADER);
    assert_true(off <= s->size && elts * 2 <= s->size - off);
    return (const uint16_t *)(s->bytes + off);
}

static int rm_one(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(p);
}

void kvs_test_rmtree(const char *dir)
{
    nftw(dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}
