/* libkvstash: PutMany and GetMany (contract: include/kvstash.h, "data plane"). One call
 * each, on the machinery of client.c (client_int.h). Items that name a region carry no
 * bytes: the daemon reads or writes the shared memory (client/region.c).
 */
#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client/client_int.h"
#include "gpu/base/mem.h"
#include "gpu/codec/spec.h"
#include "kvstash.h"
#include "kvstash/v1/kvstash.pb-c.h"
#include "pbc.h"

static void item_msg(char *dst, size_t cap, const char *src, size_t n)
{
    if (n >= cap)
        n = cap - 1;
    memcpy(dst, src, n);
    dst[n] = 0;
}

int kvs__region_item_check(const kvs_region *g, uint64_t offset, uint64_t len, size_t i,
                           const char *what, kvs_err *err)
{
    size_t size = kvs_region_size(g);
    if (offset > size || len > size - offset)
        return kvs_err_set(err, KVS_EINVAL,
                           "%s: items[%zu]: bytes [%llu, +%llu) lie outside the region's %zu", what,
                           i, (unsigned long long)offset, (unsigned long long)len, size);
    return 0;
}

/* The wire's PagedLayout of lay into out, its bases copied into *bases (allocated here,
 * the caller frees it: protobuf-c's fields are not const). KVS_EINVAL naming the field,
 * KVS_ENOMEM. */
static int pb_layout(const kvs_page_layout *lay, Kvstash__V1__PagedLayout *out,
                     uint64_t **bases_out, const char *what, kvs_err *err)
{
    if (lay->layers == 0 || lay->layers > KVS_MAX_LAYERS || !lay->k_base || !lay->v_base)
        return kvs_err_set(err, KVS_EINVAL,
                           "%s: layout: layers %u (1..%d) with k_base and v_base of as many "
                           "entries",
                           what, lay->layers, KVS_MAX_LAYERS);
    uint64_t *bases = *bases_out = kvs_trymalloc(2 * (size_t)lay->layers * sizeof *bases);
    if (!bases)
        return kvs_err_set(err, KVS_ENOMEM, "%s: out of memory", what);
    memcpy(bases, lay->k_base, lay->layers * sizeof *bases);
    memcpy(bases + lay->layers, lay->v_base, lay->layers * sizeof *bases);
    *out = (Kvstash__V1__PagedLayout)KVSTASH__V1__PAGED_LAYOUT__INIT;
    out->page_tokens = lay->page_tokens;
    out->n_k_base = out->n_v_base = lay->layers;
    out->k_base = bases;
    out->v_base = bases + lay->layers;
    out->page_stride = lay->page_stride;
    out->token_stride = lay->token_stride;
    out->head_stride = lay->head_stride;
    return 0;
}

/* ------------------------------------------------------------------ PutMany */

int kvs__put_items_check(kvs_put_item *items, size_t n, kvs_err *err)
{
    for (size_t i = 0; i < n; i++) {
        kvs_put_item *it = &items[i];
        if (!it->key || kvs_key_validate(it->key_len, err) != 0)
            return kvs_err_prefix(err, "PutMany: items[%zu]: key", i);
        if (!it->data && !it->region)
            return kvs_err_set(err, KVS_EINVAL, "PutMany: items[%zu]: neither data nor region", i);
        if (it->pages && (it->data || !it->n_pages))
            return kvs_err_set(err, KVS_EINVAL,
                               "PutMany: items[%zu]: pages name paged memory of a region: no "
                               "data, and n_pages at least 1",
                               i);
        if (!it->data && !it->pages &&
            kvs__region_item_check(it->region, it->offset, it->len, i, "PutMany", err))
            return err->code;
        it->rc = KVS_EPROTO; /* until the reply says otherwise */
        it->msg[0] = 0;
    }
    return 0;
}

int kvs_client_put_many(kvs_client *c, const char *ns, kvs_dtype dtype, kvs_put_item *items,
                        size_t n, kvs_err *err)
{
    return kvs_client_put_many_paged(c, ns, dtype, NULL, items, n, err);
}

