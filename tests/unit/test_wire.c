/* daemon/wire: request validation names the field; spec conversion fills defaults. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <grpc/grpc.h>
#include <grpc/slice.h>

#include "daemon/wire.h"

/* Packs m into a malloc'ed buffer. */
static uint8_t *packed(const ProtobufCMessage *m, size_t *len)
{
    *len = protobuf_c_message_get_packed_size(m);
    uint8_t *b = malloc(*len ? *len : 1);
    protobuf_c_message_pack(m, b);
    return b;
}

/* Strings are checked on the wire with their length: protobuf-c's NUL-terminated copy
 * would cut "zz\0x" to "zz" (issue 10, fault 6). Nested messages are walked too. */
static void test_unpack_strings(void **state)
{
    kvs_err err;
    size_t len;
    Kvstash__V1__NameRequest nr = KVSTASH__V1__NAME_REQUEST__INIT;
    nr.name = "zz";
    uint8_t *b = packed(&nr.base, &len);
    ProtobufCMessage *m = kvs_wire_unpack(&kvstash__v1__name_request__descriptor, b, len, &err);
    assert_non_null(m);
    assert_string_equal(((Kvstash__V1__NameRequest *)m)->name, "zz");
    protobuf_c_message_free_unpacked(m, NULL);
    /* "zz\0anything": pack the bytes by hand (protobuf-c packs strings with strlen). */
    static const char nul[] = "zz\0anything";
    uint8_t wire[2 + sizeof nul - 1] = {0x0A, sizeof nul - 1};
    memcpy(wire + 2, nul, sizeof nul - 1);
    assert_null(kvs_wire_unpack(&kvstash__v1__name_request__descriptor, wire, sizeof wire, &err));
    assert_int_equal(err.code, KVS_EINVAL);
    assert_non_null(strstr(err.msg, "name: contains a NUL byte at offset 2"));
    /* Invalid UTF-8 (a lone continuation byte, an overlong '/') */
    uint8_t bad_utf8[] = {0x0A, 3, 'a', 0x80, 'b'};
    assert_null(
        kvs_wire_unpack(&kvstash__v1__name_request__descriptor, bad_utf8, sizeof bad_utf8, &err));
    assert_non_null(strstr(err.msg, "name: not valid UTF-8 at offset 1"));
    uint8_t overlong[] = {0x0A, 2, 0xC0, 0xAF};
    assert_null(
        kvs_wire_unpack(&kvstash__v1__name_request__descriptor, overlong, sizeof overlong, &err));
    /* Valid multi-byte UTF-8 passes the wire check (the name rules refuse it later). */
    uint8_t euro[] = {0x0A, 3, 0xE2, 0x82, 0xAC};
    m = kvs_wire_unpack(&kvstash__v1__name_request__descriptor, euro, sizeof euro, &err);
    assert_non_null(m);
    protobuf_c_message_free_unpacked(m, NULL);
    free(b);

    /* A nested string: CreateNamespaceRequest.spec.key_codec */
    Kvstash__V1__NamespaceSpec sp = KVSTASH__V1__NAMESPACE_SPEC__INIT;
    sp.name = "ok";
    sp.key_codec = "none";
    Kvstash__V1__CreateNamespaceRequest cr = KVSTASH__V1__CREATE_NAMESPACE_REQUEST__INIT;
    cr.spec = &sp;
    b = packed(&cr.base, &len);
    m = kvs_wire_unpack(&kvstash__v1__create_namespace_request__descriptor, b, len, &err);
    assert_non_null(m);
    protobuf_c_message_free_unpacked(m, NULL);
    uint8_t *nulb = memchr(b, 'n', len); /* the 'n' of "none": make it a NUL */
    while (nulb && memcmp(nulb, "none", 4) != 0)
        nulb = memchr(nulb + 1, 'n', len - (size_t)(nulb + 1 - b));
    assert_non_null(nulb);
    nulb[1] = 0;
    assert_null(kvs_wire_unpack(&kvstash__v1__create_namespace_request__descriptor, b, len, &err));
    assert_non_null(strstr(err.msg, "spec.key_codec: contains a NUL byte at offset 1"));
    free(b);

    /* Not a message of the type: named, not a crash. */
    uint8_t junk[] = {0x0A, 0x7F, 'x'};
    assert_null(kvs_wire_unpack(&kvstash__v1__name_request__descriptor, junk, sizeof junk, &err));
    assert_non_null(strstr(err.msg, "NameRequest: not a valid protobuf message"));
}

