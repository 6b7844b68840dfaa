/* kvs-quality: codec quality harness on real KV samples (quantizers.md "Quality
 * measures"; quantizers-reference.md §6 is the table it is compared with).
 *
 *   kvs-quality FILE [--codec NAME ...] [--block-tokens T] [--calib FILE2] [--tokens N]
 *               [--per-layer] [--json]
 *
 * FILE is a kvsample/1 file (shared/data/README.md): a 4096-byte header, "KVSAMPLE1\n"
 * then JSON naming the fp16 arrays k, k_pre_rope, v [L][n][H][D] and q [L][n][Hq][D]
 * with their byte offsets. For every codec (default: all that kvs_codec_names lists),
 * keys and values use the same codec in a namespace of (L, H, D) from the file, fp16,
 * seed 1, block_tokens T (default 16). The sample is cut into blocks of T tokens
 * ([L][2][t][H][D], the last one shorter if T does not divide n), each block goes
 * through kvs_block_encode and kvs_block_decode, and the decoded blocks are scattered
 * back into whole-file K and V.
 *
 * Per-codec inputs (the method, not tuning; the output says each):
 *  - rotatekv-*: keys_pre_rope; the keys fed are k_pre_rope; the permutation (codec
 *    state v1) is calibrated on --calib's k_pre_rope (default: the sibling sample, name
 *    with -a/-b swapped, else the evaluated file itself, reported as in-sample); RoPE
 *    (rotate-half, theta from the file, default 10000; pair (i, i+D/2), angle
 *    pos * theta^(-2i/D), positions 0..n-1) is re-applied to the decoded keys before
 *    anything is measured (quantizers-reference.md §3.2, §3.8).
 *  - squat-*: query state from this file's own post-RoPE q (SQuat builds its subspace
 *    from the prompt's queries at prefill: quantizers-reference.md §4.2, §4.7).
 *    --rotatekv-post-rope feeds (and calibrates on) post-RoPE k instead, the store's
 *    fallback when clients cannot send pre-RoPE keys (quantizers.md asks for both).
 *  - others: post-RoPE k.
 *
 * Measures, all against the file's post-RoPE k, v and q:
 *  - bits/element = total encoded block bytes (headers, offset tables, checksums and
 *    every section) x 8 / (2 L n H D); ratio = 16 / bits. Codec state is reported on
 *    its own line, never folded into bits.
 *  - K and V relative error ||x^ - x|| / ||x||, over the whole file and per layer; the
 *    table shows the mean over layers of the per-layer error (as §6 does) and the
 *    whole-file error.
 *  - attention, per layer over all Hq query heads (head h reads kv-head h / (Hq/H)),
 *    causal (query i sees keys 0..i), in double: logit error ||q K^T - q K^T|| / ||q K^T||
 *    over the causal entries; output error ||softmax(q K^T / sqrt D) V - ...|| / ||...||;
 *    per layer, then the mean over layers.
 *  - encode and decode MB/s = fp16 input bytes (10^6) / wall time (CLOCK_MONOTONIC) of
 *    encoding (decoding) every block, best of 3. Single thread, CPU reference codecs;
 *    RoPE re-application is the client's and not timed.
 *
 * Exit status: 0; 1 if a codec fails on the data, or if `none` does not round-trip bit
 * for bit (a self-check of the harness's block plumbing); 2 for usage or input errors.
 * Performance numbers are reported, never checked.
 *
 * Single-threaded; everything is allocated per run and freed before exit.
 */
#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <cjson/cJSON.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "gpu/base/err.h"
#include "gpu/base/mem.h"
#include "gpu/codec/codec.h"
#include "gpu/codec/format.h"
#include "gpu/codec/half.h"
#include "gpu/codec/spec.h"

#if defined(__has_include)
#if __has_include("gpu/codec/codec_rotatekv.h")
#include "gpu/codec/codec_rotatekv.h"
#define HAVE_ROTATEKV_CALIB 1
#endif
#if __has_include("gpu/codec/codec_squat.h")
#include "gpu/codec/codec_squat.h"
#define HAVE_SQUAT_STATE 1
#endif
#endif

#define HEADER_BYTES 4096
#define MAGIC "KVSAMPLE1\n"
#define MAX_CODECS 64
#define MAX_ARRAYS 16
#define REPS 3

/* ---------------------------------------------------------------- sample file */

typedef struct array_desc {
    char name[32];
    char dtype[16];
    uint32_t rank;
    uint64_t shape[4];
    uint64_t offset;
    bool have_offset;
} array_desc;

typedef struct sample {
    char path[1024];
    uint32_t layers, tokens, kv_heads, q_heads, head_dim;
    double rope_theta;
    bool have_theta;
    /* Owned, [L][n][H][D] (q: [L][n][Hq][D]) fp16 bits, the first `tokens` tokens. */
    uint16_t *k, *k_pre, *v, *q;
} sample;

/* An unsigned integer JSON number (shapes, offsets); false for anything else. */
static bool json_uint(const cJSON *n, uint64_t *out)
{
    if (!cJSON_IsNumber(n) || n->valuedouble < 0 || n->valuedouble > 9007199254740992.0 ||
        n->valuedouble != (double)(uint64_t)n->valuedouble)
        return false;
    *out = (uint64_t)n->valuedouble;
    return true;
}

/* The header's "arrays" list and "model".rope_theta (cJSON does the parsing); msg names
 * what is malformed. */
