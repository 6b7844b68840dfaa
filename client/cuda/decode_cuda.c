/* libkvstash_cuda: see include/kvstash_cuda.h.
 *
 * Blocks are decoded in chunks of up to CHUNK_RAW bytes of output that share their codecs
 * and token count (a restore's blocks all do), with two kernel launches per chunk whatever
 * its size (every K section, then every V section), as the daemon's engine batches:
 *   1. on the host, each block's checksum and header are checked (kvs_block_parse) and its
 *      sections gathered into pinned staging in the kernels' layout: K sections of every
 *      block and layer [m][L] at stride sk, then the V sections at stride sv, then their
 *      lengths (variable for RotateKV);
 *   2. one host-to-device copy of that staging, the K and V launches into a device raw
 *      buffer [2][m][L][t*H*D];
 *   3. per block, two strided copies (K, V) into its place in the caller's layout
 *      [L][2][t][H][D], all of the chunk's in one batched-copies launch (gpu/codec/copies.h;
 *      their table rides in the same staging copy).
 * Two host stagings alternate, so gathering chunk i+1 overlaps the GPU work of chunk i
 * (an event says when the copy out of a staging is done). One stream orders everything;
 * the call returns once the stream is drained, so the caller's buffers are final.
 *
 * Blocks in pinned host memory (a shared-memory region the worker registered with CUDA:
 * the daemon wrote them there) skip the host gather, whose memcpy bounded a restore at
 * host memory speed on one core: the blocks are copied to the device as they are, in
 * spans of consecutive blocks (a region's slots: one DMA for the chunk, see span_joins),
 * and their sections are gathered there by one batched-copies launch; only the section
 * lengths and the copy table go through the staging. A chunk is all
 * pinned or all not (the pinned test is per block, cudaPointerGetAttributes).
 *
 * Checksums: a batch of at least HASH_THREADED_MIN encoded bytes has its blocks' checksums
 * verified by up to HASH_THREADS threads while this thread checks the headers and runs
 * the chunks (XXH3 over hundreds of MiB on one core took longer than the whole GPU
 * work); a block whose checksum fails then gets KVS_EDATALOSS after it was decoded
 * (its destination's contents are undefined, as for any failed block). Smaller batches
 * verify each block before its decode, on this thread.
 */
#include "kvstash_cuda.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gpu/base/mem.h"
#include "gpu/codec/codec.h"
#include "gpu/codec/codec_cuda.h"
#include "gpu/codec/copies.h"
#include "gpu/codec/format.h"

#ifdef KVS_HAVE_CUDA
#include <cuda_runtime.h>

/* Codecs per state version the decoder has seen (a namespace holds a few). */
#define DECODER_CODECS 32

typedef struct codec_slot {
    uint32_t version;
    kvs_codec *codec;
} codec_slot;

struct kvs_cuda_decoder {
    kvs_client *client; /* borrowed, may be NULL */
    char ns[KVS_NAME_MAX + 1];
    kvs_ns_spec spec;
    codec_slot codecs[2][DECODER_CODECS]; /* [keys, values] */
    unsigned n_codecs[2];
    kvs_codec *alt[KVS_ENC_ROLES][2]; /* other roles' codecs per side (kvs_enc: fallback,
                                       * host, disk), made at their first block */
    cudaStream_t own;
    /* Staging, grown on demand (a chunk needs at most CHUNK_RAW of raw output, and at least
     * one block): enc_cap bytes of encoded sections and lengths on each side, raw_cap
     * bytes of decoded sections on the device. */
    uint8_t *h_enc[2]; /* pinned, alternating between chunks */
    cudaEvent_t h_free[2];
    bool h_used[2]; /* h_free[i] was recorded */
    int h_next;     /* the staging the next chunk gathers into */
    uint8_t *d_enc; /* sections [n][sk], [n][sv], lengths, then (pinned chunks) the copies */
    size_t enc_cap;
    uint8_t *d_blk; /* pinned chunks: their blocks' spans as they are, each at a 16-byte boundary
                     * (align16) */
    size_t blk_cap;
    uint16_t *d_raw;
    size_t raw_cap;
    uint32_t *layers_dev; /* [max_sections]: l for section (b, l), the kernels' layer index */
    size_t layers_cap;    /* entries */
    kvs_cuda_decoder_stats stats;
};

