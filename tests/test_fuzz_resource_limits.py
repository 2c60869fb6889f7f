"""Resource limits of both container decoders: no allocation from a declared shape, work linear in the input.

* A container that declares a huge shape (more elements than the limit, a
  shape whose byte size overflows, a chunk table or payload far larger than the
  container) is refused **before anything of that size is allocated**: each
  decoder runs in a child process whose peak resident memory (``ru_maxrss``
  from ``wait4``) is compared with a child that decodes a tiny valid container.
  The C++ decoder is checked through ``onnx_dc_decode`` (runtime/tools) and
  through onnxruntime session creation with the operator library.
* Decoding work is linear in the container size, measured without clocks:
  for the C++ decoder, the number of control-flow edges it executes
  (fuzz/build/libodc_count.so, built with ``-fsanitize-coverage=trace-pc-guard``);
  for the numpy decoder, the number of Python and C function calls it makes
  (``sys.setprofile``) and its peak traced allocation (``tracemalloc``). The
  inputs are adversarial: one chunk holding every symbol (the numpy decoder's
  slow path), a chunk per symbol (the largest chunk tables), an invalid code
  word at the very end, 15-bit Huffman codes.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import textwrap
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "fuzz"))
sys.path.insert(0, str(REPO_ROOT / "tests"))

import fuzz_support  # noqa: E402
from fuzz_support import CppDecoder, CraftedStream, craft_container  # noqa: E402

pytestmark = pytest.mark.slow  # the full suite only: builds and runs the decoders under memory limits on huge declared shapes

MIB = 1 << 20
GIB = 1 << 30

# ---------------------------------------------------------------------------- huge shapes
_RAW1_EMPTY = CraftedStream(mode=0, raw_width=1, symbols=[], chunk_bits=[])


def _huge_containers() -> dict[str, tuple[bytes, str]]:
    """name -> (container, expected keyword). Each declares far more than it holds."""
    huge = {}
    # 2^40 float64 elements (8 TiB dense): over the 2^30 element limit.
    huge["numel_2pow40_f64"] = (
        craft_container(dims=(1 << 20, 1 << 20), entries=0, chunk_symbols=1, dtype=11, layout=1, index_bits=4,
                        codebook=b"", streams=[_RAW1_EMPTY, _RAW1_EMPTY]),
        "limit",
    )
    # A sparse tensor of 2^31 zeros (8 GiB of float32) from a 70-byte container.
    huge["zeros_2pow31"] = (
        craft_container(dims=(1 << 16, 1 << 15), entries=0, chunk_symbols=1, layout=1, index_bits=4,
                        codebook=b"", streams=[_RAW1_EMPTY, _RAW1_EMPTY]),
        "limit",
    )
    # Byte size above 2^63.
    huge["overflow"] = (
        craft_container(dims=(1 << 62, 4, 3), entries=0, chunk_symbols=1, layout=1, index_bits=4,
                        codebook=b"", streams=[_RAW1_EMPTY, _RAW1_EMPTY]),
        "overflow",
    )
    # Exactly at the limit (2^30 elements, dense, so 2^30 entries) with one symbol per chunk:
    # a 4 GiB chunk table that is not there. Must be refused before reading or allocating it.
    huge["chunk_table_4gib"] = (
        craft_container(dims=(1 << 15, 1 << 15), entries=1 << 30, chunk_symbols=1, streams=[
            CraftedStream(mode=0, raw_width=1, symbols=[], chunk_bits=[])]),
        "truncated",
    )
    # 2^30 entries in 64 chunks of 2^24: the chunk table is there, the 128 MiB payload is not.
    huge["payload_128mib"] = (
        craft_container(dims=(1 << 15, 1 << 15), entries=1 << 30, chunk_symbols=1 << 24, streams=[
            CraftedStream(mode=0, raw_width=1, symbols=[], chunk_bits=[1 << 24] * 64)]),
        "truncated",
    )
    # 2^32 - 1 code lengths declared for a 2-symbol alphabet.
    huge["table_length"] = (
        craft_container(dims=(2, 2), entries=4, chunk_symbols=4, streams=[
            CraftedStream(mode=1, code_lengths=(1, 1), table_length=(1 << 32) - 1, bits=[0, 1, 0, 1],
                          chunk_bits=[4])]),
        "table length",
    )
    return huge


HUGE = _huge_containers()
_SMALL_VALID = craft_container(dims=(2, 2), entries=4, chunk_symbols=4, streams=[
    CraftedStream(mode=0, raw_width=1, symbols=[0, 1, 0, 1])])


_NUMPY_CHILD = textwrap.dedent(
    """
    import resource, sys
    sys.path.insert(0, {repo!r})
    from onnx_dc.codec.container_reader import decode_container
    from onnx_dc.errors import ContainerError
    data = open(sys.argv[1], "rb").read()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        decode_container(data)
        outcome = "valid"
    except ContainerError as error:
        outcome = "error: " + str(error)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024)
    print(outcome)
    """
)

_ORT_CHILD = textwrap.dedent(
    """
    import resource, sys
    sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
    import onnx_dc
    from test_runtime_support import decompress_model, make_session, matmul_model
    from onnx import TensorProto
    data = open(sys.argv[1], "rb").read()
    library = onnx_dc.ops_library_path()
    small = open(sys.argv[2], "rb").read()
    make_session(matmul_model(small), library)  # warm up: load the library, create both kernels once
    make_session(decompress_model(small, "DCDecompress", TensorProto.FLOAT), library)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outcomes = []
    for model in (matmul_model(data), decompress_model(data, "DCDecompress", TensorProto.FLOAT)):
        try:
            make_session(model, library)
            outcomes.append("valid")
        except Exception as error:
            outcomes.append("error: " + str(error).replace("\\n", " "))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024)
    for outcome in outcomes:
        print(outcome)
    """
)


def _child_report(script: str, *args: str) -> tuple[int, list[str]]:
    """Run a python child that prints its peak-RSS growth, then one outcome per line."""
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    return int(lines[0]), lines[1:]


@pytest.fixture(scope="module")
def container_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("huge")
    paths = {}
    for name, (data, _) in HUGE.items():
        paths[name] = directory / f"{name}.odc"
        paths[name].write_bytes(data)
    paths["small"] = directory / "small.odc"
    paths["small"].write_bytes(_SMALL_VALID)
    return paths


def test_crafted_huge_containers_are_well_formed_apart_from_their_size() -> None:
    # The small container written by the same helper is valid in both decoders,
    # so the huge ones fail for the declared size and nothing else.
    assert fuzz_support.numpy_outcome(_SMALL_VALID).valid
    assert CppDecoder().outcome(_SMALL_VALID).valid
    for name, (data, keyword) in HUGE.items():
        assert len(data) < 400, name


@pytest.mark.parametrize("name", sorted(HUGE))
def test_numpy_decoder_refuses_huge_shape_before_allocating(name: str, container_files: dict[str, Path]) -> None:
    script = _NUMPY_CHILD.format(repo=str(REPO_ROOT))
    growth, (outcome,) = _child_report(script, str(container_files[name]))
    assert outcome.startswith("error: ") and HUGE[name][1] in outcome.lower(), outcome
    assert "\n" not in outcome
    assert growth < 16 * MIB, f"peak RSS grew by {growth / MIB:.1f} MiB"


_CPP_CHILD = textwrap.dedent(
    """
    import resource, sys
    sys.path.insert(0, {fuzz!r})
    import fuzz_support
    decoder = fuzz_support.CppDecoder(sys.argv[2])
    data = open(sys.argv[1], "rb").read()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outcome = decoder.outcome(data, threads=0)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024)
    print("valid" if outcome.valid else "error: " + outcome.message)
    """
)


@pytest.mark.parametrize("name", sorted(HUGE))
def test_cpp_decoder_refuses_huge_shape_before_allocating(name: str, container_files: dict[str, Path],
                                                          tmp_path: Path) -> None:
    from test_runtime_support import build_runtime

    # In a child process, through the ctypes shim: peak RSS before and after.
    shim = fuzz_support.build("shim") / "libodc_shim.so"
    growth, (outcome,) = _child_report(_CPP_CHILD.format(fuzz=str(REPO_ROOT / "fuzz")),
                                       str(container_files[name]), str(shim))
    assert outcome.startswith("error: ") and HUGE[name][1] in outcome.lower(), outcome
    assert growth < 8 * MIB, f"peak RSS grew by {growth / MIB:.1f} MiB"
    # The runtime's command-line decoder with 256 MiB of address space: any attempt
    # to allocate what the container declares would abort it instead of exit code 1.
    tool = build_runtime("tests") / "onnx_dc_decode"

    def limit_address_space() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (256 * MIB, 256 * MIB))

    result = subprocess.run([str(tool), str(container_files[name]), str(tmp_path / "out.bin"), "0"],
                            capture_output=True, text=True, preexec_fn=limit_address_space, check=False, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert HUGE[name][1] in result.stderr.lower(), result.stderr


def test_address_space_limit_of_the_tool_test_is_effective(tmp_path: Path) -> None:
    """The 256 MiB limit above really stops the tool from allocating a large valid tensor."""
    from test_runtime_support import build_runtime

    tool = build_runtime("tests") / "onnx_dc_decode"
    zeros = tmp_path / "zeros.odc"  # 2^26 float32 zeros: a valid 256 MiB tensor
    zeros.write_bytes(craft_container(dims=(1 << 26,), entries=0, chunk_symbols=1, layout=1, index_bits=4,
                                      codebook=b"", streams=[_RAW1_EMPTY, _RAW1_EMPTY]))

    def limit_address_space() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (256 * MIB, 256 * MIB))

    limited = subprocess.run([str(tool), str(zeros), "/dev/null", "0"], capture_output=True,
                             preexec_fn=limit_address_space, check=False, timeout=300)
    assert limited.returncode not in (0, 1)  # the allocation failed: std::bad_alloc ends the tool
    unlimited = subprocess.run([str(tool), str(zeros), "/dev/null", "0"], capture_output=True,
                               check=False, timeout=300)
    assert unlimited.returncode == 0


@pytest.mark.parametrize("name", sorted(HUGE))
def test_session_creation_refuses_huge_shape_before_allocating(name: str, container_files: dict[str, Path]) -> None:
    script = _ORT_CHILD.format(repo=str(REPO_ROOT), tests=str(REPO_ROOT / "tests"))
    growth, outcomes = _child_report(script, str(container_files[name]), str(container_files["small"]))
    assert len(outcomes) == 2
    for outcome in outcomes:  # DCMatMul, DCDecompress
        assert outcome.startswith("error: ") and HUGE[name][1] in outcome.lower(), outcome
    assert growth < 32 * MIB, f"peak RSS grew by {growth / MIB:.1f} MiB"


def test_element_limit_is_adjustable_in_both_decoders() -> None:
    data = craft_container(dims=(1 << 12, 1 << 8), entries=0, chunk_symbols=1, layout=1, index_bits=4,
                           codebook=b"", streams=[_RAW1_EMPTY, _RAW1_EMPTY])
    cpp = CppDecoder()
    assert fuzz_support.numpy_outcome(data).valid and cpp.outcome(data).valid
    limited_numpy = fuzz_support.numpy_outcome(data, max_elements=(1 << 20) - 1)
    limited_cpp = cpp.outcome(data, max_elements=(1 << 20) - 1)
    assert limited_numpy.keyword == limited_cpp.keyword == "limit"


# ---------------------------------------------------------------------------- linear work
def _dense_huffman_one_chunk(n: int, rng: np.random.Generator) -> bytes:
    """n symbols of a 1-bit code in one chunk: the numpy decoder's one-step-per-symbol path."""
    return craft_container(dims=(n,), entries=n, chunk_symbols=n, streams=[
        CraftedStream(mode=1, code_lengths=(1, 1), bits=rng.integers(0, 2, n), chunk_bits=[n])])


