/* `squat-2`, `squat-4` (quantizers.md `squat-2`; quantizers-reference.md §4): KIVI
 * sections whose key codes are chosen so that the key error moves out of the query
 * subspace. CPU reference. SQuat-post: post-RoPE keys with a post-RoPE query subspace.
 *
 * Encoded bytes: exactly a KIVI section (codec_kivi.c layout, G = 32): decode is KIVI
 * decode and needs no state. Values: per-token KIVI (SQuat changes keys only).
 *
 * State (codec_squat.h layout): per (layer, kv-head) the query Gram G = Q^T Q over N
 * rows. At init, for each head with N > 0 (double precision):
 *   - eigen-decompose G (Householder tridiagonalization, then implicit QR with Wilkinson
 *     shifts, Golub & Van Loan §8.3) and keep its top-r eigen-part
 *     Q^T Q ~= sum_{i<=r} mu_i v_i v_i^T (r = 20; mu_i = sigma_i^2: the singular vectors
 *     scaled by their singular values, §4.2);
 *   - A = I + lambda_eff * that, lambda = 1e-3 and
 *         lambda_eff = lambda * (N_ref / N) * (E_ref / E),   E = trace(G) / N,
 *     that is lambda * N_ref * E_ref / trace(G). lambda multiplies sigma^2, which grows
 *     with the number of rows (§4.7: hence N_ref / N) and with the square of the
 *     queries' norm (hence E_ref / E, E the mean query energy ||q||^2 per row). So A
 *     depends on G / trace(G) only: scaling every query by c, or repeating the rows,
 *     leaves the codes unchanged (bit for bit when c is a power of two), and
 *     lambda_eff * mu_i <= lambda * N_ref * E_ref ~= 207 for a Gram of real rows
 *     (mu_i <= trace). The reference measurement fixes the constants (§6, realkv-a: one
 *     512-token prompt, gq = 2): N_ref = 1024 rows, and E_ref = 202, the harmonic mean
 *     of realkv-a's per-head E (201.998 over its 6 x 4 heads; they range 142..306, the
 *     plain mean is 212), so that the mean of lambda_eff over those heads is the 1e-3
 *     that was measured there (each head 0.66..1.42 x 1e-3). With N_ref / N alone, as
 *     first shipped, a model whose queries have twice realkv-a's norm got a 4x larger
 *     penalty and a key error far past KIVI's (issue 16; tests/bench/RESULTS.md, "SQuat's
 *     lambda normalized by the query energy"). A head whose Gram has trace <= 0 (zero,
 *     or not a Gram) has no subspace;
 *   - channel blocks B_1..B_T of g channels in natural order (g = 64 for D >= 128 as in
 *     the paper's code; D = 64 -> g = 32 and in general g = D/2 below 128, our choice,
 *     so that there are always two blocks; the last block may be shorter, e.g. D = 160:
 *     64, 64, 32), and for each block i < T the matrix C_i = -(A_RR)^-1 A_{R,B_i} with
 *     R = B_{i+1} u ... u B_T (Cholesky of A_RR), stored as fp32.
 * A head whose C_i are all zero (N = 0, or a zero Gram) has no subspace and is encoded
 * exactly as KIVI; so is every head of a codec with state version 0.
 *
 * Key encode (§4.3), per head and per KIVI token group (<= 32 tokens), on an fp32 copy X
 * of the group's keys: for i = 1..T: quantize the channels of B_i per channel over the
 * group (KIVI form, fp16 scale/min), d = x^ - x for B_i per token, then for every token
 * x_R += C_i d, computed as acc = sum_k C_i[r][k] * d[k] in fp32 in ascending k order
 * (multiply then add, no fma), then x_r += acc. The reference code writes the compensated
 * values back into fp16 before the next block; we keep them in fp32 (a small, documented
 * difference).
 */
#include "gpu/codec/codec_squat.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/base/mem.h"
#include "gpu/codec/codec_int.h"
#include "gpu/codec/codec_kivi.h"
#include "gpu/codec/half.h"

#define STATE_MAGIC "SQG1"
#define STATE_HEADER 16

