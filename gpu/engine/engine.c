/* The GPU codec engine: see engine.h for the data flow, completion and threading.
 *
 * Batch layout in the staging buffers (B requests of one kind, one codec pair, one t;
 * decode also one layer range of nl layers; sec = t*H*D elements):
 *   raw side:     K sections [B][nl][sec], then V sections [B][nl][sec]   (fp16/bf16)
 *   encoded side: K sections [B][nl] at stride sk, then V at stride sv     (bytes)
 *   lengths:      K [B][nl], then V [B][nl] section lengths (u32)
 *   layers:       [B][nl] layer index of each section (the same list for K and V)
 * sk, sv = kvs_codec_section_max(t): a section is at most that long (exactly, except for
 * RotateKV whose sinks make it shorter). Encode uses nl = L. One block's K sections are
 * contiguous in the staging, and so are its V sections: that is also the slot layout of
 * the GPU tier (engine.h), so a slot is filled or read with two device copies.
 *
 * Reuse of d_enc (invariant): once a decode batch's kernels have run, nothing reads the
 * encoded side of the staging again for that batch, so a paged decode writes each block
 * there in block layout ([nl][K|V][sec]) and scatters it into the worker's pages from there
 * (move_raw; cpu_decode for a batch the CPU fallback ran). An encode never does this: its
 * d_enc holds the output until the device-to-host copy (and there is no paged encode).
 */
#include "gpu/engine/engine.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "gpu/base/mem.h"
#include "gpu/codec/codec_cuda.h"
#include "gpu/codec/copies.h"
#include "gpu/codec/fidelity.h"
#include "gpu/codec/format.h"
#include "gpu/engine/engine_int.h"

#include <cuda_runtime.h>

#include "gpu/base/cuda_try.h"

static bool compatible(const job *a, const job *b)
{
    return a->kind == b->kind && a->dev == b->dev && a->k == b->k && a->v == b->v &&
           a->k2 == b->k2 && a->v2 == b->v2 && a->t == b->t && a->lb == b->lb && a->le == b->le;
}

/* A paged job's decoded sections (K of its layers at pitch w from sec, V `other` bytes
 * further) into the engine's pages: queued as the batch's copies straight into the pages
 * (kvs_paged_copies), or where the copy table is at its largest, through d_enc at blk_off
 * as a contiguous block and one scatter launch. */
static int paged_out(kvs_engine *e, job *j, uint8_t *sec, size_t other, size_t w, size_t blk_off,
                     kvs_err *err)
{
    const kvs_paged_layout *lay = j->paged->lay;
    uint32_t count = kvs_paged_copies_max(lay, j->t, j->lb, j->le);
    int rc = kvs__engine_copies_reserve(e, count, err);
    if (rc)
        return rc;
    if (e->copies_used + count <= e->copies_cap) {
        kvs_paged_copies(lay, j->paged->base, j->paged->pages, j->t, j->lb, j->le, sec, sec + other,
                         w, true, e->h_copies, &e->copies_used);
        e->copies_max = e->copies_max > w ? e->copies_max : w;
        return 0;
    }
    size_t nl = j->le - j->lb;
    uint8_t *blk = e->d_enc + blk_off;
    if ((rc = kvs__engine_copies_flush(e, err))) /* the queued blocks' copies first */
        return rc;
    for (int kv = 0; kv < 2; kv++)
        KVS_CUDA_CHECK(cudaMemcpy2DAsync(blk + (size_t)kv * w, 2 * w, sec + kv * other, w, w, nl,
                                         cudaMemcpyDeviceToDevice, e->st),
                       err);
    if (kvs_paged_scatter_cuda(lay, j->paged->base, j->paged->pages, j->t, j->lb, j->le, blk, e->st,
                               err))
        return KVS_EINTERNAL;
    return 0;
}

/* Whether a paged job between `from` and j (excluded) writes a page j writes, in the same
 * memory: j's copies must then run after theirs (one launch runs its copies in any order),
 * so that the later block's bytes land, as the host path's order does. */
static bool pages_queued(const job *from, const job *j)
{
    const kvs_engine_paged *p = j->paged;
    uint32_t np = kvs_paged_pages(p->lay, j->t);
    for (const job *q = from; q && q != j; q = q->next) {
        if (!q->paged || q->paged->base != p->base)
            continue;
        uint32_t nq = kvs_paged_pages(q->paged->lay, q->t);
        for (uint32_t a = 0; a < nq; a++)
            for (uint32_t b = 0; b < np; b++)
                if (q->paged->pages[a] == p->pages[b])
                    return true;
    }
    return false;
}

/* Moves a batch's raw side between the host and d_raw (K [B][nl][sec], then V): one copy
 * of the staging h_raw when no request brought pinned raw memory; otherwise per request,
 * two strided copies straight between its own buffer ([nl][2][sec]: K and V of each layer
 * interleaved) and d_raw for a pinned one, two plain ones through h_raw for the others. */
