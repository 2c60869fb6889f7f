"""Generate the shared container test vectors (docs/FORMAT.md section 8).

Run ``python tests/vectors/generate.py`` from the repository root to rewrite
the files next to this script; ``tests/test_container.py`` checks that the
committed files equal what :func:`build_vectors` produces now, and that the
numpy decoder accepts every valid file (with the expected tensor) and rejects
every invalid one with the manifest's keyword. The C++ decoder's tests read
the same files.

All data is derived from integer formulas (no random number generator), so
the output is identical on every machine and numpy version.
"""

from __future__ import annotations

import io
import json
import os
import struct
import sys
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from onnx_dc.codec import relative_indices as sparse  # noqa: E402
from onnx_dc.codec.container import _container_from_symbols, encode_container
from onnx_dc.codec.container_reader import decode_container, read_container_info
from onnx_dc.codec.container_example import worked_example_container
from onnx_dc.errors import ContainerError  # noqa: E402

VECTOR_DIR = Path(__file__).resolve().parent
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


# ---------------------------------------------------------------------------- deterministic data
def _hash(n: int, seed: int) -> np.ndarray:
    """splitmix64 of ``seed*2**32 + 0..n-1``: deterministic pseudo-random uint64 values."""
    with np.errstate(over="ignore"):
        z = np.arange(n, dtype=np.uint64) + np.uint64(seed << 32)
        z = z * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _codes(shape: tuple[int, ...], n_codes: int, keep_per_mille: int, seed: int, skew: bool = True) -> np.ndarray:
    """Codes in ``-1..n_codes-1``: about ``keep_per_mille``/1000 kept, skewed towards small codes."""
    n = int(np.prod(shape, dtype=np.int64))
    h = _hash(n, seed)
    kept = (h % np.uint64(1000)) < np.uint64(keep_per_mille)
    u = ((h >> np.uint64(20)) % np.uint64(1 << 16)).astype(np.int64)
    if skew:
        code = (n_codes * u * u) >> 32  # density ~ 1/sqrt: small codes frequent
    else:
        code = (n_codes * u) >> 16
    codes = np.where(kept, code, -1).astype(np.int16)
    return codes.reshape(shape)


