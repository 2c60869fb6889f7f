"""DCMatMul's code-panel GEMM path (many rows), fused activations, against numpy on the decoded weight.

Weights with at least 25 % of their values kept are held as code panels
(docs/OPERATORS.md, "Code panels"); every instruction-set variant of the
kernels is selected in turn with ONNX_DC_KERNEL_ISA (read when a session is
created), so this machine's AVX-512 / VBMI kernels, the AVX2 ones and the
baseline ones all run against the same reference.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

from onnx_dc.graph.library import ops_library_path
from onnx_dc.codec.container_reader import decode_container
from onnx_dc.codec.container import encode_container
from test_runtime_support import (
    assert_matches_reference,
    make_session,
    matmul_model,
    random_activations,
    random_container,
    reference_matmul,
)

ISAS = ("generic", "avx2", "avx512", "vbmi")  # "vbmi" (anything unknown): the best the CPU has
ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh")
_erf = np.vectorize(math.erf)


@pytest.fixture(scope="module")
def library() -> str:
    return ops_library_path()


def activate(y: np.ndarray, activation: str) -> np.ndarray:
    if activation == "relu":
        return np.maximum(y, 0.0)
    if activation == "gelu":
        return 0.5 * y * (1.0 + _erf(y / math.sqrt(2.0)))
    if activation == "gelu_tanh":
        return 0.5 * y * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (y + 0.044715 * y**3)))
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-y))
    if activation == "silu":
        return y / (1.0 + np.exp(-y))
    return y


def session_for(model, library: str, isa: str, threads: int = 1):
    previous = os.environ.get("ONNX_DC_KERNEL_ISA")
    os.environ["ONNX_DC_KERNEL_ISA"] = isa
    try:
        return make_session(model, library, threads=threads)
    finally:
        if previous is None:
            del os.environ["ONNX_DC_KERNEL_ISA"]
        else:
            os.environ["ONNX_DC_KERNEL_ISA"] = previous


def gemm_model(container: bytes, *, activation: str | None = None, **kwargs):
    model = matmul_model(container, **kwargs)
    if activation is not None:
        model.graph.node[0].attribute.append(helper.make_attribute("activation", activation))
    return model


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", [2, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_panels_match_reference_with_remainders(library: str, isa: str, bits: int, sparsity: float) -> None:
    """Rows, K and N that are not multiples of the tile (14 / 6 / 4 rows), the task (336 rows), block (128) or panel (32) sizes."""
    rng = np.random.default_rng(bits * 10 + int(sparsity * 2))
    for k, n in ((129, 33), (300, 100), (7, 31), (256, 64)):
        container, dense = random_container(rng, (k, n), sparsity=sparsity, bits=bits)
        session = session_for(matmul_model(container), library, isa)
        for rows in (1, 5, 12, 13, 64, 241):
            x = random_activations(rng, (rows, k))
            (y,) = session.run(None, {"x": x})
            assert_matches_reference(y, reference_matmul(x, dense))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("trans_b", [0, 1])
def test_bias_alpha_beta_and_activations(library: str, isa: str, activation: str, trans_b: int) -> None:
    k, n = 200, 70
    rng = np.random.default_rng(3 + trans_b)
    container, dense = random_container(rng, (n, k) if trans_b else (k, n), sparsity=0.3, bits=6)
    bias = rng.standard_normal(n).astype(np.float32)
    model = gemm_model(container, trans_b=trans_b, alpha=0.5, beta=2.0, bias=bias, activation=activation)
    session = session_for(model, library, isa)
    for rows in (1, 3, 40):
        x = random_activations(rng, (rows, k))
        (y,) = session.run(None, {"x": x})
        reference = reference_matmul(x, dense, trans_b=trans_b, alpha=0.5, beta=2.0, bias=bias)
        assert_matches_reference(y, activate(reference, activation), rtol=2e-5)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("sparse_input", [0, 1])
def test_activations_on_the_index_layout(library: str, activation: str, sparse_input: int) -> None:
    """Heavily pruned weights keep the index layout; GELU is then a pass over Y."""
    rng = np.random.default_rng(4)
    container, dense = random_container(rng, (150, 90), sparsity=0.9)
    bias = rng.standard_normal(90).astype(np.float32)
    session = make_session(gemm_model(container, bias=bias, activation=activation, sparse_input=sparse_input), library)
    for rows in (1, 9, 70):
        x = random_activations(rng, (rows, 150))
        (y,) = session.run(None, {"x": x})
        assert_matches_reference(y, activate(reference_matmul(x, dense, bias=bias), activation), rtol=2e-5)


def test_activation_extremes(library: str) -> None:
    """GELU forms, SiLU and sigmoid far in the tails (exp clamped) and at 0; NaN propagates."""
    codebook = np.array([1.0], np.float32)
    container = encode_container(np.zeros((1, 1), np.int16), codebook, bits=1, index_bits=1)
    values = np.array([[-200.0], [-30.0], [-5.0], [-1e-3], [0.0], [1e-3], [5.0], [30.0], [200.0], [np.nan]],
                      np.float32)
    for activation in ("gelu", "gelu_tanh", "relu", "silu", "sigmoid"):
        (y,) = make_session(gemm_model(container, activation=activation), library).run(None, {"x": values})
        expected = activate(values.astype(np.float64), activation)
        assert np.isnan(y[-1, 0])
        np.testing.assert_allclose(y[:-1], expected[:-1], rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("isa", ISAS)
def test_thread_count_does_not_change_results(library: str, isa: str) -> None:
    rng = np.random.default_rng(5)
    container, _ = random_container(rng, (384, 200), sparsity=0.0, bits=8)
    x = random_activations(rng, (2, 300, 384))  # rank 3: [batch, tokens, K], two tasks of rows
    outputs = [session_for(gemm_model(container, activation="gelu"), library, isa, threads=t).run(None, {"x": x})[0]
               for t in (1, 2, 3)]
    assert outputs[0].shape == (2, 300, 200)
    for other in outputs[1:]:
        assert np.array_equal(outputs[0], other)


@pytest.mark.parametrize("isa", ISAS)
def test_rank_three_input(library: str, isa: str) -> None:
    rng = np.random.default_rng(6)
    container, dense = random_container(rng, (96, 48), sparsity=0.0, bits=5)
    session = session_for(matmul_model(container), library, isa)
    x = random_activations(rng, (3, 17, 96))
    (y,) = session.run(None, {"x": x})
    assert y.shape == (3, 17, 48)
    assert_matches_reference(y, reference_matmul(x, dense))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("zero_in_codebook", [True, False])
def test_full_eight_bit_codebook_with_pruning(library: str, isa: str, zero_in_codebook: bool) -> None:
    """256 values and pruned weights: panels when a value is 0 (its index is the zero index), index layout otherwise."""
    rng = np.random.default_rng(7)
    codebook = np.sort(rng.standard_normal(256)).astype(np.float32)
    if zero_in_codebook:
        codebook[np.argmin(np.abs(codebook))] = 0.0
    codebook = np.unique(codebook)
    assert codebook.size == 256
    codes = rng.integers(0, 256, size=(140, 70))
    codes[rng.random(codes.shape) < 0.5] = -1
    container = encode_container(codes, codebook, bits=8, index_bits=4)
    dense = decode_container(container)
    session = session_for(matmul_model(container), library, isa)
    for rows in (1, 30):
        x = random_activations(rng, (rows, 140))
        assert_matches_reference(session.run(None, {"x": x})[0], reference_matmul(x, dense))


def _has_amx() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "amx_bf16" in flags and "avx512_bf16" in flags


@pytest.mark.parametrize("bits,sparsity", [(2, 0.0), (5, 0.5), (6, 0.0), (8, 0.0), (8, 0.4)])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_bf16x3_precision(library: str, bits: int, sparsity: float, trans_b: int) -> None:
    """precision = "bf16x3": AMX tiles where the CPU has them (about 1e-5 of the largest output), float elsewhere."""
    rng = np.random.default_rng(bits + trans_b)
    for k, n in ((300, 45), (257, 64), (33, 31)):
        container, dense = random_container(rng, (n, k) if trans_b else (k, n), sparsity=sparsity, bits=bits)
        bias = rng.standard_normal(n).astype(np.float32)
        for activation in ("none", "gelu"):
            model = gemm_model(container, trans_b=trans_b, bias=bias, alpha=0.5, beta=2.0, activation=activation)
            model.graph.node[0].attribute.append(helper.make_attribute("precision", "bf16x3"))
            sessions = [make_session(model, library, threads=t) for t in (1, 2)]
            for rows in (1, 16, 17, 64, 241):
                x = random_activations(rng, (rows, k))
                x[:, :2] *= 20  # outlier features, as transformer activations have
                y1, y2 = (s.run(None, {"x": x})[0] for s in sessions)
                assert np.array_equal(y1, y2)
                reference = reference_matmul(x, dense, trans_b=trans_b, alpha=0.5, beta=2.0, bias=bias)
                assert_matches_reference(y1, activate(reference, activation), rtol=4e-5 if _has_amx() else 2e-5)


def test_bf16x3_rank_three_and_exactness_elsewhere(library: str) -> None:
    rng = np.random.default_rng(12)
    container, dense = random_container(rng, (96, 70), sparsity=0.0, bits=8)
    model = gemm_model(container)
    model.graph.node[0].attribute.append(helper.make_attribute("precision", "bf16x3"))
    x = random_activations(rng, (2, 40, 96))
    (y,) = make_session(model, library).run(None, {"x": x})
    assert y.shape == (2, 40, 70)
    assert_matches_reference(y, reference_matmul(x, dense), rtol=4e-5)
    # Without the attribute (precision "float") the same session is exact to float rounding.
    (y,) = make_session(gemm_model(container), library).run(None, {"x": x})
    assert_matches_reference(y, reference_matmul(x, dense))


def test_unknown_precision_fails_session_creation(library: str) -> None:
    container, _ = random_container(np.random.default_rng(0), (8, 8), sparsity=0.0)
    model = gemm_model(container)
    model.graph.node[0].attribute.append(helper.make_attribute("precision", "int8"))
    with pytest.raises(Exception, match='precision must be "float" or "bf16x3", got "int8"'):
        make_session(model, library)


def test_unknown_activation_fails_session_creation(library: str) -> None:
    container, _ = random_container(np.random.default_rng(0), (8, 8), sparsity=0.0)
    with pytest.raises(Exception, match='activation must be "none", "relu", .* or "tanh", got "swish"'):
        make_session(gemm_model(container, activation="swish"), library)
    with pytest.raises(Exception, match='relu = 1 contradicts activation "gelu"'):
        make_session(gemm_model(container, activation="gelu", relu=1), library)


def test_non_constant_container_uses_panels_per_call(library: str) -> None:
    rng = np.random.default_rng(8)
    session = make_session(matmul_model(None, container_name="w_dc"), library, threads=2)
    for shape, sparsity in (((64, 40), 0.0), ((33, 70), 0.9)):
        container, dense = random_container(rng, shape, sparsity=sparsity, bits=6)
        x = random_activations(rng, (20, shape[0]))
        (y,) = session.run(None, {"x": x, "w_dc": np.frombuffer(container, np.uint8)})
        assert_matches_reference(y, reference_matmul(x, dense))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(0, 40), k=st.integers(1, 150), n=st.integers(1, 70), bits=st.integers(1, 8),
    sparsity=st.sampled_from([0.0, 0.2, 0.6]), trans_b=st.integers(0, 1), seed=st.integers(0, 2**31),
)
def test_random_shapes_match_reference(library: str, rows: int, k: int, n: int, bits: int, sparsity: float,
                                       trans_b: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    container, dense = random_container(rng, (n, k) if trans_b else (k, n), sparsity=sparsity, bits=bits)
    x = random_activations(rng, (rows, k))
    (y,) = make_session(matmul_model(container, trans_b=trans_b), library).run(None, {"x": x})
    reference = reference_matmul(x, dense, trans_b=trans_b)
    if rows == 0:
        assert y.shape == (0, n)
    else:
        assert_matches_reference(y, reference)
