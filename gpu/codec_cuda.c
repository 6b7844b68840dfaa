/* GPU dispatch of the codecs: see codec_cuda.h. The per-codec launchers live in
 * gpu/codec_<name>.cu and are reached through the ops table. */
#include "gpu/codec_cuda.h"

#include "gpu/codec_int.h"

bool kvs_codec_cuda_supported(const kvs_codec *c)
{
    return c->ops->encode_cuda && c->ops->decode_cuda &&
           (!c->ops->cuda_supported || c->ops->cuda_supported(c));
}

bool kvs_codec_cuda_fixed_size(const kvs_codec *c)
{
    return !c->ops->variable_size;
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
    if (c->priv_cuda || !c->ops->cuda_prepare)
        return 0;
    return c->ops->cuda_prepare(c, err);
}

static int check(const kvs_codec *c, const kvs_cuda_sections *s, kvs_err *err)
{
    if (!kvs_codec_cuda_supported(c))
        return unsupported(c, err);
    if (c->ops->cuda_prepare && !c->priv_cuda)
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
    return rc ? rc : (s->n ? c->ops->encode_cuda(c, s, stream, err) : 0);
}

int kvs_codec_decode_cuda(const kvs_codec *c, const kvs_cuda_sections *s, void *stream,
                          kvs_err *err)
{
    int rc = check(c, s, err);
    if (rc == 0 && c->ops->variable_size && !s->len)
        return kvs_err_set(err, KVS_EINVAL, "%s: sections vary in size: len is required",
                           c->ops->family);
    return rc ? rc : (s->n ? c->ops->decode_cuda(c, s, stream, err) : 0);
}