typedef struct squat_priv {
    uint32_t g, nblk; /* channel block size and count */
    size_t per_head;  /* floats of C_1..C_{T-1} of one head */
    uint32_t active;  /* heads with a subspace */
    float **C;        /* [L*H]: NULL (no subspace) or C_1..C_{T-1} back to back */
} squat_priv;

void kvs_squat_blocks(uint32_t head_dim, uint32_t *g, uint32_t *count)
{
    uint32_t gg = head_dim >= 128 ? 64 : head_dim / 2;
    if (gg == 0)
        gg = head_dim;
    *g = gg;
    *count = (head_dim + gg - 1) / gg;
}

size_t kvs_squat_state_bytes(const kvs_ns_spec *s)
{
    return STATE_HEADER +
           (size_t)s->layers * s->kv_heads * (8 + 4 * (size_t)s->head_dim * s->head_dim);
}

/* ---------------------------------------------------------------- state bytes */

static void put32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

int kvs_squat_state_from_grams(const kvs_ns_spec *s, const float *gram, const uint64_t *rows,
                               void **state, size_t *len, kvs_err *err)
{
    size_t n = kvs_squat_state_bytes(s), dd = (size_t)s->head_dim * s->head_dim;
    uint8_t *p = kvs_trymalloc(n);
    if (!p)
        return kvs_err_set(err, KVS_ENOMEM, "squat state: out of memory for %zu bytes", n);
    memcpy(p, STATE_MAGIC, 4);
    put32(p + 4, s->layers);
    put32(p + 8, s->kv_heads);
    put32(p + 12, s->head_dim);
    uint8_t *r = p + STATE_HEADER;
    for (size_t lh = 0; lh < (size_t)s->layers * s->kv_heads; lh++) {
        put32(r, (uint32_t)rows[lh]);
        put32(r + 4, (uint32_t)(rows[lh] >> 32));
        r += 8;
        for (size_t i = 0; i < dd; i++, r += 4)
            put32(r, kvs_f32_bits(gram[lh * dd + i]));
    }
    *state = p;
    *len = n;
    return 0;
}

int kvs_squat_state_from_queries(const kvs_ns_spec *s, uint32_t q_heads, const uint16_t *q,
                                 uint32_t n, void **state, size_t *len, kvs_err *err)
{
    uint32_t L = s->layers, H = s->kv_heads, D = s->head_dim;
    if (q_heads == 0 || q_heads % H != 0)
        return kvs_err_set(err, KVS_EINVAL, "q_heads: %u is not a multiple of kv_heads %u", q_heads,
                           H);
    if (n == 0)
        return kvs_err_set(err, KVS_EINVAL, "queries: no rows");
    uint32_t gq = q_heads / H;
    size_t dd = (size_t)D * D;
    double *acc = kvs_trymalloc(dd * sizeof *acc);
    float *gram = kvs_trymalloc((size_t)L * H * dd * sizeof *gram);
    uint64_t *rows = kvs_trymalloc((size_t)L * H * sizeof *rows);
    double *row = kvs_trymalloc((size_t)D * sizeof *row);
    int rc = 0;
    if (!acc || !gram || !rows || !row) {
        rc = kvs_err_set(err, KVS_ENOMEM, "squat state: out of memory");
        goto out;
    }
    bool bf16 = s->dtype == KVS_DTYPE_BF16;
    for (uint32_t l = 0; l < L && rc == 0; l++)
        for (uint32_t h = 0; h < H && rc == 0; h++) {
            memset(acc, 0, dd * sizeof *acc);
            for (uint32_t tok = 0; tok < n && rc == 0; tok++)
                for (uint32_t hq = h * gq; hq < (h + 1) * gq && rc == 0; hq++) {
                    const uint16_t *v = q + (((size_t)l * n + tok) * q_heads + hq) * D;
                    for (uint32_t j = 0; j < D; j++) {
                        float f = bf16 ? kvs_bf16_to_f32(v[j]) : kvs_fp16_to_f32(v[j]);
                        if (!isfinite(f)) {
                            rc = kvs_err_set(err, KVS_EINVAL,
                                             "queries: %s at layer %u, token "
                                             "%u, head %u, channel %u",
                                             isnan(f) ? "NaN" : "Inf", l, tok, hq, j);
                            break;
                        }
                        row[j] = f;
                    }
                    for (uint32_t i = 0; i < D && rc == 0; i++)
                        for (uint32_t j = 0; j < D; j++)
                            acc[(size_t)i * D + j] += row[i] * row[j];
                }
            size_t lh = (size_t)l * H + h;
            for (size_t i = 0; i < dd && rc == 0; i++) {
                gram[lh * dd + i] = (float)acc[i];
                /* finite bf16 queries beyond ~1e19 square past fp32 */
                if (!isfinite(gram[lh * dd + i]))
                    rc = kvs_err_set(err, KVS_EINVAL,
                                     "queries: layer %u, kv-head %u: Gram matrix entry (%zu, "
                                     "%zu) overflows fp32",
                                     l, h, i / D, i % D);
            }
            rows[lh] = (uint64_t)n * gq;
        }
    if (rc == 0)
        rc = kvs_squat_state_from_grams(s, gram, rows, state, len, err);
out:
    free(acc);
    free(gram);
    free(rows);
    free(row);
    return rc;
}

