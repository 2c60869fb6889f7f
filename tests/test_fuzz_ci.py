"""CI run of both fuzzers: each runs for at least 60 seconds, after replaying the regression corpus.

``fuzz/run.sh all SECONDS`` runs the libFuzzer target of the C++ decoder (ASan
+ UBSan) and the atheris target of the numpy decoder (differential against the
C++ one) side by side, one process each, so the two take about SECONDS of wall
time together. Any crash, sanitizer report, failed invariant, disagreement,
timeout or out-of-memory fails the test with the fuzzer's log. The fuzzing time
can be raised (never lowered below 60 s) with ``ONNX_DC_FUZZ_SECONDS``.

Two more tests keep the harness honest: the keyword list compiled into the C++
target matches FORMAT.md, and a decoder with a bounds check removed is caught
by the sanitized target on the seed corpus alone.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "fuzz"))

import fuzz_support  # noqa: E402

pytestmark = pytest.mark.slow  # the full suite only: runs both fuzzers for a minute each

FUZZ_SECONDS = max(60, int(os.environ.get("ONNX_DC_FUZZ_SECONDS", "60")))
_SUMMARY = re.compile(r"^fuzz (cpp|numpy): (\d+) runs in (\d+) s, cov: (\d+) ft: (\d+), corpus (\d+) inputs, "
                      r"findings: (\d+)$", re.MULTILINE)


def test_fuzz_target_keywords_match_format_doc() -> None:
    source = (REPO_ROOT / "fuzz" / "container_fuzzer.cc").read_text()
    block = source.split("kFormatKeywords[] = {", 1)[1].split("};", 1)[0]
    assert re.findall(r'"([^"]+)"', block) == fuzz_support.format_keywords()


def test_both_fuzzers_run_without_findings() -> None:
    fuzz_support.build("fuzzer", "shim")
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "fuzz" / "run.sh"), "all", str(FUZZ_SECONDS)],
        capture_output=True, text=True, check=False, timeout=FUZZ_SECONDS * 4 + 900,
        env=dict(os.environ, PYTHON=sys.executable),
    )
    report = f"{result.stdout}\n{result.stderr[-6000:]}"
    assert result.returncode == 0, report
    summaries = {m.group(1): m for m in _SUMMARY.finditer(result.stdout)}
    assert set(summaries) == {"cpp", "numpy"}, report
    for target, match in summaries.items():
        runs, seconds, cov, findings = int(match.group(2)), int(match.group(3)), int(match.group(4)), int(match.group(7))
        assert seconds >= 60 and findings == 0, report
        # Both targets really ran: thousands of inputs, coverage beyond the header checks.
        assert runs >= 1000 and cov >= 100, report
    print(result.stdout)


def test_sanitized_target_catches_a_planted_out_of_bounds_read(tmp_path: Path) -> None:
    """Remove the decoder's chunk-table bounds check in a copy: replaying the seeds must report it."""
    source = (REPO_ROOT / "runtime" / "src" / "container.cc").read_text()
    check = re.compile(r"if \(nchunks > reader->remaining\(\) / 4\)")
    assert check.search(source), "the chunk-table bounds check moved: update this planted bug"
    runtime = REPO_ROOT / "runtime" / "src"
    for path in runtime.iterdir():
        if path.suffix in (".h", ".cc"):
            shutil.copy(path, tmp_path / path.name)
    (tmp_path / "container.cc").write_text(check.sub("if (false)", source, count=1))
    fuzzer = tmp_path / "planted_fuzzer"
    flags = ["clang++", "-std=c++17", "-g", "-O1", "-fsanitize=fuzzer-no-link,address,undefined",
             "-fno-sanitize-recover=all", "-pthread", "-I", str(tmp_path)]
    objects = []
    for name in ("container.cc", "sparse_matmul.cc", "matmul_kernels_generic.cc", "matmul_kernels_avx2.cc"):
        isa = ["-mavx2", "-mfma", "-mbmi2"] if "avx2" in name else []
        objects.append(str(tmp_path / f"{name}.o"))
        build = subprocess.run([*flags, *isa, "-c", str(tmp_path / name), "-o", objects[-1]],
                               capture_output=True, text=True, check=False)
        assert build.returncode == 0, build.stderr[-3000:]
    link = [*flags, "-fsanitize=fuzzer", str(REPO_ROOT / "fuzz" / "container_fuzzer.cc"), *objects, "-o", str(fuzzer)]
    build = subprocess.run(link, capture_output=True, text=True, check=False)
    assert build.returncode == 0, build.stderr[-3000:]
    seeds = sorted(str(p) for p in fuzz_support.CORPUS_DIR.glob("*.odc"))
    result = subprocess.run([str(fuzzer), "-runs=1", *seeds], capture_output=True, text=True, check=False,
                            timeout=300)
    assert result.returncode != 0
    # UBSan (pointer arithmetic on the null "table") or ASan (the read) reports it, whichever comes first.
    assert "ERROR: AddressSanitizer" in result.stderr or "runtime error:" in result.stderr, result.stderr[-3000:]
