/* CUDA encode of `squat-2`, `squat-4` keys (codec_squat.c is the reference: key encode of
 * quantizers-reference.md §4.3; kernel sketch §4.8, §9.3). Batch contract: gpu/codec_cuda.h.
 * Decode, value encode and the encode of keys without a query subspace (state version 0,
 * or no head with one) are KIVI's launchers (codec_kivi.cu): the bytes are KIVI bytes and
 * the KIVI kernels read their geometry from the codec's spec, bits and kv only.
 *
 * Supported: what KIVI supports (head_dim 64, 128, 256; fp16 and bf16; any t up to
 * block_tokens), bits 2 and 4, and compensation matrices whose entries are finite with
 * |C| <= 1e20 (cuda_prepare says KVS_ENOTSUP otherwise; real states have |C| of order 1).
 * That bound keeps every value of an accepted group finite (|d| <= ~2e6 for groups whose
 * fp16 parameters fit, so |acc| stays below ~1e29), and all-finite IEEE arithmetic with
 * the same operations in the same order rounds the same on both sides: the codes are the
 * reference's byte for byte. Beyond it a NaN could appear, and the sign of a generated
 * NaN differs between x86 and the GPU.
 *
 * Thread mapping: one CTA of 128 threads per (section, token group of G <= 32 tokens,
 * kv-head), the group's n x D keys in shared memory as fp32 (X, n rounded up to 8 rows,
 * the extra rows zero: 16 KiB at D = 128, n = 32). Per channel block b = 1..T (g = 64
 * channels at D >= 128, 32 at D = 64; T = D/g):
 *  - quantize: one thread per channel of B_b scans the group in token order (the
 *    reference's min/max, first of equal values wins), computes the fp16 parameters and
 *    codes with the gpu/codec/quant.h functions, packs the codes LSB first (gpu/bitpack.h order:
 *    b divides 32, so a code never straddles a word) and writes the code bytes and the
 *    (scale, lo) word; if a compensation follows it replaces x by d = x^ - x in X;
 *  - compensate (b < T, heads with a subspace): thread item (r, 8 tokens) over the
 *    |R| = D - b*g later channels: acc = 0, then for k = 0..g-1 in order
 *    acc = acc + C_b[r][k] * d[k] (__fmul_rn, __fadd_rn: never fused), then x_r += acc.
 *    A warp covers 32 consecutive r of one token set: C_b is stored transposed on the
 *    device (C_b^T[k][r], the same fp32 values), so each k is one coalesced 128-byte read
 *    from L1/L2, and d[token][k..k+3] is one broadcast 16-byte shared-memory read.
 * Heads without a subspace skip the compensation (not a multiply by zero: x + 0 would
 * turn -0 into +0), exactly as the reference does.
 *
 * Cost (what bounds it): the compensation is g*|R| multiply-adds per token and head, two
 * unfused fp32 instructions each: per key element 16 multiply-adds at D = 64, 32 at
 * D = 128, 96 at D = 256 (T = 4); every code then costs ~25 instructions more (an IEEE
 * division, clamp, rint, decode, pack). Bit-exactness with the reference rules out FMA and tensor
 * cores, so the encode is bound by fp32 instruction issue, not by memory: at D = 128,
 * t = 16 a CTA issues ~5k warp-instructions of compensation (16 global loads of C and 32
 * shared 16-byte loads per 256 fp32 instructions), ~2.2k of quantization and ~0.5k of
 * loading, for 4 KiB of input and 1 KiB of output. A batch of 4096 blocks of L = 32,
 * H = 8, t = 16 (1M CTAs) is ~8e9 warp-instructions: ~9 ms at the H100's full issue
 * rate (132 SMs x 4 per clock, ~1.75 GHz), against ~0.11 ms to move its 268 MB in and
 * 67 MB out (squat-2; 101 MB for squat-4) at HBM speed: ~80x the copy floor. C_b is read
 * from L1/L2 (16 KiB per head at D = 128, shared by every section of the layer; 16-32
 * KiB per CTA, 2-4 TB/s of L2 reads at that rate, within what L2 serves). 64 registers,
 * no local memory: 8 CTAs (32 warps) per SM.
 *
 * Tables: cuda_prepare copies every C_b^T of the heads with a subspace (the fp32 values
 * the reference computed at init, kvs_squat_compensation) and a slot per (layer, head)
 * into one managed allocation, advised read-mostly. Managed because the engine prepares a
 * codec once and may run it on several GPUs (one thread per GPU): each GPU gets its own
 * read-only copy on first touch, and no context is created on a GPU that never runs it.
 *
 * `bad` (encode): the flat index over n*t*H*D of any NaN/Inf input (atomicMin), as the
 * KIVI kernels report it. A group whose fp16 parameters overflow (finite input: bf16
 * beyond +-65504, or values the compensation pushed out of range; the reference rejects
 * the section with KVS_EINVAL "range beyond the fp16 group parameters") is reported at
 * the group's first element (token group start, head, channel), as KIVI does. A CTA
 * holding a NaN/Inf input reports only its non-finite elements: the compensation spreads
 * the NaN into other channels, whose groups must not mask the input's index. A section
 * whose layer entry is out of range is reported at its first element. Flagged sections
 * hold unspecified bytes; re-encoding them on the CPU gives the exact error.
 */
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "gpu/codec/codec_kivi.h"
#include "gpu/codec/codec_squat.h" /* a C header without its own extern "C" block */
}
#include "gpu/base/cuda_try.h"
#include "gpu/codec/cuda_util.cuh"
#include "gpu/codec/half.h"
#include "gpu/codec/quant.h"

