"""Real pretrained ONNX models shipped inside PyPI wheels, with realistic inputs and task metrics.

Typical use::

    from model_zoo import real
    model = real.get("ppocrv4-rec")
    calib = model.make_inputs("calib", 64, seed=0)
    evaluation = model.make_inputs("eval", 64, seed=0)
    model.task_metric(reference_session, candidate_session, evaluation)[model.primary]

See ``model_zoo/real/README.md`` for what each model contains and how the metrics work.
"""

from __future__ import annotations

from model_zoo.real.fetch import CACHE_DIR_ENV, WheelFile, cache_dir, fetch_wheel_file
from model_zoo.real.registry import SPLITS, RealModel, Sample, as_runner, get, list_models, stack_feeds

__all__ = [
    "CACHE_DIR_ENV",
    "SPLITS",
    "RealModel",
    "Sample",
    "WheelFile",
    "as_runner",
    "cache_dir",
    "fetch_wheel_file",
    "get",
    "list_models",
    "stack_feeds",
]
