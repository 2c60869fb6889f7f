"""Canonical, length-limited Huffman codes (docs/FORMAT.md section 4.1).

A :class:`HuffmanCode` is fully described by its code lengths (one per symbol,
0 = symbol absent); code words follow the DEFLATE canonical construction and
are written most significant bit first.

* :meth:`HuffmanCode.from_frequencies` builds an optimal code whose lengths do
  not exceed a limit (package-merge, vectorised per level).
* :meth:`HuffmanCode.from_lengths` rebuilds the code from stored lengths and
  rejects length sets that are not a prefix code (:class:`ContainerError`).
* :meth:`HuffmanCode.encode` packs a symbol array with whole-array numpy operations.
* :meth:`HuffmanCode.decode_chunks` decodes a stream cut into chunks of
  ``chunk_symbols`` symbols with a lookup table, all chunks in lockstep: the
  Python loop runs over the symbol index within a chunk, every step decodes
  one symbol of every chunk at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from onnx_dc.codec.bitstream import byte_windows, pack_symbols, pack_symbols_chunked
from onnx_dc.errors import ContainerError, InvalidTensorError, SettingsError

#: Longest code word the container format allows (4-bit length fields).
MAX_CODE_LENGTH = 15

# Decoding-table entries pack (symbol << _LENGTH_BITS) | length.
_LENGTH_BITS = 4
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1


def default_length_limit(n_used_symbols: int) -> int:
    """Code-length limit of the reference encoder: 12 bits, or 15 above 4096 used symbols.

    A 12-bit limit keeps the decoding table at 4096 entries; 4096 symbols need
    at least 12 bits, so larger alphabets get the format's maximum, 15.
    """
    return 12 if n_used_symbols <= 4096 else MAX_CODE_LENGTH


def kraft_sum_exceeds_one(lengths: np.ndarray) -> bool:
    """True if the nonzero ``lengths`` (each 1..15) cannot be a prefix code."""
    lengths = np.asarray(lengths, dtype=np.int64)
    used = lengths[lengths > 0]
    return int(np.sum(np.left_shift(1, MAX_CODE_LENGTH - used))) > (1 << MAX_CODE_LENGTH)


def _package_merge(weights: np.ndarray, limit: int) -> np.ndarray:
    """Optimal code lengths (<= ``limit``) for ascending positive ``weights``.

    Package-merge (Larmore and Hirschberg). Every level's list is the sorted
    merge of the leaves with the pairwise "packages" of the level below; the
    items chosen at each level always form a prefix of its list, and the
    leaves inside a prefix are the lightest symbols, so a symbol's length is
    the number of levels whose chosen prefix contains it.
    """
    n = weights.size
    if n == 1:
        return np.ones(1, dtype=np.int64)
    leaf_flags_per_level = [np.ones(n, dtype=bool)]  # deepest level: leaves only
    items = weights
    for _ in range(limit - 1):
        n_pairs = items.size // 2
        packages = items[0 : 2 * n_pairs : 2] + items[1 : 2 * n_pairs : 2]
        merged = np.concatenate([weights, packages])
        order = np.argsort(merged, kind="stable")  # leaves before packages on ties
        items = merged[order]
        leaf_flags_per_level.append(order < n)
    lengths = np.zeros(n, dtype=np.int64)
    n_chosen = 2 * n - 2
    for leaf_flags in reversed(leaf_flags_per_level):  # top level first
        n_leaves = int(np.count_nonzero(leaf_flags[:n_chosen]))
        lengths[:n_leaves] += 1
        n_chosen = 2 * (n_chosen - n_leaves)
        if n_chosen == 0:
            break
    return lengths


class HuffmanCode:
    """A canonical prefix code over symbols ``0 .. alphabet_size - 1``.

    Attributes:
        lengths: ``uint8`` array, code length of every symbol (0 = absent, else 1..15).
        codes: ``uint32`` array, the canonical code word of every symbol (0 if absent).
    """

    __slots__ = ("lengths", "codes", "_table", "_table_bits")

    def __init__(self, lengths: np.ndarray, codes: np.ndarray) -> None:
        """Use :meth:`from_lengths` or :meth:`from_frequencies`; this does not validate."""
        self.lengths = lengths
        self.codes = codes
        self._table: np.ndarray | None = None
        self._table_bits = 0

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_lengths(cls, lengths: np.ndarray) -> HuffmanCode:
        """Rebuild the canonical code from code lengths (FORMAT.md section 4.1).

        Raises:
            ContainerError: a length is outside 0..15, no symbol has a code, or
                the lengths are oversubscribed (Kraft sum above 1).
        """
        lengths = np.asarray(lengths)
        if lengths.ndim != 1 or not np.issubdtype(lengths.dtype, np.integer):
            raise ContainerError("Huffman code lengths must be a 1-D integer array")
        lengths64 = lengths.astype(np.int64)
        if lengths64.size and (lengths64.min() < 0 or lengths64.max() > MAX_CODE_LENGTH):
            raise ContainerError(f"Huffman code length outside 0..{MAX_CODE_LENGTH}")
        if not np.any(lengths64):
            raise ContainerError("Huffman table is an empty code: every code length is zero")
        if kraft_sum_exceeds_one(lengths64):
            raise ContainerError("Huffman code lengths are oversubscribed (Kraft sum above 1)")
        return cls(lengths64.astype(np.uint8), _canonical_codes(lengths64))

    @classmethod
    def from_frequencies(cls, frequencies: np.ndarray, *, max_length: int | None = None) -> HuffmanCode:
        """Optimal canonical code for the symbol counts ``frequencies``.

        Symbols with frequency 0 get no code. With a single used symbol its
        code is ``0`` (length 1).

        Args:
            frequencies: 1-D array of non-negative integer counts, one per symbol;
                at least one must be positive.
            max_length: longest allowed code (1..15); default
                :func:`default_length_limit` of the number of used symbols.

        Raises:
            InvalidTensorError: the frequencies are not non-negative integers or all zero.
            SettingsError: ``max_length`` is out of range, or more symbols are used
                than ``2**max_length`` (no prefix code fits).
        """
        freqs = np.asarray(frequencies)
        if freqs.ndim != 1 or not (np.issubdtype(freqs.dtype, np.integer) or freqs.size == 0):
            raise InvalidTensorError("symbol frequencies must be a 1-D integer array")
        freqs = freqs.astype(np.int64)
        if freqs.size and freqs.min() < 0:
            raise InvalidTensorError("symbol frequencies must be non-negative")
        used = np.flatnonzero(freqs)
        if used.size == 0:
            raise InvalidTensorError("cannot build a Huffman code: no symbol has a nonzero frequency")
        limit = default_length_limit(used.size) if max_length is None else max_length
        if not isinstance(limit, (int, np.integer)) or not 1 <= limit <= MAX_CODE_LENGTH:
            raise SettingsError(f"Huffman length limit {limit!r} is outside 1..{MAX_CODE_LENGTH}")
        if used.size > (1 << int(limit)):
            raise SettingsError(f"{used.size} symbols do not fit a prefix code with lengths <= {limit}")
        order = np.argsort(freqs[used], kind="stable")
        lengths64 = np.zeros(freqs.size, dtype=np.int64)
        lengths64[used[order]] = _package_merge(freqs[used][order], int(limit))
        return cls(lengths64.astype(np.uint8), _canonical_codes(lengths64))

    # ------------------------------------------------------------------ properties
    @property
    def alphabet_size(self) -> int:
        """Number of symbols the code is defined over (``len(lengths)``)."""
        return int(self.lengths.size)

    @property
    def min_length(self) -> int:
        """Shortest nonzero code length."""
        return int(self.lengths[self.lengths > 0].min())

    @property
    def max_length(self) -> int:
        """Longest code length."""
        return int(self.lengths.max())

    def encoded_bits(self, counts: np.ndarray) -> int:
        """Bits needed for a stream with ``counts[s]`` occurrences of symbol ``s``."""
        counts = np.asarray(counts, dtype=np.int64)
        n = min(counts.size, self.lengths.size)
        if np.any(counts[n:]) or np.any(counts[:n][self.lengths[:n] == 0]):
            raise InvalidTensorError("counts include a symbol that has no code")
        return int(np.dot(counts[:n], self.lengths[:n].astype(np.int64)))

    # ------------------------------------------------------------------ encoding
    def encode(self, symbols: np.ndarray) -> tuple[np.ndarray, int]:
        """Concatenated code words of ``symbols`` (MSB first).

        Returns ``(payload, n_bits)`` as :func:`onnx_dc.codec.bitstream.pack_values`.

        Raises:
            InvalidTensorError: a symbol is outside the alphabet or has no code.
        """
        symbols = self._checked(symbols)
        try:
            return pack_symbols(symbols, self.codes, self.lengths)
        except ValueError:
            raise InvalidTensorError("symbol without a Huffman code") from None

    def encode_chunks(self, symbols: np.ndarray, chunk_symbols: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`encode`, returning ``(payload, chunk_bits)``: the bit length of every
        chunk of ``chunk_symbols`` consecutive symbols (``int64``)."""
        symbols = self._checked(symbols)
        try:
            return pack_symbols_chunked(symbols, self.codes, self.lengths, chunk_symbols)
        except ValueError:
            raise InvalidTensorError("symbol without a Huffman code") from None

    def _checked(self, symbols: np.ndarray) -> np.ndarray:
        symbols = np.asarray(symbols).reshape(-1)
        if symbols.size and (symbols.min() < 0 or symbols.max() >= self.alphabet_size):
            raise InvalidTensorError("symbol outside the Huffman code's alphabet")
        return symbols

    # ------------------------------------------------------------------ decoding
    def decoding_table(self) -> tuple[np.ndarray, int]:
        """Lookup table for the next ``max_length`` bits of a stream.

        Returns ``(table, table_bits)``; ``table[v]`` is
        ``(symbol << 4) | length`` of the code word that prefixes the
        ``table_bits``-bit value ``v``, or ``alphabet_size << 4`` (length 0) if
        ``v`` starts with no code word (incomplete codes).
        """
        if self._table is None:
            bits = self.max_length
            lengths = self.lengths.astype(np.int64)
            present = np.flatnonzero(lengths)
            # Canonical order (length, then symbol) is also ascending order of
            # the left-aligned code words, so the ranges tile [0, covered).
            order = present[np.argsort(lengths[present], kind="stable")]
            span = np.left_shift(1, bits - lengths[order])
            covered = int(span.sum())
            table = np.full(1 << bits, self.alphabet_size << _LENGTH_BITS, dtype=np.int32)
            table[:covered] = np.repeat((order << _LENGTH_BITS) | lengths[order], span)
            self._table, self._table_bits = table, bits
        return self._table, self._table_bits

    def decode_chunks(
        self, payload: np.ndarray, chunk_bits: np.ndarray, n_symbols: int, chunk_symbols: int
    ) -> np.ndarray:
        """Decode a stream of ``n_symbols`` symbols cut into chunks of ``chunk_symbols``.

        Chunk ``j`` holds symbols ``j*chunk_symbols .. min((j+1)*chunk_symbols, n_symbols) - 1``
        and occupies ``chunk_bits[j]`` bits, the chunks following each other in
        ``payload`` from bit 0 without padding. All chunks are decoded in lockstep;
        see :func:`decode_chunked_streams`, which this calls with one stream.

        Returns:
            ``int32`` array of ``n_symbols`` symbols.

        Raises:
            ContainerError: as :func:`decode_chunked_streams`.
        """
        return decode_chunked_streams(payload, [ChunkedStream(self, 0, chunk_bits)], n_symbols, chunk_symbols)[0]


