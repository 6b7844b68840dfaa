/* libFuzzer target: the daemon's request decoding and validation (issue 14 item 6).
 *
 * Input: one selector byte, then the bytes of one protobuf message as a client would send
 * it. The selector picks the message type; the message is unpacked the way the daemon
 * unpacks every request (kvs_wire_unpack: protobuf-c, size-checked) and then run through
 * the validators the RPC handlers call on it: namespace specs (kvs_wire_spec_from_proto +
 * kvs_spec_validate), key lists (kvs_wire_check_keys), layer ranges and paged layouts
 * against a fixed namespace. Nothing here may crash, leak or read out of bounds whatever
 * the bytes; a refusal is an error code with a message, which is checked to be non-empty.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "daemon/wire.h"
#include "gpu/codec/paged.h"
#include "gpu/codec/spec.h"
#include "kvstash/v1/kvstash.pb-c.h"

/* A namespace the layer ranges and layouts are checked against. */
static const kvs_ns_spec ns = {.name = "fuzz",
                               .layers = 4,
                               .kv_heads = 2,
                               .head_dim = 64,
                               .block_tokens = 16,
                               .dtype = KVS_DTYPE_FP16,
                               .key_codec = "none",
                               .value_codec = "none"};

static void refused(int rc, const kvs_err *err)
{
    if (rc && err->msg[0] == '\0')
        abort(); /* every refusal says why */
}

static void spec(const Kvstash__V1__NamespaceSpec *p)
{
    kvs_ns_spec s;
    kvs_err err = {0};
    int rc = kvs_wire_spec_from_proto(p, &s, &err);
    if (rc == 0)
        rc = kvs_spec_validate(&s, &err);
    refused(rc, &err);
}

static void layers(uint32_t b, uint32_t e)
{
    uint32_t ob, oe;
    kvs_err err = {0};
    int rc = kvs_wire_layer_range(b, e, ns.layers, &ob, &oe, &err);
    refused(rc, &err);
    if (rc == 0 && !(ob < oe && oe <= ns.layers))
        abort(); /* an accepted range lies in the namespace */
}

static void layout(const Kvstash__V1__PagedLayout *p)
{
    if (!p)
        return;
    kvs_paged_layout out;
    uint64_t bases[2 * KVS_MAX_LAYERS];
    kvs_err err = {0};
    refused(kvs_wire_paged_layout(p, &ns, &out, bases, &err), &err);
}

static void keys(const ProtobufCBinaryData *k, size_t n)
{
    kvs_store_key *out = calloc(n ? n : 1, sizeof *out);
    kvs_err err = {0};
    refused(kvs_wire_check_keys(k, n, 4096, out, &err), &err);
    free(out);
}

/* libFuzzer's entry point. */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    static const ProtobufCMessageDescriptor *const types[] = {
        &kvstash__v1__create_namespace_request__descriptor,
        &kvstash__v1__keys_request__descriptor,
        &kvstash__v1__get_request__descriptor,
        &kvstash__v1__get_many_request__descriptor,
        &kvstash__v1__put_chunk__descriptor,
        &kvstash__v1__evict_request__descriptor,
        &kvstash__v1__add_queries_request__descriptor,
        &kvstash__v1__codec_state_request__descriptor,
    };
    const ProtobufCMessageDescriptor *d = types[data[0] % (sizeof types / sizeof types[0])];
    kvs_err err = {0};
    ProtobufCMessage *m = kvs_wire_unpack(d, data + 1, size - 1, &err);
    if (!m) {
        refused(-1, &err);
        return 0;
    }
    if (d == &kvstash__v1__create_namespace_request__descriptor) {
        const Kvstash__V1__CreateNamespaceRequest *r = (const void *)m;
        if (r->spec)
            spec(r->spec);
    } else if (d == &kvstash__v1__keys_request__descriptor) {
        const Kvstash__V1__KeysRequest *r = (const void *)m;
        keys(r->keys, r->n_keys);
    } else if (d == &kvstash__v1__get_request__descriptor) {
        const Kvstash__V1__GetRequest *r = (const void *)m;
        layers(r->layer_begin, r->layer_end);
    } else if (d == &kvstash__v1__get_many_request__descriptor) {
        const Kvstash__V1__GetManyRequest *r = (const void *)m;
        keys(r->keys, r->n_keys);
        layers(r->layer_begin, r->layer_end);
        layout(r->layout);
    } else if (d == &kvstash__v1__put_chunk__descriptor) {
        const Kvstash__V1__PutChunk *r = (const void *)m;
        if (r->kind_case == KVSTASH__V1__PUT_CHUNK__KIND_HEADER && r->header)
            layout(r->header->layout);
    }
    protobuf_c_message_free_unpacked(m, NULL);
    return 0;
}
