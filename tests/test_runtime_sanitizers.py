"""The runtime once more under AddressSanitizer + UndefinedBehaviorSanitizer (a separate clang build).

The sanitizer build (runtime/build-asan, -fsanitize=address,undefined,
-fno-sanitize-recover=all) runs the workload of test_runtime_support in a
python subprocess with clang's shared ASan runtime preloaded: matmuls over the
sparsity / layout / batch / Gemm grid, 3-D and non-constant inputs, eight
threads on one session, every DCDecompress dtype, every test vector and a few
hundred corrupted containers; and DCConv's workload (tests/test_runtime_conv.py run as a
script). Leak detection is off there (python itself leaks
by design); the decoder tool is also run over the vectors and mutants.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_runtime_support import (
    REPO_ROOT,
    VECTORS_DIR,
    build_runtime,
    clang_asan_runtime,
    corrupted_containers,
    decode_with_tool,
    random_container,
    vector_manifest,
)

pytestmark = pytest.mark.slow  # the full suite only: a separate ASan/UBSan build of the runtime

SANITIZER_REPORTS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer", "UndefinedBehaviorSanitizer")


@pytest.fixture(scope="module")
def asan_build() -> Path:
    return build_runtime("asan", sanitize=True, compiler="clang++")


def _sanitizer_env() -> dict[str, str]:
    return dict(
        os.environ,
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:exitcode=99",
        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=98",
    )


def test_library_is_clean_under_asan_and_ubsan(asan_build: Path) -> None:
    library = asan_build / "libonnx_dc_ops.so"
    env = _sanitizer_env()
    env["LD_PRELOAD"] = clang_asan_runtime()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "tests"), str(REPO_ROOT)])
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tests" / "test_runtime_support.py"), str(library)],
        capture_output=True, text=True, env=env, check=False, timeout=1800,
    )
    reports = [r for r in SANITIZER_REPORTS if r in result.stderr]
    assert result.returncode == 0 and not reports, f"exit {result.returncode}, {reports}:\n{result.stderr[-6000:]}"
    assert "sanitizer workload: ok" in result.stdout


def test_conv_is_clean_under_asan_and_ubsan(asan_build: Path) -> None:
    """DCConv's grid (every padding rule, strides, dilations, groups, 1x1 in place, both layouts, 1 and 2 threads),
    the per-call path and corrupted containers, with the baseline and the AVX2 kernels."""
    library = asan_build / "libonnx_dc_ops.so"
    for isa in ("generic", None):
        env = _sanitizer_env()
        env["LD_PRELOAD"] = clang_asan_runtime()
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "tests"), str(REPO_ROOT)])
        if isa:
            env["ONNX_DC_KERNEL_ISA"] = isa
        result = subprocess.run(
            [sys.executable, str(REPO_ROOT / "tests" / "test_runtime_conv.py"), str(library)],
            capture_output=True, text=True, env=env, check=False, timeout=1800,
        )
        reports = [r for r in SANITIZER_REPORTS if r in result.stderr]
        assert result.returncode == 0 and not reports, f"exit {result.returncode}, {reports}:\n{result.stderr[-6000:]}"
        assert "conv sanitizer workload: ok" in result.stdout


def test_decoder_tool_is_clean_under_asan_and_ubsan(asan_build: Path, tmp_path: Path) -> None:
    tool = asan_build / "onnx_dc_decode"
    env = _sanitizer_env()
    containers = [(VECTORS_DIR / v["file"]).read_bytes() for v in vector_manifest()]
    rng = np.random.default_rng(31)
    seed, _ = random_container(rng, (50, 40), sparsity=0.8, layout="sparse")
    containers += corrupted_containers(seed, rng, 150)
    for container in containers:
        for threads in (1, 3):
            code, _, stderr = decode_with_tool(tool, container, tmp_path, threads=threads, env=env)
            reports = [r for r in SANITIZER_REPORTS if r in stderr]
            assert code in (0, 1) and not reports, f"exit {code}, {reports}:\n{stderr[-6000:]}"
