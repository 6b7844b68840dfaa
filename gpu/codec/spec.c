/* Namespace specification: see spec.h. */
#include "gpu/codec/spec.h"

#include <math.h>
#include <string.h>

#include "gpu/base/mem.h"
#include "gpu/codec/codec.h"

size_t kvs_dtype_size(kvs_dtype dtype)
{
    return (dtype == KVS_DTYPE_FP16 || dtype == KVS_DTYPE_BF16) ? 2 : 0;
}

const char *kvs_dtype_name(kvs_dtype dtype)
{
    switch (dtype) {
    case KVS_DTYPE_FP16:
        return "fp16";
    case KVS_DTYPE_BF16:
        return "bf16";
    default:
        return "unspecified";
    }
}

kvs_dtype kvs_dtype_parse(const char *s)
{
    if (strcmp(s, "fp16") == 0)
        return KVS_DTYPE_FP16;
    if (strcmp(s, "bf16") == 0)
        return KVS_DTYPE_BF16;
    return KVS_DTYPE_UNSPECIFIED;
}

bool kvs_codec_name_known(const char *s)
{
    return kvs_codec_lookup(s, NULL, NULL);
}

bool kvs_spec_name_ok(const char *s)
{
    size_t n = strnlen(s, KVS_NAME_MAX + 1);
    if (n == 0 || n > KVS_NAME_MAX)
        return false;
    /* "." and ".." would name a directory, not a namespace, wherever a name becomes a
     * path component or a metric label. */
    if (!strcmp(s, ".") || !strcmp(s, ".."))
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                  c == '.' || c == '_' || c == '-';
        if (!ok)
            return false;
    }
    return true;
}

/* The fallback codec: only with a bound, and one that stores a block whose error passed
 * it without the namespace's learned state: a block stored that way must decode wherever
 * the namespace's blocks decode (the client library included), and the state a RotateKV or
 * SQuat codec learns belongs to the namespace's own codec. */
static int fallback_validate(const kvs_ns_spec *s, kvs_err *err)
{
    const char *f = s->fallback_codec;
    if (!f[0])
        return s->max_rel_error > 0
                   ? kvs_err_set(err, KVS_EINVAL,
                                 "fallback_codec: missing (max_rel_error needs the codec "
                                 "a block that passes it is stored with; none keeps it as it is)")
                   : 0;
    if (s->max_rel_error == 0)
        return kvs_err_set(err, KVS_EINVAL,
                           "fallback_codec: '%.31s' given without max_rel_error, the bound "
                           "that decides when it is used",
                           f);
    kvs_codec_id id;
    char names[160];
    if (!kvs_codec_lookup(f, &id, NULL))
        return kvs_err_set(err, KVS_EINVAL, "fallback_codec: unknown codec '%.31s' (available: %s)",
                           f, kvs_codec_names(names, sizeof names));
    if (id == KVS_CODEC_ROTATEKV || id == KVS_CODEC_SQUAT)
        return kvs_err_set(err, KVS_EINVAL,
                           "fallback_codec: '%.31s' learns codec state; a fallback must decode "
                           "without it: none, fp8, kivi-2, kivi-3, kivi-4 or polarquant",
                           f);
    if (strcmp(f, s->key_codec) == 0 && strcmp(f, s->value_codec) == 0)
        return kvs_err_set(err, KVS_EINVAL,
                           "fallback_codec: '%.31s' is the namespace's own key and value codec; "
                           "a fallback must differ from one of them",
                           f);
    return 0;
}

/* A tier codec (precision demotion): any codec, used without learned state (spec.h), and
 * not beside a bound: max_rel_error promises the error of a block against the input of its
 * Put, which a re-encode on the way down no longer has to measure against. */
