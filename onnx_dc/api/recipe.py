"""The recipe: everything that decides a compression, in one typed, immutable object.

A :class:`Recipe` is what :func:`onnx_dc.compress` takes, what the command line
builds from its flags (or reads with ``--recipe FILE``), what ``--json`` and
``inspect`` print back and what the compressed model carries in its metadata
(``onnx_dc.recipe``), so that any result can be reproduced from what it printed.
Data are not part of it: calibration and evaluation inputs are passed beside it.

Per-tensor settings (``sparsity``, ``quality``, ``bits``, ``index_bits``,
``init``) are *rules*: ``(key, value)`` pairs in the order given, where the key
is ``None`` (every tensor), a kind (``fc``, ``conv``, ``other``), a tensor name or
a glob; the most specific match wins, later rules break ties, and what no rule
sets takes the built-in default of the tensor's kind
(:data:`onnx_dc.graph.settings.DEFAULTS`). The JSON form writes a rule set as
one value (every tensor) or an object ``{key: value}`` with ``"*"`` for every
tensor and ``"name:..."`` for a tensor whose name is a kind (or ``*``)::

    {"format": "onnx-dc recipe", "version": 1,
     "sparsity": {"fc": 0.9, "conv": 0.6}, "bits": {"fc": 5, "conv": 8},
     "index_bits": {}, "init": {}, "quality": {}, "exclude": [], "min_elements": 256, "seed": 0,
     "precision": "bf16x3",
     "calibration": {"samples": 4096, "criterion": "auto", ...},
     "search": {"min_cosine": 0.999, "max_drop": null, ...} | null}
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from onnx_dc.calibration.budget import Budget
from onnx_dc.calibration.data import DEFAULT_MAX_SAMPLES
from onnx_dc.calibration.metrics import task_metric_spec
from onnx_dc.calibration.options import CalibrationOptions
from onnx_dc.errors import SettingsError
from onnx_dc.graph.operators import MATMUL_PRECISIONS
from onnx_dc.graph.settings import DEFAULT_MIN_ELEMENTS, KINDS, SETTING_NAMES, CompressionSettings, parse_settings

__all__ = ["CalibrationRecipe", "Recipe", "Rules", "SearchRecipe", "load_recipe", "METADATA_KEY"]

RECIPE_FORMAT = "onnx-dc recipe"
RECIPE_VERSION = 1
METADATA_KEY = "onnx_dc.recipe"
"""``metadata_props`` key of the compressed model holding its recipe as JSON."""

RuleValue = float | int | str | None
Rules = tuple[tuple[str | None, RuleValue], ...]
"""Rules of one per-tensor setting: ``(key or None for every tensor, value)`` in the order given."""

_EVERY_TENSOR = "*"
_NAME_PREFIX = "name:"


@dataclass(frozen=True)
class CalibrationRecipe:
    """How calibration data are used when given (``--calib``): how many samples, and the fits.

    Attributes:
        samples: at most this many calibration samples are used (None: all of them).
        holdout: calibration samples held apart from the fits (seeded by the recipe's seed): the
            search's budget data when no evaluation data are given. 0: the search holds apart a
            fifth of the samples (at most 2048) and the fits use them all.
        options: the fits (:class:`onnx_dc.calibration.options.CalibrationOptions`).
    """

    samples: int | None = DEFAULT_MAX_SAMPLES
    holdout: int = 0
    options: CalibrationOptions = field(default_factory=CalibrationOptions)

    def __post_init__(self) -> None:
        if self.samples is not None and (isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1):
            raise SettingsError(f"--calib-samples must be an integer >= 1, got {self.samples!r}")
        if isinstance(self.holdout, bool) or not isinstance(self.holdout, int) or self.holdout < 0:
            raise SettingsError(f"calibration holdout must be an integer >= 0, got {self.holdout!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: ``samples``, ``holdout`` and the options' fields."""
        options = {f.name: getattr(self.options, f.name) for f in fields(self.options)}
        return {"samples": self.samples, "holdout": self.holdout, **options}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CalibrationRecipe:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        data = dict(data)
        samples = data.pop("samples", DEFAULT_MAX_SAMPLES)
        holdout = data.pop("holdout", 0)
        known = {f.name for f in fields(CalibrationOptions)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SettingsError(f"recipe: unknown calibration option(s) {', '.join(unknown)}")
        try:
            options = CalibrationOptions(**data)
        except TypeError as exc:
            raise SettingsError(f"recipe: calibration: {exc}") from None
        return cls(samples=samples, holdout=holdout, options=options)


@dataclass(frozen=True)
class SearchRecipe:
    """The automatic search of per-layer sparsity and bits within a budget (needs calibration data).

    Attributes:
        min_cosine: every output's cosine with the original's must stay at least this.
        max_drop: top-1 accuracy may drop by at most this many percentage points (needs labelled ``--eval`` data).
        drop_margin_se: with ``max_drop``, meet it by this many standard errors of the measured drop.
        metric: a task metric, ``"module:function"`` or a callable ``f(original_outputs, compressed_outputs) -> float``
            (lists of arrays in the model's output order, higher is better); the recipe records its
            ``module:function`` (:func:`onnx_dc.calibration.metrics.load_task_metric`).
        min_metric: the task metric's lowest allowed score on the search data (needs ``metric``).
        sparsities: the sparsities tried per layer (None: the default grid for the model's size).
        bits: the weight bits tried per layer (None: the default grids, per layer kind).
    """

    min_cosine: float | None = None
    max_drop: float | None = None
    drop_margin_se: float = 0.0
    sparsities: tuple[float, ...] | None = None
    bits: tuple[int, ...] | None = None
    metric: str | Callable[..., object] | None = None
    min_metric: float | None = None

    def __post_init__(self) -> None:
        if (self.metric is None) != (self.min_metric is None):
            raise SettingsError("--metric and --min-metric go together: the metric's score is the budget")
        self.budget  # validates
        if self.metric is not None and not callable(self.metric):
            if not isinstance(self.metric, str) or self.metric.count(":") != 1 or self.metric.startswith(":") or self.metric.endswith(":"):
                raise SettingsError(f"--metric must be 'module:function' or a callable, got {self.metric!r}")
        if self.drop_margin_se and self.max_drop is None:
            raise SettingsError("--drop-margin-se is used with --max-drop")
        margin = self.drop_margin_se
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not (math.isfinite(margin) and margin >= 0):
            raise SettingsError(f"--drop-margin-se must be a finite number >= 0, got {margin!r}")
        if self.sparsities is not None:
            object.__setattr__(self, "sparsities", tuple(_number(s, "--search-sparsities", float) for s in self.sparsities))
            if not self.sparsities:
                raise SettingsError("--search-sparsities: empty list")
        if self.bits is not None:
            object.__setattr__(self, "bits", tuple(_number(b, "--search-bits", int) for b in self.bits))
            if not self.bits:
                raise SettingsError("--search-bits: empty list")

    @property
    def budget(self) -> Budget:
        """The budget as the search checks it."""
        return Budget(min_cosine=self.min_cosine, max_drop=self.max_drop, min_metric=self.min_metric)

    @property
    def metric_spec(self) -> str | None:
        """The task metric as recorded: its ``module:function`` (a callable's module and qualified name)."""
        if self.metric is None or isinstance(self.metric, str):
            return self.metric
        return task_metric_spec(self.metric)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "min_cosine": self.min_cosine,
            "max_drop": self.max_drop,
            "drop_margin_se": self.drop_margin_se,
            "sparsities": None if self.sparsities is None else list(self.sparsities),
            "bits": None if self.bits is None else list(self.bits),
            "metric": self.metric_spec,
            "min_metric": self.min_metric,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchRecipe:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SettingsError(f"recipe: unknown search option(s) {', '.join(unknown)}")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()})


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a compression (module docstring); immutable and validated when made.

    Attributes:
        sparsity: fraction of each tensor's weights pruned by magnitude (rules, see :data:`Rules`).
        quality: prune ``|w| < quality * std(w)`` (the paper's rule) instead, where it applies.
        bits: bits per shared weight (``2**bits`` centroids), 1..8.
        index_bits: bits per relative index of sparse tensors, 1..16.
        init: k-means initialisation (``linear``, ``density``, ``random``, ``kmeans++``).
        exclude: names or globs of tensors left dense.
        min_elements: tensors with fewer elements are left dense (unless named by a rule).
        seed: random seed (random k-means initialisations, held-out splits).
        precision: the arithmetic of the compressed MatMuls: ``"bf16x3"`` (default) lets CPUs with
            AMX-BF16 multiply in three bfloat16 passes, within about 1e-5 of the largest output (a
            thousandth of a 5-bit codebook's quantization error); ``"float"`` keeps float32 throughout.
        calibration: how calibration data are used when given.
        search: the automatic search within a budget, or None for the settings as given.
    """

    sparsity: Rules = ()
    quality: Rules = ()
    bits: Rules = ()
    index_bits: Rules = ()
    init: Rules = ()
    exclude: tuple[str, ...] = ()
    min_elements: int = DEFAULT_MIN_ELEMENTS
    seed: int = 0
    precision: str = "bf16x3"
    calibration: CalibrationRecipe = field(default_factory=CalibrationRecipe)
    search: SearchRecipe | None = None

    def __post_init__(self) -> None:
        for name in SETTING_NAMES:
            object.__setattr__(self, name, as_rules(name, getattr(self, name)))
        exclude = (self.exclude,) if isinstance(self.exclude, str) else tuple(self.exclude)
        object.__setattr__(self, "exclude", exclude)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise SettingsError(f"--seed must be an integer, got {self.seed!r}")
        if self.precision not in MATMUL_PRECISIONS:
            raise SettingsError(f"--precision must be one of {', '.join(MATMUL_PRECISIONS)}, got {self.precision!r}")
        self.settings()  # validates every rule now, not when the model is compressed

    @classmethod
    def build(cls, base: Recipe | None = None, **changes: Any) -> Recipe:
        """``base`` (default: the defaults) with the given fields replaced; ``None`` values are ignored.

        Per-tensor settings take what :data:`Rules` does or the command line's
        text (``"fc=0.9,conv=0.6"``) or a dict ``{key: value}`` (``None`` or
        ``"*"`` for every tensor).
        """
        base = base or cls()
        return replace(base, **{k: v for k, v in changes.items() if v is not None})

    def settings(self) -> CompressionSettings:
        """The parsed settings (:class:`onnx_dc.graph.settings.CompressionSettings`) the converter plans with."""
        return parse_settings(
            **{name: (dict(getattr(self, name)) if getattr(self, name) else None) for name in SETTING_NAMES},
            exclude=list(self.exclude) or None,
            min_elements=self.min_elements,
            seed=self.seed,
        )

    def without_search(self, per_tensor: Mapping[str, Mapping[str, RuleValue]]) -> Recipe:
        """This recipe with the search replaced by explicit per-tensor settings (what a search chose).

        ``per_tensor`` maps a tensor name to the settings chosen for it
        (``{"sparsity": 0.9, "bits": 4, "index_bits": 5}``); each becomes a rule naming the tensor.
        """
        rules: dict[str, list[tuple[str | None, RuleValue]]] = {n: list(getattr(self, n)) for n in SETTING_NAMES}
        for tensor, chosen in per_tensor.items():
            for setting, value in chosen.items():
                key = _NAME_PREFIX + tensor if tensor in KINDS else tensor
                rules[setting] = [r for r in rules[setting] if r[0] != key] + [(key, value)]
                if setting == "sparsity":  # a named sparsity overrides a named quality
                    rules["quality"] = [r for r in rules["quality"] if r[0] != key]
        return replace(self, search=None, **{n: tuple(r) for n, r in rules.items()})

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (module docstring)."""
        document: dict[str, Any] = {"format": RECIPE_FORMAT, "version": RECIPE_VERSION}
        for name in SETTING_NAMES:
            document[name] = _rules_to_json(getattr(self, name))
        document["exclude"] = list(self.exclude)
        document["min_elements"] = self.min_elements
        document["seed"] = self.seed
        document["precision"] = self.precision
        document["calibration"] = self.calibration.to_dict()
        document["search"] = None if self.search is None else self.search.to_dict()
        return document

    def to_json(self) -> str:
        """:meth:`to_dict` as compact JSON text."""
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> Recipe:
        """Inverse of :meth:`to_dict`. Raises :class:`~onnx_dc.errors.SettingsError` on anything unknown."""
        if not isinstance(document, Mapping):
            raise SettingsError("recipe: expected a JSON object")
        document = dict(document)
        if document.pop("format", RECIPE_FORMAT) != RECIPE_FORMAT:
            raise SettingsError(f"recipe: not an onnx-dc recipe (\"format\" must be {RECIPE_FORMAT!r})")
        version = document.pop("version", RECIPE_VERSION)
        if version != RECIPE_VERSION:
            raise SettingsError(f"recipe: version {version!r} is not supported (this onnx-dc reads version {RECIPE_VERSION})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(document) - known)
        if unknown:
            raise SettingsError(f"recipe: unknown key(s) {', '.join(unknown)}")
        values: dict[str, Any] = {}
        for name in SETTING_NAMES:
            if name in document:
                values[name] = _rules_from_json(name, document[name])
        if "exclude" in document:
            values["exclude"] = tuple(document["exclude"] or ())
        for name in ("min_elements", "seed", "precision"):
            if name in document:
                values[name] = document[name]
        if document.get("calibration") is not None:
            values["calibration"] = CalibrationRecipe.from_dict(document["calibration"])
        if document.get("search") is not None:
            values["search"] = SearchRecipe.from_dict(document["search"])
        try:
            return cls(**values)
        except TypeError as exc:
            raise SettingsError(f"recipe: {exc}") from None

    def describe(self) -> str:
        """One line for the report: the settings that differ from the defaults."""
        parts = []
        for name in SETTING_NAMES:
            rules = getattr(self, name)
            if rules:
                parts.append(f"--{name.replace('_', '-')} {_rules_to_text(rules)}")
        if self.exclude:
            parts.extend(f"--exclude {p}" for p in self.exclude)
        if self.min_elements != DEFAULT_MIN_ELEMENTS:
            parts.append(f"--min-elements {self.min_elements}")
        if self.seed:
            parts.append(f"--seed {self.seed}")
        if self.precision != "bf16x3":
            parts.append(f"--precision {self.precision}")
        if self.search is not None:
            s = self.search
            if s.min_cosine is not None:
                parts.append(f"--min-cosine {s.min_cosine:g}")
            if s.max_drop is not None:
                parts.append(f"--max-drop {s.max_drop:g}")
            if s.metric is not None:
                parts.append(f"--metric {s.metric_spec} --min-metric {s.min_metric:g}")
            if s.drop_margin_se:
                parts.append(f"--drop-margin-se {s.drop_margin_se:g}")
        return " ".join(parts) if parts else "the defaults"


def as_rules(setting: str, value: Any) -> Rules:
    """Normalise one setting to :data:`Rules` (from rules, a dict, a number, or the command line's text)."""
    if value is None:
        return ()
    if isinstance(value, tuple) and all(isinstance(r, tuple) and len(r) == 2 for r in value):
        return tuple((_canonical_key(k), v) for k, v in value)
    if isinstance(value, Mapping):
        return tuple((None if k in (None, _EVERY_TENSOR) else _canonical_key(k), v) for k, v in value.items())
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        parsed = parse_settings(**{setting: value}).rules[setting]
        return tuple((_NAME_PREFIX + r.key if r.key in KINDS and not r.is_kind else r.key, r.value) for r in parsed)
    raise SettingsError(f"--{setting.replace('_', '-')}: invalid value {value!r}")


def _canonical_key(key: Any) -> str | None:
    """A rule key as the recipe keeps it: ``name:`` only where the name is a kind or ``*``."""
    if key is None:
        return None
    if not isinstance(key, str) or not key:
        raise SettingsError(f"recipe: rule keys must be kinds, tensor names or globs, got {key!r}")
    name = key[len(_NAME_PREFIX):] if key.startswith(_NAME_PREFIX) else key
    if key.startswith(_NAME_PREFIX) or name == _EVERY_TENSOR:
        return _NAME_PREFIX + name if name in KINDS or name == _EVERY_TENSOR else name
    return key


def load_recipe(source: str | os.PathLike) -> Recipe:
    """A recipe from a JSON file, or from the metadata of a model onnx-dc compressed (``.onnx``).

    Raises:
        SettingsError: unreadable file, not a recipe, or a model without one.
    """
    path = Path(source)
    if not path.is_file():
        raise SettingsError(f"--recipe {source}: no such file")
    if path.suffix.lower() == ".onnx":
        import onnx

        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception:  # noqa: BLE001 - any parse failure is the user's file
            raise SettingsError(f"--recipe {source}: not an ONNX model") from None
        text = {p.key: p.value for p in model.metadata_props}.get(METADATA_KEY)
        if text is None:
            raise SettingsError(f"--recipe {source}: the model carries no onnx-dc recipe (was it compressed by onnx-dc?)")
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError(f"--recipe {source}: cannot read it ({exc.__class__.__name__})") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SettingsError(f"--recipe {source}: not JSON ({exc.msg} at line {exc.lineno})") from None
    return Recipe.from_dict(document)


def _rules_to_json(rules: Rules) -> Any:
    if len(rules) == 1 and rules[0][0] is None:
        return rules[0][1]
    out: dict[str, RuleValue] = {}
    for key, value in rules:
        key = _EVERY_TENSOR if key is None else key
        out.pop(key, None)  # a repeated key: the later rule wins, so it goes last
        out[key] = value
    return out


def _rules_from_json(setting: str, value: Any) -> Rules:
    if isinstance(value, Mapping):
        return tuple((None if k == _EVERY_TENSOR else _canonical_key(k), v) for k, v in value.items())
    if value is None or isinstance(value, (int, float, str)):
        return () if value is None else ((None, value),)
    raise SettingsError(f"recipe: {setting} must be a value or an object of KEY: VALUE, got {value!r}")


def _rules_to_text(rules: Rules) -> str:
    def text(value: RuleValue) -> str:
        return "none" if value is None else str(value)

    if len(rules) == 1 and rules[0][0] is None:
        return text(rules[0][1])
    return ",".join(f"{'*' if k is None else k}={text(v)}" for k, v in rules)


def _number(value: Any, flag: str, kind: type) -> Any:
    try:
        if isinstance(value, bool):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{flag}: {value!r} is not {'an integer' if kind is int else 'a number'}") from None

