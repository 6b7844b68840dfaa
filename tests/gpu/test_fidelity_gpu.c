/* The GPU engine's error sums (gpu/codec/fidelity.cu, kvs_fidelity_section_sums_cuda)
 * against their CPU reference (kvs_fidelity_section_sums, itself kvs_fidelity_sums per
 * section, which tests/unit/test_fidelity.c checks), for both dtypes, on random and
 * adversarial inputs: Gaussian references with small and large decode errors, all zeros
 * (the sums must be exactly 0), the dtype's largest finite values with sign flips (the
 * squares pass float's range: the sums are doubles), subnormals only, one element a
 * section, section lengths that are not a multiple of the CTA (odd, prime, 16k + 1), and
 * many sections (a batch's 2 * 512 * 32). The kernel adds in another order than the
 * reference: sums must agree to 1e-10 relative (at most n * 2^-53 for n positive terms in any
 * order; zeros exactly). Exits 77 where the build has no CUDA or the machine no GPU; KVS_TEST_SEED
 * repeats a run.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "gpu/codec/fidelity.h"
#include "gpu/codec/half.h"

#ifndef KVS_HAVE_CUDA
int main(void)
{
    printf("test_fidelity_gpu: this build has no CUDA: skipped\n");
    return 77;
}
#else
#include "tests/support/kvs_gpu_test.h"

static int failures, cases;
static uint64_t rng_state;
static cudaStream_t stream;

static uint64_t next(void)
{
    return kvs_gpu_test_next(&rng_state);
}

static double gauss(void)
{
    double u = ((next() >> 11) + 0.5) * 0x1.0p-53, w = ((next() >> 11) + 0.5) * 0x1.0p-53;
    return sqrt(-2 * log(u)) * cos(6.283185307179586 * w);
}

static uint16_t enc(float f, kvs_dtype dt)
{
    return dt == KVS_DTYPE_BF16 ? kvs_f32_to_bf16(f) : kvs_f32_to_fp16(f);
}

typedef enum { GAUSS_SMALL, GAUSS_LARGE, ZEROS, EXTREME, SUBNORMAL, NPATTERNS } pattern;
static const char *pattern_name[NPATTERNS] = {"gauss, small error", "gauss, large error", "zeros",
                                              "largest finite, sign flips", "subnormals"};

static void fill(pattern p, kvs_dtype dt, uint16_t *ref, uint16_t *dec, size_t n)
{
    uint16_t max = dt == KVS_DTYPE_BF16 ? 0x7F7F : 0x7BFF; /* largest finite */
    for (size_t i = 0; i < n; i++) {
        switch (p) {
        case GAUSS_SMALL:
        case GAUSS_LARGE: {
            float r = (float)gauss();
            ref[i] = enc(r, dt);
            dec[i] = enc(r + (float)gauss() * (p == GAUSS_SMALL ? 0.01f : 0.5f), dt);
            break;
        }
        case ZEROS:
            ref[i] = dec[i] = (uint16_t)(next() & 1 ? 0x8000 : 0); /* +0 and -0 */
            break;
        case EXTREME:
            ref[i] = (uint16_t)(max | (next() & 1 ? 0x8000 : 0));
            dec[i] = next() % 3 ? ref[i] : (uint16_t)(ref[i] ^ 0x8000);
            break;
        case SUBNORMAL:
            ref[i] = (uint16_t)(1 + next() % 0x7F);
            dec[i] = (uint16_t)(1 + next() % 0x7F);
            break;
        default:
            break;
        }
    }
}

