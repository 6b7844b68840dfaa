/* What the CUDA tests of tests/gpu and tests/bench share (header only: plain programs, not
 * cmocka's): a checked CUDA call that ends the test with the call and its error, and the
 * start of a run (skipped, exit 77, without a device; a seed from KVS_TEST_SEED or the
 * clock, printed so that a failure can be repeated). Include only where KVS_HAVE_CUDA. */
#ifndef KVS_GPU_TEST_H
#define KVS_GPU_TEST_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include <cuda_runtime.h>

#define CHECK_CUDA(x)                                                                              \
    do {                                                                                           \
        cudaError_t e_ = (x);                                                                      \
        if (e_ != cudaSuccess) {                                                                   \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));    \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

/* xorshift64: the tests' fast stream of random bits (state never 0). */
static inline uint64_t kvs_gpu_test_next(uint64_t *state)
{
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    return *state;
}

/* 0 when a device is there, with the seed printed and *rng set to the xorshift state it
 * gives (never 0); else prints that `name` is skipped and returns 77, the tests' skip code
 * (tests/CMakeLists.txt). */
static inline int kvs_gpu_test_start(const char *name, uint64_t *rng)
{
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
        printf("%s: no CUDA device: skipped\n", name);
        return 77;
    }
    const char *env = getenv("KVS_TEST_SEED");
    uint64_t seed = env ? strtoull(env, NULL, 0) : (uint64_t)time(NULL);
    printf("%s: seed %llu (KVS_TEST_SEED=%llu repeats this run)\n", name, (unsigned long long)seed,
           (unsigned long long)seed);
    *rng = seed * 0x9E3779B97F4A7C15ull | 1;
    return 0;
}

#endif
