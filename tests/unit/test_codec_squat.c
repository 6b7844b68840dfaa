/* gpu/codec/codec_squat.c: without queries SQuat is KIVI bit for bit; the compensation
 * matrices equal the Schur-complement construction of quantizers-reference.md §4.3;
 * with a low-rank query subspace the key error leaves the subspace; the codes do not
 * depend on the queries' scale or on repeated rows (lambda normalized by the Gram's
 * trace); on the real sample the attention logits move less than with KIVI; the state
 * helpers and their checks. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "gpu/codec/codec.h"
#include "gpu/codec/codec_squat.h"
#include "gpu/codec/half.h"
#include "gpu/codec/rng.h"
#include "tests/support/kvs_test.h"

/* fp16, the same codec for keys and values, seed 5 */
static kvs_ns_spec spec(uint32_t L, uint32_t H, uint32_t D, uint32_t T, const char *codec)
{
    return kvs_test_spec(L, H, D, T, KVS_DTYPE_FP16, codec, codec, 5);
}

/* Encodes one section; returns malloc'd bytes and their length. */
static uint8_t *encode(const kvs_codec *c, uint32_t layer, uint32_t t, const uint16_t *in,
                       size_t *len)
{
    size_t cap = kvs_codec_section_max(c, t);
    uint8_t *enc = malloc(cap);
    kvs_err err;
    int rc = kvs_codec_encode(c, layer, t, in, enc, cap, len, &err);
    if (rc)
        fail_msg("encode: %s", err.msg);
    assert_int_equal(*len, cap);
    return enc;
}

/* ---------------------------------------------------------------- no queries = KIVI */

static void expect_same_as_kivi(const kvs_ns_spec *s2, const kvs_codec_state *st, uint32_t t,
                                const uint16_t *in)
{
    kvs_ns_spec sk = *s2;
    sk.key_codec[0] = 0;
    snprintf(sk.key_codec, sizeof sk.key_codec, "kivi-%c", s2->key_codec[6]);
    strcpy(sk.value_codec, sk.key_codec);
    for (int kv = 0; kv < 2; kv++) {
        kvs_codec *q = kvs_test_codec(s2, (kvs_kv)kv, st),
                  *k = kvs_test_codec(&sk, (kvs_kv)kv, NULL);
        assert_int_equal(kvs_squat_subspace_heads(q), 0);
        size_t lq, lk;
        uint8_t *eq = encode(q, 0, t, in, &lq), *ek = encode(k, 0, t, in, &lk);
        assert_int_equal(lq, lk);
        assert_memory_equal(eq, ek, lq);
        free(eq);
        free(ek);
        kvs_codec_destroy(q);
        kvs_codec_destroy(k);
    }
}

static void test_no_queries_is_kivi(void **state)
{
    static const uint32_t dims[] = {64, 128, 256};
    static const uint32_t toks[] = {64, 40, 1};
    for (unsigned di = 0; di < 3; di++)
        for (unsigned ti = 0; ti < 3; ti++)
            for (int b4 = 0; b4 < 2; b4++) {
                kvs_ns_spec s = spec(2, 2, dims[di], 64, b4 ? "squat-4" : "squat-2");
                size_t n = (size_t)toks[ti] * 2 * dims[di];
                uint16_t *in = kvs_test_gauss_data(n, di * 10 + ti, 1.0, KVS_DTYPE_FP16);
                /* version 0 (no state), then a version-1 state whose heads have N = 0,
                 * then one whose Grams are zero (lambda * Q^T Q = 0: A = I, C = 0) */
                expect_same_as_kivi(&s, NULL, toks[ti], in);
                size_t dd = (size_t)dims[di] * dims[di];
                float *g = calloc(4 * dd, sizeof *g);
                uint64_t rows[4] = {0, 0, 0, 0};
                void *bytes;
                size_t len;
                assert_int_equal(kvs_squat_state_from_grams(&s, g, rows, &bytes, &len, NULL), 0);
                kvs_codec_state st = {1, bytes, len};
                expect_same_as_kivi(&s, &st, toks[ti], in);
                free(bytes);
                rows[0] = rows[1] = rows[2] = rows[3] = 100;
                assert_int_equal(kvs_squat_state_from_grams(&s, g, rows, &bytes, &len, NULL), 0);
                st.data = bytes;
                expect_same_as_kivi(&s, &st, toks[ti], in);
                kvs_codec_state v0 = {0, bytes, len}; /* version 0: bytes ignored */
                expect_same_as_kivi(&s, &v0, toks[ti], in);
                free(bytes);
                free(g);
                free(in);
            }
}

/* ---------------------------------------------------------------- linear algebra */