static int move_raw(kvs_engine *e, job *list, size_t nl, size_t n, size_t sec, bool to_dev,
                    kvs_err *err)
{
    bool any = false;
    for (job *j = list; j; j = j->next)
        any |= j->pinned_raw;
    enum cudaMemcpyKind kind = to_dev ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToHost;
    size_t w = sec * 2; /* bytes of one section */
    if (!any) {
        void *dst = to_dev ? (void *)e->d_raw : (void *)e->h_raw;
        const void *src = to_dev ? (const void *)e->h_raw : (const void *)e->d_raw;
        KVS_CUDA_CHECK(cudaMemcpyAsync(dst, src, 2 * n * w, kind, e->st), err);
        return 0;
    }
    size_t b = 0;
    const job *fresh = list; /* paged jobs from here on are queued since the last flush */
    for (job *j = list; j; j = j->next, b++) {
        for (int kv = 0; kv < 2; kv++) {
            size_t dev_off = ((size_t)kv * n + b * nl) * w; /* in d_raw and h_raw */
            uint8_t *dev = e->d_raw + dev_off;
            if (!j->pinned_raw) {
                uint8_t *host = e->h_raw + dev_off;
                KVS_CUDA_CHECK(cudaMemcpyAsync(to_dev ? (void *)dev : (void *)host,
                                               to_dev ? (const void *)host : (const void *)dev,
                                               nl * w, kind, e->st),
                               err);
                continue;
            }
            /* Default: the user's buffer is pinned host memory or device memory (UVA). */
            if (j->paged) { /* both sides at once, at kv 0 */
                int rc = 0;
                if (kv == 1)
                    continue;
                if (pages_queued(fresh, j)) {
                    rc = kvs__engine_copies_flush(e, err);
                    fresh = j;
                }
                if (rc || (rc = paged_out(e, j, dev, n * w, w, b * nl * 2 * w, err)))
                    return rc;
                continue;
            }
            /* Device memory (a worker's, by CUDA IPC): queued for the batch's one copy
             * launch; pinned host memory: a DMA. The user's side is [nl][2][sec]. */
            const uint8_t *from = to_dev ? (const uint8_t *)j->raw_in + (size_t)kv * w : dev;
            uint8_t *to = to_dev ? dev : (uint8_t *)j->raw_out + (size_t)kv * w;
            size_t from_pitch = to_dev ? 2 * w : w, to_pitch = to_dev ? w : 2 * w;
            if (j->raw_dev) {
                int rc = kvs__engine_copy_dd(e, to, to_pitch, from, from_pitch, w, nl, err);
                if (rc)
                    return rc;
            } else {
                KVS_CUDA_CHECK(cudaMemcpy2DAsync(to, to_pitch, from, from_pitch, w, nl,
                                                 cudaMemcpyDefault, e->st),
                               err);
            }
        }
    }
    return kvs__engine_copies_flush(e, err);
}

/* Moves each job's sections between its GPU tier slot and its place in d_enc (K [B][nl] at
 * stride sk, then V at stride sv): a slot holds the K sections of layers 0..L-1 at stride
 * sk, then the V sections at stride sv (engine.h), so layers [lb, lb + nl) are one run per
 * side. One launch for the batch (gpu/codec/copies.h). */
static int move_slots(kvs_engine *e, job *list, size_t nl, size_t n, size_t sk, size_t sv,
                      bool to_slot, kvs_err *err)
{
    const size_t L = kvs_codec_spec(list->k)->layers;
    size_t b = 0;
    for (job *j = list; j; j = j->next, b++)
        for (int kv = 0; kv < 2; kv++) {
            size_t len = nl * (kv ? sv : sk);
            size_t slot_off = kv ? L * sk + j->lb * sv : j->lb * sk;
            uint8_t *stage = e->d_enc + (kv ? n * sk + b * nl * sv : b * nl * sk);
            int rc =
                to_slot
                    ? kvs__engine_copy_dd(e, j->slot.out + slot_off, len, stage, len, len, 1, err)
                    : kvs__engine_copy_dd(e, stage, len, j->slot.in + slot_off, len, len, 1, err);
            if (rc)
                return rc;
        }
    return kvs__engine_copies_flush(e, err);
}

/* A measured encode (engine.h): when a job of the batch asks, the batch's sections just
 * encoded are decoded again into d_meas and reduced against their input in d_raw, both
 * sides' sections in one launch (K sections [0, n), V [n, 2n) in both buffers), the sums
 * copied back to h_sums; do_encode adds up each job's. The whole batch is measured, not
 * only the jobs that ask: a batch is one launch per codec either way. */
static int measure(kvs_engine *e, const job *list, size_t n, size_t sec,
                   const kvs_cuda_sections *ks, const kvs_cuda_sections *vs, kvs_err *err)
{
    bool any = false;
    for (const job *j = list; j && !any; j = j->next)
        any = j->sums != NULL;
    if (!any)
        return 0;
    kvs_cuda_sections km = *ks, vm = *vs;
    km.raw_out = e->d_meas;
    vm.raw_out = e->d_meas + n * sec;
    int rc;
    if ((rc = kvs_codec_decode_cuda(list->k, &km, e->st, err)) ||
        (rc = kvs_codec_decode_cuda(list->v, &vm, e->st, err)) ||
        (rc = kvs_fidelity_section_sums_cuda((const uint16_t *)e->d_raw, e->d_meas,
                                             (uint32_t)(2 * n), sec, kvs_codec_spec(list->k)->dtype,
                                             e->d_sums, e->st, err)))
        return rc;
    KVS_CUDA_CHECK(cudaMemcpyAsync(e->h_sums, e->d_sums, 4 * n * sizeof *e->h_sums,
                                   cudaMemcpyDeviceToHost, e->st),
                   err);
    return 0;
}

/* Runs one batch of nb compatible encode or decode requests over nl layers each: moves
 * the encoded side in (decode), launches the K and V kernels, moves the results out, waits.
 * The caller filled h_raw (encode) or h_enc and h_len (host decode) and h_len (dev decode). */
