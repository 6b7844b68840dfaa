#!/bin/sh
# Stages what the GPU machine needs (it has none of our Debian libraries, no protoc):
# binaries of a CUDA build (stripped), the shared libraries they need
# ("$(dirname "$0")/../../../shared/tools/bundle-libs"), and the Python wire modules generated here, packed into
# one .gpurun/bundle.tar.xz (xz's large window shares the CUDA fatbin the binaries have in
# common, which keeps the carry far below its limit). tests/gpu/device-check.sh unpacks it.
#
#   tests/gpu/stage.sh [BUILD_DIR]     (default build-gpu, configured with -DKVS_CUDA=ON)
set -eu
B=${1:-build-gpu}
S=$(mktemp -d)
trap 'rm -rf "$S"' EXIT
mkdir -p "$S/bin" "$S/pb"
cp "$B/tests/gpu/test_codecs_gpu" "$B/tests/gpu/test_engine_gpu" "$B/tests/gpu/test_extremes_gpu" \
   "$B/tests/gpu/test_paged_gpu" "$B/tests/gpu/test_client_decode_gpu" "$B/tests/gpu/test_recode_gpu" \
   "$B/tests/gpu/test_multi_gpu" "$B/tests/gpu/test_fidelity_gpu" \
   "$B/bin/kvs-bench-gpu" \
   "$B/bin/kvs-bench-tier" "$B/bin/kvs-bench-restore" \
   "$B/bin/kvstashd" "$B/bin/kvctl" "$B/bin/kvs-bench-h2h" "$S/bin/"
# Redis for the head-to-head (tests/bench/h2h.sh, device-check.sh H2H=1), where installed here.
if command -v redis-server > /dev/null; then cp "$(command -v redis-server)" "$S/bin/"; fi
strip "$S"/bin/*
"$(dirname "$0")/../../../shared/tools/bundle-libs" "$S/libs" "$S"/bin/* "$B"/lib/libkvstash.so.0 "$B"/lib/libkvstash_cuda.so.0 > /dev/null
# The Python package's libraries (the tests load them by KVSTASH_LIB / beside it).
cp -L "$B"/lib/libkvstash.so.0 "$B"/lib/libkvstash_cuda.so.0 "$S/libs/"
/usr/bin/protoc -Iproto --python_out="$S/pb" --grpc_python_out="$S/pb" \
    --plugin=protoc-gen-grpc_python=/usr/bin/grpc_python_plugin proto/kvstash/v1/kvstash.proto
touch "$S/pb/kvstash/__init__.py" "$S/pb/kvstash/v1/__init__.py"  # see kvs.py's load_proto
# Written beside and renamed into place: a device call that carries .gpurun meanwhile takes
# the old bundle or the new one, never half of one.
mkdir -p .gpurun
tar -C "$S" -cf - bin libs pb | xz -9e -T2 > .gpurun/bundle.tar.xz.tmp
mv -f .gpurun/bundle.tar.xz.tmp .gpurun/bundle.tar.xz
ls -la .gpurun/bundle.tar.xz