/* Inverse of an n x n matrix by Gauss-Jordan with partial pivoting (test-side). */
static void inverse(const double *a, int n, double *inv)
{
    double *m = malloc((size_t)n * 2 * n * sizeof *m);
    for (int i = 0; i < n; i++)
        for (int j = 0; j < 2 * n; j++)
            m[i * 2 * n + j] = j < n ? a[i * n + j] : (j - n == i);
    for (int c = 0; c < n; c++) {
        int p = c;
        for (int r = c + 1; r < n; r++)
            if (fabs(m[r * 2 * n + c]) > fabs(m[p * 2 * n + c]))
                p = r;
        for (int j = 0; j < 2 * n; j++) {
            double tmp = m[c * 2 * n + j];
            m[c * 2 * n + j] = m[p * 2 * n + j];
            m[p * 2 * n + j] = tmp;
        }
        double d = m[c * 2 * n + c];
        for (int j = 0; j < 2 * n; j++)
            m[c * 2 * n + j] /= d;
        for (int r = 0; r < n; r++)
            if (r != c) {
                double f = m[r * 2 * n + c];
                for (int j = 0; j < 2 * n; j++)
                    m[r * 2 * n + j] -= f * m[c * 2 * n + j];
            }
    }
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++)
            inv[i * n + j] = m[i * 2 * n + n + j];
    free(m);
}

/* A random D x k matrix with orthonormal columns (Gram-Schmidt on Gaussians). */
static double *orthonormal(uint32_t D, uint32_t k, uint64_t seed)
{
    kvs_rng r;
    kvs_rng_init(&r, seed, 1, 0, 0, 0);
    double *U = malloc((size_t)D * k * sizeof *U);
    for (uint32_t c = 0; c < k; c++) {
        for (uint32_t i = 0; i < D; i++)
            U[i * k + c] = kvs_test_gauss(&r);
        for (int pass = 0; pass < 2; pass++)
            for (uint32_t p = 0; p < c; p++) {
                double dot = 0;
                for (uint32_t i = 0; i < D; i++)
                    dot += U[i * k + c] * U[i * k + p];
                for (uint32_t i = 0; i < D; i++)
                    U[i * k + c] -= dot * U[i * k + p];
            }
        double nn = 0;
        for (uint32_t i = 0; i < D; i++)
            nn += U[i * k + c] * U[i * k + c];
        for (uint32_t i = 0; i < D; i++)
            U[i * k + c] /= sqrt(nn);
    }
    return U;
}

/* The codec's C_b = -(A_RR)^-1 A_{R,B_b} against (1) the direct solve and (2) the code
 * form of §4.3 built from Schur complements: P = A^-1, A_T = A, A_t = M - N^T (O +
 * 1e-7 I)^-1 N, H_t = last g columns of A_t, update = P[R, B_1..B_t] H_t. The Gram has
 * 40 known eigenpairs, so the top-20 truncation is known exactly. */
