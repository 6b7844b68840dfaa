/* What of the store survives a restart besides its blocks: namespace specs and learned
 * codec states, recorded as namespace records of the disk tier (storage/disk.h), and the
 * restore at start that recreates namespaces and the index of their blocks.
 *
 * Records of namespace id N (kvs_disk_ns_put: committed and flushed before returning):
 *   ""                  the spec, one line of text (kvs__persist_ns_put)
 *   "K" + u32 BE v      key codec state version v (v >= 1)
 *   "V" + u32 BE v      value codec state version v
 * Big-endian versions make LMDB list a namespace's states oldest first, the order in
 * which they must be published again. A state record's value:
 *   offset 0  4  magic "KST1"     4  4  version (u32 LE, = the one in the name)
 *          8  8  n (u64 LE)      16  8  XXH3-64 of the n state bytes (u64 LE)
 *         24  n  the state bytes, as the codec defines them (kvs_codec_state.data)
 * A state is recorded before it is published (gpu/codec/learn.h), so every block on disk
 * was encoded with recorded states. A state record that is unreadable is logged and
 * skipped; the blocks encoded with it are still indexed (they keep their place in the
 * budget and can be evicted, deleted and dropped): an encoded Get serves their bytes, and
 * a decoding Get decodes them only if the codec ignores the state (SQuat, KIVI, ...),
 * never with a wrong state, and answers DATA_LOSS otherwise.
 * Records of an id without a spec (a namespace dropped while one of its states was
 * being recorded) are deleted at start, and no new namespace reuses that id meanwhile.
 * Blocks that can never be served -- of a namespace that has no spec, or whose token
 * count does not fit their namespace -- are deleted once the index is rebuilt (logged
 * and counted), rather than left on disk outside the index.
 *
 * Threading: record writes run on the caller's thread (namespace create, the learner's
 * publishing thread) with no store lock held; the restore runs inside kvs_store_create,
 * before any other thread uses the store.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <xxhash.h>

#include "gpu/base/mem.h"
#include "gpu/codec/format.h"
#include "gpu/codec/learn.h"
#include "storage/store_int.h"

#define STATE_MAGIC "KST1"
#define STATE_HDR 24
#define ORPHANS_MAX 64 /* orphan namespace ids deleted per start (more: next start) */

/* Spec record (name ""): one line of text, versioned, so a reader never depends on a C
 * struct's layout:
 *   "kvs-ns 2 NAME L H D T DTYPE KCODEC VCODEC PRE_ROPE DURABLE SEED QUOTA"
 *   "kvs-ns 3 <the same> SAMPLE MAX_REL_ERROR FALLBACK"
 *   "kvs-ns 4 <version 3's fields> GPU_QUOTA DISK_QUOTA"
 *   "kvs-ns 5 <version 4's fields> HOST_CODEC DISK_CODEC"
 * Version 1, written before host quotas, lacks QUOTA (read as no quota). Version 3 adds the
 * fidelity options (gpu/codec/spec.h): SAMPLE is error_sample ("-" when unset: the
 * daemon's --error-sample), the two doubles in C's round-trip %.17g, FALLBACK "-" for
 * none. Version 4 adds the gpu and disk quotas (0: none), version 5 the tier codecs of
 * precision demotion ("-" for none). Each is written only for a namespace that needs it
 * (3: a fidelity option set; 4: a gpu or disk quota; 5: a tier codec; with the earlier
 * versions' fields as they are), so a build that reads the older versions alone still
 * restores every other namespace. */
