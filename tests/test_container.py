"""The container format (onnx_dc/codec/container.py, docs/FORMAT.md) and the shared test vectors."""

from __future__ import annotations

import importlib.util
import json
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnx_dc.codec.container import DEFAULT_MAX_ELEMENTS, ContainerInfo, encode_container
from onnx_dc.codec.container_reader import decode_container, decode_container_codes, decode_container_symbols, read_container_info
from onnx_dc.codec.container_example import worked_example
from onnx_dc.errors import ContainerError, InvalidTensorError, SettingsError
from onnx_dc.codec.relative_indices import count_fillers

REPO = Path(__file__).resolve().parents[1]
VECTORS = REPO / "tests" / "vectors"
DTYPES = [np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64), np.dtype(ml_dtypes.bfloat16)]


def _expected(codes: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    table = np.zeros(codebook.size + 1, dtype=codebook.dtype)
    table[: codebook.size] = codebook
    return table[np.where(codes < 0, codebook.size, codes)]


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@st.composite
def quantized_tensors(draw, max_side: int = 7, max_ndim: int = 5):
    ndim = draw(st.integers(0, max_ndim))
    shape = tuple(draw(st.lists(st.integers(0, max_side), min_size=ndim, max_size=ndim)))
    dtype = draw(st.sampled_from(DTYPES))
    bits = draw(st.integers(1, 8))
    n_codes = draw(st.integers(0, 1 << bits))
    density = draw(st.sampled_from([0.0, 0.02, 0.1, 0.5, 0.9, 1.0]) | st.floats(0.0, 1.0))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    numel = int(np.prod(shape, dtype=np.int64))
    kept = (rng.random(numel) < density) & (n_codes > 0)
    skew = draw(st.floats(0.5, 4.0))
    codes = np.where(kept, np.minimum((rng.random(numel) ** skew * n_codes).astype(np.int64), n_codes - 1), -1)
    codebook = (rng.standard_normal(n_codes) * draw(st.sampled_from([1e-3, 1.0, 100.0]))).astype(dtype)
    if n_codes >= 2 and draw(st.booleans()):
        codebook[1] = np.array(-0.0, dtype=dtype)
    return codes.reshape(shape).astype(np.int16), codebook, bits


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    quantized_tensors(),
    st.integers(1, 16),
    st.sampled_from(["auto", "sparse", "dense"]),
    st.sampled_from([1, 2, 3, 7, 64, 1024]),
)
def test_round_trip_is_bit_exact(tensor, index_bits, layout, chunk_symbols):
    codes, codebook, bits = tensor
    data = encode_container(
        codes, codebook, bits=bits, index_bits=index_bits, layout=layout, chunk_symbols=chunk_symbols
    )
    decoded = decode_container(data)
    assert _same_bits(decoded, _expected(codes, codebook))
    decoded_codes, decoded_codebook = decode_container_codes(data)
    np.testing.assert_array_equal(decoded_codes, codes)
    assert decoded_codes.dtype == np.int16
    assert _same_bits(decoded_codebook, codebook)
    info = read_container_info(data)
    assert isinstance(info, ContainerInfo)
    assert (info.dtype, info.shape, info.bits, info.codebook_size, info.chunk_symbols, info.size_bytes) == (
        codebook.dtype,
        codes.shape,
        bits,
        codebook.size,
        chunk_symbols,
        len(data),
    )
    if layout != "auto":
        assert info.layout == layout
    if info.layout == "sparse":
        positions = np.flatnonzero(codes.reshape(-1) >= 0)
        assert info.index_bits == index_bits
        assert info.entries == positions.size + count_fillers(positions, index_bits)
    else:
        assert info.index_bits == 0 and info.entries == codes.size


@settings(max_examples=100, deadline=None)
@given(quantized_tensors(max_side=40, max_ndim=2), st.integers(1, 16))
def test_auto_layout_picks_the_smaller_container(tensor, index_bits):
    codes, codebook, bits = tensor
    sizes = {
        layout: len(encode_container(codes, codebook, bits=bits, index_bits=index_bits, layout=layout))
        for layout in ("auto", "sparse", "dense")
    }
    assert sizes["auto"] == min(sizes["sparse"], sizes["dense"])