static void check_compensation(uint32_t D)
{
    const uint32_t K = 40;
    kvs_ns_spec s = spec(1, 1, D, 32, "squat-2");
    double *U = orthonormal(D, K, D);
    double mu[40];
    for (uint32_t i = 0; i < K; i++)
        mu[i] = 2000.0 * pow(0.85, i);
    size_t dd = (size_t)D * D;
    float *g = malloc(dd * sizeof *g);
    for (uint32_t i = 0; i < D; i++)
        for (uint32_t j = 0; j < D; j++) {
            double v = 0;
            for (uint32_t k = 0; k < K; k++)
                v += mu[k] * U[i * K + k] * U[j * K + k];
            g[i * D + j] = (float)v;
        }
    uint64_t N = 512;
    void *bytes;
    size_t len;
    assert_int_equal(kvs_squat_state_from_grams(&s, g, &N, &bytes, &len, NULL), 0);
    assert_int_equal(len, kvs_squat_state_bytes(&s));
    kvs_codec_state st = {3, bytes, len};
    kvs_codec *c = kvs_test_codec(&s, KVS_KEYS, &st);
    assert_int_equal(kvs_squat_subspace_heads(c), 1);

    /* A from the fp32 Gram the codec saw: top-20 eigen-part of g. The fp32 rounding of
     * g perturbs the eigenvectors by ~1e-7 relative: inside the tolerance. lambda_eff =
     * lambda * (N_ref / N) * (E_ref / E) with E = trace(g) / N (codec_squat.c). */
    double trace = 0;
    for (uint32_t i = 0; i < D; i++)
        trace += g[i * D + i];
    double lam =
        KVS_SQUAT_LAMBDA * (KVS_SQUAT_N_REF / (double)N) * (KVS_SQUAT_E_REF / (trace / (double)N));
    double *A = calloc(dd, sizeof *A), *P = malloc(dd * sizeof *P);
    for (uint32_t i = 0; i < D; i++) {
        A[i * D + i] = 1;
        for (uint32_t j = 0; j < D; j++)
            for (uint32_t k = 0; k < KVS_SQUAT_RANK; k++)
                A[i * D + j] += lam * mu[k] * U[i * K + k] * U[j * K + k];
    }
    inverse(A, (int)D, P);
    uint32_t gsz, T;
    kvs_squat_blocks(D, &gsz, &T);
    assert_int_equal(gsz, D >= 128 ? 64 : D / 2);
    /* Schur chain: As[t] for t = T..1, each (t*g)^2 */
    double **As = calloc(T + 1, sizeof *As);
    As[T] = malloc(dd * sizeof(double));
    memcpy(As[T], A, dd * sizeof(double));
    for (uint32_t t = T - 1; t >= 1; t--) {
        uint32_t n1 = (t + 1) * gsz, m = t * gsz;
        const double *Ap = As[t + 1];
        double *O = malloc((size_t)gsz * gsz * sizeof *O),
               *Oi = malloc((size_t)gsz * gsz * sizeof *Oi);
        for (uint32_t i = 0; i < gsz; i++)
            for (uint32_t j = 0; j < gsz; j++)
                O[i * gsz + j] = Ap[(m + i) * n1 + m + j] + (i == j ? 1e-7 : 0);
        inverse(O, (int)gsz, Oi);
        /* W = Oi N, N = A_{t+1}[m.., ..m] (g x m); A_t = M - N^T W */
        double *W = calloc((size_t)gsz * m, sizeof *W);
        for (uint32_t a = 0; a < gsz; a++)
            for (uint32_t b = 0; b < gsz; b++)
                for (uint32_t j = 0; j < m; j++)
                    W[a * m + j] += Oi[a * gsz + b] * Ap[(m + b) * n1 + j];
        As[t] = malloc((size_t)m * m * sizeof(double));
        for (uint32_t i = 0; i < m; i++)
            for (uint32_t j = 0; j < m; j++) {
                double v = Ap[i * n1 + j]; /* M */
                for (uint32_t a = 0; a < gsz; a++)
                    v -= Ap[(m + a) * n1 + i] * W[a * m + j];
                As[t][i * m + j] = v;
            }
        free(W);
        free(O);
        free(Oi);
    }
    double maxdiff = 0, maxdiff2 = 0, maxc = 0;
    for (uint32_t b = 0; b + 1 < T; b++) {
        const float *C;
        uint32_t rows, cols;
        assert_int_equal(kvs_squat_compensation(c, 0, 0, b, &C, &rows, &cols, NULL), 0);
        assert_non_null(C);
        uint32_t t = b + 1, m = t * gsz, j1 = m;
        assert_int_equal(rows, D - j1);
        assert_int_equal(cols, gsz);
        /* direct: -(A_RR)^-1 A_{R,B} */
        double *ARR = malloc((size_t)rows * rows * sizeof *ARR),
               *ARRi = malloc((size_t)rows * rows * sizeof *ARRi);
        for (uint32_t i = 0; i < rows; i++)
            for (uint32_t j = 0; j < rows; j++)
                ARR[i * rows + j] = A[(j1 + i) * D + j1 + j];
        inverse(ARR, (int)rows, ARRi);
        for (uint32_t i = 0; i < rows; i++)
            for (uint32_t k = 0; k < cols; k++) {
                double direct = 0, code = 0;
                for (uint32_t j = 0; j < rows; j++)
                    direct -= ARRi[i * rows + j] * A[(j1 + j) * D + b * gsz + k];
                for (uint32_t j = 0; j < m; j++) /* P[R, B_1..B_t] H_t */
                    code += P[(j1 + i) * D + j] * As[t][j * m + (m - gsz) + k];
                maxdiff = fmax(maxdiff, fabs(direct - code));
                maxdiff2 = fmax(maxdiff2, fabs(direct - C[i * cols + k]));
                maxc = fmax(maxc, fabs(direct));
            }
        free(ARR);
        free(ARRi);
    }
    fprintf(stderr, "D=%u: max|C| %.4f, |direct - Schur code form| %.2e, |direct - codec| %.2e\n",
            D, maxc, maxdiff, maxdiff2);
    assert_true(maxc > 0.01); /* the test is not vacuous */
    assert_true(maxdiff < 1e-6);
    assert_true(maxdiff2 < 1e-6);
    for (uint32_t t = 1; t <= T; t++)
        free(As[t]);
    free(As);
    free(A);
    free(P);
    free(g);
    free(U);
    free(bytes);
    kvs_codec_destroy(c);
}

static void test_compensation_matrix(void **state)
{
    check_compensation(64);
    check_compensation(128);
    check_compensation(256);
}

