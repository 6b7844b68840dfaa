/* `polarquant` (quantizers.md; quantizers-reference.md §2, §9.2): CPU reference.
 * Randomized Hadamard preconditioning, recursive polar transform of 16-coordinate chunks
 * (L = 4), fixed analytic codebooks (4/2/2/2 bits), fp16 chunk radius: 62 bits per 16
 * coordinates, 3.875 bits/element, no per-block metadata and no codec state. Math, layout
 * and constants: gpu/codec_polarquant.h.
 *
 * Choices where the spec leaves room (tested in tests/unit/test_codec_polarquant.c):
 *  - head_dim must be a power of two in 16..1024 (FWHT); other multiples of 16 (48, 80,
 *    96, ...) are refused at create with KVS_EINVAL naming head_dim.
 *  - One sign vector s per namespace (seed), shared by K and V, all layers and heads, as
 *    the paper shares S (reference §2.3 step 1).
 *  - Chunk norms that do not fit fp16 fail the encode (KVS_EINVAL naming layer, K/V,
 *    token, head and chunk) rather than switching to a bf16 radius.
 *  - Decode rejects a radius that is negative, Inf or NaN (the encoder never writes one)
 *    with KVS_EPROTO; any other bytes of the right length decode to finite values. A zero
 *    vector decodes to +0 in every channel.
 * Measured (tests): relative MSE 0.0321 on Gaussian vectors (D = 64, 128, 256; mean
 * relative L2 0.179), per-level angle MSE within 0.3% of reference §2.3; with a 20x outlier
 * channel 0.0295-0.0304 (the randomized Hadamard's flat columns; a Haar S gives 0.032);
 * real sample realkv-a-64: K 0.179, V 0.180 (reference §6: 0.179 / 0.177).
 * Thread-safety: the codec's tables are read-only after init; encode/decode use stack
 * scratch only.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/base/mem.h"
#include "gpu/codec/bitpack.h"
#include "gpu/codec/codec_int.h"
#include "gpu/codec/codec_polarquant.h"
#include "gpu/codec/hadamard.h"
#include "gpu/codec/half.h"
#include "gpu/codec/rng.h"

typedef struct pq_priv {
    uint32_t d, chunks;
    size_t vec_bytes;
    float sign[KVS_PQ_MAX_D]; /* s_i = +-1 */
} pq_priv;

static int pq_init(kvs_codec *c, kvs_err *err)
{
    uint32_t d = c->spec.head_dim;
    if (!kvs_is_pow2(d) || d < KVS_PQ_MIN_D || d > KVS_PQ_MAX_D)
        return kvs_err_set(err, KVS_EINVAL,
                           "head_dim: %u is not a power of two in %d..%d "
                           "(polarquant's Hadamard preconditioning needs one)",
                           d, KVS_PQ_MIN_D, KVS_PQ_MAX_D);
    pq_priv *p = kvs_trymalloc(sizeof *p);
    if (!p)
        return kvs_err_set(err, KVS_ENOMEM, "polarquant: out of memory");
    p->d = d;
    p->chunks = d / KVS_PQ_CHUNK;
    p->vec_bytes = KVS_PQ_VEC_BYTES(d);
    kvs_rng rng;
    kvs_rng_init(&rng, c->spec.seed, 0, 0, 0, KVS_PQ_RNG_PURPOSE);
    uint64_t w = 0;
    for (uint32_t i = 0; i < d; i++) {
        if (i % 64 == 0)
            w = kvs_rng_next(&rng);
        p->sign[i] = (w >> (i % 64)) & 1 ? -1.0f : 1.0f;
    }
    c->priv = p;
    return 0;
}

static void pq_fini(kvs_codec *c)
{
    free(c->priv);
    c->priv = NULL;
}

static size_t pq_section_bytes(const kvs_codec *c, uint32_t t)
{
    const pq_priv *p = c->priv;
    return (size_t)t * c->spec.kv_heads * p->vec_bytes;
}

static size_t pq_max(const kvs_codec *c, uint32_t t)
{
    return pq_section_bytes(c, t);
}

