/* `none` (quantizers.md): stores the input elements unchanged, 16 bits/element. The
 * generic layer hands fp32 values that came from fp16/bf16, so converting back to the
 * namespace dtype is exact: the round trip is bit-exact. */
#include <string.h>

#include "gpu/codec_int.h"
#include "gpu/half.h"

static size_t none_max(const kvs_codec *c, uint32_t t)
{
    return (size_t)t * c->spec.kv_heads * c->spec.head_dim * 2;
}

static int none_encode(const kvs_codec *c, uint32_t layer, uint32_t t, const float *in,
                       uint8_t *out, size_t cap, size_t *len, kvs_err *err)
{
    size_t n = none_max(c, t) / 2;
    if (cap < 2 * n)
        return kvs_err_set(err, KVS_ENOSPC, "none: output buffer too small");
    bool bf16 = c->spec.dtype == KVS_DTYPE_BF16;
    for (size_t i = 0; i < n; i++) {
        uint16_t h = bf16 ? kvs_f32_to_bf16(in[i]) : kvs_f32_to_fp16(in[i]);
        out[2 * i] = (uint8_t)h;
        out[2 * i + 1] = (uint8_t)(h >> 8);
    }
    *len = 2 * n;
    return 0;
}

static int none_decode(const kvs_codec *c, uint32_t layer, uint32_t t, const uint8_t *in,
                       size_t len, float *out, kvs_err *err)
{
    size_t n = none_max(c, t) / 2;
    if (len != 2 * n)
        return kvs_err_set(err, KVS_EPROTO, "none: section of %zu bytes, expected %zu", len, 2 * n);
    bool bf16 = c->spec.dtype == KVS_DTYPE_BF16;
    for (size_t i = 0; i < n; i++) {
        uint16_t h = (uint16_t)(in[2 * i] | in[2 * i + 1] << 8);
        out[i] = bf16 ? kvs_bf16_to_f32(h) : kvs_fp16_to_f32(h);
    }
    return 0;
}

const kvs_codec_ops kvs__codec_none_ops = {
    .family = "none",
    .section_max = none_max,
    .encode = none_encode,
    .decode = none_decode,
};
