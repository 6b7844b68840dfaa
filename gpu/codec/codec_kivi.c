/* `kivi-2`, `kivi-4` (quantizers.md `kivi-2`; quantizers-reference.md §5.1, §9.1-9.2):
 * keys per-channel, values per-token, asymmetric min-max groups. CPU reference.
 *
 * Quantizer (KIVI form, gpu/codec/quant.h): per group scale = (max - min)/(2^b - 1), lo = min,
 * both rounded to fp16 before the codes are computed, q = rint(clamp((x - lo)/scale, 0,
 * 2^b - 1)) (half to even), x^ = lo + q*scale. A constant group stores scale 0, codes 0
 * and decodes exactly (for fp16 input; bf16 input is exact whenever min fits fp16).
 *
 * Groups (our choice, KIVI's own default and the one of the reference numbers §6):
 *  - keys: each (head, channel) over groups of G_k = min(32, t) consecutive tokens; when
 *    t > 32 is not a multiple of 32 the last group is shorter (t - 32*(nk-1) tokens);
 *  - values: each (token, head) vector in groups of G_v = min(32, D) channels; D is a
 *    multiple of 16, so the last group has 16 or 32 channels.
 * Bits/element = b + 32/G: kivi-2 3.0 at t >= 32 (multiple of 32) for K and V. For
 * blocks of t = 16 tokens the key groups are 16 long: keys 2 + 32/16 = 4.0 bits/elt
 * (values stay 3.0), average 3.5 — quantizers.md asks the bits table to show this.
 * KIVI's full-precision residual window is a decode-time device; a store has none.
 *
 * Section layout (little-endian; t tokens, H heads, D channels, b bits;
 * nk = ceil(t/G_k), nv = ceil(D/G_v)):
 *  key section
 *     codes   [H][D] rows; a row holds the channel's nk groups in token order, each
 *             group's codes packed LSB first (gpu/codec/bitpack.h) and padded to a whole byte:
 *             k_row = (nk-1)*(G_k*b/8) + ceil(last*b/8) bytes
 *     params  [H][D][nk] x {fp16 scale, fp16 lo}         (4 bytes each)
 *     size    H*D*(k_row + 4*nk)
 *  value section
 *     codes   [t][H] vectors of D*b/8 bytes: the nv groups in channel order, LSB first
 *     params  [t][H][nv] x {fp16 scale, fp16 lo}
 *     size    t*H*(D*b/8 + 4*nv)
 * The params plane starts at a multiple of 4 bytes (H*D*k_row and t*H*D*b/8 are, as D is
 * a multiple of 16), so a CUDA kernel can read each (scale, lo) pair as one uint32.
 * Range overflow: a group whose min or scale overflows fp16 (only bf16 input beyond
 * +-65504, or SQuat's compensated values), or that holds a non-finite value (SQuat's
 * compensation; KIVI's input is checked finite), is rejected with KVS_EINVAL naming
 * layer, head and channel, rather than stored as Inf or NaN.
 */
#include "gpu/codec/codec_kivi.h"

#include <float.h>
#include <math.h>
#include <string.h>

#include "gpu/codec/bitpack.h"
#include "gpu/codec/quant.h"

void kvs__kivi_geom_init(kvs__kivi_geom *g, uint32_t t, uint32_t heads, uint32_t dim, unsigned bits)
{
    memset(g, 0, sizeof *g);
    g->t = t;
    g->heads = heads;
    g->dim = dim;
    g->bits = bits;
    g->gk = t < KVS_KIVI_GROUP ? t : KVS_KIVI_GROUP;
    g->nk = (t + g->gk - 1) / g->gk;
    g->gv = dim < KVS_KIVI_GROUP ? dim : KVS_KIVI_GROUP;
    g->nv = (dim + g->gv - 1) / g->gv;
    g->k_grp = kvs_bitpack_bytes(g->gk, bits);
    g->k_row = (size_t)(g->nk - 1) * g->k_grp +
               kvs_bitpack_bytes(kvs__kivi_key_group_len(g, g->nk - 1), bits);
    g->k_codes = (size_t)heads * dim * g->k_row;
    g->k_bytes = g->k_codes + (size_t)heads * dim * g->nk * 4;
    g->v_row = kvs_bitpack_bytes(dim, bits);
    g->v_codes = (size_t)t * heads * g->v_row;
    g->v_bytes = g->v_codes + (size_t)t * heads * g->nv * 4;
}

uint32_t kvs__kivi_key_group_len(const kvs__kivi_geom *g, uint32_t gi)
{
    uint32_t start = gi * g->gk;
    return g->t - start < g->gk ? g->t - start : g->gk;
}

static void put_params(uint8_t *p, kvs_minmax m)
{
    p[0] = (uint8_t)m.scale;
    p[1] = (uint8_t)(m.scale >> 8);
    p[2] = (uint8_t)m.lo;
    p[3] = (uint8_t)(m.lo >> 8);
}

static kvs_minmax get_params(const uint8_t *p)
{
    kvs_minmax m = {(uint16_t)(p[0] | p[1] << 8), (uint16_t)(p[2] | p[3] << 8)};
    return m;
}

