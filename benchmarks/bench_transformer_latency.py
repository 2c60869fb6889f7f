"""Whole-transformer latency at several input shapes: the original, onnxruntime's quantizers and onnx-dc, side by side.

    python benchmarks/bench_transformer_latency.py [--models minilm-l6 vit-s-focus whisper-tiny-encoder]
        [--threads 1 2] [--seconds 20] [--json F]

For each zoo transformer (:mod:`model_zoo.real`) the sessions of one shape group
are built in this process and timed interleaved (``compare.measure_latency``:
warm-up, blocks of about 20 ms, a new random order every round, until
``--seconds`` have passed):

* ``original``: the float model at onnxruntime's default optimisation level;
* ``int8``: ``quantize_dynamic`` int8 weights (what a user would otherwise pick);
* ``nbits4``: ``MatMulNBits`` 4-bit, block 32 (the weight-only alternative);
* ``dc defaults``: ``onnx-dc compress`` with its defaults (transformers: fc and
  embedding tables unpruned 5-bit), run through the operator library;
* ``dc s0b6``: ``--sparsity 0 --bits 6``; a calibrated model at these settings
  (``--calib``) holds the same layout and runs the same kernels, so its latency
  is this row's.

Shapes: the sentence encoder at batch 1 x 64 tokens, 1 x 128 tokens and
8 x 64 tokens (real evaluation sentences; the 128-token input is two of them
end to end), the vision transformer and the speech encoder at batch 1 (the
ViT's cubic Resize of its position table runs at batch 1 only). Each row
prints the median ms per run and the ratio to the original of the same shape
and thread count (below 1 = faster).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

import onnx_dc  # noqa: E402
from onnx_dc.api.recipe import Recipe  # noqa: E402

MODELS = ("minilm-l6", "vit-s-focus", "whisper-tiny-encoder")
VARIANTS = ("original", "int8", "nbits4", "dc defaults", "dc s0b6")


def shaped_feeds(name: str) -> dict[str, dict[str, np.ndarray]]:
    """The timed inputs of one zoo transformer, keyed by a shape label."""
    from model_zoo import real

    samples = [s.feed for s in real.get(name).make_samples("eval", 8)]
    stack = lambda feeds: {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}  # noqa: E731
    if name == "minilm-l6":
        joined = {k: np.concatenate([samples[0][k], samples[1][k]], axis=1) for k in samples[0]}
        joined["attention_mask"] = np.ones_like(joined["attention_mask"])
        return {"1 x 64": samples[0], "1 x 128": joined, "8 x 64": stack(samples)}
    return {"batch 1": samples[0]}  # the ViT's position-table Resize (cubic) and Whisper's 30-s window: batch 1


def build_variants(path: Path, workdir: Path) -> dict[str, tuple[bytes, bool]]:
    """Serialized model and whether it needs the onnx-dc library, per variant, for the model file ``path``."""
    import compare_methods as methods

    model = onnx.load(str(path))
    built: dict[str, tuple[bytes, bool]] = {"original": (Path(path).read_bytes(), False)}
    for label, candidate in (
        ("int8", methods.quantize_dynamic_candidate(model, workdir, pre_step=False)),
        ("nbits4", methods.matmul_nbits_candidate(model, bits=4)),
    ):
        if candidate.ok:
            built[label] = (candidate.model_bytes, False)
        else:
            print(f"{Path(path).name}: {label} not built: {candidate.failure}", file=sys.stderr)
    settings = {"dc defaults": Recipe(), "dc s0b6": Recipe(sparsity="0", bits="6")}
    for label, recipe in settings.items():
        result = onnx_dc.compress(model, recipe=recipe)
        built[label] = (result.model.SerializeToString(), True)
    return built


def measure(
    name: str, path: Path, feeds: dict[str, dict[str, np.ndarray]], threads: list[int], seconds: float
) -> list[dict]:
    """One row per (shape, threads, variant) of the model file ``path``: median ms and the ratio to the original."""
    from compare import make_session, measure_latency

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        built = build_variants(path, Path(tmp))
    for shape, feed in feeds.items():
        for n in threads:
            sessions = {label: make_session(data, library=library, threads=n) for label, (data, library) in built.items()}
            timings = measure_latency(sessions, feed, budget_seconds=seconds, min_rounds=5)
            original = timings["original"].median_ms
            for label, timing in timings.items():
                row = {"model": name, "shape": shape, "threads": n, "variant": label,
                       "median_ms": round(timing.median_ms, 3), "ratio": round(timing.median_ms / original, 3),
                       "blocks": len(timing.samples)}
                rows.append(row)
                print(f"{name:<22} {shape:<8} {n:>2} thr  {label:<12} {timing.median_ms:9.2f} ms  {row['ratio']:6.2f}x",
                      flush=True)
            del sessions
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seconds", type=float, default=20.0, help="timing budget per shape and thread count")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    from model_zoo import real

    rows = []
    for name in args.models:
        rows.extend(measure(name, real.get(name).path(), shaped_feeds(name), args.threads, args.seconds))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