static void test_keys(void **state)
{
    kvs_err err;
    kvs_store_key out[3];
    uint8_t long_key[65] = {0};
    ProtobufCBinaryData ok[2] = {{1, (uint8_t *)"a"}, {64, long_key}};
    assert_int_equal(kvs_wire_check_keys(ok, 2, 10, out, &err), 0);
    assert_int_equal(out[1].len, 64);
    assert_ptr_equal(out[1].data, long_key);

    ProtobufCBinaryData empty[2] = {{1, (uint8_t *)"a"}, {0, NULL}};
    assert_int_equal(kvs_wire_check_keys(empty, 2, 10, out, &err), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "keys[1]"));

    ProtobufCBinaryData too_long[1] = {{65, long_key}};
    assert_int_equal(kvs_wire_check_keys(too_long, 1, 10, out, &err), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "keys[0]"));
    assert_non_null(strstr(err.msg, "65"));

    assert_int_equal(kvs_wire_check_keys(ok, 2, 1, out, &err), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "limit"));
    assert_int_equal(kvs_wire_check_keys(ok, 0, 1, out, &err), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "keys"));
}

static void test_layer_range(void **state)
{
    kvs_err err;
    uint32_t b, e;
    assert_int_equal(kvs_wire_layer_range(0, 0, 32, &b, &e, &err), 0);
    assert_int_equal(b, 0);
    assert_int_equal(e, 32);
    assert_int_equal(kvs_wire_layer_range(5, 7, 32, &b, &e, &err), 0);
    assert_int_equal(b, 5);
    assert_int_equal(e, 7);
    assert_int_equal(kvs_wire_layer_range(0, 33, 32, &b, &e, &err), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "layer_end"));
    assert_int_equal(kvs_wire_layer_range(7, 7, 32, &b, &e, &err), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "layer_begin"));
    assert_int_equal(kvs_wire_layer_range(32, 0, 32, &b, &e, &err), KVS_EINVAL);
}

static void test_spec_from_proto(void **state)
{
    kvs_err err;
    kvs_ns_spec s;
    Kvstash__V1__NamespaceSpec p = KVSTASH__V1__NAMESPACE_SPEC__INIT;
    assert_int_equal(kvs_wire_spec_from_proto(NULL, &s, &err), KVS_EINVAL);
    assert_int_equal(kvs_wire_spec_from_proto(&p, &s, &err), KVS_EINVAL); /* name "" */
    assert_non_null(strstr(err.msg, "name"));
    char long_name[80];
    memset(long_name, 'x', sizeof long_name - 1);
    long_name[79] = '\0';
    p.name = long_name;
    assert_int_equal(kvs_wire_spec_from_proto(&p, &s, &err), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "name"));

    p.name = "llama";
    p.layers = 32;
    p.kv_heads = 8;
    p.head_dim = 128;
    p.block_tokens = 16;
    p.dtype = KVSTASH__V1__DTYPE__DTYPE_BF16;
    p.seed = 42;
    assert_int_equal(kvs_wire_spec_from_proto(&p, &s, &err), 0);
    assert_string_equal(s.key_codec, "none"); /* empty codec names mean none */
    assert_string_equal(s.value_codec, "none");
    assert_int_equal(s.dtype, KVS_DTYPE_BF16);
    assert_int_equal(s.seed, 42);
    assert_int_equal(kvs_spec_validate(&s, &err), 0);

    p.dtype = (Kvstash__V1__Dtype)77; /* unknown enum value from a newer client */
    assert_int_equal(kvs_wire_spec_from_proto(&p, &s, &err), 0);
    assert_int_equal(kvs_spec_validate(&s, &err), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "dtype"));

    /* Round trip through the info form. */
    kvs_store_ns_info info = {.spec = s, .id = 3, .usage = {.blocks = 2, .stored_bytes = 10}};
    info.spec.dtype = KVS_DTYPE_FP16;
    kvs_wire_ns w;
    kvs_wire_info_to_proto(&info, 0.01, &w);
    Kvstash__V1__NamespaceInfo *pi = &w.info;
    assert_string_equal(pi->spec->name, "llama");
    assert_int_equal(pi->id, 3);
    assert_int_equal(pi->blocks, 2);
    assert_int_equal(pi->block_bytes, 32ull * 2 * 16 * 8 * 128 * 2);
    assert_null(pi->spec->error_sample);             /* unset: the daemon's default ... */
    assert_true(pi->fidelity->error_sample == 0.01); /* ... which the stats report */
    assert_null(pi->fidelity->logit_error);          /* no squat samples */
    assert_int_equal(pi->fidelity->key_error->n_buckets, KVS_FIDELITY_NBOUNDS + 1);
}

