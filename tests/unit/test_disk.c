/* storage/disk: the LMDB disk tier. Round trips of real encoded blocks (codecs none and
 * kivi-2), batches, restart, the startup scan, namespace records, checksum failures
 * found on get and scan, map full, injected write errors, foreign and damaged
 * directories refused without a byte changed, a fork()+SIGKILL during a write
 * transaction, and readers on several threads beside two writers. Each test works in its
 * own directory under /tmp, removed at the end. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>
#include <lmdb.h>

#include "gpu/codec/format.h"
#include "storage/disk.h"
#include "tests/support/kvs_test.h"

/* ---------------------------------------------------------------- fixtures */

/* Namespace 1: L=2 H=2 D=16 T=8, codec none (2132 bytes at t = 8).
 * Namespace 2: same layout, kivi-2 keys and values. */
typedef struct codecs {
    kvs_ns_spec spec[2];
    kvs_codec *k[2], *v[2];
} codecs;

static codecs C;

static int setup_codecs(void **state)
{
    const char *names[2] = {"none", "kivi-2"};
    for (int i = 0; i < 2; i++) {
        C.spec[i] = kvs_test_spec(2, 2, 16, 8, KVS_DTYPE_FP16, names[i], names[i], 11);
        C.k[i] = kvs_test_codec(&C.spec[i], KVS_KEYS, NULL);
        C.v[i] = kvs_test_codec(&C.spec[i], KVS_VALUES, NULL);
    }
    return 0;
}

static int teardown_codecs(void **state)
{
    for (int i = 0; i < 2; i++) {
        kvs_codec_destroy(C.k[i]);
        kvs_codec_destroy(C.v[i]);
    }
    return 0;
}

/* A real encoded block of namespace ns (1 or 2) with t tokens of Gaussian data drawn
 * from `seed`. malloc'd; *len = its size. */
static uint8_t *make_block(uint32_t ns, uint32_t t, uint64_t seed, size_t *len)
{
    int i = (int)ns - 1;
    size_t n = (size_t)2 * 2 * t * 2 * 16;
    uint16_t *raw = kvs_test_gauss_data(n, seed, 1.0, KVS_DTYPE_FP16);
    size_t cap = kvs_block_encoded_max(C.k[i], C.v[i], t);
    uint8_t *enc = malloc(cap);
    kvs_err err;
    assert_int_equal(kvs_block_encode(C.k[i], C.v[i], ns, t, raw, enc, cap, len, &err), 0);
    free(raw);
    return enc;
}

typedef struct tmpdir {
    char root[64]; /* mkdtemp'd */
    char data[96]; /* root/data: the data directory */
} tmpdir;

static void tmp_make(tmpdir *t)
{
    snprintf(t->root, sizeof t->root, "/tmp/kvs-test-disk-XXXXXX");
    assert_non_null(mkdtemp(t->root));
    snprintf(t->data, sizeof t->data, "%s/data", t->root);
}

static void tmp_remove(tmpdir *t)
{
    kvs_test_rmtree(t->root);
}

static kvs_disk *open_ok(const char *dir, uint64_t budget, const kvs_disk_opts *o)
{
    kvs_disk *d = NULL;
    kvs_err err;
    int rc = kvs_disk_open(dir, budget, o, &d, &err);
    if (rc)
        fail_msg("kvs_disk_open: %s", err.msg);
    return d;
}

/* Key "<tag>-<i>" (as bytes, no NUL). */
static size_t key_of(char *buf, const char *tag, unsigned i)
{
    return (size_t)snprintf(buf, 32, "%s-%u", tag, i);
}

/* Copies the value a get hands out. */
typedef struct copy {
    uint8_t *bytes;
    size_t len;
    int calls;
} copy;

static int copy_cb(const void *bytes, size_t len, void *arg)
{
    copy *c = arg;
    free(c->bytes);
    c->bytes = malloc(len);
    memcpy(c->bytes, bytes, len);
    c->len = len;
    c->calls++;
    return 0;
}

static void expect_block(kvs_disk *d, uint32_t ns, const char *key, const uint8_t *want, size_t len)
{
    copy c = {0};
    kvs_err err;
    int rc = kvs_disk_get(d, ns, key, strlen(key), copy_cb, &c, &err);
    if (rc)
        fail_msg("get %u/%s: %s", ns, key, err.msg);
    assert_int_equal(c.len, len);
    assert_memory_equal(c.bytes, want, len);
    free(c.bytes);
}

static void expect_missing(kvs_disk *d, uint32_t ns, const char *key)
{
    copy c = {0};
    kvs_err err;
    assert_int_equal(kvs_disk_get(d, ns, key, strlen(key), copy_cb, &c, &err), KVS_ENOTFOUND);
    assert_int_equal(c.calls, 0);
}

static int put1(kvs_disk *d, uint32_t ns, const char *key, const uint8_t *b, size_t len,
                kvs_err *err)
{
    kvs_disk_item it = {ns, key, strlen(key), b, len};
    return kvs_disk_put_batch(d, &it, 1, err);
}

/* ---------------------------------------------------------------- raw LMDB access */

/* Opens an environment directly (as a foreign program would). */
static MDB_env *raw_open(const char *dir)
{
    MDB_env *env;
    assert_int_equal(mdb_env_create(&env), 0);
    assert_int_equal(mdb_env_set_maxdbs(env, 8), 0);
    assert_int_equal(mdb_env_set_mapsize(env, 64u << 20), 0);
    assert_int_equal(mdb_env_open(env, dir, 0, 0600), 0);
    return env;
}

/* XORs byte `off` of the stored value of block (ns, key) with `x`, through LMDB. */
static void raw_flip(const char *dir, uint32_t ns, const char *key, size_t off, uint8_t x)
{
    MDB_env *env = raw_open(dir);
    MDB_txn *txn;
    MDB_dbi dbi;
    assert_int_equal(mdb_txn_begin(env, NULL, 0, &txn), 0);
    assert_int_equal(mdb_dbi_open(txn, "blocks", 0, &dbi), 0);
    uint8_t kb[80] = {(uint8_t)(ns >> 24), (uint8_t)(ns >> 16), (uint8_t)(ns >> 8), (uint8_t)ns};
    memcpy(kb + 4, key, strlen(key));
    MDB_val k = {4 + strlen(key), kb}, v;
    assert_int_equal(mdb_get(txn, dbi, &k, &v), 0);
    assert_true(off < v.mv_size);
    uint8_t *b = malloc(v.mv_size);
    memcpy(b, v.mv_data, v.mv_size);
    b[off] ^= x;
    MDB_val nv = {v.mv_size, b};
    assert_int_equal(mdb_put(txn, dbi, &k, &nv, 0), 0);
    assert_int_equal(mdb_txn_commit(txn), 0);
    free(b);
    mdb_env_close(env);
}

/* ---------------------------------------------------------------- directory snapshots */

/* Names and bytes of every file in a directory (at most 8, small). */
typedef struct snap {
    int n;
    char name[8][64];
    uint8_t *data[8];
    size_t len[8];
} snap;

