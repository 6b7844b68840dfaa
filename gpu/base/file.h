/* Small text files read whole: the config file, PEM certificates and keys. One reader, so
 * that every file the daemon and the client take from an operator is bounded, refused with
 * the same words when it is not text, and, when it held a secret, wiped before it is freed.
 *
 * Threading: no state.
 */
#ifndef KVS_BASE_FILE_H
#define KVS_BASE_FILE_H

#include <stddef.h>

#include "gpu/base/err.h"

/* Reads path whole into *out (NUL-terminated, *len bytes before the NUL; free with free()
 * or kvs_file_free_secret). `what` names the setting in the messages ("tls_key: cannot read
 * '/x': No such file or directory"), or NULL for messages that start with the path.
 * KVS_EIO when it cannot be opened or read, KVS_EINVAL when it is larger than max bytes or
 * holds a NUL byte (not text: a C string cannot carry it). *out is NULL on error. */
int kvs_file_read_text(const char *what, const char *path, size_t max, char **out, size_t *len,
                       kvs_err *err);

/* Overwrites buf's len bytes (the stores are kept: a key must not linger in freed memory),
 * then frees it. NULL is fine. */
void kvs_file_free_secret(char *buf, size_t len);

#endif