static int run_batch(kvs_engine *e, job *list, uint32_t nb, kvs_err *err)
{
    const kvs_codec *k = list->k, *v = list->v;
    bool encode = list->kind == JOB_ENCODE, dev = list->dev;
    uint32_t nl = list->le - list->lb, t = list->t;
    size_t n = (size_t)nb * nl, sec = kvs__engine_sec_elems(k, t);
    size_t sk = kvs_codec_section_max(k, t), sv = kvs_codec_section_max(v, t);
    size_t enc_bytes = n * (sk + sv);
    bool kfix = kvs_codec_cuda_fixed_size(k), vfix = kvs_codec_cuda_fixed_size(v);
    kvs__engine_copies_reset(e, false);
    for (size_t i = 0; i < n; i++)
        e->h_layers[i] = list->lb + (uint32_t)(i % nl);
    KVS_CUDA_CHECK(cudaMemcpyAsync(e->d_layers, e->h_layers, n * sizeof *e->h_layers,
                                   cudaMemcpyHostToDevice, e->st),
                   err);
    KVS_CUDA_CHECK(cudaMemsetAsync(e->d_bad, 0xFF, 2 * sizeof *e->d_bad, e->st), err);
    kvs_cuda_sections ks = {.n = (uint32_t)n,
                            .t = t,
                            .layer = e->d_layers,
                            .raw = (const uint16_t *)e->d_raw,
                            .raw_out = (uint16_t *)e->d_raw,
                            .enc = e->d_enc,
                            .enc_out = e->d_enc,
                            .stride = sk,
                            .bad = e->d_bad,
                            .len_out = kfix ? NULL : e->d_len,
                            .len = kfix ? NULL : e->d_len};
    kvs_cuda_sections vs = ks;
    vs.raw = (const uint16_t *)e->d_raw + n * sec;
    vs.raw_out = (uint16_t *)e->d_raw + n * sec;
    vs.enc = vs.enc_out = e->d_enc + n * sk;
    vs.stride = sv;
    vs.bad = e->d_bad + 1;
    vs.len_out = vfix ? NULL : e->d_len + n;
    vs.len = vfix ? NULL : e->d_len + n;
    int rc;
    if (encode) {
        if ((rc = move_raw(e, list, nl, n, sec, true, err)))
            return rc;
        if ((rc = kvs_codec_encode_cuda(k, &ks, e->st, err)) ||
            (rc = kvs_codec_encode_cuda(v, &vs, e->st, err)) ||
            (rc = measure(e, list, n, sec, &ks, &vs, err)))
            return rc;
        if (dev) { /* into the slots */
            if ((rc = move_slots(e, list, nl, n, sk, sv, true, err)))
                return rc;
        } else {
            KVS_CUDA_CHECK(
                cudaMemcpyAsync(e->h_enc, e->d_enc, enc_bytes, cudaMemcpyDeviceToHost, e->st), err);
        }
        KVS_CUDA_CHECK(cudaMemcpyAsync(e->h_len, e->d_len, 2 * n * sizeof *e->h_len,
                                       cudaMemcpyDeviceToHost, e->st),
                       err);
    } else {
        if (dev) { /* gather the layers asked for from the slots */
            if ((rc = move_slots(e, list, nl, n, sk, sv, false, err)))
                return rc;
        } else {
            KVS_CUDA_CHECK(
                cudaMemcpyAsync(e->d_enc, e->h_enc, enc_bytes, cudaMemcpyHostToDevice, e->st), err);
        }
        if (!kfix || !vfix)
            KVS_CUDA_CHECK(cudaMemcpyAsync(e->d_len, e->h_len, 2 * n * sizeof *e->h_len,
                                           cudaMemcpyHostToDevice, e->st),
                           err);
        if ((rc = kvs_codec_decode_cuda(k, &ks, e->st, err)) ||
            (rc = kvs_codec_decode_cuda(v, &vs, e->st, err)))
            return rc;
        if ((rc = move_raw(e, list, nl, n, sec, false, err)))
            return rc;
    }
    KVS_CUDA_CHECK(
        cudaMemcpyAsync(e->h_bad, e->d_bad, 2 * sizeof *e->d_bad, cudaMemcpyDeviceToHost, e->st),
        err);
    KVS_CUDA_CHECK(cudaStreamSynchronize(e->st), err);
    kvs__engine_copies_reset(e, true);
    if (encode) { /* fixed-size codecs leave their lengths implicit */
        for (size_t i = 0; i < n && kfix; i++)
            e->h_len[i] = (uint32_t)sk;
        for (size_t i = 0; i < n && vfix; i++)
            e->h_len[n + i] = (uint32_t)sv;
    }
    return 0;
}

/* run_batch for the encode and decode runners: on failure every job of the batch fails
 * with its error (the rc is returned); else *flagged says whether a kernel flagged an
 * element or section (the `bad` words), which the runner then redoes on the CPU. */
static int run_or_fail(kvs_engine *e, job *list, uint32_t nb, bool *flagged, kvs_err *err)
{
    kvs_err_clear(err);
    int rc = run_batch(e, list, nb, err);
    if (rc) {
        kvs__engine_fail_all(list, rc, err);
        return rc;
    }
    *flagged = e->h_bad[0] != ~0ull || e->h_bad[1] != ~0ull;
    return 0;
}

/* Bytes of a job's raw side ([nl][2][t][H][D]). */
static size_t raw_bytes(const job *j)
{
    return 2 * (size_t)(j->le - j->lb) * kvs__engine_sec_elems(j->k, j->t) * 2;
}

/* The CPU fallbacks read and write raw blocks on the host: a raw buffer in device memory
 * (CUDA IPC) is copied through a host one (*tmp, freed by the caller). */
static const uint16_t *host_raw_in(kvs_engine *e, const job *j, uint16_t **tmp, kvs_err *err)
{
    *tmp = NULL;
    if (!j->raw_dev)
        return j->raw_in;
    if (!(*tmp = kvs_trymalloc(raw_bytes(j)))) {
        kvs_err_set(err, KVS_ENOMEM, "GPU engine: out of memory");
        return NULL;
    }
    cudaError_t ce = cudaMemcpyAsync(*tmp, j->raw_in, raw_bytes(j), cudaMemcpyDefault, e->st);
    if (ce == cudaSuccess)
        ce = cudaStreamSynchronize(e->st);
    if (ce != cudaSuccess) {
        kvs_err_set(err, KVS_EINTERNAL, "GPU engine: copy of a block from the GPU: %s (%s)",
                    cudaGetErrorString(ce), cudaGetErrorName(ce));
        free(*tmp);
        *tmp = NULL;
        return NULL;
    }
    return *tmp;
}

