/* Codec registry, the generic half of every codec (dtype conversion, NaN/Inf checks)
 * and block framing. The quantizers live in codec_<name>.c behind kvs_codec_ops
 * (codec_int.h). */
#include "gpu/codec/codec.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/base/mem.h"
#include "gpu/codec/codec_int.h"
#include "gpu/codec/format.h"
#include "gpu/codec/half.h"

typedef struct codec_entry {
    const char *name;
    kvs_codec_id id;
    unsigned bits;
    const kvs_codec_ops *ops;
} codec_entry;

/* The one table of codecs (quantizers.md). bits is the code width the name promises
 * (polarquant: its level-1 angle bits; the stored rate is 3.875 bits/element). */
static const codec_entry codecs[] = {
    {"none", KVS_CODEC_NONE, 16, &kvs__codec_none_ops},
    {"fp8", KVS_CODEC_FP8, 8, &kvs__codec_fp8_ops},
    {"kivi-2", KVS_CODEC_KIVI, 2, &kvs__codec_kivi_ops},
    {"kivi-3", KVS_CODEC_KIVI, 3, &kvs__codec_kivi_ops}, /* PolarQuant's bit class (4.0) */
    {"kivi-4", KVS_CODEC_KIVI, 4, &kvs__codec_kivi_ops},
    {"polarquant", KVS_CODEC_POLARQUANT, 4, &kvs__codec_polarquant_ops},
    {"rotatekv-2", KVS_CODEC_ROTATEKV, 2, &kvs__codec_rotatekv_ops},
    {"rotatekv-3", KVS_CODEC_ROTATEKV, 3, &kvs__codec_rotatekv_ops},
    {"rotatekv-4", KVS_CODEC_ROTATEKV, 4, &kvs__codec_rotatekv_ops},
    {"squat-2", KVS_CODEC_SQUAT, 2, &kvs__codec_squat_ops},
    {"squat-4", KVS_CODEC_SQUAT, 4, &kvs__codec_squat_ops},
};
#define NCODECS (sizeof codecs / sizeof codecs[0])

/* A codec whose quantizer file has no encoder yet is not offered. */
static bool available(const kvs_codec_ops *ops)
{
    return ops->encode || ops->encode_raw;
}

static const codec_entry *find(const char *name)
{
    for (size_t i = 0; i < NCODECS; i++)
        if (strcmp(codecs[i].name, name) == 0 && available(codecs[i].ops))
            return &codecs[i];
    return NULL;
}

bool kvs_codec_lookup(const char *name, kvs_codec_id *id, unsigned *bits)
{
    const codec_entry *e = find(name);
    if (!e)
        return false;
    if (id)
        *id = e->id;
    if (bits)
        *bits = e->bits;
    return true;
}

const char *kvs_codec_name(kvs_codec_id id, unsigned bits)
{
    for (size_t i = 0; i < NCODECS; i++)
        if (codecs[i].id == id && codecs[i].bits == bits)
            return codecs[i].name;
    return NULL;
}

const char *kvs_codec_names(char *buf, size_t cap)
{
    size_t n = 0;
    if (cap == 0)
        return buf;
    buf[0] = '\0';
    for (size_t i = 0; i < NCODECS; i++) {
        if (!available(codecs[i].ops))
            continue;
        size_t m = strlen(codecs[i].name);
        if (n + m + 3 >= cap)
            break;
        if (n) {
            memcpy(buf + n, ", ", 2);
            n += 2;
        }
        memcpy(buf + n, codecs[i].name, m + 1);
        n += m;
    }
    return buf;
}

int kvs_codec_create(const kvs_ns_spec *spec, kvs_kv kv, const kvs_codec_state *state,
                     kvs_codec **out, kvs_err *err)
{
    const char *field = kv == KVS_KEYS ? "key_codec" : "value_codec";
    const char *name = kv == KVS_KEYS ? spec->key_codec : spec->value_codec;
    const codec_entry *e = find(name);
    if (!e) {
        char names[160];
        return kvs_err_set(err, KVS_EINVAL, "%s: unknown codec '%.31s' (available: %s)", field,
                           name, kvs_codec_names(names, sizeof names));
    }
    kvs_codec *c = kvs_xcalloc(1, sizeof *c);
    c->ops = e->ops;
    c->id = e->id;
    c->bits = e->bits;
    c->kv = kv;
    c->spec = *spec;
    if (state && state->len) {
        void *copy = kvs_trymalloc(state->len);
        if (!copy) {
            free(c);
            return kvs_err_set(err, KVS_ENOMEM, "%s: out of memory for codec state", field);
        }
        memcpy(copy, state->data, state->len);
        c->state = (kvs_codec_state){state->version, copy, state->len};
        c->state_owned = copy;
    } else if (state) {
        c->state.version = state->version;
    }
    int rc = c->ops->init ? c->ops->init(c, err) : 0;
    if (rc) {
        kvs_err_prefix(err, "%s '%s'", field, name);
        free(c->state_owned);
        free(c);
        return rc;
    }
    *out = c;
    return 0;
}

