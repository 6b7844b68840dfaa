/* kvs-disk-scan-bench: how fast the disk tier (storage/disk.h) takes blocks in and how
 * long its startup scan (what the store's index rebuild reads) takes, issue 5 item 2.
 *
 *   kvs-disk-scan-bench [--dir DIR] [--blocks N] [--batch B] [--layers L] [--heads H]
 *                       [--head-dim D] [--tokens T] [--codec NAME] [--nosync | --nometasync]
 * [--verify]
 *                       [--keep]
 *
 * Blocks are real encoded blocks (kvs_block_encode of Gaussian fp16 data): 64 distinct
 * ones of the given layout and codec (default L=2 H=1 D=128 T=16, codec kivi-2: 3668
 * bytes, one 4 KiB LMDB page each), stored N times (default 1,000,000) under 16-byte
 * pseudo-random keys (like the client's chained keys: random in LMDB's key order), in
 * batches of B (default 1000) per write transaction, synced commits unless --nosync
 * (MDB_NOSYNC) or --nometasync (MDB_NOMETASYNC: what kvstashd uses).
 *
 * Reported (wall time, CLOCK_MONOTONIC):
 *  - put: blocks/s and MB/s (10^6 bytes of encoded blocks) over all batches, plus a
 *    final kvs_disk_sync;
 *  - open + scan warm: data.mdb in the page cache (right after the puts);
 *  - open + scan cold: data.mdb dropped from the page cache first (posix_fadvise
 *    DONTNEED after close; the share still resident is measured with mincore and
 *    printed), as after a reboot;
 *  - with --verify, a warm scan with KVS_DISK_SCAN_VERIFY (every checksum: kvctl verify).
 * The scan callback only sums tokens and bytes: the store's own index inserts are not
 * included. The directory (default: a fresh one under /tmp) is removed unless --keep.
 *
 * Exit status: 0; 1 if any step fails or a scan does not see every block exactly as
 * many times as stored (counts and byte sums are checked); 2 for usage errors.
 * Single-threaded.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "gpu/codec/codec.h"
#include "gpu/codec/rng.h"
#include "gpu/codec/spec.h"
#include "storage/disk.h"

#define TEMPLATES 64

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Block i's 16-byte key. */
static void key_of(uint64_t i, uint8_t out[16])
{
    uint64_t s = i, a = kvs_splitmix64(&s), b = kvs_splitmix64(&s);
    memcpy(out, &a, 8);
    memcpy(out + 8, &b, 8);
}

static bool parse_u64(const char *s, uint64_t lo, uint64_t hi, uint64_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || *end || end == s || v < lo || v > hi)
        return false;
    *out = v;
    return true;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: kvs-disk-scan-bench [--dir DIR] [--blocks N] [--batch B] [--layers L]\n"
               "           [--heads H] [--head-dim D] [--tokens T] [--codec NAME] [--nosync | "
               "--nometasync]\n"
               "           [--verify] [--keep]\n");
}

typedef struct scan_sum {
    uint64_t blocks, bytes, tokens;
} scan_sum;

static int sum_cb(const kvs_disk_entry *e, void *arg)
{
    scan_sum *s = arg;
    s->blocks++;
    s->bytes += e->bytes;
    s->tokens += e->tokens;
    return 0;
}

/* Share of data.mdb's pages resident in the page cache (mincore), or -1. */
static double resident_share(const char *dir)
{
    char p[4096 + 16];
    snprintf(p, sizeof p, "%s/data.mdb", dir);
    int fd = open(p, O_RDONLY);
    if (fd < 0)
        return -1;
    struct stat st;
    double share = -1;
    if (fstat(fd, &st) == 0 && st.st_size > 0) {
        void *m = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
        if (m != MAP_FAILED) {
            long pg = sysconf(_SC_PAGESIZE);
            size_t n = ((size_t)st.st_size + (size_t)pg - 1) / (size_t)pg, in = 0;
            unsigned char *vec = malloc(n);
            if (vec && mincore(m, (size_t)st.st_size, vec) == 0) {
                for (size_t i = 0; i < n; i++)
                    in += vec[i] & 1;
                share = (double)in / (double)n;
            }
            free(vec);
            munmap(m, (size_t)st.st_size);
        }
    }
    close(fd);
    return share;
}

static int drop_cache(const char *dir)
{
    char p[4096 + 16];
    snprintf(p, sizeof p, "%s/data.mdb", dir);
    int fd = open(p, O_RDONLY);
    if (fd < 0)
        return -1;
    int rc = fdatasync(fd) || posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    close(fd);
    return rc;
}

static int rm_one(const char *p, const struct stat *st, int flag, struct FTW *ftw)
{
    return remove(p);
}