int kvs_client_put_many_paged(kvs_client *c, const char *ns, kvs_dtype dtype,
                              const kvs_page_layout *layout, kvs_put_item *items, size_t n,
                              kvs_err *err)
{
    kvs_err_clear(err);
    if (!c || !ns || (!items && n))
        return kvs_err_set(err, KVS_EINVAL, "PutMany: NULL argument");
    int rc = kvs__put_items_check(items, n, err);
    if (rc)
        return rc;
    /* The layout travels once, in the first paged item's header (later headers reuse it). */
    Kvstash__V1__PagedLayout pl;
    uint64_t *bases = NULL;
    bool layout_sent = false;
    for (size_t i = 0; i < n && rc == 0; i++)
        if (items[i].pages && !layout)
            rc = kvs_err_set(err, KVS_EINVAL, "PutMany: items[%zu]: pages without a layout", i);
    if (rc == 0 && layout)
        rc = pb_layout(layout, &pl, &bases, "PutMany", err);
    if (rc) {
        free(bases);
        return rc;
    }
    kvs__rpc r;
    rc = kvs__rpc_start(&r, c, STASH("PutMany"), err);
    if (rc) {
        free(bases);
        return kvs__rpc_finish(&r, rc, err);
    }
    grpc_op md = kvs__op_send_md(&r);
    bool ok = kvs__rpc_run(&r, &md, 1);
    /* One message in flight at a time: a header, then the payload in chunks that point at
     * the caller's bytes (kvs__data_chunk: no copy). */
    for (size_t i = 0; ok && i < n; i++) {
        const kvs_put_item *it = &items[i];
        Kvstash__V1__PutHeader hdr = KVSTASH__V1__PUT_HEADER__INIT;
        hdr.namespace_ = kvs_pb_str(ns);
        hdr.key = kvs_pb_bin(it->key, it->key_len);
        hdr.tokens = it->tokens;
        hdr.dtype = (Kvstash__V1__Dtype)dtype;
        hdr.payload_bytes = it->len;
        if (!it->data) {
            hdr.region = kvs_pb_bin(kvs__region_id(it->region), KVS__REGION_ID_LEN);
            hdr.region_offset = it->offset;
        }
        if (it->pages) {
            hdr.payload_bytes = 0; /* the daemon's, from the namespace */
            hdr.region_offset = 0;
            hdr.n_pages = it->n_pages;
            hdr.pages = (uint32_t *)(uintptr_t)it->pages; /* packed only, never written */
            if (!layout_sent)
                hdr.layout = &pl;
            layout_sent = true;
        }
        Kvstash__V1__PutChunk first = KVSTASH__V1__PUT_CHUNK__INIT;
        first.kind_case = KVSTASH__V1__PUT_CHUNK__KIND_HEADER;
        first.header = &hdr;
        grpc_byte_buffer *bb = kvs__pack_msg(&first.base);
        if (!bb) {
            free(bases);
            return kvs__rpc_finish(&r, kvs_err_set(err, KVS_ENOMEM, "PutMany: out of memory"), err);
        }
        grpc_op op = kvs__op_send_msg(bb);
        ok = kvs__rpc_run(&r, &op, 1);
        grpc_byte_buffer_destroy(bb);
        if (ok && it->data)
            ok = kvs__send_payload(&r, it->data, it->len) == it->len;
    }
    free(bases);
    grpc_byte_buffer *in = NULL;
    if (ok)
        kvs__end_stream(&r, &in);
    rc = kvs__rpc_finish(&r, 0, err); /* a failed send: the server's status explains it */
    ProtobufCMessage *m = NULL;
    if (rc == 0)
        rc = kvs__unpack_msg(r.name, in, &kvstash__v1__put_many_reply__descriptor, &m, err);
    if (in)
        grpc_byte_buffer_destroy(in);
    if (rc)
        return rc;
    const Kvstash__V1__PutManyReply *rep = (const Kvstash__V1__PutManyReply *)m;
    if (rep->n_results != n) {
        protobuf_c_message_free_unpacked(m, NULL);
        return kvs_err_set(err, KVS_EPROTO, "PutMany: %zu results for %zu blocks", rep->n_results,
                           n);
    }
    for (size_t i = 0; i < n; i++) {
        const Kvstash__V1__PutResult *pr = rep->results[i];
        kvs_put_item *it = &items[i];
        it->rc = pr->code ? kvs_err_from_grpc_status((int)pr->code) : 0;
        if (pr->code)
            item_msg(it->msg, sizeof it->msg, pr->error, strlen(pr->error));
        it->res = (kvs_put_result){.tier = kvs__tier_from_pb(pr->tier),
                                   .encoded_bytes = pr->encoded_bytes,
                                   .raw_bytes = pr->code ? 0 : it->len,
                                   .replaced = pr->replaced,
                                   .fallback = pr->fallback};
    }
    protobuf_c_message_free_unpacked(m, NULL);
    return 0;
}