void kvs_codec_destroy(kvs_codec *c)
{
    if (!c)
        return;
    if (c->ops->fini)
        c->ops->fini(c);
    if (c->cuda_release)
        c->cuda_release(c);
    free(c->state_owned);
    free(c);
}

kvs_codec_id kvs_codec_id_of(const kvs_codec *c)
{
    return c->id;
}
const kvs_ns_spec *kvs_codec_spec(const kvs_codec *c)
{
    return &c->spec;
}
unsigned kvs_codec_bits(const kvs_codec *c)
{
    return c->bits;
}
uint32_t kvs_codec_state_version(const kvs_codec *c)
{
    return c->state.version;
}

kvs_codec_state kvs_codec_state_of(const kvs_codec *c)
{
    return c->state;
}

bool kvs_codec_decode_needs_state(const kvs_codec *c)
{
    return !c->ops->decode_ignores_state;
}

size_t kvs_codec_section_max(const kvs_codec *c, uint32_t t)
{
    return c->ops->section_max(c, t);
}

static size_t section_elems(const kvs_codec *c, uint32_t t)
{
    return (size_t)t * c->spec.kv_heads * c->spec.head_dim;
}

int kvs_codec_check_section(const kvs_codec *c, uint32_t layer, uint32_t t, const uint8_t *sec,
                            size_t len, kvs_err *err)
{
    if (t == 0 || t > c->spec.block_tokens)
        return kvs_err_set(err, KVS_EPROTO, "tokens: %u not in 1..%u", t, c->spec.block_tokens);
    if (layer >= c->spec.layers)
        return kvs_err_set(err, KVS_EINVAL, "layer: %u not below %u", layer, c->spec.layers);
    return c->ops->check_section ? c->ops->check_section(c, layer, t, sec, len, err) : 0;
}

int kvs_codec_encode(const kvs_codec *c, uint32_t layer, uint32_t t, const uint16_t *in,
                     uint8_t *out, size_t cap, size_t *len, kvs_err *err)
{
    if (t == 0 || t > c->spec.block_tokens)
        return kvs_err_set(err, KVS_EINVAL, "tokens: %u not in 1..%u", t, c->spec.block_tokens);
    if (layer >= c->spec.layers)
        return kvs_err_set(err, KVS_EINVAL, "layer: %u not below %u", layer, c->spec.layers);
    if (c->ops->encode_raw)
        return c->ops->encode_raw(c, layer, t, in, out, cap, len, err);
    size_t n = section_elems(c, t);
    float *x = kvs_trymalloc(n * sizeof *x);
    if (!x)
        return kvs_err_set(err, KVS_ENOMEM, "encode: out of memory for %zu elements", n);
    bool bf16 = c->spec.dtype == KVS_DTYPE_BF16;
    for (size_t i = 0; i < n; i++) {
        x[i] = bf16 ? kvs_bf16_to_f32(in[i]) : kvs_fp16_to_f32(in[i]);
        if (!isfinite(x[i])) {
            kvs__nonfinite_at(c, layer, i, x[i], err);
            free(x);
            return KVS_EINVAL;
        }
    }
    int rc = c->ops->encode(c, layer, t, x, out, cap, len, err);
    free(x);
    return rc;
}

