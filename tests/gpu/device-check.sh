#!/bin/sh
# GPU checks on the device machine (an H100/H200 without our Debian libraries).
# Here (the build machine):
#   cmake -S . -B build-gpu -DKVS_CUDA=ON -DKVS_WERROR=ON && cmake --build build-gpu -j2
#   mkdir -p .gpurun && cp build-gpu/tests/gpu/test_* build-gpu/bin/kvs-bench-gpu \
#       build-gpu/bin/kvstashd build-gpu/bin/kvctl .gpurun/
#   ../shared/tools/bundle-libs .devlibs .gpurun/*
# then run this script there with .gpurun and .devlibs carried. It runs the kernel and
# engine tests, the same tests under compute-sanitizer memcheck, and the benchmark, and
# leaves the logs in $OUT (or ./gpu-out).
set -u
OUT=${OUT:-./gpu-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=$PWD/.devlibs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
R=.gpurun
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
status=0
for t in test_codecs_gpu test_engine_gpu; do
    $R/$t > "$OUT/$t.log" 2>&1
    rc=$?
    echo "== $t: exit $rc"; tail -n 12 "$OUT/$t.log"
    [ $rc -eq 0 ] || status=1
done
if [ "${MEMCHECK:-1}" = 1 ]; then
    for t in test_codecs_gpu test_engine_gpu; do
        compute-sanitizer --tool memcheck --error-exitcode 9 $R/$t > "$OUT/memcheck-$t.log" 2>&1
        rc=$?
        echo "== memcheck $t: exit $rc"; grep -E "ERROR SUMMARY|Invalid|failures" "$OUT/memcheck-$t.log" | tail -n 3
        [ $rc -eq 0 ] || status=1
    done
fi
if [ "${BENCH:-1}" = 1 ]; then
    $R/kvs-bench-gpu > "$OUT/bench_gpu.md" 2>&1
    echo "== kvs-bench-gpu: exit $?"; cat "$OUT/bench_gpu.md"
fi
exit $status
