/* GPU codec throughput (issue 4 benchmark; not a test).
 *
 * Layout Llama-3-8B-like: L=32 layers, H=8 kv-heads, D=128, T=16 tokens per block, fp16.
 * A block has 2L sections (K and V of each layer); a batch of B blocks is B*L sections per
 * codec (keys and values are launched separately, as the engine will).
 *
 * For each codec with kernels and each batch size (1, 16, 256, 4096 blocks):
 *   - encode and decode kernel time, median of repeats, CUDA events, inputs rotated among
 *     several copies so that large batches stream from HBM and small ones are not all L2;
 *   - throughput in GB/s of fp16 data (raw bytes / time) and "moved" bandwidth (bytes
 *     read + bytes written, i.e. raw + encoded) as a fraction of the device-to-device copy
 *     bandwidth measured in the same run (cudaMemcpyAsync D2D of 1 GiB, read + write);
 *   - end-to-end latency of one 16-token block on a stream: H2D from pinned memory,
 *     encode K and V, D2H of the encoded bytes (and the reverse for decode).
 * Prints a markdown table. Exits 77 without CUDA or a GPU.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/codec/codec.h"
#include "gpu/codec/codec_cuda.h"
#include "gpu/codec/codec_squat.h"
#include "gpu/codec/half.h"

#ifndef KVS_HAVE_CUDA
int main(void)
{
    printf("bench_gpu: this build has no CUDA\n");
    return 77;
}
#else
#include "tests/support/kvs_gpu_test.h"

#define CK CHECK_CUDA

enum { L = 32, H = 8, D = 128, T = 16, REPEATS = 15 };

static int cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

static float median(float *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_float);
    return v[n / 2];
}

/* Device-to-device copy bandwidth, bytes read + written per second. */
static double copy_bandwidth(cudaStream_t st)
{
    size_t n = (size_t)1 << 30;
    void *a, *b;
    CK(cudaMalloc(&a, n));
    CK(cudaMalloc(&b, n));
    CK(cudaMemsetAsync(a, 1, n, st));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    float ms[REPEATS];
    for (int r = -2; r < REPEATS; r++) {
        CK(cudaEventRecord(e0, st));
        CK(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice, st));
        CK(cudaEventRecord(e1, st));
        CK(cudaEventSynchronize(e1));
        if (r >= 0)
            CK(cudaEventElapsedTime(&ms[r], e0, e1));
    }
    cudaFree(a);
    cudaFree(b);
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    return 2.0 * (double)n / (median(ms, REPEATS) * 1e-3);
}

/* Section lengths (RotateKV's vary with its sinks): encode writes them, decode reads them. */
static uint32_t *d_lens;

typedef struct result {
    double enc_ms, dec_ms;
} result;

/* Times encode and decode of `blocks` blocks' worth of one codec's sections. */
static result time_batch(kvs_codec *c, uint32_t blocks, uint16_t *d_raw_pool, size_t pool_elems,
                         uint8_t *d_enc_pool, size_t enc_pool, uint32_t *d_layers, uint16_t *d_out,
                         cudaStream_t st)
{
    uint32_t n = blocks * L;
    size_t sec_elems = (size_t)T * H * D, stride = kvs_codec_section_max(c, T);
    size_t raw_bytes = n * sec_elems, enc_bytes = n * stride;
    /* Rotate among as many copies as fit in the pools (at least one). */
    int copies = (int)(pool_elems / raw_bytes);
    if (copies > (int)(enc_pool / enc_bytes))
        copies = (int)(enc_pool / enc_bytes);
    if (copies < 1)
        copies = 1;
    if (copies > 8)
        copies = 8;
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    float enc[REPEATS], dec[REPEATS];
    kvs_err err;
    for (int r = -2; r < REPEATS; r++) {
        int k = (r + 2) % copies;
        kvs_cuda_sections s = {.n = n,
                               .t = T,
                               .layer = d_layers,
                               .raw = d_raw_pool + (size_t)k * raw_bytes,
                               .raw_out = d_out,
                               .enc = d_enc_pool + (size_t)k * enc_bytes,
                               .enc_out = d_enc_pool + (size_t)k * enc_bytes,
                               .stride = stride,
                               .bad = NULL,
                               .len_out = d_lens,
                               .len = d_lens};
        CK(cudaEventRecord(e0, st));
        if (kvs_codec_encode_cuda(c, &s, st, &err)) {
            fprintf(stderr, "encode: %s\n", err.msg);
            exit(1);
        }
        CK(cudaEventRecord(e1, st));
        CK(cudaEventSynchronize(e1));
        if (r >= 0)
            CK(cudaEventElapsedTime(&enc[r], e0, e1));
        CK(cudaEventRecord(e0, st));
        if (kvs_codec_decode_cuda(c, &s, st, &err)) {
            fprintf(stderr, "decode: %s\n", err.msg);
            exit(1);
        }
        CK(cudaEventRecord(e1, st));
        CK(cudaEventSynchronize(e1));
        if (r >= 0)
            CK(cudaEventElapsedTime(&dec[r], e0, e1));
    }
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    return (result){median(enc, REPEATS), median(dec, REPEATS)};
}

