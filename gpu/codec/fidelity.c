/* Fidelity measurement and its accumulator: see fidelity.h. */
#include "gpu/codec/fidelity.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/base/mem.h"
#include "gpu/codec/codec_squat.h"
#include "gpu/codec/format.h"
#include "gpu/codec/half.h"

const double kvs_fidelity_bounds[KVS_FIDELITY_NBOUNDS] = {0.001, 0.002, 0.005, 0.01, 0.02,
                                                          0.05,  0.1,   0.2,   0.5,  1.0};

static float to_f32(uint16_t h, kvs_dtype dt)
{
    return dt == KVS_DTYPE_BF16 ? kvs_bf16_to_f32(h) : kvs_fp16_to_f32(h);
}

void kvs_fidelity_sums(const uint16_t *ref, const uint16_t *dec, size_t n, kvs_dtype dt,
                       double *diff2, double *ref2)
{
    double d2 = 0, r2 = 0;
    for (size_t i = 0; i < n; i++) {
        double r = to_f32(ref[i], dt), d = (double)to_f32(dec[i], dt) - r;
        d2 += d * d;
        r2 += r * r;
    }
    *diff2 += d2;
    *ref2 += r2;
}

void kvs_fidelity_section_sums(const uint16_t *ref, const uint16_t *dec, uint32_t nsec, size_t sec,
                               kvs_dtype dt, double *out)
{
    for (uint32_t i = 0; i < nsec; i++) {
        out[2 * i] = out[2 * i + 1] = 0;
        kvs_fidelity_sums(ref + i * sec, dec + i * sec, sec, dt, &out[2 * i], &out[2 * i + 1]);
    }
}

#ifdef KVS_FIDELITY_CUDA_STUBS
int kvs_fidelity_section_sums_cuda(const uint16_t *ref, const uint16_t *dec, uint32_t nsec,
                                   size_t sec, kvs_dtype dt, double *out, void *stream,
                                   kvs_err *err)
{
    (void)ref, (void)dec, (void)nsec, (void)sec, (void)dt, (void)out, (void)stream;
    return kvs_err_set(err, KVS_ENOTSUP, "fidelity: this build has no CUDA kernels");
}
#endif

double kvs_fidelity_ratio(double diff2, double ref2)
{
    if (ref2 > 0)
        return sqrt(diff2 / ref2);
    return diff2 > 0 ? 1.0 : 0.0;
}

/* The logit sums of one layer's keys ([t][H][D]): sum d^T G d and k^T G k over the heads
 * with a Gram. D^2 multiply-adds per token and head: the measure's main cost (fidelity.h). */
static void logit_sums(const kvs_codec *gram, uint32_t layer, uint32_t t, const uint16_t *ref,
                       const uint16_t *dec, float *kd, double *num, double *den, bool *any)
{
    const kvs_ns_spec *s = kvs_codec_spec(gram);
    uint32_t H = s->kv_heads, D = s->head_dim;
    float *k = kd, *d = kd + D;
    for (uint32_t h = 0; h < H; h++) {
        const float *G = kvs_squat_gram(gram, layer, h, NULL);
        if (!G)
            continue;
        *any = true;
        for (uint32_t tok = 0; tok < t; tok++) {
            size_t base = ((size_t)tok * H + h) * D;
            for (uint32_t i = 0; i < D; i++) {
                k[i] = to_f32(ref[base + i], s->dtype);
                d[i] = to_f32(dec[base + i], s->dtype) - k[i];
            }
            double nd = 0, nk = 0;
            for (uint32_t i = 0; i < D; i++) {
                const float *row = G + (size_t)i * D;
                double gd = 0, gk = 0;
                for (uint32_t j = 0; j < D; j++) {
                    gd += (double)row[j] * d[j];
                    gk += (double)row[j] * k[j];
                }
                nd += d[i] * gd;
                nk += k[i] * gk;
            }
            *num += nd;
            *den += nk;
        }
    }
}

