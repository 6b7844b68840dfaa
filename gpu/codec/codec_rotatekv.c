/* `rotatekv-2/-3/-4` (quantizers.md "rotatekv-2"; quantizers-reference.md §3): CPU
 * reference. Layout and state format: gpu/codec_rotatekv.h.
 *
 * Keys, per token (§3.2): the H*D vector ([H][D], head-major) is rotated by the
 * normalized FWHT of size G*D on each group of G = 4 consecutive kv-heads (largest power
 * of two <= 4 dividing H otherwise, §3.10), then permuted by the layer's calibrated
 * permutation (y[j] = r[p[j]]; identity at state version 0), then quantized per token in
 * groups of 128 consecutive channels of y. As in the reference code, rotation comes first
 * and the reordering only changes the grouping (§3.4; the abstract's wording suggests the
 * other order, the code does not). Groups of 128 span heads when D = 64 (§3.10).
 * Values, per token and head (§3.3): FWHT of size D, groups of min(D, 128) channels.
 * Quantizer (§3.2 step 4, §3.6, §9.1): RotateKV zero-point form of gpu/codec/quant.h with
 * maxq = 2^b - 1 (the reference's 3-bit maxq = bit**2 - 1 bug is not reproduced), clip
 * 0.8 for 2 bits and 1.0 for 3 and 4 bits, fp16 scale and lo = -z*scale per group,
 * rintf everywhere. Decode: lo + q*scale, inverse permutation, the same FWHT again
 * (self-inverse).
 *
 * RoPE (§3.8): with spec.keys_pre_rope the client sends pre-RoPE keys and re-applies
 * RoPE after Get; the codec itself never touches RoPE. Without it the same pipeline runs
 * on post-RoPE keys: still exactly invertible, but a documented deviation from the paper
 * (RoPE spreads the outlier channels the rotation and reordering are meant to tame).
 * The calibration helpers must then be fed the same kind of keys as encode.
 *
 * Sinks (§3.5, §3.8; our choice, the reference uses hidden-state peaks a store cannot
 * see): per section (one layer's K or V, decided independently for K and V), a token is
 * a sink if its L2 norm over all H*D channels (input basis, double) exceeds
 * KVS_ROTATEKV_TAU = 8 times the section's median token norm (the lower median: element
 * (t-1)/2 of the sorted norms; t = 1 therefore never has a sink). At most S = 4 sinks,
 * the largest norms first (ties: lower token index). Tokens whose rotated values would
 * not fit the fp16 parameters (any |value| of a quantization group > 32768, or NaN/Inf:
 * bf16 inputs near 3e38 overflow the fp32 rotation, and Inf - Inf is NaN) are sinks
 * before any other; more than S of them is KVS_EINVAL (possible only for bf16 namespaces
 * or fp16 values near the fp16 limit). Sinks are stored as their input elements (fp16 or
 * bf16, the namespace dtype) and come back bit-exact. Client-flagged sinks (a Put header
 * field, reserved on the wire) have a hook in select_sinks (client mask, ranked after
 * the range sinks and before the norm sinks) but no path yet: the ops API carries no
 * mask, so encode passes NULL.
 *
 * Determinism: no randomness (Hadamard matrices are fixed; the namespace seed is not
 * used), so encode is a pure function of (state, layer, input).
 * Thread-safety: the codec's tables are read-only after init; encode/decode allocate
 * their own scratch.
 */
#include "gpu/codec/codec_rotatekv.h"

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/base/mem.h"
#include "gpu/codec/bitpack.h"
#include "gpu/codec/codec_int.h"
#include "gpu/codec/hadamard.h"
#include "gpu/codec/half.h"
#include "gpu/codec/quant.h"

typedef struct rkv {
    uint32_t heads, dim, chans; /* H, D, C = H*D */
    unsigned bits;
    float clip;
    uint32_t gsize;   /* channels per quantization group (last key group may be shorter) */
    uint32_t ngroups; /* groups per token */
    size_t rec;       /* bytes of one token record */
    uint32_t *perm;   /* keys: [layers][C] p, or NULL for the identity */
} rkv;