int kvs_codec_decode(const kvs_codec *c, uint32_t layer, uint32_t t, const uint8_t *in, size_t len,
                     uint16_t *out, kvs_err *err)
{
    if (t == 0 || t > c->spec.block_tokens)
        return kvs_err_set(err, KVS_EPROTO, "tokens: %u not in 1..%u", t, c->spec.block_tokens);
    if (layer >= c->spec.layers)
        return kvs_err_set(err, KVS_EINVAL, "layer: %u not below %u", layer, c->spec.layers);
    if (c->ops->decode_raw)
        return c->ops->decode_raw(c, layer, t, in, len, out, err);
    size_t n = section_elems(c, t);
    float *x = kvs_trymalloc(n * sizeof *x);
    if (!x)
        return kvs_err_set(err, KVS_ENOMEM, "decode: out of memory for %zu elements", n);
    int rc = c->ops->decode(c, layer, t, in, len, x, err);
    if (rc == 0) {
        bool bf16 = c->spec.dtype == KVS_DTYPE_BF16;
        /* A lossy reconstruction may overshoot the largest fp16 a little: saturate, so
         * that decoded blocks are always finite. */
        for (size_t i = 0; i < n; i++) {
            float v = bf16 || fabsf(x[i]) < 65504.0f ? x[i] : (x[i] < 0 ? -65504.0f : 65504.0f);
            out[i] = bf16 ? kvs_f32_to_bf16(v) : kvs_f32_to_fp16(v);
        }
    }
    free(x);
    return rc;
}

/* ---------------------------------------------------------------- blocks */

size_t kvs_block_encoded_max(const kvs_codec *k, const kvs_codec *v, uint32_t t)
{
    return kvs_format_prefix_bytes(k->spec.layers) +
           (size_t)k->spec.layers * (kvs_codec_section_max(k, t) + kvs_codec_section_max(v, t));
}

int kvs_block_encode(const kvs_codec *k, const kvs_codec *v, uint32_t ns_id, uint32_t t,
                     const uint16_t *raw, uint8_t *out, size_t cap, size_t *len, kvs_err *err)
{
    const kvs_ns_spec *s = &k->spec;
    size_t prefix = kvs_format_prefix_bytes(s->layers);
    if (cap < prefix)
        return kvs_err_set(err, KVS_ENOSPC, "encode: output buffer too small");
    uint32_t *offsets = kvs_trymalloc((2 * (size_t)s->layers + 1) * sizeof *offsets);
    if (!offsets)
        return kvs_err_set(err, KVS_ENOMEM, "encode: out of memory");
    size_t pos = prefix, sec = section_elems(k, t);
    int rc = 0;
    for (uint32_t l = 0; l < s->layers && rc == 0; l++) {
        for (unsigned kv = 0; kv < 2 && rc == 0; kv++) {
            const kvs_codec *c = kv ? v : k;
            size_t n = 0;
            offsets[2 * l + kv] = (uint32_t)pos;
            rc = kvs_codec_encode(c, l, t, raw + (2 * (size_t)l + kv) * sec, out + pos, cap - pos,
                                  &n, err);
            /* The safety net: whatever a range check missed, a NaN or Inf parameter is
             * never acknowledged (it would decode to NaN for every element it scales). */
            if (rc == 0)
                rc = kvs_codec_check_section(c, l, t, out + pos, n, err);
            pos += n;
            if (rc == 0 && pos > UINT32_MAX)
                rc = kvs_err_set(err, KVS_E2BIG, "encode: block over 4 GiB");
        }
    }
    if (rc == 0) {
        offsets[2 * s->layers] = (uint32_t)pos;
        *len = kvs_block_frame(k, v, ns_id, t, offsets, out);
    }
    free(offsets);
    return rc;
}

size_t kvs_block_frame_unsealed(const kvs_codec *k, const kvs_codec *v, uint32_t ns_id, uint32_t t,
                                const uint32_t *offsets, uint8_t *out)
{
    const kvs_ns_spec *s = &k->spec;
    size_t total = offsets[2 * s->layers];
    kvs_block_info info = {
        .dtype = (uint8_t)s->dtype,
        .flags = s->keys_pre_rope ? 1 : 0,
        .ns_id = ns_id,
        .k_codec = (uint8_t)k->id,
        .k_bits = (uint8_t)k->bits,
        .v_codec = (uint8_t)v->id,
        .v_bits = (uint8_t)v->bits,
        .layers = s->layers,
        .kv_heads = s->kv_heads,
        .head_dim = s->head_dim,
        .tokens = t,
        .k_state = k->state.version,
        .v_state = v->state.version,
        .seed = s->seed,
        .total_bytes = total,
    };
    kvs_format_write_prefix(&info, offsets, out);
    return total;
}

size_t kvs_block_frame(const kvs_codec *k, const kvs_codec *v, uint32_t ns_id, uint32_t t,
                       const uint32_t *offsets, uint8_t *out)
{
    size_t total = kvs_block_frame_unsealed(k, v, ns_id, t, offsets, out);
    kvs_format_seal(out, total);
    return total;
}