/* ---------------------------------------------------------------- linear algebra */

/* Symmetric eigendecomposition a = V diag(w) V^T of an n x n row-major matrix (a is
 * destroyed; column k of V, V[i*n + k], is the eigenvector of w[k]). Householder
 * reduction to tridiagonal form accumulating V, then implicit symmetric QR steps with
 * Wilkinson shifts on the tridiagonal (Golub & Van Loan, Matrix Computations, §8.3),
 * the bulge chased with Givens rotations. Returns 0, or -1 if QR did not converge. */
static int sym_eig(double *a, int n, double *w, double *V, double *tmp /* 2n */)
{
    double *v = tmp, *p = tmp + n;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++)
            V[i * n + j] = i == j;
    for (int k = 0; k + 2 < n; k++) {
        /* H = I - 2 u u^T on indices k+1..n-1 maps a[k+1..][k] to (alpha, 0, ..., 0). */
        double norm = 0;
        for (int i = k + 1; i < n; i++)
            norm += a[i * n + k] * a[i * n + k];
        norm = sqrt(norm);
        if (norm == 0)
            continue;
        double alpha = a[(k + 1) * n + k] > 0 ? -norm : norm, un = 0;
        for (int i = 0; i < n; i++)
            v[i] = i > k ? a[i * n + k] : 0;
        v[k + 1] -= alpha;
        for (int i = k + 1; i < n; i++)
            un += v[i] * v[i];
        un = sqrt(un);
        for (int i = k + 1; i < n; i++)
            v[i] /= un;
        /* a <- a H (columns), then H a (rows), V <- V H. */
        for (int r = 0; r < n; r++) {
            double s = 0;
            for (int i = k + 1; i < n; i++)
                s += a[r * n + i] * v[i];
            p[r] = s;
        }
        for (int r = 0; r < n; r++)
            for (int i = k + 1; i < n; i++)
                a[r * n + i] -= 2 * p[r] * v[i];
        for (int c = 0; c < n; c++) {
            double s = 0;
            for (int i = k + 1; i < n; i++)
                s += v[i] * a[i * n + c];
            p[c] = s;
        }
        for (int i = k + 1; i < n; i++)
            for (int c = 0; c < n; c++)
                a[i * n + c] -= 2 * v[i] * p[c];
        for (int r = 0; r < n; r++) {
            double s = 0;
            for (int i = k + 1; i < n; i++)
                s += V[r * n + i] * v[i];
            for (int i = k + 1; i < n; i++)
                V[r * n + i] -= 2 * s * v[i];
        }
    }
    /* Keep the tridiagonal part (symmetrized); the rest is round-off. */
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++)
            if (j > i + 1 || i > j + 1)
                a[i * n + j] = 0;
    for (int i = 0; i + 1 < n; i++)
        a[(i + 1) * n + i] = a[i * n + i + 1] = 0.5 * (a[i * n + i + 1] + a[(i + 1) * n + i]);