static bool parse_header(const char *text, size_t len, array_desc *arrays, size_t *narrays,
                         sample *s, char *msg, size_t cap)
{
    *narrays = 0;
    cJSON *root = cJSON_ParseWithLength(text, len);
    bool ok = false;
    const cJSON *list = root ? cJSON_GetObjectItemCaseSensitive(root, "arrays") : NULL;
    if (!root) {
        snprintf(msg, cap, "not valid JSON");
    } else if (!cJSON_IsArray(list)) {
        snprintf(msg, cap, "arrays: expected a list");
    } else {
        ok = true;
        const cJSON *e;
        cJSON_ArrayForEach(e, list)
        {
            if (*narrays == MAX_ARRAYS) {
                snprintf(msg, cap, "arrays: too many entries");
                ok = false;
                break;
            }
            array_desc *d = &arrays[(*narrays)++];
            memset(d, 0, sizeof *d);
            const cJSON *name = cJSON_GetObjectItemCaseSensitive(e, "name");
            const cJSON *dtype = cJSON_GetObjectItemCaseSensitive(e, "dtype");
            const cJSON *shape = cJSON_GetObjectItemCaseSensitive(e, "shape");
            const cJSON *off = cJSON_GetObjectItemCaseSensitive(e, "offset");
            if (!cJSON_IsString(name) || strlen(name->valuestring) >= sizeof d->name ||
                !cJSON_IsString(dtype) || strlen(dtype->valuestring) >= sizeof d->dtype ||
                !cJSON_IsArray(shape) || cJSON_GetArraySize(shape) > 4) {
                snprintf(msg, cap,
                         "arrays[%zu]: needs a name, a dtype and a shape of at most 4 "
                         "dimensions",
                         *narrays - 1);
                ok = false;
                break;
            }
            strcpy(d->name, name->valuestring);
            strcpy(d->dtype, dtype->valuestring);
            const cJSON *dim;
            cJSON_ArrayForEach(dim, shape)
            {
                if (!json_uint(dim, &d->shape[d->rank++])) {
                    snprintf(msg, cap, "arrays[%zu].shape: not unsigned integers", *narrays - 1);
                    ok = false;
                }
            }
            if (off) {
                d->have_offset = json_uint(off, &d->offset);
                if (!d->have_offset) {
                    snprintf(msg, cap, "arrays[%zu].offset: not an unsigned integer", *narrays - 1);
                    ok = false;
                }
            }
            if (!ok)
                break;
        }
        const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
        const cJSON *theta = model ? cJSON_GetObjectItemCaseSensitive(model, "rope_theta") : NULL;
        if (ok && cJSON_IsNumber(theta)) {
            s->rope_theta = theta->valuedouble;
            s->have_theta = true;
        }
    }
    cJSON_Delete(root);
    return ok;
}

static const array_desc *find_array(const array_desc *a, size_t n, const char *name)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(a[i].name, name) == 0)
            return &a[i];
    return NULL;
}

/* Checks one array (rank 4, fp16, inside the file past the header) and copies its
 * first `keep` tokens into an owned buffer. */
static int load_array(const sample *s, const uint8_t *buf, size_t size, const array_desc *a,
                      uint32_t keep, uint16_t **out, kvs_err *err)
{
    if (a->rank != 4)
        return kvs_err_set(err, KVS_EINVAL, "%s: array '%s' has rank %u, not 4", s->path, a->name,
                           a->rank);
    if (strcmp(a->dtype, "float16") != 0 && strcmp(a->dtype, "fp16") != 0)
        return kvs_err_set(err, KVS_EINVAL, "%s: array '%s' has dtype '%s', not float16", s->path,
                           a->name, a->dtype);
    if (!a->have_offset || a->offset < HEADER_BYTES)
        return kvs_err_set(err, KVS_EINVAL, "%s: array '%s' has no offset past the header", s->path,
                           a->name);
    uint64_t elems = 1;
    for (uint32_t i = 0; i < 4; i++)
        if (a->shape[i] == 0 || !kvs_mul_size(elems, a->shape[i], &elems))
            return kvs_err_set(err, KVS_EINVAL, "%s: array '%s': bad shape", s->path, a->name);
    uint64_t bytes = 0;
    if (!kvs_mul_size(elems, 2, &bytes) || a->offset > size || bytes > size - a->offset)
        return kvs_err_set(err, KVS_EINVAL,
                           "%s: array '%s' (%llu bytes at offset %llu) runs past the end of "
                           "the file (%zu bytes)",
                           s->path, a->name, (unsigned long long)bytes,
                           (unsigned long long)a->offset, size);
    uint64_t L = a->shape[0], n = a->shape[1], row = a->shape[2] * a->shape[3];
    uint16_t *dst = kvs_trymalloc(L * keep * row * sizeof *dst);
    if (!dst)
        return kvs_err_set(err, KVS_ENOMEM, "%s: out of memory for '%s'", s->path, a->name);
    const uint8_t *src = buf + a->offset;
    for (uint64_t l = 0; l < L; l++)
        for (uint64_t i = 0; i < keep * row; i++) {
            const uint8_t *p = src + 2 * ((l * n) * row + i);
            dst[l * keep * row + i] = (uint16_t)(p[0] | p[1] << 8); /* little-endian */
        }
    *out = dst;
    return 0;
}

static void sample_free(sample *s)
{
    free(s->k);
    free(s->k_pre);
    free(s->v);
    free(s->q);
    memset(s, 0, sizeof *s);
}

