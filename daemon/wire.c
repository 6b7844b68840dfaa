/* Wire conversions and request validation: see wire.h. */
#include "daemon/wire.h"

#include "gpu/codec/paged.h"
#include "pbc.h"

#include <grpc/byte_buffer_reader.h>
#include <grpc/slice.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

/* ---------------------------------------------------------------- unpacking */

#define WIRE_DEPTH_MAX 8 /* nesting of our messages is 2; deeper is not ours */

/* A varint at *pos (at most 10 bytes, inside len); false when malformed. */
static bool read_varint(const uint8_t *p, size_t len, size_t *pos, uint64_t *v)
{
    *v = 0;
    for (unsigned shift = 0; shift < 70 && *pos < len; shift += 7) {
        uint8_t b = p[(*pos)++];
        *v |= (uint64_t)(b & 0x7F) << shift;
        if (!(b & 0x80))
            return true;
    }
    return false;
}

/* Length of a valid UTF-8 sequence at s (n bytes left), 0 if invalid (overlongs,
 * surrogates and code points over U+10FFFF included). */
static size_t utf8_seq(const uint8_t *s, size_t n)
{
    uint8_t c = s[0];
    size_t len = c < 0x80             ? 1
                 : (c & 0xE0) == 0xC0 ? 2
                 : (c & 0xF0) == 0xE0 ? 3
                 : (c & 0xF8) == 0xF0 ? 4
                                      : 0;
    if (len == 0 || len > n || (len == 2 && c < 0xC2))
        return 0;
    for (size_t i = 1; i < len; i++)
        if ((s[i] & 0xC0) != 0x80)
            return 0;
    if (len == 3) {
        uint32_t cp = (uint32_t)(c & 0x0F) << 12 | (uint32_t)(s[1] & 0x3F) << 6 | (s[2] & 0x3F);
        if (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))
            return 0;
    } else if (len == 4) {
        uint32_t cp = (uint32_t)(c & 0x07) << 18 | (uint32_t)(s[1] & 0x3F) << 12 |
                      (uint32_t)(s[2] & 0x3F) << 6 | (s[3] & 0x3F);
        if (cp < 0x10000 || cp > 0x10FFFF)
            return 0;
    }
    return len;
}

static int check_string(const uint8_t *s, size_t n, const char *path, kvs_err *err)
{
    for (size_t i = 0; i < n;) {
        if (s[i] == 0)
            return kvs_err_set(err, KVS_EINVAL, "%s: contains a NUL byte at offset %zu", path, i);
        size_t k = utf8_seq(s + i, n - i);
        if (k == 0)
            return kvs_err_set(err, KVS_EINVAL, "%s: not valid UTF-8 at offset %zu", path, i);
        i += k;
    }
    return 0;
}

/* Walks the wire form of a `d` message and checks its string fields (recursing into
 * message fields). Malformed wire data is left to protobuf-c's unpack, which refuses it. */
static int check_strings(const ProtobufCMessageDescriptor *d, const uint8_t *p, size_t len,
                         const char *prefix, unsigned depth, kvs_err *err)
{
    size_t pos = 0;
    while (pos < len) {
        uint64_t tag, n;
        if (!read_varint(p, len, &pos, &tag))
            return 0;
        switch (tag & 7) {
        case 0:
            if (!read_varint(p, len, &pos, &n))
                return 0;
            continue;
        case 1:
            pos += 8;
            continue;
        case 5:
            pos += 4;
            continue;
        case 2:
            break;
        default:
            return 0; /* groups: not in proto3 */
        }
        if (!read_varint(p, len, &pos, &n) || n > len - pos)
            return 0;
        const ProtobufCFieldDescriptor *f =
            tag >> 3 <= UINT32_MAX
                ? protobuf_c_message_descriptor_get_field(d, (unsigned)(tag >> 3))
                : NULL;
        if (f && (f->type == PROTOBUF_C_TYPE_STRING || f->type == PROTOBUF_C_TYPE_MESSAGE)) {
            char path[128];
            snprintf(path, sizeof path, "%s%s%s", prefix, *prefix ? "." : "", f->name);
            int rc = f->type == PROTOBUF_C_TYPE_STRING ? check_string(p + pos, n, path, err)
                     : depth < WIRE_DEPTH_MAX
                         ? check_strings(f->descriptor, p + pos, n, path, depth + 1, err)
                         : 0;
            if (rc)
                return rc;
        }
        pos += n;
    }
    return 0;
}

ProtobufCMessage *kvs_wire_unpack(const ProtobufCMessageDescriptor *desc, const uint8_t *buf,
                                  size_t len, kvs_err *err)
{
    if (check_strings(desc, buf, len, "", 0, err))
        return NULL;
    ProtobufCMessage *m = protobuf_c_message_unpack(desc, NULL, len, buf);
    if (!m)
        kvs_err_set(err, KVS_EINVAL, "%s: not a valid protobuf message", desc->short_name);
    return m;
}

