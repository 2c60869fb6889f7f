"""Sequential mode's captures from cached activations: each layer's input computed from where the last one stopped.

In sequential mode (:func:`onnx_dc.calibration.model_fit.compress_with_calibration`) every
layer's statistics are captured with the upstream layers already compressed, on the
working model and on the original one (the cross terms). Capturing each layer with a
fresh run from the model inputs (:func:`onnx_dc.calibration.capture.capture_statistics`)
runs, over all layers, about half the model once per layer. :class:`SequentialCapture`
keeps, per model, the values computed so far for every calibration batch, and runs for
a layer only the nodes between the cached values and the layer's input:

* a value stays cached while a node that some later layer's input depends on reads it;
* when a layer's weight or bias changes in the working model, every cached value
  computed from it is dropped (the next layers recompute them from their inputs);
* the original model's values are never dropped that way (it does not change).

Over a chain of layers this runs the model about once in all instead of once per
layer. The statistics are the same sums over the same rows: the batches are those
of one :meth:`CalibrationData.feeds` pass (the first batch of a one-layer capture,
so identical for up to ``batch_size`` samples), and each node computes from the
same inputs. When the cached values exceed the memory budget after a capture they
are dropped (the next layer starts from the model inputs); when the model has
subgraphs (``If``, ``Loop``), :meth:`SequentialCapture.capture` returns None and the
caller captures the usual way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import onnx
from onnx import helper

from onnx_dc.calibration.capture import LayerStatistics, _Runner, _value_types
from onnx_dc.calibration.data import CalibrationData
from onnx_dc.calibration.layers import LayerSpec

__all__ = ["SequentialCapture"]


class _ValueCache:
    """The values of one model (by name, one array per calibration batch) computed so far."""

    def __init__(self, graph: onnx.GraphProto, batches: Sequence[dict[str, np.ndarray]]) -> None:
        self.batches = batches
        self.producers = {out: index for index, node in enumerate(graph.node) for out in node.output if out}
        self.graph = graph
        self.constants = {t.name for t in graph.initializer}
        self.values: dict[str, list[np.ndarray]] = {}

    @property
    def n_bytes(self) -> int:
        """Bytes held by the cached values."""
        return sum(a.nbytes for arrays in self.values.values() for a in arrays)

    def nodes_for(self, name: str) -> tuple[list[int], list[str]]:
        """The nodes (indices, in graph order) to run for ``name`` from the cached values, and the cached values
        they read."""
        nodes: set[int] = set()
        boundary: list[str] = []
        stack, seen = [name], set()
        while stack:
            value = stack.pop()
            if value in seen or value in self.constants:
                continue
            seen.add(value)
            if value in self.values:
                boundary.append(value)
                continue
            index = self.producers.get(value)
            if index is not None and index not in nodes:
                nodes.add(index)
                stack.extend(n for n in self.graph.node[index].input if n)
        return sorted(nodes), boundary


class SequentialCapture:
    """Captures for sequential mode that reuse the values computed for earlier layers (module docstring).

    Args:
        model: the original model (its structure is the working model's; not modified).
        data: the calibration samples.
        layers: the layers to be captured, in the order they will be.
        batch_size: samples per run.
        max_memory_bytes: at most this many bytes of cached values (both models) are kept after a capture;
            beyond, they are all dropped and the next layer starts from the model inputs again.
    """

    def __init__(
        self, model: onnx.ModelProto, data: CalibrationData, layers: Sequence[LayerSpec], *,
        batch_size: int, max_memory_bytes: int,
    ) -> None:
        self.enabled = not _has_subgraphs(model.graph)
        self.reference = model
        self.max_memory_bytes = max_memory_bytes
        self.order = {layer.weight: index for index, layer in enumerate(layers)}
        feeds = list(data.feeds(batch_size)) if self.enabled else []
        self.counts = [count for _, count in feeds]
        batches = [feed for feed, _ in feeds]
        self.caches = {"working": _ValueCache(model.graph, batches), "reference": _ValueCache(model.graph, batches)}
        self.last_use = _last_use(model.graph, [layer.activation for layer in layers])
        self.consumers = _consumers(model.graph)

    def capture(self, working: onnx.ModelProto, layer: LayerSpec, *, with_reference: bool) -> LayerStatistics | None:
        """``layer``'s statistics on ``working`` (and the cross terms with the original model's input when
        ``with_reference``); None when the cache cannot serve (capture the usual way then)."""
        if not self.enabled:
            return None
        values = self._compute(working, "working", layer.activation)
        reference = self._compute(self.reference, "reference", layer.activation) if with_reference else None
        stats = LayerStatistics.empty(layer, with_reference=with_reference)
        for index, count in enumerate(self.counts):
            stats.update(values[index], None if reference is None else reference[index])
            stats.n_samples += count
        self._evict(self.order[layer.weight])
        if sum(cache.n_bytes for cache in self.caches.values()) > self.max_memory_bytes:
            for cache in self.caches.values():  # the next layer starts from the model inputs again
                cache.values.clear()
        return stats

    def changed(self, names: Iterable[str | None]) -> None:
        """The working model's initializers ``names`` were replaced: drop the values computed from them."""
        if not self.enabled:
            return
        cache = self.caches["working"]
        stack = [n for n in names if n]
        stale: set[str] = set(stack)
        while stack:
            for index in self.consumers.get(stack.pop(), ()):
                for out in self.reference.graph.node[index].output:
                    if out and out not in stale:
                        stale.add(out)
                        stack.append(out)
        for name in stale:
            cache.values.pop(name, None)

    def _compute(self, model: onnx.ModelProto, which: str, name: str) -> list[np.ndarray]:
        """``name`` per batch in ``model``, running only the nodes between the cached values and it."""
        cache = self.caches[which]
        if name in cache.values:
            return cache.values[name]
        nodes, boundary = cache.nodes_for(name)
        if not nodes:  # a model input
            return [np.asarray(batch[name]) for batch in cache.batches]
        types = _value_types(model)
        keep = [name] + sorted(n for n in self._kept_outputs(model, nodes) - {name} if n in types)
        runner = _Runner(_submodel(model, nodes, boundary, keep, cache), keep)
        fetched: dict[str, list[np.ndarray]] = {n: [] for n in keep}
        for index, batch in enumerate(cache.batches):
            feed = {**batch, **{b: cache.values[b][index] for b in boundary}}
            for key, value in runner.run(feed).items():
                fetched[key].append(np.asarray(value))
        cache.values.update(fetched)
        return fetched[name]

    def _kept_outputs(self, model: onnx.ModelProto, nodes: Sequence[int]) -> set[str]:
        """Outputs of ``nodes`` read by nodes outside them: what the next layers' runs may start from."""
        inside = set(nodes)
        kept = set()
        for index in nodes:
            for out in model.graph.node[index].output:
                if out and any(c not in inside for c in self.consumers.get(out, ())):
                    kept.add(out)
        return kept

    def _evict(self, done: int) -> None:
        """Drop the cached values no node needed by a later layer's input reads."""
        for cache in self.caches.values():
            for name in list(cache.values):
                if all(self.last_use.get(c, -1) <= done for c in self.consumers.get(name, ())):
                    del cache.values[name]


