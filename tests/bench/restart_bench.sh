#!/bin/sh
# Restart time of kvstashd with N (default 1M) blocks on disk: puts them through kvctl bench
# (host tier small, so they spill to LMDB), stops the daemon, starts it again on the same
# --data-dir and prints the restore line it logs. BIN = folder of kvstashd and kvctl.
set -u
B=${BIN:-build/bin}
D=$(mktemp -d)  # a fresh data directory, removed at the end
trap 'rm -rf "$D"' EXIT
$B/kvstashd --listen 127.0.0.1:0 --port-file /tmp/rb.port --data-dir $D --host-capacity 64M --disk-capacity 8G --stats-interval 0 > /tmp/rb-d1.log 2>&1 &
P=$!; sleep 1.5
T="--target 127.0.0.1:$(cat /tmp/rb.port)"
$B/kvctl $T ns create r --layers 1 --kv-heads 1 --head-dim 16 --block-tokens 16 --codec kivi-2
start=$(date +%s)
$B/kvctl $T bench r --blocks ${N:-1000000} --threads 8 --keep > /tmp/rb-bench.log 2>&1
echo "bench rc $? in $(( $(date +%s) - start )) s"
kill -TERM $P; wait $P
ls -la $D
s2=$(date +%s.%N)
$B/kvstashd --listen 127.0.0.1:0 --port-file /tmp/rb.port2 --data-dir $D --host-capacity 64M --disk-capacity 8G --stats-interval 0 > /tmp/rb-d2.log 2>&1 &
P=$!
while [ ! -s /tmp/rb.port2 ]; do sleep 0.05; done
e2=$(date +%s.%N)
echo "restart to listening: $(echo "$e2 - $s2" | bc) s"
grep -i "restor\|index\|blocks" /tmp/rb-d2.log | head -5
kill -TERM $P; wait $P
