"""DCConv in onnxruntime against onnxruntime's own Conv on the decompressed (dense) weight.

Every layout and kernel (code tiles with in-place, tail and gathered panels,
few positions, channels in lanes, K blocks, tile remainders; depthwise; the index layout's direct
kernels), every instruction-set variant (ONNX_DC_KERNEL_ISA), 1 and 2 threads
bit for bit, and every fused activation (DCConv and DCMatMul) against numpy
and onnxruntime's own activation operators.

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
# Kernel remainders of the code tiles (panels of 48 / 24 / 8 positions, tiles of 8 / 4 channels, K blocks of
# 128 / 256 / 768 rows) and of the depthwise kernel (vectors of 64 / 32 / 16 positions).
KERNEL_CASES = [
    # pointwise: 100 positions (in-place panels and a tail), 9 and 17 channels (tile remainders)
    ("pw_tail", 12, 17, 10, 10, (1, 1), {}),
    ("pw_tiles", 7, 9, 7, 7, (1, 1), {}),
    # few positions (at most a quarter panel): a 1x1 image, and a 3x3 kernel on a padded 2x2 image
    ("few_1x1", 40, 13, 1, 1, (1, 1), {}),
    ("few_3x3", 5, 11, 2, 2, (3, 3), {"pads": [1, 1, 1, 1]}),
    # K = 300 (3 blocks of 128), rows of 100 outputs (whole in-place panels and gathered remainders)
    ("k_blocks", 30, 10, 6, 100, (1, 10), {"pads": [0, 3, 0, 6]}),
    # strided rows of 49 outputs: one in-place panel per row plus a 1-wide remainder, 20 channels
    ("strided_rows", 3, 20, 9, 99, (3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ("dilated", 4, 8, 20, 60, (3, 3), {"dilations": [3, 2], "pads": [3, 2, 3, 2]}),
    # groups of 5 output channels from 3 input channels each
    ("groups_small", 9, 15, 11, 13, (3, 3), {"group": 3, "pads": [1, 1, 1, 1]}),
    ("single_channel", 6, 1, 9, 70, (2, 2), {}),
    # depthwise: 5x5, stride 2, dilation, multiplier 2, rows of 130 outputs (two 64-vectors and a remainder)
    ("dw_5x5", 6, 6, 12, 130, (5, 5), {"group": 6, "pads": [2, 2, 2, 2]}),
    ("dw_strided", 5, 5, 17, 40, (3, 3), {"group": 5, "strides": [2, 2], "pads": [1, 0, 1, 1]}),
    ("dw_dilated_x2", 3, 6, 15, 21, (3, 3), {"group": 3, "dilations": [2, 2], "pads": [2, 1, 2, 3]}),
    ("dw_tall", 4, 4, 300, 9, (3, 1), {"group": 4, "strides": [3, 1], "pads": [1, 0, 1, 0]}),
    # channels in lanes (rows narrower than a panel, at least 4 vectors of channels): 70 channels (a block of
    # 64 / 16 / 8 and a remainder of 6), 100 positions (tasks of 60 and 40, tiles of 6 / 4 positions and
    # remainders), K = 360 (blocks of 64 and a remainder), stride 2 with asymmetric pads (AVX2 and baseline),
    # groups of 36 channels with dilations (AVX2 and baseline); these decode the weight per task (one task per
    # block of channels), block by block of K; the weight decoded whole per call: 323 positions (4 tasks per
    # block of channels), 66 channels (a remainder of 2), and one block of 64 channels of 132 positions
    # (AVX-512; AVX2: 4 blocks, per task)
    ("lanes_small_map", 40, 70, 10, 10, (3, 3), {"pads": [1, 1, 1, 1]}),
    ("lanes_whole", 24, 66, 19, 17, (3, 3), {"pads": [1, 1, 1, 1]}),
    ("lanes_one_block", 16, 64, 12, 11, (3, 3), {"pads": [1, 1, 1, 1]}),
    ("lanes_strided", 24, 36, 21, 19, (3, 3), {"strides": [2, 2], "pads": [1, 0, 1, 1]}),
    ("lanes_groups", 32, 72, 9, 9, (3, 3), {"group": 2, "dilations": [2, 2], "pads": [2, 2, 2, 2]}),
    # 1x1 stride-1 convolutions on small maps (at most 192 positions, at least 128 input channels) also run
    # channels in lanes, reading X in place: 99 positions, 70 channels, K = 130 (blocks of 64 and a remainder);
    # two groups of 66 channels on 7 x 13, K = 128
    ("lanes_pointwise", 130, 70, 9, 11, (1, 1), {}),
    ("lanes_pointwise_groups", 256, 132, 7, 13, (1, 1), {"group": 2}),
]
CASES = CASES + KERNEL_CASES
# 0, 0.3 and 0.5 pruned: code tiles (at least 25 % kept); 0.9 and 1.0: the index layout (depthwise: always its kernel)
SPARSITIES = (0.0, 0.3, 0.5, 0.9, 1.0)
ISAS = ("generic", "avx2", "avx512", "vbmi")  # "vbmi": 8-bit codes in byte-plane order, the VBMI decoder
ACTIVATIONS = {
    "relu": [],
    "clip": [0.0, 6.0],
    "hard_sigmoid": [],
    "hard_swish": [],
    "sigmoid": [],
    "silu": [],
    "leaky_relu": [0.1],
    "tanh": [],
    "gelu": [],
    "gelu_tanh": [],
}


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
    activation: str | None = None,
    activation_params: list[float] | None = None,
) -> onnx.ModelProto:
    """``y = DCConv(x, container[, bias])``; with ``container=None`` the container is a graph input."""
    attributes = dict(attributes)
    if activation is not None:
        attributes["activation"] = activation
    if activation_params:
        attributes["activation_params"] = list(activation_params)
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
def _case_container(name: str, sparsity: float, bits: int = 5) -> tuple[bytes, np.ndarray]:
    """8-bit codes: a full 256-value codebook without 0, so pruned weights need the code layouts' bit mask."""
    index = next(i for i, case in enumerate(CASES) if case[0] == name)
    _, c, m, _, _, kernel, attributes = CASES[index]
    rng = np.random.default_rng(100 * index + int(sparsity * 100) + bits)
    shape = (m, c // int(attributes.get("group", 1))) + kernel
    return random_container(rng, shape, sparsity=sparsity, layout="sparse" if sparsity >= 0.9 else "auto", bits=bits)


def session_for(model: onnx.ModelProto, library: str, isa: str | None, threads: int = 1) -> ort.InferenceSession:
    """A session whose kernels are capped at ``isa`` (ONNX_DC_KERNEL_ISA, read at session creation)."""
    import os

    previous = os.environ.get("ONNX_DC_KERNEL_ISA")
    if isa is not None:
        os.environ["ONNX_DC_KERNEL_ISA"] = isa
    try:
        return make_session(model, library, threads=threads)
    finally:
        if previous is None:
            os.environ.pop("ONNX_DC_KERNEL_ISA", None)
        else:
            os.environ["ONNX_DC_KERNEL_ISA"] = previous


def run_case(library: str, name: str, sparsity: float, *, threads: int, with_bias: bool,
             isa: str | None = None, bits: int = 5) -> None:
    """Check one grid case for batch 1 and 3 against onnxruntime's Conv."""
    _, c, m, height, width, _, attributes = next(case for case in CASES if case[0] == name)
    container, dense = _case_container(name, sparsity, bits)
    rng = np.random.default_rng(7)
    bias = rng.standard_normal(m).astype(np.float32) if with_bias else None
    session = session_for(dc_conv_model(container, attributes, bias=bias), library, isa, threads)
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


def activate(y: np.ndarray, activation: str, params: list[float]) -> np.ndarray:
    """The ONNX activations in float64."""
    import math

    if activation == "relu":
        return np.maximum(y, 0.0)
    if activation == "clip":
        low, high = params or (-np.inf, np.inf)
        return np.clip(y, low, high)
    if activation == "hard_sigmoid":
        alpha, beta = params or (0.2, 0.5)
        return np.clip(alpha * y + beta, 0.0, 1.0)
    if activation == "hard_swish":
        return y * np.clip(y / 6.0 + 0.5, 0.0, 1.0)
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-y))
    if activation == "silu":
        return y / (1.0 + np.exp(-y))
    if activation == "leaky_relu":
        (alpha,) = params or (0.01,)
        return np.where(y < 0, alpha * y, y)
    if activation == "tanh":
        return np.tanh(y)
    if activation == "gelu":
        return 0.5 * y * (1.0 + np.vectorize(math.erf)(y / math.sqrt(2.0)))
    if activation == "gelu_tanh":
        return 0.5 * y * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (y + 0.044715 * y**3)))
    return y