/* Raw output a chunk decodes at most before its blocks are copied out (the device raw
 * staging's size unless one block is larger). */
#define CHUNK_RAW (64u << 20)

/* Checksums by threads from this many encoded bytes in a call (below, thread start-up is
 * not worth it), with at most this many threads (memory bandwidth, not cores, bounds them). */
#define HASH_THREADED_MIN (8u << 20)
#define HASH_THREADS 8

static int cuda_err(kvs_err *err, cudaError_t e, const char *what)
{
    return kvs_err_set(err, KVS_EINTERNAL, "decode on the GPU: %s: %s", what,
                       cudaGetErrorString(e));
}

/* The codec for (kv, version), created (tables uploaded) the first time. */
static int codec_at(kvs_cuda_decoder *d, kvs_kv kv, uint32_t version, const kvs_codec **out,
                    kvs_err *err)
{
    for (unsigned i = 0; i < d->n_codecs[kv]; i++)
        if (d->codecs[kv][i].version == version) {
            *out = d->codecs[kv][i].codec;
            return 0;
        }
    if (d->n_codecs[kv] == DECODER_CODECS)
        return kvs_err_set(err, KVS_ENOSPC, "decode on the GPU: more than %d state versions",
                           DECODER_CODECS);
    kvs_codec_state st = {.version = version};
    int rc = 0;
    if (version) {
        if (!d->client)
            return kvs_err_set(err, KVS_ENOTSUP,
                               "decode on the GPU: the block uses learned codec state version "
                               "%u and the decoder has no client to fetch it",
                               version);
        rc = kvs_client_codec_state(d->client, d->ns, kv == KVS_VALUES, version, &st.data, &st.len,
                                    err);
        if (rc)
            return rc;
    }
    kvs_codec *c;
    if ((rc = kvs_codec_create(&d->spec, kv, &st, &c, err)))
        return rc;
    if (!kvs_codec_cuda_supported(c)) {
        kvs_codec_destroy(c);
        return kvs_err_set(err, KVS_ENOTSUP,
                           "decode on the GPU: no kernels for %s codec '%s' "
                           "with head_dim %u",
                           kv == KVS_KEYS ? "key" : "value",
                           kv == KVS_KEYS ? d->spec.key_codec : d->spec.value_codec,
                           d->spec.head_dim);
    }
    if ((rc = kvs_codec_cuda_prepare(c, err))) {
        kvs_codec_destroy(c);
        return rc;
    }
    d->codecs[kv][d->n_codecs[kv]++] = (codec_slot){version, c};
    *out = c;
    return 0;
}

/* The codec of side kv for role `role` of a block (gpu/codec/codec.h kvs_enc): the own
 * codec of its state version (codec_at), or the namespace's fallback or tier codec (the
 * block's header says which), made and uploaded once. */
static int role_at(kvs_cuda_decoder *d, kvs_kv kv, kvs_enc role, uint32_t version,
                   const kvs_codec **out, kvs_err *err)
{
    if (role == KVS_ENC_OWN)
        return codec_at(d, kv, version, out, err);
    if (!d->alt[role][kv]) {
        kvs_codec *c;
        int rc = kvs_codec_create_enc(&d->spec, kv, role, NULL, &c, err);
        if (rc)
            return rc;
        if (!kvs_codec_cuda_supported(c)) {
            kvs_codec_destroy(c);
            return kvs_err_set(
                err, KVS_ENOTSUP, "decode on the GPU: no kernels for %s '%s' with head_dim %u",
                kvs_enc_field(kv, role), kvs_spec_enc_codec(&d->spec, kv, role), d->spec.head_dim);
        }
        if ((rc = kvs_codec_cuda_prepare(c, err))) {
            kvs_codec_destroy(c);
            return rc;
        }
        d->alt[role][kv] = c;
    }
    *out = d->alt[role][kv];
    return 0;
}

