#!/bin/sh
# Builds the libFuzzer targets with clang in their own tree and runs each over its corpus
# for a bounded time (issue 14 item 6). ctest runs it as fuzz.smoke; by hand:
#
#   tests/fuzz/run.sh [BUILD_DIR [SECONDS]]      (default build/fuzz, 20 s per target)
#
# New inputs the fuzzer finds go to a scratch copy of the corpus, not into the source
# tree; a crash leaves its input as BUILD_DIR/crash-<target>-* and fails the run (turn it
# into a regression test: copy it into tests/fuzz/corpus/<target>/ and fix the bug).
# Exit 77 (ctest: skipped) when clang or libFuzzer is not installed.
set -u
SRC=$(cd "$(dirname "$0")/../.." && pwd)
B=${1:-$SRC/build/fuzz}
SECS=${2:-${KVS_FUZZ_SECONDS:-20}}
command -v clang > /dev/null || { echo "fuzz: no clang (Debian: clang, libclang-rt-14-dev)"; exit 77; }
[ -f "$(clang -print-file-name=libclang_rt.fuzzer-x86_64.a)" ] ||
    { echo "fuzz: no libFuzzer runtime (Debian: libclang-rt-14-dev)"; exit 77; }
mkdir -p "$B"
# Instrument everything (the parsers live in the libraries): fuzzer coverage, ASan, UBSan.
cmake -S "$SRC" -B "$B" -DCMAKE_C_COMPILER=clang -DCMAKE_BUILD_TYPE=Debug -DKVS_CUDA=OFF \
    -DKVS_FUZZ=ON -DBUILD_TESTING=OFF -DKVS_SANITIZE=fuzzer-no-link,address,undefined \
    > "$B/configure.log" 2>&1 || { cat "$B/configure.log"; exit 1; }
cmake --build "$B" -j"$(nproc)" --target fuzz_wire fuzz_block fuzz_config > "$B/build.log" 2>&1 ||
    { tail -n 40 "$B/build.log"; exit 1; }
status=0
for t in fuzz_wire fuzz_block fuzz_config; do
    work=$(mktemp -d)
    cp "$SRC/tests/fuzz/corpus/$t"/* "$work/" 2>/dev/null
    # The corpus first (every checked-in input, crashes found earlier included), then mutations.
    "$B/bin/$t" -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 -use_cmp=1 \
        -artifact_prefix="$B/crash-$t-" "$work" > "$B/$t.log" 2>&1
    rc=$?
    execs=$(grep -Eo '#[0-9]+' "$B/$t.log" | tail -n 1 | tr -d '#')
    echo "$t: exit $rc, ${execs:-0} executions in ${SECS} s, corpus $(ls "$work" | wc -l) inputs"
    if [ $rc -ne 0 ]; then
        status=1
        grep -E "ERROR|SUMMARY|Test unit written" "$B/$t.log" | head -n 10
    fi
    rm -rf "$work"
done
exit $status