static void put16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static uint16_t get16(const uint8_t *p)
{
    return (uint16_t)(p[0] | p[1] << 8);
}

static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void put32(uint8_t *p, uint32_t v)
{
    put16(p, (uint16_t)v);
    put16(p + 2, (uint16_t)(v >> 16));
}

unsigned kvs_rotatekv_head_group(uint32_t kv_heads)
{
    unsigned g = KVS_ROTATEKV_HEAD_GROUP;
    while (g > 1 && kv_heads % g)
        g /= 2;
    return g;
}

void kvs_rotatekv_rotate_keys(uint32_t kv_heads, uint32_t head_dim, float *x)
{
    size_t g = kvs_rotatekv_head_group(kv_heads), n = g * head_dim;
    for (uint32_t h = 0; h < kv_heads; h += (uint32_t)g)
        kvs_fwht(x + (size_t)h * head_dim, n);
}

static float to_f32(const kvs_ns_spec *s, uint16_t h)
{
    return s->dtype == KVS_DTYPE_BF16 ? kvs_bf16_to_f32(h) : kvs_fp16_to_f32(h);
}

static uint16_t from_f32(const kvs_ns_spec *s, float f)
{
    return s->dtype == KVS_DTYPE_BF16 ? kvs_f32_to_bf16(f) : kvs_f32_to_fp16(f);
}

static int check_layout(const kvs_ns_spec *s, kvs_err *err)
{
    if (!kvs_is_pow2(s->head_dim) || s->head_dim < 16)
        return kvs_err_set(err, KVS_EINVAL,
                           "head_dim: %u is not a power of two >= 16, which "
                           "rotatekv's Hadamard rotation needs",
                           s->head_dim);
    return 0;
}

/* ---------------------------------------------------------------- calibration */

int kvs_rotatekv_calib_accumulate(const kvs_ns_spec *spec, double *sums, const uint16_t *keys,
                                  uint32_t n, kvs_err *err)
{
    int rc = check_layout(spec, err);
    if (rc)
        return rc;
    size_t C = (size_t)spec->kv_heads * spec->head_dim;
    float *r = kvs_trymalloc(C * sizeof *r);
    if (!r)
        return kvs_err_set(err, KVS_ENOMEM, "rotatekv calibration: out of memory");
    /* §3.4: signed sums of the grouped-Hadamard-rotated keys, per layer and channel. */
    for (uint32_t l = 0; l < spec->layers; l++)
        for (uint32_t i = 0; i < n; i++) {
            const uint16_t *k = keys + ((size_t)l * n + i) * C;
            for (size_t j = 0; j < C; j++)
                r[j] = to_f32(spec, k[j]);
            kvs_rotatekv_rotate_keys(spec->kv_heads, spec->head_dim, r);
            for (size_t j = 0; j < C; j++)
                sums[l * C + j] += r[j];
        }
    free(r);
    return 0;
}

typedef struct chan_sum {
    double sum;
    uint32_t chan;
} chan_sum;

/* Ascending by sum, ties by channel: a total order, so qsort's instability is moot. */
static int cmp_chan(const void *a, const void *b)
{
    const chan_sum *x = a, *y = b;
    if (x->sum != y->sum)
        return x->sum < y->sum ? -1 : 1;
    return (x->chan > y->chan) - (x->chan < y->chan);
}