int kvs_cuda_decoder_create(kvs_client *c, const char *ns, const kvs_ns_spec *spec,
                            kvs_cuda_decoder **out, kvs_err *err)
{
    kvs_err_clear(err);
    if (!ns || !spec || !out)
        return kvs_err_set(err, KVS_EINVAL, "decoder: NULL argument");
    int rc = kvs_spec_validate(spec, err);
    if (rc)
        return rc;
    kvs_cuda_decoder *d = kvs_xcalloc(1, sizeof *d);
    d->client = c;
    snprintf(d->ns, sizeof d->ns, "%s", ns);
    d->spec = *spec;
    cudaError_t e;
    if ((e = cudaStreamCreateWithFlags(&d->own, cudaStreamNonBlocking)) != cudaSuccess ||
        (e = cudaEventCreateWithFlags(&d->h_free[0], cudaEventDisableTiming)) != cudaSuccess ||
        (e = cudaEventCreateWithFlags(&d->h_free[1], cudaEventDisableTiming)) != cudaSuccess) {
        rc = cuda_err(err, e, "setup");
        kvs_cuda_decoder_destroy(d);
        return rc;
    }
    *out = d;
    return 0;
}

void kvs_cuda_decoder_destroy(kvs_cuda_decoder *d)
{
    if (!d)
        return;
    for (int kv = 0; kv < 2; kv++)
        for (unsigned i = 0; i < d->n_codecs[kv]; i++)
            kvs_codec_destroy(d->codecs[kv][i].codec);
    for (int r = 0; r < KVS_ENC_ROLES; r++)
        for (int kv = 0; kv < 2; kv++)
            kvs_codec_destroy(d->alt[r][kv]);
    for (int i = 0; i < 2; i++) {
        cudaFreeHost(d->h_enc[i]);
        if (d->h_free[i])
            cudaEventDestroy(d->h_free[i]);
    }
    cudaFree(d->d_enc);
    cudaFree(d->d_blk);
    cudaFree(d->d_raw);
    cudaFree(d->layers_dev);
    if (d->own)
        cudaStreamDestroy(d->own);
    free(d);
}

/* Checks block i (its header, checksum and buffer) and picks its codecs: 0, or the block's
 * error in err. */
static int check_block(kvs_cuda_decoder *d, const kvs_cuda_block *b, kvs_block_trust trust,
                       const kvs_codec **k, const kvs_codec **v, kvs_block_info *info,
                       unsigned *roles, uint64_t *need, kvs_err *err)
{
    if (!b->enc || !b->raw_dev)
        return kvs_err_set(err, KVS_EINVAL, "decode on the GPU: NULL enc or raw_dev");
    int rc = kvs_format_peek(b->enc, b->len, info, err);
    *roles = rc ? 0 : kvs_block_encodings(&d->spec, info);
    if (rc || (rc = role_at(d, KVS_KEYS, kvs_enc_side(*roles, KVS_KEYS), info->k_state, k, err)) ||
        (rc = role_at(d, KVS_VALUES, kvs_enc_side(*roles, KVS_VALUES), info->v_state, v, err)) ||
        (rc = kvs_block_parse(*k, *v, b->enc, b->len, trust, info, err)) ||
        (rc = kvs_spec_block_bytes(&d->spec, info->tokens, need, err)))
        return rc;
    if (*need > b->cap)
        return kvs_err_set(err, KVS_E2BIG,
                           "decode on the GPU: block needs %llu bytes, buffer has %zu",
                           (unsigned long long)*need, b->cap);
    return 0;
}

/* Where a chunk's section lengths start in its staging: after n K sections at stride sk and
 * n V sections at stride sv, aligned for the kernels' 4-byte reads. */
/* n rounded up to 16 bytes: the kernels' and the copies' aligned reads. */
static size_t align16(size_t n)
{
    return (n + 15) & ~(size_t)15;
}

static size_t lens_at(size_t n, size_t sk, size_t sv)
{
    return align16(n * (sk + sv));
}

/* Where a pinned chunk's copy table starts, after the lengths (host staging: at 0). */
static size_t table_at(size_t n)
{
    return align16(2 * n * sizeof(uint32_t));
}

