/* Codec internals shared by codec.c and the quantizer files (codec_<name>.c). Each
 * quantizer provides one kvs_codec_ops table; codec.c does everything generic: the
 * registry, dtype conversion to and from fp32, NaN/Inf checks, block framing.
 *
 * Contract for an ops table (the CPU reference is the definition of correct):
 *  - init: validate the layout for this quantizer (KVS_EINVAL naming the codec field)
 *    and precompute tables into c->priv (freed by fini). May read c->state.
 *  - section_max(t): upper bound of encode's output for t tokens; the exact size must
 *    depend only on (t, and data-dependent extras such as RotateKV's sinks).
 *  - encode: in = t*H*D finite fp32 values, row-major [t][H][D]; write <= cap bytes.
 *  - decode: out = t*H*D fp32 values; reject inconsistent lengths with KVS_EPROTO.
 *  Both are pure functions of (codec, layer, t, input): no hidden state, thread-safe.
 *  - Range checks count NaN as out of range (write !(fabsf(x) <= max), and for a stored
 *    fp16 (h & 0x7C00) == 0x7C00): an fp32 overflow inside a transform (a rotation of
 *    huge bf16 input) yields NaN, which fails every ordered comparison.
 *  - check_section (optional): the safety net of kvs_codec_check_section; any codec that
 *    stores floating-point fields of its own computing must have one.
 */
#ifndef KVS_CODEC_INT_H
#define KVS_CODEC_INT_H

#include "gpu/codec/codec.h"
#include "gpu/codec/codec_cuda.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvs_codec_ops {
    const char *family; /* "kivi" */
    int (*init)(kvs_codec *c, kvs_err *err);
    void (*fini)(kvs_codec *c);
    size_t (*section_max)(const kvs_codec *c, uint32_t t);
    int (*encode)(const kvs_codec *c, uint32_t layer, uint32_t t, const float *in, uint8_t *out,
                  size_t cap, size_t *len, kvs_err *err);
    int (*decode)(const kvs_codec *c, uint32_t layer, uint32_t t, const uint8_t *in, size_t len,
                  float *out, kvs_err *err);
    /* True if decode reads no codec state (SQuat: its bytes are KIVI bytes), so a block
     * decodes with a codec of any state version. */
    bool decode_ignores_state;
    /* True if a section's size depends on its data, not only on t (RotateKV sinks). */
    bool variable_size;
    /* Optional: a codec that works on the stored 16-bit elements directly (`none`) sets
     * these instead of paying the fp32 round trip; encode_raw must reject NaN/Inf with
     * the same message as the generic path (kvs__check_finite). */
    int (*encode_raw)(const kvs_codec *c, uint32_t layer, uint32_t t, const uint16_t *in,
                      uint8_t *out, size_t cap, size_t *len, kvs_err *err);
    int (*decode_raw)(const kvs_codec *c, uint32_t layer, uint32_t t, const uint8_t *in, size_t len,
                      uint16_t *out, kvs_err *err);
    /* Optional (NULL: the section stores no float fields but copies of checked input):
     * scans the floating-point fields of an encoded section of t tokens (scales, minima,
     * radii; not input elements stored verbatim, such as RotateKV's sinks, which were
     * checked finite) without decoding. KVS_EINVAL through kvs__field_nonfinite for the
     * first NaN/Inf; KVS_EPROTO if len cannot be such a section. */
    int (*check_section)(const kvs_codec *c, uint32_t layer, uint32_t t, const uint8_t *sec,
                         size_t len, kvs_err *err);
} kvs_codec_ops;

/* gpu/codec/finite.c: */
/* KVS_EINVAL "payload: NaN at layer 3, K, token 5, head 1, channel 7" for the element at
 * index i (over t*H*D) of a section, whose value is x. */
int kvs__nonfinite_at(const kvs_codec *c, uint32_t layer, size_t i, float x, kvs_err *err);
/* KVS_EINVAL naming the first NaN/Inf of a section's t*H*D raw elements, or 0. */
int kvs__check_finite(const kvs_codec *c, uint32_t layer, uint32_t t, const uint16_t *in,
                      kvs_err *err);

/* KVS_EINVAL "encode: layer 3, K: <what> is not finite (overflow)", what formatted from
 * fmt: the message of every check_section. Returns KVS_EINVAL. */
