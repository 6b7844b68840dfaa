/* libkvstash_cuda (client/include/kvstash_cuda.h) against the CPU reference decode: for each
 * codec with kernels, blocks encoded on the CPU (kvs_block_encode) from random and
 * adversarial data, full and partial, are decoded on the GPU straight into device memory
 * and must equal kvs_block_decode's output: byte for byte for `none`, within one fp16 ulp
 * per element for the lossy codecs (the kernels' documented contract, test_codecs_gpu.c).
 * Damaged blocks (a flipped byte: KVS_EDATALOSS), a short buffer (KVS_E2BIG) and a block of
 * another layout (KVS_EPROTO) are refused before any launch. Batches (kvs_decode_blocks_cuda):
 * blocks of mixed token counts, a damaged block and a short buffer among good ones, and a
 * batch larger than one chunk (64 MiB of output), each block against its CPU decode. The
 * batches run with the encoded blocks in pageable memory (gathered on the host), in pinned
 * memory (copied whole and gathered on the device: a shared-memory region the worker
 * registered with CUDA) and alternating between the two (chunks split where the kind
 * changes), and in the slots of one pinned arena, in order (consecutive blocks copied to
 * the device together: fewer copies than blocks) and in reverse (one copy each); batches of
 * 8 MiB and more verify their checksums on threads, smaller ones
 * inline, and both kinds must refuse the damaged block. Exits 77 (skipped) where the build
 * has no CUDA or the machine no GPU.
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

/* Where a batch's encoded blocks are: each in its own allocation (pageable, pinned, or
 * alternating), or in the slots of one pinned arena as in a shared-memory region, slot i
 * holding block i (SLOTS: consecutive blocks are copied to the device together) or block
 * nb-1-i (SLOTS_REVERSED: none are). */
enum { PAGEABLE, PINNED, ALTERNATE, SLOTS, SLOTS_REVERSED };
static const char *where_name[] = {"pageable", "pinned", "alternating", "slots", "reversed slots"};

static bool pinned_at(int where, size_t i)
{
    return where == PINNED || where >= SLOTS || (where == ALTERNATE && i % 2);
}

static size_t align16(size_t n)
{
    return (n + 15) & ~(size_t)15;
}

/* A batch of nb blocks of layout (L, H, 128) and codec: most of 16 tokens, a run of 5 in the
 * middle (another chunk), block 3 damaged, block 4 given a buffer one element short; the
 * encoded blocks in memory of kind `where`. */
