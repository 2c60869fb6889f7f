"""Small hand-made ONNX models covering the graph shapes the converter must handle.

Each builder returns a valid model (onnx.checker accepts it) with random but
seeded float weights, plus a function making matching inputs.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnx_dc.codec.container import encode_container
from onnx_dc.graph.rewrite import apply_compression
from onnx_dc.graph.weights import find_weights

OPSET = 17


def _w(rng: np.random.Generator, name: str, *shape: int, dtype=np.float32) -> onnx.TensorProto:
    return nh.from_array((rng.standard_normal(shape) * 0.3).astype(dtype), name)


def _model(graph: onnx.GraphProto, **kwargs) -> onnx.ModelProto:
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET)], **kwargs)
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def mlp(seed: int = 0) -> onnx.ModelProto:
    """MatMul (+Add bias), Gemm with transB=1 and bias, Gemm without transB (alpha 0.5); metadata."""
    rng = np.random.default_rng(seed)
    nodes = [
        h.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
        h.make_node("Add", ["h1", "b1"], ["h1b"], name="fc1_bias"),
        h.make_node("Relu", ["h1b"], ["r1"], name="relu1"),
        h.make_node("Gemm", ["r1", "w2", "b2"], ["h2"], name="fc2", transB=1),
        h.make_node("Relu", ["h2"], ["r2"], name="relu2"),
        h.make_node("Gemm", ["r2", "w3"], ["y"], name="fc3", alpha=0.5),
    ]
    nodes[3].doc_string = "fc2 doc"
    graph = h.make_graph(
        nodes,
        "mlp",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 64])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 10])],
        [_w(rng, "w1", 64, 300), _w(rng, "b1", 300), _w(rng, "w2", 100, 300), _w(rng, "b2", 100), _w(rng, "w3", 100, 10)],
        doc_string="graph doc",
    )
    model = _model(graph, producer_name="graph_builders", producer_version="1.2", doc_string="model doc")
    entry = model.metadata_props.add()
    entry.key, entry.value = "labels", "t-shirt,trouser,pullover"
    return model


def convnet(seed: int = 0) -> onnx.ModelProto:
    """Conv (W + bias) -> Relu -> Conv through a Transpose'd kernel -> Flatten -> Gemm; input [N,1,12,12]."""
    rng = np.random.default_rng(seed)
    nodes = [
        h.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["c1"], name="conv1", kernel_shape=[3, 3]),
        h.make_node("Relu", ["c1"], ["r1"]),
        h.make_node("Transpose", ["conv2.weight_t"], ["conv2.weight"], perm=[1, 0, 2, 3]),
        h.make_node("Conv", ["r1", "conv2.weight"], ["c2"], name="conv2", kernel_shape=[3, 3]),
        h.make_node("Relu", ["c2"], ["r2"]),
        h.make_node("Flatten", ["r2"], ["f"]),
        h.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["y"], name="fc", transB=1),
    ]
    graph = h.make_graph(
        nodes,
        "convnet",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 1, 12, 12])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 10])],
        [
            _w(rng, "conv1.weight", 20, 1, 3, 3),
            _w(rng, "conv1.bias", 20),
            _w(rng, "conv2.weight_t", 20, 16, 3, 3),
            _w(rng, "fc.weight", 10, 16 * 8 * 8),
            _w(rng, "fc.bias", 10),
        ],
    )
    return _model(graph)


def shared_weight(seed: int = 0) -> onnx.ModelProto:
    """One initializer used by two MatMuls and (transposed) by a third: compressed once."""
    rng = np.random.default_rng(seed)
    nodes = [
        h.make_node("MatMul", ["x", "shared"], ["a"], name="use1"),
        h.make_node("Relu", ["a"], ["ra"]),
        h.make_node("MatMul", ["ra", "square"], ["b"], name="use_square"),
        h.make_node("MatMul", ["b", "square"], ["c"], name="use_square_again"),
        h.make_node("Transpose", ["shared"], ["shared_t"]),
        h.make_node("MatMul", ["c", "shared_t"], ["y"], name="use_transposed"),
    ]
    graph = h.make_graph(
        nodes,
        "shared",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 32])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 32])],
        [_w(rng, "shared", 32, 64), _w(rng, "square", 64, 64)],
    )
    return _model(graph)


def embedding(seed: int = 0) -> onnx.ModelProto:
    """Gather embedding (int64 ids) -> ReduceMean -> MatMul; the ids input is int64."""
    rng = np.random.default_rng(seed)
    nodes = [
        h.make_node("Gather", ["embed.weight", "ids"], ["e"], name="embed"),
        h.make_node("ReduceMean", ["e"], ["m"], axes=[1], keepdims=0),
        h.make_node("MatMul", ["m", "head"], ["y"], name="head"),
    ]
    graph = h.make_graph(
        nodes,
        "embedding",
        [h.make_tensor_value_info("ids", T.INT64, ["N", "L"])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 8])],
        [_w(rng, "embed.weight", 100, 48), _w(rng, "head", 48, 8)],
    )
    return _model(graph)