int kvs_rotatekv_calib_freeze(const kvs_ns_spec *spec, const double *sums, void **state,
                              size_t *len, kvs_err *err)
{
    size_t C = (size_t)spec->kv_heads * spec->head_dim;
    if (C > 65536)
        return kvs_err_set(err, KVS_EINVAL,
                           "kv_heads*head_dim: %zu channels do not fit the "
                           "uint16 rotatekv permutation",
                           C);
    size_t n = KVS_ROTATEKV_STATE_HEADER + (size_t)spec->layers * C * 2;
    uint8_t *st = kvs_trymalloc(n);
    chan_sum *idx = kvs_trymalloc(C * sizeof *idx);
    if (!st || !idx) {
        free(st);
        free(idx);
        return kvs_err_set(err, KVS_ENOMEM, "rotatekv calibration: out of memory");
    }
    put32(st, spec->layers);
    put32(st + 4, (uint32_t)C);
    for (uint32_t l = 0; l < spec->layers; l++) {
        for (size_t j = 0; j < C; j++)
            idx[j] = (chan_sum){sums[l * C + j], (uint32_t)j};
        qsort(idx, C, sizeof *idx, cmp_chan);
        uint8_t *p = st + KVS_ROTATEKV_STATE_HEADER + l * C * 2;
        for (size_t j = 0; j < C; j++)
            put16(p + 2 * j, (uint16_t)idx[j].chan);
    }
    free(idx);
    *state = st;
    *len = n;
    return 0;
}

int kvs_rotatekv_calibrate(const kvs_ns_spec *spec, const uint16_t *keys, uint32_t n, void **state,
                           size_t *len, kvs_err *err)
{
    size_t C = (size_t)spec->kv_heads * spec->head_dim;
    double *sums = calloc((size_t)spec->layers * C, sizeof *sums);
    if (!sums)
        return kvs_err_set(err, KVS_ENOMEM, "rotatekv calibration: out of memory");
    int rc = kvs_rotatekv_calib_accumulate(spec, sums, keys, n, err);
    if (rc == 0)
        rc = kvs_rotatekv_calib_freeze(spec, sums, state, len, err);
    free(sums);
    return rc;
}

/* ---------------------------------------------------------------- init */

static int load_state(const kvs_codec *c, rkv *r, kvs_err *err)
{
    const kvs_codec_state *s = &c->state;
    if (c->kv != KVS_KEYS || s->version == 0)
        return 0; /* identity; values have no state */
    const uint8_t *d = s->data;
    size_t C = r->chans, L = c->spec.layers;
    if (s->len < KVS_ROTATEKV_STATE_HEADER || !d)
        return kvs_err_set(err, KVS_EINVAL,
                           "state: %zu bytes, too short for a rotatekv "
                           "permutation",
                           s->len);
    if (get32(d) != L || get32(d + 4) != C)
        return kvs_err_set(err, KVS_EINVAL,
                           "state: permutation for %u layers x %u channels, "
                           "namespace has %zu x %zu",
                           get32(d), get32(d + 4), L, C);
    if (C > 65536 || s->len != KVS_ROTATEKV_STATE_HEADER + L * C * 2)
        return kvs_err_set(err, KVS_EINVAL, "state: %zu bytes, expected %zu", s->len,
                           KVS_ROTATEKV_STATE_HEADER + L * C * 2);
    r->perm = kvs_trymalloc(L * C * sizeof *r->perm);
    uint8_t *seen = kvs_trymalloc(C);
    if (!r->perm || !seen) {
        free(seen);
        return kvs_err_set(err, KVS_ENOMEM, "state: out of memory");
    }
    for (size_t l = 0; l < L; l++) {
        memset(seen, 0, C);
        for (size_t j = 0; j < C; j++) {
            uint32_t p = get16(d + KVS_ROTATEKV_STATE_HEADER + 2 * (l * C + j));
            if (p >= C || seen[p]) {
                free(seen);
                return kvs_err_set(err, KVS_EINVAL,
                                   "state: layer %zu is not a permutation "
                                   "(channel %u at position %zu)",
                                   l, p, j);
            }
            seen[p] = 1;
            r->perm[l * C + j] = p;
        }
    }
    free(seen);
    return 0;
}

static void rkv_fini(kvs_codec *c)
{
    rkv *r = c->priv;
    if (r)
        free(r->perm);
    free(r);
    c->priv = NULL;
}

