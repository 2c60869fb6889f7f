#!/usr/bin/env bash
# Runs the container fuzzers for a given time.
#
#   fuzz/run.sh TARGET SECONDS [LIBFUZZER_FLAG...]
#
#   TARGET  cpp    libFuzzer + ASan + UBSan on the C++ decoder (fuzz/container_fuzzer.cc)
#           numpy  atheris on the numpy decoder, differential against the C++ one (fuzz/numpy_fuzzer.py)
#           all    both at once (one process each)
#
# Each target first replays every input of fuzz/regressions/, then fuzzes for
# SECONDS seconds starting from the seed corpus fuzz/corpus/ (read only) and its
# own growing corpus in fuzz/build/work/TARGET/corpus/ (kept between runs).
# Logs and anything found (crash-*, timeout-*, oom-*, leak-* files) go to
# fuzz/build/work/TARGET/. Prints one summary line per target:
#
#   fuzz cpp: 1234567 runs in 60 s, cov: 812 ft: 2301, corpus 412 inputs, findings: 0
#
# Exit status 0 when nothing was found, 1 on any finding (the finding's path is
# printed; add it to fuzz/regressions/ with fuzz/add_regression.py once
# fixed), 2 on usage or build errors.
set -uo pipefail
FUZZ_DIR="$(cd "$(dirname "$0")" && pwd)"
REPO_DIR="$(dirname "$FUZZ_DIR")"
PYTHON="${PYTHON:-python3}"
BUILD_DIR="${ONNX_DC_FUZZ_BUILD_DIR:-$FUZZ_DIR/build}"

usage() { echo "usage: fuzz/run.sh cpp|numpy|all SECONDS [LIBFUZZER_FLAG...]" >&2; exit 2; }
[ $# -ge 2 ] || usage
target="$1"; seconds="$2"; shift 2
[[ "$seconds" =~ ^[0-9]+$ ]] && [ "$seconds" -ge 1 ] || usage

if [ "$target" = all ]; then
    "$0" cpp "$seconds" "$@" & cpp_pid=$!
    "$0" numpy "$seconds" "$@" & numpy_pid=$!
    wait "$cpp_pid"; cpp_status=$?
    wait "$numpy_pid"; numpy_status=$?
    [ $cpp_status -eq 0 ] && [ $numpy_status -eq 0 ] && exit 0
    [ $cpp_status -eq 2 ] || [ $numpy_status -eq 2 ] && exit 2
    exit 1
fi

case "$target" in
    cpp)
        bash "$FUZZ_DIR/build.sh" fuzzer shim >/dev/null || exit 2
        command=("$BUILD_DIR/container_fuzzer")
        flags=(-timeout=10 -rss_limit_mb=2048 -dict="$FUZZ_DIR/container.dict")
        ;;
    numpy)
        bash "$FUZZ_DIR/build.sh" shim >/dev/null || exit 2
        "$PYTHON" -c "import atheris" 2>/dev/null || {
            echo "fuzz/run.sh: atheris is not installed ($PYTHON -m pip install atheris, or make setup)" >&2; exit 2; }
        command=("$PYTHON" "$FUZZ_DIR/numpy_fuzzer.py")
        flags=(-timeout=30 -rss_limit_mb=4096 -dict="$FUZZ_DIR/container.dict")
        ;;
    *) usage ;;
esac

work="$BUILD_DIR/work/$target"
mkdir -p "$work/corpus"
rm -f "$work"/crash-* "$work"/timeout-* "$work"/oom-* "$work"/leak-* "$work"/slow-unit-*
cd "$REPO_DIR"

# 1. The regression corpus: every input once.
regressions=("$FUZZ_DIR"/regressions/*.odc)
if [ -e "${regressions[0]}" ]; then
    "${command[@]}" -runs=1 -timeout=60 -rss_limit_mb=4096 "${regressions[@]}" >"$work/regressions.log" 2>&1
    status=$?
    if [ $status -ne 0 ]; then
        echo "fuzz $target: a regression input fails again (exit $status), see $work/regressions.log" >&2
        tail -n 30 "$work/regressions.log" >&2
        exit 1
    fi
fi

# 2. Fuzz.
"${command[@]}" "${flags[@]}" -max_total_time="$seconds" -print_final_stats=1 \
    -artifact_prefix="$work/" "$@" "$work/corpus" "$FUZZ_DIR/corpus" >"$work/fuzz.log" 2>&1
status=$?

runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/fuzz.log" | tail -n 1)
cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$work/fuzz.log" | tail -n 1)
corpus_size=$(find "$work/corpus" -type f | wc -l)
findings=("$work"/crash-* "$work"/timeout-* "$work"/oom-* "$work"/leak-* "$work"/slow-unit-*)
found=()
for f in "${findings[@]}"; do [ -e "$f" ] && found+=("$f"); done
echo "fuzz $target: ${runs:-0} runs in $seconds s, ${cov:-cov: ?}, corpus $corpus_size inputs, findings: ${#found[@]}"
if [ ${#found[@]} -gt 0 ] || [ $status -ne 0 ]; then
    echo "fuzz $target: exit status $status; log: $work/fuzz.log" >&2
    for f in "${found[@]}"; do echo "fuzz $target: finding $f" >&2; done
    grep -E -m 5 'ERROR|runtime error|FuzzFinding|Traceback|deadly signal' "$work/fuzz.log" >&2
    exit 1
fi
exit 0
