/* Targets of a sharded client: parsing and DNS resolution (contract: client/resolve.h).
 *
 * Two resolvers, both glibc's: getaddrinfo for "dns:///NAME" (what every other program on the
 * host would resolve, Kubernetes' search domains included) and res_nquery with a private
 * resolver state for "dns://SERVER/NAME", the only way to ask one given server and port
 * without touching /etc/resolv.conf (tests run a DNS server on a loopback port). Neither keeps
 * a cache here, so every run sees the records as they are now.
 */
#define _GNU_SOURCE
#include "client/resolve.h"

#include <arpa/inet.h>
#include <arpa/nameser.h>
#include <ctype.h>
#include <netdb.h>
#include <netinet/in.h>
#include <resolv.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "gpu/base/mem.h"
#include "kvstash.h"

#define DEFAULT_PORT 50051
#define DNS_PORT 53
/* A DNS server that does not answer stalls only the cluster's resolver thread (or the open),
 * but for no longer than this: one second per try, two tries per record type. */
#define DNS_RETRANS_S 1
#define DNS_RETRY 2
#define DNS_NAME_MAX 253

struct kvs_resolve {
    char **list; /* a fixed list: the ids, sorted */
    size_t n_list;
    char *name; /* dns: the name */
    unsigned port;
    bool server; /* dns://SERVER/: ask it directly */
    struct sockaddr_in server_addr;
};

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

void kvs_resolve_ids_free(char **ids, size_t n)
{
    for (size_t i = 0; ids && i < n; i++)
        free(ids[i]);
    free(ids);
}

void kvs_resolve_free(kvs_resolve *r)
{
    if (!r)
        return;
    kvs_resolve_ids_free(r->list, r->n_list);
    free(r->name);
    free(r);
}

const char *kvs_resolve_name(const kvs_resolve *r)
{
    return r->name;
}

/* "1".."65535" into *port; what names the field in the message. */
static int parse_port(const char *s, size_t len, unsigned *port, const char *what, kvs_err *err)
{
    unsigned v = 0;
    for (size_t i = 0; i < len; i++) {
        if (!isdigit((unsigned char)s[i]) || (v = v * 10 + (unsigned)(s[i] - '0')) > 65535)
            return kvs_err_set(err, KVS_EINVAL, "targets: %s: port '%.*s' is not 1..65535", what,
                               (int)len, s);
    }
    if (len == 0 || v == 0)
        return kvs_err_set(err, KVS_EINVAL, "targets: %s: port '%.*s' is not 1..65535", what,
                           (int)len, s);
    *port = v;
    return 0;
}

/* "NAME[:PORT]" of a dns: target. */
static int parse_name(kvs_resolve *r, const char *s, const char *whole, kvs_err *err)
{
    const char *colon = strrchr(s, ':');
    size_t len = colon ? (size_t)(colon - s) : strlen(s);
    r->port = DEFAULT_PORT;
    if (colon && parse_port(colon + 1, strlen(colon + 1), &r->port, whole, err))
        return err ? err->code : KVS_EINVAL;
    if (len == 0 || len > DNS_NAME_MAX || memchr(s, '/', len) || memchr(s, ',', len))
        return kvs_err_set(err, KVS_EINVAL,
                           "targets: '%s': the DNS name must be 1..%d bytes without '/' or ','",
                           whole, DNS_NAME_MAX);
    r->name = kvs_xmalloc(len + 1);
    memcpy(r->name, s, len);
    r->name[len] = 0;
    return 0;
}

/* "dns:///NAME[:PORT]", "dns:NAME[:PORT]" or "dns://SERVER[:SPORT]/NAME[:PORT]". */
static int parse_dns(kvs_resolve *r, const char *t, kvs_err *err)
{
    const char *rest = t + 4;
    if (strncmp(rest, "//", 2) != 0)
        return parse_name(r, rest, t, err);
    rest += 2;
    const char *slash = strchr(rest, '/');
    if (!slash)
        return kvs_err_set(err, KVS_EINVAL, "targets: '%s': expected dns:///NAME:PORT", t);
    if (slash > rest) {
        /* An authority names the DNS server: an IPv4 address and an optional port. */
        char host[INET_ADDRSTRLEN];
        const char *colon = memchr(rest, ':', (size_t)(slash - rest));
        size_t hl = colon ? (size_t)(colon - rest) : (size_t)(slash - rest);
        unsigned sport = DNS_PORT;
        if (colon && parse_port(colon + 1, (size_t)(slash - colon - 1), &sport, t, err))
            return err ? err->code : KVS_EINVAL;
        if (hl >= sizeof host)
            hl = sizeof host - 1; /* too long for an address: inet_pton refuses it below */
        memcpy(host, rest, hl);
        host[hl] = 0;
        r->server = true;
        r->server_addr.sin_family = AF_INET;
        r->server_addr.sin_port = htons((uint16_t)sport);
        if (inet_pton(AF_INET, host, &r->server_addr.sin_addr) != 1)
            return kvs_err_set(err, KVS_EINVAL,
                               "targets: '%s': the DNS server '%.*s' is not an IPv4 address", t,
                               (int)(slash - rest), rest);
    }
    return parse_name(r, slash + 1, t, err);
}