/* The fidelity options: an explicit share of 0 stays 0 (not the default), a bound without
 * a fallback gets none, and a snapshot's histogram and counts reach the wire as they are. */
static void test_fidelity_fields(void **state)
{
    (void)state;
    kvs_err err;
    kvs_ns_spec s;
    Kvstash__V1__NamespaceSpec p = KVSTASH__V1__NAMESPACE_SPEC__INIT;
    Kvstash__V1__ErrorSample zero = KVSTASH__V1__ERROR_SAMPLE__INIT;
    p.name = "f";
    p.error_sample = &zero;
    p.key_codec = "kivi-2";
    p.max_rel_error = 0.25;
    assert_int_equal(kvs_wire_spec_from_proto(&p, &s, &err), 0);
    assert_true(s.error_sample_set);
    assert_true(s.error_sample == 0);
    assert_true(s.max_rel_error == 0.25);
    assert_string_equal(s.fallback_codec, "none");
    char long_codec[40];
    memset(long_codec, 'k', sizeof long_codec - 1);
    long_codec[39] = 0;
    p.fallback_codec = long_codec;
    assert_int_equal(kvs_wire_spec_from_proto(&p, &s, &err), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "fallback_codec"));
    p.fallback_codec = "fp8";
    assert_int_equal(kvs_wire_spec_from_proto(&p, &s, &err), 0);
    assert_string_equal(s.fallback_codec, "fp8");

    kvs_store_ns_info info = {.spec = s, .id = 1};
    kvs_fidelity_acc acc;
    memset(&acc, 0, sizeof acc);
    kvs_fidelity_sample m = {.err = {0.3, 0.004, 0.02}, .has_logits = true};
    kvs_fidelity_acc_add(&acc, &m, true, KVS_FALLBACK_KEYS);
    kvs_fidelity_acc_read(&acc, &info.fidelity);
    kvs_wire_ns w;
    kvs_wire_info_to_proto(&info, 1.0, &w);
    const Kvstash__V1__NamespaceInfo *pi = &w.info;
    assert_non_null(pi->spec->error_sample);
    assert_true(pi->spec->error_sample->share == 0);
    assert_true(pi->spec->max_rel_error == 0.25);
    assert_string_equal(pi->spec->fallback_codec, "fp8");
    const Kvstash__V1__FidelityStats *f = pi->fidelity;
    assert_true(f->error_sample == 1.0);
    assert_int_equal(f->key_error->count, 1);
    assert_true(f->key_error->max == 0.3);
    assert_int_equal(f->key_error->n_bounds, KVS_FIDELITY_NBOUNDS);
    assert_true(f->key_error->bounds[8] == 0.5);
    assert_int_equal(f->key_error->buckets[7], 0); /* 0.3 > 0.2 */
    assert_int_equal(f->key_error->buckets[8], 1);
    assert_int_equal(f->value_error->buckets[2], 1); /* 0.004 <= 0.005 */
    assert_non_null(f->logit_error);
    assert_int_equal(f->checked, 1);
    assert_int_equal(f->fallback_blocks, 1);
    assert_int_equal(f->fallback_keys, 1);
    assert_int_equal(f->fallback_values, 0);
}

