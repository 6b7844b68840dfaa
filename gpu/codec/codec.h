/* Codecs: quantizers that turn one section of a KV block (one layer's keys or values:
 * t tokens x H kv-heads x D channels) into encoded bytes and back (quantizers.md,
 * DESIGN §5-6).
 *
 * One kvs_codec per (namespace, K or V). It is created from the namespace spec, holds
 * precomputed tables (codebooks, random signs, permutations) and the learned codec state
 * it encodes with, and is immutable afterwards: any number of threads may encode and
 * decode with it at once.
 *
 * Block-level encode/decode (kvs_block_encode/decode) frame the sections of a whole block
 * in the encoded block format of gpu/codec/format.h.
 *
 * Registry: kvs_codec_lookup() maps names ("kivi-2") to (family, bits); one table in
 * codec.c lists every codec this build knows.
 */
#ifndef KVS_CODEC_H
#define KVS_CODEC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "gpu/base/err.h"
#include "gpu/codec/spec.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum kvs_codec_id {
    KVS_CODEC_NONE = 0,
    KVS_CODEC_FP8 = 1,
    KVS_CODEC_KIVI = 2,
    KVS_CODEC_POLARQUANT = 3,
    KVS_CODEC_ROTATEKV = 4,
    KVS_CODEC_SQUAT = 5,
    KVS_CODEC_COUNT
} kvs_codec_id;

typedef enum kvs_kv {
    KVS_KEYS = 0,
    KVS_VALUES = 1,
} kvs_kv;

typedef struct kvs_codec kvs_codec;

/* Name -> (id, bits). Returns false for an unknown name. */
bool kvs_codec_lookup(const char *name, kvs_codec_id *id, unsigned *bits);
/* Canonical name of (id, bits), e.g. "rotatekv-2"; NULL if the pair is not a codec. */
const char *kvs_codec_name(kvs_codec_id id, unsigned bits);
/* Writes the comma-separated list of every available codec name into buf (for error
 * messages and --help); returns buf. */
const char *kvs_codec_names(char *buf, size_t cap);

/* Learned codec state (RotateKV channel order, SQuat query subspace): opaque, versioned
 * bytes owned by the namespace; version 0 means "nothing learned yet". */
typedef struct kvs_codec_state {
    uint32_t version;
    const void *data; /* borrowed; layout defined by the codec */
    size_t len;
} kvs_codec_state;

/* Creates the codec for the keys or values of a validated spec. state may be NULL
 * (version 0). KVS_EINVAL names the codec field if the name is unknown or the layout is
 * unsupported by it (e.g. head_dim not a multiple of 16 for polarquant). Free with
 * kvs_codec_destroy. */
int kvs_codec_create(const kvs_ns_spec *spec, kvs_kv kv, const kvs_codec_state *state,
                     kvs_codec **out, kvs_err *err);
void kvs_codec_destroy(kvs_codec *c);

kvs_codec_id kvs_codec_id_of(const kvs_codec *c);
const kvs_ns_spec *kvs_codec_spec(const kvs_codec *c); /* the namespace spec it was made for */
unsigned kvs_codec_bits(const kvs_codec *c);
uint32_t kvs_codec_state_version(const kvs_codec *c);
/* The learned state the codec was made with (data borrowed: valid as long as c), which
 * kvs_codec_create takes back: how a client gets the state to decode a block
 * (GetCodecState). */
kvs_codec_state kvs_codec_state_of(const kvs_codec *c);

/* True if decoding needs the codec state a block was encoded with (RotateKV keys);
 * false if any state version decodes it (none, fp8, KIVI, PolarQuant, SQuat). */
bool kvs_codec_decode_needs_state(const kvs_codec *c);

/* Upper bound on the encoded bytes of one section of t tokens (1 <= t <= block_tokens). */
size_t kvs_codec_section_max(const kvs_codec *c, uint32_t t);

/* Encodes one section: `in` holds t*H*D elements of the namespace dtype, row-major
 * [t][H][D] (borrowed). Writes at most `cap` bytes to out and sets *len. NaN/Inf input is
 * KVS_EINVAL naming layer, token, head and channel. */
int kvs_codec_encode(const kvs_codec *c, uint32_t layer, uint32_t t, const uint16_t *in,
                     uint8_t *out, size_t cap, size_t *len, kvs_err *err);

/* Decodes one section of `len` bytes into t*H*D elements of the namespace dtype.
 * KVS_EPROTO if the bytes are inconsistent with (t, len). */
int kvs_codec_decode(const kvs_codec *c, uint32_t layer, uint32_t t, const uint8_t *in, size_t len,
                     uint16_t *out, kvs_err *err);