/* Loads FILE; keeps the first max_tokens tokens (0 = all). */
static int sample_load(const char *path, uint32_t max_tokens, sample *s, kvs_err *err)
{
    memset(s, 0, sizeof *s);
    snprintf(s->path, sizeof s->path, "%s", path);
    FILE *f = fopen(path, "rb");
    if (!f)
        return kvs_err_set(err, -errno, "%s: %s", path, strerror(errno));
    uint8_t *buf = NULL;
    size_t size = 0;
    int rc = 0;
    long end = fseek(f, 0, SEEK_END) == 0 ? ftell(f) : -1;
    if (end < 0 || fseek(f, 0, SEEK_SET) != 0) {
        rc = kvs_err_set(err, KVS_EIO, "%s: cannot seek", path);
    } else if ((size = (size_t)end) < HEADER_BYTES) {
        rc = kvs_err_set(err, KVS_EINVAL, "%s: %zu bytes, shorter than the 4096-byte header", path,
                         size);
    } else if (!(buf = kvs_trymalloc(size))) {
        rc = kvs_err_set(err, KVS_ENOMEM, "%s: out of memory for %zu bytes", path, size);
    } else if (fread(buf, 1, size, f) != size) {
        rc = kvs_err_set(err, KVS_EIO, "%s: short read", path);
    }
    fclose(f);
    if (rc)
        goto out;
    if (memcmp(buf, MAGIC, strlen(MAGIC)) != 0) {
        rc = kvs_err_set(err, KVS_EINVAL, "%s: not a kvsample file (no KVSAMPLE1 line)", path);
        goto out;
    }
    array_desc arrays[MAX_ARRAYS];
    size_t narrays;
    char why[160];
    if (!parse_header((const char *)buf + strlen(MAGIC), HEADER_BYTES - strlen(MAGIC), arrays,
                      &narrays, s, why, sizeof why)) {
        rc = kvs_err_set(err, KVS_EINVAL, "%s: header JSON: %s", path, why);
        goto out;
    }
    const array_desc *ak = find_array(arrays, narrays, "k"), *av = find_array(arrays, narrays, "v"),
                     *aq = find_array(arrays, narrays, "q"),
                     *ap = find_array(arrays, narrays, "k_pre_rope");
    if (!ak || !av || !aq) {
        rc = kvs_err_set(err, KVS_EINVAL, "%s: the header lists no '%s' array", path,
                         !ak   ? "k"
                         : !av ? "v"
                               : "q");
        goto out;
    }
    /* Shapes: k, v (and k_pre_rope) [L][n][H][D] alike; q [L][n][Hq][D], H divides Hq. */
    const array_desc *same[] = {av, ap};
    for (size_t i = 0; i < 2; i++)
        if (same[i] && (same[i]->rank != ak->rank ||
                        memcmp(same[i]->shape, ak->shape, sizeof ak->shape) != 0)) {
            rc = kvs_err_set(err, KVS_EINVAL, "%s: '%s' and 'k' differ in shape", path,
                             same[i]->name);
            goto out;
        }
    if (ak->rank != 4 || aq->rank != 4 || aq->shape[0] != ak->shape[0] ||
        aq->shape[1] != ak->shape[1] || aq->shape[3] != ak->shape[3] || ak->shape[2] == 0 ||
        aq->shape[2] % ak->shape[2] != 0 || aq->shape[2] == 0) {
        rc = kvs_err_set(err, KVS_EINVAL,
                         "%s: 'q' must be [L][n][Hq][D] with k [L][n][H][D] "
                         "and H dividing Hq",
                         path);
        goto out;
    }
    if (ak->shape[0] > KVS_MAX_LAYERS || ak->shape[1] > UINT32_MAX ||
        ak->shape[2] > KVS_MAX_KV_HEADS || ak->shape[3] > KVS_MAX_HEAD_DIM ||
        aq->shape[2] > UINT32_MAX) {
        rc = kvs_err_set(err, KVS_EINVAL, "%s: layout beyond the namespace limits", path);
        goto out;
    }
    s->layers = (uint32_t)ak->shape[0];
    s->tokens = (uint32_t)ak->shape[1];
    s->kv_heads = (uint32_t)ak->shape[2];
    s->head_dim = (uint32_t)ak->shape[3];
    s->q_heads = (uint32_t)aq->shape[2];
    if (max_tokens && max_tokens < s->tokens)
        s->tokens = max_tokens;
    if (!s->have_theta)
        s->rope_theta = 10000.0;
    if ((rc = load_array(s, buf, size, ak, s->tokens, &s->k, err)) ||
        (rc = load_array(s, buf, size, av, s->tokens, &s->v, err)) ||
        (rc = load_array(s, buf, size, aq, s->tokens, &s->q, err)) ||
        (ap && (rc = load_array(s, buf, size, ap, s->tokens, &s->k_pre, err))))
        goto out;
out:
    free(buf);
    if (rc) {
        char keep[sizeof s->path];
        memcpy(keep, s->path, sizeof keep);
        sample_free(s);
        memcpy(s->path, keep, sizeof keep);
    }
    return rc;
}

/* ---------------------------------------------------------------- math */

static double *to_double(const uint16_t *h, size_t n)
{
    double *d = kvs_xmalloc(n * sizeof *d);
    for (size_t i = 0; i < n; i++)
        d[i] = kvs_fp16_to_f32(h[i]);
    return d;
}

/* RoPE, rotate-half: pairs (i, i + D/2), angle pos * theta^(-2i/D), in place on
 * x [L][n][H][D] with positions 0..n-1 (shared/data/README.md). */
static void rope_apply(double *x, uint32_t L, uint32_t n, uint32_t H, uint32_t D, double theta)
{
    uint32_t half = D / 2;
    double *inv = kvs_xmalloc(half * sizeof *inv);
    for (uint32_t i = 0; i < half; i++)
        inv[i] = pow(theta, -2.0 * i / D);
    for (uint32_t pos = 0; pos < n; pos++)
        for (uint32_t i = 0; i < half; i++) {
            double c = cos(pos * inv[i]), s = sin(pos * inv[i]);
            for (uint32_t l = 0; l < L; l++)
                for (uint32_t h = 0; h < H; h++) {
                    double *v = x + (((size_t)l * n + pos) * H + h) * D;
                    double a = v[i], b = v[i + half];
                    v[i] = a * c - b * s;
                    v[i + half] = b * c + a * s;
                }
        }
    free(inv);
}

static double dot(const double *a, const double *b, uint32_t n)
{
    /* Four partial sums: the loop is latency-bound otherwise. */
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    uint32_t i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += a[i] * b[i];
        s1 += a[i + 1] * b[i + 1];
        s2 += a[i + 2] * b[i + 2];
        s3 += a[i + 3] * b[i + 3];
    }
    for (; i < n; i++)
        s0 += a[i] * b[i];
    return (s0 + s1) + (s2 + s3);
}

