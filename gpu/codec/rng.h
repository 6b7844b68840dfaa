/* Deterministic randomness for codecs (quantizers.md: "every random object is derived
 * from (seed, layer, K/V, head) with a fixed, documented generator").
 *
 * Stream key: splitmix64 applied to seed ^ mix(layer, kv, head, purpose) seeds the four
 * words of xoshiro256**; draws are xoshiro256** outputs. The same (seed, layer, kv, head,
 * purpose) gives the same sequence on every machine, CPU or GPU, today and after a
 * restart. `purpose` separates independent objects of one codec (e.g. 1 = Hadamard signs).
 */
#ifndef KVS_RNG_H
#define KVS_RNG_H

#include <stdint.h>

#include "gpu/base/hd.h"

typedef struct kvs_rng {
    uint64_t s[4];
} kvs_rng;

KVS_HD uint64_t kvs_splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

KVS_HD void kvs_rng_init(kvs_rng *r, uint64_t seed, uint32_t layer, uint32_t kv, uint32_t head,
                         uint32_t purpose)
{
    uint64_t x = seed ^ ((uint64_t)layer << 40) ^ ((uint64_t)kv << 39) ^ ((uint64_t)head << 20) ^
                 (uint64_t)purpose;
    x = kvs_splitmix64(&x) ^ seed; /* decorrelate nearby stream keys */
    for (int i = 0; i < 4; i++)
        r->s[i] = kvs_splitmix64(&x);
}

KVS_HD uint64_t kvs_rng_next(kvs_rng *r)
{
    uint64_t *s = r->s;
    uint64_t v = s[1] * 5;
    uint64_t result = ((v << 7) | (v >> 57)) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = (s[3] << 45) | (s[3] >> 19);
    return result;
}

#endif