/* Inf or NaN: both have the all-ones exponent. */
static int fp16_nonfinite(uint16_t h)
{
    return (h & 0x7C00) == 0x7C00;
}

/* Min-max quantization of n values x[i*stride] into packed codes `codes` and params
 * `par`; the decoded values go to xhat[i*stride] when xhat is not NULL. Returns false if
 * a parameter overflows fp16 or a value is not finite (the ordered min/max scan would
 * skip a NaN and code it as garbage). KIVI's own input was checked finite by
 * kvs_codec_encode; SQuat's compensated values were not. */
static int quant_group(const float *x, size_t stride, uint32_t n, unsigned bits, uint8_t *codes,
                       uint8_t *par, float *xhat)
{
    float mn = x[0], mx = x[0];
    int finite = fabsf(x[0]) <= FLT_MAX;
    for (uint32_t i = 1; i < n; i++) {
        float v = x[i * stride];
        mn = v < mn ? v : mn;
        mx = v > mx ? v : mx;
        finite &= fabsf(v) <= FLT_MAX;
    }
    kvs_minmax p = kvs_minmax_params(mn, mx, bits);
    if (!finite || fp16_nonfinite(p.scale) || fp16_nonfinite(p.lo))
        return 0;
    uint8_t q[KVS_KIVI_GROUP];
    for (uint32_t i = 0; i < n; i++) {
        q[i] = (uint8_t)kvs_minmax_code(p, x[i * stride], bits);
        if (xhat)
            xhat[i * stride] = kvs_minmax_decode(p, q[i]);
    }
    kvs_bitpack(q, n, bits, codes);
    put_params(par, p);
    return 1;
}

int kvs__kivi_key_group(const kvs__kivi_geom *g, uint8_t *sec, uint32_t layer, uint32_t h,
                        uint32_t j, uint32_t gi, const float *x, size_t stride, float *xhat,
                        kvs_err *err)
{
    size_t row = (size_t)h * g->dim + j;
    uint8_t *codes = sec + row * g->k_row + gi * g->k_grp;
    uint8_t *par = sec + g->k_codes + (row * g->nk + gi) * 4;
    if (!quant_group(x, stride, kvs__kivi_key_group_len(g, gi), g->bits, codes, par, xhat))
        return kvs_err_set(err, KVS_EINVAL,
                           "payload: layer %u, K, head %u, channel %u, tokens "
                           "%u..: range beyond the fp16 group parameters",
                           layer, h, j, gi * g->gk);
    return 0;
}

int kvs__kivi_encode_keys(const kvs__kivi_geom *g, uint32_t layer, const float *in, uint8_t *sec,
                          kvs_err *err)
{
    size_t stride = (size_t)g->heads * g->dim; /* next token, same (head, channel) */
    for (uint32_t h = 0; h < g->heads; h++)
        for (uint32_t j = 0; j < g->dim; j++)
            for (uint32_t gi = 0; gi < g->nk; gi++) {
                const float *x = in + (size_t)gi * g->gk * stride + (size_t)h * g->dim + j;
                int rc = kvs__kivi_key_group(g, sec, layer, h, j, gi, x, stride, NULL, err);
                if (rc)
                    return rc;
            }
    return 0;
}

int kvs__kivi_encode_values(const kvs__kivi_geom *g, uint32_t layer, const float *in, uint8_t *sec,
                            kvs_err *err)
{
    for (uint32_t tok = 0; tok < g->t; tok++)
        for (uint32_t h = 0; h < g->heads; h++) {
            size_t vec = (size_t)tok * g->heads + h;
            for (uint32_t gi = 0; gi < g->nv; gi++) {
                uint32_t j0 = gi * g->gv, n = g->dim - j0 < g->gv ? g->dim - j0 : g->gv;
                uint8_t *codes = sec + vec * g->v_row + kvs_bitpack_bytes(j0, g->bits);
                uint8_t *par = sec + g->v_codes + (vec * g->nv + gi) * 4;
                if (!quant_group(in + vec * g->dim + j0, 1, n, g->bits, codes, par, NULL))
                    return kvs_err_set(err, KVS_EINVAL,
                                       "payload: layer %u, V, token %u, head "
                                       "%u, channels %u..: range beyond the fp16 group "
                                       "parameters",
                                       layer, tok, h, j0);
            }
        }
    return 0;
}

void kvs__kivi_decode_keys(const kvs__kivi_geom *g, const uint8_t *sec, float *out)
{
    size_t stride = (size_t)g->heads * g->dim;
    for (uint32_t h = 0; h < g->heads; h++)
        for (uint32_t j = 0; j < g->dim; j++) {
            size_t row = (size_t)h * g->dim + j;
            for (uint32_t gi = 0; gi < g->nk; gi++) {
                const uint8_t *codes = sec + row * g->k_row + gi * g->k_grp;
                kvs_minmax p = get_params(sec + g->k_codes + (row * g->nk + gi) * 4);
                uint32_t n = kvs__kivi_key_group_len(g, gi);
                for (uint32_t i = 0; i < n; i++) {
                    size_t tok = (size_t)gi * g->gk + i;
                    out[tok * stride + row] =
                        kvs_minmax_decode(p, kvs_bitunpack1(codes, i, g->bits));
                }
            }
        }
}