int kvs_fidelity_measure(const kvs_codec *k, const kvs_codec *v, const kvs_codec *gram,
                         const uint16_t *raw, const uint8_t *enc, size_t len,
                         kvs_fidelity_sample *out, kvs_err *err)
{
    kvs_block_info info;
    int rc = kvs_format_check(enc, len, &info, err);
    if (rc)
        return rc;
    const kvs_ns_spec *s = kvs_codec_spec(k);
    size_t sec = (size_t)info.tokens * s->kv_heads * s->head_dim;
    uint64_t bytes;
    if ((rc = kvs_spec_block_bytes(s, info.tokens, &bytes, err)))
        return rc;
    uint16_t *dec = kvs_trymalloc(bytes);
    float *kd = gram ? kvs_trymalloc(2 * (size_t)s->head_dim * sizeof *kd) : NULL;
    if (!dec || (gram && !kd)) {
        free(dec);
        free(kd);
        return kvs_err_set(err, KVS_ENOMEM, "fidelity: cannot allocate %llu bytes to decode into",
                           (unsigned long long)bytes);
    }
    rc = kvs_block_decode_verified(k, v, enc, len, 0, s->layers, dec, err);
    double d2[2] = {0, 0}, r2[2] = {0, 0}, num = 0, den = 0;
    bool logits = false;
    for (uint32_t l = 0; rc == 0 && l < s->layers; l++)
        for (unsigned kv = 0; kv < 2; kv++) {
            size_t off = (2 * (size_t)l + kv) * sec;
            kvs_fidelity_sums(raw + off, dec + off, sec, s->dtype, &d2[kv], &r2[kv]);
            if (kv == 0 && gram)
                logit_sums(gram, l, info.tokens, raw + off, dec + off, kd, &num, &den, &logits);
        }
    free(dec);
    free(kd);
    if (rc)
        return rc;
    *out = (kvs_fidelity_sample){.has_logits = logits};
    out->err[KVS_FIDELITY_KEYS] = kvs_fidelity_ratio(d2[0], r2[0]);
    out->err[KVS_FIDELITY_VALUES] = kvs_fidelity_ratio(d2[1], r2[1]);
    out->err[KVS_FIDELITY_LOGITS] = logits ? kvs_fidelity_ratio(num, den) : 0;
    return 0;
}

/* ---------------------------------------------------------------- accumulator */

static uint64_t bits_of(double d)
{
    uint64_t u;
    memcpy(&u, &d, sizeof u);
    return u;
}

static double double_of(uint64_t u)
{
    double d;
    memcpy(&d, &u, sizeof d);
    return d;
}

static void add_one(kvs_fidelity_acc *a, kvs_fidelity_what w, double e)
{
    if (!(e >= 0)) /* NaN cannot happen (finite inputs and outputs); never poison a sum */
        e = 1.0;
    unsigned b = 0;
    while (b < KVS_FIDELITY_NBOUNDS && e > kvs_fidelity_bounds[b])
        b++;
    atomic_fetch_add_explicit(&a->h[w].buckets[b], 1, memory_order_relaxed);
    uint64_t old = atomic_load_explicit(&a->h[w].sum_bits, memory_order_relaxed);
    while (!atomic_compare_exchange_weak_explicit(&a->h[w].sum_bits, &old,
                                                  bits_of(double_of(old) + e), memory_order_relaxed,
                                                  memory_order_relaxed))
        ;
    /* Non-negative doubles order as their bit patterns do. */
    uint64_t eb = bits_of(e), cur = atomic_load_explicit(&a->h[w].max_bits, memory_order_relaxed);
    while (eb > cur && !atomic_compare_exchange_weak_explicit(
                           &a->h[w].max_bits, &cur, eb, memory_order_relaxed, memory_order_relaxed))
        ;
}

void kvs_fidelity_acc_add(kvs_fidelity_acc *a, const kvs_fidelity_sample *s, bool checked,
                          unsigned fallback)
{
    add_one(a, KVS_FIDELITY_KEYS, s->err[KVS_FIDELITY_KEYS]);
    add_one(a, KVS_FIDELITY_VALUES, s->err[KVS_FIDELITY_VALUES]);
    if (s->has_logits)
        add_one(a, KVS_FIDELITY_LOGITS, s->err[KVS_FIDELITY_LOGITS]);
    if (checked)
        atomic_fetch_add_explicit(&a->checked, 1, memory_order_relaxed);
    if (fallback)
        atomic_fetch_add_explicit(&a->fallback, 1, memory_order_relaxed);
    for (unsigned kv = 0; kv < 2; kv++)
        if (fallback & (1u << kv))
            atomic_fetch_add_explicit(&a->fallback_sides[kv], 1, memory_order_relaxed);
}

void kvs_fidelity_acc_read(const kvs_fidelity_acc *a, kvs_fidelity_stats *out)
{
    memset(out, 0, sizeof *out);
    for (int w = 0; w < KVS_FIDELITY_WHATS; w++) {
        kvs_fidelity_hist *h = &out->h[w];
        uint64_t total = 0;
        for (int b = 0; b <= KVS_FIDELITY_NBOUNDS; b++) {
            total += atomic_load_explicit(&a->h[w].buckets[b], memory_order_relaxed);
            h->buckets[b] = total;
        }
        h->count = total;
        h->sum = double_of(atomic_load_explicit(&a->h[w].sum_bits, memory_order_relaxed));
        h->max = double_of(atomic_load_explicit(&a->h[w].max_bits, memory_order_relaxed));
    }
    out->checked = atomic_load_explicit(&a->checked, memory_order_relaxed);
    out->fallback = atomic_load_explicit(&a->fallback, memory_order_relaxed);
    for (int kv = 0; kv < 2; kv++)
        out->fallback_sides[kv] =
            atomic_load_explicit(&a->fallback_sides[kv], memory_order_relaxed);
}