/* Sum of squared differences and of squared references of layer l ([L][per] arrays). */
static void layer_sq(const double *ref, const double *got, size_t per, uint32_t l, double *diff,
                     double *norm)
{
    double d = 0, r = 0;
    for (size_t i = (size_t)l * per; i < (size_t)(l + 1) * per; i++) {
        double e = got[i] - ref[i];
        d += e * e;
        r += ref[i] * ref[i];
    }
    *diff = d;
    *norm = r;
}

typedef struct fullkv {
    double *k, *v, *q; /* [L][n][H][D], q [L][n][Hq][D] */
} fullkv;

/* Causal attention of layer l for reference (k, v) and decoded (kh, vh) together; sets
 * the relative logit and output errors over all query heads. */
static void attention_layer(const sample *s, const fullkv *ref, const double *kh, const double *vh,
                            uint32_t l, double *logit_rel, double *out_rel)
{
    uint32_t n = s->tokens, H = s->kv_heads, Hq = s->q_heads, D = s->head_dim;
    uint32_t gq = Hq / H;
    double scale = 1.0 / sqrt((double)D);
    double *sr = kvs_xmalloc(n * sizeof *sr), *sh = kvs_xmalloc(n * sizeof *sh);
    double *orf = kvs_xmalloc(D * sizeof *orf), *oh = kvs_xmalloc(D * sizeof *oh);
    double ld = 0, ln = 0, od = 0, on = 0;
    for (uint32_t h = 0; h < Hq; h++) {
        uint32_t g = h / gq;
        for (uint32_t i = 0; i < n; i++) {
            const double *q = ref->q + (((size_t)l * n + i) * Hq + h) * D;
            double mr = -INFINITY, mh = -INFINITY;
            for (uint32_t j = 0; j <= i; j++) {
                size_t at = (((size_t)l * n + j) * H + g) * D;
                sr[j] = dot(q, ref->k + at, D);
                sh[j] = dot(q, kh + at, D);
                double e = sh[j] - sr[j];
                ld += e * e;
                ln += sr[j] * sr[j];
                mr = sr[j] > mr ? sr[j] : mr;
                mh = sh[j] > mh ? sh[j] : mh;
            }
            double zr = 0, zh = 0;
            for (uint32_t j = 0; j <= i; j++) {
                sr[j] = exp((sr[j] - mr) * scale);
                sh[j] = exp((sh[j] - mh) * scale);
                zr += sr[j];
                zh += sh[j];
            }
            memset(orf, 0, D * sizeof *orf);
            memset(oh, 0, D * sizeof *oh);
            for (uint32_t j = 0; j <= i; j++) {
                size_t at = (((size_t)l * n + j) * H + g) * D;
                double pr = sr[j] / zr, ph = sh[j] / zh;
                for (uint32_t d = 0; d < D; d++) {
                    orf[d] += pr * ref->v[at + d];
                    oh[d] += ph * vh[at + d];
                }
            }
            for (uint32_t d = 0; d < D; d++) {
                double e = oh[d] - orf[d];
                od += e * e;
                on += orf[d] * orf[d];
            }
        }
    }
    *logit_rel = ln > 0 ? sqrt(ld / ln) : 0;
    *out_rel = on > 0 ? sqrt(od / on) : 0;
    free(sr);
    free(sh);
    free(orf);
    free(oh);
}

/* ---------------------------------------------------------------- one codec */

typedef struct result {
    char name[KVS_CODEC_NAME_MAX + 1];
    bool pre_rope;
    char keys_note[1200]; /* what the keys were and where codec state came from */
    size_t enc_bytes, prefix_bytes, state_bytes;
    uint64_t elems; /* 2 L n H D */
    double bits, ratio;
    double k_rel, v_rel;       /* whole file */
    double k_rel_lm, v_rel_lm; /* mean over layers of the per-layer error */
    double logit_lm, out_lm;   /* mean over layers */
    double *layer;             /* [L][4]: k, v, logit, out per layer (owned) */
    double enc_mbps, dec_mbps;
    uint32_t blocks;
} result;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static bool starts_with(const char *s, const char *p)
{
    return strncmp(s, p, strlen(p)) == 0;
}

/* Builds the key codec's state (RotateKV permutation, SQuat queries) into *state
 * (malloc'd, or NULL for none) and describes it in r->keys_note. */
static int key_state(const sample *s, const sample *calib, const kvs_ns_spec *spec, result *r,
                     void **state, size_t *len, kvs_err *err)
{
    *state = NULL;
    *len = 0;
    if (starts_with(r->name, "rotatekv-")) {
        const char *what = r->pre_rope ? "pre-RoPE keys, RoPE re-applied after decode"
                                       : "post-RoPE keys (RotateKV off its design point)";
#ifdef HAVE_ROTATEKV_CALIB
        const uint16_t *ck = r->pre_rope ? calib->k_pre : calib->k;
        if (!ck)
            return kvs_err_set(err, KVS_EINVAL, "%s: no k_pre_rope to calibrate on", calib->path);
        if (calib->layers != s->layers || calib->kv_heads != s->kv_heads ||
            calib->head_dim != s->head_dim)
            return kvs_err_set(err, KVS_EINVAL, "%s: layout differs from %s", calib->path, s->path);
        int rc = kvs_rotatekv_calibrate(spec, ck, calib->tokens, state, len, err);
        if (rc)
            return rc;
        snprintf(r->keys_note, sizeof r->keys_note,
                 "%s; permutation calibrated on %s's %s (%u tokens)%s", what, calib->path,
                 r->pre_rope ? "k_pre_rope" : "k", calib->tokens,
                 strcmp(calib->path, s->path) == 0 ? ", the evaluated file itself (in-sample)"
                                                   : "");
#else
        snprintf(r->keys_note, sizeof r->keys_note,
                 "%s; identity permutation (this build "
                 "has no kvs_rotatekv_calibrate)",
                 what);
#endif
        return 0;
    }
    if (starts_with(r->name, "squat-")) {
#ifdef HAVE_SQUAT_STATE
        int rc = kvs_squat_state_from_queries(spec, s->q_heads, s->q, s->tokens, state, len, err);
        if (rc)
            return rc;
        snprintf(r->keys_note, sizeof r->keys_note,
                 "post-RoPE keys; query subspace from this file's own post-RoPE q (%u rows per "
                 "kv-head: the method, SQuat builds it from the prompt's queries; not tuning)",
                 s->tokens * (s->q_heads / s->kv_heads));
#else
        snprintf(r->keys_note, sizeof r->keys_note,
                 "post-RoPE keys; NO query state (this "
                 "build has no kvs_squat_state_from_queries): encodes as KIVI");
#endif
        return 0;
    }
    snprintf(r->keys_note, sizeof r->keys_note, "post-RoPE keys");
    return 0;
}