int kvs_block_check(const kvs_codec *k, const kvs_codec *v, const kvs_block_info *info,
                    kvs_err *err)
{
    const kvs_ns_spec *s = &k->spec;
    if (info->layers != s->layers || info->kv_heads != s->kv_heads ||
        info->head_dim != s->head_dim || info->dtype != s->dtype || info->tokens > s->block_tokens)
        return kvs_err_set(err, KVS_EPROTO, "encoded block: layout does not match the namespace");
    if (info->k_codec != k->id || info->k_bits != k->bits || info->v_codec != v->id ||
        info->v_bits != v->bits ||
        (kvs_codec_decode_needs_state(k) && info->k_state != k->state.version) ||
        (kvs_codec_decode_needs_state(v) && info->v_state != v->state.version))
        return kvs_err_set(err, KVS_EPROTO,
                           "encoded block: codecs or codec state versions do not "
                           "match the decoder");
    return 0;
}

int kvs_block_parse(const kvs_codec *k, const kvs_codec *v, const uint8_t *enc, size_t len,
                    kvs_block_trust trust, kvs_block_info *info, kvs_err *err)
{
    int rc = trust == KVS_BLOCK_VERIFIED ? kvs_format_check(enc, len, info, err)
                                         : kvs_format_parse(enc, len, info, err);
    return rc ? rc : kvs_block_check(k, v, info, err);
}

static int block_decode(const kvs_codec *k, const kvs_codec *v, const uint8_t *enc, size_t len,
                        kvs_block_trust trust, uint32_t layer_begin, uint32_t layer_end,
                        uint16_t *raw, kvs_err *err)
{
    kvs_block_info info;
    int rc = kvs_block_parse(k, v, enc, len, trust, &info, err);
    if (rc)
        return rc;
    const kvs_ns_spec *s = &k->spec;
    if (layer_begin >= layer_end || layer_end > s->layers)
        return kvs_err_set(err, KVS_EINVAL, "layers: [%u, %u) not within %u layers", layer_begin,
                           layer_end, s->layers);
    size_t sec = section_elems(k, info.tokens);
    for (uint32_t l = layer_begin; l < layer_end && rc == 0; l++) {
        for (unsigned kv = 0; kv < 2 && rc == 0; kv++) {
            const uint8_t *p;
            size_t n;
            kvs_format_section(enc, l, kv, &p, &n);
            rc = kvs_codec_decode(kv ? v : k, l, info.tokens, p, n,
                                  raw + (2 * (size_t)(l - layer_begin) + kv) * sec, err);
        }
    }
    return rc;
}

int kvs_block_decode(const kvs_codec *k, const kvs_codec *v, const uint8_t *enc, size_t len,
                     uint32_t layer_begin, uint32_t layer_end, uint16_t *raw, kvs_err *err)
{
    return block_decode(k, v, enc, len, KVS_BLOCK_UNTRUSTED, layer_begin, layer_end, raw, err);
}

int kvs_block_decode_verified(const kvs_codec *k, const kvs_codec *v, const uint8_t *enc,
                              size_t len, uint32_t layer_begin, uint32_t layer_end, uint16_t *raw,
                              kvs_err *err)
{
    return block_decode(k, v, enc, len, KVS_BLOCK_VERIFIED, layer_begin, layer_end, raw, err);
}

/* ---------------------------------------------------------------- a block's encodings */

static bool codec_is(const char *name, uint8_t id, uint8_t bits)
{
    const codec_entry *e = name[0] ? find(name) : NULL;
    return e && e->id == id && e->bits == bits;
}

const char *kvs_spec_enc_codec(const kvs_ns_spec *spec, kvs_kv kv, kvs_enc role)
{
    switch (role) {
    case KVS_ENC_OWN:
        return kv == KVS_KEYS ? spec->key_codec : spec->value_codec;
    case KVS_ENC_FALLBACK:
        return spec->fallback_codec;
    case KVS_ENC_HOST:
        return spec->host_codec;
    case KVS_ENC_DISK:
        return spec->disk_codec;
    }
    return "";
}

const char *kvs_enc_field(kvs_kv kv, kvs_enc role)
{
    static const char *const names[KVS_ENC_ROLES] = {NULL, "fallback_codec", "host_codec",
                                                     "disk_codec"};
    if (role == KVS_ENC_OWN || (unsigned)role >= KVS_ENC_ROLES)
        return kv == KVS_KEYS ? "key_codec" : "value_codec";
    return names[role];
}

