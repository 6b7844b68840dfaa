/* kvctl: the admin and debugging CLI of kvstashd (DESIGN §10).
 *
 *   kvctl [--target ADDR] [--token T | --token-file PATH] [--tls-ca FILE] [--tls-cert FILE
 * --tls-key FILE] [--tls-server-name NAME] [--timeout-ms N] [--chunk SIZE] [--json]
 * [--progress | --no-progress] COMMAND ...
 *
 * This file holds the command table, the global options and the dispatch, including
 * `help`, `--help` and `--version`. The parsed global options are the only mutable
 * global state of kvctl; they are filled once here and handed to the commands as a
 * const pointer. Exit codes: 0 ok, 1 the call failed, 2 usage error.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvctl.h"

#ifndef KVSTASH_VERSION
#define KVSTASH_VERSION "0.1.0"
#endif
#define DEFAULT_TARGET "127.0.0.1:50051"

static kvctl_globals g_opts;

static const kvctl_cmd *const COMMANDS[] = {
    &kvctl_cmd_status, &kvctl_cmd_ns_create, &kvctl_cmd_ns_list, &kvctl_cmd_ns_drop,
    &kvctl_cmd_put,    &kvctl_cmd_get,       &kvctl_cmd_lookup,  &kvctl_cmd_exists,
    &kvctl_cmd_delete, &kvctl_cmd_key,       &kvctl_cmd_stats,   &kvctl_cmd_bench,
    &kvctl_cmd_verify, &kvctl_cmd_flush,     &kvctl_cmd_evict,
};
#define N_COMMANDS (sizeof COMMANDS / sizeof COMMANDS[0])

static void print_overview(FILE *f)
{
    fprintf(
        f, "usage: kvctl [--target ADDR] [--token T | --token-file PATH] [--tls-ca FILE]\n"
           "             [--tls-cert FILE --tls-key FILE] [--tls-server-name NAME]\n"
           "             [--timeout-ms N] [--chunk SIZE] [--json] [--[no-]progress]\n"
           "             COMMAND [ARGS...]\n"
           "\n"
           "Administers and debugs a kvstashd daemon.\n"
           "\n"
           "global options:\n"
           "  --target ADDR     daemon address, host:port or unix:PATH (default: $KVSTASH_TARGET,\n"
           "                    else " DEFAULT_TARGET ")\n"
           "  --token T         bearer token (the admin token for ns, stats, status, verify,\n"
           "                    flush and evict; a tenant token for its own namespaces);\n"
           "                    default: $KVSTASH_TOKEN\n"
           "  --token-file PATH read the token from PATH, a trailing newline dropped (keeps\n"
           "                    it out of `ps`); default: $KVSTASH_TOKEN_FILE\n"
           "  --tls-ca FILE     TLS: trust the CA certificates in FILE (PEM) for the daemon's\n"
           "                    certificate; default: $KVSTASH_TLS_CA. Any --tls-* option\n"
           "                    turns TLS on (without --tls-ca: the system's roots)\n"
           "  --tls-cert FILE   mutual TLS: this client's certificate chain (PEM), with\n"
           "                    --tls-key; default: $KVSTASH_TLS_CERT\n"
           "  --tls-key FILE    the private key of --tls-cert (PEM); default: $KVSTASH_TLS_KEY\n"
           "  --tls-server-name NAME\n"
           "                    check NAME in the daemon's certificate instead of the host of\n"
           "                    --target; default: $KVSTASH_TLS_SERVER_NAME\n"
           "  --timeout-ms N    deadline of each call (default 30000)\n"
           "  --chunk SIZE      payload bytes per Put message, e.g. 256K (default 1M)\n"
           "  --json            machine-readable output (also accepted after the command)\n"
           "  --progress, --no-progress\n"
           "                    a progress bar on stderr for verify, flush and bench: by\n"
           "                    default only when stderr is a terminal (also accepted after\n"
           "                    the command); stdout holds the result either way\n"
           "  --version, --help\n"
           "\n"
           "commands:\n");
    for (size_t i = 0; i < N_COMMANDS; i++)
        fprintf(f, "  %-10s  %s\n", COMMANDS[i]->name, COMMANDS[i]->summary);
    fprintf(f, "\n'kvctl help COMMAND' or 'kvctl COMMAND --help' describes one command.\n"
               "exit status: 0 ok, 1 the call failed, 2 usage error.\n");
}

static void print_help(const kvctl_cmd *cmd)
{
    printf("usage: kvctl %s%s%s\n\n%s\n\n%s", cmd->name, cmd->args[0] ? " " : "", cmd->args,
           cmd->summary, cmd->help);
}

/* Finds the command named by argv[0] (and argv[1] for two-word commands); *words says
 * how many arguments the name took. NULL if none matches. */
