/* The GPU engine's GPU-tier jobs (engine.h, "GPU tier"): the tier's region, and blocks
 * into and out of slots: encode straight into a slot and decode straight from one (batched
 * with host jobs by engine.c's run_batch), fetch a slot back to the host as a sealed block,
 * and upload a host block's sections into a slot (promotion to the GPU tier).
 */
#include "gpu/engine/engine.h"

#include <stdlib.h>
#include <string.h>

#include "gpu/base/mem.h"
#include "gpu/codec/codec_cuda.h"
#include "gpu/engine/engine_int.h"
#include "gpu/codec/format.h"

#include "gpu/base/cuda_try.h"

size_t kvs_engine_slot_bytes(const kvs_codec *k, const kvs_codec *v, uint32_t t)
{
    return (size_t)kvs_codec_spec(k)->layers *
           (kvs_codec_section_max(k, t) + kvs_codec_section_max(v, t));
}

/* Where a fetch's or an upload's sections travel (job.direct, job.pinned_host):
 *   direct  fixed-size sections and a pinned host block: two strided DMAs per block
 *           between the slot and the block's framed places, nothing else;
 *   packed  otherwise: the block's body (its sections in framed order, K then V of each
 *           layer, contiguous; format.h) is gathered from the slot (fetch) or scattered into
 *           it (upload) on the device, at d_enc + b * slot, by one copy launch for the batch
 *           (gpu/codec/copies.h), and moves as one DMA per block: straight to or from the
 *           host block when that is pinned, through h_enc + b * slot when it is not (one
 *           memcpy of the body on the engine thread).
 * Variable-size codecs (rotatekv) took the host path before: the whole slot, its unused
 * tail included, through h_enc and 2L memcpys per block on the engine thread; restoring
 * 512 RotateKV-2 blocks into a worker's region took 45 ms where KIVI-2's took 22 (H100,
 * 2026-12-07). A batch's bodies fit d_enc and h_enc: take_batch_locked bounds a batch's
 * slots by staging_bytes. */
static size_t body_bytes(const job *j, uint32_t L)
{
    size_t n = 0;
    for (uint32_t i = 0; i < 2 * L; i++)
        n += j->kind == JOB_FETCH ? j->lens.in[i] : j->lens.out[i];
    return n;
}

static int fetch_copies(kvs_engine *e, job *list, uint32_t nb, kvs_err *err)
{
    uint32_t L = kvs_codec_spec(list->k)->layers, t = list->t;
    size_t sk = kvs_codec_section_max(list->k, t), sv = kvs_codec_section_max(list->v, t);
    size_t slot = (size_t)L * (sk + sv), prefix = kvs_format_prefix_bytes(L);
    int rc = kvs__engine_copies_reserve(e, nb * 2 * L, err);
    if (rc)
        return rc;
    uint32_t b = 0;
    for (job *j = list; j; j = j->next, b++) {
        if (j->direct) { /* K of layer l at prefix + l*(sk+sv), V right after it */
            KVS_CUDA_CHECK(cudaMemcpy2DAsync(j->out + prefix, sk + sv, j->slot.in, sk, sk, L,
                                             cudaMemcpyDeviceToHost, e->st),
                           err);
            KVS_CUDA_CHECK(cudaMemcpy2DAsync(j->out + prefix + sk, sk + sv, j->slot.in + L * sk, sv,
                                             sv, L, cudaMemcpyDeviceToHost, e->st),
                           err);
            continue;
        }
        uint8_t *at = e->d_enc + b * slot;
        for (uint32_t l = 0; l < L; l++) {
            uint32_t kn = j->lens.in[l], vn = j->lens.in[L + l];
            if ((rc = kvs__engine_copy_dd(e, at, kn, j->slot.in + l * sk, kn, kn, 1, err)) ||
                (rc = kvs__engine_copy_dd(e, at + kn, vn, j->slot.in + L * sk + l * sv, vn, vn, 1,
                                          err)))
                return rc;
            at += kn + vn;
        }
    }
    if ((rc = kvs__engine_copies_flush(e, err)))
        return rc;
    b = 0;
    for (job *j = list; j; j = j->next, b++)
        if (!j->direct)
            KVS_CUDA_CHECK(cudaMemcpyAsync(j->pinned_host ? j->out + prefix : e->h_enc + b * slot,
                                           e->d_enc + b * slot, body_bytes(j, L),
                                           cudaMemcpyDeviceToHost, e->st),
                           err);
    KVS_CUDA_CHECK(cudaStreamSynchronize(e->st), err);
    return 0;
}

