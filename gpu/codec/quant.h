/* Asymmetric min-max quantizers shared by KIVI, SQuat and RotateKV, CPU and GPU
 * (quantizers.md "Asymmetric uniform quantizer"; quantizers-reference.md §9.1).
 *
 * Both forms compute in fp32, round the stored parameters to fp16 *before* computing
 * codes (so encoder and decoder use identical parameters), round half to even (rintf,
 * as torch.round), and treat a constant group (scale 0) as exact: codes 0, decode = lo.
 *
 *  KIVI form:     scale = (max - min)/(2^b - 1), lo = min,
 *                 q = rint(clamp((x - lo)/scale, 0, 2^b - 1)),  x^ = lo + q*scale
 *  RotateKV form: mx = c*max, mn = c*min, scale = (mx - mn)/(2^b - 1),
 *                 z = rint(-mn/scale), q = clamp(rint(x/scale) + z, 0, 2^b - 1),
 *                 stored lo = -z*scale, x^ = lo + q*scale (KIVI-style decode, §3.6)
 * Decoding of both is kvs_minmax_decode: x^ = lo + q*scale with fp16 lo and scale,
 * evaluated as fmaf-free multiply then add (codecs compile with -ffp-contract=off and
 * --fmad=false).
 */
#ifndef KVS_QUANT_H
#define KVS_QUANT_H

#include <math.h>
#include <stdint.h>

#include "gpu/base/hd.h"
#include "gpu/codec/half.h"

typedef struct kvs_minmax {
    uint16_t scale; /* fp16 */
    uint16_t lo;    /* fp16 */
} kvs_minmax;

KVS_HD float kvs_minmax_decode(kvs_minmax p, unsigned q)
{
    float s = kvs_fp16_to_f32(p.scale), lo = kvs_fp16_to_f32(p.lo);
    float prod = (float)q * s;
    return lo + prod;
}

/* Parameters of a group with the given min and max (KIVI form). */
KVS_HD kvs_minmax kvs_minmax_params(float mn, float mx, unsigned bits)
{
    kvs_minmax p;
    float maxq = (float)((1u << bits) - 1);
    p.lo = kvs_f32_to_fp16(mn);
    p.scale = kvs_f32_to_fp16((mx - mn) / maxq);
    return p;
}

/* Code of x under p (KIVI form): clamp then round, half to even. */
KVS_HD unsigned kvs_minmax_code(kvs_minmax p, float x, unsigned bits)
{
    float s = kvs_fp16_to_f32(p.scale), lo = kvs_fp16_to_f32(p.lo);
    float maxq = (float)((1u << bits) - 1);
    if (s == 0.0f)
        return 0;
    float v = (x - lo) / s;
    v = v < 0.0f ? 0.0f : (v > maxq ? maxq : v);
    return (unsigned)rintf(v);
}

/* RotateKV form: parameters and codes of a group (clip ratio c multiplies min and max). */
KVS_HD kvs_minmax kvs_minmax_params_zp(float mn, float mx, float clip, unsigned bits, float *zero)
{
    kvs_minmax p;
    float maxq = (float)((1u << bits) - 1);
    float s = (clip * mx - clip * mn) / maxq;
    p.scale = kvs_f32_to_fp16(s);
    float sh = kvs_fp16_to_f32(p.scale);
    float z = sh == 0.0f ? 0.0f : rintf(-(clip * mn) / sh);
    *zero = z;
    p.lo = kvs_f32_to_fp16(-z * sh);
    return p;
}

KVS_HD unsigned kvs_minmax_code_zp(kvs_minmax p, float zero, float x, unsigned bits)
{
    float s = kvs_fp16_to_f32(p.scale);
    float maxq = (float)((1u << bits) - 1);
    if (s == 0.0f)
        return 0;
    float v = rintf(x / s) + zero;
    v = v < 0.0f ? 0.0f : (v > maxq ? maxq : v);
    return (unsigned)v;
}

#endif