def if_model(seed: int = 0) -> onnx.ModelProto:
    """If with weights inside the branches, an outer-scope weight used in both, and a Constant in a branch."""
    rng = np.random.default_rng(seed)
    outer = _w(rng, "outer.weight", 16, 16)
    then_w = _w(rng, "then.weight", 16, 16)
    else_const = _w(rng, "else.const_value", 16, 16)
    then_graph = h.make_graph(
        [
            h.make_node("MatMul", ["x", "outer.weight"], ["t1"], name="then_outer"),
            h.make_node("MatMul", ["t1", "then.weight"], ["then_out"], name="then_inner"),
        ],
        "then_branch",
        [],
        [h.make_tensor_value_info("then_out", T.FLOAT, ["N", 16])],
        [then_w],
    )
    else_graph = h.make_graph(
        [
            h.make_node("Constant", [], ["else.weight"], name="else_const", value=else_const),
            h.make_node("MatMul", ["x", "else.weight"], ["e1"], name="else_inner"),
            h.make_node("Gemm", ["e1", "outer.weight"], ["else_out"], name="else_outer", transB=1),
        ],
        "else_branch",
        [],
        [h.make_tensor_value_info("else_out", T.FLOAT, ["N", 16])],
    )
    nodes = [
        h.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_graph, else_branch=else_graph),
    ]
    graph = h.make_graph(
        nodes,
        "if_model",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 16]), h.make_tensor_value_info("cond", T.BOOL, [])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 16])],
        [outer],
    )
    return _model(graph)


def constant_weights(seed: int = 0) -> onnx.ModelProto:
    """Weights held in Constant nodes (PaddlePaddle style): a MatMul weight and a Conv kernel."""
    rng = np.random.default_rng(seed)
    nodes = [
        h.make_node("Constant", [], ["conv.w"], name="const_conv", value=_w(rng, "v0", 8, 1, 3, 3)),
        h.make_node("Conv", ["x", "conv.w"], ["c"], name="conv", kernel_shape=[3, 3]),
        h.make_node("Relu", ["c"], ["r"]),
        h.make_node("Flatten", ["r"], ["f"]),
        h.make_node("Constant", [], ["fc.w"], name="const_fc", value=_w(rng, "v1", 8 * 6 * 6, 10)),
        h.make_node("MatMul", ["f", "fc.w"], ["y"], name="fc"),
    ]
    graph = h.make_graph(
        nodes,
        "constants",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 1, 8, 8])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 10])],
    )
    return _model(graph)


def float16_mlp(seed: int = 0) -> onnx.ModelProto:
    """float16 input and weights: MatMul -> Relu -> MatMul."""
    rng = np.random.default_rng(seed)
    nodes = [
        h.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
        h.make_node("Relu", ["h1"], ["r1"]),
        h.make_node("MatMul", ["r1", "w2"], ["y"], name="fc2"),
    ]
    graph = h.make_graph(
        nodes,
        "fp16",
        [h.make_tensor_value_info("x", T.FLOAT16, ["N", 32])],
        [h.make_tensor_value_info("y", T.FLOAT16, ["N", 8])],
        [_w(rng, "w1", 32, 64, dtype=np.float16), _w(rng, "w2", 64, 8, dtype=np.float16)],
    )
    return _model(graph)


def lstm(seed: int = 0) -> onnx.ModelProto:
    """LSTM with W, R, B initializers; W reached through Slice + Concat (weights rebuilt in-graph)."""
    rng = np.random.default_rng(seed)
    hidden, inp = 16, 8
    starts = nh.from_array(np.array([0], dtype=np.int64), "starts")
    ends = nh.from_array(np.array([2 * hidden], dtype=np.int64), "ends")
    axes = nh.from_array(np.array([1], dtype=np.int64), "slice_axes")
    nodes = [
        h.make_node("Slice", ["lstm.W_part", "starts", "ends", "slice_axes"], ["w_half"]),
        h.make_node("Concat", ["w_half", "lstm.W_rest"], ["lstm.W"], axis=1),
        h.make_node("LSTM", ["x", "lstm.W", "lstm.R", "lstm.B"], ["y_all", "y"], name="lstm", hidden_size=hidden),
    ]
    graph = h.make_graph(
        nodes,
        "lstm",
        [h.make_tensor_value_info("x", T.FLOAT, [5, "N", inp])],
        [h.make_tensor_value_info("y", T.FLOAT, [1, "N", hidden])],
        [
            _w(rng, "lstm.W_part", 1, 3 * hidden, inp),
            _w(rng, "lstm.W_rest", 1, 2 * hidden, inp),
            _w(rng, "lstm.R", 1, 4 * hidden, hidden),
            _w(rng, "lstm.B", 1, 8 * hidden),
            starts,
            ends,
            axes,
        ],
    )
    return _model(graph)


