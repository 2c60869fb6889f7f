"""Encoding a container in blocks: the bytes of :func:`~onnx_dc.codec.container.encode_container`
in memory proportional to the output, not to the tensor.

:func:`encode_container` builds its streams from whole-tensor ``int64``
arrays (positions, distances, fillers, gap and code symbols: about 50 bytes per
weight of a large sparse tensor). :func:`encode_symbols` takes the code of every
element as one compact array (``uint8`` or ``uint16``, the zero symbol ``K``
for pruned elements) and makes two passes over it, :data:`BLOCK` elements at a
time: the first counts the symbols (which fixes each stream's mode, Huffman
code and size, hence the layout), the second produces the entries of the
chosen layout block by block and packs them, chunk-aligned, into payloads
whose bits are concatenated. The result is byte-identical to
``encode_container(codes, codebook, ...)`` with ``codes = symbols`` where
``symbols < K`` and ``-1`` elsewhere (``tests/test_container_stream.py``).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import numpy as np

from onnx_dc.codec import relative_indices
from onnx_dc.codec.bitstream import pack_values
from onnx_dc.codec.container import (
    _LAYOUT_DENSE,
    _LAYOUT_SPARSE,
    _MODE_RAW,
    DEFAULT_CHUNK_SYMBOLS,
    LAYOUTS,
    MAX_BITS,
    MAX_CHUNK_SYMBOLS,
    MAX_NDIM,
    _assemble_container,
    _check_codebook,
    _check_int_setting,
    _pack_nibbles,
    _plan_stream,
    _StreamPlan,
)
from onnx_dc.errors import InvalidTensorError, SettingsError

__all__ = ["BLOCK", "encode_symbols"]

#: Elements per block of both passes.
BLOCK = 1 << 20


def encode_symbols(
    symbols: np.ndarray,
    shape: tuple[int, ...],
    codebook: np.ndarray,
    *,
    bits: int,
    index_bits: int,
    layout: str = "auto",
    chunk_symbols: int = DEFAULT_CHUNK_SYMBOLS,
    counts: np.ndarray | None = None,
) -> bytes:
    """The container of a tensor given the code symbol of every element (row-major).

    Args:
        symbols: 1-D ``uint8``/``uint16`` array of ``prod(shape)`` symbols: ``0..K-1`` the
            codebook index of a kept element, ``K = len(codebook)`` a pruned (zero) element.
        shape: the tensor's shape (0 to 8 dims).
        codebook, bits, index_bits, layout, chunk_symbols: as for
            :func:`onnx_dc.codec.container.encode_container`.
        counts: ``numpy.bincount(symbols, minlength=K + 1)`` when the caller has it (saves a pass).

    Returns:
        The container bytes, identical to ``encode_container``'s for the same codes.

    Raises:
        SettingsError, InvalidTensorError: as ``encode_container``.
    """
    bits = _check_int_setting("bits", bits, 1, MAX_BITS)
    index_bits = _check_int_setting(
        "index_bits", index_bits, relative_indices.MIN_INDEX_BITS, relative_indices.MAX_INDEX_BITS
    )
    chunk_symbols = _check_int_setting("chunk_symbols", chunk_symbols, 1, MAX_CHUNK_SYMBOLS)
    if layout not in LAYOUTS:
        raise SettingsError(f"unknown layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    codebook = _check_codebook(codebook, bits)
    shape = tuple(int(d) for d in shape)
    if len(shape) > MAX_NDIM:
        raise InvalidTensorError(f"tensor has {len(shape)} dimensions, the container supports at most {MAX_NDIM}")
    symbols = np.asarray(symbols).reshape(-1)
    if symbols.dtype not in (np.uint8, np.uint16) or symbols.size != int(np.prod(shape, dtype=np.int64)):
        raise InvalidTensorError(f"symbols must be {int(np.prod(shape))} uint8/uint16 values, got {symbols.dtype} x {symbols.size}")
    zero = codebook.size
    if counts is None or len(counts) != zero + 1:
        counts = _count(symbols, zero)  # dense counts: codes, then the zero symbol last
    counts = np.asarray(counts, dtype=np.int64)
    n_pruned = int(counts[zero])

    dense_plan = _plan_stream(counts, zero + 1, chunk_symbols) if layout in ("auto", "dense") else None
    sparse_plans = None
    if layout == "sparse" or (layout == "auto" and n_pruned > 0):
        n_fillers, gap_counts = _sparse_counts(symbols, zero, index_bits)
        sparse_counts = counts.copy()
        sparse_counts[zero] = n_fillers
        sparse_plans = (
            _plan_stream(sparse_counts, zero + 1, chunk_symbols),
            _plan_stream(gap_counts, 1 << index_bits, chunk_symbols),
        )
    use_sparse = sparse_plans is not None and (
        dense_plan is None or sparse_plans[0].size_bytes + sparse_plans[1].size_bytes < dense_plan.size_bytes
    )
    if use_sparse:
        assert sparse_plans is not None
        code_stream, gap_stream = _StreamWriter(sparse_plans[0], chunk_symbols), _StreamWriter(sparse_plans[1], chunk_symbols)
        for code_symbols, gaps in _sparse_entries(symbols, zero, index_bits):
            code_stream.add(code_symbols)
            gap_stream.add(gaps)
        streams = [code_stream.finish(), gap_stream.finish()]
        layout_code, header_index_bits, entries = _LAYOUT_SPARSE, index_bits, code_stream.n_symbols
    else:
        assert dense_plan is not None
        code_stream = _StreamWriter(dense_plan, chunk_symbols)
        for start in range(0, symbols.size, BLOCK):
            code_stream.add(symbols[start : start + BLOCK])
        streams = [code_stream.finish()]
        layout_code, header_index_bits, entries = _LAYOUT_DENSE, 0, int(symbols.size)
    header = {"dtype": codebook.dtype, "shape": shape, "bits": bits, "codebook": codebook, "chunk_symbols": chunk_symbols}
    return _assemble_container(**header, layout=layout_code, index_bits=header_index_bits, entries=entries, streams=streams)


def _count(symbols: np.ndarray, zero: int) -> np.ndarray:
    counts = np.zeros(zero + 1, dtype=np.int64)
    for start in range(0, symbols.size, BLOCK):
        block = symbols[start : start + BLOCK]
        if block.size and int(block.max()) > zero:
            raise InvalidTensorError(f"symbols must lie in 0..{zero} for a codebook of {zero} values")
        counts += np.bincount(block, minlength=zero + 1)
    return counts


def _kept_distances(symbols: np.ndarray, zero: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Per block: (block start, local positions of kept elements, distance of each from the previous kept one)."""
    previous = -1
    for start in range(0, symbols.size, BLOCK):
        local = np.flatnonzero(symbols[start : start + BLOCK] != zero)
        if not local.size:
            continue
        positions = local + start
        distances = np.empty(positions.size, dtype=np.int64)
        distances[0] = positions[0] - previous
        np.subtract(positions[1:], positions[:-1], out=distances[1:])
        previous = int(positions[-1])
        yield start, local, distances


