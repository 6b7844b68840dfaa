/* `none` (quantizers.md): stores the input elements unchanged, 16 bits/element; the
 * round trip is bit-exact. It works on the raw 16-bit elements (no fp32 round trip). */
#include <string.h>

#include "gpu/codec/codec_int.h"

static size_t none_max(const kvs_codec *c, uint32_t t)
{
    return (size_t)t * c->spec.kv_heads * c->spec.head_dim * 2;
}

/* The stored bytes are the input elements, little-endian (this build targets
 * little-endian hosts, like every CUDA host). */
static int none_encode_raw(const kvs_codec *c, uint32_t layer, uint32_t t, const uint16_t *in,
                           uint8_t *out, size_t cap, size_t *len, kvs_err *err)
{
    size_t n = none_max(c, t);
    if (cap < n)
        return kvs_err_set(err, KVS_ENOSPC, "none: output buffer too small");
    int rc = kvs__check_finite(c, layer, t, in, err);
    if (rc)
        return rc;
    memcpy(out, in, n);
    *len = n;
    return 0;
}

static int none_decode_raw(const kvs_codec *c, uint32_t layer, uint32_t t, const uint8_t *in,
                           size_t len, uint16_t *out, kvs_err *err)
{
    if (len != none_max(c, t))
        return kvs_err_set(err, KVS_EPROTO, "none: section of %zu bytes, expected %zu", len,
                           none_max(c, t));
    memcpy(out, in, len);
    return 0;
}

const kvs_codec_ops kvs__codec_none_ops = {
    .family = "none",
    .section_max = none_max,
    .encode_raw = none_encode_raw,
    .decode_raw = none_decode_raw,
    .decode_ignores_state = true,
};