def _has_subgraphs(graph: onnx.GraphProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute)


def _consumers(graph: onnx.GraphProto) -> dict[str, list[int]]:
    """Per value name, the indices of the nodes reading it."""
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(graph.node):
        for name in dict.fromkeys(n for n in node.input if n):
            consumers.setdefault(name, []).append(index)
    return consumers


def _last_use(graph: onnx.GraphProto, activations: Sequence[str]) -> dict[int, int]:
    """Per node index, the position in ``activations`` of the last one that depends on the node."""
    producers = {out: index for index, node in enumerate(graph.node) for out in node.output if out}
    last: dict[int, int] = {}
    for position, activation in enumerate(activations):
        stack, seen = [activation], set()
        while stack:
            index = producers.get(stack.pop())
            if index is None or index in seen:
                continue
            seen.add(index)
            last[index] = position
            stack.extend(n for n in graph.node[index].input if n)
    return last


def _submodel(
    model: onnx.ModelProto, nodes: Sequence[int], boundary: Sequence[str], outputs: Sequence[str],
    cache: _ValueCache,
) -> onnx.ModelProto:
    """The nodes of ``model`` at indices ``nodes`` (ascending) as a model reading the ``boundary`` values as
    inputs, returning ``outputs``."""
    graph = model.graph
    ordered = [graph.node[index] for index in nodes]
    used = {n for node in ordered for n in node.input if n}
    inputs = [i for i in graph.input if i.name in used and i.name not in cache.values]
    for name in boundary:
        arrays = cache.values[name]
        dims = [d if all(a.shape[k] == d for a in arrays) else None for k, d in enumerate(arrays[0].shape)]
        inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(arrays[0].dtype), dims))
    types = _value_types(model)
    result = helper.make_model(
        helper.make_graph(
            ordered, graph.name, inputs, [_output_info(types, name) for name in outputs],
            [t for t in graph.initializer if t.name in used],
        ),
        opset_imports=model.opset_import, ir_version=model.ir_version,
    )
    result.functions.extend(model.functions)
    return result


def _output_info(types: dict[str, onnx.ValueInfoProto], name: str) -> onnx.ValueInfoProto:
    info = onnx.ValueInfoProto()
    found = types.get(name)
    if found is not None:
        info.CopyFrom(found)
    else:
        info.name = name
        info.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    return info
