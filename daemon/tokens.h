/* Where kvstashd's bearer tokens come from (DESIGN §9, README "Tokens", "Tenants"): the
 * token / admin_token values, or the files token_file / admin_token_file name (read here,
 * so a token never has to appear on a command line where `ps` shows it), and the tenant
 * file tenant_tokens (lines "NAMESPACE TOKEN"). kvs_tokens_load reads them all and builds
 * the daemon's kvs_auth (daemon/auth.h); main.c calls it at start and at every SIGHUP, so
 * the files are re-read each time and a bad file refuses the reload whole (the running
 * tokens stay).
 *
 * Files: a token file holds the token, one trailing newline ("\n" or "\r\n") ignored; an
 * empty or unreadable file, or one with a control character or a second line, is refused
 * naming the key and the path. The tenant file: one grant per line, the namespace name
 * (1..64 of [A-Za-z0-9._-], kvs_spec_name_ok) and the token separated by blanks; blank
 * lines and lines starting with '#' are skipped; a malformed line is refused as
 * "FILE:LINE: ...", never echoing a token. A file readable by group or others is used but
 * logged as a warning.
 *
 * Threading: no state; callable from any thread (main.c: the loop thread).
 */
#ifndef KVS_DAEMON_TOKENS_H
#define KVS_DAEMON_TOKENS_H

#include "daemon/config.h"
#include "gpu/base/err.h"

struct kvs_auth;

/* Longest token accepted from a file (and a tenant line's token). */
#define KVS_TOKEN_MAX 4096

/* Builds *out (owned by the caller: kvs_auth_destroy) from cfg's token keys, reading
 * token_file, admin_token_file and tenant_tokens if set. KVS_EINVAL or KVS_EIO with a
 * message naming the key and path (or FILE:LINE) otherwise; *out is then NULL. */
int kvs_tokens_load(const kvs_config *cfg, struct kvs_auth **out, kvs_err *err);

/* True if cfg names a token file or a tenant file (a SIGHUP has files to re-read). */
bool kvs_tokens_from_files(const kvs_config *cfg);

#endif
