#!/usr/bin/env bash
# The README's two commands (run as root on Debian 12; idempotent):
#   deploy/dev.sh demo   install what is missing, build, start kvstashd on its defaults,
#                        run a real workload with kvctl, show the results, stop the daemon
#   deploy/dev.sh test   install what is missing, build (warnings are errors), run every test
# Other verbs: deps (install only), build (install + build), sanitize (the whole suite
# built with ASan + UBSan in build-asan, CPU only: the README's Development section).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${KVS_BUILD_DIR:-$ROOT/build}
PY=/usr/bin/python3   # Debian's interpreter: python3-grpcio & co. live there

# Debian 12 packages the build and the tests need.
PACKAGES=(build-essential cmake pkg-config git
          libgrpc-dev libprotobuf-c-dev protobuf-c-compiler libuv1-dev liblmdb-dev
          libxxhash-dev libcmocka-dev libcjson-dev libssl-dev valgrind clang-format clang libclang-rt-14-dev
          python3 python3-grpcio python3-protobuf python3-numpy python3-pytest python3-xxhash
          python3-pip python3-setuptools python3-wheel python3-torch
          protobuf-compiler protobuf-compiler-grpc libhiredis-dev libcyaml-dev libyaml-dev
          libmicrohttpd-dev libsystemd-dev libzmq3-dev libmsgpack-dev python3-zmq python3-msgpack)
# Only for the test command: promtool, for test_metrics.py's format check and the alert
# rules of deploy/k8s (it comes with the Prometheus server, which Debian enables on a
# systemd host: `demo` does not install it); yamllint and python3-kubernetes (the API's
# object models, for schema checks) for ctest deploy.k8s; dnsmasq-base, the DNS server
# test_sharding.py runs on a loopback port (the binary alone; the `dnsmasq` package would
# also enable a system resolver service).
TEST_PACKAGES=(prometheus yamllint python3-kubernetes dnsmasq-base)

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

deps() {
    install_missing "${PACKAGES[@]}"
}

install_missing() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

build() {
    deps
    log "building in $BUILD"
    mkdir -p "$BUILD"
    cmake -S "$ROOT" -B "$BUILD" -DKVS_WERROR=ON ${KVS_CMAKE_ARGS:-} >"$BUILD/configure.log" 2>&1 ||
        { cat "$BUILD/configure.log"; exit 1; }
    cmake --build "$BUILD" -j"$(nproc)" 2>&1 | grep -E "error|warning|Error" || true
    cmake --build "$BUILD" -j"$(nproc)" >/dev/null   # fails loudly if the first build did
}

run_tests() {
    build
    install_missing "${TEST_PACKAGES[@]}"
    log "running every test (ctest)"
    cd "$BUILD"
    ctest --output-on-failure --timeout 900 "$@"
}

sanitize() {
    deps
    install_missing "${TEST_PACKAGES[@]}"
    local dir=$ROOT/build-asan
    log "building with ASan + UBSan in $dir (cmake preset asan)"
    (cd "$ROOT" && cmake --preset asan -DKVS_WERROR=ON >/dev/null)
    cmake --build "$dir" -j"$(nproc)" >/dev/null
    log "running every test under the sanitizers"
    cd "$dir"
    ctest --output-on-failure --timeout 1800 "$@"
}

# The C library, kvstashd and kvctl under /usr/local (cmake --install), and the Python package
# for Debian's python3, offline (no index, Debian's pip and setuptools), so that
# `python3 -c 'import kvstash'` works after the setup command (README "Python").
install_system() {
    log "installing libkvstash, kvstashd, kvctl (/usr/local) and the Python package kvstash"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo cmake --install "$BUILD" >"$BUILD/install.log" 2>&1 || { cat "$BUILD/install.log"; exit 1; }
    $sudo ldconfig
    # --break-system-packages: Debian marks its python3 externally managed (PEP 668); this
    # package has no dependencies to conflict with Debian's and lands in /usr/local.
    PIP_NO_INDEX=1 $sudo "$PY" -m pip install --quiet --no-deps --no-build-isolation \
        --break-system-packages --upgrade "$ROOT/client/python" >"$BUILD/pip.log" 2>&1 ||
        { cat "$BUILD/pip.log"; exit 1; }
    (cd / && "$PY" -c 'import kvstash; print("python3: import kvstash", kvstash.__version__, "from", kvstash.__file__)')
}

