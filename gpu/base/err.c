/* Error codes and context: see err.h. */
#include "gpu/base/err.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

void kvs_err_clear(kvs_err *err)
{
    if (err) {
        err->code = 0;
        err->msg[0] = '\0';
    }
}

int kvs_err_set(kvs_err *err, int code, const char *fmt, ...)
{
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        err->code = code;
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
    }
    return code;
}

int kvs_err_prefix(kvs_err *err, const char *fmt, ...)
{
    if (!err)
        return 0;
    char prefix[KVS_ERR_MSG_LEN];
    char old[KVS_ERR_MSG_LEN];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, err->msg, sizeof old);
    /* Truncation is fine: a long context still leaves a readable message. */
    size_t n = strnlen(prefix, sizeof prefix);
    if (n > sizeof err->msg - 3)
        n = sizeof err->msg - 3;
    memcpy(err->msg, prefix, n);
    memcpy(err->msg + n, ": ", 2);
    size_t room = sizeof err->msg - n - 3;
    size_t m = strnlen(old, room);
    memcpy(err->msg + n + 2, old, m);
    err->msg[n + 2 + m] = '\0';
    return err->code;
}

const char *kvs_strerror(int code)
{
    if (code == 0)
        return "success";
    switch (code) {
#define KVS_ERR_STR(name, val, grpc, msg)                                                          \
    case KVS_##name:                                                                               \
        return msg;
        KVS_ERR_MAP(KVS_ERR_STR)
#undef KVS_ERR_STR
    }
    if (code < 0 && code > -4096)
        return strerror(-code);
    return "unknown error";
}

const char *kvs_err_name(int code)
{
    if (code == 0)
        return "OK";
    switch (code) {
#define KVS_ERR_NAME(name, val, grpc, msg)                                                         \
    case KVS_##name:                                                                               \
        return "KVS_" #name;
        KVS_ERR_MAP(KVS_ERR_NAME)
#undef KVS_ERR_NAME
    }
    return "ERRNO";
}

int kvs_err_grpc_status(int code)
{
    if (code == 0)
        return 0;
    switch (code) {
#define KVS_ERR_GRPC(name, val, grpc, msg)                                                         \
    case KVS_##name:                                                                               \
        return grpc;
        KVS_ERR_MAP(KVS_ERR_GRPC)
#undef KVS_ERR_GRPC
    }
    return (code < 0 && code > -4096) ? 13 : 2;
}

int kvs_err_from_grpc_status(int status)
{
    switch (status) {
    case 0:
        return 0;
    case 1:
        return KVS_ECANCELED;
    case 3:
        return KVS_EINVAL;
    case 4:
        return KVS_ETIMEDOUT;
    case 5:
        return KVS_ENOTFOUND;
    case 6:
        return KVS_EEXIST;
    case 7:
        return KVS_EPERM;
    case 8:
        return KVS_ENOSPC;
    case 12:
        return KVS_ENOTSUP;
    case 14:
        return KVS_EUNAVAIL;
    case 15:
        return KVS_EDATALOSS;
    case 16:
        return KVS_EUNAUTH;
    default:
        return KVS_EINTERNAL;
    }
}
