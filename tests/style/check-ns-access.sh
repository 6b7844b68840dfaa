#!/bin/sh
# Tenant isolation has one check point (daemon/call.h, "Namespaces by name"): a call
# reaches a namespace only through kvs_call_ns_find/create/drop, which check the tenant
# grant. A daemon file other than call.c that calls the store's by-name verbs itself
# would bypass it: this fails the run naming the line. Run by ctest (style.ns_access).
set -eu
cd "$(dirname "$0")/../.."
hits=$(grep -nE '\bkvs_store_ns_(find|create|drop)[[:space:]]*\(' daemon/*.c | grep -v '^daemon/call\.c:' || true)
if [ -n "$hits" ]; then
    echo "$hits"
    echo "daemon: resolve namespaces with kvs_call_ns_find/create/drop (daemon/call.h), not the store's verbs"
    exit 1
fi
echo "ok: only daemon/call.c resolves namespaces by name"