def assert_activation_close(y: np.ndarray, pre: np.ndarray, activation: str, params: list[float]) -> None:
    """y against act(pre): the activation's own error (2e-7 absolute for the smooth ones, exact for the
    piecewise-linear ones) plus the product's rounding (1e-5 of the largest pre-activation value), which the
    activation passes on with a slope of at most about 1.1."""
    expected = activate(pre, activation, params)
    scale = max(float(np.abs(pre).max()), 1.0)
    error = float(np.abs(y.astype(np.float64) - expected).max())
    assert error <= 1e-5 * scale + 2e-7, f"{activation}: error {error:.3g} (scale {scale:.3g})"


# 8-bit pruned: the bit mask; 4-bit: nibbles (pruned: nibbles and the mask); 3-bit pruned: nibbles, zero index
@pytest.mark.parametrize(("sparsity", "bits"), [(0.0, 5), (0.5, 5), (0.9, 5), (0.0, 8), (0.3, 8), (0.0, 4), (0.3, 4),
                                                (0.3, 3)])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", [case[0] for case in KERNEL_CASES] + ["plain", "pads_strides", "depthwise_x2", "wide"])
def test_every_isa_matches_and_threads_agree_bit_for_bit(library: str, name: str, isa: str, sparsity: float,
                                                         bits: int) -> None:
    """Every kernel variant against onnxruntime's Conv (8-bit pruned: the bit mask); 1 and 2 threads, same bits."""
    run_case(library, name, sparsity, threads=2, with_bias=True, isa=isa, bits=bits)
    _, c, m, height, width, _, attributes = next(case for case in CASES if case[0] == name)
    container, _ = _case_container(name, sparsity, bits)
    model = dc_conv_model(container, attributes, bias=np.linspace(-1, 1, m).astype(np.float32), activation="silu")
    x = random_activations(np.random.default_rng(11), (2, c, height, width))
    results = [session_for(model, library, isa, threads).run(None, {"x": x})[0] for threads in (1, 2, 3)]
    assert all(np.array_equal(results[0], r) for r in results[1:])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("name", ["pw_tail", "k_blocks", "strided_rows", "few_3x3", "dw_5x5", "lanes_small_map",
                                  "lanes_whole", "lanes_strided", "lanes_pointwise"])