/* ---------------------------------------------------------------- subspace property */

/* Queries q = 3 * sum_i a_i u_i in a random r0-dimensional subspace. With the state
 * built from them, the key error projected on the subspace, ||U^T (k - k^)|| /
 * ||U^T k||, is lower than KIVI's at the same bits; the plain error may be higher. */
static void check_subspace(uint32_t D, const char *codec, double *gain)
{
    const uint32_t r0 = 8, Hq = 4, H = 2, n = 64, t = 64;
    kvs_ns_spec s = spec(1, H, D, 64, codec);
    double *U = orthonormal(D, r0, 1000 + D);
    kvs_rng r;
    kvs_rng_init(&r, 77, 0, 0, 0, 0);
    uint16_t *q = malloc((size_t)n * Hq * D * 2);
    for (size_t v = 0; v < (size_t)n * Hq; v++) {
        double a[8];
        for (uint32_t i = 0; i < r0; i++)
            a[i] = 3 * kvs_test_gauss(&r);
        for (uint32_t j = 0; j < D; j++) {
            double x = 0;
            for (uint32_t i = 0; i < r0; i++)
                x += a[i] * U[j * r0 + i];
            q[v * D + j] = kvs_f32_to_fp16((float)x);
        }
    }
    void *bytes;
    size_t len;
    kvs_err err;
    assert_int_equal(kvs_squat_state_from_queries(&s, Hq, q, n, &bytes, &len, &err), 0);
    kvs_codec_state st = {1, bytes, len};
    kvs_codec *sq = kvs_test_codec(&s, KVS_KEYS, &st);
    assert_int_equal(kvs_squat_subspace_heads(sq), H);
    kvs_ns_spec sk = s;
    snprintf(sk.key_codec, sizeof sk.key_codec, "kivi-%c", codec[6]);
    kvs_codec *kv = kvs_test_codec(&sk, KVS_KEYS, NULL);
    size_t ne = (size_t)t * H * D;
    uint16_t *k = kvs_test_gauss_data(ne, D, 1.0, KVS_DTYPE_FP16), *o1 = malloc(ne * 2),
             *o2 = malloc(ne * 2);
    size_t l1, l2;
    uint8_t *e1 = encode(sq, 0, t, k, &l1), *e2 = encode(kv, 0, t, k, &l2);
    assert_int_equal(l1, l2);
    assert_int_equal(kvs_codec_decode(sq, 0, t, e1, l1, o1, NULL), 0);
    assert_int_equal(kvs_codec_decode(kv, 0, t, e2, l2, o2, NULL), 0);
    /* SQuat bytes are KIVI bytes: the KIVI codec decodes them identically */
    uint16_t *o3 = malloc(ne * 2);
    assert_int_equal(kvs_codec_decode(kv, 0, t, e1, l1, o3, NULL), 0);
    assert_memory_equal(o1, o3, ne * 2);
    double sub[2] = {0, 0}, full[2] = {0, 0}, subk = 0, fullk = 0;
    for (size_t v = 0; v < (size_t)t * H; v++) {
        for (uint32_t i = 0; i < r0; i++) {
            double p0 = 0, p1 = 0, p2 = 0;
            for (uint32_t j = 0; j < D; j++) {
                double x = kvs_fp16_to_f32(k[v * D + j]);
                p0 += U[j * r0 + i] * x;
                p1 += U[j * r0 + i] * (x - kvs_fp16_to_f32(o1[v * D + j]));
                p2 += U[j * r0 + i] * (x - kvs_fp16_to_f32(o2[v * D + j]));
            }
            subk += p0 * p0;
            sub[0] += p1 * p1;
            sub[1] += p2 * p2;
        }
        for (uint32_t j = 0; j < D; j++) {
            double x = kvs_fp16_to_f32(k[v * D + j]);
            double d1 = x - kvs_fp16_to_f32(o1[v * D + j]), d2 = x - kvs_fp16_to_f32(o2[v * D + j]);
            fullk += x * x;
            full[0] += d1 * d1;
            full[1] += d2 * d2;
        }
    }
    double s_sq = sqrt(sub[0] / subk), s_kv = sqrt(sub[1] / subk);
    double f_sq = sqrt(full[0] / fullk), f_kv = sqrt(full[1] / fullk);
    fprintf(stderr,
            "%s D=%u: subspace error squat %.4f kivi %.4f; full error squat %.4f kivi "
            "%.4f\n",
            codec, D, s_sq, s_kv, f_sq, f_kv);
    assert_true(s_sq < 0.9 * s_kv);
    assert_true(f_sq < 1.5 * f_kv);
    *gain = s_sq / s_kv;
    free(q);
    free(U);
    free(k);
    free(o1);
    free(o2);
    free(o3);
    free(e1);
    free(e2);
    free(bytes);
    kvs_codec_destroy(sq);
    kvs_codec_destroy(kv);
}

