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

Run ``python -m onnx_dc.container --example`` to print FORMAT.md's worked example.
"""

from __future__ import annotations

import struct
import sys
import zlib
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from onnx_dc import sparse
from onnx_dc.bitstream import pack_values, packed_size_bytes, padding_bits_are_zero, unpack_fixed_width
from onnx_dc.errors import ContainerError, InvalidTensorError, SettingsError
from onnx_dc.huffman import MAX_CODE_LENGTH, ChunkedStream, HuffmanCode, decode_chunked_streams

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
    index_bits = _check_int_setting("index_bits", index_bits, sparse.MIN_INDEX_BITS, sparse.MAX_INDEX_BITS)
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
        fillers = sparse.fillers_per_position(positions, index_bits)
        sparse_counts = dense_counts.copy()
        sparse_counts[zero_symbol] = int(fillers.sum())
        sparse_plans = (
            _plan_stream(sparse_counts, n_codes + 1, chunk_symbols),
            _plan_stream(sparse.gap_symbol_counts(positions, index_bits), 1 << index_bits, chunk_symbols),
        )
    use_sparse = sparse_plans is not None and (
        dense_plan is None or sparse_plans[0].size_bytes + sparse_plans[1].size_bytes < dense_plan.size_bytes
    )

    if use_sparse:
        assert sparse_plans is not None
        gaps, kept_entries = sparse.relative_indices(positions, index_bits)
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


# ---------------------------------------------------------------------------- parsing
def _as_bytes(data: bytes | bytearray | memoryview | np.ndarray) -> bytes:
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim != 1:
            raise ContainerError(f"container array must be 1-D uint8, got {data.dtype} of shape {data.shape}")
        return data.tobytes()
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise ContainerError(f"container must be bytes or a uint8 array, got {type(data).__name__}")


def _truncated(what: str, end: int, limit: int) -> ContainerError:
    return ContainerError(f"truncated container: the {what} ends at byte {end}, past the checksum at byte {limit}")


def _parse_stream_descriptor(
    raw: bytes, offset: int, limit: int, name: str, alphabet_size: int, entries: int, chunk_symbols: int
) -> tuple[StreamInfo, int]:
    """Parse and check one stream descriptor starting at ``offset``; returns (info, next offset)."""
    start = offset
    if offset + STREAM_DESCRIPTOR_FIXED_BYTES > limit:
        raise _truncated(f"{name} descriptor", offset + STREAM_DESCRIPTOR_FIXED_BYTES, limit)
    mode, raw_width, reserved, table_length = struct.unpack_from("<BBHI", raw, offset)
    offset += STREAM_DESCRIPTOR_FIXED_BYTES
    if mode not in _MODE_NAMES:
        raise ContainerError(f"{name}: unknown stream mode {mode} (0 = raw, 1 = Huffman)")
    if mode == _MODE_RAW:
        if not 1 <= raw_width <= MAX_RAW_WIDTH:
            raise ContainerError(f"{name}: raw width {raw_width} is outside 1..{MAX_RAW_WIDTH}")
    elif raw_width != 0:
        raise ContainerError(f"{name}: raw width must be 0 in Huffman mode, got {raw_width}")
    if reserved != 0:
        raise ContainerError(f"{name}: reserved field is {reserved}, must be 0")
    if mode == _MODE_RAW and table_length != 0:
        raise ContainerError(f"{name}: table length must be 0 in raw mode, got {table_length}")
    if mode == _MODE_HUFFMAN and not 1 <= table_length <= alphabet_size:
        raise ContainerError(f"{name}: table length {table_length} is outside 1..{alphabet_size} (the alphabet size)")
    table_size = packed_size_bytes(4 * table_length)
    if offset + table_size > limit:
        raise _truncated(f"{name} code-length table", offset + table_size, limit)
    code_lengths = np.zeros(0, dtype=np.uint8)
    huffman = None
    if mode == _MODE_HUFFMAN:
        packed = np.frombuffer(raw, dtype=np.uint8, count=table_size, offset=offset)
        nibbles = np.empty(2 * table_size, dtype=np.uint8)
        nibbles[0::2] = packed & 15
        nibbles[1::2] = packed >> 4
        if table_length & 1 and nibbles[-1] != 0:
            raise ContainerError(f"{name}: the unused high nibble of the last code-length byte is not 0")
        code_lengths = nibbles[:table_length]
        try:
            huffman = HuffmanCode.from_lengths(code_lengths)
        except ContainerError as error:
            raise ContainerError(f"{name}: {error}") from None
        min_length, max_length = huffman.min_length, huffman.max_length
    else:
        min_length = max_length = raw_width
    offset += table_size
    n_chunks = -(-entries // chunk_symbols)
    if offset + 4 * n_chunks > limit:  # checked before reading (n_chunks comes from untrusted fields)
        raise _truncated(f"{name} chunk table", offset + 4 * n_chunks, limit)
    chunk_bits = np.frombuffer(raw, dtype="<u4", count=n_chunks, offset=offset).astype(np.int64)
    offset += 4 * n_chunks
    if n_chunks:
        symbols_per_chunk = np.full(n_chunks, chunk_symbols, dtype=np.int64)
        symbols_per_chunk[-1] = entries - (n_chunks - 1) * chunk_symbols
        bad = np.flatnonzero(
            (chunk_bits < symbols_per_chunk * min_length) | (chunk_bits > symbols_per_chunk * max_length)
        )
        if bad.size:
            j = int(bad[0])
            raise ContainerError(
                f"{name}: chunk_bits[{j}] = {int(chunk_bits[j])} is out of range for {int(symbols_per_chunk[j])} "
                f"symbols of {min_length}..{max_length} bits"
            )
    info = StreamInfo(
        name=name,
        mode=_MODE_NAMES[mode],
        raw_width=raw_width,
        alphabet_size=alphabet_size,
        code_lengths=code_lengths,
        huffman=huffman,
        chunk_bits=chunk_bits,
        descriptor_offset=start,
        table_size_bytes=table_size,
        chunk_table_size_bytes=4 * n_chunks,
        payload_offset=-1,  # set once all descriptors are read
        payload_bits=int(chunk_bits.sum()),
    )
    return info, offset


def _parse(data: bytes | bytearray | memoryview | np.ndarray, max_elements: int | None) -> tuple[ContainerInfo, bytes]:
    """Validate everything up to the stream contents (FORMAT.md section 7, checks 1 to 31)."""
    raw = _as_bytes(data)
    size = len(raw)
    minimum = HEADER_SIZE_BYTES + CRC_SIZE_BYTES
    if size < minimum:
        raise ContainerError(f"truncated container: {size} bytes, a container has at least {minimum}")
    if raw[:4] != MAGIC:
        raise ContainerError(f"bad magic {raw[:4].hex(' ')}: not an onnx-dc container (expected 4f 44 43 54, 'ODCT')")
    version = raw[4]
    if version != FORMAT_VERSION:
        raise ContainerError(f"unsupported version {version}: this decoder reads container version {FORMAT_VERSION}")
    limit = size - CRC_SIZE_BYTES
    (stored_crc,) = struct.unpack_from("<I", raw, limit)
    computed_crc = zlib.crc32(memoryview(raw)[:limit])
    if stored_crc != computed_crc:
        raise ContainerError(
            f"checksum mismatch (stored {stored_crc:#010x}, computed {computed_crc:#010x}): "
            "the container is corrupted or truncated"
        )
    dtype_code, layout_code, bits, index_bits, ndim = raw[5:10]
    codebook_size, chunk_symbols, entries = struct.unpack_from("<HIQ", raw, 10)
    if dtype_code not in _CODE_TO_DTYPE:
        raise ContainerError(f"unsupported dtype code {dtype_code} (1 float32, 10 float16, 11 float64, 16 bfloat16)")
    dtype = _CODE_TO_DTYPE[dtype_code]
    if layout_code not in _LAYOUT_NAMES:
        raise ContainerError(f"unknown layout {layout_code} (0 dense, 1 sparse)")
    if not 1 <= bits <= MAX_BITS:
        raise ContainerError(f"weight bits {bits} is outside 1..{MAX_BITS}")
    if layout_code == _LAYOUT_SPARSE and not sparse.MIN_INDEX_BITS <= index_bits <= sparse.MAX_INDEX_BITS:
        raise ContainerError(f"index bits {index_bits} is outside {sparse.MIN_INDEX_BITS}..{sparse.MAX_INDEX_BITS}")
    if layout_code == _LAYOUT_DENSE and index_bits != 0:
        raise ContainerError(f"index bits must be 0 in the dense layout, got {index_bits}")
    if ndim > MAX_NDIM:
        raise ContainerError(f"ndim {ndim} exceeds the maximum of {MAX_NDIM}")
    if codebook_size > 1 << bits:
        raise ContainerError(f"codebook size {codebook_size} exceeds 2**bits = {1 << bits}")
    if chunk_symbols == 0:
        raise ContainerError("chunk size (chunk_symbols) is 0, must be at least 1")

    offset = HEADER_SIZE_BYTES
    if offset + 8 * ndim > limit:
        raise _truncated("dims field", offset + 8 * ndim, limit)
    shape = struct.unpack_from(f"<{ndim}Q", raw, offset)
    offset += 8 * ndim
    numel = _product(shape)
    # Zero dims excluded: numpy (like any array library) cannot represent (2**40, 2**40, 0) either.
    if _product(tuple(d for d in shape if d)) * dtype.itemsize > _INT64_MAX:
        raise ContainerError(f"shape overflow: dims {list(shape)} of {dtype.name} do not fit in 63 bits")
    if max_elements is not None and numel > max_elements:
        raise ContainerError(f"tensor of {numel} elements exceeds the limit of {max_elements} elements")
    if layout_code == _LAYOUT_DENSE and entries != numel:
        raise ContainerError(f"entries {entries} differ from the {numel} elements of a dense tensor")
    if layout_code == _LAYOUT_SPARSE and entries > numel:
        raise ContainerError(f"entries {entries} exceed the {numel} elements of the tensor")

    codebook_bytes = codebook_size * dtype.itemsize
    if offset + codebook_bytes > limit:
        raise _truncated("codebook", offset + codebook_bytes, limit)
    codebook = (
        np.frombuffer(raw, dtype=_BITS_DTYPE[dtype.itemsize], count=codebook_size, offset=offset)
        .astype(_BITS_DTYPE[dtype.itemsize].newbyteorder("="))
        .view(dtype)
    )
    offset += codebook_bytes
    if not np.all(np.isfinite(codebook)):
        raise ContainerError("codebook value is not finite (NaN or Inf)")

    code_stream, offset = _parse_stream_descriptor(
        raw, offset, limit, "code stream", codebook_size + 1, entries, chunk_symbols
    )
    gap_stream = None
    if layout_code == _LAYOUT_SPARSE:
        gap_stream, offset = _parse_stream_descriptor(
            raw, offset, limit, "gap stream", 1 << index_bits, entries, chunk_symbols
        )
    streams = []
    for stream in (code_stream, gap_stream):
        if stream is None:
            continue
        end = offset + stream.payload_size_bytes
        if end > limit:
            raise _truncated(f"{stream.name} payload", end, limit)
        payload = np.frombuffer(raw, dtype=np.uint8, count=stream.payload_size_bytes, offset=offset)
        if not padding_bits_are_zero(payload, stream.payload_bits):
            raise ContainerError(f"{stream.name}: padding bits after the last chunk are not zero")
        streams.append(_with_payload_offset(stream, offset))
        offset = end
    if offset != limit:
        raise ContainerError(
            f"trailing bytes: the container's parts end at byte {offset}, the checksum starts at {limit}"
        )
    info = ContainerInfo(
        dtype=dtype,
        shape=tuple(int(d) for d in shape),
        layout=_LAYOUT_NAMES[layout_code],
        bits=bits,
        index_bits=index_bits,
        codebook_size=codebook_size,
        chunk_symbols=chunk_symbols,
        entries=entries,
        size_bytes=size,
        codebook=codebook,
        code_stream=streams[0],
        gap_stream=streams[1] if len(streams) > 1 else None,
    )
    return info, raw


def _with_payload_offset(stream: StreamInfo, offset: int) -> StreamInfo:
    fields = dict(stream.__dict__)
    fields["payload_offset"] = offset
    return StreamInfo(**fields)


def read_container_info(
    data: bytes | bytearray | memoryview | np.ndarray, *, max_elements: int | None = None
) -> ContainerInfo:
    """Parse and validate a container without decoding its streams.

    Checks the magic, version, CRC, every header and descriptor field, and that
    the parts fill the container exactly (FORMAT.md section 7, up to the
    stream contents). ``max_elements`` (default: no limit) rejects tensors with
    more elements.

    Raises:
        ContainerError: the container is truncated, corrupted or invalid.
    """
    return _parse(data, max_elements)[0]


def _decode_raw_stream(stream: StreamInfo, raw: bytes, entries: int) -> np.ndarray:
    payload = np.frombuffer(raw, dtype=np.uint8, count=stream.payload_size_bytes, offset=stream.payload_offset)
    # Raw chunks hold exactly n_j * width bits each (checked), so the stream is one run.
    symbols = unpack_fixed_width(payload, stream.raw_width, entries)
    bad = np.flatnonzero(symbols >= stream.alphabet_size)
    if bad.size:
        raise ContainerError(
            f"{stream.name}: symbol {int(symbols[bad[0]])} at entry {int(bad[0])} is out of range "
            f"(alphabet size {stream.alphabet_size})"
        )
    return symbols


def _decode_streams(info: ContainerInfo, raw: bytes) -> list[np.ndarray]:
    """Decode the code stream and (sparse) the gap stream; errors in stream order (FORMAT.md section 7)."""
    streams = [info.code_stream] + ([info.gap_stream] if info.gap_stream is not None else [])
    decoded: list[np.ndarray | None] = [None] * len(streams)
    for k, stream in enumerate(streams):
        if decoded[k] is not None:
            continue
        if stream.mode == "raw":
            decoded[k] = _decode_raw_stream(stream, raw, info.entries)
            continue
        # All Huffman streams from here on share one lockstep loop (with at most two
        # streams, no raw stream lies between them, so error order is preserved).
        huffman = [(j, s) for j, s in enumerate(streams) if j >= k and s.mode == "huffman"]
        region_start = min(s.payload_offset for _, s in huffman)
        region_end = max(s.payload_offset + s.payload_size_bytes for _, s in huffman)
        region = np.frombuffer(raw, dtype=np.uint8, count=region_end - region_start, offset=region_start)
        chunked = [
            ChunkedStream(s.huffman, 8 * (s.payload_offset - region_start), s.chunk_bits, s.name)  # type: ignore[arg-type]
            for _, s in huffman
        ]
        for (j, _), symbols in zip(
            huffman, decode_chunked_streams(region, chunked, info.entries, info.chunk_symbols), strict=True
        ):
            decoded[j] = symbols
    return decoded  # type: ignore[return-value]


def decode_container_symbols(
    data: bytes | bytearray | memoryview | np.ndarray, *, max_elements: int | None = DEFAULT_MAX_ELEMENTS
) -> tuple[ContainerInfo, np.ndarray, np.ndarray | None]:
    """Decode a container's streams: ``(info, code_symbols, gap_symbols)``.

    ``code_symbols`` (integers, one per entry) use ``info.codebook_size`` as the zero
    symbol; ``gap_symbols`` is ``None`` for the dense layout. In the sparse layout
    the entries' positions are checked to lie inside the tensor.

    Raises:
        ContainerError: anything wrong with the container (FORMAT.md section 7).
    """
    info, raw = _parse(data, max_elements)
    decoded = _decode_streams(info, raw)
    code_symbols = decoded[0]
    gap_symbols = None
    if info.gap_stream is not None:
        gap_symbols = decoded[1]
        # Every entry advances >= 1, so the last position is the largest.
        last_position = int(gap_symbols.sum()) + info.entries - 1
        if info.entries and last_position >= info.numel:
            raise ContainerError(
                f"gap stream: entry position {last_position} is past the end of the tensor ({info.numel} elements)"
            )
    return info, code_symbols, gap_symbols


def _element_symbols(info: ContainerInfo, code_symbols: np.ndarray, gap_symbols: np.ndarray | None) -> np.ndarray:
    """Symbol of every element of the flattened tensor (zero symbol where nothing is stored)."""
    if gap_symbols is None:
        return code_symbols
    element_symbols = np.full(info.numel, info.codebook_size, dtype=np.int64)
    element_symbols[sparse.absolute_positions(gap_symbols)] = code_symbols
    return element_symbols


def decode_container(
    data: bytes | bytearray | memoryview | np.ndarray, *, max_elements: int = DEFAULT_MAX_ELEMENTS
) -> np.ndarray:
    """Decode a container into the dense tensor of its dtype and shape.

    Kept elements hold their codebook value; pruned elements and fillers are +0.0.

    Args:
        data: the container (``bytes`` or a 1-D ``uint8`` array).
        max_elements: refuse tensors with more elements than this (checked before
            anything of that size is allocated).

    Raises:
        ContainerError: truncated, corrupted, oversized, invalid or wrong-version
            input; the message names the problem.
    """
    info, code_symbols, gap_symbols = decode_container_symbols(data, max_elements=max_elements)
    bits_dtype = _BITS_DTYPE[info.dtype.itemsize].newbyteorder("=")
    values = np.zeros(info.codebook_size + 1, dtype=bits_dtype)  # last = zero symbol, +0.0
    values[: info.codebook_size] = info.codebook.view(bits_dtype)
    if gap_symbols is None:
        flat = values[code_symbols]
    else:
        flat = np.zeros(info.numel, dtype=bits_dtype)
        flat[sparse.absolute_positions(gap_symbols)] = values[code_symbols]
    return flat.view(info.dtype).reshape(info.shape)


def decode_container_codes(
    data: bytes | bytearray | memoryview | np.ndarray, *, max_elements: int = DEFAULT_MAX_ELEMENTS
) -> tuple[np.ndarray, np.ndarray]:
    """Decode a container into ``(codes, codebook)``.

    ``codes`` is an ``int16`` array of the tensor's shape: the codebook index of
    every element, ``-1`` where the element is zero (pruned or filler).

    Raises:
        ContainerError: as :func:`decode_container`.
    """
    info, code_symbols, gap_symbols = decode_container_symbols(data, max_elements=max_elements)
    symbols = _element_symbols(info, code_symbols, gap_symbols)
    codes = np.where(symbols == info.codebook_size, -1, symbols).astype(np.int16)
    return codes.reshape(info.shape), info.codebook.copy()


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


# ---------------------------------------------------------------------------- worked example
_EXAMPLE_TENSOR = [[1.0, 0.25, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.0, -0.5, 0.0, 1.0]]
_EXAMPLE_CODEBOOK = [-0.5, 0.25, 1.0]


def worked_example_container() -> bytes:
    """The container of FORMAT.md section 6: a 3x4 float32 tensor, sparse, 2-bit index field,
    chunks of 4 symbols, code stream Huffman-coded and gap stream raw (modes forced so both appear)."""
    tensor = np.array(_EXAMPLE_TENSOR, dtype=np.float32)
    codebook = np.array(_EXAMPLE_CODEBOOK, dtype=np.float32)
    flat = tensor.reshape(-1)
    positions = np.flatnonzero(flat)
    gaps, kept_entries = sparse.relative_indices(positions, 2)
    code_symbols = np.full(gaps.size, codebook.size, dtype=np.int64)
    code_symbols[kept_entries] = np.searchsorted(codebook, flat[positions])
    return _container_from_symbols(
        codebook=codebook,
        shape=tensor.shape,
        bits=2,
        layout="sparse",
        code_symbols=code_symbols,
        gap_symbols=gaps,
        index_bits=2,
        chunk_symbols=4,
        code_mode="huffman",
        gap_mode="raw",
    )


def _bits_of(payload: bytes, start: int, count: int) -> str:
    return "".join(str((payload[(start + i) >> 3] >> (7 - ((start + i) & 7))) & 1) for i in range(count))


def worked_example() -> str:
    """FORMAT.md section 6 (Markdown): the example container field by field and its decoding."""
    data = worked_example_container()
    info, code_symbols, gap_symbols = decode_container_symbols(data)
    assert gap_symbols is not None and info.gap_stream is not None
    tensor = decode_container(data)
    lines: list[str] = []
    out = lines.append

    def row(offset: int, size: int, field: str, meaning: str) -> None:
        out(f"| {offset} | `{data[offset : offset + size].hex(' ')}` | {field} | {meaning} |")

    out("The tensor (float32, shape 3x4; zeros are pruned weights):")
    out("")
    out("```")
    out(repr(np.array(_EXAMPLE_TENSOR, dtype=np.float32)))
    out("```")
    out("")
    out(
        f"Codebook `K = 3`: `{_EXAMPLE_CODEBOOK}` (bits = 2), so the zero symbol is 3. Sparse layout with "
        "`index_bits = 2` (an entry advances 1..4 elements) and `chunk_symbols = 4`. The kept elements are at "
        "flattened positions 0, 1, 3, 9, 11; the distance 6 from position 3 to 9 exceeds 4, so one filler "
        "entry (position 7) is inserted. The reference encoder would store this tiny tensor with both streams "
        "raw; the example forces the code stream to Huffman mode so both modes appear "
        "(`onnx_dc.container.worked_example_container`)."
    )
    out("")
    out("| entry | position | code symbol | gap symbol |")
    out("|---|---|---|---|")
    positions = sparse.absolute_positions(gap_symbols)
    for i in range(info.entries):
        note = " (filler)" if code_symbols[i] == info.codebook_size else ""
        out(f"| {i} | {positions[i]} | {code_symbols[i]}{note} | {gap_symbols[i]} |")
    out("")
    out(f"The container is {len(data)} bytes:")
    out("")
    out("```")
    for offset in range(0, len(data), 16):
        out(f"{offset:04x}  {data[offset : offset + 16].hex(' ')}")
    out("```")
    out("")
    out("| offset | bytes | field | value |")
    out("|---|---|---|---|")
    row(0, 4, "magic", "`ODCT`")
    row(4, 1, "version", "1")
    row(5, 1, "dtype", "1 = float32")
    row(6, 1, "layout", "1 = sparse")
    row(7, 1, "bits", "2")
    row(8, 1, "index_bits", "2")
    row(9, 1, "ndim", "2")
    row(10, 2, "codebook_size", "K = 3")
    row(12, 4, "chunk_symbols", "C = 4")
    row(16, 8, "entries", f"N = {info.entries}")
    offset = HEADER_SIZE_BYTES
    for d, dim in enumerate(info.shape):
        row(offset, 8, f"dims[{d}]", str(dim))
        offset += 8
    for k, value in enumerate(info.codebook):
        row(offset, 4, f"codebook[{k}]", f"{float(value)}")
        offset += 4
    code_lengths = [int(x) for x in info.code_stream.code_lengths]
    for stream in (info.code_stream, info.gap_stream):
        o = stream.descriptor_offset
        row(o, 1, f"{stream.name}: mode", "1 = Huffman" if stream.mode == "huffman" else "0 = raw")
        row(o + 1, 1, f"{stream.name}: raw_width", str(stream.raw_width))
        row(o + 2, 2, f"{stream.name}: reserved", "0")
        row(o + 4, 4, f"{stream.name}: table_length", str(stream.code_lengths.size))
        o += STREAM_DESCRIPTOR_FIXED_BYTES
        if stream.table_size_bytes:
            row(o, stream.table_size_bytes, f"{stream.name}: code lengths", f"symbols 0..3 have lengths {code_lengths}")
            o += stream.table_size_bytes
        for j, chunk in enumerate(stream.chunk_bits):
            row(o, 4, f"{stream.name}: chunk_bits[{j}]", str(int(chunk)))
            o += 4
    for stream in (info.code_stream, info.gap_stream):
        row(
            stream.payload_offset,
            stream.payload_size_bytes,
            f"{stream.name} payload",
            f"{stream.payload_bits} bits `{_bits_of(data, 8 * stream.payload_offset, stream.payload_bits)}`"
            f" + {8 * stream.payload_size_bytes - stream.payload_bits} zero padding bits",
        )
    row(len(data) - 4, 4, "crc32", f"`{zlib.crc32(data[:-4]):#010x}` over bytes 0..{len(data) - 5}")
    out("")
    assert info.code_stream.huffman is not None
    code = info.code_stream.huffman
    words = ", ".join(f"symbol {s}: `{int(code.codes[s]):0{int(code.lengths[s])}b}`" for s in range(code.alphabet_size))
    counts = [int(np.count_nonzero(code.lengths == n)) for n in range(code.max_length + 1)]
    next_code = [0, 0]
    for n in range(2, code.max_length + 1):
        next_code.append((next_code[-1] + counts[n - 1]) << 1)
    out(
        f"Decoding. The code lengths {code_lengths} give `count[1..{code.max_length}] = {counts[1:]}`, "
        f"`next[1..{code.max_length}] = {next_code[1:]}` and the canonical code words {words}."
    )
    start = info.code_stream.payload_offset * 8
    for j, chunk in enumerate(info.code_stream.chunk_bits):
        symbols = code_symbols[j * info.chunk_symbols : (j + 1) * info.chunk_symbols]
        out(
            f"Code chunk {j} is the {int(chunk)} bits `{_bits_of(data, start, int(chunk))}` -> symbols "
            f"{[int(s) for s in symbols]}."
        )
        start += int(chunk)
    out(
        f"The gap stream is raw, 2 bits per symbol: `{_bits_of(data, 8 * info.gap_stream.payload_offset, 12)}` -> "
        f"{[int(s) for s in gap_symbols]}. Positions `p[i] = p[i-1] + s[i] + 1` from `p[-1] = -1`: "
        f"{[int(p) for p in positions]}, all `< numel = 12`. Entry 3 carries the zero symbol: a filler."
    )
    out("")
    out("Decoded tensor (every element not at an entry's position, and the filler's, is +0.0):")
    out("")
    out("```")
    out(repr(tensor))
    out("```")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m onnx_dc.container --example`` prints FORMAT.md's worked example."""
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["--example"]:
        print("usage: python -m onnx_dc.container --example", file=sys.stderr)
        return 2
    print(worked_example())
    return 0


if __name__ == "__main__":
    sys.exit(main())
