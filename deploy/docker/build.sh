#!/bin/sh
# Builds kvstashd, kvctl and libkvstash from a source tree and installs them (stripped)
# into a prefix: the build stage of deploy/docker/Dockerfile runs exactly this, and ctest
# deploy.docker_build runs it on the CI machine into a temporary prefix, so the recipe
# cannot rot without a test failing.
#   deploy/docker/build.sh SRC_DIR BUILD_DIR PREFIX
# RelWithDebInfo (-O2) is the build type CI tests (deploy/dev.sh test); --strip drops the
# debug info at install. Warnings are not errors here (CI makes them errors on the same
# compiler): Release (-O3) with KVS_WERROR fails today on a gcc 12 false positive
# (-Wmaybe-uninitialized, gpu/codec/paged.c).
# Environment: KVS_CUDA (AUTO, ON or OFF; default AUTO), CUDA_ARCHS (default 80;90),
# JOBS (default: cores).
set -eu
[ $# -eq 3 ] || { echo "usage: $0 SRC_DIR BUILD_DIR PREFIX" >&2; exit 2; }
src=$1 build=$2 prefix=$3
cmake -S "$src" -B "$build" \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DBUILD_TESTING=OFF \
    -DKVS_CUDA="${KVS_CUDA:-AUTO}" \
    -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-80;90}"
cmake --build "$build" -j"${JOBS:-$(nproc)}"
cmake --install "$build" --prefix "$prefix" --strip
"$prefix/bin/kvstashd" --version
