/* The GPU engine's recode jobs (engine.h kvs_engine_recode_dev): precision demotion of a
 * GPU tier block on its way to the host tier. Per block and side, the slot's sections are
 * decoded into d_raw and encoded again with the colder codec into d_enc by the codecs'
 * kernels (the same launchers engine.c batches), or, for a side that keeps its codec,
 * taken as they are; only the result crosses the bus, and the host frames it with the new
 * codecs (kvs__engine_frame_block) and seals it. The bytes are those of the CPU reference,
 * kvs_block_transcode (codec kernels and references agree bit for bit: STYLE, GPU code).
 *
 * One block at a time inside a batch, each ended by a stream sync: demotion runs in the
 * background, and the per-block launches keep the staging use and the indexing simple
 * (d_raw and d_enc hold one side of one block; h_enc one re-encoded block per job of the
 * batch, which kvs__engine_footprint accounts for). A block whose kernels flag a section is
 * re-encoded by the CPU reference from its slot's bytes (cpu_recode); one that the
 * reference cannot re-encode either goes down as it was.
 */
#include <stdlib.h>
#include <string.h>

#include "gpu/base/mem.h"
#include "gpu/codec/codec_cuda.h"
#include "gpu/codec/format.h"
#include "gpu/engine/engine_int.h"

#include "gpu/base/cuda_try.h"

int kvs_engine_recode_dev(kvs_engine *e, const kvs_codec *k, const kvs_codec *v,
                          const kvs_codec *k2, const kvs_codec *v2, uint32_t ns_id, uint32_t t,
                          const void *slot, const uint32_t *lens, uint8_t *out, size_t cap,
                          size_t *len, kvs_engine_done done, void *arg, kvs_err *err)
{
    const kvs_ns_spec *s = kvs_codec_spec(k);
    if (t == 0 || t > s->block_tokens)
        return kvs_err_set(err, KVS_EINVAL, "tokens: %u not in 1..%u", t, s->block_tokens);
    if (cap < kvs_block_encoded_max(k, v, t) || cap < kvs_block_encoded_max(k2, v2, t))
        return kvs_err_set(err, KVS_ENOSPC, "GPU engine: output buffer too small");
    if (!kvs_engine_accepts(e, k, v) || !kvs_engine_accepts(e, k2, v2))
        return kvs_err_set(err, KVS_ENOTSUP, "GPU engine: no kernels for these codecs");
    job *j = kvs_xcalloc(1, sizeof *j);
    *j = (job){.kind = JOB_RECODE,
               .k = k,
               .v = v,
               .k2 = k2,
               .v2 = v2,
               .t = t,
               .lb = 0,
               .le = s->layers,
               .ns_id = ns_id,
               .slot.in = slot,
               .lens.in = lens,
               .out = out,
               .cap = cap,
               .len = len,
               .done = done,
               .arg = arg};
    return kvs__engine_submit(e, j, err);
}

/* The slot's block framed as it is (kvs_engine_fetch_dev's bytes), re-encoded by the CPU
 * reference into j->out; when that fails, the framed block itself goes to j->out. 0, or
 * KVS_EINTERNAL (a copy from the device failed) / KVS_ENOMEM with err set. */