/* Grows a device staging *p of *cap bytes to want (after the stream is done with it). */
static int grow_dev(void *p, size_t *cap, size_t want, cudaStream_t st, const char *what,
                    kvs_err *err)
{
    void **ptr = p;
    if (want <= *cap)
        return 0;
    cudaError_t e = cudaStreamSynchronize(st);
    if (e != cudaSuccess)
        return cuda_err(err, e, what);
    cudaFree(*ptr);
    *ptr = NULL;
    *cap = 0;
    if ((e = cudaMalloc(ptr, want)) != cudaSuccess)
        return cuda_err(err, e, what);
    *cap = want;
    return 0;
}

/* Grows the stagings to hold a chunk of `sections` sections (K and V each) of at most sk and
 * sv bytes, raw bytes of output, and (pinned chunks) blk bytes of whole blocks. The host
 * staging holds either the gathered sections and their lengths or the lengths and the copy
 * table; the device one both, so the sizes are those of the device's. */
static int reserve(kvs_cuda_decoder *d, size_t sections, size_t sk, size_t sv, size_t raw,
                   size_t blk, cudaStream_t st, kvs_err *err)
{
    cudaError_t e = cudaSuccess;
    /* Copies: two section gathers per section pair, two destination copies per block. */
    size_t enc = lens_at(sections, sk, sv) + table_at(sections) + 4 * sections * sizeof(kvs_copy2d);
    int rc = grow_dev(&d->d_blk, &d->blk_cap, blk, st, "block staging", err);
    if (rc || (rc = grow_dev(&d->d_raw, &d->raw_cap, raw, st, "raw staging", err)))
        return rc;
    if (enc > d->enc_cap) {
        if ((e = cudaStreamSynchronize(st)) != cudaSuccess)
            return cuda_err(err, e, "staging");
        for (int i = 0; i < 2; i++) {
            cudaFreeHost(d->h_enc[i]);
            d->h_enc[i] = NULL;
            d->h_used[i] = false;
        }
        cudaFree(d->d_enc);
        d->d_enc = NULL;
        d->enc_cap = 0;
        if ((e = cudaHostAlloc((void **)&d->h_enc[0], enc, cudaHostAllocDefault)) != cudaSuccess ||
            (e = cudaHostAlloc((void **)&d->h_enc[1], enc, cudaHostAllocDefault)) != cudaSuccess ||
            (e = cudaMalloc((void **)&d->d_enc, enc)) != cudaSuccess)
            return cuda_err(err, e, "encoded staging");
        d->enc_cap = enc;
    }
    if (sections > d->layers_cap) {
        if ((e = cudaStreamSynchronize(st)) != cudaSuccess)
            return cuda_err(err, e, "staging");
        uint32_t *h = kvs_trymalloc(sections * sizeof *h);
        if (!h)
            return kvs_err_set(err, KVS_ENOMEM, "decode on the GPU: out of memory");
        for (size_t i = 0; i < sections; i++)
            h[i] = (uint32_t)(i % d->spec.layers);
        cudaFree(d->layers_dev);
        d->layers_dev = NULL;
        d->layers_cap = 0;
        if ((e = cudaMalloc((void **)&d->layers_dev, sections * sizeof *h)) == cudaSuccess)
            /* On st, and waited for: a cudaMemcpy from pageable memory on the legacy
             * stream may still be landing when st's kernels (non-blocking) read it. */
            e = cudaMemcpyAsync(d->layers_dev, h, sections * sizeof *h, cudaMemcpyHostToDevice, st);
        if (e == cudaSuccess)
            e = cudaStreamSynchronize(st);
        free(h);
        if (e != cudaSuccess)
            return cuda_err(err, e, "layer table");
        d->layers_cap = sections;
    }
    return 0;
}

/* Pinned chunks copy their blocks to the device in spans: a block that starts at most
 * SPAN_GAP_MAX bytes (and at most an eighth of its length) after the previous block's end,
 * at the same offset modulo 16 from the span's start, joins its span, gap included. A
 * shared-memory region's consecutive slots then go in one DMA per chunk instead of one
 * per block (a few microseconds of driver time each: 512 blocks of an 8k prefix). */
#define SPAN_GAP_MAX (64u << 10)

