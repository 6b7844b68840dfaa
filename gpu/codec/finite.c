/* The codecs' shared NaN/Inf checks and their messages (codec_int.h): the input check of
 * the generic encode path and of codecs with their own (kvs__check_finite), and the error
 * for a parameter a codec computed that is not finite (kvs__field_nonfinite). Below both
 * the codec base (codec.c) and every codec_<name>.c, which call it: codec.c -> codec_<name>.c
 * -> finite.c, no file calling back up.
 */
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "gpu/codec/codec_int.h"
#include "gpu/codec/half.h"

int kvs__nonfinite_at(const kvs_codec *c, uint32_t layer, size_t i, float x, kvs_err *err)
{
    size_t hd = (size_t)c->spec.kv_heads * c->spec.head_dim;
    return kvs_err_set(err, KVS_EINVAL,
                       "payload: %s at layer %u, %s, token %zu, head %zu, "
                       "channel %zu",
                       isnan(x) ? "NaN" : (x < 0 ? "-Inf" : "+Inf"), layer,
                       c->kv == KVS_KEYS ? "K" : "V", i / hd, i % hd / c->spec.head_dim,
                       i % c->spec.head_dim);
}

/* True if some element of in[0..n) has every bit of `mask` (an exponent field without the
 * sign bit) set. Four elements per 64-bit word: a lane of t = (w & m) ^ m is zero exactly
 * when its exponent is all ones, and since no lane of t has bit 15 set, the classic
 * zero-lane test ((t - 1s) & ~t & 0x8000s) is non-zero exactly when one is (a borrow can
 * only flag a lane above a zero one). Measured on every Put's payload: the per-element loop
 * it replaces was the daemon's largest user of CPU time (10% of a 128 KiB Put, more than
 * the copies), as compilers at -O2 do not vectorize it. */
static bool any_all_ones(const uint16_t *in, size_t n, uint16_t mask)
{
    const uint64_t m = mask * 0x0001000100010001ull;
    const uint64_t ones = 0x0001000100010001ull, high = 0x8000800080008000ull;
    uint64_t acc = 0;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w0, w1;
        memcpy(&w0, in + i, 8);
        memcpy(&w1, in + i + 4, 8);
        uint64_t t0 = (w0 & m) ^ m, t1 = (w1 & m) ^ m;
        acc |= ((t0 - ones) & ~t0 & high) | ((t1 - ones) & ~t1 & high);
    }
    for (; i < n; i++)
        acc |= (in[i] & mask) == mask;
    return acc != 0;
}

int kvs__check_finite(const kvs_codec *c, uint32_t layer, uint32_t t, const uint16_t *in,
                      kvs_err *err)
{
    /* fp16 and bf16 both mark NaN/Inf with an all-ones exponent. */
    bool bf16 = c->spec.dtype == KVS_DTYPE_BF16;
    const uint16_t mask = bf16 ? 0x7F80 : 0x7C00;
    size_t n = (size_t)t * c->spec.kv_heads * c->spec.head_dim;
    if (!any_all_ones(in, n, mask))
        return 0;
    for (size_t i = 0; i < n; i++)
        if ((in[i] & mask) == mask)
            return kvs__nonfinite_at(c, layer, i,
                                     bf16 ? kvs_bf16_to_f32(in[i]) : kvs_fp16_to_f32(in[i]), err);
    return 0;
}

int kvs__field_nonfinite(const kvs_codec *c, uint32_t layer, kvs_err *err, const char *fmt, ...)
{
    char what[160];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    return kvs_err_set(err, KVS_EINVAL, "encode: layer %u, %s: %s is not finite (overflow)", layer,
                       c->kv == KVS_KEYS ? "K" : "V", what);
}