static void test_subspace_error(void **state)
{
    double g;
    check_subspace(64, "squat-2", &g);
    check_subspace(128, "squat-2", &g);
    check_subspace(256, "squat-2", &g);
    check_subspace(128, "squat-4", &g);
}

/* ---------------------------------------------------------------- query scale */

/* Queries [L][n][Hq][D] (fp16) near a 24-dimensional subspace with a decaying spectrum,
 * plus a little noise; values below 2^-10 are flushed to zero, so that scaling by 1/4 to 4
 * stays exact in fp16 (no subnormals, no overflow). */
static uint16_t *subspace_queries(uint32_t L, uint32_t n, uint32_t Hq, uint32_t D, uint64_t seed)
{
    const uint32_t r0 = 24;
    double *U = orthonormal(D, r0, seed);
    kvs_rng r;
    kvs_rng_init(&r, seed, 2, 0, 0, 0);
    size_t rows = (size_t)L * n * Hq;
    uint16_t *q = malloc(rows * D * 2);
    double a[24];
    for (size_t v = 0; v < rows; v++) {
        for (uint32_t i = 0; i < r0; i++)
            a[i] = (3.0 - 0.1 * i) * kvs_test_gauss(&r);
        for (uint32_t j = 0; j < D; j++) {
            double x = 0.3 * kvs_test_gauss(&r);
            for (uint32_t i = 0; i < r0; i++)
                x += a[i] * U[j * r0 + i];
            q[v * D + j] = kvs_f32_to_fp16(fabs(x) < 0x1p-10 ? 0.0f : (float)x);
        }
    }
    free(U);
    return q;
}

/* Largest |C_a - C_b| over every (layer, head, block) of two squat key codecs, and the
 * largest |C_a| (both non-NULL for every head). */
static double compensation_diff(const kvs_ns_spec *s, const kvs_codec *a, const kvs_codec *b,
                                double *cmax)
{
    uint32_t g, T;
    kvs_squat_blocks(s->head_dim, &g, &T);
    double diff = 0;
    *cmax = 0;
    for (uint32_t l = 0; l < s->layers; l++)
        for (uint32_t h = 0; h < s->kv_heads; h++)
            for (uint32_t blk = 0; blk + 1 < T; blk++) {
                const float *Ca, *Cb;
                uint32_t ra, ca, rb, cb;
                assert_int_equal(kvs_squat_compensation(a, l, h, blk, &Ca, &ra, &ca, NULL), 0);
                assert_int_equal(kvs_squat_compensation(b, l, h, blk, &Cb, &rb, &cb, NULL), 0);
                assert_non_null(Ca);
                assert_non_null(Cb);
                assert_int_equal(ra * ca, rb * cb);
                for (size_t i = 0; i < (size_t)ra * ca; i++) {
                    diff = fmax(diff, fabs((double)Ca[i] - Cb[i]));
                    *cmax = fmax(*cmax, fabs((double)Ca[i]));
                }
            }
    return diff;
}

/* Keys of both layers encoded by c, back to back (free()). */
static uint8_t *encode_layers(const kvs_ns_spec *s, const kvs_codec *c, uint32_t t,
                              const uint16_t *keys, size_t *len)
{
    size_t sec = (size_t)t * s->kv_heads * s->head_dim, l0, l1;
    uint8_t *e0 = encode(c, 0, t, keys, &l0), *e1 = encode(c, 1, t, keys + sec, &l1);
    uint8_t *out = malloc(l0 + l1);
    memcpy(out, e0, l0);
    memcpy(out + l0, e1, l1);
    free(e0);
    free(e1);
    *len = l0 + l1;
    return out;
}

/* lambda is normalized by the query energy as well as the row count (codec_squat.c):
 * queries scaled by c (Gram c^2 G), or every row repeated (2 G over 2 N rows), give the
 * same compensation matrices and the same key bytes: bit for bit when c is a power of
 * two (every step scales exactly), to fp32 rounding for c = 3. With lambda_eff = lambda
 * * N_ref / N alone the penalty grew with c^2 and the bytes changed (issue 16). */
