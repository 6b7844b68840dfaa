/* Namespace specification: one model's KV layout plus its codec choice (DESIGN §1).
 *
 * A kvs_ns_spec is a plain value type shared by the daemon, the storage layer and the
 * client. It is validated once (kvs_spec_validate) when a namespace is created; every
 * size later taken from a request is checked against it before a buffer is sized.
 * Block layout, row-major: [L][2][t][H][D] (2 = K then V), t <= T tokens.
 */
#ifndef KVS_SPEC_H
#define KVS_SPEC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "gpu/base/err.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KVS_NAME_MAX 64 /* namespace name: 1..64 of [A-Za-z0-9._-] */
#define KVS_KEY_MAX 64  /* block key: 1..64 opaque bytes */
#define KVS_CODEC_NAME_MAX 31

/* Limits on a layout; generous for today's models, small enough that every product of
 * them fits in 64 bits with room to spare. */
#define KVS_MAX_LAYERS 1024
#define KVS_MAX_KV_HEADS 1024
#define KVS_MAX_HEAD_DIM 1024
#define KVS_MAX_BLOCK_TOKENS 65536

typedef enum kvs_dtype {
    KVS_DTYPE_UNSPECIFIED = 0,
    KVS_DTYPE_FP16 = 1,
    KVS_DTYPE_BF16 = 2,
} kvs_dtype;

typedef struct kvs_ns_spec {
    char name[KVS_NAME_MAX + 1];
    uint32_t layers;       /* L */
    uint32_t kv_heads;     /* H */
    uint32_t head_dim;     /* D, a multiple of 16 */
    uint32_t block_tokens; /* T */
    kvs_dtype dtype;
    char key_codec[KVS_CODEC_NAME_MAX + 1];
    char value_codec[KVS_CODEC_NAME_MAX + 1];
    bool keys_pre_rope;
    bool durable;
    uint64_t seed;
    uint64_t host_quota; /* bytes of the host tier the namespace may hold; 0 = no quota. Over
                          * it, a Put evicts the namespace's own blocks, never another's. */
    /* Fidelity (README "Namespace options"; storage/xfer.h decides per Put). The share of
     * Puts whose encoded block is decoded again and measured against its input, 0..1,
     * when error_sample_set; unset (a zeroed spec, a namespace recorded before these
     * fields): the daemon's --error-sample. */
    bool error_sample_set;
    double error_sample;
    /* The bound, 0 = none: every Put is measured, and a side (keys or values) whose
     * relative error passes it is stored with fallback_codec instead (a codec without
     * learned state; recorded in the block's header, gpu/codec/format.h). */
    double max_rel_error;
    char fallback_codec[KVS_CODEC_NAME_MAX + 1]; /* "" without a bound */
    /* Quotas of the other tiers, as host_quota (0 = none; at least one full block). Last in
     * the struct, so that the fields before keep their offsets (client ABI). GPU: over it, a
     * Put lands in the host tier and the namespace's own least recently used GPU blocks are
     * demoted; disk: over it, a write to the disk tier evicts the namespace's own oldest
     * records, never another's (storage/store.h "Quotas"). */
    uint64_t gpu_quota;
    uint64_t disk_quota;
    /* Precision demotion (README "Namespace options"): the codec of the host tier and of
     * the disk tier, "" = a block keeps its encoding there. Puts land in the GPU tier with
     * the namespace's own codecs (key_codec, value_codec: the GPU tier's, so it has no field
     * of its own); a block that moves down to a tier, or is Put straight into the host tier,
     * has each side (keys, values) encoded with that tier's codec when it is smaller than
     * the side's encoding so far (kvs_codec_section_max), else it keeps it: a block only
     * ever gets colder, and a promotion keeps its colder encoding. A tier codec encodes
     * without learned state (RotateKV: the identity channel order; SQuat: no query
     * subspace, i.e. KIVI), so its blocks decode without any. Not with max_rel_error. */
    char host_codec[KVS_CODEC_NAME_MAX + 1];
    char disk_codec[KVS_CODEC_NAME_MAX + 1];
} kvs_ns_spec;

/* Bytes of one element of dtype (2), or 0 for an unknown dtype. */
size_t kvs_dtype_size(kvs_dtype dtype);
const char *kvs_dtype_name(kvs_dtype dtype);
/* Parses "fp16"/"bf16"; returns KVS_DTYPE_UNSPECIFIED otherwise. */
kvs_dtype kvs_dtype_parse(const char *s);

/* True if s names a codec this build can store with (gpu/codec.h registry). */
bool kvs_codec_name_known(const char *s);

/* True if s is a valid namespace name: 1..KVS_NAME_MAX of [A-Za-z0-9._-], not "." or
 * ".." (the rule kvs_spec_validate applies; the daemon's tenant file uses it too). */
bool kvs_spec_name_ok(const char *s);

/* Checks every field; the message names the field at fault. Empty codec names are
 * not accepted here: callers fill defaults ("none") first, the fallback codec's too when
 * max_rel_error is set (kvs_spec_fill_defaults). A fallback codec must be one whose
 * blocks decode without learned state (none, fp8, kivi-*, polarquant) and may not be the
 * namespace's own key and value codec both. host_codec and disk_codec are "" or any known
 * codec, and not set together with max_rel_error (the bound is checked against a Put's
 * input, which a later re-encode no longer has). */
int kvs_spec_validate(const kvs_ns_spec *spec, kvs_err *err);

/* Fills the defaults a caller may leave empty: codec names "none", and with max_rel_error
 * set and no fallback_codec, "none" (the block as it is: the bound then always holds). */
void kvs_spec_fill_defaults(kvs_ns_spec *spec);

/* Raw payload bytes of a block of `tokens` tokens: L * 2 * tokens * H * D * sizeof(dtype).
 * Fails with KVS_EINVAL if tokens is 0 or above block_tokens (message names "tokens"). */
int kvs_spec_block_bytes(const kvs_ns_spec *spec, uint32_t tokens, uint64_t *out, kvs_err *err);

/* Raw bytes of one layer (K and V) of a block of `tokens` tokens (no checks beyond
 * those of a validated spec). */
uint64_t kvs_spec_layer_bytes(const kvs_ns_spec *spec, uint32_t tokens);

/* Checks a raw payload of `tokens` tokens (layout [L][2][t][H][D], spec->dtype) for NaN
 * and Inf, which no codec can store meaningfully (DESIGN §4). KVS_EINVAL names the first
 * bad element: "payload: NaN at layer 3, V, token 7, head 1, channel 42". */
int kvs_payload_check_finite(const kvs_ns_spec *spec, uint32_t tokens, const void *data,
                             kvs_err *err);

/* Checks a block key's length (1..KVS_KEY_MAX); message names "key". */
int kvs_key_validate(size_t key_len, kvs_err *err);

#ifdef __cplusplus
}
#endif

#endif
