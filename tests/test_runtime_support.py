"""Shared helpers for the runtime tests (tests/test_runtime_*.py); no tests of its own.

Model builders for the custom operators, the numpy reference, CMake builds of
runtime/ for the test tools and the sanitizer build, and the workload that the
sanitizer test runs in a subprocess (``python -m test_runtime_support``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from onnx_dc.codec.container_reader import decode_container  # noqa: E402
from onnx_dc.codec.container import encode_container

RUNTIME_DIR = REPO_ROOT / "runtime"
VECTORS_DIR = REPO_ROOT / "tests" / "vectors"
DOMAIN = "ai.onnx_dc"
#: IR version of the test models: 10 is the newest onnxruntime 1.21 reads.
IR_VERSION = 8

#: DCDecompress operator and ONNX element type for each container dtype.
DECOMPRESS_OPS = {
    np.dtype(np.float32): ("DCDecompress", TensorProto.FLOAT),
    np.dtype(np.float16): ("DCDecompressFloat16", TensorProto.FLOAT16),
    np.dtype(np.float64): ("DCDecompressDouble", TensorProto.DOUBLE),
    np.dtype(ml_dtypes.bfloat16): ("DCDecompressBFloat16", TensorProto.BFLOAT16),
}


# ---------------------------------------------------------------------------- containers
def random_container(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    *,
    sparsity: float,
    bits: int = 5,
    index_bits: int = 5,
    layout: str = "auto",
    dtype: np.dtype | type = np.float32,
) -> tuple[bytes, np.ndarray]:
    """A container of random codes (``sparsity`` of them pruned) and its decoded dense tensor."""
    codebook = np.sort(rng.standard_normal(1 << bits)).astype(dtype)
    codes = rng.integers(0, 1 << bits, size=shape)
    codes[rng.random(shape) < sparsity] = -1
    container = encode_container(codes, codebook, bits=bits, index_bits=index_bits, layout=layout)
    return container, decode_container(container)


def container_initializer(container: bytes, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(np.frombuffer(container, dtype=np.uint8).copy(), name)


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = IR_VERSION
    return model


def matmul_model(
    container: bytes | None,
    *,
    trans_b: int | None = None,
    alpha: float | None = None,
    beta: float | None = None,
    relu: int | None = None,
    sparse_input: int | None = None,
    bias: np.ndarray | None = None,
    node_name: str = "fc",
    container_name: str = "fc.weight.dc",
) -> onnx.ModelProto:
    """``Y = DCMatMul(X, container[, bias])``; with ``container=None`` the container is a graph input."""
    attributes = {
        k: v
        for k, v in (
            ("trans_b", trans_b), ("alpha", alpha), ("beta", beta), ("relu", relu), ("sparse_input", sparse_input)
        )
        if v is not None
    }
    inputs = ["x", container_name]
    initializers = [] if container is None else [container_initializer(container, container_name)]
    if bias is not None:
        inputs.append("bias")
        initializers.append(numpy_helper.from_array(bias, "bias"))
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)]
    if container is None:
        graph_inputs.append(helper.make_tensor_value_info(container_name, TensorProto.UINT8, None))
    node = helper.make_node("DCMatMul", inputs, ["y"], domain=DOMAIN, name=node_name, **attributes)
    graph = helper.make_graph(
        [node], "dc_matmul", graph_inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers
    )
    return _model(graph)


def decompress_model(
    container: bytes | None,
    op_type: str,
    elem_type: int,
    *,
    node_name: str = "decompress",
    container_name: str = "w.dc",
) -> onnx.ModelProto:
    """``W = <op_type>(container)``; bfloat16 output is cast to float32 (numpy has no bfloat16 for onnxruntime)."""
    nodes = [helper.make_node(op_type, [container_name], ["w"], domain=DOMAIN, name=node_name)]
    out_type = elem_type
    if elem_type == TensorProto.BFLOAT16:
        nodes.append(helper.make_node("Cast", ["w"], ["y"], to=TensorProto.FLOAT))
        out_type = TensorProto.FLOAT
    else:
        nodes.append(helper.make_node("Identity", ["w"], ["y"]))
    graph_inputs = []
    initializers = []
    if container is None:
        graph_inputs.append(helper.make_tensor_value_info(container_name, TensorProto.UINT8, None))
    else:
        initializers.append(container_initializer(container, container_name))
    graph = helper.make_graph(
        nodes, "dc_decompress", graph_inputs, [helper.make_tensor_value_info("y", out_type, None)], initializers
    )
    return _model(graph)


def make_session(model: onnx.ModelProto, library: str, *, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def random_activations(rng: np.random.Generator, shape: tuple[int, ...], zero_fraction: float = 0.3) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    x[rng.random(shape) < zero_fraction] = 0.0
    return x


def reference_matmul(
    x: np.ndarray,
    weight: np.ndarray,
    *,
    trans_b: int = 0,
    alpha: float = 1.0,
    beta: float = 1.0,
    bias: np.ndarray | None = None,
) -> np.ndarray:
    """alpha * x @ W' + beta * bias in float64 (W' = weight or weight.T)."""
    w = weight.astype(np.float64)
    if trans_b:
        w = w.T
    y = alpha * (x.astype(np.float64) @ w)
    if bias is not None:
        y = y + beta * bias.astype(np.float64).reshape(-1)
    return y


def assert_matches_reference(y: np.ndarray, reference: np.ndarray, rtol: float = 1e-5) -> None:
    """Relative error of ``y`` at most ``rtol``, measured against the largest reference magnitude."""
    assert y.shape == reference.shape, (y.shape, reference.shape)
    assert y.dtype == np.float32
    scale = float(np.abs(reference).max()) if reference.size else 0.0
    error = float(np.abs(y.astype(np.float64) - reference).max()) if reference.size else 0.0
    if scale == 0.0:
        assert error == 0.0, f"expected exact zeros, max |y| = {error}"
    else:
        assert error <= rtol * scale, f"relative error {error / scale:.3g} > {rtol}"


# ---------------------------------------------------------------------------- format keywords
def format_error_keywords() -> list[str]:
    """The error keywords of docs/FORMAT.md section 7, in table order."""
    text = (REPO_ROOT / "docs" / "FORMAT.md").read_text()
    section = text.split("## 7.", 1)[1].split("\n## ", 1)[0]
    keywords = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].isdigit():
            keyword = cells[2].strip("`")
            if keyword not in keywords:
                keywords.append(keyword)
    assert len(keywords) > 20, "FORMAT.md section 7 table not found"
    return keywords


def leading_keyword(message: str, keywords: list[str]) -> str | None:
    """The format keyword that occurs first in ``message`` (the one naming the failed check)."""
    lowered = message.lower()
    found = [(lowered.find(k.lower()), -len(k), k) for k in keywords if k.lower() in lowered]
    return min(found)[2] if found else None


def vector_manifest() -> list[dict]:
    return json.loads((VECTORS_DIR / "manifest.json").read_text())["vectors"]


def vector_expected(vector: dict) -> np.ndarray:
    """The decoded tensor of a valid vector, in its real dtype (bfloat16 is stored as uint16 bits)."""
    stored = np.load(VECTORS_DIR / vector["expected"])
    dtype = np.dtype(ml_dtypes.bfloat16) if vector["dtype"] == "bfloat16" else np.dtype(vector["dtype"])
    return stored.view(dtype).reshape(vector["shape"])


def same_bits(actual: np.ndarray, expected: np.ndarray) -> bool:
    """Equal shape and bit-identical values (so +0.0 and -0.0 differ)."""
    expected = np.ascontiguousarray(expected.astype(actual.dtype))
    actual = np.ascontiguousarray(actual)
    return actual.shape == expected.shape and actual.tobytes() == expected.tobytes()


# ---------------------------------------------------------------------------- CMake builds
@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_runtime(name: str, *, sanitize: bool = False, compiler: str | None = None) -> Path:
    """Configure and build runtime/ (library and onnx_dc_decode) in runtime/build-<name>; return that directory.

    The build is incremental (CMake tracks the sources), so repeated test runs
    only rebuild what changed. Raises AssertionError with the build log on failure.
    """
    build_dir = RUNTIME_DIR / f"build-{name}"
    with _file_lock(build_dir / ".lock"):
        env = dict(os.environ)
        configure = ["cmake", "-S", str(RUNTIME_DIR), "-B", str(build_dir), "-DONNX_DC_BUILD_TOOLS=ON"]
        configure.append(f"-DONNX_DC_SANITIZE={'ON' if sanitize else 'OFF'}")
        if compiler:
            configure.append(f"-DCMAKE_CXX_COMPILER={compiler}")
        jobs = str(max(1, os.cpu_count() or 1))
        for command in (configure, ["cmake", "--build", str(build_dir), "--parallel", jobs]):
            result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
            assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return build_dir


def clang_asan_runtime() -> str:
    """Path of clang's shared AddressSanitizer runtime (to LD_PRELOAD into python)."""
    clang = shutil.which("clang++") or shutil.which("clang")
    assert clang, "clang is needed for the sanitizer build (Debian: apt-get install clang libclang-rt-14-dev)"
    path = subprocess.run(
        [clang, "-print-file-name=libclang_rt.asan-x86_64.so"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert os.path.isfile(path), f"clang's ASan runtime not found ({path}); install libclang-rt-14-dev"
    return path


def decode_with_tool(
    tool: Path, container: bytes, work_dir: Path, *, threads: int | None = None, env: dict | None = None
) -> tuple[int, bytes, str]:
    """Run onnx_dc_decode on ``container``: (exit code, dense bytes, stderr)."""
    source = work_dir / "container.odc"
    output = work_dir / "dense.bin"
    source.write_bytes(container)
    if output.exists():
        output.unlink()
    command = [str(tool), str(source), str(output)] + ([] if threads is None else [str(threads)])
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    data = output.read_bytes() if result.returncode == 0 else b""
    return result.returncode, data, result.stderr


# ---------------------------------------------------------------------------- sanitizer workload
def corrupted_containers(container: bytes, rng: np.random.Generator, count: int) -> list[bytes]:
    """Bit flips, truncations and extensions of ``container``; half of them with the CRC recomputed."""
    import zlib

    results = []
    for i in range(count):
        data = bytearray(container)
        kind = i % 4
        if kind == 0:
            for _ in range(int(rng.integers(1, 4))):
                position = int(rng.integers(0, len(data)))
                data[position] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1:
            del data[int(rng.integers(0, len(data))) :]
        elif kind == 2:
            data += bytes(rng.integers(0, 256, size=int(rng.integers(1, 16)), dtype=np.uint8))
        else:
            position = int(rng.integers(0, max(1, len(data) - 4)))
            data[position] = int(rng.integers(0, 256))
        if i % 2 == 1 and len(data) >= 28:
            data[-4:] = zlib.crc32(bytes(data[:-4])).to_bytes(4, "little")
        results.append(bytes(data))
    return results


def run_matmul_case(library: str, rng: np.random.Generator, *, k: int, n: int, sparsity: float, layout: str,
                    trans_b: int, batches: tuple[int, ...], threads: int, bias: bool = True,
                    sparse_input: int = 0, bits: int = 5) -> None:
    container, dense = random_container(rng, (n, k) if trans_b else (k, n), sparsity=sparsity, layout=layout,
                                        bits=bits)
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    model = matmul_model(container, trans_b=trans_b, alpha=0.5, beta=2.0, bias=b, sparse_input=sparse_input)
    session = make_session(model, library, threads=threads)
    for batch in batches:
        x = random_activations(rng, (batch, k), zero_fraction=0.6 if sparse_input else 0.3)
        (y,) = session.run(None, {"x": x})
        assert_matches_reference(y, reference_matmul(x, dense, trans_b=trans_b, alpha=0.5, beta=2.0, bias=b))


def sanitizer_workload(library: str) -> None:
    """The runtime exercised end to end; run under ASan + UBSan by test_runtime_sanitizers."""
    rng = np.random.default_rng(7)
    for sparsity in (0.0, 0.5, 0.9, 0.99, 1.0):
        for layout in ("dense", "sparse"):
            for sparse_input in (0, 1):
                run_matmul_case(library, rng, k=96, n=2100, sparsity=sparsity, layout=layout, trans_b=0,
                                batches=(1, 3, 64, 257), threads=2, sparse_input=sparse_input)
    for trans_b in (0, 1):
        for sparse_input in (0, 1):
            run_matmul_case(library, rng, k=130, n=70, sparsity=0.9, layout="auto", trans_b=trans_b,
                            batches=(1, 5, 17), threads=1, sparse_input=sparse_input)
            # Three blocks (column runs: of at most 4096 rows; row runs: of at most
            # 2048 columns), runs mostly in groups (2-bit codes) or singles (8-bit).
            k, n = (24, 4200) if sparse_input else (8300, 24)
            for bits in (2, 8):
                run_matmul_case(library, rng, k=k, n=n, sparsity=0.9, layout="auto", trans_b=trans_b,
                                batches=(1, 9), threads=2, sparse_input=sparse_input, bits=bits)
    # 3-D input and a container that is a graph input (decoded per call).
    container, dense = random_container(rng, (40, 30), sparsity=0.8)
    session = make_session(matmul_model(None), library, threads=2)
    x = random_activations(rng, (2, 3, 40))
    (y,) = session.run(None, {"x": x, "fc.weight.dc": np.frombuffer(container, np.uint8)})
    assert_matches_reference(y, reference_matmul(x, dense))
    # Concurrent runs on one session.
    session = make_session(matmul_model(container), library, threads=2)
    inputs = [random_activations(rng, (7, 40)) for _ in range(8)]
    expected = [session.run(None, {"x": x})[0] for x in inputs]
    failures = []

    def worker(i: int) -> None:
        for _ in range(5):
            if not np.array_equal(session.run(None, {"x": inputs[i]})[0], expected[i]):
                failures.append(i)

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert not failures
    # Code panels (many rows) on every kernel variant: remainders in rows, K and N, 2..8-bit codes
    # (8-bit: the VBMI byte-plane decoder), pruned and not, trans_b, bias, fused activations.
    from onnx import helper as _helper

    for isa in ("generic", "avx2", "avx512", "best"):
        os.environ["ONNX_DC_KERNEL_ISA"] = isa
        try:
            for bits, sparsity, trans_b, activation in ((2, 0.0, 0, "gelu"), (5, 0.5, 1, "gelu_tanh"),
                                                        (7, 0.3, 0, "relu"), (8, 0.0, 1, "none"), (8, 0.6, 0, "gelu")):
                k, n = 131, 45
                container, dense = random_container(rng, (n, k) if trans_b else (k, n), sparsity=sparsity, bits=bits)
                b = rng.standard_normal(n).astype(np.float32)
                model = matmul_model(container, trans_b=trans_b, alpha=0.5, beta=2.0, bias=b)
                model.graph.node[0].attribute.append(_helper.make_attribute("activation", activation))
                session = make_session(model, library, threads=2)
                for rows in (1, 13, 250):
                    x = random_activations(rng, (rows, k))
                    (y,) = session.run(None, {"x": x})
                    assert y.shape == (rows, n) and np.isfinite(y).all()
        finally:
            del os.environ["ONNX_DC_KERNEL_ISA"]
    # precision = "bf16x3" (AMX tiles where the CPU has them): remainders in rows (16-row tiles, 240-row
    # tasks), K (32-wide steps, 256-deep blocks) and N; 8-bit codes in byte-plane order and 5-bit with pruning.
    for bits, sparsity, k, n in ((8, 0.0, 257, 45), (5, 0.5, 33, 70)):
        container, dense = random_container(rng, (k, n), sparsity=sparsity, bits=bits)
        model = matmul_model(container, bias=rng.standard_normal(n).astype(np.float32))
        model.graph.node[0].attribute.append(_helper.make_attribute("precision", "bf16x3"))
        session = make_session(model, library, threads=2)
        for rows in (1, 17, 245):
            (y,) = session.run(None, {"x": random_activations(rng, (rows, k))})
            assert y.shape == (rows, n) and np.isfinite(y).all()
    # DCGather from every compact form, with negative and out-of-range indices.
    for sparsity in (0.0, 0.5, 0.95):
        container, table = random_container(rng, (70, 33), sparsity=sparsity, bits=6)
        node = _helper.make_node("DCGather", ["t.dc", "ids"], ["y"], domain=DOMAIN, name="g")
        graph = _helper.make_graph([node], "g", [_helper.make_tensor_value_info("ids", TensorProto.INT64, None)],
                                   [_helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                   [container_initializer(container, "t.dc")])
        session = make_session(_model(graph), library, threads=2)
        ids = rng.integers(-70, 70, size=(8, 40))
        (y,) = session.run(None, {"ids": ids})
        assert same_bits(y, np.take(table, ids, axis=0))
        for bad in (70, -71):
            try:
                session.run(None, {"ids": np.array([0, bad], np.int64)})
            except Exception as error:  # noqa: BLE001
                assert "out of range" in str(error)
            else:
                raise AssertionError("out-of-range index accepted")
    # Decompress, every dtype.
    for dtype, (op_type, elem_type) in DECOMPRESS_OPS.items():
        container, dense = random_container(rng, (3, 5, 7), sparsity=0.6, bits=3, index_bits=2, dtype=dtype)
        (y,) = make_session(decompress_model(container, op_type, elem_type), library).run(None, {})
        assert same_bits(y, dense)
    # Every test vector through DCDecompress, and corrupted containers through DCMatMul.
    for vector in vector_manifest():
        data = (VECTORS_DIR / vector["file"]).read_bytes()
        if vector["valid"]:
            expected = vector_expected(vector)
            op_type, elem_type = DECOMPRESS_OPS[expected.dtype]
            (y,) = make_session(decompress_model(data, op_type, elem_type), library).run(None, {})
            assert same_bits(y, expected), vector["file"]
        else:
            try:
                make_session(matmul_model(data), library)
            except Exception as error:  # noqa: BLE001 - onnxruntime raises its own types
                assert vector["error"].lower() in str(error).lower(), (vector, str(error))
            else:
                raise AssertionError(f"{vector['file']} was accepted")
    container, _ = random_container(rng, (64, 48), sparsity=0.7, layout="sparse")
    for bad in corrupted_containers(container, rng, 120):
        try:
            make_session(matmul_model(bad), library).run(None, {"x": np.ones((2, 64), np.float32)})
        except Exception:  # noqa: BLE001, S110 - rejecting is the expected outcome
            pass
    print("sanitizer workload: ok", flush=True)


def loaded_libraries() -> str:
    return Path("/proc/self/maps").read_text()


if __name__ == "__main__":
    target = sys.argv[1]
    assert re.search(r"libclang_rt\.asan", loaded_libraries()), "ASan runtime not loaded"
    keep_loaded = make_session(matmul_model(random_container(np.random.default_rng(0), (4, 4), sparsity=0.5)[0]), target)
    assert str(Path(target).resolve()) in loaded_libraries(), "the sanitizer build of the library is not the one loaded"
    sanitizer_workload(target)