int kvs__field_nonfinite(const kvs_codec *c, uint32_t layer, kvs_err *err, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

struct kvs_codec {
    const kvs_codec_ops *ops;
    kvs_codec_id id;
    unsigned bits;
    kvs_kv kv;
    kvs_ns_spec spec;      /* copy of the namespace spec */
    kvs_codec_state state; /* data: state_owned */
    void *state_owned;     /* the codec's copy of the state bytes (freed with it) */
    void *priv;            /* quantizer tables, owned through ops->fini */
    /* Device tables, one set per CUDA device ordinal (kvs_codec_cuda_prepare on each
     * device that launches it: a node's engines share the codec); the kernels read the
     * current device's, KVS__CUDA_TAB. */
    void *priv_cuda[KVS_CODEC_CUDA_DEVICES];
    void (*cuda_release)(kvs_codec *c); /* frees every device's tables; set with them, so
                                         * that this CPU library never links the CUDA one */
};

/* The current device's tables of c (CUDA code only: kvs__cuda_device in codec_cuda.c). */
int kvs__cuda_device(void);
#define KVS__CUDA_TAB(c) ((c)->priv_cuda[kvs__cuda_device()])

extern const kvs_codec_ops kvs__codec_none_ops;
extern const kvs_codec_ops kvs__codec_fp8_ops;
extern const kvs_codec_ops kvs__codec_kivi_ops;
extern const kvs_codec_ops kvs__codec_polarquant_ops;
extern const kvs_codec_ops kvs__codec_rotatekv_ops;
extern const kvs_codec_ops kvs__codec_squat_ops;

/* CUDA launchers, one set per quantizer file (gpu/codec/codec_<name>.cu), reached through
 * the dispatch table of codec_cuda.c (library kvs_codec_cuda) only: the CPU ops above
 * name none of them. */
int kvs__none_encode_cuda(const kvs_codec *c, const kvs_cuda_sections *s, void *stream,
                          kvs_err *err);
int kvs__none_decode_cuda(const kvs_codec *c, const kvs_cuda_sections *s, void *stream,
                          kvs_err *err);
int kvs__fp8_encode_cuda(const kvs_codec *c, const kvs_cuda_sections *s, void *stream,
                         kvs_err *err);
int kvs__fp8_decode_cuda(const kvs_codec *c, const kvs_cuda_sections *s, void *stream,
                         kvs_err *err);
bool kvs__kivi_cuda_supported(const kvs_codec *c);
int kvs__kivi_encode_cuda(const kvs_codec *c, const kvs_cuda_sections *s, void *stream,
                          kvs_err *err);
int kvs__kivi_decode_cuda(const kvs_codec *c, const kvs_cuda_sections *s, void *stream,
                          kvs_err *err);
bool kvs__polarquant_cuda_supported(const kvs_codec *c);
int kvs__polarquant_cuda_prepare(kvs_codec *c, kvs_err *err);
void kvs__polarquant_cuda_release(kvs_codec *c);
int kvs__polarquant_encode_cuda(const kvs_codec *c, const kvs_cuda_sections *s, void *stream,
                                kvs_err *err);
int kvs__polarquant_decode_cuda(const kvs_codec *c, const kvs_cuda_sections *s, void *stream,
                                kvs_err *err);
bool kvs__rotatekv_cuda_supported(const kvs_codec *c);
int kvs__rotatekv_cuda_prepare(kvs_codec *c, kvs_err *err);
void kvs__rotatekv_cuda_release(kvs_codec *c);
int kvs__rotatekv_encode_cuda(const kvs_codec *c, const kvs_cuda_sections *s, void *stream,
                              kvs_err *err);
int kvs__rotatekv_decode_cuda(const kvs_codec *c, const kvs_cuda_sections *s, void *stream,
                              kvs_err *err);
bool kvs__squat_cuda_supported(const kvs_codec *c);
int kvs__squat_cuda_prepare(kvs_codec *c, kvs_err *err);
void kvs__squat_cuda_release(kvs_codec *c);
int kvs__squat_encode_cuda(const kvs_codec *c, const kvs_cuda_sections *s, void *stream,
                           kvs_err *err);

#ifdef __cplusplus
}
#endif

#endif
