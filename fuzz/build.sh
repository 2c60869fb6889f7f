#!/usr/bin/env bash
# Builds the hardening tools into fuzz/build/ (incremental: a target is rebuilt
# only when one of its sources is newer). Needs clang 14+ with its sanitizer
# and libFuzzer runtimes (Debian: clang libclang-rt-14-dev); no onnxruntime,
# except the leak driver, which needs onnxruntime's C API header (found the way
# runtime/CMakeLists.txt finds it).
#
#   fuzz/build.sh [TARGET...]     TARGET: fuzzer shim count cover leak all (default: fuzzer shim count)
#
#   fuzzer  container_fuzzer   libFuzzer + ASan + UBSan target for the C++ decoder
#   shim    libodc_shim.so     C entry to the C++ decoder for ctypes (regression tests)
#   count   libodc_count.so    the same with every executed edge counted (linear-time test)
#   cover   container_cover    the fuzz target with source-based coverage (fuzz/coverage.sh)
#   leak    session_leak_driver + libonnx_dc_ops_lsan.so
#                              C++ program that dlopens onnxruntime's shared library
#                              and creates/destroys sessions under LeakSanitizer
set -euo pipefail
FUZZ_DIR="$(cd "$(dirname "$0")" && pwd)"
REPO_DIR="$(dirname "$FUZZ_DIR")"
SRC="$REPO_DIR/runtime/src"
OUT="${ONNX_DC_FUZZ_BUILD_DIR:-$FUZZ_DIR/build}"
CXX="${FUZZ_CXX:-clang++}"
mkdir -p "$OUT"

command -v "$CXX" >/dev/null || { echo "fuzz/build.sh: $CXX not found (Debian: apt-get install clang libclang-rt-14-dev)" >&2; exit 2; }

# Serialise concurrent builds (tests may build from several processes).
exec 9>"$OUT/.lock"
flock 9

COMMON=(-std=c++17 -g -fno-omit-frame-pointer -Wall -Wextra -I "$SRC" -pthread)
DECODER_SOURCES=("$SRC/container.cc" "$SRC/container.h")

# needs_build OUTPUT SOURCE...: true when OUTPUT is missing or older than a source.
needs_build() {
    local output="$1"; shift
    [ -e "$output" ] || return 0
    local source
    for source in "$@"; do
        [ "$source" -nt "$output" ] && return 0
    done
    [ "$FUZZ_DIR/build.sh" -nt "$output" ]
}

# The decoder and the operator library's sparse matmul (no onnxruntime needed).
RUNTIME_SOURCES=(container.cc sparse_matmul.cc matmul_kernels_generic.cc matmul_kernels_avx2.cc)
RUNTIME_DEPS=("$SRC"/container.* "$SRC"/sparse_matmul.* "$SRC"/matmul_kernels*)

# compile_runtime PREFIX FLAG...: compiles RUNTIME_SOURCES to $OUT/PREFIX_*.o, printing the objects.
compile_runtime() {
    local prefix="$1"; shift
    local source isa
    for source in "${RUNTIME_SOURCES[@]}"; do
        isa=()
        [ "$source" = matmul_kernels_avx2.cc ] && isa=(-mavx2 -mfma -mbmi2)
        "$CXX" "${COMMON[@]}" "$@" "${isa[@]}" -c "$SRC/$source" -o "$OUT/${prefix}_${source%.cc}.o"
        echo "$OUT/${prefix}_${source%.cc}.o"
    done
}

build_fuzzer() {
    local out="$OUT/container_fuzzer"
    needs_build "$out" "$FUZZ_DIR/container_fuzzer.cc" "${RUNTIME_DEPS[@]}" || return 0
    echo "fuzz/build.sh: building $out"
    local flags=(-O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all)
    local objects
    objects=$(compile_runtime fuzzer "${flags[@]/-fsanitize=fuzzer,/-fsanitize=fuzzer-no-link,}")
    # shellcheck disable=SC2086 # one object path per line, no spaces
    "$CXX" "${COMMON[@]}" "${flags[@]}" "$FUZZ_DIR/container_fuzzer.cc" $objects -o "$out.tmp"
    mv "$out.tmp" "$out"
}

build_cover() {
    local out="$OUT/container_cover"
    needs_build "$out" "$FUZZ_DIR/container_fuzzer.cc" "${RUNTIME_DEPS[@]}" || return 0
    echo "fuzz/build.sh: building $out"
    local objects
    objects=$(compile_runtime cover -O1 -fsanitize=fuzzer-no-link -fprofile-instr-generate -fcoverage-mapping)
    # shellcheck disable=SC2086
    "$CXX" "${COMMON[@]}" -O1 -fsanitize=fuzzer -fprofile-instr-generate -fcoverage-mapping \
        "$FUZZ_DIR/container_fuzzer.cc" $objects -o "$out.tmp"
    mv "$out.tmp" "$out"
}

