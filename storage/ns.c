/* Namespaces and their registry: see ns.h. The registry is a small array: a daemon
 * serves a handful of models, and lookups by name are dwarfed by the work of a Put. */
#include "storage/ns.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/base/mem.h"
#include "gpu/codec/format.h"
#include "gpu/codec/learn.h"

struct kvs_ns {
    atomic_uint refs;
    uint32_t id;
    bool dropped;
    kvs_ns_spec spec;
    /* Per K/V: every codec version ever published, oldest first; current = [n - 1].
     * Slots are written before `n` is published (release), read after (acquire). */
    kvs_codec *codecs[2][KVS_NS_MAX_STATE_VERSIONS];
    atomic_uint ncodecs[2];
    /* The codecs of the other roles (kvs_enc: fallback, host, disk) per K/V, or NULL where
     * the spec names none; [KVS_ENC_OWN] unused (codecs above). Immutable. */
    kvs_codec *alt[KVS_ENC_ROLES][2];
    kvs_learn *learn;
    kvs_ns_usage usage;
    kvs_fidelity_acc fidelity; /* atomics: any thread */
};

struct kvs_ns_registry {
    kvs_ns **items;
    size_t count, cap;
    uint32_t next_id;
};

kvs_ns *kvs_ns_ref(kvs_ns *ns)
{
    atomic_fetch_add_explicit(&ns->refs, 1, memory_order_relaxed);
    return ns;
}

void kvs_ns_unref(kvs_ns *ns)
{
    if (ns && atomic_fetch_sub_explicit(&ns->refs, 1, memory_order_acq_rel) == 1) {
        for (int kv = 0; kv < 2; kv++)
            for (unsigned i = 0; i < atomic_load(&ns->ncodecs[kv]); i++)
                kvs_codec_destroy(ns->codecs[kv][i]);
        for (int r = 0; r < KVS_ENC_ROLES; r++)
            for (int kv = 0; kv < 2; kv++)
                kvs_codec_destroy(ns->alt[r][kv]);
        kvs_learn_destroy(ns->learn);
        free(ns);
    }
}

const kvs_ns_spec *kvs_ns_spec_of(const kvs_ns *ns)
{
    return &ns->spec;
}
const kvs_codec *kvs_ns_codec(const kvs_ns *ns, kvs_kv kv)
{
    unsigned n = atomic_load_explicit(&ns->ncodecs[kv], memory_order_acquire);
    return ns->codecs[kv][n - 1];
}

const kvs_codec *kvs_ns_codec_version(const kvs_ns *ns, kvs_kv kv, uint32_t version)
{
    unsigned n = atomic_load_explicit(&ns->ncodecs[kv], memory_order_acquire);
    for (unsigned i = 0; i < n; i++)
        if (kvs_codec_state_version(ns->codecs[kv][i]) == version)
            return ns->codecs[kv][i];
    return NULL;
}

int kvs_ns_codecs_at(const kvs_ns *ns, uint32_t kv, uint32_t vv, const kvs_codec **k,
                     const kvs_codec **v, kvs_err *err)
{
    const kvs_codec *kc = kvs_ns_codec_version(ns, KVS_KEYS, kv);
    const kvs_codec *vc = kvs_ns_codec_version(ns, KVS_VALUES, vv);
    if (!kc && !kvs_codec_decode_needs_state(kvs_ns_codec(ns, KVS_KEYS)))
        kc = kvs_ns_codec(ns, KVS_KEYS);
    if (!vc && !kvs_codec_decode_needs_state(kvs_ns_codec(ns, KVS_VALUES)))
        vc = kvs_ns_codec(ns, KVS_VALUES);
    *k = kc;
    *v = vc;
    if (kc && vc)
        return 0;
    return kvs_err_set(err, KVS_EPROTO,
                       "codec state versions %u/%u unknown (their records were unreadable at "
                       "start)",
                       kv, vv);
}

