/* Codec state learned online (quantizers.md `rotatekv-2`, `squat-2`; DESIGN §6).
 *
 * A store only sees KV, so each learned object comes from what reaches it:
 *  - RotateKV key channel order: signed channel sums of the (grouped-Hadamard-rotated)
 *    keys of the first N_cal tokens a namespace stores, frozen into a permutation; blocks
 *    before that are encoded with the identity (state version 0), blocks after with the
 *    permutation (version 1).
 *  - SQuat query subspace: query rows clients send (KvAdmin.AddQueries), accumulated as a
 *    Gram matrix per (layer, kv-head); every call publishes a new key state version.
 * Each new state becomes a new codec version on the namespace (kvs_ns_codec_publish);
 * blocks record the version they were encoded with, so older blocks stay decodable.
 * Not persisted yet: state lives as long as the daemon (the disk tier brings
 * persistence with the namespace).
 *
 * Threading: thread-safe; one mutex per learner, a leaf lock held while accumulating and
 * while building the new codec (no store or daemon lock is held then).
 */
#ifndef KVS_STORAGE_LEARN_H
#define KVS_STORAGE_LEARN_H

#include <stdbool.h>
#include <stdint.h>

#include "gpu/base/err.h"
#include "storage/ns.h"

typedef struct kvs_learn kvs_learn;

/* Creates the learner of a namespace whose key codec learns (rotatekv-*, squat-*);
 * *out = NULL for the others. calib_tokens = RotateKV's N_cal. */
int kvs_learn_create(const kvs_ns_spec *spec, uint32_t calib_tokens, kvs_learn **out,
                     kvs_err *err);
void kvs_learn_destroy(kvs_learn *ln);

/* Feeds the keys of a raw block (layout [L][2][t][H][D], namespace dtype) to RotateKV
 * calibration; when N_cal tokens have been seen, freezes the permutation and publishes
 * it on ns. A no-op for other codecs and once frozen. */
int kvs_learn_keys(kvs_learn *ln, kvs_ns *ns, uint32_t t, const uint16_t *raw, kvs_err *err);
/* True while kvs_learn_keys still wants the raw keys of Puts (RotateKV calibrating); a Put
 * may then skip it (the GPU path does not hand raw keys over). NULL: false. */
bool kvs_learn_wants_keys(kvs_learn *ln);

/* Adds post-RoPE query rows q ([L][n][q_heads][D], namespace dtype) to the SQuat query
 * state and publishes a new key codec built from it; *version (may be NULL) gets the new
 * key state version. KVS_EINVAL if the namespace's key codec is not squat-* or q is
 * malformed (names the field). */
int kvs_learn_queries(kvs_learn *ln, kvs_ns *ns, uint32_t q_heads, uint32_t n, const uint16_t *q,
                      uint32_t *version, kvs_err *err);

#endif
