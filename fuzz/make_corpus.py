"""Writes the fuzzers' seed corpus, fuzz/corpus/: real containers of the zoo models plus the test vectors.

Run from the repository root::

    python fuzz/make_corpus.py            # (re)write fuzz/corpus/
    python fuzz/make_corpus.py --check    # exit 1 if fuzz/corpus/ differs from what would be written

Every float weight of every ``model_zoo/models/*.onnx`` is compressed with
onnx_dc's tensor pipeline (:func:`onnx_dc.codec.tensor.compress_tensor`) under a grid
of settings that covers both layouts, raw and Huffman streams, weight bits 1 to
8, index bits 1 to 16 and the four dtypes; weights above ``_SLICE_ELEMENTS``
elements are cut to their first rows so the seeds stay small (fuzzers mutate
small inputs much faster), and one full-size tensor per model keeps a real,
multi-chunk container. Some seeds are re-encoded from the same codes with small
``chunk_symbols`` so that seeds have many chunks (the C++ decoder splits chunks
between threads). Deterministic: the same models give the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import numpy_helper

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from onnx_dc.codec.container import encode_container  # noqa: E402
from onnx_dc.codec.tensor import TensorSettings, compress_tensor  # noqa: E402

CORPUS_DIR = REPO_ROOT / "fuzz" / "corpus"
MODELS_DIR = REPO_ROOT / "model_zoo" / "models"
VECTORS_DIR = REPO_ROOT / "tests" / "vectors"

#: Weights are cut to their first rows to hold at most this many elements.
_SLICE_ELEMENTS = 3000
#: A full-size container is kept only when it is at most this large.
_FULL_MAX_BYTES = 48 * 1024

# (name, settings, dtype, chunk_symbols or None for the pipeline's default)
_GRID: list[tuple[str, TensorSettings, object, int | None]] = [
    ("dense_b2", TensorSettings(sparsity=0.0, bits=2, layout="dense"), np.float32, None),
    ("dense_b8_c64", TensorSettings(sparsity=0.3, bits=8, layout="dense"), np.float32, 64),
    ("auto_b5_i5", TensorSettings(sparsity=0.9, bits=5, index_bits=5), np.float32, None),
    ("sparse_b4_i3_f16", TensorSettings(sparsity=0.5, bits=4, index_bits=3, layout="sparse"), np.float16, 100),
    ("sparse_b8_i8_f64", TensorSettings(sparsity=0.97, bits=8, index_bits=8, layout="sparse"), np.float64, None),
    ("sparse_b3_i1_bf16", TensorSettings(sparsity=0.99, bits=3, index_bits=1, layout="sparse"), ml_dtypes.bfloat16, 7),
    ("sparse_b6_i16", TensorSettings(sparsity=0.95, bits=6, index_bits=16, layout="sparse"), np.float32, 16),
    ("quality_b1_i2", TensorSettings(quality=1.0, bits=1, index_bits=2, layout="sparse"), np.float32, 33),
    ("all_pruned", TensorSettings(sparsity=1.0, bits=5, index_bits=4, layout="sparse"), np.float32, None),
]


def _weights(model_path: Path) -> list[tuple[str, np.ndarray]]:
    """The float initializers of a model (>= 2 dims or >= 64 elements), in graph order."""
    model = onnx.load(str(model_path))
    found = []
    for tensor in model.graph.initializer:
        array = numpy_helper.to_array(tensor)
        if array.dtype.kind == "f" and (array.ndim >= 2 or array.size >= 64):
            found.append((tensor.name, array))
    return found


def _first_rows(array: np.ndarray, max_elements: int) -> np.ndarray:
    if array.size <= max_elements or array.ndim == 0:
        return array
    row = array[0].size
    return array[: max(1, max_elements // row)] if row <= max_elements else array.reshape(-1)[:max_elements]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def corpus_files() -> dict[str, bytes]:
    """File name -> contents of every seed."""
    files: dict[str, bytes] = {}
    for model_path in sorted(MODELS_DIR.glob("*.onnx")):
        model_name = model_path.stem
        full_written = False
        for tensor_name, weights in _weights(model_path):
            prefix = f"{model_name}__{_safe(tensor_name)}"
            if not full_written:
                full = compress_tensor(weights, TensorSettings(sparsity=0.9, bits=5, index_bits=5))
                if len(full.container) <= _FULL_MAX_BYTES:
                    files[f"{prefix}__full.odc"] = full.container
                    full_written = True
            sliced = _first_rows(weights, _SLICE_ELEMENTS)
            for grid_name, settings, dtype, chunk_symbols in _GRID:
                compressed = compress_tensor(sliced.astype(dtype), settings)
                container = compressed.container
                if chunk_symbols is not None:
                    layout = "dense" if settings.layout == "dense" else "sparse"
                    container = encode_container(
                        compressed.codes, compressed.codebook, bits=settings.bits,
                        index_bits=settings.index_bits, layout=layout, chunk_symbols=chunk_symbols,
                    )
                files[f"{prefix}__{grid_name}.odc"] = container
    for vector in sorted(VECTORS_DIR.glob("*.odc")):
        files[f"vector__{vector.name}"] = vector.read_bytes()
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    files = corpus_files()
    if args.check:
        existing = {p.name: p.read_bytes() for p in CORPUS_DIR.glob("*.odc")}
        if existing != files:
            differing = sorted(set(existing) ^ set(files) | {n for n in files if existing.get(n) != files[n]})
            print(f"fuzz/corpus differs from make_corpus.py output: {', '.join(differing[:10])}", file=sys.stderr)
            return 1
        return 0
    CORPUS_DIR.mkdir(parents=True, exist_ok=True)
    for stale in CORPUS_DIR.glob("*.odc"):
        if stale.name not in files:
            stale.unlink()
    for name, data in files.items():
        (CORPUS_DIR / name).write_bytes(data)
    total = sum(len(d) for d in files.values())
    digest = hashlib.sha256(b"".join(files[n] for n in sorted(files))).hexdigest()[:16]
    print(f"fuzz/corpus: {len(files)} seeds, {total} bytes (sha256 {digest})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
