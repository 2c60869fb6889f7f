"""DCGather (ONNX Gather, axis 0, straight from a container) against numpy's take on the decoded tensor,
and DCDecompress's compact forms (codes, sparse rows, dense bytes)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from onnx_dc.graph.library import ops_library_path
from onnx_dc.codec.container_reader import decode_container
from onnx_dc.codec.container import encode_container
from test_runtime_support import (
    DECOMPRESS_OPS,
    DOMAIN,
    _model,
    container_initializer,
    decompress_model,
    make_session,
    random_container,
    same_bits,
)


@pytest.fixture(scope="module")
def library() -> str:
    return ops_library_path()


def gather_model(container: bytes | None, *, index_type: int = TensorProto.INT64, axis: int | None = None,
                 container_name: str = "emb.dc"):
    attributes = {} if axis is None else {"axis": axis}
    node = helper.make_node("DCGather", [container_name, "ids"], ["y"], domain=DOMAIN, name="embed", **attributes)
    inputs = [helper.make_tensor_value_info("ids", index_type, None)]
    initializers = []
    if container is None:
        inputs.append(helper.make_tensor_value_info(container_name, TensorProto.UINT8, None))
    else:
        initializers.append(container_initializer(container, container_name))
    graph = helper.make_graph([node], "dc_gather", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers)
    return _model(graph)


def full_codebook_container(rng: np.random.Generator, shape: tuple[int, ...], *, zero: bool, sparsity: float):
    """8-bit codes over 256 values (with or without an exact 0), ``sparsity`` of them pruned."""
    codebook = np.unique(np.sort(rng.standard_normal(300)).astype(np.float32))[:256]
    if zero:
        codebook[np.argmin(np.abs(codebook))] = 0.0
        codebook = np.sort(codebook)
    codes = rng.integers(0, 256, size=shape)
    codes[rng.random(shape) < sparsity] = -1
    container = encode_container(codes, codebook, bits=8, index_bits=4)
    return container, decode_container(container)


# Weight forms: codes (few pruned), sparse rows (most pruned), dense bytes (256 values, no 0, pruned).
FORMS = [("codes", 0.0), ("codes", 0.3), ("sparse", 0.9), ("sparse", 1.0), ("full", 0.0), ("full-no-zero", 0.5),
         ("full-zero", 0.5)]


def form_container(rng, shape, form: str, sparsity: float):
    if form.startswith("full"):
        return full_codebook_container(rng, shape, zero=form != "full-no-zero", sparsity=sparsity)
    return random_container(rng, shape, sparsity=sparsity, bits=6)


@pytest.mark.parametrize("form,sparsity", FORMS)
@pytest.mark.parametrize("index_type", [TensorProto.INT64, TensorProto.INT32])
def test_gather_matches_take(library: str, form: str, sparsity: float, index_type: int) -> None:
    rng = np.random.default_rng(len(form) + int(sparsity * 10))
    container, table = form_container(rng, (500, 48), form, sparsity)
    session = make_session(gather_model(container, index_type=index_type), library)
    dtype = np.int64 if index_type == TensorProto.INT64 else np.int32
    for shape in ((64,), (1, 64), (3, 7), (), (0,), (2, 0, 3), (8, 128)):
        ids = rng.integers(-500, 500, size=shape).astype(dtype)
        (y,) = session.run(None, {"ids": ids})
        expected = np.take(table, ids, axis=0)
        assert y.shape == expected.shape
        assert same_bits(y, expected)


@pytest.mark.parametrize("isa", ["generic", "avx512"])
@pytest.mark.parametrize("bits,sparsity", [(2, 0.0), (4, 0.2), (5, 0.3), (6, 0.0), (8, 0.0), (8, 0.3)])
def test_gather_expansion_variants(library: str, isa: str, bits: int, sparsity: float) -> None:
    """Codes expanded by the scalar loop (generic) and by AVX-512 permutes (every codebook size, row tails)."""
    import os

    rng = np.random.default_rng(bits)
    container, table = random_container(rng, (100, 37), sparsity=sparsity, bits=bits)
    previous = os.environ.get("ONNX_DC_KERNEL_ISA")
    os.environ["ONNX_DC_KERNEL_ISA"] = isa
    try:
        session = make_session(gather_model(container), library)
    finally:
        if previous is None:
            del os.environ["ONNX_DC_KERNEL_ISA"]
        else:
            os.environ["ONNX_DC_KERNEL_ISA"] = previous
    ids = rng.integers(-100, 100, size=(3, 50))
    assert same_bits(session.run(None, {"ids": ids})[0], np.take(table, ids, axis=0))


def test_gather_rank_three_data_and_large_batch_in_parallel(library: str) -> None:
    rng = np.random.default_rng(3)
    container, table = random_container(rng, (300, 4, 40), sparsity=0.5, bits=5)
    ids = rng.integers(-300, 300, size=(8, 128))
    outputs = [make_session(gather_model(container), library, threads=t).run(None, {"ids": ids})[0] for t in (1, 2)]
    assert same_bits(outputs[0], np.take(table, ids, axis=0))
    assert np.array_equal(outputs[0], outputs[1])


@pytest.mark.parametrize("bad", [500, -501, 2**40, -(2**62)])
def test_out_of_range_index_fails_the_run(library: str, bad: int) -> None:
    container, _ = random_container(np.random.default_rng(4), (500, 8), sparsity=0.2)
    session = make_session(gather_model(container), library)
    with pytest.raises(Exception, match=rf"DCGather node 'embed', container 'emb.dc': index {bad} \(element 2 of "
                                        r"indices\) is out of range for 500 rows"):
        session.run(None, {"ids": np.array([0, -1, bad, 3], np.int64)})
    # The session still works afterwards.
    assert session.run(None, {"ids": np.array([1], np.int64)})[0].shape == (1, 8)


def test_wrong_index_type_fails_the_run(library: str) -> None:
    container, _ = random_container(np.random.default_rng(5), (10, 8), sparsity=0.2)
    session = make_session(gather_model(container, index_type=TensorProto.FLOAT), library)
    with pytest.raises(Exception, match="indices must be int64 or int32"):
        session.run(None, {"ids": np.zeros(3, np.float32)})


@pytest.mark.parametrize("axis,message", [(1, "axis must be 0"), (None, None), (-2, None)])
def test_axis(library: str, axis: int | None, message: str | None) -> None:
    container, table = random_container(np.random.default_rng(6), (10, 8), sparsity=0.2)
    if message:
        with pytest.raises(Exception, match=message):
            make_session(gather_model(container, axis=axis), library)
    else:
        (y,) = make_session(gather_model(container, axis=axis), library).run(None, {"ids": np.array([9, 0], np.int64)})
        assert same_bits(y, table[[9, 0]])


@pytest.mark.parametrize("shape,dtype,message", [((), np.float32, "rank >= 1"), ((4, 5), np.float16, "must be float32")])
def test_unsupported_data_fails_session_creation(library: str, shape, dtype, message: str) -> None:
    container, _ = random_container(np.random.default_rng(7), shape, sparsity=0.0, dtype=dtype)
    with pytest.raises(Exception, match=message):
        make_session(gather_model(container), library)


def test_non_constant_container_and_corruption(library: str) -> None:
    rng = np.random.default_rng(8)
    session = make_session(gather_model(None), library)
    container, table = random_container(rng, (40, 6), sparsity=0.9)
    ids = np.array([[3, -1], [0, 39]], np.int64)
    (y,) = session.run(None, {"ids": ids, "emb.dc": np.frombuffer(container, np.uint8)})
    assert same_bits(y, np.take(table, ids, axis=0))
    with pytest.raises(Exception, match="checksum mismatch"):
        session.run(None, {"ids": ids, "emb.dc": np.frombuffer(container[:-1] + b"\0", np.uint8)})
    with pytest.raises(Exception, match="checksum mismatch"):
        make_session(gather_model(container[:-1] + b"\0"), library)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 60), cols=st.integers(0, 20), sparsity=st.sampled_from([0.0, 0.5, 0.95]),
       bits=st.integers(1, 8), seed=st.integers(0, 2**31))
def test_random_tables(library: str, rows: int, cols: int, sparsity: float, bits: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    container, table = random_container(rng, (rows, cols), sparsity=sparsity, bits=bits)
    ids = rng.integers(-rows, rows, size=int(rng.integers(0, 30)))
    (y,) = make_session(gather_model(container), library).run(None, {"ids": ids})
    assert same_bits(y, np.take(table, ids, axis=0))


@pytest.mark.parametrize("form,sparsity", FORMS)
@pytest.mark.parametrize("dtype", list(DECOMPRESS_OPS))
def test_decompress_compact_forms(library: str, form: str, sparsity: float, dtype) -> None:
    rng = np.random.default_rng(9)
    if form.startswith("full"):
        if dtype != np.float32:
            pytest.skip("the 256-value case is float32 only")
        container, dense = full_codebook_container(rng, (37, 3, 11), zero=form != "full-no-zero", sparsity=sparsity)
    else:
        container, dense = random_container(rng, (37, 3, 11), sparsity=sparsity, bits=4, dtype=dtype)
    op_type, elem_type = DECOMPRESS_OPS[np.dtype(dtype)]
    session = make_session(decompress_model(container, op_type, elem_type), library)
    for _ in range(2):  # expanded again on every run
        (y,) = session.run(None, {})
        assert same_bits(y, dense)