@pytest.mark.parametrize("index_bits", [2, 5, 8, 16])
def test_huge_gaps_round_trip(index_bits):
    codes = np.full(1_000_000, -1, dtype=np.int16)
    codes[[0, 1, 400_000, 999_999]] = [0, 1, 2, 1]
    codebook = np.array([0.5, -1.0, 2.0], dtype=np.float32)
    data = encode_container(codes, codebook, bits=2, index_bits=index_bits, layout="sparse")
    assert _same_bits(decode_container(data), _expected(codes, codebook))
    assert read_container_info(data).entries == 4 + count_fillers(np.array([0, 1, 400_000, 999_999]), index_bits)


@pytest.mark.parametrize("density", [0.0, 0.08, 0.5, 1.0])
def test_larger_tensor_round_trip_many_chunks(density):
    rng = np.random.default_rng(7)
    codes = np.where(rng.random((300, 200)) < density, rng.integers(0, 32, (300, 200)), -1).astype(np.int16)
    codebook = np.linspace(-1, 1, 32).astype(np.float32)
    for layout in ("sparse", "dense"):
        data = encode_container(codes, codebook, bits=5, index_bits=5, layout=layout, chunk_symbols=100)
        assert _same_bits(decode_container(data), _expected(codes, codebook))


def test_eight_dimensions_and_scalars():
    codebook = np.array([1.25, -3.0], dtype=np.float64)
    codes = np.array([0, -1, 1, 1, -1, 0, 0, 1] * 2, dtype=np.int16).reshape(2, 1, 2, 1, 2, 1, 2, 1)
    assert _same_bits(
        decode_container(encode_container(codes, codebook, bits=1, index_bits=2)), _expected(codes, codebook)
    )
    for value in (0, 1, -1):
        scalar = np.array(value, dtype=np.int16)
        decoded = decode_container(encode_container(scalar, codebook, bits=1, index_bits=3))
        assert decoded.shape == () and _same_bits(decoded, _expected(scalar, codebook))


def test_unpruned_tensor_uses_the_dense_layout():
    codes = np.arange(1000, dtype=np.int16).reshape(10, 100) % 16
    data = encode_container(codes, np.arange(16, dtype=np.float32), bits=4, index_bits=5)
    assert read_container_info(data).layout == "dense"


def test_heavily_pruned_tensor_uses_the_sparse_layout():
    codes = np.full((100, 100), -1, dtype=np.int16)
    codes[::7, ::9] = 3
    data = encode_container(codes, np.arange(16, dtype=np.float32), bits=4, index_bits=5)
    assert read_container_info(data).layout == "sparse"


# ---------------------------------------------------------------------------- corruption
def _small_container() -> bytes:
    codes = np.array([[0, -1, 2, -1, -1, -1, 1], [-1, -1, -1, -1, -1, 2, 0]], dtype=np.int16)
    return encode_container(
        codes, np.array([0.5, -0.25, 4.0], dtype=np.float32), bits=2, index_bits=2, layout="sparse", chunk_symbols=3
    )


def test_every_single_byte_corruption_is_detected():
    data = _small_container()
    assert decode_container(data).shape == (2, 7)
    for position in range(len(data)):
        for xor in range(1, 256):
            corrupted = bytearray(data)
            corrupted[position] ^= xor
            with pytest.raises(ContainerError):
                decode_container(bytes(corrupted))


def test_every_truncation_and_extension_is_detected():
    data = _small_container()
    for length in range(len(data)):
        with pytest.raises(ContainerError):
            decode_container(data[:length])
    for extra in (b"\x00", b"\x00" * 4, data[-4:]):
        with pytest.raises(ContainerError):
            decode_container(data + extra)


def _fix_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


