/* gpu/codec/paged: gather and scatter between engines' paged KV memory and the block
 * layout [L][2][t][H][D], and kvs_paged_check's refusals.
 *
 * The reference is written from each engine's own tensor shape (addr(): vLLM's
 * [2][nb][bs][H][D] per layer, separate K/V tensors, HND, SGLang's page-first and
 * layer-first pools, a padded layout), element by element, never from the descriptor's
 * strides; describe() fills the descriptor as an integrator would. Agreement, byte for
 * byte, checks both the descriptor's expressiveness and the copy paths (page runs, token
 * runs, row runs). Scatter is compared over the whole region, so a stray write shows.
 *
 * A property test draws random small layouts (strides, bases, page ids, region sizes)
 * and checks that kvs_paged_check accepts exactly those whose every touched byte lies
 * inside the region (by brute force), and that accepted ones copy correctly out of a
 * region allocated to exactly that size (ASan builds then catch any overrun).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "gpu/codec/copies.h"
#include "gpu/codec/paged.h"
#include "tests/support/kvs_test.h"

#define MAXL 8
#define E 2       /* element bytes (fp16) */
#define GAP 96    /* allocator slack between vLLM's tensors */
#define PAD_H 6   /* padded layout: bytes after each head's row */
#define PAD_T 10  /* padded layout: bytes after each token's heads */
#define T_MAX 512 /* block_tokens of the test specs */

typedef enum {
    VLLM_LAYER,      /* per layer one tensor [2][nb][bs][H][D] */
    VLLM_KV,         /* separate K and V tensors [nb][bs][H][D] (V in reverse layer order) */
    VLLM_HND,        /* per layer [2][nb][H][bs][D] (heads outside tokens) */
    SGL_PAGE_FIRST,  /* host pool [np][L][2][ps][H][D] */
    SGL_LAYER_FIRST, /* host pool [2][L][np*ps][H][D] */
    PADDED,          /* per (layer, K/V) [nb][bs][H][D + pad] with token padding */
    N_KINDS
} kind;

static const char *const kind_names[] = {"vllm-layer",  "vllm-kv",         "vllm-hnd",
                                         "sgl-page1st", "sgl-layer-first", "padded"};

typedef struct eng {
    kind k;
    uint32_t L, H, D, pt, np; /* np: pages in the engine's pool */
    kvs_paged_layout lay;
    uint64_t kb[MAXL], vb[MAXL];
    uint64_t region; /* bytes of the engine's memory */
} eng;

static uint64_t rng = 0x2545F4914F6CDD1Dull;