static bool span_joins(const uint8_t *lo, const uint8_t *hi, const kvs_cuda_block *b)
{
    const uint8_t *enc = b->enc;
    size_t gap = (size_t)(enc - hi);
    return enc >= hi && (size_t)(enc - lo) % 16 == 0 && gap <= SPAN_GAP_MAX && gap <= b->len / 8;
}

/* Copies the span [lo, hi) holding blocks[first..end) to dev; where the runtime refuses
 * the whole span (memory between two pinned blocks that is not pinned itself: two
 * registrations side by side), each block alone. */
static int copy_span(kvs_cuda_decoder *d, kvs_cuda_block *const *blocks, size_t first, size_t end,
                     const uint8_t *lo, const uint8_t *hi, uint8_t *dev, cudaStream_t st,
                     kvs_err *err)
{
    cudaError_t e = cudaMemcpyAsync(dev, lo, (size_t)(hi - lo), cudaMemcpyHostToDevice, st);
    d->stats.pinned_copies++;
    if (e == cudaSuccess)
        return 0;
    (void)cudaGetLastError();
    d->stats.pinned_copies += end - first - 1;
    for (size_t b = first; b < end; b++) {
        const uint8_t *enc = blocks[b]->enc;
        if ((e = cudaMemcpyAsync(dev + (enc - lo), enc, blocks[b]->len, cudaMemcpyHostToDevice,
                                 st)) != cudaSuccess)
            return cuda_err(err, e, "copy of a block to the device");
    }
    return 0;
}

/* Decodes blocks[0..m) (checked, all of codecs k, v and t tokens; all in pinned host memory
 * or none) as one chunk on the decoder's stream, into each block's raw_dev. */