static void snap_take(const char *dir, snap *s)
{
    memset(s, 0, sizeof *s);
    DIR *dp = opendir(dir);
    assert_non_null(dp);
    struct dirent *e;
    while ((e = readdir(dp))) {
        if (e->d_name[0] == '.')
            continue;
        assert_true(s->n < 8);
        snprintf(s->name[s->n], 64, "%.63s", e->d_name);
        int fd = openat(dirfd(dp), e->d_name, O_RDONLY);
        assert_true(fd >= 0);
        FILE *f = fdopen(fd, "rb");
        assert_non_null(f);
        fseek(f, 0, SEEK_END);
        long len = ftell(f);
        fseek(f, 0, SEEK_SET);
        s->data[s->n] = malloc((size_t)len + 1);
        s->len[s->n] = fread(s->data[s->n], 1, (size_t)len, f);
        fclose(f);
        s->n++;
    }
    closedir(dp);
}

static void snap_free(snap *s)
{
    for (int i = 0; i < s->n; i++)
        free(s->data[i]);
}

/* The directory still holds exactly the files of s, byte for byte. */
static void snap_expect_same(const char *dir, snap *s)
{
    snap now;
    snap_take(dir, &now);
    assert_int_equal(now.n, s->n);
    for (int i = 0; i < s->n; i++) {
        int j = 0;
        while (j < now.n && strcmp(now.name[j], s->name[i]))
            j++;
        if (j == now.n)
            fail_msg("%s vanished", s->name[i]);
        assert_int_equal(now.len[j], s->len[i]);
        assert_memory_equal(now.data[j], s->data[i], s->len[i]);
    }
    snap_free(&now);
}

static void write_file(const char *dir, const char *name, const void *b, size_t len)
{
    char p[256];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    FILE *f = fopen(p, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(b, 1, len, f), len);
    fclose(f);
}

/* Opening must fail with `code`, the message naming the path and containing `what`, and
 * leave the directory exactly as it was. */
static void expect_refused(const char *dir, int code, const char *what, const kvs_disk_opts *o)
{
    snap before;
    snap_take(dir, &before);
    kvs_disk *d = NULL;
    kvs_err err;
    int rc = kvs_disk_open(dir, 1 << 20, o, &d, &err);
    if (rc != code)
        fail_msg("open %s: want %s, got %s: %s", dir, kvs_err_name(code), kvs_err_name(rc),
                 err.msg);
    assert_null(d);
    if (!strstr(err.msg, dir) || !strstr(err.msg, what))
        fail_msg("message '%s' lacks '%s' or the path", err.msg, what);
    snap_expect_same(dir, &before);
    snap_free(&before);
}

/* ---------------------------------------------------------------- scan helper */

typedef struct seen {
    unsigned n;          /* entries reported */
    unsigned char *hits; /* per index of key "<tag>-<i>" of namespace 1/2 */
    unsigned max;
    uint64_t tokens, bytes;
    int stop_after; /* 0: never */
} seen;

static int seen_cb(const kvs_disk_entry *e, void *arg)
{
    seen *s = arg;
    char k[80];
    memcpy(k, e->key, e->key_len);
    k[e->key_len] = 0;
    const char *dash = strrchr(k, '-');
    assert_non_null(dash);
    unsigned i = (unsigned)strtoul(dash + 1, NULL, 10);
    assert_true(i < s->max);
    s->hits[i]++;
    s->n++;
    s->tokens += e->tokens;
    s->bytes += e->bytes;
    if (s->stop_after && s->n == (unsigned)s->stop_after)
        return 7;
    return 0;
}

/* ---------------------------------------------------------------- tests */

static void test_create_and_reopen(void **state)
{
    tmpdir t;
    tmp_make(&t);
    kvs_disk_opts o = {.identity = "node-a"};
    kvs_disk *d = open_ok(t.data, 16 << 20, &o); /* creates the missing directory */
    assert_string_equal(kvs_disk_identity(d), "node-a");
    assert_string_equal(kvs_disk_path(d), t.data);
    kvs_disk_stats st;
    assert_int_equal(kvs_disk_get_stats(d, &st, NULL), 0);
    assert_int_equal(st.blocks, 0);
    assert_int_equal(st.map_bytes, kvs_disk_map_bytes(16 << 20));
    assert_true(st.used_bytes > 0 && st.used_bytes <= st.file_bytes);
    assert_true(st.file_bytes <= st.map_bytes);
    kvs_disk_close(d);
    d = open_ok(t.data, 16 << 20, NULL); /* no identity given: not checked */
    assert_string_equal(kvs_disk_identity(d), "node-a");
    kvs_disk_close(d);

    /* An existing empty directory, and one holding only lost+found, are taken. */
    char p[160];
    snprintf(p, sizeof p, "%s/empty", t.root);
    assert_int_equal(mkdir(p, 0700), 0);
    kvs_disk_close(open_ok(p, 1 << 20, NULL));
    snprintf(p, sizeof p, "%s/volume", t.root);
    assert_int_equal(mkdir(p, 0700), 0);
    char lf[200];
    snprintf(lf, sizeof lf, "%s/lost+found", p);
    assert_int_equal(mkdir(lf, 0700), 0);
    kvs_disk_close(open_ok(p, 1 << 20, NULL));
    /* An LMDB environment with nothing in it: what an open that died before its first
     * commit leaves. */
    snprintf(p, sizeof p, "%s/blank-lmdb", t.root);
    assert_int_equal(mkdir(p, 0700), 0);
    mdb_env_close(raw_open(p));
    d = open_ok(p, 1 << 20, NULL);
    kvs_disk_close(d);
    d = open_ok(p, 1 << 20, NULL); /* and now it is ours */
    kvs_disk_close(d);

    /* map rule */
    assert_int_equal(kvs_disk_map_bytes(0), 0);
    assert_int_equal(kvs_disk_map_bytes(16ull << 30), 20ull << 30 | 64ull << 20);
    assert_int_equal(kvs_disk_map_bytes(1), 65ull << 20);
    assert_int_equal(kvs_disk_map_bytes(1ull << 62), 0);
    kvs_err err;
    assert_int_equal(kvs_disk_open(t.data, 0, NULL, &d, &err), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "budget"));
    tmp_remove(&t);
}

/* Many real blocks of both codecs, in batches; decoded straight from the map. */
typedef struct decode_ctx {
    int ns;
    uint16_t *out;
    uint32_t t;
} decode_ctx;

static int decode_cb(const void *bytes, size_t len, void *arg)
{
    decode_ctx *x = arg;
    kvs_block_info info;
    assert_int_equal(kvs_format_parse(bytes, len, &info, NULL), 0);
    x->t = info.tokens;
    kvs_err err;
    return kvs_block_decode(C.k[x->ns - 1], C.v[x->ns - 1], bytes, len, 0, 2, x->out, &err);
}

#define RT_N 400

