"""The models of the side-by-side benchmark, each with its data splits and task metric.

A :class:`BenchCase` holds the original ONNX file, calibration feeds, evaluation
feeds, one batch-1 feed for latency, and :meth:`BenchCase.evaluate`, which runs a
candidate on the evaluation feeds and returns its task metric and its raw outputs
(for the tensor-fidelity columns).

* LeNet-300-100 and LeNet-5 (``model_zoo/models``): task metric = top-1 accuracy on
  the Fashion-MNIST **test** set; calibration images come from the **training**
  set (:func:`model_zoo.fashion_mnist.calibration_set`), never from the test set.
* The real models of :mod:`model_zoo.real`: task metric = the registry's primary
  metric (agreement of the candidate's task answers with the original's: boxes,
  strings, orientation; 1.0 = same answers) on the ``eval`` split; calibration from
  the ``calib`` split (independent random streams and disjoint source photos).
* The transformers of :mod:`model_zoo.real` (``TRANSFORMER_MODELS``): the same, with
  more of the metric's details in the table (embedding cosine and recall@1,
  perplexity of both models, transcript and state agreement); the latency input is
  one evaluation input (batch 1; the text models' 64 tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "LENET_MODELS",
    "REAL_MODELS",
    "TRANSFORMER_MODELS",
    "BenchCase",
    "Evaluation",
    "Runner",
    "load_case",
    "SplitSizes",
]

Feed = dict[str, np.ndarray]
Runner = Callable[[Feed], Sequence[np.ndarray]]

LENET_MODELS = ("lenet_300_100", "lenet5")
CNN_MODELS = ("ppocr-mobile-v2-cls", "ppocrv4-rec", "ppocrv4-det", "nudenet-320n")
TRANSFORMER_MODELS = ("minilm-l6", "smollm2-135m", "whisper-tiny-encoder", "vit-s-focus", "silero-vad")
REAL_MODELS = CNN_MODELS + TRANSFORMER_MODELS
# Metric details shown beside the primary metric in the table (key -> short label).
DETAIL_KEYS: dict[str, dict[str, str]] = {
    "minilm-l6": {"embedding_cosine": "cosine", "recall_at_1": "recall@1"},
    "smollm2-135m": {"perplexity_candidate": "ppl", "perplexity_ratio": "ppl ratio", "kl_divergence": "KL"},
    "whisper-tiny-encoder": {"token_agreement": "tokens", "state_cosine": "state cosine"},
    "vit-s-focus": {"map_cosine": "map cosine", "roi_iou": "ROI IoU"},
    "silero-vad": {"probability_mean_abs_diff": "mean abs dp", "teacher_forced_agreement": "forced"},
}

_LENET_BATCH = 1000


@dataclass(frozen=True)
class SplitSizes:
    """How many calibration, evaluation and (LeNets) search samples a case uses."""

    calib: int
    eval: int
    search: int = 0


# Full run: enough evaluation material for a metric resolution of about 1 % (the
# real models' README: >= 64 scenes for nudenet; the DB detector is slow, 16 pages
# hold about 86 boxes). Quick run: small, for the test and a first look.
FULL_SIZES: dict[str, SplitSizes] = {
    "lenet_300_100": SplitSizes(calib=2000, eval=10000, search=5000),
    "lenet5": SplitSizes(calib=2000, eval=10000, search=5000),
    "ppocr-mobile-v2-cls": SplitSizes(calib=32, eval=64),
    "ppocrv4-rec": SplitSizes(calib=32, eval=64),
    "ppocrv4-det": SplitSizes(calib=8, eval=16),
    "nudenet-320n": SplitSizes(calib=16, eval=64),
    # 256 sentences = 128 synopsis/description pairs; 64 windows of 64 tokens = 4096 tokens;
    # 16 Whisper windows of 4-20 s (about 60 tokens a window); 16 Silero streams of 32 chunks.
    "minilm-l6": SplitSizes(calib=96, eval=256),
    "smollm2-135m": SplitSizes(calib=32, eval=64),
    "whisper-tiny-encoder": SplitSizes(calib=8, eval=16),
    "vit-s-focus": SplitSizes(calib=16, eval=64),
    "silero-vad": SplitSizes(calib=128, eval=512),
}
QUICK_SIZES: dict[str, SplitSizes] = {
    "lenet_300_100": SplitSizes(calib=256, eval=2000, search=1000),
    "lenet5": SplitSizes(calib=256, eval=2000, search=1000),
    "ppocr-mobile-v2-cls": SplitSizes(calib=8, eval=16),
    "ppocrv4-rec": SplitSizes(calib=8, eval=16),
    "ppocrv4-det": SplitSizes(calib=2, eval=4),
    "nudenet-320n": SplitSizes(calib=4, eval=16),
    "minilm-l6": SplitSizes(calib=8, eval=16),
    "smollm2-135m": SplitSizes(calib=4, eval=4),
    "whisper-tiny-encoder": SplitSizes(calib=2, eval=2),
    "vit-s-focus": SplitSizes(calib=4, eval=8),
    "silero-vad": SplitSizes(calib=32, eval=64),
}


@dataclass
class Evaluation:
    """A candidate's task metric on the evaluation feeds, with its outputs in feed order."""

    metric: float
    details: dict[str, float]
    outputs: list[np.ndarray]


