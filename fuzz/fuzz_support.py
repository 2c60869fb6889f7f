"""Shared helpers of the fuzz targets, fuzz/run.sh and the hardening tests.

* :func:`build` runs fuzz/build.sh (incremental) and returns fuzz/build/.
* :class:`CppDecoder` calls the C++ container decoder (runtime/src/container.cc)
  through fuzz/decoder_shim.cc with ctypes.
* :func:`numpy_outcome` / :meth:`CppDecoder.outcome` decode one container with
  either decoder and reduce the result to an :class:`Outcome` (the dense bytes,
  or the FORMAT.md section 7 keyword of the error), so the two can be compared.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

FUZZ_DIR = Path(__file__).resolve().parent
REPO_ROOT = FUZZ_DIR.parent
BUILD_DIR = Path(os.environ.get("ONNX_DC_FUZZ_BUILD_DIR", FUZZ_DIR / "build"))
CORPUS_DIR = FUZZ_DIR / "corpus"
REGRESSIONS_DIR = FUZZ_DIR / "regressions"
REGRESSIONS_MANIFEST = REGRESSIONS_DIR / "manifest.json"
FORMAT_DOC = REPO_ROOT / "docs" / "FORMAT.md"
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

#: Dense outputs up to this size are materialised and compared byte for byte.
MAX_COMPARE_BYTES = 1 << 24
#: The element limit both decoders use by default (FORMAT.md section 3.2).
DEFAULT_MAX_ELEMENTS = 1 << 30
#: ONNX TensorProto.DataType number of each container element type (FORMAT.md section 3.1).
ONNX_DTYPES = {"float32": 1, "float16": 10, "float64": 11, "bfloat16": 16}


def build(*targets: str) -> Path:
    """Build ``targets`` of fuzz/build.sh (default: fuzzer, shim, count); return the build directory."""
    result = subprocess.run(
        ["bash", str(FUZZ_DIR / "build.sh"), *targets], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"fuzz/build.sh {' '.join(targets)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return BUILD_DIR


# ---------------------------------------------------------------------------- keywords
def format_keywords() -> list[str]:
    """The error keywords of FORMAT.md section 7, in table order, without repeats."""
    section = FORMAT_DOC.read_text().split("## 7.", 1)[1].split("\n## ", 1)[0]
    keywords: list[str] = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].isdigit():
            keyword = cells[2].strip("`")
            if keyword not in keywords:
                keywords.append(keyword)
    if len(keywords) < 20:
        raise RuntimeError(f"the keyword table of {FORMAT_DOC} section 7 was not found")
    return keywords


_KEYWORDS: list[str] | None = None


def leading_keyword(message: str) -> str | None:
    """The section 7 keyword that occurs first in ``message`` (longest wins at one position)."""
    global _KEYWORDS
    if _KEYWORDS is None:
        _KEYWORDS = format_keywords()
    lowered = message.lower()
    found = [(lowered.find(k.lower()), -len(k), k) for k in _KEYWORDS if k.lower() in lowered]
    return min(found)[2] if found else None


# ---------------------------------------------------------------------------- outcomes
@dataclass(frozen=True)
class Outcome:
    """What decoding one container gave: ``keyword`` is None for a valid container.

    ``dtype`` is the ONNX type number, ``dense`` the decoded bytes (None when
    invalid or larger than :data:`MAX_COMPARE_BYTES`), ``message`` the error text.
    """

    keyword: str | None
    message: str = ""
    dtype: int = 0
    shape: tuple[int, ...] = ()
    dense: bytes | None = None

    @property
    def valid(self) -> bool:
        return self.keyword is None

    def summary(self) -> str:
        if self.valid:
            return f"valid dtype={self.dtype} shape={list(self.shape)}"
        return f"error [{self.keyword}] {self.message}"


def numpy_outcome(data: bytes, *, max_elements: int = DEFAULT_MAX_ELEMENTS) -> Outcome:
    """Decode with onnx_dc.codec.container (numpy). Any exception but ContainerError propagates."""
    from onnx_dc.codec.container_reader import decode_container, decode_container_symbols
    from onnx_dc.errors import ContainerError

    try:
        info, _, _ = decode_container_symbols(data, max_elements=max_elements)
    except ContainerError as error:
        message = str(error)
        return Outcome(leading_keyword(message) or "<no keyword>", message)
    dense = None
    if info.numel * info.dtype.itemsize <= MAX_COMPARE_BYTES:
        dense = decode_container(data, max_elements=max_elements).tobytes()
    return Outcome(None, "", ONNX_DTYPES[info.dtype.name], tuple(info.shape), dense)


class CppDecoder:
    """The C++ decoder through ctypes (fuzz/build/libodc_shim.so, or libodc_count.so to count steps)."""

    def __init__(self, library: str | os.PathLike | None = None) -> None:
        path = Path(library) if library else build("shim") / "libodc_shim.so"
        lib = ctypes.CDLL(str(path))
        lib.odc_decode.restype = ctypes.c_void_p
        lib.odc_decode.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint64, ctypes.c_uint]
        for name in ("odc_ok", "odc_dtype", "odc_ndim"):
            getattr(lib, name).restype = ctypes.c_uint
            getattr(lib, name).argtypes = [ctypes.c_void_p]
        lib.odc_error.restype = ctypes.c_char_p
        lib.odc_error.argtypes = [ctypes.c_void_p]
        lib.odc_dim.restype = ctypes.c_uint64
        lib.odc_dim.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.odc_dense_bytes.restype = ctypes.c_uint64
        lib.odc_dense_bytes.argtypes = [ctypes.c_void_p]
        lib.odc_expand.restype = None
        lib.odc_expand.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.odc_free.restype = None
        lib.odc_free.argtypes = [ctypes.c_void_p]
        lib.odc_steps.restype = ctypes.c_uint64
        lib.odc_reset_steps.restype = None
        self._lib = lib

    def outcome(
        self, data: bytes, *, max_elements: int = DEFAULT_MAX_ELEMENTS, threads: int = 1, expand: bool = True
    ) -> Outcome:
        """Decode ``data``; the dense bytes are returned up to :data:`MAX_COMPARE_BYTES` when ``expand``."""
        lib = self._lib
        result = lib.odc_decode(data, len(data), max_elements, threads)
        if not result:
            raise MemoryError("odc_decode could not allocate its result")
        try:
            if not lib.odc_ok(result):
                message = lib.odc_error(result).decode("utf-8", "replace")
                return Outcome(leading_keyword(message) or "<no keyword>", message)
            shape = tuple(int(lib.odc_dim(result, i)) for i in range(lib.odc_ndim(result)))
            size = int(lib.odc_dense_bytes(result))
            dense = None
            if expand and size <= MAX_COMPARE_BYTES:
                buffer = ctypes.create_string_buffer(max(size, 1))
                lib.odc_expand(result, buffer)
                dense = buffer.raw[:size]
            return Outcome(None, "", int(lib.odc_dtype(result)), shape, dense)
        finally:
            lib.odc_free(result)

    def steps(self) -> int:
        """Edges executed by the decoder since :meth:`reset_steps` (libodc_count.so only)."""
        return int(self._lib.odc_steps())

    def reset_steps(self) -> None:
        self._lib.odc_reset_steps()


def disagreement(numpy_result: Outcome, cpp_result: Outcome) -> str | None:
    """Why the two decoders disagree on one container, or None when they agree."""
    if numpy_result.keyword != cpp_result.keyword:
        return f"numpy: {numpy_result.summary()} | C++: {cpp_result.summary()}"
    if numpy_result.valid:
        if (numpy_result.dtype, numpy_result.shape) != (cpp_result.dtype, cpp_result.shape):
            return f"header differs: numpy {numpy_result.summary()} | C++ {cpp_result.summary()}"
        if numpy_result.dense != cpp_result.dense:
            return "decoded tensors differ"
    return None


def one_line_error(message: str) -> str | None:
    """Why ``message`` is not a proper decoder error (one line naming a section 7 keyword), or None."""
    if not message or "\n" in message.strip():
        return f"not one line: {message!r}"
    if leading_keyword(message) is None:
        return f"no FORMAT.md section 7 keyword in {message!r}"
    return None


# ---------------------------------------------------------------------------- regressions
def regression_cases() -> list[dict]:
    """fuzz/regressions/manifest.json: one ``{"file", "finder", "found", "expected", "cause"}`` per input.

    ``expected`` is the section 7 keyword both decoders must report, or
    ``"valid"`` for an input that must decode (a crash or disagreement on a
    valid container).
    """
    if not REGRESSIONS_MANIFEST.exists():
        return []
    return json.loads(REGRESSIONS_MANIFEST.read_text())["regressions"]


# ---------------------------------------------------------------------------- crafting containers
@dataclass(frozen=True)
class CraftedStream:
    """One stream descriptor plus payload, written as given (no validation).

    Raw: ``raw_width`` and ``symbols``; Huffman: ``code_lengths`` and ``bits``
    (the payload as a 0/1 array). ``chunk_bits`` defaults to what the symbols
    or bits take with the container's chunking.
    """

    mode: int = 0
    raw_width: int = 0
    code_lengths: tuple[int, ...] = ()
    symbols: object = None  # raw: sequence of ints
    bits: object = None  # Huffman: sequence of 0/1
    chunk_bits: object = None
    table_length: int | None = None  # default: len(code_lengths)


def _pack_bits(bits) -> bytes:  # noqa: ANN001 - numpy-like 0/1 sequence
    import numpy as np

    return np.packbits(np.asarray(bits, dtype=np.uint8), bitorder="big").tobytes()


def craft_container(
    *,
    dims: tuple[int, ...],
    entries: int,
    chunk_symbols: int,
    streams: list[CraftedStream],
    dtype: int = 1,
    layout: int = 0,
    bits: int = 1,
    index_bits: int = 0,
    codebook: bytes = b"\x00\x00\x80\x3f",
    codebook_size: int | None = None,
) -> bytes:
    """A container written field by field from FORMAT.md section 3, with a correct CRC-32.

    Independent of onnx_dc's encoder, so it can write any combination of
    fields, valid or not (the resource-limit tests use it for adversarial inputs).
    """
    import struct
    import zlib

    import numpy as np

    itemsize = {1: 4, 10: 2, 11: 8, 16: 2}.get(dtype, 4)
    k = len(codebook) // itemsize if codebook_size is None else codebook_size
    header = b"ODCT" + struct.pack("<BBBBBBHIQ", 1, dtype, layout, bits, index_bits, len(dims), k, chunk_symbols, entries)
    descriptors, payloads = [], []
    for stream in streams:
        if stream.mode == 0:
            symbols = np.asarray(stream.symbols, dtype=np.int64)
            shifts = np.arange(stream.raw_width - 1, -1, -1)
            bit_array = ((symbols[:, None] >> shifts) & 1).reshape(-1)
            per_symbol = np.full(symbols.size, stream.raw_width)
            table = b""
        else:
            bit_array = np.asarray(stream.bits, dtype=np.uint8)
            per_symbol = None
            lengths = list(stream.code_lengths) + ([0] if len(stream.code_lengths) % 2 else [])
            table = bytes(lengths[i] | (lengths[i + 1] << 4) for i in range(0, len(lengths), 2))
        if stream.chunk_bits is not None:
            chunk_bits = np.asarray(stream.chunk_bits, dtype=np.int64)
        elif per_symbol is not None:
            starts = np.arange(0, entries, chunk_symbols)
            chunk_bits = np.add.reduceat(per_symbol, starts) if entries else np.zeros(0, np.int64)
        else:
            raise ValueError("a Huffman CraftedStream needs chunk_bits")
        table_length = len(stream.code_lengths) if stream.table_length is None else stream.table_length
        descriptors.append(
            struct.pack("<BBHI", stream.mode, stream.raw_width, 0, table_length)
            + table
            + chunk_bits.astype("<u4").tobytes()
        )
        payloads.append(_pack_bits(bit_array))
    body = header + struct.pack(f"<{len(dims)}Q", *dims) + codebook + b"".join(descriptors) + b"".join(payloads)
    return body + struct.pack("<I", zlib.crc32(body))
