"""Sanity table for the real models: each metric against itself, against noisy copies, and against truth.

Run ``python -m model_zoo.real.check`` (``--help`` for options). For every registered
model it fetches the file, generates evaluation inputs, and prints:

* the task metric of the model against itself (must be perfect),
* the task metric against copies whose weights carry Gaussian noise of a few
  relative levels (it must drop, more for more noise),
* where the generator knows the truth (the OCR models), how well the original model
  does on the generated inputs - evidence that the inputs are realistic.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_dc.errors import ModelError

from model_zoo.real.registry import get, list_models


_WEIGHT_INPUTS = {"Conv": 1, "ConvTranspose": 1, "MatMul": 1, "Gemm": 1}


def add_weight_noise(model: onnx.ModelProto, relative_std: float, seed: int = 0) -> onnx.ModelProto:
    """A copy of ``model`` whose Conv/ConvTranspose/MatMul/Gemm weights carry Gaussian noise.

    The noise of each weight tensor (initializer or Constant node, subgraphs included)
    has ``relative_std`` times that tensor's standard deviation. Other tensors
    (normalisation statistics, shapes, scalars) are left alone: noise there can turn a
    variance negative and the model's output into NaN, which degrades nothing realistic.
    """
    noisy = onnx.ModelProto()
    noisy.CopyFrom(model)
    rng = np.random.default_rng(seed)
    graphs = list(_graphs(noisy.graph))
    weight_names = {
        node.input[_WEIGHT_INPUTS[node.op_type]]
        for graph in graphs
        for node in graph.node
        if node.op_type in _WEIGHT_INPUTS and len(node.input) > _WEIGHT_INPUTS[node.op_type]
    }

    def perturb(tensor: onnx.TensorProto, name: str) -> None:
        values = numpy_helper.to_array(tensor)
        if name not in weight_names or values.dtype.kind != "f":
            return
        scale = float(values.std()) * relative_std
        changed = (values + rng.normal(0.0, scale, size=values.shape)).astype(values.dtype)
        tensor.CopyFrom(numpy_helper.from_array(changed, tensor.name))

    for graph in graphs:
        for initializer in graph.initializer:
            perturb(initializer, initializer.name)
        for node in graph.node:
            if node.op_type == "Constant":
                for attribute in node.attribute:
                    if attribute.name == "value":
                        perturb(attribute.t, node.output[0])
    return noisy


def _graphs(graph: onnx.GraphProto):
    """``graph`` and every subgraph nested in its nodes' attributes."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from _graphs(subgraph)


def make_session(model: onnx.ModelProto | str | os.PathLike, threads: int = 1):
    """A CPU onnxruntime session of a model (proto or path) with ``threads`` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> int:
    """Print the sanity table; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m model_zoo.real.check", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(list_models()), help="comma-separated names (default: all)")
    parser.add_argument("--n", type=int, default=16, help="evaluation inputs per model (default 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", default="0.02,0.05,0.1,0.2", help="relative weight-noise levels")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    noise_levels = [float(level) for level in args.noise.split(",") if level]
    for name in args.models.split(","):
        model = get(name)
        started = time.perf_counter()
        reference = make_session(model.path(), args.threads)
        samples = model.make_samples("eval", args.n, args.seed)
        inputs = [sample.feed for sample in samples]
        print(f"== {name} ({model.source.requirement}, {model.source.member}); primary metric: {model.primary}")
        itself = model.task_metric(reference, reference, inputs)
        print(f"  vs itself        : {_format(itself, model.primary)}")
        for level in noise_levels:
            candidate = make_session(add_weight_noise(model.load(), level, seed=args.seed), args.threads)
            print(f"  vs noise {level:<8g}: {_format(model.task_metric(reference, candidate, inputs), model.primary)}")
        try:
            truth = model.truth_metric(reference, samples)
        except ModelError as error:  # models without ground truth say so
            print(f"  vs truth         : n/a ({error})")
        else:
            print(f"  vs truth         : {', '.join(f'{k}={v:.4f}' for k, v in truth.items())}")
        print(f"  ({time.perf_counter() - started:.1f} s)")
    return 0


def _format(result: dict[str, float], primary: str) -> str:
    others = ", ".join(f"{key}={value:.4g}" for key, value in result.items() if key != primary)
    return f"{primary}={result[primary]:.4f} ({others})"


if __name__ == "__main__":
    sys.exit(main())