static void check_query_scale(uint32_t D, const char *codec)
{
    const uint32_t L = 2, H = 2, Hq = 4, n = 48, t = 32;
    kvs_ns_spec s = spec(L, H, D, t, codec);
    uint16_t *q = subspace_queries(L, n, Hq, D, 300 + D), *qc = malloc((size_t)L * n * Hq * D * 2);
    uint16_t *keys = kvs_test_gauss_data((size_t)L * t * H * D, 301 + D, 1.0, KVS_DTYPE_FP16);
    void *bytes;
    size_t len, dd = (size_t)D * D;
    assert_int_equal(kvs_squat_state_from_queries(&s, Hq, q, n, &bytes, &len, NULL), 0);
    kvs_codec_state st = {1, bytes, len};
    kvs_codec *ref = kvs_test_codec(&s, KVS_KEYS, &st);
    assert_int_equal(kvs_squat_subspace_heads(ref), L * H);
    size_t lr;
    uint8_t *eref = encode_layers(&s, ref, t, keys, &lr);
    /* not vacuous: the compensation changes the codes */
    kvs_ns_spec sk = s;
    snprintf(sk.key_codec, sizeof sk.key_codec, "kivi-%c", codec[6]);
    kvs_codec *kivi = kvs_test_codec(&sk, KVS_KEYS, NULL);
    size_t lk;
    uint8_t *ek = encode_layers(&s, kivi, t, keys, &lk);
    assert_int_equal(lk, lr);
    assert_true(memcmp(ek, eref, lr) != 0);

    static const float scales[] = {0.25f, 0.5f, 2.0f, 4.0f};
    for (unsigned si = 0; si < 4; si++) {
        for (size_t i = 0; i < (size_t)L * n * Hq * D; i++) {
            float x = kvs_fp16_to_f32(q[i]);
            qc[i] = kvs_f32_to_fp16(scales[si] * x);
            assert_true(kvs_fp16_to_f32(qc[i]) == scales[si] * x); /* exact */
        }
        void *b2;
        size_t l2;
        assert_int_equal(kvs_squat_state_from_queries(&s, Hq, qc, n, &b2, &l2, NULL), 0);
        kvs_codec_state st2 = {1, b2, l2};
        kvs_codec *c = kvs_test_codec(&s, KVS_KEYS, &st2);
        double cmax, diff = compensation_diff(&s, ref, c, &cmax);
        size_t le;
        uint8_t *e = encode_layers(&s, c, t, keys, &le);
        fprintf(stderr, "%s D=%u queries x %g: max |C - C_ref| %.3g (max |C| %.3f), %s bytes\n",
                codec, D, (double)scales[si], diff, cmax,
                le == lr && memcmp(e, eref, lr) == 0 ? "same" : "DIFFERENT");
        assert_true(diff == 0);
        assert_int_equal(le, lr);
        assert_memory_equal(e, eref, lr);
        free(e);
        kvs_codec_destroy(c);
        free(b2);
    }

    /* The same through Grams: 2 G over 2 N rows (every row twice), and 9 G (queries x 3,
     * not exact in fp32). */
    float *g = malloc((size_t)L * H * dd * sizeof *g);
    uint64_t rows[4];
    for (int pass = 0; pass < 2; pass++) {
        float f = pass ? 9.0f : 2.0f;
        for (uint32_t lh = 0; lh < L * H; lh++) {
            const float *g0 = kvs_squat_gram(ref, lh / H, lh % H, &rows[lh]);
            assert_non_null(g0);
            for (size_t i = 0; i < dd; i++)
                g[lh * dd + i] = f * g0[i];
            rows[lh] *= pass ? 1 : 2;
        }
        void *b2;
        size_t l2;
        assert_int_equal(kvs_squat_state_from_grams(&s, g, rows, &b2, &l2, NULL), 0);
        kvs_codec_state st2 = {1, b2, l2};
        kvs_codec *c = kvs_test_codec(&s, KVS_KEYS, &st2);
        double cmax, diff = compensation_diff(&s, ref, c, &cmax);
        fprintf(stderr, "%s D=%u Gram x %g%s: max |C - C_ref| %.3g (max |C| %.3f)\n", codec, D,
                (double)f, pass ? "" : ", rows x 2", diff, cmax);
        if (pass) {
            assert_true(diff <= 1e-5 * cmax);
        } else {
            size_t le;
            uint8_t *e = encode_layers(&s, c, t, keys, &le);
            assert_true(diff == 0);
            assert_int_equal(le, lr);
            assert_memory_equal(e, eref, lr);
            free(e);
        }
        kvs_codec_destroy(c);
        free(b2);
    }
    free(g);
    free(ek);
    free(eref);
    kvs_codec_destroy(kivi);
    kvs_codec_destroy(ref);
    free(bytes);
    free(keys);
    free(qc);
    free(q);
}

static void test_query_scale_invariance(void **state)
{
    check_query_scale(64, "squat-2");
    check_query_scale(128, "squat-2");
    check_query_scale(128, "squat-4");
    check_query_scale(256, "squat-2");
}

/* ---------------------------------------------------------------- state checks */

