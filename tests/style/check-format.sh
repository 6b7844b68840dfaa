#!/bin/sh
# Every C, header and CUDA file of the repository is formatted by the root .clang-format
# (STYLE.md: "code is formatted before commit"). Run by ctest (style.clang_format); fix a
# failure with: git ls-files '*.c' '*.h' '*.cu' '*.cuh' | xargs clang-format -i
set -eu
cd "$(dirname "$0")/../.."
command -v clang-format >/dev/null || { echo "clang-format not installed (deploy/dev.sh deps)"; exit 1; }
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    files=$(git ls-files '*.c' '*.h' '*.cu' '*.cuh')
else # a source tree without git: every such file outside build directories
    files=$(find . \( -path './build*' -o -path './.git' \) -prune -o \
        \( -name '*.c' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) -print)
fi
bad=0
for f in $files; do
    if ! clang-format --dry-run --Werror "$f" >/dev/null 2>&1; then
        echo "not formatted: $f"
        bad=$((bad + 1))
    fi
done
echo "clang-format: $bad of $(echo "$files" | wc -w) files differ"
[ "$bad" -eq 0 ]
