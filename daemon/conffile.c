/* kvstashd's YAML config file: see conffile.h. */
#include "daemon/conffile.h"

#include <cyaml/cyaml.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <yaml.h>

#include "gpu/base/file.h"

/* What libcyaml loads: one string per key of the table, NULL when absent. */
typedef struct file_values {
    char *v[KVS_CONFIG_NKEYS];
} file_values;

static bool plain_null(const yaml_event_t *ev)
{
    const char *v = (const char *)ev->data.scalar.value;
    return ev->data.scalar.style == YAML_PLAIN_SCALAR_STYLE &&
           (!v[0] || !strcmp(v, "~") || !strcmp(v, "null") || !strcmp(v, "Null") ||
            !strcmp(v, "NULL"));
}

/* The event pass: the file is one mapping of known keys to scalars, each key once;
 * lines[i] gets key i's 1-based line. */
static int scan(const char *path, const char *buf, size_t len, uint32_t *lines, kvs_err *err)
{
    enum { TOP, DOC, KEY, VALUE, DOC_END, END } want = TOP;
    yaml_parser_t p;
    if (!yaml_parser_initialize(&p))
        return kvs_err_set(err, KVS_ENOMEM, "%s: yaml_parser_initialize failed", path);
    yaml_parser_set_input_string(&p, (const unsigned char *)buf, len);
    int rc = 0, key = -1;
    while (!rc && want != END) {
        yaml_event_t ev;
        if (!yaml_parser_parse(&p, &ev)) {
            rc = kvs_err_set(err, KVS_EINVAL, "%s:%zu: not YAML: %s%s%s", path,
                             p.problem_mark.line + 1, p.problem ? p.problem : "syntax error",
                             p.context ? " " : "", p.context ? p.context : "");
            break;
        }
        unsigned line = (unsigned)ev.start_mark.line + 1;
        switch (ev.type) {
        case YAML_STREAM_START_EVENT:
            break;
        case YAML_STREAM_END_EVENT:
            want = END;
            break;
        case YAML_DOCUMENT_START_EVENT:
            if (want != TOP)
                rc = kvs_err_set(err, KVS_EINVAL, "%s:%u: a second YAML document: one only", path,
                                 line);
            want = DOC;
            break;
        case YAML_DOCUMENT_END_EVENT:
            want = DOC_END;
            break;
        case YAML_MAPPING_START_EVENT:
            if (want == DOC)
                want = KEY;
            else if (want == VALUE)
                rc = kvs_err_set(err, KVS_EINVAL, "%s:%u: %s: takes one value, not a mapping", path,
                                 line, kvs_config_key_name(key));
            else
                rc = kvs_err_set(err, KVS_EINVAL, "%s:%u: a key must be a plain word", path, line);
            break;
        case YAML_MAPPING_END_EVENT:
            want = DOC_END;
            break;
        case YAML_SEQUENCE_START_EVENT:
            if (want == VALUE)
                rc = kvs_err_set(err, KVS_EINVAL, "%s:%u: %s: takes one value, not a list", path,
                                 line, kvs_config_key_name(key));
            else
                rc = kvs_err_set(err, KVS_EINVAL,
                                 "%s:%u: the file must be a mapping of keys to values "
                                 "(KEY: VALUE lines)",
                                 path, line);
            break;
        case YAML_ALIAS_EVENT:
            rc = kvs_err_set(err, KVS_EINVAL, "%s:%u: YAML aliases are not supported", path, line);
            break;
        case YAML_SCALAR_EVENT:
            if (want == DOC) {
                /* A document of nothing (only "---" or comments) sets nothing. */
                if (!plain_null(&ev))
                    rc = kvs_err_set(err, KVS_EINVAL,
                                     "%s:%u: the file must be a mapping of keys to values "
                                     "(KEY: VALUE lines)",
                                     path, line);
                want = DOC_END;
            } else if (want == KEY) {
                const char *k = (const char *)ev.data.scalar.value;
                key = kvs_config_key_find(k);
                if (key < 0)
                    rc = kvs_err_set(err, KVS_EINVAL,
                                     "%s:%u: %.64s: unknown key (the keys are kvstashd's "
                                     "flags with _ for -: see --help)",
                                     path, line, k);
                else if (lines[key])
                    rc = kvs_err_set(err, KVS_EINVAL, "%s:%u: %s: given twice (first at line %u)",
                                     path, line, k, lines[key]);
                else
                    lines[key] = line;
                want = VALUE;
            } else if (want == VALUE) {
                if (plain_null(&ev))
                    rc = kvs_err_set(err, KVS_EINVAL,
                                     "%s:%u: %s: no value (\"\" for an empty string)", path,
                                     lines[key], kvs_config_key_name(key));
                want = KEY;
            }
            break;
        default:
            break;
        }
        yaml_event_delete(&ev);
    }
    yaml_parser_delete(&p);
    return rc;
}