static kvs_enc side_role(const kvs_ns_spec *spec, kvs_kv kv, uint8_t id, uint8_t bits)
{
    for (unsigned r = 0; r < KVS_ENC_ROLES; r++)
        if (codec_is(kvs_spec_enc_codec(spec, kv, (kvs_enc)r), id, bits))
            return (kvs_enc)r;
    return KVS_ENC_OWN;
}

unsigned kvs_block_encodings(const kvs_ns_spec *spec, const kvs_block_info *info)
{
    return KVS_ENC_PACK(side_role(spec, KVS_KEYS, info->k_codec, info->k_bits),
                        side_role(spec, KVS_VALUES, info->v_codec, info->v_bits));
}

unsigned kvs_block_fallback(const kvs_ns_spec *spec, const kvs_block_info *info)
{
    return kvs_enc_fallback(kvs_block_encodings(spec, info));
}

int kvs_codec_create_enc(const kvs_ns_spec *spec, kvs_kv kv, kvs_enc role,
                         const kvs_codec_state *state, kvs_codec **out, kvs_err *err)
{
    if (role == KVS_ENC_OWN)
        return kvs_codec_create(spec, kv, state, out, err);
    const char *name = kvs_spec_enc_codec(spec, kv, role), *field = kvs_enc_field(kv, role);
    if (!name[0])
        return kvs_err_set(err, KVS_EINVAL, "%s: namespace '%s' has none", field, spec->name);
    kvs_ns_spec f = *spec;
    snprintf(f.key_codec, sizeof f.key_codec, "%s", name);
    snprintf(f.value_codec, sizeof f.value_codec, "%s", name);
    int rc = kvs_codec_create(&f, kv, NULL, out, err);
    return rc ? kvs_err_prefix(err, "%s", field) : 0;
}

/* The same codec for a block's bytes: what it writes and reads does not differ. */
static bool same_codec(const kvs_codec *a, const kvs_codec *b)
{
    return a == b || (a->id == b->id && a->bits == b->bits && a->state.version == b->state.version);
}

int kvs_block_transcode(const kvs_codec *k, const kvs_codec *v, const kvs_codec *k2,
                        const kvs_codec *v2, const uint8_t *enc, size_t len, uint8_t *out,
                        size_t cap, size_t *out_len, kvs_err *err)
{
    kvs_block_info info;
    int rc = kvs_block_parse(k, v, enc, len, KVS_BLOCK_VERIFIED, &info, err);
    if (rc)
        return rc;
    const kvs_ns_spec *s = &k->spec;
    uint32_t t = info.tokens;
    if (cap < kvs_block_encoded_max(k2, v2, t))
        return kvs_err_set(err, KVS_ENOSPC, "transcode: output buffer too small");
    size_t sec = section_elems(k, t);
    uint16_t *raw = NULL;
    if ((!same_codec(k, k2) || !same_codec(v, v2)) && !(raw = kvs_trymalloc(sec * 2)))
        return kvs_err_set(err, KVS_ENOMEM, "transcode: out of memory for %zu elements", sec);
    uint32_t *offsets = kvs_trymalloc((2 * (size_t)s->layers + 1) * sizeof *offsets);
    if (!offsets) {
        free(raw);
        return kvs_err_set(err, KVS_ENOMEM, "transcode: out of memory");
    }
    size_t pos = kvs_format_prefix_bytes(s->layers);
    for (uint32_t l = 0; l < s->layers && rc == 0; l++) {
        for (unsigned kv = 0; kv < 2 && rc == 0; kv++) {
            const kvs_codec *from = kv ? v : k, *to = kv ? v2 : k2;
            const uint8_t *p;
            size_t n;
            kvs_format_section(enc, l, kv, &p, &n);
            offsets[2 * l + kv] = (uint32_t)pos;
            if (same_codec(from, to)) { /* kept: its bytes as they are */
                memcpy(out + pos, p, n);
            } else if ((rc = kvs_codec_decode(from, l, t, p, n, raw, err)) == 0 &&
                       (rc = kvs_codec_encode(to, l, t, raw, out + pos, cap - pos, &n, err)) == 0) {
                rc = kvs_codec_check_section(to, l, t, out + pos, n, err);
            }
            pos += n;
            if (rc == 0 && pos > UINT32_MAX)
                rc = kvs_err_set(err, KVS_E2BIG, "transcode: block over 4 GiB");
        }
    }
    if (rc == 0) {
        offsets[2 * s->layers] = (uint32_t)pos;
        *out_len = kvs_block_frame(k2, v2, info.ns_id, t, offsets, out);
    }
    free(offsets);
    free(raw);
    return rc;
}
