/* fp16, bf16 and fp8 (e4m3fn) conversions, bit-exact and shared by CPU and GPU.
 *
 * All conversions to narrower formats round to nearest, ties to even. fp16 and bf16
 * keep Inf and NaN (the daemon rejects them before any codec runs); fp8 e4m3fn has no
 * Inf: finite values saturate to +-448 and NaN stays NaN (0x7F), as __NV_SATFINITE does
 * (quantizers.md `fp8`). Written with integer operations so that nvcc and gcc agree.
 */
#ifndef KVS_HALF_H
#define KVS_HALF_H

#include <stdint.h>
#include <string.h>

#include "gpu/base/hd.h"

KVS_HD uint32_t kvs_f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

KVS_HD float kvs_bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

KVS_HD float kvs_fp16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    if (exp == 0x1F) /* Inf / NaN */
        return kvs_bits_f32(sign | 0x7F800000u | (man << 13));
    if (exp == 0) {
        if (man == 0)
            return kvs_bits_f32(sign);
        /* subnormal: man * 2^-24, exact in fp32 */
        float v = (float)man * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    return kvs_bits_f32(sign | ((exp + 112) << 23) | (man << 13));
}

KVS_HD uint16_t kvs_f32_to_fp16(float f)
{
    uint32_t u = kvs_f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    uint32_t a = u & 0x7FFFFFFFu;
    if (a >= 0x7F800000u) /* Inf or NaN (quiet NaN kept) */
        return (uint16_t)(sign | 0x7C00 | (a > 0x7F800000u ? 0x200 : 0));
    if (a >= 0x477FF000u) /* rounds to >= 65520: overflow to Inf */
        return (uint16_t)(sign | 0x7C00);
    if (a < 0x38800000u) {   /* below the smallest normal 2^-14: subnormal or zero */
        if (a < 0x33000000u) /* below half the smallest subnormal: 0 (2^-25 ties to 0) */
            return sign;
        uint32_t e = a >> 23, m = (a & 0x7FFFFF) | 0x800000;
        uint32_t shift = 126 - e; /* value = m * 2^(e-150); subnormal unit 2^-24 */
        uint32_t q = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1)))
            q++;
        return (uint16_t)(sign | q);
    }
    uint32_t q = ((a >> 13) - (112u << 10)), rem = a & 0x1FFF;
    if (rem > 0x1000 || (rem == 0x1000 && (q & 1)))
        q++; /* may carry into the exponent: still correct, up to 0x7BFF */
    return (uint16_t)(sign | q);
}

KVS_HD float kvs_bf16_to_f32(uint16_t h)
{
    return kvs_bits_f32((uint32_t)h << 16);
}

KVS_HD uint16_t kvs_f32_to_bf16(float f)
{
    uint32_t u = kvs_f32_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u)
        return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    uint32_t lsb = (u >> 16) & 1;
    return (uint16_t)((u + 0x7FFFu + lsb) >> 16);
}

/* e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa; 0x7F/0xFF NaN; max 448. */
KVS_HD float kvs_fp8_to_f32(uint8_t b)
{
    uint32_t sign = (uint32_t)(b & 0x80) << 24;
    uint32_t exp = (b >> 3) & 0xF, man = b & 7;
    if (exp == 0xF && man == 7)
        return kvs_bits_f32(sign | 0x7FC00000u);
    if (exp == 0) {
        float v = (float)man * 0.001953125f; /* man * 2^-9 */
        return sign ? -v : v;
    }
    return kvs_bits_f32(sign | ((exp + 120) << 23) | (man << 20));
}

KVS_HD uint8_t kvs_f32_to_fp8(float f)
{
    uint32_t u = kvs_f32_bits(f);
    uint8_t sign = (uint8_t)((u >> 24) & 0x80);
    uint32_t a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u)
        return (uint8_t)(sign | 0x7F);
    if (a >= 0x43E00000u) /* >= 448 (and Inf): saturate */
        return (uint8_t)(sign | 0x7E);
    if (a < 0x3C800000u) {   /* below 2^-6, the smallest normal: subnormal, unit 2^-9 */
        if (a < 0x3A800000u) /* below 2^-10 = half the smallest subnormal: 0 (tie to even) */
            return sign;
        uint32_t e = a >> 23, m = (a & 0x7FFFFF) | 0x800000;
        uint32_t shift = 141 - e; /* value = m * 2^(e-150); unit 2^-9 */
        uint32_t q = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1)))
            q++;
        return (uint8_t)(sign | q);
    }
    uint32_t q = (a >> 20) - (120u << 3), rem = a & 0xFFFFF;
    if (rem > 0x80000 || (rem == 0x80000 && (q & 1)))
        q++;
    if (q > 0x7E) /* rounded past 448: saturate */
        q = 0x7E;
    return (uint8_t)(sign | q);
}

#endif