/* "A,B,C": each entry trimmed of blanks, none empty, none twice, none a dns: target. */
static int parse_list(kvs_resolve *r, const char *t, kvs_err *err)
{
    size_t cap = 1;
    for (const char *p = t; *p; p++)
        cap += *p == ',';
    r->list = kvs_xcalloc(cap, sizeof *r->list);
    const char *p = t;
    for (size_t i = 0; i < cap; i++) {
        const char *end = strchr(p, ',');
        if (!end)
            end = p + strlen(p);
        const char *b = p, *e = end;
        while (b < e && isspace((unsigned char)*b))
            b++;
        while (e > b && isspace((unsigned char)e[-1]))
            e--;
        size_t len = (size_t)(e - b);
        if (len == 0)
            return kvs_err_set(err, KVS_EINVAL, "targets: entry %zu of '%s' is empty", i + 1, t);
        if (len >= KVS_NODE_ID_MAX)
            return kvs_err_set(err, KVS_EINVAL, "targets: entry %zu is %zu bytes, over %d", i + 1,
                               len, KVS_NODE_ID_MAX - 1);
        if (len >= 4 && strncmp(b, "dns:", 4) == 0)
            return kvs_err_set(err, KVS_EINVAL,
                               "targets: entry %zu: a dns: target stands alone, not in a list",
                               i + 1);
        r->list[i] = kvs_xmalloc(len + 1);
        memcpy(r->list[i], b, len);
        r->list[i][len] = 0;
        r->n_list++;
        p = end + 1;
    }
    qsort(r->list, r->n_list, sizeof *r->list, cmp_str);
    for (size_t i = 1; i < r->n_list; i++)
        if (strcmp(r->list[i - 1], r->list[i]) == 0)
            return kvs_err_set(err, KVS_EINVAL, "targets: '%s' is given twice", r->list[i]);
    return 0;
}

int kvs_resolve_parse(const char *targets, kvs_resolve **out, kvs_err *err)
{
    *out = NULL;
    if (!targets || !targets[0])
        return kvs_err_set(err, KVS_EINVAL, "targets: empty");
    kvs_resolve *r = kvs_xcalloc(1, sizeof *r);
    int rc =
        strncmp(targets, "dns:", 4) == 0 ? parse_dns(r, targets, err) : parse_list(r, targets, err);
    if (rc) {
        kvs_resolve_free(r);
        return rc;
    }
    *out = r;
    return 0;
}

/* ------------------------------------------------------------------ resolution */

/* A growing set of ids. */
typedef struct idset {
    char **ids;
    size_t n, cap;
} idset;

static void add_addr(idset *s, int family, const void *addr, unsigned port)
{
    char a[INET6_ADDRSTRLEN], id[KVS_NODE_ID_MAX];
    if (!inet_ntop(family, addr, a, sizeof a))
        return; /* cannot happen for a family we asked for */
    snprintf(id, sizeof id, family == AF_INET6 ? "[%s]:%u" : "%s:%u", a, port);
    if (s->n == s->cap) {
        s->cap = s->cap ? 2 * s->cap : 8;
        s->ids = kvs_xrealloc(s->ids, s->cap * sizeof *s->ids);
    }
    s->ids[s->n++] = kvs_xstrdup(id);
}

static int by_getaddrinfo(const kvs_resolve *r, idset *s, kvs_err *err)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res = NULL;
    int rc = getaddrinfo(r->name, NULL, &hints, &res);
    if (rc != 0) {
        bool none = rc == EAI_NONAME || rc == EAI_NODATA;
        return kvs_err_set(err, none ? KVS_ENOTFOUND : KVS_EUNAVAIL, "resolving '%s': %s", r->name,
                           gai_strerror(rc));
    }
    for (struct addrinfo *a = res; a; a = a->ai_next) {
        if (a->ai_family == AF_INET)
            add_addr(s, AF_INET, &((struct sockaddr_in *)a->ai_addr)->sin_addr, r->port);
        else if (a->ai_family == AF_INET6)
            add_addr(s, AF_INET6, &((struct sockaddr_in6 *)a->ai_addr)->sin6_addr, r->port);
    }
    freeaddrinfo(res);
    return 0;
}

