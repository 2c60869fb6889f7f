"""The onnx-dc container: one compressed tensor as one byte string (docs/FORMAT.md, version 1).

Public API:

* :func:`encode_container` - cluster indices + codebook -> container bytes.
* :func:`decode_container` - container bytes -> dense tensor (original dtype and shape).
* :func:`decode_container_codes` - container bytes -> (codes with -1 for zero, codebook).
* :func:`decode_container_symbols` - container bytes -> (info, code symbols, gap symbols).
* :func:`read_container_info` - parse and validate everything except the streams' contents.

Every decoding function treats its input as untrusted: it raises
:class:`~onnx_dc.errors.ContainerError` whose message names the problem (and
contains the keyword listed in FORMAT.md section 7), validates sizes before
allocating anything derived from them, and runs a bounded number of steps.

Run ``python -m onnx_dc.codec.container --example`` to print FORMAT.md's worked example.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from onnx_dc.codec import relative_indices
from onnx_dc.codec.bitstream import pack_values, packed_size_bytes
from onnx_dc.codec.huffman import MAX_CODE_LENGTH, HuffmanCode
from onnx_dc.errors import InvalidTensorError, SettingsError

MAGIC = b"ODCT"
FORMAT_VERSION = 1
HEADER_SIZE_BYTES = 24
CRC_SIZE_BYTES = 4
STREAM_DESCRIPTOR_FIXED_BYTES = 8
MAX_NDIM = 8
MAX_BITS = 8
MAX_RAW_WIDTH = 16
#: Largest ``chunk_symbols`` the encoder accepts (keeps every chunk_bits value inside u32).
MAX_CHUNK_SYMBOLS = 1 << 24
DEFAULT_CHUNK_SYMBOLS = 1024
#: Default cap on the number of elements a decoder will materialise (1 GiElements).
DEFAULT_MAX_ELEMENTS = 1 << 30
LAYOUTS = ("auto", "sparse", "dense")

_INT64_MAX = (1 << 63) - 1
_MODE_RAW = 0
_MODE_HUFFMAN = 1
_MODE_NAMES = {_MODE_RAW: "raw", _MODE_HUFFMAN: "huffman"}
_LAYOUT_DENSE = 0
_LAYOUT_SPARSE = 1
_LAYOUT_NAMES = {_LAYOUT_DENSE: "dense", _LAYOUT_SPARSE: "sparse"}

# ONNX TensorProto.DataType numbers of the supported element types.
_DTYPE_TO_CODE = {
    np.dtype(np.float32): 1,
    np.dtype(np.float16): 10,
    np.dtype(np.float64): 11,
    np.dtype(ml_dtypes.bfloat16): 16,
}
_CODE_TO_DTYPE = {code: dtype for dtype, code in _DTYPE_TO_CODE.items()}
_BITS_DTYPE = {2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}


# ---------------------------------------------------------------------------- info types
@dataclass(frozen=True, eq=False)
class StreamInfo:
    """One stream's descriptor, validated, and where its parts lie in the container.

    ``chunk_bits`` is an ``int64`` array; ``code_lengths`` holds the stored
    Huffman code lengths (empty in raw mode); ``huffman`` is the rebuilt code.
    """

    name: str
    mode: str
    raw_width: int
    alphabet_size: int
    code_lengths: np.ndarray
    huffman: HuffmanCode | None
    chunk_bits: np.ndarray
    descriptor_offset: int
    table_size_bytes: int
    chunk_table_size_bytes: int
    payload_offset: int
    payload_bits: int

    @property
    def descriptor_size_bytes(self) -> int:
        """Bytes of the whole descriptor: fixed fields, code lengths and chunk table."""
        return STREAM_DESCRIPTOR_FIXED_BYTES + self.table_size_bytes + self.chunk_table_size_bytes

    @property
    def payload_size_bytes(self) -> int:
        """Bytes of the bit-packed payload, ``ceil(payload_bits / 8)``."""
        return packed_size_bytes(self.payload_bits)


@dataclass(frozen=True, eq=False)
class ContainerInfo:
    """A parsed and validated container header (FORMAT.md section 3), streams not decoded."""

    dtype: np.dtype
    shape: tuple[int, ...]
    layout: str
    bits: int
    index_bits: int
    codebook_size: int
    chunk_symbols: int
    entries: int
    size_bytes: int
    codebook: np.ndarray
    code_stream: StreamInfo
    gap_stream: StreamInfo | None

    @property
    def numel(self) -> int:
        """Number of elements of the tensor."""
        return _product(self.shape)

    @property
    def n_chunks(self) -> int:
        """Number of chunks of each stream, ``ceil(entries / chunk_symbols)``."""
        return -(-self.entries // self.chunk_symbols)

    @property
    def dims_size_bytes(self) -> int:
        """Bytes of the dims field."""
        return 8 * len(self.shape)

    @property
    def codebook_size_bytes(self) -> int:
        """Bytes of the codebook field."""
        return self.codebook_size * self.dtype.itemsize


def _product(values: tuple[int, ...]) -> int:
    result = 1
    for value in values:
        result *= value
    return result


# ---------------------------------------------------------------------------- encoding
@dataclass(frozen=True)
class _StreamPlan:
    """How one stream will be written, and its exact size, before packing any bit."""

    mode: int
    raw_width: int
    huffman: HuffmanCode | None
    table_length: int
    payload_bits: int
    n_chunks: int

    @property
    def size_bytes(self) -> int:
        return (
            STREAM_DESCRIPTOR_FIXED_BYTES
            + packed_size_bytes(4 * self.table_length)
            + 4 * self.n_chunks
            + packed_size_bytes(self.payload_bits)
        )


def _raw_width(alphabet_size: int) -> int:
    return max(1, (alphabet_size - 1).bit_length())


def _plan_stream(
    counts: np.ndarray, alphabet_size: int, chunk_symbols: int, mode: str | None = None, raw_width: int | None = None
) -> _StreamPlan:
    """Choose raw or Huffman for a stream with symbol histogram ``counts`` (smaller wins, raw on ties).

    ``mode`` ("raw"/"huffman") and ``raw_width`` force a choice (used to build test vectors).
    """
    counts = np.asarray(counts, dtype=np.int64)
    n_symbols = int(counts.sum())
    n_chunks = -(-n_symbols // chunk_symbols)
    width = _raw_width(alphabet_size) if raw_width is None else raw_width
    raw = _StreamPlan(_MODE_RAW, width, None, 0, n_symbols * width, n_chunks)
    used = np.flatnonzero(counts)
    if mode == "raw" or (mode is None and (n_symbols == 0 or used.size > 1 << MAX_CODE_LENGTH)):
        return raw
    table_length = int(used[-1]) + 1
    code = HuffmanCode.from_frequencies(counts[:table_length])
    huffman = _StreamPlan(_MODE_HUFFMAN, 0, code, table_length, code.encoded_bits(counts[:table_length]), n_chunks)
    if mode == "huffman" or huffman.size_bytes < raw.size_bytes:
        return huffman
    return raw


def _encode_stream(plan: _StreamPlan, symbols: np.ndarray, chunk_symbols: int) -> tuple[bytes, bytes]:
    """Pack ``symbols`` as ``plan`` says; returns (descriptor bytes, payload bytes)."""
    n_symbols = symbols.size
    chunk_starts = np.arange(0, n_symbols, chunk_symbols)
    if plan.mode == _MODE_RAW:
        payload, n_bits = pack_values(symbols, plan.raw_width)
        chunk_sizes = np.diff(np.append(chunk_starts, n_symbols))
        chunk_bits = chunk_sizes * plan.raw_width
        table = b""
    else:
        assert plan.huffman is not None
        payload, chunk_bits = plan.huffman.encode_chunks(symbols, chunk_symbols)
        n_bits = int(chunk_bits.sum())
        table = _pack_nibbles(plan.huffman.lengths[: plan.table_length])
    assert n_bits == plan.payload_bits
    descriptor = (
        struct.pack("<BBHI", plan.mode, plan.raw_width, 0, plan.table_length)
        + table
        + np.asarray(chunk_bits, dtype="<u4").tobytes()
    )
    return descriptor, payload.tobytes()


def _pack_nibbles(lengths: np.ndarray) -> bytes:
    padded = np.zeros(lengths.size + (lengths.size & 1), dtype=np.uint8)
    padded[: lengths.size] = lengths
    return (padded[0::2] | (padded[1::2] << 4)).astype(np.uint8).tobytes()


def _assemble_container(
    *,
    dtype: np.dtype,
    shape: tuple[int, ...],
    layout: int,
    bits: int,
    index_bits: int,
    codebook: np.ndarray,
    chunk_symbols: int,
    entries: int,
    streams: list[tuple[bytes, bytes]],
) -> bytes:
    """Lay out header, dims, codebook, descriptors, payloads and the CRC (no validation)."""
    codebook_bytes = (
        np.ascontiguousarray(codebook)
        .view(_BITS_DTYPE[dtype.itemsize].newbyteorder("="))
        .astype(_BITS_DTYPE[dtype.itemsize])
    )
    parts = [
        MAGIC,
        struct.pack(
            "<BBBBBBHIQ",
            FORMAT_VERSION,
            _DTYPE_TO_CODE[dtype],
            layout,
            bits,
            index_bits,
            len(shape),
            codebook.size,
            chunk_symbols,
            entries,
        ),
        struct.pack(f"<{len(shape)}Q", *shape),
        codebook_bytes.tobytes(),
    ]
    parts += [descriptor for descriptor, _ in streams]
    parts += [payload for _, payload in streams]
    body = b"".join(parts)
    return body + struct.pack("<I", zlib.crc32(body))


def _check_int_setting(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise SettingsError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise SettingsError(f"{name} {value} is outside {low}..{high}")
    return int(value)


def _check_codebook(codebook: np.ndarray, bits: int) -> np.ndarray:
    codebook = np.asarray(codebook)
    if codebook.dtype.byteorder == ">":
        codebook = codebook.astype(codebook.dtype.newbyteorder("="))
    if codebook.dtype not in _DTYPE_TO_CODE:
        raise InvalidTensorError(
            f"unsupported codebook dtype {codebook.dtype}: expected float32, float16, float64 or bfloat16"
        )
    if codebook.ndim != 1:
        raise InvalidTensorError(f"codebook must be 1-D, got shape {codebook.shape}")
    if codebook.size > 1 << bits:
        raise InvalidTensorError(f"codebook has {codebook.size} values, more than 2**bits = {1 << bits}")
    if not np.all(np.isfinite(codebook)):
        raise InvalidTensorError("codebook contains NaN or Inf")
    return codebook


def encode_container(
    codes: np.ndarray,
    codebook: np.ndarray,
    *,
    bits: int,
    index_bits: int,
    layout: str = "auto",
    chunk_symbols: int = DEFAULT_CHUNK_SYMBOLS,
) -> bytes:
    """Encode one quantized tensor as a container (docs/FORMAT.md).

    Args:
        codes: integer array with the tensor's shape (0 to 8 dims): the
            codebook index of every kept element, ``-1`` for pruned (zero) elements.
        codebook: 1-D array of the shared values, whose dtype is the tensor's dtype
            (float32, float16, float64 or ``ml_dtypes.bfloat16``); finite; at most
            ``2**bits`` values.
        bits: weight bits ``b`` (1..8), recorded in the header.
        index_bits: width of the sparse layout's gap field (1..16).
        layout: ``"sparse"``, ``"dense"`` or ``"auto"`` (whichever container is
            smaller; dense on ties). Sizes are computed from histograms, so only
            the chosen layout is packed.
        chunk_symbols: symbols per independently decodable chunk (1..2**24).

    Returns:
        The container bytes; ``decode_container`` of them is
        ``where(codes >= 0, codebook[codes], +0.0)`` bit for bit.

    Raises:
        SettingsError: ``bits``, ``index_bits``, ``layout`` or ``chunk_symbols`` out of range.
        InvalidTensorError: unsupported dtype, non-finite codebook, too many dims,
            codes not integers or outside ``-1 .. len(codebook) - 1``.
    """
    bits = _check_int_setting("bits", bits, 1, MAX_BITS)
    index_bits = _check_int_setting("index_bits", index_bits, relative_indices.MIN_INDEX_BITS, relative_indices.MAX_INDEX_BITS)
    chunk_symbols = _check_int_setting("chunk_symbols", chunk_symbols, 1, MAX_CHUNK_SYMBOLS)
    if layout not in LAYOUTS:
        raise SettingsError(f"unknown layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    codebook = _check_codebook(codebook, bits)
    codes = np.asarray(codes)
    if not np.issubdtype(codes.dtype, np.integer):
        raise InvalidTensorError(f"codes must be an integer array, got dtype {codes.dtype}")
    if codes.ndim > MAX_NDIM:
        raise InvalidTensorError(f"tensor has {codes.ndim} dimensions, the container supports at most {MAX_NDIM}")
    n_codes = codebook.size
    flat = codes.reshape(-1)
    if flat.dtype not in (np.int16, np.int32, np.int64):  # int8 / unsigned: room for -1 and +1
        flat = flat.astype(np.int32)
    if flat.size and (int(flat.min()) < -1 or int(flat.max()) >= n_codes):
        raise InvalidTensorError(
            f"codes must lie in -1..{n_codes - 1} (-1 = pruned) for a codebook of {n_codes} values"
        )
    zero_symbol = n_codes
    dtype = codebook.dtype

    # Header, dims, codebook and CRC are the same for both layouts: compare the streams.
    counts = np.bincount(flat + 1, minlength=n_codes + 1) if flat.size else np.zeros(n_codes + 1, np.int64)
    dense_counts = np.append(counts[1:], counts[0])  # zero symbol K last
    n_pruned = int(counts[0])

    dense_plan = None
    if layout in ("auto", "dense"):
        dense_plan = _plan_stream(dense_counts, n_codes + 1, chunk_symbols)
    sparse_plans = None
    # Nothing pruned: the sparse layout has the same code stream plus a gap stream.
    if layout == "sparse" or (layout == "auto" and n_pruned > 0):
        positions = np.flatnonzero(flat >= 0)
        fillers = relative_indices.fillers_per_position(positions, index_bits)
        sparse_counts = dense_counts.copy()
        sparse_counts[zero_symbol] = int(fillers.sum())
        sparse_plans = (
            _plan_stream(sparse_counts, n_codes + 1, chunk_symbols),
            _plan_stream(relative_indices.gap_symbol_counts(positions, index_bits), 1 << index_bits, chunk_symbols),
        )
    use_sparse = sparse_plans is not None and (
        dense_plan is None or sparse_plans[0].size_bytes + sparse_plans[1].size_bytes < dense_plan.size_bytes
    )

    if use_sparse:
        assert sparse_plans is not None
        gaps, kept_entries = relative_indices.relative_indices(positions, index_bits)
        code_symbols = np.full(gaps.size, zero_symbol, dtype=np.int64)
        code_symbols[kept_entries] = flat[positions]
        streams = [
            _encode_stream(sparse_plans[0], code_symbols, chunk_symbols),
            _encode_stream(sparse_plans[1], gaps, chunk_symbols),
        ]
        layout_code, header_index_bits, entries = _LAYOUT_SPARSE, index_bits, int(gaps.size)
    else:
        assert dense_plan is not None
        code_symbols = np.where(flat < 0, zero_symbol, flat)
        streams = [_encode_stream(dense_plan, code_symbols, chunk_symbols)]
        layout_code, header_index_bits, entries = _LAYOUT_DENSE, 0, int(flat.size)
    return _assemble_container(
        dtype=dtype,
        shape=tuple(int(d) for d in codes.shape),
        layout=layout_code,
        bits=bits,
        index_bits=header_index_bits,
        codebook=codebook,
        chunk_symbols=chunk_symbols,
        entries=entries,
        streams=streams,
    )


# ---------------------------------------------------------------------------- crafted containers
def _container_from_symbols(
    *,
    codebook: np.ndarray,
    shape: tuple[int, ...],
    bits: int,
    layout: str,
    code_symbols: np.ndarray,
    gap_symbols: np.ndarray | None = None,
    index_bits: int = 0,
    chunk_symbols: int = DEFAULT_CHUNK_SYMBOLS,
    code_mode: str | None = None,
    gap_mode: str | None = None,
    code_raw_width: int | None = None,
    gap_raw_width: int | None = None,
) -> bytes:
    """Write a container from explicit streams, optionally forcing each stream's mode.

    Performs no semantic validation (positions may pass the end, raw symbols may
    exceed the alphabet): used to build FORMAT.md's worked example and the
    invalid test vectors in tests/vectors/.
    """
    codebook = np.asarray(codebook)
    code_symbols = np.asarray(code_symbols, dtype=np.int64)
    alphabet = codebook.size + 1
    code_plan = _plan_stream(
        np.bincount(code_symbols, minlength=alphabet), alphabet, chunk_symbols, code_mode, code_raw_width
    )
    streams = [_encode_stream(code_plan, code_symbols, chunk_symbols)]
    if layout == "sparse":
        assert gap_symbols is not None
        gap_symbols = np.asarray(gap_symbols, dtype=np.int64)
        gap_plan = _plan_stream(
            np.bincount(gap_symbols, minlength=1 << index_bits), 1 << index_bits, chunk_symbols, gap_mode, gap_raw_width
        )
        streams.append(_encode_stream(gap_plan, gap_symbols, chunk_symbols))
    return _assemble_container(
        dtype=codebook.dtype,
        shape=tuple(shape),
        layout=_LAYOUT_SPARSE if layout == "sparse" else _LAYOUT_DENSE,
        bits=bits,
        index_bits=index_bits,
        codebook=codebook,
        chunk_symbols=chunk_symbols,
        entries=int(code_symbols.size),
        streams=streams,
    )