#define SQ_THREADS 128
#define SQ_TPT 8                /* tokens of one compensation item */
#define SQ_MAX_CTAS 0x7FFFFFFFu /* grid.x limit; larger batches are split */
#define SQ_NONE 0xFFFFFFFFu     /* slot of a head without a subspace */
#define SQ_C_LIMIT 1e20f        /* |C| beyond this: no kernels (header) */

/* Channel block size of kvs_squat_blocks for the head_dims with kernels. */
static constexpr __host__ __device__ int sq_block(int d)
{
    return d >= 128 ? 64 : d / 2;
}

/* Device tables (KVS__CUDA_TAB(c): the current device's). */
typedef struct squat_cuda {
    uint32_t active; /* heads with a subspace; 0: every launch is KIVI's */
    size_t per_head; /* floats of one head's C_1^T .. C_{T-1}^T */
    void *mem;       /* managed: slot[L*H] (padded to 16 bytes), then the C^T floats */
    const uint32_t *slot;
    const float *C;
} squat_cuda;

/* ---------------------------------------------------------------- helpers */

/* ---------------------------------------------------------------- kernel */

typedef struct squat_args {
    const uint16_t *raw;   /* this launch's first section */
    uint8_t *enc_out;      /* this launch's first section */
    const uint32_t *layer; /* this launch's first section's entry */
    const uint32_t *slot;  /* [L*H] */
    const float *C;        /* slot * per_head floats: C_1^T, C_2^T, ... */
    unsigned long long *bad;
    unsigned long long sec0; /* batch index of this launch's first section (for `bad`) */
    size_t stride, per_head, k_row, k_codes;
    uint32_t t, H, L, gk, nk, k_grp;
    kdiv dsec, dh; /* by nk*H (CTAs of a section) and by H */
} squat_args;

/* One CTA per (section, token group, head); GT >= gk bounds the group's tokens at
 * compile time (16 when gk <= 16), so the packed code words stay in registers. */