_FUZZ_BASES = [
    _small_container(),
    encode_container(
        np.arange(-1, 40, dtype=np.int16).reshape(41) % 9 - 1,
        np.linspace(0, 1, 8).astype(np.float16),
        bits=3,
        index_bits=3,
        layout="dense",
        chunk_symbols=8,
    ),
    encode_container(
        np.where(np.arange(200) % 13 == 0, np.arange(200) % 5, -1).astype(np.int16),
        np.linspace(-2, 2, 5).astype(np.float64),
        bits=3,
        index_bits=2,
        layout="sparse",
        chunk_symbols=16,
    ),
]


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(range(len(_FUZZ_BASES))),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_structural_fuzz_with_valid_crc_never_misbehaves(base_index, edits):
    """Corrupted fields behind a correct CRC: a ContainerError or a tensor, nothing else."""
    body = bytearray(_FUZZ_BASES[base_index][:-4])
    for position, value in edits:
        body[position % len(body)] = value
    data = _fix_crc(bytes(body))
    try:
        tensor = decode_container(data, max_elements=1 << 20)
    except ContainerError:
        return
    info = read_container_info(data)
    assert tensor.shape == info.shape and tensor.dtype == info.dtype
    codes, _ = decode_container_codes(data)
    assert codes.shape == info.shape and codes.min(initial=0) >= -1 and codes.max(initial=-1) < info.codebook_size


def test_element_limit_is_enforced_before_decoding():
    codes = np.full((1000, 1000), -1, dtype=np.int16)
    codes[0, 0] = 0
    data = encode_container(codes, np.array([1.0], dtype=np.float32), bits=1, index_bits=16)
    assert decode_container(data, max_elements=1_000_000).shape == (1000, 1000)
    with pytest.raises(ContainerError, match="limit"):
        decode_container(data, max_elements=999_999)
    with pytest.raises(ContainerError, match="limit"):
        decode_container_codes(data, max_elements=10)
    assert read_container_info(data).shape == (1000, 1000)  # no limit by default
    assert DEFAULT_MAX_ELEMENTS == 1 << 30


def test_input_types():
    data = _small_container()
    expected = decode_container(data)
    for form in (bytearray(data), memoryview(data), np.frombuffer(data, dtype=np.uint8)):
        assert _same_bits(decode_container(form), expected)
    with pytest.raises(ContainerError):
        decode_container(np.frombuffer(data, dtype=np.uint8).reshape(1, -1))
    with pytest.raises(ContainerError):
        decode_container(np.frombuffer(data, dtype=np.int8))
    with pytest.raises(ContainerError):
        decode_container("not bytes")  # type: ignore[arg-type]


def test_decode_symbols_reports_streams():
    info, code_symbols, gap_symbols = decode_container_symbols(_small_container())
    assert info.layout == "sparse" and gap_symbols is not None
    assert code_symbols.size == gap_symbols.size == info.entries


# ---------------------------------------------------------------------------- encoder argument checks
@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"bits": 0}, SettingsError),
        ({"bits": 9}, SettingsError),
        ({"bits": True}, SettingsError),
        ({"index_bits": 0}, SettingsError),
        ({"index_bits": 17}, SettingsError),
        ({"layout": "csr"}, SettingsError),
        ({"chunk_symbols": 0}, SettingsError),
        ({"chunk_symbols": (1 << 24) + 1}, SettingsError),
        ({"codebook": np.array([1, 2], dtype=np.int32)}, InvalidTensorError),
        ({"codebook": np.array([[1.0, 2.0]], dtype=np.float32)}, InvalidTensorError),
        ({"codebook": np.array([1.0, np.nan], dtype=np.float32)}, InvalidTensorError),
        ({"codebook": np.array([1.0, np.inf], dtype=np.float16)}, InvalidTensorError),
        ({"codebook": np.arange(5, dtype=np.float32)}, InvalidTensorError),  # > 2**bits
        ({"codes": np.array([0, 4], dtype=np.int16)}, InvalidTensorError),
        ({"codes": np.array([0, -2], dtype=np.int16)}, InvalidTensorError),
        ({"codes": np.array([0.0, 1.0])}, InvalidTensorError),
        ({"codes": np.zeros((1,) * 9, dtype=np.int16)}, InvalidTensorError),
    ],
)
def test_encoder_rejects_bad_arguments(kwargs, error):
    arguments = {
        "codes": np.array([0, 1, -1], dtype=np.int16),
        "codebook": np.array([0.5, 1.5, 2.5, 3.5], dtype=np.float32),
        "bits": 2,
        "index_bits": 4,
    }
    arguments.update(kwargs)
    codes = arguments.pop("codes")
    codebook = arguments.pop("codebook")
    with pytest.raises(error):
        encode_container(codes, codebook, **arguments)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int32, np.int64, np.uint64])