/* Runs a batch's copies (fetch_copies, upload_copies) with the copy table emptied before
 * and after; on failure every job of the batch fails with the error, prefixed with `what`.
 * Returns the copies' rc. */
static int copies_or_fail(kvs_engine *e, job *list, uint32_t nb,
                          int (*copies)(kvs_engine *, job *, uint32_t, kvs_err *), const char *what)
{
    kvs_err err;
    kvs_err_clear(&err);
    kvs__engine_copies_reset(e, false);
    int rc = copies(e, list, nb, &err);
    kvs__engine_copies_reset(e, rc == 0);
    if (rc) {
        kvs_err_prefix(&err, "GPU engine: %s: ", what);
        kvs__engine_fail_all(list, rc, &err);
    }
    return rc;
}

/* Slots back to the host, then framing and checksum (unsealed jobs: no checksum, the caller
 * hashes on its own threads). */
int kvs__engine_do_fetch(kvs_engine *e, job *list, uint32_t nb)
{
    uint32_t L = kvs_codec_spec(list->k)->layers, t = list->t;
    size_t sk = kvs_codec_section_max(list->k, t), sv = kvs_codec_section_max(list->v, t);
    size_t slot = (size_t)L * (sk + sv), prefix = kvs_format_prefix_bytes(L);
    int rc = copies_or_fail(e, list, nb, fetch_copies, "copy from the GPU tier");
    if (rc)
        return rc == KVS_EINTERNAL ? KVS_EINTERNAL : 0;
    uint32_t b = 0;
    for (job *j = list, *next; j; j = next, b++) {
        next = j->next;
        if (!j->direct && !j->pinned_host)
            memcpy(j->out + prefix, e->h_enc + b * slot, body_bytes(j, L));
        *j->len =
            kvs__engine_frame_block(j, NULL, sk, j->lens.in, NULL, sv, j->lens.in + L, j->out);
        kvs__engine_finish(j, 0, NULL);
    }
    return 0;
}

/* True if an encoded block's sections sit at the stride fixed-size codecs give them: K of
 * layer l at prefix + l*(sk+sv) with sk bytes, V right after with sv. */
static bool regular(const uint8_t *enc, uint32_t L, size_t sk, size_t sv)
{
    const uint8_t *at = enc + kvs_format_prefix_bytes(L);
    for (uint32_t l = 0; l < L; l++, at += sk + sv) {
        const uint8_t *p, *q;
        size_t n, m;
        kvs_format_section(enc, l, 0, &p, &n);
        kvs_format_section(enc, l, 1, &q, &m);
        if (p != at || n != sk || q != at + sk || m != sv)
            return false;
    }
    return true;
}

int kvs_engine_tier_alloc(kvs_engine *e, uint64_t bytes, void **base, kvs_err *err)
{
    if (e->tier)
        return kvs_err_set(err, KVS_EEXIST, "GPU tier: already allocated");
    /* The engine thread may be running kernels: cudaMalloc on another thread is fine, it
     * only needs the device current here. */
    KVS_CUDA_CHECK(cudaSetDevice(e->o.device), err);
    cudaError_t ce = cudaMalloc(&e->tier, bytes);
    if (ce != cudaSuccess) {
        e->tier = NULL;
        return kvs_err_set(err, KVS_ENOMEM, "GPU tier: cudaMalloc of %llu bytes on %s: %s",
                           (unsigned long long)bytes, e->name, cudaGetErrorString(ce));
    }
    *base = e->tier;
    return 0;
}

