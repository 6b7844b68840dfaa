#!/bin/sh
# cmake --install, then programs built against the installed C client, both ways (issue 13,
# item 5): with pkg-config (shared, and static with the archive), and with the CMake package
# (kvstash::kvstash, kvstash::kvstash_static). Each program computes a chained block key and
# must print the README's test vector.
#   tests/install/check.sh BUILD_DIR
set -eu
B=$(cd "$1" && pwd)
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
P=$T/prefix
cmake --install "$B" --prefix "$P" > "$T/install.log"
for f in bin/kvstashd bin/kvctl include/kvstash/kvstash.h include/kvstash/gpu/base/err.h \
         include/kvstash/gpu/base/log.h \
         include/kvstash/gpu/codec/spec.h lib/libkvstash.a lib/pkgconfig/kvstash.pc \
         lib/cmake/kvstash/kvstashConfig.cmake; do
    [ -e "$P/$f" ] || { echo "missing after install: $f"; exit 1; }
done
ls "$P"/lib/libkvstash.so* > /dev/null
cat > "$T/prog.c" <<'C'
#include <stdio.h>
#include <kvstash.h>
int main(void)
{
    uint32_t tokens[4] = {1, 2, 3, 4};
    uint8_t key[KVS_CHAIN_KEY_LEN];
    kvs_key_chain(NULL, tokens, 4, key);
    for (int i = 0; i < KVS_CHAIN_KEY_LEN; i++)
        printf("%02x", key[i]);
    printf("\n");
    return 0;
}
C
want=4e7b4f6b8cadfb2a1b1a20c2457494c4
export PKG_CONFIG_PATH=$P/lib/pkgconfig
# A sanitizer build (ctest passes KVS_SANITIZE) installs instrumented libraries: programs
# linking them need the same runtime.
SAN=${KVS_SANITIZE:+-fsanitize=$KVS_SANITIZE}
# shellcheck disable=SC2046
cc $SAN -o "$T/shared" "$T/prog.c" $(pkg-config --cflags --libs kvstash) -Wl,-rpath,"$P/lib"
# shellcheck disable=SC2046
cc $SAN -o "$T/static" "$T/prog.c" $(pkg-config --cflags kvstash) "$P/lib/libkvstash.a" \
    $(pkg-config --static --libs grpc libprotobuf-c libxxhash) -lm -lpthread -lresolv
mkdir -p "$T/cm"
cat > "$T/cm/CMakeLists.txt" <<'CM'
cmake_minimum_required(VERSION 3.25)
project(use_kvstash C)
find_package(kvstash REQUIRED)
add_executable(cm_shared ../prog.c)
target_link_libraries(cm_shared PRIVATE kvstash::kvstash)
add_executable(cm_static ../prog.c)
target_link_libraries(cm_static PRIVATE kvstash::kvstash_static)
CM
cmake -S "$T/cm" -B "$T/cm/build" -DCMAKE_PREFIX_PATH="$P" -DCMAKE_C_FLAGS="$SAN" \
    -DCMAKE_EXE_LINKER_FLAGS="$SAN" > "$T/cm.log" 2>&1 ||
    { cat "$T/cm.log"; exit 1; }
cmake --build "$T/cm/build" > "$T/cmb.log" 2>&1 || { cat "$T/cmb.log"; exit 1; }
for p in "$T/shared" "$T/static" "$T/cm/build/cm_shared" "$T/cm/build/cm_static"; do
    got=$(LD_LIBRARY_PATH=$P/lib "$p")
    [ "$got" = "$want" ] || { echo "$p printed $got, want $want"; exit 1; }
done
if ldd "$T/static" | grep -q libkvstash; then echo "static program loads libkvstash.so"; exit 1; fi
ldd "$T/shared" | grep -q "$P/lib/libkvstash.so" || { echo "shared program does not load the installed libkvstash"; exit 1; }
if [ -n "$SAN" ]; then # Python cannot load an ASan library unless the runtime came first
    echo "install check: 4 programs built against the installed (sanitized) library print the test vector; the Python package is checked in the plain build"
    exit 0
fi
# The Python package, installed offline with Debian's pip, finds the installed library.
python3=/usr/bin/python3
PIP_NO_INDEX=1 $python3 -m pip install --quiet --no-deps --no-build-isolation --target "$T/py" \
    "$(dirname "$0")/../../client/python" > "$T/pip.log" 2>&1 || { cat "$T/pip.log"; exit 1; }
rm -rf "$(dirname "$0")/../../client/python/build" "$(dirname "$0")"/../../client/python/*.egg-info
got=$(env -u KVSTASH_LIB PYTHONPATH="$T/py" LD_LIBRARY_PATH="$P/lib" $python3 -c \
    'import kvstash, kvstash.integrations.vllm, kvstash.integrations.sglang
print(kvstash.block_keys([1, 2, 3, 4], 4)[0].hex())')
[ "$got" = "$want" ] || { echo "the pip-installed package printed $got, want $want"; exit 1; }
echo "install check: 4 programs built against the installed library and the pip-installed Python package print the test vector"