static void test_block_bytes_and_keys(void **state)
{
    kvs_err err;
    kvs_ns_spec s;
    memset(&s, 0, sizeof s);
    strcpy(s.name, "m");
    s.layers = 1024;
    s.kv_heads = 1024;
    s.head_dim = 1024;
    s.block_tokens = 65536;
    s.dtype = KVS_DTYPE_FP16;
    strcpy(s.key_codec, "none");
    strcpy(s.value_codec, "none");
    assert_int_equal(kvs_spec_validate(&s, &err), 0);
    uint64_t bytes;
    /* The largest layout still computes without overflow: 2^10*2*2^16*2^10*2^10*2 = 2^48. */
    assert_int_equal(kvs_spec_block_bytes(&s, 65536, &bytes, &err), 0);
    assert_int_equal(bytes, 1ull << 48);
    assert_int_equal(kvs_spec_block_bytes(&s, 0, &bytes, &err), KVS_EINVAL);
    assert_non_null(strstr(err.msg, "tokens"));
    assert_int_equal(kvs_spec_block_bytes(&s, 65537, &bytes, &err), KVS_EINVAL);
    assert_int_equal(kvs_key_validate(0, &err), KVS_EINVAL);
    assert_int_equal(kvs_key_validate(65, &err), KVS_EINVAL);
    assert_int_equal(kvs_key_validate(64, &err), 0);
}

/* A PutChunk{data} message split into slices at every pair of cut points. */
static grpc_byte_buffer *split(const uint8_t *m, size_t len, size_t a, size_t b)
{
    grpc_slice sl[3] = {grpc_slice_from_copied_buffer((const char *)m, a),
                        grpc_slice_from_copied_buffer((const char *)m + a, b - a),
                        grpc_slice_from_copied_buffer((const char *)m + b, len - b)};
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(sl, 3);
    for (int i = 0; i < 3; i++)
        grpc_slice_unref(sl[i]);
    return bb;
}

static void test_put_data_fast_path(void **state)
{
    uint8_t data[300];
    for (int i = 0; i < 300; i++)
        data[i] = (uint8_t)(i * 7 + 1);
    Kvstash__V1__PutChunk m = KVSTASH__V1__PUT_CHUNK__INIT;
    m.kind_case = KVSTASH__V1__PUT_CHUNK__KIND_DATA;
    m.data.data = data;
    m.data.len = sizeof data;
    uint8_t wire[320];
    size_t len = kvstash__v1__put_chunk__pack(&m, wire); /* 0x12, 2-byte varint, data */
    assert_int_equal(len, 303);
    uint8_t dst[300];
    uint64_t n;
    kvs_err err;
    for (size_t a = 0; a <= 4; a++) { /* cuts inside the tag and the varint, and later */
        for (size_t b = a; b <= len; b += 37) {
            memset(dst, 0, sizeof dst);
            grpc_byte_buffer *bb = split(wire, len, a, b);
            assert_int_equal(kvs_wire_put_data(bb, dst, sizeof dst, &n, &err), 1);
            assert_int_equal(n, 300);
            assert_memory_equal(dst, data, 300);
            assert_int_equal(kvs_wire_put_data(bb, dst, 299, &n, &err), KVS_EINVAL);
            assert_non_null(strstr(err.msg, "payload"));
            grpc_byte_buffer_destroy(bb);
        }
    }
    /* A header chunk is not the fast shape: the caller unpacks it. */
    Kvstash__V1__PutHeader h = KVSTASH__V1__PUT_HEADER__INIT;
    h.namespace_ = "m";
    m.kind_case = KVSTASH__V1__PUT_CHUNK__KIND_HEADER;
    m.header = &h;
    len = kvstash__v1__put_chunk__pack(&m, wire);
    grpc_byte_buffer *bb = split(wire, len, 1, 2);
    assert_int_equal(kvs_wire_put_data(bb, dst, sizeof dst, &n, &err), 0);
    grpc_byte_buffer_destroy(bb);
    /* Data followed by another field: also left to protobuf-c. */
    uint8_t odd[] = {0x12, 0x02, 0xAA, 0xBB, 0x12, 0x01, 0xCC};
    bb = split(odd, sizeof odd, 3, 5);
    assert_int_equal(kvs_wire_put_data(bb, dst, sizeof dst, &n, &err), 0);
    grpc_byte_buffer_destroy(bb);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_unpack_strings),     cmocka_unit_test(test_keys),
        cmocka_unit_test(test_layer_range),        cmocka_unit_test(test_spec_from_proto),
        cmocka_unit_test(test_fidelity_fields),    cmocka_unit_test(test_block_bytes_and_keys),
        cmocka_unit_test(test_put_data_fast_path),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