#define T(i, j) a[(i)*n + (j)]
    int hi = n - 1, iter = 0;
    while (hi > 0) {
        if (fabs(T(hi, hi - 1)) <= DBL_EPSILON * (fabs(T(hi, hi)) + fabs(T(hi - 1, hi - 1)))) {
            T(hi, hi - 1) = T(hi - 1, hi) = 0;
            hi--;
            iter = 0;
            continue;
        }
        if (++iter > 100)
            return -1;
        int lo = hi - 1;
        while (lo > 0 &&
               fabs(T(lo, lo - 1)) > DBL_EPSILON * (fabs(T(lo, lo)) + fabs(T(lo - 1, lo - 1))))
            lo--;
        if (lo > 0)
            T(lo, lo - 1) = T(lo - 1, lo) = 0;
        double dd = 0.5 * (T(hi - 1, hi - 1) - T(hi, hi)), b = T(hi, hi - 1);
        double mu = T(hi, hi) - b * b / (dd + (dd >= 0 ? 1.0 : -1.0) * hypot(dd, b));
        double x = T(lo, lo) - mu, z = T(lo + 1, lo);
        for (int k = lo; k < hi; k++) {
            double r = hypot(x, z);
            double c = r == 0 ? 1.0 : x / r, s = r == 0 ? 0.0 : z / r;
            int j0 = k - 1 > lo ? k - 1 : lo, j1 = k + 2 < hi ? k + 2 : hi;
            /* T <- R T R^T with R = [[c, s], [-s, c]] on (k, k+1); V <- V R^T. */
            for (int j = j0; j <= j1; j++) {
                double t0 = T(k, j), t1 = T(k + 1, j);
                T(k, j) = c * t0 + s * t1;
                T(k + 1, j) = -s * t0 + c * t1;
            }
            for (int j = j0; j <= j1; j++) {
                double t0 = T(j, k), t1 = T(j, k + 1);
                T(j, k) = c * t0 + s * t1;
                T(j, k + 1) = -s * t0 + c * t1;
            }
            if (k > lo)
                T(k + 1, k - 1) = T(k - 1, k + 1) = 0; /* the bulge just chased */
            for (int i = 0; i < n; i++) {
                double v0 = V[i * n + k], v1 = V[i * n + k + 1];
                V[i * n + k] = c * v0 + s * v1;
                V[i * n + k + 1] = -s * v0 + c * v1;
            }
            if (k + 1 < hi) {
                x = T(k + 1, k);
                z = T(k + 2, k);
            }
        }
    }
    for (int i = 0; i < n; i++)
        w[i] = T(i, i);
#undef T
    return 0;
}

/* Solves A X = B for SPD A (m x m) and B (m x k), both row-major; A is overwritten by
 * its Cholesky factor, B by X. Returns -1 if A is not positive definite. */
static int chol_solve(double *A, int m, double *B, int k)
{
    for (int j = 0; j < m; j++) {
        double d = A[j * m + j];
        for (int i = 0; i < j; i++)
            d -= A[j * m + i] * A[j * m + i];
        if (!(d > 0))
            return -1;
        d = sqrt(d);
        A[j * m + j] = d;
        for (int r = j + 1; r < m; r++) {
            double s = A[r * m + j];
            for (int i = 0; i < j; i++)
                s -= A[r * m + i] * A[j * m + i];
            A[r * m + j] = s / d;
        }
    }
    for (int c = 0; c < k; c++) {
        for (int r = 0; r < m; r++) { /* L y = b */
            double s = B[r * k + c];
            for (int i = 0; i < r; i++)
                s -= A[r * m + i] * B[i * k + c];
            B[r * k + c] = s / A[r * m + r];
        }
        for (int r = m - 1; r >= 0; r--) { /* L^T x = y */
            double s = B[r * k + c];
            for (int i = r + 1; i < m; i++)
                s -= A[i * m + r] * B[i * k + c];
            B[r * k + c] = s / A[r * m + r];
        }
    }
    return 0;
}

/* Fills Cout (priv->per_head floats) for one head from its Gram (D x D fp32 bytes, LE).
 * Returns 1 if the head has a subspace (some C entry non-zero), 0 if not, a negative code
 * on failure. */
