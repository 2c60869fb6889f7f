"""The onnx-dc model zoo: small trained ONNX models to compress, evaluate and benchmark.

Registry of the committed Fashion-MNIST LeNets::

    >>> from model_zoo import get_model_path
    >>> get_model_path("lenet_300_100")          # doctest: +SKIP
    PosixPath('.../model_zoo/models/lenet_300_100.onnx')

Modules: :mod:`model_zoo.fashion_mnist` (data and splits), :mod:`model_zoo.evaluate`
(top-1 accuracy through onnxruntime), :mod:`model_zoo.train_lenet` (training, needs PyTorch).
Importing this package does not itself import onnxruntime or PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from onnx_dc.errors import ModelError

__all__ = ["MODELS", "MODELS_DIR", "ZooModel", "get_model", "get_model_path", "list_models"]

MODELS_DIR = Path(__file__).resolve().parent / "models"


@dataclass(frozen=True)
class ZooModel:
    """One registered model.

    Attributes:
        name: registry key.
        filename: file name in :data:`MODELS_DIR`.
        description: what the network is.
        input_name, input_shape: the single input (``"batch"`` is the dynamic axis).
        output_name: the logits output, ``[batch, 10]``.
        dataset: what it was trained on.
        test_accuracy: top-1 accuracy (fraction) on the 10 000 Fashion-MNIST test images,
            as measured by ``python -m model_zoo.evaluate`` on the committed file.
        sha256: hex digest of the committed file.
    """

    name: str
    filename: str
    description: str
    input_name: str
    input_shape: tuple[str | int, ...]
    output_name: str
    dataset: str
    test_accuracy: float
    sha256: str

    @property
    def path(self) -> Path:
        """Absolute path of the model file."""
        return MODELS_DIR / self.filename


_IMAGE_INPUT = ("batch", 1, 28, 28)

MODELS: dict[str, ZooModel] = {
    model.name: model
    for model in (
        ZooModel(
            name="lenet_300_100",
            filename="lenet_300_100.onnx",
            description="LeNet-300-100: Flatten, Gemm 784->300, ReLU, Gemm 300->100, ReLU, Gemm 100->10",
            input_name="input",
            input_shape=_IMAGE_INPUT,
            output_name="logits",
            dataset="fashion-mnist",
            test_accuracy=0.8983,
            sha256="9a8b8593e850e937e6a87f1b184cd42682f30b224600c4d070a27c2a2e1c4973",
        ),
        ZooModel(
            name="lenet5",
            filename="lenet5.onnx",
            description="LeNet-5 (Caffe): Conv 20@5x5, MaxPool 2, Conv 50@5x5, MaxPool 2, Gemm 800->500, ReLU, "
            "Gemm 500->10",
            input_name="input",
            input_shape=_IMAGE_INPUT,
            output_name="logits",
            dataset="fashion-mnist",
            test_accuracy=0.9180,
            sha256="aafdaf493d7572e09008f06081d4bb3f9e9cf766d7bf9ea264f9802834ed934d",
        ),
    )
}


def list_models() -> list[str]:
    """Names of the registered models."""
    return list(MODELS)


def get_model(name: str) -> ZooModel:
    """The registry entry of a model.

    Raises:
        ModelError: no model of that name.
    """
    try:
        return MODELS[name]
    except KeyError:
        raise ModelError(f"unknown zoo model {name!r}; known: {', '.join(MODELS)}") from None


def get_model_path(name: str) -> Path:
    """Path of a registered model's .onnx file.

    Raises:
        ModelError: unknown name, or the file is missing from this checkout.
    """
    path = get_model(name).path
    if not path.is_file():
        raise ModelError(f"zoo model file {path} is missing; retrain with `python -m model_zoo.train_lenet`")
    return path
