/* Where the daemons of a sharded client are (README "Sharding"): the `targets` text of
 * kvs_cluster_opts, parsed once, and resolved into node ids as often as the cluster asks.
 *
 *   "HOST:PORT,HOST:PORT,..."      a fixed list; each entry is a kvs_client target (also
 *                                  "unix:PATH") and its text is the node's id
 *   "dns:///NAME[:PORT]"           every A and AAAA record of NAME, through the system's
 *   "dns:NAME[:PORT]"              resolver (getaddrinfo: nsswitch, /etc/hosts, search domains)
 *   "dns://SERVER[:SPORT]/NAME[:PORT]"  the same, asking the DNS server at the IPv4 address
 *                                  SERVER (port SPORT, 53 by default) directly (glibc's
 *                                  res_nquery: no search domains, no /etc/hosts)
 *
 * PORT defaults to 50051 (the daemon's). A record's node id is "ADDR:PORT" ("[ADDR6]:PORT"
 * for AAAA), which is also its gRPC target. Ids are unique and at most KVS_NODE_ID_MAX - 1
 * bytes. Pure functions of their arguments and the DNS: any thread.
 */
#ifndef KVS_CLIENT_RESOLVE_H
#define KVS_CLIENT_RESOLVE_H

#include <stdbool.h>
#include <stddef.h>

#include "gpu/base/err.h"

typedef struct kvs_resolve kvs_resolve;

/* Parses targets (borrowed). Errors (KVS_EINVAL) name the entry at fault. *out is freed
 * with kvs_resolve_free. */
int kvs_resolve_parse(const char *targets, kvs_resolve **out, kvs_err *err);
void kvs_resolve_free(kvs_resolve *r);

/* The DNS name for a dns: target (borrowed from r), NULL for a fixed list: a name whose
 * records change, worth resolving again. */
const char *kvs_resolve_name(const kvs_resolve *r);

/* The node ids now, sorted (strcmp) and unique; never empty on success. *ids, an array of
 * *n strings, is freed with kvs_resolve_ids_free. A name that has no A/AAAA record is
 * KVS_ENOTFOUND; a DNS server that does not answer, KVS_EUNAVAIL; the message names the
 * name and the resolver's reason. */
int kvs_resolve_run(const kvs_resolve *r, char ***ids, size_t *n, kvs_err *err);
void kvs_resolve_ids_free(char **ids, size_t n);

#endif
