/* GPU dispatch of the codecs: see codec_cuda.h. The launchers live in
 * gpu/codec/codec_<name>.cu; this table, by codec family, is the only place that names
 * them, so the CPU library (kvs_codec) links without CUDA. Built without CUDA, the table
 * is empty and every function answers KVS_ENOTSUP. */
#include "gpu/codec/codec_cuda.h"

#include <string.h>

#ifdef KVS_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

#include "gpu/codec/codec_int.h"

typedef struct cuda_ops {
    const char *family;                         /* kvs_codec_ops.family */
    bool (*supported)(const kvs_codec *c);      /* NULL: every layout the codec takes */
    int (*prepare)(kvs_codec *c, kvs_err *err); /* NULL: no device tables */
    void (*release)(kvs_codec *c);
    int (*encode)(const kvs_codec *c, const kvs_cuda_sections *s, void *stream, kvs_err *err);
    int (*decode)(const kvs_codec *c, const kvs_cuda_sections *s, void *stream, kvs_err *err);
} cuda_ops;

static const cuda_ops table[] = {
#ifdef KVS_HAVE_CUDA
    {"none", NULL, NULL, NULL, kvs__none_encode_cuda, kvs__none_decode_cuda},
    /* fp8: the kernels take any head_dim (a multiple of 16). */
    {"fp8", NULL, NULL, NULL, kvs__fp8_encode_cuda, kvs__fp8_decode_cuda},
    {"kivi", kvs__kivi_cuda_supported, NULL, NULL, kvs__kivi_encode_cuda, kvs__kivi_decode_cuda},
    {"polarquant", kvs__polarquant_cuda_supported, kvs__polarquant_cuda_prepare,
     kvs__polarquant_cuda_release, kvs__polarquant_encode_cuda, kvs__polarquant_decode_cuda},
    {"rotatekv", kvs__rotatekv_cuda_supported, kvs__rotatekv_cuda_prepare,
     kvs__rotatekv_cuda_release, kvs__rotatekv_encode_cuda, kvs__rotatekv_decode_cuda},
    /* SQuat's bytes are KIVI bytes: KIVI's decode. */
    {"squat", kvs__squat_cuda_supported, kvs__squat_cuda_prepare, kvs__squat_cuda_release,
     kvs__squat_encode_cuda, kvs__kivi_decode_cuda},
#endif
    {NULL, NULL, NULL, NULL, NULL, NULL},
};

static const cuda_ops *ops_of(const kvs_codec *c)
{
    for (const cuda_ops *o = table; o->family; o++)
        if (!strcmp(o->family, c->ops->family))
            return o;
    return NULL;
}

bool kvs_codec_cuda_supported(const kvs_codec *c)
{
    const cuda_ops *o = ops_of(c);
    return o && (!o->supported || o->supported(c));
}

bool kvs_codec_cuda_fixed_size(const kvs_codec *c)
{
    return !c->ops->variable_size;
}

int kvs__cuda_device(void)
{
    int d = 0;
#ifdef KVS_HAVE_CUDA
    if (cudaGetDevice(&d) != cudaSuccess || d < 0 || d >= KVS_CODEC_CUDA_DEVICES)
        d = 0; /* prepare refused such a device: its slot 0 lookup finds another's or none */
#endif
    return d;
}

bool kvs_codec_cuda_ready(const kvs_codec *c, int device)
{
    const cuda_ops *o = ops_of(c);
    return o && (!o->supported || o->supported(c)) &&
           (!o->prepare ||
            (device >= 0 && device < KVS_CODEC_CUDA_DEVICES && c->priv_cuda[device]));
}

/* c->cuda_release: each device's tables, freed with that device current. */
static void release_all(kvs_codec *c)
{
#ifdef KVS_HAVE_CUDA
    const cuda_ops *o = ops_of(c);
    int cur = 0;
    bool have_cur = cudaGetDevice(&cur) == cudaSuccess;
    for (int d = 0; o && o->release && d < KVS_CODEC_CUDA_DEVICES; d++)
        if (c->priv_cuda[d] && cudaSetDevice(d) == cudaSuccess)
            o->release(c);
    if (have_cur)
        cudaSetDevice(cur);
#else
    (void)c;
#endif
}

static int unsupported(const kvs_codec *c, kvs_err *err)
{
    return kvs_err_set(err, KVS_ENOTSUP,
                       "%s: no CUDA kernels for this codec and layout "
                       "(head_dim %u) in this build",
                       c->ops->family, c->spec.head_dim);
}

int kvs_codec_cuda_prepare(kvs_codec *c, kvs_err *err)
{
    if (!kvs_codec_cuda_supported(c))
        return unsupported(c, err);
    const cuda_ops *o = ops_of(c);
    if (!o->prepare)
        return 0;
    int d = -1;
#ifdef KVS_HAVE_CUDA
    cudaError_t ce = cudaGetDevice(&d);
    if (ce != cudaSuccess)
        return kvs_err_set(err, KVS_EINTERNAL, "%s: cudaGetDevice: %s", c->ops->family,
                           cudaGetErrorString(ce));
#endif
    if (d < 0 || d >= KVS_CODEC_CUDA_DEVICES)
        return kvs_err_set(err, KVS_ENOTSUP, "%s: device %d: tables are kept for devices 0..%d",
                           c->ops->family, d, KVS_CODEC_CUDA_DEVICES - 1);
    if (c->priv_cuda[d])
        return 0;
    int rc = o->prepare(c, err);
    if (rc == 0)
        c->cuda_release = release_all; /* kvs_codec_destroy calls it */
    return rc;
}

static int check(const kvs_codec *c, const kvs_cuda_sections *s, kvs_err *err)
{
    if (!kvs_codec_cuda_supported(c))
        return unsupported(c, err);
    if (ops_of(c)->prepare && !KVS__CUDA_TAB(c))
        return kvs_err_set(err, KVS_EINVAL, "%s: kvs_codec_cuda_prepare was not called",
                           c->ops->family);
    if (s->t == 0 || s->t > c->spec.block_tokens)
        return kvs_err_set(err, KVS_EINVAL, "tokens: %u not in 1..%u", s->t, c->spec.block_tokens);
    if (s->stride < kvs_codec_section_max(c, s->t))
        return kvs_err_set(err, KVS_EINVAL, "stride: %zu below the section size %zu", s->stride,
                           kvs_codec_section_max(c, s->t));
    return 0;
}

int kvs_codec_encode_cuda(const kvs_codec *c, const kvs_cuda_sections *s, void *stream,
                          kvs_err *err)
{
    int rc = check(c, s, err);
    if (rc == 0 && c->ops->variable_size && !s->len_out)
        return kvs_err_set(err, KVS_EINVAL, "%s: sections vary in size: len_out is required",
                           c->ops->family);
    return rc ? rc : (s->n ? ops_of(c)->encode(c, s, stream, err) : 0);
}

int kvs_codec_decode_cuda(const kvs_codec *c, const kvs_cuda_sections *s, void *stream,
                          kvs_err *err)
{
    int rc = check(c, s, err);
    if (rc == 0 && c->ops->variable_size && !s->len)
        return kvs_err_set(err, KVS_EINVAL, "%s: sections vary in size: len is required",
                           c->ops->family);
    return rc ? rc : (s->n ? ops_of(c)->decode(c, s, stream, err) : 0);
}
