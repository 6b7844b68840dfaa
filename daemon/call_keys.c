/* Lookup, Exists, Delete: unary calls over a batch of keys (DESIGN §2, §4). One request
 * shape (KeysRequest), one validation path; each handler differs only in the store verb
 * and the reply it builds. Runs on CQ threads, except the answer to a Delete in a durable
 * namespace: the disk writer's thread, once the deletions are committed and flushed. */
#include <stdio.h>
#include <stdlib.h>

#include "daemon/call.h"
#include "daemon/wire.h"
#include "gpu/base/mem.h"
#include "kvstash/v1/kvstash.pb-c.h"
#include "pbc.h"

typedef struct keys_req {
    Kvstash__V1__KeysRequest *msg;
    kvs_ns *ns;
    kvs_store_key *keys;
    size_t n;
} keys_req;

static int keys_open(kvs_call *c, const uint8_t *req, size_t len, keys_req *k, kvs_err *err)
{
    k->msg = (Kvstash__V1__KeysRequest *)kvs_wire_unpack(&kvstash__v1__keys_request__descriptor,
                                                         req, len, err);
    if (!k->msg)
        return err->code;
    int rc = kvs_call_ns_find(c, k->msg->namespace_, &k->ns, err);
    if (rc)
        return rc;
    k->n = k->msg->n_keys;
    /* Bounded by max_keys once checked; allocate after the count check. */
    if (k->n == 0 || k->n > c->srv->cfg->max_keys)
        return kvs_wire_check_keys(k->msg->keys, k->n, c->srv->cfg->max_keys, NULL, err);
    k->keys = kvs_trymalloc(k->n * sizeof *k->keys);
    if (!k->keys)
        return kvs_err_set(err, KVS_ENOMEM, "keys: out of memory for %zu keys", k->n);
    return kvs_wire_check_keys(k->msg->keys, k->n, c->srv->cfg->max_keys, k->keys, err);
}

static void keys_close(keys_req *k)
{
    if (k->msg)
        kvstash__v1__keys_request__free_unpacked(k->msg, NULL);
    if (k->ns)
        kvs_ns_unref(k->ns);
    free(k->keys);
}

int kvs_lookup_handle(kvs_call *c, const uint8_t *req, size_t len, kvs_err *err)
{
    keys_req k = {0};
    int rc = keys_open(c, req, len, &k, err);
    kvs_store_tier *tiers = NULL;
    uint8_t *enc = NULL;
    protobuf_c_boolean *fallback = NULL;
    char **codecs = NULL; /* [2n]: keys' codecs, then values' (borrowed from the spec) */
    /* Fallback flags only where a namespace has a bound, and codecs where blocks may have
     * others than its own: the others cannot. */
    const kvs_ns_spec *spec = rc == 0 ? kvs_ns_spec_of(k.ns) : NULL;
    bool bounded = rc == 0 && spec->max_rel_error > 0;
    bool other = bounded || (rc == 0 && (spec->host_codec[0] || spec->disk_codec[0]));
    if (rc == 0 && (!(tiers = kvs_trymalloc(k.n * sizeof *tiers)) ||
                    (other && (!(enc = kvs_trymalloc(k.n)) ||
                               !(fallback = kvs_trymalloc(k.n * sizeof *fallback)) ||
                               !(codecs = kvs_trymalloc(2 * k.n * sizeof *codecs))))))
        rc = kvs_err_set(err, KVS_ENOMEM, "keys: out of memory");
    if (rc == 0) {
        Kvstash__V1__LookupReply reply = KVSTASH__V1__LOOKUP_REPLY__INIT;
        kvs_store_lookup(c->srv->store, k.ns, k.keys, k.n, tiers, &reply.prefix_blocks, enc);
        /* kvs_store_tier and the wire Tier enum share their values by construction. */
        reply.n_tiers = k.n;
        reply.tiers = (Kvstash__V1__Tier *)tiers;
        for (size_t i = 0; other && i < k.n; i++) {
            bool hit = tiers[i] != KVS_STORE_TIER_NONE;
            fallback[i] = kvs_enc_fallback(enc[i]) != 0;
            codecs[i] = kvs_pb_str(
                hit ? kvs_spec_enc_codec(spec, KVS_KEYS, kvs_enc_side(enc[i], KVS_KEYS)) : "");
            codecs[k.n + i] = kvs_pb_str(
                hit ? kvs_spec_enc_codec(spec, KVS_VALUES, kvs_enc_side(enc[i], KVS_VALUES)) : "");
        }
        reply.n_fallback = bounded ? k.n : 0;
        reply.fallback = fallback;
        reply.n_key_codecs = reply.n_value_codecs = other ? k.n : 0;
        reply.key_codecs = codecs;
        reply.value_codecs = codecs ? codecs + k.n : NULL;
        kvs_call_reply(c, &reply.base);
    }
    free(tiers);
    free(enc);
    free(fallback);
    free(codecs);
    keys_close(&k);
    return rc;
}

int kvs_exists_handle(kvs_call *c, const uint8_t *req, size_t len, kvs_err *err)
{
    keys_req k = {0};
    int rc = keys_open(c, req, len, &k, err);
    kvs_store_tier *tiers = NULL;
    protobuf_c_boolean *present = NULL;
    if (rc == 0 && (!(tiers = kvs_trymalloc(k.n * sizeof *tiers)) ||
                    !(present = kvs_trymalloc(k.n * sizeof *present))))
        rc = kvs_err_set(err, KVS_ENOMEM, "keys: out of memory");
    if (rc == 0) {
        kvs_store_lookup(c->srv->store, k.ns, k.keys, k.n, tiers, NULL, NULL);
        for (size_t i = 0; i < k.n; i++)
            present[i] = tiers[i] != KVS_STORE_TIER_NONE;
        Kvstash__V1__ExistsReply reply = KVSTASH__V1__EXISTS_REPLY__INIT;
        reply.n_present = k.n;
        reply.present = present;
        kvs_call_reply(c, &reply.base);
    }
    free(tiers);
    free(present);
    keys_close(&k);
    return rc;
}

static void delete_reply(kvs_call *c)
{
    Kvstash__V1__DeleteReply reply = KVSTASH__V1__DELETE_REPLY__INIT;
    reply.deleted = c->u.deleted;
    kvs_call_reply(c, &reply.base);
}

/* Disk writer thread: a durable namespace's deletions are committed and flushed. */
static void delete_durable_done(void *arg, int rc, const kvs_err *err)
{
    kvs_call *c = arg;
    if (rc) {
        char msg[KVS_ERR_MSG_LEN + 128];
        snprintf(msg, sizeof msg,
                 "durable: the blocks are deleted, but flushing the disk "
                 "tier failed (a crash may bring them back): %s",
                 err ? err->msg : "");
        kvs_call_fail(c, KVS_EUNAVAIL, msg);
        return;
    }
    delete_reply(c);
}

int kvs_delete_handle(kvs_call *c, const uint8_t *req, size_t len, kvs_err *err)
{
    keys_req k = {0};
    int rc = keys_open(c, req, len, &k, err);
    if (rc == 0) {
        c->u.deleted = kvs_store_delete(c->srv->store, k.ns, k.keys, k.n);
        /* A durable namespace answers once the records' deletions are on disk. */
        if (kvs_ns_spec_of(k.ns)->durable && c->u.deleted)
            kvs_store_disk_barrier(c->srv->store, delete_durable_done, c);
        else
            delete_reply(c);
    }
    keys_close(&k);
    return rc;
}