static uint64_t next(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static uint32_t below(uint32_t n)
{
    return (uint32_t)(next() % n);
}

static void fill_random(uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (uint8_t)next();
}

/* Byte address of element (layer l, K/V kv, page p, token j of the page, head h, dim d),
 * from the engine's tensor shape alone. */
static uint64_t addr(const eng *e, uint64_t l, uint64_t kv, uint64_t p, uint64_t j, uint64_t h,
                     uint64_t d)
{
    const uint64_t L = e->L, H = e->H, D = e->D, pt = e->pt, np = e->np;
    switch (e->k) {
    case VLLM_LAYER: {
        uint64_t tensor = 2 * np * pt * H * D * E + GAP;
        return l * tensor + ((((kv * np + p) * pt + j) * H + h) * D + d) * E;
    }
    case VLLM_KV: {
        uint64_t tensor = np * pt * H * D * E + GAP;
        uint64_t which = kv ? 2 * L - 1 - l : l;
        return which * tensor + (((p * pt + j) * H + h) * D + d) * E;
    }
    case VLLM_HND: {
        uint64_t tensor = 2 * np * H * pt * D * E;
        return l * tensor + ((((kv * np + p) * H + h) * pt + j) * D + d) * E;
    }
    case SGL_PAGE_FIRST:
        return (((((p * L + l) * 2 + kv) * pt + j) * H + h) * D + d) * E;
    case SGL_LAYER_FIRST:
        return ((((kv * L + l) * (np * pt) + p * pt + j) * H + h) * D + d) * E;
    case PADDED: {
        uint64_t head = D * E + PAD_H, tok = H * head + PAD_T, plane = np * pt * tok;
        return (l * 2 + kv) * plane + (p * pt + j) * tok + h * head + d * E;
    }
    default:
        fail_msg("bad kind");
        return 0;
    }
}

/* The engine's memory and its descriptor, as an integrator would write it down. */
static void describe(eng *out, kind k, uint32_t L, uint32_t H, uint32_t D, uint32_t pt, uint32_t np)
{
    assert_true(L <= MAXL);
    eng e = {.k = k, .L = L, .H = H, .D = D, .pt = pt, .np = np};
    const uint64_t row = (uint64_t)D * E, R = H * row;
    kvs_paged_layout *y = &e.lay;
    *y = (kvs_paged_layout){.layers = L,
                            .kv_heads = H,
                            .head_dim = D,
                            .elem_bytes = E,
                            .page_tokens = pt,
                            .page_stride = pt * R,
                            .token_stride = R,
                            .head_stride = row};
    for (uint64_t l = 0; l < L; l++) {
        switch (k) {
        case VLLM_LAYER:
            e.kb[l] = l * (2 * np * pt * R + GAP);
            e.vb[l] = e.kb[l] + np * pt * R;
            break;
        case VLLM_KV:
            e.kb[l] = l * (np * pt * R + GAP);
            e.vb[l] = (2 * L - 1 - l) * (np * pt * R + GAP);
            break;
        case VLLM_HND:
            e.kb[l] = l * 2 * np * pt * R;
            e.vb[l] = e.kb[l] + np * pt * R;
            y->token_stride = row;
            y->head_stride = pt * row;
            break;
        case SGL_PAGE_FIRST:
            e.kb[l] = 2 * l * pt * R;
            e.vb[l] = (2 * l + 1) * pt * R;
            y->page_stride = 2 * L * pt * R;
            break;
        case SGL_LAYER_FIRST:
            e.kb[l] = l * np * pt * R;
            e.vb[l] = (L + l) * np * pt * R;
            break;
        case PADDED: {
            uint64_t head = row + PAD_H, tok = H * head + PAD_T;
            e.kb[l] = 2 * l * np * pt * tok;
            e.vb[l] = e.kb[l] + np * pt * tok;
            y->page_stride = pt * tok;
            y->token_stride = tok;
            y->head_stride = head;
            break;
        }
        default:
            fail_msg("bad kind");
        }
    }
    /* Every addr() is increasing in each index: the last element of some plane ends it. */
    e.region = 0;
    for (uint32_t l = 0; l < L; l++)
        for (uint32_t kv = 0; kv < 2; kv++) {
            uint64_t end = addr(&e, l, kv, np - 1, pt - 1, H - 1, D - 1) + E;
            e.region = end > e.region ? end : e.region;
        }
    *out = e;
    out->lay.k_base = out->kb; /* the descriptor borrows out's arrays */
    out->lay.v_base = out->vb;
}

static size_t block_index(const eng *e, uint32_t t, uint32_t lrel, uint32_t kv, uint32_t tok,
                          uint32_t h, uint32_t d)
{
    return (((((size_t)lrel * 2 + kv) * t + tok) * e->H + h) * e->D + d) * E;
}

static void ref_gather(const eng *e, const uint8_t *mem, const uint32_t *pages, uint32_t t,
                       uint32_t lb, uint32_t le, uint8_t *block)
{
    for (uint32_t l = lb; l < le; l++)
        for (uint32_t kv = 0; kv < 2; kv++)
            for (uint32_t tok = 0; tok < t; tok++)
                for (uint32_t h = 0; h < e->H; h++)
                    for (uint32_t d = 0; d < e->D; d++)
                        memcpy(block + block_index(e, t, l - lb, kv, tok, h, d),
                               mem + addr(e, l, kv, pages[tok / e->pt], tok % e->pt, h, d), E);
}

static void ref_scatter(const eng *e, uint8_t *mem, const uint32_t *pages, uint32_t t, uint32_t lb,
                        uint32_t le, const uint8_t *block)
{
    for (uint32_t l = lb; l < le; l++)
        for (uint32_t kv = 0; kv < 2; kv++)
            for (uint32_t tok = 0; tok < t; tok++)
                for (uint32_t h = 0; h < e->H; h++)
                    for (uint32_t d = 0; d < e->D; d++)
                        memcpy(mem + addr(e, l, kv, pages[tok / e->pt], tok % e->pt, h, d),
                               block + block_index(e, t, l - lb, kv, tok, h, d), E);
}

static kvs_ns_spec spec_of(const eng *e)
{
    return kvs_test_spec(e->L, e->H, e->D, T_MAX, KVS_DTYPE_FP16, "none", "none", 0);
}

/* n distinct page ids of e's pool in random order. */
static void random_pages(const eng *e, uint32_t *pages, uint32_t n)
{
    uint32_t pool[256];
    assert_true(e->np <= 256 && n <= e->np);
    for (uint32_t i = 0; i < e->np; i++)
        pool[i] = i;
    for (uint32_t i = e->np - 1; i > 0; i--) {
        uint32_t j = below(i + 1), x = pool[i];
        pool[i] = pool[j];
        pool[j] = x;
    }
    memcpy(pages, pool, n * sizeof *pages);
}

/* Gather, scatter and their round trip for one block of t tokens in `pages`, layers
 * [lb, le), each against the reference. */
static void run_case(const eng *e, const uint32_t *pages, uint32_t t, uint32_t lb, uint32_t le)
{
    kvs_err err;
    kvs_ns_spec s = spec_of(e);
    uint32_t n = (t + e->pt - 1) / e->pt;
    if (kvs_paged_check(&e->lay, &s, e->region, pages, n, t, &err) != 0)
        fail_msg("%s t=%u: check refused: %s", kind_names[e->k], t, err.msg);
    assert_int_equal(kvs_paged_check_layers(&e->lay, lb, le, &err), 0);

    const size_t bytes = kvs_paged_block_bytes(&e->lay, t, lb, le);
    assert_int_equal(bytes, (size_t)(le - lb) * 2 * t * e->H * e->D * E);
    uint8_t *mem = malloc(e->region), *mem2 = malloc(e->region);
    uint8_t *want = malloc(bytes), *got = malloc(bytes), *blk = malloc(bytes);
    assert_true(mem && mem2 && want && got && blk);
    fill_random(mem, e->region);

    ref_gather(e, mem, pages, t, lb, le, want);
    memset(got, 0xA5, bytes);
    kvs_paged_gather(&e->lay, mem, pages, t, lb, le, got);
    if (memcmp(want, got, bytes))
        fail_msg("%s t=%u layers [%u,%u): gather differs from the reference", kind_names[e->k], t,
                 lb, le);

    fill_random(blk, bytes);
    memcpy(mem2, mem, e->region);
    ref_scatter(e, mem, pages, t, lb, le, blk);
    kvs_paged_scatter(&e->lay, mem2, pages, t, lb, le, blk);
    if (memcmp(mem, mem2, e->region))
        fail_msg("%s t=%u layers [%u,%u): scatter differs from the reference", kind_names[e->k], t,
                 lb, le);

    memset(got, 0x5A, bytes);
    kvs_paged_gather(&e->lay, mem2, pages, t, lb, le, got);
    if (memcmp(blk, got, bytes))
        fail_msg("%s t=%u layers [%u,%u): scatter then gather is not the identity",
                 kind_names[e->k], t, lb, le);

    /* The same moves as a copy table (kvs_paged_copies, run by the CPU reference of the
     * batched copies), with the block as [layer][K|V] sections. mem holds blk scattered
     * (the reference's): gathering it must give blk back, scattering a new block into a
     * copy of it must equal the reference's scatter of that block. */
    const size_t sec = (size_t)t * e->H * e->D * E;
    uint32_t cap = kvs_paged_copies_max(&e->lay, t, lb, le), n_copies = 0;
    kvs_copy2d *table = malloc(cap * sizeof *table);
    assert_non_null(table);
    memset(got, 0x5A, bytes);
    kvs_paged_copies(&e->lay, mem, pages, t, lb, le, got, got + sec, 2 * sec, false, table,
                     &n_copies);
    assert_true(n_copies <= cap);
    kvs_copies_run(table, n_copies);
    if (memcmp(blk, got, bytes))
        fail_msg("%s t=%u layers [%u,%u): gather by copies differs from the reference",
                 kind_names[e->k], t, lb, le);
    fill_random(got, bytes);
    memcpy(mem2, mem, e->region);
    ref_scatter(e, mem, pages, t, lb, le, got);
    n_copies = 0;
    kvs_paged_copies(&e->lay, mem2, pages, t, lb, le, got, got + sec, 2 * sec, true, table,
                     &n_copies);
    assert_true(n_copies <= cap);
    kvs_copies_run(table, n_copies);
    if (memcmp(mem, mem2, e->region))
        fail_msg("%s t=%u layers [%u,%u): scatter by copies differs from the reference",
                 kind_names[e->k], t, lb, le);
    free(table);
    free(mem);
    free(mem2);
    free(want);
    free(got);
    free(blk);
}

/* Every layer range shape: all, inner, last. */
static void run_ranges(const eng *e, const uint32_t *pages, uint32_t t)
{
    run_case(e, pages, t, 0, e->L);
    if (e->L >= 3)
        run_case(e, pages, t, 1, e->L - 1);
    run_case(e, pages, t, e->L - 1, e->L);
}

/* One layout over token counts: a full page, 1, partial, 2 pages (partial and full), 3. */
static void sweep(kind k, uint32_t L, uint32_t H, uint32_t D, uint32_t pt, uint32_t np)
{
    eng e;
    describe(&e, k, L, H, D, pt, np);
    const uint32_t ts[] = {pt, 1, pt > 3 ? pt - 3 : 1, pt + 3, 2 * pt, 3 * pt - 1};
    for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++) {
        uint32_t pages[256], n = (ts[i] + pt - 1) / pt;
        if (n > np)
            continue;
        random_pages(&e, pages, n);
        run_ranges(&e, pages, ts[i]);
    }
}