def scan_model(seed: int = 0) -> onnx.ModelProto:
    """Scan whose body multiplies each step by an outer-scope weight and by a weight of its own."""
    rng = np.random.default_rng(seed)
    body = h.make_graph(
        [
            h.make_node("MatMul", ["x_t", "outer.w"], ["a"], name="body_outer"),
            h.make_node("MatMul", ["a", "body.w"], ["b"], name="body_inner"),
            h.make_node("Add", ["state_in", "b"], ["state_out"]),
            h.make_node("Identity", ["b"], ["y_t"]),
        ],
        "body",
        [h.make_tensor_value_info("state_in", T.FLOAT, [1, 16]), h.make_tensor_value_info("x_t", T.FLOAT, [1, 16])],
        [h.make_tensor_value_info("state_out", T.FLOAT, [1, 16]), h.make_tensor_value_info("y_t", T.FLOAT, [1, 16])],
        [_w(rng, "body.w", 16, 16)],
    )
    nodes = [
        h.make_node("Scan", ["s0", "xs"], ["s_final", "ys"], name="scan", body=body, num_scan_inputs=1),
    ]
    graph = h.make_graph(
        nodes,
        "scan_model",
        [h.make_tensor_value_info("s0", T.FLOAT, [1, 16]), h.make_tensor_value_info("xs", T.FLOAT, [4, 1, 16])],
        [h.make_tensor_value_info("s_final", T.FLOAT, [1, 16]), h.make_tensor_value_info("ys", T.FLOAT, [4, 1, 16])],
        [_w(rng, "outer.w", 16, 16)],
    )
    return _model(graph)


def ir3_model(seed: int = 0) -> onnx.ModelProto:
    """IR version 3 (every initializer is also a graph input), opset 8: MatMul -> Relu -> MatMul."""
    rng = np.random.default_rng(seed)
    w1, w2 = _w(rng, "w1", 16, 32), _w(rng, "w2", 32, 4)
    nodes = [
        h.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        h.make_node("Relu", ["h"], ["r"]),
        h.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
    ]
    graph = h.make_graph(
        nodes,
        "ir3",
        [
            h.make_tensor_value_info("x", T.FLOAT, [2, 16]),
            h.make_tensor_value_info("w1", T.FLOAT, [16, 32]),
            h.make_tensor_value_info("w2", T.FLOAT, [32, 4]),
        ],
        [h.make_tensor_value_info("y", T.FLOAT, [2, 4])],
        [w1, w2],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 8)])
    model.ir_version = 3
    onnx.checker.check_model(model, full_check=True)
    return model


def inputs_for(model: onnx.ModelProto, batch: int = 3, seed: int = 1) -> dict[str, np.ndarray]:
    """Random inputs matching a builder model's inputs (symbolic dims: batch, then 4)."""
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (batch if i in (0, 1) and d.dim_param == "N" else 4) for i, d in enumerate(tt.shape.dim)]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if tt.elem_type == T.INT64:
            feeds[vi.name] = rng.integers(0, 100, size=shape).astype(np.int64)
        elif tt.elem_type == T.BOOL:
            feeds[vi.name] = np.array(True)
        else:
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


ALL_BUILDERS = {
    "mlp": mlp,
    "convnet": convnet,
    "shared_weight": shared_weight,
    "embedding": embedding,
    "if_model": if_model,
    "constant_weights": constant_weights,
    "float16_mlp": float16_mlp,
    "lstm": lstm,
    "scan_model": scan_model,
    "ir3_model": ir3_model,
}


def uniform_container(values: np.ndarray, *, sparsity: float = 0.5, bits: int = 4, index_bits: int = 4) -> bytes:
    """Prune the smallest magnitudes, then round the rest to an evenly spaced codebook."""
    flat = values.astype(np.float64).ravel()
    n_pruned = int(round(sparsity * flat.size))
    order = np.argsort(np.abs(flat), kind="stable")
    codes = np.full(flat.size, -1, dtype=np.int64)
    kept = order[n_pruned:]
    if kept.size:
        codebook = np.linspace(flat[kept].min(), flat[kept].max(), 2**bits)
        codes[kept] = np.abs(flat[kept, None] - codebook[None, :]).argmin(axis=1)
    else:
        codebook = np.zeros(0)
    return encode_container(codes.reshape(values.shape), codebook.astype(values.dtype), bits=bits, index_bits=index_bits)


def compress_all(model: onnx.ModelProto, *, min_elements: int = 0, **kwargs) -> tuple[onnx.ModelProto, dict[str, bytes]]:
    """A copy of ``model`` with every non-bias float weight of ``min_elements`` or more replaced by a container."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    pairs = [(w, uniform_container(w.to_array(), **kwargs)) for w in find_weights(out, min_elements=min_elements) if not w.is_bias]
    apply_compression(out, pairs)
    return out, {w.name: c for w, c in pairs}



import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ops_library() -> str:
    """Path of the built custom operator library; a missing library fails the test (never a skip)."""
    import onnx_dc

    return str(onnx_dc.ops_library_path())