def test_any_integer_code_dtype(dtype):
    codebook = (
        np.linspace(-1, 1, 256).astype(np.float32) if dtype != np.int8 else np.linspace(-1, 1, 128).astype(np.float32)
    )
    top = codebook.size - 1
    codes = np.array([0, top, top, 1, top, 0], dtype=dtype)
    if np.issubdtype(dtype, np.signedinteger):
        codes[3] = -1
    data = encode_container(codes, codebook, bits=8, index_bits=4)
    np.testing.assert_array_equal(decode_container_codes(data)[0], codes.astype(np.int64))


def test_big_endian_codebook_is_accepted():
    codebook = np.array([0.5, -2.0], dtype=">f4")
    data = encode_container(np.array([0, 1, -1], dtype=np.int16), codebook, bits=1, index_bits=2)
    assert decode_container(data).tolist() == [0.5, -2.0, 0.0]


# ---------------------------------------------------------------------------- test vectors
def _load_generator():
    spec = importlib.util.spec_from_file_location("vector_generator", VECTORS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_committed_vectors_equal_the_generator_output():
    files = _load_generator().build_vectors()
    on_disk = {p.name for p in VECTORS.iterdir() if p.suffix in (".odc", ".npy", ".json")}
    assert on_disk == set(files), "run python tests/vectors/generate.py"
    for name, content in files.items():
        assert (VECTORS / name).read_bytes() == content, f"{name} differs from the generator: regenerate"


def _manifest() -> list[dict]:
    return json.loads((VECTORS / "manifest.json").read_text())["vectors"]


@pytest.mark.parametrize("entry", [e for e in _manifest() if e["valid"]], ids=lambda e: e["file"])
def test_valid_vector_decodes_to_the_expected_tensor(entry):
    data = (VECTORS / entry["file"]).read_bytes()
    decoded = decode_container(data)
    expected = np.load(VECTORS / entry["expected"], allow_pickle=False)
    assert decoded.dtype.name == entry["dtype"]
    assert list(decoded.shape) == entry["shape"]
    assert expected.dtype.name == entry["expected_dtype"]
    assert decoded.view(expected.dtype).tobytes() == expected.tobytes()
    assert read_container_info(data).layout == entry["layout"]


@pytest.mark.parametrize("entry", [e for e in _manifest() if not e["valid"]], ids=lambda e: e["file"])
def test_invalid_vector_is_rejected_with_its_keyword(entry):
    data = (VECTORS / entry["file"]).read_bytes()
    with pytest.raises(ContainerError) as error:
        decode_container(data)
    assert entry["error"] in str(error.value)


def _format_md() -> str:
    return (REPO / "docs" / "FORMAT.md").read_text()


def test_every_error_keyword_of_the_spec_has_a_vector():
    section = _format_md().split("## 7. Errors", 1)[1].split("## 8.", 1)[0]
    keywords = set(re.findall(r"^\| \d+ \|.*\| `([^`]+)` \|$", section, flags=re.MULTILINE))
    assert len(keywords) >= 25
    covered = {entry["error"] for entry in _manifest() if not entry["valid"]}
    assert keywords == covered


def test_vectors_cover_every_dtype_layout_and_mode():
    valid = [e for e in _manifest() if e["valid"]]
    assert {e["dtype"] for e in valid} == {"float32", "float16", "float64", "bfloat16"}
    assert {e["layout"] for e in valid} == {"sparse", "dense"}
    modes = set()
    for entry in valid:
        info = read_container_info((VECTORS / entry["file"]).read_bytes())
        modes.add(info.code_stream.mode)
        if info.gap_stream is not None:
            modes.add("gap " + info.gap_stream.mode)
    assert modes == {"raw", "huffman", "gap raw", "gap huffman"}
    assert any(e["shape"] == [] for e in valid) and any(0 in e["shape"] for e in valid)


# ---------------------------------------------------------------------------- worked example
def test_format_md_worked_example_is_current():
    text = _format_md()
    section = text.split("<!-- worked-example:begin -->\n", 1)[1].split("\n<!-- worked-example:end -->", 1)[0]
    assert section == worked_example()


def test_example_command_line():
    result = subprocess.run(
        [sys.executable, "-m", "onnx_dc.codec.container_example", "--example"], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == worked_example() + "\n"
    bad = subprocess.run(
        [sys.executable, "-m", "onnx_dc.codec.container_example"], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert bad.returncode == 2 and "usage" in bad.stderr
