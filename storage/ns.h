/* Namespaces (DESIGN §1): an immutable spec plus an id, reference-counted, and the
 * registry that maps names to them.
 *
 * A kvs_ns lives while anyone holds a reference: the registry holds one until the
 * namespace is dropped, every stored block holds one, and a request holds one while it
 * works. So a Put racing a DropNamespace finishes on a valid (dropped) namespace and its
 * block is refused at commit (kvs_ns_dropped) rather than touching freed memory.
 *
 * Threading: kvs_ns_ref/unref are atomic and may be called from any thread. The
 * registry and the counters in kvs_ns_usage are guarded by the owner's lock (the store).
 */
#ifndef KVS_STORAGE_NS_H
#define KVS_STORAGE_NS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "gpu/codec/codec.h"
#include "gpu/codec/fidelity.h"
#include "gpu/codec/spec.h"

typedef struct kvs_ns kvs_ns;
typedef struct kvs_learn kvs_learn;           /* gpu/codec/learn.h */
typedef struct kvs_block_info kvs_block_info; /* gpu/codec/format.h */

/* Counters of a namespace; guarded by the store lock. */
typedef struct kvs_ns_usage {
    uint64_t blocks;
    uint64_t stored_bytes; /* encoded bytes held in tiers */
    uint64_t raw_bytes;    /* payload bytes those blocks represent */
    uint64_t tokens;       /* tokens those blocks hold */
    uint64_t host_bytes;   /* bytes the namespace is charged in the host tier (its quota's
                            * measure: host_used's share, kvs__store_host_charge_locked) */
    uint64_t gpu_bytes;    /* slot bytes it holds in the gpu tier (gpu_used's share,
                            * kvs__store_gpu_charge_locked: its gpu quota's measure) */
    uint64_t gpu_picked;   /* of those, slots of its blocks being demoted (store.h inv. 6) */
    uint64_t disk_bytes;   /* bytes of its records in the disk tier (disk_used's share,
                            * kvs__store_disk_record_locked: its disk quota's measure) */
    /* Reads of the namespace's blocks (kvs_store_find/read/view), as the store's own
     * gpu_hits, host_hits, disk_hits and misses count them: per namespace for the hit
     * ratio an operator asks for (daemon/metrics.c). */
    uint64_t gpu_hits, host_hits, disk_hits, misses;
} kvs_ns_usage;

/* Takes / drops a reference. unref frees the namespace when the last one goes. */
kvs_ns *kvs_ns_ref(kvs_ns *ns);
void kvs_ns_unref(kvs_ns *ns);

const kvs_ns_spec *kvs_ns_spec_of(const kvs_ns *ns); /* valid while a reference is held */
/* Codec state versions a namespace can hold per K/V (version 0 = nothing learned). */
#define KVS_NS_MAX_STATE_VERSIONS 16

/* The namespace's current codec for keys or values: new blocks are encoded with it.
 * Codecs are immutable and live as long as the namespace (valid while a reference is
 * held); lock-free for readers. */
const kvs_codec *kvs_ns_codec(const kvs_ns *ns, kvs_kv kv);
/* The codec of a given state version (blocks record the version they were encoded with,
 * so they stay decodable after the state moves on), or NULL if unknown. */
const kvs_codec *kvs_ns_codec_version(const kvs_ns *ns, kvs_kv kv, uint32_t version);
/* The codecs for a block stamped with key state version kv and value state version vv:
 * the namespace's codec of each version, or, for a codec whose decode ignores its state
 * (SQuat), the current one when that version is unknown here (its record was unreadable
 * at start). KVS_EPROTO naming the versions when a needed one is unknown. Lock-free. */
int kvs_ns_codecs_at(const kvs_ns *ns, uint32_t kv, uint32_t vv, const kvs_codec **k,
                     const kvs_codec **v, kvs_err *err);
/* The namespace's codec of role `role` (gpu/codec/codec.h kvs_enc: fallback, host or disk)
 * for side kv, or NULL when its spec names none; for KVS_ENC_OWN, the current codec.
 * Immutable, lives as long as the namespace. */
const kvs_codec *kvs_ns_enc_codec(const kvs_ns *ns, kvs_kv kv, kvs_enc role);
/* The one resolver of a block's codecs: for each side, the codec of its role in enc
 * (packed, gpu/codec/codec.h) -- the own codec of state version ks (keys) or vs (values)
 * as kvs_ns_codecs_at picks it, or the role's codec (no learned state: its version is 0).
 * Errors as kvs_ns_codecs_at's, for an own side only; KVS_EPROTO for a role the namespace
 * has no codec for. Lock-free. */