/* ---------------------------------------------------------------- fields */

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

int kvs_wire_spec_from_proto(const Kvstash__V1__NamespaceSpec *p, kvs_ns_spec *out, kvs_err *err)
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
    out->dtype =
        (p->dtype == KVSTASH__V1__DTYPE__DTYPE_FP16 || p->dtype == KVSTASH__V1__DTYPE__DTYPE_BF16)
            ? (kvs_dtype)p->dtype
            : KVS_DTYPE_UNSPECIFIED;
    if ((rc = copy_codec(out->key_codec, p->key_codec, "key_codec", err)))
        return rc;
    if ((rc = copy_codec(out->value_codec, p->value_codec, "value_codec", err)))
        return rc;
    out->keys_pre_rope = p->keys_pre_rope;
    out->durable = p->durable;
    out->seed = p->seed;
    out->host_quota = p->host_quota_bytes;
    out->gpu_quota = p->gpu_quota_bytes;
    out->disk_quota = p->disk_quota_bytes;
    if (p->error_sample) {
        out->error_sample_set = true;
        out->error_sample = p->error_sample->share;
    }
    out->max_rel_error = p->max_rel_error;
    const char *opt[3] = {p->fallback_codec, p->host_codec, p->disk_codec};
    char *to[3] = {out->fallback_codec, out->host_codec, out->disk_codec};
    static const char *const field[3] = {"fallback_codec", "host_codec", "disk_codec"};
    for (int i = 0; i < 3; i++) { /* "": none (kvs_spec_fill_defaults may name one) */
        if (!opt[i] || !*opt[i])
            continue;
        if (strlen(opt[i]) > KVS_CODEC_NAME_MAX)
            return kvs_err_set(err, KVS_EINVAL, "%s: unknown codec (name too long)", field[i]);
        strcpy(to[i], opt[i]);
    }
    kvs_spec_fill_defaults(out);
    return 0;
}

/* One error histogram of a snapshot (fidelity.h's cumulative buckets). */
static void error_stats(const kvs_fidelity_hist *h, double *bounds, uint64_t *buckets,
                        Kvstash__V1__ErrorStats *out)
{
    kvstash__v1__error_stats__init(out);
    out->count = h->count;
    out->sum = h->sum;
    out->max = h->max;
    memcpy(buckets, h->buckets, sizeof h->buckets);
    out->n_bounds = KVS_FIDELITY_NBOUNDS;
    out->bounds = bounds;
    out->n_buckets = KVS_FIDELITY_NBOUNDS + 1;
    out->buckets = buckets;
}

