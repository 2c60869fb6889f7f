"""The main job: compress LeNet-300-100 with onnx-dc's defaults and show what it costs and saves.

    python -m model_zoo.demo [--model lenet_300_100|lenet5] [--keep DIR] [SETTINGS...]

Compresses the zoo model with the default settings (no calibration data),
prints the per-layer table, the top-1 accuracy on the 10 000 Fashion-MNIST
test images before and after (the compressed model through the onnx-dc
custom operator library, and its decompressed form on plain onnxruntime) and
the file sizes. Extra settings (``--sparsity``, ``--bits``, ``--index-bits``,
``--init``) are passed to ``onnx_dc.compress`` with the command line grammar.
Exit code 2 with one line on stderr when something is missing (dataset,
model, library build).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import onnx_dc
from onnx_dc.api.recipe import Recipe
from onnx_dc.errors import LibraryNotFoundError, OnnxDcError
from onnx_dc.api.report import format_bytes


def run_demo(
    model_name: str = "lenet_300_100",
    *,
    workdir: Path,
    sparsity: str | None = None,
    bits: str | None = None,
    index_bits: str | None = None,
    init: str | None = None,
    out=None,
) -> dict[str, float | int | str]:
    """Compress a zoo model into ``workdir``, print the table, accuracies and sizes; return the figures."""
    out = out if out is not None else sys.stdout
    from model_zoo import get_model_path
    from model_zoo.evaluate import evaluate

    source = get_model_path(model_name)
    compressed = workdir / f"{model_name}.dc.onnx"
    restored = workdir / f"{model_name}.decompressed.onnx"
    settings = {"sparsity": sparsity, "bits": bits, "index_bits": index_bits, "init": init}
    given = {k: v for k, v in settings.items() if v is not None}

    print(f"Compressing {source.name} with {_describe(given)} ...", file=out)
    result = onnx_dc.compress(source, compressed, Recipe.build(**given), progress=sys.stderr.isatty())
    print(result.report.format_table(), file=out)
    onnx_dc.decompress(compressed, restored)

    before = evaluate(source)
    figures: dict[str, float | int | str] = {
        "model": model_name,
        "accuracy_before": before.accuracy,
        "ratio": result.report.ratio,
        "original_file_bytes": source.stat().st_size,
        "compressed_file_bytes": compressed.stat().st_size,
    }
    print("", file=out)
    print(f"top-1 accuracy, {before.n_images} Fashion-MNIST test images:", file=out)
    print(f"  original                             {100 * before.accuracy:6.2f} %", file=out)
    try:
        through_library = evaluate(compressed)
        figures["accuracy_custom_ops"] = through_library.accuracy
        print(f"  compressed, onnx-dc operator library {100 * through_library.accuracy:6.2f} %", file=out)
    except LibraryNotFoundError as exc:
        print(f"  compressed, onnx-dc operator library   (not built: {exc})", file=out)
    decompressed = evaluate(restored, custom_ops=False)
    figures["accuracy_decompressed"] = decompressed.accuracy
    print(f"  decompressed, plain onnxruntime      {100 * decompressed.accuracy:6.2f} %", file=out)
    print("", file=out)
    print("file sizes:", file=out)
    print(f"  original      {source.name:<32} {format_bytes(source.stat().st_size):>10}", file=out)
    print(
        f"  compressed    {compressed.name:<32} {format_bytes(compressed.stat().st_size):>10}"
        f"   ({source.stat().st_size / compressed.stat().st_size:.1f}x smaller)",
        file=out,
    )
    print(f"  decompressed  {restored.name:<32} {format_bytes(restored.stat().st_size):>10}", file=out)
    print(
        f"weights (every initializer, the paper's count): {format_bytes(result.report.original_bytes)} -> "
        f"{format_bytes(result.report.compressed_bytes)} ({result.report.ratio:.1f}x)",
        file=out,
    )
    return figures


def _describe(given: dict[str, str]) -> str:
    if not given:
        return "the default settings (no calibration data)"
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in given.items())


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m model_zoo.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet_300_100", choices=["lenet_300_100", "lenet5"])
    parser.add_argument("--keep", metavar="DIR", help="write the compressed and decompressed models here")
    parser.add_argument("--sparsity")
    parser.add_argument("--bits")
    parser.add_argument("--index-bits")
    parser.add_argument("--init")
    args = parser.parse_args(argv)
    try:
        if args.keep:
            workdir = Path(args.keep)
            workdir.mkdir(parents=True, exist_ok=True)
            run_demo(args.model, workdir=workdir, sparsity=args.sparsity, bits=args.bits, index_bits=args.index_bits, init=args.init)
        else:
            with tempfile.TemporaryDirectory(prefix="onnx_dc_demo_") as tmp:
                run_demo(args.model, workdir=Path(tmp), sparsity=args.sparsity, bits=args.bits, index_bits=args.index_bits, init=args.init)
    except OnnxDcError as exc:
        print(f"demo: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
