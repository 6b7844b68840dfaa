/* The encoded block format (DESIGN §5), version 1, little-endian.
 *
 *   offset  size  field
 *        0     4  magic "KVS1"
 *        4     2  format version (1)
 *        6     1  dtype (1 fp16, 2 bf16)
 *        7     1  flags (bit 0: keys are pre-RoPE)
 *        8     4  namespace id
 *       12     1  key codec id      13  1  key codec bits
 *       14     1  value codec id    15  1  value codec bits
 *       16     2  layers L          18  2  kv_heads H
 *       20     2  head_dim D        22  2  reserved (0)
 *       24     4  tokens t
 *       28     4  key codec state version
 *       32     4  value codec state version
 *       36     4  reserved (0)
 *       40     8  namespace seed
 *       48     8  total bytes of the block (header + table + sections)
 *       56     8  XXH3-64 of the whole block with these 8 bytes read as zero
 *       64  4(2L+1)  section table: byte offset (from the block start) of section
 *                 (layer l, K) at [2l], (l, V) at [2l+1]; entry [2L] = total bytes
 *   then the sections, in table order, each one layer's K or V encoded by its codec.
 *
 * Sections can be located and decoded one layer at a time. The checksum covers every
 * byte, so a flipped byte anywhere is caught. kvs_format_parse checks every offset and
 * length before use: a corrupt or truncated block is an error, never a crash.
 */
#ifndef KVS_FORMAT_H
#define KVS_FORMAT_H

#include <stddef.h>
#include <stdint.h>

#include "gpu/base/err.h"

#define KVS_FORMAT_MAGIC "KVS1"
#define KVS_FORMAT_VERSION 1
#define KVS_FORMAT_HEADER_BYTES 64

typedef struct kvs_block_info {
    uint16_t version;
    uint8_t dtype, flags;
    uint32_t ns_id;
    uint8_t k_codec, k_bits, v_codec, v_bits;
    uint32_t layers, kv_heads, head_dim, tokens;
    uint32_t k_state, v_state;
    uint64_t seed;
    uint64_t total_bytes;
    uint64_t checksum;
} kvs_block_info;

/* Bytes of header + section table for L layers. */
size_t kvs_format_prefix_bytes(uint32_t layers);

/* Writes the header and table into out (kvs_format_prefix_bytes(L) bytes); `offsets`
 * holds 2L+1 entries. The checksum field is left zero: call kvs_format_seal once the
 * sections are in place. */
void kvs_format_write_prefix(const kvs_block_info *info, const uint32_t *offsets, uint8_t *out);

/* Computes the checksum over a complete block of len bytes and stores it. */
void kvs_format_seal(uint8_t *block, size_t len);

/* Parses and validates a block of len bytes: magic, version, dimensions, total length,
 * a monotonic section table inside the block, and the checksum (KVS_EDATALOSS on
 * mismatch; KVS_EPROTO for anything malformed). Fills *info. */
int kvs_format_parse(const uint8_t *block, size_t len, kvs_block_info *info, kvs_err *err);

/* kvs_format_parse without the checksum: every structural check a reader's bounds rely
 * on, for bytes whose checksum their owner verified since they were written and which
 * cannot change meanwhile (kvs_block_trust in gpu/codec/codec.h). */
int kvs_format_check(const uint8_t *block, size_t len, kvs_block_info *info, kvs_err *err);

/* Reads the header fields of a block without validating it (len must be at least
 * KVS_FORMAT_HEADER_BYTES, else KVS_EPROTO): to choose a decoder before the full parse. */
int kvs_format_peek(const uint8_t *block, size_t len, kvs_block_info *info, kvs_err *err);

/* Section (layer, kv) of a block parsed OK: its start and length. */
void kvs_format_section(const uint8_t *block, uint32_t layer, unsigned kv, const uint8_t **start,
                        size_t *len);

#endif