static int run_chunk(kvs_cuda_decoder *d, kvs_cuda_block *const *blocks, size_t m,
                     const kvs_codec *k, const kvs_codec *v, uint32_t t, bool pinned,
                     cudaStream_t st, kvs_err *err)
{
    const kvs_ns_spec *s = &d->spec;
    const uint32_t L = s->layers;
    size_t n = m * L; /* sections per side */
    size_t sk = kvs_codec_section_max(k, t), sv = kvs_codec_section_max(v, t);
    size_t sec = (size_t)t * s->kv_heads * s->head_dim; /* elements */
    /* Pinned: room for the spans, at most each block, the gap before it (an eighth of it,
     * span_joins) and a span's alignment. */
    size_t blk = 0;
    for (size_t b = 0; pinned && b < m; b++)
        blk += blocks[b]->len + blocks[b]->len / 8 + 16;
    d->stats.blocks += m;
    d->stats.blocks_pinned += pinned ? m : 0;
    int rc = reserve(d, n, sk, sv, 2 * n * sec * sizeof(uint16_t), blk, st, err);
    if (rc)
        return rc;
    /* The other staging than the last chunk's, once its own copy to the device is done. */
    int h = d->h_next;
    d->h_next ^= 1;
    cudaError_t e;
    if (d->h_used[h] && (e = cudaEventSynchronize(d->h_free[h])) != cudaSuccess)
        return cuda_err(err, e, "staging");
    /* The staging's layout is the device's: sections (gathered here unless pinned), their
     * lengths (K [n], then V [n]), then a table of copies: a pinned chunk's section gathers
     * from its blocks' copies in d_blk, then every chunk's copies into the destinations. */
    uint8_t *hk = d->h_enc[h];
    size_t lens_off = lens_at(n, sk, sv), table_off = lens_off + table_at(n);
    uint32_t *lens = (uint32_t *)(hk + lens_off);
    kvs_copy2d *table = (kvs_copy2d *)(hk + table_off);
    uint32_t copies = 0;
    size_t at = 0, first = 0;             /* the current span: its device offset, first block */
    const uint8_t *lo = NULL, *hi = NULL; /* ...and its host bytes */
    for (size_t b = 0; b < m; b++) {
        const uint8_t *enc = blocks[b]->enc;
        if (pinned && !(lo && span_joins(lo, hi, blocks[b]))) {
            if (lo && (rc = copy_span(d, blocks, first, b, lo, hi, d->d_blk + at, st, err)))
                return rc;
            at += lo ? align16((size_t)(hi - lo)) : 0;
            lo = enc, first = b;
        }
        if (pinned)
            hi = enc + blocks[b]->len;
        const uint8_t *dev = pinned ? d->d_blk + at + (enc - lo) : NULL; /* the block there */
        for (uint32_t l = 0; l < L; l++) {
            size_t i = b * L + l;
            for (unsigned kv = 0; kv < 2; kv++) {
                const uint8_t *p;
                size_t len;
                kvs_format_section(enc, l, kv, &p, &len);
                size_t to = kv ? n * sk + i * sv : i * sk;
                if (pinned)
                    kvs_copies_add(table, &copies, d->d_enc + to, len, dev + (p - enc), len, len,
                                   1);
                else
                    memcpy(hk + to, p, len);
                lens[kv * n + i] = (uint32_t)len;
            }
        }
    }
    if (lo && (rc = copy_span(d, blocks, first, m, lo, hi, d->d_blk + at, st, err)))
        return rc;
    /* Each block's K sections [L][sec] to its layout's K rows (pitch 2 sec), then V. */
    size_t row = sec * sizeof(uint16_t);
    uint32_t gathers = copies;
    for (size_t b = 0; b < m; b++)
        for (unsigned kv = 0; kv < 2; kv++)
            kvs_copies_add(table, &copies, (uint8_t *)blocks[b]->raw_dev + kv * row, 2 * row,
                           d->d_raw + (kv * n + b * L) * sec, row, row, L);
    /* One copy of the staging: all of it, or (pinned) from the lengths on. */
    size_t from = pinned ? lens_off : 0, bytes = table_off + copies * sizeof *table - from;
    if ((e = cudaMemcpyAsync(d->d_enc + from, hk + from, bytes, cudaMemcpyHostToDevice, st)) !=
            cudaSuccess ||
        (e = cudaEventRecord(d->h_free[h], st)) != cudaSuccess)
        return cuda_err(err, e, "copy to the device");
    d->h_used[h] = true;
    const kvs_copy2d *d_table = (const kvs_copy2d *)(d->d_enc + table_off);
    if (gathers && (rc = kvs_copies_run_cuda(d_table, gathers, sk > sv ? sk : sv, st, err)))
        return rc;
    const uint32_t *d_lens = (const uint32_t *)(d->d_enc + lens_off);
    for (unsigned kv = 0; kv < 2 && rc == 0; kv++) {
        const kvs_codec *c = kv ? v : k;
        kvs_cuda_sections q = {
            .n = (uint32_t)n,
            .t = t,
            .layer = d->layers_dev,
            .raw_out = d->d_raw + kv * n * sec,
            .enc = d->d_enc + kv * n * sk,
            .stride = kv ? sv : sk,
            .len = kvs_codec_cuda_fixed_size(c) ? NULL : d_lens + kv * n,
        };
        rc = kvs_codec_decode_cuda(c, &q, st, err);
    }
    if (rc == 0)
        rc = kvs_copies_run_cuda(d_table + gathers, copies - gathers, (uint64_t)row * L, st, err);
    return rc;
}

/* True when the device can copy [p, p + len) by DMA: pinned host memory at both ends (a
 * cudaHostRegister'd shared-memory region, cudaHostAlloc). Pageable memory answers
 * cudaMemoryTypeUnregistered. */
static bool pinned_host(const void *p, size_t len)
{
    const uint8_t *ends[2] = {p, (const uint8_t *)p + (len ? len - 1 : 0)};
    for (int i = 0; i < 2; i++) {
        struct cudaPointerAttributes a;
        if (cudaPointerGetAttributes(&a, ends[i]) != cudaSuccess) {
            (void)cudaGetLastError(); /* not an error of the decode: the gather path then */
            return false;
        }
        if (a.type != cudaMemoryTypeHost)
            return false;
    }
    return true;
}

/* The checksums of a batch, verified by threads while the chunks run (the file's comment). */
typedef struct hashing {
    kvs_cuda_block *blocks;
    size_t n;
    atomic_size_t next; /* the next block a thread takes */
    uint8_t *bad;       /* [n]: 1 where the checksum failed */
    pthread_t th[HASH_THREADS];
    unsigned threads; /* started */
} hashing;

