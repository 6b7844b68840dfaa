/* libFuzzer target: the encoded-block parser and every codec's CPU decode (issue 14 item 6).
 *
 * Input: one selector byte (which namespace: its key and value codecs and dtype), then the
 * bytes of an encoded block as the disk tier or a client's ENCODED Get would hand them over.
 * kvs_decode_block checks the checksum and header (kvs_format_peek, kvs_block_parse with
 * KVS_BLOCK_UNTRUSTED) and decodes into a buffer of exactly one full block: whatever the
 * bytes, it must refuse with a message or write within that buffer (ASan checks), never
 * crash or read past the input. The corpus holds real blocks of every codec. A mutated
 * block would stop at the checksum almost always, so when the selector's high bit is set
 * the harness seals it first (kvs_format_seal: the checksum a writer would store): the
 * header, section table and codec sections then reach the parser and the decoders.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/codec/format.h"
#include "kvstash.h"

typedef struct nspair {
    const char *k, *v;
    kvs_dtype dtype;
} nspair;

static const nspair spaces[] = {
    {"none", "none", KVS_DTYPE_FP16},         {"fp8", "fp8", KVS_DTYPE_FP16},
    {"kivi-2", "kivi-2", KVS_DTYPE_FP16},     {"kivi-4", "kivi-4", KVS_DTYPE_BF16},
    {"polarquant", "kivi-2", KVS_DTYPE_FP16}, {"rotatekv-2", "rotatekv-4", KVS_DTYPE_FP16},
    {"squat-2", "kivi-2", KVS_DTYPE_FP16},    {"rotatekv-3", "squat-4", KVS_DTYPE_BF16},
};

/* libFuzzer's entry point. */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    const nspair *p = &spaces[data[0] % (sizeof spaces / sizeof spaces[0])];
    kvs_ns_spec s = {.name = "fuzz",
                     .layers = 2,
                     .kv_heads = 2,
                     .head_dim = 64,
                     .block_tokens = 16,
                     .dtype = p->dtype};
    strcpy(s.key_codec, p->k);
    strcpy(s.value_codec, p->v);
    size_t cap = (size_t)2 * 2 * 16 * 2 * 64 * 2; /* one full block, [L][2][T][H][D] */
    uint8_t *raw = malloc(cap);
    /* The input in its own allocation of exactly its size: a read past it is caught. */
    uint8_t *enc = malloc(size - 1 ? size - 1 : 1);
    memcpy(enc, data + 1, size - 1);
    if ((data[0] & 0x80) && size - 1 >= KVS_FORMAT_HEADER_BYTES)
        kvs_format_seal(enc, size - 1);
    kvs_get_result res;
    kvs_err err;
    int rc = kvs_decode_block(&s, enc, size - 1, raw, cap, &res, &err);
    if (rc && err.msg[0] == '\0')
        abort(); /* every refusal says why */
    if (rc == 0 && (res.bytes > cap || res.tokens == 0 || res.tokens > s.block_tokens))
        abort(); /* an accepted block fits the namespace */
    free(enc);
    free(raw);
    return 0;
}