static const kvctl_cmd *find_command(int argc, char **argv, int *words)
{
    for (size_t i = 0; i < N_COMMANDS; i++) {
        const char *name = COMMANDS[i]->name;
        const char *space = strchr(name, ' ');
        if (!space) {
            if (strcmp(argv[0], name) == 0) {
                *words = 1;
                return COMMANDS[i];
            }
        } else if (argc >= 2 && strlen(argv[0]) == (size_t)(space - name) &&
                   strncmp(argv[0], name, (size_t)(space - name)) == 0 &&
                   strcmp(argv[1], space + 1) == 0) {
            *words = 2;
            return COMMANDS[i];
        }
    }
    return NULL;
}

/* "kvctl ns" alone (or with an unknown subcommand): lists the group's commands to f
 * (when not NULL); returns whether `group` names a group. */
static int group_usage(const char *group, FILE *f)
{
    size_t n = strlen(group);
    int found = 0;
    for (size_t i = 0; i < N_COMMANDS; i++) {
        const char *name = COMMANDS[i]->name;
        if (strncmp(name, group, n) == 0 && name[n] == ' ') {
            if (f && !found)
                fprintf(f, "usage:\n");
            if (f)
                fprintf(f, "  kvctl %s%s%s\n", name, COMMANDS[i]->args[0] ? " " : "",
                        COMMANDS[i]->args);
            found = 1;
        }
    }
    return found;
}

static int cmd_help(int argc, char **argv)
{
    if (argc == 0) {
        print_overview(stdout);
        return KVCTL_OK;
    }
    int words;
    const kvctl_cmd *cmd = find_command(argc, argv, &words);
    if (cmd) {
        print_help(cmd);
        return KVCTL_OK;
    }
    if (group_usage(argv[0], stdout))
        return KVCTL_OK;
    fprintf(stderr, "kvctl: help: unknown command '%s'\n", argv[0]);
    return KVCTL_USAGE;
}

/* Takes --help/-h, --json and --[no-]progress out of a command's arguments (before any
 * "--"), so every command honours them in any position. */
static void strip_common(int *argc, char **argv, bool *help)
{
    int out = 0;
    bool rest = false;
    for (int i = 0; i < *argc; i++) {
        if (!rest && strcmp(argv[i], "--") == 0)
            rest = true;
        if (!rest && i > 0 && (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0)) {
            *help = true;
            continue;
        }
        if (!rest && i > 0 && strcmp(argv[i], "--json") == 0) {
            g_opts.json = true;
            continue;
        }
        if (!rest && i > 0 && strcmp(argv[i], "--progress") == 0) {
            g_opts.progress = KVCTL_PROGRESS_ON;
            continue;
        }
        if (!rest && i > 0 && strcmp(argv[i], "--no-progress") == 0) {
            g_opts.progress = KVCTL_PROGRESS_OFF;
            continue;
        }
        argv[out++] = argv[i];
    }
    argv[out] = NULL;
    *argc = out;
}

/* Reads the token in path into a static buffer (the process's one token): the file's
 * content, one trailing newline dropped. Returns NULL after printing why. */
static const char *read_token_file(const char *what, const char *path)
{
    static char buf[4096 + 3];
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "kvctl: %s: cannot read '%s': %s\n", what, path, strerror(errno));
        return NULL;
    }
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    bool bad = ferror(f) || n == sizeof buf - 1;
    fclose(f);
    if (n && buf[n - 1] == '\n')
        n--;
    if (n && buf[n - 1] == '\r')
        n--;
    buf[n] = 0;
    if (bad || n == 0 || strlen(buf) != n || strchr(buf, '\n')) {
        fprintf(stderr, "kvctl: %s: '%s' %s\n", what, path,
                n == 0 ? "is empty (the file must hold the token)"
                       : "is not one token (a read error, a second line or over 4096 bytes)");
        return NULL;
    }
    return buf;
}

/* The token: --token or --token-file (not both), else $KVSTASH_TOKEN or
 * $KVSTASH_TOKEN_FILE (not both). Returns -1 to go on, or an exit code. */
static int pick_token(const char *token_file)
{
    const char *etok = getenv("KVSTASH_TOKEN"), *efile = getenv("KVSTASH_TOKEN_FILE");
    if (g_opts.token && token_file) {
        fprintf(stderr, "kvctl: --token and --token-file: give the token one way\n");
        return KVCTL_USAGE;
    }
    if (g_opts.token || token_file) {
        if (token_file && !(g_opts.token = read_token_file("--token-file", token_file)))
            return KVCTL_USAGE;
        return -1;
    }
    if (etok && etok[0] && efile && efile[0]) {
        fprintf(stderr, "kvctl: KVSTASH_TOKEN and KVSTASH_TOKEN_FILE are both set: give the token "
                        "one way\n");
        return KVCTL_USAGE;
    }
    if (efile && efile[0] && !(g_opts.token = read_token_file("KVSTASH_TOKEN_FILE", efile)))
        return KVCTL_USAGE;
    if (etok && etok[0])
        g_opts.token = etok;
    return -1;
}