static void test_vllm_layer(void **state)
{
    sweep(VLLM_LAYER, 4, 3, 16, 8, 7);
    sweep(VLLM_LAYER, 3, 1, 32, 16, 5); /* one head: token runs are rows */
}

static void test_vllm_kv(void **state)
{
    sweep(VLLM_KV, 4, 2, 16, 8, 6);
}

static void test_vllm_hnd(void **state)
{
    sweep(VLLM_HND, 3, 4, 16, 8, 5);
}

static void test_sglang_page_first(void **state)
{
    sweep(SGL_PAGE_FIRST, 5, 2, 16, 16, 4);
}

static void test_sglang_layer_first(void **state)
{
    sweep(SGL_LAYER_FIRST, 3, 2, 16, 4, 9);
    /* A token pool (page size 1): a block spans one page per token. */
    eng e;
    describe(&e, SGL_LAYER_FIRST, 2, 2, 16, 1, 64);
    uint32_t pages[64];
    random_pages(&e, pages, 37);
    run_ranges(&e, pages, 37);
}

static void test_padded_heads(void **state)
{
    sweep(PADDED, 3, 3, 16, 8, 5);
    sweep(PADDED, 2, 1, 16, 4, 4);
}

/* Partial last block, 2-page block, page ids in both orders, given explicitly. */
static void test_partial_and_spanning(void **state)
{
    eng e;
    describe(&e, VLLM_LAYER, 2, 2, 16, 16, 8);
    const uint32_t one[] = {5}, two[] = {7, 2}, rev[] = {2, 7};
    run_ranges(&e, one, 9); /* tokens < page_tokens */
    run_ranges(&e, two, 16 + 9);
    run_ranges(&e, rev, 32);
    run_ranges(&e, (const uint32_t[]){7}, 16); /* the last page: ends at the region's end */
}

