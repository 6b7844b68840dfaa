/* The encoded block format: see format.h for the layout. */
#include "gpu/codec/format.h"

#include <string.h>
#define XXH_STATIC_LINKING_ONLY /* XXH3_state_t on the stack */
#include <xxhash.h>

#include "gpu/codec/spec.h"

static void put16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}
static void put32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}
static void put64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}
static uint16_t get16(const uint8_t *p)
{
    return (uint16_t)(p[0] | p[1] << 8);
}
static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t get64(const uint8_t *p)
{
    return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32;
}

size_t kvs_format_prefix_bytes(uint32_t layers)
{
    return KVS_FORMAT_HEADER_BYTES + 4 * (2 * (size_t)layers + 1);
}

void kvs_format_write_prefix(const kvs_block_info *in, const uint32_t *offsets, uint8_t *out)
{
    memset(out, 0, KVS_FORMAT_HEADER_BYTES);
    memcpy(out, KVS_FORMAT_MAGIC, 4);
    put16(out + 4, KVS_FORMAT_VERSION);
    out[6] = in->dtype;
    out[7] = in->flags;
    put32(out + 8, in->ns_id);
    out[12] = in->k_codec;
    out[13] = in->k_bits;
    out[14] = in->v_codec;
    out[15] = in->v_bits;
    put16(out + 16, (uint16_t)in->layers);
    put16(out + 18, (uint16_t)in->kv_heads);
    put16(out + 20, (uint16_t)in->head_dim);
    put32(out + 24, in->tokens);
    put32(out + 28, in->k_state);
    put32(out + 32, in->v_state);
    put64(out + 40, in->seed);
    put64(out + 48, in->total_bytes);
    for (uint32_t i = 0; i < 2 * in->layers + 1; i++)
        put32(out + KVS_FORMAT_HEADER_BYTES + 4 * i, offsets[i]);
}

static uint64_t checksum(const uint8_t *block, size_t len)
{
    static const uint8_t zeros[8] = {0};
    XXH3_state_t st;
    XXH3_64bits_reset(&st);
    XXH3_64bits_update(&st, block, 56);
    XXH3_64bits_update(&st, zeros, 8);
    XXH3_64bits_update(&st, block + 64, len - 64);
    return XXH3_64bits_digest(&st);
}

void kvs_format_seal(uint8_t *block, size_t len)
{
    put64(block + 56, checksum(block, len));
}

int kvs_format_peek(const uint8_t *b, size_t len, kvs_block_info *info, kvs_err *err)
{
    if (len < KVS_FORMAT_HEADER_BYTES)
        return kvs_err_set(err, KVS_EPROTO, "encoded block: %zu bytes, shorter than its header",
                           len);
    memset(info, 0, sizeof *info);
    info->version = get16(b + 4);
    info->dtype = b[6];
    info->flags = b[7];
    info->ns_id = get32(b + 8);
    info->k_codec = b[12];
    info->k_bits = b[13];
    info->v_codec = b[14];
    info->v_bits = b[15];
    info->layers = get16(b + 16);
    info->kv_heads = get16(b + 18);
    info->head_dim = get16(b + 20);
    info->tokens = get32(b + 24);
    info->k_state = get32(b + 28);
    info->v_state = get32(b + 32);
    info->seed = get64(b + 40);
    info->total_bytes = get64(b + 48);
    info->checksum = get64(b + 56);
    return 0;
}

int kvs_format_check(const uint8_t *b, size_t len, kvs_block_info *info, kvs_err *err)
{
    int rc = kvs_format_peek(b, len, info, err);
    if (rc)
        return rc;
    if (memcmp(b, KVS_FORMAT_MAGIC, 4) != 0)
        return kvs_err_set(err, KVS_EPROTO, "encoded block: bad magic (not a KVS1 block)");
    if (info->version != KVS_FORMAT_VERSION)
        return kvs_err_set(err, KVS_EPROTO,
                           "encoded block: format version %u unknown (this build "
                           "reads %d)",
                           info->version, KVS_FORMAT_VERSION);
    if (info->layers == 0 || info->layers > KVS_MAX_LAYERS || info->kv_heads == 0 ||
        info->kv_heads > KVS_MAX_KV_HEADS || info->head_dim == 0 ||
        info->head_dim > KVS_MAX_HEAD_DIM || info->tokens == 0 ||
        info->tokens > KVS_MAX_BLOCK_TOKENS)
        return kvs_err_set(err, KVS_EPROTO, "encoded block: dimensions out of range");
    if (info->total_bytes != len)
        return kvs_err_set(err, KVS_EPROTO, "encoded block: header says %llu bytes, have %zu",
                           (unsigned long long)info->total_bytes, len);
    size_t prefix = kvs_format_prefix_bytes(info->layers);
    if (prefix > len)
        return kvs_err_set(err, KVS_EPROTO, "encoded block: section table runs past the end");
    uint32_t prev = (uint32_t)prefix;
    for (uint32_t i = 0; i <= 2 * info->layers; i++) {
        uint32_t off = get32(b + KVS_FORMAT_HEADER_BYTES + 4 * i);
        if (off < prev || off > len)
            return kvs_err_set(err, KVS_EPROTO,
                               "encoded block: section %u offset %u out of order "
                               "or past the end",
                               i, off);
        prev = off;
    }
    if (prev != len)
        return kvs_err_set(err, KVS_EPROTO, "encoded block: sections end at %u, block at %zu", prev,
                           len);
    return 0;
}

int kvs_format_parse(const uint8_t *b, size_t len, kvs_block_info *info, kvs_err *err)
{
    int rc = kvs_format_check(b, len, info, err);
    if (rc)
        return rc;
    if (checksum(b, len) != info->checksum)
        return kvs_err_set(err, KVS_EDATALOSS, "encoded block: checksum mismatch");
    return 0;
}

void kvs_format_section(const uint8_t *b, uint32_t layer, unsigned kv, const uint8_t **start,
                        size_t *len)
{
    const uint8_t *t = b + KVS_FORMAT_HEADER_BYTES + 4 * (2 * (size_t)layer + kv);
    uint32_t a = get32(t), e = get32(t + 4);
    *start = b + a;
    *len = e - a;
}
