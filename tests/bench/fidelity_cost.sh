#!/bin/sh
# What measuring each block's error costs a Put through kvstashd (issue 16, items 3-4;
# RESULTS.md "What measuring a block's error costs"): per codec, namespaces that measure no
# Put (error_sample 0), every Put (error_sample 1), and every Put against a bound none
# passes (max_rel_error 0.9) or every one passes (1e-4: each block re-encoded with `none`),
# `kvctl bench` of Llama-3-8B-like blocks (L=32, H=8, D=128, T=16: 2 MiB) from THREADS
# threads over loopback gRPC, ROUNDS rounds interleaved across the namespaces (medians
# printed). The daemon: MODE gpu (the GPU engine encodes and, since 7fec2b4, measures; GPU
# tier off, so every block lands in the host tier as a measured one does) or cpu (--gpu
# off). Also prints the daemon's measurements by where they ran (/metrics).
#
#   tests/bench/fidelity_cost.sh [KVSTASHD] [KVCTL]    (defaults: build/bin/...)
# Environment: MODE (gpu), CODECS ("kivi-2 polarquant"), BLOCKS (256), THREADS (8), ROUNDS (3)
set -u
D=${1:-build/bin/kvstashd}
C=${2:-build/bin/kvctl}
MODE=${MODE:-gpu}
CODECS=${CODECS:-"kivi-2 polarquant"}
BLOCKS=${BLOCKS:-256}
THREADS=${THREADS:-8}
ROUNDS=${ROUNDS:-3}
W=$(mktemp -d)
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$W"' EXIT
if [ "$MODE" = gpu ]; then flags="--gpu on --gpu-capacity 0"; else flags="--gpu off"; fi
mport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
$D --listen 127.0.0.1:0 --port-file "$W/port" --host-capacity 16G --stats-interval 0 \
    --error-sample 0 --metrics-listen "127.0.0.1:$mport" $flags > "$W/d.log" 2>&1 &
PID=$!
for _ in $(seq 200); do [ -s "$W/port" ] && break; sleep 0.1; done
[ -s "$W/port" ] || { echo "kvstashd did not start:"; cat "$W/d.log"; exit 1; }
T="--target 127.0.0.1:$(cat "$W/port")"
shape="--layers 32 --kv-heads 8 --head-dim 128 --block-tokens 16"
names=""
for c in $CODECS; do
    for v in "s0:--error-sample 0" "s1:--error-sample 1" "b0.9:--max-rel-error 0.9" \
             "b1e-4:--max-rel-error 1e-4"; do
        n="$c-${v%%:*}"
        $C $T ns create "$n" $shape --codec "$c" ${v#*:} > /dev/null || exit 1
        $C $T bench "$n" --blocks 4 --threads 1 --seed 999 > /dev/null || exit 1 # warm-up
        names="$names $n"
    done
done
for r in $(seq "$ROUNDS"); do
    for n in $names; do
        $C $T bench "$n" --blocks "$BLOCKS" --threads "$THREADS" --seed "$((r + 10))" 2>&1 |
            awk -v n="$n" '$1=="put"{print n, $5, $6, $7}' >> "$W/rows" || exit 1
    done
done
echo "# fidelity cost ($MODE daemon; $(nproc) cores; $BLOCKS blocks of 2 MiB, $THREADS threads, $ROUNDS rounds, medians)"
echo "| namespace | put ops/s | put MB/s | put p50 ms |"
echo "|---|---|---|---|"
for n in $names; do
    awk -v n="$n" '$1==n' "$W/rows" | sort -k3 -n | awk -v n="$n" '
        {o[NR]=$2; m[NR]=$3; p[NR]=$4}
        END {k=int((NR+1)/2); printf "| %s | %s | %s | %s |\n", n, o[k], m[k], p[k]}'
done
python3 - "$mport" <<'PY'
import sys, urllib.request
t = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=10).read().decode()
for l in t.splitlines():
    if l.startswith("kvstash_codec_ops_total") or l.startswith("kvstash_codec_seconds_total"):
        print("    " + l)
PY
