"""Build script: the onnx_dc package plus its C++ operator library.

Project metadata lives in pyproject.toml; this file only adds the build step
that compiles runtime/ (a CMake project) and puts ``libonnx_dc_ops.so`` inside
the ``onnx_dc`` package, for ``pip install .`` (into the wheel) and for
``pip install -e .`` (into the source tree's ``onnx_dc/``).

The build needs cmake (>= 3.18) and a C++17 compiler; onnxruntime's C API
header is taken from ``ONNX_DC_ORT_INCLUDE_DIR``, ``/usr/include/onnxruntime``
or fetched from Debian by ``runtime/fetch_ort_headers.sh`` (see
runtime/CMakeLists.txt). If the library cannot be built, installation still
succeeds with a warning; ``onnx_dc.ops_library_path()`` then raises
``LibraryNotFoundError`` saying how to fix it, and everything that does not run
the custom operators keeps working.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
RUNTIME_DIR = ROOT / "runtime"
LIBRARY_FILE = "libonnx_dc_ops.so"
LIBRARY_MODULE = "onnx_dc.libonnx_dc_ops"


class _OperatorLibrary(Extension):
    """Marks the CMake-built library; it has no sources for setuptools to compile."""

    def __init__(self) -> None:
        super().__init__(LIBRARY_MODULE, sources=[], optional=True)


class _BuildFailure(Exception):
    """The operator library could not be built; the message says why."""


def _find_cmake() -> str:
    cmake = shutil.which("cmake")
    if cmake:
        return cmake
    try:  # the PyPI "cmake" package, if present
        import cmake as cmake_package  # type: ignore[import-not-found]

        candidate = Path(cmake_package.CMAKE_BIN_DIR) / "cmake"
        if candidate.is_file():
            return str(candidate)
    except ImportError:
        pass
    raise _BuildFailure("cmake not found (Debian: apt-get install cmake g++)")


def _run(command: list[str]) -> None:
    print("onnx-dc:", " ".join(command), flush=True)
    result = subprocess.run(command, cwd=ROOT, check=False)
    if result.returncode != 0:
        raise _BuildFailure(f"command failed with exit code {result.returncode}: {' '.join(command)}")


def _cmake_build(build_dir: Path) -> Path:
    """Configure and build runtime/ in ``build_dir``; return the built library."""
    if not sys.platform.startswith("linux"):
        raise _BuildFailure(f"the operator library builds on Linux only (this is {sys.platform})")
    cmake = _find_cmake()
    build_dir.mkdir(parents=True, exist_ok=True)
    _run([cmake, "-S", str(RUNTIME_DIR), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release"])
    jobs = str(max(1, os.cpu_count() or 1))
    _run([cmake, "--build", str(build_dir), "--target", "onnx_dc_ops", "--parallel", jobs])
    library = build_dir / LIBRARY_FILE
    if not library.is_file():
        raise _BuildFailure(f"the build finished but {library} is missing")
    return library


def _warn(reason: str) -> None:
    bar = "=" * 78
    sys.stderr.write(
        f"\n{bar}\nWARNING: onnx-dc's C++ operator library ({LIBRARY_FILE}) was NOT built:\n  {reason}\n"
        "The package is installed without it: compressing, decompress and validate work,\n"
        "but running compressed models in onnxruntime (onnx_dc.ops_library_path()) does not.\n"
        "Fix: install cmake and a C++17 compiler (Debian: apt-get install cmake g++), make\n"
        "onnxruntime's headers available (automatic on Debian through apt-get download, or set\n"
        f"ONNX_DC_ORT_INCLUDE_DIR), then reinstall.\n{bar}\n\n"
    )
    sys.stderr.flush()


class BuildOperatorLibrary(build_ext):
    """build_ext that runs CMake for the operator library."""

    def get_ext_filename(self, fullname: str) -> str:
        # A plain library name, no Python ABI suffix: setuptools asks with the
        # full module name, distutils' get_ext_fullpath with its last part.
        if fullname == LIBRARY_MODULE:
            return os.path.join("onnx_dc", LIBRARY_FILE)
        if fullname == LIBRARY_MODULE.rsplit(".", 1)[-1]:
            return LIBRARY_FILE
        return super().get_ext_filename(fullname)

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, _OperatorLibrary):
            super().build_extension(ext)
            return
        target = Path(self.get_ext_fullpath(ext.name))
        try:
            built = _cmake_build(Path(self.build_temp).resolve() / "runtime")
        except (_BuildFailure, OSError) as error:
            _warn(str(error))
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built, target)

    def copy_extensions_to_source(self) -> None:
        # Editable installs: only copy a library that was actually built.
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            filename = self.get_ext_filename(self.get_ext_fullname(ext.name))
            regular_file = os.path.join(self.build_lib, filename)
            inplace_file = os.path.join(build_py.get_package_dir("onnx_dc"), os.path.basename(filename))
            if os.path.exists(regular_file):
                self.copy_file(regular_file, inplace_file, level=self.verbose)


setup(
    ext_modules=[_OperatorLibrary()],
    cmdclass={"build_ext": BuildOperatorLibrary},
)
