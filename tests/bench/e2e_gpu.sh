#!/bin/sh
# End-to-end Put and Get through kvstashd (issue 4): per codec, `kvctl bench` of Llama-3-8B-like
# blocks (L=32, H=8, D=128, T=16: 2 MiB of fp16 per block) over loopback gRPC, with the
# GPU engine and GPU tier (blocks stay in GPU memory), and with the CPU codecs (--gpu off)
# for comparison. Every block is verified (byte for byte for none, finite and within the
# relative error bound for lossy codecs). Prints one markdown row per (mode, codec, threads).
#
#   tests/bench/e2e_gpu.sh [KVSTASHD] [KVCTL]    (defaults: build/bin/...)
# Environment: BLOCKS (default 512), THREADS (default "1 8"), CODECS, MODES ("gpu cpu"),
# LOGDIR (keep the daemons' logs there), EXTRA (more kvstashd flags, e.g. --host-pinned off).
set -u
D=${1:-build/bin/kvstashd}
C=${2:-build/bin/kvctl}
BLOCKS=${BLOCKS:-512}
THREADS=${THREADS:-"1 8"}
CODECS=${CODECS:-"none fp8 kivi-2 kivi-4 polarquant rotatekv-2 squat-2"}
MODES=${MODES:-"gpu cpu"}
WORK=$(mktemp -d)
LOGDIR=${LOGDIR:-}
# Daemon logs are kept in $LOGDIR when set (the device run passes $OUT).
trap 'kill $PID 2>/dev/null; [ -n "$LOGDIR" ] && cp "$WORK"/d-*.log "$LOGDIR"/ 2>/dev/null; rm -rf "$WORK"' EXIT
echo "| mode | codec | threads | put MB/s | put p50 ms | put p99 ms | get MB/s | get p50 ms | get p99 ms | verified |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for mode in $MODES; do
    if [ "$mode" = gpu ]; then flags="--gpu on --gpu-capacity 40%"; else flags="--gpu off"; fi
    rm -f "$WORK/port"
    # --calib-tokens 16: rotatekv freezes its channel order on the first block (the
    # bench's own warm-up) instead of after 4096 tokens.
    $D --listen 127.0.0.1:0 --port-file "$WORK/port" --host-capacity 16G --stats-interval 0 \
        --calib-tokens 16 $flags ${EXTRA:-} > "$WORK/d-$mode.log" 2>&1 &
    PID=$!
    for _ in $(seq 200); do [ -s "$WORK/port" ] && break; sleep 0.1; done
    if [ ! -s "$WORK/port" ]; then echo "kvstashd ($mode) did not start:"; cat "$WORK/d-$mode.log"; exit 1; fi
    T="--target 127.0.0.1:$(cat "$WORK/port")"
    for codec in $CODECS; do
        ns=$(echo "b-$codec" | tr -c 'a-z0-9\n' '-')
        $C $T ns create "$ns" --layers 32 --kv-heads 8 --head-dim 128 --block-tokens 16 \
            --codec "$codec" > /dev/null || exit 1
        $C $T bench "$ns" --blocks 1 --threads 1 --seed 999 > /dev/null || exit 1  # warm-up
        for th in $THREADS; do
            out=$($C $T bench "$ns" --blocks "$BLOCKS" --threads "$th" --seed "$th" 2>&1)
            rc=$?
            put=$(echo "$out" | awk '$1=="put"{print $6" | "$7" | "$8}')
            get=$(echo "$out" | awk '$1=="get"{print $6" | "$7" | "$8}')
            ver=$(echo "$out" | awk '/verified/ && /blocks/{print $2}')
            [ $rc -eq 0 ] || ver="FAILED($rc)"
            echo "| $mode | $codec | $th | $put | $get | $ver |"
        done
    done
    $C $T stats 2>/dev/null | grep -i -E "tier|gpu" | head -n 4 | sed 's/^/    /' >&2
    kill -TERM $PID; wait $PID
done