@dataclass
class BenchCase:
    """One model of the benchmark.

    Attributes:
        name: registry name.
        description: one line for the table heading.
        metric_name: what :attr:`Evaluation.metric` measures (higher is better).
        agreement_metric: True when the metric compares with the original (1.0 =
            same answers); False for an absolute metric (accuracy against labels).
        original_bytes: the original ONNX file.
        calib_feeds: calibration inputs (never used for evaluation).
        eval_feeds: evaluation inputs.
        latency_feed: the batch-1 input timed for latency (the first evaluation input).
        sizes: the split sizes used.
        search_data: LeNets only: labelled TRAINING images held apart from the
            calibration images (``{input: images, "labels": labels}``), the search
            data of onnx-dc's automatic mode with a top-1 budget.
    """

    name: str
    description: str
    metric_name: str
    agreement_metric: bool
    original_bytes: bytes
    calib_feeds: list[Feed]
    eval_feeds: list[Feed]
    latency_feed: Feed
    sizes: SplitSizes
    search_data: dict[str, np.ndarray] | None = None
    detail_keys: dict[str, str] = field(default_factory=dict)
    """Metric details the table shows beside the primary metric (key -> label)."""
    _metric: Callable[[Runner, Runner], dict[str, float]] = field(repr=False, default=None)
    _primary: str = "metric"
    _reference_cache: dict[int, list[np.ndarray]] = field(repr=False, default_factory=dict)

    def evaluate(self, reference: Runner, candidate: Runner) -> Evaluation:
        """Run ``candidate`` on every evaluation feed and compute the task metric.

        ``reference`` (the original model) is run once per feed over the life of the
        case and its outputs are reused for every later candidate.
        """
        recorded: dict[int, list[np.ndarray]] = {}
        known = {_feed_key(feed) for feed in self.eval_feeds}

        # Only the case's own feeds are cached and recorded: a metric may also run feeds
        # of its own (a recurrent model's carried state), whose ids Python reuses.
        def cached_reference(feed: Feed) -> list[np.ndarray]:
            key = _feed_key(feed)
            if key not in known:
                return [np.asarray(o) for o in reference(feed)]
            if key not in self._reference_cache:
                self._reference_cache[key] = [np.asarray(o) for o in reference(feed)]
            return self._reference_cache[key]

        def recording_candidate(feed: Feed) -> list[np.ndarray]:
            outputs = [np.asarray(o) for o in candidate(feed)]
            if _feed_key(feed) in known:
                recorded[_feed_key(feed)] = outputs
            return outputs

        details = self._metric(cached_reference, recording_candidate)
        outputs = []
        for feed in self.eval_feeds:
            key = _feed_key(feed)
            if key not in recorded:  # a metric that skipped a feed: run it for the fidelity columns
                recorded[key] = [np.asarray(o) for o in candidate(feed)]
            outputs.append(_flatten(recorded.pop(key)))
        return Evaluation(metric=float(details[self._primary]), details=details, outputs=outputs)

    def reference_outputs(self, reference: Runner) -> list[np.ndarray]:
        """The original model's outputs on the evaluation feeds (flattened per feed), cached."""
        result = []
        for feed in self.eval_feeds:
            key = _feed_key(feed)
            if key not in self._reference_cache:
                self._reference_cache[key] = [np.asarray(o) for o in reference(feed)]
            result.append(_flatten(self._reference_cache[key]))
        return result


