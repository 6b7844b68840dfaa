/* kvstash error codes and error context.
 *
 * Every function that can fail returns int: 0 on success, a negative KVS_E* code
 * otherwise. Detail travels in an optional kvs_err (code + message) that the caller
 * passes; NULL is always allowed. One table, KVS_ERR_MAP, defines every code with its
 * message and the gRPC status it maps to on the wire (DESIGN §4), so adding a code is
 * one line. System errors pass through as -errno where that is clearer.
 *
 * Thread-safety: a kvs_err belongs to one caller; the functions here keep no state.
 */
#ifndef KVS_BASE_ERR_H
#define KVS_BASE_ERR_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* XX(name, value, grpc status number, message) */
#define KVS_ERR_MAP(XX)                                                                            \
    XX(EINVAL, -30001, 3, "invalid argument")                                                      \
    XX(ENOTFOUND, -30002, 5, "not found")                                                          \
    XX(EEXIST, -30003, 6, "already exists")                                                        \
    XX(ENOSPC, -30004, 8, "no room: nothing can be evicted to make space")                         \
    XX(ENOMEM, -30005, 8, "out of memory")                                                         \
    XX(E2BIG, -30006, 8, "message or block over the configured limit")                             \
    XX(EUNAUTH, -30007, 16, "missing or unknown bearer token")                                     \
    XX(EPERM, -30008, 7, "token not allowed for this call")                                        \
    XX(EUNAVAIL, -30009, 14, "server unavailable (draining or unreachable)")                       \
    XX(EDATALOSS, -30010, 15, "stored block failed its checksum and was dropped")                  \
    XX(EINTERNAL, -30011, 13, "internal error")                                                    \
    XX(ENOTSUP, -30012, 12, "not supported")                                                       \
    XX(ETIMEDOUT, -30013, 4, "deadline exceeded")                                                  \
    XX(ECANCELED, -30014, 1, "cancelled")                                                          \
    XX(EIO, -30015, 13, "I/O error")                                                               \
    XX(EPROTO, -30016, 13, "protocol error: malformed message")

enum {
#define KVS_ERR_ENUM(name, val, grpc, msg) KVS_##name = (val),
    KVS_ERR_MAP(KVS_ERR_ENUM)
#undef KVS_ERR_ENUM
};

#define KVS_ERR_MSG_LEN 256

typedef struct kvs_err {
    int code;                  /* 0 or a KVS_E* / -errno code */
    char msg[KVS_ERR_MSG_LEN]; /* human message naming the field or call at fault */
} kvs_err;

/* Clears an error (code 0, empty message). err may be NULL. */
void kvs_err_clear(kvs_err *err);

/* Sets err (if not NULL) to code with a printf-style message and returns code, so that
 * `return kvs_err_set(err, KVS_EINVAL, "tokens: %u > block_tokens %u", t, T);` reads well. */
int kvs_err_set(kvs_err *err, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Prefixes the existing message with context ("while ...: "); returns err->code (or 0). */
int kvs_err_prefix(kvs_err *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Static message for a code (KVS_E* or -errno). Never NULL. */
const char *kvs_strerror(int code);

/* Symbolic name ("KVS_EINVAL", "ENOENT", ...). Never NULL. */
const char *kvs_err_name(int code);

/* gRPC status number for a code (0 for success, 2 UNKNOWN for codes outside the table,
 * 13 INTERNAL for -errno). */
int kvs_err_grpc_status(int code);

/* The KVS_E* code for a gRPC status number (inverse of kvs_err_grpc_status where it is
 * unambiguous; RESOURCE_EXHAUSTED maps to KVS_ENOSPC). */
int kvs_err_from_grpc_status(int status);

#ifdef __cplusplus
}
#endif

#endif
