/* libkvstash internals shared by client.c (connection, calls, data path) and admin.c
 * (KvAdmin calls and their conversions). Not installed; kvs__ prefix (STYLE). */
#ifndef KVS_CLIENT_INT_H
#define KVS_CLIENT_INT_H

#include <protobuf-c/protobuf-c.h>

#include "kvstash.h"

#define STASH(m) "/kvstash.v1.KvStash/" m
#define ADMIN(m) "/kvstash.v1.KvAdmin/" m

/* One request, one reply: the whole call is a single batch. On success *reply belongs
 * to the caller (protobuf_c_message_free_unpacked). */
int kvs__unary(const kvs_client *c, const char *method, const ProtobufCMessage *req,
               const ProtobufCMessageDescriptor *reply_desc, ProtobufCMessage **reply,
               kvs_err *err);
/* Wire enum values to ours; unknown values become NONE / UNSPECIFIED. */
kvs_tier kvs__tier_from_pb(int t);
kvs_dtype kvs__dtype_from_pb(int d);

#endif