static void test_roundtrip_batches(void **state)
{
    tmpdir t;
    tmp_make(&t);
    kvs_disk *d = open_ok(t.data, 64 << 20, NULL);
    uint8_t *blk[RT_N];
    size_t len[RT_N];
    char key[RT_N][32];
    kvs_disk_item items[50];
    for (unsigned i = 0; i < RT_N; i++) {
        uint32_t ns = 1 + i % 2, tok = 1 + i % 8;
        blk[i] = make_block(ns, tok, 1000 + i, &len[i]);
        key_of(key[i], "rt", i);
        items[i % 50] = (kvs_disk_item){ns, key[i], strlen(key[i]), blk[i], len[i]};
        if (i % 50 == 49) {
            kvs_err err;
            if (kvs_disk_put_batch(d, items, 50, &err))
                fail_msg("put: %s", err.msg);
        }
    }
    uint16_t *out = malloc((size_t)2 * 2 * 8 * 2 * 16 * 2),
             *want = malloc((size_t)2 * 2 * 8 * 2 * 16 * 2);
    for (unsigned i = 0; i < RT_N; i++) {
        uint32_t ns = 1 + i % 2;
        expect_block(d, ns, key[i], blk[i], len[i]);
        expect_missing(d, 3 - ns, key[i]); /* namespaces are separate key spaces */
        decode_ctx x = {(int)ns, out, 0};
        assert_int_equal(kvs_disk_get(d, ns, key[i], strlen(key[i]), decode_cb, &x, NULL), 0);
        assert_int_equal(x.t, 1 + i % 8);
        assert_int_equal(
            kvs_block_decode(C.k[ns - 1], C.v[ns - 1], blk[i], len[i], 0, 2, want, NULL), 0);
        assert_memory_equal(out, want, (size_t)2 * 2 * x.t * 2 * 16 * 2);
    }
    kvs_disk_stats st;
    assert_int_equal(kvs_disk_get_stats(d, &st, NULL), 0);
    assert_int_equal(st.blocks, RT_N);
    uint64_t sum = 0;
    for (unsigned i = 0; i < RT_N; i++)
        sum += len[i];
    assert_true(st.used_bytes >= sum);
    assert_int_equal(st.write_errors + st.checksum_failures + st.map_full, 0);

    /* A callback's error comes back as the get's result. */
    assert_int_equal(
        kvs_disk_get(d, 1, key[0], strlen(key[0]), decode_cb, &(decode_ctx){2, out, 0}, NULL),
        KVS_EPROTO);

    /* Batch delete: present and absent keys; then the survivors are intact. */
    kvs_disk_key dk[RT_N / 2 + 1];
    for (unsigned i = 0; i < RT_N / 2; i++)
        dk[i] = (kvs_disk_key){1 + (2 * i) % 2, key[2 * i], strlen(key[2 * i])};
    dk[RT_N / 2] = (kvs_disk_key){1, "absent", 6};
    uint64_t deleted = 0;
    assert_int_equal(kvs_disk_del(d, dk, RT_N / 2 + 1, &deleted, NULL), 0);
    assert_int_equal(deleted, RT_N / 2);
    for (unsigned i = 0; i < RT_N; i++) {
        if (i % 2 == 0)
            expect_missing(d, 1, key[i]);
        else
            expect_block(d, 2, key[i], blk[i], len[i]);
    }
    /* Replacing a block; the last of two items of one name in a batch wins. */
    kvs_disk_item two[2] = {{2, key[1], strlen(key[1]), blk[3], len[3]},
                            {2, key[1], strlen(key[1]), blk[5], len[5]}};
    assert_int_equal(kvs_disk_put_batch(d, two, 2, NULL), 0);
    expect_block(d, 2, key[1], blk[5], len[5]);
    assert_int_equal(kvs_disk_get_stats(d, &st, NULL), 0);
    assert_int_equal(st.blocks, RT_N / 2);
    kvs_disk_close(d);
    for (unsigned i = 0; i < RT_N; i++)
        free(blk[i]);
    free(out);
    free(want);
    tmp_remove(&t);
}

static void test_put_checks(void **state)
{
    tmpdir t;
    tmp_make(&t);
    kvs_disk *d = open_ok(t.data, 16 << 20, NULL);
    size_t len;
    uint8_t *b = make_block(1, 4, 5, &len);
    kvs_err err;
    char long_key[KVS_KEY_MAX + 1];
    memset(long_key, 'k', sizeof long_key);
    kvs_disk_item bad[] = {
        {1, "", 0, b, len},                     /* empty key */
        {1, long_key, sizeof long_key, b, len}, /* key too long */
        {2, "x", 1, b, len},                    /* header names namespace 1 */
        {1, "x", 1, b, len - 1},                /* length differs from the header */
        {1, "x", 1, b, 10},                     /* shorter than a header */
        {1, "x", 1, NULL, len},
    };
    const char *why[] = {"key", "key", "namespace", "bytes", "header", "no bytes"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        /* a good item first: the batch is refused whole */
        kvs_disk_item two[2] = {{1, "good", 4, b, len}, bad[i]};
        assert_int_equal(kvs_disk_put_batch(d, two, 2, &err), KVS_EINVAL);
        if (!strstr(err.msg, why[i]) || !strstr(err.msg, "item 1"))
            fail_msg("case %zu: %s", i, err.msg);
        expect_missing(d, 1, "good");
    }
    uint8_t *garbage = malloc(len);
    memcpy(garbage, b, len);
    garbage[0] = 'X';
    assert_int_equal(put1(d, 1, "g", garbage, len, &err), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "magic"));
    assert_int_equal(kvs_disk_get(d, 1, "", 0, copy_cb, NULL, &err), KVS_EINVAL);
    assert_int_equal(kvs_disk_del(d, &(kvs_disk_key){1, long_key, sizeof long_key}, 1, NULL, &err),
                     KVS_EINVAL);
    assert_int_equal(kvs_disk_put_batch(d, NULL, 0, &err), 0);
    kvs_disk_close(d);
    free(garbage);
    free(b);
    tmp_remove(&t);
}

#define SCAN_N 10000 /* > two scan chunks of 4096 */

static void test_restart_and_scan(void **state)
{
    tmpdir t;
    tmp_make(&t);
    kvs_disk_opts o = {.nosync = true};
    kvs_disk *d = open_ok(t.data, 64 << 20, &o);
    /* Eight templates of 1..8 tokens, both namespaces (340 to 2132 bytes): the small
     * ones live inside leaf pages, the large ones in overflow pages. */
    size_t len[8];
    uint8_t *tmpl[8];
    for (int i = 0; i < 8; i++)
        tmpl[i] = make_block(1 + i % 2, 1 + (uint32_t)i, 77 + (uint64_t)i, &len[i]);
    kvs_disk_item items[500];
    static char keys[SCAN_N][32];
    uint64_t want_tokens = 0, want_bytes = 0;
    for (unsigned i = 0; i < SCAN_N; i++) {
        int j = (int)(i % 8);
        key_of(keys[i], "s", i);
        items[i % 500] =
            (kvs_disk_item){1 + (uint32_t)j % 2, keys[i], strlen(keys[i]), tmpl[j], len[j]};
        want_tokens += 1 + (uint32_t)j;
        want_bytes += len[j];
        if (i % 500 == 499)
            assert_int_equal(kvs_disk_put_batch(d, items, 500, NULL), 0);
    }
    assert_int_equal(kvs_disk_ns_put(d, 1, "", 0, "spec-one", 8, NULL), 0);
    assert_int_equal(kvs_disk_sync(d, NULL), 0);
    kvs_disk_close(d);

    d = open_ok(t.data, 64 << 20, &o); /* restart */
    seen s = {.hits = calloc(SCAN_N, 1), .max = SCAN_N};
    kvs_disk_scan_info info;
    assert_int_equal(kvs_disk_scan(d, 0, seen_cb, &s, &info, NULL), 0);
    assert_int_equal(s.n, SCAN_N);
    for (unsigned i = 0; i < SCAN_N; i++)
        assert_int_equal(s.hits[i], 1); /* every block exactly once */
    assert_int_equal(s.tokens, want_tokens);
    assert_int_equal(s.bytes, want_bytes);
    assert_int_equal(info.blocks, SCAN_N);
    assert_int_equal(info.bytes, want_bytes);
    assert_int_equal(info.dropped, 0);
    for (unsigned i = 0; i < SCAN_N; i += 997)
        expect_block(d, 1 + (i % 8) % 2, keys[i], tmpl[i % 8], len[i % 8]);
    copy c = {0};
    assert_int_equal(kvs_disk_ns_get(d, 1, "", 0, copy_cb, &c, NULL), 0);
    assert_int_equal(c.len, 8);
    assert_memory_equal(c.bytes, "spec-one", 8);
    free(c.bytes);

    /* With checksums verified: the same entries. */
    memset(s.hits, 0, SCAN_N);
    s.n = 0;
    assert_int_equal(kvs_disk_scan(d, KVS_DISK_SCAN_VERIFY, seen_cb, &s, &info, NULL), 0);
    assert_int_equal(s.n, SCAN_N);
    /* A callback's non-zero return stops the scan and comes back. */
    memset(s.hits, 0, SCAN_N);
    s.n = 0;
    s.stop_after = 5000;
    assert_int_equal(kvs_disk_scan(d, 0, seen_cb, &s, &info, NULL), 7);
    assert_int_equal(s.n, 5000);
    free(s.hits);
    kvs_disk_close(d);
    for (int i = 0; i < 8; i++)
        free(tmpl[i]);
    tmp_remove(&t);
}

