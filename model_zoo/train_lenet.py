"""Train the zoo's LeNet-300-100 and LeNet-5 on Fashion-MNIST and export them to ONNX.

Usage (from the repository root; needs the optional dependency ``pip install torch==2.13.0``)::

    python -m model_zoo.train_lenet --model all --out model_zoo/models

PyTorch is imported by this script only: onnx_dc and the evaluation code never need it.

Architectures (the papers' ones, Han et al. 2015/2016):

* ``lenet_300_100``: Flatten, fc1 784->300, ReLU, fc2 300->100, ReLU, fc3 100->10.
* ``lenet5`` (Caffe variant): conv1 20@5x5, maxpool 2, conv2 50@5x5, maxpool 2,
  fc1 800->500, ReLU, fc2 500->10 (no ReLU after the convolutions, as in Caffe's LeNet).

Both ONNX models take ``input`` float32 ``[N, 1, 28, 28]`` (pixels / 255, see
:mod:`model_zoo.fashion_mnist`) with a dynamic batch axis and return ``logits``
float32 ``[N, 10]``. Fully connected layers are ``Gemm`` nodes with ``transB=1``
(weights stored ``[out, in]``, the layout PyTorch exporters produce), convolutions
are ``Conv``; initializer names follow the PyTorch parameter names
(``fc1.weight``, ``conv2.bias``...). The graph is written with ``onnx.helper``
from the trained parameters rather than by ``torch.onnx.export`` so that the
file is the same whatever exporter a PyTorch version defaults to; the script
checks it with ``onnx.checker`` and checks that onnxruntime reproduces
PyTorch's logits before writing it (atomically).

Training: the whole 60 000-image training split (no test image is ever seen;
``--holdout N`` keeps N training images apart to tune hyperparameters on),
AdamW with a one-cycle learning-rate schedule, random horizontal flips (both
models) and random shifts of up to 2 pixels (LeNet-5 only: on a 5 000-image
holdout the shifts cost LeNet-300-100 about 2 pp, it cannot fit them), dropout
before the last layer, fixed seeds and deterministic algorithms.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from model_zoo.fashion_mnist import CLASS_NAMES, load_fashion_mnist, validation_set

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError:  # pragma: no cover - exercised only without the optional dependency
    sys.exit("train_lenet needs PyTorch (optional dependency): pip install torch==2.13.0")

OPSET = 17
IR_VERSION = 8  # opset 17's IR version: loadable by every onnxruntime the project supports
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


@dataclass(frozen=True)
class TrainingRecipe:
    """Hyperparameters of one model's training run."""

    epochs: int
    batch_size: int
    max_lr: float
    weight_decay: float
    dropout: float
    max_shift_px: int
    flip: bool


RECIPES = {
    "lenet_300_100": TrainingRecipe(
        epochs=40, batch_size=128, max_lr=2e-3, weight_decay=1e-4, dropout=0.2, max_shift_px=0, flip=True
    ),
    "lenet5": TrainingRecipe(
        epochs=30, batch_size=128, max_lr=2e-3, weight_decay=1e-4, dropout=0.3, max_shift_px=2, flip=True
    ),
}


class LeNet300100(nn.Module):
    """784-300-100-10 fully connected network with ReLU."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, 10)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(self.dropout(x))


class LeNet5(nn.Module):
    """Caffe's LeNet-5: conv 20@5x5, maxpool 2, conv 50@5x5, maxpool 2, fc 500, ReLU, fc 10."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, kernel_size=5)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.fc2 = nn.Linear(500, 10)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.conv1(x), 2)
        x = F.max_pool2d(self.conv2(x), 2)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(self.dropout(x))


ARCHITECTURES = {"lenet_300_100": LeNet300100, "lenet5": LeNet5}
DESCRIPTIONS = {
    "lenet_300_100": "LeNet-300-100 (784-300-100-10 fully connected, ReLU) trained on Fashion-MNIST",
    "lenet5": "LeNet-5 Caffe variant (conv 20@5x5, maxpool, conv 50@5x5, maxpool, fc 500, ReLU, fc 10) "
    "trained on Fashion-MNIST",
}


def _augment(images: torch.Tensor, generator: torch.Generator, recipe: TrainingRecipe) -> torch.Tensor:
    """Random horizontal flip and random integer shift (zero fill) of a [B, 1, 28, 28] batch."""
    batch = images.shape[0]
    if recipe.flip:
        flip = torch.rand(batch, generator=generator) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    shift = recipe.max_shift_px
    if shift > 0:
        padded = F.pad(images[:, 0], (shift, shift, shift, shift))
        offset_y = torch.randint(0, 2 * shift + 1, (batch,), generator=generator)
        offset_x = torch.randint(0, 2 * shift + 1, (batch,), generator=generator)
        span = torch.arange(28)
        rows = (offset_y[:, None] + span)[:, :, None]
        cols = (offset_x[:, None] + span)[:, None, :]
        images = padded[torch.arange(batch)[:, None, None], rows, cols][:, None]
    return images