int kvs__persist_ns_put(kvs_store *st, kvs_ns *ns, kvs_err *err)
{
    const kvs_ns_spec *s = kvs_ns_spec_of(ns);
    char line[640], fid[160] = "", quotas[48] = "", tiers[80] = "";
    bool v5 = s->host_codec[0] || s->disk_codec[0];
    bool v4 = v5 || s->gpu_quota || s->disk_quota;
    bool v3 = v4 || s->error_sample_set || s->max_rel_error > 0;
    if (v3) {
        char sample[40] = "-";
        if (s->error_sample_set)
            snprintf(sample, sizeof sample, "%.17g", s->error_sample);
        snprintf(fid, sizeof fid, " %s %.17g %s", sample, s->max_rel_error,
                 s->fallback_codec[0] ? s->fallback_codec : "-");
    }
    if (v4)
        snprintf(quotas, sizeof quotas, " %llu %llu", (unsigned long long)s->gpu_quota,
                 (unsigned long long)s->disk_quota);
    if (v5)
        snprintf(tiers, sizeof tiers, " %s %s", s->host_codec[0] ? s->host_codec : "-",
                 s->disk_codec[0] ? s->disk_codec : "-");
    int n = snprintf(line, sizeof line, "kvs-ns %d %s %u %u %u %u %d %s %s %d %d %llu %llu%s%s%s",
                     v5   ? 5
                     : v4 ? 4
                     : v3 ? 3
                          : 2,
                     s->name, s->layers, s->kv_heads, s->head_dim, s->block_tokens, (int)s->dtype,
                     s->key_codec, s->value_codec, s->keys_pre_rope, s->durable,
                     (unsigned long long)s->seed, (unsigned long long)s->host_quota, fid, quotas,
                     tiers);
    int rc = kvs_disk_ns_put(st->disk, kvs_ns_id(ns), "", 0, line, (size_t)n, err);
    return rc ? kvs_err_prefix(err, "namespace '%s': recording it on disk", s->name) : 0;
}

