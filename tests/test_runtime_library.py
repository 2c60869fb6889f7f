"""The operator library as a file: built, found, exports, loads into the allowed onnxruntime versions."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import onnxruntime as ort
import pytest

import onnx_dc.graph.library as library_module
from onnx_dc.graph.library import LIBRARY_ENV_VAR, ops_library_path
from onnx_dc.errors import LibraryNotFoundError
from test_runtime_support import REPO_ROOT, make_session, matmul_model, random_container

TESTS_DIR = Path(__file__).resolve().parent
#: Oldest and newest onnxruntime that pyproject.toml allows (onnxruntime>=1.21,<1.33).
ONNXRUNTIME_VERSIONS = ("1.21.1", "1.32.0")


def test_library_is_built_and_found() -> None:
    path = Path(ops_library_path())
    assert path.is_file()
    assert path.name == "libonnx_dc_ops.so"


def test_library_exports_only_the_registration_entry_point() -> None:
    nm = shutil.which("nm")
    assert nm, "nm (binutils) is needed to list the library's exported symbols"
    result = subprocess.run([nm, "-D", "--defined-only", ops_library_path()], capture_output=True, text=True, check=True)
    exported = [line.split()[-1] for line in result.stdout.splitlines() if line.strip()]
    assert exported == ["RegisterCustomOps"]


def test_library_links_nothing_from_onnxruntime() -> None:
    result = subprocess.run(["ldd", ops_library_path()], capture_output=True, text=True, check=True)
    assert "onnxruntime" not in result.stdout


def test_environment_variable_selects_another_library(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    other = tmp_path / "libother.so"
    other.write_bytes(b"")
    monkeypatch.setenv(LIBRARY_ENV_VAR, str(other))
    assert ops_library_path() == str(other.resolve())
    monkeypatch.setenv(LIBRARY_ENV_VAR, str(tmp_path / "missing.so"))
    with pytest.raises(LibraryNotFoundError, match=LIBRARY_ENV_VAR):
        ops_library_path()


def test_missing_library_says_how_to_build_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(LIBRARY_ENV_VAR, raising=False)
    monkeypatch.setattr(library_module, "__file__", str(tmp_path / "_library.py"))
    with pytest.raises(LibraryNotFoundError) as error:
        ops_library_path()
    message = str(error.value)
    assert "not built" in message and "pip install" in message and "cmake" in message


def test_package_reexports_ops_library_path() -> None:
    import onnx_dc

    assert str(onnx_dc.ops_library_path()) == ops_library_path()


def test_many_sessions_and_registrations() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    container, dense = random_container(rng, (16, 8), sparsity=0.5)
    x = rng.standard_normal((2, 16)).astype(np.float32)
    for _ in range(20):
        (y,) = make_session(matmul_model(container), ops_library_path()).run(None, {"x": x})
        np.testing.assert_allclose(y, x @ dense, rtol=1e-5, atol=1e-6)


def _cache_dir() -> Path:
    root = os.environ.get("ONNX_DC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "onnx-dc"
    )
    return Path(root) / "ort-wheels"


def _onnxruntime_path(version: str) -> str | None:
    """A directory to put first on PYTHONPATH to import onnxruntime ``version`` (None: the installed one)."""
    if ort.__version__ == version:
        return None
    target = _cache_dir() / f"onnxruntime-{version}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".onnxruntime-{version}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "onnxruntime" / "__init__.py").is_file():
            staging = target.with_name(target.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                       "--no-deps", "--target", str(staging), f"onnxruntime=={version}"]
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            assert result.returncode == 0, f"cannot install onnxruntime {version}:\n{result.stderr[-3000:]}"
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
    return str(target)


_VERSION_CHECK = textwrap.dedent(
    """
    import sys
    import numpy as np
    import onnxruntime as ort
    from test_runtime_support import (DECOMPRESS_OPS, assert_matches_reference, decompress_model, make_session,
                                      matmul_model, random_activations, random_container, reference_matmul, same_bits)
    assert ort.__version__ == sys.argv[2], ort.__version__
    library = sys.argv[1]
    rng = np.random.default_rng(3)
    container, dense = random_container(rng, (300, 70), sparsity=0.9)
    bias = rng.standard_normal(70).astype(np.float32)
    session = make_session(matmul_model(container, alpha=0.5, bias=bias), library, threads=2)
    for batch in (1, 3, 64):
        x = random_activations(rng, (batch, 300))
        assert_matches_reference(session.run(None, {"x": x})[0],
                                 reference_matmul(x, dense, alpha=0.5, bias=bias))
    for dtype, (op_type, elem_type) in DECOMPRESS_OPS.items():
        container, dense = random_container(rng, (4, 6), sparsity=0.5, bits=3, dtype=dtype)
        (y,) = make_session(decompress_model(container, op_type, elem_type), library).run(None, {})
        assert same_bits(y, dense)
    try:
        make_session(matmul_model(container[:-1] + bytes([container[-1] ^ 1])), library)
    except Exception as error:
        assert "checksum" in str(error), str(error)
    else:
        raise AssertionError("corrupted container accepted")
    print("onnxruntime", ort.__version__, "ok")
    """
)


@pytest.mark.slow  # the full suite only: onnxruntime versions in their own environments
@pytest.mark.parametrize("version", ONNXRUNTIME_VERSIONS)
def test_loads_into_oldest_and_newest_allowed_onnxruntime(version: str) -> None:
    extra = _onnxruntime_path(version)
    paths = ([extra] if extra else []) + [str(TESTS_DIR), str(REPO_ROOT)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-c", _VERSION_CHECK, ops_library_path(), version],
        capture_output=True, text=True, env=env, check=False, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert f"onnxruntime {version} ok" in result.stdout