/* One block end to end: H2D (pinned) + encode K and V + D2H, and the reverse. */
static void one_block_latency(kvs_codec *k, kvs_codec *v, uint32_t *d_layers, cudaStream_t st,
                              double *enc_us, double *dec_us)
{
    size_t sec = (size_t)T * H * D, raw = 2 * L * sec * 2;
    size_t sk = kvs_codec_section_max(k, T), sv = kvs_codec_section_max(v, T);
    size_t encb = L * (sk + sv);
    uint16_t *h_raw, *d_raw;
    uint8_t *h_enc, *d_enc;
    CK(cudaMallocHost((void **)&h_raw, raw));
    CK(cudaMallocHost((void **)&h_enc, encb));
    CK(cudaMalloc((void **)&d_raw, raw));
    CK(cudaMalloc((void **)&d_enc, encb));
    for (size_t i = 0; i < raw / 2; i++)
        h_raw[i] = kvs_f32_to_fp16((float)((i * 2654435761u) % 2001) / 1000.0f - 1.0f);
    /* Keys first then values, [L][t][H][D] each, as the engine will stage them. */
    kvs_cuda_sections ks = {.n = L,
                            .t = T,
                            .layer = d_layers,
                            .raw = d_raw,
                            .raw_out = d_raw,
                            .enc = d_enc,
                            .enc_out = d_enc,
                            .stride = sk,
                            .len_out = d_lens,
                            .len = d_lens};
    kvs_cuda_sections vs = {.n = L,
                            .t = T,
                            .layer = d_layers,
                            .raw = d_raw + L * sec,
                            .raw_out = d_raw + L * sec,
                            .enc = d_enc + L * sk,
                            .enc_out = d_enc + L * sk,
                            .stride = sv,
                            .len_out = d_lens + L,
                            .len = d_lens + L};
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    float te[REPEATS], td[REPEATS];
    kvs_err err;
    for (int r = -3; r < REPEATS; r++) {
        CK(cudaEventRecord(e0, st));
        CK(cudaMemcpyAsync(d_raw, h_raw, raw, cudaMemcpyHostToDevice, st));
        if (kvs_codec_encode_cuda(k, &ks, st, &err) || kvs_codec_encode_cuda(v, &vs, st, &err)) {
            fprintf(stderr, "encode: %s\n", err.msg);
            exit(1);
        }
        CK(cudaMemcpyAsync(h_enc, d_enc, encb, cudaMemcpyDeviceToHost, st));
        CK(cudaEventRecord(e1, st));
        CK(cudaEventSynchronize(e1));
        if (r >= 0)
            CK(cudaEventElapsedTime(&te[r], e0, e1));
        CK(cudaEventRecord(e0, st));
        CK(cudaMemcpyAsync(d_enc, h_enc, encb, cudaMemcpyHostToDevice, st));
        if (kvs_codec_decode_cuda(k, &ks, st, &err) || kvs_codec_decode_cuda(v, &vs, st, &err)) {
            fprintf(stderr, "decode: %s\n", err.msg);
            exit(1);
        }
        CK(cudaMemcpyAsync(h_raw, d_raw, raw, cudaMemcpyDeviceToHost, st));
        CK(cudaEventRecord(e1, st));
        CK(cudaEventSynchronize(e1));
        if (r >= 0)
            CK(cudaEventElapsedTime(&td[r], e0, e1));
    }
    *enc_us = median(te, REPEATS) * 1e3;
    *dec_us = median(td, REPEATS) * 1e3;
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    cudaFreeHost(h_raw);
    cudaFreeHost(h_enc);
    cudaFree(d_raw);
    cudaFree(d_enc);
}