def load_case(name: str, *, quick: bool, seed: int = 0) -> BenchCase:
    """Build the case of one model (fetching the real models on first use).

    Raises:
        ModelError: unknown model name, or a model that cannot be fetched.
    """
    from onnx_dc.errors import ModelError

    sizes = (QUICK_SIZES if quick else FULL_SIZES).get(name)
    if name in LENET_MODELS:
        return _lenet_case(name, sizes, seed)
    if name in REAL_MODELS:
        return _real_case(name, sizes, seed)
    raise ModelError(f"unknown benchmark model {name!r}; known: {', '.join(LENET_MODELS + REAL_MODELS)}")


def _lenet_case(name: str, sizes: SplitSizes, seed: int) -> BenchCase:
    from model_zoo import get_model, get_model_path
    from model_zoo.fashion_mnist import calibration_set, evaluation_set, validation_set

    entry = get_model(name)
    original = get_model_path(name).read_bytes()
    calib = calibration_set(sizes.calib, seed=seed)  # training images only
    search = validation_set(sizes.search, seed=seed)  # other training images, never test images
    test = evaluation_set(sizes.eval) if sizes.eval < 10000 else evaluation_set()
    images = np.ascontiguousarray(test.images, dtype=np.float32)
    labels = np.asarray(test.labels)
    eval_feeds = [
        {entry.input_name: images[start : start + _LENET_BATCH]} for start in range(0, len(images), _LENET_BATCH)
    ]
    calib_images = np.ascontiguousarray(calib.images, dtype=np.float32)
    calib_feeds = [
        {entry.input_name: calib_images[start : start + _LENET_BATCH]}
        for start in range(0, len(calib_images), _LENET_BATCH)
    ]

    def accuracy(reference: Runner, candidate: Runner) -> dict[str, float]:
        correct = 0
        agree = 0
        for start, feed in zip(range(0, len(labels), _LENET_BATCH), eval_feeds):
            predicted = np.asarray(candidate(feed)[0]).argmax(axis=-1)
            expected = np.asarray(reference(feed)[0]).argmax(axis=-1)
            batch_labels = labels[start : start + len(predicted)]
            correct += int((predicted == batch_labels).sum())
            agree += int((predicted == expected).sum())
        return {"accuracy": correct / len(labels), "top1_agreement": agree / len(labels)}

    return BenchCase(
        name=name,
        description=f"{entry.description}; Fashion-MNIST, calibration = {sizes.calib} training images, "
        f"evaluation = {len(labels)} test images",
        metric_name="top-1 accuracy (test set)",
        agreement_metric=False,
        original_bytes=original,
        calib_feeds=calib_feeds,
        eval_feeds=eval_feeds,
        latency_feed={entry.input_name: images[:1].copy()},
        sizes=SplitSizes(calib=sizes.calib, eval=len(labels), search=sizes.search),
        search_data={
            entry.input_name: np.ascontiguousarray(search.images, dtype=np.float32),
            "labels": np.asarray(search.labels, dtype=np.int64),
        },
        _metric=accuracy,
        _primary="accuracy",
    )


def _real_case(name: str, sizes: SplitSizes, seed: int) -> BenchCase:
    from model_zoo import real

    model = real.get(name)
    original = model.path().read_bytes()
    calib_feeds = model.make_inputs("calib", sizes.calib, seed=seed)
    eval_feeds = model.make_inputs("eval", sizes.eval, seed=seed)

    def metric(reference: Runner, candidate: Runner) -> dict[str, float]:
        return model.task_metric(reference, candidate, eval_feeds)

    return BenchCase(
        name=name,
        description=f"{model.description} ({model.source.requirement}, {model.source.member}); "
        f"calibration = {sizes.calib} 'calib' inputs, evaluation = {sizes.eval} 'eval' inputs",
        metric_name=f"{model.primary} vs original",
        agreement_metric=True,
        original_bytes=original,
        calib_feeds=calib_feeds,
        eval_feeds=eval_feeds,
        latency_feed=eval_feeds[0],
        sizes=sizes,
        detail_keys=DETAIL_KEYS.get(name, {}),
        _metric=metric,
        _primary=model.primary,
    )


def _feed_key(feed: Feed) -> int:
    # Feeds are the case's own dicts, alive for the whole run: their identity is a stable key.
    return id(feed)


def _flatten(outputs: Sequence[np.ndarray]) -> np.ndarray:
    # float32 (the models' own precision): a language model's logits on 64 windows are 0.8 GB already.
    return np.concatenate([np.asarray(o, dtype=np.float32).ravel() for o in outputs])
