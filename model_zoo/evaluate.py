"""Top-1 accuracy of a zoo model on the Fashion-MNIST test set, through onnxruntime.

Works on the original models, on compressed models (operators of the
``ai.onnx_dc`` domain, run through the onnx-dc custom operator library) and on
decompressed models (standard operators only)::

    python -m model_zoo.evaluate MODEL.onnx [--custom-ops | --no-custom-ops] [--limit N] [--batch-size B] [--json]

``MODEL`` may also be a zoo name (``lenet_300_100``, ``lenet5``). By default the
custom operator library is registered exactly when the model uses the
``ai.onnx_dc`` domain. Only numpy, onnx and onnxruntime are needed (no PyTorch).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnx_dc.errors import LibraryNotFoundError, ModelError, OnnxDcError, SettingsError
from model_zoo.fashion_mnist import N_CLASSES, LabelledImages, evaluation_set

__all__ = [
    "CUSTOM_OPS_DOMAIN",
    "AccuracyResult",
    "create_session",
    "evaluate",
    "evaluate_accuracy",
    "main",
    "predict_classes",
    "uses_custom_ops",
]

CUSTOM_OPS_DOMAIN = "ai.onnx_dc"
DEFAULT_BATCH_SIZE = 1000


@dataclass(frozen=True)
class AccuracyResult:
    """Outcome of one evaluation.

    Attributes:
        n_correct: images whose arg-max logit is the label.
        n_images: images evaluated.
        custom_ops: whether the onnx-dc operator library was registered in the session.
        split: the Fashion-MNIST split the images come from (``"test"`` unless another set was given).
    """

    n_correct: int
    n_images: int
    custom_ops: bool
    split: str

    @property
    def accuracy(self) -> float:
        """Top-1 accuracy as a fraction in [0, 1]."""
        return self.n_correct / self.n_images


def _load_model(model: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, str | bytes]:
    """Return the model proto (external data not loaded) and what to hand to InferenceSession."""
    if isinstance(model, onnx.ModelProto):
        return model, model.SerializeToString()
    path = Path(model)
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, ValueError, OSError... for non-ONNX input
        raise ModelError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
    if not proto.graph.node and not proto.graph.output:
        raise ModelError(f"{path}: not an ONNX model (empty graph)")
    return proto, str(path)


def _graph_uses_domain(graph: onnx.GraphProto, domain: str) -> bool:
    for node in graph.node:
        if node.domain == domain:
            return True
        for attribute in node.attribute:
            subgraphs = [attribute.g] if attribute.HasField("g") else []
            subgraphs += list(attribute.graphs)
            if any(_graph_uses_domain(subgraph, domain) for subgraph in subgraphs):
                return True
    return False


def uses_custom_ops(model: onnx.ModelProto) -> bool:
    """True when the model imports or uses the ``ai.onnx_dc`` operator domain (subgraphs and functions included)."""
    if any(opset.domain == CUSTOM_OPS_DOMAIN for opset in model.opset_import):
        return True
    if _graph_uses_domain(model.graph, CUSTOM_OPS_DOMAIN):
        return True
    return any(node.domain == CUSTOM_OPS_DOMAIN for function in model.functions for node in function.node)


def _custom_ops_library_path() -> str:
    try:
        from onnx_dc import ops_library_path

        return str(ops_library_path())
    except ImportError:
        # onnx_dc without its library module (a partial build): same situation as an unbuilt library.
        raise LibraryNotFoundError(
            "the onnx-dc custom operator library is not available in this onnx_dc installation"
        ) from None


def create_session(
    model: str | os.PathLike | onnx.ModelProto, *, custom_ops: bool | None = None
) -> tuple[ort.InferenceSession, bool]:
    """Open an onnxruntime CPU session on a model.

    Args:
        model: path of an .onnx file or a ModelProto.
        custom_ops: register the onnx-dc operator library (True), do not (False),
            or only if the model uses the ``ai.onnx_dc`` domain (None, default).

    Returns:
        ``(session, registered)`` where ``registered`` says whether the library was registered.

    Raises:
        ModelError: the file is missing or not ONNX, or onnxruntime cannot load it
            (for instance a compressed model opened without the library).
        LibraryNotFoundError: the library is required but not built.
    """
    proto, source = _load_model(model)
    needs_library = uses_custom_ops(proto)
    register = needs_library if custom_ops is None else bool(custom_ops)
    options = ort.SessionOptions()
    if register:
        library_path = _custom_ops_library_path()
        try:
            options.register_custom_ops_library(library_path)
        except Exception as exc:  # onnxruntime reports a bad library as a generic Fail
            raise LibraryNotFoundError(f"onnxruntime cannot load the custom operator library {library_path}: "
                                       f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}") from None
    try:
        session = ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ""
        if needs_library and not register:
            hint = f"; the model uses {CUSTOM_OPS_DOMAIN} operators: evaluate with custom ops or decompress it"
        raise ModelError(f"onnxruntime cannot load the model: {first_line}{hint}") from None
    return session, register


def _image_feed_shape(session: ort.InferenceSession) -> tuple[str, tuple[int, ...], int | None]:
    """Return (input name, per-image shape, fixed batch size or None) for a one-image-input model."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise ModelError(f"expected a model with one image input, this one has {len(inputs)} ({names})")
    spec = inputs[0]
    if spec.type != "tensor(float)":
        raise ModelError(f"input {spec.name!r} is {spec.type}, expected tensor(float) images")
    per_image = {4: (1, 28, 28), 3: (28, 28), 2: (784,)}.get(len(spec.shape))
    if per_image is None:
        raise ModelError(f"input {spec.name!r} has rank {len(spec.shape)}; expected [N,1,28,28], [N,28,28] or [N,784]")
    for declared, wanted in zip(spec.shape[1:], per_image):
        if isinstance(declared, int) and declared != wanted:
            raise ModelError(f"input {spec.name!r} has shape {spec.shape}; expected [N, {', '.join(map(str, per_image))}]")
    fixed_batch = spec.shape[0] if isinstance(spec.shape[0], int) and spec.shape[0] > 0 else None
    return spec.name, per_image, fixed_batch