/* Returns an exit code, or -1 to go on with the command at argv[*first]. */
static int parse_globals(int argc, char **argv, int *first)
{
    static const struct option opts[] = {
        {"target", required_argument, NULL, 't'},
        {"token", required_argument, NULL, 'k'},
        {"token-file", required_argument, NULL, 'K'},
        {"tls-ca", required_argument, NULL, 'A'},
        {"tls-cert", required_argument, NULL, 'C'},
        {"tls-key", required_argument, NULL, 'Y'},
        {"tls-server-name", required_argument, NULL, 'N'},
        {"timeout-ms", required_argument, NULL, 'T'},
        {"chunk", required_argument, NULL, 'c'},
        {"json", no_argument, NULL, 'j'},
        {"progress", no_argument, NULL, 'P'},
        {"no-progress", no_argument, NULL, 'Q'},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        {0, 0, 0, 0},
    };
    const char *env = getenv("KVSTASH_TARGET");
    g_opts.target = env && env[0] ? env : DEFAULT_TARGET;
    const char *token_file = NULL;
    /* The environment first; a flag overrides its variable. Empty counts as unset. */
    static const struct {
        const char *var;
        const char **dst;
    } tls_env[] = {
        {"KVSTASH_TLS_CA", &g_opts.tls_ca},
        {"KVSTASH_TLS_CERT", &g_opts.tls_cert},
        {"KVSTASH_TLS_KEY", &g_opts.tls_key},
        {"KVSTASH_TLS_SERVER_NAME", &g_opts.tls_server_name},
    };
    for (size_t i = 0; i < sizeof tls_env / sizeof tls_env[0]; i++) {
        const char *v = getenv(tls_env[i].var);
        if (v && v[0])
            *tls_env[i].dst = v;
    }
    opterr = 0;
    int c;
    /* "+": stop at the command name; its options are the command's. */
    while ((c = getopt_long(argc, argv, "+:h", opts, NULL)) != -1) {
        uint64_t v;
        switch (c) {
        case 't':
            g_opts.target = optarg;
            break;
        case 'k':
            g_opts.token = optarg;
            break;
        case 'K':
            token_file = optarg;
            break;
        case 'A':
            g_opts.tls_ca = optarg;
            break;
        case 'C':
            g_opts.tls_cert = optarg;
            break;
        case 'Y':
            g_opts.tls_key = optarg;
            break;
        case 'N':
            g_opts.tls_server_name = optarg;
            break;
        case 'j':
            g_opts.json = true;
            break;
        case 'P':
            g_opts.progress = KVCTL_PROGRESS_ON;
            break;
        case 'Q':
            g_opts.progress = KVCTL_PROGRESS_OFF;
            break;
        case 'T':
            if (!kvctl_parse_u64(optarg, 1, INT64_MAX, &v)) {
                fprintf(stderr, "kvctl: --timeout-ms: '%s' is not a positive integer\n", optarg);
                return KVCTL_USAGE;
            }
            g_opts.timeout_ms = (int64_t)v;
            break;
        case 'c':
            if (!kvctl_parse_size(optarg, &g_opts.chunk_bytes) || g_opts.chunk_bytes == 0 ||
                g_opts.chunk_bytes > (uint64_t)32 << 20) {
                fprintf(stderr, "kvctl: --chunk: '%s' is not a size in 1..32M\n", optarg);
                return KVCTL_USAGE;
            }
            break;
        case 'h':
            print_overview(stdout);
            return KVCTL_OK;
        case 'V':
            printf("kvctl %s\n", KVSTASH_VERSION);
            return KVCTL_OK;
        case ':':
            fprintf(stderr, "kvctl: option '%s' needs a value\n", argv[optind - 1]);
            return KVCTL_USAGE;
        default:
            fprintf(stderr, "kvctl: unknown option '%s' (see 'kvctl --help')\n", argv[optind - 1]);
            return KVCTL_USAGE;
        }
    }
    *first = optind;
    return pick_token(token_file);
}

int main(int argc, char **argv)
{
    int first;
    int rc = parse_globals(argc, argv, &first);
    if (rc >= 0)
        return rc;
    argc -= first;
    argv += first;
    if (argc == 0) {
        print_overview(stderr);
        return KVCTL_USAGE;
    }
    if (strcmp(argv[0], "help") == 0)
        return cmd_help(argc - 1, argv + 1);

    int words;
    const kvctl_cmd *cmd = find_command(argc, argv, &words);
    if (!cmd) {
        bool help = argc >= 2 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0);
        if (group_usage(argv[0], NULL)) {
            if (!help && argc >= 2)
                fprintf(stderr, "kvctl: %s: unknown subcommand '%s'\n", argv[0], argv[1]);
            (void)group_usage(argv[0], help ? stdout : stderr); /* known to be a group */
            return help ? KVCTL_OK : KVCTL_USAGE;
        }
        fprintf(stderr, "kvctl: unknown command '%s' (see 'kvctl help')\n", argv[0]);
        return KVCTL_USAGE;
    }
    /* The command sees argv[0] = its last word, like a program of its own. */
    argc -= words - 1;
    argv += words - 1;
    bool help = false;
    strip_common(&argc, argv, &help);
    if (help) {
        print_help(cmd);
        return KVCTL_OK;
    }
    optind = 0; /* GNU getopt: rescan from argv[1] */
    return cmd->run(cmd, &g_opts, argc, argv);
}