static int cpu_encode(kvs_engine *e, job *j, uint8_t *out, size_t cap, size_t *len, kvs_err *err)
{
    uint16_t *tmp;
    const uint16_t *raw = host_raw_in(e, j, &tmp, err);
    if (!raw)
        return err->code;
    int rc = kvs_block_encode(j->k, j->v, j->ns_id, j->t, raw, out, cap, len, err);
    free(tmp);
    return rc;
}

/* A flagged host block decoded again by the CPU reference, into device memory through a
 * host buffer when the destination is there. */
static int cpu_decode(kvs_engine *e, job *j, kvs_err *err)
{
    if (!j->raw_dev)
        return kvs_block_decode_verified(j->k, j->v, j->enc, j->enc_len, j->lb, j->le, j->raw_out,
                                         err);
    uint16_t *tmp = kvs_trymalloc(raw_bytes(j));
    if (!tmp)
        return kvs_err_set(err, KVS_ENOMEM, "GPU engine: out of memory");
    int rc = kvs_block_decode_verified(j->k, j->v, j->enc, j->enc_len, j->lb, j->le, tmp, err);
    if (rc == 0) {
        /* Paged: the block goes to d_enc (unused now: the batch is decoded) and is
         * scattered from there. */
        void *to = j->paged ? (void *)e->d_enc : (void *)j->raw_out;
        cudaError_t ce = cudaMemcpyAsync(to, tmp, raw_bytes(j), cudaMemcpyDefault, e->st);
        if (ce == cudaSuccess && j->paged &&
            kvs_paged_scatter_cuda(j->paged->lay, j->paged->base, j->paged->pages, j->t, j->lb,
                                   j->le, e->d_enc, e->st, err))
            ce = cudaErrorLaunchFailure;
        if (ce == cudaSuccess)
            ce = cudaStreamSynchronize(e->st);
        if (ce != cudaSuccess)
            rc = kvs_err_set(err, KVS_EINTERNAL, "GPU engine: copy of a block to the GPU: %s (%s)",
                             cudaGetErrorString(ce), cudaGetErrorName(ce));
    }
    free(tmp);
    return rc;
}

/* A dev encode of a flagged batch, redone by the CPU reference: its sections go to the
 * slot with two host-to-device copies. */
static int cpu_encode_dev(kvs_engine *e, job *j, kvs_err *err)
{
    size_t cap = kvs_block_encoded_max(j->k, j->v, j->t), len;
    uint8_t *tmp = kvs_trymalloc(cap);
    if (!tmp)
        return kvs_err_set(err, KVS_ENOMEM, "GPU engine: out of memory");
    int rc = cpu_encode(e, j, tmp, cap, &len, err);
    uint32_t L = kvs_codec_spec(j->k)->layers;
    size_t sk = kvs_codec_section_max(j->k, j->t), sv = kvs_codec_section_max(j->v, j->t);
    for (uint32_t l = 0; l < L && rc == 0; l++)
        for (int kv = 0; kv < 2 && rc == 0; kv++) {
            const uint8_t *p;
            size_t n;
            kvs_format_section(tmp, l, kv, &p, &n);
            j->lens.out[kv * L + l] = (uint32_t)n;
            uint8_t *dst = j->slot.out + (kv ? L * sk + l * sv : l * sk);
            cudaError_t ce = cudaMemcpyAsync(dst, p, n, cudaMemcpyHostToDevice, e->st);
            if (ce == cudaSuccess)
                ce = cudaStreamSynchronize(e->st);
            if (ce != cudaSuccess)
                rc = kvs_err_set(err, KVS_EINTERNAL, "GPU engine: copy to the GPU tier: %s (%s)",
                                 cudaGetErrorString(ce), cudaGetErrorName(ce));
        }
    free(tmp);
    return rc;
}

/* A measured job's sums from its L sections' (k: 2 per section, keys; v: values), or NaN
 * (not measured) when k is NULL. */
static void job_sums(job *j, const double *k, const double *v, uint32_t L)
{
    if (!k) {
        j->sums[0] = j->sums[1] = j->sums[2] = j->sums[3] = NAN;
        return;
    }
    j->sums[0] = j->sums[1] = j->sums[2] = j->sums[3] = 0;
    for (uint32_t l = 0; l < L; l++) {
        j->sums[0] += k[2 * l];
        j->sums[1] += k[2 * l + 1];
        j->sums[2] += v[2 * l];
        j->sums[3] += v[2 * l + 1];
    }
}

/* The batch runners (engine_int.h: kvs__engine_runner): one batch of a kind, every job
 * finished; they return KVS_EINTERNAL when a CUDA call failed on the way. */
