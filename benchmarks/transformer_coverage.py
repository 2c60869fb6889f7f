"""What the converter does with the weights of the transformer test models (tests/models): compressed vs dense, by op.

    python benchmarks/transformer_coverage.py [--models bert_ts gpt_ts ...]

For each model, compressed with the data-free defaults: how many weights
(tensors) and how many of their bytes are compressed, split by what reads the
container (DCMatMul, DCConv, DCGather, or DCDecompress for an operator),
and how many are left dense, split by reason (small, bias, not floating
point). Bytes are the tensors' dense sizes in the original model.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import onnx

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from onnx_dc.api.convert import compress_model
from onnx_dc.api.recipe import Recipe
from onnx_dc.api.report import format_bytes

MODELS_DIR = REPO / "tests" / "models"
MODELS = ["bert_ts", "bert_dynamo", "gpt_ts", "gpt_dynamo", "gpt_ts_nofold", "bert_ort_opt1", "bert_ort_opt2"]


def coverage(name: str) -> list[tuple[str, str, int, int]]:
    """``(compressed | dense, how, tensors, bytes)`` rows for one model."""
    result = compress_model(onnx.load(str(MODELS_DIR / f"{name}.onnx")), Recipe())
    groups: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for row in result.report.tensors:
        readers = [op for op in row.op.split("+") if op != "DCDecompress"]
        if row.decompressed_for:
            readers.append("DCDecompress for " + " / ".join(row.decompressed_for))
        key = ("compressed", " + ".join(readers))
        groups[key][0] += 1
        groups[key][1] += row.original_bytes
    for tensor in result.report.dense:
        reason = (tensor.reason or "-").rpartition(": ")[2]
        key = ("dense", reason)
        groups[key][0] += 1
        groups[key][1] += tensor.size_bytes
    return [(state, how, count, size) for (state, how), (count, size) in groups.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    args = parser.parse_args(argv)
    print(f"{'model':14s} {'':10s} {'read by / reason':58s} {'tensors':>7s} {'bytes':>10s}")
    for name in args.models:
        rows = coverage(name)
        for state in ("compressed", "dense"):
            for _, how, count, size in sorted(r for r in rows if r[0] == state):
                print(f"{name:14s} {state:10s} {how:58s} {count:7d} {format_bytes(size):>10s}")
        total = sum(r[3] for r in rows)
        share = sum(r[3] for r in rows if r[0] == "compressed") / total
        print(f"{name:14s} {'total':10s} {f'{100 * share:.1f} % of the weight bytes compressed':58s} {'':7s} {format_bytes(total):>10s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