static int head_matrices(const squat_priv *sp, uint32_t D, const uint8_t *gbytes, float *Cout,
                         double *work)
{
    size_t dd = (size_t)D * D;
    double *G = work, *V = G + dd, *A = V + dd, *S = A + dd, *Bm = S + dd, *w = Bm + dd,
           *tmp = w + D;
    double trace = 0;
    for (size_t i = 0; i < dd; i++) {
        G[i] = kvs_bits_f32(get32(gbytes + 4 * i));
        if (!isfinite(G[i]))
            return KVS_EINVAL;
    }
    for (uint32_t i = 0; i < D; i++)
        trace += G[(size_t)i * D + i];
    /* No query energy (a zero Gram; or a Gram from kvs_squat_state_from_grams that is not
     * a Gram, with a diagonal summing to <= 0): no subspace, KIVI. */
    if (!(trace > 0))
        return 0;
    for (uint32_t i = 0; i < D; i++)
        for (uint32_t j = 0; j < i; j++)
            G[i * D + j] = G[j * D + i] = 0.5 * (G[i * D + j] + G[j * D + i]);
    if (sym_eig(G, (int)D, w, V, tmp))
        return KVS_EINTERNAL;
    /* A = I + lambda_eff * sum of the top-r eigen-parts (mu > 0), lambda_eff = lambda *
     * (N_ref / N) * (E_ref / E), E = trace / N (file comment): the rows cancel. */
    double lam = KVS_SQUAT_LAMBDA * KVS_SQUAT_N_REF * KVS_SQUAT_E_REF / trace;
    memset(A, 0, dd * sizeof *A);
    for (uint32_t i = 0; i < D; i++)
        A[i * D + i] = 1.0;
    unsigned char *used = (unsigned char *)tmp; /* 2D doubles of room: D flags fit */
    memset(used, 0, D);
    for (uint32_t k = 0; k < KVS_SQUAT_RANK && k < D; k++) {
        int best = -1;
        for (uint32_t i = 0; i < D; i++)
            if (!used[i] && (best < 0 || w[i] > w[best]))
                best = (int)i;
        used[best] = 1;
        if (!(w[best] > 0))
            break;
        double m = lam * w[best];
        for (uint32_t i = 0; i < D; i++)
            for (uint32_t j = 0; j < D; j++)
                A[i * D + j] += m * V[i * D + best] * V[j * D + best];
    }
    int nonzero = 0;
    float *C = Cout;
    for (uint32_t b = 0; b + 1 < sp->nblk; b++) {
        uint32_t j0 = b * sp->g, j1 = j0 + sp->g, m = D - j1, k = j1 - j0;
        for (uint32_t r = 0; r < m; r++) {
            for (uint32_t c = 0; c < m; c++)
                S[r * m + c] = A[(size_t)(j1 + r) * D + j1 + c];
            for (uint32_t c = 0; c < k; c++)
                Bm[r * k + c] = A[(size_t)(j1 + r) * D + j0 + c];
        }
        if (chol_solve(S, (int)m, Bm, (int)k))
            return KVS_EINTERNAL;
        for (size_t i = 0; i < (size_t)m * k; i++) {
            C[i] = (float)-Bm[i];
            /* A finite C keeps the compensated keys finite (|C| <= sqrt(|A - I|) / 2), so
             * neither the reference nor the kernel ever quantizes a NaN. */
            if (!isfinite(C[i]))
                return KVS_EINTERNAL;
            nonzero |= C[i] != 0.0f;
        }
        C += (size_t)m * k;
    }
    return nonzero;
}

/* ---------------------------------------------------------------- ops */

static void squat_fini(kvs_codec *c)
{
    squat_priv *sp = c->priv;
    if (!sp)
        return;
    if (sp->C)
        for (size_t i = 0; i < (size_t)c->spec.layers * c->spec.kv_heads; i++)
            free(sp->C[i]);
    free(sp->C);
    free(sp);
    c->priv = NULL;
}

