/* GPU kernels vs CPU references, for every codec that has kernels (gpu/codec/codec_cuda.h).
 *
 * For each codec, K and V, head_dim 64/128/256, several kv-head counts, token counts (1,
 * odd, partial, full) and batch sizes, on random inputs drawn fresh each run (the seed is
 * printed; KVS_TEST_SEED repeats a run) and adversarial ones (zeros, constant rows, huge
 * and tiny magnitudes, one outlier channel):
 *   (a) GPU encode bytes equal the CPU's (codecs with documented rounding ties may differ
 *       in at most 1e-4 of the bytes, and the difference is reported);
 *   (b) GPU decode of the CPU's bytes equals the CPU decode to within 1 fp16/bf16 ulp;
 *   (c) the reference itself is non-trivial (a broken pair cannot agree on zeros), output
 *       buffers are poisoned before each launch, and NaN/Inf inputs are reported through
 *       the `bad` word at the right index.
 * Exits 77 (skipped) where the build has no CUDA or the machine no GPU.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "gpu/codec/codec.h"
#include "gpu/codec/codec_cuda.h"
#include "gpu/codec/codec_squat.h"
#include "gpu/codec/half.h"
#include "tests/support/kvs_test.h"

#ifndef KVS_HAVE_CUDA
int main(void)
{
    printf("test_codecs_gpu: this build has no CUDA: skipped\n");
    return 77;
}
#else
#include "tests/support/kvs_gpu_test.h"

static int failures;

/* ---------------------------------------------------------------- inputs */

static uint64_t rng_state;

static double uniform(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (double)(rng_state >> 11) * 0x1p-53;
}

static double gauss(void)
{
    double u = uniform() + 1e-300, v = uniform();
    return sqrt(-2 * log(u)) * cos(6.283185307179586 * v);
}

typedef enum {
    IN_GAUSS,
    IN_ZERO,
    IN_CONST_ROWS,
    IN_HUGE,
    IN_TINY,
    IN_OUTLIER,
    IN_COUNT
} input_kind;
static const char *input_names[] = {"gauss", "zeros", "const-rows", "huge", "tiny", "outlier"};

static uint16_t to_dtype(kvs_dtype dt, double x)
{
    return dt == KVS_DTYPE_BF16 ? kvs_f32_to_bf16((float)x) : kvs_f32_to_fp16((float)x);
}

/* n sections of [t][H][D]. */
static void fill(uint16_t *x, size_t count, uint32_t D, kvs_dtype dt, input_kind kind)
{
    for (size_t i = 0; i < count; i++) {
        double v;
        switch (kind) {
        case IN_ZERO:
            v = 0;
            break;
        case IN_CONST_ROWS:
            v = 0.75 + (double)(i / D % 5);
            break; /* constant per vector */
        case IN_HUGE:
            v = gauss() * 6000.0;
            break; /* stays well inside fp16 after codecs */
        case IN_TINY:
            v = gauss() * 1e-6;
            break; /* fp16 subnormals */
        case IN_OUTLIER:
            v = gauss() * (i % D == 17 ? 60.0 : 1.0);
            break;
        default:
            v = gauss();
            break;
        }
        x[i] = to_dtype(dt, v);
    }
}

/* Distance in units in the last place between two 16-bit floats of the same format. */
static int ulps(uint16_t a, uint16_t b)
{
    int ia = a & 0x8000 ? -(int)(a & 0x7FFF) : (int)a;
    int ib = b & 0x8000 ? -(int)(b & 0x7FFF) : (int)b;
    return abs(ia - ib);
}

/* ---------------------------------------------------------------- one case */

typedef struct shape {
    uint32_t H, D, t, n;
} shape;

static kvs_ns_spec make_spec(const char *codec, shape s, kvs_dtype dt)
{
    return kvs_test_spec(4, s.H, s.D, 64, dt, codec, codec, 1234);
}

static int tie_tolerant(const kvs_codec *c)
{
    /* PolarQuant quantizes angles by comparisons on rotated values: an input on a decision
     * boundary may round either way between two correct implementations (documented in
     * gpu/codec/codec_polarquant.h); every other codec must match byte for byte. */
    return kvs_codec_id_of(c) == KVS_CODEC_POLARQUANT;
}

/* One comparison. state: codec state (NULL = version 0) for a namespace of 4 layers with
 * this shape (the caller builds it, e.g. a RotateKV permutation or SQuat Grams). */
