/* kvctl helpers shared by the commands: diagnostics, option scanning, parsing of
 * numbers, sizes and keys, and the two output formats (aligned text tables and JSON).
 * Contract in kvctl.h. No state of its own; the table and JSON writer belong to
 * their caller. Single-threaded use (bench's workers call none of these).
 */
#include "kvctl.h"

#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/base/mem.h"

/* ------------------------------------------------------------------ diagnostics */

int kvctl_usage(const kvctl_cmd *cmd, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "kvctl: %s: ", cmd->name);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\nusage: kvctl %s%s%s\nrun 'kvctl %s --help' for details\n", cmd->name,
            cmd->args[0] ? " " : "", cmd->args, cmd->name);
    return KVCTL_USAGE;
}

int kvctl_fail(const kvctl_cmd *cmd, const kvs_err *err)
{
    fprintf(stderr, "kvctl: %s: %s\n", cmd->name, err->msg[0] ? err->msg : kvs_strerror(err->code));
    return KVCTL_FAIL;
}

int kvctl_failf(const kvctl_cmd *cmd, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "kvctl: %s: ", cmd->name);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    return KVCTL_FAIL;
}

int kvctl_getopt(const kvctl_cmd *cmd, int argc, char **argv, const struct option *opts)
{
    opterr = 0; /* our own messages, naming the command */
    int c = getopt_long(argc, argv, ":", opts, NULL);
    if (c == '?')
        kvctl_usage(cmd, "unknown option '%s'", argv[optind - 1]);
    else if (c == ':')
        kvctl_usage(cmd, "option '%s' needs a value", argv[optind - 1]);
    return c == ':' ? '?' : c;
}

int kvctl_connect(const kvctl_cmd *cmd, const kvctl_globals *g, kvs_client **out)
{
    kvs_client_opts o = {.target = g->target,
                         .token = g->token,
                         .timeout_ms = g->timeout_ms,
                         .chunk_bytes = (size_t)g->chunk_bytes,
                         .tls_ca = g->tls_ca,
                         .tls_cert = g->tls_cert,
                         .tls_key = g->tls_key,
                         .tls_server_name = g->tls_server_name};
    kvs_err err;
    if (kvs_client_connect(&o, out, &err) != 0)
        return kvctl_fail(cmd, &err);
    return KVCTL_OK;
}

int kvctl_no_options(const kvctl_cmd *cmd, int argc, char **argv)
{
    static const struct option none[] = {{0, 0, 0, 0}};
    return kvctl_getopt(cmd, argc, argv, none) == -1 ? KVCTL_OK : KVCTL_USAGE;
}

int kvctl_connect_no_args(const kvctl_cmd *cmd, const kvctl_globals *g, int argc, char **argv,
                          kvs_client **out)
{
    if (kvctl_no_options(cmd, argc, argv) != KVCTL_OK)
        return KVCTL_USAGE;
    if (optind != argc)
        return kvctl_usage(cmd, "unexpected argument '%s'", argv[optind]);
    return kvctl_connect(cmd, g, out) == KVCTL_OK ? KVCTL_OK : KVCTL_FAIL;
}

/* ------------------------------------------------------------------ parsing */

bool kvctl_parse_u64(const char *s, uint64_t min, uint64_t max, uint64_t *out)
{
    if (!s || !isdigit((unsigned char)s[0]))
        return false; /* strtoull would accept " -1" */
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno != 0 || *end != '\0' || v < min || v > max)
        return false;
    *out = v;
    return true;
}

bool kvctl_parse_size(const char *s, uint64_t *out)
{
    if (!s || !isdigit((unsigned char)s[0]))
        return false;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno != 0)
        return false;
    static const struct {
        const char *suffix;
        unsigned shift;
    } units[] = {{"", 0},     {"B", 0},  {"K", 10},   {"KiB", 10}, {"M", 20},
                 {"MiB", 20}, {"G", 30}, {"GiB", 30}, {"k", 10}};
    for (size_t i = 0; i < sizeof units / sizeof units[0]; i++) {
        if (strcmp(end, units[i].suffix) != 0)
            continue;
        if (v > (UINT64_MAX >> units[i].shift))
            return false;
        *out = (uint64_t)v << units[i].shift;
        return true;
    }
    return false;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

