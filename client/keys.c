/* Chained block keys (DESIGN §1, contract in include/kvstash.h).
 *
 * key_i = XXH3-128 (seed 0) over key_{i-1} (16 bytes) then block i's token ids as
 * little-endian uint32, in XXH128's canonical (big-endian) form; key_{-1} is 16 zero
 * bytes. The byte order is spelled out, not left to the host, because every process
 * and language must derive the same keys. Pure functions: no state, any thread.
 */
#include "kvstash.h"

#include <stdlib.h>
#include <string.h>

/* For XXH3_state_t on the stack: libxxhash's header and library ship together. */
#define XXH_STATIC_LINKING_ONLY
#include <xxhash.h>

/* Tokens are encoded into a small stack buffer in batches of this many. */
#define TOKEN_BATCH 256

/* XXH3's streaming calls fail only on NULL arguments, which never happens here: a
 * failure is a bug, not an input error, and a wrong key must never be returned. */
static void xxh_must(XXH_errorcode rc)
{
    if (rc != XXH_OK)
        abort();
}

void kvs_key_chain(const uint8_t prev[KVS_CHAIN_KEY_LEN], const uint32_t *tokens, size_t n,
                   uint8_t out[KVS_CHAIN_KEY_LEN])
{
    static const uint8_t zeros[KVS_CHAIN_KEY_LEN];
    XXH3_state_t st;
    uint8_t le[TOKEN_BATCH * 4];

    XXH3_INITSTATE(&st);
    xxh_must(XXH3_128bits_reset(&st));
    xxh_must(XXH3_128bits_update(&st, prev ? prev : zeros, KVS_CHAIN_KEY_LEN));
    for (size_t done = 0; done < n;) {
        size_t m = n - done < TOKEN_BATCH ? n - done : TOKEN_BATCH;
        for (size_t i = 0; i < m; i++) {
            uint32_t t = tokens[done + i];
            le[4 * i + 0] = (uint8_t)t;
            le[4 * i + 1] = (uint8_t)(t >> 8);
            le[4 * i + 2] = (uint8_t)(t >> 16);
            le[4 * i + 3] = (uint8_t)(t >> 24);
        }
        xxh_must(XXH3_128bits_update(&st, le, 4 * m));
        done += m;
    }
    XXH128_canonical_t canon;
    XXH128_canonicalFromHash(&canon, XXH3_128bits_digest(&st));
    memcpy(out, canon.digest, KVS_CHAIN_KEY_LEN);
}

size_t kvs_key_chain_seq(const uint32_t *tokens, size_t n_tokens, uint32_t block_tokens,
                         kvs_key *keys, size_t max_keys)
{
    if (block_tokens == 0 || n_tokens == 0)
        return 0;
    size_t need = n_tokens / block_tokens + (n_tokens % block_tokens != 0);
    uint8_t prev[KVS_CHAIN_KEY_LEN] = {0};
    for (size_t i = 0; i < need && i < max_keys; i++) {
        size_t begin = i * block_tokens;
        size_t len = n_tokens - begin < block_tokens ? n_tokens - begin : block_tokens;
        kvs_key_chain(prev, tokens + begin, len, prev);
        keys[i].len = KVS_CHAIN_KEY_LEN;
        memcpy(keys[i].bytes, prev, KVS_CHAIN_KEY_LEN);
    }
    return need;
}