def test_fused_activations_match_numpy(library: str, name: str, activation: str, isa: str) -> None:
    """DCConv's fused activation (after the bias) on every kernel against float64 numpy on the decoded weight."""
    params = ACTIVATIONS[activation]
    _, c, m, height, width, _, attributes = next(case for case in CASES if case[0] == name)
    for sparsity in (0.0, 0.9):
        container, dense = _case_container(name, sparsity)
        bias = np.linspace(-2, 2, m).astype(np.float32)
        model = dc_conv_model(container, attributes, bias=bias, activation=activation, activation_params=params)
        x = random_activations(np.random.default_rng(5), (1, c, height, width)) * 3
        (y,) = session_for(model, library, isa).run(None, {"x": x})
        conv = reference_conv(x, dense, attributes, bias).astype(np.float64)
        assert_activation_close(y, conv, activation, params)


def test_activation_defaults_and_onnxruntime_ops(library: str) -> None:
    """Default parameters are ONNX's; results match onnxruntime's own Conv + activation nodes."""
    c, m, size = 6, 10, 9
    rng = np.random.default_rng(21)
    container, dense = random_container(rng, (m, c, 3, 3), sparsity=0.2, bits=6)
    bias = rng.standard_normal(m).astype(np.float32)
    x = random_activations(rng, (1, c, size, size)) * 2
    ops = {
        "relu": ("Relu", {}), "sigmoid": ("Sigmoid", {}), "tanh": ("Tanh", {}), "hard_swish": ("HardSwish", {}),
        "hard_sigmoid": ("HardSigmoid", {}), "leaky_relu": ("LeakyRelu", {}),
    }
    for activation, (op, attrs) in ops.items():
        (y,) = make_session(dc_conv_model(container, {"pads": [1, 1, 1, 1]}, bias=bias, activation=activation),
                            library).run(None, {"x": x})
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
                 helper.make_node(op, ["c"], ["y"], **attrs)]
        model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                       [numpy_helper.from_array(dense, "w"), numpy_helper.from_array(bias, "b")])
        reference = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"x": x})[0]
        assert_matches_reference(y, reference.astype(np.float64), rtol=1e-5)
    # Clip [0, 6] is Relu6; SiLU is x * Sigmoid(x).
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["c", "lo", "hi"], ["y"])]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                   [numpy_helper.from_array(dense, "w"), numpy_helper.from_array(bias, "b"),
                    numpy_helper.from_array(np.float32(0.0), "lo"), numpy_helper.from_array(np.float32(6.0), "hi")])
    reference = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    (y,) = make_session(dc_conv_model(container, {"pads": [1, 1, 1, 1]}, bias=bias, activation="clip",
                                      activation_params=[0.0, 6.0]), library).run(None, {"x": x})
    assert_matches_reference(y, reference.astype(np.float64))