/* Boundaries are exact: the region that holds the last page passes, one byte less fails
 * and names the page. */
static void test_check_exact_end(void **state)
{
    kvs_err err;
    eng e;
    describe(&e, SGL_PAGE_FIRST, 2, 2, 16, 8, 4);
    kvs_ns_spec s = spec_of(&e);
    const uint32_t pages[] = {1, 3};
    assert_int_equal(kvs_paged_check(&e.lay, &s, e.region, pages, 2, 16, &err), 0);
    assert_int_equal(kvs_paged_check(&e.lay, &s, e.region - 1, pages, 2, 16, &err), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "pages[1]: page 3 ends at byte"));
    /* The last page half full: its last rows are not touched, so a shorter region holds it
     * (SGLang page-first: the tail of page 3 is layer 1's V tokens 4..7). */
    uint64_t tail = 4ull * 2 * 16 * E;
    assert_int_equal(kvs_paged_check(&e.lay, &s, e.region - tail, pages, 2, 12, &err), 0);
    assert_int_equal(kvs_paged_check(&e.lay, &s, e.region - tail - 1, pages, 2, 12, &err),
                     KVS_EINVAL);
    assert_non_null(strstr(err.msg, "pages[1]"));
}

/* ---------------------------------------------------------------- refusals */

static void expect(int rc, const kvs_err *err, const char *prefix)
{
    if (rc != KVS_EINVAL)
        fail_msg("expected KVS_EINVAL starting '%s', got %d (%s)", prefix, rc, err->msg);
    if (strncmp(err->msg, prefix, strlen(prefix)) != 0)
        fail_msg("message '%s' does not start with '%s'", err->msg, prefix);
}