static void put_le32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void put_le64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t get_le(const uint8_t *p, int n)
{
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

int kvs__persist_state_put(void *ctx, void *owner, kvs_kv kv, const kvs_codec_state *state,
                           kvs_err *err)
{
    kvs_store *st = ctx;
    kvs_ns *ns = owner;
    const char *name = kvs_ns_spec_of(ns)->name;
    if (!st->disk)
        return 0;
    uint8_t rec[5] = {kv == KVS_KEYS ? 'K' : 'V', (uint8_t)(state->version >> 24),
                      (uint8_t)(state->version >> 16), (uint8_t)(state->version >> 8),
                      (uint8_t)state->version};
    uint8_t *val = kvs_trymalloc(STATE_HDR + state->len);
    if (!val)
        return kvs_err_set(err, KVS_ENOMEM,
                           "namespace '%s': codec state %u: cannot allocate "
                           "%zu bytes to record it",
                           name, state->version, state->len);
    memcpy(val, STATE_MAGIC, 4);
    put_le32(val + 4, state->version);
    put_le64(val + 8, state->len);
    put_le64(val + 16, XXH3_64bits(state->data, state->len));
    if (state->len)
        memcpy(val + STATE_HDR, state->data, state->len);
    int rc =
        kvs_disk_ns_put(st->disk, kvs_ns_id(ns), rec, sizeof rec, val, STATE_HDR + state->len, err);
    free(val);
    if (rc)
        return kvs_err_prefix(err, "namespace '%s': recording %s codec state %u on disk", name,
                              kv == KVS_KEYS ? "key" : "value", state->version);
    kvs__store_log(st, KVS_LOG_INFO, "namespace '%s': %s codec state %u (%zu bytes) recorded", name,
                   kv == KVS_KEYS ? "key" : "value", state->version, state->len);
    return 0;
}

/* The fidelity fields of a version 3 record (kvs__persist_ns_put); -1 if malformed. */
static int parse_fidelity(const char *sample, const char *maxerr, const char *fallback,
                          kvs_ns_spec *s)
{
    char *end;
    if (strcmp(sample, "-") != 0) {
        s->error_sample_set = true;
        s->error_sample = strtod(sample, &end);
        if (*end)
            return -1;
    }
    s->max_rel_error = strtod(maxerr, &end);
    if (*end || strlen(fallback) > KVS_CODEC_NAME_MAX)
        return -1;
    if (strcmp(fallback, "-") != 0)
        strcpy(s->fallback_codec, fallback);
    return 0;
}

/* A tier codec of a version 4 record ("-": none); -1 if too long. */
static int parse_tier(const char *c, char *out)
{
    if (strlen(c) > KVS_CODEC_NAME_MAX)
        return -1;
    if (strcmp(c, "-") != 0)
        strcpy(out, c);
    return 0;
}

static int parse_spec(const void *val, size_t len, kvs_ns_spec *s)
{
    char line[640], name[KVS_NAME_MAX + 2], kc[KVS_CODEC_NAME_MAX + 2], vc[KVS_CODEC_NAME_MAX + 2];
    char sample[40], maxerr[40], fb[KVS_CODEC_NAME_MAX + 2];
    char hc[KVS_CODEC_NAME_MAX + 2], dc[KVS_CODEC_NAME_MAX + 2];
    if (len >= sizeof line)
        return -1;
    memcpy(line, val, len);
    line[len] = 0;
    int dtype, pre, dur, version;
    unsigned long long seed, quota = 0, gpu_quota = 0, disk_quota = 0;
    char tail;
    memset(s, 0, sizeof *s);
    /* Widths one over the maxima, so an over-long field is caught by validation. */
    if (sscanf(line, "kvs-ns %d ", &version) != 1 || version < 1 || version > 5)
        return -1;
    int got =
        version == 1   ? sscanf(line, "kvs-ns 1 %65s %u %u %u %u %d %32s %32s %d %d %llu%c", name,
                                &s->layers, &s->kv_heads, &s->head_dim, &s->block_tokens, &dtype, kc,
                                vc, &pre, &dur, &seed, &tail)
        : version == 2 ? sscanf(line, "kvs-ns 2 %65s %u %u %u %u %d %32s %32s %d %d %llu %llu%c",
                                name, &s->layers, &s->kv_heads, &s->head_dim, &s->block_tokens,
                                &dtype, kc, vc, &pre, &dur, &seed, &quota, &tail)
        : version == 3
            ? sscanf(line,
                     "kvs-ns 3 %65s %u %u %u %u %d %32s %32s %d %d %llu %llu %39s %39s "
                     "%32s%c",
                     name, &s->layers, &s->kv_heads, &s->head_dim, &s->block_tokens, &dtype, kc, vc,
                     &pre, &dur, &seed, &quota, sample, maxerr, fb, &tail)
        : version == 4
            ? sscanf(line,
                     "kvs-ns 4 %65s %u %u %u %u %d %32s %32s %d %d %llu %llu %39s %39s "
                     "%32s %llu %llu%c",
                     name, &s->layers, &s->kv_heads, &s->head_dim, &s->block_tokens, &dtype, kc, vc,
                     &pre, &dur, &seed, &quota, sample, maxerr, fb, &gpu_quota, &disk_quota, &tail)
            : sscanf(line,
                     "kvs-ns 5 %65s %u %u %u %u %d %32s %32s %d %d %llu %llu %39s %39s "
                     "%32s %llu %llu %32s %32s%c",
                     name, &s->layers, &s->kv_heads, &s->head_dim, &s->block_tokens, &dtype, kc, vc,
                     &pre, &dur, &seed, &quota, sample, maxerr, fb, &gpu_quota, &disk_quota, hc, dc,
                     &tail);
    if (got != (version == 1   ? 11
                : version == 2 ? 12
                : version == 3 ? 15
                : version == 4 ? 17
                               : 19) ||
        strlen(name) > KVS_NAME_MAX || strlen(kc) > KVS_CODEC_NAME_MAX ||
        strlen(vc) > KVS_CODEC_NAME_MAX)
        return -1;
    if (version >= 3 && parse_fidelity(sample, maxerr, fb, s))
        return -1;
    if (version == 5 && (parse_tier(hc, s->host_codec) || parse_tier(dc, s->disk_codec)))
        return -1;
    strcpy(s->name, name);
    strcpy(s->key_codec, kc);
    strcpy(s->value_codec, vc);
    s->dtype = (kvs_dtype)dtype;
    s->keys_pre_rope = pre != 0;
    s->durable = dur != 0;
    s->seed = seed;
    s->host_quota = quota;
    s->gpu_quota = gpu_quota;
    s->disk_quota = disk_quota;
    return 0;
}

typedef struct restore {
    kvs_store *st;
    kvs_err *err;
    uint32_t namespaces, states, bad_states;
    uint32_t orphans[ORPHANS_MAX];
    size_t norphans;
    kvs_ns *last; /* cache: blocks come in namespace order */
    uint64_t linked, unknown_state;
    kvs_disk_key *dead; /* unservable blocks, deleted after the scan (keys in dead_keys) */
    uint8_t (*dead_keys)[KVS_KEY_MAX];
    size_t ndead, dead_cap;
    uint64_t dead_lost; /* unservable blocks that could not be listed (memory) */
} restore;

/* Remembers an unservable block for deletion after the scan. */
static void note_dead(restore *r, const kvs_disk_entry *e)
{
    if (e->key_len < 1 || e->key_len > KVS_KEY_MAX) { /* the disk module's checks prevent it */
        r->dead_lost++;
        return;
    }
    if (r->ndead == r->dead_cap) {
        size_t cap = r->dead_cap ? 2 * r->dead_cap : 64;
        kvs_disk_key *k = realloc(r->dead, cap * sizeof *k);
        if (k)
            r->dead = k;
        uint8_t(*b)[KVS_KEY_MAX] = k ? realloc(r->dead_keys, cap * sizeof *b) : NULL;
        if (b)
            r->dead_keys = b;
        if (!k || !b) {
            r->dead_lost++; /* stays on disk, outside the index, until a later start */
            return;
        }
        r->dead_cap = cap;
    }
    memcpy(r->dead_keys[r->ndead], e->key, e->key_len);
    r->dead[r->ndead] = (kvs_disk_key){e->ns_id, NULL, e->key_len};
    r->ndead++;
}

/* A state record of namespace ns: checked, then published on it and handed to its
 * learner. KVS_EPROTO (err filled) if it cannot be used. */
static int restore_state(restore *r, kvs_ns *ns, kvs_kv kv, uint32_t version, const uint8_t *val,
                         size_t len, kvs_err *err)
{
    if (len < STATE_HDR || memcmp(val, STATE_MAGIC, 4) != 0 || get_le(val + 4, 4) != version ||
        get_le(val + 8, 8) != len - STATE_HDR)
        return kvs_err_set(err, KVS_EPROTO, "not a codec state record this version reads");
    if (get_le(val + 16, 8) != XXH3_64bits(val + STATE_HDR, len - STATE_HDR))
        return kvs_err_set(err, KVS_EPROTO, "checksum mismatch");
    kvs_codec_state cs = {version, val + STATE_HDR, len - STATE_HDR};
    kvs_codec *c;
    int rc = kvs_codec_create(kvs_ns_spec_of(ns), kv, &cs, &c, err);
    if (rc == 0) {
        kvs__store_codec_prepare(r->st, c);
        pthread_mutex_lock(&r->st->mu); /* publishers are serialized (ns.h) */
        rc = kvs_ns_codec_publish(ns, kv, c, err);
        pthread_mutex_unlock(&r->st->mu);
        if (rc)
            kvs_codec_destroy(c);
    }
    if (rc == 0)
        rc = kvs_learn_restore(kvs_ns_learner(ns), kv, &cs, err);
    return rc ? KVS_EPROTO : 0;
}

static int on_ns_record(uint32_t ns_id, const void *rec, size_t rec_len, const void *val,
                        size_t val_len, void *arg)
{
    restore *r = arg;
    kvs_store *st = r->st;
    const uint8_t *name = rec;
    if (rec_len == 5 && (name[0] == 'K' || name[0] == 'V')) {
        uint32_t version =
            (uint32_t)name[1] << 24 | (uint32_t)name[2] << 16 | (uint32_t)name[3] << 8 | name[4];
        pthread_mutex_lock(&st->mu);
        kvs_ns *ns = kvs_ns_registry_find_id(st->reg, ns_id);
        pthread_mutex_unlock(&st->mu);
        if (!ns) { /* the spec sorts first: there is none */
            if (r->norphans == 0 || r->orphans[r->norphans - 1] != ns_id) {
                if (r->norphans < ORPHANS_MAX)
                    r->orphans[r->norphans++] = ns_id;
                /* Never hand this id out again before its records are gone. */
                pthread_mutex_lock(&st->mu);
                kvs_ns_registry_set_next_id(st->reg, ns_id + 1);
                pthread_mutex_unlock(&st->mu);
            }
            return 0;
        }
        kvs_kv kv = name[0] == 'K' ? KVS_KEYS : KVS_VALUES;
        kvs_err e2;
        if (restore_state(r, ns, kv, version, val, val_len, &e2)) {
            r->bad_states++;
            kvs__store_log(st, KVS_LOG_ERROR,
                           "disk tier %s: namespace '%s': %s codec state %u "
                           "skipped (blocks encoded with it cannot be decoded): %s",
                           kvs_disk_path(st->disk), kvs_ns_spec_of(ns)->name,
                           kv == KVS_KEYS ? "key" : "value", version, e2.msg);
        } else {
            r->states++;
        }
        return 0;
    }
    if (rec_len != 0)
        return 0; /* a record a later version may write: not ours to judge */
    kvs_ns_spec spec;
    if (parse_spec(val, val_len, &spec))
        return kvs_err_set(r->err, KVS_EPROTO,
                           "disk tier %s: namespace record %u is not a "
                           "spec this version reads",
                           kvs_disk_path(st->disk), ns_id);
    kvs_ns *ns;
    int rc = kvs__store_ns_add(st, &spec, ns_id, kvs__persist_state_put, &ns, r->err);
    if (rc)
        return kvs_err_prefix(r->err, "disk tier %s: namespace %u", kvs_disk_path(st->disk), ns_id);
    kvs_ns_unref(ns);
    r->namespaces++;
    return 0;
}

/* Startup only (no other thread uses the store yet): taking the store lock inside the
 * scan's read transaction cannot wait on anything. */
static int on_block(const kvs_disk_entry *e, void *arg)
{
    restore *r = arg;
    kvs_store *st = r->st;
    pthread_mutex_lock(&st->mu);
    kvs_ns *ns = r->last && kvs_ns_id(r->last) == e->ns_id
                     ? r->last
                     : kvs_ns_registry_find_id(st->reg, e->ns_id);
    r->last = ns;
    uint64_t raw = 0;
    if (!ns || e->key_len < 1 || e->key_len > KVS_KEY_MAX ||
        kvs_spec_block_bytes(kvs_ns_spec_of(ns), e->tokens, &raw, NULL)) {
        pthread_mutex_unlock(&st->mu);
        note_dead(r, e);
        return 0;
    }
    /* A side stored with another codec than the namespace's own (its fallback, a colder
     * tier's) says so in the header's codec ids, which the scan read: Lookup reports it
     * without reading the block. */
    kvs_block_info hdr = {
        .k_codec = e->k_codec, .k_bits = e->k_bits, .v_codec = e->v_codec, .v_bits = e->v_bits};
    unsigned enc = kvs_block_encodings(kvs_ns_spec_of(ns), &hdr);
    if ((kvs_enc_side(enc, KVS_KEYS) == KVS_ENC_OWN &&
         !kvs_ns_codec_version(ns, KVS_KEYS, e->k_state)) ||
        (kvs_enc_side(enc, KVS_VALUES) == KVS_ENC_OWN &&
         !kvs_ns_codec_version(ns, KVS_VALUES, e->v_state)))
        r->unknown_state++; /* indexed all the same: see the top of the file */
    kvs_block *d = kvs_xcalloc(1, sizeof *d);
    kvs_index_node_init(&d->node, e->ns_id, e->key, e->key_len);
    d->ns = kvs_ns_ref(ns);
    d->enc = (uint8_t)enc;
    d->tokens = e->tokens;
    d->size = e->bytes;
    d->raw_bytes = raw;
    d->tier = KVS_STORE_TIER_DISK;
    d->on_disk = true;
    kvs__store_link_locked(st, d);
    r->linked++;
    pthread_mutex_unlock(&st->mu);
    return 0;
}

int kvs__persist_restore(kvs_store *st, kvs_err *err)
{
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    restore r = {.st = st, .err = err};
    int rc = kvs_disk_ns_list(st->disk, on_ns_record, &r, err);
    if (rc)
        return rc;
    for (size_t i = 0; i < r.norphans; i++) {
        kvs_err e2;
        uint64_t blocks = 0;
        if (kvs_disk_ns_del(st->disk, r.orphans[i], &blocks, &e2))
            kvs__store_log(st, KVS_LOG_ERROR,
                           "disk tier %s: namespace id %u has records but "
                           "no spec; deleting them: %s",
                           kvs_disk_path(st->disk), r.orphans[i], e2.msg);
        else
            kvs__store_log(st, KVS_LOG_WARN,
                           "disk tier %s: namespace id %u had records but no "
                           "spec (dropped while recording them): deleted with %llu blocks",
                           kvs_disk_path(st->disk), r.orphans[i], (unsigned long long)blocks);
    }
    kvs_disk_scan_info info;
    if ((rc = kvs_disk_scan(st->disk, 0, on_block, &r, &info, err))) {
        free(r.dead);
        free(r.dead_keys);
        return kvs_err_prefix(err, "disk tier %s: rebuilding the index", kvs_disk_path(st->disk));
    }
    uint64_t deleted = 0;
    if (r.ndead) {
        for (size_t i = 0; i < r.ndead; i++)
            r.dead[i].key = r.dead_keys[i];
        kvs_err e2;
        if (kvs_disk_del(st->disk, r.dead, r.ndead, &deleted, &e2))
            kvs__store_log(st, KVS_LOG_ERROR, "disk tier %s: deleting %zu unservable blocks: %s",
                           kvs_disk_path(st->disk), r.ndead, e2.msg);
        else
            kvs__store_log(st, KVS_LOG_WARN,
                           "disk tier %s: deleted %llu blocks that cannot be served (no "
                           "namespace spec, or a token count their namespace does not allow)",
                           kvs_disk_path(st->disk), (unsigned long long)deleted);
    }
    free(r.dead);
    free(r.dead_keys);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double ms = (double)(t1.tv_sec - t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e6;
    kvs__store_log(st, KVS_LOG_INFO,
                   "disk tier %s: restored %u namespaces (%u codec states, %u unreadable) "
                   "and %llu blocks (%llu bytes; %llu of an unknown codec state) in %.1f ms; "
                   "%llu unservable blocks deleted, %llu left, %llu bad records dropped",
                   kvs_disk_path(st->disk), r.namespaces, r.states, r.bad_states,
                   (unsigned long long)r.linked, (unsigned long long)st->stats.disk_used,
                   (unsigned long long)r.unknown_state, ms, (unsigned long long)deleted,
                   (unsigned long long)(r.ndead - deleted + r.dead_lost),
                   (unsigned long long)info.dropped);
    return 0;
}