/* The safety net behind every encode: KVS_EINVAL ("encode: layer 3, K: fp16 group scale
 * of head 1, channel 7, tokens 0.. is not finite (overflow)") if a floating-point field the
 * codec computed and stored in the section (fp8 scales and codes, KIVI/SQuat group scale
 * and minimum, PolarQuant radii, RotateKV group parameters) is NaN or Inf: such a block
 * must never be acknowledged. KVS_EPROTO if len cannot be a section of t tokens. A pass
 * over those fields only, no decode; 0 for codecs that store none (`none`).
 * kvs_block_encode runs it on every section it writes, and the GPU engine on every
 * section its kernels write for the host. */
int kvs_codec_check_section(const kvs_codec *c, uint32_t layer, uint32_t t, const uint8_t *sec,
                            size_t len, kvs_err *err);

/* ---------------------------------------------------------------- blocks */

/* Upper bound on the encoded size of a block of t tokens (header, table, sections). */
size_t kvs_block_encoded_max(const kvs_codec *k, const kvs_codec *v, uint32_t t);

/* Encodes a raw block ([L][2][t][H][D], namespace dtype) into the encoded block format
 * (gpu/codec/format.h) stamped with ns_id. Writes at most cap bytes; *len is the exact size.
 * Every section passes kvs_codec_check_section before the block is returned. */
int kvs_block_encode(const kvs_codec *k, const kvs_codec *v, uint32_t ns_id, uint32_t t,
                     const uint16_t *raw, uint8_t *out, size_t cap, size_t *len, kvs_err *err);

/* Writes the header and section table of a block of t tokens encoded with k and v, whose
 * 2L sections are in place in out at offsets (2L+1 entries, the last one the block's end),
 * and seals it (gpu/codec/format.h): the one builder of a block header, for
 * kvs_block_encode and the GPU engine. Returns the block's size, offsets[2L]. */
size_t kvs_block_frame(const kvs_codec *k, const kvs_codec *v, uint32_t ns_id, uint32_t t,
                       const uint32_t *offsets, uint8_t *out);
/* kvs_block_frame without the seal: the checksum field is left zero for the caller to
 * seal (kvs_format_seal) on another thread, or to decode as its own verified bytes. */
size_t kvs_block_frame_unsealed(const kvs_codec *k, const kvs_codec *v, uint32_t ns_id, uint32_t t,
                                const uint32_t *offsets, uint8_t *out);

struct kvs_block_info; /* gpu/codec/format.h */

/* How a reader checks an encoded block. A block is hashed once on each path that reads
 * it: by the first owner that receives its bytes (the store, when it finds a host block or
 * reads a disk record; a client, when bytes arrive), not again by every decoder after it. */
typedef enum kvs_block_trust {
    KVS_BLOCK_UNTRUSTED, /* every check, the checksum over all bytes included */
    KVS_BLOCK_VERIFIED,  /* the caller verified the checksum since the bytes were written,
                          * and they cannot change while it reads (the store's blocks are
                          * read-only while referenced): every check but the hash */
} kvs_block_trust;

/* Checks that a parsed block (kvs_format_parse) was written for this namespace layout and
 * these codecs, with a state version they can decode. KVS_EPROTO otherwise. */
int kvs_block_check(const kvs_codec *k, const kvs_codec *v, const struct kvs_block_info *info,
                    kvs_err *err);

/* kvs_format_parse (UNTRUSTED) or kvs_format_check (VERIFIED), then kvs_block_check:
 * everything a decoder relies on before it reads a section. Fills *info. */
int kvs_block_parse(const kvs_codec *k, const kvs_codec *v, const uint8_t *enc, size_t len,
                    kvs_block_trust trust, struct kvs_block_info *info, kvs_err *err);

/* Decodes layers [layer_begin, layer_end) of an encoded block into raw (which receives
 * (layer_end - layer_begin) * 2 * t * H * D elements). The block is parsed and its
 * checksum verified first (KVS_EDATALOSS on mismatch); its header must match the codecs
 * (KVS_EPROTO otherwise). */
int kvs_block_decode(const kvs_codec *k, const kvs_codec *v, const uint8_t *enc, size_t len,
                     uint32_t layer_begin, uint32_t layer_end, uint16_t *raw, kvs_err *err);
/* kvs_block_decode of a block the caller verified (KVS_BLOCK_VERIFIED): no hash. */
int kvs_block_decode_verified(const kvs_codec *k, const kvs_codec *v, const uint8_t *enc,
                              size_t len, uint32_t layer_begin, uint32_t layer_end, uint16_t *raw,
                              kvs_err *err);

