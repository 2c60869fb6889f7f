"""Reading containers: parsing and validating the header and streams, decoding tensors.

Every check of docs/FORMAT.md section 7 is made before anything is allocated
from the container's claims (a container is untrusted input); a violation is a
:class:`~onnx_dc.errors.ContainerError` whose message starts with the
section's keyword (``checksum``, ``truncated``, ``invalid code word``...).
:func:`decode_container` gives the dense tensor, :func:`decode_container_codes`
the codebook indices and the codebook, :func:`read_container_info` the header
alone.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

from onnx_dc.codec import relative_indices
from onnx_dc.codec.bitstream import packed_size_bytes, padding_bits_are_zero, unpack_fixed_width
from onnx_dc.codec.container import (
    _BITS_DTYPE,
    _CODE_TO_DTYPE,
    _INT64_MAX,
    _LAYOUT_DENSE,
    _LAYOUT_NAMES,
    _LAYOUT_SPARSE,
    _MODE_HUFFMAN,
    _MODE_NAMES,
    _MODE_RAW,
    CRC_SIZE_BYTES,
    DEFAULT_MAX_ELEMENTS,
    FORMAT_VERSION,
    HEADER_SIZE_BYTES,
    MAGIC,
    MAX_BITS,
    MAX_NDIM,
    MAX_RAW_WIDTH,
    STREAM_DESCRIPTOR_FIXED_BYTES,
    ContainerInfo,
    StreamInfo,
    _product,
)
from onnx_dc.codec.huffman import ChunkedStream, HuffmanCode, decode_chunked_streams
from onnx_dc.errors import ContainerError


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
    if layout_code == _LAYOUT_SPARSE and not relative_indices.MIN_INDEX_BITS <= index_bits <= relative_indices.MAX_INDEX_BITS:
        raise ContainerError(f"index bits {index_bits} is outside {relative_indices.MIN_INDEX_BITS}..{relative_indices.MAX_INDEX_BITS}")
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
    element_symbols[relative_indices.absolute_positions(gap_symbols)] = code_symbols
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
        flat[relative_indices.absolute_positions(gap_symbols)] = values[code_symbols]
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