typedef struct rec_list {
    int n;
    uint32_t ns[16];
    char rec[16][16];
    char val[16][16];
} rec_list;

static int list_cb(uint32_t ns_id, const void *rec, size_t rec_len, const void *val, size_t val_len,
                   void *arg)
{
    rec_list *l = arg;
    assert_true(l->n < 16);
    l->ns[l->n] = ns_id;
    snprintf(l->rec[l->n], 16, "%.*s", (int)rec_len, (const char *)rec);
    snprintf(l->val[l->n], 16, "%.*s", (int)val_len, (const char *)val);
    l->n++;
    return 0;
}

static void test_ns_records(void **state)
{
    tmpdir t;
    tmp_make(&t);
    kvs_disk *d = open_ok(t.data, 16 << 20, NULL);
    /* ids whose big-endian order differs from their little-endian order */
    assert_int_equal(kvs_disk_ns_put(d, 256, "", 0, "specB", 5, NULL), 0);
    assert_int_equal(kvs_disk_ns_put(d, 1, "K2", 2, "stateK2", 7, NULL), 0);
    assert_int_equal(kvs_disk_ns_put(d, 1, "", 0, "specA", 5, NULL), 0);
    assert_int_equal(kvs_disk_ns_put(d, 1, "K1", 2, "stateK1", 7, NULL), 0);
    assert_int_equal(kvs_disk_ns_put(d, 1, "K1", 2, "stateK1b", 8, NULL), 0); /* replaces */
    assert_int_equal(kvs_disk_ns_put(d, 2, "", 0, NULL, 0, NULL), 0);         /* empty value */
    rec_list l = {0};
    assert_int_equal(kvs_disk_ns_list(d, list_cb, &l, NULL), 0);
    assert_int_equal(l.n, 5);
    const uint32_t ns[] = {1, 1, 1, 2, 256};
    const char *rec[] = {"", "K1", "K2", "", ""};
    const char *val[] = {"specA", "stateK1b", "stateK2", "", "specB"};
    for (int i = 0; i < 5; i++) {
        assert_int_equal(l.ns[i], ns[i]);
        assert_string_equal(l.rec[i], rec[i]);
        assert_string_equal(l.val[i], val[i]);
    }
    kvs_err err;
    copy c = {0};
    assert_int_equal(kvs_disk_ns_get(d, 1, "K3", 2, copy_cb, &c, &err), KVS_ENOTFOUND);
    char big[KVS_DISK_NS_REC_MAX + 1] = {0};
    assert_int_equal(kvs_disk_ns_put(d, 1, big, sizeof big, "x", 1, &err), KVS_EINVAL);

    /* Dropping namespace 1: its blocks (more than one delete transaction) and records go;
     * namespace 2's block and records and namespace 256 stay. */
    size_t len1, len2;
    uint8_t *b1 = make_block(1, 1, 1, &len1), *b2 = make_block(2, 1, 2, &len2);
    enum { N1 = 9000 };
    static char keys[N1][32];
    kvs_disk_item *items = malloc(N1 * sizeof *items);
    for (unsigned i = 0; i < N1; i++)
        items[i] = (kvs_disk_item){1, keys[i], key_of(keys[i], "n", i), b1, len1};
    assert_int_equal(kvs_disk_put_batch(d, items, N1, NULL), 0);
    assert_int_equal(put1(d, 2, "n-0", b2, len2, NULL), 0);
    uint64_t dropped = 0;
    assert_int_equal(kvs_disk_ns_del(d, 1, &dropped, NULL), 0);
    assert_int_equal(dropped, N1);
    expect_missing(d, 1, "n-0");
    expect_block(d, 2, "n-0", b2, len2);
    memset(&l, 0, sizeof l);
    assert_int_equal(kvs_disk_ns_list(d, list_cb, &l, NULL), 0);
    assert_int_equal(l.n, 2);
    assert_int_equal(l.ns[0], 2);
    assert_int_equal(l.ns[1], 256);
    assert_int_equal(kvs_disk_ns_del(d, 77, &dropped, NULL), 0); /* absent: fine */
    assert_int_equal(dropped, 0);
    kvs_disk_stats st;
    assert_int_equal(kvs_disk_get_stats(d, &st, NULL), 0);
    assert_int_equal(st.blocks, 1);
    assert_int_equal(st.ns_records, 2);
    kvs_disk_close(d);
    free(items);
    free(b1);
    free(b2);
    tmp_remove(&t);
}

static void test_corrupt_blocks_dropped(void **state)
{
    tmpdir t;
    tmp_make(&t);
    kvs_disk *d = open_ok(t.data, 16 << 20, NULL);
    enum { N = 6 };
    uint8_t *b[N];
    size_t len[N];
    char key[N][32];
    for (unsigned i = 0; i < N; i++) {
        b[i] = make_block(1 + i % 2, 8, 300 + i, &len[i]);
        key_of(key[i], "c", i);
        assert_int_equal(put1(d, 1 + i % 2, key[i], b[i], len[i], NULL), 0);
    }
    kvs_disk_close(d);
    raw_flip(t.data, 1, key[0], len[0] / 2, 0x01); /* payload bit: checksum */
    raw_flip(t.data, 2, key[1], 1, 0xff);          /* magic: header */
    raw_flip(t.data, 1, key[2], len[2] - 1, 0x80); /* last byte: checksum */
    raw_flip(t.data, 2, key[3], 9, 0x01);          /* namespace id in the header */

    d = open_ok(t.data, 16 << 20, NULL);
    kvs_err err;
    copy c = {0};
    assert_int_equal(kvs_disk_get(d, 1, key[0], strlen(key[0]), copy_cb, &c, &err), KVS_EDATALOSS);
    assert_non_null(strstr(err.msg, "checksum"));
    assert_int_equal(c.calls, 0); /* never handed out */
    expect_missing(d, 1, key[0]); /* and dropped */
    kvs_disk_stats st;
    assert_int_equal(kvs_disk_get_stats(d, &st, NULL), 0);
    assert_int_equal(st.checksum_failures, 1);
    assert_int_equal(st.blocks, N - 1);

    /* The scan (headers only) drops the bad headers; the bad checksum of key[2] is
     * only seen by a verifying scan. */
    seen s = {.hits = calloc(N, 1), .max = N};
    kvs_disk_scan_info info;
    assert_int_equal(kvs_disk_scan(d, 0, seen_cb, &s, &info, NULL), 0);
    assert_int_equal(info.dropped, 2);
    assert_int_equal(s.n, 3);
    assert_int_equal(s.hits[2] + s.hits[4] + s.hits[5], 3);
    memset(s.hits, 0, N);
    s.n = 0;
    assert_int_equal(kvs_disk_scan(d, KVS_DISK_SCAN_VERIFY, seen_cb, &s, &info, NULL), 0);
    assert_int_equal(info.dropped, 1);
    assert_int_equal(s.n, 2);
    assert_int_equal(s.hits[4] + s.hits[5], 2);
    assert_int_equal(kvs_disk_get_stats(d, &st, NULL), 0);
    assert_int_equal(st.checksum_failures, 4);
    assert_int_equal(st.blocks, 2);
    expect_block(d, 1, key[4], b[4], len[4]);
    expect_block(d, 2, key[5], b[5], len[5]);
    free(s.hits);
    kvs_disk_close(d);
    for (unsigned i = 0; i < N; i++)
        free(b[i]);
    tmp_remove(&t);
}