def _sparse_chunk_per_symbol(n: int, rng: np.random.Generator) -> bytes:
    """Sparse, both streams raw 1-bit, one symbol per chunk: 8 bytes of chunk tables per entry."""
    return craft_container(dims=(2 * n + 1,), entries=n, chunk_symbols=1, layout=1, index_bits=1, streams=[
        CraftedStream(mode=0, raw_width=1, symbols=rng.integers(0, 2, n)),
        CraftedStream(mode=0, raw_width=1, symbols=rng.integers(0, 2, n))])


def _invalid_code_word_at_end(n: int, rng: np.random.Generator) -> bytes:
    """A one-symbol code ('0'); the last bit is a '1': every symbol is decoded before the error."""
    bits = np.zeros(n, dtype=np.uint8)
    bits[-1] = 1
    return craft_container(dims=(n,), entries=n, chunk_symbols=n, streams=[
        CraftedStream(mode=1, code_lengths=(1,), bits=bits, chunk_bits=[n])])


def _sparse_15bit_codes(n: int, rng: np.random.Generator) -> bytes:
    """256 codebook values and 15-bit code words (the largest Huffman table), sparse, 16-bit gap field."""
    codebook = np.linspace(-1, 1, 256, dtype=np.float32).tobytes()
    lengths = (15,) * 257
    symbols = rng.integers(0, 257, n)
    # Canonical code of equal lengths: symbol s is s in 15 bits.
    bits = ((symbols[:, None] >> np.arange(14, -1, -1)) & 1).reshape(-1)
    chunk = 64
    chunk_bits = [15 * min(chunk, n - start) for start in range(0, n, chunk)]
    gaps = rng.integers(0, 1 << 11, n)  # positions < n * 2^11 <= the 2^30 element limit
    return craft_container(dims=(n << 11,), entries=n, chunk_symbols=chunk, layout=1, index_bits=16, bits=8,
                           codebook=codebook, streams=[
                               CraftedStream(mode=1, code_lengths=lengths, bits=bits, chunk_bits=chunk_bits),
                               CraftedStream(mode=0, raw_width=16, symbols=gaps)])