@pytest.mark.parametrize(
    ("activation", "params", "message"),
    [
        ("swish", [], 'activation must be "none", .*got "swish"'),
        ("clip", [1.0], 'activation_params of activation "clip" must have 2 values, got 1'),
        ("clip", [2.0, 1.0], "min <= max"),
        ("relu", [1.0], 'activation_params of activation "relu" must have 0 values'),
        ("leaky_relu", [float("nan")], "NaN"),
    ],
)
def test_bad_activation_fails_session_creation(library: str, activation: str, params: list, message: str) -> None:
    container, _ = random_container(np.random.default_rng(0), (4, 3, 3, 3), sparsity=0.0)
    with pytest.raises(Exception, match="DCConv node 'conv'.*" + message):
        make_session(dc_conv_model(container, {}, activation=activation, activation_params=params), library)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("isa", ISAS)
def test_weights_above_the_whole_decode_limit(library: str, isa: str, bits: int) -> None:
    """More than 2^20 weights: each task decodes its tiles' blocks (4-bit: nibbles from odd positions too)."""
    rng = np.random.default_rng(9)
    container, dense = random_container(rng, (131, 999, 3, 3), sparsity=0.3, bits=bits)
    attributes = {"pads": [1, 1, 1, 1]}
    bias = rng.standard_normal(131).astype(np.float32)
    x = random_activations(rng, (1, 999, 3, 7))
    model = dc_conv_model(container, attributes, bias=bias, activation="relu")
    (y,) = session_for(model, library, isa, threads=2).run(None, {"x": x})
    assert_matches_reference(y, np.maximum(reference_conv(x, dense, attributes, bias).astype(np.float64), 0))


def test_dc_matmul_takes_the_new_activations(library: str) -> None:
    from test_runtime_support import matmul_model, reference_matmul

    rng = np.random.default_rng(4)
    for sparsity, rows in ((0.0, 40), (0.9, 3)):  # code panels, index layout
        container, dense = random_container(rng, (50, 37), sparsity=sparsity, bits=6)
        b = rng.standard_normal(37).astype(np.float32)
        for activation, params in ACTIVATIONS.items():
            model = matmul_model(container, bias=b)
            model.graph.node[0].attribute.append(helper.make_attribute("activation", activation))
            if params:
                model.graph.node[0].attribute.append(helper.make_attribute("activation_params", params))
            x = random_activations(rng, (rows, 50)) * 2
            (y,) = make_session(model, library).run(None, {"x": x})
            assert_activation_close(y, reference_matmul(x, dense, bias=b), activation, params)


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
    # Every kernel variant the CPU has, with every activation on the code tiles and the depthwise kernel.
    for isa in ISAS:
        for name, *_ in KERNEL_CASES:
            for sparsity, bits in ((0.0, 5), (0.9, 5), (0.3, 8), (0.0, 4), (0.3, 4), (0.3, 3)):
                run_case(library, name, sparsity, threads=2, with_bias=True, isa=isa, bits=bits)
        for activation, params in ACTIVATIONS.items():
            for name in ("pw_tail", "strided_rows", "dw_5x5"):
                _, c, m, height, width, _, attributes = next(case for case in CASES if case[0] == name)
                container, _ = _case_container(name, 0.3)
                model = dc_conv_model(container, attributes, bias=np.ones(m, np.float32), activation=activation,
                                      activation_params=params)
                (y,) = session_for(model, library, isa, 2).run(
                    None, {"x": random_activations(np.random.default_rng(1), (1, c, height, width))})
                assert np.isfinite(y).all()
    rng = np.random.default_rng(9)
    for bits in (8, 4):
        container, dense = random_container(rng, (131, 999, 3, 3), sparsity=0.3, bits=bits)
        for isa in ISAS:
            session = session_for(dc_conv_model(container, {"pads": [1, 1, 1, 1]}), library, isa, 2)
            session.run(None, {"x": random_activations(rng, (1, 999, 3, 7))})
    print("conv sanitizer workload: ok")


if __name__ == "__main__":
    sanitizer_workload(sys.argv[1])