/* Opens, scans (flags), closes; prints one line; checks the sums. */
static int timed_scan(const char *label, const char *dir, uint64_t map, unsigned flags,
                      uint64_t want_blocks, uint64_t want_bytes, uint64_t want_tokens)
{
    kvs_disk_opts o = {.map_bytes = map};
    kvs_disk *d;
    kvs_err err;
    double t0 = now_s();
    if (kvs_disk_open(dir, 1, &o, &d, &err)) {
        fprintf(stderr, "open: %s\n", err.msg);
        return 1;
    }
    double t1 = now_s();
    scan_sum s = {0};
    kvs_disk_scan_info info;
    if (kvs_disk_scan(d, flags, sum_cb, &s, &info, &err)) {
        fprintf(stderr, "scan: %s\n", err.msg);
        kvs_disk_close(d);
        return 1;
    }
    double t2 = now_s();
    kvs_disk_close(d);
    printf("%-12s open %.3f s, scan %.2f s (%.0f blocks/s, %.0f MB/s of blocks), %" PRIu64
           " blocks, %" PRIu64 " dropped\n",
           label, t1 - t0, t2 - t1, (double)s.blocks / (t2 - t1), (double)s.bytes / 1e6 / (t2 - t1),
           s.blocks, info.dropped);
    if (s.blocks != want_blocks || s.bytes != want_bytes || s.tokens != want_tokens) {
        fprintf(stderr,
                "%s: saw %" PRIu64 " blocks / %" PRIu64 " bytes / %" PRIu64
                " tokens, stored %" PRIu64 " / %" PRIu64 " / %" PRIu64 "\n",
                label, s.blocks, s.bytes, s.tokens, want_blocks, want_bytes, want_tokens);
        return 1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    const char *dir_arg = NULL, *codec = "kivi-2";
    uint64_t n = 1000000, batch = 1000, L = 2, H = 1, D = 128, T = 16;
    bool nosync = false, nometasync = false, verify = false, keep = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        bool more = i + 1 < argc;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--nosync")) {
            nosync = true;
        } else if (!strcmp(a, "--nometasync")) {
            nometasync = true;
        } else if (!strcmp(a, "--verify")) {
            verify = true;
        } else if (!strcmp(a, "--keep")) {
            keep = true;
        } else if (more && !strcmp(a, "--dir")) {
            dir_arg = argv[++i];
        } else if (more && !strcmp(a, "--codec")) {
            codec = argv[++i];
        } else if (!(more &&
                     ((!strcmp(a, "--blocks") && parse_u64(argv[i + 1], 1, 1ull << 32, &n)) ||
                      (!strcmp(a, "--batch") && parse_u64(argv[i + 1], 1, 1 << 20, &batch)) ||
                      (!strcmp(a, "--layers") && parse_u64(argv[i + 1], 1, KVS_MAX_LAYERS, &L)) ||
                      (!strcmp(a, "--heads") && parse_u64(argv[i + 1], 1, KVS_MAX_KV_HEADS, &H)) ||
                      (!strcmp(a, "--head-dim") &&
                       parse_u64(argv[i + 1], 16, KVS_MAX_HEAD_DIM, &D)) ||
                      (!strcmp(a, "--tokens") &&
                       parse_u64(argv[i + 1], 1, KVS_MAX_BLOCK_TOKENS, &T))))) {
            usage(stderr);
            return 2;
        } else {
            i++;
        }
    }

    kvs_ns_spec spec = {.layers = (uint32_t)L,
                        .kv_heads = (uint32_t)H,
                        .head_dim = (uint32_t)D,
                        .block_tokens = (uint32_t)T,
                        .dtype = KVS_DTYPE_FP16,
                        .seed = 1};
    snprintf(spec.name, sizeof spec.name, "bench");
    snprintf(spec.key_codec, sizeof spec.key_codec, "%s", codec);
    snprintf(spec.value_codec, sizeof spec.value_codec, "%s", codec);
    kvs_err err;
    kvs_codec *kc, *vc;
    if (kvs_spec_validate(&spec, &err) || kvs_codec_create(&spec, KVS_KEYS, NULL, &kc, &err) ||
        kvs_codec_create(&spec, KVS_VALUES, NULL, &vc, &err)) {
        fprintf(stderr, "namespace: %s\n", err.msg);
        return 2;
    }
    /* 64 distinct blocks of full length. */
    size_t elems = (size_t)L * 2 * T * H * D, cap = kvs_block_encoded_max(kc, vc, (uint32_t)T);
    uint16_t *raw = malloc(elems * 2);
    uint8_t *tmpl[TEMPLATES];
    size_t len[TEMPLATES];
    kvs_rng rng;
    kvs_rng_init(&rng, 42, 0, 0, 0, 0);
    for (int t = 0; t < TEMPLATES; t++) {
        for (size_t e = 0; e < elems; e++) {
            /* fp16 in [-2, 2): sign, exponent 13..15, random mantissa: finite, no NaN */
            uint64_t r = kvs_rng_next(&rng);
            raw[e] = (uint16_t)((r & 0x8000) | (uint16_t)(13 + (r >> 16) % 3) << 10 |
                                ((r >> 24) & 0x3ff));
        }
        tmpl[t] = malloc(cap);
        if (kvs_block_encode(kc, vc, 1, (uint32_t)T, raw, tmpl[t], cap, &len[t], &err)) {
            fprintf(stderr, "encode: %s\n", err.msg);
            return 1;
        }
    }
    free(raw);

    char dir[4096];
    char root[64] = "";
    if (dir_arg) {
        snprintf(dir, sizeof dir, "%s", dir_arg);
    } else {
        snprintf(root, sizeof root, "/tmp/kvs-disk-bench-XXXXXX");
        if (!mkdtemp(root)) {
            perror("mkdtemp");
            return 1;
        }
        snprintf(dir, sizeof dir, "%s/data", root);
    }
    /* Map: every block may take ceil((len + 16) / 4096) pages, plus 30 % and 256 MiB for
     * the B-tree, the free list and COW slack. */
    uint64_t pages = (len[0] + 16 + 4095) / 4096;
    uint64_t map = n * pages * 4096 / 10 * 13 + (256ull << 20);
    kvs_disk_opts o = {.map_bytes = map, .nosync = nosync, .nometasync = nometasync};
    kvs_disk *d;
    if (kvs_disk_open(dir, 1, &o, &d, &err)) {
        fprintf(stderr, "open: %s\n", err.msg);
        return 1;
    }
    printf("kvs-disk-scan-bench: %" PRIu64 " blocks of %zu bytes (L=%" PRIu64 " H=%" PRIu64
           " D=%" PRIu64 " T=%" PRIu64 " %s, %" PRIu64 " LMDB page(s) each), batches of %" PRIu64
           ", %s commits, map %" PRIu64 " MiB, in %s\n",
           n, len[0], L, H, D, T, codec, pages, batch,
           nosync       ? "unsynced"
           : nometasync ? "data-synced (kvstashd's)"
                        : "synced",
           map >> 20, dir);

    kvs_disk_item *items = malloc(batch * sizeof *items);
    uint8_t(*keys)[16] = malloc(batch * 16);
    uint64_t want_bytes = 0, want_tokens = 0;
    double t0 = now_s();
    for (uint64_t at = 0; at < n; at += batch) {
        uint64_t m = n - at < batch ? n - at : batch;
        for (uint64_t j = 0; j < m; j++) {
            int t = (int)((at + j) % TEMPLATES);
            key_of(at + j, keys[j]);
            items[j] = (kvs_disk_item){1, keys[j], 16, tmpl[t], len[t]};
            want_bytes += len[t];
            want_tokens += T;
        }
        if (kvs_disk_put_batch(d, items, (size_t)m, &err)) {
            fprintf(stderr, "put at block %" PRIu64 ": %s\n", at, err.msg);
            return 1;
        }
    }
    if (kvs_disk_sync(d, &err)) {
        fprintf(stderr, "sync: %s\n", err.msg);
        return 1;
    }
    double t1 = now_s();
    kvs_disk_stats st;
    kvs_disk_get_stats(d, &st, NULL);
    printf("put          %.2f s: %.0f blocks/s, %.1f MB/s of blocks; data.mdb %.2f GiB used of "
           "%.2f GiB file (%.2f bytes of file per byte of block)\n",
           t1 - t0, (double)n / (t1 - t0), (double)want_bytes / 1e6 / (t1 - t0),
           (double)st.used_bytes / (1 << 30), (double)st.file_bytes / (1 << 30),
           (double)st.file_bytes / (double)want_bytes);
    kvs_disk_close(d);
    free(items);
    free(keys);

    int rc = timed_scan("scan warm", dir, map, 0, n, want_bytes, want_tokens);
    if (!rc) {
        if (drop_cache(dir))
            fprintf(stderr, "warning: could not drop data.mdb from the page cache\n");
        printf("             data.mdb resident in the page cache before the cold scan: %.1f %%\n",
               100 * resident_share(dir));
        rc = timed_scan("scan cold", dir, map, 0, n, want_bytes, want_tokens);
    }
    if (!rc)
        rc = timed_scan("scan warm", dir, map, 0, n, want_bytes, want_tokens);
    if (!rc && verify)
        rc = timed_scan("verify warm", dir, map, KVS_DISK_SCAN_VERIFY, n, want_bytes, want_tokens);
    if (!keep && !dir_arg)
        nftw(root, rm_one, 16, FTW_DEPTH | FTW_PHYS);
    for (int t = 0; t < TEMPLATES; t++)
        free(tmpl[t]);
    kvs_codec_destroy(kc);
    kvs_codec_destroy(vc);
    return rc;
}
