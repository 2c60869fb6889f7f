"""MSB-first bit packing and unpacking with numpy (the bit order of docs/FORMAT.md).

Bit number ``b`` of a stream is bit ``7 - b % 8`` of byte ``b // 8``; a value of
width ``w`` written at bit ``b`` occupies bits ``b .. b + w - 1``, most
significant bit first. This is the order of ``numpy.packbits(bitorder="big")``.

Everything here is vectorised: packing variable-width code words costs a
handful of whole-array numpy operations, not a Python loop per value.
"""

from __future__ import annotations

import numpy as np

#: Widest value :func:`pack_values` and :func:`unpack_fixed_width` handle.
MAX_VALUE_BITS = 24


def packed_size_bytes(n_bits: int) -> int:
    """Number of bytes holding ``n_bits`` bits: ``ceil(n_bits / 8)``."""
    return -(-int(n_bits) // 8)


# Symbols are packed in blocks so every temporary stays cache-sized and its
# memory is reused from block to block (large fresh arrays cost page faults).
_BLOCK_SYMBOLS = 1 << 16


def pack_values(values: np.ndarray, widths: np.ndarray | int) -> tuple[np.ndarray, int]:
    """Concatenate ``values[i]`` written in ``widths[i]`` bits each, MSB first.

    Args:
        values: 1-D array of non-negative integers, ``values[i] < 2**widths[i]``.
        widths: 1-D array (same length) or a single int, each in ``1..MAX_VALUE_BITS``.

    Returns:
        ``(payload, n_bits)``: a ``uint8`` array of ``ceil(n_bits / 8)`` bytes whose
        padding bits (after bit ``n_bits``) are zero, and the number of bits written.
    """
    values = np.asarray(values).reshape(-1)
    if np.ndim(widths) == 0:
        width = int(widths)
        if not 1 <= width <= MAX_VALUE_BITS:
            raise ValueError(f"value width {width} is outside 1..{MAX_VALUE_BITS}")
        payload, n_bits, _ = _pack(values, None, width)
        return payload, n_bits
    widths_arr = np.asarray(widths).reshape(-1)
    if widths_arr.shape != values.shape:
        raise ValueError("values and widths must have the same shape")
    if widths_arr.size and (widths_arr.min() < 1 or widths_arr.max() > MAX_VALUE_BITS):
        raise ValueError(f"value widths must lie in 1..{MAX_VALUE_BITS}")
    payload, n_bits, _ = _pack(values, widths_arr, 0)
    return payload, n_bits


def pack_symbols(symbols: np.ndarray, code_table: np.ndarray, width_table: np.ndarray) -> tuple[np.ndarray, int]:
    """Pack ``code_table[s]`` in ``width_table[s]`` bits for every symbol ``s`` of ``symbols``.

    Same result as ``pack_values(code_table[symbols], width_table[symbols])``
    without materialising the two per-symbol arrays for the whole stream.
    Every symbol used must have a width in ``1..MAX_VALUE_BITS`` (``ValueError`` otherwise).
    """
    payload, n_bits, _ = _pack_symbols(symbols, code_table, width_table, None)
    return payload, n_bits


def pack_symbols_chunked(
    symbols: np.ndarray, code_table: np.ndarray, width_table: np.ndarray, chunk_symbols: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`pack_symbols`, also returning the bit length of every chunk of ``chunk_symbols`` symbols.

    Returns ``(payload, chunk_bits)`` with ``chunk_bits`` an ``int64`` array of
    ``ceil(len(symbols) / chunk_symbols)`` entries summing to the payload's bit count.
    """
    payload, n_bits, chunk_starts = _pack_symbols(symbols, code_table, width_table, chunk_symbols)
    assert chunk_starts is not None
    return payload, np.diff(np.append(chunk_starts, n_bits))


def _pack_symbols(
    symbols: np.ndarray, code_table: np.ndarray, width_table: np.ndarray, chunk_symbols: int | None
) -> tuple[np.ndarray, int, np.ndarray | None]:
    symbols = np.asarray(symbols).reshape(-1)
    width_table = np.asarray(width_table, dtype=np.int64)
    if width_table.size and width_table.max() > MAX_VALUE_BITS:
        raise ValueError(f"a width exceeds {MAX_VALUE_BITS} bits")
    code_table = np.asarray(code_table, dtype=np.uint64)
    if (
        symbols.size >= 2
        and 0 < width_table.size <= _PAIR_MAX_ALPHABET
        and 2 * int(width_table.max()) <= MAX_VALUE_BITS
        and (chunk_symbols is None or chunk_symbols % 2 == 0)
        and 0 <= int(symbols.min()) and int(symbols.max()) < width_table.size  # else _pack reports it
    ):
        return _pack_pairs(symbols, code_table, width_table, chunk_symbols)
    return _pack(symbols, width_table, 0, code_table, chunk_symbols)


# Symbols of alphabets up to this size with codes of at most 12 bits are packed two at a time.
_PAIR_MAX_ALPHABET = 1024


def _pack_pairs(
    symbols: np.ndarray, code_table: np.ndarray, width_table: np.ndarray, chunk_symbols: int | None
) -> tuple[np.ndarray, int, np.ndarray | None]:
    """:func:`_pack` of consecutive symbol pairs through a table of the pairs' joined code words.

    The same bits (the code words are concatenated either way) from half as many
    items; a pair holding a symbol without a code has width 0, which ``_pack`` refuses.
    """
    size = width_table.size
    no_code = width_table == 0
    pair_width = (width_table[:, None] + width_table[None, :]).reshape(-1)
    pair_width[(no_code[:, None] | no_code[None, :]).reshape(-1)] = 0
    pair_code = ((code_table[:, None] << width_table[None, :].astype(np.uint64)) | code_table[None, :]).reshape(-1)
    n_pairs = symbols.size // 2
    pairs = symbols[0 : 2 * n_pairs : 2].astype(np.int64)
    pairs *= size
    pairs += symbols[1 : 2 * n_pairs : 2]
    payload, n_bits, starts = _pack(pairs, pair_width, 0, pair_code, None if chunk_symbols is None else chunk_symbols // 2)
    del pairs
    if symbols.size % 2:
        last = int(symbols[-1])
        if not 0 <= last < size or width_table[last] == 0:
            raise ValueError("a symbol to pack has width 0 (no code)")
        if starts is not None and (symbols.size - 1) % chunk_symbols == 0:
            starts = np.append(starts, n_bits)
        payload, n_bits = _append_bits(payload, n_bits, int(code_table[last]), int(width_table[last]))
    return payload, n_bits, starts


def _append_bits(payload: np.ndarray, n_bits: int, value: int, width: int) -> tuple[np.ndarray, int]:
    """``payload`` (``n_bits`` used, zero-padded) with ``value`` written in ``width`` bits after them."""
    total = n_bits + width
    out = np.zeros(packed_size_bytes(total), dtype=np.uint8)
    out[: payload.size] = payload
    for bit in range(width):  # at most 24 iterations
        if (value >> (width - 1 - bit)) & 1:
            position = n_bits + bit
            out[position >> 3] |= np.uint8(0x80 >> (position & 7))
    return out, total


def _pack(
    values: np.ndarray,
    widths: np.ndarray | None,
    width: int,
    code_table: np.ndarray | None = None,
    chunk_symbols: int | None = None,
) -> tuple[np.ndarray, int, np.ndarray | None]:
    """Core of the packers. ``widths`` is a per-value array, or a per-symbol table
    when ``code_table`` is given, or None (every value ``width`` bits). Returns
    ``(payload, n_bits, bit offset of every chunk_symbols-th value or None)``."""
    n = values.size
    chunk_starts = [] if chunk_symbols is not None else None
    if n == 0:
        return np.zeros(0, dtype=np.uint8), 0, np.zeros(0, dtype=np.int64) if chunk_symbols is not None else None
    # Each value lands in one 32-bit big-endian word or straddles two. Values
    # never share bits, so summing per-word contributions equals OR-ing them,
    # and np.bincount sums a block in one call (exactly: every partial sum is
    # < 2**32, well inside float64's integer range).
    pieces = []
    bit_offset = 0
    for begin in range(0, n, _BLOCK_SYMBOLS):
        block = values[begin : begin + _BLOCK_SYMBOLS]
        if code_table is not None:
            block_widths = widths[block]
            block_values = code_table[block]
            if block_widths.min() == 0:
                raise ValueError("a symbol to pack has width 0 (no code)")
        else:
            block_values = block.astype(np.uint64)
            block_widths = widths[begin : begin + _BLOCK_SYMBOLS].astype(np.int64) if widths is not None else None
        if block_widths is None:
            start = np.arange(bit_offset, bit_offset + block.size * width, width, dtype=np.int64)
            end_in_word = (start & 31) + width
            bit_offset += block.size * width
        else:
            start = np.cumsum(block_widths)
            start += bit_offset - block_widths
            bit_offset = int(start[-1] + block_widths[-1])
            end_in_word = (start & 31) + block_widths
        if chunk_starts is not None:
            chunk_starts.append(start[(-begin) % chunk_symbols :: chunk_symbols])
        word = start >> 5
        first_word = int(word[0])
        word -= first_word
        shifted = block_values << (64 - end_in_word).astype(np.uint64)
        n_local = int(word[-1]) + 2
        local = np.bincount(word, weights=(shifted >> np.uint64(32)).astype(np.float64), minlength=n_local)
        low = np.bincount(word, weights=(shifted & np.uint64(0xFFFFFFFF)).astype(np.float64), minlength=n_local)
        local[1:] += low[:-1]
        pieces.append((first_word, local))
    n_bits = bit_offset
    words = np.zeros(n_bits // 32 + 2, dtype=np.float64)
    for first_word, local in pieces:
        words[first_word : first_word + local.size] += local
    payload = words.astype(np.uint32).astype(">u4").view(np.uint8)
    starts = np.concatenate(chunk_starts) if chunk_starts is not None else None
    return payload[: packed_size_bytes(n_bits)].copy(), n_bits, starts


def byte_windows(payload: np.ndarray) -> np.ndarray:
    """The 32 bits starting at every byte of ``payload``, as ``uint32`` (big-endian).

    ``windows[k]`` holds bytes ``k, k+1, k+2, k+3`` (zero past the end), so any
    value of at most 25 bits starting at bit ``b`` is
    ``(windows[b >> 3] >> (32 - width - (b & 7))) & (2**width - 1)``.
    """
    payload = np.asarray(payload, dtype=np.uint8).reshape(-1)
    padded = np.zeros(payload.size + 3, dtype=np.uint8)
    padded[: payload.size] = payload
    # An overlapping view (stride 1 byte) of big-endian 4-byte words, converted once.
    overlapping = np.ndarray(shape=(payload.size,), dtype=">u4", buffer=padded, strides=(1,))
    return overlapping.astype(np.uint32)


def unpack_fixed_width(payload: np.ndarray, width: int, count: int, start_bit: int = 0) -> np.ndarray:
    """Read ``count`` consecutive ``width``-bit values starting at bit ``start_bit``.

    The caller guarantees ``start_bit + count * width <= 8 * len(payload)``.
    Returns an ``int64`` array.
    """
    if not 1 <= width <= MAX_VALUE_BITS:
        raise ValueError(f"value width {width} is outside 1..{MAX_VALUE_BITS}")
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    windows = byte_windows(payload)
    bit = np.arange(count, dtype=np.int64) * width + int(start_bit)
    word = windows[bit >> 3].astype(np.int64)
    return (word >> (32 - width - (bit & 7))) & ((1 << width) - 1)


def padding_bits_are_zero(payload: np.ndarray, n_bits: int) -> bool:
    """True if every bit of ``payload`` after the first ``n_bits`` bits is zero."""
    payload = np.asarray(payload, dtype=np.uint8)
    used_in_last = n_bits & 7
    if used_in_last == 0 or payload.size == 0:
        return True
    return (int(payload[n_bits >> 3]) & ((1 << (8 - used_in_last)) - 1)) == 0
