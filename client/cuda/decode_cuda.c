/* libkvstash_cuda: see include/kvstash_cuda.h.
 *
 * One block: its checksum and header are checked on the host (kvs_block_parse), the bytes
 * are copied to a device staging buffer in one copy, and each of the 2L sections is decoded
 * by the codec's kernel straight into its place in the raw layout ([L][2][t][H][D]: the
 * K section of layer l at (2l) t H D elements, V at (2l+1) t H D), so there is no host
 * decode and no device-side reshuffle.
 */
#include "kvstash_cuda.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/base/mem.h"
#include "gpu/codec/codec.h"
#include "gpu/codec/codec_cuda.h"
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
    uint8_t *enc_dev; /* staging for one encoded block */
    size_t enc_cap;
    uint32_t *lens_dev;   /* 2L section lengths */
    uint32_t *layers_dev; /* 0..L-1: the kernels' per-section layer index */
};

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
    uint32_t layers[KVS_MAX_LAYERS];
    for (uint32_t l = 0; l < spec->layers; l++)
        layers[l] = l;
    if ((e = cudaStreamCreateWithFlags(&d->own, cudaStreamNonBlocking)) != cudaSuccess ||
        (e = cudaMalloc((void **)&d->lens_dev, 2 * spec->layers * sizeof(uint32_t))) !=
            cudaSuccess ||
        (e = cudaMalloc((void **)&d->layers_dev, spec->layers * sizeof(uint32_t))) != cudaSuccess ||
        (e = cudaMemcpy(d->layers_dev, layers, spec->layers * sizeof(uint32_t),
                        cudaMemcpyHostToDevice)) != cudaSuccess) {
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
    cudaFree(d->enc_dev);
    cudaFree(d->lens_dev);
    cudaFree(d->layers_dev);
    if (d->own)
        cudaStreamDestroy(d->own);
    free(d);
}

int kvs_decode_block_cuda(kvs_cuda_decoder *d, const void *enc, size_t len, void *raw_dev,
                          size_t cap, void *stream, kvs_get_result *res, kvs_err *err)
{
    kvs_err_clear(err);
    if (!d || !enc || !raw_dev)
        return kvs_err_set(err, KVS_EINVAL, "decode on the GPU: NULL argument");
    kvs_block_info info;
    int rc = kvs_format_peek(enc, len, &info, err);
    const kvs_codec *k, *v;
    unsigned roles = rc ? 0 : kvs_block_encodings(&d->spec, &info);
    kvs_enc rk = kvs_enc_side(roles, KVS_KEYS), rv = kvs_enc_side(roles, KVS_VALUES);
    if (rc || (rc = role_at(d, KVS_KEYS, rk, info.k_state, &k, err)) ||
        (rc = role_at(d, KVS_VALUES, rv, info.v_state, &v, err)) ||
        (rc = kvs_block_parse(k, v, enc, len, KVS_BLOCK_UNTRUSTED, &info, err)))
        return rc;
    const kvs_ns_spec *s = &d->spec;
    uint64_t need;
    if ((rc = kvs_spec_block_bytes(s, info.tokens, &need, err)))
        return rc;
    if (need > cap)
        return kvs_err_set(err, KVS_E2BIG,
                           "decode on the GPU: block needs %llu bytes, buffer "
                           "has %zu",
                           (unsigned long long)need, cap);
    cudaStream_t st = stream ? (cudaStream_t)stream : d->own;
    cudaError_t e;
    /* The kernels check that a section's stride covers its largest size (RotateKV's sections
     * vary), so the staging has room for the last section at that size. */
    size_t smax_k = kvs_codec_section_max(k, info.tokens),
           smax_v = kvs_codec_section_max(v, info.tokens);
    size_t need_enc = len + (smax_k > smax_v ? smax_k : smax_v);
    if (need_enc > d->enc_cap) {
        cudaFree(d->enc_dev);
        d->enc_dev = NULL;
        d->enc_cap = 0;
        if ((e = cudaMalloc((void **)&d->enc_dev, need_enc)) != cudaSuccess)
            return cuda_err(err, e, "staging");
        d->enc_cap = need_enc;
    }
    uint32_t lens[2 * KVS_MAX_LAYERS];
    size_t offs[2 * KVS_MAX_LAYERS];
    for (uint32_t l = 0; l < s->layers; l++)
        for (unsigned kv = 0; kv < 2; kv++) {
            const uint8_t *p;
            size_t n;
            kvs_format_section(enc, l, kv, &p, &n);
            offs[2 * l + kv] = (size_t)(p - (const uint8_t *)enc);
            lens[2 * l + kv] = (uint32_t)n;
        }
    if ((e = cudaMemcpyAsync(d->enc_dev, enc, len, cudaMemcpyHostToDevice, st)) != cudaSuccess ||
        (e = cudaMemcpyAsync(d->lens_dev, lens, 2 * s->layers * sizeof *lens,
                             cudaMemcpyHostToDevice, st)) != cudaSuccess)
        return cuda_err(err, e, "copy to the device");
    size_t sec = (size_t)info.tokens * s->kv_heads * s->head_dim; /* elements */
    for (uint32_t l = 0; l < s->layers && rc == 0; l++)
        for (unsigned kv = 0; kv < 2 && rc == 0; kv++) {
            const kvs_codec *c = kv ? v : k;
            kvs_cuda_sections q = {
                .n = 1,
                .t = info.tokens,
                .layer = d->layers_dev + l,
                .raw_out = (uint16_t *)raw_dev + (2 * l + kv) * sec,
                .enc = d->enc_dev + offs[2 * l + kv],
                .stride = kv ? smax_v : smax_k, /* one section per launch: only checked */
                .len = kvs_codec_cuda_fixed_size(c) ? NULL : d->lens_dev + 2 * l + kv,
            };
            rc = kvs_codec_decode_cuda(c, &q, st, err);
        }
    /* Synchronized before returning: lens and the staging are reused by the next call. */
    if ((e = cudaStreamSynchronize(st)) != cudaSuccess && rc == 0)
        rc = cuda_err(err, e, "decode");
    if (rc == 0 && res) {
        *res = (kvs_get_result){.tokens = info.tokens,
                                .dtype = (kvs_dtype)info.dtype,
                                .layer_begin = 0,
                                .layer_end = s->layers,
                                .bytes = need,
                                .format = KVS_FORMAT_RAW,
                                .tier = KVS_TIER_NONE,
                                .fallback = kvs_enc_fallback(roles) != 0};
        snprintf(res->key_codec, sizeof res->key_codec, "%s", kvs_spec_enc_codec(s, KVS_KEYS, rk));
        snprintf(res->value_codec, sizeof res->value_codec, "%s",
                 kvs_spec_enc_codec(s, KVS_VALUES, rv));
    }
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
#endif
