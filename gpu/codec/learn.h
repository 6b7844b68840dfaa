/* Codec state learned online (quantizers.md `rotatekv-2`, `squat-2`; DESIGN §6).
 *
 * A store only sees KV, so each learned object comes from what reaches it:
 *  - RotateKV key channel order: signed channel sums of the (grouped-Hadamard-rotated)
 *    keys of the first N_cal tokens a namespace stores, frozen into a permutation; blocks
 *    before that are encoded with the identity (state version 0), blocks after with the
 *    permutation (version 1).
 *  - SQuat query subspace: query rows clients send (KvAdmin.AddQueries), accumulated as a
 *    Gram matrix per (layer, kv-head); every call publishes a new key state version.
 * Each new state becomes a new codec version of its owner (the namespace) through the
 * publish hook; blocks record the version they were encoded with, so older blocks stay
 * decodable. The learner knows codecs only: the owner is an opaque pointer handed back to
 * the hooks (the store passes its kvs_ns and publishes with kvs_ns_codec_publish).
 *
 * Persistence: a learner may have a persist hook (the store's: it records the state in
 * the disk tier). A new version is handed to it before it is published, so no block is
 * encoded with a state that is not recorded yet; a version the hook refuses is never
 * published (blocks keep the previous state: quality, not correctness). At start the
 * store publishes the recorded versions itself and brings the learner up to date with
 * kvs_learn_restore.
 *
 * Threading: thread-safe; one mutex per learner, a leaf lock held while accumulating,
 * while building the new state and while publishing it, but not across the persist hook
 * (an LMDB write): versions are reserved under the lock, persisted outside it, and
 * published in order; a SQuat version that a newer one overtook is dropped unpublished
 * (the newer state holds every row of the older one: the Gram is cumulative).
 */
#ifndef KVS_CODEC_LEARN_H
#define KVS_CODEC_LEARN_H

#include <stdbool.h>
#include <stdint.h>

#include "gpu/base/err.h"
#include "gpu/codec/codec.h"

typedef struct kvs_learn kvs_learn;

/* The owner's hooks; ctx is borrowed and must outlive the learner. Both are called with
 * no lock of the learner held, with the `owner` given to kvs_learn_keys/queries. */
typedef struct kvs_learn_hooks {
    /* Records a new state version (state borrowed for the call) before it is published;
     * non-zero (err filled) keeps it unpublished. NULL: nothing is recorded. */
    int (*persist)(void *ctx, void *owner, kvs_kv kv, const kvs_codec_state *state, kvs_err *err);
    /* Readies codec c (built with the new state) before anyone can see it (the store's:
     * the GPU engine's device tables). NULL: nothing to do. */
    void (*prepare)(void *ctx, kvs_codec *c);
    /* Publishes codec c (built with the new state; ownership passes on success) as the
     * owner's current one, under the learner's lock (which orders versions): it must not
     * block. Required. */
    int (*publish)(void *ctx, void *owner, kvs_kv kv, kvs_codec *c, kvs_err *err);
    void *ctx;
} kvs_learn_hooks;

/* Creates the learner of a namespace whose key codec learns (rotatekv-*, squat-*);
 * *out = NULL for the others. calib_tokens = RotateKV's N_cal. hooks is copied. */
int kvs_learn_create(const kvs_ns_spec *spec, uint32_t calib_tokens, const kvs_learn_hooks *hooks,
                     kvs_learn **out, kvs_err *err);
void kvs_learn_destroy(kvs_learn *ln);

/* A recorded state version (restored at start and already published on the namespace by
 * the caller) brings the learner up to it: later versions are numbered after it; a
 * RotateKV key state ends calibration; a SQuat key state becomes the accumulated query
 * Grams that later AddQueries add to. Value states and older versions change nothing.
 * NULL ln is a no-op. KVS_EINVAL if a SQuat state's bytes do not fit the namespace. */
int kvs_learn_restore(kvs_learn *ln, kvs_kv kv, const kvs_codec_state *state, kvs_err *err);

/* Feeds the keys of a raw block (layout [L][2][t][H][D], namespace dtype) to RotateKV
 * calibration; when N_cal tokens have been seen, freezes the permutation and publishes
 * it (hooks, with owner). A no-op for other codecs and once frozen. */
int kvs_learn_keys(kvs_learn *ln, void *owner, uint32_t t, const uint16_t *raw, kvs_err *err);
/* True while kvs_learn_keys still wants the raw keys of Puts (RotateKV calibrating); a Put
 * may then skip it (the GPU path does not hand raw keys over). NULL: false. */
bool kvs_learn_wants_keys(kvs_learn *ln);

/* Adds post-RoPE query rows q ([L][n][q_heads][D], namespace dtype) to the SQuat query
 * state and publishes a new key codec built from it; *version (may be NULL) gets the new
 * key state version. KVS_EINVAL if the namespace's key codec is not squat-* or q is
 * malformed (names the field). */
int kvs_learn_queries(kvs_learn *ln, void *owner, uint32_t q_heads, uint32_t n, const uint16_t *q,
                      uint32_t *version, kvs_err *err);

#endif
