"""DCConv in onnxruntime against onnxruntime's own Conv on the decompressed (dense) weight.

Run as a script (``python tests/test_runtime_conv.py LIBRARY``) it is the conv
workload of the sanitizer test (tests/test_runtime_sanitizers.py).
"""

from __future__ import annotations

import functools
import sys
import threading

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from test_runtime_support import (
    DOMAIN,
    IR_VERSION,
    assert_matches_reference,
    container_initializer,
    corrupted_containers,
    make_session,
    random_activations,
    random_container,
)

# (name, C, M, H, W, kernel, attributes): every padding rule, strides,
# dilations and groups of ONNX Conv, on images small enough for a fast grid.
CASES = [
    ("plain", 3, 8, 10, 11, (3, 3), {}),
    ("pads_strides", 3, 7, 12, 9, (3, 5), {"pads": [1, 2, 0, 1], "strides": [2, 1]}),
    ("dilations", 2, 5, 13, 12, (3, 2), {"pads": [2, 2, 2, 2], "dilations": [2, 3]}),
    ("same_upper", 4, 6, 9, 10, (4, 3), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    ("same_lower", 4, 6, 9, 10, (4, 4), {"auto_pad": "SAME_LOWER", "strides": [2, 3]}),
    ("valid", 3, 5, 11, 10, (3, 3), {"auto_pad": "VALID", "strides": [3, 2]}),
    ("kernel_shape", 2, 4, 6, 7, (2, 3), {"kernel_shape": [2, 3], "pads": [0, 1, 1, 0]}),
    # 1x1 convolutions read the input in place: 30 positions (3 vectors of 8 and a tail of 6), 16, and 6 (tail only)
    ("pointwise", 16, 32, 5, 6, (1, 1), {}),
    ("pointwise_groups", 8, 6, 4, 4, (1, 1), {"group": 2}),
    ("pointwise_tiny", 5, 3, 2, 3, (1, 1), {}),
    ("pointwise_strided", 6, 5, 7, 7, (1, 1), {"strides": [2, 2]}),
    ("groups", 4, 6, 8, 9, (3, 3), {"group": 2, "pads": [1, 1, 1, 1]}),
    ("depthwise", 5, 5, 9, 8, (3, 3), {"group": 5, "pads": [1, 1, 1, 1], "strides": [2, 2]}),
    ("depthwise_x2", 3, 6, 7, 7, (3, 3), {"group": 3, "auto_pad": "SAME_UPPER"}),
    # 576 kernel elements per output channel, 324 positions
    ("large_patch", 64, 20, 18, 18, (3, 3), {}),
    # many output channels; 3 positions per image
    ("wide", 2, 2100, 3, 4, (1, 2), {}),
    # dilated and strided along both axes with asymmetric padding
    ("dilated_strided", 3, 9, 15, 16, (3, 3), {"pads": [0, 3, 2, 1], "strides": [3, 2], "dilations": [2, 2]}),
]
# 0 and 0.3 pruned use the dense layout (at least 60 % kept), 0.5 and up the index layout
SPARSITIES = (0.0, 0.3, 0.5, 0.9, 1.0)


def _attributes(name: str) -> dict:
    return next(case[6] for case in CASES if case[0] == name)


@pytest.fixture(scope="module")
def library() -> str:
    from onnx_dc.graph.library import ops_library_path

    return ops_library_path()


def _model(nodes, inputs, initializers) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "conv", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = IR_VERSION
    return model


def dc_conv_model(
    container: bytes | None,
    attributes: dict,
    *,
    bias: np.ndarray | None = None,
    node_name: str = "conv",
    container_name: str = "conv.weight__dc",
) -> onnx.ModelProto:
    """``y = DCConv(x, container[, bias])``; with ``container=None`` the container is a graph input."""
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)]
    initializers = []
    if container is None:
        inputs.append(helper.make_tensor_value_info(container_name, TensorProto.UINT8, None))
    else:
        initializers.append(container_initializer(container, container_name))
    names = ["x", container_name]
    if bias is not None:
        names.append("b")
        initializers.append(numpy_helper.from_array(bias, "b"))
    node = helper.make_node("DCConv", names, ["y"], domain=DOMAIN, name=node_name, **attributes)
    return _model([node], inputs, initializers)


def reference_conv(x: np.ndarray, weight: np.ndarray, attributes: dict, bias: np.ndarray | None) -> np.ndarray:
    """onnxruntime's own Conv with the dense (decompressed) weight."""
    names = ["x", "w"] + (["b"] if bias is not None else [])
    initializers = [numpy_helper.from_array(weight, "w")]
    if bias is not None:
        initializers.append(numpy_helper.from_array(bias, "b"))
    node = helper.make_node("Conv", names, ["y"], **attributes)
    model = _model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)], initializers)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@functools.lru_cache(maxsize=None)
