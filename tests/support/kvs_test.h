/* Helpers shared by the C tests: a namespace spec builder, checked codec creation, seeded
 * Gaussian fp16/bf16 data, the relative L2 error of a decoded array, the causal
 * attention-logit error, the real KV sample tests/data/realkv-a-64.kvs (kvsample/1,
 * tests/data/README.md), and scratch directories.
 *
 * Failures are cmocka failures (fail_msg / assert_*), so these are for test bodies only;
 * each test keeps its own assertions on the numbers they return. Single-threaded. */
#ifndef KVS_TEST_H
#define KVS_TEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "gpu/codec/codec.h"
#include "gpu/codec/rng.h"

/* ---------------------------------------------------------------- specs and codecs */

/* A zeroed spec named "t": L layers, H kv-heads, head_dim D, block_tokens T, dtype dt,
 * codecs kc / vc (copied), seed. Not validated: callers that need it validate. */
kvs_ns_spec kvs_test_spec(uint32_t L, uint32_t H, uint32_t D, uint32_t T, kvs_dtype dt,
                          const char *kc, const char *vc, uint64_t seed);

/* kvs_codec_create, failing the test with the error message if it fails. st may be NULL.
 * The caller frees the codec with kvs_codec_destroy. */
kvs_codec *kvs_test_codec(const kvs_ns_spec *s, kvs_kv kv, const kvs_codec_state *st);

/* ---------------------------------------------------------------- data and errors */

/* One standard normal draw (Box-Muller, cosine branch) from two xoshiro256** uniforms:
 * u1 in (0, 1], u2 in [0, 1). */
double kvs_test_gauss(kvs_rng *r);

/* n Gaussians times sigma from stream (seed, 0, 0, 0, 0), rounded to dt (fp16 or bf16).
 * malloc'd: the caller frees. */
uint16_t *kvs_test_gauss_data(size_t n, uint64_t seed, double sigma, kvs_dtype dt);

/* One fp16 or bf16 element as a float. */
float kvs_test_to_f32(uint16_t h, kvs_dtype dt);

/* Relative L2 error |a - b| / |a| of n elements of type dt; |a - b| when a is all zero. */
double kvs_test_rel_err(const uint16_t *a, const uint16_t *b, size_t n, kvs_dtype dt);

/* Relative error |q K^T - q Kh^T| / |q K^T| of the causal attention logits of one layer:
 * q is [n][qh][D] fp16, k and kh are [n][kvh][D] floats, query head h reads kv-head
 * h / (qh / kvh), and query i sees keys 0..i. */
double kvs_test_logit_err(const uint16_t *q, const float *k, const float *kh, uint32_t n,
                          uint32_t qh, uint32_t kvh, uint32_t D);

/* ---------------------------------------------------------------- the real sample */

/* tests/data/realkv-a-64.kvs, or $KVS_TEST_DATA/realkv-a-64.kvs: 6 layers, 64 tokens,
 * 4 kv-heads and 8 query heads of head_dim 128; arrays "k", "k_pre_rope", "v" and "q". */
typedef struct kvs_test_sample {
    uint8_t *bytes; /* owned: the whole file plus a NUL; freed by kvs_test_sample_free */
    size_t size;    /* the file's size */
} kvs_test_sample;

/* Reads the sample into *s. Returns false when the file cannot be opened (the caller
 * decides whether that fails or skips the test); fails the test if it cannot be read
 * whole or is not a kvsample/1 file (magic, 4096-byte header). */
bool kvs_test_sample_load(kvs_test_sample *s);
void kvs_test_sample_free(kvs_test_sample *s);

/* Array `name` of the header, which must have shape `shape` as the header writes it
 * ("[6, 64, 4, 128]"); fails the test unless it is there, 2-byte aligned and wholly
 * inside the file. Borrowed: valid until kvs_test_sample_free. */
const uint16_t *kvs_test_sample_array(const kvs_test_sample *s, const char *name,
                                      const char *shape);

/* ---------------------------------------------------------------- scratch directories */

/* Removes dir and everything under it, not following links (a test's scratch directory,
 * from mkdtemp); best effort: what cannot be removed stays. */
void kvs_test_rmtree(const char *dir);

#endif
