/* Codec state learned online: see learn.h. */
#include "gpu/codec/learn.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/base/mem.h"
#include "gpu/codec/codec.h"
#include "gpu/codec/codec_rotatekv.h"
#include "gpu/codec/codec_squat.h"

struct kvs_learn {
    pthread_mutex_t mu;
    kvs_ns_spec spec;
    kvs_codec_id key_codec;
    kvs_learn_hooks hooks;
    uint32_t version;  /* last published key state version */
    uint32_t reserved; /* last key state version handed out (>= version) */
    /* RotateKV: signed channel sums [L][H*D] over `seen` tokens, until frozen. */
    double *sums;
    uint32_t seen, calib_tokens;
    bool frozen;
    /* SQuat: accumulated Gram matrices [L][H][D][D] and their row counts [L][H]. */
    double *gram;
    uint64_t *rows;
};

int kvs_learn_create(const kvs_ns_spec *spec, uint32_t calib_tokens, const kvs_learn_hooks *hooks,
                     kvs_learn **out, kvs_err *err)
{
    *out = NULL;
    kvs_codec_id id;
    if (!kvs_codec_lookup(spec->key_codec, &id, NULL))
        return kvs_err_set(err, KVS_EINVAL, "key_codec: unknown codec '%s'", spec->key_codec);
    if (id != KVS_CODEC_ROTATEKV && id != KVS_CODEC_SQUAT)
        return 0;
    kvs_learn *ln = kvs_xcalloc(1, sizeof *ln);
    pthread_mutex_init(&ln->mu, NULL);
    ln->spec = *spec;
    ln->key_codec = id;
    ln->hooks = *hooks;
    ln->calib_tokens = calib_tokens ? calib_tokens : 1;
    size_t hd = (size_t)spec->kv_heads * spec->head_dim;
    if (id == KVS_CODEC_ROTATEKV) {
        ln->sums = kvs_trymalloc((size_t)spec->layers * hd * sizeof *ln->sums);
        if (ln->sums)
            memset(ln->sums, 0, (size_t)spec->layers * hd * sizeof *ln->sums);
    } else {
        size_t n = (size_t)spec->layers * hd * spec->head_dim;
        ln->gram = kvs_trymalloc(n * sizeof *ln->gram);
        ln->rows = kvs_xcalloc((size_t)spec->layers * spec->kv_heads, sizeof *ln->rows);
        if (ln->gram)
            memset(ln->gram, 0, n * sizeof *ln->gram);
    }
    if (!ln->sums && !ln->gram) {
        kvs_learn_destroy(ln);
        return kvs_err_set(err, KVS_ENOMEM, "key_codec: out of memory for its learned state");
    }
    *out = ln;
    return 0;
}

void kvs_learn_destroy(kvs_learn *ln)
{
    if (!ln)
        return;
    pthread_mutex_destroy(&ln->mu);
    free(ln->sums);
    free(ln->gram);
    free(ln->rows);
    free(ln);
}

/* Builds a key codec with state (v, bytes), has it recorded, and publishes it (hooks) if
 * no newer version was published meanwhile. v was reserved under ln->mu, which the
 * caller does not hold now (the persist hook writes to LMDB). */
static int publish(kvs_learn *ln, void *owner, uint32_t v, const void *state, size_t len,
                   kvs_err *err)
{
    kvs_codec_state st = {v, state, len};
    kvs_codec *c;
    int rc = kvs_codec_create(&ln->spec, KVS_KEYS, &st, &c, err);
    if (rc)
        return rc;
    if (ln->hooks.prepare)
        ln->hooks.prepare(ln->hooks.ctx, c);
    if (ln->hooks.persist && (rc = ln->hooks.persist(ln->hooks.ctx, owner, KVS_KEYS, &st, err))) {
        kvs_codec_destroy(c);
        return rc;
    }
    pthread_mutex_lock(&ln->mu);
    if (v > ln->version) {
        if ((rc = ln->hooks.publish(ln->hooks.ctx, owner, KVS_KEYS, c, err)) == 0)
            ln->version = v;
    } else { /* overtaken by a newer (cumulative) state: this one is not needed */
        kvs_codec_destroy(c);
        c = NULL;
    }
    pthread_mutex_unlock(&ln->mu);
    if (rc)
        kvs_codec_destroy(c);
    return rc;
}

bool kvs_learn_wants_keys(kvs_learn *ln)
{
    if (!ln || ln->key_codec != KVS_CODEC_ROTATEKV)
        return false;
    pthread_mutex_lock(&ln->mu);
    bool wants = !ln->frozen;
    pthread_mutex_unlock(&ln->mu);
    return wants;
}

