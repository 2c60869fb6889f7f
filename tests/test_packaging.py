"""What ``pip install .`` puts in the wheel: every subpackage, the operator library, a light console script."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _packages_on_disk() -> set[str]:
    return {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "onnx_dc").rglob("__init__.py")}


def test_every_subpackage_is_listed_for_the_wheel():
    assert set(PYPROJECT["tool"]["setuptools"]["packages"]) == _packages_on_disk()


def test_the_runtime_dependencies_are_what_the_package_imports():
    """Nothing only the tests or benchmarks use (scikit-learn, matplotlib) is installed for every user."""
    names = {dep.split(">")[0].split("<")[0].split("=")[0].strip() for dep in PYPROJECT["project"]["dependencies"]}
    assert names == {"numpy", "ml_dtypes", "onnx", "onnxruntime", "protobuf", "threadpoolctl", "tqdm"}
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert any(dep.startswith("scikit-learn") for dep in extras["test"])
    assert any(dep.startswith("matplotlib") for dep in extras["plot"])


@pytest.mark.slow
def test_the_wheel_holds_the_package_and_the_operator_library(tmp_path):
    """Build the wheel as ``pip install .`` does (from a copy of the sources, CMake included) and list it."""
    source = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "onnx_dc", "runtime", "setup.py", "pyproject.toml", "README.md"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=1800,
                           check=False)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("onnx_dc-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in _packages_on_disk():
        assert f"{package.replace('.', '/')}/__init__.py" in names, package
    assert {"onnx_dc/libonnx_dc_ops.so", "onnx_dc/console.py", "onnx_dc/progress.py"} <= names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "onnx-dc = onnx_dc.console:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
