"""Recognising transformer models, whose fully connected weights get their own data-free defaults.

A model is treated as a transformer when any of its graphs (subgraphs included) has

* a normalisation over the feature axis: ``LayerNormalization``, ``RMSNormalization``,
  or onnxruntime's ``SimplifiedLayerNormalization``, ``SkipLayerNormalization``,
  ``SkipSimplifiedLayerNormalization``, ``EmbedLayerNormalization``;
* an attention operator: com.microsoft ``Attention``, ``MultiHeadAttention``,
  ``GroupQueryAttention``, ``PackedAttention``, ``PackedMultiHeadAttention``, or
  ONNX ``Attention`` (opset 23);
* attention written out: a ``Softmax`` whose input comes, through at most
  :data:`_SCORE_DEPTH` elementwise or shape-only nodes (scaling, masking), from a
  ``MatMul`` of two activations (queries times keys; neither input is a constant).

CNNs and MLPs have none of these (a classifier's final Softmax follows a MatMul with
a weight), so their defaults are unchanged. :func:`transformer_evidence` says what
was found, for the report.
"""

from __future__ import annotations

import onnx

from onnx_dc.graph.model_io import attribute_subgraphs

__all__ = ["TRANSFORMER_OPS", "is_transformer", "transformer_evidence"]

TRANSFORMER_OPS: frozenset[str] = frozenset({
    "LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization", "EmbedLayerNormalization",
    "Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention", "PackedMultiHeadAttention",
})

_SCORE_DEPTH = 4
_SCORE_PATH_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Where", "Cast", "Reshape", "Transpose", "Identity"})


def transformer_evidence(model: onnx.ModelProto) -> str | None:
    """What makes ``model`` a transformer (e.g. ``"13 LayerNormalization nodes"``), or None when nothing does."""
    counts: dict[str, int] = {}
    scores = 0
    for graph in _graphs(model.graph):
        for node in graph.node:
            if node.op_type in TRANSFORMER_OPS:
                counts[node.op_type] = counts.get(node.op_type, 0) + 1
        scores += _attention_softmax_count(graph)
    if counts:
        op, count = max(counts.items(), key=lambda item: (item[1], item[0]))
        return f"{count} {op} node{'s' if count != 1 else ''}"
    if scores:
        return f"{scores} attention Softmax node{'s' if scores != 1 else ''} (Softmax of a MatMul of two activations)"
    return None


def is_transformer(model: onnx.ModelProto) -> bool:
    """True when ``model`` is recognised as a transformer (module docstring)."""
    return transformer_evidence(model) is not None


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            for subgraph in attribute_subgraphs(attribute):
                yield from _graphs(subgraph)


def _attention_softmax_count(graph: onnx.GraphProto) -> int:
    constants = {init.name for init in graph.initializer}
    constants |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    producer = {out: node for node in graph.node for out in node.output}

    def reaches_scores(name: str, depth: int) -> bool:
        node = producer.get(name)
        if node is None or depth > _SCORE_DEPTH:
            return False
        if node.op_type == "MatMul":
            return len(node.input) == 2 and not any(i in constants for i in node.input)
        if node.op_type not in _SCORE_PATH_OPS:
            return False
        return any(reaches_scores(i, depth + 1) for i in node.input if i and i not in constants)

    return sum(1 for node in graph.node if node.op_type == "Softmax" and node.input and reaches_scores(node.input[0], 0))