static int tier_validate(const kvs_ns_spec *s, const char *field, const char *c, kvs_err *err)
{
    char names[160];
    if (!c[0])
        return 0;
    if (!kvs_codec_name_known(c))
        return kvs_err_set(err, KVS_EINVAL, "%s: unknown codec '%.31s' (available: %s)", field, c,
                           kvs_codec_names(names, sizeof names));
    if (s->max_rel_error > 0)
        return kvs_err_set(err, KVS_EINVAL,
                           "%s: '%.31s' given with max_rel_error: a re-encoded block's error "
                           "cannot be checked against its Put's input any more; use one or the "
                           "other",
                           field, c);
    return 0;
}

void kvs_spec_fill_defaults(kvs_ns_spec *s)
{
    if (!s->key_codec[0])
        strcpy(s->key_codec, "none");
    if (!s->value_codec[0])
        strcpy(s->value_codec, "none");
    if (s->max_rel_error > 0 && !s->fallback_codec[0])
        strcpy(s->fallback_codec, "none");
}

int kvs_spec_validate(const kvs_ns_spec *s, kvs_err *err)
{
    if (!kvs_spec_name_ok(s->name))
        return kvs_err_set(err, KVS_EINVAL,
                           "name: must be 1..%d characters of [A-Za-z0-9._-], not \".\" or \"..\"",
                           KVS_NAME_MAX);
    if (s->layers == 0 || s->layers > KVS_MAX_LAYERS)
        return kvs_err_set(err, KVS_EINVAL, "layers: %u not in 1..%d", s->layers, KVS_MAX_LAYERS);
    if (s->kv_heads == 0 || s->kv_heads > KVS_MAX_KV_HEADS)
        return kvs_err_set(err, KVS_EINVAL, "kv_heads: %u not in 1..%d", s->kv_heads,
                           KVS_MAX_KV_HEADS);
    if (s->head_dim == 0 || s->head_dim > KVS_MAX_HEAD_DIM || s->head_dim % 16 != 0)
        return kvs_err_set(err, KVS_EINVAL, "head_dim: %u must be a multiple of 16 in 16..%d",
                           s->head_dim, KVS_MAX_HEAD_DIM);
    if (s->block_tokens == 0 || s->block_tokens > KVS_MAX_BLOCK_TOKENS)
        return kvs_err_set(err, KVS_EINVAL, "block_tokens: %u not in 1..%d", s->block_tokens,
                           KVS_MAX_BLOCK_TOKENS);
    if (kvs_dtype_size(s->dtype) == 0)
        return kvs_err_set(err, KVS_EINVAL, "dtype: must be fp16 or bf16");
    char names[160];
    if (!kvs_codec_name_known(s->key_codec))
        return kvs_err_set(err, KVS_EINVAL, "key_codec: unknown codec '%.31s' (available: %s)",
                           s->key_codec, kvs_codec_names(names, sizeof names));
    if (!kvs_codec_name_known(s->value_codec))
        return kvs_err_set(err, KVS_EINVAL, "value_codec: unknown codec '%.31s' (available: %s)",
                           s->value_codec, kvs_codec_names(names, sizeof names));
    if (s->error_sample_set && !(s->error_sample >= 0 && s->error_sample <= 1))
        return kvs_err_set(err, KVS_EINVAL,
                           "error_sample: %g is not a share of Puts in 0..1 (0: none measured)",
                           s->error_sample);
    if (!(s->max_rel_error >= 0 && isfinite(s->max_rel_error)))
        return kvs_err_set(err, KVS_EINVAL,
                           "max_rel_error: %g is not a relative error >= 0 (0: no bound)",
                           s->max_rel_error);
    int rc = fallback_validate(s, err);
    if (rc == 0)
        rc = tier_validate(s, "host_codec", s->host_codec, err);
    if (rc == 0)
        rc = tier_validate(s, "disk_codec", s->disk_codec, err);
    if (rc)
        return rc;
    /* A quota under one full block could never hold one: its tier would be closed to the
     * namespace, which 0 (no quota) never means. */
    uint64_t full;
    if (kvs_spec_block_bytes(s, s->block_tokens, &full, NULL) != 0)
        return 0; /* block_tokens was checked above: cannot happen */
    const struct {
        uint64_t quota;
        const char *field;
    } quotas[3] = {{s->host_quota, "host_quota_bytes"},
                   {s->gpu_quota, "gpu_quota_bytes"},
                   {s->disk_quota, "disk_quota_bytes"}};
    for (int i = 0; i < 3; i++)
        if (quotas[i].quota && quotas[i].quota < full)
            return kvs_err_set(err, KVS_EINVAL,
                               "%s: %llu is less than one full block (%llu bytes): "
                               "0 (no quota) or at least a block",
                               quotas[i].field, (unsigned long long)quotas[i].quota,
                               (unsigned long long)full);
    return 0;
}

