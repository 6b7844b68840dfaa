#!/bin/sh
# Restore vs recompute on the GPU machine (issue 12; results in RESULTS.md). Starts a
# kvstashd with the GPU engine on a Unix socket (so the region socket is on), times a
# prompt prefix's restore by each path with kvs-bench-restore for each codec and length,
# then prefill, the copy into a paged cache and the first decode step with
# tests/bench/recompute.py (PyTorch, random weights).
#
#   tests/bench/restore_gpu.sh KVSTASHD KVS_BENCH_RESTORE [OUTDIR]
#   (TOKENS="1024 4096 8192 16384" CODECS="none polarquant rotatekv-2 kivi-2" REPS=3,
#    PATHS: kvs-bench-restore --paths for every codec, CONNECTIONS=1: its --connections,
#    PIPE_BLOCKS=64: its --pipe-blocks (shmgpu-pipe; its per-chunk trace is printed too),
#    TRANSPORT=unix: the gRPC listener, unix or tcp (loopback TCP, the remote-style paths'
#    transport; the region socket is on either way, so shm and ipc still run),
#    RECOMPUTE=0: skip the PyTorch prefill)
set -u
D=$1; B=$2; O=${3:-.}
TOKENS=${TOKENS:-1024 4096 8192 16384}
CODECS=${CODECS:-none polarquant rotatekv-2 kivi-2}
REPS=${REPS:-3}
W=$(mktemp -d)
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$W"' EXIT
if [ "${TRANSPORT:-unix}" = tcp ]; then
    listen=127.0.0.1:0
else
    listen=unix:$W/kvs.sock
fi
"$D" --listen "$listen" --port-file "$W/port" --region-socket "$W/kvs.sock.region" --gpu on \
    --host-capacity 48G --region-max-bytes 8G --log-level warn > "$O/restore-kvstashd.log" 2>&1 &
pid=$!
for _ in $(seq 100); do [ -S "$W/kvs.sock.region" ] && [ -s "$W/port" ] && break; sleep 0.1; done
target=unix:$W/kvs.sock
[ "${TRANSPORT:-unix}" = tcp ] && target=127.0.0.1:$(cat "$W/port")
echo "# restore by path ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $(nproc) cores, $(date -u +%F); gRPC over ${TRANSPORT:-unix}, ${CONNECTIONS:-1} connection(s))"
for c in $CODECS; do
    for n in $TOKENS; do
        # encoded + client CPU decode is the slow remote path (0.13 GB/s for polarquant on one
        # thread): timed for `none` only; gpudecode is the remote path of a GPU worker.
        paths=${PATHS:-getmany,shm,gpudecode,shmgpu,shmgpu-pipe,ipc}
        [ "$c" = none ] && [ -z "${PATHS:-}" ] && paths=get,getmany,shm,encoded,gpudecode,shmgpu,shmgpu-pipe,ipc
        echo "## codec $c, $n tokens"
        "$B" --target "$target" --codec "$c" --tokens "$n" --reps "$REPS" --paths "$paths" \
            --connections "${CONNECTIONS:-1}" --pipe-blocks "${PIPE_BLOCKS:-64}" 2>&1
        echo "(exit $?)"
    done
done
[ "${RECOMPUTE:-1}" = 1 ] || exit 0   # RECOMPUTE=0: the restore paths only
echo "# recompute"
python3 "$(dirname "$0")/recompute.py" --tokens "$(echo $TOKENS | tr ' ' ,)" 2>&1
