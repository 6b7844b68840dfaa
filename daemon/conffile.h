/* kvstashd's YAML config file (DESIGN §11): one mapping of keys (config.h's key table,
 * each the flag's name with '_' for '-') to single values, e.g.
 *
 *     host_capacity: 8G
 *     eviction: s3fifo
 *
 * Two libraries read it, from one copy of its bytes: libyaml's event parser first, to
 * check the shape and learn each key's line (an unknown key, a key given twice, a list
 * where a value belongs: refused with FILE:LINE), then libcyaml, which loads the values
 * through a schema built from the key table. libcyaml alone would do the loading, but its
 * errors name only the line of the enclosing mapping, and a value it loads fine may still
 * fail our checks: both need the key's own line, which only the event parser gives.
 * Each value then goes through the same check as its flag (kvs_config_key_set), whose
 * error names FILE:LINE: key.
 *
 * Threading: no state; the caller owns cfg.
 */
#ifndef KVS_DAEMON_CONFFILE_H
#define KVS_DAEMON_CONFFILE_H

#include "daemon/config.h"
#include "gpu/base/err.h"

/* Most bytes a config file may have. */
#define KVS_CONFFILE_MAX (1u << 20)

/* Reads the file cfg->file and applies its settings to cfg (source KVS_SRC_FILE with the
 * key's line). An empty file, or one of comments only, sets nothing. On error cfg may
 * hold some of the file's values: callers start over from the defaults. KVS_EIO (cannot
 * read it) or KVS_EINVAL, the message beginning with the file's name (and line). */
int kvs_conffile_apply(kvs_config *cfg, kvs_err *err);

#endif
