"""DCDecompress and its typed variants: the dense tensor, bit for bit as the numpy decoder gives it."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from onnx_dc.graph.library import ops_library_path
from test_runtime_support import (
    DECOMPRESS_OPS,
    decompress_model,
    make_session,
    random_container,
    same_bits,
    vector_expected,
    vector_manifest,
)

DTYPES = [np.float32, np.float16, np.float64, ml_dtypes.bfloat16]


@pytest.fixture(scope="module")
def library() -> str:
    return ops_library_path()


@pytest.mark.parametrize("layout", ["dense", "sparse"])
@pytest.mark.parametrize("shape", [(3, 5, 7), (), (0, 4), (1, 1, 2, 1, 3, 1, 2, 1), (300, 70)])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_outputs_the_dense_tensor(library: str, dtype: type, shape: tuple, layout: str) -> None:
    rng = np.random.default_rng(len(shape))
    container, dense = random_container(rng, shape, sparsity=0.6, bits=4, index_bits=3, layout=layout, dtype=dtype)
    op_type, elem_type = DECOMPRESS_OPS[np.dtype(dtype)]
    session = make_session(decompress_model(container, op_type, elem_type), library)
    for _ in range(2):  # decoded once at creation, copied on every run
        (y,) = session.run(None, {})
        assert same_bits(y, dense)


@pytest.mark.parametrize("vector", [v for v in vector_manifest() if v["valid"]], ids=lambda v: v["file"])
def test_every_valid_vector(library: str, vector: dict) -> None:
    from test_runtime_support import VECTORS_DIR

    expected = vector_expected(vector)
    op_type, elem_type = DECOMPRESS_OPS[expected.dtype]
    data = (VECTORS_DIR / vector["file"]).read_bytes()
    (y,) = make_session(decompress_model(data, op_type, elem_type), library).run(None, {})
    assert same_bits(y, expected)


def test_container_that_is_not_constant_is_decoded_per_call(library: str) -> None:
    rng = np.random.default_rng(1)
    session = make_session(decompress_model(None, "DCDecompressFloat16", 10, container_name="c"), library)
    for shape in ((4, 3), (2, 2, 2), ()):
        container, dense = random_container(rng, shape, sparsity=0.5, bits=2, dtype=np.float16)
        (y,) = session.run(None, {"c": np.frombuffer(container, np.uint8)})
        assert same_bits(y, dense)
    container, _ = random_container(rng, (4, 3), sparsity=0.5, bits=2, dtype=np.float32)
    with pytest.raises(Exception, match="holds float32 but DCDecompressFloat16 outputs float16; use DCDecompress"):
        session.run(None, {"c": np.frombuffer(container, np.uint8)})


@pytest.mark.parametrize("container_dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_dtype_mismatch_names_the_operator_to_use(library: str, container_dtype: type) -> None:
    container, _ = random_container(np.random.default_rng(2), (3, 3), sparsity=0.5, bits=2, dtype=container_dtype)
    right_op, _ = DECOMPRESS_OPS[np.dtype(container_dtype)]
    for dtype, (op_type, elem_type) in DECOMPRESS_OPS.items():
        if op_type == right_op:
            continue
        with pytest.raises(Exception, match=f"{op_type} node 'decompress', container 'w.dc': .* use {right_op} for it"):
            make_session(decompress_model(container, op_type, elem_type), library)
