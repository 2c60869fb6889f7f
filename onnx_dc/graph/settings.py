"""Per-tensor compression settings: defaults per kind, user overrides, resolution.

Every setting (``sparsity``, ``quality``, ``bits``, ``index_bits``, ``init``)
is given either as one value for every tensor or as a list of ``KEY=VALUE``
rules (on the command line ``--bits fc=5,conv=8,'encoder.*'=6``; from Python a
string in the same grammar, a number, or a dict ``{"fc": 5, "encoder.*": 6}``
whose key ``None`` stands for every tensor).

A KEY is

* a kind: ``fc`` (MatMul/Gemm weights), ``conv`` (Conv/ConvTranspose kernels)
  or ``other`` (everything else);
* otherwise a tensor name or a glob over tensor names (``fnmatch`` syntax:
  ``*``, ``?``, ``[abc]``, case-sensitive). ``name:KEY`` forces KEY to be read
  as a name or glob (for a tensor that is really called ``fc``).

For each tensor the most specific rule wins: exact name > glob > kind > the
value given for every tensor > the built-in default of the tensor's kind
(:mod:`onnx_dc.graph.defaults`; ``fc`` and ``other`` weights of a model recognised
as a transformer by :mod:`onnx_dc.graph.transformers` get the transformer rows, and
their sources say so).
Between two matching globs the one with more literal (non-wildcard)
characters wins; on a tie, the one given last. ``sparsity`` and ``quality``
are two ways to choose the pruning threshold; the more specific of the two
applies (a tensor for which both are set at the same specificity is an error).

Biases (Gemm C, Conv B) and tensors with fewer than ``min_elements``
elements are left dense unless a rule names them exactly; ``--exclude GLOB``
leaves every matching tensor dense.

A key that is neither a kind nor matches any floating-point weight of the
model (an unknown name, a glob that matches nothing) is a
:class:`~onnx_dc.errors.SettingsError`, and so are out-of-range values.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from onnx_dc.errors import SettingsError
from onnx_dc.graph.defaults import DEFAULT_MIN_ELEMENTS, DEFAULTS, TRANSFORMER_DEFAULTS
from onnx_dc.graph.weights import KINDS, Weight

SETTING_NAMES: tuple[str, ...] = ("sparsity", "quality", "bits", "index_bits", "init")

INIT_METHODS: tuple[str, ...] = ("linear", "density", "random", "kmeans++")

# The built-in defaults per kind, DEFAULTS and DEFAULT_MIN_ELEMENTS, are in onnx_dc.graph.defaults
# (imported above), where the command line's help reads them without loading ONNX.

# Specificity levels, higher wins.
_BUILTIN, _ALL, _KIND, _GLOB, _NAME = range(5)
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Rule:
    """One parsed ``KEY=VALUE`` (or bare value) of one setting."""

    setting: str
    key: str | None  # None: applies to every tensor
    value: Any
    is_kind: bool
    position: int  # order given, later wins ties

    def level(self, weight_name: str) -> int | None:
        """Specificity with which this rule matches a tensor name, None when it does not."""
        if self.key is None:
            return _ALL
        if self.is_kind:
            return None
        if weight_name == self.key:
            return _NAME
        if fnmatch.fnmatchcase(weight_name, self.key):
            return _GLOB
        return None

    def describe(self) -> str:
        """The rule as the user wrote it, e.g. ``--bits fc=5``."""
        flag = "--" + self.setting.replace("_", "-")
        return f"{flag} {self.value}" if self.key is None else f"{flag} {self.key}={self.value}"


@dataclass(frozen=True)
class ResolvedSettings:
    """The settings one tensor is compressed with, and the rule that chose each."""

    sparsity: float | None
    quality: float | None
    bits: int
    index_bits: int
    init: str
    seed: int = 0
    sources: Mapping[str, str] = field(default_factory=dict)

    def to_tensor_settings(self):  # -> onnx_dc.codec.tensor.TensorSettings
        """The :class:`onnx_dc.codec.tensor.TensorSettings` for :func:`onnx_dc.codec.tensor.compress_tensor`."""
        from onnx_dc.codec.tensor import TensorSettings

        return TensorSettings(
            sparsity=self.sparsity,
            quality=self.quality,
            bits=self.bits,
            index_bits=self.index_bits,
            init=self.init,
            seed=self.seed,
        )


@dataclass(frozen=True)
class TensorPlan:
    """What happens to one weight: compressed with ``settings``, or left dense for ``skip_reason``."""

    weight: Weight
    settings: ResolvedSettings | None
    skip_reason: str | None = None


@dataclass
class CompressionSettings:
    """Parsed user settings; :meth:`plan` applies them to a model's weights."""

    rules: dict[str, list[Rule]] = field(default_factory=lambda: {name: [] for name in SETTING_NAMES})
    exclude: list[str] = field(default_factory=list)
    min_elements: int = DEFAULT_MIN_ELEMENTS
    seed: int = 0

    def plan(self, weights: Sequence[Weight], *, transformer: bool = False) -> list[TensorPlan]:
        """Decide, for every weight, whether and how it is compressed.

        ``transformer``: the model is a transformer (:func:`onnx_dc.graph.transformers.is_transformer`),
        so weights without a rule get :data:`~onnx_dc.graph.defaults.TRANSFORMER_DEFAULTS` of their kind.

        ``weights`` are all floating-point weights of the model (from
        :func:`onnx_dc.graph.weights.find_weights` with ``min_elements=0``): names and
        globs are checked against all of them, so a glob that matches only
        small tensors is not an error, but one that matches nothing is.
        """
        self._check_keys_match(weights)
        plans = []
        for weight in weights:
            reason = self._skip_reason(weight)
            if reason is not None:
                plans.append(TensorPlan(weight, None, reason))
            else:
                plans.append(TensorPlan(weight, self.resolve(weight.name, weight.kind, transformer=transformer)))
        return plans

    def resolve(self, name: str, kind: str, *, transformer: bool = False) -> ResolvedSettings:
        """The settings of one tensor of the given name and kind (``transformer``: as in :meth:`plan`)."""
        if kind not in KINDS:
            raise SettingsError(f"unknown tensor kind {kind!r} (expected one of {', '.join(KINDS)})")
        chosen: dict[str, Any] = {}
        sources: dict[str, str] = {}
        levels: dict[str, int] = {}
        for setting in SETTING_NAMES:
            best: Rule | None = None
            best_rank: tuple[int, int, int] = (-1, -1, -1)
            for rule in self.rules[setting]:
                if rule.is_kind:
                    level = _KIND if rule.key == kind else None
                else:
                    level = rule.level(name)
                if level is None:
                    continue
                literal = _literal_chars(rule.key) if level == _GLOB else 0
                rank = (level, literal, rule.position)
                if rank > best_rank:
                    best, best_rank = rule, rank
            if best is None and transformer and kind in TRANSFORMER_DEFAULTS:
                chosen[setting] = TRANSFORMER_DEFAULTS[kind][setting]
                sources[setting] = f"default for {kind} in a transformer"
                levels[setting] = _BUILTIN
            elif best is None:
                chosen[setting] = DEFAULTS[kind][setting]
                sources[setting] = f"default for {kind}"
                levels[setting] = _BUILTIN
            else:
                chosen[setting] = best.value
                sources[setting] = best.describe()
                levels[setting] = best_rank[0]
        sparsity, quality = chosen["sparsity"], chosen["quality"]
        if sparsity is not None and quality is not None:
            if levels["quality"] > levels["sparsity"]:
                sparsity = None
                sources["sparsity"] = sources["quality"]
            elif levels["sparsity"] > levels["quality"]:
                quality = None
                sources["quality"] = sources["sparsity"]
            else:
                raise SettingsError(
                    f"tensor {name!r}: both {sources['sparsity']} and {sources['quality']} apply "
                    "at the same specificity; give only one of sparsity and quality"
                )
        return ResolvedSettings(
            sparsity=sparsity,
            quality=quality,
            bits=chosen["bits"],
            index_bits=chosen["index_bits"],
            init=chosen["init"],
            seed=self.seed,
            sources=sources,
        )

    def _skip_reason(self, weight: Weight) -> str | None:
        for pattern in self.exclude:
            if weight.name == pattern or fnmatch.fnmatchcase(weight.name, pattern):
                return f"excluded by --exclude {pattern}"
        if self._named_exactly(weight.name):
            return None
        if weight.is_bias:
            return "bias"
        if weight.feeds_resize:
            # onnxruntime folds a constant table's reshapes and Resize into one constant; computed at run time
            # from a compressed table, its layout optimizer moves a Transpose into a cubic antialiased Resize,
            # which then fails (timm ViTs' position tables).
            return "read by a Resize (onnxruntime folds it into a constant; it stays one)"
        if len(weight.shape) <= 1:
            # Biases of MatMul + Add, normalisation scales and shifts: a few bytes each, and a
            # compressed one costs a DCDecompress node on every run.
            return "a vector (bias, scale or normalisation parameter)"
        if weight.n_elements < self.min_elements:
            return f"fewer than {self.min_elements} elements"
        return None

    def _named_exactly(self, name: str) -> bool:
        return any(
            rule.key == name and not rule.is_kind for rules in self.rules.values() for rule in rules
        )

    def _check_keys_match(self, weights: Sequence[Weight]) -> None:
        names = [w.name for w in weights]
        for setting in SETTING_NAMES:
            for rule in self.rules[setting]:
                if rule.key is None or rule.is_kind:
                    continue
                if not any(n == rule.key or fnmatch.fnmatchcase(n, rule.key) for n in names):
                    raise SettingsError(
                        f"{rule.describe()}: {rule.key!r} matches no floating-point weight of the model"
                    )
        for pattern in self.exclude:
            if not any(n == pattern or fnmatch.fnmatchcase(n, pattern) for n in names):
                raise SettingsError(f"--exclude {pattern}: matches no floating-point weight of the model")