static void test_map_full(void **state)
{
    tmpdir t;
    tmp_make(&t);
    kvs_disk_opts o = {.map_bytes = 1 << 20};
    kvs_disk *d = open_ok(t.data, 1, &o);
    size_t len;
    uint8_t *b = make_block(1, 8, 9, &len); /* 2132 bytes: one overflow page */
    static char keys[2000][32];
    unsigned n = 0, batches = 0;
    kvs_err err;
    int rc = 0;
    while (n < 2000) {
        kvs_disk_item items[8];
        for (unsigned i = 0; i < 8; i++)
            items[i] = (kvs_disk_item){1, keys[n + i], key_of(keys[n + i], "f", n + i), b, len};
        if ((rc = kvs_disk_put_batch(d, items, 8, &err)))
            break;
        n += 8;
        batches++;
    }
    assert_int_equal(rc, KVS_ENOSPC);
    /* Refused by the room check before the transaction (invariant 4), or by LMDB */
    if (!strstr(err.msg, "LMDB map full") && !strstr(err.msg, "map full"))
        fail_msg("%s", err.msg);
    assert_true(n > 100 && n < 256); /* 1 MiB of 4 KiB pages */
    for (unsigned i = 0; i < 8; i++)
        expect_missing(d, 1, keys[n + i]); /* the failed batch left nothing */
    kvs_disk_stats st;
    assert_int_equal(kvs_disk_get_stats(d, &st, NULL), 0);
    assert_int_equal(st.map_full + st.no_room, 1);
    assert_int_equal(st.write_errors, 0);
    assert_int_equal(st.blocks, n);

    /* Evict half; the same batch now fits, and everything reads back. */
    kvs_disk_key *dk = malloc(n / 2 * sizeof *dk);
    for (unsigned i = 0; i < n / 2; i++)
        dk[i] = (kvs_disk_key){1, keys[i], strlen(keys[i])};
    assert_int_equal(kvs_disk_del(d, dk, n / 2, NULL, NULL), 0);
    for (unsigned r = 0; r < 4; r++) {
        kvs_disk_item items[8];
        for (unsigned i = 0; i < 8; i++) {
            unsigned j = n + 8 * r + i;
            items[i] = (kvs_disk_item){1, keys[j], key_of(keys[j], "f", j), b, len};
        }
        if (kvs_disk_put_batch(d, items, 8, &err))
            fail_msg("after eviction: %s", err.msg);
    }
    for (unsigned i = n / 2; i < n + 32; i++)
        expect_block(d, 1, keys[i], b, len);
    kvs_disk_close(d);
    /* The map size persists in the environment; reopening with the budget works. */
    d = open_ok(t.data, 1, &o);
    expect_block(d, 1, keys[n], b, len);
    kvs_disk_close(d);
    free(dk);
    free(b);
    tmp_remove(&t);
}

/* Invariant 4: with the filesystem nearly full, a put is refused before it starts (and
 * leaves nothing), deletions still go through, and pages they free inside the file are
 * reused without asking the filesystem for more (issue 10, fault 1). */
static void test_room_check(void **state)
{
    tmpdir t;
    tmp_make(&t);
    kvs_disk *d = open_ok(t.data, 64 << 20, NULL);
    size_t len;
    uint8_t *b = make_block(1, 8, 64, &len); /* tens of KiB */
    static char keys[8192][32];
    kvs_err err;
    /* A "filesystem" with room for 16 MiB of data.mdb. */
    kvs_disk_test_fs_limit(d, 16 << 20);
    unsigned n = 0;
    int rc = 0;
    while (n < 8000) {
        kvs_disk_item it = {1, keys[n], key_of(keys[n], "r", n), b, len};
        if ((rc = kvs_disk_put_batch(d, &it, 1, &err)))
            break;
        n++;
        kvs_disk_stats st;
        assert_int_equal(kvs_disk_get_stats(d, &st, NULL), 0);
        /* The file never grows into the headroom. */
        assert_true(st.file_bytes <= (16u << 20) - (1u << 20));
    }
    assert_int_equal(rc, KVS_ENOSPC);
    assert_non_null(strstr(err.msg, "filesystem full"));
    assert_true(n > 10);
    expect_missing(d, 1, keys[n]);
    kvs_disk_stats st;
    assert_int_equal(kvs_disk_get_stats(d, &st, NULL), 0);
    assert_int_equal(st.no_room, 1);
    assert_int_equal(st.write_errors, 0);
    /* Something else fills the filesystem up to the file: deletions still commit (they
     * take pages from the file's own free ones, never more than the headroom) ... */
    kvs_disk_test_fs_limit(d, st.file_bytes);
    unsigned ndel = n - 10; /* frees more than the headroom and a put */
    kvs_disk_key *dk = calloc(ndel, sizeof *dk);
    for (unsigned i = 0; i < ndel; i++)
        dk[i] = (kvs_disk_key){1, keys[i], strlen(keys[i])};
    uint64_t deleted = 0;
    assert_int_equal(kvs_disk_del(d, dk, ndel, &deleted, &err), 0);
    assert_int_equal(deleted, ndel);
    free(dk);
    /* ... and the pages they freed are reused by a put that fits them. */
    kvs_disk_item it = {1, keys[n], key_of(keys[n], "r", n), b, len};
    if (kvs_disk_put_batch(d, &it, 1, &err))
        fail_msg("n %u len %zu: %s", n, len, err.msg);
    expect_block(d, 1, keys[n], b, len);
    kvs_disk_close(d);
    free(b);
    tmp_remove(&t);
}

