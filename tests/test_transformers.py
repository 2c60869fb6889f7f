"""Transformer models through the converter: the exported BERT / GPT of tests/models and onnxruntime's fused BERT.

The models are made by tests/models/make_transformers.py (torch, run once);
these tests need only the ONNX files. Each is compressed with the data-free
defaults and with 8 bits unpruned, run through the operator library and
decompressed, and compared with the original as onnxruntime runs it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graph_builders import ops_library  # noqa: F401  (fixture)
from onnx import helper as h

from onnx_dc.api.convert import compress_model, prepare_model
from onnx_dc.api.recipe import Recipe
from onnx_dc.graph import operators
from onnx_dc.graph.activations import ACTIVATION_KINDS
from onnx_dc.graph.operators import CONV_OP, DOMAIN, GATHER_OP, MATMUL_OP
from onnx_dc.graph.restore import decompress_model, find_containers

MODELS = Path(__file__).resolve().parent / "models"
NAMES = ["bert_ts", "bert_dynamo", "gpt_ts", "gpt_dynamo", "gpt_ts_nofold", "bert_ort_opt1", "bert_ort_opt2"]
UNPRUNED_8_BIT = Recipe.build(None, sparsity=0.0, bits=8)


def load(name: str) -> onnx.ModelProto:
    return onnx.load(str(MODELS / f"{name}.onnx"))


def feeds(model: onnx.ModelProto, batch: int = 2, length: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {"input_ids": rng.integers(0, 96, (batch, length)).astype(np.int64)}
    names = {i.name for i in model.graph.input}
    if "attention_mask" in names:
        mask = np.ones((batch, length), np.int64)
        mask[1:, length - 2:] = 0
        types = np.zeros((batch, length), np.int64)
        types[:, length // 2:] = 1
        out.update(attention_mask=mask, token_type_ids=types)
    return out


def run(model: onnx.ModelProto, inputs, library: str | None = None) -> np.ndarray:
    options = ort.SessionOptions()
    if library:
        options.register_custom_ops_library(library)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sum(a.astype(np.float64) * b) / np.linalg.norm(a) / np.linalg.norm(b))


def decompressed(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    decompress_model(out)
    return out


def structure(model: onnx.ModelProto) -> list[tuple]:
    return [(n.op_type, n.domain, n.name, list(n.input), list(n.output)) for n in model.graph.node]


def dc_ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node if n.domain == DOMAIN)


@pytest.fixture(scope="module")
def compressed_models():
    """name -> (original, {recipe label: CompressionResult})."""
    return {
        name: (load(name), {"defaults": compress_model(load(name), Recipe()), "8bit": compress_model(load(name), UNPRUNED_8_BIT)})
        for name in NAMES
    }


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("label", "min_cosine"), [("8bit", 0.999), ("defaults", 0.9)])
def test_outputs_match_the_original_through_the_library_and_decompressed(name, label, min_cosine, compressed_models, ops_library):
    original, results = compressed_models[name]
    compressed = results[label].model
    onnx.checker.check_model(compressed, full_check=True)
    for batch, length in ((1, 3), (2, 7), (3, 16)):  # dynamic batch and sequence
        inputs = feeds(original, batch, length)
        want = run(original, inputs)
        got = run(compressed, inputs, ops_library)
        plain = run(decompressed(compressed), inputs)
        assert got.shape == want.shape == plain.shape
        assert cosine(got, want) >= min_cosine and cosine(plain, want) >= min_cosine
        np.testing.assert_allclose(got, plain, rtol=1e-4, atol=1e-4 * float(np.abs(plain).max()))


def activations_of_node(node: onnx.NodeProto) -> bytes | None:
    return {a.name: h.get_attribute_value(a) for a in node.attribute}.get("activation")


def activations_of(model: onnx.ModelProto) -> list[bytes]:
    """The fused activations of the model's DCMatMul nodes, in graph order."""
    return [a for n in model.graph.node if n.op_type == MATMUL_OP and (a := activations_of_node(n))]


@pytest.mark.parametrize("name", NAMES)
def test_decompress_keeps_the_node_structure(name, compressed_models):
    original, results = compressed_models[name]
    prepared = onnx.ModelProto()
    prepared.CopyFrom(original)
    prepare_model(prepared)  # what was compressed: the tied head's copy read through a Transpose
    plain = decompressed(results["defaults"].model)
    onnx.checker.check_model(plain, full_check=True)
    assert structure(plain) == structure(prepared)
    assert not any(o.domain == DOMAIN for o in plain.opset_import)


@pytest.mark.parametrize("name", ["bert_ts", "bert_dynamo"])
def test_bert_exports(name, compressed_models):
    _, results = compressed_models[name]
    compressed = results["defaults"].model
    # Q, K, V, O, FFN in, FFN out per layer; the word and position embeddings (5-bit: the transformer defaults)
    assert dc_ops(compressed) == {MATMUL_OP: 12, GATHER_OP: 2}
    matmuls = [n for n in compressed.graph.node if n.op_type == MATMUL_OP]
    assert all(len(n.input) == 3 and n.input[2] for n in matmuls)  # every bias Add became the bias input
    assert results["defaults"].rewrite.fused_biases == 12
    assert activations_of(compressed) == [b"gelu", b"gelu"]  # the erf form, fused into the FFN's first DCMatMul
    kinds = {ref.original_name: ref.kind for ref in find_containers(compressed)}
    assert kinds["word_embeddings.weight"] == "other" and sum(k == "fc" for k in kinds.values()) == 12
    notes = results["defaults"].report.notes
    assert not any(n.startswith("decompressed at session start") for n in notes)  # the tables are read by DCGather
    assert any(n.startswith("left dense, a vector") and "LayerNormalization input 'Scale' x5" in n for n in notes)


