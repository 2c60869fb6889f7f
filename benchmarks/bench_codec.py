"""Container encode/decode throughput of the numpy codec (issue 2 target: >= 5 M weights/s each, one core).

For Gaussian tensors of 1M and 10M weights in two realistic settings
(90 % pruned with 5-bit codes and 5-bit relative indices, as for a fully
connected layer; unpruned with 8-bit codes, as for a convolution), the
script quantizes the weights (magnitude pruning and 1-D Lloyd k-means with
linear initialisation, inline and not timed), then times
``encode_container`` and ``decode_container`` (best of ``--repeats`` runs,
same process, ``time.perf_counter``) and prints weights per second. The
decoded tensor is checked against the quantized one.

    python benchmarks/bench_codec.py [--sizes 1000000 10000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# One core: numpy's element-wise work is single-threaded, but pin BLAS pools anyway.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnx_dc.codec.accounting import container_size_breakdown  # noqa: E402
from onnx_dc.codec.container_reader import decode_container, read_container_info  # noqa: E402
from onnx_dc.codec.container import encode_container

TARGET_WEIGHTS_PER_SECOND = 5e6


@dataclass(frozen=True)
class Case:
    """One benchmark setting."""

    name: str
    sparsity: float
    bits: int
    index_bits: int


CASES = (
    Case("90% pruned, 5-bit, 5-bit index", 0.9, 5, 5),
    Case("unpruned, 8-bit", 0.0, 8, 8),
)


@dataclass(frozen=True)
class Row:
    """Measured results of one (size, case)."""

    n_weights: int
    case: str
    layout: str
    code_mode: str
    size_bytes: int
    encode_seconds: float
    decode_seconds: float

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.size_bytes / self.n_weights

    @property
    def encode_rate(self) -> float:
        return self.n_weights / self.encode_seconds

    @property
    def decode_rate(self) -> float:
        return self.n_weights / self.decode_seconds


def quantize(weights: np.ndarray, sparsity: float, bits: int, iterations: int = 15) -> tuple[np.ndarray, np.ndarray]:
    """Magnitude pruning + 1-D k-means (linear init, Lloyd via sorted midpoints). Returns (codes, codebook)."""
    flat = weights.reshape(-1)
    keep = np.ones(flat.size, dtype=bool)
    if sparsity > 0:
        n_pruned = int(round(sparsity * flat.size))
        keep[np.argpartition(np.abs(flat), n_pruned)[:n_pruned]] = False
    kept = flat[keep].astype(np.float64)
    k = 1 << bits
    centroids = np.linspace(kept.min(), kept.max(), k)
    for _ in range(iterations):
        assignment = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, kept)
        sums = np.bincount(assignment, weights=kept, minlength=k)
        counts = np.bincount(assignment, minlength=k)
        centroids = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        centroids.sort()
    assignment = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, kept)
    codes = np.full(flat.size, -1, dtype=np.int16)
    codes[keep] = assignment
    return codes.reshape(weights.shape), centroids.astype(weights.dtype)


def _best_time(function, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def run(sizes: tuple[int, ...] = (1_000_000, 10_000_000), repeats: int = 3, seed: int = 0) -> list[Row]:
    """Measure every case at every size; returns the rows (raises if a round trip is wrong)."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        weights = rng.standard_normal(n).astype(np.float32)
        for case in CASES:
            codes, codebook = quantize(weights, case.sparsity, case.bits)
            encode_seconds, container = _best_time(
                functools.partial(encode_container, codes, codebook, bits=case.bits, index_bits=case.index_bits),
                repeats,
            )
            decode_seconds, decoded = _best_time(functools.partial(decode_container, container), repeats)
            expected = np.where(codes >= 0, codebook[np.maximum(codes, 0)], np.float32(0))
            if not np.array_equal(decoded.view(np.uint32), expected.view(np.uint32)):
                raise AssertionError(f"round trip mismatch for {case.name} at {n} weights")
            info = read_container_info(container)
            rows.append(
                Row(n, case.name, info.layout, info.code_stream.mode, len(container), encode_seconds, decode_seconds)
            )
    return rows


def format_table(rows: list[Row]) -> str:
    """The printed table: one line per (size, case), throughput in millions of weights per second."""
    header = (
        f"{'weights':>10}  {'case':<32}{'layout':<8}{'codes':<9}{'bytes':>11}{'bits/w':>8}"
        f"{'encode Mw/s':>13}{'decode Mw/s':>13}  target {TARGET_WEIGHTS_PER_SECOND / 1e6:.0f} Mw/s"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        met = row.encode_rate >= TARGET_WEIGHTS_PER_SECOND and row.decode_rate >= TARGET_WEIGHTS_PER_SECOND
        lines.append(
            f"{row.n_weights:>10}  {row.case:<32}{row.layout:<8}{row.code_mode:<9}{row.size_bytes:>11}"
            f"{row.bits_per_weight:>8.3f}{row.encode_rate / 1e6:>13.1f}{row.decode_rate / 1e6:>13.1f}"
            f"  {'met' if met else 'NOT MET'}"
        )
    return "\n".join(lines)


def entropy_table(index_bits: int = 5, seed: int = 0) -> str:
    """Issue 2's size check: a 300x784 Gaussian layer, 8 % kept, 5-bit codes, against its streams' entropy."""
    weights = np.random.default_rng(seed).standard_normal((300, 784)).astype(np.float32)
    codes, codebook = quantize(weights, 0.92, 5)
    breakdown = container_size_breakdown(encode_container(codes, codebook, bits=5, index_bits=index_bits))
    title = f"container size against the entropy bound: 300x784 Gaussian, 8 % kept, 5-bit codes, index_bits {index_bits}"
    return title + "\n" + breakdown.format_table()


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if any(size < 1 for size in args.sizes) or args.repeats < 1:
        parser.error("sizes and repeats must be positive")
    print(f"numpy codec throughput (one process, one core, best of {args.repeats} runs)")
    print(format_table(run(tuple(args.sizes), args.repeats)))
    print()
    print(entropy_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
