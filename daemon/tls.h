/* TLS for kvstashd's gRPC listener (DESIGN §9, README "TLS"): the server certificate
 * chain (tls_cert) and its key (tls_key), and for mutual TLS the CA whose certificates
 * clients must present (tls_client_ca). kvs_tls_load reads and checks the three PEM
 * files at start, before anything else is started, so a bad file stops the daemon with
 * a message naming the key and the path: missing or unreadable, not PEM, a key that does
 * not belong to the certificate, a key protected by a passphrase. SIGHUP reads the files
 * again at the same paths (a renewed certificate) and checks them the same way; if they
 * pass, kvs_tls_reload hands them to the listener, whose handshaker asks for them at the
 * next connection (gRPC's certificate-config fetcher): connections already open keep
 * theirs. Turning mutual TLS on or off still needs a restart (the listener's client
 * certificate policy is fixed when it is created).
 *
 *   loaded (fresh) ──listener's fetch──> handed to gRPC (our key copy wiped)
 *        ^                                      │
 *        └──────── kvs_tls_reload (SIGHUP) ─────┘
 *
 * TLS applies to a TCP listener only; config.c refuses the keys with a unix: address
 * (README "TLS" says why) and the incomplete combinations (a key without a certificate,
 * a client CA without both).
 *
 * Threading: main.c loads and reloads on the loop thread; gRPC's threads call the fetcher
 * at each handshake. kvs_tls.mu (a leaf) guards the PEM text and the fresh flag.
 */
#ifndef KVS_DAEMON_TLS_H
#define KVS_DAEMON_TLS_H

#include <stdbool.h>

#include <grpc/grpc_security.h>

#include "daemon/config.h"
#include "gpu/base/err.h"

typedef struct kvs_tls kvs_tls;

/* Largest PEM file accepted (a certificate chain is a few KiB). */
#define KVS_TLS_FILE_MAX (1 << 20)

/* Reads cfg's TLS files. *out is NULL when tls_cert is not set (plaintext), else owned by
 * the caller (kvs_tls_destroy). KVS_EINVAL or KVS_EIO with a message naming the key and
 * path otherwise; *out is then NULL. Callable before grpc_init. */
int kvs_tls_load(const kvs_config *cfg, kvs_tls **out, kvs_err *err);

/* Credentials for grpc_server_add_http2_port: SSL ones that fetch their certificate from
 * tls (mutual TLS, that is GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY, with
 * a client CA), or insecure ones when tls is NULL. The caller releases them
 * (grpc_server_credentials_release); tls must outlive the server (destroy it after
 * grpc_shutdown). After grpc_init only. NULL if gRPC could not build them. */
grpc_server_credentials *kvs_tls_server_credentials(kvs_tls *tls);

/* SIGHUP: next (loaded by kvs_tls_load from the same config, taken over in every case)
 * replaces live's files for the connections that follow. KVS_EINVAL naming tls_client_ca
 * if next turns mutual TLS on or off (a restart does that); live is unchanged then. */
int kvs_tls_reload(kvs_tls *live, kvs_tls *next, kvs_err *err);

/* True if clients must present a certificate (tls_client_ca set). tls may be NULL. */
bool kvs_tls_mutual(const kvs_tls *tls);

/* Wipes the private key's text and frees tls. NULL is allowed. */
void kvs_tls_destroy(kvs_tls *tls);

#endif
