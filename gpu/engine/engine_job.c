/* The GPU engine's jobs, below both of its job runners (engine.c: the thread, batching,
 * encode and decode; engine_tier.c: the GPU tier's fetch and upload): the queue's
 * submission, a job's completion, the checks on a block before a job reads it, the
 * framing of sections into a sealed block, and the batch's device-to-device copies. Calls
 * neither runner (engine.c -> engine_tier.c -> engine_job.c).
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cuda_runtime.h>

#include "gpu/codec/codec_cuda.h"
#include "gpu/codec/copies.h"
#include "gpu/codec/format.h"
#include "gpu/engine/engine_int.h"

#include "gpu/base/cuda_try.h"

uint64_t kvs__engine_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

size_t kvs__engine_sec_elems(const kvs_codec *k, uint32_t t)
{
    const kvs_ns_spec *s = kvs_codec_spec(k);
    return (size_t)t * s->kv_heads * s->head_dim;
}

void kvs__engine_footprint(const job *j, size_t *raw, size_t *enc)
{
    size_t nl = j->le - j->lb;
    *raw = j->kind == JOB_FETCH || j->kind == JOB_UPLOAD
               ? 0
               : 2 * nl * kvs__engine_sec_elems(j->k, j->t) * 2;
    *enc = nl * (kvs_codec_section_max(j->k, j->t) + kvs_codec_section_max(j->v, j->t));
    /* A recode's sections come from its slot; the staging holds what it re-encodes to. */
    if (j->kind == JOB_RECODE)
        *enc = nl * (kvs_codec_section_max(j->k2, j->t) + kvs_codec_section_max(j->v2, j->t));
}

void kvs__engine_finish(job *j, int rc, const kvs_err *err)
{
    j->done(j->arg, rc, err);
    free(j);
}

void kvs__engine_fail_all(job *list, int rc, const kvs_err *err)
{
    while (list) {
        job *next = list->next;
        kvs__engine_finish(list, rc, err);
        list = next;
    }
}

void kvs__engine_note_error(kvs_engine *e, cudaError_t rc)
{
    if (rc == cudaErrorIllegalAddress || rc == cudaErrorLaunchFailure ||
        rc == cudaErrorHardwareStackError || rc == cudaErrorIllegalInstruction ||
        rc == cudaErrorMisalignedAddress || rc == cudaErrorInvalidPc ||
        rc == cudaErrorECCUncorrectable)
        atomic_store(&e->failed, true);
}

int kvs__engine_copy_dd(kvs_engine *e, void *dst, size_t dpitch, const void *src, size_t spitch,
                        size_t width, size_t height, kvs_err *err)
{
    if (width == 0 || height == 0)
        return 0;
    if (e->copies_used == e->copies_cap) { /* Default: a paged region may be pinned host */
        KVS_CUDA_CHECK(
            cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, cudaMemcpyDefault, e->st),
            err);
        return 0;
    }
    kvs_copies_add(e->h_copies, &e->copies_used, dst, dpitch, src, spitch, width, height);
    uint64_t bytes = (uint64_t)width * height;
    e->copies_max = bytes > e->copies_max ? bytes : e->copies_max;
    return 0;
}

/* The table's largest size: 2^18 copies, 12 MiB of pinned host and as much device memory
 * (a restore of 512 blocks into an engine's paged layout with unpacked heads queues
 * 2 * L * H copies per block: 262144 at L = 32, H = 8). */
#define COPIES_MAX (1u << 18)

int kvs__engine_copies_reserve(kvs_engine *e, uint32_t more, kvs_err *err)
{
    uint64_t want = (uint64_t)e->copies_used + more;
    if (want <= e->copies_cap || e->copies_cap >= COPIES_MAX)
        return 0;
    uint32_t cap = e->copies_cap;
    while (cap < want && cap < COPIES_MAX)
        cap = cap * 2 < COPIES_MAX ? cap * 2 : COPIES_MAX;
    /* The flushed entries' upload and launch must be done with the old tables. */
    KVS_CUDA_CHECK(cudaStreamSynchronize(e->st), err);
    kvs_copy2d *h = NULL, *d = NULL;
    cudaError_t rc = cudaMallocHost((void **)&h, cap * sizeof *h);
    if (rc == cudaSuccess)
        rc = cudaMalloc((void **)&d, cap * sizeof *d);
    if (rc != cudaSuccess) {
        cudaFreeHost(h);
        return kvs_err_set(err, KVS_ENOMEM, "GPU engine: copy table of %u entries: %s", cap,
                           cudaGetErrorString(rc));
    }
    memcpy(h, e->h_copies, e->copies_used * sizeof *h);
    cudaFreeHost(e->h_copies);
    cudaFree(e->d_copies);
    e->h_copies = h, e->d_copies = d, e->copies_cap = cap;
    return 0;
}