/* One record type from r's server; *herr is the resolver's h_errno on failure. */
static int query(const kvs_resolve *r, res_state st, int type, idset *s, int *herr)
{
    unsigned char buf[8192];
    int len = res_nquery(st, r->name, ns_c_in, type, buf, sizeof buf);
    if (len < 0) {
        *herr = st->res_h_errno;
        return -1;
    }
    ns_msg m;
    if (ns_initparse(buf, len, &m) != 0) {
        *herr = NO_RECOVERY;
        return -1;
    }
    for (int i = 0; i < ns_msg_count(m, ns_s_an); i++) {
        ns_rr rr;
        if (ns_parserr(&m, ns_s_an, i, &rr) != 0)
            continue; /* a record we cannot read: the others still count */
        if (ns_rr_type(rr) == ns_t_a && ns_rr_rdlen(rr) == 4)
            add_addr(s, AF_INET, ns_rr_rdata(rr), r->port);
        else if (ns_rr_type(rr) == ns_t_aaaa && ns_rr_rdlen(rr) == 16)
            add_addr(s, AF_INET6, ns_rr_rdata(rr), r->port);
    }
    return 0;
}

static int by_server(const kvs_resolve *r, idset *s, kvs_err *err)
{
    struct __res_state st;
    memset(&st, 0, sizeof st);
    if (res_ninit(&st) != 0)
        return kvs_err_set(err, KVS_EUNAVAIL, "resolving '%s': cannot initialize the resolver",
                           r->name);
    st.nscount = 1;
    st.nsaddr_list[0] = r->server_addr;
    st.retrans = DNS_RETRANS_S;
    st.retry = DNS_RETRY;
    int herr_a = 0, herr_aaaa = 0;
    int a = query(r, &st, ns_t_a, s, &herr_a);
    int aaaa = query(r, &st, ns_t_aaaa, s, &herr_aaaa);
    res_nclose(&st);
    if (a == 0 || aaaa == 0)
        return 0;
    /* Neither type answered: "no such name" or "no data" for both is a name without
     * records, anything else a server that could not answer. */
    int herr = herr_a == HOST_NOT_FOUND || herr_a == NO_DATA ? herr_aaaa : herr_a;
    char server[INET_ADDRSTRLEN] = "?";
    inet_ntop(AF_INET, &r->server_addr.sin_addr, server, sizeof server);
    return kvs_err_set(err,
                       herr == HOST_NOT_FOUND || herr == NO_DATA ? KVS_ENOTFOUND : KVS_EUNAVAIL,
                       "resolving '%s' at %s:%u: %s", r->name, server,
                       ntohs(r->server_addr.sin_port), hstrerror(herr));
}

int kvs_resolve_run(const kvs_resolve *r, char ***ids, size_t *n, kvs_err *err)
{
    *ids = NULL;
    *n = 0;
    idset s = {0};
    int rc;
    if (!r->name) {
        s.ids = kvs_xcalloc(r->n_list, sizeof *s.ids);
        for (size_t i = 0; i < r->n_list; i++)
            s.ids[i] = kvs_xstrdup(r->list[i]);
        s.n = r->n_list;
        *ids = s.ids;
        *n = s.n;
        return 0;
    }
    rc = r->server ? by_server(r, &s, err) : by_getaddrinfo(r, &s, err);
    if (rc == 0 && s.n == 0)
        rc = kvs_err_set(err, KVS_ENOTFOUND, "resolving '%s': no A or AAAA record", r->name);
    if (rc) {
        kvs_resolve_ids_free(s.ids, s.n);
        return rc;
    }
    /* getaddrinfo lists an address once per socket type asked and DNS may repeat one. */
    qsort(s.ids, s.n, sizeof *s.ids, cmp_str);
    size_t w = 0;
    for (size_t i = 0; i < s.n; i++) {
        if (w > 0 && strcmp(s.ids[w - 1], s.ids[i]) == 0)
            free(s.ids[i]);
        else
            s.ids[w++] = s.ids[i];
    }
    *ids = s.ids;
    *n = w;
    return 0;
}