template <int D, unsigned B, bool BF16, int GT>
static __global__ void __launch_bounds__(SQ_THREADS) squat_encode_keys_kernel(squat_args a)
{
    constexpr int G = sq_block(D), T = D / G, V8 = D / 8;
    static_assert(D % G == 0 && G % 32 == 0 && G <= SQ_THREADS, "channel blocks");
    static_assert(32 % B == 0 && GT * B <= 128, "codes of a group fit 4 words");
    extern __shared__ float4 sq_smem[];
    float *X = (float *)sq_smem; /* [rows][D], rows = n rounded up to SQ_TPT */

    const uint32_t tid = threadIdx.x;
    const uint32_t sec = kdiv_q(blockIdx.x, a.dsec), rem = blockIdx.x - sec * a.dsec.d;
    const uint32_t gi = kdiv_q(rem, a.dh), h = rem - gi * a.H;
    const uint32_t tok0 = gi * a.gk, n = min(a.gk, a.t - tok0);
    const uint32_t rows = (n + SQ_TPT - 1) / SQ_TPT * SQ_TPT;
    const size_t row_elems = (size_t)a.H * D; /* one token of the section */
    const unsigned long long gsec = a.sec0 + sec;
    const unsigned long long first = (gsec * a.t + tok0) * row_elems + (size_t)h * D;

    const float *Ch = NULL;
    const uint32_t layer = a.layer[sec];
    if (layer >= a.L) {
        flag(a.bad, gsec * a.t * row_elems); /* the reference refuses the layer */
    } else {
        uint32_t slot = a.slot[(size_t)layer * a.H + h];
        if (slot != SQ_NONE)
            Ch = a.C + (size_t)slot * a.per_head;
    }

    /* Load: 8 elements (16 bytes) per item; a thread's items rise in flat index, so its
     * first non-finite element is its smallest. */
    const uint4 *src =
        (const uint4 *)(a.raw + ((size_t)sec * a.t + tok0) * row_elems + (size_t)h * D);
    unsigned long long nf_at = ~0ull;
    for (uint32_t e = tid; e < rows * V8; e += SQ_THREADS) {
        uint32_t i = e / V8, c8 = e - i * V8;
        float f[8];
        if (i < n) {
            uint4 v = src[(size_t)i * (row_elems / 8) + c8];
            uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int k = 0; k < 8; k++) {
                uint32_t u = (w[k / 2] >> (16 * (k & 1))) & 0xFFFF;
                f[k] = in_val<BF16>(u);
                if (nonfinite<BF16>(u) && nf_at == ~0ull)
                    nf_at = first + (unsigned long long)i * row_elems + c8 * 8 + k;
            }
        } else {
#pragma unroll
            for (int k = 0; k < 8; k++)
                f[k] = 0.0f;
        }
        float4 *dst = (float4 *)(X + (size_t)i * D + c8 * 8);
        dst[0] = make_float4(f[0], f[1], f[2], f[3]);
        dst[1] = make_float4(f[4], f[5], f[6], f[7]);
    }
    const bool tainted = __syncthreads_or(nf_at != ~0ull);
    if (nf_at != ~0ull)
        flag(a.bad, nf_at);

    uint8_t *base = a.enc_out + (size_t)sec * a.stride;
    const unsigned nbytes = (n * B + 7) / 8;
    const float *Cb = Ch;