/* ------------------------------------------------------------------ GetMany */

/* Where the stream stands: the item being received and its bytes so far. */
typedef struct many_state {
    kvs_get_item *items;
    size_t n, served;
    kvs_get_item *cur; /* receiving data for this item, or NULL */
    uint64_t got;
    bool region;
    long last; /* index of the last header, -1 before the first */
} many_state;

/* One block's header: the item it answers, in order. */
static int many_header(many_state *st, const Kvstash__V1__GetHeader *h, const char *name,
                       kvs_err *err)
{
    if (st->cur && st->got != st->cur->res.bytes)
        return kvs_err_set(err, KVS_EPROTO, "%s: block %ld ended after %llu of %llu bytes", name,
                           st->last, (unsigned long long)st->got,
                           (unsigned long long)st->cur->res.bytes);
    if ((long)h->index <= st->last || h->index >= st->n)
        return kvs_err_set(err, KVS_EPROTO, "%s: header for item %u after item %ld of %zu", name,
                           h->index, st->last, st->n);
    st->last = h->index;
    kvs_get_item *it = &st->items[h->index];
    it->answered = true;
    st->cur = NULL;
    st->got = 0;
    if (h->code) {
        it->rc = kvs_err_from_grpc_status((int)h->code);
        item_msg(it->msg, sizeof it->msg, h->error, strlen(h->error));
        return 0;
    }
    it->rc = 0;
    it->res = kvs__get_result_from_pb(h);
    st->served++;
    if (st->region)
        return 0; /* the bytes are in the region already */
    if (h->total_bytes > it->cap) {
        it->rc = KVS_E2BIG;
        snprintf(it->msg, sizeof it->msg, "block of %llu bytes does not fit in %zu",
                 (unsigned long long)h->total_bytes, it->cap);
    }
    st->cur = it;
    return 0;
}

static int many_chunk(many_state *st, const Kvstash__V1__GetChunk *ch, const char *name,
                      kvs_err *err)
{
    if (ch->n_more && (!ch->header || !st->region))
        return kvs_err_set(err, KVS_EPROTO, "%s: more headers outside a region GetMany", name);
    if (ch->header) {
        int rc = many_header(st, ch->header, name, err);
        for (size_t i = 0; i < ch->n_more && rc == 0; i++)
            rc = many_header(st, ch->more[i], name, err);
        return rc;
    }
    if (!st->cur)
        return kvs_err_set(err, KVS_EPROTO, "%s: data without a block header", name);
    size_t n = ch->data.len;
    if (n > st->cur->res.bytes - st->got)
        return kvs_err_set(err, KVS_EPROTO, "%s: more data than block %ld's %llu bytes", name,
                           st->last, (unsigned long long)st->cur->res.bytes);
    if (st->cur->rc == 0) /* chunks arrive in order: the daemon streams each block whole */
        memcpy((uint8_t *)st->cur->buf + st->got, ch->data.data, n);
    st->got += n;
    return 0;
}