static void test_write_errors(void **state)
{
    tmpdir t;
    tmp_make(&t);
    kvs_disk *d = open_ok(t.data, 16 << 20, NULL);
    size_t len;
    uint8_t *b = make_block(2, 3, 4, &len);
    kvs_err err;
    kvs_disk_test_fail_write(d, 2, EIO); /* the second write transaction fails */
    assert_int_equal(put1(d, 2, "a", b, len, &err), 0);
    assert_int_equal(put1(d, 2, "b", b, len, &err), KVS_EIO);
    assert_non_null(strstr(err.msg, t.data));
    assert_non_null(strstr(err.msg, strerror(EIO)));
    expect_missing(d, 2, "b");
    assert_int_equal(put1(d, 2, "b", b, len, &err), 0); /* one-shot */
    kvs_disk_test_fail_write(d, 1, MDB_MAP_FULL);
    assert_int_equal(kvs_disk_del(d, &(kvs_disk_key){2, "a", 1}, 1, NULL, &err), KVS_ENOSPC);
    kvs_disk_test_fail_write(d, 1, MDB_TXN_FULL);
    assert_int_equal(put1(d, 2, "c", b, len, &err), KVS_E2BIG);
    kvs_disk_test_fail_write(d, 1, ENOSPC);
    assert_int_equal(put1(d, 2, "c", b, len, &err), KVS_ENOSPC);
    assert_non_null(strstr(err.msg, "filesystem full"));
    kvs_disk_stats st;
    assert_int_equal(kvs_disk_get_stats(d, &st, NULL), 0);
    assert_int_equal(st.write_errors, 2);
    assert_int_equal(st.map_full, 1);
    expect_block(d, 2, "a", b, len);
    expect_block(d, 2, "b", b, len);
    kvs_disk_close(d);
    free(b);
    tmp_remove(&t);
}

static void test_durable(void **state)
{
    tmpdir t;
    tmp_make(&t);
    kvs_disk_opts o = {.nosync = true};
    kvs_disk *d = open_ok(t.data, 16 << 20, &o);
    size_t len;
    uint8_t *b = make_block(1, 2, 3, &len);
    kvs_disk_item it = {1, "d", 1, b, len};
    kvs_disk_stats st;
    assert_int_equal(kvs_disk_put_batch(d, &it, 1, NULL), 0);
    assert_int_equal(kvs_disk_get_stats(d, &st, NULL), 0);
    assert_int_equal(st.syncs, 0);
    assert_int_equal(kvs_disk_put_durable(d, &it, 1, NULL), 0);
    assert_int_equal(kvs_disk_sync(d, NULL), 0);
    assert_int_equal(kvs_disk_get_stats(d, &st, NULL), 0);
    assert_int_equal(st.syncs, 2);
    kvs_disk_close(d);
    /* Meta-lazy mode (kvstashd's): a plain put needs no explicit flush, a durable one
     * flushes the meta page explicitly; both read back, after a reopen too. */
    kvs_disk_opts lazy_meta = {.nometasync = true};
    d = open_ok(t.data, 16 << 20, &lazy_meta);
    kvs_disk_item it2 = {1, "m", 1, b, len};
    assert_int_equal(kvs_disk_put_batch(d, &it2, 1, NULL), 0);
    assert_int_equal(kvs_disk_get_stats(d, &st, NULL), 0);
    assert_int_equal(st.syncs, 0);
    assert_int_equal(kvs_disk_put_durable(d, &it, 1, NULL), 0);
    assert_int_equal(kvs_disk_get_stats(d, &st, NULL), 0);
    assert_int_equal(st.syncs, 1);
    kvs_disk_close(d);
    d = open_ok(t.data, 16 << 20, &lazy_meta);
    expect_block(d, 1, "m", b, len);
    kvs_disk_close(d);
    /* Synced mode: every commit is flushed by LMDB itself, no extra flush. */
    d = open_ok(t.data, 16 << 20, NULL);
    assert_int_equal(kvs_disk_put_durable(d, &it, 1, NULL), 0);
    assert_int_equal(kvs_disk_get_stats(d, &st, NULL), 0);
    assert_int_equal(st.syncs, 0);
    expect_block(d, 1, "d", b, len);
    kvs_disk_close(d);
    free(b);
    tmp_remove(&t);
}

static void test_foreign_refused(void **state)
{
    tmpdir t;
    tmp_make(&t);
    char p[160];

    /* a data.mdb of garbage */
    snprintf(p, sizeof p, "%s/garbage", t.root);
    assert_int_equal(mkdir(p, 0700), 0);
    uint8_t junk[16384];
    for (size_t i = 0; i < sizeof junk; i++)
        junk[i] = (uint8_t)(i * 2654435761u >> 13);
    write_file(p, "data.mdb", junk, sizeof junk);
    expect_refused(p, KVS_EINVAL, "not an LMDB environment", NULL);

    /* another program's LMDB environment (a key in the main database) */
    snprintf(p, sizeof p, "%s/other-lmdb", t.root);
    assert_int_equal(mkdir(p, 0700), 0);
    MDB_env *env = raw_open(p);
    MDB_txn *txn;
    MDB_dbi dbi;
    assert_int_equal(mdb_txn_begin(env, NULL, 0, &txn), 0);
    assert_int_equal(mdb_dbi_open(txn, NULL, 0, &dbi), 0);
    MDB_val k = {5, "hello"}, v = {5, "world"};
    assert_int_equal(mdb_put(txn, dbi, &k, &v, 0), 0);
    assert_int_equal(mdb_txn_commit(txn), 0);
    mdb_env_close(env);
    expect_refused(p, KVS_EINVAL, "not a kvstash data directory", NULL);

    /* an LMDB environment with a "meta" database that is not ours */
    snprintf(p, sizeof p, "%s/other-meta", t.root);
    assert_int_equal(mkdir(p, 0700), 0);
    env = raw_open(p);
    assert_int_equal(mdb_txn_begin(env, NULL, 0, &txn), 0);
    assert_int_equal(mdb_dbi_open(txn, "meta", MDB_CREATE, &dbi), 0);
    k = (MDB_val){6, "format"};
    v = (MDB_val){5, "other"};
    assert_int_equal(mdb_put(txn, dbi, &k, &v, 0), 0);
    assert_int_equal(mdb_txn_commit(txn), 0);
    mdb_env_close(env);
    expect_refused(p, KVS_EINVAL, "format mark", NULL);

    /* a directory with someone else's file */
    snprintf(p, sizeof p, "%s/notes", t.root);
    assert_int_equal(mkdir(p, 0700), 0);
    write_file(p, "notes.txt", "keep me", 7);
    expect_refused(p, KVS_EINVAL, "notes.txt", NULL);

    /* ours, but a format version from the future */
    kvs_disk_opts o = {.identity = "node-a"};
    snprintf(p, sizeof p, "%s/future", t.root);
    kvs_disk_close(open_ok(p, 1 << 20, &o));
    env = raw_open(p);
    assert_int_equal(mdb_txn_begin(env, NULL, 0, &txn), 0);
    assert_int_equal(mdb_dbi_open(txn, "meta", 0, &dbi), 0);
    k = (MDB_val){7, "version"};
    v = (MDB_val){4, "\x02\0\0\0"};
    assert_int_equal(mdb_put(txn, dbi, &k, &v, 0), 0);
    assert_int_equal(mdb_txn_commit(txn), 0);
    mdb_env_close(env);
    expect_refused(p, KVS_EPROTO, "format version 2", NULL);

    /* ours, with blocks, but data.mdb cut short */
    snprintf(p, sizeof p, "%s/truncated", t.root);
    kvs_disk *d = open_ok(p, 1 << 20, NULL);
    size_t len;
    uint8_t *b = make_block(1, 8, 1, &len);
    for (unsigned i = 0; i < 20; i++) {
        char key[32];
        key_of(key, "t", i);
        assert_int_equal(put1(d, 1, key, b, len, NULL), 0);
    }
    kvs_disk_close(d);
    free(b);
    char f[200];
    snprintf(f, sizeof f, "%s/data.mdb", p);
    assert_int_equal(truncate(f, 4 * 4096), 0);
    expect_refused(p, KVS_EPROTO, "truncated", NULL);

    /* another daemon's directory */
    snprintf(p, sizeof p, "%s/mine", t.root);
    kvs_disk_close(open_ok(p, 1 << 20, &o));
    kvs_disk_opts other = {.identity = "node-b"};
    expect_refused(p, KVS_EINVAL, "node-a", &other);

    /* already open */
    d = open_ok(p, 1 << 20, &o);
    expect_refused(p, KVS_EINVAL, "in use", &o);
    kvs_disk_close(d);

    /* a regular file, and a missing parent */
    snprintf(p, sizeof p, "%s/notes/notes.txt", t.root);
    kvs_err err;
    assert_int_equal(kvs_disk_open(p, 1 << 20, NULL, &d, &err), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "not a directory"));
    snprintf(p, sizeof p, "%s/no/such/dir", t.root);
    assert_int_equal(kvs_disk_open(p, 1 << 20, NULL, &d, &err), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "parent"));
    tmp_remove(&t);
}

