/* libkvstash: client-side decode of encoded blocks (DESIGN §2: "the client library
 * decodes them on its own CPU"), through the same codec library as the daemon. The
 * codecs are built per call from the namespace spec; they are cheap next to a block. */
#include <stdlib.h>
#include <string.h>

#include "gpu/codec/codec.h"
#include "gpu/codec/format.h"
#include "kvstash.h"

int kvs_decode_block(const kvs_ns_spec *spec, const void *enc, size_t len, void *raw, size_t cap,
                     kvs_get_result *res, kvs_err *err)
{
    kvs_block_info info;
    int rc = kvs_format_parse(enc, len, &info, err);
    if (rc)
        return rc;
    uint64_t need;
    if ((rc = kvs_spec_block_bytes(spec, info.tokens, &need, err)))
        return kvs_err_prefix(err, "decode");
    if (need > cap)
        return kvs_err_set(err, KVS_E2BIG, "decode: block needs %llu bytes, buffer has %zu",
                           (unsigned long long)need, cap);
    kvs_codec *k = NULL, *v = NULL;
    if ((rc = kvs_codec_create(spec, KVS_KEYS, NULL, &k, err)) == 0 &&
        (rc = kvs_codec_create(spec, KVS_VALUES, NULL, &v, err)) == 0) {
        /* Codecs whose decode reads learned state (RotateKV's key permutation) need the
         * block's state version, which the client cannot fetch yet. */
        if ((info.k_state && kvs_codec_decode_needs_state(k)) ||
            (info.v_state && kvs_codec_decode_needs_state(v)))
            rc = kvs_err_set(err, KVS_ENOTSUP,
                             "decode: block uses learned codec state "
                             "(versions %u/%u) that the client cannot fetch yet; ask for "
                             "format RAW",
                             info.k_state, info.v_state);
        else
            rc = kvs_block_decode(k, v, enc, len, 0, spec->layers, raw, err);
    }
    kvs_codec_destroy(k);
    kvs_codec_destroy(v);
    if (rc == 0 && res)
        *res = (kvs_get_result){.tokens = info.tokens,
                                .dtype = (kvs_dtype)info.dtype,
                                .layer_begin = 0,
                                .layer_end = spec->layers,
                                .bytes = need,
                                .format = KVS_FORMAT_RAW,
                                .tier = KVS_TIER_NONE};
    return rc;
}

typedef struct grow_buf {
    uint8_t *p;
    size_t len, cap;
    int oom;
} grow_buf;

static int collect(void *ctx, const kvs_get_result *hdr, uint32_t layer, uint64_t offset,
                   const void *data, size_t len)
{
    grow_buf *b = ctx;
    if (!b->p) {
        b->cap = hdr->bytes;
        if (!(b->p = malloc(b->cap ? b->cap : 1)))
            return b->oom = KVS_ENOMEM;
    }
    if (offset != b->len || len > b->cap - b->len)
        return KVS_EPROTO;
    memcpy(b->p + b->len, data, len);
    b->len += len;
    return 0;
}

int kvs_client_get_local(kvs_client *c, const char *ns, const void *key, size_t key_len, void *buf,
                         size_t cap, kvs_get_result *res, kvs_err *err)
{
    kvs_ns_info info;
    int rc = kvs_client_ns_get(c, ns, &info, err);
    if (rc)
        return rc;
    kvs_get_opts o = {.format = KVS_FORMAT_ENCODED};
    kvs_get_result got;
    grow_buf b = {0};
    rc = kvs_client_get_layers(c, ns, key, key_len, &o, collect, &b, &got, err);
    if (rc == 0)
        rc = kvs_decode_block(&info.spec, b.p, b.len, buf, cap, res, err);
    if (rc == 0 && res)
        res->tier = got.tier;
    free(b.p);
    return rc;
}