static void hash_some(hashing *h)
{
    for (size_t i; (i = atomic_fetch_add(&h->next, 1)) < h->n;) {
        kvs_block_info info;
        kvs_err e;
        const kvs_cuda_block *b = &h->blocks[i];
        /* Structure errors are check_block's to report; a checksum only needs a sane size. */
        h->bad[i] = b->enc && kvs_format_parse(b->enc, b->len, &info, &e) == KVS_EDATALOSS;
    }
}

static void *hash_thread(void *arg)
{
    hash_some(arg);
    return NULL;
}

/* Starts the threads for a batch of at least HASH_THREADED_MIN bytes: true when the
 * checksums are theirs (check_block then skips them), false when the batch verifies each
 * block itself (small, or no memory for the bookkeeping). */
static bool hash_start(hashing *h, kvs_cuda_block *blocks, size_t n)
{
    size_t bytes = 0;
    for (size_t i = 0; i < n; i++)
        bytes += blocks[i].len;
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    *h = (hashing){.blocks = blocks, .n = n};
    if (bytes < HASH_THREADED_MIN || cpus < 2 || !(h->bad = kvs_trymalloc(n)))
        return false;
    memset(h->bad, 0, n);
    atomic_init(&h->next, 0);
    unsigned want = cpus - 1 < HASH_THREADS ? (unsigned)cpus - 1 : HASH_THREADS;
    while (h->threads < want && pthread_create(&h->th[h->threads], NULL, hash_thread, h) == 0)
        h->threads++;
    return true; /* with no thread started, hash_finish does the work */
}

/* Joins the threads (finishing what they left, if none started) and fails the blocks whose
 * checksum did not match. */
static void hash_finish(hashing *h)
{
    if (!h->bad)
        return;
    hash_some(h);
    for (unsigned i = 0; i < h->threads; i++)
        pthread_join(h->th[i], NULL);
    for (size_t i = 0; i < h->n; i++)
        if (h->bad[i] && h->blocks[i].rc == 0) {
            h->blocks[i].rc = KVS_EDATALOSS;
            snprintf(h->blocks[i].msg, sizeof h->blocks[i].msg, "encoded block: checksum mismatch");
            h->blocks[i].res = (kvs_get_result){0};
        }
    free(h->bad);
}

int kvs_decode_blocks_cuda(kvs_cuda_decoder *d, kvs_cuda_block *blocks, size_t n, void *stream,
                           kvs_err *err)
{
    kvs_err_clear(err);
    if (!d || (!blocks && n))
        return kvs_err_set(err, KVS_EINVAL, "decode on the GPU: NULL argument");
    /* One stream orders the chunks and the stagings' events: the caller's, or the decoder's. */
    cudaStream_t st = stream ? (cudaStream_t)stream : d->own;
    kvs_cuda_block **chunk = kvs_trymalloc((n ? n : 1) * sizeof *chunk);
    if (!chunk)
        return kvs_err_set(err, KVS_ENOMEM, "decode on the GPU: out of memory");
    hashing hash;
    kvs_block_trust trust = KVS_BLOCK_UNTRUSTED;
    if (hash_start(&hash, blocks, n)) {
        trust = KVS_BLOCK_VERIFIED;
        d->stats.blocks_hashed_threads += n;
    }
    const kvs_codec *ck = NULL, *cv = NULL;
    uint32_t ct = 0;
    bool cp = false;
    size_t m = 0, raw = 0;
    int rc = 0;
    for (size_t i = 0; i <= n && rc == 0; i++) {
        const kvs_codec *k = NULL, *v = NULL;
        kvs_block_info info = {0};
        uint64_t need = 0;
        bool ok = false, pinned = false;
        if (i < n) {
            kvs_cuda_block *b = &blocks[i];
            kvs_err e1;
            unsigned roles = 0;
            b->rc = check_block(d, b, trust, &k, &v, &info, &roles, &need, &e1);
            pinned = b->rc == 0 && pinned_host(b->enc, b->len);
            snprintf(b->msg, sizeof b->msg, "%.159s", b->rc ? e1.msg : "");
            ok = b->rc == 0;
            if (ok) {
                b->res = (kvs_get_result){.tokens = info.tokens,
                                          .dtype = (kvs_dtype)info.dtype,
                                          .layer_begin = 0,
                                          .layer_end = d->spec.layers,
                                          .bytes = need,
                                          .format = KVS_FORMAT_RAW,
                                          .tier = KVS_TIER_NONE,
                                          .fallback = kvs_enc_fallback(roles) != 0};
                snprintf(b->res.key_codec, sizeof b->res.key_codec, "%s",
                         kvs_spec_enc_codec(&d->spec, KVS_KEYS, kvs_enc_side(roles, KVS_KEYS)));
                snprintf(b->res.value_codec, sizeof b->res.value_codec, "%s",
                         kvs_spec_enc_codec(&d->spec, KVS_VALUES, kvs_enc_side(roles, KVS_VALUES)));
            }
        }
        /* The chunk so far runs when this block cannot join it (the end, other codecs or
         * tokens, or no room left). */
        bool joins = ok && m && k == ck && v == cv && info.tokens == ct && pinned == cp &&
                     raw + need <= CHUNK_RAW;
        if (m && (i == n || (ok && !joins))) {
            rc = run_chunk(d, chunk, m, ck, cv, ct, cp, st, err);
            m = raw = 0;
        }
        if (ok && rc == 0) {
            ck = k, cv = v, ct = info.tokens, cp = pinned;
            chunk[m++] = &blocks[i];
            raw += need;
        }
    }
    free(chunk);
    cudaError_t e = cudaStreamSynchronize(st);
    if (e != cudaSuccess && rc == 0)
        rc = cuda_err(err, e, "decode");
    hash_finish(&hash);
    return rc;
}