/* A directory that holds our files but whose data.mdb is empty (a failed copy, a full
 * disk at the wrong moment) or missing beside a lock.mdb is refused untouched, like a
 * truncated one: it used to become a new, empty store silently (issue 10, fault 2).
 * opts.reset starts a new store there instead, keeping the old data.mdb aside. */
static void test_broken_data_file(void **state)
{
    tmpdir t;
    tmp_make(&t);
    char p[160], f[200];

    /* ours, then data.mdb emptied */
    snprintf(p, sizeof p, "%s/empty", t.root);
    kvs_disk *d = open_ok(p, 1 << 20, NULL);
    size_t len;
    uint8_t *b = make_block(1, 8, 1, &len);
    assert_int_equal(put1(d, 1, "k", b, len, NULL), 0);
    kvs_disk_close(d);
    snprintf(f, sizeof f, "%s/data.mdb", p);
    assert_int_equal(truncate(f, 0), 0);
    expect_refused(p, KVS_EPROTO, "data.mdb is empty", NULL);

    /* a lock.mdb without its data.mdb */
    char lp[160];
    snprintf(lp, sizeof lp, "%s/lockonly", t.root);
    assert_int_equal(mkdir(lp, 0700), 0);
    write_file(lp, "lock.mdb", "", 0);
    expect_refused(lp, KVS_EPROTO, "no data.mdb", NULL);

    /* reset: a new store, the old file kept as data.mdb.broken-<unix time> */
    kvs_disk_opts reset = {.reset_broken = true};
    d = open_ok(p, 1 << 20, &reset);
    seen s = {0};
    assert_int_equal(kvs_disk_scan(d, 0, seen_cb, &s, NULL, NULL), 0);
    assert_int_equal(s.n, 0);
    kvs_disk_close(d);
    DIR *dir = opendir(p);
    assert_non_null(dir);
    struct dirent *e;
    int kept = 0;
    while ((e = readdir(dir)) != NULL)
        kept += !strncmp(e->d_name, "data.mdb.broken-", 16);
    closedir(dir);
    assert_int_equal(kept, 1);
    /* reopening without the option: the new store, the kept file tolerated */
    d = open_ok(p, 1 << 20, NULL);
    assert_int_equal(put1(d, 1, "k2", b, len, NULL), 0);
    kvs_disk_close(d);

    /* reset also takes a truncated environment */
    snprintf(p, sizeof p, "%s/trunc", t.root);
    d = open_ok(p, 1 << 20, NULL);
    for (unsigned i = 0; i < 20; i++) {
        char key[32];
        key_of(key, "t", i);
        assert_int_equal(put1(d, 1, key, b, len, NULL), 0);
    }
    kvs_disk_close(d);
    snprintf(f, sizeof f, "%s/data.mdb", p);
    assert_int_equal(truncate(f, 4 * 4096), 0);
    kvs_disk_close(open_ok(p, 1 << 20, &reset));

    /* but never a directory that is not ours, nor another daemon's */
    snprintf(p, sizeof p, "%s/notes2", t.root);
    assert_int_equal(mkdir(p, 0700), 0);
    write_file(p, "notes.txt", "keep me", 7);
    expect_refused(p, KVS_EINVAL, "notes.txt", &reset);
    kvs_disk_opts a = {.identity = "node-a"},
                  b_reset = {.identity = "node-b", .reset_broken = true};
    snprintf(p, sizeof p, "%s/owned", t.root);
    kvs_disk_close(open_ok(p, 1 << 20, &a));
    expect_refused(p, KVS_EINVAL, "node-a", &b_reset);
    free(b);
    tmp_remove(&t);
}

/* The child writes batches of CR_BATCH blocks named "b<batch>-<i>" until killed, and
 * reports each committed batch number on the pipe after put_batch returns. */
#define CR_BATCH 64

static void crash_child(const char *dir, int wfd, uint8_t *const *tmpl, const size_t *len,
                        bool meta_lazy)
{
    /* Both lazy modes: kvstashd's (data synced, meta lazily) and the unsynced one. */
    kvs_disk_opts o = {.nosync = !meta_lazy, .nometasync = meta_lazy};
    kvs_disk *d = NULL;
    if (kvs_disk_open(dir, 256 << 20, &o, &d, NULL))
        _exit(2);
    static char keys[CR_BATCH][32];
    for (uint32_t batch = 0; batch < 100000; batch++) {
        kvs_disk_item items[CR_BATCH];
        for (unsigned i = 0; i < CR_BATCH; i++) {
            int n = snprintf(keys[i], 32, "b%u-%u", batch, i);
            items[i] = (kvs_disk_item){1, keys[i], (size_t)n, tmpl[i % 4], len[i % 4]};
        }
        if (kvs_disk_put_batch(d, items, CR_BATCH, NULL))
            _exit(3);
        if (write(wfd, &batch, sizeof batch) != sizeof batch)
            _exit(4);
    }
    _exit(0);
}

typedef struct crash_seen {
    unsigned *per_batch; /* blocks found per batch */
    unsigned batches;
    unsigned base; /* "base-<i>" blocks found */
} crash_seen;

static int crash_cb(const kvs_disk_entry *e, void *arg)
{
    crash_seen *s = arg;
    char k[80];
    memcpy(k, e->key, e->key_len);
    k[e->key_len] = 0;
    unsigned b, i;
    if (!strncmp(k, "base-", 5)) {
        s->base++;
    } else {
        assert_int_equal(sscanf(k, "b%u-%u", &b, &i), 2);
        assert_true(b < s->batches);
        s->per_batch[b]++;
    }
    return 0;
}