SettingValue = str | int | float | Mapping[str, Any] | None


def parse_settings(
    *,
    sparsity: SettingValue = None,
    quality: SettingValue = None,
    bits: SettingValue = None,
    index_bits: SettingValue = None,
    init: SettingValue = None,
    exclude: str | Sequence[str] | None = None,
    min_elements: int | str | None = None,
    seed: int = 0,
) -> CompressionSettings:
    """Parse user settings (CLI strings, numbers or dicts) into :class:`CompressionSettings`.

    Raises :class:`SettingsError` naming the option and value on any mistake.
    """
    result = CompressionSettings(seed=int(seed))
    position = 0
    for setting, value in (
        ("sparsity", sparsity),
        ("quality", quality),
        ("bits", bits),
        ("index_bits", index_bits),
        ("init", init),
    ):
        for key, raw in _split_rules(setting, value):
            is_kind = False
            if key is not None:
                if key.startswith("name:"):
                    key = key[len("name:") :]
                elif key in KINDS:
                    is_kind = True
                if not key:
                    raise SettingsError(f"{_flag(setting)}: empty tensor name in {value!r}")
            result.rules[setting].append(
                Rule(setting, key, _parse_value(setting, raw), is_kind, position)
            )
            position += 1
    if exclude is not None:
        patterns = [exclude] if isinstance(exclude, str) else list(exclude)
        for pattern in patterns:
            for item in _split_list(pattern):
                if not item:
                    raise SettingsError("--exclude: empty pattern")
                result.exclude.append(item)
    if min_elements is not None:
        result.min_elements = _parse_int("--min-elements", min_elements, 0, None)
    return result