static void batch(const char *codec, uint32_t L, uint32_t H, size_t nb, int where)
{
    kvs_ns_spec s = kvs_test_spec(L, H, 128, 16, KVS_DTYPE_FP16, codec, codec, 11);
    kvs_codec *k = kvs_test_codec(&s, KVS_KEYS, NULL), *v = kvs_test_codec(&s, KVS_VALUES, NULL);
    size_t full = (size_t)L * 2 * 16 * H * 128; /* elements of a 16-token block */
    kvs_cuda_block *bl = calloc(nb, sizeof *bl);
    uint16_t **ref = calloc(nb, sizeof *ref);
    uint8_t **enc = calloc(nb, sizeof *enc);
    size_t *elems = calloc(nb, sizeof *elems);
    kvs_err err;
    kvs_cuda_decoder *d = NULL;
    /* Slots: one pinned arena, a slot of the largest encoded size per block (a region's). */
    size_t slot = align16(kvs_block_encoded_max(k, v, 16));
    uint8_t *arena = NULL;
    if (where >= SLOTS && cudaHostAlloc((void **)&arena, nb * slot, cudaHostAllocDefault)) {
        FAIL("%s batch: cudaHostAlloc of the slots", codec);
        goto out;
    }
    if (kvs_cuda_decoder_create(NULL, "ns", &s, &d, &err)) {
        FAIL("%s batch: decoder: %s", codec, err.msg);
        goto out;
    }
    for (size_t i = 0; i < nb; i++) {
        uint32_t t = i >= nb / 2 && i < nb / 2 + 3 ? 5 : 16;
        size_t n = (size_t)L * 2 * t * H * 128, cap = kvs_block_encoded_max(k, v, t), len = 0;
        uint16_t *raw = kvs_test_gauss_data(n, 500 + i, 1.0, KVS_DTYPE_FP16);
        if (where >= SLOTS) {
            enc[i] = arena + (where == SLOTS ? i : nb - 1 - i) * slot;
        } else if (pinned_at(where, i)) {
            if (cudaHostAlloc((void **)&enc[i], cap, cudaHostAllocDefault) != cudaSuccess) {
                FAIL("%s batch: cudaHostAlloc", codec);
                enc[i] = NULL;
                goto out;
            }
        } else {
            enc[i] = malloc(cap);
        }
        ref[i] = malloc(n * 2);
        elems[i] = n;
        if (kvs_block_encode(k, v, 7, t, raw, enc[i], cap, &len, &err) ||
            kvs_block_decode(k, v, enc[i], len, 0, L, ref[i], &err))
            FAIL("%s batch %zu: CPU reference: %s", codec, i, err.msg);
        free(raw);
        bl[i] = (kvs_cuda_block){.enc = enc[i], .len = len, .cap = n * 2};
        if (cudaMalloc(&bl[i].raw_dev, full * 2) != cudaSuccess) {
            FAIL("%s batch: cudaMalloc", codec);
            goto out;
        }
        cudaMemset(bl[i].raw_dev, 0xff, full * 2);
    }
    if (nb > 4) {
        enc[3][bl[3].len / 2] ^= 0x40;
        bl[4].cap -= 2;
    }
    cudaDeviceSynchronize();
    kvs_cuda_decoder_stats before, after;
    kvs_cuda_decoder_stats_get(d, &before);
    if (kvs_decode_blocks_cuda(d, bl, nb, NULL, &err)) {
        FAIL("%s batch of %zu (%s): %s", codec, nb, where_name[where], err.msg);
        goto out;
    }
    /* The path each block took (the stats): the pinned ones by DMA and device gather, and
     * the checksums on threads exactly for the batch of 8 MiB and more. */
    kvs_cuda_decoder_stats_get(d, &after);
    size_t bytes = 0;
    for (size_t i = 0; i < nb; i++)
        bytes += bl[i].len;
    uint64_t decoded = after.blocks - before.blocks,
             pinned = after.blocks_pinned - before.blocks_pinned,
             hashed = after.blocks_hashed_threads - before.blocks_hashed_threads,
             copies = after.pinned_copies - before.pinned_copies;
    /* Copies to the device: one per block from separate allocations at most, one per block
     * from slots in reverse order (none follows the one before it), and from slots in
     * order, where the full blocks fill their slots to within an eighth, at most one per
     * half of the blocks (a span ends where a chunk does, at the 5-token run and at the
     * damaged and short blocks, which are left out). */
    size_t min_len = SIZE_MAX, max_gap = 0; /* over the decoded full blocks */
    for (size_t i = 0; i < nb; i++)
        if (bl[i].rc == 0 && elems[i] == full) {
            min_len = bl[i].len < min_len ? bl[i].len : min_len;
            max_gap = slot - bl[i].len > max_gap ? slot - bl[i].len : max_gap;
        }
    bool full_slots = max_gap <= min_len / 8;
    if (copies > pinned || (where == SLOTS_REVERSED && copies != pinned) ||
        (where == SLOTS && full_slots && copies * 2 > pinned))
        FAIL("%s batch (%s): %llu pinned blocks in %llu copies", codec, where_name[where],
             (unsigned long long)pinned, (unsigned long long)copies);
    if (decoded < nb - 2 || (where >= PINNED && where != ALTERNATE && pinned != decoded) ||
        (where == PAGEABLE && pinned != 0) ||
        (where == ALTERNATE && (pinned == 0 || pinned == decoded)))
        FAIL("%s batch (%s): %llu blocks decoded, %llu of them from pinned memory", codec,
             where_name[where], (unsigned long long)decoded, (unsigned long long)pinned);
    if (hashed != (bytes >= (8u << 20) ? nb : 0))
        FAIL("%s batch of %zu bytes: %llu checksums on threads", codec, bytes,
             (unsigned long long)hashed);
    uint16_t *got = malloc(full * 2);
    bool exact = strcmp(codec, "none") == 0;
    for (size_t i = 0; i < nb; i++) {
        if (nb > 4 && i == 3) {
            if (bl[i].rc != KVS_EDATALOSS)
                FAIL("%s batch (%s): damaged block: rc %d (%s)", codec, where_name[where], bl[i].rc,
                     bl[i].msg);
            continue;
        }
        if (nb > 4 && i == 4) {
            if (bl[i].rc != KVS_E2BIG)
                FAIL("%s batch: short buffer: rc %d (%s)", codec, bl[i].rc, bl[i].msg);
            continue;
        }
        if (bl[i].rc) {
            FAIL("%s batch %zu: %s", codec, i, bl[i].msg);
            continue;
        }
        cudaMemcpy(got, bl[i].raw_dev, full * 2, cudaMemcpyDeviceToHost);
        unsigned u = max_ulp(ref[i], got, elems[i]);
        if (bl[i].res.bytes != elems[i] * 2)
            FAIL("%s batch %zu: result says %llu bytes", codec, i,
                 (unsigned long long)bl[i].res.bytes);
        if (exact ? memcmp(ref[i], got, elems[i] * 2) != 0 : u > 1)
            FAIL("%s batch %zu (L=%u, %s): differs from the CPU decode by %u ulp", codec, i, L,
                 where_name[where], u);
        for (size_t j = elems[i]; j < full; j++)
            if (got[j] != 0xffff) {
                FAIL("%s batch %zu: written past its block at element %zu", codec, i, j);
                break;
            }
    }
    free(got);
out:
    for (size_t i = 0; i < nb; i++) {
        if (bl)
            cudaFree(bl[i].raw_dev);
        if (where >= SLOTS)
            ; /* the arena's */
        else if (pinned_at(where, i))
            cudaFreeHost(enc[i]);
        else
            free(enc[i]);
        free(ref[i]);
    }
    cudaFreeHost(arena);
    kvs_cuda_decoder_destroy(d);
    kvs_codec_destroy(k);
    kvs_codec_destroy(v);
    free(bl);
    free(ref);
    free(enc);
    free(elems);
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
    for (size_t c = 0; c < sizeof codecs / sizeof *codecs; c++) {
        for (int where = PAGEABLE; where <= SLOTS_REVERSED; where++) {
            batch(codecs[c], 4, 2, 23, where);
            batch(codecs[c], 32, 8, 40, where); /* 2 MiB blocks: 80 MiB, more than a chunk */
        }
    }
    printf("test_client_decode_gpu: %d failures\n", failures);
    return failures ? 1 : 0;
}
#endif
