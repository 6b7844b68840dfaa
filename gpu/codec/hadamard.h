/* Walsh-Hadamard transforms (quantizers-reference.md §9.1), shared by PolarQuant's
 * preconditioning and RotateKV's rotations, CPU and GPU.
 *
 * kvs_fwht: in-place normalized Sylvester transform H_n/sqrt(n) in natural order, the
 * order of the standard butterfly (h = 1, 2, 4, ...: (a, b) -> (a + b, a - b)) and of
 * Dao-AILab's fast_hadamard_transform, so RotateKV's published permutations stay valid.
 * H_n/sqrt(n) is symmetric and orthogonal: it is its own inverse. n is a power of two.
 * The butterflies run in a fixed order on both sides; the final scale is one multiply
 * per element, so CPU and GPU agree bit for bit.
 */
#ifndef KVS_HADAMARD_H
#define KVS_HADAMARD_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "gpu/base/hd.h"

KVS_HD int kvs_is_pow2(size_t n)
{
    return n && !(n & (n - 1));
}

/* 1/sqrt(n) for a power of two n, exact to fp32 rounding of the constant. */
KVS_HD float kvs_fwht_scale(size_t n)
{
    /* sqrt of a power of two: 2^(k/2); odd k needs 1/sqrt(2). Computed without sqrtf so
     * host and device agree. */
    int k = 0;
    while (((size_t)1 << k) < n)
        k++;
    float s = 1.0f;
    for (int i = 0; i < k / 2; i++)
        s *= 0.5f;
    return (k & 1) ? s * 0.70710678118654752f : s;
}

KVS_HD void kvs_fwht(float *x, size_t n)
{
    for (size_t h = 1; h < n; h *= 2)
        for (size_t i = 0; i < n; i += 2 * h)
            for (size_t j = i; j < i + h; j++) {
                float a = x[j], b = x[j + h];
                x[j] = a + b;
                x[j + h] = a - b;
            }
    float s = kvs_fwht_scale(n);
    for (size_t i = 0; i < n; i++)
        x[i] *= s;
}

#endif
