/* Wire conversions and request validation: see wire.h. */
#include "daemon/wire.h"

#include <stdio.h>
#include <string.h>

int kvs_wire_check_name(const char *name, const char *field, kvs_err *err)
{
    size_t n = name ? strnlen(name, KVS_NAME_MAX + 1) : 0;
    if (n == 0)
        return kvs_err_set(err, KVS_EINVAL, "%s: missing", field);
    if (n > KVS_NAME_MAX)
        return kvs_err_set(err, KVS_EINVAL, "%s: longer than %d characters", field, KVS_NAME_MAX);
    return 0;
}

static int copy_codec(char *dst, const char *src, const char *field, kvs_err *err)
{
    if (!src || !*src)
        src = "none";
    if (strlen(src) > KVS_CODEC_NAME_MAX)
        return kvs_err_set(err, KVS_EINVAL, "%s: unknown codec (name too long)", field);
    strcpy(dst, src);
    return 0;
}

int kvs_wire_spec_from_proto(const Kvstash__V1__NamespaceSpec *p, kvs_ns_spec *out,
                             kvs_err *err)
{
    memset(out, 0, sizeof *out);
    if (!p)
        return kvs_err_set(err, KVS_EINVAL, "spec: missing");
    int rc = kvs_wire_check_name(p->name, "name", err);
    if (rc)
        return rc;
    strcpy(out->name, p->name);
    out->layers = p->layers;
    out->kv_heads = p->kv_heads;
    out->head_dim = p->head_dim;
    out->block_tokens = p->block_tokens;
    out->dtype = (p->dtype == KVSTASH__V1__DTYPE__DTYPE_FP16 || p->dtype == KVSTASH__V1__DTYPE__DTYPE_BF16)
                     ? (kvs_dtype)p->dtype
                     : KVS_DTYPE_UNSPECIFIED;
    if ((rc = copy_codec(out->key_codec, p->key_codec, "key_codec", err)))
        return rc;
    if ((rc = copy_codec(out->value_codec, p->value_codec, "value_codec", err)))
        return rc;
    out->keys_pre_rope = p->keys_pre_rope;
    out->durable = p->durable;
    out->seed = p->seed;
    return 0;
}

void kvs_wire_info_to_proto(const kvs_store_ns_info *src, Kvstash__V1__NamespaceSpec *spec,
                            Kvstash__V1__NamespaceInfo *info)
{
    kvstash__v1__namespace_spec__init(spec);
    kvstash__v1__namespace_info__init(info);
    spec->name = (char *)src->spec.name;
    spec->layers = src->spec.layers;
    spec->kv_heads = src->spec.kv_heads;
    spec->head_dim = src->spec.head_dim;
    spec->block_tokens = src->spec.block_tokens;
    spec->dtype = (Kvstash__V1__Dtype)src->spec.dtype;
    spec->key_codec = (char *)src->spec.key_codec;
    spec->value_codec = (char *)src->spec.value_codec;
    spec->keys_pre_rope = src->spec.keys_pre_rope;
    spec->durable = src->spec.durable;
    spec->seed = src->spec.seed;
    info->spec = spec;
    info->id = src->id;
    info->blocks = src->usage.blocks;
    info->stored_bytes = src->usage.stored_bytes;
    info->raw_bytes = src->usage.raw_bytes;
    uint64_t full = 0;
    kvs_spec_block_bytes(&src->spec, src->spec.block_tokens, &full, NULL);
    info->block_bytes = full;
}

int kvs_wire_check_keys(const ProtobufCBinaryData *keys, size_t n, unsigned max_keys,
                        kvs_store_key *keys_out, kvs_err *err)
{
    if (n == 0)
        return kvs_err_set(err, KVS_EINVAL, "keys: empty list");
    if (n > max_keys)
        return kvs_err_set(err, KVS_EINVAL, "keys: %zu keys, over the limit of %u per call", n,
                           max_keys);
    for (size_t i = 0; i < n; i++) {
        if (kvs_key_validate(keys[i].len, err))
            return kvs_err_prefix(err, "keys[%zu]", i);
        keys_out[i].data = keys[i].data;
        keys_out[i].len = keys[i].len;
    }
    return 0;
}

int kvs_wire_layer_range(uint32_t begin, uint32_t end, uint32_t layers, uint32_t *out_begin,
                         uint32_t *out_end, kvs_err *err)
{
    if (end == 0)
        end = layers;
    if (end > layers)
        return kvs_err_set(err, KVS_EINVAL, "layer_end: %u beyond the namespace's %u layers", end,
                           layers);
    if (begin >= end)
        return kvs_err_set(err, KVS_EINVAL, "layer_begin: %u not below layer_end %u", begin, end);
    *out_begin = begin;
    *out_end = end;
    return 0;
}