int kvs_ns_codecs_enc(const kvs_ns *ns, unsigned enc, uint32_t ks, uint32_t vs, const kvs_codec **k,
                      const kvs_codec **v, kvs_err *err);
/* kvs_ns_codecs_enc for a block whose header is info (its roles: kvs_block_encodings);
 * *enc (may be NULL) gets them. */
int kvs_ns_block_codecs(const kvs_ns *ns, const kvs_block_info *info, const kvs_codec **k,
                        const kvs_codec **v, unsigned *enc, kvs_err *err);
/* Precision demotion's rule (gpu/codec/spec.h host_codec, disk_codec): the encodings of a
 * block of t tokens encoded as enc once it is in the tier of role `tier` (KVS_ENC_HOST or
 * KVS_ENC_DISK): each side whose codec so far is larger (kvs_codec_section_max(t)) than
 * that tier's takes the tier's; the others keep theirs (a block only gets colder). A
 * fallback side keeps its codec (it exists for the bound, which tier codecs exclude).
 * Returns enc itself when nothing changes. Lock-free. */
unsigned kvs_ns_colder(const kvs_ns *ns, unsigned enc, kvs_enc tier, uint32_t t);
/* The namespace's measured error (gpu/codec/fidelity.h): lock-free, any thread. */
kvs_fidelity_acc *kvs_ns_fidelity(kvs_ns *ns);
/* Publishes a codec built with a newer state version as the current one (ownership
 * passes to the namespace). KVS_EINVAL if its version is not above the current one,
 * KVS_ENOSPC if the namespace holds KVS_NS_MAX_STATE_VERSIONS versions already. Callers
 * serialize publishers (the store lock); readers need no lock. */
int kvs_ns_codec_publish(kvs_ns *ns, kvs_kv kv, kvs_codec *codec, kvs_err *err);
/* The namespace's online learner of codec state (NULL if its codecs learn nothing). */
kvs_learn *kvs_ns_learner(const kvs_ns *ns);
uint32_t kvs_ns_id(const kvs_ns *ns);
bool kvs_ns_dropped(const kvs_ns *ns);     /* guarded by the store lock */
kvs_ns_usage *kvs_ns_usage_of(kvs_ns *ns); /* guarded by the store lock */

typedef struct kvs_ns_registry kvs_ns_registry;

kvs_ns_registry *kvs_ns_registry_create(void);
/* Drops the registry's references (namespaces still referenced elsewhere live on). */
void kvs_ns_registry_destroy(kvs_ns_registry *reg);

/* Registers a validated spec with its codecs, codecs[role][kv] for every role (kvs_enc:
 * [KVS_ENC_OWN] both required, the others NULL where the spec names none), and its
 * learner (may be NULL; ownership of all of them passes to the namespace on success; on
 * failure the caller keeps them) under a fresh id; *out (may be NULL) receives a new
 * reference. KVS_EEXIST if the name is taken. */
int kvs_ns_registry_add(kvs_ns_registry *reg, const kvs_ns_spec *spec,
                        kvs_codec *codecs[KVS_ENC_ROLES][2], kvs_learn *learn, kvs_ns **out,
                        kvs_err *err);
/* Borrowed pointer (no reference taken), or NULL. */
kvs_ns *kvs_ns_registry_find(kvs_ns_registry *reg, const char *name);
/* Unregisters and marks dropped; returns the registry's reference to the caller, or
 * NULL if absent. */
kvs_ns *kvs_ns_registry_remove(kvs_ns_registry *reg, const char *name);
size_t kvs_ns_registry_count(const kvs_ns_registry *reg);
/* Borrowed pointer to the namespace with this id, or NULL. */
kvs_ns *kvs_ns_registry_find_id(kvs_ns_registry *reg, uint32_t id);
/* The next namespace added gets id `id` if it is above every id handed out so far (restoring
 * namespaces from the disk tier keeps their ids, which the stored blocks carry); lower ids
 * are ignored. */
void kvs_ns_registry_set_next_id(kvs_ns_registry *reg, uint32_t id);
/* i-th namespace in creation order (borrowed), i < count. */
kvs_ns *kvs_ns_registry_at(kvs_ns_registry *reg, size_t i);

#endif
