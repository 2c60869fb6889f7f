"""Every input the fuzzers ever found (fuzz/regressions/) gives the documented outcome in both decoders.

fuzz/regressions/manifest.json records, per input, the FORMAT.md section 7
keyword both decoders must report (or ``valid``) and the bug it found. The
numpy decoder is called directly, the C++ decoder (runtime/src/container.cc)
through fuzz/build/libodc_shim.so and, for invalid inputs, through onnxruntime
session creation with the operator library; the sanitized libFuzzer target
replays all of them plus the seed corpus. The seeds (real zoo containers and
the test vectors) must decode identically in both decoders.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "fuzz"))
sys.path.insert(0, str(REPO_ROOT / "tests"))

import fuzz_support  # noqa: E402
from fuzz_support import CORPUS_DIR, REGRESSIONS_DIR, CppDecoder, disagreement, numpy_outcome  # noqa: E402

pytestmark = pytest.mark.slow  # the full suite only: replays the fuzz corpus through a sanitized build

CASES = fuzz_support.regression_cases()


@pytest.fixture(scope="module")
def cpp() -> CppDecoder:
    return CppDecoder()


def test_manifest_lists_exactly_the_regression_files() -> None:
    listed = sorted(case["file"] for case in CASES)
    on_disk = sorted(p.name for p in REGRESSIONS_DIR.glob("*.odc"))
    assert listed == on_disk
    keywords = set(fuzz_support.format_keywords()) | {"valid"}
    for case in CASES:
        assert case["expected"] in keywords, case
        assert case["finder"] in ("cpp", "numpy") and case["cause"].strip(), case


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["file"])
def test_regression_input_gives_the_documented_outcome_in_both_decoders(case: dict, cpp: CppDecoder) -> None:
    data = (REGRESSIONS_DIR / case["file"]).read_bytes()
    numpy_result = numpy_outcome(data)
    cpp_result = cpp.outcome(data)
    for name, result in (("numpy", numpy_result), ("C++", cpp_result)):
        assert (result.keyword or "valid") == case["expected"], f"{name}: {result.summary()}"
        if not result.valid:
            assert fuzz_support.one_line_error(result.message) is None, f"{name}: {result.message!r}"
    for threads in (2, 5):
        assert disagreement(numpy_result, cpp.outcome(data, threads=threads)) is None
    assert disagreement(numpy_result, cpp_result) is None
    _check_session_creation(data, case["expected"], numpy_result)


def _check_session_creation(data: bytes, expected: str, numpy_result: fuzz_support.Outcome) -> None:
    """The operator library refuses an invalid input with the keyword, and decodes a valid one."""
    from onnx_dc import ops_library_path
    from test_runtime_support import DECOMPRESS_OPS, decompress_model, make_session, matmul_model

    if expected != "valid":
        with pytest.raises(Exception) as error:  # noqa: PT011 - onnxruntime raises its own exception types
            make_session(matmul_model(data, node_name="fc", container_name="fc.weight.dc"), ops_library_path())
        message = str(error.value)
        assert "container 'fc.weight.dc'" in message and expected.lower() in message.lower(), message
        return
    op_type, elem_type = next(v for k, v in DECOMPRESS_OPS.items()
                              if numpy_result.dtype == fuzz_support.ONNX_DTYPES[k.name])
    (y,) = make_session(decompress_model(data, op_type, elem_type), ops_library_path()).run(None, {})
    assert tuple(y.shape) == numpy_result.shape
    if numpy_result.dense is not None and numpy_result.dtype != 16:  # bfloat16 comes back cast to float32
        assert y.tobytes() == numpy_result.dense


def test_sanitized_fuzz_target_replays_regressions_and_seeds_cleanly() -> None:
    fuzzer = fuzz_support.build("fuzzer") / "container_fuzzer"
    inputs = sorted(REGRESSIONS_DIR.glob("*.odc")) + sorted(CORPUS_DIR.glob("*.odc"))
    assert len(inputs) > 50
    result = subprocess.run(
        [str(fuzzer), "-runs=1", "-timeout=60", *map(str, inputs)],
        capture_output=True, text=True, check=False, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "ERROR:" not in result.stderr and "runtime error" not in result.stderr
    assert result.stderr.count("Running: ") == len(inputs)


def test_seed_corpus_decodes_identically_in_both_decoders(cpp: CppDecoder) -> None:
    seeds = sorted(CORPUS_DIR.glob("*.odc"))
    zoo_seeds = [p for p in seeds if not p.name.startswith("vector__")]
    assert len(zoo_seeds) >= 20, "fuzz/corpus has too few zoo containers (python fuzz/make_corpus.py)"
    valid = 0
    for path in seeds:
        data = path.read_bytes()
        numpy_result = numpy_outcome(data)
        problem = disagreement(numpy_result, cpp.outcome(data))
        assert problem is None, f"{path.name}: {problem}"
        if path in zoo_seeds:
            assert numpy_result.valid, f"{path.name}: {numpy_result.summary()}"
            valid += 1
    assert valid == len(zoo_seeds)
    # The seeds cover both layouts, all four dtypes and several chunks per stream.
    dtypes = {numpy_outcome(p.read_bytes()).dtype for p in zoo_seeds}
    assert dtypes == {1, 10, 11, 16}