int kvs_engine_mem_info(kvs_engine *e, uint64_t *free_bytes, uint64_t *total_bytes, kvs_err *err)
{
    size_t f = 0, t = 0;
    KVS_CUDA_CHECK(cudaSetDevice(e->o.device), err);
    KVS_CUDA_CHECK(cudaMemGetInfo(&f, &t), err);
    *free_bytes = f;
    *total_bytes = t;
    return 0;
}

static int check_tokens(const kvs_codec *k, uint32_t t, kvs_err *err)
{
    const kvs_ns_spec *s = kvs_codec_spec(k);
    if (t == 0 || t > s->block_tokens)
        return kvs_err_set(err, KVS_EINVAL, "tokens: %u not in 1..%u", t, s->block_tokens);
    return 0;
}

int kvs_engine_encode_dev(kvs_engine *e, const kvs_codec *k, const kvs_codec *v, uint32_t t,
                          const uint16_t *raw, void *slot, uint32_t *lens, kvs_engine_done done,
                          void *arg, kvs_err *err)
{
    int rc = check_tokens(k, t, err);
    if (rc)
        return rc;
    job *j = kvs_xcalloc(1, sizeof *j);
    *j = (job){.kind = JOB_ENCODE,
               .dev = true,
               .k = k,
               .v = v,
               .t = t,
               .lb = 0,
               .le = kvs_codec_spec(k)->layers,
               .raw_in = raw,
               .slot.out = slot,
               .lens.out = lens,
               .done = done,
               .arg = arg};
    kvs__engine_raw_mem(j, raw);
    return kvs__engine_submit(e, j, err);
}

static int submit_decode_dev(kvs_engine *e, const kvs_codec *k, const kvs_codec *v, uint32_t t,
                             const void *slot, const uint32_t *lens, uint32_t layer_begin,
                             uint32_t layer_end, uint16_t *raw, const kvs_engine_paged *paged,
                             kvs_engine_done done, void *arg, kvs_err *err)
{
    int rc = check_tokens(k, t, err);
    if (rc)
        return rc;
    uint32_t L = kvs_codec_spec(k)->layers;
    if (layer_begin >= layer_end || layer_end > L)
        return kvs_err_set(err, KVS_EINVAL, "layers: [%u, %u) not within %u layers", layer_begin,
                           layer_end, L);
    job *j = kvs_xcalloc(1, sizeof *j);
    *j = (job){.kind = JOB_DECODE,
               .dev = true,
               .k = k,
               .v = v,
               .t = t,
               .lb = layer_begin,
               .le = layer_end,
               .slot.in = slot,
               .lens.in = lens,
               .raw_out = raw,
               .paged = paged,
               .done = done,
               .arg = arg};
    kvs__engine_raw_mem(j, raw);
    return kvs__engine_submit(e, j, err);
}

int kvs_engine_decode_dev(kvs_engine *e, const kvs_codec *k, const kvs_codec *v, uint32_t t,
                          const void *slot, const uint32_t *lens, uint32_t layer_begin,
                          uint32_t layer_end, uint16_t *raw, kvs_engine_done done, void *arg,
                          kvs_err *err)
{
    return submit_decode_dev(e, k, v, t, slot, lens, layer_begin, layer_end, raw, NULL, done, arg,
                             err);
}

int kvs_engine_decode_dev_paged(kvs_engine *e, const kvs_codec *k, const kvs_codec *v, uint32_t t,
                                const void *slot, const uint32_t *lens, uint32_t layer_begin,
                                uint32_t layer_end, const kvs_engine_paged *dst,
                                kvs_engine_done done, void *arg, kvs_err *err)
{
    return submit_decode_dev(e, k, v, t, slot, lens, layer_begin, layer_end, NULL, dst, done, arg,
                             err);
}