static int run_codec(const sample *s, const sample *calib, const fullkv *ref, uint32_t T,
                     bool rotatekv_post_rope, result *r, kvs_err *err)
{
    uint32_t L = s->layers, n = s->tokens, H = s->kv_heads, D = s->head_dim;
    size_t row = (size_t)H * D;
    kvs_ns_spec spec = {
        .layers = L,
        .kv_heads = H,
        .head_dim = D,
        .block_tokens = T,
        .dtype = KVS_DTYPE_FP16,
        .seed = 1,
    };
    snprintf(spec.name, sizeof spec.name, "quality");
    snprintf(spec.key_codec, sizeof spec.key_codec, "%s", r->name);
    snprintf(spec.value_codec, sizeof spec.value_codec, "%s", r->name);
    r->pre_rope = starts_with(r->name, "rotatekv-") && s->k_pre && !rotatekv_post_rope;
    spec.keys_pre_rope = r->pre_rope;
    int rc = kvs_spec_validate(&spec, err);
    if (rc)
        return rc;

    void *st = NULL;
    size_t st_len = 0;
    kvs_codec *ck = NULL, *cv = NULL;
    uint16_t *raw = NULL, *dec = NULL;
    uint8_t *enc = NULL;
    size_t *enc_off = NULL, *enc_len = NULL;
    double *kh = NULL, *vh = NULL;
    if ((rc = key_state(s, calib, &spec, r, &st, &st_len, err)))
        goto out;
    r->state_bytes = st_len;
    kvs_codec_state state = {1, st, st_len};
    if ((rc = kvs_codec_create(&spec, KVS_KEYS, st ? &state : NULL, &ck, err)) ||
        (rc = kvs_codec_create(&spec, KVS_VALUES, NULL, &cv, err)))
        goto out;

    /* Raw blocks, back to back: block b covers tokens [b T, b T + t). */
    uint32_t nb = (n + T - 1) / T;
    r->blocks = nb;
    r->elems = 2ull * L * n * row;
    raw = kvs_xmalloc(r->elems * sizeof *raw);
    dec = kvs_xmalloc(r->elems * sizeof *dec);
    enc_off = kvs_xmalloc(nb * sizeof *enc_off);
    enc_len = kvs_xmalloc(nb * sizeof *enc_len);
    const uint16_t *keys = r->pre_rope ? s->k_pre : s->k;
    size_t cap = 0;
    for (uint32_t b = 0; b < nb; b++) {
        uint32_t t0 = b * T, t = n - t0 < T ? n - t0 : T;
        uint16_t *blk = raw + 2 * (size_t)L * t0 * row;
        for (uint32_t l = 0; l < L; l++) {
            memcpy(blk + (2 * (size_t)l) * t * row, keys + ((size_t)l * n + t0) * row,
                   t * row * sizeof *blk);
            memcpy(blk + (2 * (size_t)l + 1) * t * row, s->v + ((size_t)l * n + t0) * row,
                   t * row * sizeof *blk);
        }
        enc_off[b] = cap;
        cap += kvs_block_encoded_max(ck, cv, t);
    }
    enc = kvs_xmalloc(cap);

    double best_enc = INFINITY, best_dec = INFINITY;
    for (int rep = 0; rep < REPS; rep++) {
        double t_0 = now_s();
        for (uint32_t b = 0; b < nb && rc == 0; b++) {
            uint32_t t0 = b * T, t = n - t0 < T ? n - t0 : T;
            size_t room = (b + 1 < nb ? enc_off[b + 1] : cap) - enc_off[b];
            rc = kvs_block_encode(ck, cv, 1, t, raw + 2 * (size_t)L * t0 * row, enc + enc_off[b],
                                  room, &enc_len[b], err);
            if (rc)
                kvs_err_prefix(err, "block %u (tokens %u..%u): encode", b, t0, t0 + t);
        }
        double t_1 = now_s();
        if (rc)
            goto out;
        best_enc = t_1 - t_0 < best_enc ? t_1 - t_0 : best_enc;
    }
    for (int rep = 0; rep < REPS; rep++) {
        double t_0 = now_s();
        for (uint32_t b = 0; b < nb && rc == 0; b++) {
            uint32_t t0 = b * T;
            rc = kvs_block_decode(ck, cv, enc + enc_off[b], enc_len[b], 0, L,
                                  dec + 2 * (size_t)L * t0 * row, err);
            if (rc)
                kvs_err_prefix(err, "block %u: decode", b);
        }
        double t_1 = now_s();
        if (rc)
            goto out;
        best_dec = t_1 - t_0 < best_dec ? t_1 - t_0 : best_dec;
    }
    double mb = (double)r->elems * 2 / 1e6;
    r->enc_mbps = best_enc > 0 ? mb / best_enc : INFINITY;
    r->dec_mbps = best_dec > 0 ? mb / best_dec : INFINITY;
    r->enc_bytes = 0;
    for (uint32_t b = 0; b < nb; b++)
        r->enc_bytes += enc_len[b];
    r->prefix_bytes = (size_t)nb * kvs_format_prefix_bytes(L);
    r->bits = (double)r->enc_bytes * 8 / (double)r->elems;
    r->ratio = 16 / r->bits;

    if (kvs_codec_id_of(ck) == KVS_CODEC_NONE && memcmp(raw, dec, r->elems * sizeof *raw) != 0) {
        rc = kvs_err_set(err, KVS_EINTERNAL,
                         "self-check: 'none' did not round-trip bit for "
                         "bit");
        goto out;
    }

    /* Back to whole-file [L][n][H][D]. */
    kh = kvs_xmalloc((size_t)L * n * row * sizeof *kh);
    vh = kvs_xmalloc((size_t)L * n * row * sizeof *vh);
    for (uint32_t b = 0; b < nb; b++) {
        uint32_t t0 = b * T, t = n - t0 < T ? n - t0 : T;
        const uint16_t *blk = dec + 2 * (size_t)L * t0 * row;
        for (uint32_t l = 0; l < L; l++) {
            const uint16_t *pk = blk + (2 * (size_t)l) * t * row;
            const uint16_t *pv = blk + (2 * (size_t)l + 1) * t * row;
            size_t at = ((size_t)l * n + t0) * row;
            for (size_t i = 0; i < t * row; i++) {
                kh[at + i] = kvs_fp16_to_f32(pk[i]);
                vh[at + i] = kvs_fp16_to_f32(pv[i]);
            }
        }
    }
    if (r->pre_rope)
        rope_apply(kh, L, n, H, D, s->rope_theta);

    size_t per = (size_t)n * row;
    double kd = 0, kn = 0, vd = 0, vn = 0;
    r->layer = kvs_xcalloc((size_t)L * 4, sizeof *r->layer);
    r->k_rel_lm = r->v_rel_lm = r->logit_lm = r->out_lm = 0;
    for (uint32_t l = 0; l < L; l++) {
        double d, nn;
        double *lr = r->layer + 4 * (size_t)l;
        layer_sq(ref->k, kh, per, l, &d, &nn);
        kd += d;
        kn += nn;
        lr[0] = nn > 0 ? sqrt(d / nn) : 0;
        layer_sq(ref->v, vh, per, l, &d, &nn);
        vd += d;
        vn += nn;
        lr[1] = nn > 0 ? sqrt(d / nn) : 0;
        attention_layer(s, ref, kh, vh, l, &lr[2], &lr[3]);
        r->k_rel_lm += lr[0] / L;
        r->v_rel_lm += lr[1] / L;
        r->logit_lm += lr[2] / L;
        r->out_lm += lr[3] / L;
    }
    r->k_rel = kn > 0 ? sqrt(kd / kn) : 0;
    r->v_rel = vn > 0 ? sqrt(vd / vn) : 0;
    if (kvs_codec_id_of(ck) == KVS_CODEC_NONE &&
        (r->k_rel != 0 || r->v_rel != 0 || r->logit_lm != 0 || r->out_lm != 0))
        rc = kvs_err_set(err, KVS_EINTERNAL, "self-check: 'none' reports a non-zero error");
out:
    free(st);
    kvs_codec_destroy(ck);
    kvs_codec_destroy(cv);
    free(raw);
    free(dec);
    free(enc);
    free(enc_off);
    free(enc_len);
    free(kh);
    free(vh);
    return rc;
}