static int do_encode(kvs_engine *e, job *list, uint32_t nb)
{
    const kvs_codec *k = list->k, *v = list->v;
    uint32_t L = kvs_codec_spec(k)->layers, t = list->t;
    size_t sec = kvs__engine_sec_elems(k, t), n = (size_t)nb * L;
    size_t sk = kvs_codec_section_max(k, t), sv = kvs_codec_section_max(v, t);
    uint16_t *hr = (uint16_t *)e->h_raw;
    uint32_t b = 0;
    for (job *j = list; j; j = j->next, b++) /* [L][2][t][H][D] -> K [B][L], V [B][L] */
        for (uint32_t l = 0; l < L && !j->pinned_raw; l++) { /* pinned: move_raw's DMA */
            memcpy(hr + ((size_t)b * L + l) * sec, j->raw_in + (2 * (size_t)l) * sec, sec * 2);
            memcpy(hr + (n + (size_t)b * L + l) * sec, j->raw_in + (2 * (size_t)l + 1) * sec,
                   sec * 2);
        }
    kvs_err err;
    bool flagged;
    int rc = run_or_fail(e, list, nb, &flagged, &err);
    if (rc)
        return rc;
    /* The kernels flag a batch holding NaN/Inf input or a value they refuse (the flag
     * names one element of the whole launch). Then every request of the batch is encoded
     * again by the CPU reference: the bad ones fail with its message (naming the element),
     * the others get the same bytes. */
    b = 0;
    for (job *j = list, *next; j; j = next, b++) {
        next = j->next;
        int rc2 = 0;
        if (flagged && j->dev) {
            rc2 = cpu_encode_dev(e, j, &err);
            if (rc2 == KVS_EINTERNAL)
                rc = rc2; /* a copy to the slot failed: the engine looks at the device */
        } else if (flagged) {
            rc2 = cpu_encode(e, j, j->out, j->cap, j->len, &err);
        } else if (j->dev) {
            memcpy(j->lens.out, e->h_len + (size_t)b * L, L * sizeof *j->lens.out);
            memcpy(j->lens.out + L, e->h_len + n + (size_t)b * L, L * sizeof *j->lens.out);
        } else {
            const uint8_t *kb = e->h_enc + (size_t)b * L * sk;
            const uint8_t *vb = e->h_enc + n * sk + (size_t)b * L * sv;
            const uint32_t *kl = e->h_len + (size_t)b * L, *vl = e->h_len + n + (size_t)b * L;
            /* kvs_block_encode's safety net, for sections the kernels wrote: a NaN/Inf
             * parameter fails the request instead of being acknowledged. */
            for (uint32_t l = 0; l < L && rc2 == 0; l++) {
                rc2 = kvs_codec_check_section(k, l, t, kb + l * sk, kl[l], &err);
                if (rc2 == 0)
                    rc2 = kvs_codec_check_section(v, l, t, vb + l * sv, vl[l], &err);
            }
            if (rc2 == 0)
                *j->len = kvs__engine_frame_block(j, kb, sk, kl, vb, sv, vl, j->out);
        }
        if (rc2 == 0 && j->sums)
            job_sums(j, flagged ? NULL : e->h_sums + 2 * (size_t)b * L,
                     e->h_sums + 2 * (n + (size_t)b * L), L);
        kvs__engine_finish(j, rc2, rc2 ? &err : NULL);
    }
    return rc;
}

static int do_decode(kvs_engine *e, job *list, uint32_t nb)
{
    const kvs_codec *k = list->k, *v = list->v;
    uint32_t nl = list->le - list->lb, t = list->t, L = kvs_codec_spec(k)->layers;
    size_t sec = kvs__engine_sec_elems(k, t), n = (size_t)nb * nl;
    size_t sk = kvs_codec_section_max(k, t), sv = kvs_codec_section_max(v, t);
    uint32_t b = 0;
    for (job *j = list; j; j = j->next, b++)
        for (uint32_t l = 0; l < nl; l++) {
            size_t i = (size_t)b * nl + l;
            if (j->dev) {
                e->h_len[i] = j->lens.in[j->lb + l];
                e->h_len[n + i] = j->lens.in[L + j->lb + l];
                continue;
            }
            const uint8_t *p;
            size_t len;
            kvs_format_section(j->enc, j->lb + l, 0, &p, &len);
            memcpy(e->h_enc + i * sk, p, len);
            e->h_len[i] = (uint32_t)len;
            kvs_format_section(j->enc, j->lb + l, 1, &p, &len);
            memcpy(e->h_enc + n * sk + i * sv, p, len);
            e->h_len[n + i] = (uint32_t)len;
        }
    kvs_err err;
    bool flagged;
    int rc = run_or_fail(e, list, nb, &flagged, &err);
    if (rc)
        return rc;
    /* A section the kernels found malformed: host blocks are decoded again by the CPU
     * reference (which names the problem); a slot holds bytes our own kernels wrote, so a
     * malformed one is data loss. */
    const uint16_t *hr = (const uint16_t *)e->h_raw;
    b = 0;
    for (job *j = list, *next; j; j = next, b++) { /* K [B][nl], V [B][nl] -> [nl][2][t][H][D] */
        next = j->next;
        if (flagged && j->dev) {
            kvs_err_set(&err, KVS_EDATALOSS, "GPU tier: a block's sections are malformed");
            kvs__engine_finish(j, KVS_EDATALOSS, &err);
            continue;
        }
        if (flagged) { /* checked at submission (kvs__engine_check_block): no second hash */
            int rc2 = cpu_decode(e, j, &err);
            kvs__engine_finish(j, rc2, rc2 ? &err : NULL);
            continue;
        }
        for (uint32_t l = 0; l < nl && !j->pinned_raw; l++) { /* pinned: DMA'd in place */
            memcpy(j->raw_out + (2 * (size_t)l) * sec, hr + ((size_t)b * nl + l) * sec, sec * 2);
            memcpy(j->raw_out + (2 * (size_t)l + 1) * sec, hr + (n + (size_t)b * nl + l) * sec,
                   sec * 2);
        }
        kvs__engine_finish(j, 0, NULL);
    }
    return 0;
}

const uint32_t kvs_engine_batch_bounds[KVS_ENGINE_BATCH_BUCKETS] = {1,  2,  4,   8,  16,
                                                                    32, 64, 128, 256};

/* The batch-size histogram (kvs_engine_get_stats): how well requests coalesce. */
static void count_batch(kvs_engine *e, uint32_t nb)
{
    int b = 0;
    while (b < KVS_ENGINE_BATCH_BUCKETS && nb > kvs_engine_batch_bounds[b])
        b++;
    atomic_fetch_add_explicit(&e->batches[b], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&e->batch_requests, nb, memory_order_relaxed);
}