build_shim() {
    local out="$OUT/libodc_shim.so"
    needs_build "$out" "$FUZZ_DIR/decoder_shim.cc" "${DECODER_SOURCES[@]}" || return 0
    echo "fuzz/build.sh: building $out"
    "$CXX" "${COMMON[@]}" -O2 -fPIC -shared -fvisibility=hidden \
        "$FUZZ_DIR/decoder_shim.cc" "$SRC/container.cc" -o "$out.tmp"
    mv "$out.tmp" "$out"
}

build_count() {
    local out="$OUT/libodc_count.so"
    needs_build "$out" "$FUZZ_DIR/decoder_shim.cc" "${DECODER_SOURCES[@]}" || return 0
    echo "fuzz/build.sh: building $out"
    # Only the decoder is instrumented; the shim holds the counting callbacks.
    "$CXX" "${COMMON[@]}" -O2 -fPIC -fvisibility=hidden -fsanitize-coverage=trace-pc-guard \
        -c "$SRC/container.cc" -o "$OUT/container_count.o"
    "$CXX" "${COMMON[@]}" -O2 -fPIC -shared -fvisibility=hidden -DODC_COUNT_STEPS \
        "$FUZZ_DIR/decoder_shim.cc" "$OUT/container_count.o" -o "$out.tmp"
    mv "$out.tmp" "$out"
}

# The directory holding onnxruntime_c_api.h: $ONNX_DC_ORT_INCLUDE_DIR, the
# system's, or the runtime's fetch cache (runtime/fetch_ort_headers.sh fills it).
ort_include_dir() {
    local cache="${ONNX_DC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/onnx-dc}"
    local dir
    for dir in "${ONNX_DC_ORT_INCLUDE_DIR:-}" /usr/include/onnxruntime /usr/local/include/onnxruntime \
               "$cache/ort-headers-trixie/usr/include/onnxruntime"; do
        if [ -n "$dir" ] && [ -f "$dir/onnxruntime_c_api.h" ]; then
            echo "$dir"
            return 0
        fi
    done
    bash "$REPO_DIR/runtime/fetch_ort_headers.sh" "$cache" | tail -n 1
}

build_leak() {
    local driver="$OUT/session_leak_driver" library="$OUT/libonnx_dc_ops_lsan.so"
    local ops_sources=("$SRC"/*.cc "$SRC"/*.h "$SRC/exports.map")
    if needs_build "$library" "${ops_sources[@]}" || needs_build "$driver" "$FUZZ_DIR/session_leak_driver.cc"; then
        local include
        include="$(ort_include_dir)"
        [ -f "$include/onnxruntime_c_api.h" ] || { echo "fuzz/build.sh: onnxruntime_c_api.h not found" >&2; exit 2; }
        echo "fuzz/build.sh: building $library and $driver (headers: $include)"
        local flags=("${COMMON[@]}" -O1 -fPIC -fsanitize=address -I "$include")
        # Both link clang's shared ASan runtime; find it without LD_LIBRARY_PATH.
        local asan_dir
        asan_dir="$(dirname "$("$CXX" -print-file-name=libclang_rt.asan-x86_64.so)")"
        # The operator library exactly as runtime/CMakeLists.txt builds it, plus ASan/LSan.
        local objects=() source
        for source in ops.cc sparse_matmul.cc resident_matmul.cc matmul_kernels_generic.cc matmul_kernels_avx2.cc conv.cc container.cc \
                compact.cc gemm.cc gemm_kernels_generic.cc gemm_kernels_avx2.cc gemm_kernels_avx512.cc \
                conv_kernels_generic.cc conv_kernels_avx2.cc conv_kernels_avx512.cc; do
            local isa=()
            case "$source" in
                matmul_kernels_avx2.cc | gemm_kernels_avx2.cc | conv_kernels_avx2.cc) isa=(-mavx2 -mfma -mbmi2) ;;
                gemm_kernels_avx512.cc | conv_kernels_avx512.cc) isa=(-mavx2 -mfma -mbmi2 -mavx512f -mavx512bw -mavx512dq -mavx512vl) ;;
            esac
            "$CXX" "${flags[@]}" -fvisibility=hidden -fvisibility-inlines-hidden "${isa[@]}" \
                -c "$SRC/$source" -o "$OUT/lsan_${source%.cc}.o"
            objects+=("$OUT/lsan_${source%.cc}.o")
        done
        "$CXX" "${flags[@]}" -shared -shared-libasan -Wl,-rpath,"$asan_dir" "${objects[@]}" \
            -Wl,--version-script="$SRC/exports.map" -o "$library.tmp"
        "$CXX" "${flags[@]}" -shared-libasan -Wl,-rpath,"$asan_dir" "$FUZZ_DIR/session_leak_driver.cc" -ldl \
            -o "$driver.tmp"
        mv "$library.tmp" "$library"
        mv "$driver.tmp" "$driver"
    fi
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(fuzzer shim count)
for target in "${targets[@]}"; do
    case "$target" in
        fuzzer) build_fuzzer ;;
        shim) build_shim ;;
        count) build_count ;;
        cover) build_cover ;;
        leak) build_leak ;;
        all) build_fuzzer; build_shim; build_count; build_cover; build_leak ;;
        *) echo "fuzz/build.sh: unknown target '$target' (fuzzer shim count cover leak all)" >&2; exit 2 ;;
    esac
done