void kvs__kivi_decode_values(const kvs__kivi_geom *g, const uint8_t *sec, float *out)
{
    for (size_t vec = 0; vec < (size_t)g->t * g->heads; vec++) {
        const uint8_t *codes = sec + vec * g->v_row;
        for (uint32_t j = 0; j < g->dim; j++) {
            kvs_minmax p = get_params(sec + g->v_codes + (vec * g->nv + j / g->gv) * 4);
            out[vec * g->dim + j] = kvs_minmax_decode(p, kvs_bitunpack1(codes, j, g->bits));
        }
    }
}

/* ---------------------------------------------------------------- ops */

static void geom_of(const kvs_codec *c, uint32_t t, kvs__kivi_geom *g)
{
    kvs__kivi_geom_init(g, t, c->spec.kv_heads, c->spec.head_dim, c->bits);
}

size_t kvs__kivi_section_max(const kvs_codec *c, uint32_t t)
{
    kvs__kivi_geom g;
    geom_of(c, t, &g);
    return c->kv == KVS_KEYS ? g.k_bytes : g.v_bytes;
}

int kvs__kivi_encode(const kvs_codec *c, uint32_t layer, uint32_t t, const float *in, uint8_t *out,
                     size_t cap, size_t *len, kvs_err *err)
{
    kvs__kivi_geom g;
    geom_of(c, t, &g);
    size_t n = c->kv == KVS_KEYS ? g.k_bytes : g.v_bytes;
    if (cap < n)
        return kvs_err_set(err, KVS_ENOSPC, "%s: output buffer too small (%zu < %zu)",
                           c->ops->family, cap, n);
    int rc = c->kv == KVS_KEYS ? kvs__kivi_encode_keys(&g, layer, in, out, err)
                               : kvs__kivi_encode_values(&g, layer, in, out, err);
    if (rc == 0)
        *len = n;
    return rc;
}

int kvs__kivi_decode(const kvs_codec *c, uint32_t layer, uint32_t t, const uint8_t *in, size_t len,
                     float *out, kvs_err *err)
{
    kvs__kivi_geom g;
    geom_of(c, t, &g);
    size_t n = c->kv == KVS_KEYS ? g.k_bytes : g.v_bytes;
    if (len != n)
        return kvs_err_set(err, KVS_EPROTO,
                           "%s: %s section of %zu bytes, expected %zu for %u "
                           "tokens",
                           c->ops->family, c->kv == KVS_KEYS ? "K" : "V", len, n, t);
    if (c->kv == KVS_KEYS)
        kvs__kivi_decode_keys(&g, in, out);
    else
        kvs__kivi_decode_values(&g, in, out);
    return 0;
}

int kvs__kivi_check_section(const kvs_codec *c, uint32_t layer, uint32_t t, const uint8_t *sec,
                            size_t len, kvs_err *err)
{
    kvs__kivi_geom g;
    geom_of(c, t, &g);
    bool keys = c->kv == KVS_KEYS;
    size_t n = keys ? g.k_bytes : g.v_bytes;
    if (len != n)
        return kvs_err_set(err, KVS_EPROTO,
                           "%s: %s section of %zu bytes, expected %zu for %u tokens",
                           c->ops->family, keys ? "K" : "V", len, n, t);
    /* the params plane: (scale, lo) pairs, keys [H][D][nk], values [t][H][nv] */
    const uint8_t *par = sec + (keys ? g.k_codes : g.v_codes);
    size_t pairs = keys ? (size_t)g.heads * g.dim * g.nk : (size_t)t * g.heads * g.nv;
    for (size_t i = 0; i < pairs; i++) {
        kvs_minmax p = get_params(par + 4 * i);
        if (!fp16_nonfinite(p.scale) && !fp16_nonfinite(p.lo))
            continue;
        const char *which = fp16_nonfinite(p.scale) ? "scale" : "minimum";
        if (keys)
            return kvs__field_nonfinite(c, layer, err,
                                        "fp16 group %s of head %zu, channel %zu, tokens %zu..",
                                        which, i / g.nk / g.dim, i / g.nk % g.dim, i % g.nk * g.gk);
        return kvs__field_nonfinite(c, layer, err,
                                    "fp16 group %s of token %zu, head %zu, channels %zu..", which,
                                    i / g.nv / g.heads, i / g.nv % g.heads, i % g.nv * g.gv);
    }
    return 0;
}

static int kivi_init(kvs_codec *c, kvs_err *err)
{
    if (c->bits < 2 || c->bits > 4)
        return kvs_err_set(err, KVS_EINVAL, "bits %u not supported (2, 3 or 4)", c->bits);
    return 0;
}

const kvs_codec_ops kvs__codec_kivi_ops = {
    .family = "kivi",
    .init = kivi_init,
    .section_max = kvs__kivi_section_max,
    .encode = kvs__kivi_encode,
    .decode = kvs__kivi_decode,
    .check_section = kvs__kivi_check_section,
    .decode_ignores_state = true,
};