static void one(pattern p, kvs_dtype dt, uint32_t nsec, size_t sec)
{
    size_t n = (size_t)nsec * sec;
    uint16_t *ref = malloc(n * 2), *dec = malloc(n * 2), *d_ref, *d_dec;
    double *want = malloc(2 * nsec * sizeof *want), *got = malloc(2 * nsec * sizeof *got), *d_out;
    if (!ref || !dec || !want || !got) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    fill(p, dt, ref, dec, n);
    kvs_fidelity_section_sums(ref, dec, nsec, sec, dt, want);
    CHECK_CUDA(cudaMalloc((void **)&d_ref, n * 2));
    CHECK_CUDA(cudaMalloc((void **)&d_dec, n * 2));
    CHECK_CUDA(cudaMalloc((void **)&d_out, 2 * nsec * sizeof *d_out));
    CHECK_CUDA(cudaMemcpy(d_ref, ref, n * 2, cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(d_dec, dec, n * 2, cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemset(d_out, 0xFF, 2 * nsec * sizeof *d_out)); /* NaN: a missed write shows */
    kvs_err err;
    int rc = kvs_fidelity_section_sums_cuda(d_ref, d_dec, nsec, sec, dt, d_out, stream, &err);
    if (rc == 0) {
        CHECK_CUDA(
            cudaMemcpyAsync(got, d_out, 2 * nsec * sizeof *got, cudaMemcpyDeviceToHost, stream));
        CHECK_CUDA(cudaStreamSynchronize(stream));
    }
    const char *dts = dt == KVS_DTYPE_BF16 ? "bf16" : "fp16";
    cases++;
    if (rc) {
        printf("FAIL %s %s, %u sections of %zu: %s\n", pattern_name[p], dts, nsec, sec, err.msg);
        failures++;
    }
    for (uint32_t i = 0; rc == 0 && i < 2 * nsec; i++) {
        double tol = 1e-10 * fabs(want[i]);
        if (!(fabs(got[i] - want[i]) <= tol) || (p == ZEROS && got[i] != 0)) {
            printf("FAIL %s %s, %u sections of %zu: section %u %s: GPU %.17g, CPU %.17g\n",
                   pattern_name[p], dts, nsec, sec, i / 2, i % 2 ? "ref2" : "diff2", got[i],
                   want[i]);
            failures++;
            break;
        }
    }
    /* The error the bound is checked against: finite, and 0 for zeros (other patterns may
     * be 0 too on a few elements: a sign flip or a small error may not happen). */
    double d2 = 0, r2 = 0;
    for (uint32_t i = 0; rc == 0 && i < nsec; i++)
        d2 += got[2 * i], r2 += got[2 * i + 1];
    double rel = kvs_fidelity_ratio(d2, r2);
    if (rc == 0 && (!isfinite(rel) || (p == ZEROS && rel != 0))) {
        printf("FAIL %s %s: relative error %g\n", pattern_name[p], dts, rel);
        failures++;
    }
    cudaFree(d_ref);
    cudaFree(d_dec);
    cudaFree(d_out);
    free(ref);
    free(dec);
    free(want);
    free(got);
}

int main(void)
{
    int skip = kvs_gpu_test_start("test_fidelity_gpu", &rng_state);
    if (skip)
        return skip;
    CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    static const struct {
        uint32_t nsec;
        size_t sec;
    } shapes[] = {{1, 1}, {3, 7}, {64, 257}, {5, 16385}, {1024, 16384 / 8}, {2 * 512 * 32, 64}};
    for (int dt = 0; dt < 2; dt++)
        for (int p = 0; p < NPATTERNS; p++)
            for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++)
                one((pattern)p, dt ? KVS_DTYPE_BF16 : KVS_DTYPE_FP16, shapes[s].nsec,
                    shapes[s].sec);
    /* The launcher's refusal. */
    kvs_err err;
    if (kvs_fidelity_section_sums_cuda(NULL, NULL, 1, 1, KVS_DTYPE_FP16, NULL, stream, &err) !=
        KVS_EINVAL) {
        printf("FAIL: NULL buffers were not refused\n");
        failures++;
    }
    printf("test_fidelity_gpu: %d cases, %d failures\n", cases, failures);
    return failures ? 1 : 0;
}
#endif
