#!/usr/bin/env bash
# One-time set-up of a fresh Debian machine for onnx-dc: system packages and Debian's
# English package descriptions, then the package itself (which builds the C++ operator
# library) with its test, benchmark, real-model (tokenizers, gguf, ...) and training
# extras (torch==2.13.0, the CPU build on local disk).
# Idempotent: packages already present are not reinstalled.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
APT_PACKAGES=(dataset-fashion-mnist cmake g++ clang libclang-rt-14-dev llvm-14 fonts-wqy-microhei fonts-dejavu-core)

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
# apt-get update also fetches the English package descriptions (Debian's Docker images
# switch translations off): the real English text of the zoo's text models
# (model_zoo/real/text_corpus.py reads them from apt's lists and keeps a verified copy).
APT_UPDATE=(apt-get update -qq -o Acquire::Languages=en)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    $SUDO "${APT_UPDATE[@]}"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! compgen -G "/var/lib/apt/lists/*_main_i18n_Translation-en*" >/dev/null; then
    echo "setup: fetching Debian's English package descriptions (text for the zoo's text models)"
    $SUDO "${APT_UPDATE[@]}"
fi

echo "setup: installing onnx-dc (builds the operator library)"
"$PYTHON" -m pip install -q --disable-pip-version-check -e ".[test,bench,real,train]"