/* ---------------------------------------------------------------- output */

static void json_str(FILE *f, const char *s)
{
    fputc('"', f);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            fprintf(f, "\\%c", c);
        else if (c < 0x20)
            fprintf(f, "\\u%04x", c);
        else
            fputc(c, f);
    }
    fputc('"', f);
}

static void json_num(FILE *f, double v)
{
    if (isfinite(v))
        fprintf(f, "%.6g", v);
    else
        fputs("null", f);
}

/* Where the default calibration sample is: FILE's name with its last "-a"/"-b" (followed
 * by '.' or '-') swapped, if that file exists; else FILE itself. */
static void default_calib(const char *file, char *out, size_t cap)
{
    snprintf(out, cap, "%s", file);
    char *base = strrchr(out, '/');
    base = base ? base + 1 : out;
    char *hit = NULL;
    for (char *p = base; (p = strchr(p, '-')) != NULL; p++)
        if ((p[1] == 'a' || p[1] == 'b') && (p[2] == '.' || p[2] == '-'))
            hit = p;
    if (hit) {
        hit[1] = hit[1] == 'a' ? 'b' : 'a';
        FILE *f = fopen(out, "rb");
        if (f) {
            fclose(f);
            return;
        }
    }
    snprintf(out, cap, "%s", file);
}

static void usage(FILE *f)
{
    char names[256];
    fprintf(f,
            "usage: kvs-quality FILE [--codec NAME ...] [--block-tokens T] [--calib FILE2]\n"
            "                   [--tokens N] [--rotatekv-post-rope] [--per-layer] [--json]\n"
            "  FILE            kvsample/1 file (k, k_pre_rope, v, q)\n"
            "  --codec NAME    codec for keys and values; repeat or comma-separate\n"
            "                  (default: all of %s)\n"
            "  --block-tokens  block size T in tokens (default 16; 512 = whole prompt)\n"
            "  --calib FILE2   sample whose k_pre_rope calibrates RotateKV's permutation\n"
            "                  (default: FILE with -a/-b swapped if it exists, else FILE)\n"
            "  --tokens N      use the first N tokens only\n"
            "  --rotatekv-post-rope  feed RotateKV post-RoPE keys (calibrated on post-RoPE\n"
            "                  keys) instead of k_pre_rope, to measure the difference\n"
            "  --per-layer     also print per-layer errors\n"
            "  --json          machine-readable output\n",
            kvs_codec_names(names, sizeof names));
}

