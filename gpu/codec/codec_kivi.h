/* KIVI section layout and its encode/decode pieces, shared by codec_kivi.c and
 * codec_squat.c (SQuat's encoded bytes are a KIVI section: quantizers.md `squat-2`).
 * Private to the codec library (kvs__ prefix); the layout is documented in
 * codec_kivi.c's header comment.
 */
#ifndef KVS_CODEC_KIVI_H
#define KVS_CODEC_KIVI_H

#include <stddef.h>
#include <stdint.h>

#include "gpu/codec/codec_int.h"

#ifdef __cplusplus
extern "C" {
#endif

/* KIVI's own group size (quantizers-reference.md §5.1, §6): 32 tokens per key channel
 * group, 32 channels per value group. */
#define KVS_KIVI_GROUP 32

/* Geometry of one section of t tokens. */
typedef struct kvs__kivi_geom {
    uint32_t t, heads, dim, bits;
    uint32_t gk, nk; /* keys: groups of gk = min(32, t) tokens, nk = ceil(t / gk) */
    uint32_t gv, nv; /* values: groups of gv = min(32, D) channels, nv = ceil(D / gv) */
    size_t k_grp;    /* code bytes of one full key group */
    size_t k_row;    /* code bytes of one (head, channel) row of t tokens */
    size_t k_codes;  /* bytes of the key code plane = offset of the key params */
    size_t k_bytes;  /* whole key section */
    size_t v_row;    /* code bytes of one (token, head) vector */
    size_t v_codes;  /* bytes of the value code plane */
    size_t v_bytes;  /* whole value section */
} kvs__kivi_geom;

void kvs__kivi_geom_init(kvs__kivi_geom *g, uint32_t t, uint32_t heads, uint32_t dim,
                         unsigned bits);

/* Tokens in key group gi (the last group may be shorter than gk). */
uint32_t kvs__kivi_key_group_len(const kvs__kivi_geom *g, uint32_t gi);

/* Quantizes key channel j of head h over token group gi: n = group length values
 * x[i * stride], i < n. Writes the group's codes and (scale, lo) into the key section
 * `sec`; if xhat is not NULL it receives the decoded values at the same stride.
 * KVS_EINVAL (message names layer, head, channel) if the group's range does not fit
 * the fp16 parameters (possible only for bf16 input or SQuat-compensated values). */
int kvs__kivi_key_group(const kvs__kivi_geom *g, uint8_t *sec, uint32_t layer, uint32_t h,
                        uint32_t j, uint32_t gi, const float *x, size_t stride, float *xhat,
                        kvs_err *err);

/* Whole sections. in/out are fp32 [t][H][D]; sec has g->k_bytes / g->v_bytes bytes. */
int kvs__kivi_encode_keys(const kvs__kivi_geom *g, uint32_t layer, const float *in, uint8_t *sec,
                          kvs_err *err);
int kvs__kivi_encode_values(const kvs__kivi_geom *g, uint32_t layer, const float *in, uint8_t *sec,
                            kvs_err *err);
void kvs__kivi_decode_keys(const kvs__kivi_geom *g, const uint8_t *sec, float *out);
void kvs__kivi_decode_values(const kvs__kivi_geom *g, const uint8_t *sec, float *out);

/* The kvs_codec_ops members, reused by SQuat: section size (exact), encode of a value
 * section or a KIVI key section, decode of either (checks len: KVS_EPROTO), and the
 * safety net of either. */
size_t kvs__kivi_section_max(const kvs_codec *c, uint32_t t);
int kvs__kivi_encode(const kvs_codec *c, uint32_t layer, uint32_t t, const float *in, uint8_t *out,
                     size_t cap, size_t *len, kvs_err *err);
int kvs__kivi_decode(const kvs_codec *c, uint32_t layer, uint32_t t, const uint8_t *in, size_t len,
                     float *out, kvs_err *err);
/* check_section (kvs_codec_check_section): the fp16 (scale, lo) planes of a K or V
 * section; KVS_EPROTO if len is not the section's exact size. */
int kvs__kivi_check_section(const kvs_codec *c, uint32_t layer, uint32_t t, const uint8_t *sec,
                            size_t len, kvs_err *err);

#ifdef __cplusplus
}
#endif

#endif