static void test_state_errors(void **state)
{
    kvs_ns_spec s = spec(2, 2, 64, 32, "squat-2");
    kvs_codec *c;
    kvs_err err;
    size_t dd = 64 * 64;
    float *g = calloc(4 * dd, sizeof *g);
    uint64_t rows[4] = {1, 1, 1, 1};
    void *bytes;
    size_t len;
    assert_int_equal(kvs_squat_state_from_grams(&s, g, rows, &bytes, &len, NULL), 0);
    kvs_codec_state st = {1, bytes, len - 1};
    assert_int_equal(kvs_codec_create(&s, KVS_KEYS, &st, &c, &err), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "codec state"));
    st.len = len;
    ((uint8_t *)bytes)[12] = 128; /* head_dim field */
    assert_int_equal(kvs_codec_create(&s, KVS_KEYS, &st, &c, &err), KVS_EINVAL);
    ((uint8_t *)bytes)[12] = 64;
    ((uint8_t *)bytes)[0] = 'X';
    assert_int_equal(kvs_codec_create(&s, KVS_KEYS, &st, &c, &err), KVS_EINVAL);
    /* a value codec ignores the state */
    assert_int_equal(kvs_codec_create(&s, KVS_VALUES, &st, &c, &err), 0);
    kvs_codec_destroy(c);
    free(bytes);
    free(g);

    uint16_t q[3 * 2 * 64] = {0};
    assert_int_equal(kvs_squat_state_from_queries(&s, 3, q, 1, &bytes, &len, &err), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "q_heads"));
    assert_int_equal(kvs_squat_state_from_queries(&s, 2, q, 0, &bytes, &len, &err), KVS_EINVAL);
    q[2 * 64 + 5] = 0x7E00; /* NaN: layer 1 (n = 1, Hq = 2), head 0, channel 5 */
    assert_int_equal(kvs_squat_state_from_queries(&s, 2, q, 1, &bytes, &len, &err), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "channel 5"));
    q[2 * 64 + 5] = 0;
    q[3] = kvs_f32_to_fp16(2.0f); /* layer 0, head 0 */
    assert_int_equal(kvs_squat_state_from_queries(&s, 2, q, 1, &bytes, &len, &err), 0);
    /* layer 0, kv-head 0: N = 1, G[3][3] = 4 */
    const uint8_t *p = (const uint8_t *)bytes + 16;
    assert_int_equal(p[0], 1);
    float g33;
    memcpy(&g33, p + 8 + 4 * (3 * 64 + 3), 4);
    assert_true(g33 == 4.0f);
    free(bytes);
}

/* A block with squat keys and values round-trips through the block API; its header
 * carries the key state version; the decoder needs the same version. */
static void test_block_roundtrip(void **state)
{
    kvs_ns_spec s = spec(2, 2, 128, 32, "squat-2");
    uint32_t t = 32, n = 8;
    uint16_t *q = kvs_test_gauss_data((size_t)2 * n * 4 * 128, 4, 1.0, KVS_DTYPE_FP16);
    void *bytes;
    size_t len;
    assert_int_equal(kvs_squat_state_from_queries(&s, 4, q, n, &bytes, &len, NULL), 0);
    kvs_codec_state st = {2, bytes, len};
    kvs_codec *k = kvs_test_codec(&s, KVS_KEYS, &st), *v = kvs_test_codec(&s, KVS_VALUES, NULL);
    assert_int_equal(kvs_codec_state_version(k), 2);
    size_t sec = (size_t)t * 2 * 128, ne = 2 * 2 * sec;
    uint16_t *raw = kvs_test_gauss_data(ne, 8, 1.0, KVS_DTYPE_FP16), *back = malloc(ne * 2);
    size_t cap = kvs_block_encoded_max(k, v, t), blen;
    uint8_t *enc = malloc(cap), *enc2 = malloc(cap);
    kvs_err err;
    assert_int_equal(kvs_block_encode(k, v, 4, t, raw, enc, cap, &blen, &err), 0);
    assert_int_equal(kvs_block_encode(k, v, 4, t, raw, enc2, cap, &blen, &err), 0);
    assert_memory_equal(enc, enc2, blen);
    assert_int_equal(kvs_block_decode(k, v, enc, blen, 0, 2, back, &err), 0);
    for (size_t l = 0; l < 2; l++)
        for (int kv = 0; kv < 2; kv++) {
            double num = 0, den = 0;
            for (size_t i = 0; i < sec; i++) {
                double x = kvs_fp16_to_f32(raw[(2 * l + kv) * sec + i]);
                double y = kvs_fp16_to_f32(back[(2 * l + kv) * sec + i]);
                num += (x - y) * (x - y);
                den += x * x;
            }
            assert_true(sqrt(num / den) < 0.5);
        }
    /* SQuat bytes are KIVI bytes: a decoder of any state version (here: none) reads the
     * block, so blocks stay decodable as the query state moves on. */
    kvs_codec *k0 = kvs_test_codec(&s, KVS_KEYS, NULL);
    uint16_t *back0 = malloc(2 * 2 * sec * sizeof *back0);
    assert_non_null(back0);
    assert_false(kvs_codec_decode_needs_state(k0));
    assert_int_equal(kvs_block_decode(k0, v, enc, blen, 0, 2, back0, &err), 0);
    assert_memory_equal(back0, back, 2 * 2 * sec * sizeof *back0);
    free(back0);
    kvs_codec_destroy(k0);
    kvs_codec_destroy(k);
    kvs_codec_destroy(v);
    free(q);
    free(bytes);
    free(raw);
    free(back);
    free(enc);
    free(enc2);
}