typedef struct refusal {
    eng e;
    kvs_ns_spec s;
    uint32_t pages[4];
    kvs_err err;
} refusal;

/* A valid 2-page block of vLLM per-layer memory (3 layers, 3 heads, page_tokens 8, pages
 * 0..5) for a test to break one field at a time. */
static void valid(refusal *r)
{
    describe(&r->e, VLLM_LAYER, 3, 3, 16, 8, 6);
    r->s = spec_of(&r->e);
    r->pages[0] = 4;
    r->pages[1] = 1;
}

static int check(refusal *r, size_t n_pages, uint32_t tokens)
{
    return kvs_paged_check(&r->e.lay, &r->s, r->e.region, r->pages, n_pages, tokens, &r->err);
}

static void test_check_namespace(void **state)
{
    refusal r;
    valid(&r);
    assert_int_equal(check(&r, 2, 12), 0);

    valid(&r);
    r.e.lay.kv_heads = 4;
    expect(check(&r, 2, 12), &r.err, "kv_heads: 4 in the layout, 3 in namespace");
    valid(&r);
    r.e.lay.head_dim = 32;
    expect(check(&r, 2, 12), &r.err, "head_dim: 32 in the layout, 16 in namespace");
    valid(&r);
    r.e.lay.layers = 2;
    expect(check(&r, 2, 12), &r.err, "layers: 2 in the layout, 3");
    valid(&r);
    r.e.lay.elem_bytes = 4;
    expect(check(&r, 2, 12), &r.err, "elem_bytes: 4 in the layout");
    valid(&r);
    r.e.lay.kv_heads = 0x80000000u; /* would overflow 32-bit products */
    expect(check(&r, 2, 12), &r.err, "kv_heads: 2147483648 not in 1..");
    valid(&r);
    r.e.lay.page_tokens = 0;
    expect(check(&r, 2, 12), &r.err, "page_tokens: 0");
    valid(&r);
    r.e.lay.k_base = NULL;
    expect(check(&r, 2, 12), &r.err, "k_base: NULL");
    valid(&r);
    expect(kvs_paged_check(&r.e.lay, &r.s, r.e.region, NULL, 2, 12, &r.err), &r.err, "pages: NULL");
    /* err may be NULL. */
    r.e.lay.head_dim = 8;
    assert_int_equal(kvs_paged_check(&r.e.lay, &r.s, r.e.region, r.pages, 2, 12, NULL), KVS_EINVAL);
}

static void test_check_tokens(void **state)
{
    refusal r;
    valid(&r);
    expect(check(&r, 2, 0), &r.err, "tokens: 0 not in 1..512");
    expect(check(&r, 2, T_MAX + 1), &r.err, "tokens: 513 not in 1..512");
    /* tokens > pages * page_tokens */
    expect(check(&r, 2, 17), &r.err,
           "tokens: 17 tokens need 3 pages of page_tokens 8, but "
           "pages has 2");
    expect(check(&r, 1, 9), &r.err, "tokens: 9 tokens need 2 pages");
    /* More pages than the tokens fill. */
    expect(check(&r, 2, 8), &r.err, "pages: 2 pages for 8 tokens");
}

static void test_check_pages(void **state)
{
    refusal r;
    valid(&r);
    r.pages[1] = 6; /* the pool has 0..5 */
    expect(check(&r, 2, 12), &r.err, "pages[1]: page 6 ends at byte");
    assert_non_null(strstr(r.err.msg, "past the region's"));
    r.pages[0] = 4000000;
    expect(check(&r, 2, 12), &r.err, "pages[0]: page 4000000 ends at byte");
    r.pages[0] = UINT32_MAX;
    expect(check(&r, 2, 12), &r.err, "pages[0]: page 4294967295 ends at byte");
    /* The last page's partial span counts: page 6 out of range even for 1 token. */
    valid(&r);
    r.pages[1] = 6;
    expect(check(&r, 2, 9), &r.err, "pages[1]: page 6");
}