#pragma unroll 1
    for (int b = 0; b < T; b++) {
        const uint32_t j0 = b * G, j1 = j0 + G;
        const bool comp = Ch && b + 1 < T; /* CTA-uniform */

        /* Quantize B_b: one thread per channel, kvs__kivi_key_group's arithmetic. */
        if (tid < (uint32_t)G) {
            const uint32_t j = j0 + tid;
            float *x = X + j;
            float mn = x[0], mx = mn;
#pragma unroll
            for (int i = 1; i < GT; i++) {
                if ((uint32_t)i < n) {
                    float v = x[i * D];
                    mn = v < mn ? v : mn;
                    mx = v > mx ? v : mx;
                }
            }
            kvs_minmax p = kvs_minmax_params(mn, mx, B);
            if (!tainted && (fp16_inf(p.scale) || fp16_inf(p.lo)))
                flag(a.bad, first + j);
            uint32_t w[4] = {0, 0, 0, 0};
#pragma unroll
            for (int i = 0; i < GT; i++) {
                if ((uint32_t)i < n) {
                    float v = x[i * D];
                    uint32_t q = (uint8_t)kvs_minmax_code(p, v, B);
                    w[i * B / 32] |= q << (i * B % 32);
                    if (comp) /* §4.3 step b: d = x^ - x */
                        x[i * D] = __fsub_rn(kvs_minmax_decode(p, q), v);
                }
            }
            size_t row = (size_t)h * D + j;
            st_bytes(base + row * a.k_row + (size_t)gi * a.k_grp, nbytes, w);
            st_u32(base + a.k_codes + (row * a.nk + gi) * 4,
                   (uint32_t)p.scale | (uint32_t)p.lo << 16);
        }
        if (!comp)
            continue;
        __syncthreads(); /* d of B_b visible */

        /* §4.3 step c: x_R += C_b d for every token, R = channels j1..D-1. */
        const uint32_t m = D - j1, items = m * (rows / SQ_TPT);
        for (uint32_t it = tid; it < items; it += SQ_THREADS) {
            const uint32_t ts = it / m, r = it - ts * m; /* ts uniform in a warp: 32 | m */
            const float *xd = X + (size_t)ts * SQ_TPT * D + j0;
            const float *cc = Cb + r;
            float acc[SQ_TPT];
#pragma unroll
            for (int u = 0; u < SQ_TPT; u++)
                acc[u] = 0.0f;
#pragma unroll 4
            for (int k = 0; k < G; k += 4) {
                float c[4];
#pragma unroll
                for (int e = 0; e < 4; e++)
                    c[e] = __ldg(cc + (size_t)(k + e) * m);
#pragma unroll
                for (int u = 0; u < SQ_TPT; u++) { /* k ascending, as the reference */
                    const float4 d = *(const float4 *)(xd + u * D + k);
                    acc[u] = __fadd_rn(acc[u], __fmul_rn(c[0], d.x));
                    acc[u] = __fadd_rn(acc[u], __fmul_rn(c[1], d.y));
                    acc[u] = __fadd_rn(acc[u], __fmul_rn(c[2], d.z));
                    acc[u] = __fadd_rn(acc[u], __fmul_rn(c[3], d.w));
                }
            }
#pragma unroll
            for (int u = 0; u < SQ_TPT; u++) {
                if (ts * SQ_TPT + u < n) {
                    float *xr = X + (size_t)(ts * SQ_TPT + u) * D + j1 + r;
                    *xr = __fadd_rn(*xr, acc[u]);
                }
            }
        }
        Cb += (size_t)G * m;
        __syncthreads(); /* compensated B_{b+1} visible */
    }
}

/* ---------------------------------------------------------------- launchers */

template <int D, unsigned B, bool BF16>
static int sq_launch(const kvs_codec *c, const squat_cuda *sc, const kvs_cuda_sections *s,
                     cudaStream_t st, kvs_err *err)
{
    kvs__kivi_geom g;
    kvs__kivi_geom_init(&g, s->t, c->spec.kv_heads, D, B);
    const uint32_t per_sec = g.nk * g.heads, chunk = SQ_MAX_CTAS / per_sec;
    const size_t sec_elems = (size_t)s->t * g.heads * D;
    const size_t smem = (size_t)(g.gk + SQ_TPT - 1) / SQ_TPT * SQ_TPT * D * sizeof(float);
    return kvs_cuda_each_launch(s, chunk, sec_elems, [&](const kvs_cuda_sections &p, uint32_t s0) {
        squat_args a;
        a.raw = p.raw;
        a.enc_out = p.enc_out;
        a.layer = p.layer;
        a.slot = sc->slot;
        a.C = sc->C;
        a.bad = s->bad;
        a.sec0 = s0;
        a.stride = s->stride;
        a.per_head = sc->per_head;
        a.k_row = g.k_row;
        a.k_codes = g.k_codes;
        a.t = s->t;
        a.H = g.heads;
        a.L = c->spec.layers;
        a.gk = g.gk;
        a.nk = g.nk;
        a.k_grp = (uint32_t)g.k_grp;
        a.dsec = kdiv_make(per_sec);
        a.dh = kdiv_make(g.heads);
        unsigned blocks = p.n * per_sec;
        if (g.gk <= 16)
            squat_encode_keys_kernel<D, B, BF16, 16><<<blocks, SQ_THREADS, smem, st>>>(a);
        else
            squat_encode_keys_kernel<D, B, BF16, 32><<<blocks, SQ_THREADS, smem, st>>>(a);
        KVS_CUDA_CHECK(cudaGetLastError(), err);
        return 0;
    });
}

