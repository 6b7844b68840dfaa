/* Fidelity: the error a namespace's codecs make on the blocks it stores, measured as Puts
 * happen (issue 16; quantizers.md "Quality measures"), and the per-namespace accumulator
 * of those measurements. storage/xfer.c decides which Puts are measured and acts on a
 * bound (max_rel_error); this module only measures and counts.
 *
 * kvs_fidelity_measure decodes an encoded block on the CPU (the GPU engine writes the
 * CPU's bytes exactly, gpu/codec/codec.h, so this also measures what the engine stored)
 * and compares it with the raw input of the Put:
 *   keys    rel = ||K^ - K|| / ||K||, over every layer, token, head and channel of the block
 *   values  the same for V
 *   logits  only for a squat key codec with a query subspace (AddQueries): the attention
 *           logit error ||Q (K^ - K)^T|| / ||Q K^T|| over every query row it learned,
 *           computed from their Gram G = Q^T Q per (layer, kv-head) without the rows:
 *           sum d^T G d / sum k^T G k, d = k^ - k (quantizers.md "Quality measures"). Other
 *           namespaces have no query samples to measure logits with.
 * A side whose input is all zeros has error 0 when it decodes to zeros, else 1.
 *
 * The accumulator keeps, per measure, a histogram (KVS_FIDELITY_BOUNDS), the sum and the
 * max, and the blocks stored with the fallback codec. Relaxed atomics: any thread adds
 * (the pool thread that measured) without a lock while a scrape reads; a snapshot may mix
 * measurements a few apart, but its count is the sum of its buckets, so a histogram read
 * from it is always consistent with itself.
 */
#ifndef KVS_FIDELITY_H
#define KVS_FIDELITY_H

#ifndef __CUDACC__
#include <stdatomic.h>
#endif
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "gpu/base/err.h"
#include "gpu/codec/codec.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Upper bounds (Prometheus `le`) of the histogram buckets of a relative error; one more
 * bucket, +Inf, follows. From none's 0 through fp8 (~0.03), kivi-4 and polarquant (~0.1)
 * to 2-bit codecs (0.2-0.5) and blocks they cannot store (>= 1). */
#define KVS_FIDELITY_NBOUNDS 10
extern const double kvs_fidelity_bounds[KVS_FIDELITY_NBOUNDS];

typedef enum kvs_fidelity_what {
    KVS_FIDELITY_KEYS = 0,
    KVS_FIDELITY_VALUES = 1,
    KVS_FIDELITY_LOGITS = 2,
    KVS_FIDELITY_WHATS
} kvs_fidelity_what;

/* One block's measurement. */
typedef struct kvs_fidelity_sample {
    double err[KVS_FIDELITY_WHATS]; /* relative errors */
    bool has_logits;                /* err[LOGITS] was measured (a squat subspace) */
} kvs_fidelity_sample;

/* Relative L2 error of n elements of dtype dt, dec against ref (borrowed): the sums of
 * squares are added to *diff2 and *ref2 (the caller divides; see kvs_fidelity_ratio). */
void kvs_fidelity_sums(const uint16_t *ref, const uint16_t *dec, size_t n, kvs_dtype dt,
                       double *diff2, double *ref2);
/* Per-section sums, the GPU engine's measurement (engine.h, "Measured encode"): for each
 * of nsec sections of sec elements (section i at ref + i*sec and dec + i*sec), out[2i] =
 * the sum of squared differences and out[2i+1] = the sum of squared references, as
 * kvs_fidelity_sums computes them (each element widened to double first, so the two differ
 * only by the order of the additions). kvs_fidelity_section_sums is the CPU reference (host
 * memory); kvs_fidelity_section_sums_cuda runs on `stream` (a cudaStream_t) over device
 * memory, one CTA per section, out in device memory: 0, or KVS_EINTERNAL (the launch) /
 * KVS_ENOTSUP (a build without CUDA) with err set. */
void kvs_fidelity_section_sums(const uint16_t *ref, const uint16_t *dec, uint32_t nsec, size_t sec,
                               kvs_dtype dt, double *out);
int kvs_fidelity_section_sums_cuda(const uint16_t *ref, const uint16_t *dec, uint32_t nsec,
                                   size_t sec, kvs_dtype dt, double *out, void *stream,
                                   kvs_err *err);
/* sqrt(diff2 / ref2); with ref2 = 0: 0 when diff2 is 0, else 1 (module comment). */
double kvs_fidelity_ratio(double diff2, double ref2);

/* Decodes the encoded block enc (len bytes, sealed by its encoder and not changed since:
 * the checksum is not verified again) with k and v, and measures it against raw, the
 * block's input ([L][2][t][H][D], the namespace dtype; borrowed). gram: the codec whose
 * query Gram measures the logit error (the namespace's current key codec), or NULL.
 * KVS_ENOMEM (a scratch block of raw's size), or the decoder's error (KVS_EPROTO). */
int kvs_fidelity_measure(const kvs_codec *k, const kvs_codec *v, const kvs_codec *gram,
                         const uint16_t *raw, const uint8_t *enc, size_t len,
                         kvs_fidelity_sample *out, kvs_err *err);

/* ---------------------------------------------------------------- accumulator */

/* C only: fidelity.cu (C++) includes this header for the sums' declarations above, and C++
 * before C++23 has no <stdatomic.h>. */
#ifndef __CUDACC__

/* Fields private: use the functions. Zeroed memory is an empty accumulator. */
typedef struct kvs_fidelity_acc {
    struct {
        atomic_uint_fast64_t buckets[KVS_FIDELITY_NBOUNDS + 1]; /* not cumulative */
        atomic_uint_fast64_t sum_bits, max_bits;                /* doubles, as their bits */
    } h[KVS_FIDELITY_WHATS];
    atomic_uint_fast64_t checked;  /* measured against max_rel_error */
    atomic_uint_fast64_t fallback; /* blocks stored with the fallback codec */
    atomic_uint_fast64_t fallback_sides[2];
} kvs_fidelity_acc;

/* Adds one block's measurement (of the block as stored: a side stored with the fallback
 * codec is measured with it); checked: it was measured against a bound; fallback:
 * KVS_FALLBACK_* sides stored with the fallback codec. Any thread. */
void kvs_fidelity_acc_add(kvs_fidelity_acc *a, const kvs_fidelity_sample *s, bool checked,
                          unsigned fallback);

typedef struct kvs_fidelity_hist {
    uint64_t count;
    double sum, max;                            /* mean = sum / count */
    uint64_t buckets[KVS_FIDELITY_NBOUNDS + 1]; /* cumulative: [i] = count of errors <=
                                                 * bounds[i]; the last (+Inf) = count */
} kvs_fidelity_hist;

typedef struct kvs_fidelity_stats {
    kvs_fidelity_hist h[KVS_FIDELITY_WHATS];
    uint64_t checked;
    uint64_t fallback;          /* blocks */
    uint64_t fallback_sides[2]; /* [KVS_KEYS], [KVS_VALUES] */
} kvs_fidelity_stats;

/* A snapshot (module comment). Any thread. */
void kvs_fidelity_acc_read(const kvs_fidelity_acc *a, kvs_fidelity_stats *out);
#endif /* __CUDACC__ */

#ifdef __cplusplus
}
#endif

#endif