uint64_t kvs_spec_layer_bytes(const kvs_ns_spec *s, uint32_t tokens)
{
    /* Bounded by the KVS_MAX_* limits: 2 * 65536 * 1024 * 1024 * 2 < 2^39. */
    return 2ull * tokens * s->kv_heads * s->head_dim * kvs_dtype_size(s->dtype);
}

int kvs_spec_block_bytes(const kvs_ns_spec *s, uint32_t tokens, uint64_t *out, kvs_err *err)
{
    if (tokens == 0 || tokens > s->block_tokens)
        return kvs_err_set(err, KVS_EINVAL, "tokens: %u not in 1..%u (block_tokens of '%s')",
                           tokens, s->block_tokens, s->name);
    uint64_t total;
    if (!kvs_mul_size(kvs_spec_layer_bytes(s, tokens), s->layers, &total))
        return kvs_err_set(err, KVS_EINVAL, "tokens: block size overflows");
    *out = total;
    return 0;
}

int kvs_key_validate(size_t key_len, kvs_err *err)
{
    if (key_len == 0)
        return kvs_err_set(err, KVS_EINVAL, "key: empty (must be 1..%d bytes)", KVS_KEY_MAX);
    if (key_len > KVS_KEY_MAX)
        return kvs_err_set(err, KVS_EINVAL, "key: %zu bytes, over the limit of %d", key_len,
                           KVS_KEY_MAX);
    return 0;
}

int kvs_payload_check_finite(const kvs_ns_spec *s, uint32_t tokens, const void *data, kvs_err *err)
{
    /* fp16 and bf16 both flag NaN/Inf with an all-ones exponent; only its width differs. */
    const uint16_t mask = s->dtype == KVS_DTYPE_BF16 ? 0x7F80 : 0x7C00;
    const uint16_t *x = data;
    uint64_t n = kvs_spec_layer_bytes(s, tokens) / 2 * s->layers;
    enum { STRIDE = 4096 };
    for (uint64_t base = 0; base < n; base += STRIDE) {
        uint64_t end = base + STRIDE < n ? base + STRIDE : n;
        unsigned bad = 0;
        for (uint64_t i = base; i < end; i++) /* branch-free: vectorizes */
            bad |= (x[i] & mask) == mask;
        if (!bad)
            continue;
        for (uint64_t i = base; i < end; i++) {
            if ((x[i] & mask) != mask)
                continue;
            uint64_t hd = (uint64_t)s->kv_heads * s->head_dim, r = i;
            uint32_t ch = (uint32_t)(r % s->head_dim);
            uint32_t head = (uint32_t)(r / s->head_dim % s->kv_heads);
            uint32_t tok = (uint32_t)(r / hd % tokens);
            uint32_t kv = (uint32_t)(r / (hd * tokens) % 2);
            uint32_t layer = (uint32_t)(r / (hd * tokens * 2));
            bool nan = (x[i] & (uint16_t) ~(mask | 0x8000)) != 0;
            return kvs_err_set(err, KVS_EINVAL,
                               "payload: %s at layer %u, %s, token %u, head %u, channel %u",
                               nan ? "NaN" : (x[i] & 0x8000 ? "-Inf" : "+Inf"), layer,
                               kv ? "V" : "K", tok, head, ch);
        }
    }
    return 0;
}