template <int D>
static int sq_dispatch_bits(const kvs_codec *c, const squat_cuda *sc, const kvs_cuda_sections *s,
                            cudaStream_t st, kvs_err *err)
{
    bool bf16 = c->spec.dtype == KVS_DTYPE_BF16;
    switch (c->bits) {
    case 2:
        return bf16 ? sq_launch<D, 2, true>(c, sc, s, st, err)
                    : sq_launch<D, 2, false>(c, sc, s, st, err);
    case 4:
        return bf16 ? sq_launch<D, 4, true>(c, sc, s, st, err)
                    : sq_launch<D, 4, false>(c, sc, s, st, err);
    default:
        break;
    }
    return kvs_err_set(err, KVS_ENOTSUP, "squat: no CUDA kernels for %u bits", c->bits);
}

extern "C" bool kvs__squat_cuda_supported(const kvs_codec *c)
{
    return kvs__kivi_cuda_supported(c) && (c->bits == 2 || c->bits == 4);
}

/* The C_b of every head with a subspace, transposed (C_b^T[k][r] = C_b[r][k], the same
 * fp32 values), in one managed allocation with the slot table (see the header). */
extern "C" int kvs__squat_cuda_prepare(kvs_codec *c, kvs_err *err)
{
    squat_cuda *sc = (squat_cuda *)calloc(1, sizeof *sc);
    if (!sc)
        return kvs_err_set(err, KVS_ENOMEM, "squat: out of memory");
    if (c->kv != KVS_KEYS || kvs_squat_subspace_heads(c) == 0) {
        KVS__CUDA_TAB(c) = sc; /* KIVI launches only */
        return 0;
    }
    const uint32_t D = c->spec.head_dim, L = c->spec.layers, H = c->spec.kv_heads;
    uint32_t g, nblk;
    kvs_squat_blocks(D, &g, &nblk);
    if ((D != 64 && D != 128 && D != 256) || g != (uint32_t)sq_block((int)D) || g * nblk != D) {
        free(sc);
        return kvs_err_set(err, KVS_ENOTSUP, "squat: no CUDA kernels for head_dim %u", D);
    }
    for (uint32_t b = 0; b + 1 < nblk; b++)
        sc->per_head += (size_t)g * (D - (b + 1) * g);
    sc->active = kvs_squat_subspace_heads(c);
    const size_t heads = (size_t)L * H, slot_bytes = (heads * 4 + 15) / 16 * 16;
    const size_t bytes = slot_bytes + (size_t)sc->active * sc->per_head * sizeof(float);
    uint8_t *host = (uint8_t *)malloc(bytes);
    if (!host) {
        free(sc);
        return kvs_err_set(err, KVS_ENOMEM, "squat: out of memory for %zu bytes of tables", bytes);
    }
    memset(host, 0, slot_bytes);
    uint32_t *slot = (uint32_t *)host, next = 0;
    float *Ct = (float *)(host + slot_bytes);
    int rc = 0;
    for (size_t lh = 0; lh < heads && rc == 0; lh++) {
        uint32_t l = (uint32_t)(lh / H), h = (uint32_t)(lh % H);
        const float *C0;
        uint32_t m, k;
        rc = kvs_squat_compensation(c, l, h, 0, &C0, &m, &k, err);
        if (rc != 0)
            break;
        if (!C0) {
            slot[lh] = SQ_NONE;
            continue;
        }
        if (next >= sc->active) {
            rc = kvs_err_set(err, KVS_EINTERNAL, "squat: more heads with a subspace than %u",
                             sc->active);
            break;
        }
        slot[lh] = next;
        float *dst = Ct + (size_t)next++ * sc->per_head;
        for (uint32_t b = 0; b + 1 < nblk && rc == 0; b++) {
            const float *Cb;
            rc = kvs_squat_compensation(c, l, h, b, &Cb, &m, &k, err);
            if (rc == 0 && (!Cb || k != g || m != D - (b + 1) * g))
                rc = kvs_err_set(err, KVS_EINTERNAL,
                                 "squat: layer %u, head %u: compensation "
                                 "block %u is not %u x %u",
                                 l, h, b, D - (b + 1) * g, g);
            for (uint32_t r = 0; rc == 0 && r < m; r++)
                for (uint32_t q = 0; q < k; q++) {
                    float v = Cb[(size_t)r * k + q];
                    if (!(fabsf(v) <= SQ_C_LIMIT)) {
                        rc = kvs_err_set(err, KVS_ENOTSUP,
                                         "squat: layer %u, head %u: "
                                         "compensation entry %g beyond the range the CUDA "
                                         "kernels reproduce bit for bit (%g)",
                                         l, h, (double)v, (double)SQ_C_LIMIT);
                        break;
                    }
                    dst[(size_t)q * m + r] = v;
                }
            dst += (size_t)m * k;
        }
    }
    if (rc == 0 && next != sc->active)
        rc = kvs_err_set(err, KVS_EINTERNAL, "squat: %u heads with a subspace, expected %u", next,
                         sc->active);
    if (rc == 0) {
        cudaError_t e = cudaMallocManaged(&sc->mem, bytes, cudaMemAttachGlobal);
        if (e == cudaSuccess)
            e = cudaMemcpy(sc->mem, host, bytes, cudaMemcpyDefault);
        /* The kernels that read the tables run on non-blocking streams, which do not wait
         * for the legacy stream's copy (it may still be landing when cudaMemcpy returns). */
        if (e == cudaSuccess)
            e = cudaStreamSynchronize(0);
        if (e != cudaSuccess) {
            rc = kvs_err_set(err, KVS_EINTERNAL, "squat: tables of %zu bytes: %s (%s)", bytes,
                             cudaGetErrorString(e), cudaGetErrorName(e));
            if (sc->mem)
                cudaFree(sc->mem);
            sc->mem = NULL;
        }
    }
    free(host);
    if (rc != 0) {
        free(sc);
        return rc;
    }
    /* Read-mostly: one copy per GPU that reads it. Only a hint: where it is not supported
     * the tables still work, so its error is cleared rather than left for the next
     * cudaGetLastError (a launch check) to find. */
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess)
        (void)cudaGetLastError();
