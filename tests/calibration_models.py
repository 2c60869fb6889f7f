"""Small synthetic models and data for the calibration, sensitivity and autotune tests."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def classifier(seed: int = 0, sizes: tuple[int, ...] = (16, 48, 32, 6)):
    """An MLP classifier ``x [batch, 16] -> logits [batch, 6]``: Gemm (transB) + Relu layers, with biases."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    previous = "x"
    for i, (k, n) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = (rng.standard_normal((n, k)) * np.sqrt(2.0 / k)).astype(np.float32)
        b = (0.1 * rng.standard_normal(n)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"fc{i}.weight"), numpy_helper.from_array(b, f"fc{i}.bias")]
        out = f"fc{i}" if i < len(sizes) - 2 else "logits"
        nodes.append(helper.make_node("Gemm", [previous, f"fc{i}.weight", f"fc{i}.bias"], [out], transB=1))
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [out], [f"relu{i}"]))
            out = f"relu{i}"
        previous = out
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", sizes[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", sizes[-1]])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def inputs(n: int, seed: int, k: int = 16) -> np.ndarray:
    """Correlated float32 inputs ``[n, k]`` (a fixed mixing, so calibration and evaluation share a distribution)."""
    mixing = np.random.default_rng(12345).standard_normal((k, k)) / np.sqrt(k)
    return (np.random.default_rng(seed).standard_normal((n, k)) @ (np.eye(k) + mixing)).astype(np.float32)


def labelled(model, n: int, seed: int, noise: float = 0.05, margin: float = 0.25) -> dict[str, np.ndarray]:
    """Inputs and labels: the model's own prediction, with a fraction ``noise`` of labels replaced at random.

    Only inputs whose two best logits differ by more than ``margin`` times the
    logits' standard deviation are kept (a random network has many near ties,
    which any perturbation flips; trained networks have few).
    """
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = inputs(4 * n, seed)
    logits = session.run(None, {"x": x})[0]
    top2 = np.sort(logits, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > margin * logits.std()
    x, logits = x[clear][:n], logits[clear][:n]
    if len(x) < n:
        raise ValueError(f"only {len(x)} clear inputs; lower the margin")
    labels = logits.argmax(axis=1)
    rng = np.random.default_rng(seed + 1)
    flip = rng.random(n) < noise
    labels[flip] = rng.integers(0, logits.shape[1], size=int(flip.sum()))
    return {"x": x, "labels": labels.astype(np.int64)}