typedef struct cyaml_msg {
    char text[256];
} cyaml_msg;

/* Keeps libcyaml's first error line (its backtrace lines follow it). */
static void log_first_error(cyaml_log_t level, void *ctx, const char *fmt, va_list ap)
{
    cyaml_msg *m = ctx;
    if (level < CYAML_LOG_ERROR || m->text[0])
        return;
    vsnprintf(m->text, sizeof m->text, fmt, ap);
    m->text[strcspn(m->text, "\n")] = 0;
}

int kvs_conffile_apply(kvs_config *cfg, kvs_err *err)
{
    const char *path = cfg->file;
    char *buf = NULL;
    size_t len = 0;
    int rc = kvs_file_read_text(NULL, path, KVS_CONFFILE_MAX, &buf, &len, err);
    if (rc)
        return rc;
    uint32_t lines[KVS_CONFIG_NKEYS] = {0};
    if ((rc = scan(path, buf, len, lines, err))) {
        free(buf);
        return rc;
    }
    /* The schema: every key an optional string, at its index in file_values. */
    cyaml_schema_field_t fields[KVS_CONFIG_NKEYS + 1];
    memset(fields, 0, sizeof fields);
    for (int i = 0; i < KVS_CONFIG_NKEYS; i++) {
        fields[i].key = kvs_config_key_name(i);
        fields[i].data_offset = (uint32_t)(offsetof(file_values, v) + i * sizeof(char *));
        fields[i].value = (cyaml_schema_value_t){
            CYAML_VALUE_STRING(CYAML_FLAG_POINTER | CYAML_FLAG_OPTIONAL, char, 0, CYAML_UNLIMITED)};
    }
    const cyaml_schema_value_t top = {CYAML_VALUE_MAPPING(CYAML_FLAG_POINTER, file_values, fields)};
    cyaml_msg msg = {{0}};
    const cyaml_config_t ccfg = {.log_fn = log_first_error,
                                 .log_ctx = &msg,
                                 .mem_fn = cyaml_mem,
                                 .log_level = CYAML_LOG_ERROR,
                                 .flags = CYAML_CFG_DEFAULT};
    file_values *vals = NULL;
    cyaml_err_t ce =
        cyaml_load_data((const uint8_t *)buf, len, &ccfg, &top, (cyaml_data_t **)&vals, NULL);
    free(buf);
    if (ce != CYAML_OK)
        return kvs_err_set(err, KVS_EINVAL, "%s: %s (%s)", path,
                           msg.text[0] ? msg.text : "cannot load", cyaml_strerror(ce));
    for (int i = 0; vals && i < KVS_CONFIG_NKEYS && !rc; i++)
        if (vals->v[i])
            rc = kvs_config_key_set(cfg, i, vals->v[i], KVS_SRC_FILE, lines[i], NULL, err);
    if (vals)
        cyaml_free(&ccfg, &top, vals, 0);
    return rc;
}