#if CUDART_VERSION >= 13000
    cudaMemLocation loc;
    loc.type = cudaMemLocationTypeDevice;
    loc.id = dev;
    if (cudaMemAdvise(sc->mem, bytes, cudaMemAdviseSetReadMostly, loc) != cudaSuccess)
        (void)cudaGetLastError();
#else
    if (cudaMemAdvise(sc->mem, bytes, cudaMemAdviseSetReadMostly, dev) != cudaSuccess)
        (void)cudaGetLastError();
#endif
    sc->slot = (const uint32_t *)sc->mem;
    sc->C = (const float *)((const uint8_t *)sc->mem + slot_bytes);
    KVS__CUDA_TAB(c) = sc;
    return 0;
}

extern "C" void kvs__squat_cuda_release(kvs_codec *c)
{
    squat_cuda *sc = (squat_cuda *)KVS__CUDA_TAB(c);
    if (sc && sc->mem)
        cudaFree(sc->mem);
    free(sc);
    KVS__CUDA_TAB(c) = NULL;
}

extern "C" int kvs__squat_encode_cuda(const kvs_codec *c, const kvs_cuda_sections *s, void *stream,
                                      kvs_err *err)
{
    if (c->kv != KVS_KEYS || kvs_squat_subspace_heads(c) == 0)
        return kvs__kivi_encode_cuda(c, s, stream, err); /* exactly KIVI (codec_squat.c) */
    const squat_cuda *sc = (const squat_cuda *)KVS__CUDA_TAB(c);
    if (!sc || !sc->mem)
        return kvs_err_set(err, KVS_EINVAL, "squat: kvs_codec_cuda_prepare was not called");
    if (!s->layer)
        return kvs_err_set(err, KVS_EINVAL, "squat: the batch has no layer list");
    if (((uintptr_t)s->raw & 15) != 0)
        return kvs_err_set(err, KVS_EINVAL, "squat: raw device pointer %p not 16-byte aligned",
                           (const void *)s->raw);
    cudaStream_t st = (cudaStream_t)stream;
    switch (c->spec.head_dim) {
    case 64:
        return sq_dispatch_bits<64>(c, sc, s, st, err);
    case 128:
        return sq_dispatch_bits<128>(c, sc, s, st, err);
    case 256:
        return sq_dispatch_bits<256>(c, sc, s, st, err);
    default:
        break;
    }
    return kvs_err_set(err, KVS_ENOTSUP, "squat: no CUDA kernels for head_dim %u",
                       c->spec.head_dim);
}
