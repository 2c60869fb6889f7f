"""DCMatMul in onnxruntime against the numpy reference (the decompressed dense weight)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from onnx_dc.graph.library import ops_library_path
from test_runtime_support import (
    REPO_ROOT,
    assert_matches_reference,
    make_session,
    matmul_model,
    random_activations,
    random_container,
    reference_matmul,
)

# K x N of the grid's weight: N > 2048 gives two output blocks of 1050
# columns (batch tiles of 8); the Gemm tests use N = 300 (one block, tiles of 16).
GRID_K, GRID_N = 96, 2100
BATCHES = (1, 3, 64, 257)


@pytest.fixture(scope="module")
def library() -> str:
    return ops_library_path()


@functools.lru_cache(maxsize=None)
def _grid_container(sparsity: float, layout: str) -> tuple[bytes, np.ndarray]:
    rng = np.random.default_rng(int(sparsity * 1000) + (layout == "sparse"))
    return random_container(rng, (GRID_K, GRID_N), sparsity=sparsity, layout=layout)


@pytest.mark.parametrize("sparse_input", [0, 1])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layout", ["dense", "sparse"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99, 1.0])
def test_matches_reference(library: str, sparsity: float, layout: str, threads: int, sparse_input: int) -> None:
    """Every weight layout (dense values, column runs, row runs: sparse_input) and batch size."""
    container, dense = _grid_container(sparsity, layout)
    session = make_session(matmul_model(container, sparse_input=sparse_input), library, threads=threads)
    rng = np.random.default_rng(11)
    for batch in BATCHES:
        for shape in ((batch, GRID_K), (2, batch, GRID_K)):
            x = random_activations(rng, shape)
            (y,) = session.run(None, {"x": x})
            assert y.shape == shape[:-1] + (GRID_N,)
            assert_matches_reference(y, reference_matmul(x, dense))


@pytest.mark.parametrize("bits", [2, 8])
@pytest.mark.parametrize("sparse_input", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("zero_fraction", [0.0, 0.5, 0.95, 1.0])
def test_column_and_row_runs_over_several_blocks(
    library: str, zero_fraction: float, trans_b: int, sparse_input: int, bits: int
) -> None:
    """Column runs (sparse_input=0) and row runs (1) across several blocks, every kernel.

    Column runs cut K into row blocks of at most 4096 rows (K = 8300: three),
    row runs cut N into output blocks of at most 2048 columns (N = 4200:
    three); batches 1, 4, 8 and 19 reach every tile width. 2-bit codes put
    most weights of a run in groups of 8 of one codebook index, 8-bit codes
    leave most as singles (docs/OPERATORS.md, "In-memory layout").
    """
    rng = np.random.default_rng(int(zero_fraction * 100) + 7 * trans_b + 3 * sparse_input + bits)
    k, n = (24, 4200) if sparse_input else (8300, 24)
    container, dense = random_container(rng, (n, k) if trans_b else (k, n), sparsity=0.9, bits=bits, index_bits=5)
    bias = rng.standard_normal(n).astype(np.float32)
    for b in (None, bias):
        model = matmul_model(container, trans_b=trans_b, alpha=0.5, beta=2.0, bias=b, sparse_input=sparse_input)
        session = make_session(model, library)
        for batch in (1, 4, 8, 19):
            x = random_activations(rng, (batch, k), zero_fraction=zero_fraction)
            (y,) = session.run(None, {"x": x})
            assert_matches_reference(
                y, reference_matmul(x, dense, trans_b=trans_b, alpha=0.5, beta=2.0, bias=b)
            )


@pytest.mark.parametrize("sparsity", [0.3, 0.9])
@pytest.mark.parametrize("sparse_input", [0, 1])
def test_fused_relu(library: str, sparsity: float, sparse_input: int) -> None:
    """relu=1 gives max(alpha * x @ W' + beta * bias, 0) for every kernel and layout."""
    rng = np.random.default_rng(int(sparsity * 10))
    container, dense = random_container(rng, (96, 300), sparsity=sparsity)
    bias = rng.standard_normal(300).astype(np.float32)
    model = matmul_model(container, alpha=0.5, beta=2.0, relu=1, bias=bias, sparse_input=sparse_input)
    session = make_session(model, library)
    for batch, zero_fraction in ((1, 0.0), (1, 0.9), (3, 0.3), (64, 0.3)):
        x = random_activations(rng, (batch, 96), zero_fraction=zero_fraction)
        (y,) = session.run(None, {"x": x})
        expected = np.maximum(reference_matmul(x, dense, alpha=0.5, beta=2.0, bias=bias), 0.0)
        assert (y >= 0).all() and (y == 0).any()
        assert_matches_reference(y, expected)


@pytest.mark.parametrize("attribute", ["relu", "sparse_input"])
def test_bad_flag_attribute_fails_session_creation(library: str, attribute: str) -> None:
    container, _ = random_container(np.random.default_rng(0), (8, 8), sparsity=0.5)
    with pytest.raises(Exception, match=f"{attribute} must be 0 or 1, got 2"):
        make_session(matmul_model(container, **{attribute: 2}), library)


def test_container_layout_is_as_requested() -> None:
    from onnx_dc.codec.container_reader import read_container_info

    assert read_container_info(_grid_container(0.9, "dense")[0]).layout == "dense"
    assert read_container_info(_grid_container(0.9, "sparse")[0]).layout == "sparse"


@pytest.mark.parametrize("bias_shape", [None, (300,), (1, 300), (1,), (1, 1), ()])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_attributes_and_bias(library: str, trans_b: int, bias_shape: tuple[int, ...] | None) -> None:
    k, n = 130, 300
    rng = np.random.default_rng(5 + trans_b)
    container, dense = random_container(rng, (n, k) if trans_b else (k, n), sparsity=0.8)
    bias = None if bias_shape is None else rng.standard_normal(bias_shape).astype(np.float32)
    session = make_session(matmul_model(container, trans_b=trans_b, alpha=0.5, beta=-2.0, bias=bias), library)
    for batch in BATCHES:
        x = random_activations(rng, (batch, k))
        (y,) = session.run(None, {"x": x})
        assert_matches_reference(y, reference_matmul(x, dense, trans_b=trans_b, alpha=0.5, beta=-2.0, bias=bias))


def test_attribute_defaults_are_matmul(library: str) -> None:
    rng = np.random.default_rng(2)
    container, dense = random_container(rng, (50, 20), sparsity=0.5)
    bias = rng.standard_normal(20).astype(np.float32)
    (y,) = make_session(matmul_model(container, bias=bias), library).run(None, {"x": (x := random_activations(rng, (4, 50)))})
    assert_matches_reference(y, reference_matmul(x, dense, bias=bias))


def test_bias_left_out_with_an_empty_input_name(library: str) -> None:
    rng = np.random.default_rng(13)
    container, dense = random_container(rng, (20, 6), sparsity=0.5)
    model = matmul_model(container, beta=3.0)
    model.graph.node[0].input.append("")  # optional input present but empty
    x = random_activations(rng, (2, 20))
    (y,) = make_session(model, library).run(None, {"x": x})
    assert_matches_reference(y, reference_matmul(x, dense))


def test_one_dimensional_input(library: str) -> None:
    rng = np.random.default_rng(3)
    container, dense = random_container(rng, (40, 9), sparsity=0.5)
    x = random_activations(rng, (40,))
    (y,) = make_session(matmul_model(container), library).run(None, {"x": x})
    assert y.shape == (9,)
    assert_matches_reference(y, reference_matmul(x, dense))


def test_all_zero_activations_give_the_bias_exactly(library: str) -> None:
    rng = np.random.default_rng(4)
    container, _ = random_container(rng, (64, 33), sparsity=0.3)
    bias = rng.standard_normal(33).astype(np.float32)
    session = make_session(matmul_model(container, beta=1.0, bias=bias), library)
    for batch in (1, 20):
        (y,) = session.run(None, {"x": np.zeros((batch, 64), np.float32)})
        assert np.array_equal(y, np.broadcast_to(bias, (batch, 33)))


@pytest.mark.parametrize("weight_shape,x_shape,y_shape", [((0, 5), (3, 0), (3, 5)), ((6, 0), (3, 6), (3, 0)),
                                                          ((6, 5), (0, 6), (0, 5)), ((6, 5), (2, 0, 6), (2, 0, 5))])
def test_empty_shapes(library: str, weight_shape: tuple, x_shape: tuple, y_shape: tuple) -> None:
    rng = np.random.default_rng(6)
    container, dense = random_container(rng, weight_shape, sparsity=0.5)
    x = random_activations(rng, x_shape)
    (y,) = make_session(matmul_model(container), library).run(None, {"x": x})
    assert y.shape == y_shape
    assert np.array_equal(y, reference_matmul(x, dense).astype(np.float32))


def test_results_do_not_depend_on_thread_count(library: str) -> None:
    container, _ = _grid_container(0.9, "sparse")
    rng = np.random.default_rng(8)
    inputs = [random_activations(rng, (batch, GRID_K)) for batch in BATCHES]
    results = []
    for threads in (1, 2, 3):
        session = make_session(matmul_model(container), library, threads=threads)
        results.append([session.run(None, {"x": x})[0] for x in inputs])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert np.array_equal(a, b)


def test_eight_python_threads_share_one_session(library: str) -> None:
    container, _ = _grid_container(0.9, "dense")
    session = make_session(matmul_model(container), library, threads=2)
    rng = np.random.default_rng(9)
    inputs = [random_activations(rng, (batch, GRID_K)) for batch in (1, 3, 64, 257, 1, 5, 16, 33)]
    expected = [session.run(None, {"x": x})[0] for x in inputs]
    mismatches: list[int] = []
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for _ in range(15):
                if not np.array_equal(session.run(None, {"x": inputs[i]})[0], expected[i]):
                    mismatches.append(i)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not mismatches


def test_container_that_is_not_constant_is_decoded_per_call(library: str) -> None:
    rng = np.random.default_rng(10)
    session = make_session(matmul_model(None, container_name="w_dc"), library, threads=2)
    for shape in ((30, 20), (25, 7)):
        container, dense = random_container(rng, shape, sparsity=0.7)
        x = random_activations(rng, (5, shape[0]))
        (y,) = session.run(None, {"x": x, "w_dc": np.frombuffer(container, np.uint8)})
        assert_matches_reference(y, reference_matmul(x, dense))
    with pytest.raises(Exception, match="DCMatMul node 'fc', container 'w_dc': checksum mismatch"):
        session.run(None, {"x": x, "w_dc": np.frombuffer(container[:-1] + b"\0", np.uint8)})


def test_wrong_input_width_fails_the_run(library: str) -> None:
    container, _ = random_container(np.random.default_rng(1), (30, 20), sparsity=0.5)
    session = make_session(matmul_model(container), library)
    with pytest.raises(Exception, match=r"DCMatMul node 'fc'.*\[4, 31\].*K = 30"):
        session.run(None, {"x": np.ones((4, 31), np.float32)})


def test_bias_that_does_not_broadcast_per_column_fails_the_run(library: str) -> None:
    container, _ = random_container(np.random.default_rng(1), (30, 20), sparsity=0.5)
    session = make_session(matmul_model(container, bias=np.ones((4, 20), np.float32)), library)
    with pytest.raises(Exception, match=r"bias has shape \[4, 20\]"):
        session.run(None, {"x": np.ones((4, 30), np.float32)})


@pytest.mark.parametrize(
    "shape,dtype,message",
    [((4, 5, 6), np.float32, "must be 2-D"), ((10,), np.float32, "must be 2-D"), ((4, 5), np.float16, "must be float32")],
)
def test_unsupported_weight_fails_session_creation(library: str, shape: tuple, dtype: type, message: str) -> None:
    container, _ = random_container(np.random.default_rng(1), shape, sparsity=0.5, dtype=dtype)
    with pytest.raises(Exception, match=f"DCMatMul node 'fc', container 'fc.weight.dc': the weight {message}"):
        make_session(matmul_model(container), library)


def test_bad_trans_b_fails_session_creation(library: str) -> None:
    container, _ = random_container(np.random.default_rng(1), (4, 5), sparsity=0.5)
    with pytest.raises(Exception, match="trans_b must be 0 or 1, got 2"):
        make_session(matmul_model(container, trans_b=2), library)


_GENERIC_KERNELS = textwrap.dedent(
    """
    import sys
    import numpy as np
    from test_runtime_support import run_matmul_case
    rng = np.random.default_rng(12)
    for k, n, trans_b in ((96, 2100, 0), (130, 300, 1)):
        for sparsity in (0.0, 0.9):
            run_matmul_case(sys.argv[1], rng, k=k, n=n, sparsity=sparsity, layout="auto", trans_b=trans_b,
                            batches=(1, 3, 64, 257), threads=2)
    print("generic kernels ok")
    """
)


@pytest.mark.slow  # the full suite only: every kernel variant against numpy
def test_baseline_kernels_match_reference(library: str) -> None:
    """The kernels compiled without AVX2 (selected with ONNX_DC_KERNEL_ISA=generic)."""
    env = dict(os.environ, ONNX_DC_KERNEL_ISA="generic",
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT / "tests"), str(REPO_ROOT)]))
    result = subprocess.run([sys.executable, "-c", _GENERIC_KERNELS, library], capture_output=True, text=True,
                            env=env, check=False, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "generic kernels ok" in result.stdout