static int submit_fetch(kvs_engine *e, const kvs_codec *k, const kvs_codec *v, uint32_t ns_id,
                        uint32_t t, const void *slot, const uint32_t *lens, uint8_t *out,
                        size_t cap, size_t *len, bool seal, kvs_engine_done done, void *arg,
                        kvs_err *err)
{
    int rc = check_tokens(k, t, err);
    if (rc)
        return rc;
    if (cap < kvs_block_encoded_max(k, v, t))
        return kvs_err_set(err, KVS_ENOSPC, "GPU engine: output buffer too small");
    job *j = kvs_xcalloc(1, sizeof *j);
    *j = (job){.kind = JOB_FETCH,
               .k = k,
               .v = v,
               .t = t,
               .lb = 0,
               .le = kvs_codec_spec(k)->layers,
               .ns_id = ns_id,
               .slot.in = slot,
               .lens.in = lens,
               .out = out,
               .cap = cap,
               .len = len,
               .done = done,
               .arg = arg,
               .pinned_host = kvs__engine_mem_of(out) == KVS__MEM_PINNED,
               .unsealed = !seal};
    j->direct = j->pinned_host && kvs_codec_cuda_fixed_size(k) && kvs_codec_cuda_fixed_size(v);
    return kvs__engine_submit(e, j, err);
}

int kvs_engine_fetch_dev(kvs_engine *e, const kvs_codec *k, const kvs_codec *v, uint32_t ns_id,
                         uint32_t t, const void *slot, const uint32_t *lens, uint8_t *out,
                         size_t cap, size_t *len, kvs_engine_done done, void *arg, kvs_err *err)
{
    return submit_fetch(e, k, v, ns_id, t, slot, lens, out, cap, len, true, done, arg, err);
}

int kvs_engine_fetch_dev_unsealed(kvs_engine *e, const kvs_codec *k, const kvs_codec *v,
                                  uint32_t ns_id, uint32_t t, const void *slot,
                                  const uint32_t *lens, uint8_t *out, size_t cap, size_t *len,
                                  kvs_engine_done done, void *arg, kvs_err *err)
{
    return submit_fetch(e, k, v, ns_id, t, slot, lens, out, cap, len, false, done, arg, err);
}

/* Host blocks into slots (the contract above do_fetch's). The section lengths go to
 * lens.out first: the packed copies read them. */
static int upload_copies(kvs_engine *e, job *list, uint32_t nb, kvs_err *err)
{
    uint32_t L = kvs_codec_spec(list->k)->layers, t = list->t;
    size_t sk = kvs_codec_section_max(list->k, t), sv = kvs_codec_section_max(list->v, t);
    size_t slot = (size_t)L * (sk + sv), prefix = kvs_format_prefix_bytes(L);
    int rc = kvs__engine_copies_reserve(e, nb * 2 * L, err);
    if (rc)
        return rc;
    uint32_t b = 0;
    for (job *j = list; j; j = j->next, b++) {
        for (uint32_t l = 0; l < L; l++) {
            const uint8_t *p;
            size_t n;
            kvs_format_section(j->enc, l, 0, &p, &n);
            j->lens.out[l] = (uint32_t)n;
            kvs_format_section(j->enc, l, 1, &p, &n);
            j->lens.out[L + l] = (uint32_t)n;
        }
        if (j->direct) { /* from the pinned block straight into the slot layout */
            KVS_CUDA_CHECK(cudaMemcpy2DAsync(j->slot.out, sk, j->enc + prefix, sk + sv, sk, L,
                                             cudaMemcpyHostToDevice, e->st),
                           err);
            KVS_CUDA_CHECK(cudaMemcpy2DAsync(j->slot.out + L * sk, sv, j->enc + prefix + sk,
                                             sk + sv, sv, L, cudaMemcpyHostToDevice, e->st),
                           err);
            continue;
        }
        /* The body starts at the first section (kvs__engine_check_block parsed the block). */
        const uint8_t *body;
        size_t n, bytes = body_bytes(j, L);
        kvs_format_section(j->enc, 0, 0, &body, &n);
        if (!j->pinned_host) {
            memcpy(e->h_enc + b * slot, body, bytes);
            body = e->h_enc + b * slot;
        }
        KVS_CUDA_CHECK(
            cudaMemcpyAsync(e->d_enc + b * slot, body, bytes, cudaMemcpyHostToDevice, e->st), err);
        const uint8_t *at = e->d_enc + b * slot;
        for (uint32_t l = 0; l < L; l++) {
            uint32_t kn = j->lens.out[l], vn = j->lens.out[L + l];
            if ((rc = kvs__engine_copy_dd(e, j->slot.out + l * sk, kn, at, kn, kn, 1, err)) ||
                (rc = kvs__engine_copy_dd(e, j->slot.out + L * sk + l * sv, vn, at + kn, vn, vn, 1,
                                          err)))
                return rc;
            at += kn + vn;
        }
    }
    if ((rc = kvs__engine_copies_flush(e, err)))
        return rc;
    KVS_CUDA_CHECK(cudaStreamSynchronize(e->st), err);
    return 0;
}