static void test_check_overflow(void **state)
{
    refusal r;
    valid(&r);
    r.e.lay.token_stride = 1ull << 62; /* 7 further tokens x 2^62 */
    expect(check(&r, 2, 12), &r.err,
           "token_stride: 4611686018427387904 bytes x 7 further tokens "
           "in a page overflows 64 bits");
    valid(&r);
    r.e.lay.head_stride = 1ull << 63; /* 2 further heads x 2^63 */
    expect(check(&r, 2, 12), &r.err,
           "head_stride: 9223372036854775808 bytes x 2 further heads "
           "overflows 64 bits");
    valid(&r);
    r.e.lay.token_stride = 1ull << 61; /* 7 x 2^61 fits, 2 x 2^62 fits, their sum does not */
    r.e.lay.head_stride = 1ull << 62;
    expect(check(&r, 2, 12), &r.err,
           "token_stride, head_stride: 2305843009213693952, 4611686018427387904: a page's span "
           "overflows 64 bits");
    valid(&r);
    r.e.lay.page_stride = 1ull << 63;
    expect(check(&r, 2, 12), &r.err,
           "pages[0]: page 4 x page_stride 9223372036854775808 "
           "overflows 64 bits");
    /* base + page offset wraps around: caught even with a region of 2^64 - 1 bytes. */
    valid(&r);
    r.e.lay.page_stride = 1ull << 62;
    r.e.kb[2] = 1ull << 63;
    r.pages[0] = 2;
    r.pages[1] = 0;
    expect(kvs_paged_check(&r.e.lay, &r.s, UINT64_MAX, r.pages, 2, 12, &r.err), &r.err,
           "pages[0]: page 2 (page_stride 4611686018427387904) of k_base[2] ends past byte 2^64");
    /* A page span larger than the region. */
    valid(&r);
    r.e.lay.token_stride = r.e.region;
    expect(check(&r, 2, 12), &r.err, "token_stride: a page of 8 tokens x 3 heads");
}

static void test_check_bases(void **state)
{
    refusal r;
    valid(&r);
    r.e.vb[2] = r.e.region; /* a base past the region */
    expect(check(&r, 2, 12), &r.err, "v_base[2]: offset");
    assert_non_null(strstr(r.err.msg, "past the region's"));
    valid(&r);
    r.e.kb[1] = UINT64_MAX - 1; /* wraps if added to anything */
    expect(check(&r, 2, 12), &r.err, "k_base[1]: offset 18446744073709551614");
    valid(&r);
    r.e.kb[1] += 1;
    expect(check(&r, 2, 12), &r.err, "k_base[1]: offset");
    assert_non_null(strstr(r.err.msg, "not a multiple of elem_bytes 2"));
    valid(&r);
    r.e.lay.token_stride += 1;
    expect(check(&r, 2, 12), &r.err, "token_stride: ");
    assert_non_null(strstr(r.err.msg, "not a multiple of elem_bytes"));
    /* Region of zero bytes: nothing fits. */
    valid(&r);
    expect(kvs_paged_check(&r.e.lay, &r.s, 0, r.pages, 2, 12, &r.err), &r.err, "token_stride: ");
}

static void test_check_layers(void **state)
{
    kvs_err err;
    eng e;
    describe(&e, VLLM_LAYER, 3, 2, 16, 8, 6);
    assert_int_equal(kvs_paged_check_layers(&e.lay, 0, 3, &err), 0);
    assert_int_equal(kvs_paged_check_layers(&e.lay, 2, 3, &err), 0);
    expect(kvs_paged_check_layers(&e.lay, 0, 4, &err), &err, "layer_end: 4 past the layout's 3");
    expect(kvs_paged_check_layers(&e.lay, 2, 2, &err), &err, "layer_begin: 2 not below");
    expect(kvs_paged_check_layers(&e.lay, 3, 1, &err), &err, "layer_begin: 3 not below");
}

/* ---------------------------------------------------------------- property */

/* Random small layouts, anything goes within 2-byte alignment: the check must accept
 * exactly those whose every touched byte is inside the region (brute force below), and
 * an accepted one must copy as the stride reference says, out of a region malloc'd to
 * exactly region_bytes. */