static bool parse_u32(const char *s, uint32_t lo, uint32_t hi, uint32_t *out)
{
    char *e;
    errno = 0;
    unsigned long v = strtoul(s, &e, 10);
    if (!*s || *e || errno || v < lo || v > hi || s[0] == '-')
        return false;
    *out = (uint32_t)v;
    return true;
}

static int add_codecs(const char *list, char names[][KVS_CODEC_NAME_MAX + 1], size_t *count)
{
    char buf[512];
    snprintf(buf, sizeof buf, "%s", list);
    for (char *save = NULL, *tok = strtok_r(buf, ", ", &save); tok;
         tok = strtok_r(NULL, ", ", &save)) {
        if (!kvs_codec_lookup(tok, NULL, NULL)) {
            char avail[256];
            fprintf(stderr, "kvs-quality: unknown or unavailable codec '%s' (available: %s)\n", tok,
                    kvs_codec_names(avail, sizeof avail));
            return -1;
        }
        if (*count == MAX_CODECS) {
            fprintf(stderr, "kvs-quality: more than %d codecs\n", MAX_CODECS);
            return -1;
        }
        snprintf(names[(*count)++], KVS_CODEC_NAME_MAX + 1, "%s", tok);
    }
    return 0;
}

static void print_table(const sample *s, const result *res, size_t n, bool per_layer)
{
    printf("| codec | bits/elt | ratio | K rel | V rel | logits | attn out | K rel (file) "
           "| V rel (file) | enc MB/s | dec MB/s |\n");
    printf("|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (size_t i = 0; i < n; i++) {
        const result *r = &res[i];
        printf("| %s | %.3f | %.2fx | %.4f | %.4f | %.4f | %.4f | %.4f | %.4f | %.0f | %.0f |\n",
               r->name, r->bits, r->ratio, r->k_rel_lm, r->v_rel_lm, r->logit_lm, r->out_lm,
               r->k_rel, r->v_rel, r->enc_mbps, r->dec_mbps);
    }
    printf("\n");
    for (size_t i = 0; i < n; i++) {
        const result *r = &res[i];
        printf("%s: %s; %u blocks, %zu encoded bytes (%zu of block headers and tables)", r->name,
               r->keys_note, r->blocks, r->enc_bytes, r->prefix_bytes);
        if (r->state_bytes)
            printf("; key codec state %zu bytes (namespace state, not in bits/elt; %.3f "
                   "bits/elt if amortized over this sample alone)",
                   r->state_bytes, (double)r->state_bytes * 8 / (double)r->elems);
        printf("\n");
    }
    if (!per_layer)
        return;
    printf("\n| codec | layer | K rel | V rel | logits | attn out |\n|---|---|---|---|---|---|\n");
    for (size_t i = 0; i < n; i++)
        for (uint32_t l = 0; l < s->layers; l++) {
            const double *lr = res[i].layer + 4 * (size_t)l;
            printf("| %s | %u | %.4f | %.4f | %.4f | %.4f |\n", res[i].name, l, lr[0], lr[1], lr[2],
                   lr[3]);
        }
}

static void print_json(const sample *s, const char *calib, double rope_check, uint32_t T,
                       const result *res, size_t n)
{
    printf("{\"file\": ");
    json_str(stdout, s->path);
    printf(", \"calib\": ");
    json_str(stdout, calib);
    printf(", \"layers\": %u, \"tokens\": %u, \"kv_heads\": %u, \"q_heads\": %u, "
           "\"head_dim\": %u, \"block_tokens\": %u, \"rope_theta\": ",
           s->layers, s->tokens, s->kv_heads, s->q_heads, s->head_dim, T);
    json_num(stdout, s->rope_theta);
    printf(", \"rope_check\": ");
    json_num(stdout, rope_check);
    printf(", \"codecs\": [");
    for (size_t i = 0; i < n; i++) {
        const result *r = &res[i];
        printf("%s\n  {\"name\": ", i ? "," : "");
        json_str(stdout, r->name);
        printf(", \"keys\": ");
        json_str(stdout, r->keys_note);
        printf(", \"keys_pre_rope\": %s, \"blocks\": %u, \"encoded_bytes\": %zu, "
               "\"header_bytes\": %zu, \"state_bytes\": %zu, \"elements\": %llu",
               r->pre_rope ? "true" : "false", r->blocks, r->enc_bytes, r->prefix_bytes,
               r->state_bytes, (unsigned long long)r->elems);
        const char *k[] = {"bits_per_element", "ratio",      "k_rel",     "v_rel",
                           "k_rel_file",       "v_rel_file", "logit_rel", "attn_out_rel",
                           "encode_mb_s",      "decode_mb_s"};
        double v[] = {r->bits,  r->ratio,    r->k_rel_lm, r->v_rel_lm, r->k_rel,
                      r->v_rel, r->logit_lm, r->out_lm,   r->enc_mbps, r->dec_mbps};
        for (size_t j = 0; j < sizeof v / sizeof v[0]; j++) {
            printf(", \"%s\": ", k[j]);
            json_num(stdout, v[j]);
        }
        printf(", \"per_layer\": [");
        for (uint32_t l = 0; l < s->layers; l++) {
            const double *lr = r->layer + 4 * (size_t)l;
            printf("%s{\"k_rel\": ", l ? ", " : "");
            json_num(stdout, lr[0]);
            printf(", \"v_rel\": ");
            json_num(stdout, lr[1]);
            printf(", \"logit_rel\": ");
            json_num(stdout, lr[2]);
            printf(", \"attn_out_rel\": ");
            json_num(stdout, lr[3]);
            printf("}");
        }
        printf("]}");
    }
    printf("\n]}\n");
}