static int squat_init(kvs_codec *c, kvs_err *err)
{
    const kvs_ns_spec *s = &c->spec;
    if (c->bits != 2 && c->bits != 4)
        return kvs_err_set(err, KVS_EINVAL, "bits %u not supported (2 or 4)", c->bits);
    if (c->kv != KVS_KEYS || c->state.version == 0)
        return 0; /* values, or no queries yet: plain KIVI */
    size_t need = kvs_squat_state_bytes(s);
    const uint8_t *st = c->state.data;
    if (c->state.len != need || memcmp(st, STATE_MAGIC, 4) != 0 || get32(st + 4) != s->layers ||
        get32(st + 8) != s->kv_heads || get32(st + 12) != s->head_dim)
        return kvs_err_set(err, KVS_EINVAL,
                           "codec state v%u: %zu bytes, expected a SQG1 Gram "
                           "state of %zu bytes for %u layers, %u kv-heads, head_dim %u",
                           c->state.version, c->state.len, need, s->layers, s->kv_heads,
                           s->head_dim);
    uint32_t D = s->head_dim;
    squat_priv *sp = kvs_xcalloc(1, sizeof *sp);
    c->priv = sp;
    kvs_squat_blocks(D, &sp->g, &sp->nblk);
    for (uint32_t b = 0; b + 1 < sp->nblk; b++)
        sp->per_head += (size_t)(D - (b + 1) * sp->g) * sp->g;
    size_t heads = (size_t)s->layers * s->kv_heads, dd = (size_t)D * D;
    sp->C = kvs_trymalloc(heads * sizeof *sp->C);
    double *work = kvs_trymalloc((5 * dd + 3 * (size_t)D) * sizeof *work);
    if (!sp->C || !work) {
        free(work);
        squat_fini(c);
        return kvs_err_set(err, KVS_ENOMEM, "codec state: out of memory");
    }
    memset(sp->C, 0, heads * sizeof *sp->C);
    int rc = 0;
    for (size_t lh = 0; lh < heads && rc == 0; lh++) {
        const uint8_t *r = st + STATE_HEADER + lh * (8 + 4 * dd);
        uint64_t N = (uint64_t)get32(r) | (uint64_t)get32(r + 4) << 32;
        if (N == 0 || sp->per_head == 0)
            continue;
        float *C = kvs_trymalloc(sp->per_head * sizeof *C);
        if (!C) {
            rc = kvs_err_set(err, KVS_ENOMEM, "codec state: out of memory");
            break;
        }
        int h = head_matrices(sp, D, r + 8, C, work);
        if (h < 0) {
            free(C);
            rc = kvs_err_set(err, KVS_EINVAL,
                             "codec state v%u: layer %zu, kv-head %zu: Gram "
                             "matrix not usable (not finite, or the eigensolver or Cholesky "
                             "failed)",
                             c->state.version, lh / s->kv_heads, lh % s->kv_heads);
        } else if (h == 0) {
            free(C);
        } else {
            sp->C[lh] = C;
            sp->active++;
        }
    }
    free(work);
    if (rc)
        squat_fini(c);
    return rc;
}

uint32_t kvs_squat_subspace_heads(const kvs_codec *c)
{
    const squat_priv *sp = c->id == KVS_CODEC_SQUAT ? c->priv : NULL;
    return sp ? sp->active : 0;
}

const float *kvs_squat_gram(const kvs_codec *c, uint32_t layer, uint32_t head, uint64_t *rows)
{
    const kvs_ns_spec *s = &c->spec;
    if (c->id != KVS_CODEC_SQUAT || c->kv != KVS_KEYS || c->state.version == 0 ||
        c->state.len != kvs_squat_state_bytes(s) || layer >= s->layers || head >= s->kv_heads)
        return NULL;
    size_t dd = (size_t)s->head_dim * s->head_dim, lh = (size_t)layer * s->kv_heads + head;
    const uint8_t *r = (const uint8_t *)c->state.data + STATE_HEADER + lh * (8 + 4 * dd);
    uint64_t n = (uint64_t)get32(r) | (uint64_t)get32(r + 4) << 32;
    if (rows)
        *rows = n;
    /* The state is a malloc'ed copy (kvs_codec_create) and every record starts 4-byte
     * aligned after it (16 + k * (8 + 4 D^2) + 8): the floats can be read in place. */
    return n ? (const float *)(const void *)(r + 8) : NULL;
}

int kvs_squat_compensation(const kvs_codec *c, uint32_t layer, uint32_t head, uint32_t b,
                           const float **C, uint32_t *rows, uint32_t *cols, kvs_err *err)
{
    uint32_t g, nblk, D = c->spec.head_dim;
    kvs_squat_blocks(D, &g, &nblk);
    if (c->id != KVS_CODEC_SQUAT || layer >= c->spec.layers || head >= c->spec.kv_heads ||
        b + 1 >= nblk)
        return kvs_err_set(err, KVS_EINVAL,
                           "squat compensation: no matrix for layer %u, head "
                           "%u, block %u",
                           layer, head, b);
    const squat_priv *sp = c->priv;
    const float *p = sp ? sp->C[(size_t)layer * c->spec.kv_heads + head] : NULL;
    for (uint32_t i = 0; p && i < b; i++)
        p += (size_t)(D - (i + 1) * g) * g;
    *C = p;
    *rows = D - (b + 1) * g;
    *cols = g;
    return 0;
}