static int cpu_recode(kvs_engine *e, job *j, const size_t sf[2], kvs_err *err)
{
    uint32_t L = kvs_codec_spec(j->k)->layers;
    size_t slot = (size_t)L * (sf[0] + sf[1]), cap = kvs_block_encoded_max(j->k, j->v, j->t);
    uint8_t *sec = kvs_trymalloc(slot), *blk = kvs_trymalloc(cap);
    int rc = 0;
    if (!sec || !blk)
        rc = kvs_err_set(err, KVS_ENOMEM, "GPU engine: out of memory");
    cudaError_t ce = cudaSuccess;
    if (rc == 0) {
        ce = cudaMemcpyAsync(sec, j->slot.in, slot, cudaMemcpyDeviceToHost, e->st);
        if (ce == cudaSuccess)
            ce = cudaStreamSynchronize(e->st);
        if (ce != cudaSuccess)
            rc = kvs_err_set(err, KVS_EINTERNAL, "GPU engine: copy from the GPU tier: %s (%s)",
                             cudaGetErrorString(ce), cudaGetErrorName(ce));
    }
    if (rc == 0) {
        size_t n = kvs__engine_frame_block(j, sec, sf[0], j->lens.in, sec + L * sf[0], sf[1],
                                           j->lens.in + L, blk);
        kvs_err e2;
        if (kvs_block_transcode(j->k, j->v, j->k2, j->v2, blk, n, j->out, j->cap, j->len, &e2)) {
            memcpy(j->out, blk, n); /* as it was: its header says so */
            *j->len = n;
        }
    }
    free(sec);
    free(blk);
    return rc;
}

/* One side of one block: its L sections in the slot (src, at stride sf, lengths inlen on
 * the host) re-encoded from `from` to `to` into the pinned staging at dst (stride st), the
 * new lengths into outlen; *flagged when a kernel flagged a section. */
static int recode_side(kvs_engine *e, const kvs_codec *from, const kvs_codec *to, uint32_t L,
                       uint32_t t, const uint8_t *src, size_t sf, const uint32_t *inlen,
                       uint8_t *dst, size_t st, uint32_t *outlen, bool *flagged, kvs_err *err)
{
    bool ffix = kvs_codec_cuda_fixed_size(from), tfix = kvs_codec_cuda_fixed_size(to);
    if (!ffix) { /* decode reads each section's length: through the pinned h_len */
        memcpy(e->h_len, inlen, L * sizeof *e->h_len);
        KVS_CUDA_CHECK(cudaMemcpyAsync(e->d_len, e->h_len, L * sizeof *e->h_len,
                                       cudaMemcpyHostToDevice, e->st),
                       err);
    }
    KVS_CUDA_CHECK(cudaMemsetAsync(e->d_bad, 0xFF, 2 * sizeof *e->d_bad, e->st), err);
    kvs_cuda_sections ds = {.n = L,
                            .t = t,
                            .layer = e->d_layers,
                            .raw_out = (uint16_t *)e->d_raw,
                            .enc = src,
                            .stride = sf,
                            .bad = e->d_bad,
                            .len = ffix ? NULL : e->d_len};
    kvs_cuda_sections es = {.n = L,
                            .t = t,
                            .layer = e->d_layers,
                            .raw = (const uint16_t *)e->d_raw,
                            .enc_out = e->d_enc,
                            .stride = st,
                            .bad = e->d_bad + 1,
                            .len_out = tfix ? NULL : e->d_len + L};
    int rc;
    if ((rc = kvs_codec_decode_cuda(from, &ds, e->st, err)) ||
        (rc = kvs_codec_encode_cuda(to, &es, e->st, err)))
        return rc;
    KVS_CUDA_CHECK(cudaMemcpyAsync(dst, e->d_enc, L * st, cudaMemcpyDeviceToHost, e->st), err);
    if (!tfix)
        KVS_CUDA_CHECK(cudaMemcpyAsync(e->h_len + L, e->d_len + L, L * sizeof *e->h_len,
                                       cudaMemcpyDeviceToHost, e->st),
                       err);
    KVS_CUDA_CHECK(
        cudaMemcpyAsync(e->h_bad, e->d_bad, 2 * sizeof *e->d_bad, cudaMemcpyDeviceToHost, e->st),
        err);
    KVS_CUDA_CHECK(cudaStreamSynchronize(e->st), err);
    *flagged = e->h_bad[0] != ~0ull || e->h_bad[1] != ~0ull;
    for (uint32_t l = 0; l < L; l++)
        outlen[l] = tfix ? (uint32_t)st : e->h_len[L + l];
    return 0;
}

