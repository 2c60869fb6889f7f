"""Where a container's bytes go, and how close Huffman coding gets to the streams' entropy.

* :func:`container_size_breakdown` splits a container into its parts
  (header, dims, codebook, stream descriptors, Huffman tables, chunk tables,
  code payload, gap payload, CRC), counts the filler entries and the bytes
  they cost, and puts the zeroth-order Shannon entropy of each stream next to
  the bits actually used.
* :func:`weight_sharing_rate` is the paper's compression rate of weight sharing
  alone, ``r = n*b / (n*log2(k) + k*b)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from onnx_dc.codec.container import (
    CRC_SIZE_BYTES,
    DEFAULT_MAX_ELEMENTS,
    HEADER_SIZE_BYTES,
    STREAM_DESCRIPTOR_FIXED_BYTES,
    StreamInfo,
)
from onnx_dc.codec.container_reader import decode_container_symbols
from onnx_dc.errors import SettingsError


def shannon_entropy_bits(counts: np.ndarray) -> float:
    """Total zeroth-order entropy in bits of a stream with symbol histogram ``counts``: ``-sum c*log2(c/N)``."""
    counts = np.asarray(counts, dtype=np.float64)
    counts = counts[counts > 0]
    total = counts.sum()
    if total == 0:
        return 0.0
    return float(-(counts * np.log2(counts / total)).sum())


def weight_sharing_rate(n: int, bits_per_weight: float, k: int) -> float:
    """Compression rate of weight sharing: ``n*b / (n*log2(k) + k*b)`` (Han et al., 2016, eq. 1).

    ``n`` weights of ``bits_per_weight`` bits each are replaced by ``log2(k)``-bit
    cluster indices plus a codebook of ``k`` values of ``bits_per_weight`` bits.
    Paper examples: ``weight_sharing_rate(16, 32, 4) == 3.2`` and
    ``weight_sharing_rate(8, 32, 2) == 256/72``.

    Raises:
        SettingsError: ``n``, ``bits_per_weight`` or ``k`` is not positive.
    """
    if n <= 0 or bits_per_weight <= 0 or k <= 0:
        raise SettingsError(f"weight_sharing_rate needs n, bits_per_weight and k > 0, got {n}, {bits_per_weight}, {k}")
    return n * bits_per_weight / (n * math.log2(k) + k * bits_per_weight)


@dataclass(frozen=True)
class StreamAccounting:
    """Size of one stream: bits used against its entropy."""

    name: str
    mode: str
    symbols: int
    distinct_symbols: int
    entropy_bits: float
    bits_used: int

    @property
    def bits_per_symbol(self) -> float:
        """Average bits used per symbol (0 for an empty stream)."""
        return self.bits_used / self.symbols if self.symbols else 0.0

    @property
    def entropy_per_symbol(self) -> float:
        """Entropy per symbol in bits (0 for an empty stream)."""
        return self.entropy_bits / self.symbols if self.symbols else 0.0


@dataclass(frozen=True)
class SizeBreakdown:
    """Byte breakdown of one container. The ``*_bytes`` parts except ``filler_bytes`` sum to ``total_bytes``."""

    layout: str
    total_bytes: int
    header_bytes: int
    dims_bytes: int
    codebook_bytes: int
    descriptor_bytes: int
    huffman_table_bytes: int
    chunk_table_bytes: int
    code_payload_bytes: int
    gap_payload_bytes: int
    crc_bytes: int
    filler_bytes: float
    n_elements: int
    n_entries: int
    n_kept: int
    n_fillers: int
    code_stream: StreamAccounting
    gap_stream: StreamAccounting | None

    @property
    def parts(self) -> dict[str, int]:
        """The disjoint parts of the container, in file order, in bytes."""
        return {
            "header": self.header_bytes,
            "dims": self.dims_bytes,
            "codebook": self.codebook_bytes,
            "stream descriptors": self.descriptor_bytes,
            "Huffman tables": self.huffman_table_bytes,
            "chunk tables": self.chunk_table_bytes,
            "code payload": self.code_payload_bytes,
            "gap payload": self.gap_payload_bytes,
            "crc": self.crc_bytes,
        }

    @property
    def entropy_bound_bytes(self) -> float:
        """Streams at their entropy plus codebook, header and dims: what no stream coder can beat."""
        entropy = self.code_stream.entropy_bits + (self.gap_stream.entropy_bits if self.gap_stream else 0.0)
        return entropy / 8 + self.codebook_bytes + self.header_bytes + self.dims_bytes

    @property
    def overhead_vs_entropy(self) -> float:
        """``total_bytes / entropy_bound_bytes - 1`` (0 when the bound is 0)."""
        bound = self.entropy_bound_bytes
        return self.total_bytes / bound - 1.0 if bound else 0.0

    def format_table(self) -> str:
        """A printable table of the breakdown and the per-stream entropy comparison."""
        lines = [
            f"container: {self.total_bytes} bytes, {self.layout} layout, {self.n_elements} elements, "
            f"{self.n_kept} kept, {self.n_entries} entries ({self.n_fillers} fillers)"
        ]
        lines.append(f"  {'part':<22}{'bytes':>12}{'share':>9}")
        for name, size in self.parts.items():
            share = size / self.total_bytes if self.total_bytes else 0.0
            lines.append(f"  {name:<22}{size:>12}{share:>9.1%}")
        lines.append(f"  {'(of payloads: fillers)':<22}{self.filler_bytes:>12.1f}")
        lines.append(
            f"  {'stream':<8}{'mode':<9}{'symbols':>10}{'distinct':>10}{'entropy b/sym':>15}"
            f"{'used b/sym':>12}{'entropy B':>12}{'used B':>10}"
        )
        for stream in (self.code_stream, self.gap_stream):
            if stream is None:
                continue
            lines.append(
                f"  {stream.name:<8}{stream.mode:<9}{stream.symbols:>10}{stream.distinct_symbols:>10}"
                f"{stream.entropy_per_symbol:>15.4f}{stream.bits_per_symbol:>12.4f}"
                f"{stream.entropy_bits / 8:>12.1f}{stream.bits_used / 8:>10.1f}"
            )
        lines.append(
            f"  entropy bound (streams at entropy + codebook + header + dims): "
            f"{self.entropy_bound_bytes:.1f} bytes; container is {self.overhead_vs_entropy:+.2%} above it"
        )
        return "\n".join(lines)


def _stream_accounting(name: str, stream: StreamInfo, symbols: np.ndarray) -> StreamAccounting:
    counts = np.bincount(symbols, minlength=stream.alphabet_size)
    return StreamAccounting(
        name=name,
        mode=stream.mode,
        symbols=int(symbols.size),
        distinct_symbols=int(np.count_nonzero(counts)),
        entropy_bits=shannon_entropy_bits(counts),
        bits_used=stream.payload_bits,
    )


def _symbol_bits(stream: StreamInfo, symbol: int) -> int:
    if stream.mode == "raw":
        return stream.raw_width
    return int(stream.code_lengths[symbol]) if symbol < stream.code_lengths.size else 0


def container_size_breakdown(data: bytes | np.ndarray, *, max_elements: int = DEFAULT_MAX_ELEMENTS) -> SizeBreakdown:
    """Decode the streams of a container and account for every byte.

    Filler entries (sparse layout only) are entries with the zero symbol; their
    cost, ``filler_bytes``, is the bits of their code and gap symbols / 8 and is
    part of the two payloads.

    Raises:
        ContainerError: the container is invalid (as :func:`onnx_dc.codec.container_reader.decode_container`).
    """
    info, code_symbols, gap_symbols = decode_container_symbols(data, max_elements=max_elements)
    streams = [info.code_stream] + ([info.gap_stream] if info.gap_stream is not None else [])
    n_zero = int(np.count_nonzero(code_symbols == info.codebook_size))
    n_fillers = n_zero if info.layout == "sparse" else 0
    filler_bits = 0
    if info.gap_stream is not None and n_fillers:
        filler_bits = n_fillers * (
            _symbol_bits(info.code_stream, info.codebook_size)
            + _symbol_bits(info.gap_stream, (1 << info.index_bits) - 1)
        )
    return SizeBreakdown(
        layout=info.layout,
        total_bytes=info.size_bytes,
        header_bytes=HEADER_SIZE_BYTES,
        dims_bytes=info.dims_size_bytes,
        codebook_bytes=info.codebook_size_bytes,
        descriptor_bytes=STREAM_DESCRIPTOR_FIXED_BYTES * len(streams),
        huffman_table_bytes=sum(s.table_size_bytes for s in streams),
        chunk_table_bytes=sum(s.chunk_table_size_bytes for s in streams),
        code_payload_bytes=info.code_stream.payload_size_bytes,
        gap_payload_bytes=info.gap_stream.payload_size_bytes if info.gap_stream is not None else 0,
        crc_bytes=CRC_SIZE_BYTES,
        filler_bytes=filler_bits / 8,
        n_elements=info.numel,
        n_entries=info.entries,
        n_kept=info.entries - n_zero,
        n_fillers=n_fillers,
        code_stream=_stream_accounting("code", info.code_stream, code_symbols),
        gap_stream=_stream_accounting("gap", info.gap_stream, gap_symbols) if info.gap_stream is not None else None,
    )