static int rkv_init(kvs_codec *c, kvs_err *err)
{
    const kvs_ns_spec *s = &c->spec;
    int rc = check_layout(s, err);
    if (rc)
        return rc;
    rkv *r = kvs_xcalloc(1, sizeof *r);
    c->priv = r;
    r->heads = s->kv_heads;
    r->dim = s->head_dim;
    r->chans = s->kv_heads * s->head_dim;
    r->bits = c->bits;
    r->clip = KVS_ROTATEKV_CLIP(c->bits);
    if (c->kv == KVS_KEYS) {
        r->gsize = KVS_ROTATEKV_GROUP;
        r->ngroups = (r->chans + KVS_ROTATEKV_GROUP - 1) / KVS_ROTATEKV_GROUP;
    } else {
        r->gsize = r->dim < KVS_ROTATEKV_GROUP ? r->dim : KVS_ROTATEKV_GROUP;
        r->ngroups = r->chans / r->gsize;
    }
    r->rec = (size_t)r->chans * r->bits / 8 + 4 * (size_t)r->ngroups;
    rc = load_state(c, r, err);
    if (rc)
        rkv_fini(c);
    return rc;
}

/* ---------------------------------------------------------------- section helpers */

static size_t sink_bytes(const rkv *r)
{
    return 2 + 2 * (size_t)r->chans;
}

static size_t section_size(const rkv *r, uint32_t t, uint32_t nsinks)
{
    return (size_t)(t - nsinks) * r->rec + nsinks * sink_bytes(r);
}

static uint32_t max_sinks(uint32_t t)
{
    return t < KVS_ROTATEKV_MAX_SINKS ? t : KVS_ROTATEKV_MAX_SINKS;
}

static size_t rkv_max(const kvs_codec *c, uint32_t t)
{
    return section_size(c->priv, t, max_sinks(t));
}

/* Input basis -> quantization basis for one token: x -> y (tmp: C floats of scratch). */
static void forward(const kvs_codec *c, const rkv *r, uint32_t layer, const float *x, float *tmp,
                    float *y)
{
    memcpy(tmp, x, r->chans * sizeof *tmp);
    if (c->kv == KVS_KEYS) {
        kvs_rotatekv_rotate_keys(r->heads, r->dim, tmp);
        if (r->perm) {
            const uint32_t *p = r->perm + (size_t)layer * r->chans;
            for (uint32_t j = 0; j < r->chans; j++)
                y[j] = tmp[p[j]];
            return;
        }
    } else {
        for (uint32_t h = 0; h < r->heads; h++)
            kvs_fwht(tmp + (size_t)h * r->dim, r->dim);
    }
    memcpy(y, tmp, r->chans * sizeof *y);
}

/* Quantization basis -> input basis; y is clobbered. */
static void inverse(const kvs_codec *c, const rkv *r, uint32_t layer, float *y, float *x)
{
    if (c->kv == KVS_KEYS) {
        if (r->perm) {
            const uint32_t *p = r->perm + (size_t)layer * r->chans;
            for (uint32_t j = 0; j < r->chans; j++)
                x[p[j]] = y[j];
        } else {
            memcpy(x, y, r->chans * sizeof *x);
        }
        kvs_rotatekv_rotate_keys(r->heads, r->dim, x);
    } else {
        for (uint32_t h = 0; h < r->heads; h++)
            kvs_fwht(y + (size_t)h * r->dim, r->dim);
        memcpy(x, y, r->chans * sizeof *x);
    }
}

static uint32_t group_len(const rkv *r, uint32_t g)
{
    uint32_t start = g * r->gsize;
    return r->chans - start < r->gsize ? r->chans - start : r->gsize;
}

/* Written so that NaN is out of range: an overflowed rotation is NaN, not only Inf. */
static bool in_range(const rkv *r, const float *y)
{
    for (uint32_t j = 0; j < r->chans; j++)
        if (!(fabsf(y[j]) <= KVS_ROTATEKV_RANGE_MAX))
            return false;
    return true;
}

