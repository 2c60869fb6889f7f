"""Weights reached through a Transpose, stored twice, or gathered (rewrite, shared, DCGather behind its switch)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graph_builders import compress_all, ops_library, uniform_container  # noqa: F401  (fixture)
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnx_dc.api.convert import compress_model
from onnx_dc.api.recipe import Recipe
from onnx_dc.graph.operators import DOMAIN, GATHER_OP, MATMUL_OP
from onnx_dc.graph.restore import decompress_model, find_containers
from onnx_dc.graph.rewrite import apply_compression
from onnx_dc.graph.shared import share_duplicate_weights
from onnx_dc.graph.weights import find_weights


def run(model: onnx.ModelProto, feeds, library: str | None = None) -> list[np.ndarray]:
    options = ort.SessionOptions()
    if library:
        options.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def structure(model: onnx.ModelProto) -> list[tuple]:
    return [(n.op_type, n.domain, n.name, list(n.input), list(n.output)) for n in model.graph.node]


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: h.get_attribute_value(a) for a in node.attribute}


def decompressed(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    decompress_model(out)
    onnx.checker.check_model(out, full_check=True)
    return out


def tied_lm(*, folded: bool) -> onnx.ModelProto:
    """ids -> Gather(E [50, 32]) -> Tanh -> MatMul with E^T: as a Transpose node, or constant-folded (a copy)."""
    rng = np.random.default_rng(0)
    table = (rng.standard_normal((50, 32)) * 0.5).astype(np.float32)
    nodes = [h.make_node("Gather", ["E", "ids"], ["e"], name="embed"), h.make_node("Tanh", ["e"], ["t"], name="act")]
    inits = [nh.from_array(table, "E")]
    if folded:
        inits.append(nh.from_array(np.ascontiguousarray(table.T), "onnx::MatMul_7"))
        nodes.append(h.make_node("MatMul", ["t", "onnx::MatMul_7"], ["logits"], name="lm_head"))
    else:
        nodes += [
            h.make_node("Transpose", ["E"], ["E_t"], name="tie", perm=[1, 0]),
            h.make_node("MatMul", ["t", "E_t"], ["logits"], name="lm_head"),
        ]
    graph = h.make_graph(
        nodes, "tied", [h.make_tensor_value_info("ids", T.INT64, ["B", "S"])],
        [h.make_tensor_value_info("logits", T.FLOAT, ["B", "S", 50])], inits,
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


FEEDS = {"ids": np.array([[1, 7, 49, 0], [3, 3, 12, 8]], np.int64)}


def test_tied_head_through_transpose_is_one_container_and_no_transpose(ops_library):
    model = tied_lm(folded=False)
    compressed, containers = compress_all(model, sparsity=0.3, bits=6, min_elements=256)
    assert set(containers) == {"E"}
    ops = [n.op_type for n in compressed.graph.node]
    assert ops == [GATHER_OP, "Tanh", MATMUL_OP]  # the table's rows gathered straight from its container
    head = compressed.graph.node[-1]
    assert list(head.input) == ["t", "E__dc"] and attrs(head) == {"trans_b": 1}
    (ref,) = find_containers(compressed)
    assert sorted(n.op_type for _, n in ref.readers) == [GATHER_OP, MATMUL_OP]
    plain = decompressed(compressed)
    assert structure(plain) == structure(model)  # the Transpose is back, where it was
    (got,), (want,) = run(compressed, FEEDS, ops_library), run(plain, FEEDS)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_transposed_copy_is_stored_once():
    model = tied_lm(folded=True)
    shared = share_duplicate_weights(model)
    assert [(s.duplicate, s.kept, s.transposed) for s in shared] == [("onnx::MatMul_7", "E", True)]
    assert [t.name for t in model.graph.initializer] == ["E"]
    assert [n.op_type for n in model.graph.node] == ["Gather", "Tanh", "Transpose", "MatMul"]
    assert list(model.graph.node[2].output) == ["onnx::MatMul_7"]
    (want,) = run(tied_lm(folded=True), FEEDS)
    (got,) = run(model, FEEDS)
    np.testing.assert_array_equal(got, want)  # exactly the same computation


def test_compress_shares_the_tied_copy_and_reports_it(ops_library):
    model = tied_lm(folded=True)
    result = compress_model(model, Recipe.build(None, sparsity=0.0, bits=8))
    compressed = result.model
    assert [ref.original_name for ref in find_containers(compressed)] == ["E"]
    assert "'onnx::MatMul_7' is 'E' transposed (read through a Transpose node): stored once" in result.report.notes
    assert result.report.original_bytes == 50 * 32 * 4 + 4 * 0  # the copy is gone before counting
    (got,), (want,) = run(compressed, FEEDS, ops_library), run(model, FEEDS)
    cosine = float(np.sum(got * want) / np.linalg.norm(got) / np.linalg.norm(want))
    assert cosine >= 0.999
    plain = decompressed(compressed)
    assert [n.op_type for n in plain.graph.node] == ["Gather", "Tanh", "Transpose", "MatMul"]


def test_exact_copy_is_renamed_and_unrelated_weights_stay():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 24)).astype(np.float32)
    nodes = [
        h.make_node("MatMul", ["x", "w"], ["a"]), h.make_node("MatMul", ["x", "w_copy"], ["b"]),
        h.make_node("MatMul", ["x", "w_other"], ["c"]), h.make_node("Sum", ["a", "b", "c"], ["y"]),
    ]
    other = w.copy()
    other[3, 4] += 1e-3  # differs in one value: not a copy
    graph = h.make_graph(
        nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [2, 16])], [h.make_tensor_value_info("y", T.FLOAT, [2, 24])],
        [nh.from_array(w, "w"), nh.from_array(w.copy(), "w_copy"), nh.from_array(other, "w_other")],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    shared = share_duplicate_weights(model)
    assert [(s.duplicate, s.kept, s.transposed) for s in shared] == [("w_copy", "w", False)]
    assert [list(n.input) for n in model.graph.node[:3]] == [["x", "w"], ["x", "w"], ["x", "w_other"]]


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_through_transpose(trans_b, ops_library):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((24, 16) if trans_b == 0 else (16, 24)).astype(np.float32)  # Gemm's B is w^T
    nodes = [
        h.make_node("Transpose", ["w"], ["wt"], name="t"),
        h.make_node("Gemm", ["x", "wt", "c"], ["y"], name="fc", transB=trans_b, alpha=0.5),
    ]
    graph = h.make_graph(
        nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["N", 16])], [h.make_tensor_value_info("y", T.FLOAT, ["N", 24])],
        [nh.from_array(w, "w"), nh.from_array(rng.standard_normal(24).astype(np.float32), "c")],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    compressed, _ = compress_all(model, sparsity=0.5, min_elements=256)
    (node,) = compressed.graph.node
    assert node.op_type == MATMUL_OP and attrs(node)["trans_b"] == 1 - trans_b
    plain = decompressed(compressed)
    assert structure(plain) == structure(model) and attrs(plain.graph.node[1]) == attrs(model.graph.node[1])
    feeds = {"x": rng.standard_normal((3, 16)).astype(np.float32)}
    (got,), (want,) = run(compressed, feeds, ops_library), run(plain, feeds)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_transpose_with_another_reader_keeps_decompress():
    model = tied_lm(folded=False)
    model.graph.node.append(h.make_node("Neg", ["E_t"], ["z"]))
    model.graph.output.append(h.make_tensor_value_info("z", T.FLOAT, [32, 50]))
    compressed, _ = compress_all(model, min_elements=256)
    assert [n.op_type for n in compressed.graph.node] == ["DCDecompress", GATHER_OP, "Tanh", "Transpose", "MatMul", "Neg"]


def test_gather_becomes_dc_gather_unless_switched_off(ops_library):
    model = tied_lm(folded=False)
    off = onnx.ModelProto()
    off.CopyFrom(model)
    pairs = [(w, uniform_container(w.to_array())) for w in find_weights(off, min_elements=256)]
    apply_compression(off, pairs, gather=False)
    assert GATHER_OP not in [n.op_type for n in off.graph.node]
    on = onnx.ModelProto()
    on.CopyFrom(model)
    pairs = [(w, uniform_container(w.to_array())) for w in find_weights(on, min_elements=256)]
    apply_compression(on, pairs, gather=True)
    onnx.checker.check_model(on, full_check=True)
    assert structure(on)[0] == (GATHER_OP, DOMAIN, "embed", ["E__dc", "ids"], ["e"])
    assert [n.op_type for n in on.graph.node] == [GATHER_OP, "Tanh", MATMUL_OP]  # no DCDecompress left
    assert not on.graph.node[0].attribute  # attribute-free: ONNX Gather axis 0
    plain = decompressed(on)
    assert structure(plain) == structure(model)
    np.testing.assert_allclose(run(plain, FEEDS)[0], run(decompressed(off), FEEDS)[0], rtol=0, atol=0)
    np.testing.assert_allclose(run(on, FEEDS, ops_library)[0], run(off, FEEDS, ops_library)[0], rtol=1e-5, atol=1e-5)


def test_gather_on_another_axis_keeps_decompress():
    model = tied_lm(folded=False)
    model.graph.node[0].attribute.append(h.make_attribute("axis", 1))
    model.graph.node[0].input[1] = "ids"
    pairs = [(w, uniform_container(w.to_array())) for w in find_weights(model, min_elements=256)]
    apply_compression(model, pairs, gather=True)
    assert GATHER_OP not in [n.op_type for n in model.graph.node]


def test_explicit_gather_axis_zero_is_restored():
    model = tied_lm(folded=False)
    model.graph.node[0].attribute.append(h.make_attribute("axis", 0))
    original = onnx.ModelProto()
    original.CopyFrom(model)
    pairs = [(w, uniform_container(w.to_array())) for w in find_weights(model, min_elements=256)]
    apply_compression(model, pairs, gather=True)
    assert model.graph.node[0].op_type == GATHER_OP
    plain = decompressed(model)
    assert plain.graph.node[0].attribute[0].SerializeToString() == original.graph.node[0].attribute[0].SerializeToString()
