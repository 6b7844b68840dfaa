/* libkvstash: client-side decode of encoded blocks (DESIGN §2: "the client library
 * decodes them on its own CPU"), through the same codec library as the daemon. The
 * codecs are built per call from the namespace spec; they are cheap next to a block. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client/client_int.h"
#include "gpu/base/mem.h"
#include "kvstash/v1/kvstash.pb-c.h"
#include "pbc.h"

#include "gpu/codec/codec.h"
#include "gpu/codec/format.h"
#include "kvstash.h"

/* Decodes with the learned states given (NULL: version 0, or a codec whose decode ignores
 * its state). */
static int decode_with(const kvs_ns_spec *spec, const kvs_codec_state *ks,
                       const kvs_codec_state *vs, const void *enc, size_t len, void *raw,
                       size_t cap, kvs_get_result *res, kvs_err *err)
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
    /* A side stored with another codec than the namespace's own (its fallback, with
     * max_rel_error; a colder tier's, after a demotion) says so by the codec in the header;
     * those codecs have no learned state. */
    unsigned roles = kvs_block_encodings(spec, &info);
    kvs_enc rk = kvs_enc_side(roles, KVS_KEYS), rv = kvs_enc_side(roles, KVS_VALUES);
    kvs_codec *k = NULL, *v = NULL;
    if ((rc = kvs_codec_create_enc(spec, KVS_KEYS, rk, ks, &k, err)) == 0 &&
        (rc = kvs_codec_create_enc(spec, KVS_VALUES, rv, vs, &v, err)) == 0) {
        /* Codecs whose decode reads learned state (RotateKV's key permutation) need the
         * block's own state version (kvs_client_decode_block fetches it). */
        if ((info.k_state && kvs_codec_decode_needs_state(k) &&
             kvs_codec_state_version(k) != info.k_state) ||
            (info.v_state && kvs_codec_decode_needs_state(v) &&
             kvs_codec_state_version(v) != info.v_state))
            rc = kvs_err_set(err, KVS_ENOTSUP,
                             "decode: block uses learned codec state (versions %u/%u): "
                             "decode it with kvs_client_decode_block, which fetches them",
                             info.k_state, info.v_state);
        else
            rc = kvs_block_decode(k, v, enc, len, 0, spec->layers, raw, err);
    }
    kvs_codec_destroy(k);
    kvs_codec_destroy(v);
    if (rc == 0 && res) {
        *res = (kvs_get_result){.tokens = info.tokens,
                                .dtype = (kvs_dtype)info.dtype,
                                .layer_begin = 0,
                                .layer_end = spec->layers,
                                .bytes = need,
                                .format = KVS_FORMAT_RAW,
                                .tier = KVS_TIER_NONE,
                                .fallback = kvs_enc_fallback(roles) != 0};
        snprintf(res->key_codec, sizeof res->key_codec, "%s",
                 kvs_spec_enc_codec(spec, KVS_KEYS, rk));
        snprintf(res->value_codec, sizeof res->value_codec, "%s",
                 kvs_spec_enc_codec(spec, KVS_VALUES, rv));
    }
    return rc;
}

int kvs_decode_block(const kvs_ns_spec *spec, const void *enc, size_t len, void *raw, size_t cap,
                     kvs_get_result *res, kvs_err *err)
{
    return decode_with(spec, NULL, NULL, enc, len, raw, cap, res, err);
}

/* One learned state from the daemon (GetCodecState), kept in the client's cache: states
 * never change once published, so each version is fetched once per client. */