const kvs_codec *kvs_ns_enc_codec(const kvs_ns *ns, kvs_kv kv, kvs_enc role)
{
    return role == KVS_ENC_OWN ? kvs_ns_codec(ns, kv) : ns->alt[role][kv];
}

int kvs_ns_codecs_enc(const kvs_ns *ns, unsigned enc, uint32_t ks, uint32_t vs, const kvs_codec **k,
                      const kvs_codec **v, kvs_err *err)
{
    kvs_enc rk = kvs_enc_side(enc, KVS_KEYS), rv = kvs_enc_side(enc, KVS_VALUES);
    int rc = kvs_ns_codecs_at(ns, ks, vs, k, v, err);
    /* A side of another role carries state version 0 (its codec learns nothing), which the
     * own codec of a RotateKV side may not know: decided before that lookup's verdict. */
    if (rk != KVS_ENC_OWN)
        *k = ns->alt[rk][KVS_KEYS];
    if (rv != KVS_ENC_OWN)
        *v = ns->alt[rv][KVS_VALUES];
    if ((rk != KVS_ENC_OWN && !*k) || (rv != KVS_ENC_OWN && !*v))
        return kvs_err_set(
            err, KVS_EPROTO, "encoded block: its %s is not a codec of namespace '%s'",
            !*k ? kvs_enc_field(KVS_KEYS, rk) : kvs_enc_field(KVS_VALUES, rv), ns->spec.name);
    if (rc && *k && *v) {
        kvs_err_clear(err);
        rc = 0;
    }
    return rc;
}

int kvs_ns_block_codecs(const kvs_ns *ns, const kvs_block_info *info, const kvs_codec **k,
                        const kvs_codec **v, unsigned *enc, kvs_err *err)
{
    unsigned e = kvs_block_encodings(&ns->spec, info);
    if (enc)
        *enc = e;
    return kvs_ns_codecs_enc(ns, e, info->k_state, info->v_state, k, v, err);
}

unsigned kvs_ns_colder(const kvs_ns *ns, unsigned enc, kvs_enc tier, uint32_t t)
{
    for (int kv = 0; kv < 2; kv++) {
        kvs_enc cur = kvs_enc_side(enc, (kvs_kv)kv);
        const kvs_codec *to = ns->alt[tier][kv];
        /* The sizes of the own codec do not depend on its learned state: the current one
         * stands for every version. */
        const kvs_codec *from = kvs_ns_enc_codec(ns, (kvs_kv)kv, cur);
        if (to && from && cur != KVS_ENC_FALLBACK &&
            kvs_codec_section_max(to, t) < kvs_codec_section_max(from, t))
            enc = kvs_enc_set(enc, (kvs_kv)kv, tier);
    }
    return enc;
}

kvs_fidelity_acc *kvs_ns_fidelity(kvs_ns *ns)
{
    return &ns->fidelity;
}

int kvs_ns_codec_publish(kvs_ns *ns, kvs_kv kv, kvs_codec *codec, kvs_err *err)
{
    unsigned n = atomic_load(&ns->ncodecs[kv]);
    if (kvs_codec_state_version(codec) <= kvs_codec_state_version(ns->codecs[kv][n - 1]))
        return kvs_err_set(err, KVS_EINVAL, "codec state: version %u is not newer than %u",
                           kvs_codec_state_version(codec),
                           kvs_codec_state_version(ns->codecs[kv][n - 1]));
    if (n == KVS_NS_MAX_STATE_VERSIONS)
        return kvs_err_set(err, KVS_ENOSPC, "codec state: namespace '%s' holds %d versions already",
                           ns->spec.name, KVS_NS_MAX_STATE_VERSIONS);
    ns->codecs[kv][n] = codec;
    atomic_store_explicit(&ns->ncodecs[kv], n + 1, memory_order_release);
    return 0;
}
uint32_t kvs_ns_id(const kvs_ns *ns)
{
    return ns->id;
}
bool kvs_ns_dropped(const kvs_ns *ns)
{
    return ns->dropped;
}
kvs_ns_usage *kvs_ns_usage_of(kvs_ns *ns)
{
    return &ns->usage;
}
kvs_learn *kvs_ns_learner(const kvs_ns *ns)
{
    return ns->learn;
}

