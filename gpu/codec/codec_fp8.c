/* `fp8` (quantizers.md `fp8`; quantizers-reference.md §5.2): e4m3fn codes with one fp32
 * scale per (layer, K/V, kv-head) of the block section. CPU reference.
 *
 * Encode, per head h of the section: scale_h = max|x| / 448 over the head's t*D values
 * (448 = largest finite e4m3fn), code = fp8_e4m3fn(x / scale_h) rounded to nearest even
 * with saturation to +-448 (gpu/half.h kvs_f32_to_fp8, the __NV_SATFINITE behaviour).
 * A head whose values are all zero gets scale 0 and codes 0, and decodes to exact zeros.
 * Decode: x^ = fp8_value(code) * scale_h (one fp32 multiply, no fma).
 *
 * Difference from vLLM (state it in benchmarks): vLLM keeps one k_scale and one v_scale
 * per attention layer for the whole cache (1.0, calibrated, or amax/200 for K and
 * amax/100 for V computed once from the first batch); kvstash computes amax/448 per
 * block, layer, K/V and kv-head, which is finer and never clips.
 *
 * Section layout (little-endian, t tokens, H heads, D channels):
 *     offset 0      H x fp32   scale of head 0..H-1
 *     offset 4H     t*H*D x u8 e4m3fn codes, row-major [t][H][D] (the input order)
 * Size 4H + t*H*D bytes, exactly: 8 + 32/(t*D) bits/element.
 */
#include <float.h>
#include <math.h>
#include <string.h>

#include "gpu/codec/codec_int.h"
#include "gpu/codec/half.h"

#define FP8_MAX 448.0f

static size_t fp8_size(const kvs_codec *c, uint32_t t)
{
    return 4 * (size_t)c->spec.kv_heads + (size_t)t * c->spec.kv_heads * c->spec.head_dim;
}

static void put_f32(uint8_t *p, float f)
{
    uint32_t u = kvs_f32_bits(f);
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(u >> (8 * i));
}

static float get_f32(const uint8_t *p)
{
    return kvs_bits_f32((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
                        (uint32_t)p[3] << 24);
}

static int fp8_encode(const kvs_codec *c, uint32_t layer, uint32_t t, const float *in, uint8_t *out,
                      size_t cap, size_t *len, kvs_err *err)
{
    uint32_t H = c->spec.kv_heads, D = c->spec.head_dim;
    size_t n = fp8_size(c, t);
    if (cap < n)
        return kvs_err_set(err, KVS_ENOSPC, "fp8: output buffer too small (%zu < %zu)", cap, n);
    uint8_t *codes = out + 4 * (size_t)H;
    for (uint32_t h = 0; h < H; h++) {
        float amax = 0.0f;
        for (uint32_t tok = 0; tok < t; tok++) {
            const float *x = in + ((size_t)tok * H + h) * D;
            for (uint32_t j = 0; j < D; j++)
                amax = fmaxf(amax, fabsf(x[j]));
        }
        float scale = amax / FP8_MAX;
        /* Unreachable for finite input (amax <= 3.4e38), kept so that no range check of
         * any codec lets a non-finite parameter through (NaN fails the comparison). */
        if (!(scale <= FLT_MAX))
            return kvs_err_set(err, KVS_EINVAL,
                               "payload: layer %u, %s, head %u: fp8 scale (max |x| / 448) "
                               "overflows fp32",
                               layer, c->kv == KVS_KEYS ? "K" : "V", h);
        put_f32(out + 4 * (size_t)h, scale);
        for (uint32_t tok = 0; tok < t; tok++) {
            size_t base = ((size_t)tok * H + h) * D;
            for (uint32_t j = 0; j < D; j++)
                codes[base + j] = scale == 0.0f ? 0 : kvs_f32_to_fp8(in[base + j] / scale);
        }
    }
    *len = n;
    return 0;
}

static int fp8_decode(const kvs_codec *c, uint32_t layer, uint32_t t, const uint8_t *in, size_t len,
                      float *out, kvs_err *err)
{
    uint32_t H = c->spec.kv_heads, D = c->spec.head_dim;
    size_t n = fp8_size(c, t);
    if (len != n)
        return kvs_err_set(err, KVS_EPROTO, "fp8: section of %zu bytes, expected %zu for %u tokens",
                           len, n, t);
    const uint8_t *codes = in + 4 * (size_t)H;
    for (uint32_t h = 0; h < H; h++) {
        float scale = get_f32(in + 4 * (size_t)h);
        for (uint32_t tok = 0; tok < t; tok++) {
            size_t base = ((size_t)tok * H + h) * D;
            for (uint32_t j = 0; j < D; j++)
                out[base + j] = kvs_fp8_to_f32(codes[base + j]) * scale;
        }
    }
    return 0;
}

/* Safety net (kvs_codec_check_section): the fp32 scales and the e4m3fn codes, whose
 * 0x7F/0xFF are NaN (the encoder saturates finite values to +-448 and never writes one). */
static int fp8_check(const kvs_codec *c, uint32_t layer, uint32_t t, const uint8_t *sec, size_t len,
                     kvs_err *err)
{
    uint32_t H = c->spec.kv_heads, D = c->spec.head_dim;
    if (len != fp8_size(c, t))
        return kvs_err_set(err, KVS_EPROTO, "fp8: section of %zu bytes, expected %zu for %u tokens",
                           len, fp8_size(c, t), t);
    for (uint32_t h = 0; h < H; h++)
        if ((kvs_f32_bits(get_f32(sec + 4 * (size_t)h)) & 0x7F800000u) == 0x7F800000u)
            return kvs__field_nonfinite(c, layer, err, "fp32 scale of head %u", h);
    const uint8_t *codes = sec + 4 * (size_t)H;
    size_t n = (size_t)t * H * D;
    unsigned bad = 0;
    for (size_t i = 0; i < n; i++) /* branch-free: vectorizes */
        bad |= (codes[i] & 0x7F) == 0x7F;
    for (size_t i = 0; bad && i < n; i++)
        if ((codes[i] & 0x7F) == 0x7F)
            return kvs__field_nonfinite(c, layer, err,
                                        "e4m3fn code of token %zu, head %zu, channel %zu",
                                        i / ((size_t)H * D), i / D % H, i % D);
    return 0;
}

const kvs_codec_ops kvs__codec_fp8_ops = {
    .family = "fp8",
    .section_max = fp8_size,
    .encode = fp8_encode,
    .decode = fp8_decode,
    .check_section = fp8_check,
    .decode_ignores_state = true,
};