static int fetch_state(kvs_client *c, const char *ns, bool values, uint32_t version,
                       kvs_codec_state *out, kvs_err *err)
{
    pthread_mutex_lock(&c->states_mu);
    for (size_t i = 0; i < c->n_states; i++) {
        kvs__state *s = &c->states[i];
        if (s->values == values && s->version == version && strcmp(s->ns, ns) == 0) {
            *out = (kvs_codec_state){version, s->data, s->len};
            pthread_mutex_unlock(&c->states_mu);
            return 0;
        }
    }
    pthread_mutex_unlock(&c->states_mu);
    Kvstash__V1__CodecStateRequest q = KVSTASH__V1__CODEC_STATE_REQUEST__INIT;
    q.namespace_ = kvs_pb_str(ns);
    q.values = values;
    q.version = version;
    ProtobufCMessage *m = NULL;
    int rc = kvs__unary(c, STASH("GetCodecState"), &q.base,
                        &kvstash__v1__codec_state_reply__descriptor, &m, err);
    if (rc)
        return rc;
    const Kvstash__V1__CodecStateReply *rep = (const Kvstash__V1__CodecStateReply *)m;
    void *copy = kvs_trymalloc(rep->state.len ? rep->state.len : 1);
    if (!copy) {
        protobuf_c_message_free_unpacked(m, NULL);
        return kvs_err_set(err, KVS_ENOMEM, "GetCodecState: out of memory");
    }
    memcpy(copy, rep->state.data, rep->state.len);
    size_t n = rep->state.len;
    protobuf_c_message_free_unpacked(m, NULL);
    pthread_mutex_lock(&c->states_mu);
    /* Kept until the client closes (kvs_client_codec_state's promise): a few per namespace
     * (at most KVS_NS_MAX_STATE_VERSIONS per codec), each a few KiB. Two threads that
     * fetched the same state at once both keep theirs: harmless. */
    if (c->n_states == c->cap_states) {
        c->cap_states = c->cap_states ? 2 * c->cap_states : 8;
        c->states = kvs_xrealloc(c->states, c->cap_states * sizeof *c->states);
    }
    kvs__state *s = &c->states[c->n_states++];
    snprintf(s->ns, sizeof s->ns, "%s", ns);
    s->values = values;
    s->version = version;
    s->data = copy;
    s->len = n;
    *out = (kvs_codec_state){version, copy, n};
    pthread_mutex_unlock(&c->states_mu);
    return 0;
}

int kvs_client_codec_state(kvs_client *c, const char *ns, bool values, uint32_t version,
                           const void **data, size_t *len, kvs_err *err)
{
    kvs_err_clear(err);
    if (!c || !ns || !data || !len)
        return kvs_err_set(err, KVS_EINVAL, "GetCodecState: NULL argument");
    kvs_codec_state st;
    int rc = fetch_state(c, ns, values, version, &st, err);
    if (rc == 0) {
        *data = st.data;
        *len = st.len;
    }
    return rc;
}

int kvs_client_decode_block(kvs_client *c, const char *ns, const kvs_ns_spec *spec, const void *enc,
                            size_t len, void *raw, size_t cap, kvs_get_result *res, kvs_err *err)
{
    kvs_err_clear(err);
    if (!c || !ns || !spec)
        return kvs_err_set(err, KVS_EINVAL, "decode: NULL argument");
    kvs_block_info info;
    int rc = kvs_format_parse(enc, len, &info, err);
    if (rc)
        return rc;
    kvs_codec_state ks = {0}, vs = {0};
    /* Fetched only when the block has learned state; a codec that ignores it decodes the
     * same with any (the state is small: a permutation or a basis per layer and head). */
    if (info.k_state && (rc = fetch_state(c, ns, false, info.k_state, &ks, err)))
        return rc;
    if (info.v_state && (rc = fetch_state(c, ns, true, info.v_state, &vs, err)))
        return rc;
    /* The state stays in the cache (never freed before kvs_client_close). */
    return decode_with(spec, &ks, &vs, enc, len, raw, cap, res, err);
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
        rc = kvs_client_decode_block(c, ns, &info.spec, b.p, b.len, buf, cap, res, err);
    if (rc == 0 && res)
        res->tier = got.tier; /* fallback: the decode read it from the block's header */
    free(b.p);
    return rc;
}