bool kvctl_parse_key(const char *s, kvs_key *out, char *why, size_t why_len)
{
    memset(out, 0, sizeof *out);
    if (strncmp(s, "hex:", 4) == 0) {
        const char *h = s + 4;
        size_t n = strlen(h);
        if (n % 2 != 0) {
            snprintf(why, why_len, "key '%s': odd number of hex digits", s);
            return false;
        }
        if (n == 0 || n / 2 > KVS_KEY_MAX) {
            snprintf(why, why_len, "key '%s': %zu bytes, must be 1..%d", s, n / 2, KVS_KEY_MAX);
            return false;
        }
        for (size_t i = 0; i < n / 2; i++) {
            int hi = hexval(h[2 * i]), lo = hexval(h[2 * i + 1]);
            if (hi < 0 || lo < 0) {
                snprintf(why, why_len, "key '%s': '%c%c' is not a hex byte", s, h[2 * i],
                         h[2 * i + 1]);
                return false;
            }
            out->bytes[i] = (uint8_t)(hi << 4 | lo);
        }
        out->len = (uint8_t)(n / 2);
        return true;
    }
    size_t n = strlen(s);
    if (n == 0 || n > KVS_KEY_MAX) {
        snprintf(why, why_len, "key '%.80s': %zu bytes, must be 1..%d", s, n, KVS_KEY_MAX);
        return false;
    }
    memcpy(out->bytes, s, n);
    out->len = (uint8_t)n;
    return true;
}

int kvctl_parse_keys(const kvctl_cmd *cmd, int n, char **argv, kvs_key **out)
{
    kvs_key *keys = kvs_xcalloc(n > 0 ? (size_t)n : 1, sizeof *keys);
    for (int i = 0; i < n; i++) {
        char why[160];
        if (!kvctl_parse_key(argv[i], &keys[i], why, sizeof why)) {
            free(keys);
            return kvctl_usage(cmd, "%s", why);
        }
    }
    *out = keys;
    return KVCTL_OK;
}

/* ------------------------------------------------------------------ output */

const char *kvctl_fmt_bytes(uint64_t v, char *buf, size_t len)
{
    static const char *const units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
    if (v < 1024) {
        snprintf(buf, len, "%llu B", (unsigned long long)v);
        return buf;
    }
    double d = (double)v;
    size_t u = 0;
    while (d >= 1024 && u + 1 < sizeof units / sizeof units[0]) {
        d /= 1024;
        u++;
    }
    snprintf(buf, len, "%.2f %s", d, units[u]);
    return buf;
}

const char *kvctl_fmt_duration_ms(uint64_t ms, char *buf, size_t len)
{
    uint64_t s = ms / 1000;
    if (s < 60)
        snprintf(buf, len, "%.1fs", (double)ms / 1000);
    else if (s < 3600)
        snprintf(buf, len, "%um%02us", (unsigned)(s / 60), (unsigned)(s % 60));
    else if (s < 86400)
        snprintf(buf, len, "%uh%02um%02us", (unsigned)(s / 3600), (unsigned)(s / 60 % 60),
                 (unsigned)(s % 60));
    else
        snprintf(buf, len, "%llud%02uh%02um", (unsigned long long)(s / 86400),
                 (unsigned)(s / 3600 % 24), (unsigned)(s / 60 % 60));
    return buf;
}

const char *kvctl_fmt_hex(const uint8_t *p, size_t n, char *buf, size_t len)
{
    static const char digits[] = "0123456789abcdef";
    size_t i = 0;
    for (; i < n && 2 * i + 2 < len; i++) {
        buf[2 * i] = digits[p[i] >> 4];
        buf[2 * i + 1] = digits[p[i] & 15];
    }
    buf[2 * i] = '\0';
    return buf;
}

void kvctl_table_init(kvctl_table *t, size_t ncols, ...)
{
    memset(t, 0, sizeof *t);
    t->ncols = ncols;
    va_list ap;
    va_start(ap, ncols);
    for (size_t i = 0; i < ncols; i++)
        kvctl_table_cell(t, "%s", va_arg(ap, const char *));
    va_end(ap);
}

void kvctl_table_cell(kvctl_table *t, const char *fmt, ...)
{
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (t->ncells == t->cap) {
        t->cap = t->cap ? 2 * t->cap : 64;
        char **cells = realloc(t->cells, t->cap * sizeof *cells);
        if (!cells) {
            fprintf(stderr, "kvctl: out of memory\n");
            abort();
        }
        t->cells = cells;
    }
    t->cells[t->ncells++] = kvs_xstrdup(buf);
}