static void test_crash_during_write(void **state)
{
    tmpdir t;
    tmp_make(&t);
    uint8_t *tmpl[4];
    size_t len[4];
    for (int i = 0; i < 4; i++)
        tmpl[i] = make_block(1, 8, 500 + (uint64_t)i, &len[i]);
    kvs_disk *d = open_ok(t.data, 256 << 20, NULL);
    static char keys[200][32];
    kvs_disk_item items[200];
    for (unsigned i = 0; i < 200; i++)
        items[i] = (kvs_disk_item){1, keys[i], key_of(keys[i], "base", i), tmpl[i % 4], len[i % 4]};
    assert_int_equal(kvs_disk_put_batch(d, items, 200, NULL), 0);
    kvs_disk_close(d); /* LMDB: no environment open across fork() */

    srand(12345);
    unsigned acked_total = 0;
    for (int round = 0; round < 4; round++) {
        int fds[2];
        assert_int_equal(pipe(fds), 0);
        pid_t pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
            close(fds[0]);
            crash_child(t.data, fds[1], tmpl, len, round % 2 == 1);
        }
        close(fds[1]);
        /* Wait for a few commits, then kill at a random moment: most of the child's time
         * is spent inside write transactions. */
        unsigned want = 2 + (unsigned)rand() % 6, got = 0, batch, max_acked = 0;
        bool any = false;
        while (got < want && read(fds[0], &batch, sizeof batch) == sizeof batch) {
            got++;
            any = true;
            max_acked = batch;
        }
        usleep((useconds_t)(rand() % 3000));
        kill(pid, SIGKILL);
        int status;
        assert_int_equal(waitpid(pid, &status, 0), pid);
        assert_true(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
        while (read(fds[0], &batch, sizeof batch) == sizeof batch) {
            any = true;
            max_acked = batch;
        }
        close(fds[0]);
        assert_true(any);
        acked_total += max_acked + 1;

        /* Reopen: every block verifies; the base blocks and every acknowledged batch are
         * all there; each batch is there whole or not at all. */
        d = open_ok(t.data, 256 << 20, NULL);
        crash_seen s = {.per_batch = calloc(100000, sizeof(unsigned)), .batches = 100000};
        kvs_disk_scan_info info;
        kvs_err err;
        if (kvs_disk_scan(d, KVS_DISK_SCAN_VERIFY, crash_cb, &s, &info, &err))
            fail_msg("scan: %s", err.msg);
        assert_int_equal(info.dropped, 0);
        assert_int_equal(s.base, 200);
        for (unsigned b = 0; b <= max_acked; b++)
            assert_int_equal(s.per_batch[b], CR_BATCH);
        for (unsigned b = max_acked + 1; b < 100000; b++)
            assert_true(s.per_batch[b] == 0 || s.per_batch[b] == CR_BATCH);
        for (unsigned i = 0; i < 200; i += 37)
            expect_block(d, 1, keys[i], tmpl[i % 4], len[i % 4]);
        /* clear the child's blocks for the next round */
        kvs_disk_close(d);
        free(s.per_batch);
        d = open_ok(t.data, 256 << 20, NULL);
        kvs_disk_key dk[CR_BATCH];
        static char dkeys[CR_BATCH][32];
        for (unsigned b = 0; b < 100000; b++) {
            uint64_t gone = 0;
            for (unsigned i = 0; i < CR_BATCH; i++)
                dk[i] = (kvs_disk_key){1, dkeys[i], (size_t)snprintf(dkeys[i], 32, "b%u-%u", b, i)};
            assert_int_equal(kvs_disk_del(d, dk, CR_BATCH, &gone, NULL), 0);
            if (gone == 0)
                break;
        }
        kvs_disk_close(d);
    }
    assert_true(acked_total >= 8);
    for (int i = 0; i < 4; i++)
        free(tmpl[i]);
    tmp_remove(&t);
}

/* Readers on several threads (MDB_NOTLS: each get its own short read transaction) while
 * two writers put and delete: every get answers the right bytes or a miss. */
#define TH_KEYS 512

typedef struct th_ctx {
    kvs_disk *d;
    uint8_t *tmpl[4];
    size_t len[4];
    atomic_int stop;
    atomic_int failures;
    unsigned seed;
} th_ctx;

typedef struct th_arg {
    th_ctx *x;
    unsigned id;
} th_arg;

static void *th_writer(void *p)
{
    th_arg *a = p;
    th_ctx *x = a->x;
    unsigned r = a->id * 7919u;
    char keys[16][32];
    while (!atomic_load(&x->stop)) {
        kvs_disk_item items[16];
        kvs_disk_key dk[16];
        for (unsigned i = 0; i < 16; i++) {
            r = r * 1103515245u + 12345u;
            unsigned k = (r >> 8) % TH_KEYS;
            size_t n = key_of(keys[i], "th", k);
            items[i] = (kvs_disk_item){1, keys[i], n, x->tmpl[k % 4], x->len[k % 4]};
            dk[i] = (kvs_disk_key){1, keys[i], n};
        }
        kvs_err err;
        if (kvs_disk_put_batch(x->d, items, 16, &err) ||
            kvs_disk_del(x->d, dk, (r >> 4) % 8, NULL, &err))
            atomic_fetch_add(&x->failures, 1);
    }
    return NULL;
}

static void *th_reader(void *p)
{
    th_arg *a = p;
    th_ctx *x = a->x;
    unsigned r = a->id * 104729u;
    while (!atomic_load(&x->stop)) {
        r = r * 1103515245u + 12345u;
        unsigned k = (r >> 8) % TH_KEYS;
        char key[32];
        key_of(key, "th", k);
        copy c = {0};
        int rc = kvs_disk_get(x->d, 1, key, strlen(key), copy_cb, &c, NULL);
        if (rc == 0 && (c.len != x->len[k % 4] || memcmp(c.bytes, x->tmpl[k % 4], c.len)))
            atomic_fetch_add(&x->failures, 1);
        else if (rc != 0 && rc != KVS_ENOTFOUND)
            atomic_fetch_add(&x->failures, 1);
        free(c.bytes);
    }
    return NULL;
}

static void test_threads(void **state)
{
    tmpdir t;
    tmp_make(&t);
    static th_ctx x;
    kvs_disk_opts o = {.nosync = true};
    x.d = open_ok(t.data, 64 << 20, &o);
    for (int i = 0; i < 4; i++)
        x.tmpl[i] = make_block(1, 1 + 2 * (uint32_t)i, 900 + (uint64_t)i, &x.len[i]);
    pthread_t th[6];
    th_arg args[6];
    for (unsigned i = 0; i < 6; i++) {
        args[i] = (th_arg){&x, i + 1};
        assert_int_equal(pthread_create(&th[i], NULL, i < 2 ? th_writer : th_reader, &args[i]), 0);
    }
    usleep(500 * 1000);
    atomic_store(&x.stop, 1);
    for (unsigned i = 0; i < 6; i++)
        pthread_join(th[i], NULL);
    assert_int_equal(atomic_load(&x.failures), 0);
    kvs_disk_stats st;
    assert_int_equal(kvs_disk_get_stats(x.d, &st, NULL), 0);
    assert_int_equal(st.write_errors + st.read_errors + st.checksum_failures, 0);
    kvs_disk_scan_info info;
    seen s = {.hits = calloc(TH_KEYS, 1), .max = TH_KEYS};
    assert_int_equal(kvs_disk_scan(x.d, KVS_DISK_SCAN_VERIFY, seen_cb, &s, &info, NULL), 0);
    assert_int_equal(info.blocks, st.blocks);
    assert_int_equal(info.dropped, 0);
    free(s.hits);
    kvs_disk_close(x.d);
    for (int i = 0; i < 4; i++)
        free(x.tmpl[i]);
    tmp_remove(&t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_create_and_reopen),  cmocka_unit_test(test_roundtrip_batches),
        cmocka_unit_test(test_put_checks),         cmocka_unit_test(test_restart_and_scan),
        cmocka_unit_test(test_ns_records),         cmocka_unit_test(test_corrupt_blocks_dropped),
        cmocka_unit_test(test_map_full),           cmocka_unit_test(test_room_check),
        cmocka_unit_test(test_write_errors),       cmocka_unit_test(test_durable),
        cmocka_unit_test(test_foreign_refused),    cmocka_unit_test(test_broken_data_file),
        cmocka_unit_test(test_crash_during_write), cmocka_unit_test(test_threads),
    };
    return cmocka_run_group_tests(tests, setup_codecs, teardown_codecs);
}