def _codebook(n_codes: int, dtype: np.dtype) -> np.ndarray:
    """Values exactly representable in every dtype: multiples of 1/8 around 0, one of them -0.0."""
    values = [(i - n_codes // 2) * 0.125 + (0.0625 if i % 3 == 0 else 0.0) for i in range(n_codes)]
    codebook = np.array(values, dtype=np.float64).astype(dtype)
    if n_codes >= 3:
        codebook[1] = np.array(-0.0, dtype=dtype)  # a negative zero must survive bit for bit
    return codebook


def _expected(codes: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    table = np.zeros(codebook.size + 1, dtype=codebook.dtype)
    table[: codebook.size] = codebook
    return table[np.where(codes < 0, codebook.size, codes)]


# ---------------------------------------------------------------------------- container surgery
def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def _patch(data: bytes, offset: int, new: bytes, *, fix_crc: bool = True) -> bytes:
    """Replace bytes at ``offset``; recompute the CRC so later checks are reached."""
    patched = data[:offset] + new + data[offset + len(new) :]
    return _with_crc(patched[:-4]) if fix_crc else patched


def _insert(data: bytes, offset: int, new: bytes) -> bytes:
    body = data[:-4]
    return _with_crc(body[:offset] + new + body[offset:])


# ---------------------------------------------------------------------------- vectors
@dataclass
class _Vectors:
    files: dict[str, bytes] = field(default_factory=dict)
    manifest: list[dict] = field(default_factory=list)

    def valid(self, name: str, data: bytes, expected: np.ndarray, description: str, **expect: object) -> None:
        decoded = decode_container(data)  # the generator refuses to write a vector it cannot decode
        assert decoded.dtype == expected.dtype and decoded.shape == expected.shape, name
        assert decoded.tobytes() == expected.tobytes(), name
        info = read_container_info(data)
        for key, value in expect.items():  # coverage guarantees (e.g. stream modes)
            actual = {
                "layout": info.layout,
                "code_mode": info.code_stream.mode,
                "gap_mode": info.gap_stream.mode if info.gap_stream else None,
            }[key]
            assert actual == value, (name, key, actual, value)
        stored = expected.view(np.uint16) if expected.dtype == BFLOAT16 else expected
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, np.ascontiguousarray(stored), version=(1, 0), allow_pickle=False)
        self.files[f"{name}.odc"] = data
        self.files[f"{name}.npy"] = buffer.getvalue()
        self.manifest.append(
            {
                "file": f"{name}.odc",
                "valid": True,
                "description": description,
                "dtype": expected.dtype.name,
                "shape": list(expected.shape),
                "layout": info.layout,
                "expected": f"{name}.npy",
                "expected_dtype": stored.dtype.name,
            }
        )

    def invalid(self, name: str, data: bytes, keyword: str, description: str) -> None:
        try:  # the generator refuses to write a vector that does not fail as documented
            decode_container(data)
        except ContainerError as error:
            assert keyword in str(error), (name, keyword, str(error))
        else:
            raise AssertionError(f"{name} decodes without error")
        self.files[f"{name}.odc"] = data
        self.manifest.append({"file": f"{name}.odc", "valid": False, "description": description, "error": keyword})


def _valid_vectors(v: _Vectors) -> dict[str, bytes]:
    """Add the valid vectors; returns some of them as bases for the invalid ones."""
    bases: dict[str, bytes] = {}

    codes = _codes((12, 40), 6, 150, seed=1)
    codebook = _codebook(6, np.dtype(np.float32))
    data = encode_container(codes, codebook, bits=3, index_bits=2, layout="sparse", chunk_symbols=16)
    v.valid(
        "valid_f32_sparse_huffman_fillers",
        data,
        _expected(codes, codebook),
        "float32 12x40, 15% kept, 6 codes, index_bits 2 (fillers), chunks of 16, both streams Huffman",
        layout="sparse",
        code_mode="huffman",
        gap_mode="huffman",
    )
    bases["sparse_huffman"] = data

    codes = _codes((8, 8, 4), 4, 700, seed=2)
    codebook = _codebook(4, np.dtype(np.float16))
    data = encode_container(codes, codebook, bits=3, index_bits=4, layout="auto", chunk_symbols=32)
    v.valid(
        "valid_f16_dense_huffman_odd_table",
        data,
        _expected(codes, codebook),
        "float16 8x8x4, 70% kept, dense, Huffman code stream with an odd table length (5)",
        layout="dense",
        code_mode="huffman",
    )
    assert read_container_info(data).code_stream.code_lengths.size == 5
    bases["dense_huffman_odd"] = data

    codes = _codes((5, 7), 8, 800, seed=3, skew=False)
    codebook = _codebook(8, np.dtype(np.float64))
    data = encode_container(codes, codebook, bits=3, index_bits=5, layout="dense", chunk_symbols=8)
    v.valid(
        "valid_f64_dense_raw",
        data,
        _expected(codes, codebook),
        "float64 5x7, dense, raw code stream of width 4 (alphabet 9), chunks of 8",
        layout="dense",
        code_mode="raw",
    )
    bases["dense_raw"] = data

    codes = _codes((3, 4, 5), 3, 300, seed=4)
    codebook = _codebook(3, BFLOAT16)
    positions = np.flatnonzero(codes.reshape(-1) >= 0)
    gaps, kept = sparse.relative_indices(positions, 2)
    symbols = np.full(gaps.size, 3, dtype=np.int64)
    symbols[kept] = codes.reshape(-1)[positions]
    data = _container_from_symbols(
        codebook=codebook,
        shape=codes.shape,
        bits=2,
        layout="sparse",
        code_symbols=symbols,
        gap_symbols=gaps,
        index_bits=2,
        chunk_symbols=5,
        code_mode="raw",
        gap_mode="raw",
    )
    v.valid(
        "valid_bf16_sparse_raw_fillers",
        data,
        _expected(codes, codebook),
        "bfloat16 3x4x5, 30% kept, sparse, index_bits 2 with fillers, both streams raw, chunks of 5",
        layout="sparse",
        code_mode="raw",
        gap_mode="raw",
    )
    bases["sparse_raw"] = data

    codebook = np.array([0.75], dtype=np.float32)
    codes = np.array(0, dtype=np.int16)
    v.valid(
        "valid_f32_scalar",
        encode_container(codes, codebook, bits=1, index_bits=5),
        _expected(codes, codebook),
        "0-d float32 tensor (one kept element)",
    )

    codes = np.array(-1, dtype=np.int16)
    codebook = np.zeros(0, dtype=np.float16)
    v.valid(
        "valid_f16_scalar_pruned_k0",
        encode_container(codes, codebook, bits=1, index_bits=5),
        _expected(codes, codebook),
        "0-d float16 tensor, pruned, empty codebook (K = 0): dense, one zero symbol",
        layout="dense",
    )

    codes = np.zeros((0, 5), dtype=np.int16)
    codebook = _codebook(4, np.dtype(np.float32))
    v.valid(
        "valid_f32_empty_dense",
        encode_container(codes, codebook, bits=2, index_bits=5, layout="dense"),
        _expected(codes, codebook),
        "empty float32 tensor 0x5, dense, N = 0, no chunks",
        layout="dense",
    )

    codes = np.zeros((3, 0, 2), dtype=np.int16)
    codebook = _codebook(2, np.dtype(np.float64))
    v.valid(
        "valid_f64_empty_sparse",
        encode_container(codes, codebook, bits=1, index_bits=4, layout="sparse"),
        _expected(codes, codebook),
        "empty float64 tensor 3x0x2, sparse, N = 0",
        layout="sparse",
    )

    codes = np.full((8, 16), -1, dtype=np.int16)
    codebook = np.zeros(0, dtype=np.float32)
    v.valid(
        "valid_f32_k0_sparse",
        encode_container(codes, codebook, bits=4, index_bits=5),
        _expected(codes, codebook),
        "float32 8x16 all pruned, K = 0: sparse with N = 0",
        layout="sparse",
    )
    codes = np.full((4, 6), -1, dtype=np.int16)
    v.valid(
        "valid_f32_k0_dense",
        encode_container(codes, codebook, bits=4, index_bits=5, layout="dense"),
        _expected(codes, codebook),
        "float32 4x6 all pruned, K = 0, dense: raw width 1, every symbol 0",
        layout="dense",
        code_mode="raw",
    )

    codes = np.zeros((6, 7), dtype=np.int16)
    codebook = np.array([-1.5, 2.0], dtype=np.float32)
    data = _container_from_symbols(
        codebook=codebook,
        shape=codes.shape,
        bits=1,
        layout="dense",
        code_symbols=codes.reshape(-1),
        chunk_symbols=10,
        code_mode="huffman",
    )
    v.valid(
        "valid_f32_single_symbol_huffman",
        data,
        _expected(codes, codebook),
        "float32 6x7 dense, Huffman code with a single symbol (length 1, code word 0, incomplete code)",
        layout="dense",
        code_mode="huffman",
    )
    bases["single_symbol"] = data

    codes = _codes((16, 20), 256, 900, seed=5, skew=False)
    codebook = (np.arange(256, dtype=np.float32) - 128) / 64
    data = encode_container(codes, codebook, bits=8, index_bits=8, layout="dense", chunk_symbols=64)
    v.valid(
        "valid_f32_8bit_raw9",
        data,
        _expected(codes, codebook),
        "float32 16x20, bits 8, K = 256: alphabet 257, raw width 9",
        layout="dense",
        code_mode="raw",
    )
    codes = _codes((24, 40), 256, 950, seed=6)
    data = encode_container(codes, codebook, bits=8, index_bits=8, layout="dense", chunk_symbols=100)
    v.valid(
        "valid_f32_8bit_huffman",
        data,
        _expected(codes, codebook),
        "float32 24x40, bits 8, K = 256, skewed: Huffman over up to 257 symbols",
        layout="dense",
        code_mode="huffman",
    )

    codes = _codes((1, 2, 1, 3, 1, 2, 2, 1), 4, 500, seed=7)
    codebook = _codebook(4, BFLOAT16)
    v.valid(
        "valid_bf16_8d",
        encode_container(codes, codebook, bits=2, index_bits=3, chunk_symbols=3),
        _expected(codes, codebook),
        "bfloat16 8-d tensor 1x2x1x3x1x2x2x1",
    )

    codes = _codes((2, 3, 2, 2, 3), 4, 400, seed=8)
    codebook = _codebook(4, np.dtype(np.float16))
    v.valid(
        "valid_f16_5d_chunk1",
        encode_container(codes, codebook, bits=2, index_bits=2, layout="sparse", chunk_symbols=1),
        _expected(codes, codebook),
        "float16 5-d tensor, sparse, chunk_symbols 1 (one chunk per symbol)",
        layout="sparse",
    )

    codes = np.full(1000, -1, dtype=np.int16)
    codes[[0, 517, 999]] = [1, 0, 1]
    codebook = np.array([0.5, -0.25], dtype=np.float32)
    v.valid(
        "valid_f32_huge_gaps_index_bits1",
        encode_container(codes, codebook, bits=1, index_bits=1, layout="sparse", chunk_symbols=64),
        _expected(codes, codebook),
        "float32 1000 elements, 3 kept, index_bits 1: 996 filler entries",
        layout="sparse",
    )

    codes = np.full(300, -1, dtype=np.int16)
    codes[[3, 40, 299]] = [0, 1, 2]
    codebook = _codebook(3, np.dtype(np.float32))
    positions = np.flatnonzero(codes >= 0)
    gaps, kept = sparse.relative_indices(positions, 16)
    data = _container_from_symbols(
        codebook=codebook,
        shape=codes.shape,
        bits=2,
        layout="sparse",
        code_symbols=codes[positions],
        gap_symbols=gaps,
        index_bits=16,
        chunk_symbols=2,
        gap_mode="raw",
    )
    v.valid(
        "valid_f32_index_bits16_raw",
        data,
        _expected(codes, codebook),
        "float32 300 elements, index_bits 16, raw gap stream of width 16",
        layout="sparse",
        gap_mode="raw",
    )
    bases["index_bits16"] = data

    # Unneeded fillers are legal: the decoder follows the entries as written.
    codes = np.full(10, -1, dtype=np.int16)
    codes[[2, 5]] = [0, 1]
    codebook = np.array([1.0, -2.0], dtype=np.float64)
    data = _container_from_symbols(
        codebook=codebook,
        shape=(10,),
        bits=1,
        layout="sparse",
        code_symbols=np.array([2, 0, 2, 1]),
        gap_symbols=np.array([0, 1, 0, 1]),
        index_bits=3,
        chunk_symbols=4,
    )
    v.valid(
        "valid_f64_sparse_extra_fillers",
        data,
        _expected(codes, codebook),
        "float64 10 elements, sparse with fillers the encoder would not emit (positions 0, 2, 3, 5)",
        layout="sparse",
    )

    tensor_data = worked_example_container()
    v.valid(
        "valid_worked_example",
        tensor_data,
        decode_container(tensor_data),
        "the worked example of FORMAT.md section 6",
        layout="sparse",
        code_mode="huffman",
        gap_mode="raw",
    )
    return bases


def _invalid_vectors(v: _Vectors, bases: dict[str, bytes]) -> None:
    sp = bases["sparse_huffman"]
    sp_info = read_container_info(sp)
    dense_odd = bases["dense_huffman_odd"]
    odd_info = read_container_info(dense_odd)
    raw = bases["dense_raw"]
    raw_info = read_container_info(raw)
    single = bases["single_symbol"]
    code_d = sp_info.code_stream.descriptor_offset
    gap_d = sp_info.gap_stream.descriptor_offset

    v.invalid("invalid_empty", b"", "truncated", "zero bytes")
    v.invalid("invalid_truncated_header", sp[:20], "truncated", "cut to 20 bytes (shorter than header + CRC)")
    v.invalid("invalid_truncated_by_one", sp[:-1], "checksum", "last byte missing: the CRC no longer matches")
    v.invalid("invalid_truncated_half", sp[: len(sp) // 2], "checksum", "cut in half")
    v.invalid("invalid_bad_magic", _patch(sp, 0, b"ODCX", fix_crc=False), "magic", "magic ODCX")
    v.invalid("invalid_bad_version", _patch(sp, 4, b"\x02", fix_crc=False), "version", "version 2")
    v.invalid("invalid_version_0", _patch(sp, 4, b"\x00"), "version", "version 0 (CRC recomputed)")
    payload_byte = sp_info.code_stream.payload_offset + 3
    v.invalid(
        "invalid_bad_crc",
        _patch(sp, payload_byte, bytes([sp[payload_byte] ^ 0x10]), fix_crc=False),
        "checksum",
        "one payload bit flipped, CRC left as is",
    )
    v.invalid(
        "invalid_crc_field",
        _patch(sp, len(sp) - 2, bytes([sp[-2] ^ 0xFF]), fix_crc=False),
        "checksum",
        "a byte of the CRC field changed",
    )
    v.invalid("invalid_dtype", _patch(sp, 5, b"\x02"), "dtype", "dtype 2 (uint8) is not supported")
    v.invalid("invalid_layout", _patch(sp, 6, b"\x02"), "layout", "layout 2")
    v.invalid("invalid_weight_bits_0", _patch(sp, 7, b"\x00"), "weight bits", "bits 0")
    v.invalid("invalid_weight_bits_9", _patch(sp, 7, b"\x09"), "weight bits", "bits 9")
    v.invalid("invalid_index_bits_17", _patch(sp, 8, b"\x11"), "index bits", "sparse with index_bits 17")
    v.invalid("invalid_index_bits_0_sparse", _patch(sp, 8, b"\x00"), "index bits", "sparse with index_bits 0")
    v.invalid("invalid_index_bits_dense", _patch(raw, 8, b"\x05"), "index bits", "dense with index_bits 5")
    v.invalid("invalid_ndim_9", _patch(sp, 9, b"\x09"), "ndim", "ndim 9")
    v.invalid(
        "invalid_codebook_size", _patch(sp, 7, b"\x02"), "codebook size", "6 codebook values with bits 2 (at most 4)"
    )
    v.invalid("invalid_chunk_symbols_0", _patch(sp, 12, struct.pack("<I", 0)), "chunk_symbols", "chunk_symbols 0")
    v.invalid(
        "invalid_dims_truncated",
        _patch(bases["single_symbol"], 9, b"\x08"),
        "truncated",
        "ndim 8 but the container ends inside the dims",
    )
    v.invalid(
        "invalid_shape_overflow",
        _patch(sp, 24, struct.pack("<QQ", 1 << 62, 4)),
        "overflow",
        "dims 2**62 x 4 float32: numel * itemsize does not fit in 63 bits",
    )
    v.invalid(
        "invalid_shape_overflow_empty",
        _patch(_patch(sp, 9, b"\x03"), 24, struct.pack("<QQQ", 1 << 40, 1 << 40, 0)),
        "overflow",
        "dims 2**40 x 2**40 x 0: numel is 0 but the nonzero dims overflow",
    )
    v.invalid(
        "invalid_dim_2pow63",
        _patch(sp, 24, struct.pack("<QQ", 1 << 63, 0)),
        "overflow",
        "a dimension of 2**63 (numel 0)",
    )
    huge = _container_from_symbols(
        codebook=np.array([1.0], np.float32),
        shape=(1 << 20, 1 << 20),
        bits=1,
        layout="sparse",
        code_symbols=np.zeros(0, np.int64),
        gap_symbols=np.zeros(0, np.int64),
        index_bits=8,
    )
    v.invalid(
        "invalid_exceeds_limit",
        huge,
        "limit",
        "sparse all-zero tensor of 2**40 elements (N = 0): refused by the element limit",
    )
    v.invalid(
        "invalid_entries_dense",
        _patch(raw, 16, struct.pack("<Q", raw_info.entries - 1)),
        "entries",
        "dense with N = numel - 1",
    )
    v.invalid(
        "invalid_entries_exceed_numel",
        _patch(sp, 16, struct.pack("<Q", sp_info.numel + 1)),
        "entries",
        "sparse with N = numel + 1",
    )
    v.invalid(
        "invalid_entries_huge", _patch(sp, 16, struct.pack("<Q", (1 << 64) - 1)), "entries", "sparse with N = 2**64 - 1"
    )
    v.invalid(
        "invalid_codebook_nan", _patch(sp, 40, struct.pack("<f", float("nan"))), "not finite", "codebook[0] is NaN"
    )
    v.invalid(
        "invalid_codebook_inf", _patch(sp, 44, struct.pack("<f", float("-inf"))), "not finite", "codebook[1] is -Inf"
    )
    v.invalid(
        "invalid_codebook_truncated",
        _patch(_patch(bases["single_symbol"], 7, b"\x08"), 10, struct.pack("<H", 200)),
        "truncated",
        "bits 8 and K = 200: the codebook runs past the end",
    )
    v.invalid(
        "invalid_descriptor_truncated",
        _patch(_patch(single, 7, b"\x08"), 10, struct.pack("<H", 10)),
        "truncated",
        "K = 10: the codebook ends 3 bytes before the CRC, no room for the code stream descriptor",
    )
    wide = bases["index_bits16"]
    wide_gap = read_container_info(wide).gap_stream.descriptor_offset
    v.invalid(
        "invalid_table_truncated",
        _patch(wide, wide_gap, struct.pack("<BBHI", 1, 0, 0, 1 << 16)),
        "truncated",
        "gap stream switched to Huffman with 65536 code lengths (32768 bytes) that are not there",
    )
    v.invalid("invalid_stream_mode", _patch(sp, code_d, b"\x02"), "mode", "code stream mode 2")
    v.invalid(
        "invalid_raw_width_0",
        _patch(raw, raw_info.code_stream.descriptor_offset + 1, b"\x00"),
        "raw width",
        "raw code stream of width 0",
    )
    v.invalid(
        "invalid_raw_width_17",
        _patch(raw, raw_info.code_stream.descriptor_offset + 1, b"\x11"),
        "raw width",
        "raw code stream of width 17",
    )
    v.invalid(
        "invalid_huffman_raw_width",
        _patch(sp, code_d + 1, b"\x04"),
        "raw width",
        "Huffman code stream with raw_width 4",
    )
    v.invalid("invalid_reserved", _patch(sp, gap_d + 2, b"\x01\x00"), "reserved", "gap descriptor reserved = 1")
    v.invalid(
        "invalid_table_length_raw",
        _patch(raw, raw_info.code_stream.descriptor_offset + 4, struct.pack("<I", 1)),
        "table length",
        "raw code stream with table_length 1",
    )
    v.invalid(
        "invalid_table_length_zero",
        _patch(sp, code_d + 4, struct.pack("<I", 0)),
        "table length",
        "Huffman code stream with table_length 0",
    )
    v.invalid(
        "invalid_table_length_too_big",
        _patch(sp, code_d + 4, struct.pack("<I", 8)),
        "table length",
        "code stream table_length 8 > alphabet size 7",
    )
    v.invalid(
        "invalid_table_length_huge",
        _patch(sp, code_d + 4, struct.pack("<I", 0xFFFFFFFF)),
        "table length",
        "code stream table_length 2**32 - 1",
    )
    odd_table = odd_info.code_stream.descriptor_offset + 8 + 2
    v.invalid(
        "invalid_nibble",
        _patch(dense_odd, odd_table, bytes([dense_odd[odd_table] | 0x30])),
        "nibble",
        "table length 5: the unused high nibble of the last length byte is 3",
    )
    v.invalid(
        "invalid_empty_code",
        _patch(sp, code_d + 8, bytes(sp_info.code_stream.table_size_bytes)),
        "empty code",
        "every code length 0",
    )
    # Lengths 1, 1, 1, ... : three code words of length 1 cannot be prefix-free.
    v.invalid(
        "invalid_oversubscribed",
        _patch(sp, code_d + 8, b"\x11\x11\x11\x01"),
        "oversubscribed",
        "code lengths 1,1,1,1,1,1,1 (Kraft sum 3.5)",
    )
    assert sp_info.gap_stream.code_lengths.size == 4 and sp_info.code_stream.code_lengths.size == 7
    v.invalid(
        "invalid_oversubscribed_gap",
        _patch(sp, gap_d + 8, b"\x11\x11"),
        "oversubscribed",
        "gap code lengths 1,1,1,1 (Kraft sum 2)",
    )
    big_chunks = _patch(sp, 12, struct.pack("<I", 1))
    v.invalid(
        "invalid_chunk_table_truncated",
        big_chunks,
        "truncated",
        "chunk_symbols 1: the code stream's chunk table would be 4*N bytes",
    )
    chunk0 = code_d + 8 + sp_info.code_stream.table_size_bytes
    lengths = sp_info.code_stream.huffman.lengths
    low = sp_info.chunk_symbols * int(lengths[lengths > 0].min()) - 1
    v.invalid(
        "invalid_chunk_bits_low",
        _patch(sp, chunk0, struct.pack("<I", low)),
        "chunk_bits",
        "chunk_bits[0] below chunk_symbols * shortest code length",
    )
    v.invalid(
        "invalid_chunk_bits_high",
        _patch(sp, chunk0, struct.pack("<I", 0xFFFFFFFF)),
        "chunk_bits",
        "chunk_bits[0] = 2**32 - 1",
    )
    raw_chunk0 = raw_info.code_stream.descriptor_offset + 8
    v.invalid(
        "invalid_chunk_bits_raw",
        _patch(raw, raw_chunk0, struct.pack("<I", 8 * 4 + 1)),
        "chunk_bits",
        "raw chunk with chunk_bits != n_j * width",
    )
    first = int(sp_info.code_stream.chunk_bits[0])
    gap_chunk0 = gap_d + 8 + sp_info.gap_stream.table_size_bytes
    gap_first = int(sp_info.gap_stream.chunk_bits[0])
    v.invalid(
        "invalid_payload_truncated",
        _patch(sp, gap_chunk0, struct.pack("<I", gap_first + 16)),
        "truncated",
        "gap chunk_bits[0] 16 bits larger (still in range): the gap payload runs into the CRC",
    )
    last = sp_info.gap_stream.payload_offset + sp_info.gap_stream.payload_size_bytes - 1
    assert sp_info.gap_stream.payload_bits % 8 != 0
    v.invalid(
        "invalid_padding",
        _patch(sp, last, bytes([sp[last] | 1])),
        "padding",
        "the last padding bit of the gap payload is 1",
    )
    v.invalid("invalid_trailing", _insert(sp, len(sp) - 4, b"\x00"), "trailing", "one extra byte before the CRC")
    single_info = read_container_info(single)
    p = single_info.code_stream.payload_offset
    v.invalid(
        "invalid_code_word",
        _patch(single, p + 1, bytes([single[p + 1] | 0x20])),
        "invalid code word",
        "single-symbol code (only 0 is a code word) and a 1 bit in the payload",
    )
    # Move one bit from chunk 1 to chunk 0: chunk 0's 16 symbols end one bit early.
    c1 = int(sp_info.code_stream.chunk_bits[1])
    shifted = _patch(sp, chunk0, struct.pack("<II", first + 1, c1 - 1))
    v.invalid(
        "invalid_chunk_bits_mismatch",
        shifted,
        "chunk_bits",
        "chunk_bits[0] one more and chunk_bits[1] one less than written (the code is complete)",
    )
    data = _container_from_symbols(
        codebook=_codebook(4, np.dtype(np.float32)),
        shape=(3, 3),
        bits=2,
        layout="dense",
        code_symbols=np.array([0, 1, 2, 3, 7, 0, 1, 2, 3]),
        chunk_symbols=4,
        code_mode="raw",
        code_raw_width=3,
    )
    v.invalid("invalid_raw_symbol_out_of_range", data, "out of range", "raw code symbol 7 with K = 4 (alphabet 5)")
    data = _container_from_symbols(
        codebook=_codebook(2, np.dtype(np.float32)),
        shape=(2, 5),
        bits=1,
        layout="sparse",
        code_symbols=np.array([0, 1, 0]),
        gap_symbols=np.array([3, 3, 2]),
        index_bits=2,
        chunk_symbols=2,
    )
    v.invalid("invalid_position_past_numel", data, "position", "entries at positions 3, 7, 10 of 10 elements")
    data = _container_from_symbols(
        codebook=_codebook(2, np.dtype(np.float32)),
        shape=(5,),
        bits=1,
        layout="sparse",
        code_symbols=np.array([0, 1]),
        gap_symbols=np.array([1, 15]),
        index_bits=4,
        chunk_symbols=2,
        gap_mode="raw",
    )
    v.invalid("invalid_position_raw_gap", data, "position", "raw gap 15 jumps past the end of 5 elements")


def build_vectors() -> dict[str, bytes]:
    """Every vector file's name and content, plus ``manifest.json``."""
    v = _Vectors()
    bases = _valid_vectors(v)
    _invalid_vectors(v, bases)
    v.manifest.sort(key=lambda entry: entry["file"])
    v.files["manifest.json"] = (json.dumps({"format_version": 1, "vectors": v.manifest}, indent=1) + "\n").encode()
    return dict(sorted(v.files.items()))


def write_vectors(directory: Path = VECTOR_DIR) -> list[str]:
    """Write :func:`build_vectors` into ``directory`` (atomically per file); remove stale vector files."""
    files = build_vectors()
    for name, content in files.items():
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
        os.chmod(tmp, 0o644)
        os.replace(tmp, directory / name)
    for stale in directory.iterdir():
        if stale.suffix in (".odc", ".npy") and stale.name not in files:
            stale.unlink()
    return list(files)


if __name__ == "__main__":
    names = write_vectors()
    print(f"wrote {len(names)} files to {VECTOR_DIR}")