/* Takes a batch off the queue: the oldest request and every compatible one that fits the
 * staging, up to max_batch; waits up to deadline_us for more while the batch is short
 * (neither max_batch requests nor a full staging queued: waiting cannot make it larger).
 * Copies (fetch, upload) take what is queued without waiting: they move each block with
 * its own DMA whatever the batch, so waiting saves only a synchronization, and a stream
 * that asks for a few blocks at a time (a GetMany ENCODED over gRPC) waited out the
 * deadline for nearly every block. */
static job *take_batch_locked(kvs_engine *e, uint32_t *nb)
{
    job *first = e->head;
    uint64_t deadline = first->enq_us + e->o.deadline_us;
    bool copies = first->kind == JOB_FETCH || first->kind == JOB_UPLOAD;
    for (;;) {
        uint32_t count = 0;
        size_t raw = 0, enc = 0;
        bool full = false;
        for (job *j = e->head; j && count < e->o.max_batch && !full; j = j->next) {
            if (!compatible(first, j))
                continue;
            size_t r, c;
            kvs__engine_footprint(j, &r, &c);
            raw += r;
            enc += c;
            full = raw > e->o.staging_bytes || enc > e->o.staging_bytes;
            count++;
        }
        uint64_t now = kvs__engine_now_us();
        if (count >= e->o.max_batch || full || now >= deadline || e->stop || copies)
            break;
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        uint64_t wait_ns = (deadline - now) * 1000u + (uint64_t)ts.tv_nsec;
        ts.tv_sec += (time_t)(wait_ns / 1000000000u);
        ts.tv_nsec = (long)(wait_ns % 1000000000u);
        pthread_cond_timedwait(&e->cv, &e->mu, &ts);
    }
    size_t raw_used = 0, enc_used = 0;
    job *batch = NULL, **tail = &batch, **pp = &e->head;
    *nb = 0;
    while (*pp && *nb < e->o.max_batch) {
        job *j = *pp;
        size_t r, c;
        kvs__engine_footprint(j, &r, &c);
        if (compatible(first, j) && raw_used + r <= e->o.staging_bytes &&
            enc_used + c <= e->o.staging_bytes &&
            ((*nb + 1) * (size_t)(j->le - j->lb) <= e->max_sections)) {
            *pp = j->next;
            j->next = NULL;
            *tail = j;
            tail = &j->next;
            raw_used += r;
            enc_used += c;
            (*nb)++;
        } else {
            pp = &j->next;
        }
    }
    e->tail = NULL;
    for (job *j = e->head; j; j = j->next)
        e->tail = j;
    return batch;
}

static const kvs__engine_runner runners[] = {
    [JOB_ENCODE] = do_encode,
    [JOB_DECODE] = do_decode,
    [JOB_FETCH] = kvs__engine_do_fetch,
    [JOB_UPLOAD] = kvs__engine_do_upload,
    [JOB_RECODE] = kvs__engine_do_recode,
};

static void *engine_main(void *arg)
{
    kvs_engine *e = arg;
    if (cudaSetDevice(e->o.device) != cudaSuccess)
        atomic_store(&e->failed, true);
    pthread_mutex_lock(&e->mu);
    for (;;) {
        while (!e->head && !e->stop)
            pthread_cond_wait(&e->cv, &e->mu);
        if (!e->head)
            break; /* stop requested and nothing queued */
        uint32_t nb;
        job *batch = take_batch_locked(e, &nb);
        pthread_mutex_unlock(&e->mu);
        count_batch(e, nb);
        if (atomic_load(&e->failed)) {
            kvs_err err;
            kvs_err_set(&err, KVS_EINTERNAL, "GPU engine on %s failed earlier; restart kvstashd",
                        e->name);
            kvs__engine_fail_all(batch, KVS_EINTERNAL, &err);
        } else if (runners[batch->kind](e, batch, nb) == KVS_EINTERNAL) {
            /* A CUDA call failed: the errors the device does not recover from are sticky,
             * so the stream answers with them now; then every later job fails fast. */
            kvs__engine_note_error(e, cudaStreamSynchronize(e->st));
        }
        pthread_mutex_lock(&e->mu);
    }
    pthread_mutex_unlock(&e->mu);
    return NULL;
}

static int alloc_all(kvs_engine *e, kvs_err *err)
{
    KVS_CUDA_CHECK(cudaSetDevice(e->o.device), err);
    KVS_CUDA_CHECK(cudaStreamCreateWithFlags(&e->st, cudaStreamNonBlocking), err);
    KVS_CUDA_CHECK(cudaStreamCreateWithFlags(&e->aux, cudaStreamNonBlocking), err);
    KVS_CUDA_CHECK(cudaMallocHost((void **)&e->h_raw, e->o.staging_bytes), err);
    KVS_CUDA_CHECK(cudaMallocHost((void **)&e->h_enc, e->o.staging_bytes), err);
    KVS_CUDA_CHECK(cudaMalloc((void **)&e->d_raw, e->o.staging_bytes), err);
    KVS_CUDA_CHECK(cudaMalloc((void **)&e->d_enc, e->o.staging_bytes), err);
    KVS_CUDA_CHECK(cudaMallocHost((void **)&e->h_layers, e->max_sections * sizeof *e->h_layers),
                   err);
    KVS_CUDA_CHECK(cudaMalloc((void **)&e->d_layers, e->max_sections * sizeof *e->d_layers), err);
    KVS_CUDA_CHECK(cudaMallocHost((void **)&e->h_len, 2 * e->max_sections * sizeof *e->h_len), err);
    KVS_CUDA_CHECK(cudaMalloc((void **)&e->d_len, 2 * e->max_sections * sizeof *e->d_len), err);
    KVS_CUDA_CHECK(cudaMallocHost((void **)&e->h_bad, 2 * sizeof *e->h_bad), err);
    KVS_CUDA_CHECK(cudaMalloc((void **)&e->d_bad, 2 * sizeof *e->d_bad), err);
    KVS_CUDA_CHECK(cudaMalloc((void **)&e->d_meas, e->o.staging_bytes), err);
    KVS_CUDA_CHECK(cudaMallocHost((void **)&e->h_sums, 4 * e->max_sections * sizeof *e->h_sums),
                   err);
    KVS_CUDA_CHECK(cudaMalloc((void **)&e->d_sums, 4 * e->max_sections * sizeof *e->d_sums), err);
    /* Per block at most two copies each way of a batch (slot, raw side): four. */
    e->copies_cap = 4 * e->o.max_batch + 16;
    KVS_CUDA_CHECK(cudaMallocHost((void **)&e->h_copies, e->copies_cap * sizeof *e->h_copies), err);
    KVS_CUDA_CHECK(cudaMalloc((void **)&e->d_copies, e->copies_cap * sizeof *e->d_copies), err);
    return 0;
}