def _predict_logits(model: nn.Module, images: np.ndarray, batch_size: int = 2000) -> np.ndarray:
    model.eval()
    outputs = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.array(images[start : start + batch_size], dtype=np.float32))
            outputs.append(model(batch).numpy())
    return np.concatenate(outputs)


def train_model(
    name: str,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    recipe: TrainingRecipe,
    *,
    seed: int,
    log_every_epochs: int = 5,
) -> nn.Module:
    """Train one zoo architecture on the given images and return it in eval mode."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    shuffle_rng = np.random.default_rng(seed + 2)
    model = ARCHITECTURES[name](dropout=recipe.dropout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.max_lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = math.ceil(len(train_images) / recipe.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.max_lr, epochs=recipe.epochs, steps_per_epoch=steps_per_epoch
    )
    images_t = torch.from_numpy(np.array(train_images, dtype=np.float32))
    labels_t = torch.from_numpy(np.array(train_labels, dtype=np.int64))
    start_time = time.perf_counter()
    for epoch in range(1, recipe.epochs + 1):
        model.train()
        order = torch.from_numpy(shuffle_rng.permutation(len(train_images)))
        total_loss = 0.0
        for step in range(steps_per_epoch):
            batch_idx = order[step * recipe.batch_size : (step + 1) * recipe.batch_size]
            batch = _augment(images_t[batch_idx], generator, recipe)
            loss = F.cross_entropy(model(batch), labels_t[batch_idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(batch_idx)
        if epoch % log_every_epochs == 0 or epoch == recipe.epochs:
            elapsed = time.perf_counter() - start_time
            print(f"  {name} epoch {epoch}/{recipe.epochs}: train loss {total_loss / len(train_images):.4f} "
                  f"({elapsed:.0f} s)", flush=True)
    model.eval()
    return model


def _initializer(name: str, tensor: torch.Tensor) -> TensorProto:
    return numpy_helper.from_array(tensor.detach().numpy().astype(np.float32), name=name)


def _gemm(layer: str, x: str, y: str) -> onnx.NodeProto:
    return helper.make_node("Gemm", [x, f"{layer}.weight", f"{layer}.bias"], [y], name=layer, transB=1)


def build_onnx(name: str, model: nn.Module, metadata: dict[str, str]) -> onnx.ModelProto:
    """Write the trained network as an ONNX graph (opset 17, dynamic batch, input/logits)."""
    params = dict(model.named_parameters())
    initializers = [_initializer(param_name, tensor) for param_name, tensor in params.items()]
    if name == "lenet_300_100":
        nodes = [
            helper.make_node("Flatten", [INPUT_NAME], ["flatten"], name="flatten", axis=1),
            _gemm("fc1", "flatten", "fc1_out"),
            helper.make_node("Relu", ["fc1_out"], ["relu1"], name="relu1"),
            _gemm("fc2", "relu1", "fc2_out"),
            helper.make_node("Relu", ["fc2_out"], ["relu2"], name="relu2"),
            _gemm("fc3", "relu2", OUTPUT_NAME),
        ]
    elif name == "lenet5":
        pool = {"kernel_shape": [2, 2], "strides": [2, 2]}
        nodes = [
            helper.make_node("Conv", [INPUT_NAME, "conv1.weight", "conv1.bias"], ["conv1_out"], name="conv1",
                             kernel_shape=[5, 5]),
            helper.make_node("MaxPool", ["conv1_out"], ["pool1"], name="pool1", **pool),
            helper.make_node("Conv", ["pool1", "conv2.weight", "conv2.bias"], ["conv2_out"], name="conv2",
                             kernel_shape=[5, 5]),
            helper.make_node("MaxPool", ["conv2_out"], ["pool2"], name="pool2", **pool),
            helper.make_node("Flatten", ["pool2"], ["flatten"], name="flatten", axis=1),
            _gemm("fc1", "flatten", "fc1_out"),
            helper.make_node("Relu", ["fc1_out"], ["relu1"], name="relu1"),
            _gemm("fc2", "relu1", OUTPUT_NAME),
        ]
    else:
        raise ValueError(f"unknown architecture {name!r}")
    graph = helper.make_graph(
        nodes,
        name,
        inputs=[helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 1, 28, 28])],
        outputs=[helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 10])],
        initializer=initializers,
    )
    graph.doc_string = DESCRIPTIONS[name]
    onnx_model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="onnx-dc model_zoo.train_lenet",
        producer_version=f"torch {torch.__version__}",
        ir_version=IR_VERSION,
        doc_string=DESCRIPTIONS[name] + "; input: float32 [N,1,28,28] pixels/255; output: logits [N,10]",
    )
    helper.set_model_props(onnx_model, metadata)
    onnx_model = onnx.shape_inference.infer_shapes(onnx_model, check_type=True, strict_mode=True)
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model


def check_onnx_matches_torch(onnx_model: onnx.ModelProto, torch_logits: np.ndarray, images: np.ndarray) -> float:
    """Run the ONNX model with onnxruntime and compare with PyTorch's logits; return max |diff|."""
    session = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    ort_logits = session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(images)})[0]
    max_abs_diff = float(np.max(np.abs(ort_logits - torch_logits)))
    if not np.allclose(ort_logits, torch_logits, rtol=1e-4, atol=1e-4):
        raise RuntimeError(f"onnxruntime and PyTorch disagree: max |diff| = {max_abs_diff:.3g}")
    if not np.array_equal(ort_logits.argmax(axis=1), torch_logits.argmax(axis=1)):
        raise RuntimeError("onnxruntime and PyTorch predict different classes")
    return max_abs_diff


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _save_atomically(onnx_model: onnx.ModelProto, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        onnx.save_model(onnx_model, tmp_name)
        os.chmod(tmp_name, 0o666 & ~_current_umask())  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _override_recipe(recipe: TrainingRecipe, overrides: list[str]) -> TrainingRecipe:
    fields = dict(recipe.__dict__)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            sys.exit(f"--recipe {item!r}: expected KEY=VALUE with KEY one of {', '.join(fields)}")
        kind = type(fields[key])
        fields[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return TrainingRecipe(**fields)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m model_zoo.train_lenet", description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=[*ARCHITECTURES, "all"], default="all")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "models",
                        help="directory for <model>.onnx (default: model_zoo/models)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epoch count")
    parser.add_argument("--recipe", action="append", default=[], metavar="KEY=VALUE",
                        help="override one TrainingRecipe field, e.g. --recipe dropout=0.5 (repeatable)")
    parser.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads (default 2)")
    parser.add_argument("--holdout", type=int, default=0,
                        help="keep N training images apart (model_zoo.fashion_mnist.validation_set, same seed) and "
                             "report accuracy on them, for tuning; 0 (default) trains on all 60 000")
    parser.add_argument("--no-save", action="store_true", help="train and report, write no file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    args = _parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    train_images, train_labels = load_fashion_mnist("train")
    test_images, test_labels = load_fashion_mnist("test")
    holdout = None
    if args.holdout:
        holdout = validation_set(args.holdout, seed=args.seed)
        keep = np.ones(len(train_labels), dtype=bool)
        keep[holdout.indices] = False
        train_images, train_labels = train_images[keep], train_labels[keep]
    command = "python -m model_zoo.train_lenet " + shlex.join(argv if argv is not None else sys.argv[1:])
    names = list(ARCHITECTURES) if args.model == "all" else [args.model]
    for name in names:
        recipe = RECIPES[name]
        if args.epochs is not None:
            recipe = TrainingRecipe(**{**recipe.__dict__, "epochs": args.epochs})
        recipe = _override_recipe(recipe, args.recipe)
        print(f"training {name}: {recipe} seed={args.seed} threads={args.threads} "
              f"on {len(train_labels)} training images", flush=True)
        start = time.perf_counter()
        model = train_model(name, train_images, train_labels, recipe, seed=args.seed)
        train_seconds = time.perf_counter() - start
        if holdout is not None:
            holdout_logits = _predict_logits(model, holdout.images)
            holdout_accuracy = float(np.mean(holdout_logits.argmax(axis=1) == holdout.labels))
            print(f"  {name}: holdout accuracy {100 * holdout_accuracy:.2f} % on {len(holdout)} training images")
        test_logits = _predict_logits(model, test_images)
        test_accuracy = float(np.mean(test_logits.argmax(axis=1) == test_labels))
        print(f"  {name}: trained in {train_seconds:.0f} s, PyTorch test accuracy {100 * test_accuracy:.2f} %")
        if args.no_save:
            continue
        metadata = {
            "dataset": "Fashion-MNIST (Debian dataset-fashion-mnist), 60000 training images",
            "input_preprocessing": "float32 [N,1,28,28], uint8 pixel / 255",
            "class_names": json.dumps(list(CLASS_NAMES)),
            "training_command": command,
            "training_recipe": json.dumps({**recipe.__dict__, "seed": args.seed, "optimizer": "AdamW",
                                           "schedule": "OneCycleLR", "holdout": args.holdout}),
            "training_environment": f"torch {torch.__version__}, {args.threads} threads, "
                                    f"python {platform.python_version()}, {platform.machine()}",
        }
        onnx_model = build_onnx(name, model, metadata)
        max_abs_diff = check_onnx_matches_torch(onnx_model, test_logits, test_images)
        path = args.out / f"{name}.onnx"
        _save_atomically(onnx_model, path)
        print(f"  {name}: wrote {path} ({path.stat().st_size} bytes); onnx.checker ok; "
              f"onnxruntime vs PyTorch max |diff| {max_abs_diff:.2e} on the 10000 test images", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