void kvs_cuda_decoder_stats_get(const kvs_cuda_decoder *d, kvs_cuda_decoder_stats *out)
{
    if (out)
        *out = d ? d->stats : (kvs_cuda_decoder_stats){0};
}

int kvs_decode_block_cuda(kvs_cuda_decoder *d, const void *enc, size_t len, void *raw_dev,
                          size_t cap, void *stream, kvs_get_result *res, kvs_err *err)
{
    kvs_err_clear(err);
    if (!d || !enc || !raw_dev)
        return kvs_err_set(err, KVS_EINVAL, "decode on the GPU: NULL argument");
    kvs_cuda_block b = {.enc = enc, .len = len, .raw_dev = raw_dev, .cap = cap};
    int rc = kvs_decode_blocks_cuda(d, &b, 1, stream, err);
    if (rc == 0 && b.rc)
        rc = kvs_err_set(err, b.rc, "%s", b.msg);
    if (rc == 0 && res)
        *res = b.res;
    return rc;
}

#else /* no CUDA in this build */

int kvs_cuda_decoder_create(kvs_client *c, const char *ns, const kvs_ns_spec *spec,
                            kvs_cuda_decoder **out, kvs_err *err)
{
    (void)c, (void)ns, (void)spec;
    if (out)
        *out = NULL;
    kvs_err_clear(err);
    return kvs_err_set(err, KVS_ENOTSUP, "decode on the GPU: this build has no CUDA");
}

void kvs_cuda_decoder_destroy(kvs_cuda_decoder *d)
{
    (void)d;
}

int kvs_decode_block_cuda(kvs_cuda_decoder *d, const void *enc, size_t len, void *raw_dev,
                          size_t cap, void *stream, kvs_get_result *res, kvs_err *err)
{
    (void)d, (void)enc, (void)len, (void)raw_dev, (void)cap, (void)stream, (void)res;
    kvs_err_clear(err);
    return kvs_err_set(err, KVS_ENOTSUP, "decode on the GPU: this build has no CUDA");
}

void kvs_cuda_decoder_stats_get(const kvs_cuda_decoder *d, kvs_cuda_decoder_stats *out)
{
    (void)d;
    if (out)
        *out = (kvs_cuda_decoder_stats){0};
}

int kvs_decode_blocks_cuda(kvs_cuda_decoder *d, kvs_cuda_block *blocks, size_t n, void *stream,
                           kvs_err *err)
{
    (void)d, (void)blocks, (void)n, (void)stream;
    kvs_err_clear(err);
    return kvs_err_set(err, KVS_ENOTSUP, "decode on the GPU: this build has no CUDA");
}
#endif