static bool numeric(const char *s)
{
    if (strcmp(s, "-") == 0)
        return true;
    if (!isdigit((unsigned char)s[0]))
        return false;
    /* "12", "1.5", "2.00 MiB", "3.1x", "42%" all read as numbers. */
    for (; *s; s++)
        if (!isdigit((unsigned char)*s) && !strchr(". KMGTPiBx%", *s))
            return false;
    return true;
}

void kvctl_table_print(const kvctl_table *t, FILE *f)
{
    size_t width[32] = {0};
    bool right[32];
    size_t ncols = t->ncols < 32 ? t->ncols : 32;
    for (size_t c = 0; c < ncols; c++)
        right[c] = t->ncells > t->ncols;
    for (size_t i = 0; i < t->ncells; i++) {
        size_t c = i % t->ncols;
        if (c >= ncols)
            continue;
        size_t w = strlen(t->cells[i]);
        if (w > width[c])
            width[c] = w;
        if (i >= t->ncols && !numeric(t->cells[i]))
            right[c] = false;
    }
    for (size_t i = 0; i < t->ncells; i++) {
        size_t c = i % t->ncols;
        if (c >= ncols)
            continue;
        bool last = c + 1 == ncols;
        if (right[c])
            fprintf(f, "%*s", (int)width[c], t->cells[i]);
        else if (last)
            fputs(t->cells[i], f);
        else
            fprintf(f, "%-*s", (int)width[c], t->cells[i]);
        fputs(last ? "\n" : "  ", f);
    }
}

void kvctl_table_free(kvctl_table *t)
{
    for (size_t i = 0; i < t->ncells; i++)
        free(t->cells[i]);
    free(t->cells);
    memset(t, 0, sizeof *t);
}

void kvctl_json_escape(FILE *f, const char *s)
{
    fputc('"', f);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        switch (*p) {
        case '"':
            fputs("\\\"", f);
            break;
        case '\\':
            fputs("\\\\", f);
            break;
        case '\n':
            fputs("\\n", f);
            break;
        case '\r':
            fputs("\\r", f);
            break;
        case '\t':
            fputs("\\t", f);
            break;
        default:
            if (*p < 0x20)
                fprintf(f, "\\u%04x", *p);
            else
                fputc(*p, f);
        }
    }
    fputc('"', f);
}

void kvctl_json_init(kvctl_json *j, FILE *f)
{
    memset(j, 0, sizeof *j);
    j->f = f;
    j->first[0] = true;
}

/* Comma and key before a value. */
void kvctl_json_begin(kvctl_json *j, FILE *f, char bracket)
{
    kvctl_json_init(j, f);
    kvctl_json_open(j, NULL, bracket);
}

static void member(kvctl_json *j, const char *key)
{
    if (!j->first[j->depth])
        fputc(',', j->f);
    j->first[j->depth] = false;
    if (key) {
        kvctl_json_escape(j->f, key);
        fputc(':', j->f);
    }
}

void kvctl_json_open(kvctl_json *j, const char *key, char bracket)
{
    member(j, key);
    fputc(bracket, j->f);
    if (j->depth + 1 < (int)(sizeof j->first / sizeof j->first[0]))
        j->depth++;
    j->first[j->depth] = true;
}

void kvctl_json_close(kvctl_json *j, char bracket)
{
    fputc(bracket, j->f);
    if (j->depth > 0)
        j->depth--;
    if (j->depth == 0)
        fputc('\n', j->f);
}

void kvctl_json_str(kvctl_json *j, const char *key, const char *v)
{
    member(j, key);
    kvctl_json_escape(j->f, v);
}

void kvctl_json_u64(kvctl_json *j, const char *key, uint64_t v)
{
    member(j, key);
    fprintf(j->f, "%llu", (unsigned long long)v);
}

void kvctl_json_num(kvctl_json *j, const char *key, double v)
{
    member(j, key);
    /* JSON has no NaN or Inf. */
    if (v != v || v > 1e308 || v < -1e308)
        fputs("null", j->f);
    else
        fprintf(j->f, "%.6g", v);
}

void kvctl_json_bool(kvctl_json *j, const char *key, bool v)
{
    member(j, key);
    fputs(v ? "true" : "false", j->f);
}