static void run_case_state(const char *name, kvs_kv kv, shape s, kvs_dtype dt, input_kind kind,
                           const kvs_codec_state *state)
{
    kvs_ns_spec sp = make_spec(name, s, dt);
    kvs_codec *c;
    kvs_err err;
    if (kvs_codec_create(&sp, kv, state, &c, &err) != 0) {
        printf("FAIL %s: create: %s\n", name, err.msg);
        failures++;
        return;
    }
    if (!kvs_codec_cuda_supported(c)) {
        kvs_codec_destroy(c);
        return;
    }
    if (kvs_codec_cuda_prepare(c, &err) != 0) {
        printf("FAIL %s: prepare: %s\n", name, err.msg);
        failures++;
        kvs_codec_destroy(c);
        return;
    }
    size_t elems = (size_t)s.t * s.H * s.D, stride = kvs_codec_section_max(c, s.t);
    size_t total = elems * s.n;
    uint16_t *raw = malloc(total * 2), *cpu_dec = malloc(total * 2), *gpu_dec = malloc(total * 2);
    uint8_t *cpu_enc = malloc(stride * s.n), *gpu_enc = malloc(stride * s.n);
    uint32_t *layers = malloc(s.n * sizeof *layers);
    uint32_t *cpu_len = malloc(s.n * sizeof *cpu_len), *gpu_len = malloc(s.n * sizeof *gpu_len);
    int fixed = kvs_codec_cuda_fixed_size(c);
    if (!raw || !cpu_dec || !gpu_dec || !cpu_enc || !gpu_enc || !layers || !cpu_len || !gpu_len) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    fill(raw, total, s.D, dt, kind);
    /* CPU reference, section by section. */
    int cpu_rc = 0;
    for (uint32_t i = 0; i < s.n && cpu_rc == 0; i++) {
        layers[i] = i % sp.layers;
        size_t len = 0;
        memset(cpu_enc + i * stride, 0, stride);
        cpu_rc = kvs_codec_encode(c, layers[i], s.t, raw + i * elems, cpu_enc + i * stride, stride,
                                  &len, &err);
        cpu_len[i] = (uint32_t)len;
        if (cpu_rc == 0 && fixed && len != stride) {
            printf("FAIL %s: CPU section of %zu bytes, section_max %zu (not fixed-size)\n", name,
                   len, stride);
            failures++;
            cpu_rc = -1;
        }
        if (cpu_rc == 0)
            cpu_rc = kvs_codec_decode(c, layers[i], s.t, cpu_enc + i * stride, len,
                                      cpu_dec + i * elems, &err);
    }
    if (cpu_rc) {
        /* The reference refused this input (e.g. fp16 overflow of a parameter): the
         * kernels are not asked to agree on it. */
        printf("skip %s %s D=%u H=%u t=%u n=%u %s: CPU refused: %s\n", name, kv ? "V" : "K", s.D,
               s.H, s.t, s.n, input_names[kind], err.msg);
        goto out;
    }
    double norm = 0;
    for (size_t i = 0; i < total; i++)
        norm += fabs((double)(dt == KVS_DTYPE_BF16 ? kvs_bf16_to_f32(cpu_dec[i])
                                                   : kvs_fp16_to_f32(cpu_dec[i])));
    if (kind != IN_ZERO && !(norm > 0)) {
        printf("FAIL %s: the CPU reference decodes to zeros: the comparison would be empty\n",
               name);
        failures++;
        goto out;
    }

    uint16_t *d_raw, *d_dec;
    uint8_t *d_enc, *d_cpu_enc;
    uint32_t *d_layers, *d_len, *d_len_out;
    unsigned long long *d_bad, bad = 0;
    cudaStream_t st;
    /* A blocking stream: the cudaMemcpy/cudaMemset below run on the legacy stream, and a
     * pageable copy returns with its DMA still in flight; only a blocking stream waits for
     * it (test_paged_gpu read stale bytes on a non-blocking one). */
    CHECK_CUDA(cudaStreamCreate(&st));
    CHECK_CUDA(cudaMalloc((void **)&d_raw, total * 2));
    CHECK_CUDA(cudaMalloc((void **)&d_dec, total * 2));
    CHECK_CUDA(cudaMalloc((void **)&d_enc, stride * s.n));
    CHECK_CUDA(cudaMalloc((void **)&d_cpu_enc, stride * s.n));
    CHECK_CUDA(cudaMalloc((void **)&d_layers, s.n * sizeof *layers));
    CHECK_CUDA(cudaMalloc((void **)&d_bad, sizeof *d_bad));
    CHECK_CUDA(cudaMalloc((void **)&d_len, s.n * sizeof *d_len));
    CHECK_CUDA(cudaMalloc((void **)&d_len_out, s.n * sizeof *d_len_out));
    CHECK_CUDA(cudaMemcpy(d_len, cpu_len, s.n * sizeof *cpu_len, cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemset(d_len_out, 0xA5, s.n * sizeof *d_len_out));
    CHECK_CUDA(cudaMemcpy(d_raw, raw, total * 2, cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(d_cpu_enc, cpu_enc, stride * s.n, cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(d_layers, layers, s.n * sizeof *layers, cudaMemcpyHostToDevice));
    /* Poison outputs: a byte the kernel forgets to write cannot match by luck. */
    CHECK_CUDA(cudaMemset(d_enc, 0xA5, stride * s.n));
    CHECK_CUDA(cudaMemset(d_dec, 0xA5, total * 2));
    CHECK_CUDA(cudaMemset(d_bad, 0xFF, sizeof *d_bad));
    kvs_cuda_sections sec = {.n = s.n,
                             .t = s.t,
                             .layer = d_layers,
                             .raw = d_raw,
                             .raw_out = d_dec,
                             .enc = d_cpu_enc,
                             .enc_out = d_enc,
                             .stride = stride,
                             .bad = d_bad,
                             .len_out = fixed ? NULL : d_len_out,
                             .len = fixed ? NULL : d_len};
    int rc = kvs_codec_encode_cuda(c, &sec, st, &err);
    if (rc == 0)
        rc = kvs_codec_decode_cuda(c, &sec, st, &err);
    if (rc != 0) {
        printf("FAIL %s: launch: %s\n", name, err.msg);
        failures++;
    } else {
        CHECK_CUDA(cudaStreamSynchronize(st));
        CHECK_CUDA(cudaMemcpy(gpu_enc, d_enc, stride * s.n, cudaMemcpyDeviceToHost));
        CHECK_CUDA(cudaMemcpy(gpu_dec, d_dec, total * 2, cudaMemcpyDeviceToHost));
        CHECK_CUDA(cudaMemcpy(&bad, d_bad, sizeof bad, cudaMemcpyDeviceToHost));
        CHECK_CUDA(cudaMemcpy(gpu_len, d_len_out, s.n * sizeof *gpu_len, cudaMemcpyDeviceToHost));
        size_t diff_bytes = 0, first_diff = SIZE_MAX, diff_lens = 0;
        for (uint32_t k = 0; k < s.n; k++) {
            size_t len = cpu_len[k];
            if (!fixed && gpu_len[k] != cpu_len[k])
                diff_lens++;
            for (size_t i = k * stride; i < k * stride + len; i++)
                if (gpu_enc[i] != cpu_enc[i]) {
                    diff_bytes++;
                    if (first_diff == SIZE_MAX)
                        first_diff = i;
                }
        }
        size_t diff_vals = 0, first_val = SIZE_MAX;
        int worst = 0;
        for (size_t i = 0; i < total; i++) {
            int u = ulps(gpu_dec[i], cpu_dec[i]);
            if (u > worst)
                worst = u;
            if (u > 1) {
                diff_vals++;
                if (first_val == SIZE_MAX)
                    first_val = i;
            }
        }
        double frac = (double)diff_bytes / (double)(stride * s.n);
        int enc_ok = diff_bytes == 0 || (tie_tolerant(c) && frac <= 1e-4);
        int ok = enc_ok && diff_lens == 0 && diff_vals == 0 && bad == ~0ull;
        if (!ok || diff_bytes)
            printf("%s %s %s D=%u H=%u t=%u n=%u %s state=%u: encode %zu/%zu bytes differ (first "
                   "at %zu), %zu section lengths differ, decode %zu values > 1 ulp (first at %zu,"
                   " worst %d ulp), bad=%llx\n",
                   ok ? "note" : "FAIL", name, kv ? "V" : "K", s.D, s.H, s.t, s.n,
                   input_names[kind], state ? state->version : 0, diff_bytes, stride * s.n,
                   first_diff, diff_lens, diff_vals, first_val, worst, bad);
        failures += !ok;
    }
    /* NaN/Inf: the kernel must name the first bad element (flat index). */
    if (rc == 0 && kind == IN_GAUSS) {
        size_t at = total / 2 + 3;
        uint16_t nan = dt == KVS_DTYPE_BF16 ? 0x7FC0 : 0x7E00;
        CHECK_CUDA(cudaMemcpy(d_raw + at, &nan, 2, cudaMemcpyHostToDevice));
        uint16_t inf = dt == KVS_DTYPE_BF16 ? 0xFF80 : 0xFC00;
        CHECK_CUDA(cudaMemcpy(d_raw + total - 1, &inf, 2, cudaMemcpyHostToDevice));
        CHECK_CUDA(cudaMemset(d_bad, 0xFF, sizeof *d_bad));
        if (kvs_codec_encode_cuda(c, &sec, st, &err) != 0) {
            printf("FAIL %s: launch with NaN: %s\n", name, err.msg);
            failures++;
        } else {
            CHECK_CUDA(cudaStreamSynchronize(st));
            CHECK_CUDA(cudaMemcpy(&bad, d_bad, sizeof bad, cudaMemcpyDeviceToHost));
            if (bad != at) {
                printf("FAIL %s %s: NaN at %zu reported as %llx\n", name, kv ? "V" : "K", at, bad);
                failures++;
            }
        }
    }
    cudaFree(d_raw);
    cudaFree(d_dec);
    cudaFree(d_enc);
    cudaFree(d_cpu_enc);
    cudaFree(d_layers);
    cudaFree(d_bad);
    cudaFree(d_len);
    cudaFree(d_len_out);
    cudaStreamDestroy(st);
out:
    free(cpu_len);
    free(gpu_len);
    free(raw);
    free(cpu_dec);
    free(gpu_dec);
    free(cpu_enc);
    free(gpu_enc);
    free(layers);
    kvs_codec_destroy(c);
}

static void run_case(const char *name, kvs_kv kv, shape s, kvs_dtype dt, input_kind kind)
{
    run_case_state(name, kv, s, dt, kind, NULL);
}

/* ---------------------------------------------------------------- learned state */

#include "gpu/codec/codec_rotatekv.h"

/* RotateKV sections that fill() does not make, compared like run_case_state (bytes,
 * lengths, decode bit for bit, `bad`). pattern 0: tokens 0 and 9 (mod t) scaled by 50
 * (norm sinks); 1: six tokens equal to 50 x one vector (ties: the four lowest win);
 * 2: every token one vector v, token 2 = 8v (norm^2 exactly 64 x the median: no sink)
 * and token 5 = 8v with one larger element (a sink), t >= 6; 3: token 1 constant 30000
 * (fp16) or 1e6 (bf16): a range sink; 4 (bf16, t >= 5): tokens 0..4 constant 1e6, more
 * range sinks than S: the CPU refuses, the kernel must flag inside that section; 5: as 0,
 * plus token 1 all -0 and token 2 random signed zeros (group minima and maxima that are
 * zeros of both signs: the first of equal values must win, as in the CPU's scan); 6
 * (t >= 4): tokens 0..(t-1)/2 are v, the others 2v, the last 10v (norm^2 100x the lower
 * median; for even t 25x the upper one: a sink only with the lower median). Then
 * decode of section 0 with a wrong length, and with its first sink index out of range,
 * must flag section 0. */
static void rkv_sink_case(const char *name, kvs_kv kv, shape s, kvs_dtype dt,
                          const kvs_codec_state *state, int pattern)
{
    kvs_ns_spec sp = make_spec(name, s, dt);
    kvs_codec *c;
    kvs_err err;
    if (kvs_codec_create(&sp, kv, state, &c, &err) != 0) {
        printf("FAIL %s: create: %s\n", name, err.msg);
        failures++;
        return;
    }
    if (!kvs_codec_cuda_supported(c) || kvs_codec_cuda_prepare(c, &err) != 0) {
        printf("FAIL %s %s D=%u H=%u t=%u: no kernels or prepare failed\n", name, kv ? "V" : "K",
               s.D, s.H, s.t);
        failures++;
        kvs_codec_destroy(c);
        return;
    }
    const size_t C = (size_t)s.H * s.D, elems = s.t * C, total = elems * s.n;
    const size_t stride = kvs_codec_section_max(c, s.t);
    const unsigned bits = kvs_codec_bits(c);
    const size_t gs = kv == KVS_KEYS || s.D >= 128 ? 128 : s.D;
    const size_t rec = C * bits / 8 + 4 * ((C + gs - 1) / gs);
    uint16_t *raw = malloc(total * 2), *cpu_dec = malloc(total * 2), *gpu_dec = malloc(total * 2);
    uint8_t *cpu_enc = calloc(s.n, stride), *gpu_enc = malloc(stride * s.n);
    uint32_t *layers = malloc(s.n * sizeof *layers), *cpu_len = calloc(s.n, sizeof *cpu_len);
    uint32_t *gpu_len = malloc(s.n * sizeof *gpu_len);
    if (!raw || !cpu_dec || !gpu_dec || !cpu_enc || !gpu_enc || !layers || !cpu_len || !gpu_len) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    const double big = dt == KVS_DTYPE_BF16 ? 1e6 : 30000.0;
    for (uint32_t k = 0; k < s.n; k++) {
        uint16_t *x = raw + k * elems;
        for (size_t i = 0; i < elems; i++)
            x[i] = to_dtype(dt, gauss());
        for (uint32_t tok = 0; tok < s.t; tok++)
            for (size_t j = 0; j < C; j++) {
                double v0 = kvs_test_to_f32(x[j], dt), v = kvs_test_to_f32(x[tok * C + j], dt);
                switch (pattern) {
                case 0:
                case 5:
                    if (tok == 0 || tok == 9 % s.t)
                        v *= 50.0;
                    else if (pattern == 5 && tok == 1)
                        v = -0.0;
                    else if (pattern == 5 && tok == 2)
                        v = uniform() < 0.5 ? -0.0 : 0.0;
                    break;
                case 6:
                    v = tok <= (s.t - 1) / 2 ? v0 : (tok == s.t - 1 ? 10.0 * v0 : 2.0 * v0);
                    break;
                case 1:
                    if (tok % 2 == 1 && tok < 14)
                        v = 50.0 * v0;
                    break;
                case 2:
                    v = tok == 2 || tok == 5 ? 8.0 * v0 : v0;
                    if (tok == 5 && j == 0)
                        v = 8.0 * (fabs(v0) + 1.0);
                    break;
                case 3:
                    if (tok == 1 % s.t)
                        v = big;
                    break;
                default:
                    if (tok < 5)
                        v = big;
                    break;
                }
                if (tok > 0 || (pattern != 2 && pattern != 6))
                    x[tok * C + j] = to_dtype(dt, v);
            }
    }
    int cpu_rc = 0;
    uint32_t refused = 0;
    for (uint32_t k = 0; k < s.n; k++) {
        size_t len = 0;
        layers[k] = k % sp.layers;
        cpu_rc = kvs_codec_encode(c, layers[k], s.t, raw + k * elems, cpu_enc + k * stride, stride,
                                  &len, &err);
        if (cpu_rc) {
            refused = k;
            break;
        }
        cpu_len[k] = (uint32_t)len;
        if ((cpu_rc = kvs_codec_decode(c, layers[k], s.t, cpu_enc + k * stride, len,
                                       cpu_dec + k * elems, &err)) != 0) {
            printf("FAIL %s: CPU decode: %s\n", name, err.msg);
            failures++;
            goto out;
        }
    }
    if (cpu_rc != 0 && pattern != 4) {
        printf("FAIL %s pattern %d: CPU refused: %s\n", name, pattern, err.msg);
        failures++;
        goto out;
    }
    if (cpu_rc == 0 && pattern == 4) {
        printf("FAIL %s pattern 4: the CPU accepted five range sinks\n", name);
        failures++;
        goto out;
    }

    uint16_t *d_raw, *d_dec;
    uint8_t *d_enc, *d_cpu_enc;
    uint32_t *d_layers, *d_len, *d_len_out;
    unsigned long long *d_bad, bad = 0;
    cudaStream_t st;
    /* A blocking stream: the cudaMemcpy/cudaMemset below run on the legacy stream, and a
     * pageable copy returns with its DMA still in flight; only a blocking stream waits for
     * it (test_paged_gpu read stale bytes on a non-blocking one). */
    CHECK_CUDA(cudaStreamCreate(&st));
    CHECK_CUDA(cudaMalloc((void **)&d_raw, total * 2));
    CHECK_CUDA(cudaMalloc((void **)&d_dec, total * 2));
    CHECK_CUDA(cudaMalloc((void **)&d_enc, stride * s.n));
    CHECK_CUDA(cudaMalloc((void **)&d_cpu_enc, stride * s.n));
    CHECK_CUDA(cudaMalloc((void **)&d_layers, s.n * sizeof *layers));
    CHECK_CUDA(cudaMalloc((void **)&d_bad, sizeof *d_bad));
    CHECK_CUDA(cudaMalloc((void **)&d_len, s.n * sizeof *d_len));
    CHECK_CUDA(cudaMalloc((void **)&d_len_out, s.n * sizeof *d_len_out));
    CHECK_CUDA(cudaMemcpy(d_raw, raw, total * 2, cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(d_cpu_enc, cpu_enc, stride * s.n, cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(d_len, cpu_len, s.n * sizeof *cpu_len, cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(d_layers, layers, s.n * sizeof *layers, cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemset(d_enc, 0xA5, stride * s.n));
    CHECK_CUDA(cudaMemset(d_dec, 0xA5, total * 2));
    CHECK_CUDA(cudaMemset(d_len_out, 0xA5, s.n * sizeof *d_len_out));
    CHECK_CUDA(cudaMemset(d_bad, 0xFF, sizeof *d_bad));
    kvs_cuda_sections sec = {.n = s.n,
                             .t = s.t,
                             .layer = d_layers,
                             .raw = d_raw,
                             .raw_out = d_dec,
                             .enc = d_cpu_enc,
                             .enc_out = d_enc,
                             .stride = stride,
                             .bad = d_bad,
                             .len_out = d_len_out,
                             .len = d_len};
    const char *what = "";
    if (kvs_codec_encode_cuda(c, &sec, st, &err) != 0) {
        what = err.msg;
    } else if (pattern == 4) {
        CHECK_CUDA(cudaStreamSynchronize(st));
        CHECK_CUDA(cudaMemcpy(&bad, d_bad, sizeof bad, cudaMemcpyDeviceToHost));
        if (bad < (unsigned long long)refused * elems ||
            bad >= (unsigned long long)(refused + 1) * elems)
            what = "refused section not flagged";
    } else if (kvs_codec_decode_cuda(c, &sec, st, &err) != 0) {
        what = err.msg;
    } else {
        CHECK_CUDA(cudaStreamSynchronize(st));
        CHECK_CUDA(cudaMemcpy(gpu_enc, d_enc, stride * s.n, cudaMemcpyDeviceToHost));
        CHECK_CUDA(cudaMemcpy(gpu_dec, d_dec, total * 2, cudaMemcpyDeviceToHost));
        CHECK_CUDA(cudaMemcpy(gpu_len, d_len_out, s.n * sizeof *gpu_len, cudaMemcpyDeviceToHost));
        CHECK_CUDA(cudaMemcpy(&bad, d_bad, sizeof bad, cudaMemcpyDeviceToHost));
        for (uint32_t k = 0; k < s.n && !*what; k++)
            if (gpu_len[k] != cpu_len[k])
                what = "section lengths differ";
            else if (memcmp(gpu_enc + k * stride, cpu_enc + k * stride, cpu_len[k]) != 0)
                what = "encoded bytes differ";
        if (!*what && memcmp(gpu_dec, cpu_dec, total * 2) != 0)
            what = "decoded values differ";
        if (!*what && bad != ~0ull)
            what = "bad set on valid input";
        if (!*what && cpu_len[0] == s.t * rec && (s.t > 1 || pattern == 3))
            what = "section 0 has no sink (test input)";
        /* section 0 malformed: a length one byte long, then a sink index out of range */
        uint32_t wrong = cpu_len[0] + 1;
        uint8_t idx_t[2] = {(uint8_t)s.t, (uint8_t)(s.t >> 8)};
        size_t ns0 = (cpu_len[0] - s.t * rec) / (2 + 2 * C - rec);
        for (int m = 0; m < (ns0 ? 2 : 1) && !*what; m++) {
            if (m == 0) {
                CHECK_CUDA(cudaMemcpy(d_len, &wrong, sizeof wrong, cudaMemcpyHostToDevice));
            } else {
                CHECK_CUDA(cudaMemcpy(d_len, cpu_len, sizeof *cpu_len, cudaMemcpyHostToDevice));
                CHECK_CUDA(
                    cudaMemcpy(d_cpu_enc + (s.t - ns0) * rec, idx_t, 2, cudaMemcpyHostToDevice));
            }
            CHECK_CUDA(cudaMemset(d_bad, 0xFF, sizeof *d_bad));
            if (kvs_codec_decode_cuda(c, &sec, st, &err) != 0) {
                what = err.msg;
                break;
            }
            CHECK_CUDA(cudaStreamSynchronize(st));
            CHECK_CUDA(cudaMemcpy(&bad, d_bad, sizeof bad, cudaMemcpyDeviceToHost));
            if (bad != 0)
                what = m == 0 ? "wrong length not flagged" : "bad sink index not flagged";
        }
    }
    if (*what) {
        printf("FAIL %s %s D=%u H=%u t=%u n=%u %s pattern %d state=%u: %s (bad=%llx)\n", name,
               kv ? "V" : "K", s.D, s.H, s.t, s.n, dt == KVS_DTYPE_BF16 ? "bf16" : "fp16", pattern,
               state ? state->version : 0, what, bad);
        failures++;
    }
    cudaFree(d_raw);
    cudaFree(d_dec);
    cudaFree(d_enc);
    cudaFree(d_cpu_enc);
    cudaFree(d_layers);
    cudaFree(d_bad);
    cudaFree(d_len);
    cudaFree(d_len_out);
    cudaStreamDestroy(st);
out:
    free(raw);
    free(cpu_dec);
    free(gpu_dec);
    free(cpu_enc);
    free(gpu_enc);
    free(layers);
    free(cpu_len);
    free(gpu_len);
    kvs_codec_destroy(c);
}

/* RotateKV keys with a calibrated channel permutation (state version 1). */
static void state_cases_rotatekv(void)
{
    /* keys: the resident kernel path (t*C small), D = 16 and H = 3 (a short last key
     * group), t = 1 and 3; the last two shapes take the two-pass path (chunks of the
     * section read twice) */
    static const shape shapes[] = {
        {8, 128, 16, 9}, {3, 64, 16, 5}, {4, 64, 33, 9},  {1, 16, 5, 3},
        {2, 256, 3, 5},  {6, 32, 1, 4},  {8, 128, 64, 2}, {8, 256, 64, 2},
    };
    static const char *names[] = {"rotatekv-2", "rotatekv-3", "rotatekv-4"};
    static const input_kind kinds[] = {IN_GAUSS, IN_OUTLIER, IN_HUGE, IN_CONST_ROWS, IN_ZERO};
    const int before = failures;
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        const shape s = shapes[si];
        const uint32_t ncal = 64;
        const size_t C = (size_t)s.H * s.D;
        kvs_ns_spec sp = make_spec(names[0], s, KVS_DTYPE_FP16);
        uint16_t *keys = malloc((size_t)sp.layers * ncal * C * sizeof *keys);
        if (!keys) {
            fprintf(stderr, "out of memory\n");
            exit(1);
        }
        /* random keys with a per-(layer, channel) offset: a permutation far from identity */
        for (uint32_t l = 0; l < sp.layers; l++)
            for (uint32_t i = 0; i < ncal; i++)
                for (size_t j = 0; j < C; j++)
                    keys[((size_t)l * ncal + i) * C + j] =
                        to_dtype(KVS_DTYPE_FP16, gauss() + (double)((j * 37 + l * 11) % 9) - 4);
        void *bytes = NULL;
        size_t len = 0;
        kvs_err err;
        if (kvs_rotatekv_calibrate(&sp, keys, ncal, &bytes, &len, &err) != 0) {
            printf("FAIL rotatekv calibrate: %s\n", err.msg);
            failures++;
            free(keys);
            continue;
        }
        const kvs_codec_state st = {1, bytes, len};
        const int big = s.t * C >= 65536; /* the two-pass path */
        for (int b = 0; b < 3; b++) {
            if (big && b == 1)
                continue;
            for (size_t k = 0; k < sizeof kinds / sizeof kinds[0]; k++)
                if (!big || kinds[k] == IN_GAUSS)
                    run_case_state(names[b], KVS_KEYS, s, KVS_DTYPE_FP16, kinds[k], &st);
            run_case_state(names[b], KVS_KEYS, s, KVS_DTYPE_BF16, IN_GAUSS, &st);
            if (b == 1)
                continue;
            for (int p = 0; p < 7; p++)
                if (p != 4 && (p != 2 || s.t >= 6) && (p != 6 || s.t >= 4)) {
                    rkv_sink_case(names[b], KVS_KEYS, s, KVS_DTYPE_FP16, &st, p);
                    if (big && (p == 0 || p == 3)) /* values on the two-pass path too */
                        rkv_sink_case(names[b], KVS_VALUES, s, KVS_DTYPE_FP16, NULL, p);
                }
            rkv_sink_case(names[b], KVS_KEYS, s, KVS_DTYPE_BF16, &st, 3);
            if (s.t >= 5)
                rkv_sink_case(names[b], KVS_KEYS, s, KVS_DTYPE_BF16, &st, 4);
        }
        if (big)
            for (int kv = 0; kv < 2; kv++)
                run_case_state(names[2], (kvs_kv)kv, s, KVS_DTYPE_BF16, IN_OUTLIER, NULL);
        free(bytes);
        free(keys);
    }
    printf("%-12s %s\n", "rotatekv+state",
           failures == before ? "GPU matches CPU (calibrated keys, sinks)" : "MISMATCH");
}

/* A SQuat key state (version 1) for make_spec's namespace: per (layer, kv-head), 64
 * tokens of 2 query heads drawn as 4 strong random directions plus noise, so that the
 * top-20 subspace is a real one; then the heads with (layer * H + head) % 4 == 3 get
 * N = 0 (no subspace), so one launch mixes heads with and without compensation. Returns
 * the bytes (free() them) and the expected kvs_squat_subspace_heads. */
static void *squat_state(const char *name, shape s, kvs_dtype dt, size_t *len, uint32_t *active)
{
    kvs_ns_spec sp = make_spec(name, s, dt);
    const uint32_t gq = 2, nq = 64, qh = gq * s.H, D = s.D;
    uint16_t *q = malloc((size_t)sp.layers * nq * qh * D * sizeof *q);
    double *u = malloc(4 * (size_t)D * sizeof *u);
    if (!q || !u) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    for (uint32_t l = 0; l < sp.layers; l++)
        for (uint32_t h = 0; h < s.H; h++) {
            for (uint32_t i = 0; i < 4 * D; i++)
                u[i] = gauss() / sqrt((double)D);
            for (uint32_t tok = 0; tok < nq; tok++)
                for (uint32_t hq = h * gq; hq < (h + 1) * gq; hq++) {
                    double a[4];
                    for (int k = 0; k < 4; k++)
                        a[k] = 4.0 * gauss();
                    for (uint32_t j = 0; j < D; j++) {
                        double v = 0.5 * gauss();
                        for (int k = 0; k < 4; k++)
                            v += a[k] * u[(size_t)k * D + j];
                        q[(((size_t)l * nq + tok) * qh + hq) * D + j] = to_dtype(dt, v);
                    }
                }
        }
    void *bytes = NULL;
    kvs_err err;
    if (kvs_squat_state_from_queries(&sp, qh, q, nq, &bytes, len, &err) != 0) {
        fprintf(stderr, "squat state: %s\n", err.msg);
        exit(1);
    }
    *active = 0;
    for (size_t lh = 0; lh < (size_t)sp.layers * s.H; lh++) {
        if (lh % 4 == 3) /* record: u64 N, then the Gram (gpu/codec/codec_squat.h) */
            memset((uint8_t *)bytes + 16 + lh * (8 + 4 * (size_t)D * D), 0, 8);
        else
            (*active)++;
    }
    free(q);
    free(u);
    return bytes;
}

/* CPU only: the squat codec with this state has the expected heads with a subspace, and
 * its key codes differ from kivi-b's on Gaussian input (a subspace that did nothing
 * would make the GPU comparison a second KIVI test). 1 if they differ. */
static int squat_differs_from_kivi(const char *name, shape s, kvs_dtype dt,
                                   const kvs_codec_state *st, uint32_t active)
{
    char kivi[16];
    snprintf(kivi, sizeof kivi, "kivi-%s", name + strlen("squat-"));
    kvs_ns_spec sq = make_spec(name, s, dt), sk = make_spec(kivi, s, dt);
    kvs_codec *cq, *ck;
    kvs_err err;
    if (kvs_codec_create(&sq, KVS_KEYS, st, &cq, &err) != 0 ||
        kvs_codec_create(&sk, KVS_KEYS, NULL, &ck, &err) != 0) {
        fprintf(stderr, "%s: create: %s\n", name, err.msg);
        exit(1);
    }
    if (kvs_squat_subspace_heads(cq) != active) {
        printf("FAIL %s D=%u: %u heads with a subspace, expected %u\n", name, s.D,
               kvs_squat_subspace_heads(cq), active);
        failures++;
    }
    size_t elems = (size_t)s.t * s.H * s.D, cap = kvs_codec_section_max(cq, s.t), lq, lk;
    uint16_t *raw = malloc(elems * sizeof *raw);
    uint8_t *eq = malloc(cap), *ek = malloc(cap);
    if (!raw || !eq || !ek) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    int differ = 0;
    for (uint32_t l = 0; l < sq.layers; l++) {
        fill(raw, elems, s.D, dt, IN_GAUSS);
        if (kvs_codec_encode(cq, l, s.t, raw, eq, cap, &lq, &err) != 0 ||
            kvs_codec_encode(ck, l, s.t, raw, ek, cap, &lk, &err) != 0) {
            printf("FAIL %s D=%u: CPU encode: %s\n", name, s.D, err.msg);
            failures++;
            break;
        }
        differ |= lq != lk || memcmp(eq, ek, lq) != 0;
    }
    free(raw);
    free(eq);
    free(ek);
    kvs_codec_destroy(cq);
    kvs_codec_destroy(ck);
    return differ;
}

/* SQuat keys with a query subspace (state version 1). */
static void state_cases_squat(void)
{
#define ALL ((1u << IN_COUNT) - 1)
#define K(kind) (1u << (kind))
    /* Codec creation (an eigendecomposition per head) dominates the CPU time at D = 256,
     * so those shapes have one head and fewer input kinds. differ: also check on the CPU
     * that the codes are not KIVI's. */
    static const struct {
        const char *name;
        shape s;
        kvs_dtype dt;
        unsigned kinds;
        int differ;
    } cases[] = {
        {"squat-2", {1, 64, 1, 1}, KVS_DTYPE_FP16, ALL, 0},
        {"squat-2", {2, 64, 33, 9}, KVS_DTYPE_FP16, ALL, 1},
        {"squat-2", {4, 64, 64, 1000}, KVS_DTYPE_FP16, K(IN_GAUSS), 0},
        {"squat-2", {4, 128, 16, 37}, KVS_DTYPE_FP16, ALL, 1},
        {"squat-2", {8, 128, 16, 1000}, KVS_DTYPE_FP16, K(IN_GAUSS), 0},
        {"squat-2", {2, 128, 40, 7}, KVS_DTYPE_FP16, K(IN_GAUSS) | K(IN_TINY) | K(IN_OUTLIER), 0},
        {"squat-2",
         {3, 128, 64, 4},
         KVS_DTYPE_FP16,
         K(IN_GAUSS) | K(IN_CONST_ROWS) | K(IN_HUGE),
         0},
        {"squat-2", {1, 256, 7, 5}, KVS_DTYPE_FP16, K(IN_GAUSS) | K(IN_OUTLIER), 1},
        {"squat-2", {1, 256, 64, 2}, KVS_DTYPE_FP16, K(IN_GAUSS), 0},
        {"squat-2", {1, 256, 1, 3}, KVS_DTYPE_FP16, K(IN_GAUSS), 0},
        {"squat-2", {4, 128, 16, 37}, KVS_DTYPE_BF16, K(IN_GAUSS), 1},
        {"squat-4", {1, 64, 1, 1}, KVS_DTYPE_FP16, K(IN_GAUSS), 0},
        {"squat-4", {2, 64, 33, 9}, KVS_DTYPE_FP16, ALL, 1},
        {"squat-4", {4, 128, 16, 37}, KVS_DTYPE_FP16, ALL, 1},
        {"squat-4", {8, 128, 16, 1000}, KVS_DTYPE_FP16, K(IN_GAUSS), 0},
        {"squat-4", {3, 128, 64, 4}, KVS_DTYPE_FP16, K(IN_GAUSS) | K(IN_HUGE), 0},
        {"squat-4", {1, 256, 7, 5}, KVS_DTYPE_FP16, K(IN_GAUSS) | K(IN_OUTLIER), 1},
        {"squat-4", {1, 256, 64, 2}, KVS_DTYPE_FP16, K(IN_GAUSS), 0},
        {"squat-4", {2, 64, 33, 9}, KVS_DTYPE_BF16, K(IN_OUTLIER), 0},
        {"squat-4", {1, 256, 7, 5}, KVS_DTYPE_BF16, K(IN_GAUSS), 0},
    };
#undef ALL
#undef K
    int before = failures;
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        const char *name = cases[ci].name;
        shape s = cases[ci].s;
        size_t len;
        uint32_t active;
        void *bytes = squat_state(name, s, cases[ci].dt, &len, &active);
        kvs_codec_state st = {1, bytes, len};
        if (cases[ci].differ && !squat_differs_from_kivi(name, s, cases[ci].dt, &st, active)) {
            printf("FAIL %s D=%u t=%u: the query subspace leaves the codes equal to KIVI's\n", name,
                   s.D, s.t);
            failures++;
        }
        for (int kind = 0; kind < IN_COUNT; kind++)
            if (cases[ci].kinds & 1u << kind)
                run_case_state(name, KVS_KEYS, s, cases[ci].dt, (input_kind)kind, &st);
        /* values ignore the state: KIVI's launchers */
        run_case_state(name, KVS_VALUES, s, cases[ci].dt, IN_GAUSS, &st);
        free(bytes);
    }
    printf("%-12s %s\n", "squat+state", failures == before ? "GPU matches CPU" : "MISMATCH");
}

int main(void)
{
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
        printf("test_codecs_gpu: no CUDA device: skipped\n");
        return 77;
    }
    const char *env = getenv("KVS_TEST_SEED");
    uint64_t seed = env ? strtoull(env, NULL, 0) : (uint64_t)time(NULL);
    printf("test_codecs_gpu: seed %llu (KVS_TEST_SEED=%llu repeats this run)\n",
           (unsigned long long)seed, (unsigned long long)seed);
    rng_state = seed * 0x9E3779B97F4A7C15ull | 1;

    char names[256];
    kvs_codec_names(names, sizeof names);
    static const shape shapes[] = {
        {1, 64, 1, 1},  {4, 128, 16, 37}, {8, 128, 16, 1000}, {2, 256, 7, 5},
        {4, 64, 33, 9}, {3, 128, 64, 4},  {1, 256, 64, 2},
    };
    int tested = 0;
    for (char *tok = strtok(names, ", "); tok; tok = strtok(NULL, ", ")) {
        kvs_ns_spec probe = make_spec(tok, shapes[1], KVS_DTYPE_FP16);
        kvs_codec *c;
        kvs_err err;
        if (kvs_codec_create(&probe, KVS_KEYS, NULL, &c, &err) != 0)
            continue;
        int has = kvs_codec_cuda_supported(c);
        kvs_codec_destroy(c);
        if (!has) {
            printf("%-12s no kernels\n", tok);
            continue;
        }
        int before = failures;
        for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++)
            for (int kv = 0; kv < 2; kv++)
                for (int kind = 0; kind < IN_COUNT; kind++) {
                    if (shapes[si].n > 100 && kind != IN_GAUSS)
                        continue; /* the big batch: random data only */
                    run_case(tok, (kvs_kv)kv, shapes[si], KVS_DTYPE_FP16, (input_kind)kind);
                }
        run_case(tok, KVS_KEYS, shapes[1], KVS_DTYPE_BF16, IN_GAUSS);
        run_case(tok, KVS_VALUES, shapes[3], KVS_DTYPE_BF16, IN_OUTLIER);
        printf("%-12s %s\n", tok, failures == before ? "GPU matches CPU" : "MISMATCH");
        tested++;
    }
    state_cases_rotatekv();
    state_cases_squat();
    printf("test_codecs_gpu: %d codecs with kernels, %d failures\n", tested, failures);
    return failures ? 1 : 0;
}
#endif
