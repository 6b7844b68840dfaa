/* kvs-bench-fidelity: what measuring a block's error costs (issue 16, item 3), per codec, on
 * one CPU thread: the encode a Put does anyway, then kvs_fidelity_measure (a CPU decode of
 * the encoded block and the error sums; with a squat query subspace also the logit error,
 * D^2 multiply-adds per token and kv-head), and the re-encode a bound's fallback adds.
 * Gaussian fp16 blocks of a Llama-3-8B-like layout by default (L=32, H=8, D=128, T=16:
 * 2 MiB). Prints milliseconds per block (median of --reps): the encode, the measure, their
 * ratio, and the re-encode with a `none` fallback (what a block over the bound costs on top;
 * its second measure is a measure again). Exit 1 if a codec fails.
 *
 *   kvs-bench-fidelity [--layers L] [--heads H] [--dim D] [--tokens T] [--reps N]
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "gpu/codec/codec.h"
#include "gpu/codec/codec_squat.h"
#include "gpu/codec/fidelity.h"
#include "gpu/codec/half.h"
#include "gpu/codec/rng.h"

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* n standard normal fp16 values from a seeded stream (Box-Muller). */
static uint16_t *gauss(size_t n, uint64_t seed)
{
    uint16_t *x = malloc(n * sizeof *x);
    kvs_rng r;
    kvs_rng_init(&r, seed, 0, 0, 0, 0);
    for (size_t i = 0; x && i < n; i++) {
        double u1 = ((double)(kvs_rng_next(&r) >> 11) + 1) * 0x1.0p-53;
        double u2 = (double)(kvs_rng_next(&r) >> 11) * 0x1.0p-53;
        x[i] = kvs_f32_to_fp16((float)(sqrt(-2 * log(u1)) * cos(2 * M_PI * u2)));
    }
    return x;
}

static int make(const kvs_ns_spec *s, kvs_kv kv, const kvs_codec_state *st, kvs_codec **c)
{
    kvs_err err;
    if (kvs_codec_create(s, kv, st, c, &err)) {
        fprintf(stderr, "kvs-bench-fidelity: %s: %s\n", kv ? s->value_codec : s->key_codec,
                err.msg);
        return 1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    uint32_t L = 32, H = 8, D = 128, T = 16;
    int reps = 20;
    for (int i = 1; i + 1 < argc; i += 2) {
        unsigned long v = strtoul(argv[i + 1], NULL, 10);
        if (!strcmp(argv[i], "--layers"))
            L = (uint32_t)v;
        else if (!strcmp(argv[i], "--heads"))
            H = (uint32_t)v;
        else if (!strcmp(argv[i], "--dim"))
            D = (uint32_t)v;
        else if (!strcmp(argv[i], "--tokens"))
            T = (uint32_t)v;
        else if (!strcmp(argv[i], "--reps"))
            reps = (int)v;
        else {
            fprintf(stderr, "usage: kvs-bench-fidelity [--layers L] [--heads H] [--dim D] "
                            "[--tokens T] [--reps N]\n");
            return 2;
        }
    }
    if (reps < 1 || reps > 1000)
        reps = 20;
    const char *codecs[] = {"none",       "fp8",        "kivi-4", "kivi-2",
                            "polarquant", "rotatekv-2", "squat-2"};
    printf("layout L=%u H=%u D=%u T=%u fp16, %d reps, one thread; ms per block (median)\n", L, H, D,
           T, reps);
    printf("%-11s %8s %9s %10s %12s %8s %8s\n", "codec", "encode", "measure", "meas/enc",
           "re-enc none", "K err", "V err");
    int bad = 0;
    for (size_t c = 0; c < sizeof codecs / sizeof *codecs; c++) {
        kvs_ns_spec s = {.layers = L,
                         .kv_heads = H,
                         .head_dim = D,
                         .block_tokens = T,
                         .dtype = KVS_DTYPE_FP16,
                         .seed = 7,
                         .max_rel_error = 1e-9};
        snprintf(s.name, sizeof s.name, "bench");
        snprintf(s.key_codec, sizeof s.key_codec, "%s", codecs[c]);
        snprintf(s.value_codec, sizeof s.value_codec, "%s", codecs[c]);
        snprintf(s.fallback_codec, sizeof s.fallback_codec, "none");
        /* squat: a query subspace from Gaussian queries (2 query heads per kv-head), so the
         * logit error is measured too. */
        void *state = NULL;
        size_t state_len = 0;
        kvs_codec_state st = {0};
        bool squat = !strcmp(codecs[c], "squat-2");
        if (squat) {
            uint16_t *q = gauss((size_t)L * 64 * 2 * H * D, 99);
            kvs_err err;
            if (!q || kvs_squat_state_from_queries(&s, 2 * H, q, 64, &state, &state_len, &err)) {
                fprintf(stderr, "kvs-bench-fidelity: squat state: %s\n", q ? err.msg : "memory");
                free(q);
                return 1;
            }
            free(q);
            st = (kvs_codec_state){1, state, state_len};
        }
        kvs_codec *k = NULL, *v = NULL, *fb = NULL;
        kvs_err err;
        if (make(&s, KVS_KEYS, squat ? &st : NULL, &k) || make(&s, KVS_VALUES, NULL, &v) ||
            kvs_codec_create_enc(&s, KVS_KEYS, KVS_ENC_FALLBACK, NULL, &fb, &err)) {
            bad = 1;
            break;
        }
        uint64_t bytes;
        kvs_spec_block_bytes(&s, T, &bytes, NULL);
        uint16_t *raw = gauss(bytes / 2, 1 + c);
        size_t cap = kvs_block_encoded_max(k, v, T), fcap = kvs_block_encoded_max(fb, fb, T), len;
        uint8_t *enc = malloc(cap), *fenc = malloc(fcap);
        double *te = malloc((size_t)reps * sizeof *te), *tm = malloc((size_t)reps * sizeof *tm),
               *tf = malloc((size_t)reps * sizeof *tf);
        kvs_fidelity_sample m = {0};
        for (int r = 0; r < reps && !bad; r++) {
            double t0 = now_ms();
            bad |= kvs_block_encode(k, v, 1, T, raw, enc, cap, &len, &err) != 0;
            double t1 = now_ms();
            bad |= kvs_fidelity_measure(k, v, squat ? k : NULL, raw, enc, len, &m, &err) != 0;
            double t2 = now_ms();
            size_t flen;
            bad |= kvs_block_encode(fb, fb, 1, T, raw, fenc, fcap, &flen, &err) != 0;
            double t3 = now_ms();
            te[r] = t1 - t0;
            tm[r] = t2 - t1;
            tf[r] = t3 - t2;
        }
        if (bad) {
            fprintf(stderr, "kvs-bench-fidelity: %s: %s\n", codecs[c], err.msg);
        } else {
            double e = median(te, reps), me = median(tm, reps), f = median(tf, reps);
            printf("%-11s %8.2f %9.2f %10.2f %12.2f %8.4f %8.4f", codecs[c], e, me, me / e, f,
                   m.err[KVS_FIDELITY_KEYS], m.err[KVS_FIDELITY_VALUES]);
            if (m.has_logits)
                printf("  logit err %.4f", m.err[KVS_FIDELITY_LOGITS]);
            printf("\n");
        }
        free(te);
        free(tm);
        free(tf);
        free(enc);
        free(fenc);
        free(raw);
        free(state);
        kvs_codec_destroy(k);
        kvs_codec_destroy(v);
        kvs_codec_destroy(fb);
        if (bad)
            break;
    }
    return bad;
}