int kvs__engine_copies_flush(kvs_engine *e, kvs_err *err)
{
    uint32_t first = e->copies_flushed, n = e->copies_used - first;
    if (n == 0)
        return 0;
    /* From pinned memory on the stream: the entries stay untouched until the reset. */
    KVS_CUDA_CHECK(cudaMemcpyAsync(e->d_copies + first, e->h_copies + first,
                                   n * sizeof *e->h_copies, cudaMemcpyHostToDevice, e->st),
                   err);
    e->copies_flushed = e->copies_used;
    int rc = kvs_copies_run_cuda(e->d_copies + first, n, e->copies_max, e->st, err);
    e->copies_max = 0;
    return rc;
}

void kvs__engine_copies_reset(kvs_engine *e, bool synced)
{
    /* A batch that failed part-way may not have waited for its stream: the table's upload
     * must not still be reading the entries about to be overwritten. */
    if (!synced && e->copies_flushed)
        kvs__engine_note_error(e, cudaStreamSynchronize(e->st));
    e->copies_used = e->copies_flushed = 0;
    e->copies_max = 0;
}

size_t kvs__engine_frame_block(const job *j, const uint8_t *kb, size_t sk, const uint32_t *klen,
                               const uint8_t *vb, size_t sv, const uint32_t *vlen, uint8_t *out)
{
    uint32_t L = kvs_codec_spec(j->k)->layers, offsets[2 * KVS_MAX_LAYERS + 1];
    size_t pos = kvs_format_prefix_bytes(L);
    for (uint32_t l = 0; l < L; l++) {
        offsets[2 * l] = (uint32_t)pos;
        if (kb)
            memcpy(out + pos, kb + l * sk, klen[l]);
        pos += klen[l];
        offsets[2 * l + 1] = (uint32_t)pos;
        if (kb)
            memcpy(out + pos, vb + l * sv, vlen[l]);
        pos += vlen[l];
    }
    offsets[2 * L] = (uint32_t)pos;
    return j->unsealed ? kvs_block_frame_unsealed(j->k, j->v, j->ns_id, j->t, offsets, out)
                       : kvs_block_frame(j->k, j->v, j->ns_id, j->t, offsets, out);
}

kvs__engine_mem kvs__engine_mem_of(const void *p)
{
    struct cudaPointerAttributes a;
    if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
        cudaGetLastError(); /* not sticky: clear it */
        return KVS__MEM_PAGEABLE;
    }
    if (a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged)
        return KVS__MEM_DEVICE;
    return a.type == cudaMemoryTypeHost ? KVS__MEM_PINNED : KVS__MEM_PAGEABLE;
}

void kvs__engine_raw_mem(job *j, const void *raw)
{
    kvs__engine_mem m = j->paged ? KVS__MEM_DEVICE : kvs__engine_mem_of(raw);
    j->pinned_raw = m != KVS__MEM_PAGEABLE;
    j->raw_dev = m == KVS__MEM_DEVICE;
}

int kvs__engine_submit(kvs_engine *e, job *j, kvs_err *err)
{
    size_t raw, enc;
    kvs__engine_footprint(j, &raw, &enc);
    if (raw > e->o.staging_bytes || enc > e->o.staging_bytes) {
        free(j);
        return kvs_err_set(err, KVS_E2BIG,
                           "GPU engine: a block of %zu bytes exceeds the "
                           "staging of %zu bytes",
                           raw, e->o.staging_bytes);
    }
    j->enq_us = kvs__engine_now_us();
    pthread_mutex_lock(&e->mu);
    if (e->tail)
        e->tail->next = j;
    else
        e->head = j;
    e->tail = j;
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
    return 0;
}

int kvs__engine_check_block(const kvs_codec *k, const kvs_codec *v, const uint8_t *enc, size_t len,
                            kvs_block_trust trust, uint32_t layer_begin, uint32_t layer_end,
                            kvs_block_info *info, kvs_err *err)
{
    int rc = kvs_block_parse(k, v, enc, len, trust, info, err);
    if (rc)
        return rc;
    if (layer_end == 0)
        layer_end = info->layers;
    if (layer_begin >= layer_end || layer_end > info->layers)
        return kvs_err_set(err, KVS_EINVAL, "layers: [%u, %u) not within %u layers", layer_begin,
                           layer_end, info->layers);
    size_t sk = kvs_codec_section_max(k, info->tokens), sv = kvs_codec_section_max(v, info->tokens);
    bool kfix = kvs_codec_cuda_fixed_size(k), vfix = kvs_codec_cuda_fixed_size(v);
    for (uint32_t l = layer_begin; l < layer_end; l++) {
        const uint8_t *p;
        size_t n0, n1;
        kvs_format_section(enc, l, 0, &p, &n0);
        kvs_format_section(enc, l, 1, &p, &n1);
        if (n0 > sk || n1 > sv || (kfix && n0 != sk) || (vfix && n1 != sv))
            return kvs_err_set(err, KVS_EPROTO,
                               "encoded block: layer %u sections of %zu/%zu "
                               "bytes, the codecs write %s%zu/%s%zu",
                               l, n0, n1, kfix ? "" : "at most ", sk, vfix ? "" : "at most ", sv);
    }
    return 0;
}
