"""The C++ container decoder (runtime/src/container.cc) against the test vectors and the numpy decoder.

The decoder is exercised through ``onnx_dc_decode`` (a CMake tool built from the
same source, in runtime/build-tests) and through onnxruntime session creation.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest

from onnx_dc.codec.container_reader import decode_container
from onnx_dc.codec.container import encode_container
from onnx_dc.errors import ContainerError
from onnx_dc.graph.library import ops_library_path
from test_runtime_support import (
    VECTORS_DIR,
    build_runtime,
    corrupted_containers,
    decode_with_tool,
    format_error_keywords,
    leading_keyword,
    make_session,
    matmul_model,
    random_container,
    vector_expected,
    vector_manifest,
)

VECTORS = vector_manifest()


@pytest.fixture(scope="module")
def tool() -> Path:
    return build_runtime("tests") / "onnx_dc_decode"


@pytest.fixture(scope="module")
def keywords() -> list[str]:
    return format_error_keywords()


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: v["file"])
def test_agrees_with_every_vector(tool: Path, tmp_path: Path, vector: dict) -> None:
    code, data, stderr = decode_with_tool(tool, (VECTORS_DIR / vector["file"]).read_bytes(), tmp_path)
    if vector["valid"]:
        assert code == 0, stderr
        expected = vector_expected(vector)
        assert data == np.ascontiguousarray(expected).tobytes()
    else:
        assert code == 1, stderr
        assert stderr.startswith("error: ") and stderr.count("\n") == 1
        assert vector["error"].lower() in stderr.lower(), stderr


@pytest.mark.parametrize("vector", [v for v in VECTORS if not v["valid"]], ids=lambda v: v["file"])
def test_invalid_vector_fails_session_creation_naming_the_tensor(vector: dict) -> None:
    data = (VECTORS_DIR / vector["file"]).read_bytes()
    with pytest.raises(Exception) as error:
        make_session(matmul_model(data, node_name="fc6", container_name="fc6.weight"), ops_library_path())
    message = str(error.value)
    assert "DCMatMul node 'fc6', container 'fc6.weight': " in message
    assert vector["error"].lower() in message.lower()


def _numpy_outcome(container: bytes, keywords: list[str]) -> tuple[str, bytes]:
    try:
        return "valid", np.ascontiguousarray(decode_container(container)).tobytes()
    except ContainerError as error:
        return str(leading_keyword(str(error), keywords)), b""


def _cpp_outcome(tool: Path, container: bytes, work_dir: Path, keywords: list[str], threads: int | None = None):
    code, data, stderr = decode_with_tool(tool, container, work_dir, threads=threads)
    assert code in (0, 1), f"exit code {code}: {stderr}"
    if code == 0:
        return "valid", data
    return str(leading_keyword(stderr, keywords)), b""


def _seed_containers() -> list[bytes]:
    rng = np.random.default_rng(21)
    seeds = [(VECTORS_DIR / v["file"]).read_bytes() for v in VECTORS if v["valid"]][:8]
    seeds.append(random_container(rng, (40, 30), sparsity=0.9, layout="sparse")[0])
    seeds.append(random_container(rng, (16, 16), sparsity=0.3, bits=3, layout="dense", dtype=np.float16)[0])
    return seeds


def test_mutated_containers_get_the_same_verdict_as_the_numpy_decoder(tool: Path, tmp_path: Path,
                                                                     keywords: list[str]) -> None:
    """Flips, truncations and extensions (half with a recomputed CRC, so later checks are reached)."""
    rng = np.random.default_rng(22)
    checked = valid = 0
    for seed in _seed_containers():
        for mutant in corrupted_containers(seed, rng, 40):
            expected = _numpy_outcome(mutant, keywords)
            actual = _cpp_outcome(tool, mutant, tmp_path, keywords)
            assert actual[0] == expected[0], (mutant.hex(), actual[0], expected[0])
            assert actual[1] == expected[1]
            checked += 1
            valid += expected[0] == "valid"
    assert checked == 400 and 0 < valid < checked


def test_parallel_decoding_matches_and_reports_the_same_error(tool: Path, tmp_path: Path,
                                                               keywords: list[str]) -> None:
    """A container large enough to be decoded on several threads, and the same with a bad late chunk."""
    rng = np.random.default_rng(23)
    codes = rng.integers(0, 32, size=(600, 1000))
    codes[rng.random(codes.shape) < 0.4] = -1
    codebook = np.linspace(-1, 1, 32, dtype=np.float32)
    container = encode_container(codes, codebook, bits=5, index_bits=4, layout="sparse", chunk_symbols=512)
    expected = np.ascontiguousarray(decode_container(container)).tobytes()
    for threads in (1, 4):
        code, data, stderr = decode_with_tool(tool, container, tmp_path, threads=threads)
        assert code == 0, stderr
        assert data == expected
    # Corrupt bytes near the end of the gap stream payload (a variable-length
    # code, so chunk lengths change), keep the CRC valid.
    from onnx_dc.codec.container_reader import read_container_info

    stream = read_container_info(container).gap_stream
    end = stream.payload_offset + stream.payload_size_bytes
    broken = bytearray(container)
    for offset in range(end - 40, end - 20):
        broken[offset] ^= 0xA5
    broken[-4:] = zlib.crc32(bytes(broken[:-4])).to_bytes(4, "little")
    messages = set()
    for threads in (1, 2, 4, 8):
        code, _, stderr = decode_with_tool(tool, bytes(broken), tmp_path, threads=threads)
        assert code == 1
        messages.add(stderr)
    assert len(messages) == 1
    assert leading_keyword(messages.pop(), keywords) == _numpy_outcome(bytes(broken), keywords)[0]


def test_huge_declared_shape_is_refused_before_allocating(tool: Path, tmp_path: Path) -> None:
    valid = next(v for v in VECTORS if v["valid"] and v["layout"] == "sparse" and v["dtype"] == "float32")
    data = bytearray((VECTORS_DIR / valid["file"]).read_bytes())
    assert data[9] >= 1  # ndim
    data[24:32] = (2**40).to_bytes(8, "little")  # first dimension: 2^40 elements or more in all
    data[-4:] = zlib.crc32(bytes(data[:-4])).to_bytes(4, "little")
    code, _, stderr = decode_with_tool(tool, bytes(data), tmp_path)
    assert code == 1 and "exceeds the limit of 1073741824 elements" in stderr, stderr
