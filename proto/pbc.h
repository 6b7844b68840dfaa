/* protobuf-c's message fields are not const (char *, uint8_t *), but the messages we fill
 * from our own const data are only packed (read), never written: these two helpers are
 * the one place that drops const for them, so -Wcast-qual stays on everywhere else. */
#ifndef KVS_PROTO_PBC_H
#define KVS_PROTO_PBC_H

#include <stddef.h>
#include <stdint.h>

#include <protobuf-c/protobuf-c.h>

/* A string field that borrows s (for packing only). */
static inline char *kvs_pb_str(const char *s)
{
    return (char *)(uintptr_t)s;
}

/* A bytes field that borrows p[0..n) (for packing only). */
static inline ProtobufCBinaryData kvs_pb_bin(const void *p, size_t n)
{
    return (ProtobufCBinaryData){.len = n, .data = (uint8_t *)(uintptr_t)p};
}

#endif