int main(int argc, char **argv)
{
    const char *file = NULL, *calib_arg = NULL;
    uint32_t T = 16, max_tokens = 0;
    bool json = false, per_layer = false, rotatekv_post_rope = false;
    static char names[MAX_CODECS][KVS_CODEC_NAME_MAX + 1];
    size_t ncodecs = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        bool more = i + 1 < argc;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage(stdout);
            return 0;
        } else if (strcmp(a, "--json") == 0) {
            json = true;
        } else if (strcmp(a, "--per-layer") == 0) {
            per_layer = true;
        } else if (strcmp(a, "--rotatekv-post-rope") == 0) {
            rotatekv_post_rope = true;
        } else if (strcmp(a, "--codec") == 0 && more) {
            if (add_codecs(argv[++i], names, &ncodecs))
                return 2;
        } else if (strcmp(a, "--block-tokens") == 0 && more) {
            if (!parse_u32(argv[++i], 1, KVS_MAX_BLOCK_TOKENS, &T)) {
                fprintf(stderr, "kvs-quality: --block-tokens: 1..%d\n", KVS_MAX_BLOCK_TOKENS);
                return 2;
            }
        } else if (strcmp(a, "--tokens") == 0 && more) {
            if (!parse_u32(argv[++i], 1, UINT32_MAX, &max_tokens)) {
                fprintf(stderr, "kvs-quality: --tokens: a positive count\n");
                return 2;
            }
        } else if (strcmp(a, "--calib") == 0 && more) {
            calib_arg = argv[++i];
        } else if (a[0] != '-' && !file) {
            file = a;
        } else {
            fprintf(stderr, "kvs-quality: unexpected argument '%s'\n", a);
            usage(stderr);
            return 2;
        }
    }
    if (!file) {
        usage(stderr);
        return 2;
    }
    if (ncodecs == 0) {
        char all[512];
        if (add_codecs(kvs_codec_names(all, sizeof all), names, &ncodecs))
            return 2;
    }

    kvs_err err = {0};
    sample s, cal;
    memset(&cal, 0, sizeof cal);
    if (sample_load(file, max_tokens, &s, &err)) {
        fprintf(stderr, "kvs-quality: %s\n", err.msg);
        return 2;
    }
    char calib_path[1024];
    if (calib_arg)
        snprintf(calib_path, sizeof calib_path, "%s", calib_arg);
    else
        default_calib(file, calib_path, sizeof calib_path);
    const sample *calib = &s;
    bool need_calib = false;
    for (size_t i = 0; i < ncodecs; i++)
        need_calib |= starts_with(names[i], "rotatekv-");
    if (need_calib && strcmp(calib_path, file) != 0) {
        if (sample_load(calib_path, 0, &cal, &err)) {
            fprintf(stderr, "kvs-quality: calibration sample: %s\n", err.msg);
            sample_free(&s);
            return 2;
        }
        calib = &cal;
    }

    size_t elems = (size_t)s.layers * s.tokens * s.kv_heads * s.head_dim;
    fullkv ref = {to_double(s.k, elems), to_double(s.v, elems),
                  to_double(s.q, (size_t)s.layers * s.tokens * s.q_heads * s.head_dim)};
    /* RoPE convention check: rope(k_pre_rope) against the file's k (fp16 rounding only). */
    double rope_check = NAN;
    if (s.k_pre) {
        double *kr = to_double(s.k_pre, elems);
        rope_apply(kr, s.layers, s.tokens, s.kv_heads, s.head_dim, s.rope_theta);
        double d = 0, nn = 0;
        for (size_t i = 0; i < elems; i++) {
            d += (kr[i] - ref.k[i]) * (kr[i] - ref.k[i]);
            nn += ref.k[i] * ref.k[i];
        }
        rope_check = nn > 0 ? sqrt(d / nn) : 0;
        free(kr);
        if (rope_check > 1e-2)
            fprintf(stderr,
                    "kvs-quality: warning: RoPE(k_pre_rope) differs from k by %.3g "
                    "(relative): the RoPE convention does not match this file\n",
                    rope_check);
    }

    result *res = kvs_xcalloc(ncodecs, sizeof *res);
    int status = 0;
    size_t done = 0;
    for (size_t i = 0; i < ncodecs; i++) {
        result *r = &res[done];
        snprintf(r->name, sizeof r->name, "%s", names[i]);
        kvs_err_clear(&err);
        if (run_codec(&s, calib, &ref, T, rotatekv_post_rope, r, &err)) {
            fprintf(stderr, "kvs-quality: %s: %s\n", names[i], err.msg);
            free(r->layer);
            memset(r, 0, sizeof *r);
            status = 1;
            continue;
        }
        done++;
    }

    if (json) {
        print_json(&s, need_calib ? calib->path : "", rope_check, T, res, done);
    } else {
        printf("kvs-quality %s: L=%u n=%u H=%u Hq=%u D=%u, fp16, seed 1, block_tokens %u "
               "(%u blocks)\n",
               s.path, s.layers, s.tokens, s.kv_heads, s.q_heads, s.head_dim, T,
               (s.tokens + T - 1) / T);
        if (s.k_pre)
            printf("RoPE check (rotate-half, theta %g): ||rope(k_pre_rope) - k|| / ||k|| = "
                   "%.2e\n",
                   s.rope_theta, rope_check);
        printf("errors: mean over layers of per-layer relative L2 error (\"file\": over the "
               "whole file); logits and attn out: causal, all %u query heads, reference in "
               "double; MB/s: fp16 input, best of %d, one thread\n\n",
               s.q_heads, REPS);
        print_table(&s, res, done, per_layer);
    }

    for (size_t i = 0; i < ncodecs; i++)
        free(res[i].layer);
    free(res);
    free(ref.k);
    free(ref.v);
    free(ref.q);
    sample_free(&s);
    sample_free(&cal);
    return status;
}