int kvs__chunk_data_fast(grpc_byte_buffer *bb, uint8_t *dst, uint64_t cap, uint64_t *n,
                         const char *name, kvs_err *err)
{
    size_t total = grpc_byte_buffer_length(bb);
    grpc_byte_buffer_reader rd;
    if (total < 2 || !grpc_byte_buffer_reader_init(&rd, bb))
        return 0;
    uint8_t head[11];
    size_t have = 0, hdr = 0;
    uint64_t len = 0, used = 0;
    int result = 0;
    grpc_slice s;
    while (grpc_byte_buffer_reader_next(&rd, &s)) {
        const uint8_t *p = GRPC_SLICE_START_PTR(s);
        size_t sl = GRPC_SLICE_LENGTH(s), off = 0;
        while (hdr == 0 && off < sl && have < sizeof head) {
            head[have++] = p[off++];
            if (head[0] != 0x12)
                break;
            if (have >= 2 && !(head[have - 1] & 0x80)) { /* the length's varint is complete */
                for (size_t i = have - 1; i >= 1; i--)
                    len = (len << 7) | (head[i] & 0x7F);
                hdr = have;
                /* Whatever follows the bytes is fields 3 and 4: two varints at most. */
                if (len > total - hdr || total - hdr - len > 22 || len > cap) {
                    result = kvs_err_set(err, KVS_EPROTO,
                                         "%s: data chunk of %llu bytes where %llu remain", name,
                                         (unsigned long long)len, (unsigned long long)cap);
                    break;
                }
                result = 1;
            }
        }
        if (result < 0 || (hdr == 0 && have > 0 && (head[0] != 0x12 || have == sizeof head))) {
            grpc_slice_unref(s); /* malformed, or not a data chunk (result 0) */
            break;
        }
        if (result == 1 && off < sl && used < len) {
            size_t m = sl - off < len - used ? sl - off : (size_t)(len - used);
            memcpy(dst + used, p + off, m);
            used += m;
        }
        grpc_slice_unref(s);
    }
    grpc_byte_buffer_reader_destroy(&rd);
    if (result == 1)
        *n = used;
    return result;
}

/* The call's arguments checked, every item set unanswered; errors name items by their index
 * in the caller's array (a split call's parts are checked here, before the split). */
static int many_check(kvs_get_item *items, size_t n, const kvs_get_many_opts *o, kvs_err *err)
{
    const kvs_region *region = items[0].buf ? NULL : items[0].region;
    if (o->layout && (!region || !o->pages || !o->n_pages || o->format == KVS_FORMAT_ENCODED))
        return kvs_err_set(err, KVS_EINVAL,
                           "GetMany: layout: a paged GetMany names a region in its items and "
                           "pages, and asks for RAW blocks");
    for (size_t i = 0; i < n; i++) {
        kvs_get_item *it = &items[i];
        it->answered = false;
        it->rc = KVS_ENOTFOUND;
        it->msg[0] = 0;
        if (!it->key || kvs_key_validate(it->key_len, err) != 0)
            return kvs_err_prefix(err, "GetMany: items[%zu]: key", i);
        if (!region && !it->buf)
            return kvs_err_set(err, KVS_EINVAL,
                               "GetMany: items[%zu]: no buf (and items[0] names "
                               "no region)",
                               i);
        if (region && (it->buf || it->region != region || it->cap != items[0].cap))
            return kvs_err_set(err, KVS_EINVAL,
                               "GetMany: items[%zu]: every item of a call into a region names "
                               "the same region and cap, and no buf",
                               i);
        if (region && !o->layout) {
            int rc = kvs__region_item_check(region, it->offset, it->cap, i, "GetMany", err);
            if (rc)
                return rc;
        }
    }
    return 0;
}

