/* Wire <-> internal conversions and request validation (DESIGN §4).
 *
 * Everything a request carries is checked here or in the store before any buffer is
 * sized from it; messages name the field at fault ("keys[3]: empty ..."). Pure
 * functions, no I/O: unit-tested in tests/unit/test_wire.c and a fuzz target later.
 */
#ifndef KVS_DAEMON_WIRE_H
#define KVS_DAEMON_WIRE_H

#include <grpc/byte_buffer.h>
#include <stddef.h>
#include <stdint.h>

#include "gpu/base/err.h"
#include "gpu/codec/spec.h"
#include "kvstash/v1/kvstash.pb-c.h"
#include "storage/store.h"

/* Unpacks a request of type `desc` (protobuf-c) after checking every string field on the
 * wire, nested messages included: protobuf-c hands strings out NUL-terminated without
 * their length, so a name with an embedded NUL would silently be cut there ("zz\0x"
 * acting on "zz"). A string holding a NUL or invalid UTF-8 (proto3 requires UTF-8) is
 * KVS_EINVAL naming the field ("spec.name: contains a NUL byte at offset 2"); bytes that
 * are not a message of that type are KVS_EINVAL naming the type. Free the result with
 * protobuf_c_message_free_unpacked(msg, NULL). */
ProtobufCMessage *kvs_wire_unpack(const ProtobufCMessageDescriptor *desc, const uint8_t *buf,
                                  size_t len, kvs_err *err);

/* Checks a namespace name field is present and short enough to copy; `field` names it
 * in the message. (The character rules are checked at creation.) */
int kvs_wire_check_name(const char *name, const char *field, kvs_err *err);

/* Fills out from a NamespaceSpec (empty codec names become "none", and so does an empty
 * fallback_codec with a max_rel_error: kvs_spec_fill_defaults; UNSPECIFIED dtype stays
 * unspecified and is refused by kvs_spec_validate). */
int kvs_wire_spec_from_proto(const Kvstash__V1__NamespaceSpec *p, kvs_ns_spec *out, kvs_err *err);

/* The wire form of one namespace: its NamespaceInfo (`info`) and every message and array
 * that it points to, in one value. */
typedef struct kvs_wire_ns {
    Kvstash__V1__NamespaceInfo info;
    Kvstash__V1__NamespaceSpec spec;
    Kvstash__V1__ErrorSample sample;
    Kvstash__V1__FidelityStats fidelity;
    Kvstash__V1__ErrorStats errors[KVS_FIDELITY_WHATS];
    double bounds[KVS_FIDELITY_NBOUNDS];
    uint64_t buckets[KVS_FIDELITY_WHATS][KVS_FIDELITY_NBOUNDS + 1];
} kvs_wire_ns;

/* Fills w from a store snapshot; error_sample: the share of the namespace's Puts measured
 * now (kvs_xfer_error_sample). w->info points into w and, for strings, into src: both must
 * outlive it. */
void kvs_wire_info_to_proto(const kvs_store_ns_info *src, double error_sample, kvs_wire_ns *w);

/* Checks the keys of a KeysRequest: 1..max_keys keys, each 1..KVS_KEY_MAX bytes, and
 * fills keys_out (caller array of n). */
int kvs_wire_check_keys(const ProtobufCBinaryData *keys, size_t n, unsigned max_keys,
                        kvs_store_key *keys_out, kvs_err *err);

/* Resolves a Get's layer range against the namespace: layer_end 0 means all layers. */
int kvs_wire_layer_range(uint32_t begin, uint32_t end, uint32_t layers, uint32_t *out_begin,
                         uint32_t *out_end, kvs_err *err);

/* A PagedLayout against the namespace: k_base/v_base need one entry per layer (copied
 * into bases, 2 * KVS_MAX_LAYERS entries: out points into it). The bounds are checked
 * later, with the pages and the region (kvs_paged_check). */
struct kvs_paged_layout;
int kvs_wire_paged_layout(const Kvstash__V1__PagedLayout *p, const kvs_ns_spec *spec,
                          struct kvs_paged_layout *out, uint64_t *bases, kvs_err *err);

/* Fast path for a Put data chunk (PutChunk with only field 2, `data`): if the message in
 * bb is exactly tag 0x12, a varint length and that many bytes, copies the bytes straight
 * from the gRPC slices to dst (at most cap bytes) without flattening or unpacking, and
 * sets *n. Returns 1 when done, 0 when the message has another shape (the caller then
 * unpacks it with protobuf-c), or KVS_EINVAL when the data would exceed cap. */
int kvs_wire_put_data(grpc_byte_buffer *bb, uint8_t *dst, uint64_t cap, uint64_t *n, kvs_err *err);

#endif