def _flag(setting: str) -> str:
    return "--" + setting.replace("_", "-")


def _split_rules(setting: str, value: SettingValue) -> list[tuple[str | None, Any]]:
    """``value`` as (key or None, raw value) pairs in the order given."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        pairs = []
        for key, raw in value.items():
            if key is not None and (not isinstance(key, str) or not key):
                raise SettingsError(f"{_flag(setting)}: keys must be kinds, tensor names or globs, got {key!r}")
            pairs.append((key, raw))
        return pairs
    if isinstance(value, bool):
        raise SettingsError(f"{_flag(setting)}: invalid value {value!r}")
    if isinstance(value, (int, float)):
        return [(None, value)]
    if not isinstance(value, str):
        raise SettingsError(f"{_flag(setting)}: invalid value {value!r}")
    text = value.strip()
    if not text:
        raise SettingsError(f"{_flag(setting)}: empty value")
    pairs = []
    for item in _split_list(text):
        if not item:
            raise SettingsError(f"{_flag(setting)}: empty item in {value!r}")
        if "=" in item:
            key, raw = item.rsplit("=", 1)
            key = _unquote(key.strip())
            raw = raw.strip()
            if not key:
                raise SettingsError(f"{_flag(setting)}: missing key before '=' in {item!r}")
            pairs.append((key, raw))
        else:
            if len(_split_list(text)) > 1:
                raise SettingsError(
                    f"{_flag(setting)}: {item!r} has no KEY= (in a list every item is KEY=VALUE)"
                )
            pairs.append((None, item))
    return pairs


def _split_list(text: str) -> list[str]:
    """Split at commas outside single or double quotes."""
    items, current, quote = [], [], ""
    for ch in text:
        if quote:
            current.append(ch)
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
            current.append(ch)
        elif ch == ",":
            items.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    if quote:
        raise SettingsError(f"unbalanced quote in {text!r}")
    items.append("".join(current).strip())
    return items


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _parse_value(setting: str, raw: Any) -> Any:
    flag = _flag(setting)
    if setting == "sparsity":
        if raw is None or (isinstance(raw, str) and raw.strip().lower() == "none"):  # None: a recipe's "none"
            return None
        value = _parse_float(flag, raw, 0.0, 1.0)
        if value >= 1.0:
            raise SettingsError(
                f"{flag}: {raw!r} is out of range (must be at least 0 and below 1: sparsity 1 removes every weight)"
            )
        return value
    if setting == "quality":
        if raw is None or (isinstance(raw, str) and raw.strip().lower() == "none"):
            return None
        return _parse_float(flag, raw, 0.0, None)
    if setting == "bits":
        return _parse_int(flag, raw, 1, 8)
    if setting == "index_bits":
        return _parse_int(flag, raw, 1, 16)
    if setting == "init":
        text = str(raw).strip().lower() if isinstance(raw, str) else raw
        if text not in INIT_METHODS:
            raise SettingsError(f"{flag}: unknown initialisation {raw!r} (expected one of {', '.join(INIT_METHODS)})")
        return text
    raise SettingsError(f"unknown setting {setting!r}")


def _parse_float(flag: str, raw: Any, low: float, high: float | None) -> float:
    try:
        if isinstance(raw, bool):
            raise ValueError
        value = float(raw)
    except (TypeError, ValueError):
        raise SettingsError(f"{flag}: {raw!r} is not a number") from None
    if not math.isfinite(value) or value < low or (high is not None and value > high):
        bound = f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
        raise SettingsError(f"{flag}: {raw!r} is out of range (must be {bound})")
    return value


def _parse_int(flag: str, raw: Any, low: int, high: int | None) -> int:
    try:
        if isinstance(raw, bool):
            raise ValueError
        if isinstance(raw, float):
            if not raw.is_integer():
                raise ValueError
            value = int(raw)
        else:
            value = int(str(raw).strip())
    except (TypeError, ValueError):
        raise SettingsError(f"{flag}: {raw!r} is not an integer") from None
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise SettingsError(f"{flag}: {raw!r} is out of range (must be {bound})")
    return value


def _literal_chars(pattern: str | None) -> int:
    return 0 if pattern is None else sum(1 for ch in pattern if ch not in _GLOB_CHARS)