int kvs__engine_do_upload(kvs_engine *e, job *list, uint32_t nb)
{
    int rc = copies_or_fail(e, list, nb, upload_copies, "copy into the GPU tier");
    if (rc)
        return rc == KVS_EINTERNAL ? KVS_EINTERNAL : 0;
    for (job *j = list, *next; j; j = next) {
        next = j->next;
        kvs__engine_finish(j, 0, NULL);
    }
    return 0;
}

int kvs_engine_host_register(kvs_engine *e, void *addr, size_t bytes, kvs_err *err)
{
    KVS_CUDA_CHECK(cudaSetDevice(e->o.device), err);
    cudaError_t ce = cudaHostRegister(addr, bytes, cudaHostRegisterPortable);
    if (ce != cudaSuccess) {
        cudaGetLastError();
        return kvs_err_set(err, KVS_EINTERNAL, "GPU engine: cudaHostRegister of %zu bytes: %s",
                           bytes, cudaGetErrorString(ce));
    }
    return 0;
}

void kvs_engine_host_unregister(kvs_engine *e, void *addr, size_t bytes)
{
    (void)bytes;
    if (cudaSetDevice(e->o.device) == cudaSuccess)
        cudaHostUnregister(addr);
}

int kvs_engine_upload_dev(kvs_engine *e, const kvs_codec *k, const kvs_codec *v, const uint8_t *enc,
                          size_t len, kvs_block_trust trust, void *slot, uint32_t *lens,
                          kvs_engine_done done, void *arg, kvs_err *err)
{
    /* The checks decode makes: the slot's fixed-size sections must be exactly the codecs'. */
    kvs_block_info info;
    int rc = kvs__engine_check_block(k, v, enc, len, trust, 0, 0, &info, err);
    if (rc)
        return rc;
    size_t sk = kvs_codec_section_max(k, info.tokens), sv = kvs_codec_section_max(v, info.tokens);
    job *j = kvs_xcalloc(1, sizeof *j);
    *j = (job){.kind = JOB_UPLOAD,
               .k = k,
               .v = v,
               .t = info.tokens,
               .lb = 0,
               .le = info.layers,
               .enc = enc,
               .enc_len = len,
               .slot.out = slot,
               .lens.out = lens,
               .done = done,
               .arg = arg,
               .pinned_host = kvs__engine_mem_of(enc) == KVS__MEM_PINNED};
    j->direct = j->pinned_host && regular(enc, info.layers, sk, sv);
    return kvs__engine_submit(e, j, err);
}