static int pq_encode(const kvs_codec *c, uint32_t layer, uint32_t t, const float *in, uint8_t *out,
                     size_t cap, size_t *len, kvs_err *err)
{
    const pq_priv *p = c->priv;
    const uint32_t d = p->d, nc = p->chunks, heads = c->spec.kv_heads;
    const size_t n = (size_t)t * heads, need = pq_section_bytes(c, t);
    if (cap < need)
        return kvs_err_set(err, KVS_ENOSPC, "polarquant: output buffer of %zu bytes, need %zu", cap,
                           need);
    uint8_t *radii = out, *lev1 = out + 2 * n * nc, *upper = out + 6 * n * nc;
    const size_t ub = KVS_PQ_UPPER_BYTES(nc);
    float y[KVS_PQ_MAX_D];
    uint8_t codes[KVS_PQ_MAX_D / KVS_PQ_CHUNK * KVS_PQ_CODES2];
    for (size_t v = 0; v < n; v++) {
        /* §2.3 step 1: y = (1/sqrt(D)) H diag(s) x */
        for (uint32_t i = 0; i < d; i++)
            y[i] = in[v * d + i] * p->sign[i];
        kvs_fwht(y, d);
        for (uint32_t ch = 0; ch < nc; ch++) {
            uint32_t l1;
            float r = kvs_pq_encode_chunk(y + ch * KVS_PQ_CHUNK, &l1, codes + ch * KVS_PQ_CODES2);
            uint16_t h = kvs_f32_to_fp16(r);
            /* Inf and NaN radii both: huge bf16 input overflows the fp32 rotation or the
             * squares, and Inf - Inf in the FWHT makes the norm NaN, not Inf. */
            if ((h & 0x7C00) == 0x7C00 && !isfinite(r))
                return kvs_err_set(err, KVS_EINVAL,
                                   "payload: layer %u, %s, token %zu, head %zu: rotated chunk "
                                   "%u (coordinates %u..%u) has a norm that overflows fp32, far "
                                   "beyond the fp16 radius of polarquant (65504)",
                                   layer, c->kv == KVS_KEYS ? "K" : "V", v / heads, v % heads, ch,
                                   ch * KVS_PQ_CHUNK, ch * KVS_PQ_CHUNK + KVS_PQ_CHUNK - 1);
            if ((h & 0x7C00) == 0x7C00)
                return kvs_err_set(err, KVS_EINVAL,
                                   "payload: layer %u, %s, token %zu, head %zu: "
                                   "rotated chunk %u (coordinates %u..%u) has norm %g, beyond "
                                   "the fp16 radius of polarquant (65504)",
                                   layer, c->kv == KVS_KEYS ? "K" : "V", v / heads, v % heads, ch,
                                   ch * KVS_PQ_CHUNK, ch * KVS_PQ_CHUNK + KVS_PQ_CHUNK - 1,
                                   (double)r);
            size_t k = v * nc + ch;
            radii[2 * k] = (uint8_t)h;
            radii[2 * k + 1] = (uint8_t)(h >> 8);
            for (int b = 0; b < 4; b++)
                lev1[4 * k + b] = (uint8_t)(l1 >> (8 * b));
        }
        kvs_bitpack(codes, (size_t)nc * KVS_PQ_CODES2, 2, upper + v * ub);
    }
    *len = need;
    return 0;
}

static int pq_decode(const kvs_codec *c, uint32_t layer, uint32_t t, const uint8_t *in, size_t len,
                     float *out, kvs_err *err)
{
    (void)layer;
    const pq_priv *p = c->priv;
    const uint32_t d = p->d, nc = p->chunks;
    const size_t n = (size_t)t * c->spec.kv_heads, need = pq_section_bytes(c, t);
    if (len != need)
        return kvs_err_set(err, KVS_EPROTO,
                           "polarquant: section of %zu bytes, expected %zu for "
                           "%u tokens",
                           len, need, t);
    const uint8_t *radii = in, *lev1 = in + 2 * n * nc, *upper = in + 6 * n * nc;
    const size_t ub = KVS_PQ_UPPER_BYTES(nc);
    float y[KVS_PQ_MAX_D];
    uint8_t codes[KVS_PQ_CODES2];
    for (size_t v = 0; v < n; v++) {
        for (uint32_t ch = 0; ch < nc; ch++) {
            size_t k = v * nc + ch;
            uint16_t h = (uint16_t)(radii[2 * k] | radii[2 * k + 1] << 8);
            if ((h & 0x8000) || (h & 0x7C00) == 0x7C00)
                return kvs_err_set(err, KVS_EPROTO,
                                   "polarquant: radius 0x%04x of vector %zu, "
                                   "chunk %u is not a finite non-negative fp16",
                                   h, v, ch);
            uint32_t l1 = (uint32_t)lev1[4 * k] | (uint32_t)lev1[4 * k + 1] << 8 |
                          (uint32_t)lev1[4 * k + 2] << 16 | (uint32_t)lev1[4 * k + 3] << 24;
            for (int j = 0; j < KVS_PQ_CODES2; j++)
                codes[j] = kvs_bitunpack1(upper + v * ub, (size_t)ch * KVS_PQ_CODES2 + j, 2);
            kvs_pq_decode_chunk(kvs_fp16_to_f32(h), l1, codes, y + ch * KVS_PQ_CHUNK);
        }
        /* x = R^T y = diag(s) (1/sqrt(D)) H y; + 0.0f turns -0 into +0 (zero in, +0 out)
         * and changes nothing else */
        kvs_fwht(y, d);
        for (uint32_t i = 0; i < d; i++)
            out[v * d + i] = y[i] * p->sign[i] + 0.0f;
    }
    return 0;
}

/* Safety net (kvs_codec_check_section): the fp16 radii plane, the section's only
 * floating-point field. */
static int pq_check(const kvs_codec *c, uint32_t layer, uint32_t t, const uint8_t *sec, size_t len,
                    kvs_err *err)
{
    const pq_priv *p = c->priv;
    const size_t n = (size_t)t * c->spec.kv_heads * p->chunks, need = pq_section_bytes(c, t);
    if (len != need)
        return kvs_err_set(err, KVS_EPROTO,
                           "polarquant: section of %zu bytes, expected %zu for %u tokens", len,
                           need, t);
    for (size_t k = 0; k < n; k++) {
        uint16_t h = (uint16_t)(sec[2 * k] | sec[2 * k + 1] << 8);
        if ((h & 0x7C00) == 0x7C00)
            return kvs__field_nonfinite(
                c, layer, err, "fp16 radius of token %zu, head %zu, chunk %zu",
                k / p->chunks / c->spec.kv_heads, k / p->chunks % c->spec.kv_heads, k % p->chunks);
    }
    return 0;
}

const kvs_codec_ops kvs__codec_polarquant_ops = {
    .family = "polarquant",
    .init = pq_init,
    .fini = pq_fini,
    .section_max = pq_max,
    .encode = pq_encode,
    .decode = pq_decode,
    .check_section = pq_check,
    .decode_ignores_state = true,
};