int kvs__engine_do_recode(kvs_engine *e, job *list, uint32_t nb)
{
    (void)nb;
    const kvs_codec *from[2] = {list->k, list->v}, *to[2] = {list->k2, list->v2};
    uint32_t L = kvs_codec_spec(list->k)->layers, t = list->t;
    size_t sf[2], st[2];
    for (int s = 0; s < 2; s++) {
        sf[s] = kvs_codec_section_max(from[s], t);
        st[s] = kvs_codec_section_max(to[s], t);
    }
    size_t per_block = (size_t)L * (st[0] + st[1]); /* one block's place in h_enc */
    kvs_err err;
    kvs_err_clear(&err);
    for (uint32_t l = 0; l < L; l++)
        e->h_layers[l] = l;
    cudaError_t ce = cudaMemcpyAsync(e->d_layers, e->h_layers, L * sizeof *e->h_layers,
                                     cudaMemcpyHostToDevice, e->st);
    if (ce != cudaSuccess) {
        kvs_err_set(&err, KVS_EINTERNAL, "GPU engine: cudaMemcpyAsync: %s (%s)",
                    cudaGetErrorString(ce), cudaGetErrorName(ce));
        kvs__engine_fail_all(list, KVS_EINTERNAL, &err);
        return KVS_EINTERNAL;
    }
    uint32_t lens[2][KVS_MAX_LAYERS];
    uint32_t b = 0;
    for (job *j = list, *next; j; j = next, b++) {
        next = j->next;
        uint8_t *h[2] = {e->h_enc + b * per_block, e->h_enc + b * per_block + L * st[0]};
        bool flagged = false;
        int rc = 0;
        for (int s = 0; s < 2 && rc == 0 && !flagged; s++) {
            const uint8_t *src = j->slot.in + (s ? L * sf[0] : 0);
            const uint32_t *inlen = j->lens.in + (s ? L : 0);
            if (from[s] == to[s]) { /* kept: the slot's sections as they are */
                ce = cudaMemcpyAsync(h[s], src, L * sf[s], cudaMemcpyDeviceToHost, e->st);
                if (ce == cudaSuccess)
                    ce = cudaStreamSynchronize(e->st);
                if (ce != cudaSuccess)
                    rc = kvs_err_set(&err, KVS_EINTERNAL,
                                     "GPU engine: copy from the GPU tier: %s (%s)",
                                     cudaGetErrorString(ce), cudaGetErrorName(ce));
                memcpy(lens[s], inlen, L * sizeof *inlen);
                continue;
            }
            rc = recode_side(e, from[s], to[s], L, t, src, sf[s], inlen, h[s], st[s], lens[s],
                             &flagged, &err);
        }
        /* kvs_block_encode's safety net, for sections the kernels wrote. */
        for (uint32_t l = 0; l < L && rc == 0 && !flagged; l++)
            for (int s = 0; s < 2 && !flagged; s++)
                if (from[s] != to[s] &&
                    kvs_codec_check_section(to[s], l, t, h[s] + l * st[s], lens[s][l], NULL))
                    flagged = true;
        if (rc == KVS_EINTERNAL) { /* the device: the engine looks at it (engine.c) */
            kvs__engine_fail_all(j, rc, &err);
            return rc;
        }
        /* Flagged, or a launch the codec refused (not the device's fault): the CPU. */
        if ((rc == 0 && flagged) || rc)
            rc = cpu_recode(e, j, sf, &err);
        else if (rc == 0) {
            job f = *j; /* framed with the new codecs */
            f.k = j->k2;
            f.v = j->v2;
            *j->len =
                kvs__engine_frame_block(&f, h[0], st[0], lens[0], h[1], st[1], lens[1], j->out);
        }
        if (rc == KVS_EINTERNAL) {
            kvs__engine_fail_all(j, rc, &err);
            return rc;
        }
        kvs__engine_finish(j, rc, rc ? &err : NULL);
    }
    return 0;
}