kvs_ns_registry *kvs_ns_registry_create(void)
{
    kvs_ns_registry *reg = kvs_xcalloc(1, sizeof *reg);
    reg->next_id = 1;
    return reg;
}

void kvs_ns_registry_destroy(kvs_ns_registry *reg)
{
    if (!reg)
        return;
    for (size_t i = 0; i < reg->count; i++)
        kvs_ns_unref(reg->items[i]);
    free(reg->items);
    free(reg);
}

static ptrdiff_t find_slot(const kvs_ns_registry *reg, const char *name)
{
    for (size_t i = 0; i < reg->count; i++)
        if (strcmp(reg->items[i]->spec.name, name) == 0)
            return (ptrdiff_t)i;
    return -1;
}

kvs_ns *kvs_ns_registry_find_id(kvs_ns_registry *reg, uint32_t id)
{
    for (size_t i = 0; i < reg->count; i++)
        if (reg->items[i]->id == id)
            return reg->items[i];
    return NULL;
}

void kvs_ns_registry_set_next_id(kvs_ns_registry *reg, uint32_t id)
{
    if (id > reg->next_id)
        reg->next_id = id;
}

int kvs_ns_registry_add(kvs_ns_registry *reg, const kvs_ns_spec *spec,
                        kvs_codec *codecs[KVS_ENC_ROLES][2], kvs_learn *learn, kvs_ns **out,
                        kvs_err *err)
{
    if (find_slot(reg, spec->name) >= 0)
        return kvs_err_set(err, KVS_EEXIST, "name: namespace '%s' already exists", spec->name);
    if (reg->count == reg->cap) {
        size_t cap = reg->cap ? reg->cap * 2 : 8;
        kvs_ns **items = realloc(reg->items, cap * sizeof *items);
        if (!items)
            return kvs_err_set(err, KVS_ENOMEM, "namespace registry: out of memory");
        reg->items = items;
        reg->cap = cap;
    }
    kvs_ns *ns = kvs_xcalloc(1, sizeof *ns);
    atomic_init(&ns->refs, 1);
    ns->id = reg->next_id++;
    ns->spec = *spec;
    ns->learn = learn;
    for (int kv = 0; kv < 2; kv++) {
        for (int r = 1; r < KVS_ENC_ROLES; r++)
            ns->alt[r][kv] = codecs[r][kv];
        ns->codecs[kv][0] = codecs[KVS_ENC_OWN][kv];
        atomic_init(&ns->ncodecs[kv], 1);
    }
    reg->items[reg->count++] = ns;
    if (out)
        *out = kvs_ns_ref(ns);
    return 0;
}

kvs_ns *kvs_ns_registry_find(kvs_ns_registry *reg, const char *name)
{
    ptrdiff_t i = find_slot(reg, name);
    return i < 0 ? NULL : reg->items[i];
}

kvs_ns *kvs_ns_registry_remove(kvs_ns_registry *reg, const char *name)
{
    ptrdiff_t i = find_slot(reg, name);
    if (i < 0)
        return NULL;
    kvs_ns *ns = reg->items[i];
    memmove(&reg->items[i], &reg->items[i + 1], (reg->count - (size_t)i - 1) * sizeof *reg->items);
    reg->count--;
    ns->dropped = true;
    return ns;
}

size_t kvs_ns_registry_count(const kvs_ns_registry *reg)
{
    return reg->count;
}

kvs_ns *kvs_ns_registry_at(kvs_ns_registry *reg, size_t i)
{
    return reg->items[i];
}