@dataclass(frozen=True, eq=False)
class ChunkedStream:
    """A Huffman-coded stream stored in a byte buffer: its code, the bit at which
    its chunk 0 starts, and the bit length of each chunk (chunks are contiguous)."""

    code: HuffmanCode
    first_bit: int
    chunk_bits: np.ndarray
    name: str = "stream"


def decode_chunked_streams(
    buffer: np.ndarray, streams: Sequence[ChunkedStream], n_symbols: int, chunk_symbols: int
) -> list[np.ndarray]:
    """Decode Huffman streams that share one chunking, every chunk of every stream in lockstep.

    Each stream holds ``n_symbols`` symbols in chunks of ``chunk_symbols``
    (the last chunk may be shorter). The Python loop runs over the symbol
    index inside a chunk; each step decodes one symbol of every chunk of every
    stream with whole-array operations (one table lookup on the next
    ``max_length`` bits). The container's code and gap streams are decoded in
    one loop this way.

    The caller must have checked that every stream has ``ceil(n_symbols / chunk_symbols)``
    chunks lying inside ``buffer``. Look-ahead past the end of ``buffer`` (and,
    for corrupted input, any position) reads zero bits or is clamped, never fails.

    Returns:
        One ``int32`` symbol array per stream.

    Raises:
        ContainerError: for the first stream (in the given order) that has a chunk
            containing a bit pattern that is no code word, or a chunk that does not end
            exactly after its ``chunk_bits``; the message starts with the stream's name.
    """
    if n_symbols == 0 or not streams:
        return [np.zeros(0, dtype=np.int32) for _ in streams]
    n_streams = len(streams)
    n_chunks = -(-n_symbols // chunk_symbols)
    steps = min(chunk_symbols, n_symbols)
    last_count = n_symbols - (n_chunks - 1) * chunk_symbols
    table_bits = max(stream.code.max_length for stream in streams)
    tables, starts = [], []
    for stream in streams:
        table, bits = stream.code.decoding_table()
        tables.append(np.repeat(table, 1 << (table_bits - bits)))  # same lookup on more bits
        chunk_bits = np.asarray(stream.chunk_bits, dtype=np.int64)
        if chunk_bits.size != n_chunks:
            raise ValueError(f"{stream.name}: {chunk_bits.size} chunk sizes for {n_chunks} chunks")
        stream_starts = np.empty(n_chunks, dtype=np.int64)
        stream_starts[0] = stream.first_bit
        np.cumsum(chunk_bits[:-1], out=stream_starts[1:])
        stream_starts[1:] += stream.first_bit
        starts.append(stream_starts)
    table = np.concatenate(tables)
    # Lanes: the full chunks of every stream, then the last chunk of every stream,
    # so the lanes still running after the short last chunks end form a prefix.
    lane_starts = np.concatenate([s[:-1] for s in starts] + [s[-1:] for s in starts])
    lane_offsets = np.concatenate(
        [np.full(n_chunks - 1, k << table_bits, dtype=np.int64) for k in range(n_streams)]
        + [np.array([k << table_bits for k in range(n_streams)], dtype=np.int64)]
    )
    windows = byte_windows(buffer)
    lane_counts = np.full(lane_starts.size, steps, dtype=np.int64)
    lane_counts[lane_starts.size - n_streams :] = last_count
    decoded = None
    if _prefer_doubling(starts, streams, steps, lane_starts.size):
        regions = [(int(s[0]), int(s[0]) + int(np.sum(stream.chunk_bits, dtype=np.int64))) for s, stream in zip(starts, streams)]
        lane_regions = np.array([regions[k] for k in range(n_streams) for _ in range(n_chunks - 1)] + regions, dtype=np.int64)
        decoded = _decode_by_doubling(windows, table, table_bits, lane_starts, lane_offsets, lane_counts, lane_regions)
    if decoded is None:
        decoded = _decode_in_lockstep(windows, table, table_bits, lane_starts, lane_offsets, steps, last_count, n_streams)
    entries, position = decoded
    n_lanes = lane_starts.size

    results = []
    full = n_chunks - 1
    for k, stream in enumerate(streams):
        symbols = np.empty(n_symbols, dtype=np.int32)
        symbols[: full * steps] = entries[:, k * full : (k + 1) * full].T.reshape(-1)
        symbols[full * steps :] = entries[:last_count, n_lanes - n_streams + k]
        symbols >>= _LENGTH_BITS
        alphabet_size = stream.code.alphabet_size
        if symbols.max() == alphabet_size:  # the marker of a bit pattern with no code word
            bad_chunk = int(np.argmax(symbols == alphabet_size)) // chunk_symbols
            raise ContainerError(
                f"{stream.name}: invalid code word in chunk {bad_chunk}: the bits match no Huffman code"
            )
        stream_end = np.append(position[k * full : (k + 1) * full], position[n_lanes - n_streams + k])
        chunk_bits = np.asarray(stream.chunk_bits, dtype=np.int64)
        mismatch = np.flatnonzero(stream_end != starts[k] + chunk_bits)
        if mismatch.size:
            j = int(mismatch[0])
            raise ContainerError(
                f"{stream.name}: chunk {j} decodes in {int(stream_end[j] - starts[k][j])} bits "
                f"but its chunk_bits says {int(chunk_bits[j])}"
            )
        results.append(symbols)
    return results


# Above this many bits in one stream the pointer-doubling decoder's arrays
# (a few int64 values per payload bit) would cost more memory than they save time.
_DOUBLING_MAX_BITS = 1 << 26


def _prefer_doubling(starts: list[np.ndarray], streams: Sequence[ChunkedStream], steps: int, n_lanes: int) -> bool:
    """Whether few, long chunks make pointer doubling cheaper than the lockstep loop.

    The lockstep loop costs one Python step (about ten numpy calls) per symbol
    of a chunk whatever the number of lanes; pointer doubling costs a few
    whole-array operations per payload bit and per doubling level
    (``log2(steps)`` of them). Our encoder's default chunking (1024 symbols,
    many chunks) stays on the lockstep loop; a foreign container with one huge
    chunk per stream goes to doubling.
    """
    if steps < 512:
        return False
    total_bits = sum(int(np.sum(stream.chunk_bits, dtype=np.int64)) for stream in streams)
    if any(int(np.sum(stream.chunk_bits, dtype=np.int64)) > _DOUBLING_MAX_BITS for stream in streams):
        return False
    levels = max(1, (steps - 1).bit_length())
    # ~10 numpy calls of ~1.5 us per lockstep step against ~4 passes of ~2 ns per bit per level.
    return total_bits * levels * 8e-9 < steps * (15e-6 + n_lanes * 4e-9)


def _decode_in_lockstep(
    windows: np.ndarray,
    table: np.ndarray,
    table_bits: int,
    lane_starts: np.ndarray,
    lane_offsets: np.ndarray,
    steps: int,
    last_count: int,
    n_streams: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Entries ``[steps, n_lanes]`` and end positions of every lane, one symbol of every lane per step.

    The last ``n_streams`` lanes stop after ``last_count`` symbols (their rows
    beyond are left unset).
    """
    n_lanes = lane_starts.size
    entries = np.empty((steps, n_lanes), dtype=np.int32)  # row i: symbol i of every lane
    position = lane_starts.copy()
    shift_base = 32 - table_bits
    value_mask = (1 << table_bits) - 1
    pos, offsets, row_end = position, lane_offsets if n_streams > 1 else None, n_lanes
    for i in range(steps):
        if i == last_count:  # the short last chunks are finished
            row_end = n_lanes - n_streams
            pos = position[:row_end]
            offsets = lane_offsets[:row_end] if n_streams > 1 else None
        value = (windows.take(pos >> 3, mode="clip") >> (shift_base - (pos & 7))) & value_mask
        if offsets is not None:
            value += offsets
        entry = table.take(value)
        pos += entry & _LENGTH_MASK
        entries[i, :row_end] = entry
    return entries, position


def _decode_by_doubling(
    windows: np.ndarray,
    table: np.ndarray,
    table_bits: int,
    lane_starts: np.ndarray,
    lane_offsets: np.ndarray,
    lane_counts: np.ndarray,
    lane_regions: np.ndarray,
) -> tuple[np.ndarray, np.ndarray] | None:
    """The same entries and end positions as :func:`_decode_in_lockstep`, by pointer doubling.

    For every bit position ``p`` of a lane's stream region ``[lo, hi)`` the
    table entry starting there is computed at once, giving the successor
    ``next(p) = p + length``. The position of symbol ``i`` of a lane is
    ``next^i(start)``; positions ``0 .. 2^j - 1`` known, ``next^(2^j)`` (the
    successor composed with itself ``j`` times) gives the next ``2^j`` of them.
    Work: a few whole-array passes over the region per doubling level, so
    ``O(bits log(symbols))`` with ``log2(symbols)`` Python steps.

    Returns None when a lane leaves its stream's region before its last symbol
    (only a malformed container does): the caller then uses the lockstep loop,
    whose handling of such input is the reference.
    """
    steps = int(lane_counts.max())
    n_lanes = lane_starts.size
    entries = np.empty((steps, n_lanes), dtype=np.int32)
    position = np.empty(n_lanes, dtype=np.int64)
    shift_base = 32 - table_bits
    value_mask = (1 << table_bits) - 1
    for lo, hi, offset in {(int(r[0]), int(r[1]), int(o)) for r, o in zip(lane_regions, lane_offsets)}:
        lanes = np.flatnonzero((lane_regions[:, 0] == lo) & (lane_regions[:, 1] == hi) & (lane_offsets == offset))
        bits = np.arange(lo, hi, dtype=np.int64)
        value = (windows.take(bits >> 3, mode="clip") >> (shift_base - (bits & 7))) & value_mask
        entry_at = table.take(value + offset)
        sink = hi - lo  # any position outside the region
        jump = np.append(np.arange(sink, dtype=np.int64) + (entry_at & _LENGTH_MASK), sink)
        jump[jump > sink] = sink
        path = np.empty((lanes.size, steps), dtype=np.int64)
        path[:, 0] = lane_starts[lanes] - lo
        path[:, 0][(path[:, 0] < 0) | (path[:, 0] > sink)] = sink
        filled = 1
        while filled < steps:
            count = min(filled, steps - filled)
            path[:, filled : filled + count] = jump[path[:, :count]]
            filled += count
            if filled < steps:
                jump = jump[jump]
        counts = lane_counts[lanes]
        used = np.arange(steps)[None, :] < counts[:, None]
        if np.any((path == sink) & used):
            return None
        entry_at = np.append(entry_at, 0)
        lane_entries = entry_at[path]
        entries[:, lanes] = lane_entries.T
        last = path[np.arange(lanes.size), counts - 1]
        position[lanes] = lo + last + (entry_at[last] & _LENGTH_MASK)
    return entries, position


def _canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical (DEFLATE) code words for valid ``lengths``; 0 for absent symbols."""
    lengths = np.asarray(lengths, dtype=np.int64)
    count = np.bincount(lengths, minlength=MAX_CODE_LENGTH + 1)
    count[0] = 0
    next_code = np.zeros(MAX_CODE_LENGTH + 1, dtype=np.int64)
    code = 0
    for length in range(1, MAX_CODE_LENGTH + 1):
        code = (code + int(count[length - 1])) << 1
        next_code[length] = code
    present = np.flatnonzero(lengths)
    order = present[np.argsort(lengths[present], kind="stable")]
    sorted_lengths = lengths[order]
    group_start = np.searchsorted(sorted_lengths, sorted_lengths, side="left")
    rank = np.arange(order.size) - group_start
    codes = np.zeros(lengths.size, dtype=np.uint32)
    codes[order] = (next_code[sorted_lengths] + rank).astype(np.uint32)
    return codes