def predict_classes(
    session: ort.InferenceSession, images: np.ndarray, *, batch_size: int = DEFAULT_BATCH_SIZE
) -> np.ndarray:
    """Arg-max class of the model's first output for float32 ``[N, 1, 28, 28]`` images, in batches.

    The images are reshaped to the rank the model's input declares; a model
    with a fixed batch dimension gets batches of exactly that size (the last
    one zero-padded).
    """
    if batch_size < 1:
        raise SettingsError(f"batch_size must be at least 1, got {batch_size}")
    input_name, per_image, fixed_batch = _image_feed_shape(session)
    step = fixed_batch or batch_size
    flat = np.asarray(images, dtype=np.float32).reshape(len(images), *per_image)
    output_name = session.get_outputs()[0].name
    predictions = []
    for start in range(0, len(flat), step):
        batch = flat[start : start + step]
        n_real = len(batch)
        if fixed_batch and n_real < fixed_batch:
            batch = np.concatenate([batch, np.zeros((fixed_batch - n_real, *per_image), np.float32)])
        try:
            logits = session.run([output_name], {input_name: np.ascontiguousarray(batch)})[0]
        except Exception as exc:  # onnxruntime's own exception types
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"onnxruntime failed running the model: {first_line}") from None
        logits = np.asarray(logits).reshape(len(batch), -1)
        if logits.shape[1] != N_CLASSES:
            raise ModelError(f"output {output_name!r} has {logits.shape[1]} values per image, expected {N_CLASSES}")
        predictions.append(logits[:n_real].argmax(axis=1))
    return np.concatenate(predictions) if predictions else np.zeros(0, dtype=np.int64)


def evaluate(
    model: str | os.PathLike | onnx.ModelProto,
    *,
    custom_ops: bool | None = None,
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    dataset: LabelledImages | None = None,
    data_dir: str | os.PathLike | None = None,
) -> AccuracyResult:
    """Top-1 accuracy of a model, by default on the Fashion-MNIST test set.

    Args:
        model: path or ModelProto: original, compressed or decompressed.
        custom_ops: see :func:`create_session` (None: register the library iff needed).
        limit: evaluate the first ``limit`` images only (all when None).
        batch_size: images per onnxruntime call.
        dataset: images and labels to use instead of the test set (e.g.
            :func:`model_zoo.fashion_mnist.validation_set` for a search budget).
        data_dir: where the Fashion-MNIST files are (default: searched).
    """
    if limit is not None and limit < 1:
        raise SettingsError(f"limit must be at least 1, got {limit}")
    session, registered = create_session(model, custom_ops=custom_ops)
    if dataset is None:
        dataset = evaluation_set(None if limit is None else min(limit, 10000), data_dir=data_dir)
    images, labels = dataset.images, dataset.labels
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    predictions = predict_classes(session, images, batch_size=batch_size)
    n_correct = int(np.count_nonzero(predictions == labels))
    return AccuracyResult(n_correct=n_correct, n_images=len(labels), custom_ops=registered, split=dataset.split)


def evaluate_accuracy(
    model: str | os.PathLike | onnx.ModelProto,
    *,
    custom_ops: bool | None = None,
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    dataset: LabelledImages | None = None,
) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of a model on the Fashion-MNIST test set; see :func:`evaluate`."""
    return evaluate(model, custom_ops=custom_ops, limit=limit, batch_size=batch_size, dataset=dataset).accuracy


def _resolve_model_argument(argument: str) -> Path:
    path = Path(argument)
    if path.exists() or path.suffix == ".onnx" or os.sep in argument:
        return path
    from model_zoo import MODELS, get_model_path

    if argument in MODELS:
        return get_model_path(argument)
    return path


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 for user mistakes)."""
    parser = argparse.ArgumentParser(
        prog="python -m model_zoo.evaluate",
        description="Top-1 accuracy of a Fashion-MNIST zoo model (original, compressed or decompressed) "
        "on the Fashion-MNIST test set, with onnxruntime.",
    )
    parser.add_argument("model", help="an .onnx file or a zoo model name (lenet_300_100, lenet5)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--custom-ops", dest="custom_ops", action="store_true", default=None,
                       help="register the onnx-dc custom operator library (default: only if the model needs it)")
    group.add_argument("--no-custom-ops", dest="custom_ops", action="store_false",
                       help="never register the custom operator library")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate the first N test images only")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="B")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of a sentence")
    args = parser.parse_args(argv)
    try:
        path = _resolve_model_argument(args.model)
        result = evaluate(path, custom_ops=args.custom_ops, limit=args.limit, batch_size=args.batch_size)
    except OnnxDcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"model": str(path), "accuracy": result.accuracy, "n_correct": result.n_correct,
                          "n_images": result.n_images, "split": result.split, "custom_ops": result.custom_ops}))
    else:
        runtime = "onnx-dc custom operator library" if result.custom_ops else "standard operators"
        print(f"{path}: top-1 accuracy {100 * result.accuracy:.2f} % ({result.n_correct}/{result.n_images} "
              f"Fashion-MNIST {result.split} images; onnxruntime, {runtime})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