int kvs_learn_keys(kvs_learn *ln, void *owner, uint32_t t, const uint16_t *raw, kvs_err *err)
{
    if (!ln || ln->key_codec != KVS_CODEC_ROTATEKV)
        return 0;
    pthread_mutex_lock(&ln->mu);
    int rc = 0;
    void *state = NULL;
    size_t len = 0;
    uint32_t v = 0;
    if (!ln->frozen) {
        /* Gather the keys of every layer into [L][t][H][D], the calibration layout. */
        size_t sec = (size_t)t * ln->spec.kv_heads * ln->spec.head_dim;
        uint16_t *keys = kvs_trymalloc((size_t)ln->spec.layers * sec * sizeof *keys);
        if (!keys) {
            rc = kvs_err_set(err, KVS_ENOMEM, "calibration: out of memory");
        } else {
            for (uint32_t l = 0; l < ln->spec.layers; l++)
                memcpy(keys + l * sec, raw + 2 * (size_t)l * sec, sec * sizeof *keys);
            rc = kvs_rotatekv_calib_accumulate(&ln->spec, ln->sums, keys, t, err);
            free(keys);
        }
        ln->seen += t;
        if (rc == 0 && ln->seen >= ln->calib_tokens) {
            rc = kvs_rotatekv_calib_freeze(&ln->spec, ln->sums, &state, &len, err);
            if (rc == 0)
                v = ++ln->reserved;
            /* Once: a failed freeze (or record) keeps the identity, it is not retried. */
            ln->frozen = true;
        }
    }
    pthread_mutex_unlock(&ln->mu);
    if (v)
        rc = publish(ln, owner, v, state, len, err);
    free(state);
    return rc;
}

int kvs_learn_queries(kvs_learn *ln, void *owner, uint32_t q_heads, uint32_t n, const uint16_t *q,
                      uint32_t *version, kvs_err *err)
{
    if (!ln || ln->key_codec != KVS_CODEC_SQUAT)
        return kvs_err_set(err, KVS_EINVAL,
                           "namespace: its key codec learns nothing from queries (only "
                           "squat-* does)");
    void *part;
    size_t len;
    int rc = kvs_squat_state_from_queries(&ln->spec, q_heads, q, n, &part, &len, err);
    if (rc)
        return rc;
    const kvs_ns_spec *s = &ln->spec;
    size_t dd = (size_t)s->head_dim * s->head_dim, heads = (size_t)s->layers * s->kv_heads;
    float *gram = kvs_trymalloc(heads * dd * sizeof *gram);
    if (!gram) {
        free(part);
        return kvs_err_set(err, KVS_ENOMEM, "queries: out of memory");
    }
    pthread_mutex_lock(&ln->mu);
    /* Add the new rows' Grams (state layout: codec_squat.h: 16-byte header, then per
     * (layer, head) a u64 row count and D*D fp32). The Gram is additive over rows. */
    const uint8_t *p = (const uint8_t *)part + 16;
    for (size_t h = 0; h < heads; h++, p += 8 + 4 * dd) {
        uint64_t r;
        memcpy(&r, p, 8);
        ln->rows[h] += r;
        for (size_t i = 0; i < dd; i++) {
            float g;
            memcpy(&g, p + 8 + 4 * i, 4);
            ln->gram[h * dd + i] += g;
        }
    }
    for (size_t i = 0; i < heads * dd; i++)
        gram[i] = (float)ln->gram[i];
    void *state = NULL;
    uint32_t v = 0;
    rc = kvs_squat_state_from_grams(s, gram, ln->rows, &state, &len, err);
    if (rc == 0)
        v = ++ln->reserved;
    pthread_mutex_unlock(&ln->mu);
    /* The rows stay accumulated even if this version is not published: the next one
     * carries them. */
    if (rc == 0)
        rc = publish(ln, owner, v, state, len, err);
    if (rc == 0 && version)
        *version = v;
    free(state);
    free(gram);
    free(part);
    return rc;
}

int kvs_learn_restore(kvs_learn *ln, kvs_kv kv, const kvs_codec_state *state, kvs_err *err)
{
    if (!ln || kv != KVS_KEYS)
        return 0;
    const kvs_ns_spec *s = &ln->spec;
    size_t dd = (size_t)s->head_dim * s->head_dim, heads = (size_t)s->layers * s->kv_heads;
    if (ln->key_codec == KVS_CODEC_SQUAT && state->version &&
        (state->len != kvs_squat_state_bytes(s) || !state->data))
        return kvs_err_set(err, KVS_EINVAL,
                           "codec state: %zu bytes, a SQuat state of namespace "
                           "'%s' has %zu",
                           state->len, s->name, kvs_squat_state_bytes(s));
    pthread_mutex_lock(&ln->mu);
    if (state->version > ln->version) {
        ln->version = state->version;
        if (ln->reserved < state->version)
            ln->reserved = state->version;
        if (ln->key_codec == KVS_CODEC_ROTATEKV) {
            ln->frozen = true;
        } else { /* the state's Grams and row counts are the sums so far (codec_squat.h) */
            const uint8_t *p = (const uint8_t *)state->data + 16;
            for (size_t h = 0; h < heads; h++, p += 8 + 4 * dd) {
                memcpy(&ln->rows[h], p, 8);
                for (size_t i = 0; i < dd; i++) {
                    float g;
                    memcpy(&g, p + 8 + 4 * i, 4);
                    ln->gram[h * dd + i] = g;
                }
            }
        }
    }
    pthread_mutex_unlock(&ln->mu);
    return 0;
}