static void free_all(kvs_engine *e)
{
    cudaFreeHost(e->h_raw);
    cudaFreeHost(e->h_enc);
    cudaFreeHost(e->h_layers);
    cudaFreeHost(e->h_bad);
    cudaFreeHost(e->h_len);
    cudaFreeHost(e->h_copies);
    cudaFreeHost(e->h_sums);
    cudaFree(e->d_sums);
    cudaFree(e->d_meas);
    cudaFree(e->d_copies);
    cudaFree(e->d_len);
    cudaFree(e->tier);
    cudaFree(e->d_raw);
    cudaFree(e->d_enc);
    cudaFree(e->d_layers);
    cudaFree(e->d_bad);
    if (e->st)
        cudaStreamDestroy(e->st);
    if (e->aux)
        cudaStreamDestroy(e->aux);
}

int kvs_engine_create(const kvs_engine_opts *opts, kvs_engine **out, kvs_err *err)
{
    *out = NULL;
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0)
        return kvs_err_set(err, KVS_ENOTSUP, "GPU engine: no CUDA device");
    if (opts->device < 0 || opts->device >= ndev)
        return kvs_err_set(err, KVS_EINVAL, "GPU engine: device %d of %d", opts->device, ndev);
    kvs_engine *e = kvs_xcalloc(1, sizeof *e);
    e->o = *opts;
    if (!e->o.staging_bytes)
        e->o.staging_bytes = (size_t)256 << 20;
    if (!e->o.max_batch)
        e->o.max_batch = 256;
    if (!e->o.deadline_us)
        e->o.deadline_us = 200;
    e->max_sections = (size_t)e->o.max_batch * KVS_MAX_LAYERS;
    struct cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, e->o.device) == cudaSuccess) {
        snprintf(e->name, sizeof e->name, "%.200s (device %d)", prop.name, e->o.device);
        _Static_assert(sizeof prop.uuid.bytes == sizeof e->uuid, "device UUID length");
        memcpy(e->uuid, prop.uuid.bytes, sizeof e->uuid);
    }
    int rc = alloc_all(e, err);
    if (rc == 0) {
        pthread_mutex_init(&e->mu, NULL);
        pthread_mutex_init(&e->prep_mu, NULL);
        pthread_mutex_init(&e->aux_mu, NULL);
        pthread_cond_init(&e->cv, NULL);
        int prc = pthread_create(&e->thread, NULL, engine_main, e);
        if (prc) {
            pthread_mutex_destroy(&e->mu);
            pthread_mutex_destroy(&e->prep_mu);
            pthread_mutex_destroy(&e->aux_mu);
            pthread_cond_destroy(&e->cv);
            rc = kvs_err_set(err, -prc, "GPU engine: pthread_create: %s", strerror(prc));
        }
    }
    if (rc) {
        free_all(e);
        free(e);
        return rc;
    }
    *out = e;
    return 0;
}

void kvs_engine_destroy(kvs_engine *e)
{
    if (!e)
        return;
    pthread_mutex_lock(&e->mu);
    e->stop = true;
    pthread_cond_broadcast(&e->cv);
    pthread_mutex_unlock(&e->mu);
    pthread_join(e->thread, NULL);
    free_all(e);
    pthread_mutex_destroy(&e->mu);
    pthread_mutex_destroy(&e->prep_mu);
    pthread_mutex_destroy(&e->aux_mu);
    pthread_cond_destroy(&e->cv);
    free(e);
}

bool kvs_engine_failed(const kvs_engine *e)
{
    return atomic_load(&e->failed);
}

const char *kvs_engine_device_name(const kvs_engine *e)
{
    return e->name;
}

bool kvs_engine_has_uuid(const kvs_engine *e, const uint8_t *uuid)
{
    return memcmp(e->uuid, uuid, sizeof e->uuid) == 0;
}

int kvs_engine_peer_enable(kvs_engine *e, const kvs_engine *other, kvs_err *err)
{
    int a = e->o.device, b = other->o.device, can = 0;
    if (a == b)
        return 0;
    cudaError_t ce = cudaDeviceCanAccessPeer(&can, a, b);
    if (ce != cudaSuccess)
        return kvs_err_set(err, KVS_ENOTSUP, "GPU engine: cudaDeviceCanAccessPeer(%d, %d): %s", a,
                           b, cudaGetErrorString(ce));
    if (!can)
        return kvs_err_set(err, KVS_ENOTSUP,
                           "GPU engine: device %d cannot access device %d's memory", a, b);
    /* Peer access is a property of the device's context, enabled from any thread that has
     * it current; the engine thread's kernels then see it. */
    pthread_mutex_lock(&e->prep_mu);
    if ((ce = cudaSetDevice(a)) == cudaSuccess) {
        ce = cudaDeviceEnablePeerAccess(b, 0);
        if (ce == cudaErrorPeerAccessAlreadyEnabled) {
            (void)cudaGetLastError();
            ce = cudaSuccess;
        }
    }
    pthread_mutex_unlock(&e->prep_mu);
    if (ce != cudaSuccess)
        return kvs_err_set(err, KVS_ENOTSUP, "GPU engine: cudaDeviceEnablePeerAccess(%d -> %d): %s",
                           a, b, cudaGetErrorString(ce));
    return 0;
}