/* One GetMany call on the wire, its items checked (many_check). */
static int get_many_call(kvs_client *c, const char *ns, kvs_get_item *items, size_t n,
                         const kvs_get_many_opts *opts, size_t *served, kvs_err *err)
{
    kvs_get_many_opts o = *opts;
    const kvs_region *region = items[0].buf ? NULL : items[0].region;
    ProtobufCBinaryData *keys = kvs_trymalloc(n * sizeof *keys);
    uint64_t *offsets = region ? kvs_trymalloc(n * sizeof *offsets) : NULL;
    if (!keys || (region && !offsets)) {
        free(keys);
        free(offsets);
        return kvs_err_set(err, KVS_ENOMEM, "GetMany: out of memory");
    }
    int rc = 0;
    for (size_t i = 0; i < n; i++) {
        keys[i] = kvs_pb_bin(items[i].key, items[i].key_len);
        if (offsets)
            offsets[i] = items[i].offset;
    }
    Kvstash__V1__GetManyRequest q = KVSTASH__V1__GET_MANY_REQUEST__INIT;
    q.namespace_ = kvs_pb_str(ns);
    q.n_keys = n;
    q.keys = keys;
    q.format = o.format == KVS_FORMAT_ENCODED ? KVSTASH__V1__FORMAT__FORMAT_ENCODED
                                              : KVSTASH__V1__FORMAT__FORMAT_RAW;
    q.layer_begin = o.layer_begin;
    q.layer_end = o.layer_end;
    q.prefix = o.prefix;
    Kvstash__V1__PagedLayout pl;
    uint64_t *bases = NULL;
    if (region) {
        q.region = kvs_pb_bin(kvs__region_id(region), KVS__REGION_ID_LEN);
        if (o.layout) { /* the pages instead of slots */
            if (rc == 0 && (rc = pb_layout(o.layout, &pl, &bases, "GetMany", err)) == 0) {
                q.layout = &pl;
                q.n_pages = o.n_pages;
                q.pages = (uint32_t *)(uintptr_t)o.pages; /* packed only, never written */
            }
        } else {
            q.n_region_offsets = n;
            q.region_offsets = offsets;
            q.region_slot_bytes = items[0].cap;
        }
    }
    grpc_byte_buffer *bb = rc ? NULL : kvs__pack_msg(&q.base);
    free(keys);
    free(offsets);
    free(bases);
    if (rc)
        return rc;
    if (!bb)
        return kvs_err_set(err, KVS_ENOMEM, "GetMany: out of memory");
    kvs__rpc r;
    if ((rc = kvs__rpc_start(&r, c, STASH("GetMany"), err))) {
        grpc_byte_buffer_destroy(bb);
        return kvs__rpc_finish(&r, rc, err);
    }
    grpc_op ops[] = {kvs__op_send_md(&r), kvs__op_send_msg(bb), kvs__op_close(),
                     kvs__op_recv_md(&r)};
    bool ok = kvs__rpc_run(&r, ops, 4);
    grpc_byte_buffer_destroy(bb);
    many_state st = {.items = items, .n = n, .region = region != NULL, .last = -1};
    while (ok && rc == 0) {
        grpc_byte_buffer *in = NULL;
        grpc_op op = kvs__op_recv_msg(&in);
        ok = kvs__rpc_run(&r, &op, 1);
        if (!ok || !in) /* end of stream: the status follows */
            break;
        if (st.cur && st.cur->rc == 0) { /* a data chunk of a block that fits: no copies */
            uint64_t got = 0;
            int fast = kvs__chunk_data_fast(in, (uint8_t *)st.cur->buf + st.got,
                                            st.cur->res.bytes - st.got, &got, r.name, err);
            if (fast) {
                grpc_byte_buffer_destroy(in);
                if (fast < 0)
                    rc = fast;
                st.got += got;
                continue;
            }
        }
        ProtobufCMessage *m = NULL;
        rc = kvs__unpack_msg(r.name, in, &kvstash__v1__get_chunk__descriptor, &m, err);
        grpc_byte_buffer_destroy(in);
        if (rc == 0)
            rc = many_chunk(&st, (const Kvstash__V1__GetChunk *)m, r.name, err);
        if (m)
            protobuf_c_message_free_unpacked(m, NULL);
    }
    rc = kvs__rpc_finish(&r, rc, err);
    if (rc == 0 && st.cur && st.got != st.cur->res.bytes)
        rc = kvs_err_set(err, KVS_EPROTO, "GetMany: the stream ended inside block %ld", st.last);
    if (rc == 0 && !o.prefix && (size_t)(st.last + 1) != n)
        rc = kvs_err_set(err, KVS_EPROTO, "GetMany: %ld of %zu blocks answered", st.last + 1, n);
    if (served)
        *served = st.served;
    return rc;
}

/* ------------------------------------------------------------------ split GetMany */