def _sparse_counts(symbols: np.ndarray, zero: int, index_bits: int) -> tuple[int, np.ndarray]:
    """(number of filler entries, histogram of the gap stream) of the sparse layout."""
    mask = (1 << index_bits) - 1
    gap_counts = np.zeros(1 << index_bits, dtype=np.int64)
    n_fillers = 0
    for _, _, distances in _kept_distances(symbols, zero):
        distances -= 1
        n_fillers += int((distances >> index_bits).sum())
        gap_counts += np.bincount(distances & mask, minlength=1 << index_bits)
    gap_counts[-1] += n_fillers
    return n_fillers, gap_counts


def _sparse_entries(symbols: np.ndarray, zero: int, index_bits: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Per block: the code symbols and gap symbols of the sparse layout's entries (fillers included)."""
    mask = (1 << index_bits) - 1
    entry_dtype = np.uint16
    for start, local, distances in _kept_distances(symbols, zero):
        distances -= 1
        kept_entries = np.cumsum((distances >> index_bits) + 1)
        kept_entries -= 1
        n_entries = int(kept_entries[-1]) + 1
        code_symbols = np.full(n_entries, zero, dtype=entry_dtype)
        code_symbols[kept_entries] = symbols[start + local]
        gaps = np.full(n_entries, mask, dtype=entry_dtype)
        gaps[kept_entries] = distances & mask
        yield code_symbols, gaps


class _StreamWriter:
    """Packs one stream from consecutive symbol blocks of any size, as ``_encode_stream`` packs it whole."""

    def __init__(self, plan: _StreamPlan, chunk_symbols: int) -> None:
        self.plan = plan
        self.chunk_symbols = chunk_symbols
        self.batch = chunk_symbols * max(1, BLOCK // chunk_symbols)  # whole chunks per packing call
        self.pending: list[np.ndarray] = []
        self.n_pending = 0
        self.n_symbols = 0
        self.bits = _BitConcatenation()
        self.chunk_bits: list[np.ndarray] = []

    def add(self, symbols: np.ndarray) -> None:
        """Append symbols to the stream."""
        self.pending.append(symbols)
        self.n_pending += symbols.size
        self.n_symbols += symbols.size
        if self.n_pending >= self.batch:
            self._flush(final=False)

    def _flush(self, *, final: bool) -> None:
        joined = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        cut = joined.size if final else joined.size - joined.size % self.batch
        for begin in range(0, cut, self.batch):
            self._pack(joined[begin : min(begin + self.batch, cut)])
        rest = joined[cut:]
        self.pending = [rest] if rest.size else []
        self.n_pending = rest.size

    def _pack(self, block: np.ndarray) -> None:
        if self.plan.mode == _MODE_RAW:
            payload, n_bits = pack_values(block, self.plan.raw_width)
        else:
            assert self.plan.huffman is not None
            payload, chunk_bits = self.plan.huffman.encode_chunks(block, self.chunk_symbols)
            n_bits = int(chunk_bits.sum())
            self.chunk_bits.append(chunk_bits)
        self.bits.add(payload, n_bits)

    def finish(self) -> tuple[bytes, bytes]:
        """(descriptor bytes, payload bytes), as ``onnx_dc.codec.container._encode_stream`` returns them."""
        if self.pending:
            self._flush(final=True)
        plan = self.plan
        if plan.mode == _MODE_RAW:
            n_chunks = -(-self.n_symbols // self.chunk_symbols)
            chunk_bits = np.full(n_chunks, self.chunk_symbols * plan.raw_width, dtype=np.int64)
            if n_chunks:
                chunk_bits[-1] = (self.n_symbols - (n_chunks - 1) * self.chunk_symbols) * plan.raw_width
            table = b""
        else:
            assert plan.huffman is not None
            chunk_bits = np.concatenate(self.chunk_bits) if self.chunk_bits else np.zeros(0, dtype=np.int64)
            table = _pack_nibbles(plan.huffman.lengths[: plan.table_length])
        assert self.bits.n_bits == plan.payload_bits
        descriptor = (
            struct.pack("<BBHI", plan.mode, plan.raw_width, 0, plan.table_length)
            + table
            + np.asarray(chunk_bits, dtype="<u4").tobytes()
        )
        return descriptor, self.bits.finish()


class _BitConcatenation:
    """Concatenates MSB-first bit strings (``(payload, n_bits)`` pieces with zero padding) into bytes."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.tail = 0  # the last, incomplete byte (its first tail_bits bits used)
        self.tail_bits = 0
        self.n_bits = 0

    def add(self, payload: np.ndarray, n_bits: int) -> None:
        """Append the first ``n_bits`` bits of ``payload``."""
        if n_bits == 0:
            return
        payload = np.asarray(payload, dtype=np.uint8)[: -(-n_bits // 8)]
        shift = self.tail_bits
        if shift:
            shifted = np.empty(payload.size + 1, dtype=np.uint8)
            shifted[0] = self.tail | (int(payload[0]) >> shift)
            np.bitwise_or(payload[:-1] << np.uint8(8 - shift), payload[1:] >> np.uint8(shift), out=shifted[1:-1])
            shifted[-1] = (int(payload[-1]) << (8 - shift)) & 0xFF
            payload = shifted
        total = shift + n_bits
        self.parts.append(payload[: total // 8].tobytes())
        self.tail_bits = total % 8
        self.tail = int(payload[total // 8]) if self.tail_bits else 0
        self.n_bits += n_bits

    def finish(self) -> bytes:
        """All bits, zero-padded to whole bytes."""
        return b"".join(self.parts) + (bytes([self.tail]) if self.tail_bits else b"")