typedef struct cand {
    double norm2;
    uint32_t tok;
} cand;

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int cmp_cand(const void *a, const void *b)
{
    const cand *x = a, *y = b;
    if (x->norm2 != y->norm2)
        return x->norm2 > y->norm2 ? -1 : 1; /* larger norm first */
    return (x->tok > y->tok) - (x->tok < y->tok);
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

/* Chooses the sinks of a section (header comment): range sinks, then client-flagged
 * tokens (client_mask: bit i of byte i/8 flags token i; NULL until the Put header field
 * exists), then norm outliers; at most max_sinks(t). is_sink[t] and sorted idx out.
 * layer and kv only name the section in the error. */
static int select_sinks(const rkv *r, uint32_t layer, kvs_kv kv, uint32_t t, const float *x,
                        const float *y, const uint8_t *client_mask, uint8_t *is_sink, uint32_t *idx,
                        uint32_t *nsinks, kvs_err *err)
{
    uint32_t cap = max_sinks(t), n = 0;
    memset(is_sink, 0, t);
    for (uint32_t i = 0; i < t; i++)
        if (!in_range(r, y + (size_t)i * r->chans)) {
            if (n == cap)
                return kvs_err_set(err, KVS_EINVAL,
                                   "payload: layer %u, %s, token %u: more than %u tokens too "
                                   "large for rotatekv's fp16 group parameters (rotated values "
                                   "beyond +-%.0f or overflowing fp32)",
                                   layer, kv == KVS_KEYS ? "K" : "V", i, cap,
                                   (double)KVS_ROTATEKV_RANGE_MAX);
            is_sink[i] = 1;
            idx[n++] = i;
        }
    for (uint32_t i = 0; i < t && client_mask && n < cap; i++)
        if ((client_mask[i / 8] >> (i % 8) & 1) && !is_sink[i]) {
            is_sink[i] = 1;
            idx[n++] = i;
        }
    cand *cs = kvs_trymalloc(t * sizeof *cs);
    double *sorted = kvs_trymalloc(t * sizeof *sorted);
    if (!cs || !sorted) {
        free(cs);
        free(sorted);
        return kvs_err_set(err, KVS_ENOMEM, "rotatekv: out of memory");
    }
    for (uint32_t i = 0; i < t; i++) {
        const float *v = x + (size_t)i * r->chans;
        double s = 0;
        for (uint32_t j = 0; j < r->chans; j++)
            s += (double)v[j] * v[j];
        cs[i] = (cand){s, i};
        sorted[i] = s;
    }
    qsort(sorted, t, sizeof *sorted, cmp_double);
    double thresh = KVS_ROTATEKV_TAU * KVS_ROTATEKV_TAU * sorted[(t - 1) / 2];
    qsort(cs, t, sizeof *cs, cmp_cand);
    for (uint32_t k = 0; k < t && n < cap && cs[k].norm2 > thresh; k++)
        if (!is_sink[cs[k].tok]) {
            is_sink[cs[k].tok] = 1;
            idx[n++] = cs[k].tok;
        }
    free(cs);
    free(sorted);
    qsort(idx, n, sizeof *idx, cmp_u32);
    *nsinks = n;
    return 0;
}

/* ---------------------------------------------------------------- encode / decode */

static void encode_token(const rkv *r, const float *y, uint8_t *codes, uint8_t *rec)
{
    uint8_t *params = rec + (size_t)r->chans * r->bits / 8;
    for (uint32_t g = 0; g < r->ngroups; g++) {
        const float *v = y + (size_t)g * r->gsize;
        uint32_t n = group_len(r, g);
        float mn = v[0], mx = v[0];
        for (uint32_t j = 1; j < n; j++) {
            mn = v[j] < mn ? v[j] : mn;
            mx = v[j] > mx ? v[j] : mx;
        }
        float zero;
        kvs_minmax p = kvs_minmax_params_zp(mn, mx, r->clip, r->bits, &zero);
        for (uint32_t j = 0; j < n; j++)
            codes[(size_t)g * r->gsize + j] = (uint8_t)kvs_minmax_code_zp(p, zero, v[j], r->bits);
        put16(params + 4 * (size_t)g, p.scale);
        put16(params + 4 * (size_t)g + 2, p.lo);
    }
    kvs_bitpack(codes, r->chans, r->bits, rec);
}

static void decode_token(const rkv *r, const uint8_t *rec, float *y)
{
    const uint8_t *params = rec + (size_t)r->chans * r->bits / 8;
    for (uint32_t g = 0; g < r->ngroups; g++) {
        kvs_minmax p = {get16(params + 4 * (size_t)g), get16(params + 4 * (size_t)g + 2)};
        uint32_t n = group_len(r, g);
        for (uint32_t j = 0; j < n; j++) {
            size_t k = (size_t)g * r->gsize + j;
            y[k] = kvs_minmax_decode(p, kvs_bitunpack1(rec, k, r->bits));
        }
    }
}

static int rkv_encode(const kvs_codec *c, uint32_t layer, uint32_t t, const float *in, uint8_t *out,
                      size_t cap, size_t *len, kvs_err *err)
{
    const rkv *r = c->priv;
    size_t C = r->chans;
    if (layer >= c->spec.layers)
        return kvs_err_set(err, KVS_EINVAL, "layer: %u not below %u", layer, c->spec.layers);
    float *y = kvs_trymalloc((size_t)t * C * sizeof *y);
    float *tmp = kvs_trymalloc(C * sizeof *tmp);
    uint8_t *codes = kvs_trymalloc(C);
    uint8_t *is_sink = kvs_trymalloc(t);
    int rc = 0;
    if (!y || !tmp || !codes || !is_sink) {
        rc = kvs_err_set(err, KVS_ENOMEM, "rotatekv encode: out of memory");
        goto out;
    }
    for (uint32_t i = 0; i < t; i++)
        forward(c, r, layer, in + (size_t)i * C, tmp, y + (size_t)i * C);
    uint32_t idx[KVS_ROTATEKV_MAX_SINKS], n = 0;
    rc = select_sinks(r, layer, c->kv, t, in, y, NULL, is_sink, idx, &n, err);
    if (rc)
        goto out;
    size_t total = section_size(r, t, n);
    if (cap < total) {
        rc = kvs_err_set(err, KVS_ENOSPC,
                         "rotatekv encode: output buffer of %zu bytes, "
                         "section needs %zu",
                         cap, total);
        goto out;
    }
    uint8_t *p = out;
    for (uint32_t i = 0; i < t; i++)
        if (!is_sink[i]) {
            encode_token(r, y + (size_t)i * C, codes, p);
            p += r->rec;
        }
    for (uint32_t k = 0; k < n; k++, p += 2)
        put16(p, (uint16_t)idx[k]);
    for (uint32_t k = 0; k < n; k++) {
        const float *v = in + (size_t)idx[k] * C;
        for (size_t j = 0; j < C; j++, p += 2)
            put16(p, from_f32(&c->spec, v[j]));
    }
    *len = total;
out:
    free(y);
    free(tmp);
    free(codes);
    free(is_sink);
    return rc;
}

static int rkv_decode(const kvs_codec *c, uint32_t layer, uint32_t t, const uint8_t *in, size_t len,
                      float *out, kvs_err *err)
{
    const rkv *r = c->priv;
    size_t C = r->chans, base = (size_t)t * r->rec, per = sink_bytes(r) - r->rec;
    if (layer >= c->spec.layers)
        return kvs_err_set(err, KVS_EPROTO, "layer: %u not below %u", layer, c->spec.layers);
    if (len < base || (len - base) % per || (len - base) / per > max_sinks(t))
        return kvs_err_set(err, KVS_EPROTO,
                           "rotatekv: section of %zu bytes does not hold %u "
                           "tokens (%zu bytes + 0..%u sinks of %zu)",
                           len, t, base, max_sinks(t), per);
    uint32_t n = (uint32_t)((len - base) / per);
    const uint8_t *list = in + (size_t)(t - n) * r->rec, *vecs = list + 2 * (size_t)n;
    uint32_t idx[KVS_ROTATEKV_MAX_SINKS];
    for (uint32_t k = 0; k < n; k++) {
        idx[k] = get16(list + 2 * k);
        if (idx[k] >= t || (k && idx[k] <= idx[k - 1]))
            return kvs_err_set(err, KVS_EPROTO,
                               "rotatekv: sink list entry %u (token %u) out "
                               "of order or range",
                               k, idx[k]);
    }
    float *y = kvs_trymalloc(C * sizeof *y);
    if (!y)
        return kvs_err_set(err, KVS_ENOMEM, "rotatekv decode: out of memory");
    const uint8_t *rec = in;
    uint32_t k = 0;
    for (uint32_t i = 0; i < t; i++) {
        float *x = out + (size_t)i * C;
        if (k < n && idx[k] == i) {
            const uint8_t *v = vecs + (size_t)k * C * 2;
            for (size_t j = 0; j < C; j++)
                x[j] = to_f32(&c->spec, get16(v + 2 * j));
            k++;
            continue;
        }
        decode_token(r, rec, y);
        inverse(c, r, layer, y, x);
        rec += r->rec;
    }
    free(y);
    return 0;
}

/* Safety net (kvs_codec_check_section): the fp16 (scale, lo) of every group of every
 * token record. Sinks are input elements, checked finite before encode. */
static int rkv_check(const kvs_codec *c, uint32_t layer, uint32_t t, const uint8_t *sec, size_t len,
                     kvs_err *err)
{
    const rkv *r = c->priv;
    size_t base = (size_t)t * r->rec, per = sink_bytes(r) - r->rec;
    if (len < base || (len - base) % per || (len - base) / per > max_sinks(t))
        return kvs_err_set(err, KVS_EPROTO,
                           "rotatekv: section of %zu bytes does not hold %u tokens (%zu "
                           "bytes + 0..%u sinks of %zu)",
                           len, t, base, max_sinks(t), per);
    uint32_t n = (uint32_t)((len - base) / per);
    const uint8_t *list = sec + (size_t)(t - n) * r->rec;
    for (uint32_t k = 0; k < n; k++)
        if (get16(list + 2 * k) >= t || (k && get16(list + 2 * k) <= get16(list + 2 * k - 2)))
            return kvs_err_set(err, KVS_EPROTO,
                               "rotatekv: sink list entry %u (token %u) out of order or range", k,
                               get16(list + 2 * k));
    uint32_t k = 0, rec = 0;
    for (uint32_t i = 0; i < t; i++) {
        if (k < n && get16(list + 2 * k) == i) { /* a sink: no record */
            k++;
            continue;
        }
        const uint8_t *params = sec + (size_t)rec++ * r->rec + (size_t)r->chans * r->bits / 8;
        for (uint32_t g = 0; g < r->ngroups; g++) {
            uint16_t scale = get16(params + 4 * (size_t)g), lo = get16(params + 4 * (size_t)g + 2);
            if ((scale & 0x7C00) == 0x7C00 || (lo & 0x7C00) == 0x7C00)
                return kvs__field_nonfinite(
                    c, layer, err, "fp16 group %s of token %u, channels %u..",
                    (scale & 0x7C00) == 0x7C00 ? "scale" : "offset", i, g * r->gsize);
        }
    }
    return 0;
}

const kvs_codec_ops kvs__codec_rotatekv_ops = {
    .family = "rotatekv",
    .init = rkv_init,
    .fini = rkv_fini,
    .section_max = rkv_max,
    .encode = rkv_encode,
    .decode = rkv_decode,
    .check_section = rkv_check,
    .variable_size = true,
};