/* One part of a split GetMany: items [at, at + n) of the caller's, on its own channel. */
typedef struct many_part {
    kvs_client *c;
    const char *ns;
    kvs_get_item *items;
    size_t n;
    const kvs_get_many_opts *opts;
    unsigned channel;
    gpr_timespec deadline; /* the caller's kvs__call_deadline, which threads do not inherit */
    size_t served;
    int rc;
    kvs_err err;
} many_part;

static void *part_run(void *arg)
{
    many_part *p = arg;
    unsigned saved_ch = kvs__call_channel;
    gpr_timespec saved_dl = kvs__call_deadline;
    kvs__call_channel = p->channel + 1;
    kvs__call_deadline = p->deadline;
    kvs_err_clear(&p->err);
    p->rc = get_many_call(p->c, p->ns, p->items, p->n, p->opts, &p->served, &p->err);
    kvs__call_channel = saved_ch;
    kvs__call_deadline = saved_dl;
    return NULL;
}

/* How many parts a GetMany goes in: one per connection when its bytes are worth it. */
static unsigned split_parts(const kvs_client *c, const kvs_get_item *items, size_t n,
                            const kvs_get_many_opts *o)
{
    if (c->n_channels < 2 || n < 2 || o->layout || kvs__call_channel)
        return 1;
    uint64_t bytes = 0;
    for (size_t i = 0; i < n && bytes < KVS_SPLIT_MIN_BYTES; i++)
        bytes += items[i].cap;
    if (bytes < KVS_SPLIT_MIN_BYTES)
        return 1;
    return n < c->n_channels ? (unsigned)n : c->n_channels;
}

int kvs_client_get_many(kvs_client *c, const char *ns, kvs_get_item *items, size_t n,
                        const kvs_get_many_opts *opts, size_t *served, kvs_err *err)
{
    kvs_err_clear(err);
    if (served)
        *served = 0;
    if (!c || !ns || !items || n == 0)
        return kvs_err_set(err, KVS_EINVAL, "GetMany: NULL argument or no items");
    kvs_get_many_opts o = opts ? *opts : (kvs_get_many_opts){0};
    int rc = many_check(items, n, &o, err);
    if (rc)
        return rc;
    unsigned parts = split_parts(c, items, n, &o);
    if (parts == 1)
        return get_many_call(c, ns, items, n, &o, served, err);

    /* Contiguous parts in key order, received at once: part 0 on this thread, the others
     * on threads of their own (one that cannot start runs here after part 0). */
    many_part ps[KVS_CONNECTIONS_MAX];
    pthread_t th[KVS_CONNECTIONS_MAX];
    bool started[KVS_CONNECTIONS_MAX] = {false};
    unsigned base = atomic_fetch_add_explicit(c->next_channel, parts, memory_order_relaxed);
    size_t at = 0;
    for (unsigned k = 0; k < parts; k++) {
        size_t m = n / parts + (k < n % parts);
        ps[k] = (many_part){.c = c,
                            .ns = ns,
                            .items = items + at,
                            .n = m,
                            .opts = &o,
                            .channel = (base + k) % c->n_channels,
                            .deadline = kvs__call_deadline};
        at += m;
    }
    for (unsigned k = 1; k < parts; k++)
        started[k] = pthread_create(&th[k], NULL, part_run, &ps[k]) == 0;
    part_run(&ps[0]);
    for (unsigned k = 1; k < parts; k++) {
        if (started[k])
            pthread_join(th[k], NULL);
        else
            part_run(&ps[k]);
    }

    /* The unsplit call's answer: the first error in key order; a prefix stops at the first
     * part that stopped, and the items after it are left unanswered, as one call leaves
     * them. */
    size_t total = 0;
    bool stopped = false;
    for (unsigned k = 0; k < parts; k++) {
        many_part *p = &ps[k];
        if (stopped) {
            for (size_t i = 0; i < p->n; i++) {
                p->items[i].answered = false;
                p->items[i].rc = KVS_ENOTFOUND;
                p->items[i].msg[0] = 0;
            }
            continue;
        }
        total += p->served;
        if (p->rc && rc == 0) {
            rc = p->rc;
            *err = p->err;
        }
        if (o.prefix && (p->rc || p->served < p->n))
            stopped = true;
    }
    if (served)
        *served = total;
    return rc;
}
