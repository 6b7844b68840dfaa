#!/bin/sh
# Restore into each GPU in parallel (issue 17; results in RESULTS.md). One kvstashd with
# --gpu all on a Unix socket; one kvs-bench-restore per visible GPU, all at once, each with
# CUDA_VISIBLE_DEVICES=g so that its GPU memory is on device g (the daemon's region socket
# matches the memory's device UUID, so device g's engine and GPU tier serve it); then the
# same on GPU 0 alone, the single-GPU number. Aggregate GB/s = the sum of the workers' own
# GB/s (each the best of REPS restores of its prefix; with REPS of 5 and more the workers'
# restores overlap). The restored bytes are checked by kvs-bench-restore itself (exit 1).
#
#   tests/bench/multi_gpu.sh KVSTASHD KVS_BENCH_RESTORE [OUTDIR]
#   (TOKENS=8192 CODEC=kivi-2 PATHS=ipc REPS=5 GPUS: the device numbers, default all)
set -u
D=$1; B=$2; O=${3:-.}
TOKENS=${TOKENS:-8192}
CODEC=${CODEC:-kivi-2}
PATHS=${PATHS:-ipc}
REPS=${REPS:-5}
GPUS=${GPUS:-$(nvidia-smi --query-gpu=index --format=csv,noheader | tr '\n' ' ')}
W=$(mktemp -d)
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$W"' EXIT
"$D" --listen "unix:$W/kvs.sock" --gpu all --gpu-capacity 40% --host-capacity 32G \
    --region-max-bytes 16G --log-level info > "$O/multi-gpu-kvstashd.log" 2>&1 &
pid=$!
for _ in $(seq 200); do [ -S "$W/kvs.sock.region" ] && break; sleep 0.1; done
[ -S "$W/kvs.sock.region" ] || { echo "kvstashd did not start"; tail -n 5 "$O/multi-gpu-kvstashd.log"; exit 1; }
echo "# restore into each GPU in parallel ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) x $(echo $GPUS | wc -w), $(date -u +%F))"
echo "codec $CODEC, $TOKENS tokens per worker, paths $PATHS, best of $REPS"
run() { # $1 = device, $2 = output file
    CUDA_VISIBLE_DEVICES=$1 "$B" --target "unix:$W/kvs.sock" --codec "$CODEC" --tokens "$TOKENS" \
        --reps "$REPS" --paths "$PATHS" > "$2" 2>&1
}
sum() { # the GB/s column of path $1 over files $2...
    p=$1; shift
    awk -F'|' -v p=" $p " '$2 == p { s += $4; n++ } END { printf "%.2f GB/s (%d workers)\n", s, n }' "$@"
}
status=0
for g in $GPUS; do run "$g" "$W/w$g.md" & done
wait_all=0
for j in $(jobs -p); do [ "$j" = "$pid" ] && continue; wait "$j" || wait_all=1; done
for g in $GPUS; do echo "## worker on GPU $g (parallel)"; cat "$W/w$g.md"; done
[ $wait_all = 0 ] || { echo "a worker failed"; status=1; }
set -- $GPUS
run "$1" "$W/alone.md" || status=1
echo "## worker on GPU $1 alone"; cat "$W/alone.md"
for p in $(echo "$PATHS" | tr ',' ' '); do
    echo "aggregate $p, parallel: $(sum "$p" "$W"/w*.md); alone: $(sum "$p" "$W/alone.md")"
done
"${KVCTL:-$(dirname "$B")/kvctl}" --target "unix:$W/kvs.sock" stats 2>&1 | sed -n '1,12p'
exit $status