FAMILIES: dict[str, Callable[[int, np.random.Generator], bytes]] = {
    "dense_huffman_one_chunk": _dense_huffman_one_chunk,
    "sparse_chunk_per_symbol": _sparse_chunk_per_symbol,
    "invalid_code_word_at_end": _invalid_code_word_at_end,
    "sparse_15bit_codes": _sparse_15bit_codes,
}


def _assert_linear(sizes: list[int], work: list[int], what: str) -> None:
    """Work per byte at the largest size within 25 % of the work per byte at the second smallest.

    (The smallest size absorbs fixed costs such as building a Huffman table.)
    """
    per_byte = [w / s for w, s in zip(work, sizes, strict=True)]
    assert per_byte[-1] <= 1.25 * per_byte[1] + 1e-9, f"{what}: work per byte {per_byte} for sizes {sizes}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cpp_decoder_work_is_linear_in_input_size(family: str) -> None:
    counting = CppDecoder(fuzz_support.build("count") / "libodc_count.so")
    sizes, steps = [], []
    for n in (1 << 11, 1 << 13, 1 << 15, 1 << 17, 1 << 19):
        data = FAMILIES[family](n, np.random.default_rng(n))
        counting.reset_steps()
        outcome = counting.outcome(data, threads=1, expand=False)
        steps.append(counting.steps())
        sizes.append(len(data))
        assert outcome.valid == (family != "invalid_code_word_at_end"), outcome.summary()
    _assert_linear(sizes, steps, f"C++ {family}")
    assert max(s / b for s, b in zip(steps, sizes, strict=True)) < 500, (sizes, steps)


def _numpy_calls_and_peak(data: bytes) -> tuple[int, int]:
    from onnx_dc.codec.container_reader import decode_container
    from onnx_dc.errors import ContainerError

    calls = 0

    def profiler(frame, event, arg) -> None:  # noqa: ANN001
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    tracemalloc.start()
    sys.setprofile(profiler)
    try:
        decode_container(data)
    except ContainerError:
        pass
    finally:
        sys.setprofile(None)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return calls, peak


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_numpy_decoder_work_is_linear_in_input_size(family: str) -> None:
    sizes, calls, peaks = [], [], []
    for n in (1 << 9, 1 << 11, 1 << 13, 1 << 14):
        data = FAMILIES[family](n, np.random.default_rng(n))
        count, peak = _numpy_calls_and_peak(data)
        sizes.append(len(data))
        calls.append(count)
        peaks.append(peak)
    _assert_linear(sizes, calls, f"numpy calls, {family}")
    _assert_linear(sizes, peaks, f"numpy peak memory, {family}")
