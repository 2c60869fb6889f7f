#!/usr/bin/env bash
# Line and branch coverage of runtime/src/container.cc and sparse_matmul.cc reached by the fuzz
# corpora (the seeds, the C++ fuzzer's work corpus and the regressions):
#
#   fuzz/coverage.sh            # summary table (llvm-cov report)
#   fuzz/coverage.sh --show     # annotated source of the uncovered lines
set -euo pipefail
FUZZ_DIR="$(cd "$(dirname "$0")" && pwd)"
REPO_DIR="$(dirname "$FUZZ_DIR")"
BUILD_DIR="${ONNX_DC_FUZZ_BUILD_DIR:-$FUZZ_DIR/build}"
bash "$FUZZ_DIR/build.sh" cover >/dev/null
LLVM_PROFDATA="$(command -v llvm-profdata-14 || command -v llvm-profdata)"
LLVM_COV="$(command -v llvm-cov-14 || command -v llvm-cov)"
profile_dir="$BUILD_DIR/coverage"
rm -rf "$profile_dir" && mkdir -p "$profile_dir"
dirs=("$FUZZ_DIR/corpus")
[ -d "$BUILD_DIR/work/cpp/corpus" ] && dirs+=("$BUILD_DIR/work/cpp/corpus")
[ -d "$FUZZ_DIR/regressions" ] && dirs+=("$FUZZ_DIR/regressions")
LLVM_PROFILE_FILE="$profile_dir/cover.profraw" "$BUILD_DIR/container_cover" -runs=0 "${dirs[@]}" >/dev/null 2>&1
"$LLVM_PROFDATA" merge -sparse "$profile_dir/cover.profraw" -o "$profile_dir/cover.profdata"
if [ "${1:-}" = "--show" ]; then
    "$LLVM_COV" show "$BUILD_DIR/container_cover" -instr-profile="$profile_dir/cover.profdata" \
        -show-line-counts-or-regions "$REPO_DIR/runtime/src/container.cc" "$REPO_DIR/runtime/src/sparse_matmul.cc"
else
    "$LLVM_COV" report "$BUILD_DIR/container_cover" -instr-profile="$profile_dir/cover.profdata" \
        "$REPO_DIR/runtime/src/container.cc" "$REPO_DIR/runtime/src/sparse_matmul.cc" \
        "$REPO_DIR/runtime/src/matmul_kernels_impl.h"
fi
