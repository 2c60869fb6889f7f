"""How much one-shot magnitude pruning the zoo LeNets tolerate: the basis of onnx-dc's default sparsities.

    python -m benchmarks.default_sparsity [--quick]

No calibration data and no retraining are used (that is what the defaults
must survive). For each zoo model and each layer kind it sweeps the kind's
sparsity with the paper's bits (fc 5-bit weights / 5-bit indices, conv 8/8),
leaving the other kind quantized but unpruned, and prints the top-1 accuracy
on 5 000 held-out TRAINING images (the validation split the choice is made
on) and on the 10 000 test images (reported only). A kind's default is the
largest swept sparsity such that it and every smaller one keep the
validation accuracy within 0.5 points (25 of the 5 000 images) of the
original float model, on every zoo model that has that kind. The sweep runs
the decompressed models (the same quantized weights the custom operators
use). Then it prints, end to end on the test images, the defaults and the
paper's settings, through the operator library and decompressed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import onnx_dc
from onnx_dc.api.recipe import Recipe
from onnx_dc.errors import LibraryNotFoundError
from onnx_dc.graph.settings import DEFAULTS

ZOO = ("lenet_300_100", "lenet5")
SWEEP = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
QUICK_SWEEP = (0.0, 0.3, 0.9)
MAX_DROP_POINTS = 0.5
PAPER_BITS = {"fc": 5, "conv": 8}


def _accuracies(model, datasets, *, custom_ops: bool = False):
    """AccuracyResult per dataset name; a ModelProto is evaluated decompressed unless ``custom_ops``."""
    from model_zoo.evaluate import evaluate

    if isinstance(model, (str, Path)) or custom_ops:
        runnable = model
    else:
        runnable = onnx_dc.decompress(model)
    return {name: evaluate(runnable, custom_ops=custom_ops, dataset=data) for name, data in datasets.items()}


def _within_budget(base, result) -> bool:
    """At most MAX_DROP_POINTS lost, counted in images (no float rounding at the boundary)."""
    allowed = MAX_DROP_POINTS / 100 * base.n_images
    return base.n_correct - result.n_correct <= allowed + 1e-9


def _kinds(path: Path) -> set[str]:
    from onnx_dc.graph.model_io import load_model
    from onnx_dc.graph.weights import find_weights

    return {w.kind for w in find_weights(load_model(path)) if not w.is_bias}


def paper_settings(model_name: str) -> dict[str, str]:
    """The paper's per-layer settings (Tables 2 and 3: kept fraction per layer, weight bits).

    The layers are addressed by their order in the zoo model (weight tensor names
    differ between exporters).
    """
    from model_zoo import get_model_path
    from onnx_dc.graph.model_io import load_model
    from onnx_dc.graph.weights import find_weights

    weights = [w for w in find_weights(load_model(get_model_path(model_name))) if not w.is_bias]
    names = [w.name for w in weights]
    if model_name == "lenet_300_100":  # ip1 8 %, ip2 9 %, ip3 26 % kept; 6-bit weights, 5-bit indices
        kept = [0.08, 0.09, 0.26]
        bits, index_bits = "6", "5"
    else:  # conv1 66 %, conv2 12 %, ip1 8 %, ip2 19 % kept; conv 8-bit, fc 5-bit weights
        kept = [0.66, 0.12, 0.08, 0.19]
        bits, index_bits = "conv=8,fc=5", "conv=8,fc=5"
    if len(names) != len(kept):
        raise SystemExit(f"{model_name}: expected {len(kept)} weight tensors, found {names}")
    sparsity = ",".join(f"{name}={1 - k:.2f}" for name, k in zip(names, kept))
    return {"sparsity": sparsity, "bits": bits, "index_bits": index_bits}


def main(argv: list[str] | None = None) -> int:
    """Run the sweep and print the tables."""
    from model_zoo import get_model_path
    from model_zoo.fashion_mnist import evaluation_set, validation_set

    parser = argparse.ArgumentParser(prog="python -m benchmarks.default_sparsity", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three sparsities only (a smoke run)")
    args = parser.parse_args(argv)
    sweep = QUICK_SWEEP if args.quick else SWEEP
    datasets = {"val": validation_set(5000), "test": evaluation_set()}

    chosen: dict[str, list[float]] = {}
    print("One-shot magnitude pruning of one layer kind (other kind unpruned), paper bits, no calibration")
    print(f"{'model':<15} {'kind':<5} {'sparsity':>8} {'ratio':>7} {'val top-1':>10} {'test top-1':>10}")
    for name in ZOO:
        path = get_model_path(name)
        base = _accuracies(path, datasets)
        print(
            f"{name:<15} {'-':<5} {'original':>8} {'1.0x':>7} {100 * base['val'].accuracy:9.2f}% "
            f"{100 * base['test'].accuracy:9.2f}%"
        )
        for kind in sorted(_kinds(path)):
            largest = 0.0
            prefix_ok = True
            for s in sweep:
                others = ",".join(f"{k}=0" for k in ("fc", "conv") if k != kind)
                recipe = Recipe.build(
                    sparsity=f"{kind}={s},{others}",
                    bits=",".join(f"{k}={b}" for k, b in PAPER_BITS.items()),
                    index_bits=",".join(f"{k}={b}" for k, b in PAPER_BITS.items()),
                )
                result = onnx_dc.compress(path, recipe=recipe)
                acc = _accuracies(result.model, datasets)
                print(
                    f"{name:<15} {kind:<5} {s:8.2f} {result.report.ratio:6.1f}x {100 * acc['val'].accuracy:9.2f}% "
                    f"{100 * acc['test'].accuracy:9.2f}%"
                )
                # The largest sparsity such that it and every smaller one stay within the budget.
                prefix_ok = prefix_ok and _within_budget(base["val"], acc["val"])
                if prefix_ok:
                    largest = s
            chosen.setdefault(kind, []).append(largest)
    print()
    print(f"largest sparsity within {MAX_DROP_POINTS} points on the validation images, per kind, over the zoo:")
    for kind, values in sorted(chosen.items()):
        print(f"  {kind}: {min(values):.2f}   (onnx_dc.graph.settings.DEFAULTS: {DEFAULTS[kind]['sparsity']})")

    print()
    print("End to end (test top-1 through the operator library, and decompressed; ratio = every weight,")
    print("Huffman included; kept = surviving fraction of the compressed weights)")
    print(
        f"{'model':<15} {'settings':<9} {'ratio':>6} {'file':>6} {'kept':>6} {'before':>8} {'library':>8} "
        f"{'decomp.':>8} {'drop':>6}"
    )
    test = {"test": datasets["test"]}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ZOO:
            path = get_model_path(name)
            base = _accuracies(path, test)["test"].accuracy
            for label, settings in (("defaults", {}), ("paper", paper_settings(name))):
                out = Path(tmp) / f"{name}.{label}.onnx"
                result = onnx_dc.compress(path, out, Recipe.build(**settings))
                try:
                    library = _accuracies(out, test, custom_ops=True)["test"].accuracy
                    library_text = f"{100 * library:7.2f}%"
                except LibraryNotFoundError:
                    library, library_text = None, f"{'-':>8}"
                decompressed = _accuracies(result.model, test)["test"].accuracy
                after = library if library is not None else decompressed
                kept = result.report.n_kept / result.report.n_weights
                file_ratio = path.stat().st_size / out.stat().st_size
                print(
                    f"{name:<15} {label:<9} {result.report.ratio:5.1f}x {file_ratio:5.1f}x {100 * kept:5.1f}% "
                    f"{100 * base:7.2f}% {library_text} {100 * decompressed:7.2f}% {100 * (base - after):5.2f}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