def _case_container(name: str, sparsity: float) -> tuple[bytes, np.ndarray]:
    index = next(i for i, case in enumerate(CASES) if case[0] == name)
    _, c, m, _, _, kernel, attributes = CASES[index]
    rng = np.random.default_rng(100 * index + int(sparsity * 100))
    shape = (m, c // int(attributes.get("group", 1))) + kernel
    return random_container(rng, shape, sparsity=sparsity, layout="sparse" if sparsity >= 0.9 else "auto")


def run_case(library: str, name: str, sparsity: float, *, threads: int, with_bias: bool) -> None:
    """Check one grid case for batch 1 and 3 against onnxruntime's Conv."""
    _, c, m, height, width, _, attributes = next(case for case in CASES if case[0] == name)
    container, dense = _case_container(name, sparsity)
    rng = np.random.default_rng(7)
    bias = rng.standard_normal(m).astype(np.float32) if with_bias else None
    session = make_session(dc_conv_model(container, attributes, bias=bias), library, threads=threads)
    for batch in (1, 3):
        x = random_activations(rng, (batch, c, height, width))
        (y,) = session.run(None, {"x": x})
        assert_matches_reference(y, reference_conv(x, dense, attributes, bias))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("name", [case[0] for case in CASES])
def test_matches_onnxruntime_conv(library: str, name: str, sparsity: float, threads: int) -> None:
    run_case(library, name, sparsity, threads=threads, with_bias=sparsity != 0.5)
    if sparsity == 0.5:
        run_case(library, name, sparsity, threads=threads, with_bias=True)


def test_container_that_is_a_graph_input_is_decoded_per_call(library: str) -> None:
    rng = np.random.default_rng(3)
    attributes = {"pads": [1, 1, 1, 1], "group": 2}
    container, dense = random_container(rng, (6, 2, 3, 3), sparsity=0.6)
    session = make_session(dc_conv_model(None, attributes), library)
    x = random_activations(rng, (2, 4, 7, 6))
    feed = {"x": x, "conv.weight__dc": np.frombuffer(container, dtype=np.uint8)}
    assert_matches_reference(session.run(None, feed)[0], reference_conv(x, dense, attributes, None))
    feed["conv.weight__dc"] = np.frombuffer(corrupted_containers(container, rng, 1)[0], dtype=np.uint8)
    with pytest.raises(Exception, match="DCConv node 'conv', container 'conv.weight__dc'"):
        session.run(None, feed)


def test_concurrent_runs_on_one_session_agree(library: str) -> None:
    container, _ = _case_container("pads_strides", 0.5)
    session = make_session(dc_conv_model(container, _attributes("pads_strides")), library, threads=2)
    x = random_activations(np.random.default_rng(1), (3, 3, 12, 9))
    expected = session.run(None, {"x": x})[0]
    results: list[np.ndarray] = []

    def worker() -> None:
        for _ in range(5):
            results.append(session.run(None, {"x": x})[0])

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 40 and all(np.array_equal(r, expected) for r in results)


def test_corrupted_container_fails_session_creation_naming_it(library: str) -> None:
    container, _ = _case_container("plain", 0.5)
    bad = bytearray(container)
    bad[len(bad) // 2] ^= 0x10
    with pytest.raises(Exception, match=r"DCConv node 'conv1', container 'conv1.weight__dc': checksum"):
        make_session(dc_conv_model(bytes(bad), {}, node_name="conv1", container_name="conv1.weight__dc"), library)


def test_every_corruption_is_an_error_or_a_valid_run(library: str) -> None:
    container, _ = _case_container("groups", 0.5)
    x = random_activations(np.random.default_rng(2), (1, 4, 8, 9))
    for bad in corrupted_containers(container, np.random.default_rng(4), 40):
        try:
            session = make_session(dc_conv_model(bad, _attributes("groups")), library)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            assert "DCConv node 'conv', container 'conv.weight__dc'" in str(exc)
            continue
        session.run(None, {"x": x})  # a mutation that still decodes is just another weight


@pytest.mark.parametrize(
    ("shape", "attributes", "message"),
    [
        ((4, 3, 3), {}, "weight must be 4-D"),
        ((4, 3, 3, 3, 3), {}, "weight must be 4-D"),
        ((4, 3, 3, 3), {"kernel_shape": [3, 2]}, "kernel_shape = \\[3, 2\\] does not match"),
        ((4, 3, 3, 3), {"group": 3}, "not a multiple of group = 3"),
        ((4, 3, 3, 3), {"group": 0}, "group must be >= 1"),
        ((4, 3, 3, 3), {"strides": [1, 0]}, "strides"),
        ((4, 3, 3, 3), {"strides": [1, 1, 1]}, "strides must have 2 values"),
        ((4, 3, 3, 3), {"pads": [1, 1]}, "pads must have 4 values"),
        ((4, 3, 3, 3), {"pads": [0, -1, 0, 0]}, "pads"),
        ((4, 3, 3, 3), {"dilations": [0, 1]}, "dilations"),
        ((4, 3, 3, 3), {"auto_pad": "SAME"}, "auto_pad must be"),
    ],
)
def test_bad_weight_or_attributes_fail_session_creation(library, shape, attributes, message) -> None:
    container, _ = random_container(np.random.default_rng(0), shape, sparsity=0.5)
    with pytest.raises(Exception, match="DCConv node 'conv'.*" + message):
        make_session(dc_conv_model(container, attributes), library)


def test_float16_weight_is_refused(library: str) -> None:
    container, _ = random_container(np.random.default_rng(0), (4, 3, 3, 3), sparsity=0.5, dtype=np.float16)
    with pytest.raises(Exception, match="weight must be float32, the container holds float16"):
        make_session(dc_conv_model(container, {}), library)


@pytest.mark.parametrize(
    ("x_shape", "bias_shape", "message"),
    [
        ((1, 4, 8, 8), None, "its 4 channels must be group"),
        ((1, 3, 8), None, "X must be 4-D"),
        ((1, 3, 2, 8), None, "height size 2 .* smaller than the dilated kernel"),
        ((1, 3, 8, 8), (5,), "bias B has shape \\[5\\], it must be \\[4\\]"),
        ((1, 3, 8, 8), (1, 4), "bias B has shape"),
    ],
)
def test_bad_inputs_fail_the_run(library, x_shape, bias_shape, message) -> None:
    container, _ = random_container(np.random.default_rng(0), (4, 3, 3, 3), sparsity=0.5)
    bias = None if bias_shape is None else np.ones(bias_shape, dtype=np.float32)
    session = make_session(dc_conv_model(container, {}, bias=bias), library)
    with pytest.raises(Exception, match="DCConv node 'conv'.*" + message):
        session.run(None, {"x": np.ones(x_shape, dtype=np.float32)})


def test_enormous_padding_is_an_error_not_an_allocation(library: str) -> None:
    container, _ = random_container(np.random.default_rng(0), (1, 1, 1, 1), sparsity=0.0)
    session = make_session(dc_conv_model(container, {"pads": [2**30, 0, 2**30, 0], "strides": [2**30, 1]}), library)
    with pytest.raises(Exception, match="DCConv node 'conv'.*padded input .* larger than 2\\^28 values"):
        session.run(None, {"x": np.ones((1, 1, 1, 1), dtype=np.float32)})


def test_empty_batch_and_same_padding_of_an_empty_image(library: str) -> None:
    container, dense = random_container(np.random.default_rng(0), (4, 3, 3, 3), sparsity=0.5)
    session = make_session(dc_conv_model(container, {"pads": [1, 1, 1, 1]}), library)
    assert session.run(None, {"x": np.ones((0, 3, 5, 5), dtype=np.float32)})[0].shape == (0, 4, 5, 5)
    session = make_session(dc_conv_model(container, {"auto_pad": "SAME_UPPER"}), library)
    assert session.run(None, {"x": np.ones((2, 3, 0, 5), dtype=np.float32)})[0].shape == (2, 4, 0, 5)


def test_lenet5_runs_its_convolutions_as_dc_conv_with_the_decompressed_accuracy(library: str, tmp_path) -> None:
    import onnx_dc
    from model_zoo import get_model_path
    from model_zoo.evaluate import evaluate

    compressed_path = tmp_path / "lenet5.dc.onnx"
    onnx_dc.compress(get_model_path("lenet5"), compressed_path)
    compressed = onnx.load(str(compressed_path))
    ops = {n.name: n.op_type for n in compressed.graph.node}
    assert ops["conv1"] == "DCConv" and ops["conv2"] == "DCConv"
    assert not any(op.startswith("DCDecompress") for op in ops.values())
    restored_path = tmp_path / "lenet5.restored.onnx"
    onnx_dc.decompress(compressed_path, restored_path)
    restored = onnx.load(str(restored_path))
    assert {n.name: n.op_type for n in restored.graph.node}["conv1"] == "Conv"
    through_library = evaluate(compressed_path, limit=2000)
    decompressed = evaluate(restored_path, custom_ops=False, limit=2000)
    assert through_library.custom_ops and not decompressed.custom_ops
    assert through_library.n_correct == decompressed.n_correct


def sanitizer_workload(library: str) -> None:
    """Every grid case (threads 1 and 2), the per-call path and corrupted containers: for the ASan/UBSan build."""
    for name, *_ in CASES:
        for sparsity in SPARSITIES:
            for threads in (1, 2):
                run_case(library, name, sparsity, threads=threads, with_bias=sparsity >= 0.5)
    container, _ = _case_container("depthwise", 0.5)
    x = random_activations(np.random.default_rng(2), (2, 5, 9, 8))
    for bad in corrupted_containers(container, np.random.default_rng(5), 60):
        try:
            session = make_session(dc_conv_model(bad, _attributes("depthwise")), library)
        except Exception:  # noqa: BLE001 - only crashes and sanitizer reports matter here
            continue
        session.run(None, {"x": x})
    session = make_session(dc_conv_model(None, {"pads": [2, 0, 1, 3], "strides": [2, 1]}), library)
    weight, _ = random_container(np.random.default_rng(6), (3, 5, 2, 4), sparsity=0.7)
    session.run(None, {"x": x, "conv.weight__dc": np.frombuffer(weight, dtype=np.uint8)})
    print("conv sanitizer workload: ok")


if __name__ == "__main__":
    sanitizer_workload(sys.argv[1])