@pytest.mark.parametrize("name", ["gpt_ts", "gpt_dynamo", "gpt_ts_nofold"])
def test_gpt_tied_head_reads_the_embedding_container(name, compressed_models):
    _, results = compressed_models[name]
    result = results["defaults"]
    compressed = result.model
    assert dc_ops(compressed) == {MATMUL_OP: 9, GATHER_OP: 2}  # wte and wpe (5-bit: the transformer defaults)
    (wte,) = [ref for ref in find_containers(compressed) if ref.original_name == "wte.weight"]
    assert sorted(n.op_type for _, n in wte.readers) == [GATHER_OP, MATMUL_OP]  # Gather and LM head, one container
    (head,) = [n for _, n in wte.readers if n.op_type == MATMUL_OP]
    assert {a.name: h.get_attribute_value(a) for a in head.attribute}["trans_b"] == 1
    assert wte.kind == "fc"
    assert activations_of(compressed) == [b"gelu_tanh", b"gelu_tanh"]
    weights_through_transpose = 9 if name == "gpt_ts_nofold" else 1
    assert result.rewrite.absorbed_transposes == weights_through_transpose
    if name != "gpt_ts_nofold":  # the exporter constant-folded wte.weight^T into a second initializer
        assert any("is 'wte.weight' transposed (read through a Transpose node): stored once" in n for n in result.report.notes)
    original_bytes = sum(t.ByteSize() for t in load(name).graph.initializer)
    assert result.report.original_bytes < original_bytes  # the copy is not counted: it is gone


@pytest.mark.parametrize("name", ["bert_ort_opt1", "bert_ort_opt2"])
def test_onnxruntime_fused_bert(name, compressed_models):
    _, results = compressed_models[name]
    result = results["defaults"]
    compressed = result.model
    # 2 Attention QKV, the word and position tables (5-bit: the transformer defaults)
    assert dc_ops(compressed) == {MATMUL_OP: 6, "DCDecompress": 4}
    rows = {r.name: r for r in result.report.tensors}
    assert rows["Attention_0_qkv_weight"].kind == "fc"  # the packed Q/K/V projection is a matrix
    assert rows["Attention_0_qkv_weight"].decompressed_for == ("com.microsoft Attention",)
    assert rows["word_embeddings.weight"].decompressed_for == ("com.microsoft EmbedLayerNormalization",)
    dense = {d.name: d.reason for d in result.report.dense}
    assert dense["Attention_0_qkv_bias"] == "com.microsoft Attention input 'bias': bias"
    assert dense["layers.0.attention_norm.weight"] == (
        "com.microsoft SkipLayerNormalization input 'gamma': a vector (bias, scale or normalisation parameter)"
    )
    assert dense["token_type_embeddings.weight"] == (
        "com.microsoft EmbedLayerNormalization input 'segment_embedding': fewer than 256 elements"
    )
    table = result.report.format_table()
    assert "'Attention_0_qkv_weight', 'Attention_1_qkv_weight' for com.microsoft Attention" in table
    # BiasGelu: Gelu with its bias, fused: the bias becomes DCMatMul's bias input
    fused = [n for n in compressed.graph.node if n.op_type == MATMUL_OP and activations_of_node(n)]
    assert [(activations_of_node(n), n.input[2]) for n in fused] == [
        (b"gelu", "layers.0.intermediate.bias"), (b"gelu", "layers.1.intermediate.bias"),
    ]


@pytest.mark.parametrize("name", ["bert_ts", "gpt_dynamo", "gpt_ts_nofold", "bert_ort_opt1"])
def test_with_the_runtime_switches_on(name, monkeypatch, ops_library):
    """DCGather and fused activations as they will be written once the runtime has them; decompress undoes both."""
    monkeypatch.setattr(operators, "RUNTIME_HAS_GATHER", True)
    every = frozenset(ACTIVATION_KINDS)
    monkeypatch.setattr(operators, "RUNTIME_ACTIVATIONS", {MATMUL_OP: every, CONV_OP: every})
    original = load(name)
    result = compress_model(original, UNPRUNED_8_BIT)
    compressed = result.model
    onnx.checker.check_model(compressed, full_check=True)
    activations = [
        {a.name: h.get_attribute_value(a) for a in n.attribute}.get("activation")
        for n in compressed.graph.node if n.op_type == MATMUL_OP
    ]
    expected = {"bert_ts": [b"gelu"] * 2, "gpt_dynamo": [b"gelu_tanh"] * 2, "gpt_ts_nofold": [b"gelu_tanh"] * 2,
                "bert_ort_opt1": [b"gelu"] * 2}[name]
    assert [a for a in activations if a] == expected
    gathers = dc_ops(compressed)[GATHER_OP]
    assert gathers == {"bert_ts": 1, "gpt_dynamo": 1, "gpt_ts_nofold": 1, "bert_ort_opt1": 0}[name]  # position tables stay dense
    if name.startswith("gpt"):
        assert dc_ops(compressed)["DCDecompress"] == 0  # wte: DCGather and the LM head's DCMatMul on one container
    prepared = onnx.ModelProto()
    prepared.CopyFrom(original)
    prepare_model(prepared)
    plain = decompressed(compressed)
    assert structure(plain) == structure(prepared)
    inputs = feeds(original)
    assert cosine(run(plain, inputs), run(original, inputs)) >= 0.999