static int squat_encode_keys(const kvs_codec *c, const kvs__kivi_geom *geo, uint32_t layer,
                             const float *in, uint8_t *out, kvs_err *err)
{
    const squat_priv *sp = c->priv;
    uint32_t H = geo->heads, D = geo->dim;
    size_t stride = (size_t)H * D;
    float *X = kvs_trymalloc((size_t)2 * geo->gk * D * sizeof *X);
    float *d = kvs_trymalloc((size_t)sp->g * sizeof *d);
    int rc = 0;
    if (!X || !d) {
        rc = kvs_err_set(err, KVS_ENOMEM, "squat: out of memory");
        goto out;
    }
    float *Xh = X + (size_t)geo->gk * D;
    for (uint32_t h = 0; h < H && rc == 0; h++) {
        const float *Ch = sp->C[(size_t)layer * H + h];
        for (uint32_t gi = 0; gi < geo->nk && rc == 0; gi++) {
            uint32_t n = kvs__kivi_key_group_len(geo, gi);
            for (uint32_t i = 0; i < n; i++)
                memcpy(X + (size_t)i * D, in + ((size_t)gi * geo->gk + i) * stride + (size_t)h * D,
                       D * sizeof *X);
            const float *Cb = Ch;
            for (uint32_t b = 0; b < sp->nblk && rc == 0; b++) {
                uint32_t j0 = b * sp->g, j1 = j0 + sp->g < D ? j0 + sp->g : D;
                for (uint32_t j = j0; j < j1 && rc == 0; j++)
                    rc = kvs__kivi_key_group(geo, out, layer, h, j, gi, X + j, D, Xh + j, err);
                if (rc || !Ch || j1 == D)
                    continue;
                /* §4.3 step c: x_R += C_b d, R = channels j1..D-1. */
                uint32_t k = j1 - j0;
                for (uint32_t i = 0; i < n; i++) {
                    float *x = X + (size_t)i * D;
                    const float *xh = Xh + (size_t)i * D;
                    for (uint32_t q = 0; q < k; q++)
                        d[q] = xh[j0 + q] - x[j0 + q];
                    for (uint32_t r = j1; r < D; r++) {
                        const float *crow = Cb + (size_t)(r - j1) * k;
                        float acc = 0.0f;
                        for (uint32_t q = 0; q < k; q++)
                            acc += crow[q] * d[q];
                        x[r] += acc;
                    }
                }
                Cb += (size_t)(D - j1) * k;
            }
        }
    }
out:
    free(X);
    free(d);
    return rc;
}

static int squat_encode(const kvs_codec *c, uint32_t layer, uint32_t t, const float *in,
                        uint8_t *out, size_t cap, size_t *len, kvs_err *err)
{
    const squat_priv *sp = c->priv;
    if (c->kv != KVS_KEYS || !sp || sp->active == 0)
        return kvs__kivi_encode(c, layer, t, in, out, cap, len, err);
    kvs__kivi_geom g;
    kvs__kivi_geom_init(&g, t, c->spec.kv_heads, c->spec.head_dim, c->bits);
    if (cap < g.k_bytes)
        return kvs_err_set(err, KVS_ENOSPC, "squat: output buffer too small (%zu < %zu)", cap,
                           g.k_bytes);
    int rc = squat_encode_keys(c, &g, layer, in, out, err);
    if (rc == 0)
        *len = g.k_bytes;
    return rc;
}

const kvs_codec_ops kvs__codec_squat_ops = {
    .family = "squat",
    .init = squat_init,
    .fini = squat_fini,
    .section_max = kvs__kivi_section_max,
    .encode = squat_encode,
    .decode = kvs__kivi_decode,
    .check_section = kvs__kivi_check_section,
    .decode_ignores_state = true,
};
