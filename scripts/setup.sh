#!/usr/bin/env bash
# One-time set-up of a fresh Debian machine for onnx-dc: system packages, then the
# package itself (which builds the C++ operator library) with its test, benchmark,
# real-model and training extras (torch==2.13.0, the CPU build on local disk).
# Idempotent: packages already present are not reinstalled.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
APT_PACKAGES=(dataset-fashion-mnist cmake g++ clang libclang-rt-14-dev llvm-14 fonts-wqy-microhei fonts-dejavu-core)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

echo "setup: installing onnx-dc (builds the operator library)"
"$PYTHON" -m pip install -q --disable-pip-version-check -e ".[test,bench,real,train]"