demo() {
    build
    install_system
    local bin=$BUILD/bin port
    DEMO_WORK=$(mktemp -d)
    DEMO_PID=""
    trap '[ -z "$DEMO_PID" ] || kill "$DEMO_PID" 2>/dev/null; rm -rf "$DEMO_WORK"' EXIT
    local work=$DEMO_WORK
    log "starting kvstashd on its embedded defaults (port 50051, or a free one if taken)"
    local listen=127.0.0.1:50051
    if (exec 3<>/dev/tcp/127.0.0.1/50051) 2>/dev/null; then listen=127.0.0.1:0; fi
    "$bin/kvstashd" --listen "$listen" --port-file "$work/port" 2>"$work/kvstashd.log" &
    DEMO_PID=$!
    for _ in $(seq 100); do [ -s "$work/port" ] && break; sleep 0.1; done
    [ -s "$work/port" ] || { cat "$work/kvstashd.log"; echo "kvstashd did not start" >&2; exit 1; }
    port=$(cat "$work/port")
    kvctl() { "$bin/kvctl" --target "127.0.0.1:$port" "$@"; }
    kvctl status

    log "workload 1: real KV (6 layers, 4 kv-heads, head_dim 128) from tests/data, 16-token blocks"
    kvctl ns create realkv --layers 6 --kv-heads 4 --head-dim 128 --block-tokens 16 --dtype fp16
    local n
    n=$("$PY" "$ROOT/tests/data/kvsample.py" blocks "$ROOT/tests/data/realkv-a-64.kvs" "$work/blk" --block-tokens 16)
    local all_tokens="" keys=() i
    for ((i = 0; i < n; i++)); do all_tokens+=" $(cat "$work/blk/block-$i.tokens")"; done
    # shellcheck disable=SC2086
    mapfile -t keys < <(kvctl key --block-tokens 16 $all_tokens)
    for ((i = 0; i < n; i++)); do kvctl put realkv "hex:${keys[i]}" "$work/blk/block-$i.bin" >/dev/null; done
    local lookup_args=()
    for k in "${keys[@]}"; do lookup_args+=("hex:$k"); done
    kvctl lookup realkv "${lookup_args[@]}"
    printf '\n%-6s %-34s %10s %-10s\n' block "chained key" bytes "read back"
    local ok=0
    for ((i = 0; i < n; i++)); do
        kvctl get realkv "hex:${keys[i]}" "$work/out-$i.bin" 2>/dev/null
        if cmp -s "$work/blk/block-$i.bin" "$work/out-$i.bin"; then res=verified; ok=$((ok + 1)); else res=MISMATCH; fi
        printf '%-6s %-34s %10s %-10s\n' "$i" "${keys[i]}" "$(stat -c %s "$work/out-$i.bin")" "$res"
    done
    printf 'real KV blocks verified byte for byte: %d/%d\n\n' "$ok" "$n"

    log "workload 2: Llama-3-8B-like layout (32 layers, 8 kv-heads, head_dim 128, 16 tokens = 2 MiB blocks)"
    kvctl ns create llama3-8b --layers 32 --kv-heads 8 --head-dim 128 --block-tokens 16
    kvctl bench llama3-8b --blocks 128 --threads 4

    log "workload 3: the same real KV stored compressed (quantizers: PolarQuant, RotateKV-2, KIVI-2)"
    for codec in polarquant rotatekv-2 kivi-2; do
        kvctl ns create "realkv-$codec" --layers 6 --kv-heads 4 --head-dim 128 --block-tokens 16 \
            --codec "$codec" >/dev/null
        for ((i = 0; i < n; i++)); do
            kvctl put "realkv-$codec" "hex:${keys[i]}" "$work/blk/block-$i.bin" >/dev/null
            kvctl get "realkv-$codec" "hex:${keys[i]}" "$work/lossy-$i.bin" 2>/dev/null
        done
    done
    kvctl stats
    kvctl ns list

    log "workload 4: a multi-turn chat on a Llama-style torch model (random weights, CPU unless a GPU is here): prefixes restored from kvstashd vs recomputed"
    local dev=cpu
    (cd / && "$PY" -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)') 2>/dev/null && dev=cuda
    (cd / && "$PY" "$ROOT/client/python/examples/chat_reuse.py" --target "127.0.0.1:$port" \
        --model tiny --device "$dev" --users 3 --turns 3 --system-tokens 256)

    log "codec quality on the real KV sample (tests/bench/quality.c; full table in tests/bench/RESULTS.md)"
    "$bin/kvs-quality" "$ROOT/tests/data/realkv-a-64.kvs" --block-tokens 16

    log "stopping kvstashd (SIGTERM: drain, then exit)"
    kill -TERM "$DEMO_PID"
    local rc=0
    wait "$DEMO_PID" || rc=$?
    DEMO_PID=""
    [ "$rc" -eq 0 ] || { cat "$work/kvstashd.log"; echo "kvstashd exited with $rc" >&2; exit 1; }
    [ "$ok" -eq "$n" ] || { echo "demo: $((n - ok)) blocks did not verify" >&2; exit 1; }
    log "demo done: kvstashd stopped cleanly"
}

case "${1:-demo}" in
    deps) deps ;;
    build) build ;;
    test) shift; run_tests "$@" ;;
    sanitize) shift; sanitize "$@" ;;
    demo) demo ;;
    *) echo "usage: $0 [demo|test|build|deps|sanitize]" >&2; exit 2 ;;
esac