void kvs_wire_info_to_proto(const kvs_store_ns_info *src, double error_sample, kvs_wire_ns *w)
{
    Kvstash__V1__NamespaceSpec *spec = &w->spec;
    Kvstash__V1__NamespaceInfo *info = &w->info;
    kvstash__v1__namespace_spec__init(spec);
    kvstash__v1__namespace_info__init(info);
    spec->name = kvs_pb_str(src->spec.name);
    spec->layers = src->spec.layers;
    spec->kv_heads = src->spec.kv_heads;
    spec->head_dim = src->spec.head_dim;
    spec->block_tokens = src->spec.block_tokens;
    spec->dtype = (Kvstash__V1__Dtype)src->spec.dtype;
    spec->key_codec = kvs_pb_str(src->spec.key_codec);
    spec->value_codec = kvs_pb_str(src->spec.value_codec);
    spec->keys_pre_rope = src->spec.keys_pre_rope;
    spec->durable = src->spec.durable;
    spec->seed = src->spec.seed;
    spec->host_quota_bytes = src->spec.host_quota;
    spec->gpu_quota_bytes = src->spec.gpu_quota;
    spec->disk_quota_bytes = src->spec.disk_quota;
    if (src->spec.error_sample_set) {
        kvstash__v1__error_sample__init(&w->sample);
        w->sample.share = src->spec.error_sample;
        spec->error_sample = &w->sample;
    }
    spec->max_rel_error = src->spec.max_rel_error;
    spec->fallback_codec = kvs_pb_str(src->spec.fallback_codec);
    spec->host_codec = kvs_pb_str(src->spec.host_codec);
    spec->disk_codec = kvs_pb_str(src->spec.disk_codec);
    info->spec = spec;
    info->id = src->id;
    info->blocks = src->usage.blocks;
    info->stored_bytes = src->usage.stored_bytes;
    info->raw_bytes = src->usage.raw_bytes;
    info->key_state_version = src->key_state;
    info->value_state_version = src->value_state;
    uint64_t full = 0;
    kvs_spec_block_bytes(&src->spec, src->spec.block_tokens, &full, NULL);
    info->block_bytes = full;

    const kvs_fidelity_stats *f = &src->fidelity;
    Kvstash__V1__FidelityStats *fs = &w->fidelity;
    kvstash__v1__fidelity_stats__init(fs);
    memcpy(w->bounds, kvs_fidelity_bounds, sizeof w->bounds);
    for (int i = 0; i < KVS_FIDELITY_WHATS; i++)
        error_stats(&f->h[i], w->bounds, w->buckets[i], &w->errors[i]);
    fs->error_sample = error_sample;
    fs->key_error = &w->errors[KVS_FIDELITY_KEYS];
    fs->value_error = &w->errors[KVS_FIDELITY_VALUES];
    fs->logit_error = f->h[KVS_FIDELITY_LOGITS].count ? &w->errors[KVS_FIDELITY_LOGITS] : NULL;
    fs->checked = f->checked;
    fs->fallback_blocks = f->fallback;
    fs->fallback_keys = f->fallback_sides[KVS_KEYS];
    fs->fallback_values = f->fallback_sides[KVS_VALUES];
    info->fidelity = fs;
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

int kvs_wire_put_data(grpc_byte_buffer *bb, uint8_t *dst, uint64_t cap, uint64_t *n, kvs_err *err)
{
    /* Wire form of PutChunk{data: D}: 0x12, varint len(D), D. The prefix is at most
     * 11 bytes and may straddle slices, so it is gathered byte by byte first. */
    size_t total = grpc_byte_buffer_length(bb);
    grpc_byte_buffer_reader rd;
    if (total < 2 || !grpc_byte_buffer_reader_init(&rd, bb))
        return 0;
    uint8_t prefix[11];
    size_t have = 0, used = 0;
    grpc_slice s;
    int result = 0;
    uint64_t len = 0;
    size_t hdr = 0;
    while (grpc_byte_buffer_reader_next(&rd, &s)) {
        const uint8_t *p = GRPC_SLICE_START_PTR(s);
        size_t sl = GRPC_SLICE_LENGTH(s), off = 0;
        while (hdr == 0 && off < sl && have < sizeof prefix) {
            prefix[have++] = p[off++];
            if (prefix[0] != 0x12)
                break;
            if (have >= 2 && !(prefix[have - 1] & 0x80)) { /* varint complete */
                for (size_t i = have - 1; i >= 1; i--)
                    len = (len << 7) | (prefix[i] & 0x7F);
                hdr = have;
            }
        }
        if (hdr == 0 && have > 0 && (prefix[0] != 0x12 || have == sizeof prefix)) {
            grpc_slice_unref(s);
            break; /* not a lone data field: the caller unpacks */
        }
        if (hdr && used == 0) {
            if (len != total - hdr) { /* other fields follow: not the fast shape */
                grpc_slice_unref(s);
                break;
            }
            if (len > cap) {
                grpc_slice_unref(s);
                result = kvs_err_set(err, KVS_EINVAL,
                                     "payload: more than the %llu bytes that "
                                     "remain of the block",
                                     (unsigned long long)cap);
                break;
            }
            result = 1;
        }
        if (hdr && off < sl) {
            memcpy(dst + used, p + off, sl - off);
            used += sl - off;
        }
        grpc_slice_unref(s);
    }
    grpc_byte_buffer_reader_destroy(&rd);
    if (result == 1)
        *n = used;
    return result;
}

int kvs_wire_paged_layout(const Kvstash__V1__PagedLayout *p, const kvs_ns_spec *spec,
                          kvs_paged_layout *out, uint64_t *bases, kvs_err *err)
{
    if (p->n_k_base != spec->layers || p->n_v_base != spec->layers)
        return kvs_err_set(err, KVS_EINVAL,
                           "layout.k_base, layout.v_base: %zu and %zu offsets, namespace '%s' "
                           "has %u layers (one each)",
                           p->n_k_base, p->n_v_base, spec->name, spec->layers);
    memcpy(bases, p->k_base, spec->layers * sizeof *bases);
    memcpy(bases + spec->layers, p->v_base, spec->layers * sizeof *bases);
    *out = (kvs_paged_layout){.layers = spec->layers,
                              .kv_heads = spec->kv_heads,
                              .head_dim = spec->head_dim,
                              .elem_bytes = (uint32_t)kvs_dtype_size(spec->dtype),
                              .page_tokens = p->page_tokens,
                              .k_base = bases,
                              .v_base = bases + spec->layers,
                              .page_stride = p->page_stride,
                              .token_stride = p->token_stride,
                              .head_stride = p->head_stride};
    return 0;
}