static void test_check_is_exact(void **state)
{
    kvs_err err;
    uint64_t kb[3], vb[3];
    uint32_t pages[12];
    int accepted = 0, refused = 0;
    for (int iter = 0; iter < 20000; iter++) {
        kvs_paged_layout y = {.layers = 1 + below(3),
                              .kv_heads = 1 + below(3),
                              .head_dim = 1 + below(4),
                              .elem_bytes = E,
                              .page_tokens = 1 + below(5),
                              .k_base = kb,
                              .v_base = vb,
                              .page_stride = 2 * below(200),
                              .token_stride = 2 * below(40),
                              .head_stride = 2 * below(20)};
        for (uint32_t l = 0; l < y.layers; l++) {
            kb[l] = 2 * below(300);
            vb[l] = 2 * below(300);
        }
        uint32_t t = 1 + below(12), n = (t + y.page_tokens - 1) / y.page_tokens;
        for (uint32_t i = 0; i < n; i++)
            pages[i] = below(8);
        uint64_t region = below(2500);
        kvs_ns_spec s =
            kvs_test_spec(y.layers, y.kv_heads, y.head_dim, 16, KVS_DTYPE_BF16, "none", "none", 0);

        uint64_t end = 0; /* one past the last byte touched */
        for (uint32_t l = 0; l < y.layers; l++)
            for (int kv = 0; kv < 2; kv++)
                for (uint32_t tok = 0; tok < t; tok++)
                    for (uint32_t h = 0; h < y.kv_heads; h++) {
                        uint64_t e = (kv ? vb[l] : kb[l]) +
                                     pages[tok / y.page_tokens] * y.page_stride +
                                     (tok % y.page_tokens) * y.token_stride + h * y.head_stride +
                                     y.head_dim * E;
                        end = e > end ? e : end;
                    }
        int rc = kvs_paged_check(&y, &s, region, pages, n, t, &err);
        if ((rc == 0) != (end <= region))
            fail_msg("iter %d: region %llu, last byte end %llu, check %d (%s)", iter,
                     (unsigned long long)region, (unsigned long long)end, rc, err.msg);
        if (rc) {
            refused++;
            continue;
        }
        accepted++;
        uint8_t *mem = malloc(region ? region : 1),
                *got = malloc(kvs_paged_block_bytes(&y, t, 0, y.layers));
        assert_true(mem && got);
        fill_random(mem, region);
        kvs_paged_gather(&y, mem, pages, t, 0, y.layers, got);
        size_t b = 0;
        for (uint32_t l = 0; l < y.layers; l++)
            for (int kv = 0; kv < 2; kv++)
                for (uint32_t tok = 0; tok < t; tok++)
                    for (uint32_t h = 0; h < y.kv_heads; h++)
                        for (uint32_t d = 0; d < y.head_dim; d++, b += E) {
                            uint64_t a =
                                (kv ? vb[l] : kb[l]) + pages[tok / y.page_tokens] * y.page_stride +
                                (tok % y.page_tokens) * y.token_stride + h * y.head_stride + d * E;
                            if (memcmp(got + b, mem + a, E))
                                fail_msg("iter %d: gather differs at block byte %zu", iter, b);
                        }
        kvs_paged_scatter(&y, mem, pages, t, 0, y.layers, got); /* in bounds: ASan watches */
        free(mem);
        free(got);
    }
    /* Both outcomes must be well represented for the test to mean anything. */
    assert_true(accepted > 1000 && refused > 1000);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_vllm_layer),
        cmocka_unit_test(test_vllm_kv),
        cmocka_unit_test(test_vllm_hnd),
        cmocka_unit_test(test_sglang_page_first),
        cmocka_unit_test(test_sglang_layer_first),
        cmocka_unit_test(test_padded_heads),
        cmocka_unit_test(test_partial_and_spanning),
        cmocka_unit_test(test_check_exact_end),
        cmocka_unit_test(test_check_namespace),
        cmocka_unit_test(test_check_tokens),
        cmocka_unit_test(test_check_pages),
        cmocka_unit_test(test_check_overflow),
        cmocka_unit_test(test_check_bases),
        cmocka_unit_test(test_check_layers),
        cmocka_unit_test(test_check_is_exact),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
