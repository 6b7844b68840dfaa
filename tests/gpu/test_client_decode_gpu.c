/* libkvstash_cuda (client/include/kvstash_cuda.h) against the CPU reference decode: for each
 * codec with kernels, blocks encoded on the CPU (kvs_block_encode) from random and
 * adversarial data, full and partial, are decoded on the GPU straight into device memory
 * and must equal kvs_block_decode's output: byte for byte for `none`, within one fp16 ulp
 * per element for the lossy codecs (the kernels' documented contract, test_codecs_gpu.c).
 * Damaged blocks (a flipped byte: KVS_EDATALOSS), a short buffer (KVS_E2BIG) and a block of
 * another layout (KVS_EPROTO) are refused before any launch. Exits 77 (skipped) where the
 * build has no CUDA or the machine no GPU.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/codec/codec.h"
#include "kvstash_cuda.h"
#include "tests/support/kvs_test.h"

#ifndef KVS_HAVE_CUDA
int main(void)
{
    printf("test_client_decode_gpu: this build has no CUDA: skipped\n");
    return 77;
}
#else
#include <cuda_runtime.h>

static int failures;

#define FAIL(...)                                                                                  \
    do {                                                                                           \
        fprintf(stderr, "FAIL: " __VA_ARGS__);                                                     \
        fputc('\n', stderr);                                                                       \
        failures++;                                                                                \
    } while (0)

/* Largest distance in units in the last place between two fp16 arrays (bit patterns of
 * finite values are monotonic per sign). */
static unsigned max_ulp(const uint16_t *a, const uint16_t *b, size_t n)
{
    unsigned worst = 0;
    for (size_t i = 0; i < n; i++) {
        int x = a[i] & 0x8000 ? -(int)(a[i] & 0x7fff) : (int)a[i];
        int y = b[i] & 0x8000 ? -(int)(b[i] & 0x7fff) : (int)b[i];
        unsigned d = (unsigned)(x > y ? x - y : y - x);
        if (d > worst)
            worst = d;
    }
    return worst;
}

static void one(const char *codec, uint32_t t, int kind)
{
    kvs_ns_spec s = kvs_test_spec(4, 2, 128, 16, KVS_DTYPE_FP16, codec, codec, 11);
    size_t n = (size_t)s.layers * 2 * t * s.kv_heads * s.head_dim;
    uint16_t *raw = kvs_test_gauss_data(n, 1000 + t + (uint64_t)kind, 1.0, KVS_DTYPE_FP16);
    if (kind == 1) /* an outlier channel, as real keys have */
        for (size_t i = 7; i < n; i += s.head_dim)
            raw[i] = 0x5a00; /* 192 */
    if (kind == 2)           /* all zeros */
        memset(raw, 0, n * 2);
    kvs_codec *k = kvs_test_codec(&s, KVS_KEYS, NULL), *v = kvs_test_codec(&s, KVS_VALUES, NULL);
    size_t cap = kvs_block_encoded_max(k, v, t), len = 0;
    uint8_t *enc = malloc(cap);
    uint16_t *ref = malloc(n * 2), *got = malloc(n * 2);
    kvs_err err;
    if (kvs_block_encode(k, v, 7, t, raw, enc, cap, &len, &err) ||
        kvs_block_decode(k, v, enc, len, 0, s.layers, ref, &err)) {
        FAIL("%s t=%u: CPU reference: %s", codec, t, err.msg);
        goto out;
    }
    kvs_cuda_decoder *d;
    if (kvs_cuda_decoder_create(NULL, "ns", &s, &d, &err)) {
        FAIL("%s: decoder: %s", codec, err.msg);
        goto out;
    }
    void *dev;
    cudaMalloc(&dev, n * 2);
    cudaMemset(dev, 0xff, n * 2); /* poisoned: every element must be written */
    cudaDeviceSynchronize();      /* the decoder's stream does not wait for the legacy one */
    kvs_get_result res;
    if (kvs_decode_block_cuda(d, enc, len, dev, n * 2, NULL, &res, &err)) {
        FAIL("%s t=%u: %s", codec, t, err.msg);
    } else {
        cudaMemcpy(got, dev, n * 2, cudaMemcpyDeviceToHost);
        unsigned u = max_ulp(ref, got, n);
        bool exact = strcmp(codec, "none") == 0;
        if (res.tokens != t || res.bytes != n * 2)
            FAIL("%s t=%u: result says %u tokens, %llu bytes", codec, t, res.tokens,
                 (unsigned long long)res.bytes);
        if (exact ? memcmp(ref, got, n * 2) != 0 : u > 1)
            FAIL("%s t=%u kind %d: GPU decode differs from the CPU's by %u ulp", codec, t, kind, u);
    }
    /* Refusals: nothing may be launched for them. */
    if (kvs_decode_block_cuda(d, enc, len, dev, n * 2 - 2, NULL, NULL, &err) != KVS_E2BIG)
        FAIL("%s: short buffer accepted", codec);
    enc[len / 2] ^= 0x40;
    if (kvs_decode_block_cuda(d, enc, len, dev, n * 2, NULL, NULL, &err) != KVS_EDATALOSS)
        FAIL("%s: damaged block not refused as DATA_LOSS (%s)", codec, err.msg);
    enc[len / 2] ^= 0x40;
    kvs_ns_spec other = kvs_test_spec(4, 1, 128, 16, KVS_DTYPE_FP16, codec, codec, 11);
    kvs_cuda_decoder *d2;
    if (kvs_cuda_decoder_create(NULL, "other", &other, &d2, &err) == 0) {
        if (kvs_decode_block_cuda(d2, enc, len, dev, n * 2, NULL, NULL, &err) == 0)
            FAIL("%s: a block of another layout was decoded", codec);
        kvs_cuda_decoder_destroy(d2);
    }
    cudaFree(dev);
    kvs_cuda_decoder_destroy(d);
out:
    kvs_codec_destroy(k);
    kvs_codec_destroy(v);
    free(raw);
    free(enc);
    free(ref);
    free(got);
}

int main(void)
{
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
        printf("test_client_decode_gpu: no GPU: skipped\n");
        return 77;
    }
    const char *codecs[] = {"none",       "fp8",        "kivi-2", "kivi-4",
                            "polarquant", "rotatekv-2", "squat-2"};
    const uint32_t tokens[] = {1, 5, 16}; /* one, partial, full */
    for (size_t c = 0; c < sizeof codecs / sizeof *codecs; c++)
        for (size_t t = 0; t < 3; t++)
            for (int kind = 0; kind < 3; kind++)
                one(codecs[c], tokens[t], kind);
    printf("test_client_decode_gpu: %d failures\n", failures);
    return failures ? 1 : 0;
}
#endif