/* ---------------------------------------------------------------- a block's encodings
 * Which of its namespace's codecs each side (keys, values) of a stored block is encoded
 * with: its own (key_codec, value_codec, of the block's state version), its fallback_codec
 * (max_rel_error: the side's measured error passed the bound at Put), or the codec of the
 * colder tier the block moved into (host_codec, disk_codec: precision demotion). Nothing
 * else records it: the block's header names the codec and bits of each side
 * (gpu/codec/format.h), kvs_block_encodings reads the roles back from it, and every reader
 * (the store's index, Lookup, GetHeader, the daemon's and the client's decoders) resolves
 * a role to its codec in one place: kvs_codec_create_enc here, kvs_ns_codecs_enc in
 * storage/ns.h for a namespace's own instances. */

typedef enum kvs_enc {
    KVS_ENC_OWN = 0,      /* key_codec / value_codec */
    KVS_ENC_FALLBACK = 1, /* fallback_codec */
    KVS_ENC_HOST = 2,     /* host_codec */
    KVS_ENC_DISK = 3,     /* disk_codec */
} kvs_enc;
#define KVS_ENC_ROLES 4

/* Both sides' roles in one byte (what the store keeps per block): keys in bits 0-1,
 * values in bits 2-3. 0 = both own. */
#define KVS_ENC_PACK(k, v) ((unsigned)(k) | (unsigned)(v) << 2)
static inline kvs_enc kvs_enc_side(unsigned enc, kvs_kv kv)
{
    return (kvs_enc)(enc >> (2 * (unsigned)kv) & 3u);
}
static inline unsigned kvs_enc_set(unsigned enc, kvs_kv kv, kvs_enc role)
{
    unsigned shift = 2 * (unsigned)kv;
    return (enc & ~(3u << shift)) | (unsigned)role << shift;
}

#define KVS_FALLBACK_KEYS 1u
#define KVS_FALLBACK_VALUES 2u

/* The sides of packed encodings stored with the fallback codec: KVS_FALLBACK_* bits. */
static inline unsigned kvs_enc_fallback(unsigned enc)
{
    return (kvs_enc_side(enc, KVS_KEYS) == KVS_ENC_FALLBACK ? KVS_FALLBACK_KEYS : 0u) |
           (kvs_enc_side(enc, KVS_VALUES) == KVS_ENC_FALLBACK ? KVS_FALLBACK_VALUES : 0u);
}

/* The codec name spec gives role `role` of side kv ("" when it names none), and the field
 * that names it ("key_codec", "value_codec", "fallback_codec", "host_codec", "disk_codec"). */
const char *kvs_spec_enc_codec(const kvs_ns_spec *spec, kvs_kv kv, kvs_enc role);
const char *kvs_enc_field(kvs_kv kv, kvs_enc role);

/* The roles of a block's sides from its (parsed or peeked) header, packed: for each side,
 * the first of own, fallback, host, disk whose codec and bits the header names (one codec
 * named by several roles decodes the same whichever is picked). A side that matches none
 * reads as own, which kvs_block_check then refuses. */
unsigned kvs_block_encodings(const kvs_ns_spec *spec, const struct kvs_block_info *info);

/* The sides stored with spec's fallback codec (kvs_enc_fallback of kvs_block_encodings). */
unsigned kvs_block_fallback(const kvs_ns_spec *spec, const struct kvs_block_info *info);

/* Creates the codec of role `role` for side kv of spec: own with the learned state given
 * (kvs_codec_create), the others without learned state (they learn none: spec.h). KVS_EINVAL
 * naming the role's field when spec names none or an unknown one. Free with
 * kvs_codec_destroy. */
int kvs_codec_create_enc(const kvs_ns_spec *spec, kvs_kv kv, kvs_enc role,
                         const kvs_codec_state *state, kvs_codec **out, kvs_err *err);

/* Re-encodes a verified encoded block (enc, len; encoded with k and v: kvs_block_parse
 * with trust VERIFIED) with k2 and v2 into out (cap bytes, at least
 * kvs_block_encoded_max(k2, v2, t)); *out_len is its size. A side whose codec stays (k2 ==
 * k, v2 == v) keeps its sections byte for byte; the other is decoded and encoded again,
 * section by section, each new section passing kvs_codec_check_section. The block keeps
 * its namespace id; the header names k2 and v2 and their state versions, and is sealed.
 * Precision demotion on the CPU (the GPU engine's kvs_engine_recode_dev writes the same
 * bytes). */
int kvs_block_transcode(const kvs_codec *k, const kvs_codec *v, const kvs_codec *k2,
                        const kvs_codec *v2, const uint8_t *enc, size_t len, uint8_t *out,
                        size_t cap, size_t *out_len, kvs_err *err);

#ifdef __cplusplus
}
#endif

#endif
