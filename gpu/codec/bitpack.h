/* b-bit code packing, written once for every codec (quantizers.md: "codes packed
 * little-endian, LSB first, within each group; groups padded to whole bytes").
 * Code j of a group occupies bits [j*b, (j+1)*b) of the group's byte string, bit 0 being
 * the least significant bit of byte 0. b is 1..8. */
#ifndef KVS_BITPACK_H
#define KVS_BITPACK_H

#include <stddef.h>
#include <stdint.h>

#include "gpu/base/hd.h"

/* Bytes that n codes of b bits take. */
KVS_HD size_t kvs_bitpack_bytes(size_t n, unsigned b)
{
    return (n * b + 7) / 8;
}

/* Writes n codes (each < 2^b) to out (kvs_bitpack_bytes(n, b) bytes, fully written). */
KVS_HD void kvs_bitpack(const uint8_t *codes, size_t n, unsigned b, uint8_t *out)
{
    size_t nb = kvs_bitpack_bytes(n, b);
    for (size_t i = 0; i < nb; i++)
        out[i] = 0;
    for (size_t j = 0; j < n; j++) {
        size_t bit = j * b;
        uint32_t v = (uint32_t)codes[j] << (bit & 7);
        out[bit >> 3] |= (uint8_t)v;
        if ((bit & 7) + b > 8)
            out[(bit >> 3) + 1] |= (uint8_t)(v >> 8);
    }
}

/* Reads code j of a group packed with b bits. */
KVS_HD uint8_t kvs_bitunpack1(const uint8_t *in, size_t j, unsigned b)
{
    size_t bit = j * b;
    uint32_t v = in[bit >> 3];
    if ((bit & 7) + b > 8)
        v |= (uint32_t)in[(bit >> 3) + 1] << 8;
    return (uint8_t)((v >> (bit & 7)) & ((1u << b) - 1));
}

KVS_HD void kvs_bitunpack(const uint8_t *in, size_t n, unsigned b, uint8_t *codes)
{
    for (size_t j = 0; j < n; j++)
        codes[j] = kvs_bitunpack1(in, j, b);
}

#endif