int main(void)
{
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
        printf("bench_gpu: no CUDA device\n");
        return 77;
    }
    struct cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    cudaStream_t st;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    double bw = copy_bandwidth(st);
    printf("device: %s, %d SMs, L2 %d MiB; D2D copy %.0f GB/s (read + write)\n", prop.name,
           prop.multiProcessorCount, prop.l2CacheSize >> 20, bw / 1e9);
    printf("layout L=%d H=%d D=%d T=%d fp16; sections per codec launch = blocks x %d\n\n", L, H, D,
           T, L);

    /* Pools: raw 6 GiB of random fp16 (rotated copies), encoded of the same size. */
    size_t pool_elems = (size_t)3 << 30, enc_pool = (size_t)6 << 30;
    uint16_t *d_raw, *d_out;
    uint8_t *d_enc;
    uint32_t *d_layers;
    CK(cudaMalloc((void **)&d_raw, pool_elems * 2));
    CK(cudaMalloc((void **)&d_enc, enc_pool));
    CK(cudaMalloc((void **)&d_out, (size_t)4096 * L * T * H * D * 2));
    size_t chunk = (size_t)16 << 20;
    uint16_t *h = malloc(chunk * 2);
    uint64_t x = 88172645463325252ull;
    for (size_t i = 0; i < chunk; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        h[i] = kvs_f32_to_fp16((float)((int64_t)(x >> 40) - (1 << 23)) / (float)(1 << 22));
    }
    for (size_t off = 0; off < pool_elems; off += chunk)
        CK(cudaMemcpy(d_raw + off, h, chunk * 2, cudaMemcpyHostToDevice));
    free(h);
    uint32_t *layers = malloc(4096 * L * sizeof *layers);
    for (size_t i = 0; i < (size_t)4096 * L; i++)
        layers[i] = (uint32_t)(i % L);
    CK(cudaMalloc((void **)&d_layers, 4096 * L * sizeof *layers));
    CK(cudaMemcpy(d_layers, layers, 4096 * L * sizeof *layers, cudaMemcpyHostToDevice));
    free(layers);
    CK(cudaMalloc((void **)&d_lens, 4096 * L * sizeof *d_lens));

    printf("| codec | blocks | enc ms | enc GB/s fp16 | enc moved/copy | dec ms | dec GB/s fp16 "
           "| dec moved/copy |\n|---|---|---|---|---|---|---|---|\n");
    char names[256];
    kvs_codec_names(names, sizeof names);
    char lat[4096] = "";
    for (char *tok = strtok(names, ", "); tok; tok = strtok(NULL, ", ")) {
        kvs_ns_spec s;
        memset(&s, 0, sizeof s);
        snprintf(s.name, sizeof s.name, "bench");
        s.layers = L;
        s.kv_heads = H;
        s.head_dim = D;
        s.block_tokens = T;
        s.dtype = KVS_DTYPE_FP16;
        s.seed = 1;
        snprintf(s.key_codec, sizeof s.key_codec, "%s", tok);
        snprintf(s.value_codec, sizeof s.value_codec, "%s", tok);
        kvs_codec *k, *v;
        kvs_err err;
        /* SQuat keys with a query subspace (state from random queries, 2 query heads per
         * kv-head): with state version 0 they would be plain KIVI. */
        kvs_codec_state st_k = {0}, *stp = NULL;
        void *st_bytes = NULL;
        if (strncmp(tok, "squat", 5) == 0) {
            uint32_t nq = 64, qh = 2 * H;
            size_t qn = (size_t)L * nq * qh * D;
            uint16_t *q = malloc(qn * 2);
            for (size_t i = 0; i < qn; i++)
                q[i] = kvs_f32_to_fp16((float)((i * 2654435761u) % 2001) / 1000.0f - 1.0f);
            size_t len = 0;
            if (q && kvs_squat_state_from_queries(&s, qh, q, nq, &st_bytes, &len, &err) == 0) {
                st_k = (kvs_codec_state){.version = 1, .data = st_bytes, .len = len};
                stp = &st_k;
            }
            free(q);
        }
        int crc = kvs_codec_create(&s, KVS_KEYS, stp, &k, &err);
        free(st_bytes);
        if (crc)
            continue;
        if (kvs_codec_create(&s, KVS_VALUES, NULL, &v, &err)) {
            kvs_codec_destroy(k);
            continue;
        }
        if (!kvs_codec_cuda_supported(k) || !kvs_codec_cuda_supported(v) ||
            kvs_codec_cuda_prepare(k, &err) || kvs_codec_cuda_prepare(v, &err)) {
            kvs_codec_destroy(k);
            kvs_codec_destroy(v);
            continue;
        }
        static const uint32_t batches[] = {1, 16, 256, 4096};
        for (int b = 0; b < 4; b++) {
            result rk =
                time_batch(k, batches[b], d_raw, pool_elems, d_enc, enc_pool, d_layers, d_out, st);
            result rv =
                time_batch(v, batches[b], d_raw, pool_elems, d_enc, enc_pool, d_layers, d_out, st);
            double raw = (double)batches[b] * L * T * H * D * 2 * 2; /* K and V */
            double encb = (double)batches[b] * L *
                          (kvs_codec_section_max(k, T) + kvs_codec_section_max(v, T));
            double te = rk.enc_ms + rv.enc_ms, td = rk.dec_ms + rv.dec_ms;
            printf("| %s | %u | %.4f | %.0f | %.2f | %.4f | %.0f | %.2f |\n", tok, batches[b], te,
                   raw / (te * 1e-3) / 1e9, (raw + encb) / (te * 1e-3) / bw, td,
                   raw / (td * 1e-3) / 1e9, (raw + encb) / (td * 1e-3) / bw);
        }
        double eu, du;
        one_block_latency(k, v, d_layers, st, &eu, &du);
        size_t n = strlen(lat);
        snprintf(lat + n, sizeof lat - n, "| %s | %.1f | %.1f |\n", tok, eu, du);
        kvs_codec_destroy(k);
        kvs_codec_destroy(v);
    }
    printf("\nOne 16-token block end to end on a stream (H2D pinned + K and V kernels + D2H), "
           "median µs:\n\n| codec | encode µs | decode µs |\n|---|---|---|\n%s",
           lat);
    cudaFree(d_raw);
    cudaFree(d_enc);
    cudaFree(d_out);
    cudaFree(d_layers);
    cudaStreamDestroy(st);
    return 0;
}
#endif