/* ---------------------------------------------------------------- real sample */

static void test_real_sample(void **state)
{
    kvs_test_sample sm;
    if (!kvs_test_sample_load(&sm))
        fail_msg("cannot open realkv-a-64.kvs (set KVS_TEST_DATA)");
    const uint16_t *K = kvs_test_sample_array(&sm, "k", "[6, 64, 4, 128]");
    const uint16_t *Q = kvs_test_sample_array(&sm, "q", "[6, 64, 8, 128]");
    kvs_ns_spec s = spec(6, 4, 128, 32, "squat-2");
    void *bytes;
    size_t len;
    kvs_err err;
    assert_int_equal(kvs_squat_state_from_queries(&s, 8, Q, 64, &bytes, &len, &err), 0);
    kvs_codec_state st = {1, bytes, len};
    kvs_codec *sq = kvs_test_codec(&s, KVS_KEYS, &st);
    assert_int_equal(kvs_squat_subspace_heads(sq), 24);
    kvs_ns_spec sk = s;
    strcpy(sk.key_codec, "kivi-2");
    kvs_codec *kv = kvs_test_codec(&sk, KVS_KEYS, NULL);
    const size_t sec = 32 * 4 * 128, lay = 64 * 4 * 128;
    uint16_t *hat[2] = {malloc(lay * 2), malloc(lay * 2)};
    float *kf = malloc(lay * sizeof *kf), *khf = malloc(lay * sizeof *khf);
    double lerr[2] = {0, 0}, kerr[2] = {0, 0};
    for (uint32_t l = 0; l < 6; l++) {
        const uint16_t *Kl = K + l * lay;
        for (int ci = 0; ci < 2; ci++) {
            kvs_codec *c = ci ? kv : sq;
            for (uint32_t blk = 0; blk < 2; blk++) {
                size_t n;
                uint8_t *e = encode(c, l, 32, Kl + blk * sec, &n);
                assert_int_equal(kvs_codec_decode(c, l, 32, e, n, hat[ci] + blk * sec, NULL), 0);
                free(e);
            }
            double kn = 0, kd = 0;
            for (size_t i = 0; i < lay; i++) {
                kf[i] = kvs_fp16_to_f32(Kl[i]);
                khf[i] = kvs_fp16_to_f32(hat[ci][i]);
            }
            /* causal logits of all 8 query heads (query head h reads kv-head h / 2) */
            lerr[ci] +=
                kvs_test_logit_err(Q + (size_t)l * 64 * 8 * 128, kf, khf, 64, 8, 4, 128) / 6;
            for (size_t i = 0; i < lay; i++) {
                double x = kvs_fp16_to_f32(Kl[i]), d = x - kvs_fp16_to_f32(hat[ci][i]);
                kn += d * d;
                kd += x * x;
            }
            kerr[ci] += sqrt(kn / kd) / 6;
        }
    }
    /* quantizers-reference.md §6 (512 tokens, state from 1024 query rows): kivi-2 K 0.256
     * logits 0.151; squat-2 r=20 K 0.274 logits 0.143. */
    fprintf(stderr,
            "real sample, t=32 blocks, state from its own 64x8 queries: squat-2 K rel "
            "%.4f logits %.4f | kivi-2 K rel %.4f logits %.4f\n",
            kerr[0], lerr[0], kerr[1], lerr[1]);
    assert_true(lerr[0] < lerr[1]);
    free(hat[0]);
    free(hat[1]);
    free(kf);
    free(khf);
    free(bytes);
    kvs_test_sample_free(&sm);
    kvs_codec_destroy(sq);
    kvs_codec_destroy(kv);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_no_queries_is_kivi), cmocka_unit_test(test_compensation_matrix),
        cmocka_unit_test(test_subspace_error),     cmocka_unit_test(test_query_scale_invariance),
        cmocka_unit_test(test_state_errors),       cmocka_unit_test(test_block_roundtrip),
        cmocka_unit_test(test_real_sample),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
