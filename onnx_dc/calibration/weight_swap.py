"""One onnxruntime session whose chosen weights are inputs: candidates run without rebuilding the model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_dc.calibration.data import DEFAULT_BATCH_SIZE, CalibrationData
from onnx_dc.errors import CalibrationError, ModelError, first_line

__all__ = [
    "WeightSwapRunner",
]





class WeightSwapRunner:
    """Runs a model on fixed data with some initializers replaced, in one onnxruntime session.

    The named initializers become graph inputs of a copy of the model; each
    :meth:`run` feeds either their original values or the given replacements.
    """

    def __init__(
        self, model: onnx.ModelProto, names: Sequence[str], data: CalibrationData, *, batch_size: int = DEFAULT_BATCH_SIZE
    ) -> None:
        import onnxruntime as ort

        self.data = data
        self.batch_size = batch_size
        self.names = list(dict.fromkeys(names))
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        graph = copy.graph
        self.originals: dict[str, np.ndarray] = {}
        keep = []
        existing_inputs = {i.name for i in graph.input}
        for tensor in graph.initializer:
            if tensor.name in self.names:
                value = numpy_helper.to_array(tensor)
                self.originals[tensor.name] = value
                if tensor.name not in existing_inputs:
                    graph.input.append(
                        onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(value.shape))
                    )
            else:
                keep.append(tensor)
        missing = [n for n in self.names if n not in self.originals]
        if missing:
            raise ModelError(f"not initializers of the main graph: {', '.join(map(repr, missing))}")
        del graph.initializer[:]
        graph.initializer.extend(keep)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(copy.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelError(f"onnxruntime cannot run the model: {first_line(exc)}") from None
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, replacements: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """All outputs over all samples, concatenated along axis 0."""
        weights = dict(self.originals)
        for name, value in (replacements or {}).items():
            if name not in weights:
                raise ModelError(f"{name!r} is not one of the swappable weights")
            weights[name] = np.asarray(value).astype(self.originals[name].dtype).reshape(self.originals[name].shape)
        parts: dict[str, list[np.ndarray]] = {n: [] for n in self.output_names}
        for feed, _ in self.data.feeds(self.batch_size):
            try:
                values = self.session.run(self.output_names, {**feed, **weights})
            except Exception as exc:
                raise CalibrationError(f"onnxruntime failed on the evaluation data: {first_line(exc)}") from None
            for n, v in zip(self.output_names, values):
                v = np.asarray(v)
                parts[n].append(v if v.ndim else v.reshape(1))
        return {n: np.concatenate(p, axis=0) for n, p in parts.items()}
