#!/bin/sh
# GPU checks on the device machine (an H100/H200 without our Debian libraries).
# Here (the build machine):
#   cmake -S . -B build-gpu -DKVS_CUDA=ON -DKVS_WERROR=ON && cmake --build build-gpu -j2
#   tests/gpu/stage.sh build-gpu          # -> .gpurun/bundle.tar.xz
# then run this script there with .gpurun carried. Steps (each can be turned off):
#   TESTS=1     kernel and engine tests (GPU vs CPU references, GPU tier in the engine)
#   MEMCHECK=1  the same under compute-sanitizer memcheck
#   INTEG=1     the daemon's integration tests through the GPU engine (whole suite, GPU
#               tier off so the host-tier tests see what they expect), then the GPU tier
#               tests and the round-trip/codec/encoded/tiers/durable/persist/crash/full suites
#               with the GPU tier on
#   BENCH=1     kvs-bench-gpu (kernel throughput vs copy bandwidth, one-block latency)
#   TIERBENCH=1 kvs-bench-tier (host <-> GPU tier moves, staged vs pinned host memory)
#   RESTORE=1   tests/bench/restore_gpu.sh (a prefix restored by each data-plane path, vs
#               recomputing it with PyTorch; its knobs TOKENS, CODECS, PATHS, REPS,
#               CONNECTIONS, TRANSPORT pass through)
#   E2E=1       tests/bench/e2e_gpu.sh (Put/Get through kvstashd, GPU vs CPU codecs)
#   FIDCOST=1   tests/bench/fidelity_cost.sh: what measuring every Put (and a bound) costs a
#               Put through a GPU-engine kvstashd (MODE, CODECS, BLOCKS, THREADS, ROUNDS)
#   H2H=1       tests/bench/h2h.sh: kvstash against Redis (bundled from this machine's
#               redis-server), H2H_SECONDS, H2H_CLIENTS, H2H_CODECS, H2H_TOKENS, KVSTASHD_ARGS
#   MULTIGPU=1  (a machine with several GPUs) the multi-GPU, GPU-tier, data-plane and Python
#               client tests through kvstashd --gpu all, then tests/bench/multi_gpu.sh: restore
#               into each GPU in parallel through one kvstashd --gpu all (TOKENS, CODEC, PATHS,
#               REPS, GPUS); test_multi_gpu (TESTS=1) runs on two real devices there
#   PPL=1       tests/bench/ppl/ppl_bench.py through a kvstashd with its GPU engine (the codecs
#               on the GPU; PPL_WINDOWS, PPL_THREADS, PPL_ARGS; default table A's --post-rope)
#   CHAT=1      client/python/examples/chat_reuse.py with Llama-3-8B shapes on this GPU
#               through a kvstashd with its GPU engine (codec none, then CHAT_CODECS)
# Logs go to $OUT (or ./gpu-out), packed into $OUT/logs.tar.gz at the end (PACK=0: not).
set -u
OUT=${OUT:-./gpu-out}
mkdir -p "$OUT"
R=.gpurun
[ -f $R/bundle.tar.xz ] && tar -C $R -xJf $R/bundle.tar.xz
export LD_LIBRARY_PATH=$PWD/$R/libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
# The bundled daemon, kvctl, wire modules and the Python package's library, for every
# step that runs the integration tests or the Python example.
export KVSTASHD=$PWD/$R/bin/kvstashd KVCTL=$PWD/$R/bin/kvctl KVS_PB_DIR=$PWD/$R/pb
export KVSTASH_LIB=$PWD/$R/libs/libkvstash.so.0 PYTHONUNBUFFERED=1
status=0
note() { echo "== $1: exit $2"; [ "$2" -eq 0 ] || status=1; }
if [ "${TESTS:-1}" = 1 ]; then
    for t in test_codecs_gpu test_engine_gpu test_extremes_gpu test_paged_gpu test_client_decode_gpu \
             test_recode_gpu test_multi_gpu test_fidelity_gpu; do
        $R/bin/$t > "$OUT/$t.log" 2>&1
        rc=$?
        note $t $rc; grep -E "FAIL|MISMATCH" "$OUT/$t.log" | head -n 20; tail -n 12 "$OUT/$t.log"
    done
fi
if [ "${MEMCHECK:-1}" = 1 ]; then
    for t in test_codecs_gpu test_engine_gpu test_fidelity_gpu; do
        compute-sanitizer --tool memcheck --error-exitcode 9 $R/bin/$t > "$OUT/memcheck-$t.log" 2>&1
        rc=$?
        note "memcheck $t" $rc; grep -E "ERROR SUMMARY|Invalid|failures" "$OUT/memcheck-$t.log" | tail -n 3
    done
fi
if [ -n "${INTEG_ONLY:-}" ]; then  # these test files only, GPU engine + GPU tier
    (cd tests/integration && KVSTASHD_EXTRA="${INTEG_ONLY_EXTRA:---gpu on}" python3 -m pytest -q -p no:cacheprovider \
        -rs $INTEG_ONLY > "$OUT/integ-only.log" 2>&1)
    note "integration ($INTEG_ONLY), GPU engine + GPU tier" $?; tail -n 25 "$OUT/integ-only.log"
fi
if [ "${INTEG:-1}" = 1 ]; then
    (cd tests/integration && KVSTASHD_EXTRA="--gpu on --gpu-capacity 0" \
        python3 -m pytest -q -x -p no:cacheprovider . > "$OUT/integ-engine.log" 2>&1)
    note "integration, GPU engine, host tier" $?; tail -n 5 "$OUT/integ-engine.log"
    (cd tests/integration && KVSTASHD_EXTRA="--gpu on" python3 -m pytest -q -p no:cacheprovider \
        test_gpu_tier.py test_roundtrip.py test_codecs.py test_encoded.py test_admin_tiers.py \
        test_durable.py test_persist.py test_crash.py test_tiers_full.py test_disk_full.py \
        test_stalled.py test_hostile.py > "$OUT/integ-tier.log" 2>&1)
    note "integration, GPU engine + GPU tier" $?; tail -n 5 "$OUT/integ-tier.log"