int kvs_engine_device_count(int *n, kvs_err *err)
{
    *n = 0;
    cudaError_t ce = cudaGetDeviceCount(n);
    if (ce != cudaSuccess) {
        *n = 0;
        return kvs_err_set(err, KVS_EUNAVAIL, "GPU engine: cudaGetDeviceCount: %s (%s)",
                           cudaGetErrorString(ce), cudaGetErrorName(ce));
    }
    return 0;
}

void kvs_engine_get_stats(const kvs_engine *e, kvs_engine_stats *out)
{
    memset(out, 0, sizeof *out);
    if (!e)
        return;
    for (int i = 0; i <= KVS_ENGINE_BATCH_BUCKETS; i++)
        out->batches[i] = atomic_load_explicit(&e->batches[i], memory_order_relaxed);
    out->requests = atomic_load_explicit(&e->batch_requests, memory_order_relaxed);
}

int kvs_engine_prepare(kvs_engine *e, kvs_codec *c, kvs_err *err)
{
    if (kvs_engine_failed(e))
        return kvs_err_set(err, KVS_EUNAVAIL, "GPU engine: failed earlier");
    if (!kvs_codec_cuda_supported(c))
        return kvs_err_set(err, KVS_ENOTSUP, "GPU engine: no kernels for this codec");
    /* Table uploads are not thread-safe with each other; they take their own lock, never
     * the queue's (daemon/THREADS.md), and make the engine's device current on this
     * thread for the upload. */
    pthread_mutex_lock(&e->prep_mu);
    int rc = 0;
    cudaError_t cu = cudaSetDevice(e->o.device);
    if (cu != cudaSuccess)
        rc = kvs_err_set(err, KVS_EINTERNAL, "GPU engine: cudaSetDevice: %s (%s)",
                         cudaGetErrorString(cu), cudaGetErrorName(cu));
    else
        rc = kvs_codec_cuda_prepare(c, err);
    pthread_mutex_unlock(&e->prep_mu);
    return rc;
}

bool kvs_engine_accepts(const kvs_engine *e, const kvs_codec *k, const kvs_codec *v)
{
    return !kvs_engine_failed(e) && kvs_codec_cuda_ready(k, e->o.device) &&
           kvs_codec_cuda_ready(v, e->o.device);
}

int kvs_engine_encode(kvs_engine *e, const kvs_codec *k, const kvs_codec *v, uint32_t ns_id,
                      uint32_t t, const uint16_t *raw, uint8_t *out, size_t cap, size_t *len,
                      double *sums, kvs_engine_done done, void *arg, kvs_err *err)
{
    const kvs_ns_spec *s = kvs_codec_spec(k);
    if (t == 0 || t > s->block_tokens)
        return kvs_err_set(err, KVS_EINVAL, "tokens: %u not in 1..%u", t, s->block_tokens);
    if (cap < kvs_block_encoded_max(k, v, t))
        return kvs_err_set(err, KVS_ENOSPC, "GPU engine: output buffer too small");
    job *j = kvs_xcalloc(1, sizeof *j);
    *j = (job){.kind = JOB_ENCODE,
               .k = k,
               .v = v,
               .t = t,
               .lb = 0,
               .le = s->layers,
               .ns_id = ns_id,
               .raw_in = raw,
               .out = out,
               .cap = cap,
               .len = len,
               .sums = sums,
               .done = done,
               .arg = arg};
    kvs__engine_raw_mem(j, raw);
    return kvs__engine_submit(e, j, err);
}

static int submit_decode(kvs_engine *e, const kvs_codec *k, const kvs_codec *v, const uint8_t *enc,
                         size_t len, kvs_block_trust trust, uint32_t layer_begin,
                         uint32_t layer_end, uint16_t *raw, const kvs_engine_paged *paged,
                         kvs_engine_done done, void *arg, kvs_err *err)
{
    if (layer_end == 0) /* for the helper 0 means every layer; here it is an empty range */
        return kvs_err_set(err, KVS_EINVAL, "layers: [%u, 0) is empty", layer_begin);
    kvs_block_info info;
    int rc = kvs__engine_check_block(k, v, enc, len, trust, layer_begin, layer_end, &info, err);
    if (rc)
        return rc;
    job *j = kvs_xcalloc(1, sizeof *j);
    *j = (job){.kind = JOB_DECODE,
               .k = k,
               .v = v,
               .t = info.tokens,
               .lb = layer_begin,
               .le = layer_end,
               .enc = enc,
               .enc_len = len,
               .raw_out = raw,
               .paged = paged,
               .done = done,
               .arg = arg};
    kvs__engine_raw_mem(j, raw);
    return kvs__engine_submit(e, j, err);
}

int kvs_engine_decode(kvs_engine *e, const kvs_codec *k, const kvs_codec *v, const uint8_t *enc,
                      size_t len, kvs_block_trust trust, uint32_t layer_begin, uint32_t layer_end,
                      uint16_t *raw, kvs_engine_done done, void *arg, kvs_err *err)
{
    return submit_decode(e, k, v, enc, len, trust, layer_begin, layer_end, raw, NULL, done, arg,
                         err);
}

int kvs_engine_decode_paged(kvs_engine *e, const kvs_codec *k, const kvs_codec *v,
                            const uint8_t *enc, size_t len, kvs_block_trust trust,
                            uint32_t layer_begin, uint32_t layer_end, const kvs_engine_paged *dst,
                            kvs_engine_done done, void *arg, kvs_err *err)
{
    return submit_decode(e, k, v, enc, len, trust, layer_begin, layer_end, NULL, dst, done, arg,
                         err);
}
