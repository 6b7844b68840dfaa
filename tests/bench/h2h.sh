#!/usr/bin/env bash
# kvstash against Redis, head to head (issue 12), in one command: starts a private
# redis-server and kvstashd on free loopback ports, creates one kvstash namespace per codec
# (Llama-3-8B layout: 32 layers, 8 kv-heads, head_dim 128, 16-token blocks), runs
# kvs-bench-h2h with 16-token blocks (2 MiB) and 1-token blocks (128 KiB, partial blocks of
# the same namespaces), prints both tables and stops both servers on exit, whatever happens.
#
# Binaries: $KVSTASHD, $KVCTL, $H2H (default $KVS_BUILD_DIR/bin/..., KVS_BUILD_DIR=build),
# $REDIS_SERVER (default redis-server on PATH). Knobs, with their defaults:
#   H2H_SECONDS=3           length of each Put and Get phase
#   H2H_CLIENTS=1,8,64      client thread counts (one connection per thread, per store)
#   H2H_CODECS="none polarquant rotatekv-2"
#   H2H_DATA_MIB=1024       key space of each run in raw bytes: Puts cycle over
#                           H2H_DATA_MIB MiB worth of keys, so each store holds at most that
#   H2H_TOKENS="16 1"       block sizes to run
#   H2H_JSON=1              JSON instead of Markdown
#   H2H_ARGS=...            extra kvs-bench-h2h flags (e.g. --shared-conn)
#   KVSTASHD_ARGS=...       extra kvstashd flags (e.g. --gpu off)
# Memory: each store holds one run's key space at a time (the bench deletes its keys after
# each run), so the peak is about 2.5 x H2H_DATA_MIB (Redis rounds 2 MiB values up to its
# allocator's 2.5 MiB class) plus the client's buffers.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BUILD=${KVS_BUILD_DIR:-$ROOT/build}
KVSTASHD=${KVSTASHD:-$BUILD/bin/kvstashd}
KVCTL=${KVCTL:-$BUILD/bin/kvctl}
H2H=${H2H:-$BUILD/bin/kvs-bench-h2h}
REDIS_SERVER=${REDIS_SERVER:-redis-server}
SECS=${H2H_SECONDS:-3}
CLIENTS=${H2H_CLIENTS:-1,8,64}
CODECS=${H2H_CODECS:-none polarquant rotatekv-2}
DATA_MIB=${H2H_DATA_MIB:-1024}
TOKENS=${H2H_TOKENS:-16 1}

die() { echo "h2h.sh: $*" >&2; exit 1; }
for b in "$KVSTASHD" "$KVCTL" "$H2H"; do [ -x "$b" ] || die "$b: not an executable (build it, or set KVSTASHD/KVCTL/H2H)"; done
command -v "$REDIS_SERVER" >/dev/null || die "$REDIS_SERVER not found (apt-get install redis-server)"

WORK=$(mktemp -d /tmp/kvs-h2h.XXXXXX)
REDIS_PID="" KVS_PID=""
cleanup() {
    local rc=$?
    # A failed run shows why: a server that died or was told to drain says so in its log.
    if [ "$rc" -ne 0 ]; then
        for f in "$WORK/kvstashd.log" "$WORK/redis.log"; do
            [ -s "$f" ] && { echo "--- tail of $f" >&2; tail -n 20 "$f" >&2; }
        done
    fi
    # Only the two servers this script started, by pid.
    for p in $REDIS_PID $KVS_PID; do kill -TERM "$p" 2>/dev/null || true; done
    for p in $REDIS_PID $KVS_PID; do wait "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Redis has no "pick a free port" (--port 0 turns TCP off): ask the kernel for one, then
# retry with another if something took it before redis-server bound it.
PY=/usr/bin/python3; [ -x "$PY" ] || PY=python3  # the GPU machine's is elsewhere
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
REDIS_PORT=""
for _ in 1 2 3 4 5; do
    port=$(free_port) || die "cannot find a free port (python3)"
    # Defaults otherwise, as Redis is deployed: one I/O thread, jemalloc, no maxmemory.
    "$REDIS_SERVER" --port "$port" --bind 127.0.0.1 --save '' --appendonly no --daemonize no \
        --dir "$WORK" --logfile "$WORK/redis.log" &
    REDIS_PID=$!
    for _ in $(seq 50); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && { REDIS_PORT=$port; break; }
        kill -0 "$REDIS_PID" 2>/dev/null || break
        sleep 0.1
    done
    [ -n "$REDIS_PORT" ] && break
    kill "$REDIS_PID" 2>/dev/null || true
    wait "$REDIS_PID" 2>/dev/null || true
    REDIS_PID=""
done
[ -n "$REDIS_PORT" ] || { cat "$WORK/redis.log" >&2 2>/dev/null; die "redis-server did not start"; }

# Host tier: one run's key space plus room for Puts that replace a block while its old
# copy is still held, and 1 GiB of slack.
HOST_MIB=$((2 * DATA_MIB + 1024))
# shellcheck disable=SC2086
"$KVSTASHD" --listen 127.0.0.1:0 --port-file "$WORK/kvs.port" --host-capacity "${HOST_MIB}M" \
    --stats-interval 0 --log-level info ${KVSTASHD_ARGS:-} 2>"$WORK/kvstashd.log" &
KVS_PID=$!
for _ in $(seq 100); do [ -s "$WORK/kvs.port" ] && break; kill -0 "$KVS_PID" 2>/dev/null || break; sleep 0.1; done
[ -s "$WORK/kvs.port" ] || { cat "$WORK/kvstashd.log" >&2; die "kvstashd did not start"; }
KVS_TARGET=127.0.0.1:$(cat "$WORK/kvs.port")

NS=""
for codec in $CODECS; do
    "$KVCTL" --target "$KVS_TARGET" ns create "h2h-$codec" --layers 32 --kv-heads 8 \
        --head-dim 128 --block-tokens 16 --codec "$codec" >/dev/null ||
        die "kvctl ns create h2h-$codec failed"
    NS+=${NS:+,}h2h-$codec
done

# What ran where goes to stderr, so that stdout is the tables alone (or JSON, one document
# per block size).
info() { echo "$@" >&2; }
info "kvstash $("$KVSTASHD" --version 2>&1 | head -1) at $KVS_TARGET (host tier ${HOST_MIB} MiB);" \
    "$("$REDIS_SERVER" --version | cut -d' ' -f1-3) at 127.0.0.1:$REDIS_PORT"
info "$(date), $(uname -m), nproc $(nproc)"
for t in $TOKENS; do
    bytes=$((32 * 2 * t * 8 * 128 * 2))
    blocks=$((DATA_MIB * 1048576 / bytes))
    [ "$blocks" -ge 1 ] || blocks=1
    args=(--redis "127.0.0.1:$REDIS_PORT" --kvstash "$KVS_TARGET" --ns "$NS" --block-tokens "$t"
          --clients "$CLIENTS" --seconds "$SECS" --blocks "$blocks")
    [ -z "${H2H_JSON:-}" ] || args+=(--json)
    # shellcheck disable=SC2206
    args+=(${H2H_ARGS:-})
    info
    info "\$ kvs-bench-h2h ${args[*]}"
    # Both servers and the client share this machine's cores with whatever else runs:
    # the load average before and after says how quiet it was.
    info "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
    "$H2H" "${args[@]}"
    info "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
done