fi
if [ "${BENCH:-1}" = 1 ]; then
    $R/bin/kvs-bench-gpu > "$OUT/bench_gpu.md" 2>&1
    echo "== kvs-bench-gpu: exit $?"; cat "$OUT/bench_gpu.md"
fi
if [ "${TIERBENCH:-1}" = 1 ]; then
    $R/bin/kvs-bench-tier > "$OUT/bench_tier.md" 2>&1
    echo "== kvs-bench-tier: exit $?"; cat "$OUT/bench_tier.md"
fi
if [ "${RESTORE:-1}" = 1 ]; then
    tests/bench/restore_gpu.sh $R/bin/kvstashd $R/bin/kvs-bench-restore "$OUT" > "$OUT/restore.md" 2>&1
    echo "== restore vs recompute: exit $?"; cat "$OUT/restore.md"
fi
if [ "${E2E:-1}" = 1 ]; then
    LOGDIR=$OUT tests/bench/e2e_gpu.sh $R/bin/kvstashd $R/bin/kvctl > "$OUT/e2e.md" 2> "$OUT/e2e.err"
    echo "== e2e: exit $?"; cat "$OUT/e2e.md"; tail -n 8 "$OUT/e2e.err"
fi
if [ "${FIDCOST:-0}" = 1 ]; then
    sh tests/bench/fidelity_cost.sh $R/bin/kvstashd $R/bin/kvctl > "$OUT/fidcost.md" 2>&1
    note "fidelity cost" $?; cat "$OUT/fidcost.md"
fi
if [ "${H2H:-0}" = 1 ]; then  # issue 12: kvstash against Redis on this machine (H2H_* knobs)
    KVSTASHD=$KVSTASHD KVCTL=$KVCTL H2H=$PWD/$R/bin/kvs-bench-h2h REDIS_SERVER=$PWD/$R/bin/redis-server \
        bash tests/bench/h2h.sh > "$OUT/h2h.md" 2> "$OUT/h2h.err"
    note "head-to-head with Redis" $?; cat "$OUT/h2h.md"; tail -n 5 "$OUT/h2h.err"
fi
if [ "${MULTIGPU:-0}" = 1 ]; then  # issue 17: the GPU-tier tests through --gpu all, then
    # restore into each GPU in parallel
    (cd tests/integration && KVSTASHD_EXTRA="--gpu all" python3 -m pytest -q -p no:cacheprovider \
        -rs test_multi_gpu.py test_gpu_tier.py test_data_plane.py test_python_client.py \
        > "$OUT/integ-multi.log" 2>&1)
    note "integration, --gpu all" $?; tail -n 5 "$OUT/integ-multi.log"
    KVCTL=$KVCTL tests/bench/multi_gpu.sh $R/bin/kvstashd $R/bin/kvs-bench-restore "$OUT" \
        > "$OUT/multi-gpu.md" 2> "$OUT/multi-gpu.err"
    note "multi-GPU restore" $?; cat "$OUT/multi-gpu.md"; tail -n 5 "$OUT/multi-gpu.err"
fi
if [ "${PPL:-0}" = 1 ]; then  # issue 16: perplexity through a kvstashd with its GPU engine
    python3 tests/bench/ppl/ppl_bench.py --kvstashd "$KVSTASHD" --daemon-args "--gpu on" \
        --windows "${PPL_WINDOWS:-128}" --threads "${PPL_THREADS:-8}" ${PPL_ARGS:---post-rope} \
        --json "$OUT/ppl-gpu.json" > "$OUT/ppl-gpu.md" 2> "$OUT/ppl-gpu.err"
    note "perplexity, GPU engine" $?; cat "$OUT/ppl-gpu.md"; tail -n 3 "$OUT/ppl-gpu.err"
fi
if [ "${CHAT:-0}" = 1 ]; then
    T=$(mktemp -d)
    $R/bin/kvstashd --listen unix:$T/kvs.sock --gpu on --host-capacity 24G \
        > "$OUT/chat-kvstashd.log" 2>&1 &
    kpid=$!
    for _ in $(seq 100); do [ -S $T/kvs.sock.region ] && break; sleep 0.1; done
    for codec in none ${CHAT_CODECS:-kivi-4 polarquant}; do
        PYTHONPATH=client/python python3 client/python/examples/chat_reuse.py --target unix:$T/kvs.sock \
            --model llama3-8b --device cuda --codec $codec --users 4 --turns 3 \
            --system-tokens ${CHAT_SYSTEM:-4000} --turn-tokens 200 --reply-tokens 100 \
            --json "$OUT/chat-8b-$codec.json" > "$OUT/chat-8b-$codec.log" 2>&1
        note "chat example, llama3-8b shapes, codec $codec" $?; tail -n 22 "$OUT/chat-8b-$codec.log"
    done
    kill $kpid; wait $kpid
fi
# The device tool brings back at most 8 files from $OUT: every log and stderr file goes into
# one archive (logs.tar.gz), the summaries (*.md, *.json) stay beside it. PACK=0 keeps them.
if [ "${PACK:-1}" = 1 ]; then
    (cd "$OUT" && find . -type f \( -name '*.log' -o -name '*.err' \) > .packed &&
        [ -s .packed ] && tar -czf logs.tar.gz -T .packed && xargs rm -f < .packed; rm -f .packed)
    echo "== logs: $OUT/logs.tar.gz"
fi
exit $status
