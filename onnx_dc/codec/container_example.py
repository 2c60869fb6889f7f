"""The worked example of docs/FORMAT.md, generated from the codec itself.

``python -m onnx_dc.codec.container_example --example`` prints the example
container byte by byte, annotated; the test suite checks that FORMAT.md shows
exactly this text.
"""

from __future__ import annotations

import sys
import zlib

import numpy as np

from onnx_dc.codec import relative_indices
from onnx_dc.codec.container import HEADER_SIZE_BYTES, STREAM_DESCRIPTOR_FIXED_BYTES, _container_from_symbols
from onnx_dc.codec.container_reader import decode_container, decode_container_symbols

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
    gaps, kept_entries = relative_indices.relative_indices(positions, 2)
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
        "(`onnx_dc.codec.container_example.worked_example_container`)."
    )
    out("")
    out("| entry | position | code symbol | gap symbol |")
    out("|---|---|---|---|")
    positions = relative_indices.absolute_positions(gap_symbols)
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
    """Command line: ``python -m onnx_dc.codec.container --example`` prints FORMAT.md's worked example."""
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["--example"]:
        print("usage: python -m onnx_dc.codec.container --example", file=sys.stderr)
        return 2
    print(worked_example())
    return 0


if __name__ == "__main__":
    sys.exit(main())
